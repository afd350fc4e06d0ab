"""The compress stage's code digest: the key under which dense runs are shared."""

from __future__ import annotations

from pathlib import Path

from suite.stage_compress import TRAINING_CODE, code_digest


def _tree(root: Path) -> None:
    for entry in TRAINING_CODE:
        path = root / entry / "a.py" if not entry.endswith(".py") else root / entry
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {entry}\n")


def test_code_digest_follows_every_training_source(tmp_path: Path) -> None:
    _tree(tmp_path)
    before = code_digest(tmp_path)
    assert code_digest(tmp_path) == before
    (tmp_path / "kernels" / "cpu").mkdir()
    (tmp_path / "kernels" / "cpu" / "b.py").write_text("x = 1\n")  # a new file, one level down
    added = code_digest(tmp_path)
    assert added != before
    (tmp_path / "tasks" / "compression.py").write_text("# changed\n")
    changed = code_digest(tmp_path)
    assert changed not in (before, added)
    (tmp_path / "kernels" / "notes.txt").write_text("not code\n")
    assert code_digest(tmp_path) == changed  # only Python sources count


def test_code_digest_of_this_checkout_is_stable() -> None:
    assert code_digest() == code_digest() and len(code_digest()) == 64
