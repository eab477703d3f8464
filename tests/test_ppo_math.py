"""PPO's math against the notes' worked example, brute force and torch.distributions."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

import plumbing
from cleanrl_style import ppo


def test_worked_example_returns_and_advantages():
    # NOTATION.md: r = (1, 2, 0), gamma = 0.9, the episode ends after t = 3, V = (1.5, 2.0, 0.5).
    r = np.array([[1.0], [2.0], [0.0]])
    V = np.array([[1.5], [2.0], [0.5]])
    V_next = np.array([[2.0], [0.5], [99.0]])  # V(s_{t+1}); the last is past the end and must not count
    terminated = np.array([[0.0], [0.0], [1.0]])
    A_hat = ppo.gae(r, V, V_next, terminated, terminated, gamma=0.9, gae_lambda=1.0)
    G = A_hat + V
    np.testing.assert_allclose(G[:, 0], [2.8, 2.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(A_hat[:, 0], [1.3, 0.0, -0.5], atol=1e-12)


def test_worked_example_ratio_and_clip():
    pi_old = torch.tensor([0.2, 0.5, 0.3])
    pi_theta = torch.tensor([0.25, 0.55, 0.2])
    a = torch.zeros(3, dtype=torch.long)  # the action taken is action 0 of a two-action policy

    def logits(p):
        return torch.stack([p.log(), (1 - p).log()], -1)

    log_rho = plumbing.categorical_log_prob(logits(pi_theta), a) - plumbing.categorical_log_prob(logits(pi_old), a)
    rho = log_rho.exp()
    np.testing.assert_allclose(rho, [1.25, 1.1, 2 / 3], atol=1e-6)
    np.testing.assert_allclose(torch.clamp(rho, 0.8, 1.2), [1.2, 1.1, 0.8], atol=1e-6)
    terms = ppo.clip_objective(rho, torch.tensor([1.3, 0.0, -0.5]), clip_eps=0.2)
    np.testing.assert_allclose(terms, [1.56, 0.0, -0.4], atol=1e-6)


def random_rollout(rng, T=40, N=3):
    r = rng.normal(size=(T, N))
    V = rng.normal(size=(T, N))
    V_next = rng.normal(size=(T, N))
    terminated = (rng.random((T, N)) < 0.1).astype(float)
    truncated = ((rng.random((T, N)) < 0.1) & (terminated == 0)).astype(float)
    ended = np.maximum(terminated, truncated)
    # as in a real rollout: inside an episode the next observation's value is the next step's V
    V_next[:-1] = np.where(ended[:-1] == 1, V_next[:-1], V[1:])
    return r, V, V_next, terminated, ended


def brute_force_gae(r, V, V_next, terminated, ended, gamma, lam):
    """A_hat_t = sum_l (gamma lambda)^l delta_{t+l}, the sum stopping at the first episode end."""
    T, N = r.shape
    delta = r + gamma * (1 - terminated) * V_next - V
    A = np.zeros((T, N))
    for i in range(N):
        for t in range(T):
            for l in range(T - t):
                A[t, i] += (gamma * lam) ** l * delta[t + l, i]
                if ended[t + l, i]:
                    break
    return A


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    r, V, V_next, term, ended = random_rollout(rng)
    assert term.sum() > 0 and (ended - term).sum() > 0  # both kinds of episode end occur
    for lam in [0.0, 0.5, 0.95, 1.0]:
        np.testing.assert_allclose(
            ppo.gae(r, V, V_next, term, ended, 0.97, lam),
            brute_force_gae(r, V, V_next, term, ended, 0.97, lam),
            atol=1e-10,
        )


def test_gae_lambda_limits():
    rng = np.random.default_rng(7)
    r, V, V_next, term, ended = random_rollout(rng)
    gamma = 0.9
    delta = r + gamma * (1 - term) * V_next - V
    np.testing.assert_allclose(ppo.gae(r, V, V_next, term, ended, gamma, 0.0), delta, atol=1e-12)
    # lambda = 1: the discounted return to the episode end minus V(s_t), computed forward; at a truncation
    # (or at the end of the rollout) it bootstraps from V of the next observation, at a termination not.
    T, N = r.shape
    G = np.zeros((T, N))
    for i in range(N):
        for t in range(T):
            k, discount = t, 1.0
            while True:
                G[t, i] += discount * r[k, i]
                discount *= gamma
                if term[k, i]:
                    break
                if ended[k, i] or k == T - 1:
                    G[t, i] += discount * V_next[k, i]
                    break
                k += 1
    np.testing.assert_allclose(ppo.gae(r, V, V_next, term, ended, gamma, 1.0), G - V, atol=1e-10)


def test_truncation_bootstraps_termination_does_not():
    r, V = np.array([[1.0]]), np.array([[0.0]])
    V_next = np.array([[10.0]])
    truncated = ppo.gae(r, V, V_next, np.array([[0.0]]), np.array([[1.0]]), 0.5, 0.9)
    terminated = ppo.gae(r, V, V_next, np.array([[1.0]]), np.array([[1.0]]), 0.5, 0.9)
    assert truncated[0, 0] == pytest.approx(1.0 + 0.5 * 10.0)
    assert terminated[0, 0] == pytest.approx(1.0)


def two_categoricals():
    logits_q = torch.tensor([1.0, 0.2, -0.5, 0.3])
    logits_p = torch.tensor([0.4, 0.6, -0.1, -0.4])
    return logits_q, logits_p


def test_exact_kl_matches_torch_distributions():
    logits_q, logits_p = two_categoricals()
    expected = kl_divergence(Categorical(logits=logits_q), Categorical(logits=logits_p))
    assert plumbing.categorical_kl(logits_q, logits_p).item() == pytest.approx(expected.item(), rel=1e-6)
    mu_q, ls_q = torch.tensor([0.1, -0.3, 1.0]), torch.tensor([0.0, -0.5, 0.2])
    mu_p, ls_p = torch.tensor([0.4, 0.1, 0.8]), torch.tensor([-0.2, -0.1, 0.3])
    expected = kl_divergence(Normal(mu_q, ls_q.exp()), Normal(mu_p, ls_p.exp())).sum()
    assert plumbing.gaussian_kl(mu_q, ls_q, mu_p, ls_p).item() == pytest.approx(expected.item(), rel=1e-6)
    # log-prob and entropy against torch.distributions too
    a = torch.tensor([0.3, 0.2, -1.0])
    assert plumbing.gaussian_log_prob(mu_p, ls_p, a).item() == pytest.approx(
        Normal(mu_p, ls_p.exp()).log_prob(a).sum().item(), rel=1e-6
    )
    assert plumbing.gaussian_entropy(ls_p).item() == pytest.approx(Normal(mu_p, ls_p.exp()).entropy().sum().item())
    assert plumbing.categorical_entropy(logits_p).item() == pytest.approx(Categorical(logits=logits_p).entropy().item())


@pytest.mark.parametrize("family", ["categorical", "gaussian"])
def test_kl_estimators_by_monte_carlo(family):
    """Samples x ~ q = pi_old, log r = log pi_theta(x) - log pi_old(x): k1 and k3 are unbiased, k3 >= 0."""
    g = torch.Generator().manual_seed(0)
    n = 400_000
    if family == "categorical":
        logits_q, logits_p = two_categoricals()
        x = torch.multinomial(logits_q.softmax(-1), n, replacement=True, generator=g)
        log_r = plumbing.categorical_log_prob(logits_p.expand(n, -1), x) - plumbing.categorical_log_prob(
            logits_q.expand(n, -1), x
        )
        exact = plumbing.categorical_kl(logits_q, logits_p).item()
    else:
        mu_q, ls_q = torch.tensor([0.0, 0.5]), torch.tensor([0.0, -0.3])
        mu_p, ls_p = torch.tensor([0.15, 0.4]), torch.tensor([-0.1, -0.2])
        x = mu_q + ls_q.exp() * torch.randn(n, 2, generator=g)
        log_r = plumbing.gaussian_log_prob(mu_p, ls_p, x) - plumbing.gaussian_log_prob(mu_q, ls_q, x)
        exact = plumbing.gaussian_kl(mu_q, ls_q, mu_p, ls_p).item()
    log_r = log_r.double()
    for estimator in [ppo.kl_k1, ppo.kl_k3]:
        samples = estimator(log_r)
        stderr = samples.std().item() / math.sqrt(n)
        assert abs(samples.mean().item() - exact) < 4 * stderr, (estimator.__name__, samples.mean(), exact)
    k1, k2, k3 = ppo.kl_k1(log_r), ppo.kl_k2(log_r), ppo.kl_k3(log_r)
    assert (k3 >= 0).all() and (k2 >= 0).all()
    assert k3.std() < k1.std()  # the low-variance one, for close distributions as in a PPO update
    # k2 is biased, but only at third order in log r: close to the KL for close distributions
    assert k2.mean().item() == pytest.approx(exact, rel=0.25)


def test_beta_rule():
    assert ppo.adapt_beta(1.0, 0.001, kl_target=0.01) == 0.5
    assert ppo.adapt_beta(1.0, 0.02, kl_target=0.01) == 2.0
    assert ppo.adapt_beta(1.0, 0.01, kl_target=0.01) == 1.0
    assert ppo.adapt_beta(1.0, 0.01 / 1.5 + 1e-9, kl_target=0.01) == 1.0
    assert ppo.adapt_beta(1.0, 0.015 - 1e-9, kl_target=0.01) == 1.0
    assert ppo.adapt_beta(4.0, 0.0151, kl_target=0.01) == 8.0


def test_value_loss_plain_and_clipped():
    V, G, V_old = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.8, 1.0])
    assert ppo.value_loss(V, G, V_old, None).item() == pytest.approx(0.5 * (1 + 9) / 2)
    # V_clip = (1.0, 1.2): max((1)^2, (0.8)^2) = 1 and max(9, 1.44) = 9; a value that moved too far and
    # is worse clipped: V_old = 2.9 -> V_clip = 3.0 unchanged;
    assert ppo.value_loss(V, G, V_old, 0.2).item() == pytest.approx(0.5 * (1 + 9) / 2)
    V, G, V_old = torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([0.0])
    # V_clip = 0.2: max((2-3)^2, (0.2-3)^2) = 7.84: the clipped, pessimistic term wins
    assert ppo.value_loss(V, G, V_old, 0.2).item() == pytest.approx(0.5 * 7.84)


def test_running_mean_std_matches_numpy():
    rng = np.random.default_rng(3)
    batches = [rng.normal(2.0, 3.0, size=(n, 4)) for n in (1, 7, 50, 3)]
    rms = plumbing.RunningMeanStd(4)
    for b in batches:
        rms.update(b)
    data = np.concatenate(batches)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-4)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-3)


def test_explained_variance():
    G = np.array([1.0, 2.0, 3.0, 4.0])
    assert plumbing.explained_variance(G, G) == 1.0
    assert plumbing.explained_variance(np.full(4, G.mean()), G) == pytest.approx(0.0)


@pytest.mark.parametrize("discrete", [True, False])
def test_rollout_policy_samples_the_policy_and_its_log_prob(discrete):
    """The rollout's numpy forward pass: the log pi it stores is the update's log pi (Agent.head and
    log_prob in torch) of the action it took, V is Agent.value, and the actions follow pi_theta(.|s)."""
    torch.manual_seed(0)
    agent = ppo.Agent(obs_dim=3, act_dim=3 if discrete else 2, discrete=discrete)
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0.0, 0.5)  # a policy far from uniform (the init's output layer is tiny)
        if not discrete:
            agent.actor_logstd.copy_(torch.tensor([-0.5, 0.3]))
    s = np.random.default_rng(0).standard_normal((20_000, 3)).astype(np.float32)
    s[:10_000] = s[0]  # half the batch one state, to compare frequencies with pi(.|s)
    a, logp, V = plumbing.RolloutPolicy(agent, np.random.default_rng(1)).act(s)
    assert logp.dtype == V.dtype == np.float32
    with torch.no_grad():
        head = agent.head(torch.as_tensor(s))
        np.testing.assert_allclose(logp, agent.log_prob(head, torch.as_tensor(a)).numpy(), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(V, agent.value(torch.as_tensor(s)).numpy(), atol=2e-6, rtol=1e-5)
    if discrete:
        freq = np.bincount(a[:10_000], minlength=3) / 10_000
        np.testing.assert_allclose(freq, head[0].softmax(-1).numpy(), atol=0.015)
        assert len(np.unique(a[:10_000])) == 3
    else:
        mu, log_std = head[0].chunk(2)
        np.testing.assert_allclose(a[:10_000].mean(0), mu.numpy(), atol=0.03)
        np.testing.assert_allclose(a[:10_000].std(0), log_std.exp().numpy(), atol=0.03)


def test_rollout_policy_is_a_snapshot():
    """The numpy copy keeps the weights it was taken with: the loop takes a new one after each update."""
    agent = ppo.Agent(obs_dim=3, act_dim=2, discrete=False)
    pi = plumbing.RolloutPolicy(agent, np.random.default_rng(0))
    s = np.ones((1, 3), np.float32)
    V_before = pi.value(s)
    with torch.no_grad():
        agent.critic[-1].bias.add_(1.0)
    np.testing.assert_array_equal(pi.value(s), V_before)
    np.testing.assert_allclose(
        plumbing.RolloutPolicy(agent, np.random.default_rng(0)).value(s), V_before + 1.0, rtol=1e-6
    )


@pytest.mark.parametrize("loss", ["clip", "kl"])
def test_compiled_minibatch_loss_is_the_eager_one(loss):
    """--compile: torch.compile of minibatch_loss computes the same loss, diagnostics and gradients as the
    eager function (to float32 rounding; inductor fuses and reorders the arithmetic)."""
    torch.manual_seed(0)
    args = ppo.resolve_args(ppo.Args(env="Pendulum-v1", loss=loss, ent_coef=0.01, clip_vloss=True), discrete=False)
    agent = ppo.Agent(obs_dim=5, act_dim=2, discrete=False)
    B = 64
    s, a = torch.randn(B, 5), torch.randn(B, 2)
    with torch.no_grad():
        head_old = agent.head(s)
    logp_old = agent.log_prob(head_old, a) + 0.3 * torch.randn(B)  # rho away from 1, some of it clipped
    A_hat, G, V_old = torch.randn(B), torch.randn(B), torch.randn(B)

    def outputs_and_grads(fn, beta):
        agent.zero_grad()
        out = fn(agent, args, s, a, logp_old, A_hat, G, V_old, head_old, torch.tensor(beta))
        out[0].backward()
        return [o.detach().clone() for o in out] + [p.grad.clone() for p in agent.parameters()]

    compiled = torch.compile(ppo.minibatch_loss)
    for beta in [1.0, 0.5]:  # a new beta is a new tensor value, not a new program
        eager = outputs_and_grads(ppo.minibatch_loss, beta)
        assert eager[3][2] > 0  # some ratios were clipped
        for x, y in zip(outputs_and_grads(compiled, beta), eager):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "flags",
    [
        dict(loss="clip", ent_coef=0.01, clip_vloss=True, max_grad_norm=0.05),  # the bound clips every step
        dict(loss="kl", max_grad_norm=0.0, target_kl=0.045),  # no clipping; about half the mini-batches refused
    ],
)
def test_compiled_gradient_step_is_the_eager_step(flags):
    """gradient_step with --compile (loss, torch.func gradient, clipping and Adam in one program) moves the
    parameters and Adam's state as minibatch_loss, backward, clip_grad_norm_ and torch's fused Adam do, step after
    step with an annealed learning rate; a mini-batch whose k3 exceeds --target-kl, or whose loss is not finite,
    changes nothing (the eager loop does not step on it)."""
    torch.manual_seed(0)
    args = ppo.resolve_args(ppo.Args(env="Pendulum-v1", **flags), discrete=False)
    eager = ppo.Agent(obs_dim=5, act_dim=2, discrete=False)
    compiled = copy.deepcopy(eager)
    opt_eager = torch.optim.Adam(eager.parameters(), lr=3e-3, eps=1e-5, fused=True)
    opt_compiled = torch.optim.Adam(compiled.parameters(), lr=3e-3, eps=1e-5, fused=True)
    step = ppo.gradient_step(compiled, opt_compiled, dataclasses.replace(args, compile=True))
    n, B = 512, 64
    s, a = torch.randn(n, 5), torch.randn(n, 2)
    with torch.no_grad():
        head_old = eager.head(s)
    logp_old = eager.log_prob(head_old, a) + 0.3 * torch.randn(n)
    A_hat, G, V_old = torch.randn(n), torch.randn(n), torch.randn(n)
    beta = torch.tensor(1.0)
    refused = 0
    for i in range(24):
        for opt in (opt_eager, opt_compiled):
            opt.param_groups[0]["lr"] = 3e-3 * (1.0 - i / 24)
        mb = torch.randint(0, n, (B,))
        batch = (s[mb], a[mb], logp_old[mb], A_hat[mb], G[mb], V_old[mb], head_old[mb])
        if i == 20:  # a non-finite loss
            batch = batch[:3] + (torch.full((B,), float("nan")),) + batch[4:]
        out = ppo.minibatch_loss(eager, args, *batch, beta)
        before = [p.detach().clone() for p in compiled.parameters()]
        out_compiled = step(*batch, beta)
        for x, y in zip(out_compiled, out):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, equal_nan=True)
        if not torch.isfinite(out[0]) or (args.target_kl is not None and out[3][1] > args.target_kl):
            refused += 1
            for p, p_before in zip(compiled.parameters(), before):
                torch.testing.assert_close(p.detach(), p_before, rtol=0, atol=0)
            continue
        opt_eager.zero_grad()
        out[0].backward()
        if args.max_grad_norm > 0:
            total = torch.nn.utils.clip_grad_norm_(eager.parameters(), args.max_grad_norm)
            assert total > args.max_grad_norm  # the bound was active
        opt_eager.step()
        for p, q in zip(compiled.parameters(), eager.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), atol=2e-6, rtol=1e-5)
    assert refused >= 1 and refused < 24
    for p, q in zip(compiled.parameters(), eager.parameters()):
        state_c, state_e = opt_compiled.state[p], opt_eager.state[q]
        torch.testing.assert_close(state_c["step"], state_e["step"], rtol=0, atol=0)
        torch.testing.assert_close(state_c["exp_avg"], state_e["exp_avg"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(state_c["exp_avg_sq"], state_e["exp_avg_sq"], atol=1e-8, rtol=1e-4)


def test_snapshot_is_an_independent_copy():
    """The last good state (plumbing's snapshot): training after it changes nothing in it, and it holds what
    copy.deepcopy would."""
    agent = ppo.Agent(obs_dim=3, act_dim=2, discrete=False)
    optimizer = torch.optim.Adam(agent.parameters(), lr=0.1)
    agent.value(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    rms = plumbing.RunningMeanStd(3)
    rms.update(np.ones((2, 3)))
    state = {"model": agent.state_dict(), "optimizer": optimizer.state_dict(), "obs_rms": rms.state_dict(), "step": 7}
    snap, reference = plumbing.snapshot(state), copy.deepcopy(state)
    optimizer.step()  # moves the parameters and Adam's moments in place
    rms.update(np.zeros((5, 3)))
    with torch.no_grad():
        agent.actor_logstd.add_(1.0)
    assert not torch.equal(agent.actor_logstd, reference["model"]["actor_logstd"])
    torch.testing.assert_close(snap["model"], reference["model"], rtol=0, atol=0)
    torch.testing.assert_close(snap["optimizer"]["state"], reference["optimizer"]["state"], rtol=0, atol=0)
    assert snap["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"] and snap["step"] == 7
    torch.testing.assert_close(snap["obs_rms"], reference["obs_rms"], rtol=0, atol=0)
