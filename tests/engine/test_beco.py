"""BECO (Rong et al., CVPR 2023): its confidence masks, boundaries, ClassMix and losses against the
official code's definitions (``first-stage/irn/gen_mask.py``, ``datasets/transforms/imgmix.py``,
``models/train_beco.py``), recomputed here with NumPy; then a co-trained pair end to end."""

from __future__ import annotations

import json
from pathlib import Path

import fakes
import numpy as np
import pytest
import torch
from fakes import fake_domain  # noqa: F401  (the module's fixture)
from torch import nn

import wsss_domains.training.fit  # noqa: F401  (Lightning's log handler must see stderr first)
from wsss_domains.cli import main
from wsss_domains.data.io import DataError
from wsss_domains.segmentation.beco import (
    BecoOptions,
    CoTrainedPair,
    beco_loss,
    class_mix,
    confidence_mask,
    decode_confidence,
    encode_confidence,
    region_boundary,
)
from wsss_domains.segmentation.data import PseudoLabelledDataset
from wsss_domains.segmentation.model import load_segmenter

IGNORE = 255


pytestmark = pytest.mark.usefixtures("fake_domain")


def gen_mask_reference(scores: np.ndarray, pred: np.ndarray, thd: float = 0.5) -> np.ndarray:
    """gen_mask.py: per predicted class, the top ``len // (1 / thd)`` pixels by top-1 minus top-2 score."""
    a = scores.copy()
    top1 = a.max(0)
    a[a == top1] = 0
    margin = top1 - a.max(0)
    mask = np.zeros(pred.shape)
    for key in np.unique(pred):
        rows, cols = np.nonzero(pred == key)
        order = np.argsort(-margin[rows, cols], kind="stable")[: int(len(rows) // (1 / thd))]
        mask[rows[order], cols[order]] = 1
    return mask.astype(bool)


def test_confident_pixels_are_each_class_half_with_the_widest_score_margin():
    rng = np.random.default_rng(0)
    scores = rng.random((3, 9, 11)).astype(np.float32)
    labels = scores.argmax(0)
    labels[0, :5] = 2  # pixels labelled against their scores (as a refinement may): still ranked by margin
    expected = gen_mask_reference(scores, labels)
    got = confidence_mask(torch.from_numpy(scores), torch.from_numpy(labels), IGNORE)
    assert np.array_equal(got.numpy(), expected)
    for k in range(3):  # floor(n / 2) pixels of every class
        assert int(got[torch.from_numpy(labels) == k].sum()) == int((labels == k).sum()) // 2
    with_ignore = torch.from_numpy(labels).clone()
    with_ignore[3] = IGNORE
    assert not confidence_mask(torch.from_numpy(scores), with_ignore, IGNORE)[3].any()
    one = torch.tensor([[[0.1, 0.9, 0.5, 0.7]]])  # a single class: ranked by its own score
    assert confidence_mask(one, torch.zeros(1, 4, dtype=torch.long), IGNORE).tolist() == [
        [False, True, False, True]
    ]


def test_confidence_travels_in_the_target_ids_and_comes_back():
    labels = torch.tensor([[0, 1, 2, IGNORE]])
    confident = torch.tensor([[True, False, True, False]])
    target = encode_confidence(labels, confident, 3, IGNORE)
    assert target.tolist() == [[0, 4, 2, IGNORE]]
    back, conf = decode_confidence(target, 3, IGNORE)
    assert back.tolist() == labels.tolist() and conf.tolist() == [[True, False, True, False]]


def naive_boundary(region: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's dilate minus erode with a (2 size + 1) square; the border does not take part."""
    h, w = region.shape
    out = np.zeros_like(region, dtype=float)
    for y in range(h):
        for x in range(w):
            window = region[max(0, y - size) : y + size + 1, max(0, x - size) : x + size + 1]
            out[y, x] = window.max() - window.min()
    return out


@pytest.mark.parametrize("size", [1, 2])
def test_the_pasted_region_boundary_is_dilation_minus_erosion(size: int):
    rng = np.random.default_rng(size)
    region = (rng.random((12, 10)) > 0.6).astype(np.float32)
    region[2:8, 3:9] = 1
    got = region_boundary(torch.from_numpy(region)[None], size)[0].numpy()
    assert np.array_equal(got, naive_boundary(region, size))
    assert not region_boundary(torch.ones(1, 5, 5), size).any()  # a constant region has no boundary


def naive_ce(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-pixel cross-entropy of ``B x K x H x W`` logits against ``B x H x W`` ids."""
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    b, _, h, w = logits.shape
    bi, yi, xi = np.meshgrid(np.arange(b), np.arange(h), np.arange(w), indexing="ij")
    return -log_probs[bi, target, yi, xi]


def test_the_four_loss_terms_follow_train_beco():
    torch.manual_seed(0)
    l1, l2 = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = IGNORE
    confident = torch.rand(2, 4, 5) > 0.5
    boundary = (torch.rand(2, 4, 5) > 0.7).float()
    options = BecoOptions(boundary_weight_1=0.2, boundary_weight_2=0.5)
    terms = beco_loss(l1, l2, labels, confident, boundary, options, IGNORE)
    n1, n2 = l1.numpy(), l2.numpy()
    lab, conf, bdry = labels.numpy(), confident.numpy(), boundary.numpy()
    assigned = lab != IGNORE
    safe = np.where(assigned, lab, 0)
    conf_w = (conf & assigned).astype(float)
    unsure_w = (~conf & assigned).astype(float)
    expected = {
        "ce_1": (naive_ce(n1, safe) * conf_w * (1 + 0.2 * bdry)).mean(),
        "ce_2": (naive_ce(n2, safe) * conf_w * (1 + 0.5 * bdry)).mean(),
        "cot_1": (naive_ce(n1, n2.argmax(1)) * unsure_w).mean(),
        "cot_2": (naive_ce(n2, n1.argmax(1)) * unsure_w).mean(),
    }
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5), name


def test_class_mix_pastes_half_the_partners_classes_with_their_targets():
    # Sample i's image is the constant i, so every output pixel says which crop it came from.
    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 8, 8).clone()
    labels = torch.zeros(4, 8, 8, dtype=torch.long)
    for i in range(4):
        labels[i, :, : 2 * (i + 1)] = 1  # classes 0 and 1 in every crop, split at different columns
    labels[:, 0, 0] = IGNORE
    confident = torch.rand(4, 8, 8) > 0.5
    always = BecoOptions(mix_probability=1.0)
    generator = torch.Generator().manual_seed(3)
    mixed, mlabels, mconf, bdry = class_mix(images, labels, confident, always, IGNORE, generator=generator)
    partners = [2, 0, 3, 1]  # (0, 2) and (1, 3), both ways, in the official order
    downs = [0, 2, 1, 3]
    for out, (down, up) in enumerate(zip(downs, partners, strict=True)):
        pasted = mixed[out, 0] == up
        assert bool(((mixed[out, 0] == down) | pasted).all())
        # one of the partner's two classes (ceil(2 / 2)), all its pixels, never its ignored ones
        classes = labels[up][pasted].unique().tolist()
        assert len(classes) == 1 and bool((pasted == (labels[up] == classes[0])).all())
        assert torch.equal(mlabels[out], torch.where(pasted, labels[up], labels[down]))
        assert torch.equal(mconf[out], torch.where(pasted, confident[up], confident[down]))
    assert not bdry.any()  # warm-up: no boundary weighting
    online_labels = 1 - labels.clamp_max(1)
    online_conf = torch.ones_like(confident)
    mixed, mlabels, mconf, bdry = class_mix(
        images, labels, confident, always, IGNORE, online=(online_labels, online_conf), generator=generator
    )
    for out, (down, up) in enumerate(zip(downs, partners, strict=True)):
        pasted = mixed[out, 0] == up
        assert bool(pasted.any())  # the online labels hold both classes: always something to paste
        assert np.array_equal(bdry[out].numpy(), naive_boundary(pasted.numpy().astype(float), 1))
        # the whole mixed crop learns the online labels, confident everywhere here
        assert torch.equal(mlabels[out], torch.where(pasted, online_labels[up], online_labels[down]))
    assert bool(mconf.all())
    never = BecoOptions(mix_probability=0.0)
    same = class_mix(images, labels, confident, never, IGNORE, online=(online_labels, online_conf))
    assert torch.equal(same[0], images[downs]) and torch.equal(same[1], labels[downs])


def test_a_co_trained_pair_learns_its_targets_and_predicts_their_mean():
    torch.manual_seed(0)
    first, second = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
    pair = CoTrainedPair(first, second)
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(pair(x), (first(x) + second(x)) / 2)
    labels = (x[:, 0] > 0).long()
    confident = torch.rand(4, 8, 8) > 0.3
    optimiser = torch.optim.SGD(pair.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        terms = beco_loss(first(x), second(x), labels, confident, torch.zeros(4, 8, 8), BecoOptions(), IGNORE)
        loss = sum(terms.values())
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_beco_needs_the_pseudo_labels_cams(tmp_path: Path):
    root = fakes.write_shapes(tmp_path / "data", n_train=2)
    base = fakes.build(root, "train")
    pl = tmp_path / "pl"
    pl.mkdir()
    from wsss_domains.data.io import save_palette_png
    from wsss_domains.evaluation.evaluate import pred_filename

    for i in range(len(base)):
        fake = np.zeros(base[i]["mask"].shape, dtype=np.uint8)
        save_palette_png(pl / pred_filename(base[i]["id"]), fake, fakes.LABEL_SPACE.flat_palette())
    with pytest.raises(DataError, match="pseudo-labels --save-cams"):
        PseudoLabelledDataset(base, pl, fakes.LABEL_SPACE, confidence=True)


FAST = ["--backbone", fakes.FAST_BACKBONE, "--weights", "random", "--image-size", "32", "--batch-size", "2"]
FAST += ["--max-steps", "2", "--device", "cpu", "--no-progress"]


def test_segment_with_beco_trains_a_pair_from_cams_that_predict_can_use(tmp_path: Path):
    root = fakes.write_shapes(tmp_path / "data", n_train=4, n_val=2)
    run, pl, seg, pred = tmp_path / "run", tmp_path / "pl", tmp_path / "seg", tmp_path / "pred"
    assert main(["train", "--domain", fakes.FAKE_DOMAIN, "--data", str(root), "--out", str(run), *FAST]) == 0
    args = ["pseudo-labels", "--run", run, "--data", root, "--split", "train", "--out", pl, "--save-cams"]
    assert main([str(a) for a in [*args, "--no-progress"]]) == 0
    dataset = PseudoLabelledDataset(fakes.build(root, "train"), pl, fakes.LABEL_SPACE, confidence=True)
    target = dataset[0]["mask"]
    k = fakes.LABEL_SPACE.num_classes
    assert bool((target >= k).any()) and bool(((target < k) | (target == IGNORE)).any())  # both kinds
    args = ["segment", "--run", run, "--pseudo-labels", pl, "--data", root, "--split", "train", "--out", seg]
    args += ["--arch", "fpn", "--encoder-weights", "random", "--seg-batch-size", "4", "--max-steps", "3"]
    assert main([str(a) for a in [*args, "--seg-training", "beco", "--device", "cpu", "--no-progress"]]) == 0
    assert json.loads((seg / "segmenter.json").read_text())["training"] == "beco"
    log = (seg / "logs" / "metrics.csv").read_text()
    assert all(f"train/{term}" in log for term in ("ce_1", "ce_2", "cot_1", "cot_2"))
    _, model = load_segmenter(seg)
    assert isinstance(model, CoTrainedPair)
    args = ["predict", "--model", seg, "--data", root, "--split", "val", "--out", pred, "--runtime", "onnx"]
    assert main([str(a) for a in [*args, "--device", "cpu", "--no-progress"]]) == 0
    assert len(list(pred.glob("*.png"))) == 2
