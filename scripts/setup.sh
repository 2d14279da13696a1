#!/usr/bin/env bash
# Create .venv and install wsss-domains with its test tools; a no-op when nothing changed.
# Installs the registry's published torch/torchvision builds (they run on CPU; CUDA is used where present).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.wsss-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
# pip warns about every local index folder a package is missing from; keep the real messages only.
pip_install() { "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2); }

echo "setup: installing wsss-domains and dependencies into $VENV (first time: a few minutes)"
pip_install -e ".[test]"
# Dense CRF is optional: pydensecrf2 has no wheel and builds from source; without it the `crf` method is absent.
pip_install "pydensecrf2>=1.1" || echo "setup: pydensecrf2 could not be built; the 'crf' method is disabled"
echo "$want" > "$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
