"""Smoke test of the histo loaders on the real development data (skips when it is absent)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset
from wsss_adapters.histo import HistoDomain

from wsss_domains.data.patches import PatchDataset

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def domain() -> HistoDomain:
    return HistoDomain()


def test_wsss4luad_real(shared_data, domain):
    root = shared_data / "histo" / "WSSS4LUAD"
    spec = domain.detect_dataset(root)
    assert spec.name == "wsss4luad"
    train = spec.build(root, "training")
    labels = {train[i]["id"]: train[i]["label"].tolist() for i in range(len(train))}
    assert len(labels) == 4 and labels["436219-9328-56427-[1, 1, 0]"] == [1.0, 1.0, 0.0]
    assert labels["449636-23526-9666-[0, 0, 1]"] == [0.0, 0.0, 1.0]
    val = spec.build(root, "validation")
    assert len(val) == 31
    tp = fp = fn = 0
    for i in range(len(val)):
        s = val[i]
        assert s["image"].shape[1:] == s["mask"].shape == s["exclude"].shape
        assert set(s["mask"].unique().tolist()) <= {0, 1, 2, 255}
        assert torch.equal(s["exclude"], s["mask"] == 255)
        assert torch.equal(s["label"], spec.label_space.label_from_mask(s["mask"]))
        found = domain.exclude_mask(s["image"], spec.label_space)
        tp += int((found & s["exclude"]).sum())
        fp += int((found & ~s["exclude"]).sum())
        fn += int((~found & s["exclude"]).sum())
    # White-region detection agrees with the annotated background masks (IoU about 0.75).
    assert tp / (tp + fp + fn) > 0.65 and tp / (tp + fp) > 0.9
    first = val[0]
    assert first["id"] == "00" and first["label"].tolist() == [1.0, 1.0, 0.0]


def test_glas_real(shared_data, domain):
    root = shared_data / "histo" / "GlaS"
    spec = domain.detect_dataset(root)
    assert spec.name == "glas"
    train = spec.build(root, "train")
    assert len(train) == 85
    s = train[0]
    assert s["id"] == "train_1" and s["image"].shape == (3, 522, 775)
    assert set(s["mask"].unique().tolist()) == {0, 1} and s["label"].tolist() == [1.0]
    # Patch labels say whether gland is present (a few images keep the test fast).
    patches = PatchDataset(Subset(train, range(6)), spec.label_space, spec.patch_size)
    labels = [label.item() for _, _, _, label in patches.index]
    assert len(labels) >= 6 * 6 and 0.0 in labels and 1.0 in labels
    p = patches[0]
    assert p["image"].shape == (3, spec.patch_size, spec.patch_size)
    assert p["label"].item() == float(bool((p["mask"] == 1).any()))
