"""k-fold split selection: interleaved folds partition the sorted images, complements hold the rest."""

from __future__ import annotations

from pathlib import Path

import fakes
import pytest

from wsss_domains.data.splits import parse_split
from wsss_domains.pipeline.data import open_dataset


@pytest.mark.parametrize("n,k", [(31, 3), (8, 2), (10, 4), (5, 5)])
def test_folds_partition_and_complements_hold_the_rest(n: int, k: int):
    folds = [parse_split(f"validation[fold={f}/{k}]").indices(n) for f in range(1, k + 1)]
    assert sorted(i for fold in folds for i in fold) == list(range(n))  # every image once
    assert all(i % k == f for f, fold in enumerate(folds) for i in fold)  # interleaved
    assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 1
    for f, fold in enumerate(folds, start=1):
        rest = parse_split(f"validation[fold!={f}/{k}]").indices(n)
        assert sorted(rest + fold) == list(range(n)) and not set(rest) & set(fold)


def test_fold_requests_parse_and_select_by_sorted_id():
    request = parse_split(" train [ fold = 2 / 3 ] ")
    assert (request.base, request.fold, request.folds, request.complement, request.sliced) == (
        "train",
        2,
        3,
        False,
        True,
    )
    assert request.select(["c", "a", "b", "e", "d", "f"], key=str) == ["b", "e"]
    assert parse_split("train[fold!=2/3]").select(list("fedcba"), key=str) == ["a", "c", "d", "f"]


@pytest.mark.parametrize("text", ["train[fold=0/3]", "train[fold=4/3]", "train[fold=1/1]", "[fold=1/3]"])
def test_bad_folds_are_refused(text: str):
    with pytest.raises(ValueError, match="fold"):
        parse_split(text)


def test_a_loader_without_native_slices_selects_folds_of_whole_images(tmp_path: Path):
    fakes.register()
    try:
        root = fakes.write_shapes(tmp_path / "data", n_train=5)
        held = open_dataset(fakes.FAKE_DOMAIN, None, root, "train[fold=2/2]")
        rest = open_dataset(fakes.FAKE_DOMAIN, None, root, "train[fold!=2/2]", labels_from_masks=True)
        held_ids = [held.dataset[i]["id"] for i in range(len(held.dataset))]
        rest_parents = {rest.dataset[i]["meta"]["parent"] for i in range(len(rest.dataset))}
        assert held_ids == ["train_01", "train_03"]
        assert rest_parents == {"train_00", "train_02", "train_04"}  # patches cut after selecting
    finally:
        fakes.unregister()


def test_loaders_that_slice_natively_keep_the_fold():
    from wsss_adapters.remote_sensing.loading import request_split

    request = request_split("TRAIN[fold!=2/3]", "train", ("train", "val"), "deepglobe")
    assert (request.base, request.fold, request.folds, request.complement) == ("train", 2, 3, True)
    assert request.select(list("abcdef"), key=str) == ["a", "c", "d", "f"]
