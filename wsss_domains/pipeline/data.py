"""Opening a domain's dataset split as every stage sees it, and choosing the device.

One function resolves the domain, the loader (by name or by recognising the folder), the split
(with its optional slice or fold) and the loader options; training, pseudo-labelling, the
segmenter, prediction and evaluation all open their data through it, so they agree on sample ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from wsss_domains.data.large_images import LARGE_IMAGE_PIXELS, large_image_file
from wsss_domains.data.patches import PatchDataset, RandomPatchDataset
from wsss_domains.data.splits import SplitRequest, mask_classes, parse_split, sample_ids, union_parts
from wsss_domains.data.union import SplitUnion, image_ids
from wsss_domains.domains import DatasetSpec, DomainPlugin, LabelSpace, create_domain
from wsss_domains.errors import UserError
from wsss_domains.progress import progress_bar


@dataclass
class OpenedData:
    domain: DomainPlugin
    spec: DatasetSpec
    split: str
    dataset: Dataset
    label_space: LabelSpace


def tile_options(tiles: int | None) -> dict[str, object]:
    """Loader options that score ``tiles`` x ``tiles`` windows of a split instead of whole images."""
    if tiles is None:
        return {}
    if tiles < 16:
        raise UserError(f"--tiles must be at least 16 pixels, got {tiles}")
    return {"labels_from_masks": True, "patch_size": tiles}


def open_dataset(
    domain_name: str,
    dataset_name: str | None,
    data: Path,
    split: str | None,
    *,
    domain_options: Mapping[str, object] | None = None,
    **options: object,
) -> OpenedData:
    """Resolve domain, loader (by name or by recognising the folder) and split; build the dataset.

    ``domain_options`` build the domain plugin (``--domain-option``; a run records them), the other
    ``options`` go to the loader. ``random_patches=K`` with ``labels_from_masks`` draws K random
    windows per image instead of the loader's fixed grid (see :class:`RandomPatchDataset`); meant
    for training. A union of splits (``validation[fold!=1/4] + training``) opens each part with these
    options, except that a part without masks is read whole with its own labels (see :class:`SplitUnion`).
    """
    parts = _union_parts(split) if split is not None else []
    if split is not None and len(parts) > 1:
        return _open_union(domain_name, dataset_name, data, split, parts, domain_options, options)
    random_patches = options.pop("random_patches", None)
    if random_patches and options.get("labels_from_masks"):
        options.pop("labels_from_masks")
        patch_size = options.pop("patch_size", None)
        opened = open_dataset(
            domain_name, dataset_name, data, split, domain_options=domain_options, **options
        )
        opened.dataset = RandomPatchDataset(
            opened.dataset,
            opened.label_space,
            patch_size or opened.spec.patch_size,  # type: ignore[arg-type]
            per_image=int(random_patches),  # type: ignore[call-overload]
        )
        return opened
    domain = create_domain(domain_name, **(domain_options or {}))
    if not Path(data).exists():
        raise UserError(f"{data}: data folder does not exist")
    spec = domain.dataset(dataset_name) if dataset_name else domain.detect_dataset(Path(data))
    if split is None:
        split = spec.default_split or (spec.splits[0] if len(spec.splits) == 1 else None)
        if split is None:
            raise UserError(f"--split is required for {spec.name}: one of {', '.join(spec.splits)}")
    request = parse_split(split)
    if request.sliced and not spec.native_slices:
        dataset = _sliced_dataset(spec, Path(data), request, **options)
    else:
        dataset = spec.build(Path(data), split, **options)
    # Images, not patches: counting a patching's patches would index all its masks here, and a
    # caller that recuts it (a denser stride) would read them twice.
    images = dataset.base if isinstance(dataset, PatchDataset) else dataset
    if len(images) == 0:  # type: ignore[arg-type]
        raise UserError(f"{data}: split '{split}' of {spec.name} holds no images")
    return OpenedData(domain, spec, split, dataset, spec.label_space_for(Path(data)))


def _union_parts(split: str) -> list[str]:
    try:
        return union_parts(split)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


# Loader options that cut an annotated split into patches; a part of a union without masks drops them.
_PATCHING = ("labels_from_masks", "patch_size", "random_patches")


def _open_union(
    domain_name: str,
    dataset_name: str | None,
    data: Path,
    split: str,
    parts: list[str],
    domain_options: Mapping[str, object] | None,
    options: dict[str, object],
) -> OpenedData:
    """Each part opened on its own (its slice or fold, its patches), then read in the order given."""
    plain_options = {k: v for k, v in options.items() if k not in _PATCHING}
    opened: list[OpenedData] = []
    annotated: list[bool] = []
    for part in parts:
        name = opened[0].spec.name if opened else dataset_name
        whole = open_dataset(domain_name, name, data, part, domain_options=domain_options, **plain_options)
        masks = has_masks(whole.dataset)
        if masks and options.get("labels_from_masks"):
            whole = open_dataset(domain_name, name, data, part, domain_options=domain_options, **options)
        opened.append(whole)
        annotated.append(masks)
    seen: dict[str, str] = {}
    for part, each in zip(parts, opened, strict=True):
        for image in image_ids(each.dataset):
            if image in seen:
                raise UserError(f"split '{split}': image {image} is in both '{seen[image]}' and '{part}'")
            seen[image] = part
    union = SplitUnion([each.dataset for each in opened], parts, annotated)
    first = opened[0]
    return OpenedData(first.domain, first.spec, split, union, first.label_space)


def has_masks(dataset: Dataset) -> bool:
    """Whether the split's samples carry masks (a union: any of its parts), judged by the first sample,
    read from its file list where it is a large image."""
    if isinstance(dataset, SplitUnion):
        return any(dataset.annotated_parts)
    if len(dataset) == 0:  # type: ignore[arg-type]
        return False
    large = large_image_file(dataset, 0, LARGE_IMAGE_PIXELS)
    return large.mask is not None if large is not None else "mask" in dataset[0]  # type: ignore[index]


def scored_samples(dataset: Dataset) -> Dataset:
    """The samples a score can use: a union's annotated parts (its other parts carry no masks)."""
    if isinstance(dataset, SplitUnion):
        annotated = dataset.annotated()
        if annotated is None:
            raise UserError(f"no part of the split '{' + '.join(dataset.names)}' has masks to score against")
        return annotated
    return dataset


def _sliced_dataset(spec: DatasetSpec, root: Path, request: SplitRequest, **options: object) -> Dataset:
    """A slice or fold of a split's whole images (sorted by id); patches are cut after selecting."""
    labels_from_masks = bool(options.pop("labels_from_masks", False))
    patch_size = options.pop("patch_size", None)
    full = spec.build(root, request.base, labels_from_masks=False, **options)
    ids = sample_ids(full)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    classes = _image_classes(full, order, spec.label_space_for(root)) if request.stratified else None
    subset = Subset(full, [order[i] for i in request.indices(len(order), classes)])
    if not labels_from_masks:
        return subset
    # The loader's own patching (its crop stride and label rule: a driving crop's class needs 1% of
    # it), cut from the fold's images (a patching indexes its masks on first use, so the whole
    # split's are never read).
    patched = spec.build(root, request.base, labels_from_masks=True, patch_size=patch_size, **options)
    if isinstance(patched, PatchDataset):
        return patched.recut(subset)
    return PatchDataset(subset, spec.label_space_for(root), patch_size or spec.patch_size)  # type: ignore[arg-type]


def _image_classes(dataset: Dataset, order: list[int], label_space: LabelSpace) -> list[set[int]]:
    """Each image's classes (in ``order``) for stratified folds: from its mask, else its label."""
    out = []
    for index in order:
        sample = dataset[index]
        if "mask" in sample:
            mask = sample["mask"]
            if "exclude" in sample:
                mask = mask.masked_fill(sample["exclude"], label_space.ignore_index)
            out.append(mask_classes(label_space, mask))
        elif "label" in sample:
            out.append({int(i) for i in sample["label"].nonzero().flatten()})
        else:
            raise UserError(
                f"stratified folds need masks or image-level labels; sample {sample['id']} has neither"
            )
    return out


def validate_dataset(
    dataset: Dataset,
    label_space: LabelSpace | None = None,
    max_image_pixels: int | None = None,
) -> int:
    """Read every sample once so bad files fail before anything is written; returns how many are large.

    With ``label_space``, label vectors of the wrong length are refused here too: later they would
    only surface as a shape error deep inside batching or after earlier images were written.
    Images above ``max_image_pixels`` (processed window by window) are checked by their header
    only, never decoded whole.
    """
    names = label_space.foreground_names if label_space is not None else ()
    large_images = 0
    for i in progress_bar(range(len(dataset)), desc="checking data", unit="img", leave=False):  # type: ignore[arg-type]
        large = large_image_file(dataset, i, max_image_pixels)
        if large is not None:
            large_images += 1
            sample = {"id": large.id, "label": large.label} if large.label is not None else {}
        else:
            sample = dataset[i]
        label = sample.get("label")
        if label_space is not None and label is not None and label.numel() != len(names):
            raise UserError(
                f"sample {sample['id']}: label vector has {label.numel()} entries, "
                f"expected {len(names)} ({', '.join(names)})"
            )
    return large_images


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` where torch sees a GPU, else ``cpu``; a clear error for a missing GPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device '{name}' (cpu, cuda, cuda:N, auto)")
    return name
