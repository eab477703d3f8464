"""The benchmark harness: statistics by hand, and a real sweep end to end (real scripts, real event files)."""

import itertools
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, script_env

from benchmarks.events import first_crossing, load_scalars
from benchmarks.report import on_grid, running_mean
from benchmarks.stats import bootstrap_band, bootstrap_ci, iqm


def test_iqm_by_hand():
    assert iqm([1, 2, 3, 4]) == 2.5  # drops 1 and 4
    assert iqm([5, 1, 100, 2, 3, 4, 7, 8]) == pytest.approx((3 + 4 + 5 + 7) / 4)  # drops 1, 2 and 8, 100
    assert iqm([3, 9, 6]) == 6.0  # fewer than 4 seeds: the mean
    assert iqm([1, 2, 3, 4, 1000]) == pytest.approx(3.0)  # drops 1 and 1000


def test_bootstrap_ci_by_hand():
    # two seeds: resampled means are 0 (1/4), 5 (1/2), 10 (1/4), so the 95% interval is [0, 10]
    assert bootstrap_ci([0.0, 10.0], statistic=np.mean) == (0.0, 10.0)
    assert bootstrap_ci([7.0, 7.0, 7.0]) == (7.0, 7.0)
    # three seeds: against the exact bootstrap distribution (all 27 resamples, equally likely)
    x = np.array([1.0, 4.0, 10.0])
    exact = np.sort([np.mean(x[list(idx)]) for idx in itertools.product(range(3), repeat=3)])
    lo, hi = bootstrap_ci(x, statistic=np.mean, n_boot=50_000)
    assert lo == pytest.approx(np.quantile(exact, 0.025, method="inverted_cdf"), abs=1e-9)  # 1.0: P = 1/27
    assert hi == pytest.approx(np.quantile(exact, 0.975, method="inverted_cdf"), abs=1e-9)  # 10.0
    lo, hi = bootstrap_ci(x, statistic=np.mean, n_boot=50_000, confidence=0.5)
    assert lo == pytest.approx(np.quantile(exact, 0.25, method="inverted_cdf"), abs=0.34)
    assert hi == pytest.approx(np.quantile(exact, 0.75, method="inverted_cdf"), abs=0.34)
    mean, lo, hi = bootstrap_band(np.array([[0.0, 2.0], [10.0, 2.0]]))
    np.testing.assert_allclose(mean, [5.0, 2.0])
    np.testing.assert_allclose(lo, [0.0, 2.0])
    np.testing.assert_allclose(hi, [10.0, 2.0])


def test_curve_helpers():
    np.testing.assert_allclose(running_mean(np.array([1.0, 3.0, 5.0, 7.0]), window=2), [1, 2, 4, 6])
    y = on_grid(np.array([10, 20, 30]), np.array([1.0, 2.0, 3.0]), np.array([0, 10, 15, 30, 40]))
    np.testing.assert_array_equal(np.isnan(y), [True, False, False, False, True])
    np.testing.assert_allclose(y[1:4], [1.0, 1.0, 3.0])
    assert first_crossing(np.array([0, 10, 10, 0, 10]), threshold=7, window=3) is None
    assert first_crossing(np.array([0, 10, 10, 10, 0]), threshold=7, window=3) == 3


SUITE = """
algos = ["ppo", "q_learning", "sb3-ppo"]
envs = ["CartPole-v1", "NoSuchEnv-v0"]
seeds = [1, 2]
total_timesteps = 1024

[thresholds]
"CartPole-v1" = 20

[flags]
"ppo" = ["--eval-episodes", "2"]
"q_learning" = ["--eval-episodes", "2"]
"sb3-ppo" = ["--eval-episodes", "2"]
"""


def harness(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        env={**script_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_sweep_report_resume_and_failures(tmp):
    suite = tmp / "tiny.toml"
    suite.write_text(SUITE)
    out = tmp / "out"
    first = harness("run", "--suite", str(suite), "--out", str(out), "--workers", "2", cwd=tmp)
    # the unknown env fails (the script exits 2), the sweep goes on and exits 1 naming every failed run
    assert first.returncode == 1, first.stderr
    for algo in ["ppo", "q_learning", "sb3-ppo"]:
        for seed in [1, 2]:
            assert f"{algo}__NoSuchEnv-v0__{seed}" in first.stderr
            assert json.loads((out / "status" / f"{algo}__CartPole-v1__{seed}.json").read_text())["returncode"] == 0
    assert "unknown environment id 'NoSuchEnv-v0'" in first.stderr  # the tail of the failed run's log

    report = (out / "report.md").read_text()
    assert "## Failed runs" in report and report.count("NoSuchEnv-v0, seed") == 6
    assert (out / "figures" / "CartPole-v1.png").read_bytes()[:4] == b"\x89PNG"
    # the table holds the numbers the event files hold, ours and the peer's (SB3) alike
    for algo in ["ppo", "q_learning", "sb3-ppo"]:
        finals, evals = [], []
        for seed in [1, 2]:
            (run,) = (out / "runs" / f"{algo}__CartPole-v1__{seed}").iterdir()
            tags = load_scalars(run)
            finals.append(tags["charts/episodic_return"][2][-100:].mean())
            evals.append(tags["eval/episodic_return"][2][-1])
        row = next(l for l in report.splitlines() if l.startswith(f"| {algo} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "2"
        assert float(cells[2].split()[0]) == pytest.approx(np.mean(finals), abs=0.051)  # IQM of 2 = the mean
        assert float(cells[3].split()[0]) == pytest.approx(np.mean(evals), abs=0.051)
    csv = (out / "curves.csv").read_text().splitlines()
    assert csv[0].startswith("env,algo,seed,step") and any(l.startswith("CartPole-v1,ppo,2,") for l in csv)

    # resume: the finished runs are skipped, only the failed ones run again
    status_times = {p.name: p.stat().st_mtime for p in (out / "status").glob("*CartPole*.json")}
    second = harness("run", "--suite", str(suite), "--out", str(out), "--workers", "2", cwd=tmp)
    assert second.returncode == 1
    assert re.search(r"12 runs, 6 already finished, 6 to run", second.stdout), second.stdout
    assert status_times == {p.name: p.stat().st_mtime for p in (out / "status").glob("*CartPole*.json")}
    assert (out / "logs" / "ppo__NoSuchEnv-v0__1.log.1").is_file()  # the earlier attempt's log is kept

    # overriding the suite: only the CartPole runs, all finished, so nothing runs and the exit is 0
    third = harness("run", "--suite", str(suite), "--envs", "CartPole-v1", "--out", str(out), "--no-report", cwd=tmp)
    assert third.returncode == 0 and "6 already finished, 0 to run" in third.stdout


def test_bad_arguments_exit_2(tmp):
    proc = harness("run", "--suite", "no-such-suite", "--out", str(tmp / "o"), cwd=tmp)
    assert proc.returncode == 2 and "unknown suite" in proc.stderr
    proc = harness("run", "--suite", "smoke", "--algos", "no_such_algo", "--out", str(tmp / "o"), cwd=tmp)
    assert proc.returncode == 2 and "no_such_algo" in proc.stderr
    assert not (tmp / "o").exists()
    proc = harness("report", "--out", str(tmp / "nothing"), cwd=tmp)
    assert proc.returncode == 2


def test_ray_backend_with_a_local_instance(tmp):
    pytest.importorskip("ray")
    suite = tmp / "ray.toml"
    suite.write_text(
        'algos = ["q_learning"]\nenvs = ["CliffWalking-v1"]\nseeds = [1, 2]\ntotal_timesteps = 3000\n'
        '[flags]\n"q_learning" = ["--eval-episodes", "1"]\n'
    )
    out = tmp / "out"
    proc = harness("run", "--suite", str(suite), "--backend", "ray", "--workers", "2", "--out", str(out), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in [1, 2]:
        status = json.loads((out / "status" / f"q_learning__CliffWalking-v1__{seed}.json").read_text())
        assert status["returncode"] == 0
        (run,) = (out / "runs" / f"q_learning__CliffWalking-v1__{seed}").iterdir()
        assert len(load_scalars(run)["charts/episodic_return"][2]) > 10
    assert "| q_learning | 2 |" in (out / "report.md").read_text()


# ---- faults: a user's mistake or a broken file is one error line and nothing written; no fault loses a run ----


def run_main(capsys, *args):
    """`python -m benchmarks ARGS` in this process: (exit status, stdout, stderr)."""
    from benchmarks.__main__ import main

    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize(
    "text, says",
    [
        ('envs = ["CartPole-v1"]\nseeds = [1]\n', "missing key 'algos'"),
        ('algos = ["ppo"]\nseeds = [1]\n', "missing key 'envs'"),
        ('algos = ["ppo"]\nenvs = ["CartPole-v1"]\n', "missing key 'seeds'"),
        ('algos = "ppo"\nenvs = ["CartPole-v1"]\nseeds = [1]\n', "'algos' must be a non-empty list"),
        ('algos = ["ppo"]\nenvs = ["CartPole-v1"]\nseeds = ["1"]\n', "'seeds' must be a non-empty list of integer"),
        ('algos = ["ppo"]\nenvs = ["CartPole-v1"]\nseeds = [1]\ntotal_timesteps = "1k"\n', "'total_timesteps' must"),
        ('algos = ["ppo"]\nenvs = ["CartPole-v1"]\nseeds = [1]\n[flags]\nppo = "--eval-episodes 2"\n', "'flags' must"),
        ('algos = ["ppo"]\nenvs = ["CartPole-v1"]\nseed = [1]\n', "missing key 'seeds'"),
        ('algos = ["ppo"\n', "not a readable TOML file"),
    ],
)
def test_a_broken_suite_file_is_one_error_line(tmp, capsys, text, says):
    suite = tmp / "broken.toml"
    suite.write_text(text)
    rc, out, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(tmp / "o"))
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(suite) in err and says in err, err
    assert not (tmp / "o").exists()


def test_an_unknown_peer_is_refused_before_anything_is_written(tmp, capsys):
    rc, out, err = run_main(capsys, "run", "--suite", "smoke", "--algos", "ppo", "sb3-foo", "--out", str(tmp / "o"))
    assert rc == 2 and err.count("\n") == 1 and "unknown peer sb3-foo" in err and "sb3-trpo" in err, err
    assert not (tmp / "o").exists()


def test_a_namespaced_env_id(tmp):
    # an env id with a '/' (registered by a sitecustomize module in the harness's and the scripts' processes)
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(
        "import gymnasium\n"
        'gymnasium.register("bench/CliffWalking-v1", '
        'entry_point="gymnasium.envs.toy_text.cliffwalking:CliffWalkingEnv")\n'
    )
    suite = tmp / "ns.toml"
    suite.write_text(
        'algos = ["q_learning"]\nenvs = ["bench/CliffWalking-v1"]\nseeds = [1]\ntotal_timesteps = 3000\n'
        '[flags]\n"q_learning" = ["--eval-episodes", "1"]\n'
    )
    out = tmp / "out"
    proc = harness("run", "--suite", str(suite), "--out", str(out), cwd=tmp, env={"PYTHONPATH": str(tmp / "site")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((out / "status" / "q_learning__bench+CliffWalking-v1__1.json").read_text())
    assert status["env"] == "bench/CliffWalking-v1" and status["returncode"] == 0
    assert (out / "logs" / "q_learning__bench+CliffWalking-v1__1.log").is_file()
    report = (out / "report.md").read_text()
    assert "## bench/CliffWalking-v1" in report and "| q_learning | 1 |" in report, report
    assert (out / "figures" / "bench+CliffWalking-v1.png").read_bytes()[:4] == b"\x89PNG"
