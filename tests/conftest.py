"""Shared helpers: run a script as a user would (its own process), read back its TensorBoard events."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "cleanrl_style"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SCRIPTS))  # the scripts' shared module, plumbing.py, as the scripts import it

# Every training script in cleanrl_style/ (the evaluation entry point, the shared module and package files are not).
TRAINING_SCRIPTS = sorted(
    p.stem for p in SCRIPTS.glob("*.py") if not p.name.startswith("_") and p.stem not in ("evaluate", "plumbing")
)


def script_env() -> dict:
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), PYTHONHASHSEED="0")
    env.pop("DISPLAY", None)
    return env


def run_script(name: str, *flags: str, cwd: Path, timeout: float = 600, check: bool = True):
    """Run cleanrl_style/{name}.py with `flags` in `cwd`; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), *flags],
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(flags)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def train(name: str, tmp: Path, *flags: str, timeout: float = 600) -> Path:
    """Train with `flags` into tmp/runs and return the one run directory it made."""
    before = set((tmp / "runs").glob("*")) if (tmp / "runs").exists() else set()
    run_script(
        name,
        "--no-progress",
        "--run-dir",
        str(tmp / "runs"),
        "--video-dir",
        str(tmp / "videos"),
        *flags,
        cwd=tmp,
        timeout=timeout,
    )
    made = sorted(set((tmp / "runs").glob("*")) - before)
    assert len(made) == 1, made
    return made[0]


def scalars(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} read back from the run's event files."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def text_tags(run_dir: Path) -> list:
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc.Tags()["tensors"]


def run_main(capsys, *args):
    """`python -m benchmarks ARGS` in this process: (exit status, stdout, stderr)."""
    from benchmarks.__main__ import main

    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(rc: int, err: str, *words: str) -> None:
    """The harness's answer to bad input: exit status 2 and one line on stderr, `error: ...`, naming each of
    `words`, no traceback."""
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


@pytest.fixture
def tmp(tmp_path) -> Path:
    return tmp_path
