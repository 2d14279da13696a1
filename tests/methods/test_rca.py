"""RCA against its defining formulas (maeve07/RCA, models/rca.py and train.py), then training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from method_training import changed, cli_train_and_pseudo_label, train_steps

import wsss_domains.training.fit  # noqa: F401  (Lightning's log handler must see stderr first)
from wsss_domains.methods import create_method
from wsss_domains.methods.rca import (
    RefinedCamExtractor,
    RegionMemory,
    RegionMix,
    SemanticAggregation,
    draw_mixes,
    kmeans,
    memory_contrast,
    rca_contrast,
    region_embedding,
    region_mask,
)


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_region(features: np.ndarray, coarse: np.ndarray, cls: int) -> np.ndarray:
    """rca.py: ``mask = softmax(map)[c] > mean``; ``(x * mask).sum / mask.sum`` per channel."""
    soft = np_softmax(coarse, 0)[cls]
    mask = (soft > soft.mean()).astype(np.float64)
    return (features * mask).reshape(features.shape[0], -1).sum(1) / mask.sum()


def np_closs(anchor: np.ndarray, memory: np.ndarray, positive: int, t: float) -> float:
    """rca.py's closs_1 for one anchor, line by line."""
    classes, length, _ = memory.shape
    x = anchor / max(np.linalg.norm(anchor), 1e-12)
    flat = memory.reshape(classes * length, -1)
    feat_neg = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    logit_neg = feat_neg @ x / t
    max_log = logit_neg.max()
    exp_logit_neg = np.exp(logit_neg - max_log)
    label_q = np.repeat(np.arange(classes), length)
    queue = memory[positive]
    feat_pos = queue / np.maximum(np.linalg.norm(queue, axis=1, keepdims=True), 1e-12)
    logit_pos = feat_pos @ x / t - max_log
    exp_logit_pos = np.exp(logit_pos)
    l_neg = (exp_logit_neg * (label_q != positive)).sum()
    return float((-(logit_pos - np.log(np.maximum(l_neg + exp_logit_pos, 1e-4)))).mean())


def test_region_mask_and_embedding_by_hand():
    coarse = torch.tensor([[[2.0, 0.0], [1.0, -1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    features = torch.arange(8.0).view(2, 2, 2)
    for cls in (0, 1):
        soft = np_softmax(coarse.numpy().astype(np.float64), 0)[cls]
        np.testing.assert_array_equal(region_mask(coarse, cls).numpy(), soft > soft.mean())
        np.testing.assert_allclose(
            region_embedding(features, region_mask(coarse, cls)).numpy(),
            np_region(features.numpy().astype(np.float64), coarse.numpy().astype(np.float64), cls),
            rtol=1e-6,
        )


def test_contrast_keeps_one_copy_of_the_bank_for_backward():
    """Autograd must not keep a normalised copy of the bank per region: on COCO (80 classes x 500
    entries x 1280 channels) those copies filled 24 GB within two minutes."""
    gen = torch.Generator().manual_seed(2)
    mid = torch.randn(4, 8, 3, 3, generator=gen, requires_grad=True)
    coarse = torch.randn(4, 5, 3, 3, generator=gen)
    memory = torch.randn(5, 40, 8, generator=gen)
    mixes = [RegionMix(i, c, (i + 1) % 4, (c + 1) % 5, 0.5) for i in range(4) for c in range(3)]
    bank_sized = []

    def pack(saved: torch.Tensor) -> torch.Tensor:
        if saved.numel() == memory.numel():
            bank_sized.append(saved)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        loss = rca_contrast(mid, coarse, memory, mixes, 0.07)
    assert len({t.untyped_storage().data_ptr() for t in bank_sized}) == 1  # 24 copies before
    loss.backward()
    assert mid.grad is not None and mid.grad.abs().sum() > 0


def test_memory_contrast_is_the_official_closs():
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    anchor = torch.randn(4, generator=gen, dtype=torch.float64)
    for positive in range(3):
        got = float(memory_contrast(anchor, memory, positive, 0.07))
        assert got == pytest.approx(np_closs(anchor.numpy(), memory.numpy(), positive, 0.07), rel=1e-9)


def test_contrast_of_fixed_mixes_is_the_official_loop():
    gen = torch.Generator().manual_seed(1)
    mid = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    coarse = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64)
    memory = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    mixes = [RegionMix(0, 0, 1, 2, 0.3), RegionMix(0, 1, 0, 0, 0.6), RegionMix(1, 2, 0, 1, 0.5)]
    got = float(rca_contrast(mid, coarse, memory, mixes, 0.07))
    m, c, mem = mid.numpy(), coarse.numpy(), memory.numpy()
    per_image: dict[int, list[float]] = {}
    for mix in mixes:
        x = np_region(m[mix.image], c[mix.image], mix.cls) * mix.lam + (1 - mix.lam) * np_region(
            m[mix.partner], c[mix.partner], mix.partner_cls
        )
        loss = mix.lam * np_closs(x, mem, mix.cls, 0.07) + (1 - mix.lam) * np_closs(
            x, mem, mix.partner_cls, 0.07
        )
        per_image.setdefault(mix.image, []).append(loss)
    expected = sum(sum(v) / len(v) for v in per_image.values())  # mean over classes, summed over the batch
    assert got == pytest.approx(expected, rel=1e-9)


def test_memory_update_moves_the_pointed_slot_with_momentum_and_skips_unsure_classes():
    memory = RegionMemory(num_classes=2, dim=2, length=2, clusters=1)
    memory.queue.zero_()
    features = torch.tensor([[[[1.0, 3.0]], [[2.0, 6.0]]]])  # 1 x 2 x 1 x 2
    coarse = torch.tensor([[[[0.0, 5.0]], [[0.0, 0.0]]]])  # class 0 wins on the right pixel only
    labels = torch.tensor([[1.0, 1.0]])
    memory.update(features, coarse, labels, torch.tensor([[0.9, 0.5]]), momentum=0.75, threshold=0.7)
    torch.testing.assert_close(memory.queue[0, 0], torch.tensor([3.0, 6.0]) * 0.25)
    assert int(memory.pointer[0]) == 1 and int(memory.pointer[1]) == 0  # class 1 at 0.5 <= 0.7: skipped
    assert torch.equal(memory.queue[1], torch.zeros(2, 2))
    memory.update(features, coarse, labels, torch.tensor([[0.9, 0.5]]), momentum=0.75, threshold=0.7)
    memory.update(features, coarse, labels, torch.tensor([[0.9, 0.5]]), momentum=0.75, threshold=0.7)
    assert int(memory.pointer[0]) == 1  # wrapped: slots 0, 1, then 0 again
    torch.testing.assert_close(memory.queue[0, 0], torch.tensor([3.0, 6.0]) * (0.25 * 0.75 + 0.25))


def test_aggregation_is_the_official_formula():
    torch.manual_seed(0)
    module = SemanticAggregation(channels=3, scale=2.0).double()
    for conv in (module.query, module.aggregate, module.project):
        torch.nn.init.normal_(conv.weight)  # the official N(0, 0.01) start would hide mistakes
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    centres = torch.randn(4, 3, dtype=torch.float64)
    got = module(x, centres).detach()
    W = {n: p.detach().numpy() for n, p in module.named_parameters()}
    xs = x.numpy()[0].reshape(3, -1).T  # hw x C
    q = xs @ W["query.weight"][:, :, 0, 0].T + W["query.bias"]
    k = centres.numpy() @ W["key.weight"].T + W["key.bias"]
    v = centres.numpy() @ W["value.weight"].T + W["value.bias"]
    context = (q @ k.T / 10 * 20) @ v  # rca.py with cluter_num = 10
    aggregated = context @ W["aggregate.weight"][:, :, 0, 0].T + W["aggregate.bias"]
    out = np.concatenate([xs, aggregated], axis=1) @ W["project.weight"][:, :, 0, 0].T + W["project.bias"]
    np.testing.assert_allclose(got[0].numpy().reshape(3, -1).T, out, rtol=1e-9)


def test_kmeans_finds_the_centres_of_separated_blobs():
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([m + 0.1 * torch.randn(20, 2, generator=gen) for m in means])
    centres = kmeans(points, 3, torch.Generator().manual_seed(3))
    expected = torch.stack([points[i * 20 : (i + 1) * 20].mean(0) for i in range(3)])
    order = torch.cdist(expected, centres).argmin(dim=1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(centres[order], expected)


def test_draw_mixes_pairs_each_present_class_with_a_present_class_of_some_image():
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # image 2: no class
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(30):
        mixes = draw_mixes(labels, 8.0, rng)
        assert [(m.image, m.cls) for m in mixes] == [(0, 0), (0, 2), (1, 1)]
        for m in mixes:
            if m.lam == 1.0:  # the drawn partner had no class: the region stays unmixed
                assert (m.partner, m.partner_cls) == (m.image, m.cls)
            else:
                assert 0 < m.lam < 1 and labels[m.partner, m.partner_cls] == 1
            kinds.add(m.lam == 1.0)
    assert kinds == {True, False}


def test_two_training_steps_train_the_refined_branch_and_fill_the_bank():
    method = create_method("rca", warm_up=0.0, cluster_every=1, queue_length=4, clusters=2, momentum=0.0,
                           enqueue_threshold=0.0)  # fmt: skip
    task, logged, initial = train_steps(method)
    assert math.isfinite(logged["train/contrast"]) and math.isfinite(logged["train/coarse_cls"])
    for part in ("aggregation", "head", "mid"):
        assert changed(task, initial, part), part
    assert not torch.equal(task.method_modules["memory"].queue, initial["memory.queue"])
    assert not torch.equal(task.method_modules["memory"].centres, initial["memory.centres"])  # re-clustered
    extractor = method.extractor(task.model, task.method_modules, scales=(1.0,))
    assert isinstance(extractor, RefinedCamExtractor)
    cams = extractor(torch.randn(3, 32, 40))
    assert cams.shape == (2, 32, 40) and float(cams.min()) >= 0 and float(cams.max()) <= 1


def test_rca_rejects_bad_options():
    with pytest.raises(ValueError):
        create_method("rca", clusters=20, queue_length=10)
    with pytest.raises(ValueError):
        create_method("rca", momentum=1.0)


def test_trained_bank_is_saved_with_the_run_and_pseudo_labels_use_it(capsys, tmp_path: Path):
    from wsss_domains.training.run import METHOD_FILE, load_run

    options = ["--method-option", "cluster_every=2", "--method-option", "queue_length=4"]
    options += ["--method-option", "clusters=2", "--method-option", "momentum=0"]
    run, out = cli_train_and_pseudo_label(capsys, tmp_path, "rca", *options)
    saved = torch.load(run / METHOD_FILE)
    _, _, modules = load_run(run)
    assert torch.equal(modules["memory"].centres, saved["memory.centres"])  # the bank travels with the run
    assert "pseudo-labels: 3 written" in out
