"""Image-level labels written into file names, as the histology WSSS datasets store them.

WSSS4LUAD writes ``...-[1, 1, 0].png``, LUAD-HistoSeg ``...-[1 0 0 1].png`` and BCSS-WSSS
``...+0[1101].png``: a bracketed multi-hot vector, with commas, spaces or nothing between digits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_domains.data.io import DataError

if TYPE_CHECKING:
    from torch import Tensor

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def label_from_name(path: Path, num_classes: int) -> Tensor:
    """The multi-hot vector in the last ``[...]`` of the file name; DataError naming the file."""
    import torch

    found = _BRACKETS.findall(path.stem)
    if not found:
        raise DataError(path, "file name holds no image-level label in brackets, e.g. '[1, 0, 1]'")
    digits = re.sub(r"[\s,]", "", found[-1])
    if not digits or set(digits) - {"0", "1"}:
        raise DataError(path, f"label '[{found[-1]}]' in the file name must hold only 0 and 1")
    if len(digits) != num_classes:
        raise DataError(
            path, f"label '[{found[-1]}]' in the file name has {len(digits)} entries, expected {num_classes}"
        )
    return torch.tensor([float(d) for d in digits])
