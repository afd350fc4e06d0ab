"""Build and bind the C kernels of `csource.py`: compiled at first use, cached, loaded by ctypes.

Build: `$CC -O3 -march=native -fPIC -shared` (CC defaults to `cc`) into the cache directory
`$BUTTERFLY_CPU_CACHE` or `~/.cache/butterfly-suite/cpu`. The file name hashes the source, the
compiler, the flags and the machine (architecture and CPU model/flags, since -march=native code
may not run on another CPU sharing the cache). The compiler writes to a temporary name that is
then `os.replace`d into place, so two processes building at once both end with a whole library.

-fopenmp-simd only honours `#pragma omp simd` (no threads, no OpenMP runtime): the tiled
kernels use it to promise that a pair's row loop has no aliasing.

No -ffast-math: it would let the compiler reassociate sums and flush subnormals, so results would
drift from IEEE arithmetic and from the reference. -ffp-contract=off keeps `a*b + c*d` as two
rounded products and a rounded sum (no fused multiply-add), so the compiled path rounds exactly
as the C reads, on every machine.

If the native build fails it is retried without -march=native. If there is no compiler, both
builds fail, or the library does not load or fails a tiny self-check, a RuntimeWarning is
issued once per process and callers use the vectorised torch fallback (`backend()` says why).
`BUTTERFLY_CPU_BACKEND=torch` forces that fallback; `=c` makes its absence an error.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.cpu.csource import ABI_VERSION, c_source

FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-ffp-contract=off", "-fopenmp-simd")
# tried when FLAGS fail (a compiler or CPU without -march=native): same code, baseline ISA
PORTABLE_FLAGS = ("-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fopenmp-simd")
BACKEND_ENV = "BUTTERFLY_CPU_BACKEND"
CACHE_ENV = "BUTTERFLY_CPU_CACHE"
COMPILE_TIMEOUT_S = 120

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# bfly_*(src, ss0, ss1, perm, out, batch, n, tw, nblocks, tied, increasing)
_BFLY_ARGS = [_P, _I64, _I64, _P, _P, _I64, _I64, _P, _I64, _INT, _INT]
_FWHT_ARGS = [_P, _I64, _I64]  # fwht_*(x, batch, n)
# bfly_*_argv: the same arguments in one array, then a bias pointer (or 0) and its length
BFLY_ARGV = ctypes.c_int64 * (len(_BFLY_ARGS) + 2)


class BuildError(RuntimeError):
    """The C kernels could not be compiled or loaded."""


@dataclass(frozen=True)
class Library:
    """The loaded shared library and its entry points, keyed by torch dtype."""

    path: Path
    flags: tuple[str, ...]
    cdll: ctypes.CDLL
    bfly: dict[torch.dtype, Callable[..., None]]
    bfly_argv: dict[torch.dtype, Callable[..., None]]
    fwht: dict[torch.dtype, Callable[..., None]]
    tl_forward: dict[torch.dtype, Callable[..., None]]
    tl_backward: dict[torch.dtype, Callable[..., None]]
    tl_rows: dict[torch.dtype, int]
    mix: dict[torch.dtype, Callable[..., None]]
    crow: dict[torch.dtype, Callable[..., None]]
    tl_mix: dict[torch.dtype, Callable[..., None]]
    cl_forward: dict[torch.dtype, Callable[..., None]]
    cl_backward: dict[torch.dtype, Callable[..., None]]
    bpl_forward: dict[torch.dtype, Callable[..., None]]
    bpl_backward: dict[torch.dtype, Callable[..., None]]
    tl_mix_grad: dict[torch.dtype, Callable[..., None]]


def cache_dir() -> Path:
    """Where compiled libraries are kept ($BUTTERFLY_CPU_CACHE or ~/.cache/...)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "butterfly-suite" / "cpu"


def compiler() -> str:
    """The C compiler command: $CC, else `cc`."""
    return os.environ.get("CC") or "cc"


def _machine_signature() -> str:
    # -march=native output is only valid on CPUs with the same features: key the cache on them
    sig = [platform.system(), platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            seen = set()
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in seen:
                    seen.add(key)
                    sig.append(line.strip())
    except OSError:
        pass
    return "\n".join(sig)


def library_path(cc: str, directory: Path, flags: tuple[str, ...] = FLAGS) -> Path:
    """The cache file for this source, compiler, flags and machine."""
    key = "\0".join([c_source(), cc, " ".join(flags), _machine_signature()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return directory / f"butterfly_cpu_{digest}.so"


def build(
    cc: str | None = None, directory: Path | None = None, flags: tuple[str, ...] = FLAGS
) -> Path:
    """Compile the library unless it is cached; its path, or BuildError (one line)."""
    cc = cc or compiler()
    directory = directory or cache_dir()
    target = library_path(cc, directory, flags)
    if target.exists():
        return target
    exe = shutil.which(cc.split()[0]) if cc.strip() else None
    if exe is None:
        raise BuildError(f"no C compiler found (CC={cc!r})")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # temporary names in the target directory so that os.replace is an atomic rename
        fd, tmp_so = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write to cache directory {directory} (${CACHE_ENV}): {e}") from e
    tmp_c = tmp_so[:-3] + ".c"
    try:
        Path(tmp_c).write_text(c_source(), encoding="utf-8")
        cmd = [*cc.split(), *flags, "-o", tmp_so, tmp_c]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BuildError(f"{cc} failed to run: {e}") from e
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            first = detail[0] if detail else "no output"
            raise BuildError(f"{cc} exited with {proc.returncode}: {first}")
        os.replace(tmp_so, target)
    except OSError as e:
        raise BuildError(f"cannot write to cache directory {directory}: {e}") from e
    finally:
        for p in (tmp_so, tmp_c):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    return target


def _bind(path: Path, flags: tuple[str, ...]) -> Library:
    try:
        cdll = ctypes.CDLL(str(path))
        version = cdll.bfly_abi_version()
    except (OSError, AttributeError) as e:
        raise BuildError(f"cannot load {path}: {e}") from e
    if version != ABI_VERSION:
        raise BuildError(f"{path} has ABI {version}, expected {ABI_VERSION}")
    bfly, bfly_argv, fwht, tl_fwd, tl_bwd, tl_rows = {}, {}, {}, {}, {}, {}
    mix, crow, tl_mix, cl_fwd, cl_bwd, bpl_fwd, bpl_bwd = {}, {}, {}, {}, {}, {}, {}
    mix_grad: dict[torch.dtype, Callable[..., None]] = {}
    for dtype, sfx in ((torch.float32, "f32"), (torch.float64, "f64")):
        f = getattr(cdll, f"bfly_{sfx}")
        f.argtypes, f.restype = _BFLY_ARGS, None
        bfly[dtype] = f
        fa = getattr(cdll, f"bfly_{sfx}_argv")
        # no argtypes: a BFLY_ARGV array passes as its address with no conversion (the fastest
        # ctypes call); callers must pass exactly that type
        fa.restype = None
        bfly_argv[dtype] = fa
        h = getattr(cdll, f"fwht_{sfx}")
        h.argtypes, h.restype = _FWHT_ARGS, None
        fwht[dtype] = h
        tables = (
            ("tl_forward", tl_fwd), ("tl_backward", tl_bwd), ("mix", mix), ("crow", crow),
            ("tl_mix", tl_mix), ("cl_forward", cl_fwd), ("cl_backward", cl_bwd),
            ("bpl_forward", bpl_fwd), ("bpl_backward", bpl_bwd), ("tl_mix_grad", mix_grad),
        )  # fmt: skip
        for name, table in tables:
            fn = getattr(cdll, f"{name}_{sfx}")
            fn.restype = None  # one int64 array argument, like bfly_*_argv
            table[dtype] = fn
        rows = getattr(cdll, f"tl_rows_{sfx}")
        rows.restype = ctypes.c_int64
        tl_rows[dtype] = int(rows())
    lib = Library(
        path, flags, cdll, bfly, bfly_argv, fwht, tl_fwd, tl_bwd, tl_rows, mix, crow, tl_mix,
        cl_fwd, cl_bwd, bpl_fwd, bpl_bwd, mix_grad,
    )  # fmt: skip
    _self_check(lib)
    return lib


def _self_check(lib: Library) -> None:
    # one 4-point multiply and transform against hand-computed values: catches a library that
    # loads but computes garbage (wrong ABI, miscompilation) before anything relies on it
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=dtype)
        d = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)
        tw = d.view(1, 4, 1).expand(2, 4, 2).contiguous()  # packed (m, 4, n/2)
        out = torch.empty_like(x)
        lib.bfly[dtype](x.data_ptr(), 4, 1, None, out.data_ptr(), 1, 4, tw.data_ptr(), 1, 0, 1)
        # level 0: (1,2)->(5,11), (3,4)->(11,25); level 1: (5,11)->(27,59), (11,25)->(61,133)
        expected = torch.tensor([[27.0, 61.0, 59.0, 133.0]], dtype=dtype)
        h = x.clone()
        lib.fwht[dtype](h.data_ptr(), 1, 4)
        if not (torch.equal(out, expected) and h.tolist() == [[10.0, -2.0, -4.0, 0.0]]):
            raise BuildError(f"{lib.path} failed its self-check ({dtype})")


def _build_and_bind() -> Library:
    first: BuildError | None = None
    for flags in (FLAGS, PORTABLE_FLAGS):
        try:
            return _bind(build(flags=flags), flags)
        except BuildError as e:
            first = first or e
    assert first is not None
    raise first  # the native build's reason: the portable one usually fails the same way


_lock = threading.Lock()
_loaded: Library | None = None
_failure: str | None = None


def library() -> Library | None:
    """The compiled library, built on first use; None (after one warning) if unavailable."""
    global _loaded, _failure
    if _loaded is not None or _failure is not None:
        return _loaded
    with _lock:
        if _loaded is None and _failure is None:
            try:
                _loaded = _build_and_bind()
            except BuildError as e:
                _failure = str(e)
                warnings.warn(
                    f"butterfly CPU kernels unavailable ({_failure}); "
                    "using the vectorised torch fallback",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _loaded


def reset() -> None:
    """Forget the loaded library and any failure, so the next use builds again (for tests)."""
    global _loaded, _failure
    with _lock:
        _loaded, _failure = None, None


def forced_torch(impl: str | None = None) -> bool:
    """Whether the torch fallback is requested: impl, else $BUTTERFLY_CPU_BACKEND, else auto.

    impl / the variable: "auto" (compiled if available), "torch" (always the fallback) or "c"
    (compiled, RuntimeError if it is unavailable).
    """
    choice = impl or os.environ.get(BACKEND_ENV) or "auto"
    if choice == "torch":
        return True
    if choice == "c":
        if library() is None:
            raise RuntimeError(f"compiled CPU kernels requested but unavailable: {_failure}")
        return False
    if choice != "auto":
        raise ValueError(f"backend must be 'auto', 'c' or 'torch', got {choice!r}")
    return library() is None


def compiled_available() -> bool:
    """Whether the compiled C kernels are built and loaded (building them if needed)."""
    return library() is not None


def backend(impl: str | None = None) -> str:
    """Which path runs, and why: 'c: <library>' or 'torch-vectorised: <reason>'."""
    if forced_torch(impl):
        forced = (impl or os.environ.get(BACKEND_ENV)) == "torch"
        why = f"forced by {'impl' if impl else BACKEND_ENV}=torch" if forced else _failure
        return f"torch-vectorised: {why}"
    assert _loaded is not None
    return f"c: {compiler()} {' '.join(_loaded.flags)} -> {_loaded.path}"
