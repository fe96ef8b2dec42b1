"""Writing bundles: what --force may delete, two writers at once, signals and a full disk (issue 14, items 1,
2, 8, 9). Each test first reproduces the failure the issue reported."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeprune.cli import main
from edgeprune.errors import BundleError
from edgeprune.export import bundle as bundle_mod
from edgeprune.export.bundle import check_target, export_bundle
from edgeprune.fileio import LockedError
from edgeprune.runtime.bundle import bundle_lock, load_bundle
from edgeprune.runtime.format import Files

EXPORT = ["export", "--model", "tiny-llava", "--method", "divprune", "--keep", "8", "--no-validate", "-q"]


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-llava")


def _web_app(root: Path) -> Path:
    """The issue's probe: a folder with somebody's manifest.json (a web app's) and source files."""
    (root / "app" / "src").mkdir(parents=True)
    (root / "app" / Files.MANIFEST).write_text('{"name": "pwa"}')
    (root / "app" / "src" / "app.js").write_text("x")
    return root / "app"


# -- 1. data loss by --force --------------------------------------------------------------------------------
def test_force_never_replaces_a_folder_without_the_bundle_marker(tmp_path, capsys):
    app = _web_app(tmp_path)
    assert main([*EXPORT, "--out", str(app), "--force"]) == 1
    err = capsys.readouterr().err
    assert "not an edgeprune bundle" in err and "general.format absent" in err and "even with --force" in err
    assert (app / "src" / "app.js").read_text() == "x"
    # without --force the refusal does not claim a bundle is there
    assert main([*EXPORT, "--out", str(app)]) == 1
    err = capsys.readouterr().err
    assert "not an edgeprune bundle" in err and "already exists" not in err


@pytest.mark.parametrize("manifest", ['{"general.format": "gguf", "general.schema_version": 2}',
                                      '{"general.schema_version": 1}', "not json", "[1, 2]"])
def test_force_refuses_manifests_of_other_formats(tmp_path, manifest):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / Files.MANIFEST).write_text(manifest)
    with pytest.raises(BundleError, match="not an edgeprune bundle"):
        check_target(tmp_path / "out", force=True)


def test_force_refuses_a_bundle_holding_files_it_does_not_list(bundle_copy):
    (bundle_copy / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match=r"holds 1 file\(s\) its manifest does not list \(notes.txt\)"):
        check_target(bundle_copy, force=True)
    (bundle_copy / "notes.txt").unlink()
    (bundle_copy / Files.ORT_TRT_CACHE).mkdir(parents=True)
    (bundle_copy / Files.ORT_TRT_CACHE / "model.engine").write_bytes(b"cache")   # run-time cache: ours
    check_target(bundle_copy, force=True)
    with pytest.raises(BundleError, match="a bundle already exists there; pass --force"):
        check_target(bundle_copy, force=False)


def test_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    assert main([*EXPORT, "--out", str(tmp_path / "file.txt" / "bundle")]) == 1
    assert "file.txt is a file, not a folder" in capsys.readouterr().err


def test_force_refuses_the_folder_it_runs_in(bundle_copy, monkeypatch, capsys):
    monkeypatch.chdir(bundle_copy)
    assert main([*EXPORT, "--out", ".", "--force"]) == 1
    assert "the current folder is (inside) the bundle to replace" in capsys.readouterr().err
    assert load_bundle(bundle_copy).keep == 8


# -- 2. concurrent writers ------------------------------------------------------------------------------------
def test_second_writer_gets_a_clear_error_and_the_first_bundle_is_intact(adapter, tmp_path):
    out = tmp_path / "bundle"
    inside, release = threading.Event(), threading.Event()
    results = {}

    def on_step(name):
        if name == "export LLM graphs":     # the first writer is half-way: its temp folder exists
            inside.set()
            release.wait(60)

    def first():
        try:
            results["first"] = export_bundle(adapter, out, method="uniform", keep=4, validate=False, on_step=on_step)
        except BaseException as err:   # noqa: BLE001 - reported by the assertion below
            results["first"] = err

    writer = threading.Thread(target=first)
    writer.start()
    assert inside.wait(120)
    with pytest.raises(LockedError, match="another edgeprune process .* is writing this bundle right now"):
        export_bundle(adapter, out, method="uniform", keep=4, validate=False)
    release.set()
    writer.join(120)
    assert isinstance(results["first"], dict), results["first"]
    assert load_bundle(out).keep == 4                                   # verified: the winner's bundle, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]     # no temp folder, no lock file left


def test_the_lock_is_taken_over_after_its_holder_died(tmp_path):
    out = tmp_path / "bundle"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from edgeprune.runtime.bundle import bundle_lock\n"
                               f"lock = bundle_lock(Path({str(out)!r}))\nprint('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError):
            bundle_lock(out)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".bundle.lock").exists()     # SIGKILL: the file stays, the lock does not
    bundle_lock(out).release()
    assert not (tmp_path / ".bundle.lock").exists()


def test_leftovers_of_a_killed_writer_are_cleaned_up_under_the_lock(bundle_copy, tmp_path):
    out = tmp_path / "new"
    (tmp_path / ".new.tmp-dead").mkdir()
    (tmp_path / ".new.tmp-dead" / "vision.onnx").write_bytes(b"half")
    lock, tmp = bundle_mod._begin_write(out, force=False)
    try:
        assert not (tmp_path / ".new.tmp-dead").exists() and tmp.name.startswith(".new.tmp-")
    finally:
        lock.release()
        tmp.rmdir()
    # a writer killed between moving the old bundle aside and putting the new one in place: the old comes back
    old = tmp_path / ".bundle.old-dead"
    old.mkdir()
    os.replace(bundle_copy, old / "bundle")
    lock, tmp = bundle_mod._begin_write(bundle_copy, force=True)
    lock.release()
    tmp.rmdir()
    assert load_bundle(bundle_copy).keep == 8 and not old.exists()


# -- 8. disks and signals -------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_leaves_nothing(adapter, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    monkeypatch.setattr(bundle_mod, "export_vision", full)     # the first file an export writes
    with pytest.raises(BundleError, match=r"cannot write the bundle \(\[Errno 28\] No space left on device"):
        export_bundle(adapter, tmp_path / "bundle", method="uniform", keep=4, validate=False)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_reports_an_os_error_in_one_line(monkeypatch, capsys):
    def read_only(args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/x")

    monkeypatch.setattr("edgeprune.cli.methods.run", read_only)
    assert main(["methods"]) == 1
    assert capsys.readouterr().err == "edgeprune methods: error: [Errno 30] Read-only file system: '/mnt/ro/x'\n"


def test_sigterm_during_export_leaves_no_temp_folder(adapter, tmp_path, monkeypatch, capsys):
    """`kill` (SIGTERM) used to end the process where it stood, leaving .bundle.tmp-* behind: now it is raised like
    Ctrl-C, so the export cleans up. The signal arrives while the vision graph is written."""
    def killed_while_writing(adapter, pruner, path, **kwargs):
        assert path.parent.name.startswith(".bundle.tmp-") and path.parent.is_dir()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)                               # the handler interrupts this
        raise AssertionError("SIGTERM was not delivered")

    monkeypatch.setattr(bundle_mod, "export_vision", killed_while_writing)
    monkeypatch.setattr("edgeprune.models.load", lambda name: adapter)     # loaded once for the module
    monkeypatch.chdir(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    assert main([*EXPORT, "--out", "bundle"]) == 143
    assert capsys.readouterr().err.endswith("terminated\n")
    assert list(tmp_path.iterdir()) == []            # no temp folder, no lock file, no half bundle
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_while_the_parser_is_built_is_not_a_traceback(monkeypatch, capsys):
    """Building the parser imports torch (the pruner choices): the longest start-up step, and it was outside
    main's try. Interrupted there, main returns 130 like anywhere else."""
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr("edgeprune.cli.build_parser", interrupted)
    assert main(["export", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
