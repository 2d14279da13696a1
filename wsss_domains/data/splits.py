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
* ``train[fold=1/2, stratified]``: folds balanced by class instead of interleaved, for sets of a few
  large images where one class lives in one or two of them (DeepGlobe: forest in 2 of 8 scenes).
  Each image's classes are those covering at least ``STRATIFY_MIN_SHARE`` of its scored pixels
  (its image-level label where it has no mask); the assignment is the iterative stratification of
  Sechidis et al. (2011) with ties broken by fold order, so it is deterministic.
* ``validation[fold!=1/4] + training``: the union of several splits (each with its own slice or
  fold) of one dataset, in the order given: WSSS4LUAD's annotated ROIs of three folds plus the
  challenge's training patches, whose labels are in their file names. An image may appear once.

Sorting by id keeps the hold-out stable across machines and runs; for datasets whose ids follow
geography (Dubai tiles, ISPRS areas) it also keeps train and score regions apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from wsss_domains.domains.contract import ListsSampleIds

T = TypeVar("T")

_SLICED = re.compile(r"^(?P<base>.*?)\s*\[(?P<start>[^\[\]:]*):(?P<stop>[^\[\]:]*)\]\s*$")
_FOLD = re.compile(
    r"^(?P<base>.*?)\s*\[\s*fold\s*(?P<op>!?=)\s*(?P<fold>\d+)\s*/\s*(?P<folds>\d+)\s*"
    r"(?:,\s*(?P<stratified>stratified)\s*)?\]\s*$"
)
_BOUND = re.compile(r"^\s*(?P<value>-?\d+(?:\.\d+)?)\s*(?P<percent>%?)\s*$")

# A class counts in an image for stratified folds from this share of its scored pixels: a few
# stray pixels of a class should not make an image stand for it.
STRATIFY_MIN_SHARE = 0.05

# Gives the classes (ids) of each of the given items, in order: read only for stratified folds.
ClassesOf = Callable[[Sequence[Any]], Sequence[Collection[int]]]


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
    stratified: bool = False  # folds balanced by class (needs each image's classes), not interleaved

    @property
    def sliced(self) -> bool:
        return bool(self.start.strip() or self.stop.strip() or self.fold is not None)

    def indices(self, n: int, classes: Sequence[Collection[int]] | None = None) -> list[int]:
        """Positions, among ``n`` images sorted by id, that this request selects (in order).

        ``classes`` (each image's class ids, in the same order) is needed by stratified folds only.
        """
        if self.fold is None or self.folds is None:
            return list(range(n))[slice(_index(self.start, n), _index(self.stop, n))]
        if self.stratified:
            if classes is None:
                raise ValueError(
                    "stratified folds need each image's classes, which this dataset does not give"
                )
            if len(classes) != n:
                raise ValueError(f"stratified folds: {len(classes)} class sets for {n} images")
            fold_of = stratified_folds(classes, self.folds)
        else:
            fold_of = [i % self.folds for i in range(n)]
        return [i for i in range(n) if (fold_of[i] == self.fold - 1) != self.complement]

    def select(
        self, items: Sequence[T], key: Any = lambda s: s.id, classes_of: ClassesOf | None = None
    ) -> list[T]:
        """The items of this request: all of them sorted by ``key`` (their id), then selected.

        ``classes_of`` is called on the sorted items only when the folds are stratified.
        """
        ordered = sorted(items, key=key)
        classes = classes_of(ordered) if self.stratified and classes_of is not None else None
        return [ordered[i] for i in self.indices(len(ordered), classes)]


def fold_split(
    base: str, fold: int, folds: int, *, complement: bool = False, stratified: bool = False
) -> str:
    """The split text of fold ``fold`` of ``folds`` of ``base`` (every other fold with ``complement``)."""
    return f"{base}[fold{'!=' if complement else '='}{fold}/{folds}{', stratified' if stratified else ''}]"


def mask_classes(label_space: Any, mask: Any, min_share: float = STRATIFY_MIN_SHARE) -> set[int]:
    """The foreground class indices covering ``min_share`` of a mask's scored pixels."""
    from wsss_domains.data.patches import label_from_crop  # torch: only where masks are read

    label = label_from_crop(label_space, mask, min_fraction=min_share)
    return {int(i) for i in label.nonzero().flatten()}


def stratified_folds(classes: Sequence[Collection[int]], k: int) -> list[int]:
    """The fold (0-based) of each image, so every class's images spread evenly over ``k`` folds.

    Iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML PKDD 2011): take the class with
    the fewest images still unassigned; give each of its images, in order, to the fold that most
    lacks that class (then the fold that most lacks images; then the first); repeat. Images with no
    class fill the folds that most lack images, so fold sizes stay close to ``n / k``.
    """
    n = len(classes)
    if k < 2:
        raise ValueError(f"stratified folds need k >= 2, got {k}")
    sets = [frozenset(c) for c in classes]
    wanted_images = [n / k] * k
    counts: dict[int, int] = {}
    for s in sets:
        for c in s:
            counts[c] = counts.get(c, 0) + 1
    wanted = {c: [count / k] * k for c, count in counts.items()}
    fold_of: list[int | None] = [None] * n

    def give(i: int, by_class: list[float] | None) -> None:
        best = max(range(k), key=lambda f: (by_class[f] if by_class else 0.0, wanted_images[f], -f))
        fold_of[i] = best
        wanted_images[best] -= 1
        for c in sets[i]:
            wanted[c][best] -= 1

    while True:
        left = {c: [i for i in range(n) if fold_of[i] is None and c in sets[i]] for c in counts}
        left = {c: images for c, images in left.items() if images}
        if not left:
            break
        rarest = min(left, key=lambda c: (len(left[c]), c))
        for i in left[rarest]:
            give(i, wanted[rarest])
    for i in range(n):
        if fold_of[i] is None:
            give(i, None)
    return [int(f) for f in fold_of]  # type: ignore[arg-type]


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


def union_parts(split: str) -> list[str]:
    """``'validation[fold!=1/4] + training'`` -> ``['validation[fold!=1/4]', 'training']``.

    Splits on ``+`` outside brackets; a split without one gives itself. ValueError on an empty part.
    """
    parts, depth, start = [], 0, 0
    for i, char in enumerate(split):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "+" and depth == 0:
            parts.append(split[start:i])
            start = i + 1
    parts.append(split[start:])
    if len(parts) == 1:
        return [split]
    parts = [part.strip() for part in parts]
    if not all(parts):
        raise ValueError(f"split '{split}': a union is written 'a + b' (e.g. 'validation + training')")
    return parts


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
        return SplitRequest(
            fold["base"].strip(),
            fold=index,
            folds=folds,
            complement=fold["op"] == "!=",
            stratified=fold["stratified"] is not None,
        )
    match = _SLICED.match(text)
    if match is None:
        if "[" in text or "]" in text:
            raise ValueError(
                f"split '{split}': a slice is written '[start:stop]' (e.g. 'train[0:6]') and a fold "
                "'[fold=i/k]' or '[fold!=i/k]' (optionally '[fold=i/k, stratified]')"
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
