"""The install layout: every package folder is listed in pyproject.toml, and the mapped folders import."""
import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapping = set(cfg["packages"]), cfg["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *rel)))
    # a folder mapped to its own package (edgeprune.export) is not also a subpackage of edgeprune
    found -= {f"edgeprune.{folder}" for folder in ("export", "runtime", "profiles")} - set(mapping)
    assert found <= listed, f"package folders missing from pyproject.toml packages: {sorted(found - listed)}"


def test_mapped_packages_import():
    for name in ("edgeprune.export.lint", "edgeprune.runtime.positions", "edgeprune.profiles"):
        importlib.import_module(name)


def test_model_weights_are_package_data():
    # A non-editable install carries only what package-data names: the shipped projector and AutoSelect
    # scorer (edgeprune/models/weights, with their recipe JSON) must match its globs, or the installed
    # edgeprune-mini silently loses them (a seeded projector; autoselect refused for want of a scorer).
    import fnmatch

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["edgeprune.models"]
    files = [p.relative_to(ROOT / "edgeprune" / "models").as_posix()
             for p in (ROOT / "edgeprune" / "models" / "weights").iterdir()]
    assert "weights/mini_projector.safetensors" in files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"model weights not in [tool.setuptools.package-data] edgeprune.models: {missing}"
