"""Faults and bad input in the scripts (issue 20, items 3, 5, 7): a fault leaves a checkpoint of the last good state
with every tensor finite and one error line; a stop is seen at every env step; a flag that cannot mean anything
(a non-finite float, a mini-batch larger than the buffer, more envs than memory holds) is one error line, exit 2."""

import dataclasses
import importlib.util
import math
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SCRIPTS, TRAINING_SCRIPTS

import plumbing
from cleanrl_style import dqn, reinforce


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"script_faults_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- a probe env: Box(2) observations, 2 actions, NaN where a test asks for it ----

COUNT = {"steps": 0, "resets": 0}
HOOK = {"on_step": None}


class Probe(gym.Env):
    """Episodes of `length` steps (0: an episode that never ends, cut at 5,000 steps so that a test cannot hang).
    Observation [t, 0] at step t of an episode, its final one [100, 0]. NaN: every observation from the env step
    `nan_from_step` on (counted over all envs), the final observations from step `nan_final_from_step` on, or the
    reset observations from reset `nan_reset_from` on."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length=10, nan_from_step=None, nan_final_from_step=None, nan_reset_from=None):
        self.length, self.nan_from_step = length, nan_from_step
        self.nan_final_from_step, self.nan_reset_from = nan_final_from_step, nan_reset_from
        self.t = 0

    def obs(self, value: float) -> np.ndarray:
        return np.array([value, 0.0], np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        COUNT["resets"] += 1
        nan = self.nan_reset_from is not None and COUNT["resets"] >= self.nan_reset_from
        return self.obs(np.nan if nan else 0.0), {}

    def step(self, a):
        self.t += 1
        COUNT["steps"] += 1
        if HOOK["on_step"] is not None:
            HOOK["on_step"](COUNT["steps"])
        end = self.t == (self.length or 5_000)
        s = self.obs(100.0 if end else self.t)
        if (self.nan_from_step is not None and COUNT["steps"] >= self.nan_from_step) or (
            end and self.nan_final_from_step is not None and COUNT["steps"] >= self.nan_final_from_step
        ):
            s = self.obs(np.nan)
        return s, 1.0, end, False, {}


def probe(env_id: str, **kwargs) -> str:
    gym.register(env_id, entry_point=Probe, kwargs=kwargs, disable_env_checker=True)
    return env_id


probe("ProbeNaNFrom700-v0", nan_from_step=700)
probe("ProbeNaNFinalAfterBatch1-v0", nan_final_from_step=21)
probe("ProbeNaNResetFrom3-v0", nan_reset_from=3)
probe("ProbeNeverEnds-v0", length=0)
probe("ProbeLength3-v0", length=3)


@pytest.fixture(autouse=True)
def fresh_counts():
    COUNT.update(steps=0, resets=0)
    HOOK["on_step"] = None
    yield
    HOOK["on_step"] = None


def non_finite(tree, where="ckpt") -> list:
    """The places in a checkpoint (nested dicts, lists, tensors, floats) that hold NaN or inf."""
    if isinstance(tree, torch.Tensor):
        return [] if tree.is_floating_point() is False or torch.isfinite(tree).all() else [where]
    if isinstance(tree, float):
        return [] if math.isfinite(tree) else [where]
    if isinstance(tree, dict):
        return [w for k, v in tree.items() for w in non_finite(v, f"{where}[{k!r}]")]
    if isinstance(tree, (list, tuple)):
        return [w for i, v in enumerate(tree) for w in non_finite(v, f"{where}[{i}]")]
    return []


def the_checkpoint(tmp, name: str) -> dict:
    (run,) = (tmp / "runs").iterdir()
    return torch.load(run / f"{name}.pt", weights_only=True)


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.strip()]


# ---- item 3: the checkpoint at a fault is the last good state, every tensor finite ----


def test_dqn_keeps_nan_observations_out_of_a_full_buffer(tmp, monkeypatch, capsys):
    monkeypatch.chdir(tmp)
    args = dqn.Args(env="ProbeNaNFrom700-v0", buffer_size=500, learning_starts=100, batch_size=32,
                    total_timesteps=1500, eval_episodes=0, progress=False, run_dir=str(tmp / "runs"))  # fmt: skip
    assert dqn.main(args) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error:") and "non-finite observation" in err[0], err
    ckpt = the_checkpoint(tmp, "dqn")
    assert ckpt["replay_buffer"]["size"] == 500  # the ring is full: the buffer's every slot is written
    assert non_finite(ckpt) == []


def test_dqn_priorities_beyond_float_range_stop_with_finite_priorities_and_no_warning(tmp, monkeypatch, capsys):
    monkeypatch.chdir(tmp)
    args = dqn.Args(prioritized=True, per_alpha=1000.0, learning_starts=100, total_timesteps=600, eval_episodes=0,
                    progress=False, run_dir=str(tmp / "runs"))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dqn.main(args) == 1
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error:") and "priority" in err[0], err
    ckpt = the_checkpoint(tmp, "dqn")
    assert non_finite(ckpt) == [] and 0 < ckpt["replay_buffer"]["max_priority"] < math.inf


def reinforce_args(tmp, env: str, **more):
    flags = dict(env=env, num_envs=2, episodes_per_update=2, total_timesteps=200, norm_obs=True, baseline="mean",
                 eval_episodes=0, progress=False, run_dir=str(tmp / "runs"))  # fmt: skip
    return reinforce.Args(**{**flags, **more})


def test_reinforce_statistics_never_hold_a_nan_final_observation(tmp, monkeypatch, capsys):
    """The final observation of each episode of the second batch is NaN: it is not an observation the policy sees,
    so it stays out of obs_rms (the run, which never uses it with --baseline mean, ends normally)."""
    monkeypatch.chdir(tmp)
    status = reinforce.main(reinforce_args(tmp, "ProbeNaNFinalAfterBatch1-v0"))
    ckpt = the_checkpoint(tmp, "reinforce")
    assert non_finite(ckpt) == [], (status, capsys.readouterr().err)
    assert ckpt["global_step"] > 20


def test_reinforce_a_nan_reset_observation_stops_before_the_statistics_take_it(tmp, monkeypatch, capsys):
    monkeypatch.chdir(tmp)
    assert reinforce.main(reinforce_args(tmp, "ProbeNaNResetFrom3-v0")) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error:") and "non-finite observation" in err[0], err
    assert non_finite(the_checkpoint(tmp, "reinforce")) == []


# ---- item 5: reinforce sees a stop at every env step ----


def test_reinforce_stops_during_an_episode_that_never_ends(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    stop = plumbing.StopSignal(install=False)
    HOOK["on_step"] = lambda steps: stop.requested.set() if steps == 100 else None  # SIGTERM at env step 100
    assert reinforce.main(reinforce_args(tmp, "ProbeNeverEnds-v0", total_timesteps=100_000), stop) == 130
    assert COUNT["steps"] <= 102  # one step of each env after the signal at most, not the 5,000 of the episode
    assert the_checkpoint(tmp, "reinforce")["global_step"] == 0


# ---- the math list: reinforce's observation statistics count what the policy sees, as ppo's ----


def test_reinforce_obs_statistics_include_reset_observations_and_leave_out_final_ones():
    env = plumbing.make_env("ProbeLength3-v0", 1, False, "unused")()
    agent = reinforce.Agent(2, 2, True, 8)
    obs_rms = plumbing.RunningMeanStd(2)
    args = dataclasses.replace(reinforce.Args(), gamma=0.99)
    sampler = reinforce.EpisodeSampler([env], args, env.action_space, obs_rms, None, 0)
    pi = plumbing.RolloutPolicy(agent, np.random.default_rng(0))
    episodes, steps = sampler.collect(pi, 2, 0, lambda *a: None, stopped=lambda: False)
    assert len(episodes) == 2 and steps == 6
    seen = [0, 1, 2, 0, 1, 2, 0]  # the first reset, then per episode s_1, s_2 and the next episode's reset; no 100
    assert obs_rms.count == pytest.approx(1e-4 + len(seen))
    assert obs_rms.mean[0] == pytest.approx(np.mean(seen), rel=1e-4)


# ---- item 7: values that cannot mean anything are one error line, exit 2, nothing written ----


def refused(name: str, flags: list, tmp, monkeypatch, capsys) -> str:
    """The one error line of `name` run with `flags` through the command line; fails if training would start."""
    module = load(name)
    monkeypatch.chdir(tmp)

    def no_run(*a, **k):
        raise AssertionError(f"{name} {flags} was accepted")

    monkeypatch.setattr(plumbing, "Run", no_run)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *flags, "--run-dir", str(tmp / "runs")])
    assert plumbing.cli(module.Args, module.main, module.__doc__) == 2, flags
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error:"), (flags, err)
    assert list(tmp.iterdir()) == [], flags
    return err[0]


@pytest.mark.parametrize(
    "name, flags, words",
    [
        ("dqn", ["--buffer-size", "10", "--batch-size", "64"], "--batch-size 64"),
        ("a2c", ["--num-envs", "1000000000"], "--num-envs 1000000000"),
        ("sarsa", ["--env", "CartPole-v1", "--obs-low", "nan"], "--obs-low"),
        ("q_learning", ["--env", "CartPole-v1", "--obs-high", "inf"], "--obs-high"),
        ("dqn", ["--prioritized", "--per-alpha", "inf"], "--per-alpha"),
        ("trpo", ["--max-kl", "inf"], "--max-kl"),
    ],
)
def test_the_issue_s_values_are_refused(name, flags, words, tmp, monkeypatch, capsys):
    assert words in refused(name, flags, tmp, monkeypatch, capsys)


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_every_float_flag_must_be_finite(name, tmp, monkeypatch, capsys):
    module = load(name)
    hints = {f.name: str(f.type) for f in dataclasses.fields(module.Args)}
    floats = [k for k, hint in hints.items() if "float" in hint]
    assert floats, name
    for k in floats:
        for value in ("inf", "nan", "-inf"):
            line = refused(name, [f"--{k.replace('_', '-')}", value], tmp, monkeypatch, capsys)
            assert "finite" in line, line


def test_make_discretizer_refuses_non_finite_bounds():
    args = load("sarsa").Args(env="CartPole-v1", bins=(3,))
    space = gym.spaces.Box(-1, 1, (1,), np.float32)
    for low, high in [((math.nan,), (1.0,)), ((-math.inf,), (1.0,)), ((0.0,), (math.inf,)), ((-1e308,), (1e308,))]:
        with pytest.raises(plumbing.UsageError, match="finite"):
            plumbing.make_discretizer(dataclasses.replace(args, env="Probe", obs_low=low, obs_high=high), space)
    assert plumbing.make_discretizer(dataclasses.replace(args, env="Probe", obs_low=(-1.0,), obs_high=(1.0,)), space)


def test_num_envs_that_fit_in_memory_are_accepted():
    args = load("a2c").Args(num_envs=64, num_steps=5)
    plumbing.check_numbers(args)  # no UsageError
    with pytest.raises(plumbing.UsageError, match="GiB"):
        plumbing.check_numbers(dataclasses.replace(args, num_envs=10**9))
