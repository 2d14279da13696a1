"""Slicing a split reads sample ids from the datasets' records instead of decoding every image."""

from __future__ import annotations

from pathlib import Path

import pytest
from histo_fixtures import make_wsss4luad
from test_driving_camvid import write_camvid

from wsss_domains.data.splits import sample_ids
from wsss_domains.domains import create_domain


class Counting:
    """A dataset whose records carry ids; counts how often a sample is decoded."""

    def __init__(self, ids: list[str]) -> None:
        self.names = ids
        self.reads = 0

    def sample_ids(self) -> list[str]:
        return list(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        self.reads += 1
        return {"id": self.names[index]}


def test_a_dataset_that_lists_its_ids_is_not_read():
    dataset = Counting(["b", "a", "c"])
    assert sample_ids(dataset) == ["b", "a", "c"] and dataset.reads == 0


def test_a_dataset_without_the_listing_is_read_sample_by_sample():
    class Plain(Counting):
        sample_ids = None  # type: ignore[assignment]  # no listing: not a ListsSampleIds

    dataset = Plain(["b", "a", "c"])
    assert sample_ids(dataset) == ["b", "a", "c"] and dataset.reads == 3


def test_a_listing_of_the_wrong_length_is_refused():
    dataset = Counting(["b", "a", "c"])
    dataset.sample_ids = lambda: ["b"]  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"sample_ids\(\) gave 1 ids for 3 samples"):
        sample_ids(dataset)


@pytest.mark.parametrize("case", ["wsss4luad", "camvid"])
def test_record_ids_are_the_sample_ids_of_the_built_in_loaders(tmp_path: Path, case: str):
    if case == "wsss4luad":
        root = make_wsss4luad(tmp_path / "WSSS4LUAD")
        dataset = create_domain("histo").dataset("wsss4luad").build(root, "validation")
    else:
        write_camvid(tmp_path, stems=("0001TP_006720", "0001TP_006690", "Seq05VD_f00000"))
        dataset = create_domain("driving").dataset("camvid").build(tmp_path, "train")
    read = [dataset[i]["id"] for i in range(len(dataset))]
    assert sample_ids(dataset) == read and len(read) >= 2
