"""Running a training job with Lightning: checkpoints, resume, seed, time budget, DDP."""

from __future__ import annotations

import csv
import logging
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from wsss_domains.data.balance import balanced_sampler, repeat_factors, sample_class_sets
from wsss_domains.data.io import atomic_write
from wsss_domains.domains.contract import DomainPlugin
from wsss_domains.methods.registry import create_method
from wsss_domains.progress import progress_shown
from wsss_domains.settings import setting
from wsss_domains.training.data import TrainingView
from wsss_domains.training.run import RunConfig, build_model, save_model
from wsss_domains.training.task import BudgetCosineSchedule, ClassifierTask

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    max_minutes: float | None = setting(None, help="wall-clock training budget")
    max_epochs: int | None = setting(None, help="epoch limit (default: 10 without --max-minutes)")
    max_steps: int = setting(-1, help="optimiser step limit (-1: none)")
    batch_size: int = setting(32, help="training batch size")
    accumulate_batches: int = setting(
        1,
        metavar="N",
        help="sum the gradients of N batches before each optimiser step: the step sees N x the batch size"
        " while memory holds one batch (for a GPU or machine too small for the batch you want); batch"
        " norms still see one batch, and state a method updates per step (momentum teachers,"
        " re-clustering) is updated once per optimiser step",
    )
    lr: float = setting(1e-3, help="head learning rate (backbone: 0.1x)")
    num_workers: int = setting(0, help="data-loading worker processes")
    device: str = setting("auto", help="cpu, cuda or auto (mixed precision on cuda)")
    devices: int = setting(1, help="processes / GPUs (DDP when > 1)")
    strategy: str = setting("auto", help="Lightning strategy, e.g. ddp")
    balance_classes: float | None = setting(
        None,
        metavar="T",
        help="draw training images of rare classes more often: LVIS repeat-factor sampling, each image at"
        " max(1, sqrt(T / f)) over its classes' image frequencies f (T=1: every class found in fewer than"
        " all images; 0: off; off by default)",
    )
    # Lightning precision; None: bf16 (else fp16) mixed precision on a GPU, full precision on the CPU.
    precision: str | None = None
    # A killed run loses at most these minutes of training.
    checkpoint_minutes: float = setting(
        5.0,
        help="save checkpoints/last.ckpt at least this often (and every epoch); a killed run resumes from it",
    )

    def check(self) -> None:
        """Refuse budgets and sizes that would train nothing or fail deep inside Lightning."""
        from wsss_domains.errors import UserError

        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserError(f"--max-minutes must be positive, got {self.max_minutes}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise UserError(f"--max-epochs must be at least 1, got {self.max_epochs}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"--max-steps must be positive (or -1: no limit), got {self.max_steps}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.accumulate_batches < 1:
            raise UserError(f"--accumulate-batches must be at least 1, got {self.accumulate_batches}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not self.checkpoint_minutes > 0:
            raise UserError(f"--checkpoint-minutes must be positive, got {self.checkpoint_minutes}")
        if self.balance_classes is not None and not self.balance_classes >= 0:
            raise UserError(f"--balance-classes must be positive (or 0: off), got {self.balance_classes}")
        if self.devices < 1 or self.num_workers < 0:
            raise UserError(
                f"--devices must be >= 1 and --num-workers >= 0, got {self.devices}, {self.num_workers}"
            )


def default_precision(accelerator: str) -> str:
    """Mixed precision where a GPU runs it (bf16 where supported: no loss scaling); fp32 elsewhere."""
    if accelerator != "gpu":
        return "32-true"
    import torch

    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def _accelerator(device: str) -> str:
    if device in ("cpu", "cuda", "auto", "mps"):
        return "gpu" if device == "cuda" else device
    raise ValueError(f"unknown device '{device}' (cpu, cuda, auto)")


def training_device(device: str) -> torch.device:
    """The device this process trains on: on a GPU, the one of its DDP rank (``LOCAL_RANK``)."""
    accelerator = _accelerator(device)
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(accelerator)


def train(
    config: RunConfig, domain: DomainPlugin, dataset: Dataset, out: Path, options: TrainOptions
) -> L.Trainer:
    """Train the run's classifier on ``dataset`` (sample dicts), writing everything under ``out``.

    Re-running with the same ``out`` resumes from ``checkpoints/last.ckpt``. Returns the trainer;
    only the global-zero process writes the final ``model.pt`` and ``run.json``.
    """
    out = Path(out)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the training set is empty")
    L.seed_everything(config.seed, workers=True, verbose=False)
    model = build_model(config)
    method = create_method(config.method, **config.method_options)
    method.setup(domain, config.mean, config.std)
    size = tuple(config.image_size)
    unaugmented = TrainingView(dataset, domain, size, config.mean, config.std, augment=False)
    method.prepare_training(unaugmented, training_device(options.device), class_names=list(config.foreground))
    task = ClassifierTask(model, method, lr=options.lr)
    view = TrainingView(dataset, domain, size, config.mean, config.std, augment=True)
    factors = None
    if options.balance_classes:  # None or 0: uniform
        # Training samples carry image-level labels: no label space is needed to read their classes.
        factors = repeat_factors(sample_class_sets(dataset), options.balance_classes)
    trainer = fit_task(task, view, out, options, factors=factors)
    if trainer.is_global_zero:
        save_model(task.model.cpu(), task.method_modules.cpu(), out)
        config.save(out)
    return trainer


def training_loader(
    view: Dataset, options: TrainOptions, factors: Sequence[float] | None = None
) -> DataLoader:
    """Shuffled batches; the last incomplete batch is dropped unless it is the only one.

    ``factors``: each sample's repeat factor (:mod:`wsss_domains.data.balance`), drawn in proportion
    to them instead of shuffled (Lightning shards the draws across DDP processes).
    """
    sampler = None
    if factors is not None:
        if len(factors) != len(view):  # type: ignore[arg-type]
            raise ValueError(f"{len(factors)} repeat factors for {len(view)} samples")  # type: ignore[arg-type]
        sampler = balanced_sampler(factors)
    return DataLoader(
        view,
        batch_size=min(options.batch_size, len(view)),  # type: ignore[arg-type]
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=options.num_workers,
        drop_last=len(view) > options.batch_size,  # type: ignore[arg-type]
        persistent_workers=options.num_workers > 0,
    )


def fit_task(
    task: L.LightningModule,
    view: Dataset,
    out: Path,
    options: TrainOptions,
    val_loader: DataLoader | None = None,
    factors: Sequence[float] | None = None,
) -> L.Trainer:
    """Fit ``task`` on ``view`` under the time/epoch/step budget with checkpoints, log and resume.

    ``factors``: the samples' repeat factors where classes are balanced (see :func:`training_loader`).

    The task's optimiser groups carry ``base_lr`` (the cosine schedule scales them). Re-running
    into the same ``out`` resumes from ``checkpoints/last.ckpt`` and keeps the metrics logged
    before. Mixed precision on CUDA.
    """
    options.check()
    max_seconds = options.max_minutes * 60 if options.max_minutes else None
    callbacks: list[L.Callback] = [
        # Both write checkpoints/last.ckpt, the newer save replacing the older (no last-v1.ckpt that
        # a resume would not read).
        ModelCheckpoint(
            dirpath=out / "checkpoints",
            save_last=True,
            save_top_k=0,
            every_n_epochs=1,
            enable_version_counter=False,
        ),
        ModelCheckpoint(
            dirpath=out / "checkpoints",
            save_last=True,
            save_top_k=0,
            train_time_interval=timedelta(minutes=options.checkpoint_minutes),
            enable_version_counter=False,
        ),
        BudgetCosineSchedule(max_seconds),
    ]
    if max_seconds:
        callbacks.append(Timer(duration=timedelta(seconds=max_seconds), interval="step"))
    max_epochs = options.max_epochs if options.max_epochs is not None else (-1 if max_seconds else 10)
    accelerator = _accelerator(options.device)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=options.devices,
        strategy=options.strategy,
        precision=options.precision or default_precision(accelerator),
        max_epochs=max_epochs,
        max_steps=options.max_steps,
        accumulate_grad_batches=options.accumulate_batches,
        callbacks=callbacks,
        # Flushed every 10 steps: a killed run keeps the log of the steps its checkpoint holds.
        logger=CSVLogger(out, name="logs", version="", flush_logs_every_n_steps=10),
        enable_progress_bar=progress_shown(),
        enable_model_summary=False,
        # Every step: a short run (a few steps, a tiny time budget) must still leave logs/metrics.csv.
        log_every_n_steps=1,
        default_root_dir=out,
        use_distributed_sampler=True,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if val_loader is not None else 0,
    )
    last = out / "checkpoints" / "last.ckpt"
    if last.is_file():
        check_checkpoint(last)
    metrics = out / "logs" / "metrics.csv"
    earlier = _read_metrics(metrics) if last.is_file() else []
    with warnings.catch_warnings():
        # A task that can validate (the segmenter) trains without a validation set unless one is given.
        warnings.filterwarnings("ignore", message=".*validation_step.*no `val_dataloader`")
        trainer.fit(
            task,
            training_loader(view, options, factors),
            val_loader,
            ckpt_path=str(last) if last.is_file() else None,
        )
    if trainer.is_global_zero:
        _restore_earlier_metrics(metrics, earlier)
    return trainer


def check_checkpoint(path: Path) -> None:
    """A checkpoint to resume from must be whole: a truncated or damaged file is named, with the fix.

    torch saves zip archives; every member's checksum is verified (cheap next to a training step).
    """
    from wsss_domains.errors import UserError

    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        damaged = str(exc) or type(exc).__name__
    if damaged is not None:
        raise UserError(
            f"{path}: damaged checkpoint ({damaged}); delete it to train from the start, or use another --out"
        )


def _read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _restore_earlier_metrics(path: Path, earlier: list[dict[str, str]]) -> None:
    """Put back the log rows from before a resume: Lightning's CSV logger deletes metrics.csv on start.

    Rows logged after the checkpoint the run resumed from are dropped: those steps were re-run.
    """
    if not earlier:
        return
    new = _read_metrics(path)
    first = min((int(row["step"]) for row in new if row.get("step")), default=None)
    rows = [row for row in earlier if first is None or not row.get("step") or int(row["step"]) < first] + new
    keys = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
