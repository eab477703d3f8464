"""Bad input and faults, tried as a new user would (issue 7): a user's mistake or a broken file gives one `error:`
line and exit 2 with nothing written; a fault never loses a trained model or leaves a checkpoint that lies."""

import errno
import importlib.util
import shutil
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SCRIPTS, TRAINING_SCRIPTS, run_script, scalars, script_env, train

import plumbing
from cleanrl_style import ppo, q_learning, sarsa

MODULES = {"ppo": ppo, "q_learning": q_learning, "sarsa": sarsa}
TINY = {"ppo": ["--total-timesteps", "512"], "q_learning": ["--total-timesteps", "1000"]}


def load(name: str):
    """A training script as a module (every script, including ones this file does not import by name)."""
    if name in MODULES:
        return MODULES[name]
    spec = importlib.util.spec_from_file_location(f"faults_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(name: str) -> list:
    return TINY.get(name, ["--total-timesteps", "1000"])


def assert_one_error_line(proc, code: int = 2, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in lines[0], lines[0]


# ---- 1. a non-finite step leaves the last good state, never a NaN checkpoint ----


@pytest.mark.parametrize("lr", ["30", "1e38"])
def test_non_finite_parameters_stop_with_the_last_good_checkpoint(lr, tmp):
    flags = ["--env", "Pendulum-v1", "--learning-rate", lr, "--num-envs", "1", "--num-steps", "256"]
    flags += ["--total-timesteps", "2048"]
    proc = run_script("ppo", *flags, "--no-progress", "--run-dir", str(tmp / "runs"), cwd=tmp, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "non-finite" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (run,) = (tmp / "runs").iterdir()
    ckpt = torch.load(run / "ppo.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert ckpt["global_step"] % 256 == 0 and ckpt["global_step"] < 2048
    out = run_script("evaluate", str(run / "ppo.pt"), "--episodes", "1", cwd=tmp).stdout
    assert "nan" not in out, out


# ---- 2. run directories are never shared ----


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_two_runs_in_the_same_second_get_their_own_directories(name, tmp):
    module = load(name)
    args = module.Args(run_dir=str(tmp / "runs"))
    paths = []
    for _ in range(3):
        path, writer = plumbing.start_run(args, None, 1_700_000_000.0)
        writer.close()
        paths.append(path)
    assert len(set(paths)) == 3 and all(p.parent == tmp / "runs" for p in paths)
    assert paths[0].name.endswith("__1700000000") and paths[1].name.endswith("__1700000000-2")
    assert all((p / "args.json").is_file() for p in paths)


def test_an_env_id_with_a_namespace_makes_one_directory(tmp):
    args = ppo.Args(env="phys2d/CartPole-v1", run_dir=str(tmp / "runs"))
    path, writer = plumbing.start_run(args, None, 1_700_000_000.0)
    writer.close()
    assert path.parent == tmp / "runs" and path.name.startswith("phys2d-CartPole-v1__ppo__1__")


# ---- 5. SIGTERM, and signals outside the training loop ----


@pytest.mark.parametrize(
    "name,sig", [("ppo", signal.SIGTERM), ("q_learning", signal.SIGTERM), ("sarsa", signal.SIGINT)]
)
def test_a_signal_mid_run_checkpoints_and_exits_130(name, sig, tmp):
    cmd = [sys.executable, str(SCRIPTS / f"{name}.py"), "--no-progress", "--total-timesteps", "100000000",
           "--run-dir", str(tmp / "runs"), "--checkpoint-every", "0", "--eval-episodes", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list((tmp / "runs").glob("*/events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err, err
    (run,) = (tmp / "runs").iterdir()
    assert torch.load(run / f"{name}.pt", weights_only=True)["global_step"] > 0


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_a_signal_before_training_still_leaves_a_resumable_checkpoint(name, tmp, monkeypatch):
    module = load(name)
    monkeypatch.chdir(tmp)
    stop = plumbing.StopSignal(install=False)
    stop.requested.set()  # Ctrl-C while the run was being set up
    args = module.Args(run_dir=str(tmp / "runs"), progress=False)
    assert module.main(args, stop) == 130
    (run,) = (tmp / "runs").iterdir()
    assert torch.load(run / f"{name}.pt", weights_only=True)["global_step"] == 0


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_a_signal_during_the_final_evaluation_exits_130_with_the_checkpoint(name, tmp, monkeypatch, capsys):
    module = load(name)
    monkeypatch.chdir(tmp)
    stop = plumbing.StopSignal(install=False)

    def evaluation_interrupted(*a, **k):
        stop.handle(signal.SIGINT, None)  # what the installed handler does when Ctrl-C arrives
        raise AssertionError("the signal should have interrupted the evaluation")

    monkeypatch.setattr(module, "evaluate", evaluation_interrupted)
    args = module.Args(run_dir=str(tmp / "runs"), progress=False, total_timesteps=512)
    assert module.main(args, stop) == 130
    assert "interrupted during the final evaluation" in capsys.readouterr().err
    (run,) = (tmp / "runs").iterdir()
    assert torch.load(run / f"{name}.pt", weights_only=True)["global_step"] > 0


# ---- 6, 7, 10. bad input: one line, exit 2, nothing written ----


def bad_flags(tmp) -> dict:
    (tmp / "a_file").write_text("not a directory")
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "text.pt").write_text("hello, I am not a checkpoint\n")
    (tmp / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    return {
        "seed -1": ["--seed", "-1"],
        "seed 2^32": ["--seed", "4294967296"],
        "exp-name with a separator": ["--exp-name", "ablation/lr"],
        "run-dir is a file": ["--run-dir", str(tmp / "a_file")],
        "video-dir is a file": ["--capture-video", "--video-dir", str(tmp / "a_file")],
        "empty checkpoint": ["--resume", str(tmp / "empty.pt")],
        "text checkpoint": ["--resume", str(tmp / "text.pt")],
        "random checkpoint": ["--resume", str(tmp / "random.pt")],
        "missing checkpoint": ["--resume", str(tmp / "nothing.pt")],
    }


def test_bad_input_gives_one_line_and_exit_2_writing_nothing(tmp):
    """As a user runs it, in its own process (the other scripts: in-process below, through the same cli())."""
    for case, flags in bad_flags(tmp).items():
        before = sorted(tmp.rglob("*"))
        proc = run_script("ppo", *flags, *(["--run-dir", str(tmp / "runs")] if "--run-dir" not in flags else []),
                          cwd=tmp, check=False)  # fmt: skip
        assert_one_error_line(proc)
        assert sorted(tmp.rglob("*")) == before, case


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_bad_input_through_cli_gives_one_line_and_exit_2_writing_nothing(name, tmp, monkeypatch, capsys):
    module = load(name)
    monkeypatch.chdir(tmp)
    for case, flags in bad_flags(tmp).items():
        before = sorted(tmp.rglob("*"))
        run_dir = ["--run-dir", str(tmp / "runs")] if "--run-dir" not in flags else []
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *flags, *run_dir])
        assert plumbing.cli(module.Args, module.main, module.__doc__) == 2, case
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error:"), (case, err)
        assert sorted(tmp.rglob("*")) == before, case


def test_an_env_with_a_missing_dependency_exits_2(tmp):
    try:
        gym.make("LunarLander-v3").close()
        pytest.skip("Box2D is installed here")
    except gym.error.DependencyNotInstalled:
        pass
    assert_one_error_line(run_script("ppo", "--env", "LunarLander-v3", cwd=tmp, check=False), 2, "LunarLander-v3")
    assert list(tmp.iterdir()) == []


def test_networks_too_big_for_memory_exit_2_writing_nothing(tmp):
    proc = run_script("ppo", "--hidden-size", "1000000", "--run-dir", str(tmp / "runs"), cwd=tmp, check=False)
    assert_one_error_line(proc, 2, "--hidden-size")
    assert list(tmp.iterdir()) == []


def test_a_64_dimensional_box_is_refused_not_wrapped_around():
    space = gym.spaces.Box(-1.0, 1.0, (64,))
    args = q_learning.Args(env="Foo-v0")
    with pytest.raises(plumbing.UsageError, match="too many"):
        plumbing.make_discretizer(args, space)  # 6^64 states: int64 arithmetic would wrap it to 0


def test_evaluate_refuses_bad_input_in_one_line(tmp):
    bad = bad_flags(tmp)
    run = train("q_learning", tmp, "--total-timesteps", "500", "--eval-episodes", "0")
    ckpt = torch.load(run / "q_learning.pt", weights_only=True)
    ckpt["env_id"] = "NotRegisteredHere-v0"
    torch.save(ckpt, tmp / "unknown_env.pt")
    cases = [[bad[k][1]] for k in ["empty checkpoint", "text checkpoint", "random checkpoint", "missing checkpoint"]]
    cases += [[str(run / "q_learning.pt"), "--seed", "-1"], [str(tmp / "unknown_env.pt")]]
    if not torch.cuda.is_available():
        cases.append([str(run / "q_learning.pt"), "--device", "cuda"])
    for flags in cases:
        assert_one_error_line(run_script("evaluate", *flags, cwd=tmp, check=False))


# ---- a full disk at a checkpoint ----


@pytest.mark.parametrize("name", ["ppo", "q_learning"])
def test_a_full_disk_at_the_checkpoint_is_one_line_and_leaves_no_temporary_file(name, tmp, monkeypatch, capsys):
    module = load(name)
    monkeypatch.chdir(tmp)

    def save_to_a_full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module.torch, "save", save_to_a_full_disk)
    args = module.Args(run_dir=str(tmp / "runs"), progress=False, total_timesteps=512, eval_episodes=0)
    assert module.main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "No space left on device" in err[0], err
    (run,) = (tmp / "runs").iterdir()
    assert not list(run.glob("*.pt*"))


# ---- 8, 9. resuming ----


def test_resume_after_a_kill_logs_each_step_once(tmp):
    """A run killed after its checkpoint logged events past it; the resumed run must not log those steps twice."""
    flags = ["--total-timesteps", "1024", "--eval-episodes", "0", "--checkpoint-every", "0"]
    run = train("ppo", tmp, *flags)
    ckpt_path = run / "ppo.pt"
    shutil.copy(ckpt_path, tmp / "at_1024.pt")
    resume = ["--no-progress", "--resume", str(ckpt_path), "--total-timesteps", "2048", "--eval-episodes", "0"]
    run_script("ppo", *resume, cwd=tmp)  # events up to 2048 ...
    shutil.copy(tmp / "at_1024.pt", ckpt_path)  # ... but the process was killed before its checkpoint at 2048
    run_script("ppo", *resume, cwd=tmp)
    steps = [s for s, _ in scalars(run)["charts/SPS"]]
    assert steps == list(range(256, 2049, 256)), steps


def test_resume_refuses_a_conflicting_flag_and_takes_the_ones_it_may_change(tmp):
    run = train("ppo", tmp, "--total-timesteps", "512", "--eval-episodes", "0")
    ckpt = str(run / "ppo.pt")
    for flags, word in [(["--learning-rate", "0.1"], "--learning-rate"), (["--env", "Acrobot-v1"], "--env")]:
        proc = run_script("ppo", "--resume", ckpt, *flags, cwd=tmp, check=False)
        assert_one_error_line(proc, 2, word)
    proc = run_script("ppo", "--no-progress", "--resume", ckpt, "--total-timesteps", "1000", "--eval-episodes", "2",
                      cwd=tmp)  # fmt: skip
    assert "training 768 steps" in proc.stdout and "over 2 episodes" in proc.stdout, proc.stdout
    assert torch.load(ckpt, weights_only=True)["args"]["eval_episodes"] == 2


# ---- 11. SARSA's defaults end on a path on its default env ----


def test_sarsa_defaults_end_on_the_safe_path(tmp):
    # seeds whose greedy policy looped (-1000) with the book's constant alpha = 0.5
    for seed in ["1", "6"]:
        run = train("sarsa", tmp, "--seed", seed, "--eval-episodes", "1")
        assert scalars(run)["eval/episodic_return"][-1][1] > -100, seed
