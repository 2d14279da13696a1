"""Turning a domain's sample dicts into normalised, fixed-size training batches."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from wsss_domains.domains.contract import DomainPlugin, Sample


def normalize(image: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = image.new_tensor(mean)[:, None, None]
    s = image.new_tensor(std)[:, None, None]
    return (image - m) / s


def denormalize(image: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """The inverse of :func:`normalize` (``... x 3 x H x W``), for models that read raw pixels (SAM)."""
    m = image.new_tensor(mean)[:, None, None]
    s = image.new_tensor(std)[:, None, None]
    return image * s + m


class TrainingView(Dataset):
    """Augments with the domain's hook, applies its colour handling, resizes and normalises."""

    def __init__(
        self,
        base: Dataset,
        domain: DomainPlugin,
        image_size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = True,
    ) -> None:
        self.base = base
        self.domain = domain
        self.image_size = image_size
        self.mean, self.std = mean, std
        self.augment = augment

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample: Sample = self.base[index]
        if self.augment:
            sample = self.domain.train_augment(sample)
        image = self.domain.preprocess(sample["image"])
        if tuple(image.shape[-2:]) != tuple(self.image_size):
            image = F.interpolate(
                image[None], size=tuple(self.image_size), mode="bilinear", align_corners=False
            )[0]
        return {"image": normalize(image, self.mean, self.std), "label": sample["label"].float()}
