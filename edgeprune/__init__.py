"""edgeprune: visual-token pruning compiled into the exported vision graph of VLMs.

This module stays import-light (no torch): `edgeprune.runtime` is imported through it on devices
where torch is absent.
"""
from pathlib import Path as _Path

from edgeprune.errors import EdgepruneError

# In a source checkout, export/, runtime/ and profiles/ sit beside edgeprune/ (DESIGN.md layout) and
# the installed package maps them in as edgeprune.export etc. Make the checkout resolve them the
# same way, so `python` started in the repository root (where ./edgeprune shadows the installed
# package) still finds them.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "runtime").is_dir() and (_root / "pyproject.toml").is_file() \
        and (_root / "runtime" / "__init__.py").is_file():
    __path__.append(str(_root))

__version__ = "0.1.0"
__all__ = ["EdgepruneError", "__version__"]
