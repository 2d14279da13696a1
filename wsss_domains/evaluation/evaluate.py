"""Score a folder of predicted masks against the ground-truth masks of a dataset split.

Predictions are single-channel PNGs of class ids (palette or greyscale), one per sample, named by
:func:`pred_filename` so that the pseudo-label writer and the evaluator agree on file names even
for sample ids containing ``/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch

from wsss_domains.data.io import DataError, read_index_mask
from wsss_domains.domains.contract import DomainPlugin, LabelSpace, Sample
from wsss_domains.evaluation.confusion import ConfusionMatrix
from wsss_domains.evaluation.report import EvaluationReport
from wsss_domains.evaluation.scores import compute_scores
from wsss_domains.progress import progress_bar

# Besides letters, digits and "_.-~" (always kept), these are safe in file names everywhere.
_SAFE = "+,=@"


def pred_filename(sample_id: str) -> str:
    """The PNG file name of a sample's prediction: ``<id>.png`` with unsafe characters %-escaped.

    Escaping (``a/b`` -> ``a%2Fb``) rather than replacing keeps distinct ids on distinct files.
    """
    if not sample_id:
        raise ValueError("sample id is empty")
    name = quote(sample_id, safe=_SAFE)
    if name.startswith("."):  # no hidden files, no "." or ".."
        name = "%2E" + name[1:]
    return f"{name}.png"


def _samples(dataset: Any) -> Iterator[Sample]:
    """Map-style datasets by index (their __iter__ may not exist), anything else by iteration."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        for i in range(len(dataset)):
            yield dataset[i]
    else:
        yield from dataset


def _read_prediction(path: Path, mask: torch.Tensor, label_space: LabelSpace) -> torch.Tensor:
    if not path.is_file():
        raise DataError(path, "prediction not found")
    pred = read_index_mask(path)
    if tuple(pred.shape) != tuple(mask.shape):
        raise DataError(
            path, f"prediction size {tuple(pred.shape)} does not match mask size {tuple(mask.shape)}"
        )
    bad = (pred >= label_space.num_classes) & (pred != label_space.ignore_index)
    if bad.any():
        raise DataError(
            path,
            f"holds class id {int(pred[bad][0])}, outside 0..{label_space.num_classes - 1}"
            f" (ignore index {label_space.ignore_index} allowed)",
        )
    return pred


def evaluate_predictions(
    domain: DomainPlugin,
    label_space: LabelSpace,
    dataset: Iterable[Sample] | Any,
    pred_dir: Path,
) -> EvaluationReport:
    """Accumulate one confusion matrix over ``dataset`` and score it.

    Pixels whose mask is ``ignore_index`` or whose sample ``exclude`` flag is set are not scored.
    Only ``domain.scored_classes(label_space)`` enter the averages; ``domain.metrics`` adds extras.
    Each image is also scored on its own (:func:`image_miou`, ``EvaluationReport.per_image``).
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "prediction folder not found")
    confusion = ConfusionMatrix(label_space.num_classes, label_space.ignore_index)
    scored = domain.scored_classes(label_space)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    n_images = 0
    per_image: dict[str, float] = {}
    for sample in progress_bar(_samples(dataset), total=total, desc="evaluate", unit="img"):
        sample_id = sample["id"]
        mask = sample.get("mask")
        if mask is None:
            raise ValueError(f"sample '{sample_id}' has no mask: split has no masks to evaluate against")
        mask = torch.as_tensor(mask)
        path = pred_dir / pred_filename(sample_id)
        pred = _read_prediction(path, mask, label_space)
        exclude = sample.get("exclude")
        try:
            confusion.update(pred, mask, None if exclude is None else torch.as_tensor(exclude))
        except ValueError as exc:
            raise ValueError(f"sample '{sample_id}': {exc}") from exc
        per_image[str(sample_id)] = image_miou(confusion.last_counts, scored)
        n_images += 1
    if n_images == 0:
        raise ValueError("the split is empty: nothing to evaluate")
    matrix = confusion.compute()
    return EvaluationReport.from_confusion(
        matrix,
        label_space.classes,
        scored,
        unassigned=confusion.compute_unassigned(),
        extra=domain.metrics(matrix.clone(), label_space),
        n_images=n_images,
        per_image=per_image,
    )


def image_miou(counts: torch.Tensor, scored: Sequence[int]) -> float:
    """One image's mIoU from its ``C x (C + 1)`` counts (last column: unassigned), in the convention of
    the whole set's mIoU: over the scored classes in the image's ground truth or prediction; NaN when
    the image has none (all of it ignored or excluded). What the reports' "worst images" sort by."""
    num_classes = counts.shape[0]
    return compute_scores(counts[:, :num_classes], scored, counts[:, num_classes]).miou
