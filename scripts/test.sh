#!/usr/bin/env bash
# The project's checks, as CI runs them: lint and format, the fast tests, then the slow end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -m "not slow"
.venv/bin/python -m pytest -q -m slow
