"""The Python API: one function per stage, and the whole job.

The command line is a thin layer over these; benchmarks and notebooks call them directly::

    from wsss_domains import pipeline

    run = pipeline.train_classifier("histo", data, "runs/clf", split="validation", settings=...)
    pipeline.pseudo_label_split("runs/clf", None, None, data, "validation", "runs/pl")
    pipeline.fit_segmenter("runs/clf", "runs/pl", data, "runs/seg", split="validation")
    pipeline.predict_split("runs/seg", data, "runs/pred", split="test")
    report = pipeline.evaluate_split("histo", None, data, "test", "runs/pred")

or all of it: ``pipeline.run_pipeline("histo", data, "runs/job", train_split=..., test_split=...)``.
Submodules are imported on first use, so ``import wsss_domains.pipeline`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "open_dataset": "data",
    "resolve_device": "data",
    "ClassifierSettings": "classifier",
    "train_classifier": "classifier",
    "pseudo_label_split": "pseudo_labels",
    "pseudo_label_raster_file": "pseudo_labels",
    "SegmenterSettings": "segmenter",
    "fit_segmenter": "segmenter",
    "Sharding": "predict",
    "predict_split": "predict",
    "predict_folder": "predict",
    "predict_raster": "predict",
    "predict_slides": "predict",
    "evaluate_split": "evaluate",
    "RunSettings": "run",
    "run_pipeline": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wsss_domains.pipeline' has no attribute '{name}'")
    return getattr(importlib.import_module(f"wsss_domains.pipeline.{_EXPORTS[name]}"), name)
