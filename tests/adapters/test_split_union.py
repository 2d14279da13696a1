"""Unions of splits (``validation[fold!=1/4] + training``): WSSS4LUAD's annotated ROIs with its
training patches, the challenge's own training format, in one training split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from histo_fixtures import make_wsss4luad
from PIL import Image

from wsss_domains.data.patches import PatchDataset
from wsss_domains.data.splits import union_parts
from wsss_domains.errors import UserError
from wsss_domains.evaluation.evaluate import pred_filename
from wsss_domains.pipeline.data import has_masks, open_dataset, scored_samples
from wsss_domains.pipeline.evaluate import evaluate_split
from wsss_domains.pipeline.pseudo_labels import _window_factory
from wsss_domains.training.run import RunConfig

TRAINING = ["436219-9328-56427-[1, 1, 0]", "449636-23526-9666-[0, 0, 1]"]


def test_a_union_is_split_on_plus_signs_outside_brackets():
    assert union_parts("validation[fold!=1/4, stratified] + training") == [
        "validation[fold!=1/4, stratified]",
        "training",
    ]
    assert union_parts("a+b + c[0:2]") == ["a", "b", "c[0:2]"]
    assert union_parts(" train[0:6] ") == [" train[0:6] "]  # not a union: the text as given
    for bad in ("validation + ", "+ training", "a ++ b"):
        with pytest.raises(ValueError, match="union"):
            union_parts(bad)


def test_annotated_parts_are_cut_into_patches_and_the_others_read_whole(tmp_path: Path):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    opened = open_dataset(
        "histo", "wsss4luad", root, "validation + training", labels_from_masks=True, patch_size=16
    )
    union = opened.dataset
    patches, training = union.parts
    assert isinstance(patches, PatchDataset) and union.annotated_parts == [True, False]
    # 40 x 48 ROIs in 16 px patches: 3 x 3 grid cells each (the last row and column overlap).
    assert len(union) == len(patches) + 2 and len(patches) > 2
    assert [union[len(patches) + i]["id"] for i in range(2)] == TRAINING
    assert union[len(patches)]["label"].tolist() == [1.0, 1.0, 0.0]  # from the file name
    assert "mask" not in union[len(patches)] and "mask" in union[0]
    assert tuple(union[0]["image"].shape[-2:]) == (16, 16)
    assert tuple(union[len(patches)]["image"].shape[-2:]) == (30, 28)  # whole: no mask to cut by
    assert has_masks(union) and scored_samples(union) is patches
    assert union.sample_ids()[-2:] == TRAINING
    assert opened.split == "validation + training" and opened.spec.name == "wsss4luad"


def test_an_image_named_twice_is_refused(tmp_path: Path):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    with pytest.raises(UserError, match=r"image 01 is in both 'validation' and 'validation\[1:\]'"):
        open_dataset("histo", "wsss4luad", root, "validation + validation[1:]")
    with pytest.raises(UserError, match="union is written"):
        open_dataset("histo", "wsss4luad", root, "validation +")


def test_a_score_of_a_union_counts_its_annotated_parts(tmp_path: Path):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    pred = tmp_path / "pred"
    pred.mkdir()
    # Predictions for the two ROIs only: the training patches have no mask, and no prediction here.
    # ROI 00 is predicted exactly (its exclude strip aside); ROI 01, all stroma, is predicted tumour in
    # its left half: stroma IoU = 1/2 there, tumour IoU 0 (predicted, absent).
    masks = {}
    for name in ("00", "01"):
        ids = np.array(Image.open(root / "2.validation" / "mask" / f"{name}.png"))
        masks[name] = ids
        guess = np.where(ids == 3, 0, ids).astype(np.uint8)
        if name == "01":
            guess[:, :24] = 0
        Image.fromarray(guess).save(pred / pred_filename(name))
    page = tmp_path / "page.html"
    report = evaluate_split("histo", "wsss4luad", root, "validation + training", pred, html=page)
    assert report.n_images == 2 and "scored against the masks of 2 images" in page.read_text()
    # By hand, over the scored pixels (ids 0..2; id 3 and ROI 01's top strip are excluded):
    strip = np.zeros((40, 48), dtype=bool)
    strip[:4, :] = True
    scored = {"00": masks["00"] != 3, "01": (masks["01"] != 3) & ~strip}
    truth = np.concatenate([masks[n][scored[n]] for n in ("00", "01")])
    guess = masks["01"].copy()
    guess[:, :24] = 0
    guessed = np.concatenate([masks["00"][scored["00"]], guess[scored["01"]]])
    ious = [((truth == c) & (guessed == c)).sum() / ((truth == c) | (guessed == c)).sum() for c in range(3)]
    assert report.miou == pytest.approx(float(np.mean(ious)), abs=1e-6)
    with pytest.raises(
        UserError, match=r"no part of the split 'training\[0:1\] \+ training\[1:\]' has masks"
    ):
        evaluate_split("histo", "wsss4luad", root, "training[0:1] + training[1:]", pred)


def test_label_probe_windows_of_a_union_keep_the_unannotated_patches_whole(tmp_path: Path):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    config = RunConfig(
        domain="histo",
        dataset="wsss4luad",
        classes=["tumor", "stroma", "normal"],
        foreground=["tumor", "stroma", "normal"],
        split="validation + training",
        data=str(root),
        labels_from_masks=True,
        patch_size=[16, 16],
    )
    windows = _window_factory(config)()
    alone = _window_factory(RunConfig(**{**config.__dict__, "split": "validation"}))()
    # The ROIs' windows at a quarter-patch stride, as without the union, then the training patches.
    assert len(windows) == len(alone) + 2
    for i in (0, len(alone) - 1):
        assert torch.equal(windows[i]["image"], alone[i]["image"])
        assert torch.equal(windows[i]["label"], alone[i]["label"])
    assert [windows[len(alone) + i]["id"] for i in range(2)] == TRAINING
