"""suite.plotting: the label placer keeps crowded labels apart."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt

from suite.plotting import label_box, place_labels


def test_crowded_labels_do_not_overlap() -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(1e3 * (1 + 0.05 * i), 40 + 0.3 * (i % 4)) for i in range(8)] + [(1e5, 30)]
    ax.scatter(*zip(*points, strict=True))
    ax.set_xscale("log")
    ax.set_xlim(3e2, 1e6)
    ax.set_ylim(20, 60)
    fig.tight_layout()
    place_labels(ax, [(f"method_{i}", x, y, {}) for i, (x, y) in enumerate(points)])
    renderer = fig.canvas.get_renderer()
    boxes = [label_box(t, renderer) for t in ax.texts]
    assert len(boxes) == len(points)
    assert not [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]
    plt.close(fig)
