"""edgeprune: visual-token pruning compiled into the exported vision graph of VLMs.

This module stays import-light (no torch): `edgeprune.runtime` is imported through it on devices
where torch is absent.
"""
from edgeprune.errors import EdgepruneError

__version__ = "0.1.0"
__all__ = ["EdgepruneError", "__version__"]
