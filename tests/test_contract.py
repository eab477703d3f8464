"""The script contract (shared/CONVENTIONS.md), checked on every training script in cleanrl_style/."""

import importlib.util
import re
import sys

import numpy as np
import pytest
import torch
from conftest import SCRIPTS, TRAINING_SCRIPTS, run_script, scalars, text_tags, train
from moviepy import VideoFileClip

# A tiny run of each script: its default environment, a budget of a few updates.
TINY = {"ppo": ["--total-timesteps", "512"], "dqn": ["--total-timesteps", "1000", "--learning-starts", "500"]}
CONTRACT_TAGS = [
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/SPS",
    "charts/learning_rate",
    "eval/episodic_return",
]


def tiny(name: str) -> list:
    return TINY.get(name, ["--total-timesteps", "1000"]) + ["--eval-episodes", "3"]


@pytest.fixture(params=TRAINING_SCRIPTS)
def script(request):
    return request.param


def test_there_are_scripts():
    assert "ppo" in TRAINING_SCRIPTS


def test_help(script, tmp):
    out = run_script(script, "--help", cwd=tmp).stdout
    for flag in [
        "--env",
        "--seed",
        "--total-timesteps",
        "--exp-name",
        "--device",
        "--capture-video",
        "--save-model",
        "--eval-episodes",
        "--run-dir",
        "--video-dir",
        "--resume",
        "--no-progress",
    ]:
        assert flag in out, flag
    assert list(tmp.iterdir()) == []


def test_import_trains_nothing(script, tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(sys, "argv", ["pytest", "--not-a-flag-of-the-script"])
    spec = importlib.util.spec_from_file_location(f"contract_{script}", SCRIPTS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main) and hasattr(module, "Args") and callable(module.evaluate)
    assert list(tmp.iterdir()) == []


def test_tiny_run_logs_checkpoints_and_evaluates(script, tmp):
    run = train(script, tmp, *tiny(script))
    assert run.name.startswith(f"{run.name.split('__')[0]}__{script}__1__")
    tags = scalars(run)
    for tag in CONTRACT_TAGS:
        assert tag in tags, f"{tag} missing; logged: {sorted(tags)}"
    assert any(t.startswith("losses/") for t in tags)
    assert any("hyperparameters" in t for t in text_tags(run))
    assert (run / "args.json").is_file()

    ckpt_path = run / f"{script}.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    for key in ["format_version", "algorithm", "env_id", "args", "global_step", "model", "optimizer"]:
        assert key in ckpt, key
    assert ckpt["algorithm"] == script
    assert ckpt["global_step"] == tags["charts/SPS"][-1][0]

    # The entry point rebuilds the agent and reproduces the run's own final evaluation.
    logged = tags["eval/episodic_return"][-1][1]
    out = run_script("evaluate", str(ckpt_path), "--episodes", "3", cwd=tmp).stdout
    mean = float(re.search(r"return (-?[\d.]+) ±", out).group(1))
    assert mean == pytest.approx(logged, abs=1e-3), out


def test_capture_video_decodes(script, tmp):
    run = train(script, tmp, *tiny(script), "--capture-video")
    videos = sorted((tmp / "videos" / run.name).rglob("*.mp4"))
    assert any("train" in str(v) for v in videos) and any("eval" in str(v) for v in videos), videos
    for path in videos[:2]:
        clip = VideoFileClip(str(path))
        frames = [f for _, f in zip(range(5), clip.iter_frames())]
        clip.close()
        assert len(frames) > 0 and frames[0].ndim == 3 and frames[0].shape[2] == 3
        assert np.asarray(frames[0]).std() > 0  # a picture, not a blank frame


def test_unknown_env_exits_2_and_writes_nothing(script, tmp):
    proc = run_script(
        script,
        "--env",
        "NoSuchEnv-v0",
        "--run-dir",
        str(tmp / "runs"),
        "--video-dir",
        str(tmp / "videos"),
        cwd=tmp,
        check=False,
    )
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "NoSuchEnv-v0" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert list(tmp.iterdir()) == []
