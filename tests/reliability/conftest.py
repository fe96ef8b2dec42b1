"""One tiny exported bundle per test process, shared by the reliability tests (an export costs seconds);
tests that change a bundle work on `bundle_copy`."""
from __future__ import annotations

import json
import shutil

import pytest

from edgeprune.runtime.format import Files


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """tiny-llava pruned to K=8 by divprune, not validated (parity is tested in tests/export)."""
    from edgeprune.export.bundle import export_bundle
    from edgeprune.models import load

    out = tmp_path_factory.mktemp("reliability") / "tiny"
    export_bundle(load("tiny-llava"), out, method="divprune", keep=8, validate=False, source="tiny-llava")
    return out


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def edit_manifest(bundle, **changes) -> dict:
    """Change manifest keys in place, as a user with an editor would (no checks); returns the new manifest."""
    path = bundle / Files.MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return manifest
