"""What every remote-sensing loader shares: split resolution, file discovery, the final dataset.

A loader lists the :class:`Scene` records of a split; :func:`finish` applies the split's slice
(see :mod:`splits`), and the shared options, and returns the dataset. :func:`build_split` is the
whole ``build`` of a loader with a plain split list, and :data:`tile_spec` its declaration.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.loaders import LoaderOptions, loader_spec
from wsss_adapters.remote_sensing.datasets import build_dataset
from wsss_adapters.remote_sensing.scene import ReadOptions, Scene, SceneReader

from wsss_domains.data.io import DataError
from wsss_domains.data.mask_codes import MaskCode
from wsss_domains.data.splits import SplitRequest, mask_classes, parse_split
from wsss_domains.domains.contract import LabelSpace

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from wsss_domains.data.raster_reader import Scaling

# Default tile side for --labels-from-masks: the common crop size of remote-sensing WSSS.
TILE = 256

# Lists a split's scenes under a root and says how their masks are coded.
SceneLister = Callable[[Path, str], tuple[Sequence[Scene], MaskCode]]


def request_split(split: str | None, default: str, known: Sequence[str], dataset: str) -> SplitRequest:
    """The parsed split (default when None) whose base is one of ``known`` (case-insensitive)."""
    request = parse_split(split if split is not None else default)
    for name in known:
        if name.lower() == request.base.lower():
            return replace(request, base=name)  # the slice or fold kept
    raise ValueError(
        f"dataset '{dataset}' has no split '{request.base}'; known: {', '.join(known)}"
        " (optionally sliced, e.g. 'train[0:6]' or 'train[80%:]', or a fold: 'train[fold=1/4]')"
    )


def matching(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Files of ``folder`` whose name matches ``pattern``, sorted; none if the folder is missing."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and pattern.match(p.name))


def with_masks(
    images: Iterable[Path], masks: Path, meta: Mapping[str, str], suffix: str = "", what: str = "mask"
) -> list[Scene]:
    """Scenes of ``images``, each with its file in ``masks`` (same name, or stem + ``suffix``).

    No ``masks`` folder means an unannotated split; a folder missing one image's mask is an error,
    so a half-copied split never passes for a smaller one.
    """
    annotated = masks.is_dir()
    out = []
    for image in images:
        mask = masks / (image.stem + suffix if suffix else image.name)
        if annotated and not mask.is_file():
            raise DataError(image, f"has no {what} (looked for {mask})")
        out.append(Scene(image.stem, image, mask if annotated else None, meta))
    return out


def any_matching(folders: Iterable[Path], pattern: re.Pattern[str]) -> bool:
    """Whether any of ``folders`` holds a file named like ``pattern`` (stops at the first)."""
    for folder in folders:
        if folder.is_dir() and any(pattern.match(p.name) for p in folder.iterdir()):
            return True
    return False


@dataclass(frozen=True)
class TileOptions(LoaderOptions):
    """The keyword options every remote-sensing loader's ``build`` understands.

    ``labels_from_masks``: tiles of ``patch_size`` (default 256) labelled from their masks, with
    ``overlap`` pixels between neighbours; a class counts in a tile from ``min_fraction`` of its
    scored pixels. ``bands``: 1-based raster bands to read (default: the first three).
    ``scaling``: how raster values become [0, 1] (see :mod:`wsss_domains.data.raster_reader`).
    """

    labels_from_masks: bool = False
    patch_size: int | tuple[int, int] | None = None
    bands: Sequence[int] | None = None
    scaling: Scaling = "auto"
    overlap: int = 0
    min_fraction: float = 0.0


def finish(
    scenes: Sequence[Scene],
    request: SplitRequest,
    label_space: LabelSpace,
    code: MaskCode,
    *,
    where: Path,
    split: str | None,
    options: TileOptions,
) -> Dataset:
    """Slice the split, then build whole-scene or tile samples as the options ask."""
    ids = [s.id for s in scenes]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{where}: two images share the sample id '{dup}'")
    bands = None if options.bands is None else tuple(options.bands)
    read = ReadOptions(code, bands, options.scaling, options.min_fraction)
    return build_dataset(
        request.select(scenes, classes_of=partial(scene_classes, label_space=label_space, read=read)),
        label_space,
        read,
        where=where,
        split=split if split is not None else request.base,
        labels_from_masks=options.labels_from_masks,
        patch_size=options.patch_size,
        default_patch_size=TILE,
        overlap=options.overlap,
    )


def scene_classes(scenes: Sequence[Scene], label_space: LabelSpace, read: ReadOptions) -> list[set[int]]:
    """Each scene's classes for stratified folds: those on ``STRATIFY_MIN_SHARE`` of its scored mask."""
    out = []
    for scene in scenes:
        if scene.mask is None:
            raise DataError(scene.image, "stratified folds need masks, and this scene has none")
        out.append(mask_classes(label_space, SceneReader(scene, label_space, read).scored_mask()))
    return out


def build_split(
    root: Path,
    split: str | None,
    options: Mapping[str, object],
    dataset: str,
    splits: Sequence[str],
    label_space: LabelSpace,
    scenes: SceneLister,
    where: Callable[[Path, str], Path] | None = None,
) -> Dataset:
    """A loader's whole ``build``: resolve the split (default ``train``), list its scenes, finish.

    ``where``: the folder errors name, from the root and the split (default: the root).
    """
    request = request_split(split, "train", splits, dataset)
    found, code = scenes(root, request.base)
    folder = root if where is None else where(root, request.base)
    return finish(
        found, request, label_space, code, where=folder, split=split, options=TileOptions.pick(options)
    )


# Every remote-sensing loader slices its splits itself and tiles at ``TILE`` by default.
tile_spec = partial(loader_spec, patch_size=TILE, native_slices=True)
