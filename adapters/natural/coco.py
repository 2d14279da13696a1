"""MS COCO 2014 / 2017 as 81 classes: background 0 and the 80 object categories 1..80.

Layout: ``<split>/*.jpg`` (or ``images/<split>/``) with ``annotations/instances_<split>.json``,
read through pycocotools. Masks are rasterised from the instance polygons / RLEs: COCO's sparse
category ids (1..90) map to contiguous 1..80 in the official order; crowd regions become ignore
(255) except where a non-crowd instance covers them; overlapping instances are painted largest
first, so a small object on top of a large one stays visible. A VOC-style converted folder
``SegmentationClass/<split>/<stem>.png`` (grey ids 0..80, 255 ignore), or ``mask_dir``, is used
instead when present. Image-level labels are the categories annotated on the image (crowd
included); ``label_source='mask'`` derives them from the mask instead.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from wsss_adapters.loaders import loader_spec
from wsss_adapters.natural.dataset import NaturalDataset, check_choices
from wsss_adapters.natural.palette import voc_palette

from wsss_domains.data.io import DataError, read_index_mask
from wsss_domains.data.patches import PatchDataset
from wsss_domains.domains.contract import IGNORE_INDEX, BackgroundMode, LabelSpace

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

NAME = "coco"
SPLITS = ("train2017", "val2017", "train2014", "val2014")
LABEL_SOURCES = ("annotations", "mask")
PATCH_SIZE = 224
DESCRIPTION = "MS COCO 2014/2017 instances rasterised to 80 classes + background, crowd ignored"

# (COCO category id, name) of the 80 object categories, in the official order.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"),
    (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"),
    (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip
CONTIGUOUS = {coco_id: i + 1 for i, (coco_id, _) in enumerate(COCO_CATEGORIES)}

COCO = LabelSpace(
    classes=("background", *(name for _, name in COCO_CATEGORIES)),
    palette=voc_palette(len(COCO_CATEGORIES) + 1),
    background_mode=BackgroundMode.THRESHOLD,
    background_index=0,
)


def load_instances(path: Path) -> Any:
    """A pycocotools COCO index of an instances JSON; category names checked against the table."""
    from pycocotools.coco import COCO as CocoApi

    if not path.is_file():
        raise DataError(path, "instances annotation file not found")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            api = CocoApi(str(path))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(path, f"not a COCO instances file ({exc})") from exc
    names = dict(COCO_CATEGORIES)
    for cat in api.loadCats(api.getCatIds()):
        if names.get(cat["id"]) != cat["name"]:
            raise DataError(
                path, f"category {cat['id']} {cat['name']!r} is not COCO's {names.get(cat['id'])!r}"
            )
    unknown = {ann["category_id"] for ann in api.anns.values()} - CONTIGUOUS.keys()
    if unknown:
        raise DataError(path, f"annotations use category ids {sorted(unknown)} outside COCO's 80 categories")
    return api


def rasterise(api: Any, image_id: int) -> np.ndarray:
    """The semantic mask of one image: contiguous ids 0..80, 255 on crowd-only pixels."""
    info = api.imgs[image_id]
    out = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    anns = api.loadAnns(api.getAnnIds(imgIds=[image_id], iscrowd=None))
    for ann in anns:
        if ann.get("iscrowd", 0):
            out[api.annToMask(ann) > 0] = IGNORE_INDEX
    for ann in sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -float(a.get("area", 0))):
        out[api.annToMask(ann) > 0] = CONTIGUOUS[ann["category_id"]]
    return out


def annotated_label(api: Any, image_id: int) -> Tensor:
    """Multi-hot foreground label of every category annotated on the image."""
    import torch

    label = torch.zeros(len(COCO.foreground))
    for ann in api.loadAnns(api.getAnnIds(imgIds=[image_id], iscrowd=None)):
        label[CONTIGUOUS[ann["category_id"]] - 1] = 1.0
    return label


def decode_converted(path: Path) -> Tensor:
    ids = read_index_mask(path)
    bad = (ids >= COCO.num_classes) & (ids != IGNORE_INDEX)
    if bad.any():
        raise DataError(path, f"holds class id {int(ids[bad][0])}; expected 0..80 or {IGNORE_INDEX}")
    return ids


@dataclass(frozen=True)
class Record:
    id: str
    image: Path
    coco_id: int | None = None  # id in the instances JSON
    mask: Path | None = None  # converted mask file


class CocoDataset(NaturalDataset):
    """Images of one COCO split with rasterised (or converted) masks and image-level labels."""

    label_space = COCO

    def __init__(self, records: list[Record], api: Any, label_source: str, meta: dict[str, str]) -> None:
        super().__init__(records, label_source, meta)
        self.api = api

    def load_mask(self, index: int) -> Tensor | None:
        import torch

        rec = self.records[index]
        if rec.mask is not None:
            return decode_converted(rec.mask)
        if rec.coco_id is not None:
            return torch.from_numpy(rasterise(self.api, rec.coco_id).astype(np.int64))
        return None

    def annotation_label(self, rec: Record) -> Tensor | None:
        if rec.coco_id is None or self.label_source != "annotations":
            return None
        return annotated_label(self.api, rec.coco_id)


def _image_folder(root: Path, split: str) -> Path:
    for folder in (root / split, root / "images" / split):
        if folder.is_dir():
            return folder
    raise DataError(root / split, f"COCO image folder for split '{split}' not found")


def _mask_folder(root: Path, split: str, mask_dir: Path | str | None) -> Path | None:
    if mask_dir is not None:
        folder = Path(mask_dir)
        if not folder.is_dir():
            raise DataError(folder, "mask_dir not found")
        return folder
    folder = root / "SegmentationClass" / split
    return folder if folder.is_dir() else None


def build(
    root: Path,
    split: str,
    labels_from_masks: bool = False,
    patch_size: int | None = None,
    label_source: str = "annotations",
    mask_dir: Path | str | None = None,
    **_: object,
) -> Dataset:
    """Samples of one COCO split (every image listed in its instances JSON, else every masked image)."""
    root = Path(root)
    check_choices(NAME, split, SPLITS, label_source, LABEL_SOURCES)
    images = _image_folder(root, split)
    masks = _mask_folder(root, split, mask_dir)
    json_path = root / "annotations" / f"instances_{split}.json"
    api = load_instances(json_path) if json_path.is_file() else None
    if api is None and masks is None:
        raise DataError(json_path, "not found, and no converted SegmentationClass/<split>/ masks either")
    records = []
    if api is not None:
        for image_id in sorted(api.imgs):
            path = images / api.imgs[image_id]["file_name"]
            if not path.is_file():
                raise DataError(path, f"image listed in {json_path.name} not found")
            mask = masks / f"{path.stem}.png" if masks is not None else None
            records.append(Record(path.stem, path, image_id, mask if mask and mask.is_file() else None))
    else:
        for mask in sorted(masks.glob("*.png")):  # type: ignore[union-attr]
            path = images / f"{mask.stem}.jpg"
            if not path.is_file():
                raise DataError(mask, f"no image for this mask (looked for {path})")
            records.append(Record(mask.stem, path, None, mask))
    dataset = CocoDataset(records, api, label_source, {"dataset": NAME, "split": split})
    if len(dataset) == 0:
        raise DataError(images, f"split '{split}' holds no images")
    return PatchDataset(dataset, COCO, patch_size or PATCH_SIZE) if labels_from_masks else dataset


def detect(root: Path) -> bool:
    """A folder with ``annotations/instances_<split>.json`` or converted masks for a COCO split."""
    root = Path(root)
    return any(
        (root / "annotations" / f"instances_{s}.json").is_file() or (root / "SegmentationClass" / s).is_dir()
        for s in SPLITS
    )


SPEC = loader_spec(NAME, COCO, build, detect, SPLITS, DESCRIPTION, patch_size=PATCH_SIZE)
