"""tasks.cifar10: small synthetic archives of both kinds; errors, atomic output, sources, fetch."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import pickle
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import cifar10_sources
from tasks.cifar10 import (
    CLASSES,
    NPZ_NAME,
    PROVENANCE_NAME,
    DataError,
    detect_kind,
    fetch,
    load,
    prepare,
    resolve_source,
)

N_TRAIN, N_TEST = 3, 2  # images per class in the image-folder archives


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    opts = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    Image.fromarray(arr).save(buf, format=fmt, **opts)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size = (tarfile.DIRTYPE, 0) if data is None else (tarfile.REGTYPE, len(data))
    tar.addfile(info, None if data is None else io.BytesIO(data))


def _write_tar(path: Path, members: dict[str, bytes], gz: bool = True) -> Path:
    """A tar(.gz) holding the members, with directory entries like a real `tar czf`."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for d in sorted({n.rpartition("/")[0] for n in members} - {""}):
            _add(tar, d)
        for name, data in members.items():
            _add(tar, name, data)
    return path


def _folder_members(
    top: str = "", fmt: str = "PNG", seed: int = 0
) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Members (shuffled insertion order) and the arrays prepare() should produce from them."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    want: dict[str, list] = {"x_train": [], "y_train": [], "x_test": [], "y_test": []}
    ext = ".png" if fmt == "PNG" else ".jpg"
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for label, cls in enumerate(CLASSES):
            for i in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                if fmt == "JPEG":  # flat 8x8 blocks survive JPEG almost exactly; noise would not
                    img = np.kron(img[:4, :4], np.ones((8, 8, 1), np.uint8))
                members[f"{top}{split}/{cls}/{i:04d}{ext}"] = _encode(img, fmt)
                want[f"x_{split}"].append(img)
                want[f"y_{split}"].append(label)
    order = list(members)
    rng.shuffle(order)  # the archive's order must not matter
    return {k: members[k] for k in order}, {k: np.array(v) for k, v in want.items()}


def _folder_archive(tmp_path: Path, name: str = "folder.tar.gz", seed: int = 0) -> Path:
    return _write_tar(tmp_path / name, _folder_members(seed=seed)[0])


def _official_archive(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The official layout with 4 rows per training batch and 10 test rows."""
    rng = np.random.default_rng(1)
    members: dict[str, bytes] = {}
    want: dict[str, list] = {"x_train": [], "y_train": [], "x_test": [], "y_test": []}
    train_labels = rng.permutation(np.arange(20) % 10)
    batches = [(f"data_batch_{i + 1}", train_labels[4 * i : 4 * i + 4]) for i in range(5)]
    for name, labels in [*batches, ("test_batch", rng.permutation(10))]:
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": data}
        blob = pickle.dumps(d, protocol=2)
        if name == "data_batch_1":  # old pickles name numpy.core; numpy 2 is numpy._core
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        members[f"cifar-10-batches-py/{name}"] = blob
        split = "test" if name == "test_batch" else "train"
        want[f"x_{split}"].extend(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        want[f"y_{split}"].extend(int(v) for v in labels)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps(meta, protocol=2)
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    path = _write_tar(tmp_path / "cifar-10-python.tar.gz", members)
    return path, {k: np.array(v) for k, v in want.items()}


def _check_arrays(out: Path, want: dict[str, np.ndarray]) -> dict:
    arrays, prov = load(out)
    for key, arr in want.items():
        assert arrays[key].dtype == (np.uint8 if key[0] == "x" else np.int64), key
        np.testing.assert_array_equal(arrays[key], arr, err_msg=key)
    return prov


@pytest.mark.parametrize("top", ["", "cifar10/"])
def test_image_folder_png_exact(tmp_path: Path, top: str) -> None:
    members, want = _folder_members(top=top)
    members[f"{top}train/cat/._0000.png"] = b"\x00AppleDouble"  # hidden files are not data
    members[f"{top}.DS_Store"] = b"junk"
    members[f"{top}README.txt"] = b"not data"
    archive = _write_tar(tmp_path / "f.tar.gz", members)
    assert detect_kind(archive) == "image-folder"
    calls: list[tuple[int, int]] = []
    out = tmp_path / "prepared"
    prov = prepare(archive, out, progress=lambda d, n: calls.append((d, n)))
    assert calls[-1] == (10 * (N_TRAIN + N_TEST),) * 2
    assert _check_arrays(out, want) == prov
    assert json.loads((out / PROVENANCE_NAME).read_text()) == prov
    assert prov["counts"] == {
        "train": dict.fromkeys(CLASSES, N_TRAIN),
        "test": dict.fromkeys(CLASSES, N_TEST),
    }
    assert (prov["n_train"], prov["n_test"]) == (10 * N_TRAIN, 10 * N_TEST)
    raw = archive.read_bytes()
    assert prov["source_sha256"] == hashlib.sha256(raw).hexdigest()
    assert prov["source_md5"] == hashlib.md5(raw).hexdigest()
    assert prov["arrays_sha256"] == hashlib.sha256((out / NPZ_NAME).read_bytes()).hexdigest()
    assert (prov["source_kind"], prov["image_format"]) == ("image-folder", "png")
    assert prov["official_md5_match"] is None and prov["source_name"] == "f.tar.gz"
    assert prov["format"] == "butterfly-suite/cifar10/v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tar.gz", "prepared"]


def test_jpeg_and_non_rgb(tmp_path: Path) -> None:
    members, want = _folder_members(fmt="JPEG")
    gray = np.arange(1024, dtype=np.uint8).reshape(32, 32)
    members["train/airplane/0000.jpg"] = _encode(gray, "PNG")  # content, not suffix, decides
    want["x_train"][0] = np.repeat(gray[..., None], 3, axis=2)
    out = tmp_path / "out"
    prov = prepare(_write_tar(tmp_path / "j.tgz", members), out)
    arrays, _ = load(out)
    np.testing.assert_array_equal(arrays["x_train"][0], want["x_train"][0])  # L -> RGB, exact
    np.testing.assert_array_equal(arrays["y_train"], want["y_train"])
    err = np.abs(arrays["x_train"][1:].astype(int) - want["x_train"][1:]).mean()
    assert err < 3 and prov["image_format"] == "jpeg+png"  # JPEG is lossy, only close


def test_official_batches_exact(tmp_path: Path) -> None:
    archive, want = _official_archive(tmp_path)
    assert detect_kind(archive) == "official-python"
    calls: list[tuple[int, int]] = []
    prov = prepare(archive, tmp_path / "out", progress=lambda d, n: calls.append((d, n)))
    assert calls[-1] == (6, 6)
    assert _check_arrays(tmp_path / "out", want) == prov
    assert (prov["source_kind"], prov["image_format"]) == ("official-python", "official-batches")
    assert prov["official_md5_match"] is False  # same layout, not the official bytes
    assert prov["counts"]["train"] == dict.fromkeys(CLASSES, 2)
    assert prov["counts"]["test"] == dict.fromkeys(CLASSES, 1)


def test_deterministic_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _folder_archive(tmp_path)
    first = prepare(archive, tmp_path / "a")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 86_400)  # zip entries often carry a date
    second = prepare(archive, tmp_path / "b")
    assert first == second
    for name in (NPZ_NAME, PROVENANCE_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _corrupt(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A broken archive of the given kind and a word its error message must contain."""
    members = _folder_members()[0]
    path = tmp_path / "bad.tar.gz"
    if kind.startswith("truncated"):  # "trailer": all tar blocks there, gzip's CRC/size cut
        raw = _write_tar(path, members).read_bytes()
        path.write_bytes(raw[: len(raw) // 2] if kind.endswith("half") else raw[:-6])
        return path, "truncated"
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
        return path, "not a readable tar archive"
    if kind == "missing-class":
        members = {k: v for k, v in members.items() if not k.startswith("test/cat/")}
        return _write_tar(path, members), "'test' has no images of class(es) cat"
    if kind == "wrong-size":
        members["train/dog/0001.png"] = _encode(np.zeros((32, 31, 3), np.uint8))
        return _write_tar(path, members), "train/dog/0001.png: image is 31x32"
    if kind == "unknown-class":
        members["train/kitten/0000.png"] = members["train/cat/0000.png"]
        return _write_tar(path, members), "train/kitten"
    if kind == "bad-image-late":  # valid images first, then a broken one in the last class
        members["test/truck/0001.png"] = b"\x89PNG not really"
        return _write_tar(path, members), "test/truck/0001.png: cannot decode image: not a"
    if kind == "duplicate-member":  # tar allows appending a second copy of a name
        with tarfile.open(_write_tar(path, members, gz=False), "a") as tar:
            _add(tar, "train/cat/0001.png", members["train/cat/0000.png"])
        return path, "train/cat/0001.png appears twice"
    raise AssertionError(kind)


CORRUPTIONS = [
    "truncated-half", "truncated-trailer", "random-bytes", "missing-class", "wrong-size",
    "unknown-class", "bad-image-late", "duplicate-member",
]  # fmt: skip


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous"])
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_errors_leave_no_partial_output(tmp_path: Path, kind: str, previous: bool) -> None:
    parent = tmp_path / "data"
    out = parent / "prepared"
    before = None
    if previous:
        prepare(_folder_archive(tmp_path, seed=5), out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    archive, needle = _corrupt(kind, tmp_path)
    with pytest.raises(DataError) as err:
        prepare(archive, out)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg
    if previous:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert [p.name for p in parent.iterdir()] == ["prepared"]  # no temp folders left
    else:
        assert not out.exists() and (not parent.exists() or not any(parent.iterdir()))
    if kind.startswith(("truncated", "random")):
        with pytest.raises(DataError, match="not a readable tar archive"):
            detect_kind(archive)


def test_official_errors(tmp_path: Path) -> None:
    archive, _ = _official_archive(tmp_path)
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    no_test = {k: v for k, v in members.items() if not k.endswith("test_batch")}
    with pytest.raises(DataError, match="missing member.*test_batch"):
        prepare(_write_tar(tmp_path / "a.tar.gz", no_test), tmp_path / "out")
    evil_pickle = b"cbuiltins\nprint\n(S'pwned'\ntR."  # print('pwned') when unpickled
    evil = dict(members, **{"cifar-10-batches-py/data_batch_3": evil_pickle})
    with pytest.raises(DataError, match="data_batch_3: cannot unpickle: refusing to load"):
        prepare(_write_tar(tmp_path / "b.tar.gz", evil), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing; run the data stage"):
        load(tmp_path / "nothing")
    prepare(_folder_archive(tmp_path), out := tmp_path / "out")
    npz = out / NPZ_NAME
    npz.write_bytes(npz.read_bytes()[:1000])
    with pytest.raises(DataError, match="does not match provenance; run the data stage"):
        load(out)
    (out / PROVENANCE_NAME).write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load(out)


def test_resolve_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    for f in (a, b):
        f.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR10_SOURCE", raising=False)
    assert resolve_source(["missing.tar.gz", "b.tar.gz", str(a)]) == str(b)  # relative to cwd
    url = "https://example.org/cifar-10-python.tar.gz"
    assert resolve_source(["missing.tar.gz", url, str(a)]) == url
    monkeypatch.setenv("CIFAR10_SOURCE", str(a))
    assert resolve_source([str(b), url]) == str(a)  # the env var wins
    monkeypatch.setenv("CIFAR10_SOURCE", str(tmp_path / "gone.tar.gz"))
    with pytest.raises(DataError, match="CIFAR10_SOURCE=.*gone.tar.gz: no such file"):
        resolve_source([str(b)])
    monkeypatch.setenv("CIFAR10_SOURCE", "")  # empty counts as unset
    with pytest.raises(DataError, match="none of these exist: x.tar.gz, y.tar.gz"):
        resolve_source(["x.tar.gz", "y.tar.gz"])


def test_fetch_local_copy_dedup_and_cleanup(tmp_path: Path) -> None:
    src = _folder_archive(tmp_path)
    (data_dir := tmp_path / "raw").mkdir()
    for old in ("old.tgz", "other.tar", "prev.tar.gz"):
        (data_dir / old).write_bytes(b"stale")
    (data_dir / "notes.txt").write_text("kept")
    dest = fetch(str(src), data_dir)
    assert dest == data_dir / src.name and dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in data_dir.iterdir()) == ["folder.tar.gz", "notes.txt"]
    inode = dest.stat().st_ino
    assert fetch(str(src), data_dir) == dest and dest.stat().st_ino == inode  # not copied again
    assert fetch(str(dest), data_dir) == dest  # fetching the file already there is a no-op
    with pytest.raises(DataError, match="no such file"):
        fetch(str(tmp_path / "gone.tar.gz"), data_dir)
    with pytest.raises(DataError, match="expected a file name ending in"):
        fetch(str(data_dir / "notes.txt"), data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == ["folder.tar.gz", "notes.txt"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server over a folder: (base URL, folder)."""
    (root := tmp_path / "www").mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{server.server_address[1]}", root
        server.shutdown()


def test_fetch_url(
    tmp_path: Path, http_dir: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, root = http_dir
    _folder_archive(root, name="cifar-10-python.tar.gz")
    url = f"{base}/cifar-10-python.tar.gz"
    got = fetch(url, data_dir := tmp_path / "raw", timeout=5)
    assert got.read_bytes() == (root / "cifar-10-python.tar.gz").read_bytes()
    # a URL with a known md5 (the official one) is verified; a mismatch leaves nothing behind
    monkeypatch.setitem(cifar10_sources.KNOWN_MD5, url, "0" * 32)
    with pytest.raises(DataError, match="does not match expected 0000"):
        fetch(url, fresh := tmp_path / "raw2", timeout=5)
    assert list(fresh.iterdir()) == []
    with pytest.raises(DataError, match="(?i)cannot download .*missing.tar.gz: .*not found"):
        fetch(f"{base}/missing.tar.gz", data_dir, timeout=5)
    assert [p.name for p in data_dir.iterdir()] == ["cifar-10-python.tar.gz"]  # kept


def test_fetch_unreachable(tmp_path: Path) -> None:
    data_dir, url = tmp_path / "raw", "http://127.0.0.1:9/x.tar.gz"
    with pytest.raises(DataError) as err:
        fetch(url, data_dir, timeout=2)
    msg = str(err.value)
    assert msg.startswith(f"cannot download {url}: ") and msg.endswith("via CIFAR10_SOURCE")
    assert not data_dir.exists() or list(data_dir.iterdir()) == []
