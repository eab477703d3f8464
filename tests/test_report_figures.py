"""The report's figures: legends ("1 seed"), no 95% band from fewer than 3 seeds, seeds that end at different times
(the seconds panel), a log axis when budgets differ, one colour per algorithm (a peer in its script's hue), and the
REINFORCE variance figure's updates with no gradient."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from benchmarks import pg_study, report


def curves_of(ax):
    return [(line.get_label(), line.get_linestyle(), line.get_ydata()) for line in ax.lines]


@pytest.mark.parametrize("n, band", [(1, False), (2, False), (3, True)])
def test_legend_says_seed_and_no_band_from_fewer_than_3_seeds(n, band):
    grid = np.linspace(0, 1, 11)
    curves = np.array([np.linspace(0, 1, 11) + k for k in range(n)])
    fig, ax = plt.subplots()
    report.draw_mean(ax, grid, curves, f"ppo ({report.seeds_label(n)})")
    (label, style, y), *dashed = curves_of(ax)
    assert label == ("ppo (1 seed)" if n == 1 else f"ppo ({n} seeds)") and style == "-" and not dashed
    np.testing.assert_allclose(y, curves.mean(0))
    assert (len(ax.collections) == 1) is band
    plt.close(fig)
    assert report.fmt_ci([1.0, 3.0]) == "2.0" and report.fmt_ci([7.0, 7.0, 7.0]) == "7.0 [7.0, 7.0]"


def test_seeds_that_end_at_different_times_are_drawn_each_to_its_end():
    # in seconds, seed A runs over the first 6 grid points and seed B over the last 5: no point has both
    grid = np.arange(11.0)
    a = np.where(grid <= 5, 10.0, np.nan)
    b = np.where(grid >= 6, 30.0, np.nan)
    fig, ax = plt.subplots()
    report.draw_mean(ax, grid, np.array([a, b]), "ppo (2 seeds)")
    lines = curves_of(ax)
    solid = [y for _, style, y in lines if style == "-"]
    dashed = [y for _, style, y in lines if style == "--"]
    assert solid and np.isnan(solid[0]).all()  # no point where every seed runs
    assert dashed and np.nanmin(dashed[0]) == 10.0 and np.nanmax(dashed[0]) == 30.0
    np.testing.assert_allclose(dashed[0], np.where(grid <= 5, 10.0, 30.0))  # each seed up to its own end
    plt.close(fig)
    # overlapping: the mean of both where both run (solid), of the one still running after (dashed)
    b = np.where(grid >= 3, 30.0, np.nan)
    fig, ax = plt.subplots()
    report.draw_mean(ax, grid, np.array([a, b]), "ppo (2 seeds)")
    (_, _, solid), (_, _, dashed) = curves_of(ax)
    np.testing.assert_allclose(solid[3:6], 20.0)
    assert np.isnan(solid[:3]).all() and np.isnan(solid[6:]).all()
    np.testing.assert_allclose(dashed[[0, 1, 2, 6, 10]], [10.0, 10.0, 10.0, 30.0, 30.0])
    plt.close(fig)


def test_the_variance_figure_leaves_out_updates_with_no_gradient(tmp, monkeypatch):
    # rloo after it solves CartPole: all K episodes last 500 steps, every advantage is 0, the variance ~1e-25
    steps = np.arange(1, 41) * 1000
    variance = np.where(np.arange(40) < 20, 1e3, 1e-25)
    run = {"tags": {"losses/pg_variance": (steps, steps * 0.0, variance)}}
    shown = []
    monkeypatch.setattr(pg_study.plt, "close", shown.append)
    pg_study.variance_figure({"reinforce-rloo": [run]}, tmp / "v.png", "CartPole-v1")
    (fig,) = shown
    left, right = fig.axes
    (line,) = left.lines
    assert np.nanmin(line.get_ydata()) == pytest.approx(3.0)  # log10(1e3): no fall to log10(1e-12) or below
    assert line.get_xdata()[np.isfinite(line.get_ydata())].max() <= 20_000  # nothing drawn past the last gradient
    (share,) = right.lines
    assert share.get_ydata()[0] == 0.0 and share.get_ydata()[-1] == 1.0
    assert line.get_label() == "reinforce-rloo (1 seed)"
    plt.close(fig)


def fake_run(seed: int, budget: int, episode: int, seconds_per_step: float) -> dict:
    steps = np.arange(episode, budget + 1, episode)
    walls = 1000.0 + steps * seconds_per_step
    returns = np.linspace(0.0, 500.0, len(steps))
    return {
        "seed": seed,
        "start_time": 1000.0,
        "seconds": float(walls[-1] - 1000.0),
        "tags": {"charts/episodic_return": (steps, walls, returns)},
    }


def test_budgets_that_differ_get_a_log_axis_and_equal_ones_a_linear_one(tmp, monkeypatch):
    # q_learning's 500k steps beside dqn's 30k: on a linear axis dqn's whole curve would sit in the first 6%
    grid, scale = report.x_axis([20.0, 20.0], [30_000.0, 500_000.0])
    assert scale == "log" and grid[-1] == 500_000.0
    assert grid[0] == pytest.approx(300.0)  # two decades below the shortest end, not the first episode's 20 steps
    assert (grid < 30_000).sum() > report.GRID // 2  # the short curve has most of the points, not 6 of them
    grid, scale = report.x_axis([20.0, 20.0], [1e6, 1e6])
    assert scale == "linear" and grid[0] == 0.0 and grid[-1] == 1e6
    shown = []
    monkeypatch.setattr(report.plt, "close", shown.append)
    by_algo = {"dqn": [fake_run(1, 30_000, 100, 1e-3)], "q_learning": [fake_run(1, 500_000, 100, 2e-5)]}
    report.figure("CartPole-v1", by_algo, tmp / "f.png", rows := [])
    (fig,) = shown
    steps_axis, seconds_axis = fig.axes
    assert steps_axis.get_xscale() == "log" and steps_axis.get_xlabel() == "environment steps, log scale"
    assert seconds_axis.get_xscale() == "linear"  # 30 s and 10 s: within LOG_RATIO of each other
    plt.close(fig)
    # curves.csv keeps its linear grid of GRID points from 0, with each curve's value there, whatever the axis
    steps, _, returns = by_algo["q_learning"][0]["tags"]["charts/episodic_return"]
    linear = np.linspace(0, 500_000, report.GRID)
    want = report.on_grid(steps.astype(float), report.running_mean(returns), linear)
    got = [(g, v) for env, algo, seed, g, v in rows if algo == "q_learning"]
    assert got == [(int(g), v) for g, v in zip(linear, want) if np.isfinite(v)]


def test_a_peer_is_drawn_in_the_light_shade_of_its_scripts_hue():
    algos = ["ppo", "a2c", "trpo", "reinforce", "grpo", "dqn", "q_learning", "sarsa"]
    peers = ["sb3-ppo", "sb3-a2c", "sb3-trpo", "sb3-dqn"]
    colour = report.colours(algos + peers)
    tab20 = plt.get_cmap("tab20").colors
    for peer in peers:
        i = tab20.index(colour[peer[4:]])
        assert i % 2 == 0 and colour[peer] == tab20[i + 1]  # the script dark, its peer the light shade beside it
    mine = [colour[a] for a in algos]
    assert len(set(mine)) == len(mine)  # every script a hue of its own
    few = report.colours(["ppo", "sb3-ppo"])
    assert few == {"ppo": "C0", "sb3-ppo": "C1"}  # 10 curves or fewer: matplotlib's own distinct colours
