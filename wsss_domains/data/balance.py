"""Class-balanced sampling: images of rare classes drawn more often in training.

With a few annotated images a class can live in a handful of them (WSSS4LUAD: normal tissue in 4 of
31 ROIs; DeepGlobe: water in 2 of 8 scenes); uniform shuffling then shows the network that class in
one batch of ten, and both the classifier and the segmenter learn to never predict it. Repeat-factor
sampling (Gupta, Dollár & Girshick, LVIS, CVPR 2019) raises such images' share:

* each class ``c`` gets ``r_c = max(1, sqrt(t / f_c))``, ``f_c`` the fraction of training images
  whose classes include ``c``;
* each image gets the largest ``r_c`` of its classes (1 where it has none);
* images are drawn with replacement, with probability proportional to their factor, ``round(sum r)``
  per epoch, so an image is seen ``r`` times per epoch on average.

Deviation from LVIS: LVIS repeats each image ``floor(r)`` times plus once more with probability
``r - floor(r)`` (stochastic rounding); drawing with replacement (torch's
``WeightedRandomSampler``) gives the same expected counts with a little more variance per epoch.
``t = 1`` (the default here) oversamples every class found in fewer than all images, by the inverse
square root of its frequency; LVIS used ``t = 0.001`` for its 1203 classes.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

DEFAULT_THRESHOLD = 1.0
# A class counts in a sample's class set where it covers this share of the sample's scored pixels,
# so one stray pixel of a noisy pseudo-label does not make its image "rare-class".
MIN_SHARE = 0.01


def repeat_factors(
    class_sets: Sequence[Collection[int]], threshold: float = DEFAULT_THRESHOLD
) -> list[float]:
    """Each image's repeat factor: the largest ``max(1, sqrt(threshold / f_c))`` over its classes."""
    if not threshold > 0:
        raise ValueError(f"the balancing threshold must be positive, got {threshold}")
    n = len(class_sets)
    counts: dict[int, int] = {}
    for classes in class_sets:
        for c in set(classes):
            counts[c] = counts.get(c, 0) + 1
    per_class = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return [max((per_class[c] for c in classes), default=1.0) for classes in class_sets]


def balanced_sampler(factors: Sequence[float]) -> Any:
    """Draws with replacement in proportion to ``factors``, ``round(sum(factors))`` per epoch.

    Uses torch's global generator, which ``seed_everything`` seeds, so a run is reproducible.
    """
    from torch.utils.data import WeightedRandomSampler

    if not factors:
        raise ValueError("no images to sample from")
    return WeightedRandomSampler(list(factors), num_samples=round(sum(factors)), replacement=True)


def sample_class_sets(dataset: Any, label_space: Any = None) -> list[set[int]]:
    """Each training sample's foreground classes (indices into ``label_space.foreground``).

    Datasets that list their classes (``class_sets(min_share)``: patches from their index,
    random windows from their image's mask, pseudo-labels from their PNGs) do so without decoding
    images; anything else is read sample by sample (its image-level label, else its mask, which
    needs ``label_space``).
    """
    from wsss_domains.data.splits import mask_classes

    listed = getattr(dataset, "class_sets", None)
    if callable(listed):
        return listed(MIN_SHARE)
    out = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if "label" in sample:
            out.append({int(c) for c in sample["label"].nonzero().flatten()})
        elif "mask" in sample and label_space is not None:
            mask = sample["mask"]
            if "exclude" in sample:
                mask = mask.masked_fill(sample["exclude"], label_space.ignore_index)
            out.append(mask_classes(label_space, mask, MIN_SHARE))
        else:
            raise ValueError(
                f"sample {sample['id']} has no image-level label (nor a mask and label space) to balance by"
            )
    return out
