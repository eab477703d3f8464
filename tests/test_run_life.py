"""The run's life at its edges (issue 20): signals outside the training loop, resuming a finished run, a full disk at
a periodic checkpoint, the evaluation's seeds, and the learning rate of a run extended by --resume."""

import errno
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import SCRIPTS, scalars, script_env

import plumbing
from cleanrl_style import evaluate as evaluate_script
from cleanrl_style import ppo, q_learning

MODULES = {"ppo": ppo, "q_learning": q_learning}
TINY = {"ppo": 512, "q_learning": 1000}  # ppo on CartPole: 2 rollouts of N*T = 256 steps


def tiny_args(name: str, tmp, **kw):
    return MODULES[name].Args(run_dir=str(tmp / "runs"), progress=False, total_timesteps=TINY[name], **kw)


def one_run(tmp):
    (run,) = (tmp / "runs").iterdir()
    return run


def logged(run, tag: str) -> list:
    """(step, value) of `tag` over all the run's event files, each read on its own: two in-process runs in one second
    name their files by a counter that need not sort in the order they were written."""
    return sorted(point for events in run.glob("events.out.tfevents.*") for point in scalars(events).get(tag, []))


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---- item 4: a signal after the run is over, or while its evaluation is logged, changes nothing ----


@pytest.fixture
def own_signal_handlers():
    """Put the test process's handlers back after a test that lets script_cli ignore the signals."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@dataclass
class NoFlags:
    seed: int = 1


def test_script_cli_ignores_signals_after_the_run_and_cli_puts_handlers_back(monkeypatch, own_signal_handlers):
    monkeypatch.setattr(sys, "argv", ["script.py"])
    before = signal.getsignal(signal.SIGINT)
    seen = {}

    def main(args, stop):
        seen["handler"] = signal.getsignal(signal.SIGINT)
        return 0

    assert plumbing.cli(NoFlags, main, "doc") == 0
    assert seen["handler"] != before  # the StopSignal during the run ...
    assert signal.getsignal(signal.SIGINT) == before  # ... and the test process's own handler after it
    assert plumbing.script_cli(NoFlags, main, "doc") == 0
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_right_after_done_leaves_a_finished_run_finished(sig, tmp):
    """Signals, every 20 ms from "done in" on, land while the process closes its files and the interpreter shuts
    down: exit 0, no traceback."""
    cmd = [sys.executable, str(SCRIPTS / "q_learning.py"), "--no-progress", "--total-timesteps", "1000",
           "--run-dir", str(tmp / "runs"), "--eval-episodes", "1"]  # fmt: skip
    env = dict(script_env(), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("done in"):
            break
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        proc.send_signal(sig)
        time.sleep(0.02)
    rest, err = proc.communicate(timeout=60)
    assert any(line.startswith("done in") for line in out), "".join(out) + err
    assert proc.returncode == 0, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_a_signal_while_the_evaluation_is_logged_keeps_status_and_evaluation(tmp):
    """After the evaluation a signal no longer interrupts at once: end_run logs the evaluation and returns 0."""
    stop = plumbing.StopSignal(install=False)
    logged = []

    class Writer:  # a signal arrives while the evaluation is written to TensorBoard
        def add_scalar(self, tag, value, step):
            stop.handle(signal.SIGINT, None)
            logged.append(tag)

    args = plumbing.with_exp_name(ppo.Args(eval_episodes=2, progress=False), "ppo")
    ckpt = {"global_step": 10}
    status = plumbing.end_run(args, ckpt, tmp / "x.pt", Writer(), 0, stop, lambda *a: np.array([1.0, 3.0]))
    assert status == 0 and logged == ["eval/episodic_return", "eval/episodic_return_std"]
    assert not stop.immediate


# ---- item 6: resuming a finished run ----


@pytest.mark.parametrize("name", ["ppo", "q_learning"])
def test_resuming_a_finished_run_says_so_and_logs_its_evaluation_once(name, tmp, monkeypatch, capsys):
    monkeypatch.chdir(tmp)
    module = MODULES[name]
    assert module.main(tiny_args(name, tmp, eval_episodes=1)) == 0
    run = one_run(tmp)
    ckpt_path = run / f"{name}.pt"
    before = ckpt_path.read_bytes()
    capsys.readouterr()
    again = module.Args(resume=str(ckpt_path), progress=False)
    assert module.main(again) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and f"global step {TINY[name]}" in out, out
    assert len(logged(run, "eval/episodic_return")) == 1
    assert ckpt_path.read_bytes() == before


# ---- item 8: a full disk at a periodic checkpoint ----


def full_disk_after(n_writes: int, monkeypatch):
    """torch.save that writes `n_writes` files, then fails as a full disk does (half a file written)."""
    real_save, calls = torch.save, []

    def save(obj, path):
        calls.append(path)
        if len(calls) <= n_writes:
            return real_save(obj, path)
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plumbing.torch, "save", save)
    return calls


@pytest.mark.parametrize("name,every,kept", [("ppo", 256, 256), ("q_learning", 400, 400)])
def test_a_full_disk_at_a_periodic_checkpoint_is_one_line_naming_the_step_kept(
    name, every, kept, tmp, monkeypatch, capsys
):
    monkeypatch.chdir(tmp)
    calls = full_disk_after(1, monkeypatch)
    args = tiny_args(name, tmp, eval_episodes=0, checkpoint_every=every)
    assert MODULES[name].main(args) == 1
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error:") and "No space left on device" in err[0], err
    assert f"keeps global step {kept}" in err[0], err
    assert len(calls) == 2  # the periodic write that failed is not tried again at the end
    run = one_run(tmp)
    assert not list(run.glob("*.tmp"))
    assert torch.load(run / f"{name}.pt", weights_only=True)["global_step"] == kept


def test_a_full_disk_at_the_first_periodic_checkpoint_says_none_is_written(tmp, monkeypatch, capsys):
    monkeypatch.chdir(tmp)
    full_disk_after(0, monkeypatch)
    assert ppo.main(tiny_args("ppo", tmp, eval_episodes=0, checkpoint_every=256)) == 1
    err = stderr_lines(capsys)
    assert len(err) == 1 and "no checkpoint is written" in err[0], err
    assert not list(one_run(tmp).glob("*.pt*"))


# ---- item 11: evaluation episodes reset with seeds training does not use ----


def test_the_final_evaluation_resets_with_seeds_apart_from_trainings(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    seen = []

    def evaluate(ckpt, episodes, seed, *more):
        seen.append(seed)
        return np.zeros(episodes)

    monkeypatch.setattr(ppo, "evaluate", evaluate)
    assert ppo.main(tiny_args("ppo", tmp, seed=7, eval_episodes=3)) == 0
    assert seen == [7 + 2**32] == [plumbing.evaluation_seed(7)]
    # training resets env i with seed + global step + i: below seed + 2^32 for any run shorter than 2^32 steps
    assert plumbing.evaluation_seed(7) > 7 + 10**9


def test_evaluate_py_replays_the_final_evaluation(tmp, monkeypatch, capsys):
    """evaluate.py with the run's seed plays the episodes of the run's final evaluation: the same returns."""
    monkeypatch.chdir(tmp)
    assert ppo.main(tiny_args("ppo", tmp, eval_episodes=3)) == 0
    run = one_run(tmp)
    (logged,) = scalars(run)["eval/episodic_return"]
    capsys.readouterr()
    assert evaluate_script.main(evaluate_script.Args(checkpoint=str(run / "ppo.pt"), episodes=3)) == 0
    out = capsys.readouterr().out
    mean = float(out.split("return ")[1].split(" ")[0])
    assert mean == pytest.approx(logged[1], abs=1e-3), (out, logged)


# ---- item 12: the learning rate of a run extended by --resume --total-timesteps ----


def test_annealed_lr_is_the_scripts_linear_schedule():
    lr, n, B = 1e-3, 390, 256
    for k in range(1, n + 1):  # ppo's iteration k: (1 - (k - 1) / n) lr, the same number bit for bit
        assert plumbing.annealed_lr(lr, (k - 1) * B, n * B) == (1.0 - (k - 1) / n) * lr
    assert plumbing.annealed_lr(lr, 120, 100) == 0.0  # reinforce's last batch may pass the total
    # an extension from 100k to 120k anneals anew: lr at 100k, lr / 2 at 110k, 0 at 120k
    assert plumbing.annealed_lr(lr, 100_000, 120_000, 100_000) == lr
    assert plumbing.annealed_lr(lr, 110_000, 120_000, 100_000) == pytest.approx(lr / 2)
    assert plumbing.annealed_lr(lr, 120_000, 120_000, 100_000) == 0.0


def test_anneal_start_restarts_only_when_the_total_changes():
    args = ppo.Args(total_timesteps=120_000)
    saved = {"args": {"total_timesteps": 100_000}, "global_step": 100_000}
    assert plumbing.anneal_start(args, None) == 0
    assert plumbing.anneal_start(args, saved) == 100_000  # extended: a new annealing from here
    same = {"args": {"total_timesteps": 120_000}, "global_step": 110_000}
    assert plumbing.anneal_start(args, same) == 0  # a plain resume: the schedule goes on
    assert plumbing.anneal_start(args, {**same, "anneal_start": 100_000}) == 100_000  # ... of an extended run


def test_an_extended_run_anneals_its_learning_rate_over_the_extension(tmp, monkeypatch, capsys):
    monkeypatch.chdir(tmp)
    assert ppo.main(tiny_args("ppo", tmp, eval_episodes=0)) == 0
    run = one_run(tmp)
    ckpt_path = run / "ppo.pt"
    lr = torch.load(ckpt_path, weights_only=True)["args"]["learning_rate"]
    assert [v for _, v in logged(run, "charts/learning_rate")] == pytest.approx([lr, lr / 2])
    capsys.readouterr()
    more = ppo.Args(resume=str(ckpt_path), total_timesteps=1536, progress=False, eval_episodes=0)
    assert ppo.main(more) == 0
    settings = capsys.readouterr().out.splitlines()[0]
    assert "total_timesteps=1536 (flag)" in settings and "learning_rate=0.001 (saved)" in settings, settings
    rates = logged(run, "charts/learning_rate")
    assert [s for s, _ in rates] == [256, 512, 768, 1024, 1280, 1536]
    # over the extension (steps 512 to 1536, 4 rollouts): back to lr, then down toward 0 by lr / 4 per rollout
    assert [v for _, v in rates[2:]] == pytest.approx([lr, 0.75 * lr, 0.5 * lr, 0.25 * lr])
    saved = torch.load(ckpt_path, weights_only=True)
    assert saved["anneal_start"] == 512 and saved["global_step"] == 1536


# ---- item 4: every script's entry point ignores the signals once its run is over ----


def test_the_entry_point_is_script_cli_in_every_script():
    for path in sorted(SCRIPTS.glob("*.py")):
        if path.stem not in ("plumbing", "evaluate", "__init__"):
            assert "sys.exit(plumbing.script_cli(Args, main, __doc__))" in path.read_text(), path.name
