"""The benchmark harness on bad input and faults (issue 20, item 9): one `error:` line and exit 2 with nothing
written, or a report that says what happened. Fast: in-process calls, sweep directories made by hand, fake runs
(a one-line python child in place of a script), and one 10-step real run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TRAINING_SCRIPTS, one_error_line, run_main, script_env
from torch.utils.tensorboard import SummaryWriter

from benchmarks import sweep as sweep_module
from benchmarks.events import truncated_at
from benchmarks.sweep import algorithm_scripts

SUITE = 'algos = ["ppo"]\nenvs = ["CartPole-v1"]\nseeds = [1]\n'


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---- run: --out, seeds, algorithms ----

# the fake script of every run: writes its pid in its run directory, then sleeps (or ends at once if FAKE_QUICK)
CHILD = (
    "import os, pathlib, sys, time; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); "
    "(d / 'pid').write_text(str(os.getpid())); time.sleep(0 if os.environ.get('FAKE_QUICK') else 30)"
)


def fake_command(run, suite, out):
    return [sys.executable, "-c", CHILD, str(out / "runs" / run.key)]


@pytest.fixture
def fake_runs(monkeypatch):
    """Runs in this process's sweeps are fake ones that end at once (should a check let a sweep through)."""
    monkeypatch.setattr(sweep_module, "command", fake_command)
    monkeypatch.setenv("FAKE_QUICK", "1")


HARNESS_WITH_FAKE_RUNS = f"""
import sys
from benchmarks import sweep
from benchmarks.__main__ import main
sweep.command = lambda run, suite, out: [sys.executable, "-c", {CHILD!r}, str(out / "runs" / run.key)]
sys.exit(main(sys.argv[1:]))
"""


def test_an_out_that_is_a_file_or_cannot_be_made_is_one_error_line(tmp, capsys, fake_runs):
    suite = tmp / "s.toml"
    suite.write_text(SUITE)
    afile = tmp / "afile"
    afile.write_text("keep me")
    for out, says in [(afile, "is a file"), (afile / "below", "cannot make"), (tmp / "afile" / "a" / "b", "cannot")]:
        rc, _, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(out))
        one_error_line(rc, err)
        assert says in err and str(out) in err, err
    assert afile.read_text() == "keep me" and tree(tmp) == ["afile", "s.toml"]
    if sys.platform == "linux":  # a place even root cannot write in
        rc, _, err = run_main(capsys, "run", "--suite", str(suite), "--out", "/proc/no-sweep-here")
        one_error_line(rc, err)


def test_a_seed_env_or_algorithm_listed_twice_is_refused(tmp, capsys, fake_runs):
    suite = tmp / "twice.toml"
    suite.write_text(SUITE.replace("seeds = [1]", "seeds = [1, 2, 1]"))
    rc, _, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(tmp / "o"))
    one_error_line(rc, err)
    assert str(suite) in err and "'seeds' lists 1 twice" in err, err
    suite.write_text(SUITE)
    for flag, values in [("--seeds", ["3", "3"]), ("--algos", ["ppo", "ppo"]), ("--envs", ["CartPole-v1"] * 2)]:
        rc, _, err = run_main(capsys, "run", "--suite", str(suite), flag, *values, "--out", str(tmp / "o"))
        one_error_line(rc, err)
        assert f"{flag} lists" in err and "twice" in err, err
    assert not (tmp / "o").exists()


def test_only_training_scripts_are_algorithms(tmp, capsys, fake_runs):
    assert algorithm_scripts() == TRAINING_SCRIPTS and "ppo" in TRAINING_SCRIPTS
    for name in ["plumbing", "evaluate", "__init__"]:
        rc, _, err = run_main(capsys, "run", "--suite", "smoke", "--algos", name, "--out", str(tmp / "o"))
        one_error_line(rc, err)
        assert f"no algorithm script for {name}" in err and "ppo" in err, err
    assert not (tmp / "o").exists()


# ---- run: one sweep at a time in a directory, even after kill -9 of the harness ----


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_second_sweep_refuses_a_directory_in_use(tmp, capsys, fake_runs):
    suite = tmp / "s.toml"
    suite.write_text(SUITE)
    out = tmp / "out"
    # held by a live sweep (here, this process): refused, nothing written
    out.mkdir()
    sweep_module.lock(out.resolve())
    try:
        rc, _, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(out))
    finally:
        sweep_module.unlock(out.resolve())
    one_error_line(rc, err)
    assert "in use by another sweep" in err and tree(out) == []


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_after_kill_9_of_the_harness_its_live_runs_keep_the_directory(tmp, capsys, fake_runs):
    suite = tmp / "s.toml"
    suite.write_text(SUITE)
    out = tmp / "out"
    pid_file = out / "runs" / "ppo__CartPole-v1__1" / "pid"
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS_WITH_FAKE_RUNS, "run", "--suite", str(suite), "--out", str(out)],
        cwd=ROOT,
        env={k: v for k, v in script_env().items() if k != "FAKE_QUICK"},  # its fake run sleeps
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert harness.poll() is None and time.time() < deadline
        time.sleep(0.05)
    orphan = int(pid_file.read_text())
    harness.kill()  # kill -9: no handler runs, its script goes on
    harness.wait()
    try:
        assert alive(orphan)
        # a second harness in the same directory refuses while the orphaned script runs, and deletes nothing
        rc, _, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(out), "--no-report")
        one_error_line(rc, err)
        assert "in use by another sweep" in err and pid_file.read_text() == str(orphan), err
    finally:
        os.kill(orphan, signal.SIGKILL)
    deadline = time.time() + 30
    while alive(orphan):
        assert time.time() < deadline
        time.sleep(0.05)
    # once it has ended, the same command goes on (the run starts afresh: it left no checkpoint)
    rc, stdout, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(out), "--no-report")
    assert rc == 0 and "1 to run" in stdout, err
    assert json.loads((out / "status" / "ppo__CartPole-v1__1.json").read_text())["returncode"] == 0
    # and the lock went with the sweep: a third call finds the run finished
    rc, stdout, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(out), "--no-report")
    assert rc == 0 and "1 already finished, 0 to run" in stdout, err


# ---- report: sweep directories made by hand ----


def make_run(out, algo, env, seed, returns, returncode=0, steps=4096, cut=None, attempts=1):
    """A run of a sweep directory as the harness leaves it: status file, log, and event files (one per attempt)
    holding charts/episodic_return (`returns`, one per 100 steps) and charts/SPS; `cut`: bytes off the last file."""
    key = f"{algo}__{env}__{seed}"
    for sub in ("runs", "logs", "status"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    run_dir = out / "runs" / key / f"{env}__{algo}__{seed}"
    files = []
    for a in range(attempts):
        writer = SummaryWriter(run_dir, filename_suffix=f".{a}")
        for i, r in enumerate(returns):
            writer.add_scalar("charts/episodic_return", r, 100 * (i + 1))
        writer.add_scalar("charts/SPS", 1000.0, steps)
        writer.close()
        (new,) = set(run_dir.glob("events.out.tfevents.*")) - set(files)
        files.append(new)
        if a + 1 < attempts:
            time.sleep(1.05)  # the files' names hold the second they were made: one attempt after the other
    if cut:
        data = files[-1].read_bytes()
        files[-1].write_bytes(data[: len(data) - cut])
    log = out / "logs" / f"{key}.log"
    log.write_text("done\n")
    status = {"algo": algo, "env": env, "seed": seed, "command": ["python", f"{algo}.py"], "returncode": returncode}
    status.update(start_time=time.time() - 10, seconds=5.0, log=str(log))
    status["attempts"] = [{"start_time": time.time() - 10, "seconds": 5.0, "resumed_from": None}]
    (out / "status" / f"{key}.json").write_text(json.dumps(status))
    (out / "suite.json").write_text(json.dumps({"name": "handmade", "thresholds": {}}))
    return files


def row(report, first_cell):
    return next(line for line in report.splitlines() if line.startswith(f"| {first_cell} |"))


def test_report_names_truncated_event_files_and_leaves_them_out(tmp, capsys):
    out = tmp / "out"
    make_run(out, "ppo", "CartPole-v1", 1, [10.0] * 30)
    (cut,) = make_run(out, "ppo", "CartPole-v1", 2, [10.0] * 15 + [500.0] * 15, cut=5)
    assert truncated_at(cut) is not None and truncated_at(out.rglob("*__1/*/events*").__next__()) is None
    rc, stdout, err = run_main(capsys, "report", "--out", str(out))
    assert rc == 0, err
    report = (out / "report.md").read_text()
    # the table holds seed 1 alone (mean 10); seed 2 is named, its cut-short record is not averaged in silently
    assert row(report, "ppo").split("|")[2:4] == [" 1 ", " 10.0 "], report  # one seed: the IQM, no CI
    assert "finished, event file truncated" in row(report, "ppo seed 2")
    assert "## Truncated event files" in report and str(cut) in report
    assert "warning: truncated event file: ppo on CartPole-v1, seed 2" in err and str(cut) in err, err


def test_an_earlier_attempts_truncated_file_is_named_and_the_run_kept(tmp, capsys):
    out = tmp / "out"
    first, _ = make_run(out, "ppo", "CartPole-v1", 1, [10.0] * 30, attempts=2)
    first.write_bytes(first.read_bytes()[:-5])  # a script killed mid-write, then resumed into a second file
    rc, stdout, err = run_main(capsys, "report", "--out", str(out))
    assert rc == 0, err
    report = (out / "report.md").read_text()
    assert row(report, "ppo").split("|")[2] == " 1 " and str(first) in report and "kept" in report, report


def test_a_finished_run_without_an_episode_is_not_a_failure(tmp, capsys):
    out = tmp / "out"
    make_run(out, "ppo", "HalfCheetah-v5", 1, [], steps=4096)  # 64 envs x 64 steps: no episode of 1000 ended
    rc, stdout, err = run_main(capsys, "report", "--out", str(out))
    assert rc == 0, err
    report = (out / "report.md").read_text()
    assert "finished, no training episode ended in 4,096 env steps" in row(report, "ppo seed 1"), report
    assert "FAILED" not in report and "## Failed runs" not in report


def test_a_real_run_without_an_episode_end_to_end(tmp, capsys):
    # q_learning on CliffWalking: 10 steps cannot reach the goal, so no episode ends; the script exits 0
    suite = tmp / "short.toml"
    suite.write_text(SUITE.replace("ppo", "q_learning").replace("CartPole", "CliffWalking") + "total_timesteps = 10\n")
    rc, stdout, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(tmp / "o"), "--workers", "1")
    assert rc == 0, err
    report = (tmp / "o" / "report.md").read_text()
    assert "| q_learning seed 1 | finished, no training episode ended in 10 env steps |" in report, report
    assert "FAILED" not in report


@pytest.mark.parametrize(
    "suite_json, says",
    [
        ("[1, 2]", "not a table"),
        ('"classic"', "not a table"),
        ('{"name": "x", "thresholds": [475]}', "'thresholds' must be"),
        ('{"name": "x", "thresholds": {"CartPole-v1": "high"}}', "'thresholds' must be"),
        ('{"name": "x", "threshold_windows": {"CartPole-v1": 0}}', "'threshold_windows' must be"),
        ('{"name": 7}', "'name' must be"),
        ("{not json", "not a readable JSON file"),
    ],
)
def test_report_on_a_broken_suite_json_is_one_error_line(tmp, capsys, suite_json, says):
    out = tmp / "out"
    make_run(out, "ppo", "CartPole-v1", 1, [10.0] * 5)
    (out / "suite.json").write_text(suite_json)
    rc, _, err = run_main(capsys, "report", "--out", str(out))
    one_error_line(rc, err)
    assert "suite.json" in err and says in err, err
    assert not (out / "report.md").exists()


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda s: s.pop("log"), "'log' must be"),
        (lambda s: s.update(log=None), "'log' must be"),
        (lambda s: s.update(seed="1"), "'seed' must be"),
        (lambda s: s.update(returncode="0"), "'returncode' must be"),
        (lambda s: [s.pop("attempts"), s.pop("start_time")], "no start time"),
        (lambda s: s.clear(), "'algo' must be"),
    ],
)
def test_report_on_a_broken_status_file_is_one_error_line(tmp, capsys, change, says):
    out = tmp / "out"
    make_run(out, "ppo", "CartPole-v1", 1, [10.0] * 5)
    make_run(out, "ppo", "CartPole-v1", 2, [10.0] * 5, returncode=1)  # a failed run: its log is printed
    path = out / "status" / "ppo__CartPole-v1__2.json"
    status = json.loads(path.read_text())
    change(status)
    path.write_text(json.dumps(status))
    rc, _, err = run_main(capsys, "report", "--out", str(out))
    one_error_line(rc, err)
    assert str(path) in err and says in err, err
    path.write_text("[]")
    rc, _, err = run_main(capsys, "report", "--out", str(out))
    one_error_line(rc, err)
    assert str(path) in err and "not a table" in err, err
