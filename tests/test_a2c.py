"""a2c.py: its GAE is ppo.py's, the advantage is a constant in the actor's loss, the optimisers, and runs
(learning on CartPole-v1 and InvertedPendulum-v5, determinism, bad input)."""

import inspect

import numpy as np
import pytest
import torch
from conftest import scalars, train
from test_ppo_math import brute_force_gae, random_rollout

import plumbing
from cleanrl_style import a2c, ppo


def best_mean_of_20(returns: list) -> float:
    r = np.array([v for _, v in returns])
    assert len(r) >= 20, f"only {len(r)} episodes"
    return max(r[i - 20 : i].mean() for i in range(20, len(r) + 1))


def test_gae_is_ppos():
    assert inspect.getsource(a2c.gae) == inspect.getsource(ppo.gae)
    for seed in range(3):
        r, V, V_next, term, ended = random_rollout(np.random.default_rng(seed))
        assert term.sum() > 0 and (ended - term).sum() > 0  # terminations and truncations both occur
        for lam in [0.0, 0.5, 0.95, 1.0]:
            A_hat = a2c.gae(r, V, V_next, term, ended, 0.99, lam)
            np.testing.assert_array_equal(A_hat, ppo.gae(r, V, V_next, term, ended, 0.99, lam))
            np.testing.assert_allclose(A_hat, brute_force_gae(r, V, V_next, term, ended, 0.99, lam), atol=1e-10)


def test_worked_example_lambda_one_is_monte_carlo():
    r, V = np.array([[1.0], [2.0], [0.0]]), np.array([[1.5], [2.0], [0.5]])
    V_next, term = np.array([[2.0], [0.5], [99.0]]), np.array([[0.0], [0.0], [1.0]])
    A_hat = a2c.gae(r, V, V_next, term, term, gamma=0.9, gae_lambda=1.0)
    np.testing.assert_allclose(A_hat[:, 0], [1.3, 0.0, -0.5], atol=1e-12)
    # lambda = 0: the TD residual delta_t = r_t + gamma V(s_{t+1}) - V(s_t)
    np.testing.assert_allclose(a2c.gae(r, V, V_next, term, term, 0.9, 0.0)[:, 0], [1.3, 0.45, -0.5], atol=1e-12)


def test_the_advantage_is_a_constant_in_the_actors_loss():
    """A_hat computed from the critic must not carry the actor's gradient into the critic."""
    critic = torch.nn.Linear(2, 1)
    s = torch.randn(5, 2)
    A_hat = torch.ones(5) * 3.0 - critic(s).squeeze(-1)  # as if A_hat = G - V_phi(s) kept its graph
    logp = torch.randn(5, requires_grad=True)
    a2c.policy_loss(logp, A_hat).backward()
    assert critic.weight.grad is None and critic.bias.grad is None
    np.testing.assert_allclose(logp.grad.numpy(), -A_hat.detach().numpy() / 5, rtol=1e-6)


def test_optimizers():
    params = [torch.nn.Parameter(torch.zeros(3))]
    rms = a2c.make_optimizer(params, "rmsprop", 7e-4)
    assert isinstance(rms, torch.optim.RMSprop)
    assert rms.defaults["alpha"] == 0.99 and rms.defaults["eps"] == 1e-5 and rms.defaults["lr"] == 7e-4
    adam = a2c.make_optimizer(params, "adam", 1e-3)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["eps"] == 1e-5


# ---- runs ----


def test_cartpole_is_solved(tmp):
    run = train("a2c", tmp, "--seed", "7", "--total-timesteps", "60000")
    tags = scalars(run)
    assert best_mean_of_20(tags["charts/episodic_return"]) >= 475
    assert tags["eval/episodic_return"][-1][1] >= 475
    for tag in ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/explained_variance"]:
        assert tag in tags, tag


def test_inverted_pendulum_learns_to_balance(tmp):
    run = train("a2c", tmp, "--env", "InvertedPendulum-v5", "--seed", "1", "--total-timesteps", "60000")
    tags = scalars(run)
    assert best_mean_of_20(tags["charts/episodic_return"]) >= 900
    assert tags["eval/episodic_return"][-1][1] >= 900


@pytest.mark.parametrize("env", ["CartPole-v1", "InvertedPendulum-v5"])
def test_same_seed_same_returns(env, tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    logs = []
    for k in range(2):
        args = a2c.Args(env=env, run_dir=str(tmp / str(k)), progress=False, total_timesteps=3000, eval_episodes=0)
        assert a2c.main(args) == 0
        logs.append(scalars(next((tmp / str(k)).iterdir()))["charts/episodic_return"])
    assert len(logs[0]) > 5
    assert logs[0] == logs[1]


@pytest.mark.parametrize(
    "flags,word",
    [
        (dict(gamma=1.5), "--gamma"),
        (dict(gae_lambda=-0.1), "--gae-lambda"),
        (dict(total_timesteps=10), "--total-timesteps"),
        (dict(learning_rate=0.0), "--learning-rate"),
    ],
)
def test_bad_hyperparameters_are_refused_writing_nothing(flags, word, tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    with pytest.raises(plumbing.UsageError, match=word):
        a2c.main(a2c.Args(run_dir=str(tmp / "runs"), **flags))
    assert list(tmp.iterdir()) == []
