"""The SB3 peers' checkpoints: benchmarks/peers/sb3.py stopped by SIGINT saves and exits 130, --resume goes on in the
same run directory to the same budget, and the harness resumes a peer's run from it instead of starting afresh."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, run_main, scalars, script_env

pytest.importorskip("stable_baselines3")

PEER = ROOT / "benchmarks" / "peers" / "sb3.py"


def peer(tmp, *flags, **kw) -> subprocess.Popen:
    cmd = [sys.executable, str(PEER), "--run-dir", str(tmp / "runs"), "--eval-episodes", "2", *flags]
    return subprocess.Popen(cmd, cwd=tmp, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, timeout: float = 120.0) -> None:
    start = time.time()
    while not path.exists():
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_a_stopped_peer_saves_and_resumes_to_its_budget_in_the_same_run(tmp, algo):
    """SIGINT after the first periodic checkpoint: exit 130 and a checkpoint at the step it stopped; --resume learns
    the rest in the same run directory: the run ends at the budget, its episodes logged once each (the stopped
    attempt's later events purged), the final evaluation logged, DQN's replay buffer kept beside the model."""
    flags = ["--algo", algo, "--env", "CartPole-v1", "--total-timesteps", "12000", "--checkpoint-every", "2000"]
    proc = peer(tmp, *flags)
    wait_for(next_run(tmp) / f"sb3-{algo}.zip")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    run = next_run(tmp)
    assert "stopped at step" in err and str(run / f"sb3-{algo}.zip") in err
    stopped_at = int(err.split("stopped at step ")[1].split(";")[0])
    assert 2000 <= stopped_at < 12000
    assert (run / f"sb3-{algo}.replay.pkl").exists() == (algo == "dqn")
    resumed = peer(tmp, *flags, "--resume", str(run / f"sb3-{algo}.zip"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"at step {stopped_at}" in out
    assert [p.name for p in (tmp / "runs").iterdir()] == [run.name]  # the same run directory, no second one
    tags = scalars(run)
    steps = np.array([s for s, _ in tags["charts/episodic_return"]])
    assert (np.diff(steps) > 0).all()  # no episode twice: what the stopped attempt logged after its save is gone
    assert steps[-1] <= 12000 + 2048 and steps[0] < stopped_at < steps[-1]
    assert len(tags["eval/episodic_return"]) == 1
    assert (run / f"sb3-{algo}.zip").exists() and not (run / f"sb3-{algo}.replay.pkl").exists()  # finished: no buffer


def next_run(tmp):
    start = time.time()
    while not (tmp / "runs").exists() or not any((tmp / "runs").iterdir()):
        assert time.time() - start < 60
        time.sleep(0.2)
    return next((tmp / "runs").iterdir())


def test_a_bad_resume_is_one_error_line(tmp):
    other = tmp / "model.zip"
    other.write_bytes(b"not a checkpoint")
    for path, says in [(tmp / "missing" / "sb3-ppo.zip", "is not a sb3-ppo.zip"), (other, "is not a sb3-ppo.zip")]:
        proc = peer(tmp, "--algo", "ppo", "--resume", str(path))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    broken = tmp / "run" / "sb3-ppo.zip"
    broken.parent.mkdir()
    broken.write_bytes(b"not a zip")
    proc = peer(tmp, "--algo", "ppo", "--resume", str(broken))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("error: cannot resume") and err.count("\n") == 1, err
    assert not (tmp / "runs").exists()


def test_the_harness_resumes_a_killed_peer_from_its_checkpoint(tmp, capsys):
    """A peer's run whose process was killed after a checkpoint (its status still says running) goes on from
    sb3-ppo.zip with --resume, in the same run directory."""
    suite = tmp / "s.toml"
    suite.write_text(
        'algos = ["sb3-ppo"]\nenvs = ["CartPole-v1"]\nseeds = [1]\ntotal_timesteps = 8000\n'
        '[flags]\n"sb3-ppo" = ["--eval-episodes", "2", "--checkpoint-every", "2000"]\n'
    )
    out = tmp / "o"
    harness = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "run", "--suite", str(suite), "--out", str(out)],
        cwd=ROOT,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: killed with its script, as a machine that stops
    )
    key = "sb3-ppo__CartPole-v1__1"
    wait_for(out / "runs" / key, 60)
    ckpt = None
    start = time.time()
    while ckpt is None:
        found = list((out / "runs" / key).rglob("sb3-ppo.zip"))
        ckpt = found[0] if found else None
        assert time.time() - start < 120
        time.sleep(0.2)
    os.killpg(harness.pid, signal.SIGKILL)
    harness.wait()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)  # the killed script holds DIR's lock until the kernel ends it
    try:
        start = time.time()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                break
            except OSError:
                assert time.time() - start < 30, "the killed script never ended"
                time.sleep(0.1)
    finally:
        os.close(fd)
    rc, stdout, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(out))
    assert rc == 0, err
    assert "1 from a checkpoint" in stdout
    status = json.loads((out / "status" / f"{key}.json").read_text())
    assert status["command"][-2:] == ["--resume", str(ckpt)] and status["attempts"][-1]["resumed_from"] == str(ckpt)
    runs = list((out / "runs" / key).iterdir())
    assert len(runs) == 1
    steps = np.array([s for s, _ in scalars(runs[0])["charts/episodic_return"]])
    assert (np.diff(steps) > 0).all() and steps[-1] >= 8000  # the killed attempt's episodes after its save: purged
