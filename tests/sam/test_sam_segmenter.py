"""SamSegmenter on the tiny SAM: prompt frames, mask sizes, classes, and the three prompt kinds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss_domains.domains.contract import PromptKind, SamStrategy
from wsss_domains.sam.cache import EmbeddingCache
from wsss_domains.sam.prompts import cam_boxes
from wsss_domains.sam.segmenter import SamSegmenter

H, W = 40, 72  # the tiny SAM's 64 px input holds this as 36 x 64
XY_SCALE = torch.tensor([64 / 72, 36 / 40])  # ResizeLongestSide scales each axis by its own ratio


def _cams() -> torch.Tensor:
    """Three classes at half resolution (20 x 36): two with regions, one empty."""
    cams = torch.zeros(3, 20, 36)
    cams[0, 2:8, 3:15] = 1.0
    cams[0, 12:18, 25:33] = 0.9
    cams[2, 10:16, 5:12] = 0.6
    return cams


def _spy_prompts(monkeypatch, sam):
    seen = {}
    original = sam.model.prompt_encoder.forward

    def spy(points, boxes, masks):
        seen["points"], seen["boxes"] = points, boxes
        return original(points, boxes, masks)

    monkeypatch.setattr(sam.model.prompt_encoder, "forward", spy)
    return seen


def test_boxes_are_taken_in_the_image_frame_and_scaled_to_the_model(tiny_sam, monkeypatch):
    seen = _spy_prompts(monkeypatch, tiny_sam)
    segmenter = SamSegmenter(tiny_sam)
    strategy = SamStrategy(prompt=PromptKind.BOXES, cam_threshold=0.5, max_prompts_per_class=4)
    image = torch.rand(3, H, W)
    out = segmenter.segment(image, _cams(), strategy, return_logits=True)
    assert out.classes.tolist() == [0, 0, 2]
    assert out.masks.shape == (3, H, W) and out.masks.dtype == torch.bool
    assert out.logits.shape == (3, H, W) and torch.equal(out.masks, out.logits > 0)
    cams_full = F.interpolate(_cams()[None], (H, W), mode="bilinear", align_corners=False)[0]
    image_boxes = torch.cat([cam_boxes(cams_full[0], 0.5, 4), cam_boxes(cams_full[2], 0.5, 4)])
    assert torch.allclose(seen["boxes"], image_boxes * XY_SCALE.repeat(2))
    class_masks = out.class_masks()
    assert class_masks.shape == (3, H, W)
    assert torch.equal(class_masks[0], out.masks[0] | out.masks[1])
    assert not class_masks[1].any()


def test_box_masks_match_sams_own_batched_forward(tiny_sam):
    """The same image and boxes through Sam.forward (segment_anything's end-to-end path)."""
    segmenter = SamSegmenter(tiny_sam)
    image = torch.rand(3, H, W)
    strategy = SamStrategy(prompt=PromptKind.BOXES, max_prompts_per_class=2)
    ours = segmenter.segment(image, _cams(), strategy)
    resized = F.interpolate(image[None], (36, 64), mode="bilinear", align_corners=False, antialias=True)[0]
    cams_full = F.interpolate(_cams()[None], (H, W), mode="bilinear", align_corners=False)[0]
    boxes = torch.cat([cam_boxes(cams_full[k], 0.5, 2) for k in (0, 2)]) * XY_SCALE.repeat(2)
    (theirs,) = tiny_sam.model([{"image": resized * 255, "boxes": boxes, "original_size": (H, W)}], False)
    assert torch.equal(ours.masks, theirs["masks"][:, 0])
    assert torch.allclose(ours.scores, theirs["iou_predictions"][:, 0])


def test_labels_and_empty_cams_give_no_prompts(tiny_sam):
    segmenter = SamSegmenter(tiny_sam)
    image = torch.rand(3, H, W)
    strategy = SamStrategy(prompt=PromptKind.BOXES)
    out = segmenter.segment(image, _cams(), strategy, labels=torch.tensor([0.0, 1.0, 1.0]))
    assert out.classes.tolist() == [2]
    none = segmenter.segment(
        image, _cams(), strategy, labels=torch.tensor([0.0, 1.0, 0.0]), return_logits=True
    )
    assert none.masks.shape == (0, H, W) and none.logits.shape == (0, H, W)
    assert not none.class_masks().any()
    with pytest.raises(ValueError, match="labels has 2 entries for 3 CAMs"):
        segmenter.segment(image, _cams(), strategy, labels=torch.ones(2))


def test_points_take_the_best_of_three_masks(tiny_sam, monkeypatch):
    seen = _spy_prompts(monkeypatch, tiny_sam)
    segmenter = SamSegmenter(tiny_sam, min_peak_distance=3)
    strategy = SamStrategy(prompt=PromptKind.POINTS, peak_threshold=0.7, max_prompts_per_class=2)
    image = torch.rand(3, H, W)
    cams = torch.zeros(2, H, W)
    cams[1, 10, 20] = 1.0
    cams[1, 30, 60] = 0.8
    out = segmenter.segment(image, cams, strategy, return_logits=True)
    coords, labels = seen["points"]
    assert torch.allclose(coords[:, 0], torch.tensor([[20.5, 10.5], [60.5, 30.5]]) * XY_SCALE)
    assert labels.tolist() == [[1], [1]]
    assert out.classes.tolist() == [1, 1] and out.masks.shape == (2, H, W)
    predictor = segmenter.predictor
    all3, iou, _ = predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    best = iou.argmax(dim=1)
    assert torch.equal(out.logits, all3[torch.arange(2), best])
    assert torch.equal(out.scores, iou.max(dim=1).values)


def test_everything_mode_ignores_cams_and_has_no_classes(tiny_sam, tmp_path):
    cache = EmbeddingCache(tmp_path)
    segmenter = SamSegmenter(
        tiny_sam,
        cache=cache,
        everything_points_per_side=4,
        everything_pred_iou_thresh=0.0,
        everything_stability_thresh=0.0,
    )
    out = segmenter.segment(torch.rand(3, H, W), None, SamStrategy(prompt=PromptKind.EVERYTHING))
    assert out.masks.shape[1:] == (H, W) and len(out.masks) > 0
    assert bool((out.classes == -1).all())
    assert cache.misses == 1
    with pytest.raises(ValueError, match="no class"):
        out.class_masks()


def test_box_only_models_refuse_point_prompts(tiny_sam):
    tiny_sam.supports_points = False
    segmenter = SamSegmenter(tiny_sam)
    for kind in (PromptKind.POINTS, PromptKind.EVERYTHING):
        with pytest.raises(ValueError, match="box prompts only"):
            segmenter.segment(torch.rand(3, H, W), _cams(), SamStrategy(prompt=kind))


def test_minmax_normalisation_is_applied_before_the_model(tiny_sam):
    tiny_sam.minmax_normalise = True
    segmenter = SamSegmenter(tiny_sam)
    dim = torch.rand(3, 64, 64) * 0.2 + 0.3
    stretched = (dim - dim.min()) / (dim.max() - dim.min())
    assert torch.allclose(segmenter.embed(dim), segmenter.embed(stretched), atol=1e-4)
