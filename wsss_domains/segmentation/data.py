"""A split's images paired with their pseudo-labels, cut into training crops for the segmenter.

The segmenter learns from pseudo-labels only: each sample's ground-truth ``mask`` (and anything
derived from it) is dropped and replaced by the pseudo-label PNG that ``pseudo-labels`` wrote for
that sample id. Pixels a pseudo-label leaves unassigned (the ignore index: glass, no-data, excluded
or uncertain pixels) carry no loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from wsss_domains.data.io import DataError, check_same_size, read_index_mask
from wsss_domains.data.splits import sample_ids
from wsss_domains.domains.contract import DomainPlugin, LabelSpace, Sample
from wsss_domains.evaluation.evaluate import pred_filename
from wsss_domains.training.data import normalize


class SampleView(Dataset):
    """One sample per sample of ``base``, its ids read once (without decoding where ``base`` lists them)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.ids = sample_ids(base)

    def __len__(self) -> int:
        return len(self.ids)

    def sample_ids(self) -> list[str]:
        return list(self.ids)


class PseudoLabelledDataset(SampleView):
    """Samples of ``base`` whose ``mask`` is the pseudo-label in ``folder`` (ground truth dropped).

    ``confidence``: the ``mask`` also says which pixels are confident (BECO's targets, see
    :func:`~wsss_domains.segmentation.beco.encode_confidence`), from the CAMs the pseudo-labeller
    saved beside the labels (``pseudo-labels --save-cams``).
    """

    def __init__(
        self, base: Dataset, folder: Path, label_space: LabelSpace, confidence: bool = False
    ) -> None:
        super().__init__(base)
        self.folder = Path(folder)
        self.label_space = label_space
        self.confidence = confidence
        if not self.folder.is_dir():
            raise DataError(self.folder, "pseudo-label folder not found")
        missing = [i for i in self.ids if not (self.folder / pred_filename(i)).is_file()]
        if missing:
            raise DataError(
                self.folder / pred_filename(missing[0]),
                f"pseudo-label not found ({len(missing)} of {len(self.ids)} samples have none; were the "
                "pseudo-labels written for this split with the same --tiles?)",
            )
        self.bg_threshold: float | None = None
        if confidence:
            no_cams = [i for i in self.ids if not self.cams_path(i).is_file()]
            if no_cams:
                raise DataError(
                    self.cams_path(no_cams[0]),
                    f"CAMs not found ({len(no_cams)} of {len(self.ids)} samples have none): BECO's confidence "
                    "comes from the pseudo-labels' CAMs; write them with pseudo-labels --save-cams",
                )
            self.bg_threshold = _recorded_bg_threshold(self.folder)

    def class_sets(self, min_share: float) -> list[set[int]]:
        """Each sample's foreground classes covering ``min_share`` of its pseudo-label (PNGs only read)."""
        from wsss_domains.data.splits import mask_classes

        return [
            mask_classes(self.label_space, read_index_mask(self.folder / pred_filename(i)), min_share)
            for i in self.ids
        ]

    def label(self, index: int) -> Tensor:
        """Sample ``index``'s pseudo-label alone (its image not decoded)."""
        return read_index_mask(self.folder / pred_filename(self.ids[index]))

    def cams_path(self, sample_id: str) -> Path:
        return self.folder / "cams" / (pred_filename(sample_id)[: -len(".png")] + ".npz")

    def __getitem__(self, index: int) -> Sample:
        sample = self.base[index]
        path = self.folder / pred_filename(sample["id"])
        labels = read_index_mask(path)
        check_same_size(sample["image"], labels, path)
        bad = (labels >= self.label_space.num_classes) & (labels != self.label_space.ignore_index)
        if bad.any():
            raise DataError(path, f"holds class id {int(labels[bad][0])}, outside the label space")
        if self.confidence:
            labels = self._with_confidence(sample["id"], labels)
        return {"image": sample["image"], "mask": labels, "id": sample["id"]}

    def _with_confidence(self, sample_id: str, labels: Tensor) -> Tensor:
        """The pseudo-label with BECO's confidence encoded (margin of the saved CAM scores)."""
        import numpy as np

        from wsss_domains.segmentation.beco import confidence_mask, encode_confidence

        path = self.cams_path(sample_id)
        with np.load(path) as saved:
            scores = torch.from_numpy(saved["cams"].astype(np.float32))
        if scores.shape[-2:] != labels.shape:
            raise DataError(path, f"CAMs of size {tuple(scores.shape[-2:])}, labels {tuple(labels.shape)}")
        if self.bg_threshold is not None:  # background is scored by the threshold it was decided by
            scores = torch.cat([scores, torch.full((1, *labels.shape), self.bg_threshold)])
        space = self.label_space
        confident = confidence_mask(scores, labels, space.ignore_index)
        return encode_confidence(labels, confident, space.num_classes, space.ignore_index)


def _recorded_bg_threshold(folder: Path) -> float | None:
    """The background threshold the pseudo-labeller recorded (None: background not thresholded)."""
    import json

    from wsss_domains.pseudo_labels.writer import SUMMARY_FILE

    path = folder / SUMMARY_FILE
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("bg_threshold")
    return None if value is None else float(value)


def crop_or_pad(sample: Sample, size: tuple[int, int], ignore_index: int) -> Sample:
    """A random ``size`` window of image and mask; smaller sides are padded (mask: ignore)."""
    image, mask = sample["image"], sample["mask"]
    h, w = image.shape[-2:]
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        mask = F.pad(mask, (0, pw, 0, ph), value=ignore_index)
        h, w = image.shape[-2:]
    y = int(torch.randint(0, h - size[0] + 1, ()))
    x = int(torch.randint(0, w - size[1] + 1, ()))
    return {
        **sample,
        "image": image[:, y : y + size[0], x : x + size[1]],
        "mask": mask[y : y + size[0], x : x + size[1]],
    }


def resize_pair(image: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Image (bilinear) and class-id mask (nearest) magnified by ``scale``."""
    if scale == 1.0:
        return image, mask
    h, w = image.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


class SegmentationView(Dataset):
    """Training crops: scale, a random crop, the domain's augmentation (masks follow), colour, normalise.

    ``scale_range``: each sample is magnified by ``scale`` times a factor drawn uniformly from
    ``[low, high]`` before the crop, so the network sees its objects at several sizes.
    """

    def __init__(
        self,
        base: Dataset,
        domain: DomainPlugin,
        label_space: LabelSpace,
        crop_size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        scale: float = 1.0,
        augment: bool = True,
        scale_range: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.base = base
        self.domain = domain
        self.label_space = label_space
        self.crop_size = crop_size
        self.mean, self.std = mean, std
        self.scale = scale
        self.augment = augment
        self.scale_range = scale_range

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample: Sample = self.base[index]
        low, high = self.scale_range  # no draw without a range: the crops' random stream stays as it was
        scale = self.scale * (low + (high - low) * float(torch.rand(()))) if high > low else self.scale * low
        image, mask = resize_pair(sample["image"], sample["mask"], scale)
        sample = crop_or_pad(
            {**sample, "image": image, "mask": mask}, self.crop_size, self.label_space.ignore_index
        )
        if self.augment:
            sample = self.domain.train_augment(sample)
        image = self.domain.preprocess(sample["image"])
        return {"image": normalize(image, self.mean, self.std), "mask": sample["mask"].long()}


class ValidationView(Dataset):
    """Whole images with their ground-truth masks, padded to a multiple of ``stride`` (mask: ignore).

    For monitoring a segmenter during training only (batch size 1): nothing is chosen by it.
    """

    def __init__(
        self,
        base: Dataset,
        domain: DomainPlugin,
        label_space: LabelSpace,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        scale: float = 1.0,
        stride: int = 32,
    ) -> None:
        self.base = base
        self.domain = domain
        self.label_space = label_space
        self.mean, self.std = mean, std
        self.scale = scale
        self.stride = stride

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample: Sample = self.base[index]
        if "mask" not in sample:
            raise DataError(str(sample["id"]), "the validation split has no masks to score against")
        mask = sample["mask"]
        if "exclude" in sample:
            mask = mask.masked_fill(sample["exclude"], self.label_space.ignore_index)
        image, mask = resize_pair(sample["image"], mask, self.scale)
        h, w = image.shape[-2:]
        size = (-(-h // self.stride) * self.stride, -(-w // self.stride) * self.stride)
        padded = crop_or_pad({"image": image, "mask": mask}, size, self.label_space.ignore_index)
        image = self.domain.preprocess(padded["image"])
        return {"image": normalize(image, self.mean, self.std), "mask": padded["mask"].long()}
