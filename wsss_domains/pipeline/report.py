"""The report of a whole job (``wsss-domains run``): JSON for tools, Markdown and HTML for people.

The HTML page is self-contained (pictures embedded), so it can be mailed or archived as one file:
the headline figures, per-class IoU of every scored stage, and a few prediction overlays.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from wsss_domains.data.io import atomic_write
from wsss_domains.domains.contract import LabelSpace

if TYPE_CHECKING:
    from wsss_domains.pipeline.run import RunReport

MAX_PICTURES = 6
PICTURE_WIDTH = 900


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _scored(report: RunReport) -> list[tuple[str, dict[str, Any]]]:
    return [(s.name, s.evaluation) for s in report.stages if s.evaluation is not None]


def markdown(report: RunReport) -> str:
    """Headline table, per-class IoU and stage timings as Markdown."""
    lines = [
        f"# {report.domain} / {report.dataset}: train `{report.train_split}`, segment `{report.test_split}`",
        "",
        f"Data: `{report.data}`. Pseudo-labelling method: `{report.recipe['method']}` "
        f"({report.recipe.get('why', '')}).",
        "",
        "| stage | mIoU | images | seconds | note |",
        "|---|---|---|---|---|",
    ]
    for stage in report.stages:
        ev = stage.evaluation
        miou = _fmt(ev["miou"]) if ev else "not scored"
        images = str(ev["n_images"]) if ev else ""
        lines.append(f"| {stage.name} | {miou} | {images} | {stage.seconds:.0f} | {stage.note} |")
    scored = _scored(report)
    if scored:
        classes = list(scored[0][1]["per_class_iou"])
        lines += ["", "Per-class IoU:", "", "| stage | " + " | ".join(classes) + " |"]
        lines.append("|---|" + "---|" * len(classes))
        for name, ev in scored:
            lines.append(
                f"| {name} | " + " | ".join(_fmt(ev["per_class_iou"].get(c)) for c in classes) + " |"
            )
    return "\n".join(lines) + "\n"


def comparison_pictures(
    dataset: Any, label_space: LabelSpace, folders: dict[str, Path], limit: int = MAX_PICTURES
) -> list[tuple[str, Image.Image]]:
    """Side by side for the first images of a split: the image, its ground truth, then each folder's
    labels (pseudo-labels, predictions) blended over it; unscored pixels stay bare."""
    from wsss_domains.data.io import read_index_mask
    from wsss_domains.evaluation.evaluate import pred_filename

    palette = np.asarray(label_space.flat_palette(), dtype=np.float32).reshape(-1, 3)
    pictures = []
    for i in range(min(limit, len(dataset))):
        sample = dataset[i]
        rgb = (sample["image"].permute(1, 2, 0).numpy() * 255).astype(np.float32)
        maps = {"ground truth": sample.get("mask")}
        for title, folder in folders.items():
            path = Path(folder) / pred_filename(sample["id"])
            maps[title] = read_index_mask(path) if path.is_file() else None
        panels = [rgb]
        titles = ["image"]
        for title, ids in maps.items():
            if ids is None:
                continue
            ids = ids.numpy()
            scored = (ids != label_space.ignore_index)[..., None]
            panels.append(np.where(scored, 0.45 * rgb + 0.55 * palette[ids], rgb))
            titles.append(title)
        h, w = rgb.shape[:2]
        canvas = Image.new("RGB", (w * len(panels), h + 14), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for k, (panel, title) in enumerate(zip(panels, titles, strict=True)):
            canvas.paste(Image.fromarray(panel.astype(np.uint8)), (k * w, 14))
            draw.text((k * w + 2, 1), title, fill=(0, 0, 0))
        pictures.append((str(sample["id"]), canvas))
    return pictures


def _picture(source: Path | Image.Image) -> str:
    image = source if isinstance(source, Image.Image) else Image.open(source)
    image = image.convert("RGB")
    if image.width > PICTURE_WIDTH:
        image = image.resize((PICTURE_WIDTH, round(image.height * PICTURE_WIDTH / image.width)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def html_page(report: RunReport, out: Path, pictures: list[tuple[str, Image.Image]] | None = None) -> str:
    """A self-contained page: the tables of :func:`markdown` and pictures of the test images (the
    given comparisons, else the prediction overlays)."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(s.name)}</td><td>{_fmt(s.evaluation['miou']) if s.evaluation else 'not scored'}</td>"
        f"<td>{s.seconds:.0f}</td><td>{esc(s.note)}</td></tr>"
        for s in report.stages
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>wsss-domains run: {esc(report.domain)} / {esc(report.dataset)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1000px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%;margin:4px 0}</style>",
        "</head><body>",
        f"<h1>{esc(report.domain)} / {esc(report.dataset)}</h1>",
        f"<p>Trained on <code>{esc(report.train_split)}</code>, segmented <code>{esc(report.test_split)}</code> "
        f"without labels. Data: <code>{esc(report.data)}</code>. Method: <code>{esc(report.recipe['method'])}</code>"
        f" &mdash; {esc(str(report.recipe.get('why', '')))}.</p>",
        "<table><tr><th>stage</th><th>mIoU</th><th>seconds</th><th>note</th></tr>",
        rows,
        "</table>",
    ]
    scored = _scored(report)
    if scored:
        classes = list(scored[0][1]["per_class_iou"])
        parts.append("<h2>Per-class IoU</h2><table><tr><th>stage</th>")
        parts += [f"<th>{esc(c)}</th>" for c in classes]
        parts.append("</tr>")
        for name, ev in scored:
            cells = "".join(f"<td>{_fmt(ev['per_class_iou'].get(c))}</td>" for c in classes)
            parts.append(f"<tr><td>{esc(name)}</td>{cells}</tr>")
        parts.append("</table>")
    shown: list[tuple[str, Path | Image.Image]] = list(pictures or [])
    if not shown:
        overlays = sorted((out / "predictions" / "test" / "overlays").glob("*.png"))[:MAX_PICTURES]
        shown = [(path.stem, path) for path in overlays]
    if shown:
        parts.append("<h2>Test images: segmentation without labels</h2>")
        for name, picture in shown:
            parts.append(f"<p>{esc(name)}<br><img src='data:image/png;base64,{_picture(picture)}'></p>")
    parts.append("</body></html>")
    return "".join(parts)


def write_run_report(
    report: RunReport, out: Path, pictures: list[tuple[str, Image.Image]] | None = None
) -> None:
    """``report.json``, ``report.md`` and ``report.html`` in ``out``."""
    out = Path(out)
    data = json.dumps(report.to_dict(), indent=2, default=str)
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(data))
    text = markdown(report)
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    page = html_page(report, out, pictures)
    atomic_write(out / "report.html", lambda tmp: tmp.write_text(page))
