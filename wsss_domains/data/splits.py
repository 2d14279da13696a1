"""Split names with an optional slice, so benchmarks can train on some images and score others.

Syntax: ``<split>`` or ``<split>[<start>:<stop>]``. The slice applies to the split's images
sorted by sample id (plain string order), before any tiling, so two slices never share an image
(nor a tile of one). Bounds are Python-style integers (negative counts from the end) or
percentages of the split's size, rounded to the nearest image:

* ``train[0:6]`` / ``train[6:]``: the first six images, and all the others;
* ``train[:80%]`` / ``train[80%:]``: a deterministic 80/20 hold-out;
* ``Tile 1,Tile 2[-3:]`` (Dubai): the slice applies to the union of the listed groups;
* ``validation[fold=2/3]`` / ``validation[fold!=2/3]``: fold 2 of 3 and every image outside it, for
  k-fold cross-validation (folds count from 1). Folds interleave: the image at sorted position
  ``p`` belongs to fold ``p % k + 1``, so images whose ids cluster by content (the four WSSS4LUAD
  ROIs with normal tissue are 02, 05, 08 and 09) spread over the folds instead of filling one.

Sorting by id keeps the hold-out stable across machines and runs; for datasets whose ids follow
geography (Dubai tiles, ISPRS areas) it also keeps train and score regions apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from wsss_domains.domains.contract import ListsSampleIds

T = TypeVar("T")

_SLICED = re.compile(r"^(?P<base>.*?)\s*\[(?P<start>[^\[\]:]*):(?P<stop>[^\[\]:]*)\]\s*$")
_FOLD = re.compile(r"^(?P<base>.*?)\s*\[\s*fold\s*(?P<op>!?=)\s*(?P<fold>\d+)\s*/\s*(?P<folds>\d+)\s*\]\s*$")
_BOUND = re.compile(r"^\s*(?P<value>-?\d+(?:\.\d+)?)\s*(?P<percent>%?)\s*$")


@dataclass(frozen=True)
class SplitRequest:
    """A split name and the optional slice of its sorted images."""

    base: str
    start: str = ""
    stop: str = ""
    # k-fold selection: fold ``fold`` of ``folds`` (1-based), or every other fold with ``complement``.
    fold: int | None = None
    folds: int | None = None
    complement: bool = False

    @property
    def sliced(self) -> bool:
        return bool(self.start.strip() or self.stop.strip() or self.fold is not None)

    def indices(self, n: int) -> list[int]:
        """Positions, among ``n`` images sorted by id, that this request selects (in order)."""
        if self.fold is None or self.folds is None:
            return list(range(n))[slice(_index(self.start, n), _index(self.stop, n))]
        return [i for i in range(n) if (i % self.folds == self.fold - 1) != self.complement]

    def select(self, items: Sequence[T], key: Any = lambda s: s.id) -> list[T]:
        """The items of this request: all of them sorted by ``key`` (their id), then selected."""
        ordered = sorted(items, key=key)
        return [ordered[i] for i in self.indices(len(ordered))]


def _index(text: str, n: int) -> int | None:
    if not text.strip():
        return None
    match = _BOUND.match(text)
    if match is None:
        raise ValueError(f"slice bound '{text}' must be an integer or a percentage such as 80%")
    if match["percent"]:
        value = float(match["value"])
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"slice bound '{text}' must lie between 0% and 100%")
        return round(n * value / 100.0)
    if "." in match["value"]:
        raise ValueError(f"slice bound '{text}' must be an integer (or end in % for a fraction)")
    return int(match["value"])


def parse_split(split: str) -> SplitRequest:
    """``train[0:6]`` -> ``SplitRequest('train', '0', '6')``; ValueError on a malformed slice or fold."""
    text = split.strip()
    fold = _FOLD.match(text)
    if fold is not None:
        index, folds = int(fold["fold"]), int(fold["folds"])
        if folds < 2 or not 1 <= index <= folds:
            raise ValueError(f"split '{split}': fold i/k needs k >= 2 and 1 <= i <= k")
        if not fold["base"].strip():
            raise ValueError(f"split '{split}' names no split before its fold")
        return SplitRequest(fold["base"].strip(), fold=index, folds=folds, complement=fold["op"] == "!=")
    match = _SLICED.match(text)
    if match is None:
        if "[" in text or "]" in text:
            raise ValueError(
                f"split '{split}': a slice is written '[start:stop]' (e.g. 'train[0:6]') and a fold "
                "'[fold=i/k]' or '[fold!=i/k]'"
            )
        return SplitRequest(text)
    request = SplitRequest(match["base"].strip(), match["start"], match["stop"])
    _index(request.start, 1)
    _index(request.stop, 1)
    if not request.base:
        raise ValueError(f"split '{split}' names no split before its slice")
    return request


def sample_ids(dataset: Any) -> list[str]:
    """Every sample's id, in index order, without decoding images where the dataset allows.

    A dataset that lists its ids (:class:`~wsss_domains.domains.contract.ListsSampleIds`, as the
    built-in loaders do from their file records) costs no reads, so slicing a split of large images
    is free; any other dataset is read sample by sample.
    """
    n = len(dataset)
    if isinstance(dataset, ListsSampleIds):
        ids = [str(sample_id) for sample_id in dataset.sample_ids()]
        if len(ids) != n:
            raise ValueError(f"{type(dataset).__name__}.sample_ids() gave {len(ids)} ids for {n} samples")
        return ids
    return [str(dataset[i]["id"]) for i in range(n)]
