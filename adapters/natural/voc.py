"""PASCAL VOC 2012 segmentation (``VOCdevkit/VOC2012``), 21 classes with background 0 and void 255.

Layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs),
``SegmentationClassAug/<id>.png`` (grey id PNGs of the augmented set, optional),
``Annotations/<id>.xml`` and ``ImageSets/Segmentation/{train,val,trainval,trainaug}.txt``
(``train_aug.txt`` is accepted for ``trainaug``). The split ``all`` takes every image with a mask,
for folders that carry no split lists. ``root`` may be the ``VOC2012`` folder, ``VOCdevkit`` or
their parent.

Image-level labels come from the XML annotations (every object name, difficult ones included)
when an image has one, otherwise from its mask; ``label_source`` forces either.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.loaders import loader_spec
from wsss_adapters.natural.dataset import NaturalDataset, check_choices
from wsss_adapters.natural.palette import voc_color, voc_palette

from wsss_domains.data.io import DataError, read_mask
from wsss_domains.data.patches import PatchDataset
from wsss_domains.domains.contract import IGNORE_INDEX, BackgroundMode, LabelSpace, Sample

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

NAME = "voc2012"
SPLITS = ("train", "val", "trainval", "trainaug", "all")
SPLIT_FILES = {"trainaug": ("trainaug.txt", "train_aug.txt")}
MASK_FOLDERS = ("SegmentationClass", "SegmentationClassAug")
LABEL_SOURCES = ("auto", "xml", "mask")
PATCH_SIZE = 224
DESCRIPTION = "PASCAL VOC 2012 segmentation: 20 object classes + background, 255 void"

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
VOC = LabelSpace(
    classes=VOC_CLASSES,
    palette=voc_palette(len(VOC_CLASSES)),
    background_mode=BackgroundMode.THRESHOLD,
    background_index=0,
    ignore_color=voc_color(IGNORE_INDEX),
)
_COLORS = {rgb: i for i, rgb in enumerate(VOC.palette)} | {VOC.ignore_color: IGNORE_INDEX}


def voc_root(root: Path) -> Path | None:
    """The ``VOC2012`` folder at or below ``root`` (itself, ``VOC2012/`` or ``VOCdevkit/VOC2012/``)."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return None


def decode_mask(path: Path) -> Tensor:
    """A palette / grey id PNG (or an RGB rendering in VOC colours) as ids 0..20 and 255."""
    ids = read_mask(path, _COLORS)
    bad = (ids >= VOC.num_classes) & (ids != IGNORE_INDEX)
    if bad.any():
        raise DataError(path, f"holds class id {int(ids[bad][0])}; VOC ids are 0..20 and 255 (void)")
    return ids


def label_from_xml(path: Path) -> Tensor:
    """Multi-hot foreground label from the object names of a VOC XML annotation."""
    import torch

    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise DataError(path, f"unreadable XML ({exc})") from exc
    label = torch.zeros(len(VOC.foreground))
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip().lower()
        if name not in VOC_CLASSES[1:]:
            raise DataError(path, f"object name {name!r} is not a VOC class")
        label[VOC_CLASSES.index(name) - 1] = 1.0
    return label


@dataclass(frozen=True)
class Record:
    id: str
    image: Path
    mask: Path | None
    xml: Path | None


class VocDataset(NaturalDataset):
    """Images of one VOC split with their mask (when annotated) and image-level label."""

    label_space = VOC
    annotation = "XML annotation"

    def load_mask(self, index: int) -> Tensor | None:
        rec = self.records[index]
        return None if rec.mask is None else decode_mask(rec.mask)

    def _uses_xml(self, rec: Record) -> bool:
        return rec.xml is not None and self.label_source != "mask"

    def annotation_label(self, rec: Record) -> Tensor | None:
        return label_from_xml(rec.xml) if self._uses_xml(rec) else None  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        sample = super().__getitem__(index)
        sample["meta"]["label_source"] = "xml" if self._uses_xml(self.records[index]) else "mask"
        return sample


def _split_ids(voc: Path, split: str) -> list[str]:
    if split == "all":
        stems = {
            p.stem for folder in MASK_FOLDERS if (voc / folder).is_dir() for p in (voc / folder).glob("*.png")
        }
        if not stems:
            raise DataError(voc, "split 'all' needs a SegmentationClass or SegmentationClassAug folder")
        return sorted(stems)
    lists = voc / "ImageSets" / "Segmentation"
    for name in SPLIT_FILES.get(split, (f"{split}.txt",)):
        if (lists / name).is_file():
            return [line.split()[0] for line in (lists / name).read_text().splitlines() if line.strip()]
    raise DataError(lists / f"{split}.txt", "split list not found (use split 'all' for every masked image)")


def records(
    voc: Path, split: str, label_source: str = "auto", mask_folder: str | None = None
) -> list[Record]:
    """Records of a split; the mask is SegmentationClass's, else SegmentationClassAug's."""
    folders = MASK_FOLDERS if mask_folder is None else (mask_folder,)
    out = []
    for image_id in _split_ids(voc, split):
        image = voc / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise DataError(image, f"image of split '{split}' not found")
        mask = next(
            (voc / f / f"{image_id}.png" for f in folders if (voc / f / f"{image_id}.png").is_file()), None
        )
        xml = voc / "Annotations" / f"{image_id}.xml"
        if label_source == "xml" and not xml.is_file():
            raise DataError(xml, "not found (label_source='xml')")
        out.append(Record(image_id, image, mask, xml if xml.is_file() else None))
    return out


def build(
    root: Path,
    split: str,
    labels_from_masks: bool = False,
    patch_size: int | None = None,
    label_source: str = "auto",
    mask_folder: str | None = None,
    **_: object,
) -> Dataset:
    """Samples of one VOC 2012 split."""
    root = Path(root)
    check_choices(NAME, split, SPLITS, label_source, LABEL_SOURCES)
    voc = voc_root(root)
    if voc is None:
        raise DataError(root, "no VOC2012 folder with JPEGImages/ found (expected VOCdevkit/VOC2012)")
    dataset = VocDataset(
        records(voc, split, label_source, mask_folder), label_source, {"dataset": NAME, "split": split}
    )
    if len(dataset) == 0:
        raise DataError(voc, f"split '{split}' holds no images")
    if not labels_from_masks:
        return dataset
    if any(rec.mask is None for rec in dataset.records):
        raise DataError(voc, f"split '{split}' has images without masks; --labels-from-masks needs masks")
    return PatchDataset(dataset, VOC, patch_size or PATCH_SIZE)


def detect(root: Path) -> bool:
    voc = voc_root(Path(root))
    return voc is not None and any((voc / sub).is_dir() for sub in (*MASK_FOLDERS, "ImageSets/Segmentation"))


SPEC = loader_spec(NAME, VOC, build, detect, SPLITS, DESCRIPTION, patch_size=PATCH_SIZE)
