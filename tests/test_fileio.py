import os
import stat

import pytest

from edgeprune.fileio import atomic_write


def test_atomic_write_replaces_whole_file_with_usual_mode(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write(target, lambda tmp: open(tmp, "w").write("one"))
    atomic_write(target, lambda tmp: open(tmp, "w").write("two"))
    assert target.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.npy"
    target.write_text("old")

    def boom(tmp):
        assert tmp.endswith(".npy")  # the suffix survives: np.save and savefig read it
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.npy"]
