"""WSSS4LUAD (Grand Challenge 2022): lung adenocarcinoma, tumour / stroma / normal.

On disk::

    WSSS4LUAD/
      1.training/436219-9328-56427-[1, 1, 0].png    patches, label (tumour, stroma, normal) in the name
      2.validation/{img,mask,background-mask}/NN.png
      3.testing/{img,mask,background-mask}/NN.png

``mask`` is a palette PNG (0 tumour, 1 stroma, 2 normal, 3 background / exclude); ``background-mask``
is a 0/1 palette PNG (1 = background). Both mark glass; a pixel either marks is excluded and unscored.
For the annotated splits the image-level label is the set of classes present in the mask, as the
challenge defines it. Training patches carry no mask: the domain's white-region hook supplies their
exclude mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from wsss_adapters.histo.dataset import Record, list_images, load_split, paired, resolve_split
from wsss_adapters.histo.masks import exclude_index_to_ignore, read_checked_mask
from wsss_adapters.histo.naming import label_from_name
from wsss_adapters.loaders import loader_spec

from wsss_domains.data.io import DataError
from wsss_domains.domains.contract import BackgroundMode, LabelSpace

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

NAME = "wsss4luad"
LABEL_SPACE = LabelSpace(
    classes=("tumor", "stroma", "normal"),
    palette=((0, 64, 128), (64, 128, 0), (243, 152, 0)),
    background_mode=BackgroundMode.EXCLUDE,
)
EXCLUDE_ID = 3  # 'background' in the challenge masks: glass, never scored
FOLDERS = {"training": "1.training", "validation": "2.validation", "test": "3.testing"}
SPLITS = tuple(FOLDERS)
ALIASES = {"train": "training", "val": "validation", "testing": "test"}
PATCH_SIZE = 224
DESCRIPTION = "WSSS4LUAD challenge layout: lung adenocarcinoma tumour / stroma / normal"


def _is_root(root: Path) -> bool:
    return (root / FOLDERS["training"]).is_dir() or any(
        (root / FOLDERS[s] / "img").is_dir() for s in ("validation", "test")
    )


def _check_not_subfolder(root: Path) -> None:
    if root.name in FOLDERS.values() and _is_root(root.parent):
        raise DataError(
            root,
            f"this is the '{root.name}' sub-folder of a WSSS4LUAD dataset; pass its parent {root.parent}",
        )


def detect(root: Path) -> bool:
    """A folder holding ``1.training/`` or ``2.validation/img`` / ``3.testing/img``."""
    root = Path(root)
    _check_not_subfolder(root)
    return _is_root(root)


def _decode(rec: Record) -> tuple[Tensor, Tensor | None]:
    assert rec.mask is not None
    mask, exclude = exclude_index_to_ignore(
        read_checked_mask(rec.mask, EXCLUDE_ID + 1), EXCLUDE_ID, LABEL_SPACE.ignore_index
    )
    if rec.background is not None:
        background = read_checked_mask(rec.background, 2)
        if tuple(background.shape[-2:]) != tuple(mask.shape[-2:]):
            # Blame the file that disagrees with the image, not whichever was read second.
            with Image.open(rec.image) as picture:
                width, height = picture.size
            odd = rec.mask if tuple(mask.shape[-2:]) != (height, width) else rec.background
            size = mask.shape[-2:] if odd == rec.mask else background.shape[-2:]
            raise DataError(odd, f"mask size {tuple(size)} does not match image size {(height, width)}")
        exclude = exclude | (background == 1)
        mask = mask.masked_fill(exclude, LABEL_SPACE.ignore_index)
    return mask, exclude


def build(root: Path, split: str, **options: object) -> Dataset:
    """Samples of one WSSS4LUAD split (``training``, ``validation`` or ``test``); see :class:`HistoOptions`."""
    root = Path(root)
    _check_not_subfolder(root)
    split = resolve_split(split, SPLITS, ALIASES, NAME)
    folder = root / FOLDERS[split]
    if not folder.is_dir():
        raise DataError(folder, f"WSSS4LUAD split folder not found (is {root} the WSSS4LUAD folder?)")
    records = []
    if split == "training":
        for path in list_images(folder):
            records.append(Record(id=path.stem, image=path, label=label_from_name(path, 3)))
    else:
        has_background = (folder / "background-mask").is_dir()
        for path in list_images(folder / "img"):
            records.append(
                Record(
                    id=path.stem,
                    image=path,
                    mask=paired(folder / "mask", path, "mask"),
                    background=paired(folder / "background-mask", path, "background mask")
                    if has_background
                    else None,
                )
            )
    return load_split(records, LABEL_SPACE, _decode, NAME, split, folder, options, PATCH_SIZE)


SPEC = loader_spec(NAME, LABEL_SPACE, build, detect, SPLITS, DESCRIPTION, patch_size=PATCH_SIZE)
