"""The digest of the training code: part of the key under which finished runs are kept."""

from __future__ import annotations

from pathlib import Path

from suite.stage import code_digest
from suite.stage_compress import TRAINING_CODE


def test_code_digest_follows_every_training_source(tmp_path: Path) -> None:
    for name in ("kernels/a.py", "tasks/compression.py", "tasks/cifar10.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    before = code_digest(TRAINING_CODE, tmp_path)
    assert code_digest(TRAINING_CODE, tmp_path) == before
    (tmp_path / "kernels" / "cpu").mkdir()
    (tmp_path / "kernels" / "cpu" / "b.py").write_text("x = 1\n")  # a new file, one level down
    added = code_digest(TRAINING_CODE, tmp_path)
    assert added != before
    (tmp_path / "tasks" / "compression.py").write_text("# changed\n")
    changed = code_digest(TRAINING_CODE, tmp_path)
    assert changed not in (before, added)
    (tmp_path / "kernels" / "notes.txt").write_text("not code\n")
    (tmp_path / "tasks" / "other.py").write_text("# not training code\n")
    assert code_digest(TRAINING_CODE, tmp_path) == changed


def test_code_digest_of_this_checkout_covers_the_kernels() -> None:
    assert len(code_digest(TRAINING_CODE)) == 64
    assert code_digest(TRAINING_CODE) != code_digest(("tasks/compression.py",))
