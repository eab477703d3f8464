"""The benchmark harness: statistics by hand, and a real sweep end to end (real scripts, real event files)."""

import itertools
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, one_error_line, run_main, script_env

from benchmarks.events import first_crossing, load_scalars
from benchmarks.report import elapsed, on_grid, running_mean
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
    one_error_line(rc, err, str(suite), says)
    assert not (tmp / "o").exists()


def test_an_unknown_peer_is_refused_before_anything_is_written(tmp, capsys):
    rc, out, err = run_main(capsys, "run", "--suite", "smoke", "--algos", "ppo", "sb3-foo", "--out", str(tmp / "o"))
    one_error_line(rc, err, "unknown peer sb3-foo", "sb3-trpo")
    assert not (tmp / "o").exists()


def test_a_broken_status_file_is_one_error_line(tmp, capsys):
    (tmp / "o" / "status").mkdir(parents=True)
    (tmp / "o" / "status" / "ppo__CartPole-v1__1.json").write_text('{"algo": "ppo", "command": [')
    rc, out, err = run_main(capsys, "run", "--suite", "smoke", "--algos", "ppo", "--out", str(tmp / "o"))
    one_error_line(rc, err, "ppo__CartPole-v1__1.json")
    assert sorted(p.name for p in (tmp / "o").rglob("*")) == ["ppo__CartPole-v1__1.json", "status"]
    rc, out, err = run_main(capsys, "report", "--out", str(tmp / "o"))
    one_error_line(rc, err)


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


def test_changed_settings_set_the_finished_run_aside(tmp):
    suite = tmp / "cliff.toml"
    suite.write_text(
        'algos = ["q_learning"]\nenvs = ["CliffWalking-v1"]\nseeds = [1]\ntotal_timesteps = 3000\n'
        '[flags]\n"q_learning" = ["--eval-episodes", "1"]\n'
    )
    out = tmp / "out"
    key = "q_learning__CliffWalking-v1__1"
    first = harness("run", "--suite", str(suite), "--out", str(out), "--no-report", cwd=tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    (old_ckpt,) = (out / "runs" / key).rglob("*.pt")
    second = harness("run", "--suite", str(suite), "--out", str(out), "--total-timesteps", "4000", cwd=tmp)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 runs, 0 already finished, 1 to run" in second.stdout and "other settings" in second.stdout
    # the old run is kept whole, as a sweep directory of its own; the new one ran with the new budget
    (aside,) = (out / "superseded").iterdir()
    assert (aside / old_ckpt.relative_to(out)).is_file() and (aside / "logs" / f"{key}.log").is_file()
    old = json.loads((aside / "status" / f"{key}.json").read_text())
    assert old["command"][old["command"].index("--total-timesteps") + 1] == "3000"
    assert json.loads((aside / "suite.json").read_text())["total_timesteps"] == 3000
    new = json.loads((out / "status" / f"{key}.json").read_text())
    assert new["returncode"] == 0 and new["command"][new["command"].index("--total-timesteps") + 1] == "4000"
    assert json.loads((out / "suite.json").read_text())["total_timesteps"] == 4000
    assert "| q_learning | 1 |" in (out / "report.md").read_text()


INTERRUPTIBLE = """
algos = ["ppo"]
envs = ["CartPole-v1"]
seeds = [1, 2, 3]
total_timesteps = 12288

[flags]
"ppo" = ["--eval-episodes", "1", "--checkpoint-every", "1024"]
"""


def start(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def checkpoint(out, key):
    found = list((out / "runs" / key).rglob("*.pt"))
    return found[0] if found else None


def returncode(out, key):
    path = out / "status" / f"{key}.json"
    return json.loads(path.read_text())["returncode"] if path.is_file() else None


def stop_when(proc, ready, signum, timeout=300):
    """Send `signum` to the sweep (not to its scripts) once `ready()`; (exit status, stdout, stderr)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def test_interrupt_and_resume(tmp):
    suite = tmp / "interruptible.toml"
    suite.write_text(INTERRUPTIBLE)
    out = tmp / "out"
    key = {seed: f"ppo__CartPole-v1__{seed}" for seed in [1, 2, 3]}
    args = ("run", "--suite", str(suite), "--out", str(out), "--workers", "2")

    # Ctrl-C (SIGINT to the sweep alone): the two running scripts checkpoint and stop, the third never starts
    both_checkpointed = lambda: checkpoint(out, key[1]) and checkpoint(out, key[2])  # noqa: E731
    rc, stdout, stderr = stop_when(start(*args), both_checkpointed, signal.SIGINT)
    assert rc == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "not finished: ppo CartPole-v1 seed 3 (not started" in stderr, stderr
    for seed in [1, 2]:
        assert json.loads((out / "status" / f"{key[seed]}.json").read_text())["returncode"] == 130
        assert f"not finished: ppo CartPole-v1 seed {seed} (exit 130; resumes from" in stderr
    assert not (out / "status" / f"{key[3]}.json").exists() and not (out / "runs" / key[3]).exists()
    assert not (out / "report.md").exists()
    first_ckpt = {seed: checkpoint(out, key[seed]) for seed in [1, 2]}

    # seed 2 as if the sweep had been killed with it (no status); SIGTERM this time, once seed 3 has a checkpoint
    (out / "status" / f"{key[2]}.json").unlink()
    two_done_third_checkpointed = (  # noqa: E731
        lambda: checkpoint(out, key[3]) and returncode(out, key[1]) == returncode(out, key[2]) == 0
    )
    rc, stdout, stderr = stop_when(start(*args), two_done_third_checkpointed, signal.SIGTERM)
    assert rc == 130, stderr[-3000:]
    assert "3 runs, 0 already finished, 3 to run (2 from a checkpoint" in stdout, stdout
    for seed in [1, 2]:  # resumed in their own run directories, from their checkpoints, to the end
        status = json.loads((out / "status" / f"{key[seed]}.json").read_text())
        assert status["returncode"] == 0, stderr[-3000:]
        assert status["command"][-2:] == ["--resume", str(first_ckpt[seed])]
        assert [a["resumed_from"] for a in status["attempts"]] == [None, str(first_ckpt[seed])]
        assert checkpoint(out, key[seed]) == first_ckpt[seed]
        assert "resumed" in (out / "logs" / f"{key[seed]}.log").read_text()
        assert (out / "logs" / f"{key[seed]}.log.1").is_file()  # the interrupted attempt's log
    assert json.loads((out / "status" / f"{key[3]}.json").read_text())["returncode"] == 130

    # the same command again: seed 3 goes on, the others are finished; the report counts process seconds
    third = harness(*args, cwd=tmp)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "3 runs, 2 already finished, 1 to run (1 from a checkpoint" in third.stdout, third.stdout
    for seed in [1, 2, 3]:
        (run,) = (out / "runs" / key[seed]).iterdir()
        steps, walls, _ = load_scalars(run)["charts/SPS"]
        assert steps.max() >= 12288 - 256 and len(set(steps)) == len(steps)  # every update logged once
        status = json.loads((out / "status" / f"{key[seed]}.json").read_text())
        seconds = elapsed(status, walls)
        assert np.all(seconds >= 0) and np.all(seconds <= status["seconds"] + 1)
    assert "| ppo | 3 |" in (out / "report.md").read_text()


def test_interrupt_a_ray_sweep(tmp):
    pytest.importorskip("ray")
    suite = tmp / "interruptible.toml"
    suite.write_text(INTERRUPTIBLE.replace("[1, 2, 3]", "[1, 2]"))
    out = tmp / "out"
    proc = start("run", "--suite", str(suite), "--out", str(out), "--workers", "1", "--backend", "ray")
    rc, stdout, stderr = stop_when(proc, lambda: checkpoint(out, "ppo__CartPole-v1__1"), signal.SIGINT)
    assert rc == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert json.loads((out / "status" / "ppo__CartPole-v1__1.json").read_text())["returncode"] == 130
    assert "seed 2 (not started" in stderr and not (out / "status" / "ppo__CartPole-v1__2.json").exists()
    assert not (out / ".stop").exists()
