"""PPO's mini-batch loss against the formulas written out with torch.distributions, --recompute-adv's refreshed G and
normalised A_hat; TRPO's step on an ordinary problem (it moves, uphill, along F^-1 g, inside the trust region) and
the line search's expected-improvement ratio with zeta^j. In-process, tiny, no learning run."""

import math

import numpy as np
import pytest
import torch
from test_math_common import common
from torch.distributions import Categorical, Normal, kl_divergence
from torch.func import functional_call

from cleanrl_style import ppo, trpo

# ---- PPO: minibatch_loss by hand ----


def ppo_batch(discrete: bool, B: int = 64):
    """A tiny agent far from uniform, a batch with pi_old != pi_theta (log pi_old shifted), some ratios clipped on
    each side, advantages of both signs, and V_old far enough from V that value clipping bites."""
    torch.manual_seed(0)
    agent = ppo.Agent(obs_dim=4, act_dim=3, discrete=discrete, hidden=8)
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0.0, 0.5)
        if not discrete:
            agent.actor_logstd.copy_(torch.tensor([-0.3, 0.2, 0.0]))
    s = torch.randn(B, 4)
    with torch.no_grad():
        head = agent.head(s)
        dist = Categorical(logits=head) if discrete else Normal(head[:, :3], head[:, 3:].exp())
        a = dist.sample()
        # pi_old: another policy (its logits or mean moved), so rho != 1 and the KL is not 0
        head_old = head + 0.4 * torch.randn_like(head) * (1.0 if discrete else torch.tensor([1, 1, 1, 0.0, 0, 0]))
        old = Categorical(logits=head_old) if discrete else Normal(head_old[:, :3], head_old[:, 3:].exp())
        logp_old = old.log_prob(a) if discrete else old.log_prob(a).sum(-1)
    A_hat, G = torch.randn(B), torch.randn(B)
    V_old = agent.value(s).detach() + torch.randn(B)
    return agent, s, a, logp_old, A_hat, G, V_old, head_old


def by_hand(agent, args, s, a, logp_old, A_hat, G, V_old, head_old, beta):
    """-L^{CLIP or KL} + c1 * value loss - c2 H, from torch.distributions and the formulas of the notes."""
    head = agent.head(s)
    discrete = agent.discrete
    pi = Categorical(logits=head) if discrete else Normal(head[:, :3], head[:, 3:].exp())
    pi_old = Categorical(logits=head_old) if discrete else Normal(head_old[:, :3], head_old[:, 3:].exp())
    logp = pi.log_prob(a) if discrete else pi.log_prob(a).sum(-1)
    rho = torch.exp(logp - logp_old)
    eps = args.clip_eps
    if args.loss == "clip":
        L = torch.mean(torch.minimum(rho * A_hat, torch.clamp(rho, 1 - eps, 1 + eps) * A_hat))
        pg_loss = -L
    else:
        if args.kl_estimator == "exact":
            kl = kl_divergence(pi_old, pi) if discrete else kl_divergence(pi_old, pi).sum(-1)
        elif args.kl_estimator == "k1":
            kl = -torch.log(rho)
        else:
            kl = (rho - 1) - torch.log(rho)
        pg_loss = -torch.mean(rho * A_hat) + beta * kl.mean()
    V = agent.critic(s)[:, 0]
    if args.clip_vloss:
        V_clip = V_old + torch.clamp(V - V_old, -eps, eps)
        v_loss = 0.5 * torch.mean(torch.maximum((V - G) ** 2, (V_clip - G) ** 2))
    else:
        v_loss = 0.5 * torch.mean((V - G) ** 2)
    H = pi.entropy() if discrete else pi.entropy().sum(-1)
    return pg_loss + args.vf_coef * v_loss - args.ent_coef * H.mean(), pg_loss, v_loss, rho


@pytest.mark.parametrize(
    "discrete,loss,estimator,clip_vloss",
    [
        (True, "clip", "exact", True),
        (False, "clip", "exact", False),
        (False, "clip", "exact", True),
        (True, "kl", "exact", False),
        (False, "kl", "exact", True),
        (True, "kl", "k1", False),
        (False, "kl", "k3", False),
    ],
)
def test_minibatch_loss_is_the_formula_by_hand(discrete, loss, estimator, clip_vloss):
    env = "CartPole-v1" if discrete else "Pendulum-v1"
    args = ppo.resolve_args(
        ppo.Args(env=env, loss=loss, kl_estimator=estimator, clip_vloss=clip_vloss, ent_coef=0.01, vf_coef=0.7),
        discrete=discrete,
    )
    batch = ppo_batch(discrete)
    beta = 0.8
    loss_, pg, v, diagnostics = ppo.minibatch_loss(*batch[:1], args, *batch[1:], torch.tensor(beta))
    want, want_pg, want_v, rho = by_hand(batch[0], args, *batch[1:], beta)
    # the batch tells the bugs apart: pi_old != pi_theta, ratios clipped on both sides, value clipping bites
    assert (rho > 1.2).any() and (rho < 0.8).any() and not torch.allclose(rho, torch.ones_like(rho))
    agent, s, _, _, _, G, V_old, _ = batch
    V = agent.critic(s)[:, 0]
    V_clip = V_old + torch.clamp(V - V_old, -args.clip_eps, args.clip_eps)
    assert ((V_clip - G) ** 2 > (V - G) ** 2).any()
    torch.testing.assert_close(pg, want_pg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_, want, rtol=1e-5, atol=1e-6)
    # the diagnostics: k1, k3 and the fraction of ratios outside [1 - eps, 1 + eps]
    log_rho = rho.log()
    torch.testing.assert_close(diagnostics[0], (-log_rho).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diagnostics[1], (rho - 1 - log_rho).mean(), rtol=1e-5, atol=1e-6)
    assert diagnostics[2].item() == pytest.approx(((rho - 1).abs() > args.clip_eps).float().mean().item())


def test_the_clipped_objective_moves_pi_theta_towards_positive_advantages():
    """The sign of L^CLIP: a gradient step on the loss raises log pi of an action with A_hat > 0 and lowers it for
    A_hat < 0 (rho = 1 at the start, inside the clip range)."""
    torch.manual_seed(1)
    args = ppo.resolve_args(ppo.Args(env="CartPole-v1", vf_coef=0.0), discrete=True)
    agent = ppo.Agent(obs_dim=4, act_dim=2, discrete=True, hidden=8)
    s, a = torch.randn(2, 4), torch.tensor([0, 1])
    with torch.no_grad():
        head_old = agent.head(s)
        logp_old = agent.log_prob(head_old, a)
    for sign in (1.0, -1.0):
        agent.zero_grad()
        A_hat = torch.tensor([sign, sign])
        loss = ppo.minibatch_loss(agent, args, s, a, logp_old, A_hat, torch.zeros(2), torch.zeros(2), head_old,
                                  torch.tensor(1.0))[0]  # fmt: skip
        loss.backward()
        with torch.no_grad():
            for p in agent.actor.parameters():
                p -= 0.1 * p.grad
            moved = agent.log_prob(agent.head(s), a) - logp_old
            for p in agent.actor.parameters():
                p += 0.1 * p.grad
        assert (sign * moved > 0).all(), (sign, moved)


# ---- PPO: --recompute-adv refreshes G as well as A_hat; --norm-adv centres A_hat ----


def test_recompute_adv_refreshes_the_critics_target_and_normalises_each_epochs_advantages(tmp, monkeypatch):
    """Each epoch's mini-batches together hold the batch once: (A_hat, G) = ((A_e - mean) / std, A_e + V_e) from
    that epoch's GAE on the current critic V_e, and V_old = the rollout's V (for value clipping)."""
    gae_calls, batches = [], []
    real_gae, real_loss = ppo.gae, ppo.minibatch_loss

    def gae(r, V, V_next, terminated, ended, gamma, gae_lambda):
        A_hat = real_gae(r, V, V_next, terminated, ended, gamma, gae_lambda)
        gae_calls.append((V.copy(), A_hat.copy()))
        return A_hat

    def minibatch_loss(agent, args, s, a, logp_old, A_hat, G, V_old, head_old, beta):
        batches.append([x.detach().numpy().copy() for x in (A_hat, G, V_old)])
        return real_loss(agent, args, s, a, logp_old, A_hat, G, V_old, head_old, beta)

    monkeypatch.setattr(ppo, "gae", gae)
    monkeypatch.setattr(ppo, "minibatch_loss", minibatch_loss)
    monkeypatch.chdir(tmp)
    flags = dict(num_envs=1, num_steps=12, total_timesteps=12, minibatch_size=4, update_epochs=3, learning_rate=0.05,
                 recompute_adv=True, norm_adv=True, clip_vloss=True, save_model=False)  # fmt: skip
    assert ppo.main(ppo.Args(**common(tmp, **flags))) == 0
    assert len(gae_calls) == 3 and len(batches) == 9
    V_rollout = gae_calls[0][0].reshape(-1)
    G_epochs = []
    for epoch, (V, A) in enumerate(gae_calls):
        A_seen, G_seen, V_old_seen = (np.concatenate(x) for x in zip(*batches[3 * epoch : 3 * epoch + 3]))
        A, G = A.reshape(-1), (A + V).reshape(-1)
        assert abs(A_seen.mean()) < 1e-6  # centred
        want = np.stack([(A - A.mean()) / (A.std(ddof=1) + 1e-8), G], 1)
        got = np.stack([A_seen, G_seen], 1)
        order_want, order_got = np.lexsort(want.T[::-1]), np.lexsort(got.T[::-1])
        np.testing.assert_allclose(got[order_got], want[order_want], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.sort(V_old_seen), np.sort(V_rollout), rtol=1e-6, atol=1e-6)
        G_epochs.append(np.sort(G_seen))
    assert np.abs(G_epochs[2] - G_epochs[0]).max() > 1e-4  # the critic moved: a stale G would show


# ---- TRPO: trpo_step on an ordinary problem ----


def tiny_policy(discrete: bool, seed: int = 0, n: int = 32):
    """A tiny float64 agent, a batch of states, actions from pi_old, random advantages."""
    torch.manual_seed(seed)
    agent = trpo.Agent(obs_dim=3, act_dim=2, discrete=discrete, hidden=4).double()
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0.0, 1.0)
        if not discrete:
            agent.actor_logstd.copy_(torch.tensor([-0.3, 0.4]))
    obs = torch.randn(n, 3, dtype=torch.float64)
    with torch.no_grad():
        head_old = agent.head(obs)
        a = Categorical(logits=head_old).sample() if discrete else head_old[:, :2] + 0.5 * torch.randn(n, 2)
        logp_old = agent.log_prob(head_old, a)
    return agent, obs, a, logp_old, torch.randn(n, dtype=torch.float64), head_old


def kl_hessian(agent, obs, head_old) -> torch.Tensor:
    """The explicit Hessian of KL_bar(theta) = mean_s KL(pi_old || pi_theta) in the flat theta."""
    names = [n for n, _ in agent.actor.named_parameters()]
    params = trpo.actor_parameters(agent)
    shapes = [p.shape for p in params]

    def mean_kl(theta):
        pieces, i = [], 0
        for shape in shapes:
            pieces.append(theta[i : i + math.prod(shape)].view(shape))
            i += math.prod(shape)
        out = functional_call(agent.actor, dict(zip(names, pieces)), (obs,))
        head = out if agent.discrete else torch.cat([out, pieces[-1].expand_as(out)], -1)
        return agent.kl(head_old, head).mean()

    return torch.autograd.functional.hessian(mean_kl, trpo.get_flat(params))


@pytest.mark.parametrize("discrete", [True, False])
def test_trpo_step_moves_uphill_along_the_natural_gradient_inside_the_trust_region(discrete):
    """On an ordinary batch the step is taken (j >= 0), improves the surrogate, has 0 < KL <= delta, and points
    along +(F + damping I)^-1 g (CG solves F x = +g: a step along -g would lower L and be refused)."""
    agent, obs, a, logp_old, A_hat, head_old = tiny_policy(discrete)
    params = trpo.actor_parameters(agent)
    theta_old = trpo.get_flat(params)
    policy_fn = trpo.make_policy_fn(agent, obs, a, logp_old, A_hat, head_old)
    L, _ = policy_fn()
    g = trpo.flat(torch.autograd.grad(L, params))
    damping, max_kl = 0.1, 0.01
    F = kl_hessian(agent, obs, head_old) + damping * torch.eye(len(g), dtype=torch.float64)  # at theta_old
    args = trpo.Args(max_kl=max_kl, cg_iters=200, cg_damping=damping, line_search_steps=10, line_search_shrink=0.8,
                     accept_ratio=0.1)  # fmt: skip
    info = trpo.trpo_step(params, policy_fn, args)
    assert info["j"] >= 0 and info["L"] > info["L_old"] and 0.0 < info["kl"] <= max_kl and info["step_norm"] > 0
    with torch.no_grad():
        L_new, kl_new = policy_fn()
    assert (L_new.item(), kl_new.item()) == pytest.approx((info["L"], info["kl"]), rel=1e-12)
    step = trpo.get_flat(params) - theta_old
    x = torch.linalg.solve(F, g)
    assert torch.nn.functional.cosine_similarity(step, x, dim=0).item() > 0.999
    # the full step meets the KL model: 1/2 Delta^T F Delta = delta, Delta = step / zeta^j
    Delta = step / 0.8 ** info["j"]
    assert 0.5 * (Delta @ F @ Delta).item() == pytest.approx(max_kl, rel=1e-6)
    assert info["expected"] == pytest.approx((g @ Delta).item(), rel=1e-6) and info["expected"] > 0


def linear_problem(theta_old, direction):
    """L(theta) = direction . theta, KL_bar(theta) = 1/2 |theta - theta_old|^2."""
    param = torch.nn.Parameter(theta_old.clone())

    def evaluate_fn():
        with torch.no_grad():
            return (direction @ param).item(), (0.5 * (param - theta_old).pow(2).sum()).item()

    return [param], evaluate_fn


@pytest.mark.parametrize("promise,accepted", [(1.99, True), (2.01, False)])
def test_line_search_compares_the_improvement_with_zeta_j_times_the_expected_one(promise, accepted):
    """L linear, so the step zeta^j Delta improves L by exactly zeta^j g . Delta. The full step breaks the KL
    (4 delta), so the first step inside the region is j = 4. With `expected` = promise * g . Delta and accept
    ratio 0.5 the ratio test reads zeta^j g.Delta >= 0.5 zeta^j promise g.Delta: true for promise 1.99, false for
    2.01, at every j. Any other power of zeta (none, j - 1, j + 1) flips one of the two."""
    theta_old = torch.tensor([0.3, -1.2], dtype=torch.float64)
    direction = torch.tensor([1.0, 2.0], dtype=torch.float64)
    max_kl = 0.01
    params, evaluate_fn = linear_problem(theta_old, direction)
    Delta = direction / direction.norm() * math.sqrt(2 * 4 * max_kl)
    expected = promise * (direction @ Delta).item()
    j, L, kl = trpo.line_search(params, theta_old, Delta, expected, evaluate_fn, evaluate_fn()[0], max_kl, 10, 0.8, 0.5)
    if accepted:
        assert j == 4 and kl <= max_kl
        torch.testing.assert_close(params[0].detach(), theta_old + 0.8**4 * Delta, rtol=0, atol=1e-15)
    else:
        assert j == -1 and torch.equal(params[0].detach(), theta_old)
