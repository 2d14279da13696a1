"""Classifier training on the fake data: run folder, resume, seeds, time budget, DDP on CPU."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fakes
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from wsss_domains.training.fit import TrainOptions, train, training_device
from wsss_domains.training.run import MODEL_FILE, RUN_FILE, RunConfig, load_run

STEPS_PER_EPOCH = 3  # 6 training images, batches of 2


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fakes.write_shapes(tmp_path_factory.mktemp("shapes"), n_train=6, n_val=1, n_unlabelled=0)


def run_config(seed: int = 0) -> RunConfig:
    return RunConfig(
        domain=fakes.FAKE_DOMAIN,
        dataset=fakes.DATASET,
        classes=list(fakes.LABEL_SPACE.classes),
        foreground=list(fakes.LABEL_SPACE.foreground_names),
        backbone=fakes.FAST_BACKBONE,
        weights="random",
        image_size=[32, 32],
        seed=seed,
    )


def fit(shapes: Path, out: Path, seed: int = 0, **options):
    settings = {"batch_size": 2, "device": "cpu", "max_epochs": 1, **options}
    return train(
        run_config(seed), fakes.FakeDomain(), fakes.build(shapes, "train"), out, TrainOptions(**settings)
    )


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / MODEL_FILE, map_location="cpu", weights_only=True)


def logged_steps(out: Path) -> list[int]:
    with open(out / "logs" / "metrics.csv", newline="") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh) if row.get("train/loss")]


def test_training_writes_the_run_folder(shapes: Path, tmp_path: Path):
    out = tmp_path / "run"
    trainer = fit(shapes, out)
    assert trainer.global_step == STEPS_PER_EPOCH
    for name in (MODEL_FILE, RUN_FILE, "checkpoints/last.ckpt", "logs/metrics.csv"):
        assert (out / name).is_file(), name
    # the per-epoch and the timed checkpoints share one file, the one a resume reads
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.ckpt"]
    assert logged_steps(out) == [0, 1, 2]  # every step is logged, so even a short run leaves a log
    saved = json.loads((out / RUN_FILE).read_text())
    assert saved["backbone"] == fakes.FAST_BACKBONE and saved["foreground"] == ["red", "blue"]
    config, model, _ = load_run(out)
    assert config == run_config()
    assert not model.training
    for key, value in trainer.lightning_module.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value.cpu(), rtol=0, atol=0)


def test_rerun_with_more_epochs_resumes_from_last_checkpoint(shapes: Path, tmp_path: Path):
    out = tmp_path / "run"
    first = fit(shapes, out, max_epochs=1)
    assert first.global_step == STEPS_PER_EPOCH and first.ckpt_path is None
    after_one = weights(out)
    second = fit(shapes, out, max_epochs=2)
    assert second.ckpt_path == str(out / "checkpoints" / "last.ckpt")
    assert second.global_step == 2 * STEPS_PER_EPOCH  # continued, not restarted
    assert second.current_epoch == 2
    changed = [
        k for k, v in weights(out).items() if v.is_floating_point() and not torch.equal(v, after_one[k])
    ]
    assert changed  # the second epoch trained further
    assert logged_steps(out) == list(range(2 * STEPS_PER_EPOCH))  # the first epoch's log survives
    done = fit(shapes, out, max_epochs=2)  # nothing left to do: no further step
    assert done.global_step == 2 * STEPS_PER_EPOCH
    assert logged_steps(out) == list(range(2 * STEPS_PER_EPOCH))


def test_same_seed_gives_identical_weights_and_another_seed_does_not(shapes: Path, tmp_path: Path):
    a = weights_after(shapes, tmp_path / "a", seed=7)
    b = weights_after(shapes, tmp_path / "b", seed=7)
    c = weights_after(shapes, tmp_path / "c", seed=8)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def weights_after(shapes: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    fit(shapes, out, seed=seed, max_epochs=1)
    return weights(out)


def test_accumulated_batches_take_the_optimiser_step_of_one_larger_batch(shapes, tmp_path, monkeypatch):
    """Two batches of 1 with accumulate_batches=2 give each optimiser step the gradient of one batch
    of 2 (the model's batch norms bypassed: they are the one thing that sees the smaller batch)."""
    import wsss_domains.training.fit as fit_module
    from wsss_domains.training.task import ClassifierTask

    build = fit_module.build_model

    def without_batch_statistics(config: RunConfig) -> torch.nn.Module:
        model = build(config)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.forward = lambda x: x  # type: ignore[method-assign]
        return model

    gradients: list[dict[str, torch.Tensor]] = []

    def record(task: ClassifierTask, optimizer: object) -> None:
        gradients.append({n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None})

    monkeypatch.setattr(fit_module, "build_model", without_batch_statistics)
    monkeypatch.setattr(ClassifierTask, "on_before_optimizer_step", record, raising=False)
    whole = fit(shapes, tmp_path / "whole", batch_size=2)
    split = fit(shapes, tmp_path / "split", batch_size=1, accumulate_batches=2)
    single = fit(shapes, tmp_path / "single", batch_size=1)  # without accumulation: twice the steps
    assert whole.global_step == split.global_step == STEPS_PER_EPOCH
    assert single.global_step == 2 * STEPS_PER_EPOCH
    assert logged_steps(tmp_path / "split") == [0, 1, 2]  # one log row per optimiser step
    assert len(gradients) == 4 * STEPS_PER_EPOCH
    first_whole, first_split, first_single = (
        gradients[0],
        gradients[STEPS_PER_EPOCH],
        gradients[2 * STEPS_PER_EPOCH],
    )
    assert first_whole.keys() == first_split.keys()
    for name, grad in first_whole.items():
        torch.testing.assert_close(first_split[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    head = "head.weight"
    assert not torch.allclose(first_single[head], first_whole[head], rtol=1e-2)  # one image's gradient


def test_accumulate_batches_below_one_is_refused():
    from wsss_domains.errors import UserError

    with pytest.raises(UserError, match="--accumulate-batches must be at least 1"):
        TrainOptions(accumulate_batches=0).check()


def test_max_minutes_stops_an_unbounded_run(shapes: Path, tmp_path: Path):
    out = tmp_path / "run"
    start = time.perf_counter()
    trainer = fit(shapes, out, max_minutes=0.02, max_epochs=None)  # 1.2 s, no epoch limit
    elapsed = time.perf_counter() - start
    assert trainer.max_epochs == -1  # only the clock could stop it
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    assert timer.time_remaining("train") <= 0
    assert trainer.global_step >= 1 and elapsed < 60
    assert (out / MODEL_FILE).is_file() and (out / RUN_FILE).is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()  # a stopped run can be resumed


def test_schedule_progress_follows_a_step_budget_when_no_time_or_epoch_budget_is_set():
    from types import SimpleNamespace

    from wsss_domains.training.task import BudgetCosineSchedule

    trainer = SimpleNamespace(
        callbacks=[], max_epochs=-1, num_training_batches=4, max_steps=40, global_step=10
    )
    assert BudgetCosineSchedule(max_seconds=None)._progress(trainer) == pytest.approx(0.25)  # type: ignore[arg-type]
    trainer.max_steps = -1
    assert BudgetCosineSchedule(max_seconds=None)._progress(trainer) == 0.0  # type: ignore[arg-type]


def test_training_device_is_this_process_gpu_or_the_cpu(monkeypatch):
    """What a method's ``prepare_training`` embeds on: the run's device, the DDP rank's GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("cpu") == training_device("auto") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert training_device("cuda") == torch.device("cuda", 1)
    assert training_device("cpu") == torch.device("cpu")  # --device cpu on a GPU machine stays on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device("auto") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="unknown device"):
        training_device("tpu")


def test_empty_training_set_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="training set is empty"):
        train(run_config(), fakes.FakeDomain(), [], tmp_path / "run", TrainOptions(device="cpu"))
    assert not (tmp_path / "run").exists()


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {fakes_dir!r})
import fakes
import wsss_domains.pipeline.classifier as api
from wsss_domains.cli import main

fakes.register()
real_train = api.train


def recording_train(*args, **kwargs):
    trainer = real_train(*args, **kwargs)
    model = trainer.lightning_module.model
    checksum = sum(float(p.double().abs().sum()) for p in model.parameters())
    record = {{"world_size": trainer.world_size, "global_rank": trainer.global_rank,
              "global_step": trainer.global_step, "checksum": checksum, "pid": os.getpid()}}
    with open(os.path.join({record_dir!r}, f"rank{{trainer.global_rank}}.json"), "w") as fh:
        json.dump(record, fh)
    return trainer


api.train = recording_train
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(shapes: Path, tmp_path: Path):
    """Lightning's ddp launcher re-executes sys.argv, so the CLI runs from a script file."""
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT.format(fakes_dir=str(Path(fakes.__file__).parent), record_dir=str(tmp_path)))
    out = tmp_path / "run"
    cmd = [sys.executable, str(script), "train", "--domain", fakes.FAKE_DOMAIN, "--data", str(shapes)]
    cmd += [
        "--backbone",
        fakes.FAST_BACKBONE,
        "--weights",
        "random",
        "--image-size",
        "32",
        "--batch-size",
        "2",
    ]
    cmd += ["--device", "cpu", "--devices", "2", "--strategy", "ddp", "--max-steps", "2", "--no-progress"]
    cmd += ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_rank"] for r in ranks] == [0, 1]
    assert {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["pid"] != ranks[1]["pid"]  # two processes, not one
    assert {r["global_step"] for r in ranks} == {2}
    # Gradients are all-reduced: both replicas end with the same weights.
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)
    assert (out / MODEL_FILE).is_file() and (out / RUN_FILE).is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert logged_steps(out) == [0, 1]
    final = weights(out)
    total = sum(
        float(v.double().abs().sum())
        for k, v in final.items()
        if "num_batches" not in k and "running" not in k
    )
    assert total == pytest.approx(ranks[0]["checksum"], rel=1e-9)  # rank 0 saved what it trained


KILL_SCRIPT = """
import sys
sys.path.insert(0, {fakes_dir!r})
import fakes
from wsss_domains.cli import main

fakes.register()
sys.exit(main(sys.argv[1:]))
"""


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def _step_or_minus_one(path: Path) -> int:
    """The checkpoint's step, or -1 while there is none or it cannot be read yet."""
    try:
        return _checkpoint_step(path)
    except (OSError, RuntimeError, EOFError):
        return -1


@pytest.mark.slow
def test_train_killed_mid_budget_resumes_past_its_checkpoint_with_its_log(tmp_path: Path):
    """SIGKILL (no clean-up at all) in the middle of a time budget, then the same command again."""
    data = fakes.write_shapes(tmp_path / "data", n_train=40, n_val=1, n_unlabelled=0)  # 20 steps an epoch
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(fakes_dir=str(Path(fakes.__file__).parent)))
    out = tmp_path / "run"
    cmd = [sys.executable, str(script), "train", "--domain", fakes.FAKE_DOMAIN, "--data", str(data)]
    cmd += ["--out", str(out), "--backbone", fakes.FAST_BACKBONE, "--weights", "random", "--image-size", "32"]
    cmd += ["--batch-size", "2", "--device", "cpu", "--no-progress", "--checkpoint-minutes", "0.005"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen([*cmd, "--max-minutes", "10"], env=env)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    # Wait on the checkpoint's own step, not on the log: on a fast machine dozens of steps pass between
    # two time-based checkpoints, so a long log says nothing about how far the checkpoint got.
    while time.monotonic() < deadline and child.poll() is None:
        if _step_or_minus_one(last) >= 10 and (out / "logs" / "metrics.csv").is_file():
            break
        time.sleep(0.2)
    assert child.poll() is None, "training ended before it could be killed"
    child.kill()
    child.wait()
    reached = _checkpoint_step(last)
    before = logged_steps(out)
    assert reached >= 10 and not (out / "model.pt").exists()
    # The same job again, now bounded by steps: it continues from the checkpoint, not from step 0.
    done = subprocess.run([*cmd, "--max-steps", str(reached + 5)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _checkpoint_step(last) == reached + 5
    after = logged_steps(out)
    assert [s for s in after if s < reached] == [s for s in before if s < reached]  # the log before the kill
    assert max(after) >= reached  # and the steps after it
    assert (out / "model.pt").is_file()
