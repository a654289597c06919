"""The shared headless figure helper and the plots drawn with it (trainer and benchmarks), on made-up numbers."""
from __future__ import annotations

import pytest

from trainer.plots import pyplot, saved_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_saved_figure_writes_a_png_into_a_new_folder_and_closes_it(tmp_path):
    plt = pyplot()
    open_before = set(plt.get_fignums())
    png = tmp_path / "a" / "b" / "fig.png"
    with saved_figure(png, 1, 2, figsize=(4, 3)) as (fig, axes):
        assert len(axes) == 2
        axes[0].plot([0, 1], [1, 0])
        assert not png.exists()  # written on leaving the block
    assert is_png(png)
    assert set(plt.get_fignums()) == open_before
    assert plt.get_backend().lower() == "agg"


def test_a_failing_drawing_writes_nothing_and_still_closes_the_figure(tmp_path):
    plt = pyplot()
    open_before = set(plt.get_fignums())
    png = tmp_path / "fig.png"
    with pytest.raises(ValueError, match="bad data"):
        with saved_figure(png) as (_, ax):
            ax.plot([1, 2, 3])
            raise ValueError("bad data")
    assert not png.exists()
    assert set(plt.get_fignums()) == open_before


def test_the_benchmarks_plots_draw_through_it(tmp_path):
    from bench import engine_bench, fairness_bench, peer_bench

    plt = pyplot()
    open_before = set(plt.get_fignums())
    levels = [1, 4]
    run = {"tokens_per_s": 10.0, "ttft_p50_s": 0.2}
    peer = {f"c{n}": {name: {"median": run, "runs": [run, run]} for name in peer_bench.SERVERS} for n in levels}
    peer_bench.plot(peer, levels, tmp_path / "out" / "peer.png", "title")
    fairness_bench.plot({"cfg": {"light_unloaded_s": [0.1, 0.2], "light_loaded_s": [0.3, 0.2], "p99_ratio": 1.5}},
                        tmp_path / "fair.png")
    curve = [{"batch": b, "engine_tok_s": 10.0 * b, "peft_tok_s": 5.0 * b} for b in (1, 2)]
    engine_bench.plot([{"model": "tiny", "engine_mixed": {"tok_s": 20.0}, "peft_per_task": {"tok_s": 8.0},
                        "curve": curve}], 1e11, tmp_path / "engine.png")
    assert all(is_png(p) for p in (tmp_path / "out" / "peer.png", tmp_path / "fair.png", tmp_path / "engine.png"))
    assert set(plt.get_fignums()) == open_before
