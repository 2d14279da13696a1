"""``labels.csv``: image-level labels of a custom folder dataset, one row per image.

Columns ``image`` (file name in ``images/``, extension optional) and ``labels``: class names
separated by ``;`` (``cat;dog``; empty for none), or a multi-hot vector of 0/1 separated by
``;`` or spaces over the foreground classes (or over all classes, background entry included and
then ignored).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_domains.data.io import DataError
from wsss_domains.domains.contract import LabelSpace

if TYPE_CHECKING:
    from torch import Tensor


def parse_labels(text: str, label_space: LabelSpace) -> Tensor:
    """One ``labels`` cell as a multi-hot foreground vector; ValueError says what is wrong."""
    import torch

    text = text.strip()
    label = torch.zeros(len(label_space.foreground))
    fg = label_space.foreground_names
    # Names may contain spaces ("traffic light"), so only ';' separates them.
    tokens = [t.strip() for t in text.split(";") if t.strip()]
    if all(t in label_space.classes for t in tokens):
        for t in tokens:
            if t in fg:
                label[fg.index(t)] = 1.0
        return label
    bits_text = tokens if ";" in text else text.split()
    if all(t in ("0", "1") for t in bits_text):
        bits = [float(t) for t in bits_text]
        if len(bits) == len(fg):
            return torch.tensor(bits)
        if len(bits) == label_space.num_classes:
            return torch.tensor([bits[i] for i in label_space.foreground])
        raise ValueError(
            f"multi-hot vector has {len(bits)} entries; expected {len(fg)} (foreground)"
            f" or {label_space.num_classes} (all classes)"
        )
    unknown = [t for t in tokens if t not in label_space.classes]
    raise ValueError(f"unknown class name(s) {unknown}; known: {', '.join(label_space.classes)}")


def read_labels_csv(path: Path, label_space: LabelSpace) -> dict[str, Tensor]:
    """Labels by image file name as written in the CSV; errors name the file and row."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "labels"} <= set(reader.fieldnames):
            raise DataError(path, f"needs the header 'image,labels', got {reader.fieldnames}")
        out = {}
        for row in reader:
            name = (row["image"] or "").strip()
            if not name:
                raise DataError(path, f"row {reader.line_num}: empty image name")
            if name in out:
                raise DataError(path, f"row {reader.line_num}: image {name!r} listed twice")
            try:
                out[name] = parse_labels(row["labels"] or "", label_space)
            except ValueError as exc:
                raise DataError(path, f"row {reader.line_num}: {exc}") from exc
    return out
