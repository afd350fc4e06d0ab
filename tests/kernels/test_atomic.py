"""kernels.atomic: the one atomic write and the one folder swap (suite.results re-exports them)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kernels.atomic import atomic_save, replace_dir, sibling
from suite import results


def test_results_re_exports_the_one_implementation() -> None:
    assert results.atomic_save is atomic_save and results.replace_dir is replace_dir


def test_swap_replaces_whole_with_umask_permissions(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    src = tmp_path / "elsewhere" / "new"
    src.mkdir(parents=True, mode=0o700)
    (src / "new.txt").write_text("new")
    replace_dir(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert dst.stat().st_mode & 0o777 == 0o777 & ~mask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside


def test_swap_removes_a_dead_runs_leftovers_and_keeps_a_live_ones(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f".out.tmp-{gone.pid}-abcd1234"
    dead.mkdir()
    live = sibling(dst, "tmp")  # this process: alive
    src = tmp_path / ".out.src"
    src.mkdir()
    replace_dir(src, dst)
    assert not dead.exists() and live.exists() and dst.is_dir()


def test_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_save(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
