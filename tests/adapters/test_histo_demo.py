"""The synthetic WSSS4LUAD-layout demo set: layout, determinism, labels, no regeneration."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from wsss_adapters.histo import HistoDomain
from wsss_adapters.histo.demo import N_TRAIN, N_VAL


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[str, Path, float]:
    start = time.process_time()  # CPU time: the wall clock depends on who else shares the machine
    demo = HistoDomain().demo(tmp_path_factory.mktemp("demo"))
    assert (demo.train_split, demo.eval_split, demo.image_size) == ("training", "validation", 128)
    return demo.dataset, demo.root, time.process_time() - start


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_layout_and_labels(demo):
    name, path, seconds = demo
    assert name == "wsss4luad" and path.name == "WSSS4LUAD-demo"
    assert seconds < 5.0
    assert "SYNTHETIC" in (path / "README.txt").read_text()
    domain = HistoDomain()
    spec = domain.detect_dataset(path)
    assert spec.name == "wsss4luad"
    train = spec.build(path, "training")
    assert len(train) == N_TRAIN
    labels = torch.stack([train[i]["label"] for i in range(len(train))])
    assert train[0]["image"].shape == (3, 128, 128)
    assert bool((labels.sum(1) >= 1).all())
    assert bool((labels.sum(0) >= N_TRAIN // 4).all())  # every class well represented
    assert len({tuple(r) for r in labels.tolist()}) >= 5  # single- and multi-class patches
    val = spec.build(path, "validation")
    assert len(val) == N_VAL
    colours = {c: [] for c in range(3)}
    for i in range(len(val)):
        s = val[i]
        assert 192 <= s["image"].shape[1] <= 256 and 192 <= s["image"].shape[2] <= 256
        assert set(s["mask"].unique().tolist()) <= {0, 1, 2, 255}
        assert torch.equal(s["exclude"], s["mask"] == 255)
        assert int(s["label"].sum()) >= 2
        for c in range(3):
            if (s["mask"] == c).any():
                colours[c].append(s["image"][:, s["mask"] == c].mean(1))
        # The domain's white-region hook finds the demo's glass.
        found = domain.exclude_mask(s["image"], spec.label_space)
        assert (found ^ s["exclude"]).float().mean() < 0.02
    tumor, stroma, normal = (torch.stack(colours[c]).mean(0) for c in range(3))
    assert tumor.mean() < stroma.mean() - 0.05 and tumor.mean() < normal.mean() - 0.05  # dense nuclei
    assert float((stroma - normal).abs().max()) > 0.04  # distinguishable by colour alone


def test_demo_is_deterministic_complete_and_not_regenerated(demo, tmp_path):
    _, path, _ = demo
    again = HistoDomain().demo(tmp_path).root
    assert _files(again) == _files(path)  # same bytes from a fresh run
    stamp = {p: p.stat().st_mtime_ns for p in path.rglob("*.png")}
    same = HistoDomain().demo(path.parent).root
    assert same == path and {p: p.stat().st_mtime_ns for p in path.rglob("*.png")} == stamp
    next((again / "2.validation" / "mask").iterdir()).unlink()  # an incomplete copy ...
    HistoDomain().demo(tmp_path)
    assert _files(again) == _files(path)  # ... is regenerated
