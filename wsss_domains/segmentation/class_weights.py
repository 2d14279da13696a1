"""Median frequency balancing: per-class weights of the segmenter's pixel loss.

Small classes (CamVid's poles, signs, bicyclists) cover a few pixels of a training set where road
and sky cover most; with an unweighted pixel loss a network gains little by learning them. Eigen &
Fergus (ICCV 2015) weight each class's pixels by

    w_c = median_k(f_k) / f_c,   f_c = pixels of class c / pixels of the images where c is present,

and SegNet (Badrinarayanan et al., TPAMI 2017) trains on CamVid with it. Here the frequencies come
from the training split's **pseudo-labels** (no ground truth is read); unassigned (ignore) pixels
count nowhere. The median runs over the classes that occur; a class absent from every label gets
weight 1 (it carries no loss either way).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

WEIGHTINGS = ("none", "median-frequency")


def class_frequencies(labels: Iterable[Tensor], num_classes: int, ignore_index: int) -> list[float | None]:
    """Each class's ``f_c`` over the label maps ``labels`` (None where the class never occurs)."""
    pixels = torch.zeros(num_classes, dtype=torch.float64)
    present_in = torch.zeros(num_classes, dtype=torch.float64)  # labelled pixels of images holding c
    for label in labels:
        label = torch.as_tensor(label).flatten().long()
        label = label[(label != ignore_index) & (label >= 0) & (label < num_classes)]
        counts = torch.bincount(label, minlength=num_classes).double()
        pixels += counts
        present_in += (counts > 0).double() * counts.sum()
    return [float(p / t) if t > 0 else None for p, t in zip(pixels, present_in, strict=True)]


def median_frequency_weights(frequencies: Sequence[float | None]) -> list[float]:
    """``median(f) / f_c`` for the classes that occur, 1 for those that do not."""
    seen = [f for f in frequencies if f is not None]
    if not seen:
        raise ValueError("no labelled pixel of any class: nothing to balance")
    median = statistics.median(seen)
    return [median / f if f is not None else 1.0 for f in frequencies]


def training_labels(dataset: Any) -> Iterable[Tensor]:
    """The label maps of a training set, without decoding images where the dataset allows it."""
    read = getattr(dataset, "label", None)
    if callable(read):
        return (read(i) for i in range(len(dataset)))
    return (dataset[i]["mask"] for i in range(len(dataset)))


def weights_for(weighting: str, dataset: Any, num_classes: int, ignore_index: int) -> list[float] | None:
    """The loss weights ``weighting`` gives ``dataset``'s labels (None: unweighted)."""
    if weighting == "none":
        return None
    if weighting == "median-frequency":
        frequencies = class_frequencies(training_labels(dataset), num_classes, ignore_index)
        return median_frequency_weights(frequencies)
    raise ValueError(f"unknown class weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")
