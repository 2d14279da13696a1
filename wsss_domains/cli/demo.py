"""The built-in demo: a domain's synthetic data set through the whole job in one command."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from wsss_domains.cli.common import CliError
from wsss_domains.domains import create_domain
from wsss_domains.pipeline.run import RunReport, RunSettings, run_pipeline

DEMO_MINUTES = 2.0
DEMO_SEGMENTER_MINUTES = 1.0


def demo_folder(domain_name: str) -> Path:
    """Where a demo run goes when ``--out`` is not given."""
    return Path("runs") / f"{domain_name}-demo"


def run_demo(
    domain_name: str,
    out: Path | None,
    settings: RunSettings,
    domain_options: Mapping[str, object] | None = None,
) -> RunReport:
    """Generate the domain's demo set under ``out`` and run the whole job on it.

    Training budgets left unset become the demo's (2 minutes for the classifier, 1 for the
    segmenter), so the demo finishes in about five minutes on two CPU cores. ``domain_options``
    are checked here, before the demo set is written.
    """
    domain = create_domain(domain_name, **(domain_options or {}))
    out = Path(out or demo_folder(domain_name))
    demo = domain.demo(out / "demo-data")
    if demo is None:
        raise CliError(f"domain '{domain.name}' has no built-in demo set; pass --data DIR")
    print(
        f"demo: SYNTHETIC {domain.name} data generated in {demo.root} (not real images; a quick end-to-end run)"
    )
    classifier = settings.classifier
    classifier = replace(
        classifier,
        max_minutes=DEMO_MINUTES if classifier.max_minutes is None else classifier.max_minutes,
        image_size=classifier.image_size or demo.image_size,
        labels_from_masks=classifier.labels_from_masks or demo.labels_from_masks,
    )
    segmenter = settings.segmenter
    if segmenter.max_minutes is None:
        segmenter = replace(segmenter, max_minutes=min(classifier.max_minutes, DEMO_SEGMENTER_MINUTES))
    report = run_pipeline(
        domain.name,
        demo.root,
        out,
        train_split=demo.train_split,
        test_split=demo.eval_split,
        dataset=demo.dataset,
        settings=replace(settings, classifier=classifier, segmenter=segmenter),
        domain_options=domain_options,
    )
    from wsss_domains.cli.run import print_summary

    print_summary(report, out)
    print("The demo data is synthetic; its scores say the pipeline works, not how well a method transfers.")
    return report
