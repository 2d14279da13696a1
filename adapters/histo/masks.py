"""Reading class-index masks with a check that every stored id is one the dataset defines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from wsss_domains.data.io import DataError, read_index_mask

if TYPE_CHECKING:
    from torch import Tensor


def read_checked_mask(path: Path, num_ids: int) -> Tensor:
    """Index mask (palette or grey PNG) whose values must lie in ``0..num_ids-1``."""
    import torch

    mask = read_index_mask(path)
    bad = (mask < 0) | (mask >= num_ids)
    if bad.any():
        y, x = (int(v) for v in torch.nonzero(bad)[0])
        raise DataError(
            path, f"unknown class id {int(mask[y, x])} at ({y}, {x}); this dataset uses ids 0..{num_ids - 1}"
        )
    return mask


def exclude_index_to_ignore(mask: Tensor, exclude_index: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Map the dataset's 'white background or exclude' id to ``ignore_index``; also return where."""
    exclude = mask == exclude_index
    return mask.masked_fill(exclude, ignore_index), exclude
