"""HTML building blocks of the self-contained reports: one file, inline CSS and JS, pictures inline.

A report must open offline, mailed or archived, years later: nothing is fetched (no CDN, no web
font), pictures are data URIs. Every text that comes from data (class names, sample ids, commands,
error messages) goes through :func:`esc`; builders return :class:`Html`, markup already safe, so
tables mix both without escaping twice.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from wsss_domains.evaluation.report import EvaluationReport

Colour = tuple[int, int, int]

# Correct (diagonal) cells blue, confusions red: errors stand out at a glance.
DIAGONAL_RGB = (33, 102, 172)
CONFUSED_RGB = (214, 96, 77)
DEFAULT_SHOWN = 6
VOID_ELEMENTS = frozenset({"img", "input", "br", "hr", "meta"})

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
 color:#1d1d1f;background:#eef0f3}
main{max-width:1180px;margin:0 auto;padding:22px 34px 40px;background:#fff;min-height:100vh}
h1{font-size:23px;margin:4px 0 6px}h2{font-size:18px;margin:30px 0 10px;padding-bottom:4px;
 border-bottom:2px solid #e1e4e8}h3{font-size:15px;margin:18px 0 6px}
p{margin:6px 0 10px}.muted{color:#6a737d}.lead{color:#444;max-width:980px}
table{border-collapse:collapse;margin:6px 0 14px}
th,td{border:1px solid #dfe2e5;padding:3px 9px;text-align:left;vertical-align:middle}
th{background:#f4f5f7;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:8px 10px;white-space:pre-wrap;word-break:break-all}
.row{display:flex;flex-wrap:wrap;gap:12px 36px;align-items:flex-start}
.figures td{font-variant-numeric:tabular-nums}
.bars td{border:none;padding:2px 6px}.bars .name{max-width:220px;overflow-wrap:anywhere}
.bar{position:relative;width:240px;height:13px;background:#edf0f3;border-radius:2px}
.bar span{display:block;height:100%;background:#3b78b5;border-radius:2px}
.bar i{position:absolute;top:-3px;bottom:-3px;border-left:2px dashed #c0392b}
.confusion td{text-align:right;min-width:42px;font-variant-numeric:tabular-nums}
.confusion th.gt{font-weight:500;background:#fafbfc}.confusion .corner{font-size:11px;color:#6a737d}
.swatch{display:inline-block;width:11px;height:11px;border:1px solid rgba(0,0,0,.35);margin-right:5px;
 vertical-align:-1px}
.legend span{margin-right:14px;white-space:nowrap}
.filter{background:#f3f6fa;border:1px solid #d9e2ec;padding:7px 12px;margin:8px 0 12px;border-radius:4px}
.filter label{margin-right:16px}.filter input[type=number]{width:64px}.filter .count{color:#6a737d}
figure.item{display:inline-block;vertical-align:top;margin:0 14px 16px 0;padding:10px 12px;border:1px solid #e1e4e8;border-radius:4px}figure.item[hidden]{display:none}
figure.item figcaption{font-weight:600;margin-bottom:6px}figure.item figcaption .muted{font-weight:400}
.panels{display:flex;flex-wrap:wrap;gap:8px}.panel{font-size:12px;color:#444}
.panel img{display:block;margin-top:2px;border:1px solid #e1e4e8}img.upscaled{image-rendering:pixelated}
.env td:first-child{white-space:nowrap}.bad{color:#b03a2e}.good{color:#1e7e34}
details>summary{cursor:pointer;font-weight:600;margin:6px 0}
"""

# The gallery filter: show the worst N (the items come worst first), all, or those under a score.
SCRIPT = """
document.querySelectorAll('.gallery').forEach(function (g) {
  var worst = g.querySelector('.worst'), all = g.querySelector('.all'), below = g.querySelector('.below');
  var count = g.querySelector('.count'), items = g.querySelectorAll('.item');
  function apply() {
    var n = all.checked ? Infinity : Math.max(1, parseInt(worst.value, 10) || 1);
    var limit = parseFloat(below.value);
    if (isNaN(limit)) limit = Infinity;
    var shown = 0;
    items.forEach(function (item, i) {
      var s = item.getAttribute('data-score');
      var score = s === '' ? NaN : parseFloat(s);
      var keep = i < n && (isNaN(score) || score <= limit);
      item.hidden = !keep;
      if (keep) shown += 1;
    });
    count.textContent = shown + ' of ' + items.length + ' shown';
  }
  [worst, all, below].forEach(function (el) {
    el.addEventListener('input', apply);
    el.addEventListener('change', apply);
  });
  apply();
});
"""


class Html(str):
    """Markup that is already safe; :func:`esc` passes it through unchanged."""


def esc(value: object) -> Html:
    """Text made safe for HTML (element content and quoted attributes); :class:`Html` is kept as is."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def join(parts: Iterable[object]) -> Html:
    return Html("".join(esc(part) for part in parts))


def tag(name: str, *content: object, **attrs: object) -> Html:
    """``<name attrs>content</name>``; attribute names ending ``_`` lose it (``class_``), ``_`` -> ``-``."""
    attributes = "".join(
        f' {key.rstrip("_").replace("_", "-")}="{esc(value)}"'
        for key, value in attrs.items()
        if value is not None
    )
    if name in VOID_ELEMENTS:
        return Html(f"<{name}{attributes}>")
    return Html(f"<{name}{attributes}>{join(content)}</{name}>")


def code_spans(text: str) -> Html:
    """Markdown-style text as HTML: escaped, with `backticks` as ``<code>``."""
    return Html(re.sub(r"`([^`]*)`", r"<code>\1</code>", esc(text)))


def score(value: float | None, digits: int = 4) -> str:
    """A score in [0, 1] as text; undefined (None, NaN) is ``n/a``."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def page(title: str, *body: object) -> str:
    """The whole document: inline CSS, the body, then the gallery filter script."""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"{join(body)}</main><script>{SCRIPT}</script></body></html>"
    )


def section(title: str, *content: object, level: int = 2) -> Html:
    return Html(tag(f"h{level}", title) + join(content))


def table(
    header: Sequence[object],
    rows: Iterable[Sequence[object]],
    class_: str | None = None,
    numeric: Collection[int] = (),
) -> Html:
    """A table whose cells are escaped unless :class:`Html`; the ``numeric`` columns right-aligned."""

    def cells(row: Sequence[object], name: str) -> Html:
        return join(tag(name, cell, class_="num" if i in numeric else None) for i, cell in enumerate(row))

    head = tag("tr", cells(header, "th"))
    body = join(tag("tr", cells(row, "td")) for row in rows)
    return tag("table", head, body, class_=class_)


def swatch(colour: Colour | None) -> Html:
    if colour is None:
        return Html("")
    r, g, b = colour
    return Html(f"<span class='swatch' style='background:rgb({int(r)},{int(g)},{int(b)})'></span>")


def legend(colours: Mapping[str, Colour]) -> Html:
    """The colour of each class in the overlays."""
    items = join(tag("span", swatch(rgb), name) for name, rgb in colours.items())
    return tag("p", tag("span", "Colours: ", class_="muted"), items, class_="legend")


def iou_bars(
    per_class: Mapping[str, float], mean: float | None = None, colours: Mapping[str, Colour] | None = None
) -> Html:
    """One horizontal bar per class (its IoU), the mean as a dashed line; undefined classes say n/a."""
    colours = colours or {}
    marker = (
        Html(f"<i style='left:{100 * mean:.1f}%' title='mIoU {score(mean)}'></i>")
        if mean is not None and not math.isnan(mean)
        else Html("")
    )
    rows = []
    for name, value in per_class.items():
        defined = value is not None and not math.isnan(value)
        width = 100 * min(max(value, 0.0), 1.0) if defined else 0.0
        bar = Html(f"<div class='bar'><span style='width:{width:.1f}%'></span>{marker}</div>")
        rows.append(
            tag(
                "tr",
                tag("td", swatch(colours.get(name)), name, class_="name"),
                tag("td", bar),
                tag("td", score(value), class_="num"),
            )
        )
    caption = "IoU per class" + (f" (dashed: mIoU {score(mean)})" if marker else "")
    return Html(tag("div", tag("h3", caption), tag("table", join(rows), class_="bars")))


def row_normalised(
    confusion: Sequence[Sequence[int]], unassigned: Sequence[int] | None = None
) -> list[list[float | None]]:
    """Each ground-truth row as fractions of its pixels (unassigned ones included as a last column
    when given); a class without ground-truth pixels has None throughout."""
    out = []
    for i, row in enumerate(confusion):
        counts = [int(c) for c in row] + ([int(unassigned[i])] if unassigned is not None else [])
        total = sum(counts)
        out.append([c / total if total else None for c in counts])
    return out


def _cell_style(fraction: float, diagonal: bool) -> str:
    r, g, b = DIAGONAL_RGB if diagonal else CONFUSED_RGB
    alpha = min(1.0, fraction) * 0.9
    text = "#fff" if alpha > 0.5 else "#1d1d1f"
    return f"background:rgba({r},{g},{b},{alpha:.3f});color:{text}"


def confusion_table(
    confusion: Any,
    classes: Sequence[str],
    unassigned: Any = None,
    scored: Sequence[str] | None = None,
    colours: Mapping[str, Colour] | None = None,
) -> Html:
    """Rows ground truth, columns prediction, each row normalised to 100 %; pixel counts in the cells'
    tooltips. An ``unassigned`` column appears when some scored pixel was left unlabelled."""
    colours = colours or {}
    matrix = confusion.tolist() if hasattr(confusion, "tolist") else [list(r) for r in confusion]
    left = unassigned.tolist() if hasattr(unassigned, "tolist") else unassigned
    if left is not None and not any(left):
        left = None
    fractions = row_normalised(matrix, left)
    columns = [*classes, *(["unassigned"] if left is not None else [])]
    header = join(
        [
            tag("th", "ground truth \u2193 / predicted \u2192", class_="corner"),
            *(tag("th", swatch(colours.get(c)), c) for c in columns),
        ]
    )
    rows = []
    for i, name in enumerate(classes):
        counts = [*matrix[i], *([left[i]] if left is not None else [])]
        total = sum(int(c) for c in counts)
        note = "" if scored is None or name in scored else " (not scored)"
        cells = [
            tag(
                "th",
                swatch(colours.get(name)),
                name + note,
                class_="gt",
                title=f"{total:,} ground-truth pixels",
            )
        ]
        for j, fraction in enumerate(fractions[i]):
            tip = f"ground truth {name}, predicted {columns[j]}: {int(counts[j]):,} pixels"
            if fraction is None:
                cells.append(tag("td", "\u2013", title=tip, class_="muted"))
                continue
            tip += f" ({100 * fraction:.1f} % of the row)"
            cells.append(tag("td", f"{100 * fraction:.0f}", title=tip, style=_cell_style(fraction, i == j)))
        rows.append(tag("tr", join(cells)))
    title = tag("h3", "Confusion matrix (% of each ground-truth row; hover for pixel counts)")
    return Html(tag("div", title, tag("table", tag("tr", header), join(rows), class_="confusion")))


def evaluation_figures(report: EvaluationReport) -> Html:
    """The summary scores of one evaluation as a small table."""
    rows = [
        ("mIoU", report.miou),
        ("mIoU (papers' convention)", report.miou_paper),
        ("mean Dice", report.mean_dice),
        ("FwIoU", report.fwiou),
        ("pixel accuracy", report.pixel_accuracy),
        ("mean accuracy", report.mean_accuracy),
        *((m.name, m.value) for m in report.extra),
    ]
    body = [(name, score(value)) for name, value in rows]
    body.append(("images / scored pixels", f"{report.n_images} / {report.n_pixels:,}"))
    return table(["score", "value"], body, class_="figures", numeric=(1,))


def evaluation_section(report: EvaluationReport, colours: Mapping[str, Colour] | None = None) -> Html:
    """Summary scores, per-class IoU bars and the confusion matrix of one evaluation, side by side."""
    scored = list(report.per_class_iou)
    return tag(
        "div",
        tag("div", tag("h3", "Scores"), evaluation_figures(report)),
        iou_bars(report.per_class_iou, report.miou, colours),
        confusion_table(report.confusion, report.classes, report.unassigned, scored, colours),
        class_="row",
    )


def embed(
    source: Image.Image | Path | bytes,
    alt: str = "",
    width: int | None = None,
    fmt: str = "PNG",
    upscaled: bool = False,
) -> Html:
    """An ``<img>`` holding the picture as a data URI (``fmt`` PNG for charts, JPEG for photographs)."""
    if isinstance(source, bytes):
        data, mime = source, "image/png"
    else:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        buffer = io.BytesIO()
        if fmt.upper() == "JPEG":
            image.convert("RGB").save(buffer, format="JPEG", quality=88)
        else:
            image.save(buffer, format="PNG", optimize=False)
        data, mime = buffer.getvalue(), f"image/{fmt.lower()}"
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return tag("img", src=uri, alt=alt, width=width, class_="upscaled" if upscaled else None)


@dataclass
class GalleryItem:
    """One image of the gallery: its id, its score (None: not scored) and titled picture panels."""

    sample_id: str
    score: float | None
    panels: list[tuple[str, Image.Image]] = field(default_factory=list)
    # Display width of each panel in CSS pixels (a wide panel, e.g. a strip of heat maps, scales up).
    panel_width: int = 220


def _panel(title: str, picture: Image.Image, unit: int, base_width: int) -> Html:
    width = round(unit * picture.width / base_width) if base_width else unit
    # Small images shown larger keep sharp pixels rather than a blur.
    upscaled = width >= 2 * picture.width
    return tag(
        "div", title, embed(picture, alt=title, width=width, fmt="JPEG", upscaled=upscaled), class_="panel"
    )


def gallery(
    items: Sequence[GalleryItem],
    shown: int = DEFAULT_SHOWN,
    score_name: str = "mIoU",
    of_total: int | None = None,
) -> Html:
    """The items (already worst first) with a filter: the worst N, all, or those at or under a score.

    Without JavaScript every item is shown. ``of_total``: how many images the items were chosen from.
    """
    if not items:
        return Html(tag("p", "No images to show.", class_="muted"))
    n = len(items)
    shown = max(1, min(shown, n))
    chosen = f" (the {n} worst of {of_total})" if of_total is not None and of_total > n else ""
    controls = tag(
        "div",
        tag(
            "label",
            "Show the worst ",
            Html(f"<input type='number' class='worst' min='1' max='{n}' value='{shown}'>"),
        ),
        tag("label", Html("<input type='checkbox' class='all'> "), f"all {n}{chosen}"),
        tag(
            "label",
            f"only {score_name} \u2264 ",
            Html("<input type='number' class='below' min='0' max='1' step='0.05' value='1'>"),
        ),
        tag("span", "", class_="count"),
        class_="filter",
    )
    figures = []
    for rank, item in enumerate(items, start=1):
        value = item.score if item.score is not None and not math.isnan(item.score) else None
        base = item.panels[0][1].width if item.panels else 0
        caption = tag(
            "figcaption",
            f"#{rank} ",
            item.sample_id,
            tag(
                "span",
                f" \u00b7 {score_name} {score(value)}" if value is not None else " \u00b7 not scored",
                class_="muted",
            ),
        )
        panels = tag(
            "div", join(_panel(t, p, item.panel_width, base) for t, p in item.panels), class_="panels"
        )
        figures.append(
            tag("figure", caption, panels, class_="item", data_score="" if value is None else f"{value:.6f}")
        )
    return tag("div", controls, join(figures), class_="gallery")


def environment_block(command: str | None, environment: Mapping[str, object]) -> Html:
    """The exact command and the machine, so the page says how to reproduce it."""
    parts: list[object] = []
    if command:
        parts += [tag("h3", "Command"), tag("pre", command)]
    parts += [tag("h3", "Environment"), table(["what", "value"], environment.items(), class_="env")]
    return section("Command and environment", *parts)
