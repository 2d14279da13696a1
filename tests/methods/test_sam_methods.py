"""SAM methods (sepl, sam-proto, s2c) and the label-level hook, on a tiny random SAM in seconds."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

# The tiny SAM (tests/sam) and the fake domain (tests/engine) are shared with those suites.
sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("sam", "engine")]
import fakes  # noqa: E402
from sam_fixtures import build_tiny_sam  # noqa: E402

from wsss_domains.cam.extract import CamExtractor  # noqa: E402
from wsss_domains.cam.settings import CamSettings  # noqa: E402
from wsss_domains.data.io import read_index_mask  # noqa: E402
from wsss_domains.domains.contract import BackgroundMode, LabelSpace, PromptKind, SamStrategy  # noqa: E402
from wsss_domains.methods import create_method, list_methods  # noqa: E402
from wsss_domains.methods.base import Method, RefineContext  # noqa: E402
from wsss_domains.methods.s2c import S2C, _TargetSetup  # noqa: E402
from wsss_domains.methods.sam_base import SAM_CACHE_ENV, sam_cache_dir  # noqa: E402
from wsss_domains.methods.sam_proto import fuse_prototype_cams  # noqa: E402
from wsss_domains.models.classifier import CamClassifier  # noqa: E402
from wsss_domains.pipeline.pseudo_labels import pseudo_label_split  # noqa: E402
from wsss_domains.pseudo_labels.assemble import cams_to_labels  # noqa: E402
from wsss_domains.pseudo_labels.writer import PseudoLabelOptions, write_pseudo_labels  # noqa: E402
from wsss_domains.sam import registry as sam_registry  # noqa: E402
from wsss_domains.sam.registry import CACHE_ENV, CHECKPOINT_FLAG, LoadedSam  # noqa: E402
from wsss_domains.sam.s2c import cpm_loss, cpm_target, multiscale_cams, segment_index_map, ssc_loss  # noqa: E402
from wsss_domains.sam.segmenter import SamMasks  # noqa: E402
from wsss_domains.training.data import TrainingView  # noqa: E402
from wsss_domains.training.run import RunConfig, save_model  # noqa: E402
from wsss_domains.training.task import ClassifierTask  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
U = 255
TWO_CLASSES = LabelSpace(classes=("a", "b"), palette=((255, 0, 0), (0, 0, 255)))
EVERYTHING_FAST = {
    "everything_points_per_side": 4,
    "everything_pred_iou_thresh": 0.0,
    "everything_stability_thresh": 0.0,
}


@pytest.fixture(scope="module", autouse=True)
def fake_domain() -> Iterator[None]:
    fakes.register()
    yield
    fakes.unregister()


@pytest.fixture
def tiny_sam() -> LoadedSam:
    return LoadedSam(model=build_tiny_sam(), name="tiny_test", checkpoint_id="random-init-seed0")


class BoxDomain(fakes.FakeDomain):
    """The fake domain asking for LiteMedSAM with box prompts, as histology does."""

    def sam_strategy(self) -> SamStrategy:
        return SamStrategy(
            prompt=PromptKind.BOXES, model="lite_medsam", cam_threshold=0.4, max_prompts_per_class=3
        )


class StubSegmenter:
    """Stands in for SamSegmenter: returns hand-made masks and records the strategies asked for."""

    def __init__(self, sam: LoadedSam, masks: torch.Tensor) -> None:
        self.sam = sam
        self.masks = masks
        self.strategies: list[SamStrategy] = []

    def segment(self, image, cams, strategy, labels=None, return_logits=False) -> SamMasks:
        self.strategies.append(strategy)
        n = self.masks.shape[0]
        return SamMasks(self.masks, torch.ones(n), torch.full((n,), -1), strategy.prompt, 0)


def with_masks(method, sam: LoadedSam, masks: torch.Tensor) -> StubSegmenter:
    stub = StubSegmenter(sam, masks)
    method._sam, method._segmenter = sam, stub
    return stub


def box(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


# -- the engine hook -------------------------------------------------------------------------


def test_default_refine_labels_returns_the_labels_untouched():
    labels = torch.randint(0, 3, (8, 8))
    context = RefineContext.of(torch.rand(3, 8, 8), torch.ones(2), fakes.FakeDomain(), fakes.LABEL_SPACE)
    out = Method().refine_labels(labels, torch.rand(2, 8, 8), context)
    assert out is labels


class Shifted(Method):
    """Records what the writer passes to the hook and changes the labels."""

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def refine_labels(self, labels, cams, context):
        Shifted.seen.append((labels.clone(), cams.clone(), context.image.clone()))
        return torch.where(labels == 1, torch.full_like(labels, 2), labels)


def test_writer_assembles_labels_then_calls_refine_labels_and_writes_its_result(tmp_path):
    root = fakes.write_shapes(tmp_path / "data", n_train=1, n_val=2, n_unlabelled=0)
    val = fakes.build(root, "val")
    model = CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random").eval()
    extractor = CamExtractor(model, scales=(1.0,))
    domain, options = fakes.FakeDomain(), PseudoLabelOptions(overlays=False)
    write_pseudo_labels(
        val, extractor, Method(), domain, fakes.LABEL_SPACE, MEAN, STD, tmp_path / "plain", options
    )
    Shifted.seen.clear()
    write_pseudo_labels(
        val, extractor, Shifted(), domain, fakes.LABEL_SPACE, MEAN, STD, tmp_path / "hook", options
    )
    assert len(Shifted.seen) == 2
    for k, (labels, cams, image) in enumerate(Shifted.seen):
        sample = val[k]
        assert torch.equal(image, sample["image"])  # the raw image, as refine gets it
        plain = read_index_mask(tmp_path / "plain" / f"val_{k:02d}.png").long()
        expected = cams_to_labels(cams, sample["label"], fakes.LABEL_SPACE, 0.3)
        assert torch.equal(labels, expected) and torch.equal(plain, expected)  # plain CAM: unchanged
        hooked = read_index_mask(tmp_path / "hook" / f"val_{k:02d}.png").long()
        assert torch.equal(hooked, torch.where(expected == 1, 2, expected))


def test_sam_methods_are_registered():
    assert {"sepl", "s2c", "sam-proto"} <= set(list_methods())


# -- sepl --------------------------------------------------------------------------------------


def test_sepl_relabels_hand_made_masks_against_the_cam_pseudo_label(tiny_sam):
    labels = torch.zeros(8, 8, dtype=torch.int64)
    labels[2:5, 2:5] = 1  # red blob (9 px)
    labels[6:8, 6:8] = 2  # blue blob (4 px)
    labels[1, 1] = U
    big = box((8, 8), 1, 7, 1, 7)  # 36 px, mostly background, but all of red: red (coverage)
    corner = box((8, 8), 5, 8, 5, 8)  # 9 px, mostly background, all of blue: blue; later class, so wins
    method = create_method("sepl", sam_cache="none")
    stub = with_masks(method, tiny_sam, torch.stack([big, corner]))
    out = method.refine_labels(
        labels,
        torch.rand(2, 8, 8),
        RefineContext.of(torch.rand(3, 8, 8), torch.ones(2), fakes.FakeDomain(), fakes.LABEL_SPACE),
    )
    expected = labels.clone()
    expected[big] = 1
    expected[corner] = 2
    expected[1, 1] = U  # ignored pixels stay ignored
    assert torch.equal(out, expected)
    assert out[0, 7] == 0  # no mask there: the CAM label stays
    assert stub.strategies[0].prompt is PromptKind.EVERYTHING  # the tiny SAM takes point grids


def test_sepl_sends_the_pixels_of_masks_no_class_claims_to_background(tiny_sam):
    """SAM_WSSS max_iou_imp2: the merge starts from background; the former merge kept CAM labels."""
    labels = torch.zeros(8, 8, dtype=torch.int64)
    labels[0:4, 0:4] = 1
    straddle = box((8, 8), 2, 6, 2, 6)  # 4 px of class 1 out of 16, 4 / 16 of its region: nobody's
    for name in ("sepl", "s2c"):  # s2c refines its CAMs with the same merge
        method = create_method(name, sam_cache="none")
        with_masks(method, tiny_sam, straddle[None])
        out = method.refine_labels(
            labels,
            torch.rand(2, 8, 8),
            RefineContext.of(torch.rand(3, 8, 8), torch.ones(2), fakes.FakeDomain(), fakes.LABEL_SPACE),
        )
        assert torch.equal(out, torch.where(straddle, 0, labels))


def test_sepl_without_masks_keeps_the_labels(tiny_sam):
    method = create_method("sepl", sam_cache="none")
    with_masks(method, tiny_sam, torch.zeros(0, 8, 8, dtype=torch.bool))
    labels = torch.randint(0, 3, (8, 8))
    out = method.refine_labels(
        labels,
        torch.rand(2, 8, 8),
        RefineContext.of(torch.rand(3, 8, 8), torch.ones(2), fakes.FakeDomain(), fakes.LABEL_SPACE),
    )
    assert torch.equal(out, labels)


def test_box_only_sam_is_prompted_with_the_domains_boxes(tiny_sam):
    tiny_sam.supports_points = False
    method = create_method("sepl", sam_cache="none")
    stub = with_masks(method, tiny_sam, torch.zeros(0, 8, 8, dtype=torch.bool))
    method.refine_labels(
        torch.zeros(8, 8, dtype=torch.int64),
        torch.rand(2, 8, 8),
        RefineContext.of(torch.rand(3, 8, 8), torch.ones(2), BoxDomain(), fakes.LABEL_SPACE),
    )
    assert stub.strategies[0] == BoxDomain().sam_strategy()  # boxes, with the domain's thresholds


def test_sepl_with_the_tiny_sam_matches_sepl_on_the_same_masks(tiny_sam, tmp_path):
    from wsss_domains.sam.sepl_merge import sepl_refine

    method = create_method("sepl", sam=tiny_sam, sam_cache=str(tmp_path / "cache"), **EVERYTHING_FAST)
    image = torch.rand(3, 24, 24)
    masks = method.segmenter().segment(image, None, SamStrategy(prompt=PromptKind.EVERYTHING)).masks
    assert len(masks) > 0
    labels = torch.zeros(24 * 24, dtype=torch.int64)
    inside = torch.nonzero(masks[0].flatten()).flatten()
    labels[inside[: int(0.7 * len(inside))]] = 1  # 70 % of the largest mask is class 1: all of it becomes 1
    labels = labels.view(24, 24)
    out = method.refine_labels(
        labels,
        torch.rand(2, 24, 24),
        RefineContext.of(image, torch.ones(2), fakes.FakeDomain(), fakes.LABEL_SPACE),
    )
    assert torch.equal(out, sepl_refine(labels, masks, 3, background_index=0))
    assert not torch.equal(out, labels)
    assert list((tmp_path / "cache" / "tiny_test").rglob("*.pt"))  # the embedding was cached on disk


def test_sam_is_created_once_lazily_from_the_domains_model_and_the_checkpoint_option(tiny_sam, monkeypatch):
    calls = []

    def fake_create(name, checkpoint=None, device="cpu"):
        calls.append((name, checkpoint))
        return tiny_sam

    monkeypatch.setattr(sam_registry, "create_sam", fake_create)
    method = create_method("sepl", sam_checkpoint="/weights/lite.pth", sam_cache="none", prompt="boxes")
    assert not calls  # nothing is loaded when the method is created
    cams = torch.zeros(2, 16, 16)
    cams[0, 2:8, 2:8] = 1.0
    for _ in range(2):
        method.refine_labels(
            torch.zeros(16, 16, dtype=torch.int64),
            cams,
            RefineContext.of(torch.rand(3, 16, 16), torch.tensor([1.0, 0.0]), BoxDomain(), fakes.LABEL_SPACE),
        )
    assert calls == [("lite_medsam", "/weights/lite.pth")]
    other = create_method("sepl", sam_model="vit_l", sam_cache="none")
    other.refine_labels(
        torch.zeros(16, 16, dtype=torch.int64),
        cams,
        RefineContext.of(torch.rand(3, 16, 16), torch.tensor([1.0, 0.0]), BoxDomain(), fakes.LABEL_SPACE),
    )
    assert calls[-1] == ("vit_l", None)


def test_missing_vit_b_checkpoint_is_a_clear_error_before_any_label_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))
    root = fakes.write_shapes(tmp_path / "data", n_train=1, n_val=1, n_unlabelled=0)
    model = CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random").eval()
    for name in ("sepl", "s2c", "sam-proto"):
        method = create_method(name)  # the fake domain's SamStrategy asks for vit_b
        out = tmp_path / f"pl-{name}"
        with pytest.raises(FileNotFoundError) as err:
            write_pseudo_labels(
                fakes.build(root, "val"), CamExtractor(model), method, fakes.FakeDomain(), fakes.LABEL_SPACE,
                MEAN, STD, out, PseudoLabelOptions(),
            )  # fmt: skip
        assert CHECKPOINT_FLAG in str(err.value) and "sam_vit_b_01ec64.pth" in str(err.value)
        assert not list(out.glob("*.png"))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'no.pth'}.*{CHECKPOINT_FLAG}"):
        create_method("sepl", sam_checkpoint=str(tmp_path / "no.pth")).setup(fakes.FakeDomain(), MEAN, STD)


def test_cache_folder_option_environment_and_off(monkeypatch, tmp_path):
    from wsss_domains.sam.cache import default_cache_dir

    monkeypatch.delenv(SAM_CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert sam_cache_dir() == Path("~/.cache/wsss-domains/sam-embeddings").expanduser()
    monkeypatch.setenv(SAM_CACHE_ENV, str(tmp_path / "env"))
    assert sam_cache_dir() == tmp_path / "env"
    assert default_cache_dir() == tmp_path / "env"  # one variable for the methods and the library
    assert sam_cache_dir(str(tmp_path / "opt")) == tmp_path / "opt"
    assert sam_cache_dir("none") is None and sam_cache_dir(False) is None


# -- sam-proto -----------------------------------------------------------------------------------


class FixedFeatures(nn.Module):
    """A 'classifier' whose backbone features are hand-made (``1 x D x H x W``)."""

    def __init__(self, feats: torch.Tensor) -> None:
        super().__init__()
        self.feats = feats

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feats.expand(x.shape[0], -1, -1, -1)


def proto_method(tiny_sam, masks, feats, **options):
    method = create_method("sam-proto", sam=tiny_sam, sam_cache="none", **options)
    method.setup(fakes.FakeDomain(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    method.extractor(FixedFeatures(feats), nn.ModuleDict(), flip=False, base_scale=1.0)
    with_masks(method, tiny_sam, masks)
    return method


def halves() -> tuple[torch.Tensor, torch.Tensor]:
    """Left / right half segments of a 4 x 8 image and features [1, 0] left, [1, 1] right."""
    masks = torch.stack([box((4, 8), 0, 4, 0, 4), box((4, 8), 0, 4, 4, 8)])
    feats = torch.zeros(1, 2, 4, 8)
    feats[0, 0] = 1.0
    feats[0, 1, :, 4:] = 1.0
    return masks, feats


def test_sam_proto_fuses_prototype_cams_by_the_documented_formula(tiny_sam):
    masks, feats = halves()
    cams = torch.zeros(2, 4, 8)
    cams[0, :, :4] = torch.tensor([1.0, 0.8, 0.6, 0.4])
    cams[0, :, 4:] = 0.1
    cams[1, :, 4:] = torch.tensor([0.2, 0.4, 0.6, 1.0])  # left half: class a, right half: class b
    method = proto_method(tiny_sam, masks, feats)
    out = method.refine(
        cams, RefineContext.of(torch.rand(3, 4, 8), torch.ones(2), fakes.FakeDomain(), TWO_CLASSES)
    )
    r = 1 / math.sqrt(2)  # cosine of [1, 1] to [1, 0]
    # a: prototype [1, 0] -> proto CAM 1 left, r right; b: prototype [1, 1] -> r left, 1 right.
    expected_a = torch.tensor([1.0, 0.9, 0.8, 0.7, *([0.5 * 0.1 + 0.5 * r] * 4)])
    expected_b = torch.tensor([*([0.5 * r] * 4), 0.6, 0.7, 0.8, 1.0])
    assert torch.allclose(out[0], expected_a.expand(4, 8), atol=1e-5)
    assert torch.allclose(out[1], expected_b.expand(4, 8), atol=1e-5)
    # fuse_weight w: (1 - w) * cam + w * proto, then divided by its maximum.
    quarter = proto_method(tiny_sam, masks, feats, fuse_weight=0.25)
    out = quarter.refine(
        cams, RefineContext.of(torch.rand(3, 4, 8), torch.ones(2), fakes.FakeDomain(), TWO_CLASSES)
    )
    raw_b = torch.tensor([*([0.25 * r] * 4), 0.4, 0.55, 0.7, 1.0])
    assert torch.allclose(out[1], (raw_b / raw_b.max()).expand(4, 8), atol=1e-5)


def test_sam_proto_uses_only_confident_segments_and_respects_the_domain_hook(tiny_sam):
    masks, feats = halves()
    cams = torch.zeros(2, 4, 8)
    cams[0] = 0.3
    cams[0, :, 0] = 1.0
    cams[1, :, 4:] = torch.tensor([0.2, 0.25, 0.9, 1.0])  # right half: half a, half b -> no prototype for b
    method = proto_method(tiny_sam, masks, feats)
    out = method.refine(
        cams, RefineContext.of(torch.rand(3, 4, 8), torch.ones(2), fakes.FakeDomain(), TWO_CLASSES)
    )
    assert torch.equal(out[1], cams[1])
    assert not torch.allclose(out[0], cams[0])
    # fuse_prototype_cams keeps classes without a prototype; the formula for the others.
    proto = torch.rand(2, 2, 4)  # at half resolution: resized bilinearly to the CAMs
    fused = fuse_prototype_cams(cams, proto, torch.tensor([True, False]), 0.5)
    assert torch.equal(fused[1], cams[1]) and torch.isclose(fused[0].max(), torch.tensor(1.0))

    # SamStrategy.use_prototypes = False (or the option) leaves the CAMs alone.
    class NoPrototypes(fakes.FakeDomain):
        def sam_strategy(self) -> SamStrategy:
            return replace(super().sam_strategy(), use_prototypes=False)

    assert torch.equal(
        method.refine(
            cams, RefineContext.of(torch.rand(3, 4, 8), torch.ones(2), NoPrototypes(), TWO_CLASSES)
        ),
        cams,
    )
    forced = proto_method(tiny_sam, masks, feats, use_prototypes=True)
    assert not torch.equal(
        forced.refine(
            cams, RefineContext.of(torch.rand(3, 4, 8), torch.ones(2), NoPrototypes(), TWO_CLASSES)
        ),
        cams,
    )


# -- s2c: the losses ---------------------------------------------------------------------------------


def test_segment_index_map_by_area_lets_smaller_segments_win():
    big, small = box((4, 4), 0, 4, 0, 4), box((4, 4), 1, 2, 1, 3)
    seg = segment_index_map(torch.stack([small, big]))
    expected = torch.full((4, 4), 2)
    expected[1, 1:3] = 1
    assert torch.equal(seg, expected)
    assert torch.equal(
        segment_index_map(torch.zeros(0, 4, 4, dtype=torch.bool)), torch.zeros(4, 4, dtype=torch.int64)
    )


def official_se_map(masks: list[np.ndarray], predicted_iou: list[float]) -> np.ndarray:
    """S2C ``get_se_map.py`` on SamAutomaticMaskGenerator output (listed by descending predicted
    IoU, its NMS order), then ``voc12/data.py``'s ``se + 1``."""
    order = sorted(range(len(masks)), key=lambda k: -predicted_iou[k])
    generated = [{"segmentation": masks[k]} for k in order]
    temp = np.full(masks[0].shape, -1, dtype=int)
    for i, mask in enumerate(reversed(generated)):
        temp[mask["segmentation"]] = i
    return temp + 1


def test_segment_index_map_by_score_matches_get_se_map():
    rng = np.random.default_rng(3)
    masks = [rng.random((12, 10)) < p for p in (0.6, 0.3, 0.5, 0.2, 0.4)]
    scores = [0.91, 0.97, 0.88, 0.95, 0.9]
    out = segment_index_map(torch.from_numpy(np.stack(masks)), torch.tensor(scores))
    expected = official_se_map(masks, scores)
    assert np.array_equal(out.numpy(), expected)
    assert (expected == 0).any() and len(np.unique(expected)) == 6  # some unsegmented pixels


def official_ssc(feat_main: torch.Tensor, se: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """The SSC block of ``model_WSSS.update`` (S2C ``models/model_s2c.py``), with
    ``torch_scatter.scatter_mean`` (empty groups -> 0) written out as a loop."""
    B, D = feat_main.shape[:2]
    H, W = se.shape[-2:]
    feat_main = F.interpolate(feat_main, size=(H, W), mode="bilinear", align_corners=False)
    feat_main = F.normalize(feat_main, dim=1)
    feat_main_ = feat_main.view(B, D, -1)  # (B,D,HW)
    index_ = se.view(B, 1, -1).long()  # (B,1,HW)
    N = int(index_.max()) + 1
    pt = torch.zeros(B, D, N)
    for b in range(B):
        for n in range(N):
            members = index_[b, 0] == n
            if members.any():
                pt[b, :, n] = feat_main_[b][:, members].detach().mean(dim=1)
    pt = F.normalize(pt, dim=1)
    index_ = index_.squeeze(1)
    pred_ssc = torch.bmm(pt.permute(0, 2, 1), feat_main_)  # (B,N,HW)
    return F.cross_entropy(pred_ssc * T, index_, ignore_index=0)


def ssc_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three images: ids 1-3 with unsegmented pixels; 1-6 covering everything; only 2 and 5."""
    rng = np.random.default_rng(7)
    se = torch.from_numpy(rng.integers(0, 4, (3, 10, 12)))
    se[1] = torch.from_numpy(rng.integers(1, 7, (10, 12)))
    se[2] = torch.from_numpy(rng.choice([0, 2, 5], (10, 12)))
    return torch.from_numpy(rng.normal(size=(3, 5, 5, 6))).float(), se


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_ssc_loss_and_its_gradient_match_the_official_formula(T):
    feats, se = ssc_batch()
    mine = feats.clone().requires_grad_(True)
    theirs = feats.clone().requires_grad_(True)
    loss, expected = ssc_loss(mine, se, T), official_ssc(theirs, se, T)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    expected.backward()
    assert torch.allclose(mine.grad, theirs.grad, atol=1e-6)
    # Image 2 alone: ids 1, 3 and 4 absent, their zero prototypes (cosine 0) stay in the softmax.
    alone = ssc_loss(feats[2:], se[2:], T)
    assert torch.allclose(alone, official_ssc(feats[2:], se[2:], T), atol=1e-6)
    assert not torch.allclose(alone, ssc_loss(feats[2:], se[2:], T, mask_absent=True))


def test_ssc_loss_masking_option_and_a_batch_without_segments():
    segments = torch.zeros(1, 6, 6, dtype=torch.int64)
    segments[0, :, :2], segments[0, :, 2:4], segments[0, :4, 4:] = 1, 2, 3  # two pixels unsegmented
    feats = torch.nn.functional.one_hot((segments[0] - 1).clamp_min(0), 3).permute(2, 0, 1)[None].float()
    for t in (1.0, 10.0):
        # Former rule: no "no segment" prototype, so orthogonal segments reach log(1 + (N - 1) e^-t).
        masked = ssc_loss(feats, segments, t, mask_absent=True)
        assert torch.isclose(masked, torch.tensor(math.log(1 + 2 * math.exp(-t))), atol=1e-6)
        # Official: the unsegmented pixels' prototype equals segment 1's here and stays in the softmax.
        assert torch.isclose(ssc_loss(feats, segments, t), official_ssc(feats, segments, t), atol=1e-6)
        assert ssc_loss(feats, segments, t) > masked + 0.1
    noisy = torch.randn(1, 3, 6, 6, requires_grad=True)
    loss = ssc_loss(noisy, segments, 10.0)
    loss.backward()
    assert torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0
    empty = torch.randn(1, 3, 2, 2, requires_grad=True)
    zero = ssc_loss(empty, torch.zeros(1, 6, 6, dtype=torch.int64))
    zero.backward()
    assert zero == 0 and empty.grad is not None


def test_cpm_target_takes_the_more_confident_class_and_background_elsewhere():
    logits = torch.full((3, 4, 4), float("-inf"))
    logits[0] = -1.0
    logits[0, :, :3] = 2.0  # class 0: columns 0-2, logit 2
    logits[1] = -1.0
    logits[1, :, 2:] = 1.0  # class 1: columns 2-3, logit 1; class 2 not prompted
    cams = torch.zeros(3, 4, 4)
    cams[0, :, :3] = 0.1  # mean CAM 0.1 -> confidence 0.2
    cams[1, :, 2:] = 0.5  # mean CAM 0.5 -> confidence 0.5: wins the overlap (column 2)
    target = cpm_target(logits, cams, background=3)
    assert target[0].tolist() == [0, 0, 1, 1]
    logits[:, :, 3] = -5.0
    assert cpm_target(logits, cams, background=3)[0].tolist() == [0, 0, 1, 3]


def test_cpm_loss_is_lowest_when_the_cams_match_the_sam_targets():
    targets = torch.full((1, 4, 4), 2)  # K = 2 classes, 2 = background
    targets[0, :, :2] = 0
    targets[0, :2, 2:] = 1
    cams = torch.nn.functional.one_hot(targets[0], 3)[..., :2].permute(2, 0, 1)[None].float()
    labels = torch.ones(1, 2)
    best = cpm_loss(cams, labels, targets)
    assert torch.isclose(best, torch.tensor(math.log(1 + 2 / math.e)), atol=1e-4)
    swapped = cpm_loss(cams.flip(1), labels, targets)
    assert swapped > best + 0.3
    raw = torch.randn(1, 2, 2, 2, requires_grad=True)  # CAMs at feature resolution are resized
    cpm_loss(raw, labels, targets).backward()
    assert torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0


def test_multiscale_cams_zero_absent_classes_peak_at_one_and_restore_the_mode():
    model = CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random").train()
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    images = torch.randn(2, 3, 32, 32)
    cams = multiscale_cams(model, images, labels, (1.0, 0.5))
    assert model.training and cams.shape == (2, 2, 32, 32)
    model.eval()
    up = [
        torch.nn.functional.interpolate(model.cams(x), size=(32, 32), mode="bilinear").relu()
        for x in (images, torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear"))
    ]
    total = (up[0] + up[1]) * labels[..., None, None]
    assert torch.allclose(cams, total / (total.flatten(2).amax(dim=2)[..., None, None] + 1e-5), atol=1e-6)
    assert cams[0, 1].abs().sum() == 0


# -- s2c: the method in training -------------------------------------------------------------------


def s2c_method(sam: LoadedSam, domain=None, **options) -> S2C:
    settings = {
        "sam": sam,
        "cpm_start": 0.0,
        "cpm_scales": [1.0, 0.5],
        "min_peak_distance": 2,
        **EVERYTHING_FAST,
    }
    method = create_method("s2c", **{**settings, **options})
    method.setup(domain or fakes.FakeDomain(), MEAN, STD)
    return method


def two_bump_cams() -> torch.Tensor:
    """Class 1 of a 64 x 64 image: bumps at (20.3, 18.6) and (44.2, 46.5), and a weak one (0.3)."""
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
    bumps = ((20.3, 18.6, 4.0, 1.0), (44.2, 46.5, 5.0, 0.8), (12.0, 50.0, 3.0, 0.3))
    cam = sum(a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s)) for y, x, s, a in bumps)
    cams = torch.zeros(2, 64, 64)
    cams[1] = torch.from_numpy((cam / (cam.max() + 1e-5)).astype(np.float32))
    return cams


def prompt_spy(method: S2C, monkeypatch) -> tuple[object, list]:
    segmenter = method.training_segmenter(torch.device("cpu"))
    calls = []
    original = segmenter.predictor.predict_torch

    def spy(coords, labels, *args, **kwargs):
        out = original(coords, labels, *args, **kwargs)
        calls.append((coords.clone(), out[0].clone()))
        return out

    monkeypatch.setattr(segmenter.predictor, "predict_torch", spy)
    return segmenter, calls


def test_s2c_point_prompts_are_the_official_peaks_and_take_the_third_mask(tiny_sam, monkeypatch):
    method = s2c_method(tiny_sam, min_peak_distance=8)
    segmenter, calls = prompt_spy(method, monkeypatch)
    encoder = tiny_sam.model.image_encoder
    encodes = []
    monkeypatch.setattr(encoder, "forward", lambda x, f=encoder.forward: encodes.append(1) or f(x))
    setup = _TargetSetup(segmenter, method.strategy(), with_cpm=True)
    segments, scores, target = method._point_targets(
        setup, torch.rand(3, 64, 64), two_bump_cams(), torch.tensor([0.0, 1.0])
    )
    prompt_calls = [c for c in calls if c[0].shape[0] == 1]
    assert len(prompt_calls) == 1  # one prompt for class 1 holding all its peaks; class 0 absent
    # Official: the global maximum, then the peak_local_max(min_distance=8) peaks of the 3 x 3
    # max-filtered CAM above 0.5 less the first (scikit-image 0.26 gives (19, 18), (43, 45) and
    # (11, 49), the last at 0.3); the (row, col) indices flipped and scaled by size_sam / H.
    size_sam = tiny_sam.model.image_encoder.img_size
    official = np.flip(np.array([[20, 19], [43, 45]]), axis=-1) * size_sam / 64
    assert torch.allclose(prompt_calls[0][0][0], torch.from_numpy(official.copy()).float())
    third = prompt_calls[0][1][0, 2]
    expected = torch.where(
        third > 0, torch.ones_like(third, dtype=torch.int64), torch.full_like(third, 2, dtype=torch.int64)
    )
    assert torch.equal(target, expected)  # class 1 where its third mask is, background elsewhere
    assert segments.dtype == torch.bool and segments.shape[1:] == (64, 64) and len(segments) > 0
    assert scores.shape == (len(segments),)
    assert len(encodes) == 1  # prompts and everything mode share one encoder pass


def test_s2c_domain_peak_rule_restores_the_capped_relative_peaks(tiny_sam, monkeypatch):
    from wsss_domains.sam.prompts import cam_peaks

    method = s2c_method(tiny_sam, min_peak_distance=8, peak_rule="domain")
    segmenter, calls = prompt_spy(method, monkeypatch)
    cams = two_bump_cams()
    setup = _TargetSetup(segmenter, method.strategy(), with_cpm=True)
    method._point_targets(setup, torch.rand(3, 64, 64), cams, torch.tensor([0.0, 1.0]))
    strategy = fakes.FakeDomain().sam_strategy()  # peak_threshold 0.7 of the maximum, at most 4
    former = cam_peaks(cams[1], strategy.peak_threshold, 8, strategy.max_prompts_per_class)
    size_sam = tiny_sam.model.image_encoder.img_size
    assert torch.allclose(calls[0][0][0], former * size_sam / 64)  # pixel centres
    assert not torch.allclose(calls[0][0][0], torch.tensor([[19.0, 20.0], [45.0, 43.0]]) * size_sam / 64)


def test_embedding_memo_disk_cache_defaults_and_a_broken_disk(tiny_sam, tmp_path, caplog):
    from wsss_domains.methods.sam_base import LastEmbedding
    from wsss_domains.sam.cache import EmbeddingCache

    assert s2c_method(tiny_sam).training_segmenter(torch.device("cpu")).predictor.cache.disk is None
    cached = s2c_method(tiny_sam, train_cache=True, sam_cache=str(tmp_path / "c"))
    assert cached.training_segmenter(torch.device("cpu")).predictor.cache.disk.root == tmp_path / "c"
    (tmp_path / "file").write_text("not a folder")
    memo = LastEmbedding(EmbeddingCache(tmp_path / "file"))
    calls = []

    def encode(x):
        calls.append(1)
        return x * 2

    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(memo.get_or_compute("m", "c", x, encode), x * 2)  # the disk fails: computed anyway
    assert memo.disk is None and "unusable" in caplog.text
    memo.get_or_compute("m", "c", x.clone(), encode)
    assert len(calls) == 1  # the same input again: remembered
    memo.get_or_compute("m", "c", x + 1, encode)
    assert len(calls) == 2
    disk = EmbeddingCache(tmp_path / "disk")
    LastEmbedding(disk).get_or_compute("m", "c", x, encode)
    fresh = LastEmbedding(disk)  # a new run: the embedding comes from disk
    assert torch.equal(fresh.get_or_compute("m", "c", x, encode), x * 2)
    assert len(calls) == 3 and (disk.hits, disk.misses) == (1, 1)


def test_s2c_box_only_sam_uses_its_box_masks_as_segments_and_targets(tiny_sam):
    tiny_sam.supports_points = False
    method = s2c_method(tiny_sam, BoxDomain())
    segmenter = method.training_segmenter(torch.device("cpu"))
    cams = torch.zeros(2, 32, 32)
    cams[0, 2:10, 2:10] = 1.0
    cams[0, 20:30, 20:30] = 0.8
    image = torch.rand(3, 32, 32)
    setup = _TargetSetup(segmenter, method.strategy(), with_cpm=True)
    segments, scores, target = method._box_targets(setup, image, cams, torch.tensor([1.0, 0.0]))
    out = segmenter.segment(
        image, cams, BoxDomain().sam_strategy(), labels=torch.tensor([1.0, 0.0]), return_logits=True
    )
    assert out.classes.tolist() == [0, 0] and torch.equal(segments, out.masks)
    assert torch.equal(scores, out.scores)
    union = out.logits.amax(dim=0) > 0
    assert torch.equal(target, torch.where(union, 0, 2))


def quadrants(monkeypatch, method: S2C) -> None:
    """The tiny random SAM finds one segment at most; give SSC four (the quadrants) instead.

    Everything mode and box prompts return the quadrants (box logits +1 inside, -1 outside, the
    top two for class 0, the bottom two for class 1); point prompts still go to the tiny SAM.
    """
    segmenter = method.training_segmenter(torch.device("cpu"))
    original = segmenter.segment
    masks = torch.stack([box((32, 32), y, y + 16, x, x + 16) for y in (0, 16) for x in (0, 16)])

    def segment(image, cams, strategy, labels=None, return_logits=False):
        if strategy.prompt is PromptKind.POINTS:
            return original(image, cams, strategy, labels, return_logits)
        boxes = strategy.prompt is PromptKind.BOXES
        classes = torch.tensor([0, 0, 1, 1]) if boxes else torch.full((4,), -1)
        logits = torch.where(masks, 1.0, -1.0) if return_logits else None
        return SamMasks(masks, torch.ones(4), classes, strategy.prompt, 2 if boxes else 0, logits)

    monkeypatch.setattr(segmenter, "segment", segment)


@pytest.mark.parametrize("points", [True, False], ids=["everything+points", "boxes"])
def test_s2c_losses_are_finite_and_reach_the_backbone_and_head(tiny_sam, points, monkeypatch):
    tiny_sam.supports_points = points
    method = s2c_method(tiny_sam, None if points else BoxDomain())
    quadrants(monkeypatch, method)
    model = CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random").train()
    with torch.no_grad():  # CAMs with some positive evidence, so that there is something to prompt
        model.head.weight.abs_()
    images = (torch.rand(2, 3, 32, 32) - 0.5) / 0.25
    batch = {"image": images, "label": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    losses = method.training_losses(model, nn.ModuleDict(), batch, model(images))
    assert set(losses) == {"ssc", "cpm"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    losses["ssc"].backward(retain_graph=True)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert (
        model.head.weight.grad is None or model.head.weight.grad.abs().sum() == 0
    )  # SSC shapes features only
    losses["cpm"].backward()
    assert model.head.weight.grad.abs().sum() > 0
    late = s2c_method(tiny_sam, None if points else BoxDomain(), cpm_start=0.5)
    quadrants(monkeypatch, late)
    warm = late.training_losses(
        model, nn.ModuleDict(), {**batch, "progress": torch.tensor(0.1)}, model(images)
    )
    assert warm["cpm"] == 0 and warm["ssc"] > 0  # CPM waits for its share of the budget


def test_two_s2c_training_steps_through_the_classifier_task(tiny_sam, tmp_path):
    tiny_sam.supports_points = False  # LiteMedSAM-like
    root = fakes.write_shapes(tmp_path / "data", n_train=4, n_val=1, n_unlabelled=0)
    method = s2c_method(tiny_sam, BoxDomain())
    model = CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = ClassifierTask(model, method, lr=1e-2)
    view = TrainingView(fakes.build(root, "train"), BoxDomain(), (32, 32), MEAN, STD, augment=True)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, DataLoader(view, batch_size=2, shuffle=True))
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/ssc"]) and torch.isfinite(metrics["train/cpm"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- end to end through the pseudo-label entry point -------------------------------------------------


@pytest.mark.parametrize("name", ["sepl", "sam-proto", "s2c"])
def test_pseudo_label_split_with_each_sam_method(tiny_sam, tmp_path, name):
    root = fakes.write_shapes(tmp_path / "data", n_train=1, n_val=2, n_unlabelled=0)
    run = tmp_path / "run"
    RunConfig(
        domain=fakes.FAKE_DOMAIN, dataset=fakes.DATASET, classes=list(fakes.LABEL_SPACE.classes),
        foreground=list(fakes.LABEL_SPACE.foreground_names), backbone=fakes.FAST_BACKBONE,
        weights="random", image_size=[32, 32], mean=MEAN, std=STD, method=name,
    ).save(run)  # fmt: skip
    torch.manual_seed(0)
    save_model(CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random"), nn.ModuleDict(), run)
    options = {"sam": tiny_sam, "sam_cache": str(tmp_path / "cache"), **EVERYTHING_FAST}
    summary = pseudo_label_split(
        run,
        None,
        None,
        root,
        "val",
        tmp_path / "pl",
        options=options,
        cam=CamSettings(scales=(1.0,)),
        overlays=False,
    )
    assert summary.written == 2
    for k in range(2):
        labels = read_index_mask(tmp_path / "pl" / f"val_{k:02d}.png")
        assert labels.shape == (32, 32) and set(labels.flatten().tolist()) <= {0, 1, 2}
    assert list((tmp_path / "cache").rglob("*.pt"))


def test_threshold_background_label_space_is_passed_to_sepl(tiny_sam):
    # A label space with background decided by threshold: SEPL must know its background class.
    space = LabelSpace(
        classes=("x", "bg", "y"),
        palette=((1, 1, 1),) * 3,
        background_mode=BackgroundMode.THRESHOLD,
        background_index=1,
    )
    labels = torch.full((8, 8), 1)
    labels[3:5, 3:5] = 2
    method = create_method("sepl", sam_cache="none")
    with_masks(method, tiny_sam, box((8, 8), 2, 6, 2, 6)[None])  # 16 px, 12 of them background
    out = method.refine_labels(
        labels,
        torch.rand(2, 8, 8),
        RefineContext.of(torch.rand(3, 8, 8), torch.ones(2), fakes.FakeDomain(), space),
    )
    assert torch.equal(out[2:6, 2:6], torch.full((4, 4), 2))
