"""The demo job's report as a browser shows it: run `wsss-domains run --domain histo` on the synthetic
demo set, then screenshot its report.html, full page, in headless Chromium.

The screenshot (``docs/report-demo.png``) shows what a report looks like without running anything;
re-running with the same ``--out`` resumes the job (or only re-takes the screenshot).

    python benchmarks/report_screenshot.py [--out runs/report-demo] [--png docs/report-demo.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from PIL import Image

from wsss_domains.reports.browser import find_browser, page_height, screenshot

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 1280
MAX_HEIGHT = 12000


def wsss_domains_command() -> list[str]:
    """The installed ``wsss-domains`` beside this interpreter, else the module."""
    script = Path(sys.executable).parent / "wsss-domains"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "wsss_domains.cli"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "report-demo", help="the job folder")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "report-demo.png")
    p.add_argument("--budget-minutes", type=float, default=1.0, help="each network's training budget")
    p.add_argument("--skip-run", action="store_true", help="only screenshot an existing report")
    p.add_argument(
        "--full-colour", action="store_true", help="keep the screenshot's every colour (larger file)"
    )
    args = p.parse_args()
    browser = find_browser()
    if browser is None:
        sys.exit("no Chromium / Chrome on PATH (Debian: apt-get install chromium)")
    page = args.out / "report.html"
    if not args.skip_run:
        command = [*wsss_domains_command(), "run", "--domain", "histo", "--out", str(args.out)]
        command += ["--budget-minutes", f"{args.budget_minutes:g}", "--no-progress"]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    if not page.is_file():
        sys.exit(f"{page} not found: run without --skip-run")
    height = min(page_height(browser, page, WIDTH), MAX_HEIGHT)
    png = screenshot(browser, page, args.png, WIDTH, height)
    if not args.full_colour:
        # 256 colours (dithered) keep the recorded picture under a megabyte; text and flat colours stay sharp.
        with Image.open(png) as shot:
            small = shot.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
        small.save(png, optimize=True)
    print(f"{png} ({WIDTH}x{height}) of {page}")


if __name__ == "__main__":
    main()
