"""Pseudo-label assembly per background mode, and the resumable, atomic pseudo-label writer."""

from __future__ import annotations

import os
from pathlib import Path

import fakes
import numpy as np
import pytest
import torch
from PIL import Image

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.data.io import DataError, read_index_mask
from wsss_domains.domains.contract import BackgroundMode, LabelSpace
from wsss_domains.methods.base import Method
from wsss_domains.models.classifier import CamClassifier
from wsss_domains.pseudo_labels.assemble import cams_to_labels, labels_from_logits
from wsss_domains.pseudo_labels.writer import (
    SUMMARY_FILE,
    PseudoLabelOptions,
    PseudoLabelSummary,
    image_labels,
    write_pseudo_labels,
)

U = 255
PAL4 = ((0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3))
THRESHOLD = LabelSpace(("bg", "a", "b", "c"), PAL4, BackgroundMode.THRESHOLD, background_index=0)
EXCLUDE = LabelSpace(("a", "b", "c"), PAL4[:3], BackgroundMode.EXCLUDE)
NONE = LabelSpace(("a", "b", "c"), PAL4[:3], BackgroundMode.NONE)

# Three foreground maps over a 2 x 3 image; column by column the winner among all three is a, b, c.
CAMS = torch.tensor(
    [
        [[0.9, 0.2, 0.1], [0.25, 0.1, 0.0]],  # a
        [[0.1, 0.8, 0.2], [0.20, 0.6, 0.1]],  # b
        [[0.0, 0.3, 0.7], [0.10, 0.2, 0.2]],  # c
    ]
)


# -- cams_to_labels --------------------------------------------------------------------------


def test_threshold_mode_adds_a_background_channel_at_the_threshold():
    labels = cams_to_labels(CAMS, torch.tensor([1.0, 1.0, 1.0]), THRESHOLD, bg_threshold=0.3)
    # class ids are label-space ids: a=1, b=2, c=3, background=0 where every present CAM < 0.3
    assert labels.tolist() == [[1, 2, 3], [0, 2, 0]]
    assert labels.dtype == torch.long


def test_threshold_mode_only_considers_present_classes():
    labels = cams_to_labels(CAMS, torch.tensor([0.0, 1.0, 0.0]), THRESHOLD, bg_threshold=0.3)
    assert labels.tolist() == [[0, 2, 0], [0, 2, 0]]


def test_threshold_mode_without_present_classes_is_all_background():
    labels = cams_to_labels(CAMS, torch.zeros(3), THRESHOLD, bg_threshold=0.3)
    assert labels.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_threshold_mode_needs_a_threshold():
    with pytest.raises(ValueError, match="needs bg_threshold"):
        cams_to_labels(CAMS, torch.ones(3), THRESHOLD)


def test_exclude_mode_marks_excluded_pixels_ignore():
    exclude = torch.tensor([[False, False, True], [True, False, False]])
    labels = cams_to_labels(CAMS, torch.tensor([1.0, 1.0, 0.0]), EXCLUDE, exclude=exclude)
    # without c: column 3 row 2 goes to b (0.1 > 0.0); no background channel in exclude mode
    assert labels.tolist() == [[0, 1, U], [U, 1, 1]]


def test_none_mode_is_a_plain_arg_max_over_present_classes():
    assert cams_to_labels(CAMS, torch.ones(3), NONE).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert cams_to_labels(CAMS, torch.tensor([1.0, 1.0, 0.0]), NONE).tolist() == [[0, 1, 1], [0, 1, 1]]
    assert cams_to_labels(CAMS, torch.tensor([1.0, 0.0, 1.0]), NONE).tolist() == [[0, 2, 2], [0, 2, 2]]


def test_none_mode_without_present_classes_is_ignore():
    assert cams_to_labels(CAMS, torch.zeros(3), NONE).tolist() == [[U, U, U], [U, U, U]]


def test_labels_from_logits_keeps_at_least_the_top_class():
    assert labels_from_logits(torch.tensor([2.0, -1.0, 0.5])).tolist() == [1.0, 0.0, 1.0]
    assert labels_from_logits(torch.tensor([-3.0, -1.0, -2.0])).tolist() == [0.0, 1.0, 0.0]


# -- the writer ------------------------------------------------------------------------------


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    return fakes.write_shapes(tmp_path / "data", n_train=1, n_val=4, n_unlabelled=2)


@pytest.fixture
def model() -> CamClassifier:
    return CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random").eval()


def write(
    dataset, model: CamClassifier, out: Path, label_space: LabelSpace = fakes.LABEL_SPACE, **options
) -> PseudoLabelSummary:
    return write_pseudo_labels(
        dataset,
        CamExtractor(model, scales=(1.0, 0.5)),
        Method(),
        fakes.FakeDomain(),
        label_space,
        (0.5, 0.5, 0.5),
        (0.25, 0.25, 0.25),
        out,
        PseudoLabelOptions(**options),
    )


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_writes_palette_pngs_overlays_and_a_summary(shapes: Path, model: CamClassifier, tmp_path: Path):
    val = fakes.build(shapes, "val")
    out = tmp_path / "pl"
    summary = write(val, model, out)
    names = [f"val_{k:02d}.png" for k in range(4)]
    assert (summary.written, summary.skipped, summary.files) == (4, 0, names)
    assert summary.bg_threshold == 0.3  # the domain's default for threshold-background datasets
    assert files_under(out) == {*names, *(f"overlays/{n}" for n in names), SUMMARY_FILE}
    for k, name in enumerate(names):
        with Image.open(out / name) as png:
            assert png.mode == "P" and png.size == (32, 32)
            assert png.getpalette()[:9] == [c for rgb in fakes.PALETTE for c in rgb]
        ids = read_index_mask(out / name)
        present = {0} | {i + 1 for i in torch.nonzero(val[k]["label"]).flatten().tolist()}
        assert set(ids.unique().tolist()) <= present  # absent classes never appear


def test_overlays_are_valid_pngs_with_one_panel_per_present_class(
    shapes: Path, model: CamClassifier, tmp_path: Path
):
    val = fakes.build(shapes, "val")
    write(val, model, tmp_path / "pl")
    for k in range(4):
        path = tmp_path / "pl" / "overlays" / f"val_{k:02d}.png"
        with Image.open(path) as picture:
            picture.verify()
        with Image.open(path) as picture:
            n_present = int(val[k]["label"].sum())
            assert picture.format == "PNG" and picture.mode == "RGB"
            assert picture.size == (32 * (2 + n_present), 32 + 14)  # image, pseudo-label, one heat map each


def test_max_overlays_limits_the_pictures(shapes: Path, model: CamClassifier, tmp_path: Path):
    write(fakes.build(shapes, "val"), model, tmp_path / "pl", max_overlays=1)
    assert sorted(p.name for p in (tmp_path / "pl" / "overlays").iterdir()) == ["val_00.png"]
    write(fakes.build(shapes, "val"), model, tmp_path / "none", overlays=False)
    assert not (tmp_path / "none" / "overlays").exists()


def test_resume_writes_only_the_missing_image(shapes: Path, model: CamClassifier, tmp_path: Path):
    val = fakes.build(shapes, "val")
    out = tmp_path / "pl"
    write(val, model, out)
    past = 1_000_000_000
    for path in out.rglob("*.png"):
        os.utime(path, ns=(past, past))
    (out / "val_02.png").unlink()
    summary = write(val, model, out)
    assert (summary.written, summary.skipped) == (1, 3)
    assert (out / "val_02.png").stat().st_mtime_ns != past
    assert (out / "overlays" / "val_02.png").stat().st_mtime_ns != past
    for k in (0, 1, 3):
        assert (out / f"val_{k:02d}.png").stat().st_mtime_ns == past
        assert (out / "overlays" / f"val_{k:02d}.png").stat().st_mtime_ns == past


class Crash(BaseException):
    """Stands for the process being interrupted (Ctrl-C, a kill the interpreter can see)."""


def test_a_crash_mid_write_leaves_no_partial_file_and_a_rerun_completes(
    shapes: Path, model: CamClassifier, tmp_path: Path, monkeypatch
):
    val = fakes.build(shapes, "val")
    out = tmp_path / "pl"
    real_save = Image.Image.save
    label_saves: list[str] = []

    def crashing_save(self, fp, format=None, **params):  # noqa: A002 - PIL's own signature
        if self.mode == "P":  # a pseudo-label, not an overlay
            label_saves.append(str(fp))
            if len(label_saves) == 3:  # the third label: half a file is on disk when the crash comes
                Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
                raise Crash
        return real_save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", crashing_save)
    with pytest.raises(Crash):
        write(val, model, out)
    assert all(".part" in name for name in label_saves)  # written beside the target, then renamed
    left = files_under(out)
    assert not [name for name in left if ".part" in name or Path(name).name.startswith(".")]
    assert {n for n in left if "/" not in n} == {"val_00.png", "val_01.png"}  # no summary, no val_02
    monkeypatch.setattr(Image.Image, "save", real_save)

    summary = write(val, model, out)
    assert (summary.written, summary.skipped) == (2, 2)
    for k in range(4):
        assert read_index_mask(out / f"val_{k:02d}.png").shape == (32, 32)
    assert not [name for name in files_under(out) if ".part" in name]


def test_save_cams_writes_float16_maps_of_the_present_classes(
    shapes: Path, model: CamClassifier, tmp_path: Path
):
    val = fakes.build(shapes, "val")
    out = tmp_path / "pl"
    assert write(val, model, out, overlays=False).written == 4
    # Labels exist but CAMs do not: asking for CAMs redoes every image.
    summary = write(val, model, out, save_cams=True, overlays=False)
    assert (summary.written, summary.skipped) == (4, 0)
    extractor = CamExtractor(model, scales=(1.0, 0.5))
    for k in range(4):
        sample = val[k]
        with np.load(out / "cams" / f"val_{k:02d}.npz") as npz:
            cams, classes = npz["cams"], npz["classes"]
        keep = sample["label"].bool()
        assert cams.dtype == np.float16
        assert cams.shape == (int(keep.sum()), 32, 32)
        assert classes.tolist() == [n for n, on in zip(("red", "blue"), keep.tolist(), strict=True) if on]
        image = (sample["image"] - 0.5) / 0.25
        expected = extractor(image)[keep].numpy()
        np.testing.assert_allclose(cams.astype(np.float32), expected, atol=2e-3)
    again = write(val, model, out, save_cams=True, overlays=False)
    assert (again.written, again.skipped) == (0, 4)


class SureOfBlue(torch.nn.Module):
    """The tiny classifier's CAMs, but logits that say: blue present, red absent."""

    def __init__(self, inner: CamClassifier) -> None:
        super().__init__()
        self.inner = inner

    def cams(self, x: torch.Tensor, rectify: bool = True) -> torch.Tensor:
        return self.inner.cams(x, rectify=rectify)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.inner(x)
        out["logits"] = torch.tensor([[-5.0, 5.0]]).expand(x.shape[0], -1)
        return out


def test_a_split_without_labels_uses_predicted_labels(shapes: Path, model: CamClassifier, tmp_path: Path):
    unlabelled = fakes.build(shapes, "unlabelled")
    assert "label" not in unlabelled[0] and "mask" not in unlabelled[0]
    summary = write(unlabelled, SureOfBlue(model), tmp_path / "pl", bg_threshold=0.0)
    assert summary.predicted_label_images == 2 and summary.written == 2
    for name in summary.files:
        # Threshold 0: every pixel goes to the one predicted class, never to red.
        ids = set(read_index_mask(tmp_path / "pl" / name).unique().tolist())
        assert 2 in ids and ids <= {0, 2}
    labelled = write(fakes.build(shapes, "val"), SureOfBlue(model), tmp_path / "val", bg_threshold=0.0)
    assert labelled.predicted_label_images == 0  # given labels win over predictions


def test_label_source_all_lets_every_class_compete(model: CamClassifier, tmp_path: Path):
    # The CAMs of a red-only sample, labels ignored: with every class present, each pixel takes the
    # class of its largest CAM, computed here from the extractor directly.
    sample = {"image": torch.rand(3, 32, 32), "label": torch.tensor([1.0, 0.0]), "id": "x"}
    summary = write([sample], SureOfBlue(model), tmp_path / "pl", label_source="all", bg_threshold=0.0)
    assert summary.predicted_label_images == 0 and summary.label_source == "all"
    cams = CamExtractor(model, scales=(1.0, 0.5))((sample["image"] - 0.5) / 0.25)
    expected = torch.cat([torch.zeros(1, 32, 32), cams]).argmax(0)  # background 0, red 1, blue 2
    assert torch.equal(read_index_mask(tmp_path / "pl" / "x.png"), expected)
    assert (expected == 2).any()  # blue, absent from the label, is drawn
    write([sample], SureOfBlue(model), tmp_path / "given", bg_threshold=0.0)
    assert set(read_index_mask(tmp_path / "given" / "x.png").unique().tolist()) <= {0, 1}


def test_labels_read_off_a_segmentation_at_a_patch_offset(tmp_path: Path):
    ids = np.zeros((8, 8), dtype=np.uint8)  # a (class 0) everywhere
    ids[0:2, 4:8] = 1  # b in the top right corner: 8 pixels
    ids[6:8, 6:8] = 2  # c in the bottom right corner: 4 pixels
    ids[7, 0] = U  # not scored
    Image.fromarray(ids, mode="L").save(tmp_path / "roi%2F1.png")
    patch = {"image": torch.rand(3, 4, 4), "id": "roi/1@4,4", "meta": {"parent": "roi/1", "offset": (4, 4)}}
    top = {"image": torch.rand(3, 4, 4), "id": "roi/1@0,4", "meta": {"parent": "roi/1", "offset": (0, 4)}}
    # Bottom right quarter: a on 12 pixels, c on 4; top right: b on 8, a on 8.
    assert image_labels(patch, EXCLUDE, "segmentation", tmp_path).tolist() == [1.0, 0.0, 1.0]
    assert image_labels(top, EXCLUDE, "segmentation", tmp_path).tolist() == [1.0, 1.0, 0.0]
    # c covers 4 / 16 = 25% of the patch: present from a fraction of 0.25, absent above it.
    assert image_labels(patch, EXCLUDE, "segmentation", tmp_path, 0.25).tolist() == [1.0, 0.0, 1.0]
    assert image_labels(patch, EXCLUDE, "segmentation", tmp_path, 0.3).tolist() == [1.0, 0.0, 0.0]
    # Excluded pixels are left out: with c's corner excluded, only a remains.
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[2:, 2:] = True
    assert image_labels({**patch, "exclude": exclude}, EXCLUDE, "segmentation", tmp_path).tolist() == [
        1,
        0,
        0,
    ]
    whole = {"image": torch.rand(3, 8, 8), "id": "roi/1"}
    assert image_labels(whole, EXCLUDE, "segmentation", tmp_path).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(DataError, match="no segmentation of other"):
        image_labels({"image": torch.rand(3, 4, 4), "id": "other"}, EXCLUDE, "segmentation", tmp_path)
    with pytest.raises(DataError, match="does not cover"):
        image_labels({"image": torch.rand(3, 16, 16), "id": "roi/1"}, EXCLUDE, "segmentation", tmp_path)
    with pytest.raises(ValueError, match="needs a folder"):
        image_labels(whole, EXCLUDE, "segmentation")


def test_exclude_pixels_of_a_sample_are_written_as_ignore(model: CamClassifier, tmp_path: Path):
    space = LabelSpace(("red", "blue"), fakes.PALETTE[1:], BackgroundMode.EXCLUDE)
    exclude = torch.zeros(32, 32, dtype=torch.bool)
    exclude[:, :8] = True
    sample = {
        "image": torch.rand(3, 32, 32),
        "label": torch.tensor([1.0, 1.0]),
        "exclude": exclude,
        "id": "a/b",
    }
    summary = write([sample], model, tmp_path / "pl", label_space=space)
    assert summary.files == ["a%2Fb.png"]  # ids with "/" stay one file
    ids = read_index_mask(tmp_path / "pl" / "a%2Fb.png")
    assert (ids[:, :8] == U).all() and (ids[:, 8:] != U).all()


def test_a_label_vector_of_the_wrong_length_is_refused(model: CamClassifier, tmp_path: Path):
    sample = {"image": torch.rand(3, 32, 32), "label": torch.tensor([1.0, 0.0, 1.0]), "id": "x"}
    with pytest.raises(ValueError, match=r"sample x: label vector has 3 entries, expected 2 \(red, blue\)"):
        write([sample], model, tmp_path / "pl")
    assert not (tmp_path / "pl" / "x.png").exists()


def test_an_empty_split_is_refused(model: CamClassifier, tmp_path: Path):
    with pytest.raises(ValueError, match="holds no images"):
        write([], model, tmp_path / "pl")


def test_label_free_sources_are_checked_by_name():
    from wsss_domains.errors import UserError
    from wsss_domains.pipeline.pseudo_labels import label_source

    assert label_source(None, False, None) == "auto"
    assert label_source("segmentation", True, None) == "segmentation"  # label-free wins over masks
    with pytest.raises(
        UserError, match="label_free must be one of predicted, all, segmentation, got 'given'"
    ):
        label_source("given", False, None)
