"""CIFAR-10 sources: choosing one, fetching it into the data folder, reading it as a tar stream.

Two archive kinds are understood, told apart by member names (never by file name):

- ``official-python``: the official ``cifar-10-python.tar.gz`` (``cifar-10-batches-py/``
  ``data_batch_1..5``, ``test_batch``, ``batches.meta``; python pickles).
- ``image-folder``: ``[top/]train/<class>/<file>`` and ``[top/]test/<class>/<file>`` with
  .jpg/.jpeg/.png images, e.g. the offline JPEG stand-in described in the shared data README.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
OFFICIAL_NAME = "cifar-10-python.tar.gz"
# URLs whose download is verified; a dict so tests can register a local server's URL.
KNOWN_MD5: dict[str, str] = {OFFICIAL_URL: OFFICIAL_MD5}
OFFICIAL_MEMBERS: tuple[str, ...] = (
    *(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
)  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "test")
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar")
KINDS: tuple[str, ...] = ("official-python", "image-folder")

_URL_RE = re.compile(r"^https?://", re.IGNORECASE)
_CHUNK = 1 << 20
# What a damaged gzip/tar stream can raise from tarfile, gzip or zlib.
_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


class DataError(ValueError):
    """A user-facing data problem; the message is one line naming path/member and what was wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: object) -> str:
    """Collapse whitespace so a message (or a nested exception's text) stays on one line."""
    return " ".join(str(text).split())


def is_url(source: str) -> bool:
    return bool(_URL_RE.match(source))


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) hex digests of a file, read in chunks."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def resolve_source(candidates: list[str], env_var: str = "CIFAR10_SOURCE") -> str:
    """The first usable source: ``$env_var`` if set (it must exist), else the first candidate that
    is an existing local path or an http(s) URL. Local paths come back absolute (relative ones
    are taken from the current directory); URLs come back unchanged for :func:`fetch`."""
    env = os.environ.get(env_var, "").strip()
    if env:
        if is_url(env):
            return env
        if not Path(env).expanduser().exists():
            raise DataError(f"{env_var}={env}: no such file")
        return os.path.abspath(Path(env).expanduser())
    tried: list[str] = []
    for cand in candidates:
        if not cand.strip():
            continue
        if is_url(cand):
            return cand
        if Path(cand).expanduser().exists():
            return os.path.abspath(Path(cand).expanduser())
        tried.append(cand)
    raise DataError(
        f"no CIFAR-10 source found: {env_var} is not set and none of these exist: "
        f"{', '.join(tried) or '(no candidates)'}"
    )


def _archive_name(name: str, where: str) -> str:
    if not name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"{where}: expected a file name ending in {', '.join(ARCHIVE_SUFFIXES)}")
    return name


def _remove_other_archives(data_dir: Path, keep: Path) -> None:
    # data_dir holds exactly one source, so a later stage can never pick up a stale archive.
    for p in data_dir.iterdir():
        if p != keep and p.is_file() and p.name.lower().endswith(ARCHIVE_SUFFIXES):
            p.unlink()


def _download(url: str, dest: Path, timeout: float) -> None:
    expected = KNOWN_MD5.get(url)
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        md5 = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    while chunk := resp.read(_CHUNK):
                        md5.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise DataError(
                    f"cannot download {url}: {one_line(reason)}; give a local file via "
                    "CIFAR10_SOURCE"
                ) from e
        if expected is not None and md5.hexdigest() != expected:
            raise DataError(f"{url}: md5 {md5.hexdigest()} does not match expected {expected}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(source: str, data_dir: Path, timeout: float = 30.0) -> Path:
    """Put the source archive into ``data_dir`` under its own file name and return its path.

    A URL is downloaded (md5-checked when it is the official URL); a local file is copied, unless
    an identical file (same size and sha256) is already there. Afterwards every *other* archive
    (*.tar.gz, *.tgz, *.tar) in ``data_dir`` is deleted, so the folder holds exactly one source.
    On failure nothing new is left behind and the previous contents stay as they were.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if is_url(source):
        name = PurePosixPath(urllib.parse.urlparse(source).path).name
        dest = data_dir / _archive_name(name, source)
        _download(source, dest, timeout)
    else:
        src = Path(source).expanduser()
        if not src.is_file():
            why = "a folder, not an archive file" if src.is_dir() else "no such file"
            raise DataError(f"{src}: {why}")
        dest = data_dir / _archive_name(src.name, str(src))
        if not _same_file(src, dest):
            fd, tmp_name = tempfile.mkstemp(prefix=".copy-", suffix=".part", dir=data_dir)
            os.close(fd)
            try:
                shutil.copyfile(src, tmp_name)
                os.replace(tmp_name, dest)
            finally:
                Path(tmp_name).unlink(missing_ok=True)
    _remove_other_archives(data_dir, dest)
    return dest


def _same_file(src: Path, dest: Path) -> bool:
    if not dest.is_file():
        return False
    if src.resolve() == dest.resolve():
        return True
    if src.stat().st_size != dest.stat().st_size:
        return False
    return file_digests(src)[0] == file_digests(dest)[0]


def member_parts(name: str) -> tuple[str, ...]:
    """Path components of a member name (``./`` and empty parts dropped). Plain string work:
    PurePosixPath costs seconds over 60k members."""
    return tuple(p for p in name.split("/") if p and p != ".")


def is_hidden(name: str) -> bool:
    """macOS/editor droppings (``._x``, ``.DS_Store``, ``__MACOSX/``) are not data."""
    return any(p.startswith(".") or p == "__MACOSX" for p in member_parts(name))


def iter_members(
    archive: Path, want: Callable[[str], bool] = lambda _name: False
) -> Iterator[tuple[str, bytes | None]]:
    """Stream the archive's regular files as (name, bytes if ``want(name)`` else None).

    Reads in tarfile's streaming mode (one pass, no seeking). A gzip stream is read to its end
    afterwards so gzip's own length/CRC check catches truncation that tar alone would miss.
    Any read failure becomes a one-line DataError.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"{archive}: no such file")
    try:
        with open(archive, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            with tarfile.open(fileobj=stream, mode="r|" if gz else "r|*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    if not want(m.name):
                        yield m.name, None
                        continue
                    f = tar.extractfile(m)
                    assert f is not None  # regular files always have a data stream
                    yield m.name, f.read()
            while gz and stream.read(_CHUNK):
                pass
    except _STREAM_ERRORS as e:
        raise DataError(
            f"{archive}: not a readable tar archive (corrupted or truncated?): "
            f"{type(e).__name__}: {one_line(e) or 'no detail'}"
        ) from e


def basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def image_member(name: str, prefixes: set[str], where: str) -> tuple[int, int, str] | None:
    """(split index, label, file name) for an image member; None for files that are not data."""
    if is_hidden(name):
        return None
    parts = member_parts(name)
    if parts and parts[0] in SPLITS:
        prefix, rel = "", parts
    elif len(parts) > 1 and parts[1] in SPLITS:
        prefix, rel = parts[0], parts[1:]
    else:
        if name.lower().endswith(IMAGE_SUFFIXES):
            raise DataError(f"{where}: member {name}: image outside [top/]train|test/<class>/")
        return None  # e.g. a README next to the split folders
    prefixes.add(prefix)
    if len(prefixes) > 1:
        raise DataError(f"{where}: member {name}: split folders under several top-level folders")
    if len(rel) != 3:
        raise DataError(f"{where}: member {name}: expected {rel[0]}/<class>/<file>")
    split, cls, fname = rel
    if cls not in CLASSES:
        raise DataError(
            f"{where}: member {name}: unknown class folder {split}/{cls} (expected one of "
            f"{', '.join(CLASSES)})"
        )
    if not fname.lower().endswith(IMAGE_SUFFIXES):
        raise DataError(f"{where}: member {name}: not a {'/'.join(IMAGE_SUFFIXES)} image")
    return SPLITS.index(split), CLASSES.index(cls), fname


def _looks_like_image(name: str) -> bool:
    parts = member_parts(name)
    return (
        not is_hidden(name)
        and name.lower().endswith(IMAGE_SUFFIXES)
        and any(p in SPLITS for p in parts[:2])
    )


def kind_from_names(names: Iterable[str], where: str) -> str:
    """'official-python' or 'image-folder' from member names; neither or both -> DataError."""
    official = images = False
    for n in names:
        official |= not is_hidden(n) and basename(n) in OFFICIAL_MEMBERS
        images |= _looks_like_image(n)
    if official and images:
        raise DataError(f"{where}: holds both official batches and image folders; give only one")
    if official:
        return "official-python"
    if images:
        return "image-folder"
    raise DataError(
        f"{where}: neither the official python archive (cifar-10-batches-py/data_batch_1 ...) "
        "nor an image folder (train/<class>/*.jpg, test/<class>/*.jpg)"
    )


def detect_kind(archive: Path) -> str:
    """The archive's kind, by its member names. The whole stream is read, so a truncated or
    corrupted archive is reported here rather than later."""
    return kind_from_names((name for name, _ in iter_members(archive)), str(archive))
