"""Label-free prediction of many images through Lightning's predict loop, one PNG per image.

Images come from a dataset split (only their pixels are read: no label, no mask) or from a plain
folder. Each prediction is a palette PNG named like a pseudo-label (``evaluate`` scores both the
same way), written atomically by a prediction writer, so a re-run skips finished images and a
killed run resumes. Lightning shards the images across processes and GPUs (``devices``) and
loads them in worker processes (``num_workers``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from wsss_domains.data.io import DataError, atomic_write, output_folder, read_rgb, save_palette_png
from wsss_domains.data.large_images import (
    LARGE_IMAGE_PIXELS,
    SCRATCH_FOLDER,
    ImageFile,
    geotiff_to_png,
    image_file_of,
    large_image_file,
    remove_scratch,
    stage_image,
)
from wsss_domains.data.splits import sample_ids
from wsss_domains.domains.contract import DomainPlugin, LabelSpace, Sample
from wsss_domains.evaluation.evaluate import pred_filename
from wsss_domains.progress import progress_shown
from wsss_domains.pseudo_labels.overlay import render_overlay, save_overlay
from wsss_domains.segmentation.data import SampleView
from wsss_domains.segmentation.inference import SegmenterPredictor

if TYPE_CHECKING:
    from wsss_domains.segmentation.raster import WindowedOptions

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SUMMARY_FILE = "predictions.json"
MAX_OVERLAYS = 200


class ImageFolder(Dataset):
    """Every image file under ``root`` (recursively, sorted); id: its path without suffix."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "image folder not found")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(self.root, f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        self.files = files
        self.ids = [p.relative_to(self.root).with_suffix("").as_posix() for p in files]
        seen: dict[str, Path] = {}
        for sample_id, path in zip(self.ids, files, strict=True):
            if sample_id in seen:
                raise DataError(path, f"has the same name as {seen[sample_id].name}: rename one of them")
            seen[sample_id] = path

    def __len__(self) -> int:
        return len(self.files)

    def sample_ids(self) -> list[str]:
        return list(self.ids)

    def __getitem__(self, index: int) -> Sample:
        return {"image": read_rgb(self.files[index]), "id": self.ids[index]}

    def image_file(self, index: int) -> ImageFile:
        return ImageFile(self.ids[index], self.files[index])


class PixelsOnly(SampleView):
    """The pixels and id of each sample of ``base``: labels, masks and exclude masks are dropped."""

    def __getitem__(self, index: int) -> Sample:
        sample = self.base[index]
        return {"image": sample["image"], "id": sample["id"]}

    def image_file(self, index: int) -> ImageFile | None:
        file = image_file_of(self.base, index)
        return None if file is None else ImageFile(file.id, file.path)


@dataclass
class PredictionSummary:
    out: str
    written: int = 0
    skipped: int = 0
    model: str = ""
    options: dict[str, Any] | None = None
    windowed: list[str] = field(default_factory=list)  # images segmented window by window


class PredictTask(L.LightningModule):
    """Wraps a :class:`SegmenterPredictor` for Lightning's predict loop (one image per batch)."""

    def __init__(self, predictor: SegmenterPredictor, domain: DomainPlugin, label_space: LabelSpace) -> None:
        super().__init__()
        self.model = predictor.model  # a submodule, so Lightning moves it to the device
        self.predictor = predictor
        self.domain = domain
        self.label_space = label_space

    def predict_step(self, batch: Sample, batch_idx: int) -> dict[str, Any]:
        self.predictor.options.device = str(self.device)  # this process's device (one GPU per rank)
        image = batch["image"]
        labels = self.predictor.labels(image, self.domain, self.label_space)
        return {"id": batch["id"], "labels": labels.numpy().astype(np.uint8), "image": image.cpu()}


class LabelPngWriter(BasePredictionWriter):
    """Writes each prediction as ``<id>.png`` (atomic) and its overlay for the first images."""

    def __init__(self, out: Path, label_space: LabelSpace, overlays: int) -> None:
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.palette = label_space.flat_palette()
        self.overlays = overlays
        self.written = 0

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        name = pred_filename(prediction["id"])
        if self.written < self.overlays:
            image: Tensor = prediction["image"]
            picture = render_overlay(
                image.permute(1, 2, 0).numpy(),
                prediction["labels"],
                np.zeros((0, *prediction["labels"].shape)),
                [],
                self.palette,
                label_title="prediction",
            )
            save_overlay(self.out / "overlays" / name, picture)
        save_palette_png(self.out / name, prediction["labels"], self.palette)
        self.written += 1


def predict_trainer(
    predictor: SegmenterPredictor, devices: int, strategy: str, bar: bool = True
) -> L.Trainer:
    """A Lightning trainer for the predict loop on the predictor's device kind, sharding across ``devices``;
    its progress bar where bars are on and ``bar``."""
    return L.Trainer(
        accelerator="gpu" if predictor.options.device.startswith("cuda") else "cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=bar and progress_shown(),
        enable_model_summary=False,
        use_distributed_sampler=True,
    )


def _first(batch: list[Sample]) -> Sample:
    return batch[0]


def predict_images(
    predictor: SegmenterPredictor,
    dataset: Dataset,
    domain: DomainPlugin,
    label_space: LabelSpace,
    out: Path,
    *,
    devices: int = 1,
    strategy: str = "auto",
    num_workers: int = 0,
    overlays: int = MAX_OVERLAYS,
    model_name: str = "",
    max_image_pixels: int | None = LARGE_IMAGE_PIXELS,
    windowed: WindowedOptions | None = None,
) -> PredictionSummary:
    """Predict every image of ``dataset`` not yet predicted in ``out``; returns what was done.

    Images above ``max_image_pixels`` whose files the dataset can name are segmented window by
    window (memory bounded by the window) before the others, in this process; with ``devices > 1``
    every image goes through the sharded loop whole. ``windowed``: their window and margin.
    """
    with output_folder(out) as out:
        ids = sample_ids(dataset)
        todo = [i for i, sample_id in enumerate(ids) if not (out / pred_filename(sample_id)).is_file()]
        summary = PredictionSummary(str(out), skipped=len(ids) - len(todo), model=model_name)
        summary.options = {k: v for k, v in asdict(predictor.options).items() if k != "device"}
        if devices == 1:
            for i in list(todo):
                file = large_image_file(dataset, i, max_image_pixels)
                if file is not None:
                    png = out / pred_filename(ids[i])
                    predict_large_image(predictor, domain, label_space, file, png, windowed)
                    summary.windowed.append(pred_filename(ids[i]))
                    todo.remove(i)
        if todo:
            trainer = predict_trainer(predictor, devices, strategy)
            loader = DataLoader(
                Subset(dataset, todo), batch_size=1, num_workers=num_workers, collate_fn=_first, shuffle=False
            )
            writer = LabelPngWriter(out, label_space, overlays)
            trainer.callbacks.append(writer)  # type: ignore[attr-defined]
            trainer.predict(PredictTask(predictor, domain, label_space), loader, return_predictions=False)
            if not trainer.is_global_zero:
                return summary
        summary.written = (
            sum((out / pred_filename(sample_id)).is_file() for sample_id in ids) - summary.skipped
        )
        text = json.dumps(asdict(summary) | {"images": len(ids)}, indent=2)
        atomic_write(out / SUMMARY_FILE, lambda tmp: tmp.write_text(text))
        return summary


class _Items(Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class _ItemTask(L.LightningModule):
    """Lightning's predict loop over whole work items (slides): each process does those it is given."""

    def __init__(self, predictor: SegmenterPredictor, work: Callable[[Any], Any]) -> None:
        super().__init__()
        self.model = predictor.model
        self.predictor = predictor
        self.work = work

    def predict_step(self, batch: list[Any], batch_idx: int) -> Any:
        self.predictor.options.device = str(self.device)  # this process's device (one GPU per rank)
        return self.work(batch[0])


def shard_items(
    items: list[Any],
    work: Callable[[Any], Any],
    predictor: SegmenterPredictor,
    *,
    devices: int,
    strategy: str = "auto",
) -> list[Any]:
    """``work(item)`` for every item, the items sharded across ``devices`` processes by Lightning."""
    trainer = predict_trainer(predictor, devices, strategy, bar=False)
    loader = DataLoader(_Items(items), batch_size=1, collate_fn=list)
    return trainer.predict(_ItemTask(predictor, work), loader) or []  # type: ignore[return-value]


def predict_large_image(
    predictor: SegmenterPredictor,
    domain: DomainPlugin,
    label_space: LabelSpace,
    file: ImageFile,
    png: Path,
    windowed: WindowedOptions | None = None,
) -> None:
    """One image above the size limit, window by window as a raster, into its palette PNG."""
    from wsss_domains.segmentation.raster import RasterSource, WindowedOptions, predict_windows

    scratch = png.parent / SCRATCH_FOLDER
    staged = stage_image(file.path, scratch)
    tif = scratch / f"{png.stem}.tif"
    options = replace(windowed or WindowedOptions(), pyramid=False, overview=None)
    predict_windows(predictor, domain, label_space, RasterSource(staged), tif, options)
    atomic_write(png, lambda tmp: geotiff_to_png(tif, tmp))
    remove_scratch(file.path, staged, tif)
