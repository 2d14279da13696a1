"""The driving crop protocol and the generalised PatchDataset (rectangular, min fraction, load_mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from wsss_adapters.driving import camvid
from wsss_adapters.driving.crops import CropProtocol, crop_protocol

from wsss_domains.data.patches import PatchDataset, label_from_crop
from wsss_domains.domains.contract import BackgroundMode, LabelSpace

TWO = LabelSpace(classes=("a", "b"), palette=((0, 0, 0), (1, 1, 1)), background_mode=BackgroundMode.NONE)


class Memory(Dataset):
    """In-memory samples; counts __getitem__ calls, optionally offers load_mask."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        self.masks = masks
        self.calls = 0

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> dict:
        self.calls += 1
        m = self.masks[i]
        return {"image": torch.rand(3, *m.shape), "mask": m, "label": torch.zeros(2), "id": f"s{i}"}


class MemoryWithMasks(Memory):
    def load_mask(self, i: int) -> torch.Tensor:
        return self.masks[i]


def test_protocol_resolution():
    assert crop_protocol((120, 160)) == CropProtocol((120, 160), (120, 160), 0.01)
    assert crop_protocol((120, 160), patch_size=64).size == (64, 64)
    resolved = crop_protocol((120, 160), crop_size=(90, 100), crop_stride=45, patch_size=64)
    assert resolved.size == (90, 100) and resolved.stride == (45, 45)
    with pytest.raises(ValueError, match="crop_size"):
        crop_protocol((120, 160), crop_size=(0, 10))
    with pytest.raises(ValueError, match="min_label_fraction"):
        crop_protocol((120, 160), min_label_fraction=1.5)


def test_min_fraction_drops_slivers():
    mask = torch.zeros(10, 10, dtype=torch.long)
    mask[0, 0] = 1  # 1 px of 100
    assert label_from_crop(TWO, mask).tolist() == [1.0, 1.0]
    assert label_from_crop(TWO, mask, min_fraction=0.01).tolist() == [1.0, 1.0]
    assert label_from_crop(TWO, mask, min_fraction=0.02).tolist() == [1.0, 0.0]
    # the fraction is of scored pixels: with 50 ignored, 1 px is 2% of the rest
    mask[5:] = 255
    assert label_from_crop(TWO, mask, min_fraction=0.02).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="class id 7"):
        label_from_crop(TWO, torch.full((2, 2), 7))


def test_rectangular_crops_cover_the_image_and_drop_ignore_only():
    mask = torch.zeros(4, 8, dtype=torch.long)
    mask[:, 5:] = 1
    mask[2:, :3] = 255  # the bottom-left 2x3 crop is entirely ignore
    ds = PatchDataset(Memory([mask]), TWO, patch_size=(2, 3))
    offsets = [ds[k]["meta"]["offset"] for k in range(len(ds))]
    assert offsets == [(0, 0), (0, 3), (0, 5), (2, 3), (2, 5)]  # last column aligned to the border
    labels = [ds[k]["label"].tolist() for k in range(len(ds))]
    assert labels == [[1, 0], [1, 1], [0, 1], [1, 1], [0, 1]]
    assert ds[1]["image"].shape == (3, 2, 3) and ds[1]["mask"].shape == (2, 3)


def test_square_int_patch_size_behaves_as_before():
    mask = torch.zeros(4, 4, dtype=torch.long)
    mask[0, 0] = 1
    ds = PatchDataset(Memory([mask]), TWO, patch_size=2, min_pixels=2)
    assert len(ds) == 4 and ds.patch_size == 2 and ds.stride == 2
    assert ds[0]["label"].tolist() == [1.0, 0.0]  # one pixel of b is below min_pixels=2
    assert ds[0]["id"] == "s0@0,0" and ds[3]["id"] == "s0@2,2"


def test_load_mask_skips_decoding_images_while_indexing():
    base = MemoryWithMasks([torch.zeros(4, 4, dtype=torch.long)] * 3)
    ds = PatchDataset(base, TWO, patch_size=4)
    assert len(ds) == 3 and base.calls == 0
    ds[2]
    assert base.calls == 1


def test_camvid_crops_apply_the_label_fraction(tmp_path):
    mask = np.zeros((6, 8), dtype=np.uint8)  # Sky everywhere
    mask[0, 0] = 3  # one Road pixel in the top-left 3x4 crop: 1/12 = 8%
    mask[5, 7] = 11  # Unlabelled
    for folder in ("train", "trainannot"):
        (tmp_path / folder).mkdir()
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / "f.png")
    Image.fromarray(mask, mode="L").save(tmp_path / "trainannot" / "f.png")
    loose = camvid.build(tmp_path, "train", labels_from_masks=True, crop_size=(3, 4), min_label_fraction=0.05)
    strict = camvid.build(tmp_path, "train", labels_from_masks=True, crop_size=(3, 4), min_label_fraction=0.1)
    assert len(loose) == 4
    assert loose[0]["label"].nonzero().flatten().tolist() == [0, 3]
    assert strict[0]["label"].nonzero().flatten().tolist() == [0]
    assert all(loose[k]["label"].nonzero().flatten().tolist() == [0] for k in (1, 2, 3))
    # whole images use the same threshold
    assert camvid.build(tmp_path, "train", min_label_fraction=0.05)[0][
        "label"
    ].nonzero().flatten().tolist() == [0]


def test_default_crop_is_120x160_for_camvid(tmp_path):
    for folder in ("train", "trainannot"):
        (tmp_path / folder).mkdir()
    Image.fromarray(np.zeros((360, 480, 3), dtype=np.uint8)).save(tmp_path / "train" / "f.png")
    Image.fromarray(np.zeros((360, 480), dtype=np.uint8), mode="L").save(tmp_path / "trainannot" / "f.png")
    crops = camvid.build(tmp_path, "train", labels_from_masks=True)
    assert len(crops) == 9 and crops[8]["image"].shape == (3, 120, 160)


def test_pseudo_labels_of_crops_take_the_crop_label_the_classifier_trained_with(tmp_path):
    """A class with a few stray pixels in a crop (under the 1% share) is not in the crop's label, so
    pseudo-labelling with labels from masks must not compete for the crop's pixels with its CAM."""
    from wsss_domains.data.io import read_index_mask
    from wsss_domains.pipeline.classifier import ClassifierSettings, train_classifier
    from wsss_domains.pipeline.pseudo_labels import pseudo_label_split

    mask = np.zeros((240, 320), dtype=np.uint8)  # Sky (0) everywhere
    mask[:2, :2] = 3  # four Road pixels in the top-left 120x160 crop: 0.02% of it
    mask[120:, 160:] = 3  # the bottom-right crop is all Road, so the classifier knows the class
    for folder in ("train", "trainannot"):
        (tmp_path / folder).mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(tmp_path / "train" / "f.png")
    Image.fromarray(mask, mode="L").save(tmp_path / "trainannot" / "f.png")
    settings = ClassifierSettings(backbone="test_efficientnet", weights="random", image_size=32, batch_size=2,
                                  max_steps=2, labels_from_masks=True, device="cpu")  # fmt: skip
    run = train_classifier("driving", tmp_path, tmp_path / "run", split="train", dataset="camvid",
                           settings=settings, log=False).run  # fmt: skip
    out = tmp_path / "pl"
    pseudo_label_split(run, "driving", "camvid", tmp_path, "train", out, labels_from_masks=True, overlays=False,
                       save_cams=True, dataset_options={"labels_from_masks": True, "patch_size": (120, 160)})  # fmt: skip
    # The saved CAMs name the classes each crop was labelled with.
    assert np.load(out / "cams" / "f@0,0.npz")["classes"].tolist() == ["Sky"]  # no stray Road
    assert np.load(out / "cams" / "f@120,160.npz")["classes"].tolist() == ["Road"]
    assert read_index_mask(out / "f@0,0.png").unique().tolist() == [0]


def test_a_fold_of_the_split_cuts_its_crops_by_the_loaders_own_rule(tmp_path):
    """`train[fold=1/2]` selects whole frames, then crops them as the loader does (the 1% label
    share, the crop size), so a crop's label does not depend on how its frame was selected."""
    from wsss_domains.pipeline.data import open_dataset

    for folder in ("train", "trainannot"):
        (tmp_path / folder).mkdir()
    for name in ("a", "b", "c"):
        mask = np.zeros((240, 320), dtype=np.uint8)  # Sky everywhere
        mask[:2, :2] = 3  # four Road pixels in the top-left crop: under 1% of it
        Image.fromarray(np.zeros((240, 320, 3), dtype=np.uint8)).save(tmp_path / "train" / f"{name}.png")
        Image.fromarray(mask, mode="L").save(tmp_path / "trainannot" / f"{name}.png")

    def labels(split: str) -> dict[str, list[int]]:
        crops = open_dataset("driving", "camvid", tmp_path, split, labels_from_masks=True).dataset
        return {crops[i]["id"]: crops[i]["label"].nonzero().flatten().tolist() for i in range(len(crops))}

    whole, fold = labels("train"), labels("train[fold=1/2]")
    assert sorted({k.split("@")[0] for k in fold}) == ["a", "c"] and len(fold) == 8  # 2 frames x 4 crops
    assert all(fold[k] == whole[k] for k in fold)
    assert fold["a@0,0"] == [0]  # no stray Road


def test_label_probe_windows_take_the_loaders_label_rule(tmp_path):
    """label-probe fits on quarter-stride windows of the training frames: a window's label follows
    the crops' 1% share (as the classifier learnt), so stray pixels do not enter it."""
    from types import SimpleNamespace

    from wsss_domains.pipeline.pseudo_labels import _window_factory

    for folder in ("train", "trainannot"):
        (tmp_path / folder).mkdir()
    mask = np.zeros((240, 320), dtype=np.uint8)  # Sky everywhere
    mask[:2, :2] = 3  # four Road pixels: under 1% of every window holding them
    mask[200:, 280:] = 8  # a 40 x 40 Car: 8% of a 120 x 160 window holding it whole
    Image.fromarray(np.zeros((240, 320, 3), dtype=np.uint8)).save(tmp_path / "train" / "f.png")
    Image.fromarray(mask, mode="L").save(tmp_path / "trainannot" / "f.png")
    config = SimpleNamespace(domain="driving", dataset="camvid", data=str(tmp_path), split="train[fold!=2/2]",
                             domain_options={}, patch_size=[120, 160])  # fmt: skip
    windows = _window_factory(config)()  # type: ignore[arg-type]
    assert len(windows) == 25 and windows.stride_hw == (30, 40)  # 5 x 5 windows at a quarter stride
    labels = {windows[i]["id"]: windows[i]["label"].nonzero().flatten().tolist() for i in range(len(windows))}
    assert labels["f@0,0"] == [0]  # no stray Road
    assert labels["f@120,160"] == [0, 8]
