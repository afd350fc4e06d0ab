"""Shared servers of the many-machine tests: one PostgreSQL and one MLflow server on it."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from postgres import MlflowServer, Postgres, require_postgres  # noqa: E402


@pytest.fixture(scope="session")
def pg() -> Iterator[Postgres]:
    with Postgres(require_postgres()) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(pg: Postgres) -> Iterator[MlflowServer]:
    """A tracking server whose runs live in PostgreSQL, as a team's shared dashboard."""
    with (
        tempfile.TemporaryDirectory(prefix="suite-mlflow-") as root,
        MlflowServer(pg.database("mlflow"), Path(root)) as server,
    ):
        yield server
