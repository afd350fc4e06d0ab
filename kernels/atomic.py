"""Atomic file writes and folder swaps: the one implementation every layer uses.

It lives at the bottom of the arrows (suite -> tasks -> kernels) so that kernels
(`save_factors`), tasks (the CIFAR-10 arrays) and the harness (`suite.results`, which re-exports
it) share it. A reader never sees a half-written file or a half-swapped folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX; a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call writer(tmp) on a temp file beside path, fsync it, then rename it over path.

    On any exception (KeyboardInterrupt too) the temp file is removed and path is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain write gets the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sibling(out_dir: Path, tag: str) -> Path:
    """A new hidden folder beside out_dir, named by tag, pid and a random suffix; plain mkdir
    (not mkdtemp) so it gets the umask's permissions rather than 0700, which would carry over to
    out_dir when swapped in."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f".{out_dir.name}.{tag}-{os.getpid()}-{os.urandom(4).hex()}"
    path.mkdir()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out_dir: Path) -> None:
    """Remove the siblings left by killed runs (their pid is gone); a live run's are kept."""
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for path in out_dir.parent.glob(pattern):
            pid = path.name.rsplit("-", 2)[-2]
            if not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(path, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Swap the finished folder src in as dst; the old dst goes only once the new one is in.

    A kill between the two renames leaves no dst (never a mixed one). src from another folder
    (or file system) is first moved beside dst, so the swap itself is a rename; it gets the
    umask's permissions. Leftovers of killed runs beside dst are removed.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        src.mkdir(parents=True)
    clean_stale(dst)
    staged = None
    if src.parent.resolve() != dst.parent.resolve():
        staged = sibling(dst, "tmp")
        shutil.move(str(src), staged / "new")
        src = staged / "new"
    os.chmod(src, 0o777 & ~_umask())
    old = None
    if dst.exists():
        old = sibling(dst, "old")
        dst.replace(old / "prev")
    src.replace(dst)
    _fsync_dir(dst.parent)
    for leftover in (old, staged):
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)
