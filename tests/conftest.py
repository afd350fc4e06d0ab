"""Shared test setup: Triton under the CPU interpreter when there is no GPU; a fresh generator.

triton.jit reads TRITON_INTERPRET when a kernel is decorated, so this must happen before any
test module imports kernels.triton; conftest.py is imported first.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed, printed so that pytest shows it with a failure."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(8), "little") % 2**63)
    print(f"generator seed {g.initial_seed()}")
    return g
