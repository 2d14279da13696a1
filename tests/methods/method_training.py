"""A few real training steps of a method through the engine's ClassifierTask (shared by the method tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from wsss_domains.methods.base import Method
from wsss_domains.models.classifier import CamClassifier
from wsss_domains.training.task import ClassifierTask

IMAGE_SIZE = 32


class _Squares(Dataset):
    """Normalised 32x32 images with a bright square of class 0 and/or 1 (labels as the engine gives)."""

    def __init__(self, n: int = 4) -> None:
        gen = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 0.1
            label = torch.tensor([1.0, float(i % 2)])
            image[0, 4:16, 4:16] += 2.0
            if label[1]:
                image[2, 16:28, 16:28] += 2.0
            self.items.append({"image": image, "label": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


# timm's ~100k-parameter EfficientNet test model: same stage layout as EfficientNet-Lite0, much faster.
FAST_BACKBONE = "test_efficientnet"


def train_steps(
    method: Method, steps: int = 2, model: CamClassifier | None = None, accumulate: int = 1
) -> tuple[ClassifierTask, dict[str, float], dict[str, torch.Tensor]]:
    """Run ``steps`` optimiser steps of ``method`` on a random-weight classifier (by default the fast
    EfficientNet), each over ``accumulate`` batches of 2; return the task (in eval mode), the values
    logged at the last step and the method modules' initial weights."""
    if model is None:
        model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random")
    task = ClassifierTask(model, method)
    initial = {k: v.clone() for k, v in task.method_modules.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, DataLoader(_Squares(max(4, 2 * steps * accumulate)), batch_size=2))
    assert trainer.global_step == steps
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return task.eval(), logged, initial


def changed(task: ClassifierTask, initial: dict[str, torch.Tensor], prefix: str) -> bool:
    """Whether training moved any weight of the method module ``prefix``."""
    now = task.method_modules.state_dict()
    keys = [k for k in initial if k.startswith(prefix + ".")]
    assert keys, prefix
    return any(not torch.equal(now[k], initial[k]) for k in keys)


def cli_train_and_pseudo_label(
    capsys, tmp_path: Path, method: str, *options: str, steps: int = 3
) -> tuple[Path, str]:
    """``train --method METHOD`` on the fake domain's shapes with the fast backbone, then ``pseudo-labels``
    of its ``val`` split into ``tmp_path/pl``; both must succeed. Returns the run folder and the second
    command's output. The fake domain is registered only for the two commands."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    import fakes
    from cli_helpers import cli

    fakes.register()
    try:
        root = fakes.write_shapes(tmp_path / "data", n_train=4, n_val=3, n_unlabelled=1)
        run = tmp_path / "run"
        fast = ["--backbone", fakes.FAST_BACKBONE, "--weights", "random", "--image-size", "32"]
        fast += ["--batch-size", "2", "--max-steps", str(steps), "--device", "cpu", "--no-progress"]
        code, _, err = cli(capsys, "train", "--domain", fakes.FAKE_DOMAIN, "--data", root, "--out", run,
                           "--method", method, *options, *fast)  # fmt: skip
        assert code == 0, err
        args = ["pseudo-labels", "--run", run, "--data", root, "--split", "val"]
        args += ["--device", "cpu", "--no-progress", "--no-overlays", "--out", tmp_path / "pl"]
        code, out, err = cli(capsys, *args)
        assert code == 0, err
        return run, out
    finally:
        fakes.unregister()
