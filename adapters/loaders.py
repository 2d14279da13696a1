"""What the loaders of every built-in domain share: their option sets and their declaration.

The engine passes every loader the same keyword options, most of them meant for other loaders or
domains; each domain declares the ones its loaders understand once, as a :class:`LoaderOptions`.
Each loader states the same six facts about itself; :func:`loader_spec` turns them into the
:class:`DatasetSpec` the domain lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from wsss_domains.domains.contract import DatasetSpec, LabelSpace

if TYPE_CHECKING:
    from torch.utils.data import Dataset

_Options = TypeVar("_Options", bound="LoaderOptions")


@dataclass(frozen=True)
class LoaderOptions:
    """Base of a domain's option set: a frozen dataclass whose fields are the option names."""

    @classmethod
    def pick(cls: type[_Options], options: Mapping[str, object]) -> _Options:
        """The shared options among a loader's keyword options (the rest are its own, or unused)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in known})  # type: ignore[arg-type]


def loader_spec(
    name: str,
    label_space: LabelSpace,
    build: Callable[..., Dataset],
    detect: Callable[[Path], bool],
    splits: Sequence[str],
    description: str,
    *,
    patch_size: int | tuple[int, int],
    native_slices: bool = False,
) -> DatasetSpec:
    """A loader's declaration; every built-in loader lists its default (training) split first."""
    return DatasetSpec(
        name=name,
        label_space=label_space,
        build=build,
        detect=detect,
        splits=tuple(splits),
        description=description,
        default_split=splits[0],
        patch_size=patch_size,
        native_slices=native_slices,
    )


class RecordsDataset:
    """A loader's dataset holding one record (with an ``id``) per sample, in index order.

    Its length and its ids come from the records, so slicing a split decodes no image. A map-style
    dataset (``__len__`` and ``__getitem__``, all torch's ``DataLoader`` needs), not derived from
    torch's ``Dataset``: `wsss-domains domains` imports every loader and must not load torch.
    """

    records: Sequence[Any]

    def __len__(self) -> int:
        return len(self.records)

    def sample_ids(self) -> list[str]:
        return [record.id for record in self.records]
