"""The case grid of the speed benchmark: SpeedParams (params.yaml `speed`) -> Cases.

A case is one (device, n, batch, dtype, direction); the benchmark is every provider x every case
the provider declares it can run (`providers.items`; cases import no provider, providers import
the cases). `suite speed` hands the grid to the
pytest process as JSON in $SUITE_SPEED_GRID; without it (CI, a plain `pytest`) the tiny
`CI_PARAMS` grid runs on the default device, every provider, so CI exercises every check.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16")
DIRECTIONS = ("forward", "forward_backward")
GRID_ENV = "SUITE_SPEED_GRID"  # path of the grid JSON written by `suite speed`
SKIPS_ENV = "SUITE_SPEED_SKIPS"  # where the pytest process writes its recorded skips


def _default_dtypes() -> dict[str, list[str]]:
    return {"cpu": ["float32"], "cuda": ["float32", "bfloat16"]}


@dataclass(frozen=True)
class SpeedParams:
    """Knobs of the speed stage (params.yaml: speed + profiles.<p>.speed)."""

    providers: list[str]
    sizes: list[int]
    batches: dict[str, list[int]]  # device kind -> batch sizes
    directions: list[str]
    threads: int = 1  # torch intra-op threads on the CPU; the paper's figure is one thread
    max_n: dict[str, int] = field(default_factory=dict)  # "provider" or "provider@device" -> cap
    dtypes: dict[str, list[str]] = field(default_factory=_default_dtypes)
    min_rounds: int = 5
    max_time: float = 0.25
    min_time: float = 1e-4
    warmup: bool = False
    gpu_warmup_rounds: int = 5
    l2_flush_mb: int = 256
    copy_mb: int = 256
    check_rows: int = 64
    memory_fraction: float = 0.7
    seed: int = 0

    def validate(self) -> None:
        """Values that need no provider registry (providers.check_params checks the names)."""
        for n in self.sizes:
            if n < 2 or n & (n - 1):
                raise ValueError(f"sizes must be powers of two >= 2, got {n}")
        for where, mapping in (("batches", self.batches), ("dtypes", self.dtypes)):
            for dev in mapping:
                if dev not in DEVICES:
                    raise ValueError(f"{where}: unknown device {dev!r} (allowed: cpu, cuda)")
        if any(b < 1 for bs in self.batches.values() for b in bs):
            raise ValueError(f"batches must be >= 1, got {self.batches}")
        for dt in (d for ds in self.dtypes.values() for d in ds):
            if dt not in DTYPES:
                raise ValueError(f"unknown dtype {dt!r} (allowed: {', '.join(DTYPES)})")
        for d in self.directions:
            if d not in DIRECTIONS:
                raise ValueError(f"unknown direction {d!r} (allowed: {', '.join(DIRECTIONS)})")
        for key in self.max_n:
            if key.partition("@")[2] not in ("", *DEVICES):
                raise ValueError(f"max_n key {key!r} must be PROVIDER or PROVIDER@cpu|cuda")
        if self.threads < 1 or self.min_rounds < 1 or self.max_time <= 0 or self.min_time <= 0:
            raise ValueError("threads and min_rounds must be >= 1, max_time and min_time > 0")
        if not 0 < self.memory_fraction <= 1 or self.check_rows < 1:
            raise ValueError("memory_fraction must be in (0, 1] and check_rows >= 1")

    def cap(self, provider: str, device: str) -> int | None:
        """The largest n this provider runs at on this device (None: no cap)."""
        return self.max_n.get(f"{provider}@{device}", self.max_n.get(provider))


CI_PARAMS = SpeedParams(
    providers=[
        "butterfly_triton", "butterfly_cpu", "butterfly_reference", "dense_fp32", "dense_tf32",
        "dense_bf16", "fft", "rfft", "dct", "hadamard",
    ],
    sizes=[64, 256],
    batches={"cpu": [1, 4], "cuda": [1, 256]},
    directions=list(DIRECTIONS),
    min_rounds=1,
    max_time=0.01,
    copy_mb=16,
    l2_flush_mb=64,
)  # fmt: skip
"""The grid when no $SUITE_SPEED_GRID is given: every provider, two small sizes (CI, < 10 s)."""


@dataclass(frozen=True)
class Case:
    """One cell of the grid; `id` is its pytest id and its MLflow/JSON key."""

    device: str
    n: int
    batch: int
    dtype: str
    direction: str

    @property
    def id(self) -> str:
        return f"{self.device}-n{self.n}-b{self.batch}-{self.dtype}-{self.direction}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Grid:
    """What one pytest process measures: params, the device, and the harness's machine facts."""

    params: SpeedParams
    device: str
    machine: dict[str, Any] = field(default_factory=dict)
    source: str = "ci-default"


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def dump_grid(grid: Grid) -> str:
    """The JSON that $SUITE_SPEED_GRID points to."""
    return json.dumps(
        {"params": asdict(grid.params), "device": grid.device, "machine": grid.machine},
        sort_keys=True,
    )


def load_grid() -> Grid:
    """The grid of this pytest process: $SUITE_SPEED_GRID's file, or CI_PARAMS on auto."""
    path = os.environ.get(GRID_ENV)
    if not path:
        return Grid(CI_PARAMS, resolve_device("auto"))
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    params = SpeedParams(**raw["params"])
    params.validate()
    return Grid(params, resolve_device(raw["device"]), raw.get("machine", {}), path)
