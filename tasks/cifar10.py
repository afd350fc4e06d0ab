"""CIFAR-10 data stage: a source archive -> validated uint8 arrays plus a provenance record.

``prepare`` writes ``cifar10.npz`` (x_train/x_test uint8 (N, 32, 32, 3), y_train/y_test int64)
and ``provenance.json`` into ``out_dir``, atomically; ``load`` reads them back.

Row order (so outputs are reproducible byte for byte):

- image-folder: split, then class label (CLASSES order), then file name (string order). The
  training rows are therefore grouped by class: shuffle when batching.
- official-python: the official order, data_batch_1..5 then test_batch, rows as stored.

Images that are 32x32 but not RGB (grayscale, palette, RGBA, CMYK) are converted to RGB;
any other size is an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kernels.atomic import clean_stale, replace_dir, sibling
from tasks.cifar10_sources import (
    CLASSES,
    IMAGE_SUFFIXES,
    OFFICIAL_MD5,
    OFFICIAL_MEMBERS,
    OFFICIAL_URL,
    SPLITS,
    DataError,
    basename,
    detect_kind,
    fetch,
    file_digests,
    image_member,
    is_hidden,
    iter_members,
    kind_from_names,
    one_line,
    resolve_source,
)

__all__ = [
    "CLASSES", "OFFICIAL_URL", "OFFICIAL_MD5", "DataError", "resolve_source", "fetch",
    "detect_kind", "prepare", "load", "FORMAT", "NPZ_NAME", "PROVENANCE_NAME",
]  # fmt: skip

FORMAT = "butterfly-suite/cifar10/v1"
NPZ_NAME = "cifar10.npz"
PROVENANCE_NAME = "provenance.json"
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
Progress = Callable[[int, int], None]
_PROGRESS_EVERY = 2048
_PIL_FORMATS = ("JPEG", "PNG")  # what IMAGE_SUFFIXES promise; skips probing other plugins

# Pickle can run arbitrary code; the official batches only need numpy arrays and plain types.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}  # fmt: skip


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        # numpy 2 keeps numpy.core only as a warning shim; old pickles name it.
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


# ---------------------------------------------------------------- image folder


def _decode(data: bytes, name: str, where: str, seen: set[str]) -> np.ndarray:
    """One 32x32 image as uint8 (32, 32, 3); its actual format (not its suffix) goes to seen."""
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            size = im.size
            seen.add(str(im.format).lower())
            if size == (32, 32):  # decode only what passes the size check
                rgb = im if im.mode == "RGB" else im.convert("RGB")
                arr = np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # PIL's own text for this one names a BytesIO object's address, which helps nobody
        why = "not a PNG or JPEG file" if isinstance(e, UnidentifiedImageError) else one_line(e)
        raise DataError(f"{where}: member {name}: cannot decode image: {why}") from e
    if size != (32, 32):
        raise DataError(f"{where}: member {name}: image is {size[0]}x{size[1]}, expected 32x32")
    return arr


def _image_folder(
    names: list[str], members: dict[str, bytes], where: str, progress: Progress | None
) -> tuple[dict[str, np.ndarray], str]:
    keyed: list[tuple[tuple[int, int, str], str]] = []
    prefixes: set[str] = set()
    for name in names:
        key = image_member(name, prefixes, where)
        if key is not None:
            keyed.append((key, name))
    keyed.sort()
    total = len(keyed)
    arrays: dict[str, np.ndarray] = {}
    done = 0
    seen: set[str] = set()
    for s, split in enumerate(SPLITS):
        rows = [(key, name) for key, name in keyed if key[0] == s]
        x = np.empty((len(rows), 32, 32, 3), dtype=np.uint8)
        y = np.empty(len(rows), dtype=np.int64)
        for i, ((_, label, _), name) in enumerate(rows):
            x[i] = _decode(members[name], name, where, seen)
            y[i] = label
            done += 1
            if progress is not None and (done % _PROGRESS_EVERY == 0 or done == total):
                progress(done, total)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return arrays, "+".join(sorted(seen))


# ------------------------------------------------------------ official batches


def _unpickle(data: bytes, name: str, where: str) -> object:
    try:
        return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a damaged pickle can raise almost anything
        raise DataError(f"{where}: member {name}: cannot unpickle: {one_line(e)}") from e


def _batch(obj: object, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    data = obj.get(b"data") if isinstance(obj, dict) else None
    labels = obj.get(b"labels") if isinstance(obj, dict) else None
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3072)
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: member {name}: b'data' should be uint8 (n, 3072), got {got}")
    try:
        y = np.asarray(labels if isinstance(labels, list) else [], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        y = np.empty(0, dtype=np.int64)
    if y.shape != (data.shape[0],) or (y.size and (y.min() < 0 or y.max() >= len(CLASSES))):
        raise DataError(
            f"{where}: member {name}: b'labels' should be {data.shape[0]} labels in 0..9"
        )
    # Each row is 1024 R, 1024 G, 1024 B values, each plane row-major.
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), y


def _official(
    members: dict[str, bytes], where: str, progress: Progress | None
) -> dict[str, np.ndarray]:
    by_base: dict[str, str] = {}
    for name in members:
        base = basename(name)
        if base in by_base:
            raise DataError(f"{where}: member {base} appears twice ({by_base[base]}, {name})")
        by_base[base] = name
    missing = [m for m in OFFICIAL_MEMBERS if m not in by_base]
    if missing:
        raise DataError(f"{where}: missing member(s) {', '.join(missing)} of cifar-10-batches-py/")
    meta_name = by_base["batches.meta"]
    meta = _unpickle(members[meta_name], meta_name, where)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    got = [n.decode() if isinstance(n, bytes) else n for n in (names or [])]
    if tuple(got) != CLASSES:
        raise DataError(f"{where}: member {meta_name}: label_names {got}, expected {list(CLASSES)}")
    batches = [b for b in OFFICIAL_MEMBERS if b != "batches.meta"]
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, b in enumerate(batches):  # progress counts batches here: row counts come from them
        parts[b] = _batch(_unpickle(members[by_base[b]], b, where), by_base[b], where)
        if progress is not None:
            progress(i + 1, len(batches))
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        mine = [parts[b] for b in batches if (b == "test_batch") == (split == "test")]
        arrays[f"x_{split}"] = np.concatenate([p[0] for p in mine])
        arrays[f"y_{split}"] = np.concatenate([p[1] for p in mine])
    return arrays


# ------------------------------------------------------------------ writing


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez (stored, uncompressed) but with fixed zip timestamps: byte-reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in ARRAY_KEYS:
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[key]), allow_pickle=False)


def prepare(archive: Path, out_dir: Path, progress: Progress | None = None) -> dict:
    """Validate ``archive`` and write ``out_dir/cifar10.npz`` + ``provenance.json``; return the
    provenance. Output is built in a temporary sibling folder and swapped in at the end, so a
    failure leaves the previous output (or none) in place. ``progress(done, total)`` is called
    as work completes: images for an image folder, batches for the official archive."""
    archive, out_dir = Path(archive), Path(out_dir)
    where = str(archive)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    sha256, md5 = file_digests(archive) if archive.is_file() else ("", "")

    def want(name: str) -> bool:
        base = basename(name)
        return not is_hidden(name) and (
            base in OFFICIAL_MEMBERS or base.lower().endswith(IMAGE_SUFFIXES)
        )

    members: dict[str, bytes] = {}
    names: list[str] = []
    for name, data in iter_members(archive, want):
        names.append(name)
        if data is not None:
            if name in members:  # tar allows it; which copy counts would be arbitrary
                raise DataError(f"{where}: member {name} appears twice")
            members[name] = data
    kind = kind_from_names(names, where)
    if kind == "official-python":
        members = {n: d for n, d in members.items() if basename(n) in OFFICIAL_MEMBERS}
        arrays, image_format = _official(members, where, progress), "official-batches"
        order = "official: data_batch_1..5 then test_batch, rows as stored"
    else:
        arrays, image_format = _image_folder(names, members, where, progress)
        order = "split, class label, file name"
    del members

    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        per = np.bincount(arrays[f"y_{split}"], minlength=len(CLASSES))
        counts[split] = {c: int(n) for c, n in zip(CLASSES, per, strict=True)}
        empty = [c for c in CLASSES if counts[split][c] == 0]
        if empty:
            raise DataError(
                f"{where}: split {split!r} has no images of class(es) {', '.join(empty)}"
            )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    tmp = sibling(out_dir, "tmp")
    try:
        _write_npz(tmp / NPZ_NAME, arrays)
        prov = {
            "format": FORMAT,
            "source_kind": kind,
            "source_name": archive.name,
            "source_sha256": sha256,
            "source_md5": md5,
            # Any official-format archive is compared with the official bytes; a repack is False.
            "official_md5_match": (md5 == OFFICIAL_MD5) if kind == "official-python" else None,
            "image_format": image_format,
            "row_order": order,
            "counts": counts,
            "n_train": int(len(arrays["y_train"])),
            "n_test": int(len(arrays["y_test"])),
            "arrays_sha256": file_digests(tmp / NPZ_NAME)[0],
        }
        (tmp / PROVENANCE_NAME).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prov


def load(out_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and provenance written by :func:`prepare`, checked against each other."""
    out_dir = Path(out_dir)
    hint = "run the data stage (suite data / dvc repro) to rebuild it"
    npz, pj = out_dir / NPZ_NAME, out_dir / PROVENANCE_NAME
    for p in (npz, pj):
        if not p.is_file():
            raise DataError(f"{p}: missing; {hint}")
    try:
        prov = json.loads(pj.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{pj}: unreadable ({one_line(e)}); {hint}") from e
    if not isinstance(prov, dict) or prov.get("format") != FORMAT:
        raise DataError(f"{pj}: not a {FORMAT} provenance record; {hint}")
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    if digest != prov.get("arrays_sha256"):
        raise DataError(f"{npz}: sha256 {digest} does not match provenance; {hint}")
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ARRAY_KEYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{npz}: unreadable ({one_line(e)}); {hint}") from e
    for split in SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or y.shape != (len(x),):
            raise DataError(f"{npz}: {split} arrays have unexpected shapes; {hint}")
    return arrays, prov
