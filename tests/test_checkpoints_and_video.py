"""Issue 20, items 1, 2 and 10: a video folder that cannot be written, and a checkpoint whose contents do not fit
(another format version, another algorithm, a renamed entry, args that disagree with the tensors), are one `error:`
line and exit 2 with nothing written, in training (--capture-video, --resume) and in evaluate.py; and every such
line is one line, even when it prints a numpy array. In-process through plumbing.cli and evaluate.main: no
training beyond a few hundred steps for the checkpoints the cases change."""

import importlib.util
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SCRIPTS, TRAINING_SCRIPTS

import plumbing
from cleanrl_style import dqn, ppo, q_learning

spec = importlib.util.spec_from_file_location("evaluate_entry_point", SCRIPTS / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"ckpt_video_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def files(root) -> dict:
    """Every path under `root` with its size and modification time: what "nothing written" compares."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def cli(module, *flags: str) -> int:
    return plumbing.cli(module.Args, module.main, module.__doc__, argv=list(flags))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """A ppo, a dqn and a q_learning checkpoint of a few hundred steps (format version 1), trained in-process."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for module, flags in [
        (ppo, dict(total_timesteps=512)),
        (dqn, dict(total_timesteps=300, learning_starts=100, buffer_size=500)),
        (q_learning, dict(total_timesteps=300)),
    ]:
        args = module.Args(run_dir=str(root / module.ALGORITHM), progress=False, eval_episodes=0, **flags)
        assert module.main(args) == 0
        (run,) = (root / module.ALGORITHM).iterdir()
        out[module.ALGORITHM] = run / f"{module.ALGORITHM}.pt"
    return out


def changed(checkpoints, tmp, algorithm: str, change) -> str:
    """A copy of `algorithm`'s checkpoint in a run directory of its own under tmp, with `change(ckpt)` applied."""
    run = tmp / f"CartPole-v1__{algorithm}__1__1700000000"
    run.mkdir(exist_ok=True)
    ckpt = torch.load(checkpoints[algorithm], weights_only=True)
    change(ckpt)
    torch.save(ckpt, run / f"{algorithm}.pt")
    return str(run / f"{algorithm}.pt")


def rename(entry: str, to: str):
    return lambda ckpt: ckpt.__setitem__(to, ckpt.pop(entry))


def set_arg(name: str, value):
    return lambda ckpt: ckpt["args"].__setitem__(name, value)


def rename_tensor(ckpt):
    ckpt["model"]["actor.0.w"] = ckpt["model"].pop("actor.0.weight")


# ---- item 1: the video folder is checked before anything is written, by a test write ----


def unwritable_video_dirs(tmp) -> dict:
    (tmp / "a_file").write_text("not a directory")
    return {"under a file": str(tmp / "a_file" / "videos"), "under /proc": "/proc/videos", "/proc": "/proc"}


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_training_refuses_a_video_dir_it_cannot_write_before_writing_anything(name, tmp, monkeypatch, capsys):
    """Root passes every permission check: /proc looks writable to os.access, and only a test write tells."""
    module = load(name)
    monkeypatch.chdir(tmp)
    for case, video_dir in unwritable_video_dirs(tmp).items():
        before = files(tmp)
        flags = ["--capture-video", "--video-dir", video_dir, "--run-dir", str(tmp / "runs"), "--no-progress"]
        assert cli(module, *flags, "--total-timesteps", "512") == 2, case
        assert "--video-dir" in one_error_line(capsys), case
        assert files(tmp) == before, case


def test_evaluate_refuses_a_video_dir_it_cannot_write_before_writing_anything(checkpoints, tmp, capsys):
    for case, video_dir in unwritable_video_dirs(tmp).items():
        before = files(tmp)
        args = evaluate.Args(str(checkpoints["ppo"]), episodes=1, capture_video=True, video_dir=video_dir)
        assert evaluate.main(args) == 2, case
        assert "--video-dir" in one_error_line(capsys), case
        assert files(tmp) == before, case


def test_evaluate_refuses_a_video_folder_name_over_the_file_name_limit(checkpoints, tmp, capsys):
    """evaluate.py records into videos/eval_{run_name}: a run directory's name near the limit (255 bytes) is one
    that the folder cannot have."""
    long_run = tmp / ("r" * 252)
    long_run.mkdir()
    shutil.copy(checkpoints["ppo"], long_run / "ppo.pt")
    before = files(tmp)
    args = evaluate.Args(str(long_run / "ppo.pt"), episodes=1, capture_video=True, video_dir=str(tmp / "videos"))
    assert evaluate.main(args) == 2
    assert "over the limit" in one_error_line(capsys)
    assert files(tmp) == before


def test_a_run_name_over_the_file_name_limit_is_refused_before_anything_is_written(tmp, monkeypatch, capsys):
    """The run directory and the video folder have the run's name: checked before either, or runs/ is left."""
    monkeypatch.chdir(tmp)
    for video in [[], ["--capture-video", "--video-dir", str(tmp / "videos")]]:
        flags = [*video, "--run-dir", str(tmp / "runs"), "--exp-name", "x" * 250, "--total-timesteps", "512"]
        assert cli(ppo, *flags, "--no-progress") == 2
        line = one_error_line(capsys)
        assert "--run-dir" in line and "over the limit" in line
        assert list(tmp.iterdir()) == []


def test_unwritable_reason_tries_a_write_and_the_name_length_and_leaves_nothing(tmp):
    assert plumbing.unwritable_reason(str(tmp / "new" / "deeper"), "run") is None
    assert plumbing.writable_dir(str(tmp)) and not plumbing.writable_dir("/proc/videos")
    assert "over the limit" in plumbing.unwritable_reason(str(tmp), "n" * 256)
    assert "over the limit" in plumbing.unwritable_reason(str(tmp / ("n" * 256)))
    assert "not a directory" in plumbing.unwritable_reason("/proc/self/status/videos")
    assert list(tmp.iterdir()) == []  # the test writes are gone


# ---- item 2: what a checkpoint holds is checked: version, algorithm, entries, args against tensors ----


BAD_FOR_RESUME = {  # (algorithm, change, a word the error line names)
    "format version 2": ("ppo", lambda c: c.__setitem__("format_version", 2), "version 1"),
    "no format version": ("ppo", lambda c: c.pop("format_version"), "format_version"),
    "algorithm changed": ("ppo", lambda c: c.__setitem__("algorithm", "dqn"), "dqn checkpoint"),
    "model renamed": ("ppo", rename("model", "weights"), "'model'"),
    "iteration renamed": ("ppo", rename("iteration", "iter"), "'iteration'"),
    "a tensor renamed": ("ppo", rename_tensor, "actor.0.weight"),
    "hidden_size disagrees": ("ppo", set_arg("hidden_size", 32), "size mismatch"),
    "dqn hidden_size disagrees": ("dqn", set_arg("hidden_size", 32), "size mismatch"),
    "dqn buffer renamed": ("dqn", rename("replay_buffer", "buffer"), "'replay_buffer'"),
    "dqn buffer entry missing": ("dqn", lambda c: c["replay_buffer"].pop("G"), "'G'"),
    "q_learning discretizer renamed": ("q_learning", rename("discretizer", "phi"), "'discretizer'"),
    "q_learning table of another size": ("q_learning", lambda c: c["model"].__setitem__("Q", torch.zeros(3, 2)), "Q"),
}


@pytest.mark.parametrize("case", BAD_FOR_RESUME)
def test_resume_from_a_checkpoint_that_does_not_fit_is_one_line_writing_nothing(case, checkpoints, tmp, capsys):
    algorithm, change, word = BAD_FOR_RESUME[case]
    path = changed(checkpoints, tmp, algorithm, change)
    module = {"ppo": ppo, "dqn": dqn, "q_learning": q_learning}[algorithm]
    before = files(tmp)
    assert cli(module, "--resume", path, "--total-timesteps", "2048", "--no-progress") == 2
    assert word in one_error_line(capsys)
    assert files(tmp) == before


BAD_FOR_EVALUATE = {
    "format version 2": ("ppo", lambda c: c.__setitem__("format_version", 2), "version 1"),
    "another algorithm's": ("ppo", lambda c: c.__setitem__("algorithm", "dqn"), "dqn"),
    "an unknown algorithm": ("ppo", lambda c: c.__setitem__("algorithm", "nonesuch"), "nonesuch"),
    "the shared module as algorithm": ("ppo", lambda c: c.__setitem__("algorithm", "plumbing"), "not a training"),
    "evaluate as algorithm": ("ppo", lambda c: c.__setitem__("algorithm", "evaluate"), "not a training"),
    "model renamed": ("ppo", rename("model", "weights"), "'model'"),
    "a tensor renamed": ("ppo", rename_tensor, "actor.0.weight"),
    "hidden_size disagrees": ("ppo", set_arg("hidden_size", 32), "size mismatch"),
    "hidden_size missing": ("ppo", lambda c: c["args"].pop("hidden_size"), "hidden_size"),
    "dqn hidden_size disagrees": ("dqn", set_arg("hidden_size", 32), "size mismatch"),
    "q_learning table of another size": ("q_learning", lambda c: c["model"].__setitem__("Q", torch.zeros(3, 2)), "Q"),
    "no seed": ("ppo", lambda c: c["args"].pop("seed"), "--seed"),
}


@pytest.mark.parametrize("case", BAD_FOR_EVALUATE)
def test_evaluate_refuses_a_checkpoint_that_does_not_fit_in_one_line(case, checkpoints, tmp, capsys):
    algorithm, change, word = BAD_FOR_EVALUATE[case]
    path = changed(checkpoints, tmp, algorithm, change)
    before = files(tmp)
    assert evaluate.main(evaluate.Args(path, episodes=1, capture_video=True, video_dir=str(tmp / "videos"))) == 2
    assert word in one_error_line(capsys)
    assert files(tmp) == before


def test_version_1_checkpoints_still_resume_and_evaluate(checkpoints, tmp, capsys):
    assert 1 in plumbing.CHECKPOINT_FORMATS_READ and plumbing.CHECKPOINT_FORMAT in plumbing.CHECKPOINT_FORMATS_READ
    for algorithm in checkpoints:
        path = changed(checkpoints, tmp, algorithm, lambda c: c.__setitem__("format_version", 1))
        assert evaluate.main(evaluate.Args(path, episodes=1)) == 0
        assert capsys.readouterr().out.startswith(f"{algorithm} on ")
    path = changed(checkpoints, tmp, "ppo", lambda c: None)
    assert cli(ppo, "--resume", path, "--total-timesteps", "1024", "--eval-episodes", "0", "--no-progress") == 0
    resumed = plumbing.load_checkpoint(path, "ppo")
    assert resumed["format_version"] == plumbing.CHECKPOINT_FORMAT and resumed["global_step"] == 1024


def test_restore_refuses_statistics_of_another_shape():
    ckpt = plumbing.Checkpoint({"algorithm": "ppo", "obs_rms": plumbing.RunningMeanStd(4).state_dict()}, "x.pt")
    with pytest.raises(plumbing.UsageError, match="obs_rms"):
        plumbing.restore(ckpt, obs_rms=plumbing.RunningMeanStd(3))
    plumbing.restore(ckpt, obs_rms=plumbing.RunningMeanStd(4))


# ---- item 10: an error line is one line, even with a numpy array in it ----


class WideBoundsEnv(gym.Env):
    """Box observations and Box actions whose bounds numpy prints over several lines."""

    bounds = np.arange(1.0, 13.0, dtype=np.float32) * np.float32(1.2345)
    observation_space = gym.spaces.Box(-bounds, bounds, dtype=np.float32)
    action_space = gym.spaces.Box(-bounds, bounds, dtype=np.float32)


@pytest.fixture
def wide_bounds_env():
    gym.register("WideBounds-v0", entry_point=WideBoundsEnv)
    yield "WideBounds-v0"
    gym.registry.pop("WideBounds-v0")


def test_an_error_with_a_numpy_array_in_it_is_one_line(wide_bounds_env, tmp, monkeypatch, capsys):
    assert "\n" in str(WideBoundsEnv.action_space)  # what the message holds
    monkeypatch.chdir(tmp)
    assert cli(dqn, "--env", wide_bounds_env, "--run-dir", str(tmp / "runs")) == 2
    assert "dqn needs Box observations and Discrete actions" in one_error_line(capsys)
    assert list(tmp.iterdir()) == []


def test_evaluate_prints_one_line_for_a_message_of_several(capsys):
    assert evaluate.fail("a message\nover   two lines") == 2
    assert one_error_line(capsys) == "error: a message over two lines"
