"""The built-in demo: synthetic data, training, pseudo-labels and evaluation in one command."""

from __future__ import annotations

from pathlib import Path

from wsss_domains.cli.common import CliError
from wsss_domains.cli.evaluate import evaluate_split, write_report
from wsss_domains.cli.pseudo_labels import pseudo_label_split
from wsss_domains.domains import DemoData, DomainPlugin


def prepare_demo(domain: DomainPlugin, out: Path) -> DemoData:
    demo = domain.demo(Path(out) / "demo-data")
    if demo is None:
        raise CliError(f"domain '{domain.name}' has no built-in demo set; pass --data DIR")
    print(
        f"demo: SYNTHETIC {domain.name} data generated in {demo.root} (not real images; for a quick end-to-end run)"
    )
    return demo


def finish_demo(domain: DomainPlugin, demo: DemoData, out: Path, device: str, progress: bool) -> None:
    pl = Path(out) / "pseudo-labels" / demo.eval_split
    summary = pseudo_label_split(
        out, domain.name, demo.dataset, demo.root, demo.eval_split, pl, device=device, progress=progress
    )
    report = evaluate_split(domain.name, demo.dataset, demo.root, demo.eval_split, pl, progress)
    metrics = Path(out) / "metrics.json"
    write_report(report, metrics, Path(out) / "per-class-iou.png")
    print(report.to_table())
    print(f"\npseudo-labels ({summary.written + summary.skipped}): {pl}")
    print(f"overlays:       {pl / 'overlays'}")
    print(f"metrics:        {metrics}  (chart {Path(out) / 'per-class-iou.png'})")
    print("The demo data is synthetic; its scores say the pipeline works, not how well a method transfers.")
