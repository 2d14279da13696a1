"""A second, pixel-annotated *source* dataset beside the pseudo-labelled target split.

Why: domain-adaptive training (:mod:`wsss_domains.segmentation.das`) learns from the masks of
another dataset (a public one, another scanner or city) while adapting to the user's own images.
The source's classes are matched to the target's by name, or by an explicit map
(``building=urban,road=urban,background=ignore``); source classes without a match carry no loss.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsss_domains.data.io import DataError
from wsss_domains.domains.contract import LabelSpace, Sample
from wsss_domains.errors import UserError

IGNORE_WORDS = ("ignore", "-")


def parse_class_map(text: str | None) -> dict[str, str]:
    """``"a=b,c=ignore"`` -> ``{"a": "b", "c": "ignore"}`` (source class name -> target class name)."""
    mapping: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        source, sep, target = part.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise UserError(
                f"--source-classes: expected SOURCE=TARGET pairs separated by commas, got '{part}'"
            )
        mapping[source.strip()] = target.strip()
    return mapping


def class_lookup(source: LabelSpace, target: LabelSpace, mapping: dict[str, str] | None = None) -> Tensor:
    """A 256-entry table from source mask ids to target ids (unmatched and ignored: the target's ignore)."""
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(source.classes))
    if unknown:
        raise UserError(
            f"--source-classes names {unknown}, not classes of the source ({', '.join(source.classes)})"
        )
    targets = {name: index for index, name in enumerate(target.classes)}
    bad = sorted({v for v in mapping.values() if v not in targets and v not in IGNORE_WORDS})
    if bad:
        raise UserError(
            f"--source-classes maps to {bad}, not classes of the target ({', '.join(target.classes)})"
        )
    table = torch.full((256,), target.ignore_index, dtype=torch.long)
    for index, name in enumerate(source.classes):
        goal = mapping.get(name, name)
        if goal in targets:
            table[index] = targets[goal]
    if not (table[: source.num_classes] != target.ignore_index).any():
        raise UserError(
            f"no source class ({', '.join(source.classes)}) matches a target class ({', '.join(target.classes)});"
            " map them with --source-classes SOURCE=TARGET,..."
        )
    return table


class SourceDomainDataset(Dataset):
    """Samples of a source dataset whose ``mask`` is its ground truth in the target's class ids."""

    def __init__(self, base: Dataset, lookup: Tensor) -> None:
        self.base = base
        self.lookup = lookup

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        sample: Sample = self.base[index]
        if "mask" not in sample:
            raise DataError(
                str(sample.get("id", index)), "a source sample has no mask: the source must be annotated"
            )
        mask = sample["mask"].long()
        if "exclude" in sample:
            mask = mask.masked_fill(sample["exclude"], 255)
        mapped = self.lookup[mask.clamp(0, 255)]
        return {"image": sample["image"], "mask": mapped, "id": str(sample.get("id", index))}


class PairedView(Dataset):
    """Each target crop with a source crop drawn at random: ``source_image`` and ``source_mask`` beside it."""

    def __init__(self, target: Dataset, source: Dataset) -> None:
        if len(source) == 0:  # type: ignore[arg-type]
            raise UserError("the source dataset is empty")
        self.target = target
        self.source = source

    def __len__(self) -> int:
        return len(self.target)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.target[index]
        other = self.source[int(torch.randint(len(self.source), ()))]  # type: ignore[arg-type]
        return {**item, "source_image": other["image"], "source_mask": other["mask"]}
