"""PNG figures drawn headless: one place for the matplotlib set-up the trainer's and the benchmarks' plots share.

matplotlib comes with the `train` extra; without it `pyplot()` is None and callers that can go on without a plot
(the benchmarks) say so, while `saved_figure` raises ImportError naming the extra.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed), or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def saved_figure(path: str | Path, *subplots: int, dpi: int = 100, **subplots_kw: Any) -> Iterator[tuple[Any, Any]]:
    """`plt.subplots(*subplots, **subplots_kw)` as (fig, axes); on leaving the block the layout is tightened and the
    figure written to `path` (its folder made). The figure is closed either way, so long runs do not pile them up."""
    plt = pyplot()
    if plt is None:
        raise ImportError("plots need matplotlib: pip install -e .[train]")
    fig, axes = plt.subplots(*subplots, **subplots_kw)
    try:
        yield fig, axes
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
