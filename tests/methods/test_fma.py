"""FMA's SAM-based seeding: the seeding rule and the rock-sand-water filter against transcriptions of the
official code (written out here), the level-aware generator against SAM itself, and the method end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("sam", "engine")]
from sam_fixtures import build_tiny_sam  # noqa: E402

from wsss_domains.domains import create_domain  # noqa: E402
from wsss_domains.domains.contract import LabelSpace  # noqa: E402
from wsss_domains.methods import create_method, list_methods  # noqa: E402
from wsss_domains.methods.base import RefineContext  # noqa: E402
from wsss_domains.sam.fma import (  # noqa: E402
    FmaGeneratorSettings,
    LeveledMaskGenerator,
    rock_sand_water,
    seed_from_masks,
)
from wsss_domains.sam.predictor import CachedSamPredictor  # noqa: E402
from wsss_domains.sam.registry import LoadedSam  # noqa: E402


# -- the official code, transcribed (src/libs/seeding, src/utils/norm.py, sam_auto.py) ---------------------
def _official_seed(cam, masks, levels, bg_method):
    """``gather_norm_bg_argmax(norm_first=True, gather_method='mean', priority=('level_bigger', 'conf_bigger'))``."""
    areas = masks.sum(dim=(1, 2))
    fg_score = torch.maximum(cam, torch.tensor(0, dtype=cam.dtype))
    anns_arr = fg_score[:, None, :, :] * masks[None, :, :, :]
    anns_fg = (torch.sum(anns_arr, dim=(2, 3)) / areas[None, :])[:, None, :]  # (C, 1, S)
    arr = torch.maximum(anns_fg, torch.tensor(0.0))  # min_max_norm(thresh=0.)
    lo, hi = arr.amin(dim=(1, 2), keepdim=True), arr.amax(dim=(1, 2), keepdim=True)
    anns_fg = (arr - lo) / (hi - lo + 1e-7)
    if bg_method == "no_bg":
        bg = torch.empty((0, *anns_fg.shape[1:]))
    else:
        bg = torch.pow(1 - torch.amax(anns_fg, dim=0, keepdim=True), bg_method)
    score = torch.cat((bg, anns_fg), dim=0)
    max_idx = torch.argmax(score, dim=0)  # (1, S)
    fg_cls = torch.arange(cam.shape[0])
    cls_lb = torch.nn.functional.pad(fg_cls + 1, (1, 0), value=0)
    if bg_method == "no_bg":  # no background row: index k is class k (official idx2seed would shift)
        cls_lb = fg_cls + 1
    seed_of = cls_lb[max_idx][0].tolist()
    conf = torch.gather(score, 0, max_idx[None, ...])[0][0].tolist()
    anns = [
        {"seed": s, "conf": c, "level": int(lv), "mask": m}
        for s, c, lv, m in zip(seed_of, conf, levels, masks, strict=True)
    ]
    ordered = sorted(anns, key=lambda a: [a["level"], a["conf"]], reverse=False)
    out = torch.zeros(masks.shape[1:], dtype=torch.int64)
    for a in ordered:
        out[a["mask"]] = a["seed"]
    return out


def _official_rock_sand_water(masks, levels, thresh):
    container = None
    for level in [2, 1, 0]:
        chosen = [i for i in range(len(levels)) if int(levels[i]) == level]
        if container is None or not container:
            container = chosen
            continue
        if not chosen:
            continue
        inter = (masks[chosen][:, None] & masks[container][None]).sum(dim=(2, 3)).float()
        recall = (inter / masks[chosen].sum(dim=(1, 2))[:, None]).amax(dim=1)
        container = container + [i for i, r in zip(chosen, recall, strict=True) if r < thresh]
    return container


def _random_masks(gen, s, h, w):
    masks = torch.zeros(s, h, w, dtype=torch.bool)
    for i in range(s):
        y0, x0 = torch.randint(0, h - 3, (2,), generator=gen).tolist()
        dy, dx = torch.randint(3, 12, (2,), generator=gen).tolist()
        masks[i, y0 : y0 + dy, x0 : x0 + dx] = True
    return masks


@pytest.mark.parametrize("bg", [0.6, 2.0, "no_bg"])
def test_seeding_follows_the_official_rule(bg):
    gen = torch.Generator().manual_seed(0)
    cams = torch.randn(3, 20, 24, generator=gen)
    masks = _random_masks(gen, 12, 20, 24)
    levels = torch.randint(0, 3, (12,), generator=gen)
    expected = _official_seed(cams, masks, levels, bg)
    got = seed_from_masks(cams, masks, levels, bg_power=None if bg == "no_bg" else bg)
    assert torch.equal(got, expected)
    assert len(set(got.unique().tolist())) >= 3  # several classes (and background) painted
    assert int((got == 0).sum()) > 0


def test_higher_level_and_then_more_confident_masks_win():
    cams = torch.zeros(2, 8, 8)
    cams[0, :, :4] = 1.0
    cams[1, :, 4:] = 1.0
    whole = torch.ones(8, 8, dtype=torch.bool)
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    right = ~left
    masks = torch.stack([left, right, whole])
    # The whole-image mask (level 2) paints over the parts (level 0) whatever its class.
    seed = seed_from_masks(cams, masks, torch.tensor([0, 0, 2]), bg_power=0.6)
    assert seed.unique().numel() == 1
    # At one level the parts (confidence 1) win over the mixed whole (confidence lower).
    seed = seed_from_masks(cams, masks, torch.tensor([0, 0, 0]), bg_power=0.6)
    assert torch.equal(seed[:, :4], torch.ones(8, 4, dtype=torch.int64))
    assert torch.equal(seed[:, 4:], torch.full((8, 4), 2))


def test_rock_sand_water_follows_the_official_filter():
    gen = torch.Generator().manual_seed(1)
    masks = _random_masks(gen, 15, 16, 16)
    levels = torch.randint(0, 3, (15,), generator=gen)
    kept, kept_levels, scores = rock_sand_water(masks, levels, torch.arange(15.0), 0.3)
    order = _official_rock_sand_water(masks, levels, 0.3)
    assert scores.long().tolist() == order
    assert torch.equal(kept, masks[order]) and torch.equal(kept_levels, levels[order])
    assert 0 < len(order) < 15


@pytest.fixture
def tiny_sam():
    return LoadedSam(model=build_tiny_sam(), name="tiny_test", checkpoint_id="random-init-seed0")


def _image(seed=0, size=48):
    gen = np.random.default_rng(seed)
    image = (gen.random((size, size, 3)) * 60).astype(np.uint8)
    image[8:30, 10:34] += 150
    return image


def test_generator_levels_are_sams_multimask_indices(tiny_sam):
    settings = FmaGeneratorSettings(
        points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=0,
        min_mask_region_area=0, rock_sand_water_thresh=None, score_nms_offset=(0.0, 0.0, 0.0),
    )  # fmt: skip
    predictor = CachedSamPredictor(tiny_sam, None)
    image = _image()
    found = LeveledMaskGenerator(predictor, settings).generate_leveled(image)
    assert found.masks.shape[0] > 0 and set(found.levels.tolist()) <= {0, 1, 2}
    # Without offsets the masks are segment_anything's own generator's.
    reference = SamAutomaticMaskGenerator(
        tiny_sam.model, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    theirs = {np.packbits(r["segmentation"]).tobytes() for r in reference.generate(image)}
    ours = {np.packbits(m.numpy()).tobytes() for m in found.masks}
    assert ours == theirs
    # Each mask is SAM's output number `level` for a grid point.
    predictor.set_image(image)
    grid = (np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) + 0.5) * (48 / 4)
    outputs = [
        predictor.predict(point_coords=p[None], point_labels=np.ones(1), multimask_output=True)[0]
        for p in grid
    ]
    for mask, level in zip(found.masks.numpy(), found.levels.tolist(), strict=True):
        assert any(np.array_equal(out[level], mask) for out in outputs)


def test_level_offsets_change_which_masks_survive(tiny_sam):
    predictor = CachedSamPredictor(tiny_sam, None)
    base = {
        "points_per_side": 4,
        "stability_score_thresh": 0.0,
        "crop_n_layers": 0,
        "min_mask_region_area": 0,
    }
    image = _image(1)
    plain = LeveledMaskGenerator(predictor, FmaGeneratorSettings(**base, pred_iou_thresh=0.0,
                                 rock_sand_water_thresh=None, score_nms_offset=(0.0, 0.0, 0.0))).generate_leveled(image)  # fmt: skip
    threshold = float(plain.scores.max()) + 0.05  # above every raw score: only the offset level passes
    only_whole = LeveledMaskGenerator(predictor, FmaGeneratorSettings(
        **base, pred_iou_thresh=threshold, score_thresh_offset=(0.0, 0.0, 0.1), rock_sand_water_thresh=None,
    )).generate_leveled(image)  # fmt: skip
    assert only_whole.masks.shape[0] > 0 and set(only_whole.levels.tolist()) == {2}


def _context(image, present, labels_space):
    domain = create_domain("histo")
    return RefineContext.of(image, present, domain, labels_space, bg_threshold=None, exclude=None)


def test_method_relabels_whole_masks_and_keeps_ignored_pixels(tiny_sam):
    space = LabelSpace(classes=("background", "a", "b"), palette=((0, 0, 0), (255, 0, 0), (0, 0, 255)),
                       background_index=0)  # fmt: skip
    method = create_method("fma-seed", sam=tiny_sam, everything_points_per_side=4, everything_pred_iou_thresh=0.0,
                           everything_stability_thresh=0.0, crop_layers=0, min_region_area=0)  # fmt: skip
    method.setup(create_domain("histo"), (0.5,) * 3, (0.25,) * 3)
    image = torch.from_numpy(_image()).permute(2, 0, 1).float() / 255
    cams = torch.zeros(2, 48, 48)
    cams[0, 8:30, 10:34] = 1.0
    cams[1, 30:, :] = 0.5
    labels = torch.zeros(48, 48, dtype=torch.int64)
    labels[0, :] = space.ignore_index
    context = _context(image, torch.tensor([1.0, 0.0]), space)
    out = method.refine_labels(labels, cams, context)
    assert torch.equal(out[0], labels[0])  # ignored stays ignored
    found = method.leveled_masks(image, cams, context.present, context)
    expected = seed_from_masks(cams[[0]], found.masks, found.levels, bg_power=0.6)
    assert torch.equal(out[1:], torch.tensor([0, 1])[expected][1:])  # class b is absent: never painted
    assert set(out[1:].unique().tolist()) <= {0, 1}


def test_box_only_sam_seeds_from_cam_box_masks(tiny_sam):
    tiny_sam.supports_points = False
    space = LabelSpace(classes=("a", "b"), palette=((255, 0, 0), (0, 0, 255)))
    method = create_method("fma-seed", sam=tiny_sam)
    method.setup(create_domain("histo"), (0.5,) * 3, (0.25,) * 3)
    image = torch.from_numpy(_image()).permute(2, 0, 1).float() / 255
    cams = torch.zeros(2, 48, 48)
    cams[0, 8:30, 10:34] = 1.0
    cams[1, 30:, :] = 1.0
    labels = torch.ones(48, 48, dtype=torch.int64)
    context = _context(image, torch.tensor([1.0, 1.0]), space)
    found = method.leveled_masks(image, cams, context.present, context)
    assert found.masks.shape[0] > 0 and int(found.levels.max()) == 0
    out = method.refine_labels(labels, cams, context)
    seed = seed_from_masks(cams, found.masks, found.levels, bg_power=None)  # no background class: no_bg
    covered = found.masks.any(dim=0)
    assert torch.equal(out[covered], (seed - 1)[covered])
    assert torch.equal(out[~covered], labels[~covered])


def test_listed_chainable_and_options_checked():
    assert "fma-seed" in list_methods()
    create_method("cam+fma-seed")
    with pytest.raises(ValueError, match="bg_power"):
        create_method("fma-seed", bg_power=0)
