"""Running the domain-transfer matrix cell by cell: train, pseudo-label, evaluate; resumable.

A cell is one (domain, method) pair. Methods that change training (extra losses or modules) train
their own run; post-hoc methods (refiners, SAM / CLIP extractors) reuse the domain's plain-CAM
run, so a matrix of N post-hoc methods costs one training per domain, and their gains over CAM
compare the same classifier.

Layout under ``out``::

    cells/<domain>__<method>.json   one finished cell (atomic; its presence means "done")
    runs/<domain>__<train method>/  training runs (resume from checkpoints/last.ckpt)
    pseudo/<domain>__<method>/      pseudo-label PNGs (resume image by image)

A killed matrix re-run skips finished cells, resumes unfinished training from its checkpoint and
unfinished pseudo-labelling from the PNGs already written. A cell that raises records the error
as its result and the matrix goes on; only an interrupt (KeyboardInterrupt, a kill of the bench
process) stops it. Each stage (training, pseudo-labelling) runs in a child process of its own
(:mod:`wsss_domains.child_stage`), so a stage killed for want of memory fails its cell, not the matrix.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from wsss_domains.cam.settings import CamSettings
from wsss_domains.child_stage import StageKilled, run_stage
from wsss_domains.data.io import atomic_write
from wsss_domains.errors import UserError
from wsss_domains.methods import method_class
from wsss_domains.methods.base import trains
from wsss_domains.models.weights import WeightsNotFound
from wsss_domains.peak_memory import PeakMemory, larger
from wsss_domains.pipeline.classifier import ClassifierSettings, train_classifier
from wsss_domains.pipeline.pseudo_labels import pseudo_label_and_score
from wsss_domains.progress import progress_bars
from wsss_domains.transfer_matrix.presets import DEFAULT_PRESETS, CellPreset
from wsss_domains.transfer_matrix.report import BASELINE, gain, per_class_gain

CELLS_DIR = "cells"
RUNS_DIR = "runs"
PSEUDO_DIR = "pseudo"
TRAIN_STATE = "bench-train.json"
CELL_STATE = "bench-cell.json"

Cell = dict[str, Any]
Log = Callable[[str], None]


class BenchError(UserError):
    """The output folder holds results made with other settings (or another fatal bench problem)."""


@dataclass
class MatrixSettings:
    """What every cell of one matrix invocation shares."""

    out: Path
    data_root: Path
    budget_minutes: float
    device: str = "cpu"
    # Method options by method name (the CLI scopes them: see ``cli.scoped_method_options``).
    method_options: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    retry_failed: bool = False
    # Progress bars inside each cell; off by default, the log lines say where the matrix is.
    progress: bool = False
    # Each stage in a spawned child process (an out-of-memory kill fails one cell, not the matrix);
    # False runs them in this process (a debugger, or stages registered only in this process).
    stages_in_child: bool = True
    # Gradient accumulation by training method: the preset's batch is split into this many
    # micro-batches, one optimiser step per batch (same step, less memory); 1 where absent.
    accumulate_batches: Mapping[str, int] = field(default_factory=dict)

    def accumulation(self, method: str) -> int:
        return int(self.accumulate_batches.get(method, 1))

    def micro_batch(self, preset: CellPreset, method: str) -> int:
        """The batch one forward pass of ``method``'s training run holds on ``preset``'s column."""
        n = self.accumulation(method)
        if n < 1 or preset.batch_size % n:
            raise BenchError(
                f"--accumulate-batches {method}={n}: must divide the column's batch size {preset.batch_size}"
            )
        return preset.batch_size // n


def trains_own_model(method: str) -> bool:
    """Whether ``method`` changes training, so it cannot reuse the domain's plain-CAM run.

    A method overriding any training hook or setting of :class:`Method` trains; the others
    (extractor, refine, ...) act only at pseudo-label time.
    """
    return trains(method_class(method))


def training_method(method: str) -> str:
    return method if trains_own_model(method) else BASELINE


def cell_name(domain: str, method: str) -> str:
    return f"{domain}__{method}"


def cell_path(out: Path, domain: str, method: str) -> Path:
    return Path(out) / CELLS_DIR / f"{cell_name(domain, method)}.json"


def read_cell(out: Path, domain: str, method: str) -> Cell | None:
    path = cell_path(out, domain, method)
    return json.loads(path.read_text()) if path.is_file() else None


def ordered_methods(methods: Sequence[str]) -> list[str]:
    """The baseline first (every gain is measured against it), then the others once each, in order."""
    return [BASELINE, *dict.fromkeys(m for m in methods if m != BASELINE)]


# -- settings fingerprints ---------------------------------------------------------------------


def train_config(preset: CellPreset, method: str, settings: MatrixSettings) -> dict[str, Any]:
    """Everything a training run depends on; a run folder made with another one is never reused."""
    keys = ("domain", "dataset", "path", "train_split", "labels_from_masks", "patch_size")
    keys += ("backbone", "weights", "image_size", "batch_size", "max_steps")
    data = preset.to_dict()
    # Set only when used, so runs recorded before the option existed keep their fingerprint.
    extra: dict[str, Any] = {"random_patches": preset.random_patches} if preset.random_patches else {}
    if preset.domain_options:
        extra["domain_options"] = dict(preset.domain_options)
    if preset.seed:
        extra["seed"] = preset.seed
    if settings.accumulation(method) > 1:
        extra["accumulate_batches"] = settings.accumulation(method)
    return {
        **{k: data[k] for k in keys},
        **extra,
        "method": method,
        "method_options": dict(settings.method_options.get(method, {})),
        "budget_minutes": settings.budget_minutes,
    }


def cell_config(preset: CellPreset, method: str, settings: MatrixSettings) -> dict[str, Any]:
    """Everything a cell's result depends on (its training run's config included)."""
    return {
        "train": train_config(preset, training_method(method), settings),
        "method": method,
        "method_options": dict(settings.method_options.get(method, {})),
        "score_split": preset.score_split,
        "score_tiles": preset.score_tiles,
        "score_labels_from_masks": preset.score_labels_from_masks,
        "scales": list(preset.scales),
    }


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def _check_same(path: Path, recorded: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    diff = _differences(recorded, current)
    if diff:
        raise BenchError(
            f"{path} was made with other settings ({'; '.join(diff[:3])}); "
            "use another --out, or delete it to recompute"
        )


# -- training ----------------------------------------------------------------------------------


def train_settings(preset: CellPreset, method: str, settings: MatrixSettings) -> ClassifierSettings:
    """The classifier settings of a cell's training run (what :func:`train_argv` spells out)."""
    return ClassifierSettings(
        method=method,
        method_options=dict(settings.method_options.get(method, {})),
        backbone=preset.backbone,
        weights=preset.weights,
        image_size=preset.image_size,
        labels_from_masks=preset.labels_from_masks,
        patch_size=preset.patch_size if preset.labels_from_masks else None,
        random_patches=preset.random_patches if preset.labels_from_masks else None,
        max_minutes=settings.budget_minutes,
        max_steps=preset.max_steps,
        batch_size=settings.micro_batch(preset, method),
        accumulate_batches=settings.accumulation(method),
        seed=preset.seed,
        device=settings.device,
    )


def train_argv(preset: CellPreset, method: str, run: Path, settings: MatrixSettings) -> list[str]:
    """The `wsss-domains train` arguments of a cell's training run (recorded beside its result)."""
    argv = ["train", "--domain", preset.domain, "--dataset", preset.dataset]
    for key, value in preset.domain_options.items():
        argv += ["--domain-option", f"{key}={json.dumps(value)}"]
    argv += ["--data", str(preset.data(settings.data_root)), "--split", preset.train_split]
    if preset.labels_from_masks:
        argv.append("--labels-from-masks")
        if preset.patch_size is not None:
            argv += ["--patch-size", str(preset.patch_size)]
        if preset.random_patches:
            argv += ["--random-patches", str(preset.random_patches)]
    argv += ["--out", str(run), "--method", method]
    for key, value in settings.method_options.get(method, {}).items():
        argv += ["--method-option", f"{key}={json.dumps(value)}"]
    argv += ["--backbone", preset.backbone, "--weights", preset.weights]
    argv += ["--image-size", str(preset.image_size)]
    argv += ["--batch-size", str(settings.micro_batch(preset, method))]
    if settings.accumulation(method) > 1:
        argv += ["--accumulate-batches", str(settings.accumulation(method))]
    argv += ["--max-minutes", str(settings.budget_minutes), "--max-steps", str(preset.max_steps)]
    argv += ["--seed", str(preset.seed), "--device", settings.device]
    if not settings.progress:
        argv.append("--no-progress")
    return argv


@dataclass
class TrainedRun:
    run: Path
    method: str
    seconds: float
    command: str
    # Peak memory of training (largest over its attempts); None where not measured.
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None


def _trained(run: Path, method: str, command: str, state: Mapping[str, Any]) -> TrainedRun:
    peaks = (state.get("peak_rss_bytes"), state.get("peak_gpu_bytes"))
    return TrainedRun(run, method, float(state["seconds"]), command, *peaks)


def ensure_trained(
    domain: str, preset: CellPreset, method: str, settings: MatrixSettings, log: Log
) -> TrainedRun:
    """The finished run of (domain, method), training or resuming it first when needed.

    ``bench-train.json`` is written before each attempt (so even a hard kill leaves the run's
    settings to check on resume) and after it; training time accumulates over attempts, and only
    a hard kill loses the time of the attempt it ended. Peak memory is the largest over the
    attempts since the last start from scratch, unknown if one of them went unmeasured.
    """
    run = Path(settings.out) / RUNS_DIR / cell_name(domain, method)
    argv = train_argv(preset, method, run, settings)
    command = "wsss-domains " + shlex.join(argv)
    config = train_config(preset, method, settings)
    state_path = run / TRAIN_STATE
    state: dict[str, Any] = {"config": config, "seconds": 0.0, "attempts": 0, "done": False}
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        _check_same(run, state["config"], config)
        if state["done"] and (run / "model.pt").is_file():
            return _trained(run, method, command, state)
    log(("resuming" if state["attempts"] else "training") + f" {run.name}: {command}")
    # Without a checkpoint training starts afresh, so earlier attempts' peaks do not count.
    afresh = not (run / "checkpoints" / "last.ckpt").is_file()
    state["attempts"] += 1
    _write_json(state_path, state)
    start = time.perf_counter()
    measured = PeakMemory()
    train = partial(
        train_classifier,
        preset.domain,
        preset.data(settings.data_root),
        run,
        split=preset.train_split,
        dataset=preset.dataset,
        settings=train_settings(preset, method, settings),
        domain_options=dict(preset.domain_options),
    )
    try:
        run_stage(train, settings.device, measured, in_child=settings.stages_in_child)
        state["done"] = True
    finally:
        state["seconds"] = float(state["seconds"]) + time.perf_counter() - start
        for key, value in (("peak_rss_bytes", measured.rss_bytes), ("peak_gpu_bytes", measured.gpu_bytes)):
            state[key] = value if afresh else larger(state.get(key), value)
        _write_json(state_path, state)
    return _trained(run, method, command, state)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))


# -- one cell ----------------------------------------------------------------------------------


def _error_message(exc: BaseException) -> str:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return f"{type(exc).__name__}: {message}"


def run_cell(
    domain: str,
    preset: CellPreset,
    method: str,
    settings: MatrixSettings,
    baseline: Cell | None,
    runs: dict[str, TrainedRun | Exception],
    log: Log,
) -> Cell:
    """Train (or reuse), pseudo-label and evaluate one cell; an exception becomes a failed cell."""
    config = cell_config(preset, method, settings)
    cell: Cell = {"domain": domain, "method": method, "status": "failed", "error": None, "config": config}
    trainer = training_method(method)
    cell["trained_with"] = trainer
    pseudo = Path(settings.out) / PSEUDO_DIR / cell_name(domain, method)
    try:
        if trainer not in runs:
            try:
                runs[trainer] = ensure_trained(domain, preset, trainer, settings, log)
            except BenchError:
                raise
            except Exception as exc:  # every cell sharing this run fails with the same message
                runs[trainer] = exc
        trained = runs[trainer]
        if isinstance(trained, Exception):
            cell["error"] = f"training the {trainer} run failed: {_error_message(trained)}"
            if isinstance(trained, StageKilled) and trained.signal_number == signal.SIGKILL:
                n = 2 * settings.accumulation(trainer)
                cell["error"] += f" (`--accumulate-batches {trainer}={n}` holds 1/{n} of the batch at a time)"
            cell["weights_missing"] = isinstance(trained, WeightsNotFound)
            return cell
        cell.update(
            train_run=str(trained.run.relative_to(settings.out)),
            train_seconds=trained.seconds,
            train_command=trained.command,
        )
        state = pseudo / CELL_STATE
        # PNGs left by an interrupted attempt are reused only if made alike; others are stale.
        if state.is_file() and _differences(json.loads(state.read_text()), config):
            log(f"{pseudo}: left by a run with other settings, cleared")
            shutil.rmtree(pseudo)
        _write_json(state, config)
        pl_peak = PeakMemory()
        label = partial(
            pseudo_label_and_score,
            trained.run,
            preset.domain,
            preset.dataset,
            preset.data(settings.data_root),
            preset.score_split,
            pseudo,
            score=True,
            labels_from_masks=preset.score_labels_from_masks,
            method_name=method,
            options=dict(settings.method_options.get(method, {})),
            cam=CamSettings(scales=preset.scales),
            overlays=False,
            device=settings.device,
            dataset_options=preset.score_options(),
        )
        scored = run_stage(label, settings.device, pl_peak, in_child=settings.stages_in_child)
        assert scored.report is not None
        summary, report, pl_seconds = scored.summary, scored.report, scored.pseudo_label_seconds
        evaluation = report.to_dict()
    except BenchError:
        raise
    except Exception as exc:
        cell["error"] = _error_message(exc)
        cell["traceback"] = traceback.format_exc(limit=8)
        # Not a fault of the method: pretrained weights it needs are not on this machine.
        cell["weights_missing"] = isinstance(exc, WeightsNotFound)
        return cell
    cell.update(
        status="ok",
        miou=evaluation["miou"],
        per_class_iou=evaluation["per_class_iou"],
        pseudo_label_seconds=pl_seconds,
        evaluate_seconds=scored.evaluate_seconds,
        # Wall time of the cell as a user would pay it alone: its training plus its pseudo-labels.
        wall_seconds=float(cell["train_seconds"]) + pl_seconds,
        # Peak memory (bytes) of each stage and of the cell; None where not measured (see peak_memory).
        train_peak_rss_bytes=trained.peak_rss_bytes,
        pseudo_label_peak_rss_bytes=pl_peak.rss_bytes,
        peak_rss_bytes=larger(trained.peak_rss_bytes, pl_peak.rss_bytes),
        peak_gpu_bytes=larger(trained.peak_gpu_bytes, pl_peak.gpu_bytes),
        pseudo_labels={
            "written": summary.written,
            # Images written by an interrupted earlier attempt: their time is not in the figure.
            "skipped": summary.skipped,
            "predicted_label_images": summary.predicted_label_images,
        },
        n_images=evaluation["n_images"],
        evaluation=evaluation,
    )
    ok_baseline = baseline if baseline is not None and baseline.get("status") == "ok" else None
    cell["gain_vs_cam"] = gain(cell["miou"], ok_baseline["miou"] if ok_baseline else None)
    cell["per_class_gain_vs_cam"] = per_class_gain(cell, ok_baseline)
    return cell


# -- the matrix --------------------------------------------------------------------------------


def run_matrix(
    domains: Sequence[str],
    methods: Sequence[str],
    settings: MatrixSettings,
    presets: Mapping[str, CellPreset] = DEFAULT_PRESETS,
    log: Log = print,
    on_cell: Callable[[dict[str, dict[str, Cell]]], None] | None = None,
) -> dict[str, dict[str, Cell]]:
    """Every cell of ``domains`` x ``methods`` (plus the ``cam`` baseline), finished ones read back.

    ``on_cell`` sees the cells so far after each new one, and before a new one starts where cells
    finished earlier were read since (the CLI rewrites the report there, so a killed matrix still
    leaves a report of everything finished, in this run or before).
    """
    methods = ordered_methods(methods)
    out = Path(settings.out)
    cells: dict[str, dict[str, Cell]] = {d: {} for d in domains}
    total = len(domains) * len(methods)
    done = 0
    unreported = False  # cells read from disk since on_cell last saw the cells
    for domain in domains:
        preset = presets[domain]
        runs: dict[str, TrainedRun | Exception] = {}
        for method in methods:
            done += 1
            tag = f"[{done}/{total}] {domain} x {method}"
            path = cell_path(out, domain, method)
            existing = read_cell(out, domain, method)
            config = cell_config(preset, method, settings)
            if existing is not None and existing["status"] == "ok":
                _check_same(path, existing["config"], config)
            # A failed cell is recomputed when asked to, or when its settings changed (e.g. weights given).
            if existing is not None and (
                existing["status"] == "ok"
                or not (settings.retry_failed or _differences(existing["config"], config))
            ):
                cells[domain][method] = existing
                log(f"{tag}: finished earlier ({_summary(existing)}), skipped")
                unreported = True
                continue
            if unreported and on_cell is not None:
                on_cell(cells)
            unreported = False
            log(f"{tag}: running")
            with progress_bars(settings.progress):
                cell = run_cell(domain, preset, method, settings, cells[domain].get(BASELINE), runs, log)
            cell["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            _write_json(path, cell)
            cells[domain][method] = cell
            log(f"{tag}: {_summary(cell)}")
            if on_cell is not None:
                on_cell(cells)
    return cells


def _summary(cell: Cell) -> str:
    if cell["status"] != "ok":
        return f"FAILED: {cell['error']}"
    miou = cell["miou"]
    text = "mIoU n/a" if miou is None else f"mIoU {miou:.4f}"
    if cell.get("gain_vs_cam") is not None and cell["method"] != BASELINE:
        text += f" ({cell['gain_vs_cam']:+.4f} vs cam)"
    return text + f", {cell['wall_seconds']:.0f} s"
