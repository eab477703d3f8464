"""The report's aggregates across envs (rliable: IQM and mean of normalised scores with stratified bootstrap CIs,
performance profiles, probability of improvement), each number checked against an independent numpy computation."""

import itertools
import sys

import numpy as np
import pytest
from conftest import run_main

from benchmarks import aggregate, report
from benchmarks.events import load_scalars

pytest.importorskip("rliable")


def trimmed_mean(x) -> float:
    """The IQM as rliable defines it (scipy's trim_mean, 25%): drop int(n/4) values at each end, mean of the rest."""
    x = np.sort(np.ravel(x))
    k = int(0.25 * len(x))
    return float(x[k : len(x) - k].mean())


def exact_bootstrap_quantiles(x, statistic, q=(0.025, 0.975)) -> tuple:
    """The percentile bootstrap's quantiles from every resample of x (each of the n^n equally likely)."""
    values = np.sort([statistic(np.asarray(x)[list(i)]) for i in itertools.product(range(len(x)), repeat=len(x))])
    return tuple(float(np.quantile(values, p, method="inverted_cdf")) for p in q)


def table_rows(md: str, header: str) -> dict:
    lines = md.splitlines()
    start = lines.index(header)
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def numbers(cell: str) -> tuple:
    """'0.123 [0.100, 0.150]' -> (0.123, 0.1, 0.15)."""
    point, rest = cell.split(" [")
    lo, hi = rest.rstrip("]").split(", ")
    return float(point), float(lo), float(hi)


SUITE = """
algos = ["ppo-k3"]
envs = ["CartPole-v1"]
seeds = [1, 2, 3]
total_timesteps = 256

[flags]
"ppo" = ["--eval-episodes", "3", "--num-envs", "2"]

[variants]
"ppo-k3" = { algo = "ppo", flags = ["--loss", "kl", "--kl-estimator", "k3"] }
"""


def test_the_aggregates_of_a_real_sweep_match_numpy(tmp, capsys):
    suite = tmp / "agg.toml"
    suite.write_text(SUITE)
    out = tmp / "out"
    rc, stdout, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(out), "--workers", "2")
    assert rc == 0, err
    md = (out / "report.md").read_text()
    assert "## Aggregates across envs" in md
    rows = table_rows(md, "| algorithm | runs x envs | IQM | mean |")
    random, best = aggregate.REFERENCE["CartPole-v1"][:2]
    for name in ["ppo-k3"]:
        # the normalised scores, from the event files, by hand
        evals = [
            load_scalars(next((out / "runs" / f"{name}__CartPole-v1__{s}").iterdir()))["eval/episodic_return"][2][-1]
            for s in (1, 2, 3)
        ]
        x = (np.array(evals, np.float64) - random) / (best - random)
        assert rows[name][0] == "3 x 1"
        iqm, lo, hi = numbers(rows[name][1])
        assert iqm == pytest.approx(trimmed_mean(x), abs=6e-4)
        exact = exact_bootstrap_quantiles(x, trimmed_mean)
        assert (lo, hi) == pytest.approx(exact, abs=6e-4), (x, exact)
        assert numbers(rows[name][2]) == pytest.approx((x.mean(), *exact), abs=6e-4)
        csv = [line.split(",") for line in (out / "scores.csv").read_text().splitlines()[1:]]
        np.testing.assert_allclose(sorted(float(c[3]) for c in csv if c[0] == name), np.sort(x), atol=1e-6)
    for png in ["aggregates.png", "profiles.png"]:
        assert (out / "figures" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| CartPole-v1 | 23.7 | 500 |" in md  # the reference, stated


def finished_runs(scores: dict) -> list:
    """Finished runs as report.load_runs gives them, with only the final evaluation: {algo: {env: [returns]}}."""
    runs = []
    for algo, by_env in scores.items():
        for env, returns in by_env.items():
            for seed, value in enumerate(returns, 1):
                tag = (np.array([1000]), np.array([0.0]), np.array([value]))
                runs.append({"algo": algo, "env": env, "seed": seed, "tags": {"eval/episodic_return": tag}})
    return runs


def test_stratified_cis_profiles_and_improvement_against_numpy(tmp):
    rng = np.random.default_rng(7)
    # envs of very different levels, so that resampling within envs (stratified) differs from resampling all pairs
    raw = {
        "ppo": {
            "CartPole-v1": 23.7 + 476.3 * rng.uniform(0.1, 0.3, 10),
            "Acrobot-v1": -497.1 + 427.965 * rng.uniform(0.8, 1.0, 10),
        },
        "sb3-ppo": {  # 8 seeds on CartPole-v1, 7 on Acrobot-v1
            "CartPole-v1": 23.7 + 476.3 * rng.uniform(0.2, 0.4, 8),
            "Acrobot-v1": -497.1 + 427.965 * rng.uniform(0.7, 0.9, 7),
        },
        "q_learning": {"CartPole-v1": [100.0, 200.0, 300.0]},  # not on every env: left out, and said so
    }
    (tmp / "figures").mkdir()
    md = "\n".join(report.aggregate_section(tmp, finished_runs(raw)))
    scores, envs, notes = aggregate.score_matrices(finished_runs(raw))
    assert envs == ["CartPole-v1", "Acrobot-v1"] and set(scores) == {"ppo", "sb3-ppo"}
    assert any("q_learning: no finished run with an evaluation on Acrobot-v1" in n for n in notes)
    # sb3-ppo's seed 8 ran on CartPole-v1 only: left out of its matrix, and said so
    assert scores["sb3-ppo"].shape == (7, 2) and "sb3-ppo: seeds [8] did not run on every env" in "\n".join(notes)
    assert "q_learning: no finished run with an evaluation on Acrobot-v1" in md

    # the matrices are (runs x envs), normalised by the reference, the seeds that ran on every env
    def normalised(algo, n):
        m = np.stack([np.asarray(raw[algo][e][:n], np.float64) - aggregate.REFERENCE[e][0] for e in envs], 1)
        return m / np.array([aggregate.REFERENCE[e][1] - aggregate.REFERENCE[e][0] for e in envs])

    expected = {"ppo": normalised("ppo", 10), "sb3-ppo": normalised("sb3-ppo", 7)}
    for algo, m in expected.items():
        np.testing.assert_allclose(scores[algo], m)

    # IQM and mean with stratified bootstrap CIs: an independent numpy bootstrap, runs resampled within each env
    rows = table_rows(md, "| algorithm | runs x envs | IQM | mean |")
    boot = np.random.default_rng(0)
    for algo, m in expected.items():
        idx = boot.integers(0, m.shape[0], size=(20_000, *m.shape))
        resampled = np.take_along_axis(m[None], idx, axis=1)  # (reps, runs, envs), column j from env j only
        iqms = np.array([trimmed_mean(r) for r in resampled])
        means = resampled.mean((1, 2))
        for cell, point, stats in [(rows[algo][1], trimmed_mean(m), iqms), (rows[algo][2], m.mean(), means)]:
            got = numbers(cell)
            assert got[0] == pytest.approx(point, abs=6e-4)
            assert got[1:] == pytest.approx(tuple(np.quantile(stats, [0.025, 0.975])), abs=0.006), (algo, cell)
        assert rows[algo][0] == f"{m.shape[0]} x 2"

    # probability of improvement: P(X > Y) + P(X = Y) / 2 over all pairs of runs, per env, averaged over envs
    x, y = expected["ppo"], expected["sb3-ppo"]

    def p_improve(x, y):
        return np.mean(
            [((x[:, j, None] > y[None, :, j]) + 0.5 * (x[:, j, None] == y[None, :, j])).mean() for j in range(2)]
        )

    bx = np.random.default_rng(1).integers(0, len(x), size=(5_000, *x.shape))
    by = np.random.default_rng(2).integers(0, len(y), size=(5_000, *y.shape))
    ps = [p_improve(np.take_along_axis(x, i, 0), np.take_along_axis(y, j, 0)) for i, j in zip(bx, by)]
    p, lo, hi = numbers(table_rows(md, "| X | Y | P(X > Y) |")["ppo"][1])
    assert p == pytest.approx(p_improve(x, y), abs=0.006)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(ps, [0.025, 0.975])), abs=0.03)
    assert table_rows(md, "| X | Y | P(X > Y) |")["ppo"][0] == "sb3-ppo"

    # the performance profile: the share of all (run, env) scores above tau
    profile, ci = aggregate.profiles(scores)
    for algo, m in expected.items():
        np.testing.assert_allclose(profile[algo], [(m > t).mean() for t in aggregate.TAUS])
        assert np.all(ci[algo][0] <= profile[algo] + 1e-12) and np.all(profile[algo] <= ci[algo][1] + 1e-12)


def test_without_rliable_the_report_says_so(tmp, monkeypatch):
    monkeypatch.setitem(sys.modules, "rliable", None)  # import rliable raises ImportError
    runs = finished_runs({"ppo": {"CartPole-v1": [500.0, 400.0, 300.0]}})
    md = "\n".join(report.aggregate_section(tmp, runs))
    assert (
        "## Aggregates across envs" in md and 'not computed: rliable is not installed; pip install -e ".[bench]"' in md
    )
    assert not (tmp / "scores.csv").exists()


def test_no_ci_from_fewer_than_3_runs(tmp):
    (tmp / "figures").mkdir()
    runs = finished_runs({"ppo": {"CartPole-v1": [500.0, 261.85]}, "sb3-ppo": {"CartPole-v1": [23.7, 500.0]}})
    md = "\n".join(report.aggregate_section(tmp, runs))
    assert table_rows(md, "| algorithm | runs x envs | IQM | mean |")["ppo"] == ["2 x 1", "0.750", "0.750"]
    assert table_rows(md, "| X | Y | P(X > Y) |")["ppo"] == ["sb3-ppo", "0.62"]  # (1 + 0.5 + 1 + 0) / 4


def test_each_variant_against_its_scripts_defaults(tmp):
    (tmp / "figures").mkdir()
    runs = finished_runs(
        {
            "ppo": {"CartPole-v1": [500.0, 261.85]},  # normalised 1.0, 0.5
            "ppo-kl": {"CartPole-v1": [500.0, 500.0]},  # 1.0, 1.0
            "sb3-ppo": {"CartPole-v1": [23.7, 500.0]},  # 0.0, 1.0
            "dqn+per": {"CartPole-v1": [500.0, 500.0]},  # its script's defaults did not run: no row
        }
    )
    variants = {"ppo-kl": {"algo": "ppo", "flags": ["--loss", "kl"]}, "dqn+per": {"algo": "dqn", "flags": []}}
    rows = table_rows("\n".join(report.aggregate_section(tmp, runs, variants=variants)), "| X | Y | P(X > Y) |")
    # (0.5 + 1 + 0.5 + 1) / 4: ties count a half
    assert rows == {"ppo": ["sb3-ppo", "0.62"], "ppo-kl": ["ppo", "0.75"]}
    # without the suite's variants, only the peers
    assert table_rows("\n".join(report.aggregate_section(tmp, runs)), "| X | Y | P(X > Y) |") == {
        "ppo": ["sb3-ppo", "0.62"]
    }
