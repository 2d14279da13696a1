"""The contract every refiner meets, and the input checks they share.

Refiners take the un-normalised RGB image (``3xHxW`` in [0, 1]) and the CAMs of the K foreground
classes present in it (``KxHxW`` in [0, 1]). With ``bg_threshold=None`` they return K refined
channels; with a threshold they return ``K+1`` channels, background first (see ``background.py``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Refiner(Protocol):
    """A post-hoc CAM refiner; one object per configuration so it can be built by name."""

    name: str

    def __call__(self, image: Tensor, cams: Tensor, bg_threshold: float | None = None) -> Tensor:
        """Refined scores: ``KxHxW`` without background, ``(K+1)xHxW`` (background first) with it."""
        ...


def as_batch(image: Tensor, cams: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Both inputs as ``Bx3xHxW`` / ``BxKxHxW`` plus whether they arrived unbatched.

    Checked up front so that a transposed image or CAMs at feature-map resolution fail here with a
    clear message instead of broadcasting silently inside the refiner.
    """
    if image.dim() != cams.dim() or image.dim() not in (3, 4):
        raise ValueError(
            f"image and cams must both be 3-D (single) or 4-D (batched); got {tuple(image.shape)} "
            f"and {tuple(cams.shape)}"
        )
    single = image.dim() == 3
    if single:
        image, cams = image.unsqueeze(0), cams.unsqueeze(0)
    if image.shape[1] != 3:
        raise ValueError(f"image must have 3 (RGB) channels first; got shape {tuple(image.shape)}")
    if image.shape[0] != cams.shape[0] or image.shape[-2:] != cams.shape[-2:]:
        raise ValueError(
            f"cams {tuple(cams.shape)} must match the image {tuple(image.shape)} in batch and HxW; "
            "upsample CAMs to the image size first"
        )
    if cams.shape[1] == 0:
        raise ValueError("cams has no channels; there must be at least one present class")
    if not image.is_floating_point() or not cams.is_floating_point():
        raise TypeError("image and cams must be floating-point tensors (image in [0, 1])")
    return image, cams, single
