"""The map-style datasets remote-sensing loaders return: whole scenes, or tiles cut window by window.

* :class:`SceneDataset`: one sample per scene, labelled by the classes present in its mask.
* :class:`TileDataset`: one sample per tile (window) of every scene, each labelled by the classes
  present in its own window of the mask, the usual tile-level protocol of remote-sensing WSSS.
  Tiles are read from disk window by window (small PNG/JPEG scenes, which cannot be read by
  window efficiently, are decoded once and cached: see :mod:`wsss_domains.data.raster_reader`).
* :class:`RasterTiles`: every tile of one (possibly huge) raster, none dropped, with the window
  in ``meta`` so predictions can be stitched back into a full-size map.

Samples of scenes without a mask carry no ``label`` (the engine predicts labels for them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.remote_sensing.scene import ReadOptions, Scene, SceneReader

from wsss_domains.data.io import DataError
from wsss_domains.data.mask_codes import IdCode, MaskCode
from wsss_domains.data.windows import TileWindow, iter_windows
from wsss_domains.domains.contract import LabelSpace, Sample

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

    from wsss_domains.data.raster_reader import Scaling

# Whole scenes above this many pixels are refused: read them as tiles instead.
MAX_SCENE_PIXELS = 8192 * 8192


class SceneDataset:
    """Whole scenes as samples; headers are read lazily, so building costs no I/O.

    Map-style, not derived from torch's ``Dataset`` (see ``wsss_adapters.loaders.RecordsDataset``).
    """

    def __init__(
        self,
        scenes: Sequence[Scene],
        label_space: LabelSpace,
        options: ReadOptions,
        max_pixels: int = MAX_SCENE_PIXELS,
    ) -> None:
        self.scenes = list(scenes)
        self.label_space = label_space
        self.options = options
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.scenes)

    def sample_ids(self) -> list[str]:
        """Ids in index order, from the scenes: slicing a split reads no raster."""
        return [scene.id for scene in self.scenes]

    def __getitem__(self, index: int) -> Sample:
        reader = SceneReader(self.scenes[index], self.label_space, self.options)
        h, w = reader.size
        if h * w > self.max_pixels:
            raise DataError(
                self.scenes[index].image,
                f"is {h}x{w} pixels, too large to load whole; read it in tiles"
                " (--labels-from-masks, or RasterTiles for inference)",
            )
        return reader.read()

    def load_mask(self, index: int) -> Tensor | None:
        """The scored mask of a scene alone, so ``PatchDataset`` can index without the images."""
        return SceneReader(self.scenes[index], self.label_space, self.options).scored_mask()


class TileDataset:
    """Tiles of every scene, read window by window; tiles with no scored pixel dropped if asked.

    Sample ids are ``<scene id>@<row>,<col>``; ``meta`` holds ``parent`` (the scene id),
    ``offset`` and ``window`` (row, col, height, width) and ``full_size`` (the scene's size).
    """

    def __init__(
        self,
        scenes: Sequence[Scene],
        label_space: LabelSpace,
        options: ReadOptions,
        tile: int | tuple[int, int],
        overlap: int = 0,
        drop_empty: bool = True,
    ) -> None:
        self.scenes = list(scenes)
        self.label_space = label_space
        self.options = options
        self.tile = tile
        self.overlap = overlap
        self._readers: dict[int, SceneReader] = {}
        self.index: list[tuple[int, TileWindow]] = []
        for i in range(len(self.scenes)):
            reader = self._reader(i)
            windows = list(iter_windows(*reader.size, tile, overlap))
            keep = reader.labelled(windows) if drop_empty else [True] * len(windows)
            self.index.extend((i, w) for w, k in zip(windows, keep, strict=True) if k)

    def _reader(self, i: int) -> SceneReader:
        if i not in self._readers:
            self._readers[i] = SceneReader(self.scenes[i], self.label_space, self.options)
        return self._readers[i]

    def __len__(self) -> int:
        return len(self.index)

    def sample_ids(self) -> list[str]:
        """``<scene id>@<row>,<col>`` in index order, from the tile plan (no pixel read)."""
        return [f"{self.scenes[i].id}@{w.row},{w.col}" for i, w in self.index]

    def __getitem__(self, k: int) -> Sample:
        i, window = self.index[k]
        sample = self._reader(i).read(window)
        parent = sample["id"]
        sample["id"] = f"{parent}@{window.row},{window.col}"
        sample["meta"] = {
            **sample["meta"],
            "parent": parent,
            "offset": (window.row, window.col),
            "window": tuple(window),
        }
        return sample


class RasterTiles(TileDataset):
    """Every tile of one raster (and its mask raster, if any), for tiled inference and stitching.

    ``code`` says how the mask stores classes (default: class ids as they are); without a
    ``label_space`` a mask cannot be read and tiles carry no label. No tile is dropped, so the
    windows in ``meta["window"]`` cover the raster of size ``meta["full_size"]``.
    """

    def __init__(
        self,
        image: Path | str,
        mask: Path | str | None = None,
        *,
        tile: int | tuple[int, int] = 512,
        overlap: int = 0,
        label_space: LabelSpace | None = None,
        code: MaskCode | None = None,
        bands: Sequence[int] | None = None,
        scaling: Scaling = "auto",
    ) -> None:
        if mask is not None and label_space is None:
            raise ValueError("reading a mask raster needs the label_space its ids belong to")
        space = label_space or LabelSpace(classes=("unknown",), palette=((0, 0, 0),))
        code = code or IdCode.identity(space.num_classes, space.ignore_index)
        scene = Scene(Path(image).stem, Path(image), None if mask is None else Path(mask))
        options = ReadOptions(code, None if bands is None else tuple(bands), scaling)
        super().__init__([scene], space, options, tile, overlap, drop_empty=False)


def build_dataset(
    scenes: Sequence[Scene],
    label_space: LabelSpace,
    options: ReadOptions,
    *,
    where: Path,
    split: str,
    labels_from_masks: bool,
    patch_size: int | tuple[int, int] | None,
    default_patch_size: int | tuple[int, int],
    overlap: int = 0,
) -> Dataset:
    """The dataset a loader returns, following the options every loader shares.

    ``labels_from_masks``: tiles of ``patch_size`` (default ``default_patch_size``; an int or a
    (height, width) pair) cut window by window and labelled from their masks; every scene must be
    annotated, and tiles without any scored pixel are dropped. Otherwise whole scenes, labelled
    from their whole masks where they exist (``patch_size`` is then unused, as for every loader).
    """
    if not scenes:
        raise DataError(where, f"split '{split}' holds no images")
    if not labels_from_masks:
        return SceneDataset(scenes, label_space, options)
    missing = [s for s in scenes if s.mask is None]
    if missing:
        raise DataError(
            missing[0].image,
            f"has no mask; split '{split}' is not fully annotated and --labels-from-masks needs masks",
        )
    tile = patch_size or default_patch_size
    tiles = TileDataset(scenes, label_space, options, tile, overlap, drop_empty=True)
    if len(tiles) == 0:
        raise DataError(where, f"split '{split}' holds no tile with a labelled pixel")
    return tiles
