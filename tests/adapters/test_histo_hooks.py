"""Hooks of the histo plugin: white-region detection, augmentation, scoring, prompts, SAM."""

from __future__ import annotations

import pytest
import torch
from wsss_adapters.histo import HistoDomain
from wsss_adapters.histo.augment import histo_augment
from wsss_adapters.histo.background import white_mask

from wsss_domains.domains.contract import BackgroundMode, LabelSpace, PromptKind

PINK = (0.90, 0.55, 0.72)  # eosin-stained tissue
PALE_PINK = (0.94, 0.76, 0.87)  # light tissue: bright but tinted, must not count as glass
GLASS = (0.96, 0.96, 0.95)


def _image(h: int, w: int, rgb: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(rgb).view(3, 1, 1).expand(3, h, w).clone()


def _paint(img: torch.Tensor, ys: slice, xs: slice, rgb: tuple[float, float, float]) -> None:
    img[:, ys, xs] = torch.tensor(rgb).view(3, 1, 1)


@pytest.fixture(scope="module")
def domain() -> HistoDomain:
    return HistoDomain()


def test_white_mask_on_synthetic_slide():
    img = _image(64, 64, PINK)
    _paint(img, slice(0, 64), slice(40, 64), GLASS)  # glass on the right
    _paint(img, slice(30, 32), slice(50, 52), PINK)  # 2x2 tissue speck inside glass: closed
    _paint(img, slice(10, 11), slice(10, 11), GLASS)  # isolated bright pixel in tissue: opened away
    _paint(img, slice(40, 60), slice(5, 25), PALE_PINK)  # pale tissue stays tissue
    mask = white_mask(img)
    assert mask.shape == (64, 64) and mask.dtype == torch.bool
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[:, 40:] = True
    assert torch.equal(mask, expected)
    batch = white_mask(torch.stack([img, _image(64, 64, GLASS)]))
    assert batch.shape == (2, 64, 64) and torch.equal(batch[0], expected) and bool(batch[1].all())
    as_bytes = white_mask((img * 255).round().to(torch.uint8))
    assert torch.equal(as_bytes, expected)
    with pytest.raises(ValueError, match="3xHxW"):
        white_mask(torch.zeros(1, 8, 8))


def test_exclude_mask_only_where_background_is_glass(domain):
    img = _image(32, 32, PINK)
    _paint(img, slice(0, 32), slice(0, 10), GLASS)
    for name in ("wsss4luad", "luad-histoseg"):
        mask = domain.exclude_mask(img, domain.dataset(name).label_space)
        assert mask is not None and bool(mask[:, :10].all()) and not bool(mask[:, 10:].any())
    assert domain.exclude_mask(img, domain.dataset("bcss-wsss").label_space) is None  # white = fat
    assert domain.exclude_mask(img, domain.dataset("glas").label_space) is None  # threshold mode
    other = LabelSpace(("a", "b"), ((1, 1, 1), (2, 2, 2)), background_mode=BackgroundMode.EXCLUDE)
    assert domain.exclude_mask(img, other) is not None


def test_train_augment_moves_masks_with_image(domain):
    mask = torch.zeros(16, 16, dtype=torch.int64)
    mask[2:6, 3:12] = 1
    image = torch.zeros(3, 16, 16)
    image[0] = (mask == 1).float()
    sample = {"image": image, "mask": mask, "exclude": mask == 1, "label": torch.tensor([1.0]), "id": "x"}
    seen = set()
    torch.manual_seed(0)
    for _ in range(64):
        out = domain.train_augment(sample)
        assert torch.equal(out["mask"] == 1, out["exclude"])
        assert torch.equal(out["image"][0] > 0.5, out["exclude"])  # jitter keeps it well apart
        assert torch.equal(out["label"], sample["label"]) and out["id"] == "x"
        assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
        seen.add(tuple(torch.nonzero(out["mask"]).min(0).values.tolist() + [out["mask"].sum().item()]))
    assert len(seen) == 8  # all flips and quarter turns of an asymmetric square
    assert torch.equal(sample["mask"], mask)  # input untouched


def test_train_augment_keeps_shape_of_non_square():
    g = torch.Generator().manual_seed(1)
    sample = {"image": torch.rand(3, 10, 14), "label": torch.ones(3), "id": "r"}
    shapes = {histo_augment(sample, generator=g)["image"].shape for _ in range(32)}
    assert shapes == {torch.Size([3, 10, 14])}


def test_scored_classes(domain):
    assert domain.scored_classes(domain.dataset("wsss4luad").label_space) == (0, 1, 2)
    assert domain.scored_classes(domain.dataset("luad-histoseg").label_space) == (0, 1, 2, 3)
    assert domain.scored_classes(domain.dataset("glas").label_space) == (0, 1)
    with_bg = LabelSpace(("bg", "t"), ((0, 0, 0), (9, 9, 9)), BackgroundMode.EXCLUDE, background_index=0)
    assert domain.scored_classes(with_bg) == (1,)


def test_clip_prompts_from_json(domain):
    luad = domain.clip_prompts(domain.dataset("wsss4luad").label_space)
    assert list(luad.class_names) == ["tumor", "stroma", "normal"]
    assert "tumour epithelium" in luad.class_names["tumor"]
    assert all("{}" in t for t in luad.templates) and "white background" in luad.background
    glas = domain.clip_prompts(domain.dataset("glas").label_space)
    assert list(glas.class_names) == ["gland"]  # background is decided by threshold
    assert "stroma" in glas.background
    for name in ("luad-histoseg", "bcss-wsss"):
        prompts = domain.clip_prompts(domain.dataset(name).label_space)
        assert set(prompts.class_names) == set(domain.dataset(name).label_space.classes)
        assert all(len(v) >= 2 for v in prompts.class_names.values())
    unknown = LabelSpace(("mucin_pool",), ((5, 5, 5),))
    assert domain.clip_prompts(unknown).class_names == {"mucin_pool": ("mucin pool",)}


def test_sam_strategy_and_defaults(domain):
    sam = domain.sam_strategy()
    assert sam.prompt is PromptKind.BOXES and sam.model == "lite_medsam"
    img = torch.rand(3, 8, 8)
    assert domain.preprocess(img) is img  # stain normalisation is opt-in


def test_hed_jitter_scales_each_stain_concentration():
    from wsss_adapters.histo.augment import _RGB_FROM_HED, hed_jitter

    rgb = torch.rand(3, 4, 5) * 0.9 + 0.05
    assert torch.allclose(hed_jitter(rgb, torch.ones(3), torch.zeros(3)), rgb, atol=1e-5)
    # A pixel of pure haematoxylin at concentration 0.5 (Beer-Lambert: rgb = exp(-c * h)) becomes
    # concentration 0.5 * 1.2 + 0.1 = 0.7 when H is scaled by 1.2 and shifted by 0.1; eosin untouched.
    h = _RGB_FROM_HED[0]
    pixel = torch.exp(-0.5 * h)[:, None, None].expand(3, 2, 2)
    out = hed_jitter(pixel, torch.tensor([1.2, 0.7, 1.0]), torch.tensor([0.1, 0.0, 0.0]))
    assert torch.allclose(out, torch.exp(-0.7 * h)[:, None, None].expand(3, 2, 2), atol=1e-5)
