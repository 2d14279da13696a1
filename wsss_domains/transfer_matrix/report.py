"""The matrix as people read it: Markdown tables, ``matrix.json``, a gain heatmap and ``matrix.html``.

Gains are differences of mIoU against the plain-CAM cell of the same domain (same classifier for
post-hoc methods), so a negative number means the method made the pseudo-labels worse there. The
report lists those cases explicitly rather than leaving them to be spotted in a table.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import wsss_domains
from wsss_domains.data.io import atomic_write
from wsss_domains.reports.environment import cpu_model, usable_cpus
from wsss_domains.reports.html import (
    Html,
    code_spans,
    embed,
    environment_block,
    esc,
    join,
    page,
    section,
    table,
    tag,
)

BASELINE = "cam"
Cell = Mapping[str, Any]
Cells = Mapping[str, Mapping[str, Cell]]  # domain -> method -> cell


def gain(value: float | None, base: float | None) -> float | None:
    """``value - base``; None when either is missing or undefined (NaN)."""
    if value is None or base is None or math.isnan(value) or math.isnan(base):
        return None
    return float(value) - float(base)


def _ok(cell: Cell | None) -> bool:
    return cell is not None and cell.get("status") == "ok"


def per_class_gain(cell: Cell, baseline: Cell | None) -> dict[str, float | None]:
    """Per-class IoU gain over the baseline cell, for the classes both scored."""
    if not (_ok(cell) and _ok(baseline)):
        return {}
    base = baseline["per_class_iou"]  # type: ignore[index]
    return {name: gain(iou, base.get(name)) for name, iou in cell["per_class_iou"].items() if name in base}


def compute_gains(cells: Cells) -> dict[str, dict[str, float | None]]:
    """domain -> method -> mIoU gain over that domain's ``cam`` cell (None: failed or no baseline)."""
    out: dict[str, dict[str, float | None]] = {}
    for domain, row in cells.items():
        base = row.get(BASELINE)
        base_miou = base["miou"] if _ok(base) else None
        out[domain] = {m: gain(c["miou"], base_miou) if _ok(c) else None for m, c in row.items()}
    return out


def where_methods_hurt(cells: Cells, methods: Sequence[str], domains: Sequence[str]) -> list[str]:
    """One line per (method, domain) whose mIoU fell below plain CAM, worst first, with the classes hurt."""
    gains = compute_gains(cells)
    hurt = []
    for domain in domains:
        for method in methods:
            g = gains.get(domain, {}).get(method)
            if method == BASELINE or g is None or g >= 0:
                continue
            cell, base = cells[domain][method], cells[domain][BASELINE]
            classes = sorted(
                ((v, k) for k, v in per_class_gain(cell, base).items() if v is not None and v < 0)
            )
            worst = ", ".join(f"{name} {100 * v:+.1f}" for v, name in classes[:3])
            line = (
                f"`{method}` on `{domain}`: {100 * g:+.1f} mIoU points "
                f"({100 * cell['miou']:.1f} vs {100 * base['miou']:.1f} for cam)"
            )
            hurt.append((g, line + (f"; classes hurt most: {worst}" if worst else "")))
    return [line for _, line in sorted(hurt, key=lambda item: item[0])]


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the timings depend on: usable CPUs (as ``nproc`` counts them), CPU model, torch, device."""
    import torch

    info: dict[str, Any] = {
        "nproc": usable_cpus(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "wsss_domains": wsss_domains.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def build_matrix(
    cells: Cells,
    domains: Sequence[str],
    methods: Sequence[str],
    command: str,
    machine: Mapping[str, Any],
    presets: Mapping[str, Mapping[str, Any]],
    budget_minutes: float,
) -> dict[str, Any]:
    """The JSON document of the matrix (cells without their confusion matrices: see cells/)."""
    slim = {
        d: {m: {k: v for k, v in c.items() if k != "evaluation"} for m, c in cells[d].items()}
        for d in domains
    }
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": dict(machine),
        "budget_minutes": budget_minutes,
        "domains": list(domains),
        "methods": list(methods),
        "presets": {d: dict(presets[d]) for d in domains},
        "cells": slim,
        "gains_vs_cam": compute_gains(cells),
        "where_methods_hurt": where_methods_hurt(cells, methods, domains),
    }


# -- Markdown ----------------------------------------------------------------------------------


def _miou_cell(cell: Cell | None, g: float | None, method: str) -> str:
    if cell is None:
        return "not run"
    if not _ok(cell):
        return "weights not available" if cell.get("weights_missing") else "failed"
    if cell["miou"] is None:
        return "n/a"
    text = f"{100 * cell['miou']:.1f}" + _spread(cell.get("miou_sd"))
    if method == BASELINE:
        return text + " (base)"
    return text + (f" ({100 * g:+.1f}{_spread(cell.get('gain_sd'))})" if g is not None else " (no cam)")


def _spread(sd: float | None) -> str:
    """`` ± s`` in mIoU points where a cell was repeated over seeds (bench --seeds)."""
    return "" if sd is None else f" ± {100 * sd:.1f}"


def _time_cell(cell: Cell | None) -> str:
    if not _ok(cell):
        return "—"
    t, pl, total = (_seconds(cell[k]) for k in ("train_seconds", "pseudo_label_seconds", "wall_seconds"))
    return f"{t} + {pl} = {total}"


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _gigabytes(value: float | None) -> str:
    return "?" if value is None else f"{value / 1e9:.2f}"


def _memory_cell(cell: Cell | None) -> str:
    """Peak memory in GB: training / pseudo-labelling (and the GPU's peak where one was used)."""
    if not _ok(cell):
        return "—"
    assert cell is not None
    if "peak_rss_bytes" not in cell:
        return "not recorded"
    text = f"{_gigabytes(cell['train_peak_rss_bytes'])} / {_gigabytes(cell['pseudo_label_peak_rss_bytes'])}"
    gpu = cell.get("peak_gpu_bytes")
    text += f" (GPU {_gigabytes(gpu)})" if gpu is not None else ""
    train = cell.get("config", {}).get("train", {})
    n = train.get("accumulate_batches")
    return text + (f", batch {train['batch_size'] // n} x {n}" if n else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(matrix: Mapping[str, Any]) -> str:
    domains, methods, cells = matrix["domains"], matrix["methods"], matrix["cells"]
    gains = matrix["gains_vs_cam"]
    m = matrix["machine"]
    lines = [
        "# Domain-transfer matrix",
        "",
        f"Command: `{matrix['command']}`",
        "",
        f"Machine: {m['nproc']} usable CPUs (nproc; {m['cpu_count']} on the host), {m['cpu_model']}; "
        f"device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}; torch {m['torch']} "
        f"with {m['torch_threads']} threads; {m['platform']}.",
        "",
        f"Created {matrix['created']}. Training budget: {matrix['budget_minutes']:g} min per (domain, "
        "training method) run; post-hoc methods reuse the domain's plain-CAM run.",
        "",
        "## mIoU",
        "",
        "mIoU (%) of the pseudo-labels on each domain's scoring split (a hold-out the classifier never "
        "saw); in brackets the gain over plain CAM on the same domain, in mIoU points. Negative: the "
        "method made the pseudo-labels worse. With folds and seeds (see Data): per seed the confusion "
        "matrices of the held-out folds are summed, then mean ± standard deviation over seeds; the gain "
        "is the mean of the per-seed differences to plain CAM, ± their spread.",
        "",
    ]
    rows = [
        [f"`{me}`", *(_miou_cell(cells[d].get(me), gains[d].get(me), me) for d in domains)] for me in methods
    ]
    lines += _table(["method", *domains], rows)
    lines += ["", "## Where methods hurt", ""]
    hurt = matrix["where_methods_hurt"]
    lines += [f"- {line}" for line in hurt] or ["No method scored below plain CAM on any domain in this run."]
    failed = [
        (d, me, cells[d][me]) for me in methods for d in domains if me in cells[d] and not _ok(cells[d][me])
    ]
    if failed:
        lines += ["", "## Failed cells", ""]
        lines += [f"- `{me}` on `{d}`: {c['error']}" for d, me, c in failed]
    costs = (
        (
            "Wall time",
            "Seconds: training + pseudo-labelling = total for the cell. Post-hoc methods show the shared "
            "plain-CAM training they reuse (paid once per domain).",
            _time_cell,
        ),
        (
            "Peak memory",
            "Peak resident memory of the bench process in GB (10^9 bytes), training / pseudo-labelling, "
            "each stage measured on its own; in brackets the peak GPU memory the allocator held, where a "
            "GPU was used. Post-hoc methods show the shared plain-CAM training's peak. `?`: a stage this "
            "platform could not measure; `not recorded`: a cell finished before bench measured memory; "
            "`batch 16 x 2`: trained with `--accumulate-batches`, each optimiser step summing 2 batches of 16.",
            _memory_cell,
        ),
    )
    for title, explanation, shown in costs:
        lines += ["", f"## {title}", "", explanation, ""]
        lines += _table(
            ["method", *domains],
            [[f"`{me}`", *(shown(cells[d].get(me)) for d in domains)] for me in methods],
        )
    lines += ["", "## Data", ""]
    rows = []
    for d in domains:
        p = matrix["presets"][d]
        train = f"`{p['train_split']}`" + (
            f" ({'patches' if p['patch_size'] else 'crops'} labelled from masks"
            + (f", {p['patch_size']} px" if p["patch_size"] else "")
            + ")"
            if p["labels_from_masks"]
            else ""
        )
        score = f"`{p['score_split']}`" + (" (tiles)" if p["score_tiles"] else " (whole images)")
        if p.get("folds", 1) > 1:
            detail = train[train.index(" (") :] if " (" in train else ""
            kind = " stratified by class" if p.get("stratified") else ""
            train = f"{p['folds']}-fold cross-validation{kind} over `{p['pool']}`{detail}"
            score = f"each held-out fold of `{p['pool']}`" + (
                " (tiles)" if p["score_tiles"] else " (whole images)"
            )
        if "seeds" in p:
            score += f"; seeds {', '.join(map(str, p['seeds']))}"
        rows.append([d, f"{p['dataset']} (`{p['path']}`)", train, score, p.get("note", "")])
    lines += _table(["domain", "dataset", "train", "score", "notes"], rows)
    return "\n".join(lines) + "\n"


# -- heatmap -----------------------------------------------------------------------------------


def plot_heatmap(matrix: Mapping[str, Any], path: Path | str) -> Path:
    """Gain over plain CAM per cell (diverging colours centred at 0), annotated with mIoU.

    Failed or missing cells are hatched grey and say so; cells without a gain stay white.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    domains, methods, cells = matrix["domains"], matrix["methods"], matrix["cells"]
    gains = matrix["gains_vs_cam"]
    values = np.full((len(methods), len(domains)), np.nan)
    for i, method in enumerate(methods):
        for j, domain in enumerate(domains):
            g = gains[domain].get(method)
            if g is not None:
                values[i, j] = 100 * g
    finite = np.abs(values[np.isfinite(values)])
    limit = max(float(finite.max()) if finite.size else 0.0, 0.5)  # symmetric, so 0 is the middle colour
    fig = Figure(figsize=(2.0 + 1.6 * len(domains), 1.2 + 0.55 * len(methods)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["RdBu"].with_extremes(bad="white")  # red: worse than cam, blue: better
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=Normalize(-limit, limit), aspect="auto")
    for i, method in enumerate(methods):
        for j, domain in enumerate(domains):
            cell = cells[domain].get(method)
            if not _ok(cell):
                ax.add_patch(
                    Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", hatch="///", edgecolor="0.5")
                )
                ax.text(j, i, "failed" if cell else "not run", ha="center", va="center", fontsize=8)
                continue
            miou = cell["miou"]
            text = "n/a" if miou is None else f"{100 * miou:.1f}"
            if method != BASELINE and np.isfinite(values[i, j]):
                text += f"\n({values[i, j]:+.1f})"
            dark = np.isfinite(values[i, j]) and abs(values[i, j]) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(methods)), methods)
    ax.set_title("mIoU % (gain over cam, points)", fontsize=10)
    fig.colorbar(image, ax=ax, label="mIoU gain over cam (points)")
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


# -- HTML --------------------------------------------------------------------------------------

# Cost columns of a cell (key, title, format), shown where some cell of the matrix has them.
COST_COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("train_seconds", "training s", _seconds),
    ("pseudo_label_seconds", "pseudo-labelling s", _seconds),
    ("evaluate_seconds", "scoring s", _seconds),
    ("wall_seconds", "wall s", _seconds),
    ("peak_rss_bytes", "peak memory GB", _gigabytes),
    ("peak_gpu_bytes", "peak GPU GB", _gigabytes),
)


def _gain_cell(g: float | None, method: str) -> Html:
    if method == BASELINE:
        return Html("base")
    if g is None:
        return esc("\u2014")
    return tag("span", f"{100 * g:+.1f}", class_="good" if g > 0 else "bad" if g < 0 else None)


def _grid_cell(cell: Cell | None, g: float | None, method: str) -> Html:
    """mIoU and gain, on a background from red (worse than cam) to blue (better)."""
    text = _miou_cell(cell, g, method)
    if g is None or method == BASELINE:
        return esc(text)
    alpha = min(abs(g) / 0.10, 1.0) * 0.6  # full colour at 10 mIoU points
    rgb = "33,102,172" if g > 0 else "214,96,77"
    return tag("span", text, style=f"background:rgba({rgb},{alpha:.2f});padding:1px 4px")


def render_html(matrix: Mapping[str, Any], heatmap: Path | None = None) -> str:
    """The matrix as one self-contained page: comparison, costs, heatmap, where methods hurt, data,
    command and machine."""
    domains, methods, cells = matrix["domains"], matrix["methods"], matrix["cells"]
    gains = matrix["gains_vs_cam"]
    grid = [
        [tag("code", m), *(_grid_cell(cells[d].get(m), gains[d].get(m), m) for d in domains)] for m in methods
    ]
    ok_cells = [c for d in domains for c in cells[d].values() if _ok(c)]
    costs = [column for column in COST_COLUMNS if any(c.get(column[0]) is not None for c in ok_cells)]
    counted = any("n_images" in c for c in ok_cells)
    detail = []
    for d in domains:
        for m in methods:
            c = cells[d].get(m)
            if c is None:
                continue
            ok = _ok(c)
            detail.append(
                [
                    d,
                    tag("code", m),
                    f"{100 * c['miou']:.1f}" if ok and c.get("miou") is not None else "\u2014",
                    _gain_cell(gains[d].get(m), m) if ok else "\u2014",
                    *(show(c[k]) if ok and c.get(k) is not None else "\u2014" for k, _, show in costs),
                    *([str(c.get("n_images", "")) if ok else ""] if counted else []),
                    "ok" if ok else tag("span", _miou_cell(c, None, m), class_="bad"),
                ]
            )
    hurt = matrix["where_methods_hurt"]
    hurt_list = (
        tag("ul", join(tag("li", code_spans(line)) for line in hurt))
        if hurt
        else tag("p", "No method scored below plain CAM on any domain in this run.")
    )
    failed = [(d, m, cells[d][m]) for m in methods for d in domains if m in cells[d] and not _ok(cells[d][m])]
    presets = []
    for d in domains:
        p = matrix["presets"][d]
        presets.append(
            [d, p.get("dataset", ""), p.get("train_split", ""), p.get("score_split", ""), p.get("note", "")]
        )
    parts: list[object] = [
        tag("h1", "Domain-transfer matrix"),
        tag(
            "p",
            f"Created {matrix['created']}. Training budget {matrix['budget_minutes']:g} min per (domain, training "
            "method) run; post-hoc methods reuse the domain's plain-CAM run. mIoU (%) of the pseudo-labels on "
            "each domain's scoring split, in brackets the gain over plain CAM in mIoU points (negative: the "
            "method made the pseudo-labels worse).",
            class_="lead",
        ),
        section("Method comparison", table(["method", *domains], grid, numeric=range(1, len(domains) + 1))),
        section(
            "Cells: mIoU, gain over cam and cost",
            table(
                [
                    "domain",
                    "method",
                    "mIoU %",
                    "gain (points)",
                    *(t for _, t, _ in costs),
                    *(["images"] if counted else []),
                    "status",
                ],
                detail,
                numeric=range(2, 4 + len(costs) + counted),
            ),
        ),
    ]
    if heatmap is not None and Path(heatmap).is_file():
        parts.append(section("Transfer heatmap", embed(Path(heatmap), alt="mIoU gain over cam per cell")))
    parts.append(section("Where methods hurt", hurt_list))
    if failed:
        parts.append(
            section(
                "Failed cells",
                tag(
                    "ul",
                    join(
                        tag("li", tag("code", m), " on ", tag("code", d), ": ", c.get("error") or "")
                        for d, m, c in failed
                    ),
                ),
            )
        )
    parts.append(section("Data", table(["domain", "dataset", "train", "score", "notes"], presets)))
    parts.append(environment_block(matrix["command"], {k: v for k, v in matrix["machine"].items()}))
    return page("wsss-domains bench: domain-transfer matrix", *parts)


def write_outputs(out: Path | str, matrix: Mapping[str, Any]) -> dict[str, Path]:
    """``matrix.md``, ``matrix.json``, ``heatmap.png`` and ``matrix.html`` under ``out``, each written
    atomically."""
    out = Path(out)
    paths = {
        "markdown": out / "matrix.md",
        "json": out / "matrix.json",
        "heatmap": out / "heatmap.png",
        "html": out / "matrix.html",
    }
    text = render_markdown(matrix)
    atomic_write(paths["markdown"], lambda tmp: tmp.write_text(text))
    data = json.dumps(matrix, indent=2, allow_nan=False)
    atomic_write(paths["json"], lambda tmp: tmp.write_text(data))
    plot_heatmap(matrix, paths["heatmap"])
    page_text = render_html(matrix, paths["heatmap"])
    atomic_write(paths["html"], lambda tmp: tmp.write_text(page_text))
    return paths
