"""Grid patches labelled from their masks: the index is read once, by the patching that is used."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import fakes
import pytest
import torch

from wsss_domains.data.patches import PatchDataset
from wsss_domains.domains import BackgroundMode, LabelSpace
from wsss_domains.pipeline.data import open_dataset

SPACE = LabelSpace(classes=("a", "b"), palette=((0, 0, 0), (1, 1, 1)), background_mode=BackgroundMode.NONE)


class CountingMasks(torch.utils.data.Dataset):
    """Images whose masks are read through ``load_mask``, counting every read."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        self.masks = masks
        self.reads: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self.masks)

    def load_mask(self, i: int) -> torch.Tensor:
        self.reads[i] += 1
        return self.masks[i]

    def __getitem__(self, i: int):
        return {"image": torch.zeros(3, *self.masks[i].shape), "mask": self.masks[i], "id": f"im{i}"}


def halves(h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.long)
    mask[:, w // 2 :] = 1
    return mask


def test_a_recut_patching_reads_each_mask_once_and_cuts_as_a_fresh_one():
    base = CountingMasks([halves(8, 16), halves(16, 8)])
    loader_patching = PatchDataset(base, SPACE, patch_size=8)
    denser = loader_patching.recut(base, stride=4)
    assert len(denser) == 3 + 3  # 8x16: x at 0, 4, 8; 16x8: y at 0, 4, 8
    assert base.reads == Counter({0: 1, 1: 1})  # the loader's own patching never indexed
    # The expected windows and labels, written out: class a left of column 8, b right of it.
    expected = [(0, 0, 0, [1, 0]), (0, 0, 4, [1, 1]), (0, 0, 8, [0, 1])]
    expected += [(1, y, 0, [1, 1]) for y in (0, 4, 8)]
    assert [(i, y, x, label.tolist()) for i, y, x, label in denser.index] == expected
    assert len(loader_patching) == 2 + 2 and base.reads == Counter({0: 2, 1: 2})  # on first use


def test_a_patching_without_masks_fails_when_first_used():
    class NoMask(CountingMasks):
        load_mask = None  # type: ignore[assignment]

        def __getitem__(self, i: int):
            return {"image": torch.zeros(3, 4, 4), "id": f"im{i}"}

    data = PatchDataset(NoMask([halves(4, 4)]), SPACE, patch_size=4)
    with pytest.raises(ValueError, match="im0 has no mask; --labels-from-masks needs masks"):
        len(data)


def test_opening_a_fold_of_patches_reads_only_the_folds_masks(tmp_path: Path, monkeypatch):
    reads: Counter[str] = Counter()
    original = fakes.ShapesDataset.__getitem__

    def counted(self, index: int):
        sample = original(self, index)
        reads[sample["id"]] += 1
        return sample

    fakes.register()
    try:
        root = fakes.write_shapes(tmp_path / "data", n_train=4)
        monkeypatch.setattr(fakes.ShapesDataset, "__getitem__", counted)
        opened = open_dataset(fakes.FAKE_DOMAIN, None, root, "train[fold!=1/2]", labels_from_masks=True)
        # Opening lists the split's ids (this loader has no id list: one read each) and indexes nothing.
        assert reads == Counter({"train_00": 1, "train_01": 1, "train_02": 1, "train_03": 1})
        assert len(opened.dataset) > 0
        # Indexing reads the fold's images once more; the whole split's patching is never indexed.
        assert reads == Counter({"train_00": 1, "train_01": 2, "train_02": 1, "train_03": 2})
    finally:
        fakes.unregister()
