"""ppo.py end to end: learning, determinism and faults (real environments, real processes)."""

import math
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SCRIPTS, run_script, scalars, script_env, train

import plumbing
from cleanrl_style import ppo


def best_mean_of_20(returns: list) -> float:
    r = np.array([v for _, v in returns])
    assert len(r) >= 20, f"only {len(r)} episodes"
    return max(r[i - 20 : i].mean() for i in range(20, len(r) + 1))


@pytest.mark.parametrize("loss,compile", [("clip", False), ("clip", True)])
def test_cartpole_is_solved(loss, compile, tmp):
    flags = ["--loss", loss, "--total-timesteps", "50000", "--seed", "1"] + (["--compile"] if compile else [])
    run = train("ppo", tmp, *flags)
    tags = scalars(run)
    assert best_mean_of_20(tags["charts/episodic_return"]) >= 475
    assert tags["eval/episodic_return"][-1][1] >= 475


def test_cartpole_is_solved_with_the_adaptive_kl_penalty(tmp):
    """Two seeds of three solve it in 50k steps, each adapting beta. (One seed alone proved fragile across machines:
    seed 1, which solved it where the test was written, ends at a 20-episode best of 328 on another CPU, its
    floating-point rounding compounding over the run; seeds 2 and 3 solve it there.)"""
    solved = 0
    for seed in ["1", "2", "3"]:
        (tmp / seed).mkdir()
        run = train("ppo", tmp / seed, "--loss", "kl", "--total-timesteps", "50000", "--seed", seed)
        tags = scalars(run)
        returns, evaluation = tags["charts/episodic_return"], tags["eval/episodic_return"][-1][1]
        solved += best_mean_of_20(returns) >= 475 and evaluation >= 475
        betas = [v for _, v in tags["charts/beta"]]
        assert len(set(betas)) > 1  # beta was adapted
    assert solved >= 2


@pytest.mark.parametrize("flags", [["--num-envs", "8"], ["--preset", "paper"]])
def test_inverted_pendulum_learns_to_balance(flags, tmp):
    """The continuous defaults (with 8 envs, so that each env lives long enough for whole 1000-step episodes in
    60k steps) and the PPO paper's settings."""
    run = train("ppo", tmp, "--env", "InvertedPendulum-v5", "--total-timesteps", "60000", "--seed", "1", *flags)
    tags = scalars(run)
    assert best_mean_of_20(tags["charts/episodic_return"]) >= 900
    assert tags["eval/episodic_return"][-1][1] >= 900


@pytest.mark.parametrize("env", ["CartPole-v1", "InvertedPendulum-v5"])
def test_same_seed_same_returns(env, tmp):
    flags = ["--env", env, "--total-timesteps", "2048", "--num-envs", "8", "--num-steps", "256", "--eval-episodes", "0"]
    logs = []
    for _ in range(2):
        logs.append(scalars(train("ppo", tmp, *flags))["charts/episodic_return"])
        time.sleep(1.0)  # a different unix time, so a different run directory
    assert len(logs[0]) > 5
    assert logs[0] == logs[1]


@pytest.mark.parametrize(
    "flags",
    [
        ["--minibatch-size", "100"],  # does not divide the batch of 8 * 32
        ["--gamma", "1.5"],
        ["--gae-lambda", "-0.1"],
        ["--total-timesteps", "10"],
        ["--log-std-init", "nan"],
        ["--vf-coef", "-1"],
    ],
)
def test_bad_hyperparameters_exit_2_before_writing(flags, tmp):
    proc = run_script("ppo", *flags, "--run-dir", str(tmp / "runs"), cwd=tmp, check=False)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert list(tmp.iterdir()) == []


def test_sigint_checkpoints_and_resume_continues(tmp):
    cmd = [
        sys.executable,
        str(SCRIPTS / "ppo.py"),
        "--no-progress",
        "--total-timesteps",
        "10000000",
        "--run-dir",
        str(tmp / "runs"),
        "--checkpoint-every",
        "0",
        "--eval-episodes",
        "0",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list((tmp / "runs").glob("*/events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3.0)  # a few updates
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    (run,) = list((tmp / "runs").iterdir())
    ckpt_path = run / "ppo.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    step0 = ckpt["global_step"]
    assert step0 > 0 and step0 % 256 == 0
    adam_steps0 = ckpt["optimizer"]["state"][0]["step"].item()
    logged = scalars(run)["charts/SPS"]
    assert logged[-1][0] == step0  # the checkpoint holds the last finished update

    target = step0 + 4 * 256
    run_script(
        "ppo",
        "--no-progress",
        "--resume",
        str(ckpt_path),
        "--total-timesteps",
        str(target),
        "--eval-episodes",
        "0",
        cwd=tmp,
    )
    resumed = torch.load(ckpt_path, weights_only=True)
    assert resumed["global_step"] == target
    # Adam's state went on: 4 more updates of 10 epochs x 4 mini-batches each
    assert resumed["optimizer"]["state"][0]["step"].item() == adam_steps0 + 4 * 10 * 4
    steps = [s for s, _ in scalars(run)["charts/SPS"]]
    assert steps[-4:] == [step0 + 256 * k for k in range(1, 5)]
    # a new --total-timesteps on resume starts a new annealing (README): back to --learning-rate, then down
    lr = dict(scalars(run)["charts/learning_rate"])
    resumed_lr = [lr[step0 + 256 * k] for k in range(1, 5)]
    assert resumed_lr[0] == pytest.approx(lr[256]) and resumed_lr == sorted(resumed_lr, reverse=True)


def test_nan_loss_stops_with_last_good_checkpoint(tmp, monkeypatch, capsys):
    calls = []
    real_value_loss = ppo.value_loss

    def value_loss_that_breaks(*a, **k):
        calls.append(1)
        return real_value_loss(*a, **k) * (math.nan if len(calls) > 60 else 1.0)

    monkeypatch.setattr(ppo, "value_loss", value_loss_that_breaks)
    monkeypatch.chdir(tmp)
    args = ppo.Args(total_timesteps=5000, run_dir=str(tmp / "runs"), progress=False, eval_episodes=0)
    assert ppo.main(args) == 1
    assert "non-finite loss" in capsys.readouterr().err
    (run,) = list((tmp / "runs").iterdir())
    ckpt = torch.load(run / "ppo.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # the first update takes 40 mini-batch steps; the 61st loss, in the second update (at step 512), is NaN:
    # the checkpoint is the state after the first update, not the half-done second one
    assert ckpt["global_step"] == 256 and ckpt["iteration"] == 1


def test_target_kl_stops_updates_early(tmp):
    flags = ["--total-timesteps", "1024", "--eval-episodes", "0", "--clip-vloss", "--ent-coef", "0.01"]
    full = scalars(train("ppo", tmp, *flags))["charts/update_minibatches"]
    stopped = scalars(train("ppo", tmp, *flags, "--target-kl", "1e-6"))["charts/update_minibatches"]
    assert [v for _, v in full] == [40.0] * 4  # 10 epochs x 4 mini-batches of 64 from 8 x 32 steps
    assert all(1 <= v < 40 for _, v in stopped)


def test_evaluation_uses_the_frozen_observation_statistics(tmp):
    run = train(
        "ppo",
        tmp,
        "--env",
        "InvertedPendulum-v5",
        "--total-timesteps",
        "4096",
        "--num-envs",
        "1",
        "--num-steps",
        "512",
        "--eval-episodes",
        "3",
    )
    ckpt = torch.load(run / "ppo.pt", weights_only=True)
    assert ckpt["obs_rms"] is not None and ckpt["ret_rms"] is not None
    count = ckpt["obs_rms"]["count"]
    first = ppo.evaluate(ckpt, 3, seed=plumbing.evaluation_seed(1))  # the seeds of the run's final evaluation
    assert ckpt["obs_rms"]["count"] == count  # evaluating does not update them
    np.testing.assert_array_equal(first, ppo.evaluate(ckpt, 3, seed=plumbing.evaluation_seed(1)))
    assert first.mean() == pytest.approx(scalars(run)["eval/episodic_return"][-1][1], abs=1e-3)
    shifted = dict(ckpt, obs_rms={**ckpt["obs_rms"], "mean": ckpt["obs_rms"]["mean"] + 3.0})
    assert not np.array_equal(first, ppo.evaluate(shifted, 3, seed=plumbing.evaluation_seed(1)))  # and they are used


class Counter(gym.Env):
    """Observation: the step count within the episode. Never terminates by itself unless `end_at`."""

    observation_space = gym.spaces.Box(-100.0, 100.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, end_at=None):
        self.t, self.end_at = 0, end_at

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, a):
        self.t += 1
        return np.array([float(self.t)], np.float32), 1.0, self.t == self.end_at, False, {}


gym.register("TruncatedCounter-v0", entry_point=Counter, max_episode_steps=5)
gym.register("TerminatedCounter-v0", entry_point=Counter, kwargs={"end_at": 5})


def record_gae_calls(monkeypatch) -> list:
    """Make ppo.main record each call of gae: (V, V_next, terminated, ended, V(s=[5]), V(s=[0])), the last two from
    the agent's critic as it is at that call."""
    seen, agents = [], []

    class RecordingAgent(ppo.Agent):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            agents.append(self)

    def V_of(x):
        return agents[-1].value(torch.tensor([[x]], dtype=torch.float32)).item()

    def recording_gae(r, V, V_next, terminated, ended, gamma, gae_lambda):
        with torch.no_grad():
            seen.append((V.copy(), V_next.copy(), terminated.copy(), ended.copy(), V_of(5.0), V_of(0.0)))
        return real_gae(r, V, V_next, terminated, ended, gamma, gae_lambda)

    real_gae = ppo.gae
    monkeypatch.setattr(ppo, "Agent", RecordingAgent)
    monkeypatch.setattr(ppo, "gae", recording_gae)
    return seen


@pytest.mark.parametrize("env_id", ["TruncatedCounter-v0", "TerminatedCounter-v0"])
def test_rollout_bootstraps_from_the_true_final_observation(env_id, tmp, monkeypatch):
    """The loop hands GAE V(s_5) of the final observation [5] at a truncation, not V of the reset
    observation [0] that the vector env returns in the same step, and marks a termination as one."""
    seen = record_gae_calls(monkeypatch)
    monkeypatch.chdir(tmp)
    args = ppo.Args(
        env=env_id,
        total_timesteps=12,
        num_envs=1,
        num_steps=12,
        minibatch_size=4,
        run_dir=str(tmp / "runs"),
        progress=False,
        eval_episodes=0,
        save_model=False,
    )
    assert ppo.main(args) == 0
    (V, V_next, terminated, ended, V5, V0) = seen[0]
    # steps t = 4 and t = 9 end an episode (the 5th step); step 5 starts the next one from [0]
    np.testing.assert_array_equal(ended[:, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0])
    truncation = env_id.startswith("Truncated")
    np.testing.assert_array_equal(terminated[:, 0], 0 if truncation else ended[:, 0])
    assert V[5, 0] == pytest.approx(V0, abs=1e-6)  # the value of the reset observation
    if truncation:
        assert V_next[4, 0] == pytest.approx(V5, abs=1e-6) and V_next[9, 0] == pytest.approx(V5, abs=1e-6)
        assert abs(V5 - V0) > 1e-4  # so the test tells them apart
    np.testing.assert_allclose(V_next[:4, 0], V[1:5, 0], atol=1e-6)  # inside an episode: the next step's V


def test_recompute_adv_takes_advantages_from_the_critic_of_each_epoch(tmp, monkeypatch):
    """--recompute-adv: before epochs 2 and 3 GAE runs again on V of the current critic (the reset observation's
    V at t = 5, V of the true final observation [5] at the truncation t = 4); without it, once per rollout."""
    seen = record_gae_calls(monkeypatch)
    monkeypatch.chdir(tmp)
    for recompute in [False, True]:
        seen.clear()
        args = ppo.Args(
            env="TruncatedCounter-v0", total_timesteps=12, num_envs=1, num_steps=12, minibatch_size=4,
            update_epochs=3, learning_rate=0.05, recompute_adv=recompute, run_dir=str(tmp / "runs"),
            progress=False, eval_episodes=0, save_model=False,
        )  # fmt: skip
        assert ppo.main(args) == 0
        assert len(seen) == (3 if recompute else 1)
    for V, V_next, _, _, V5, V0 in seen:  # each call: the critic as it was then
        assert V[5, 0] == pytest.approx(V0, abs=1e-5) and V_next[4, 0] == pytest.approx(V5, abs=1e-5)
    assert abs(seen[2][0][5, 0] - seen[0][0][5, 0]) > 1e-4  # the critic moved between the epochs


def test_preset_fills_the_flags_not_given_and_sets_log_sigma(tmp):
    """--preset tianshou: its settings where no flag was given, a given flag wins, other flags keep their defaults;
    the Gaussian's log sigma starts at the preset's log_std_init."""
    resolved = ppo.resolve_args(ppo.Args(env="HalfCheetah-v5", preset="tianshou", num_envs=16), discrete=False)
    expected = dict(ppo.PRESETS["tianshou"], num_envs=16)
    assert {k: getattr(resolved, k) for k in expected} == expected
    assert resolved.update_epochs == ppo.CONTINUOUS_DEFAULTS["update_epochs"]
    plain = ppo.resolve_args(ppo.Args(env="HalfCheetah-v5"), discrete=False)
    assert {k: getattr(plain, k) for k in ppo.PRESETS["tianshou"]} == ppo.PRESETS["tianshou"]  # the defaults
    paper = ppo.resolve_args(ppo.Args(env="HalfCheetah-v5", preset="paper"), discrete=False)
    assert (paper.num_envs, paper.num_steps, paper.vf_coef, paper.norm_adv, paper.recompute_adv) == (
        1, 2048, 0.5, True, False,
    )  # fmt: skip
    assert paper.log_std_init == 0.0 and paper.update_epochs == 10 and paper.learning_rate == 3e-4
    run = train(
        "ppo", tmp, "--env", "Pendulum-v1", "--preset", "tianshou", "--num-envs", "2", "--total-timesteps", "64",
        "--minibatch-size", "32", "--update-epochs", "1", "--learning-rate", "1e-9", "--eval-episodes", "0",
    )  # fmt: skip
    ckpt = torch.load(next(run.glob("*.pt")), weights_only=False)
    torch.testing.assert_close(ckpt["model"]["actor_logstd"], torch.full((1,), -0.5), atol=1e-6, rtol=0)
    assert ckpt["args"]["recompute_adv"] is True and ckpt["args"]["preset"] == "tianshou"


def test_preset_wide_builds_256_unit_networks(tmp):
    """--preset wide: Tianshou's settings with 256-unit hidden layers; a given --hidden-size wins; without the preset
    the layers have 64 units, discrete or continuous."""
    wide = ppo.resolve_args(ppo.Args(env="HalfCheetah-v5", preset="wide"), discrete=False)
    assert wide.hidden_size == 256
    assert {k: getattr(wide, k) for k in ppo.PRESETS["tianshou"]} == ppo.PRESETS["tianshou"]
    assert (
        ppo.resolve_args(ppo.Args(env="HalfCheetah-v5", preset="wide", hidden_size=32), discrete=False).hidden_size
        == 32
    )
    assert ppo.resolve_args(ppo.Args(env="HalfCheetah-v5"), discrete=False).hidden_size == 64
    assert ppo.resolve_args(ppo.Args(env="CartPole-v1"), discrete=True).hidden_size == 64
    run = train(
        "ppo", tmp, "--env", "Pendulum-v1", "--preset", "wide", "--num-envs", "2", "--total-timesteps", "64",
        "--minibatch-size", "32", "--update-epochs", "1", "--eval-episodes", "0",
    )  # fmt: skip
    ckpt = torch.load(next(run.glob("*.pt")), weights_only=False)
    assert ckpt["args"]["hidden_size"] == 256
    assert ckpt["model"]["actor.0.weight"].shape == (256, 3) and ckpt["model"]["critic.2.weight"].shape == (256, 256)
