"""reinforce.py: returns and baselines by hand, the policy-gradient loss without autograd, unbiasedness and
variance of every baseline by Monte Carlo against an exact gradient, and runs (learning, determinism, bad input)."""

import numpy as np
import pytest
import torch
from conftest import scalars, train

import plumbing
from cleanrl_style import reinforce as rf

# ---- returns and baselines by hand ----


def test_worked_example_returns_and_value_baseline():
    # NOTATION.md: r = (1, 2, 0), gamma = 0.9, the episode ends after t = 3, V(s) = (1.5, 2.0, 0.5)
    G = rf.reward_to_go(np.array([1.0, 2.0, 0.0]), 0.9)
    np.testing.assert_allclose(G, [2.8, 2.0, 0.0], atol=1e-12)
    G_pad, mask = rf.pad([G])
    A_hat = rf.advantages(G_pad, mask, np.array([[1.5, 2.0, 0.5]]), "value")
    np.testing.assert_allclose(A_hat[0], [1.3, 0.0, -0.5], atol=1e-12)
    # R(tau) at every step: what --no-reward-to-go weighs each log pi by
    np.testing.assert_allclose(rf.whole_return(np.array([1.0, 2.0, 0.0]), 0.9), [2.8, 2.8, 2.8], atol=1e-12)


def test_a_truncated_episode_bootstraps_from_the_final_value():
    # G_T = V(s_T) = 10 after the cut: G_1 = 2 + 0.5 * 10, G_0 = 1 + 0.5 * G_1
    np.testing.assert_allclose(rf.reward_to_go(np.array([1.0, 2.0]), 0.5, bootstrap=10.0), [4.5, 7.0])
    np.testing.assert_allclose(rf.reward_to_go(np.array([1.0, 2.0]), 0.5), [2.0, 2.0])


def random_batch(seed=0, K=5):
    rng = np.random.default_rng(seed)
    episodes = [rf.reward_to_go(rng.normal(1.0, 1.0, size=rng.integers(1, 7)), 0.95) for _ in range(K)]
    G, mask = rf.pad(episodes)
    assert len({len(e) for e in episodes}) > 1  # episodes of different lengths
    return episodes, G, mask


def test_pad_and_mean_baseline():
    episodes, G, mask = random_batch()
    for i, e in enumerate(episodes):
        np.testing.assert_array_equal(G[i, : len(e)], e)
        assert (G[i, len(e) :] == 0).all() and mask[i].sum() == len(e)
    allG = np.concatenate(episodes)
    A_hat = rf.advantages(G, mask, None, "mean")
    for i, e in enumerate(episodes):
        np.testing.assert_allclose(A_hat[i, : len(e)], e - allG.mean())
        assert (A_hat[i, len(e) :] == 0).all()
    np.testing.assert_array_equal(rf.advantages(G, mask, None, "none"), G)


def test_rloo_and_group_against_direct_computation():
    episodes, G, mask = random_batch(seed=1, K=6)
    K = len(episodes)

    def G_at(j, t):  # the return of episode j from step t, zero after its end
        return episodes[j][t] if t < len(episodes[j]) else 0.0

    A_rloo = rf.advantages(G, mask, None, "rloo")
    A_group = rf.advantages(G, mask, None, "group")
    for i in range(K):
        for t in range(len(episodes[i])):
            others = [G_at(j, t) for j in range(K) if j != i]
            assert A_rloo[i, t] == pytest.approx(G_at(i, t) - sum(others) / (K - 1))
            column = np.array([G_at(j, t) for j in range(K)])
            assert A_group[i, t] == pytest.approx((G_at(i, t) - column.mean()) / (column.std(ddof=1) + 1e-8))
        assert (A_rloo[i, len(episodes[i]) :] == 0).all() and (A_group[i, len(episodes[i]) :] == 0).all()
    # with R(tau) at every step (--no-reward-to-go), rloo is the notes' b_i = mean of the other returns
    R = np.array([e[0] for e in episodes])
    G1, mask1 = rf.pad([np.full(len(e), e[0]) for e in episodes])
    A1 = rf.advantages(G1, mask1, None, "rloo")
    np.testing.assert_allclose(A1[:, 0], R - (R.sum() - R) / (K - 1))


# ---- the policy-gradient loss and the variance estimate ----


def test_pg_loss_gradient_matches_the_score_function_by_hand():
    """A tabular Categorical policy, logits theta[s]: grad_theta[s] log pi(a|s) = onehot(a) - pi(.|s), so
    grad of -(1/K) sum log pi(a_t|s_t) A_t = -(1/K) sum_t (onehot(a_t) - pi(.|s_t)) A_t at the row s_t."""
    rng = np.random.default_rng(0)
    S, A, n, K = 3, 4, 12, 3
    theta_np = rng.normal(size=(S, A))
    s, a, A_hat = rng.integers(0, S, n), rng.integers(0, A, n), rng.normal(size=n)
    theta = torch.tensor(theta_np, requires_grad=True)
    logp = plumbing.categorical_log_prob(theta[torch.as_tensor(s)], torch.as_tensor(a))
    rf.pg_loss(logp, torch.as_tensor(A_hat), K).backward()
    pi = np.exp(theta_np) / np.exp(theta_np).sum(1, keepdims=True)
    expected = np.zeros((S, A))
    for t in range(n):
        expected[s[t]] -= (np.eye(A)[a[t]] - pi[s[t]]) * A_hat[t] / K
    np.testing.assert_allclose(theta.grad.numpy(), expected, atol=1e-12)


def test_pg_loss_treats_the_advantage_as_a_constant():
    logp = torch.tensor([-0.5, -1.0], requires_grad=True)
    A_hat = torch.tensor([2.0, -1.0], requires_grad=True)
    rf.pg_loss(logp, A_hat, 2).backward()
    assert A_hat.grad is None
    np.testing.assert_allclose(logp.grad.numpy(), [-1.0, 0.5])


def test_pg_variance_is_the_trace_of_the_covariance_over_K():
    g = torch.tensor(np.random.default_rng(2).normal(size=(6, 4)))
    assert rf.pg_variance(g) == pytest.approx(np.trace(np.cov(g.numpy().T)) / 6)


# ---- unbiasedness and variance on a two-step MDP with an exact gradient ----
#
# s0 --a0=0 (r = 5)--> s1 --a (r = R2[0, a])--> end
# s0 --a0=1 (r = 6)--> s2 --a (r = R2[1, a])--> end
# s0 --a0=2 (r = 4)--> end (one step: episodes of two lengths)
# Tabular softmax policy theta (3 states x 3 actions); the large rewards make the no-baseline estimate noisy.
R1 = np.array([5.0, 6.0, 4.0])
R2 = np.array([[1.0, 3.0, 0.0], [2.0, 0.5, 1.5]])
GAMMA = 1.0  # the estimator drops the gamma^t of the discounted gradient, as the notes do: exact at gamma = 1
THETA = np.array([[0.2, -0.3, 0.1], [0.5, 0.0, -0.5], [-0.2, 0.3, 0.0]])


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def exact_gradient():
    theta = torch.tensor(THETA, requires_grad=True)
    pi = theta.softmax(-1)
    second = (pi[1:] * torch.tensor(R2)).sum(-1)  # V(s1), V(s2)
    J = (pi[0] * (torch.tensor(R1) + GAMMA * torch.cat([second, torch.zeros(1, dtype=second.dtype)]))).sum()
    J.backward()
    return theta.grad.numpy(), second.detach().numpy(), J.item()


def sample_batches(rng, M, K):
    """M batches of K episodes: per-step states, actions, rewards, with mask; shapes (M, K, 2)."""
    pi = softmax(THETA)
    a0 = (rng.random((M, K, 1)) > pi[0].cumsum()).sum(-1)
    s1 = a0 + 1  # s1 or s2; a0 = 2 ends the episode
    a1 = np.zeros((M, K), np.int64)
    for s in (1, 2):
        at_s = s1 == s
        a1[at_s] = (rng.random((at_s.sum(), 1)) > pi[s].cumsum()).sum(-1)
    states = np.stack([np.zeros_like(a0), np.minimum(s1, 2)], -1)
    actions = np.stack([a0, a1], -1)
    mask = np.stack([np.ones_like(a0, bool), a0 < 2], -1)
    r = np.stack([R1[a0], np.where(a0 < 2, R2[np.minimum(a0, 1), a1], 0.0)], -1)
    return states, actions, r, mask


def batch_gradients(baseline, M=20_000, K=4, seed=0):
    """(M, d) gradient estimates (1/K) sum_i g_i, and the (M,) pg_variance estimates of the script."""
    rng = np.random.default_rng(seed)
    _, V_exact, _ = exact_gradient()
    pi = softmax(THETA)
    states, actions, r, mask = sample_batches(rng, M, K)
    # the exact V^pi of s0, s1, s2 (any b(s) leaves the gradient unbiased; this one also lowers its variance most)
    V_table = np.array([(pi[0] * (R1 + GAMMA * np.array([V_exact[0], V_exact[1], 0.0]))).sum(), *V_exact])
    G = np.stack([r[..., 0] + GAMMA * r[..., 1], r[..., 1]], -1)  # (M, K, 2), zero past the end
    assert all(np.allclose(rf.reward_to_go(r[0, i, : mask[0, i].sum()], GAMMA), G[0, i, : mask[0, i].sum()])
               for i in range(K))  # fmt: skip
    A_hat = np.stack([rf.advantages(G[m], mask[m], V_table[states[m]], baseline) for m in range(M)])
    score = np.eye(3)[actions] - pi[states]  # (M, K, 2, 3): grad log pi(a_t|s_t) w.r.t. the logits of row s_t
    g = np.zeros((M, K, 3, 3))
    m_idx, i_idx = np.meshgrid(np.arange(M), np.arange(K), indexing="ij")
    for t in range(2):
        np.add.at(g, (m_idx, i_idx, states[..., t]), score[:, :, t] * (A_hat[..., t] * mask[..., t])[..., None])
    g = g.reshape(M, K, -1)  # the per-episode gradients g_i of each batch
    variances = np.array([rf.pg_variance(torch.tensor(g[m])) for m in range(0, M, 4)])
    return g.mean(1), variances


@pytest.fixture(scope="module")
def mc():
    return {b: batch_gradients(b) for b in rf.BASELINES}


@pytest.mark.parametrize("baseline", ["none", "value", "rloo"])
def test_unbiased_baselines_match_the_exact_gradient(mc, baseline):
    exact = exact_gradient()[0].ravel()
    est = mc[baseline][0]
    stderr = est.std(0) / np.sqrt(len(est))
    assert np.all(np.abs(est.mean(0) - exact) < 4 * stderr + 1e-9), (est.mean(0), exact, stderr)


def test_the_mean_baseline_shrinks_the_gradient_by_K_minus_1_over_K_in_a_bandit():
    # one step: b = (1/K) sum_j R_j holds the episode's own return with weight 1/K
    rng = np.random.default_rng(1)
    pi, R, K, M = softmax(THETA[0]), np.array([5.0, 6.0, 4.0]), 4, 100_000
    a = (rng.random((M, K, 1)) > pi.cumsum()).sum(-1)
    G = R[a]
    mask = np.ones((K, 1), bool)
    A_mean = np.stack([rf.advantages(G[m][:, None], mask, None, "mean")[:, 0] for m in range(M)])
    est = ((np.eye(3)[a] - pi) * A_mean[..., None]).mean(1)  # (M, 3)
    exact = pi * (R - pi @ R)  # grad of sum_a pi(a) R(a) w.r.t. the logits
    stderr = est.std(0) / np.sqrt(M)
    assert np.all(np.abs(est.mean(0) - (K - 1) / K * exact) < 4 * stderr), (est.mean(0), exact)
    assert not np.all(np.abs(est.mean(0) - exact) < 4 * stderr)  # the shrinkage is measurable


def test_the_group_baseline_still_ascends(mc):
    exact = exact_gradient()[0].ravel()
    est = mc["group"][0].mean(0)
    assert est @ exact > 0.5 * np.linalg.norm(est) * np.linalg.norm(exact)


def test_baselines_lower_the_variance(mc):
    variance = {b: np.trace(np.cov(mc[b][0].T)) for b in rf.BASELINES}
    assert variance["value"] < 0.2 * variance["none"], variance
    assert variance["mean"] < 0.5 * variance["none"], variance
    assert variance["rloo"] < 0.5 * variance["none"], variance


def test_pg_variance_estimates_the_variance_of_the_estimator(mc):
    """For independent episodes (no shared baseline) E[tr Cov(g_i) / K] is the estimator's variance."""
    for b in ["none", "value"]:
        est, logged = mc[b]  # pg_variance of every fourth batch
        assert logged.mean() == pytest.approx(np.trace(np.cov(est.T)), rel=0.05), b


# ---- runs ----


def first_update(tmp, monkeypatch, **flags) -> dict:
    """The scalars of one update (one batch of K episodes) of an in-process run."""
    monkeypatch.chdir(tmp)
    runs = tmp / "runs" / str(len(list(tmp.glob("runs/*"))))
    args = rf.Args(run_dir=str(runs), progress=False, total_timesteps=1, eval_episodes=0, save_model=False, **flags)
    assert rf.main(args) == 0
    (run,) = runs.iterdir()
    return scalars(run)


def test_a_baseline_lowers_the_logged_variance_of_the_same_batch(tmp, monkeypatch):
    """Same seed: the same first K episodes, scored with each baseline (and with R(tau) instead of G_t)."""
    var = {b: first_update(tmp, monkeypatch, baseline=b)["losses/pg_variance"][0][1] for b in ["none", "mean", "rloo"]}
    assert var["mean"] < 0.8 * var["none"] and var["rloo"] < 0.8 * var["none"], var
    whole = first_update(tmp, monkeypatch, baseline="none", reward_to_go=False)["losses/pg_variance"][0][1]
    assert whole > var["none"], (whole, var)


@pytest.mark.parametrize("baseline", ["value", "none"])
def test_a_time_limit_bootstraps_from_the_final_value_only_with_the_value_baseline(baseline, tmp, monkeypatch):
    """CartPole cut after 5 steps (it cannot fall that soon): every episode is a truncation."""
    calls = []

    def make_env(env_id, idx, capture_video, video_folder):
        return lambda: rf.gym.wrappers.FlattenObservation(rf.gym.make(env_id, max_episode_steps=5))

    original = rf.reward_to_go

    def recording_reward_to_go(r, gamma, bootstrap=0.0):
        calls.append((len(r), bootstrap))
        return original(r, gamma, bootstrap)

    monkeypatch.setattr(plumbing, "make_env", make_env)
    monkeypatch.setattr(rf, "reward_to_go", recording_reward_to_go)
    first_update(tmp, monkeypatch, baseline=baseline)
    assert len(calls) == 8 and all(n == 5 for n, _ in calls), calls
    if baseline == "value":
        assert all(b != 0.0 for _, b in calls), calls  # V_phi(s_T) of the true final observation
    else:
        assert all(b == 0.0 for _, b in calls), calls


def test_same_seed_same_returns(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    logs = []
    for k in range(2):
        args = rf.Args(run_dir=str(tmp / str(k)), progress=False, total_timesteps=3000, eval_episodes=0)
        assert rf.main(args) == 0
        logs.append(scalars(next((tmp / str(k)).iterdir()))["charts/episodic_return"])
    assert len(logs[0]) > 5
    assert logs[0] == logs[1]


def test_cartpole_is_solved(tmp):
    run = train("reinforce", tmp, "--seed", "1", "--total-timesteps", "40000")
    tags = scalars(run)
    r = np.array([v for _, v in tags["charts/episodic_return"]])
    assert max(r[i - 20 : i].mean() for i in range(20, len(r) + 1)) >= 475
    assert tags["eval/episodic_return"][-1][1] >= 475
    for tag in ["losses/pg_variance", "losses/grad_norm", "losses/value_loss", "losses/explained_variance"]:
        assert tag in tags, tag


@pytest.mark.parametrize(
    "flags,word",
    [
        (dict(episodes_per_update=1, num_envs=1), "--episodes-per-update"),
        (dict(num_envs=3), "--num-envs"),
        (dict(gamma=1.5), "--gamma"),
        (dict(vf_steps=0), "--vf-steps"),
    ],
)
def test_bad_hyperparameters_are_refused_writing_nothing(flags, word, tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    with pytest.raises(plumbing.UsageError, match=word):
        rf.main(rf.Args(run_dir=str(tmp / "runs"), **flags))
    assert list(tmp.iterdir()) == []
