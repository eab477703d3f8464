"""Math shared by several scripts, checked by hand on tiny in-process runs (a few dozen steps on a counting env whose
observations are known in advance): observation normalisation (the formula, the statistics' count and what they
include, frozen during evaluation), the critic's target G = A_hat + V_old, advantage normalisation, the time-limit
bootstrap from the true final observation, and Expected SARSA's target under epsilon-greedy."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import plumbing
from cleanrl_style import a2c, ppo, reinforce, sarsa, trpo

GAMMA = 0.9


class Counter(gym.Env):
    """Observation [t], the step count within the episode; reward 1; never terminates (a time limit cuts it)."""

    observation_space = gym.spaces.Box(-100.0, 100.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, a):
        self.t += 1
        return np.array([float(self.t)], np.float32), 1.0, False, False, {}


class Cycle(gym.Env):
    """A tabular env: state t mod 3 after t steps of the episode; reward 1; never terminates."""

    observation_space = gym.spaces.Discrete(3)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return 0, {}

    def step(self, a):
        self.t += 1
        return self.t % 3, 1.0, False, False, {}


# Episodes of 5 steps cut by the time limit: observations 0, 1, 2, 3, 4 seen by the policy, the true final one [5]
# only in infos["final_obs"] (the vector env has already reset to [0]).
gym.register("MathCounter-v0", entry_point=Counter, max_episode_steps=5)
gym.register("MathCycle-v0", entry_point=Cycle, max_episode_steps=5)


def common(tmp, **kw) -> dict:
    return dict(env="MathCounter-v0", run_dir=str(tmp / "runs"), progress=False, eval_episodes=0, **kw)


def the_checkpoint(tmp):
    (path,) = (tmp / "runs").glob("*/*.pt")
    return torch.load(path, weights_only=False)


def stats_of(observations) -> tuple[float, float, float]:
    """mean, var and count of RunningMeanStd after seeing `observations`, from its prior (mean 0, var 1, count
    1e-4), by the combination formula written out."""
    x = np.asarray(observations, np.float64)
    c, n = 1e-4, len(x)
    m, v = x.mean(), x.var()
    mean = n * m / (n + c)
    var = (1.0 * c + v * n + m**2 * c * n / (n + c)) / (n + c)
    return mean, var, n + c


# ---- normalize_obs ----


def test_normalize_obs_by_hand():
    rms = plumbing.RunningMeanStd(3)
    rms.mean, rms.var = np.array([1.0, -2.0, 0.5]), np.array([4.0, 0.25, 0.0])
    s = np.array([[3.0, -2.0, 0.5001], [1000.0, -1000.0, 0.5], [1.0, -1.5, 0.4999]])
    expected = np.array(
        [
            [2.0 / math.sqrt(4.0 + 1e-8), 0.0, 1e-4 / math.sqrt(1e-8)],  # var 0: divided by sqrt(1e-8), = 1
            [10.0, -10.0, 0.0],  # clipped to [-10, 10]
            [0.0, 0.5 / math.sqrt(0.25 + 1e-8), -1e-4 / math.sqrt(1e-8)],
        ]
    )
    out = plumbing.normalize_obs(s, rms)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(plumbing.normalize_obs(s, None), s.astype(np.float32))


def test_evaluation_normalises_with_the_checkpoints_frozen_statistics():
    """evaluate_actor_critic feeds the actor clip((s - mu) / sqrt(var + 1e-8)) with the checkpoint's mu and var at
    every step of every episode: observations 0..4, mu = 2, var = 0.25 -> -4, -2, 0, 2, 4, twice."""
    seen = []

    class RecordingAgent(ppo.Agent):
        def head(self, s):
            seen.append(float(s.reshape(-1)[0]))
            return super().head(s)

    agent = ppo.Agent(1, 2, True)
    obs_rms = {"mean": torch.tensor([2.0], dtype=torch.float64), "var": torch.tensor([0.25], dtype=torch.float64),
               "count": 50.0}  # fmt: skip
    ckpt = {"env_id": "MathCounter-v0", "args": {"hidden_size": 64}, "model": agent.state_dict(), "obs_rms": obs_rms}
    returns = plumbing.evaluate_actor_critic(RecordingAgent, ckpt, 2, seed=0)
    assert returns.tolist() == [5.0, 5.0]
    np.testing.assert_allclose(seen, [-4.0, -2.0, 0.0, 2.0, 4.0] * 2, atol=1e-5)
    assert obs_rms["mean"].item() == 2.0 and obs_rms["var"].item() == 0.25 and obs_rms["count"] == 50.0


# ---- the observation statistics of a training run: every observation the policy is given, once ----

ROLLOUT = dict(num_envs=2, num_steps=12, total_timesteps=24, norm_obs=True, norm_reward=False, save_model=True)
# per env: the reset observation, then the 12 steps' next observations, the reset one [0] where an episode ended
# (the true final observation [5] is not one the policy acts on)
SEEN_IN_A_ROLLOUT = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2] * 2


@pytest.mark.parametrize(
    "module,flags",
    [
        (ppo, dict(minibatch_size=8, update_epochs=1)),
        (a2c, {}),
        (trpo, dict(critic_minibatch_size=8, critic_epochs=1)),
    ],
    ids=["ppo", "a2c", "trpo"],
)
def test_observation_statistics_count_every_observation_seen_with_resets(module, flags, tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    assert module.main(module.Args(**common(tmp, **ROLLOUT, **flags))) == 0
    rms = the_checkpoint(tmp)["obs_rms"]
    mean, var, count = stats_of(SEEN_IN_A_ROLLOUT)
    assert rms["count"] == pytest.approx(count, rel=1e-12)  # 1e-4 + N (1 + T)
    assert rms["mean"].item() == pytest.approx(mean, rel=1e-9) and rms["var"].item() == pytest.approx(var, rel=1e-9)


def test_reinforce_observation_statistics_count_every_observation_seen_with_resets(tmp, monkeypatch):
    """reinforce: K = 2 episodes of 5 steps from one env: the first reset observation, then each step's next one,
    the reset observation [0] at an episode's end (as the vector-env scripts), not the final one [5]."""
    monkeypatch.chdir(tmp)
    flags = dict(num_envs=1, episodes_per_update=2, total_timesteps=10, norm_obs=True, norm_reward=False)
    assert reinforce.main(reinforce.Args(**common(tmp, **flags))) == 0
    rms = the_checkpoint(tmp)["obs_rms"]
    got = (rms["mean"].item(), rms["var"].item(), rms["count"])
    assert got == pytest.approx(stats_of([0] + [1, 2, 3, 4, 0] * 2), rel=1e-9)
    assert got != pytest.approx(stats_of([0] + [1, 2, 3, 4, 5] * 2), rel=1e-6)  # final observations left out


# ---- the critic's target, advantage normalisation and the time-limit bootstrap (a2c, trpo) ----


def record_actor_critic(module, monkeypatch) -> dict:
    """Make module.main record each call of gae (its inputs, its A_hat, and V of [5] and [0] from the critic as it
    is then), the G of each value_loss call and the A_hat the policy's loss receives."""
    rec = {"gae": [], "G": [], "A": [], "agents": []}

    class RecordingAgent(module.Agent):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            rec["agents"].append(self)

    def V_of(x: float) -> float:
        with torch.no_grad():
            return rec["agents"][-1].value(torch.tensor([[x]], dtype=torch.float32)).item()

    real_gae, real_value_loss = module.gae, module.value_loss

    def gae(r, V, V_next, terminated, ended, gamma, gae_lambda):
        A_hat = real_gae(r, V, V_next, terminated, ended, gamma, gae_lambda)
        rec["gae"].append(dict(r=r.copy(), V=V.copy(), V_next=V_next.copy(), terminated=terminated.copy(),
                               ended=ended.copy(), A=A_hat.copy(), V5=V_of(5.0), V0=V_of(0.0)))  # fmt: skip
        return A_hat

    def value_loss(V, G, *more):
        rec["G"].append(G.detach().cpu().numpy().copy())
        return real_value_loss(V, G, *more)

    monkeypatch.setattr(module, "Agent", RecordingAgent)
    monkeypatch.setattr(module, "gae", gae)
    monkeypatch.setattr(module, "value_loss", value_loss)
    if module is a2c:
        real_policy_loss = a2c.policy_loss

        def policy_loss(logp, A_hat):
            rec["A"].append(A_hat.detach().cpu().numpy().copy())
            return real_policy_loss(logp, A_hat)

        monkeypatch.setattr(a2c, "policy_loss", policy_loss)
    else:
        real_make_policy_fn = trpo.make_policy_fn

        def make_policy_fn(agent, obs, actions, logp_old, A_hat, head_old):
            rec["A"].append(A_hat.detach().cpu().numpy().copy())
            return real_make_policy_fn(agent, obs, actions, logp_old, A_hat, head_old)

        monkeypatch.setattr(trpo, "make_policy_fn", make_policy_fn)
    return rec


def normalised(A: np.ndarray) -> np.ndarray:
    """(A - mean) / (std + 1e-8), std the unbiased one (torch's)."""
    return (A - A.mean()) / (A.std(ddof=1) + 1e-8)


@pytest.mark.parametrize("module", [a2c, trpo], ids=["a2c", "trpo"])
def test_critic_target_advantage_normalisation_and_time_limit_bootstrap(module, tmp, monkeypatch):
    """One rollout of 12 steps, episodes cut by the time limit at t = 4 and t = 9:
    A_hat_t = 1 + gamma V(final observation [5]) - V(s_t) there (the sum stops, the bootstrap is V of [5], not of
    the reset observation [0]); the critic regresses on G = A_hat + V_old; the actor gets (A_hat - mean) / std."""
    rec = record_actor_critic(module, monkeypatch)
    monkeypatch.chdir(tmp)
    flags = dict(num_envs=1, num_steps=12, total_timesteps=12, gamma=GAMMA, gae_lambda=0.5, norm_obs=False,
                 norm_reward=False, norm_adv=True, save_model=False)  # fmt: skip
    if module is trpo:
        flags |= dict(critic_minibatch_size=4, critic_epochs=2)
    assert module.main(module.Args(**common(tmp, **flags))) == 0
    (g,) = rec["gae"]
    V, A, V5, V0 = g["V"][:, 0], g["A"][:, 0], g["V5"], g["V0"]
    np.testing.assert_array_equal(g["ended"][:, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0])
    assert (g["terminated"] == 0).all() and abs(V5 - V0) > 1e-4  # so that the test tells them apart
    for t in (4, 9):  # the time-limit bootstrap: gamma V of the true final observation
        assert A[t] == pytest.approx(1.0 + GAMMA * V5 - V[t], abs=1e-5)
    G = (g["A"] + g["V"]).reshape(-1)
    if module is a2c:  # one step on the whole batch, in order
        (G_seen,) = rec["G"]
        np.testing.assert_allclose(G_seen, G, rtol=1e-6, atol=1e-6)
    else:  # 2 epochs of 3 shuffled mini-batches: each epoch sees the batch once
        assert len(rec["G"]) == 6
        for epoch in range(2):
            G_seen = np.concatenate(rec["G"][3 * epoch : 3 * epoch + 3])
            np.testing.assert_allclose(np.sort(G_seen), np.sort(G), rtol=1e-6, atol=1e-6)
    (A_seen,) = rec["A"]
    assert abs(A_seen.mean()) < 1e-6 and A_seen.std(ddof=1) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(A_seen, normalised(g["A"].reshape(-1)), rtol=1e-5, atol=1e-6)


def test_reinforce_time_limit_bootstraps_from_the_final_observations_value(tmp, monkeypatch):
    """--baseline value: an episode cut by the time limit ends in G_T = V_phi(s_T) of the true final observation
    [5] (the critic of the rollout), not of the reset observation [0] or of the last one acted on [4]."""
    calls, agents = [], []

    class RecordingAgent(reinforce.Agent):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            agents.append(self)

    real = reinforce.reward_to_go

    def reward_to_go(r, gamma, bootstrap=0.0):
        with torch.no_grad():
            V = [agents[-1].value(torch.tensor([[x]])).item() for x in (5.0, 4.0, 0.0)]
        calls.append((len(r), bootstrap, V))
        return real(r, gamma, bootstrap)

    monkeypatch.setattr(reinforce, "Agent", RecordingAgent)
    monkeypatch.setattr(reinforce, "reward_to_go", reward_to_go)
    monkeypatch.chdir(tmp)
    flags = dict(num_envs=1, episodes_per_update=2, total_timesteps=10, norm_obs=False, norm_reward=False,
                 baseline="value", save_model=False)  # fmt: skip
    assert reinforce.main(reinforce.Args(**common(tmp, **flags))) == 0
    assert len(calls) == 2
    for n, bootstrap, (V5, V4, V0) in calls:
        assert n == 5 and abs(V5 - V4) > 1e-5 and abs(V5 - V0) > 1e-5
        assert bootstrap == pytest.approx(V5, abs=1e-6)


# ---- Expected SARSA ----


def test_expected_sarsa_target_uses_epsilons_expectation_and_bootstraps_a_truncation(tmp, monkeypatch):
    """--expected: every update's target is r + gamma sum_a' pi_eps(a'|s') Q(s', a') with the epsilon of the
    schedule at that step (not the greedy max, not epsilon 0), and at the time limit (every 5th step) s' is the
    true final state 5 mod 3 = 2, bootstrapped from, not the reset state 0 and not cut as a termination."""
    targets, updates = [], []
    real_target, real_update = sarsa.expected_sarsa_target, sarsa.td_update

    def expected_sarsa_target(r, Q_next, epsilon, terminated, gamma):
        out = real_target(r, Q_next, epsilon, terminated, gamma)
        targets.append((r, Q_next.copy(), epsilon, terminated, out))
        return out

    def td_update(Q, s, a, target, alpha):
        updates.append((Q.copy(), target))
        return real_update(Q, s, a, target, alpha)

    monkeypatch.setattr(sarsa, "expected_sarsa_target", expected_sarsa_target)
    monkeypatch.setattr(sarsa, "td_update", td_update)
    monkeypatch.chdir(tmp)
    total, eps0, eps1 = 200, 0.6, 0.2
    flags = dict(env="MathCycle-v0", total_timesteps=total, expected=True, epsilon_start=eps0, epsilon_end=eps1,
                 epsilon_decay_fraction=1.0, alpha=0.5, alpha_end=0.5, gamma=GAMMA, save_model=False)  # fmt: skip
    assert sarsa.main(sarsa.Args(**{**common(tmp), **flags})) == 0
    assert len(targets) == len(updates) == total
    told_apart = 0
    for i, ((r, Q_next, epsilon, terminated, out), (Q, target)) in enumerate(zip(targets, updates)):
        assert epsilon == pytest.approx(eps0 + (eps1 - eps0) * i / total, abs=1e-12)  # the step's epsilon
        greedy = Q_next == Q_next.max()
        pi = epsilon / 2 + (1 - epsilon) * greedy / greedy.sum()
        assert r == 1.0 and not terminated and out == pytest.approx(1.0 + GAMMA * pi @ Q_next, abs=1e-12)
        assert target == out
        t = i % 5 + 1  # steps into the episode after this one
        np.testing.assert_array_equal(Q_next, Q[t % 3])  # at t = 5: the final state 2, not the reset state 0
        if t == 5 and abs(pi @ Q[2] - pi @ Q[0]) > 1e-3:
            told_apart += 1
    assert told_apart >= 10
