"""The result of one evaluation, as JSON, a text table and a per-class bar chart.

Scores are fractions in [0, 1]. A score that is undefined (see :mod:`.scores`) is NaN in memory
and ``null`` in JSON, so JSON consumers never meet the non-standard ``NaN`` token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wsss_domains.data.io import atomic_write
from wsss_domains.domains.contract import MetricResult
from wsss_domains.evaluation.scores import compute_scores, paper_miou


def _to_json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _from_json_number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


@dataclass
class EvaluationReport:
    """Scores over the scored classes, domain extras and the confusion matrix they came from.

    ``per_class_*`` map the name of every scored class to its score; ``classes`` names every class
    of the label space (the rows and columns of ``confusion``, rows ground truth).
    """

    miou: float
    per_class_iou: dict[str, float]
    fwiou: float
    pixel_accuracy: float
    mean_accuracy: float
    mean_dice: float
    per_class_dice: dict[str, float]
    per_class_accuracy: dict[str, float]
    n_images: int
    n_pixels: int
    classes: tuple[str, ...]
    confusion: Tensor
    # Per ground-truth class, scored pixels the prediction left as the ignore index.
    unassigned: Tensor
    extra: list[MetricResult] = field(default_factory=list)
    # Sample id -> that image's own mIoU (see ``evaluate.image_miou``; NaN: nothing scored in it), in
    # evaluation order. Empty for reports written before it existed.
    per_image: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_confusion(
        cls,
        confusion: Tensor,
        classes: Sequence[str],
        scored: Sequence[int],
        unassigned: Tensor | None = None,
        extra: Sequence[MetricResult] = (),
        n_images: int = 0,
        per_image: Mapping[str, float] | None = None,
    ) -> EvaluationReport:
        """Score an accumulated ``CxC`` confusion matrix whose classes are named ``classes``."""
        if confusion.shape != (len(classes), len(classes)):
            raise ValueError(
                f"confusion shape {tuple(confusion.shape)} does not match {len(classes)} classes"
            )
        confusion = confusion.to(torch.long).cpu()
        if unassigned is None:
            unassigned = torch.zeros(len(classes), dtype=torch.long)
        unassigned = unassigned.to(torch.long).cpu()
        scores = compute_scores(confusion, scored, unassigned)
        return cls(
            miou=scores.miou,
            per_class_iou={classes[c]: float(scores.iou[c]) for c in scored},
            fwiou=scores.fwiou,
            pixel_accuracy=scores.pixel_accuracy,
            mean_accuracy=scores.mean_accuracy,
            mean_dice=scores.mean_dice,
            per_class_dice={classes[c]: float(scores.dice[c]) for c in scored},
            per_class_accuracy={classes[c]: float(scores.accuracy[c]) for c in scored},
            n_images=n_images,
            n_pixels=int(confusion.sum() + unassigned.sum()),
            classes=tuple(classes),
            confusion=confusion,
            unassigned=unassigned,
            extra=list(extra),
            per_image=dict(per_image or {}),
        )

    def worst_images(self, limit: int | None = None) -> list[tuple[str, float]]:
        """(sample id, mIoU) worst first; images with nothing scored (NaN) last, ties in evaluation order."""
        ranked = sorted(
            self.per_image.items(),
            key=lambda item: (math.isnan(item[1]), 0.0 if math.isnan(item[1]) else item[1]),
        )
        return ranked if limit is None else ranked[:limit]

    @property
    def miou_paper(self) -> float:
        """mIoU in the convention of ToCo's and CLIP-ES's official code (see ``scores.paper_miou``)."""
        scored = [self.classes.index(name) for name in self.per_class_iou]
        return paper_miou(self.confusion, scored)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; NaN becomes None."""

        def per_class(values: dict[str, float]) -> dict[str, float | None]:
            return {name: _to_json_number(v) for name, v in values.items()}

        return {
            "miou": _to_json_number(self.miou),
            "miou_paper_convention": _to_json_number(self.miou_paper),
            "conventions": {
                "miou": "mmsegmentation's: unassigned pixels count as misses; classes absent from the ground "
                "truth but predicted count with IoU 0",
                "miou_paper_convention": "ToCo's / CLIP-ES's official evaluation: unassigned pixels dropped; "
                "mean over the classes present in the ground truth",
            },
            "per_class_iou": per_class(self.per_class_iou),
            "fwiou": _to_json_number(self.fwiou),
            "pixel_accuracy": _to_json_number(self.pixel_accuracy),
            "mean_accuracy": _to_json_number(self.mean_accuracy),
            "mean_dice": _to_json_number(self.mean_dice),
            "per_class_dice": per_class(self.per_class_dice),
            "per_class_accuracy": per_class(self.per_class_accuracy),
            "extra": [
                {"name": m.name, "value": _to_json_number(m.value), "per_class": per_class(m.per_class)}
                for m in self.extra
            ],
            "n_images": self.n_images,
            "n_pixels": self.n_pixels,
            "classes": list(self.classes),
            "confusion": self.confusion.tolist(),
            "unassigned": self.unassigned.tolist(),
            "per_image_miou": per_class(self.per_image),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        def per_class(values: dict[str, float | None]) -> dict[str, float]:
            return {name: _from_json_number(v) for name, v in values.items()}

        return cls(
            miou=_from_json_number(data["miou"]),
            per_class_iou=per_class(data["per_class_iou"]),
            fwiou=_from_json_number(data["fwiou"]),
            pixel_accuracy=_from_json_number(data["pixel_accuracy"]),
            mean_accuracy=_from_json_number(data["mean_accuracy"]),
            mean_dice=_from_json_number(data["mean_dice"]),
            per_class_dice=per_class(data["per_class_dice"]),
            per_class_accuracy=per_class(data["per_class_accuracy"]),
            n_images=int(data["n_images"]),
            n_pixels=int(data["n_pixels"]),
            classes=tuple(data["classes"]),
            confusion=torch.tensor(data["confusion"], dtype=torch.long).reshape(
                len(data["classes"]), len(data["classes"])
            ),
            unassigned=torch.tensor(data["unassigned"], dtype=torch.long),
            extra=[
                MetricResult(m["name"], _from_json_number(m["value"]), per_class(m["per_class"]))
                for m in data["extra"]
            ],
            # Absent from reports written before per-image scores existed.
            per_image=per_class(data.get("per_image_miou", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> EvaluationReport:
        return cls.from_dict(json.loads(text))

    # -- human-readable output -------------------------------------------------------------
    def to_table(self) -> str:
        """A fixed-width table: one row per scored class (IoU, Dice), then the summary lines."""
        summary = [
            ("mIoU", self.miou),
            ("mIoU (papers)", self.miou_paper),
            ("mean Dice", self.mean_dice),
            ("FwIoU", self.fwiou),
            ("pixel accuracy", self.pixel_accuracy),
            ("mean accuracy", self.mean_accuracy),
            *((m.name, m.value) for m in self.extra),
        ]
        width = max(len("class"), *(len(n) for n in self.per_class_iou), *(len(n) for n, _ in summary))
        rule = "-" * (width + 20)
        lines = [f"{'class':<{width}}  {'IoU':>8}  {'Dice':>8}", rule]
        for name, iou in self.per_class_iou.items():
            dice = self.per_class_dice.get(name, math.nan)
            lines.append(f"{name:<{width}}  {_fmt(iou):>8}  {_fmt(dice):>8}")
        lines.append(rule)
        lines.extend(f"{name:<{width}}  {_fmt(value):>8}" for name, value in summary)
        lines.append(f"{self.n_images} images, {self.n_pixels} scored pixels")
        return "\n".join(lines)

    def plot_per_class(self, path: Path | str) -> Path:
        """Write a per-class IoU bar chart as PNG (undefined classes are marked n/a)."""
        # Imported here: matplotlib is slow to import and only plotting needs it. The Agg canvas
        # is used directly, so no GUI backend or pyplot global state is involved.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = list(self.per_class_iou)
        values = [self.per_class_iou[n] for n in names]
        fig = Figure(figsize=(max(4.0, 0.5 * len(names) + 1.5), 4.0), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        positions = list(range(len(names)))
        bars = ax.bar(positions, [0.0 if math.isnan(v) else v for v in values], color="tab:blue")
        for bar, value in zip(bars, values, strict=True):
            label = "n/a" if math.isnan(value) else f"{value:.2f}"
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        if not math.isnan(self.miou):
            ax.axhline(self.miou, color="tab:red", linestyle="--", label=f"mIoU {self.miou:.3f}")
            ax.legend(loc="upper right", fontsize=8)
        # Slant the names once they would collide horizontally.
        slant = sum(len(n) for n in names) > 6 * len(names) or len(names) > 6
        ax.set_xticks(positions, names, rotation=40 if slant else 0, ha="right" if slant else "center")
        ax.set_ylim(0.0, 1.15)  # headroom for the value labels and legend
        ax.set_ylabel("IoU")
        ax.set_title("Per-class IoU")
        path = Path(path)
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        return path
