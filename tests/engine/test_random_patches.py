"""Random windows labelled from their own masks (``--random-patches``)."""

from __future__ import annotations

import pytest
import torch

from wsss_domains.data.patches import RandomPatchDataset
from wsss_domains.domains import BackgroundMode, LabelSpace

SPACE = LabelSpace(
    classes=("a", "b", "c"), palette=((0, 0, 0), (1, 1, 1), (2, 2, 2)), background_mode=BackgroundMode.NONE
)


class Images(torch.utils.data.Dataset):
    def __init__(self, masks: list[torch.Tensor]) -> None:
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int):
        mask = self.masks[i]
        image = mask[None].expand(3, -1, -1).float()  # pixel value = class id: checks alignment
        return {"image": image, "mask": mask, "label": torch.ones(3), "id": f"im{i}"}


def left_right(h: int, w: int) -> torch.Tensor:
    """Class a on the left half, class b on the right half, class c on the last row."""
    mask = torch.zeros(h, w, dtype=torch.long)
    mask[:, w // 2 :] = 1
    mask[-1] = 2
    return mask


def test_windows_are_labelled_from_their_own_mask():
    torch.manual_seed(0)
    data = RandomPatchDataset(Images([left_right(20, 40)]), SPACE, patch_size=(8, 10), per_image=50)
    assert len(data) == 50
    kinds = set()
    for k in range(len(data)):
        patch = data[k]
        y, x = patch["meta"]["offset"]
        assert patch["image"].shape == (3, 8, 10)
        assert torch.equal(patch["image"][0].long(), patch["mask"])  # image and mask cut together
        expected = [float((patch["mask"] == c).any()) for c in range(3)]
        assert patch["label"].tolist() == expected
        assert patch["id"] == f"im0@{y},{x}"
        kinds.add(tuple(expected))
    # Random positions reach single-class windows of both halves and mixed ones.
    assert {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0)} <= kinds


def test_index_runs_over_images_and_small_images_give_their_whole_extent():
    small = torch.ones(5, 6, dtype=torch.long)
    data = RandomPatchDataset(Images([left_right(20, 40), small]), SPACE, patch_size=16, per_image=3)
    assert len(data) == 6
    assert data[3]["id"] == "im1@0,0" and data[3]["image"].shape == (3, 5, 6)
    assert data[3]["label"].tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(IndexError):
        data[6]


def test_windows_without_scored_pixels_are_redrawn_or_refused():
    mask = torch.full((20, 20), SPACE.ignore_index, dtype=torch.long)
    mask[:4, :4] = 0
    torch.manual_seed(1)
    data = RandomPatchDataset(Images([mask]), SPACE, patch_size=4, per_image=20, max_draws=1000)
    for k in range(len(data)):
        assert data[k]["label"].tolist() == [1.0, 0.0, 0.0]
    empty = torch.full((10, 10), SPACE.ignore_index, dtype=torch.long)
    with pytest.raises(ValueError, match="no window"):
        RandomPatchDataset(Images([empty]), SPACE, patch_size=4, per_image=1)[0]
    with pytest.raises(ValueError, match="per_image"):
        RandomPatchDataset(Images([empty]), SPACE, patch_size=4, per_image=0)
