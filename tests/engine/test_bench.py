"""`wsss-domains bench`: the domain-transfer matrix on the fake domain, resumable, failures recorded."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import fakes
import pytest
import torch
from PIL import Image

# Imported here, not first inside a capsys test: Lightning's log handler keeps the stderr it sees first.
import wsss_domains.training.fit  # noqa: F401
from wsss_domains.cli import EXIT_USAGE, build_parser, main
from wsss_domains.cli.common import CliError, domain_options
from wsss_domains.errors import UserError
from wsss_domains.methods import Method
from wsss_domains.methods.registry import METHODS, register_method
from wsss_domains.models.weights import WeightsNotFound
from wsss_domains.options import MethodOptionError, OptionError
from wsss_domains.transfer_matrix import matrix as bench_matrix
from wsss_domains.transfer_matrix.cli import (
    accumulation_by_method,
    expand_method_groups,
    run_bench,
    scoped_domain_options,
    scoped_method_options,
)
from wsss_domains.transfer_matrix.presets import DEFAULT_PRESETS, CellPreset, load_presets
from wsss_domains.transfer_matrix.report import (
    build_matrix,
    compute_gains,
    per_class_gain,
    plot_heatmap,
    render_markdown,
    where_methods_hurt,
    write_outputs,
)

DOMAIN = "fake"


class NeedsWeights(Method):
    """Stands for a CLIP / SAM method run without its weights: it fails when pseudo-labelling starts."""

    name = "test-needs-weights"

    def __init__(self, sam_checkpoint: str | None = None, clip_weights: str | None = None) -> None:
        super().__init__(sam_checkpoint=sam_checkpoint, clip_weights=clip_weights)

    def extractor(self, model, modules, **kwargs):
        path = self.options.get("clip_weights")
        if path is None or not Path(str(path)).is_file():
            raise WeightsNotFound(f"CLIP weights not available ({path}): pass --clip-weights")
        return super().extractor(model, modules, **kwargs)


class ExtraLoss(Method):
    """A training-time method: it adds a loss, so it must get its own training run."""

    name = "test-extra-loss"

    def training_losses(self, model, modules, batch, outputs):
        return {"zero": 0.0 * outputs["logits"].sum()}


class FixedSignature(Method):
    """A method whose constructor takes named options only: model flags must not reach it."""

    name = "test-fixed-signature"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha=alpha)


TEST_METHODS = (NeedsWeights, ExtraLoss, FixedSignature)


@pytest.fixture(scope="module", autouse=True)
def registered() -> Iterator[None]:
    fakes.register()
    for cls in TEST_METHODS:
        register_method(cls)
    yield
    for cls in TEST_METHODS:
        METHODS.unregister(cls.name)
    fakes.unregister()


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    fakes.write_shapes(tmp_path / "data" / "shapes", n_train=4, n_val=3, n_unlabelled=0)
    return tmp_path / "data"


PRESETS = {
    DOMAIN: CellPreset(
        domain=fakes.FAKE_DOMAIN,
        dataset=fakes.DATASET,
        path="shapes",
        train_split="train",
        score_split="val",
        backbone=fakes.FAST_BACKBONE,
        weights="random",
        image_size=32,
        batch_size=2,
        max_steps=2,
        scales=(1.0,),
    )
}


def bench(
    out: Path, data_root: Path, methods: str, *extra: str, presets: dict = PRESETS, in_child: bool = False
) -> int:
    """`bench` on the fake domain; in this process unless ``in_child`` (a spawned child would not
    have the fake domain, the test methods or the monkeypatches registered here)."""
    argv = ["bench", "--methods", methods, "--domains", ",".join(presets), "--budget-minutes", "1"]
    argv += ["--out", str(out), "--data-root", str(data_root), "--device", "cpu", *extra]
    argv += [] if in_child else ["--in-process"]
    return run_bench(build_parser().parse_args(argv), presets=presets)


def cell(out: Path, method: str) -> dict[str, Any]:
    return json.loads((out / "cells" / f"{DOMAIN}__{method}.json").read_text())


# -- end to end on the fake domain ------------------------------------------------------------


def test_one_domain_two_methods_writes_table_json_and_heatmap(tmp_path, data_root):
    out = tmp_path / "matrix"
    assert bench(out, data_root, "cam,par") == 0

    cam, par = cell(out, "cam"), cell(out, "par")
    for c in (cam, par):
        assert c["status"] == "ok" and c["error"] is None
        assert 0.0 <= c["miou"] <= 1.0
        assert set(c["per_class_iou"]) == {"background", "red", "blue"}
        assert c["n_images"] == 3 and c["pseudo_labels"]["written"] == 3
        assert c["wall_seconds"] == pytest.approx(c["train_seconds"] + c["pseudo_label_seconds"])
        if Path("/proc/self/clear_refs").exists():  # peak memory per stage, measured (Linux)
            train_peak, pl_peak = c["train_peak_rss_bytes"], c["pseudo_label_peak_rss_bytes"]
            assert 10**7 < train_peak < 10**11 and 10**7 < pl_peak < 10**11
            assert c["peak_rss_bytes"] == max(train_peak, pl_peak)
        assert c["peak_gpu_bytes"] is None  # cpu
    # par is post-hoc: it reuses the cam run (same training time) and only one run was trained.
    assert par["trained_with"] == "cam" and par["train_run"] == cam["train_run"] == "runs/fake__cam"
    assert par["train_seconds"] == cam["train_seconds"]
    assert par["train_peak_rss_bytes"] == cam["train_peak_rss_bytes"]  # the shared run's peak
    assert [p.name for p in (out / "runs").iterdir()] == ["fake__cam"]
    assert par["gain_vs_cam"] == pytest.approx(par["miou"] - cam["miou"])
    assert "--max-minutes 1" in cam["train_command"] and "--max-steps 2" in cam["train_command"]

    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["domains"] == [DOMAIN] and matrix["methods"] == ["cam", "par"]
    assert matrix["gains_vs_cam"][DOMAIN] == {"cam": 0.0, "par": pytest.approx(par["miou"] - cam["miou"])}
    assert matrix["machine"]["nproc"] >= 1 and matrix["machine"]["cpu_model"]

    md = (out / "matrix.md").read_text()
    assert f"Command: `wsss-domains bench --methods cam,par --domains {DOMAIN} --budget-minutes 1" in md
    assert f"{matrix['machine']['nproc']} usable CPUs" in md and matrix["machine"]["cpu_model"] in md
    assert f"| `cam` | {100 * cam['miou']:.1f} (base) |" in md
    assert f"| `par` | {100 * par['miou']:.1f} ({100 * (par['miou'] - cam['miou']):+.1f}) |" in md
    assert "## Where methods hurt" in md and "## Wall time" in md and "## Peak memory" in md
    if par["miou"] < cam["miou"]:
        assert f"`par` on `{DOMAIN}`" in md

    with Image.open(out / "heatmap.png") as png:
        assert png.format == "PNG" and png.width > 100 and png.height > 100
    assert "Method comparison" in (out / "matrix.html").read_text()

    # Different settings in the same folder are refused rather than mixed into the table.
    with pytest.raises(CliError, match="other settings.*budget_minutes"):
        bench(out, data_root, "cam,par", "--budget-minutes", "2")


def test_killed_matrix_resumes_skipping_finished_cells(tmp_path, data_root, monkeypatch):
    out = tmp_path / "matrix"
    real = bench_matrix.pseudo_label_and_score

    def killed_in_par(*args, **kwargs):
        if kwargs.get("method_name") == "par":
            raise KeyboardInterrupt  # a kill, not a cell failure: nothing is recorded for par
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_matrix, "pseudo_label_and_score", killed_in_par)
    with pytest.raises(KeyboardInterrupt):
        bench(out, data_root, "cam,par")
    done = out / "cells" / f"{DOMAIN}__cam.json"
    model = out / "runs" / "fake__cam" / "model.pt"
    assert done.is_file() and not (out / "cells" / f"{DOMAIN}__par.json").exists()
    # The report was already written after the first cell, with the unfinished one marked.
    assert "not run" in (out / "matrix.md").read_text()
    stamps = done.stat().st_mtime_ns, model.stat().st_mtime_ns

    # Killed again, with the report gone: the cell finished before is in the report written before par.
    (out / "matrix.md").unlink()
    with pytest.raises(KeyboardInterrupt):
        bench(out, data_root, "cam,par")
    assert (
        f"| `cam` | {100 * json.loads(done.read_text())['miou']:.1f} (base) |"
        in (out / "matrix.md").read_text()
    )

    monkeypatch.setattr(bench_matrix, "pseudo_label_and_score", real)
    assert bench(out, data_root, "cam,par") == 0
    assert (done.stat().st_mtime_ns, model.stat().st_mtime_ns) == stamps  # neither recomputed nor retrained
    assert cell(out, "par")["status"] == "ok"
    assert json.loads((out / "runs" / "fake__cam" / "bench-train.json").read_text())["attempts"] == 1
    assert "| `par` | failed" not in (out / "matrix.md").read_text()


def test_training_killed_after_its_checkpoint_is_resumed_not_restarted(
    tmp_path, data_root, monkeypatch, capsys
):
    out = tmp_path / "matrix"
    real = bench_matrix.train_classifier

    def killed_after_training(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_matrix, "train_classifier", killed_after_training)
    with pytest.raises(KeyboardInterrupt):
        bench(out, data_root, "cam")
    run = out / "runs" / "fake__cam"
    state = json.loads((run / "bench-train.json").read_text())
    assert (run / "checkpoints" / "last.ckpt").is_file() and not state["done"] and state["attempts"] == 1
    assert not (out / "cells").exists()
    if Path("/proc/self/clear_refs").exists():
        assert state["peak_rss_bytes"] > 10**7  # measured though the attempt was interrupted
    # Peak memory over attempts is the largest one: pretend the first attempt needed 1 TB.
    (run / "bench-train.json").write_text(json.dumps(state | {"peak_rss_bytes": 10**12}))

    monkeypatch.setattr(bench_matrix, "train_classifier", real)
    before = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    capsys.readouterr()
    assert bench(out, data_root, "cam") == 0
    assert "resuming fake__cam" in capsys.readouterr().out
    state = json.loads((run / "bench-train.json").read_text())
    assert state["done"] and state["attempts"] == 2
    assert cell(out, "cam")["train_seconds"] == pytest.approx(state["seconds"])
    if Path("/proc/self/clear_refs").exists():
        assert state["peak_rss_bytes"] == cell(out, "cam")["train_peak_rss_bytes"] == 10**12
    # Resumed at the step cap from last.ckpt: a restart would have trained and rewritten it.
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory needs Linux /proc")
def test_training_killed_before_its_first_checkpoint_restarts_and_its_peak_is_measured_afresh(
    tmp_path, data_root, monkeypatch
):
    out = tmp_path / "matrix"

    def killed_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_matrix, "train_classifier", killed_at_once)
    with pytest.raises(KeyboardInterrupt):
        bench(out, data_root, "cam")
    state_path = out / "runs" / "fake__cam" / "bench-train.json"
    # As a version that did not measure memory would have left it.
    state_path.write_text(json.dumps(json.loads(state_path.read_text()) | {"peak_rss_bytes": None}))
    monkeypatch.undo()
    assert bench(out, data_root, "cam") == 0
    assert json.loads(state_path.read_text())["attempts"] == 2
    assert cell(out, "cam")["train_peak_rss_bytes"] > 10**7


def test_failing_cell_is_recorded_and_training_methods_get_their_own_run(tmp_path, data_root, capsys):
    out = tmp_path / "matrix"
    methods = f"par,{NeedsWeights.name},{ExtraLoss.name}"
    missing = tmp_path / "no-such-weights.pt"
    assert bench(out, data_root, methods, "--clip-weights", str(missing)) == 0

    failed = cell(out, NeedsWeights.name)
    assert failed["status"] == "failed" and "miou" not in failed
    assert failed["error"].startswith("WeightsNotFound: CLIP weights not available")
    assert failed["weights_missing"] is True  # shown as such, not as the method's fault
    # Model flags reach the methods that take them, not plain CAM or the refiners.
    assert failed["config"]["method_options"] == {"clip_weights": str(missing)}
    assert cell(out, "par")["config"]["method_options"] == {}
    assert cell(out, "par")["status"] == "ok" and cell(out, ExtraLoss.name)["status"] == "ok"
    assert cell(out, ExtraLoss.name)["trained_with"] == ExtraLoss.name
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["fake__cam", f"fake__{ExtraLoss.name}"]

    md = (out / "matrix.md").read_text()
    assert f"| `{NeedsWeights.name}` | weights not available |" in md
    assert f"- `{NeedsWeights.name}` on `{DOMAIN}`: WeightsNotFound: CLIP weights not available" in md
    assert "1 of 4 cells failed (1 for want of pretrained weights" in capsys.readouterr().out

    # A re-run keeps the recorded failure; --retry-failed computes it again.
    path = out / "cells" / f"{DOMAIN}__{NeedsWeights.name}.json"
    stamp = path.stat().st_mtime_ns
    assert bench(out, data_root, methods, "--clip-weights", str(missing)) == 0
    assert path.stat().st_mtime_ns == stamp
    assert bench(out, data_root, methods, "--clip-weights", str(missing), "--retry-failed") == 0
    assert path.stat().st_mtime_ns != stamp and cell(out, NeedsWeights.name)["status"] == "failed"


def test_failed_training_fails_the_cells_sharing_it_and_the_matrix_goes_on(tmp_path, data_root):
    out = tmp_path / "matrix"
    broken = replace(PRESETS[DOMAIN], train_split="no-such-split")
    presets = {"broken": broken, DOMAIN: PRESETS[DOMAIN]}
    assert bench(out, data_root, "cam,par", presets=presets) == 0
    for method in ("cam", "par"):
        failed = json.loads((out / "cells" / f"broken__{method}.json").read_text())
        assert failed["status"] == "failed" and failed["weights_missing"] is False
        assert (
            failed["error"].startswith("training the cam run failed: ") and "no-such-split" in failed["error"]
        )
    assert cell(out, "par")["status"] == "ok"  # the next domain still ran
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["gains_vs_cam"]["broken"] == {"cam": None, "par": None}


REAL_TRAIN, REAL_PSEUDO_LABEL = bench_matrix.train_classifier, bench_matrix.pseudo_label_and_score


def train_in_child(domain, data, run, **kwargs):
    """Training as a spawned child runs it: the fake domain registered first; the `hungry` column's
    run is killed as the kernel's out-of-memory killer would kill it (SIGKILL, no clean-up)."""
    assert multiprocessing.parent_process() is not None  # a child, not the bench process
    fakes.register()
    if Path(run).name.startswith("hungry__"):
        os.kill(os.getpid(), signal.SIGKILL)
    return REAL_TRAIN(domain, data, run, **kwargs)


def pseudo_label_in_child(*args, **kwargs):
    assert multiprocessing.parent_process() is not None
    fakes.register()
    return REAL_PSEUDO_LABEL(*args, **kwargs)


@pytest.mark.slow
def test_a_stage_killed_for_memory_fails_its_cells_and_the_matrix_goes_on(tmp_path, data_root, monkeypatch):
    out = tmp_path / "matrix"
    monkeypatch.setattr(bench_matrix, "train_classifier", train_in_child)
    monkeypatch.setattr(bench_matrix, "pseudo_label_and_score", pseudo_label_in_child)
    presets = {"hungry": PRESETS[DOMAIN], DOMAIN: PRESETS[DOMAIN]}
    assert bench(out, data_root, "cam,par", presets=presets, in_child=True) == 0

    for method in ("cam", "par"):
        failed = json.loads((out / "cells" / f"hungry__{method}.json").read_text())
        assert failed["status"] == "failed" and failed["weights_missing"] is False
        assert failed["error"].startswith("training the cam run failed: StageKilled: ")
        assert "killed by SIGKILL" in failed["error"] and "out-of-memory killer" in failed["error"]
        assert failed["error"].endswith("(`--accumulate-batches cam=2` holds 1/2 of the batch at a time)")
    state = json.loads((out / "runs" / "hungry__cam" / "bench-train.json").read_text())
    assert state["attempts"] == 1 and not state["done"] and state["peak_rss_bytes"] is None
    # The next column trained and pseudo-labelled in children of its own, its memory measured there.
    for method in ("cam", "par"):
        assert cell(out, method)["status"] == "ok" and cell(out, method)["n_images"] == 3
    if Path("/proc/self/clear_refs").exists():
        assert 10**7 < cell(out, "cam")["train_peak_rss_bytes"] < 10**11
        assert 10**7 < cell(out, "par")["pseudo_label_peak_rss_bytes"] < 10**11
    assert "out-of-memory killer" in (out / "matrix.md").read_text()


# -- gains and report, against hand values ----------------------------------------------------


def ok(method: str, miou: float, **per_class: float) -> dict[str, Any]:
    return {
        "method": method,
        "status": "ok",
        "miou": miou,
        "per_class_iou": per_class,
        "train_seconds": 60.0,
        "pseudo_label_seconds": 5.0,
        "wall_seconds": 65.0,
        "train_peak_rss_bytes": 1_500_000_000,
        "pseudo_label_peak_rss_bytes": 800_000_000,
        "peak_rss_bytes": 1_500_000_000,
        "peak_gpu_bytes": None,
    }


HAND_CELLS = {
    "d1": {
        "cam": ok("cam", 0.40, a=0.50, b=0.30),
        "par": ok("par", 0.45, a=0.60, b=0.30),
        "crf": ok("crf", 0.30, a=0.45, b=0.15),
        "sepl": {"method": "sepl", "status": "failed", "error": "FileNotFoundError: no SAM checkpoint"},
    },
    "d2": {
        "cam": {"method": "cam", "status": "failed", "error": "ValueError: boom"},
        "par": ok("par", 0.20, a=0.20),
    },
}


def test_gains_against_hand_values():
    gains = compute_gains(HAND_CELLS)
    assert gains["d1"]["cam"] == 0.0
    assert gains["d1"]["par"] == pytest.approx(0.05)
    assert gains["d1"]["crf"] == pytest.approx(-0.10)
    assert gains["d1"]["sepl"] is None  # failed cell
    assert gains["d2"] == {"cam": None, "par": None}  # no baseline to compare with
    assert per_class_gain(HAND_CELLS["d1"]["crf"], HAND_CELLS["d1"]["cam"]) == {
        "a": pytest.approx(-0.05),
        "b": pytest.approx(-0.15),
    }
    undefined = ok("par", math.nan)
    assert compute_gains({"d": {"cam": ok("cam", 0.4), "par": undefined}})["d"]["par"] is None

    hurt = where_methods_hurt(HAND_CELLS, ["cam", "par", "crf", "sepl"], ["d1", "d2"])
    assert hurt == [
        "`crf` on `d1`: -10.0 mIoU points (30.0 vs 40.0 for cam); classes hurt most: b -15.0, a -5.0"
    ]


def test_report_tables_and_heatmap_from_hand_values(tmp_path):
    presets = {d: DEFAULT_PRESETS["histo"].to_dict() for d in HAND_CELLS}
    machine = {"nproc": 2, "cpu_count": 64, "cpu_model": "Test CPU", "device": "cpu"}
    machine |= {"torch": torch.__version__, "torch_threads": 2, "platform": "test"}
    methods, domains = ["cam", "par", "crf", "sepl"], ["d1", "d2"]
    matrix = build_matrix(HAND_CELLS, domains, methods, "wsss-domains bench ...", machine, presets, 3.0)
    md = render_markdown(matrix)
    assert "| `cam` | 40.0 (base) | failed |" in md
    assert "| `par` | 45.0 (+5.0) | 20.0 (no cam) |" in md
    assert "| `crf` | 30.0 (-10.0) | not run |" in md
    assert "| `sepl` | failed | not run |" in md
    assert "- `crf` on `d1`: -10.0 mIoU points" in md
    assert "- `sepl` on `d1`: FileNotFoundError: no SAM checkpoint" in md
    assert "- `cam` on `d2`: ValueError: boom" in md
    assert "| `par` | 60.0 + 5.0 = 65.0 | 60.0 + 5.0 = 65.0 |" in md
    assert "## Peak memory" in md and "| `par` | 1.50 / 0.80 | 1.50 / 0.80 |" in md
    assert "| `sepl` | — | — |" in md.split("## Peak memory")[1]
    # A cell finished before bench measured memory, and one that used a GPU.
    older = {k: v for k, v in ok("cam", 0.4).items() if "peak" not in k}
    gpu = ok("par", 0.4) | {"peak_gpu_bytes": 3_210_000_000, "pseudo_label_peak_rss_bytes": None}
    split = ok("seam", 0.4) | {"config": {"train": {"batch_size": 32, "accumulate_batches": 4}}}
    mixed = build_matrix(
        {"d1": {"cam": older, "par": gpu, "seam": split}}, ["d1"], ["cam", "par", "seam"], "cmd", machine,
        presets, 3.0,
    )  # fmt: skip
    memory = render_markdown(mixed).split("## Peak memory")[1]
    assert "| `cam` | not recorded |" in memory and "| `par` | 1.50 / ? (GPU 3.21) |" in memory
    assert "| `seam` | 1.50 / 0.80, batch 8 x 4 |" in memory  # a run with --accumulate-batches says so
    assert "2 usable CPUs (nproc; 64 on the host), Test CPU" in md
    json.dumps(matrix, allow_nan=False)  # matrix.json never holds NaN

    png = plot_heatmap(matrix, tmp_path / "heatmap.png")
    with Image.open(png) as image:
        assert image.format == "PNG"

    no_hurt = {"d1": {"cam": ok("cam", 0.4), "par": ok("par", 0.4)}}
    matrix = build_matrix(no_hurt, ["d1"], ["cam", "par"], "cmd", machine, presets, 3.0)
    assert "No method scored below plain CAM" in render_markdown(matrix)


def test_matrix_html_holds_comparison_costs_heatmap_and_machine(tmp_path):
    presets = {d: DEFAULT_PRESETS["histo"].to_dict() for d in HAND_CELLS}
    machine = {"nproc": 2, "cpu_count": 64, "cpu_model": "Test <CPU>", "device": "cpu"}
    machine |= {"torch": torch.__version__, "torch_threads": 2, "platform": "test"}
    methods, domains = ["cam", "par", "crf", "sepl"], ["d1", "d2"]
    command = "wsss-domains bench --methods cam,par,crf,sepl --out 'a&b'"
    matrix = build_matrix(HAND_CELLS, domains, methods, command, machine, presets, 3.0)
    paths = write_outputs(tmp_path, matrix)
    assert paths["html"] == tmp_path / "matrix.html"
    page = paths["html"].read_text()
    assert '<span class="bad">-10.0</span>' in page and '<span class="good">+5.0</span>' in page
    assert '<th class="num">training s</th>' in page and '<th class="num">wall s</th>' in page
    assert '<th class="num">peak memory GB</th>' in page and ">1.50</td>" in page
    assert '<th class="num">peak GPU GB</th>' not in page  # no cell used a GPU
    assert '<th class="num">scoring s</th>' not in page  # a cost no cell has gets no column
    assert "<li><code>crf</code> on <code>d1</code>: -10.0 mIoU points" in page  # where methods hurt
    assert "FileNotFoundError: no SAM checkpoint" in page  # failed cells
    assert "data:image/png;base64," in page  # the heatmap, embedded
    assert "Test &lt;CPU&gt;" in page and "--out &#x27;a&amp;b&#x27;</pre>" in page


# -- the command line -------------------------------------------------------------------------


def test_unknown_method_or_domain_is_a_usage_error_listing_the_known_ones(capsys, tmp_path):
    assert (
        main(["bench", "--methods", "cam,nope", "--domains", "histo", "--out", str(tmp_path)]) == EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert "unknown method(s) 'nope'; known: cam," in err and "par" in err
    assert (
        main(["bench", "--methods", "par", "--domains", "histo,mars", "--out", str(tmp_path)]) == EXIT_USAGE
    )
    assert (
        "unknown domain(s) 'mars'; known: histo, driving, remote-sensing, dubai, coco"
        in capsys.readouterr().err
    )
    code = main(["bench", "--methods", "par", "--domains", "histo", "--data-root", str(tmp_path / "none")])
    assert code == EXIT_USAGE and "data of domain 'histo' not found" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_method_groups_expand_to_the_registrys_methods_of_their_kind():
    known = ["cam", "par", "seam", "crf", ExtraLoss.name, NeedsWeights.name]
    # seam and the extra-loss method train their own classifier; par, crf and needs-weights act post hoc.
    assert expand_method_groups("par,training-time", known) == f"par,seam,{ExtraLoss.name}"
    assert expand_method_groups("post-hoc", known) == f"cam,par,crf,{NeedsWeights.name}"
    assert expand_method_groups("all, cam+par", known) == ",".join(known) + ",cam+par"
    assert expand_method_groups("all", [*known, "all"]) == "all"  # a method of a group's name wins
    args = build_parser().parse_args(["bench", "--methods", "cam,training-time", "--domains", "histo"])
    assert args.methods == "cam,training-time"  # expanded at run time, against the registry then


def test_method_options_are_scoped_and_checked():
    # unscoped: to every method that takes the option (plain CAM takes none)
    options = scoped_method_options(["cam", "cam-proto"], ["fuse_weight=0.7"], {"clip_weights": None})
    assert options == {"cam-proto": {"fuse_weight": 0.7}}
    options = scoped_method_options(["cam-proto", "seed-probe"], ["seed-probe.fuse_weight=0.2"], {})
    assert options == {"seed-probe": {"fuse_weight": 0.2}}
    methods = ["cam", "par", NeedsWeights.name, FixedSignature.name]
    options = scoped_method_options(
        methods, [f"{FixedSignature.name}.alpha=0.5"], {"sam_checkpoint": Path("s.pt")}
    )
    assert options == {NeedsWeights.name: {"sam_checkpoint": "s.pt"}, FixedSignature.name: {"alpha": 0.5}}
    with pytest.raises(CliError, match="'crf' is not in this matrix"):
        scoped_method_options(["cam", "par"], ["crf.num_iter=3"], {})
    with pytest.raises(CliError, match="expects"):
        scoped_method_options(["cam"], ["num_iter"], {})
    with pytest.raises(CliError, match="no method of this matrix takes option 'fuse_wieght'"):
        scoped_method_options(["cam", "cam-proto"], ["fuse_wieght=0.7"], {})
    with pytest.raises(CliError, match="with a dot"):
        scoped_method_options(["cam-proto"], ["cam-proto:fuse_weight=0.7"], {})
    # a misspelt scoped option or an ill-typed value fails before any cell runs, naming the known options
    with pytest.raises(MethodOptionError, match="'cam-proto' has no option 'fuse_wieght'.*fuse_weight"):
        scoped_method_options(["cam-proto"], ["cam-proto.fuse_wieght=0.7"], {})
    with pytest.raises(MethodOptionError, match="option 'stage' expects int, got 'deep'"):
        scoped_method_options(["cam-proto"], ["cam-proto.stage=deep"], {})


def test_domain_options_are_scoped_to_columns_checked_and_reach_the_training_command(tmp_path):
    columns = ["histo", "driving"]
    expected = {"histo": {"stain": "macenko"}}  # driving takes no option: only histo gets it
    assert scoped_domain_options(columns, DEFAULT_PRESETS, ["stain=macenko"]) == expected
    assert scoped_domain_options(columns, DEFAULT_PRESETS, ["histo.stain=macenko"]) == expected
    assert scoped_domain_options(columns, DEFAULT_PRESETS, []) == {}
    with pytest.raises(CliError, match="no domain of this matrix takes option 'stian'"):
        scoped_domain_options(columns, DEFAULT_PRESETS, ["stian=macenko"])
    with pytest.raises(CliError, match="'coco' is not in this matrix"):
        scoped_domain_options(columns, DEFAULT_PRESETS, ["coco.stain=macenko"])
    with pytest.raises(OptionError, match="option 'stain' expects 'none' | 'macenko', got 'reinhard'"):
        scoped_domain_options(columns, DEFAULT_PRESETS, ["histo.stain=reinhard"])
    plain = DEFAULT_PRESETS["histo"]
    stained = replace(plain, domain_options={"stain": "macenko"})
    settings = bench_matrix.MatrixSettings(out=tmp_path, data_root=tmp_path, budget_minutes=1.0)
    argv = bench_matrix.train_argv(stained, "cam", tmp_path / "run", settings)
    assert domain_options(build_parser().parse_args(argv)) == {"stain": "macenko"}  # the recorded command
    assert bench_matrix.train_config(stained, "cam", settings)["domain_options"] == {"stain": "macenko"}
    assert "domain_options" not in bench_matrix.train_config(
        plain, "cam", settings
    )  # old runs keep their key
    assert stained.to_dict()["domain_options"] == {"stain": "macenko"}


def test_presets_score_tiles_only_where_asked():
    assert {"histo", "driving", "remote-sensing", "dubai", "coco"} <= set(DEFAULT_PRESETS)
    assert DEFAULT_PRESETS["remote-sensing"].score_options() == {"labels_from_masks": True, "patch_size": 256}
    assert DEFAULT_PRESETS["histo"].score_options() == {}
    assert DEFAULT_PRESETS["histo"].train_options() == {"labels_from_masks": True, "patch_size": 224}


def test_a_presets_file_of_ones_own_and_its_errors(tmp_path):
    own = tmp_path / "presets.yaml"
    own.write_text(
        "mine:\n  domain: histo\n  dataset: wsss4luad\n  path: my/rois\n  train_split: a\n"
        "  score_split: b\n  scales: [1, 0.5]\n  patch_size: 128\n  labels_from_masks: true\n"
    )
    [(name, preset)] = load_presets(own).items()
    assert name == "mine" and preset.scales == (1.0, 0.5) and preset.data(tmp_path) == tmp_path / "my/rois"
    assert preset.train_options() == {"labels_from_masks": True, "patch_size": 128}
    own.write_text("mine:\n  domain: histo\n  datset: wsss4luad\n")
    with pytest.raises(UserError, match="preset 'mine': unknown field.s. datset; missing dataset, path"):
        load_presets(own)
    own.write_text("- histo\n")
    with pytest.raises(UserError, match="maps preset names to their fields"):
        load_presets(own)


def test_random_patches_reach_training_and_its_fingerprint_only_when_set(tmp_path):
    settings = bench_matrix.MatrixSettings(out=tmp_path, data_root=tmp_path, budget_minutes=1.0)
    grid = DEFAULT_PRESETS["dubai"]
    drawn = replace(grid, random_patches=16)
    assert "--random-patches" not in bench_matrix.train_argv(grid, "cam", tmp_path, settings)
    argv = bench_matrix.train_argv(drawn, "cam", tmp_path, settings)
    assert argv[argv.index("--random-patches") + 1] == "16"
    assert "random_patches" not in bench_matrix.train_config(grid, "cam", settings)  # old runs stay valid
    assert bench_matrix.train_config(drawn, "cam", settings)["random_patches"] == 16
    assert drawn.train_options()["random_patches"] == 16


def test_accumulation_splits_the_columns_batch_for_the_methods_named(tmp_path):
    presets, columns = DEFAULT_PRESETS, ["histo", "coco"]  # both train at batch 32
    methods = ["cam", "seam", "cam-proto"]
    assert accumulation_by_method(methods, ["seam=4"], presets, columns) == {"seam": 4}
    assert accumulation_by_method(methods, ["2"], presets, columns) == {"cam": 2, "seam": 2}  # training ones
    assert accumulation_by_method(methods, ["2", "cam=1"], presets, columns) == {"seam": 2}
    for bad, message in [
        ("seam=0", "N >= 1"),
        ("seam=two", "N >= 1"),
        ("sipe=2", "'sipe' is not in this matrix"),
        ("cam-proto=2", "cam-proto trains no classifier of its own"),
        ("seam=3", "must divide the batch size of column 'histo' .32."),
    ]:
        with pytest.raises(CliError, match=message):
            accumulation_by_method(methods, [bad], presets, columns)
    settings = bench_matrix.MatrixSettings(
        out=tmp_path, data_root=tmp_path, budget_minutes=1.0, accumulate_batches={"seam": 4}
    )
    preset = presets["coco"]
    argv = bench_matrix.train_argv(preset, "seam", tmp_path / "run", settings)
    args = build_parser().parse_args(argv)  # the recorded command asks for the same training
    assert (args.batch_size, args.accumulate_batches) == (8, 4)
    trained = bench_matrix.train_settings(preset, "seam", settings)
    assert (trained.batch_size, trained.accumulate_batches) == (8, 4)
    config = bench_matrix.train_config(preset, "seam", settings)
    assert config["batch_size"] == 32 and config["accumulate_batches"] == 4  # another run than seam at 32
    plain = bench_matrix.train_config(preset, "cam", settings)
    assert "accumulate_batches" not in plain  # runs made before the option keep their fingerprint
    assert "--accumulate-batches" not in bench_matrix.train_argv(preset, "cam", tmp_path, settings)


@pytest.mark.realdata
def test_remote_sensing_presets_hold_out_whole_scenes(shared_data):
    from wsss_domains.pipeline.data import open_dataset

    for key in ("remote-sensing", "dubai"):
        p = DEFAULT_PRESETS[key]
        root = p.data(shared_data)
        train = open_dataset(p.domain, p.dataset, root, p.train_split, **p.train_options()).dataset
        score = open_dataset(p.domain, p.dataset, root, p.score_split, **p.score_options()).dataset
        scenes = [{s["id"].split("@")[0] for s in (d[i] for i in range(len(d)))} for d in (train, score)]
        assert scenes[0] and scenes[1] and not scenes[0] & scenes[1], key
