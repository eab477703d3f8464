"""Trust Region Policy Optimisation (TRPO): conjugate gradient on the Fisher-vector product and a checked line search.

Notation of the study notes (see NOTATION.md in this folder, "Trust regions" and "Beyond the notes"):

    rollout      T steps of N envs with pi_old, storing s_t, a_t, r_t, log pi_old(a_t|s_t), V(s_t)
    TD residual  delta_t = r_t + gamma V(s_{t+1}) - V(s_t)             (no bootstrap past a termination)
    GAE          A_hat_t = delta_t + gamma lambda A_hat_{t+1}          (the sum stops at an episode end)
    return       G_t = A_hat_t + V_old(s_t)                            (the critic's target)
    ratio        rho_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)
    surrogate    L(theta) = E[rho_t A_hat_t]
    trust region max_theta L(theta)  subject to  KL_bar(theta) = E_s[KL(pi_old(.|s) || pi_theta(.|s))] <= delta
    gradient     g = grad_theta L(theta_old)
    Fisher       F v = grad_theta((grad_theta KL_bar) . v) + damping v   (double backward; F is never formed)
    CG           x ~ F^-1 g by conjugate gradient
    full step    Delta = sqrt(2 delta / x^T F x) x                     (so that 1/2 Delta^T F Delta = delta)
    line search  theta_old + zeta^j Delta, j = 0, 1, ...: the first with KL_bar <= delta, L improved, and
                 improvement / (zeta^j g . Delta) > accept ratio; if none, theta_old restored exactly
    critic       Adam on 1/2 (V_phi(s_t) - G_t)^2 over mini-batches, separately from the policy

When an episode is cut by a time limit (truncation) the MDP did not end there, so delta_t bootstraps
from V of the true final observation; after a termination it never bootstraps.

Run:
    python cleanrl_style/trpo.py --env CartPole-v1
    python cleanrl_style/trpo.py --env HalfCheetah-v5                  # Tianshou's MuJoCo settings
    python cleanrl_style/trpo.py --env HalfCheetah-v5 --preset rl-zoo3 --max-kl 0.04   # rl-zoo3's
"""

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

import plumbing
from plumbing import RolloutPolicy, RunFault, normalize_obs

ALGORITHM = "trpo"


@dataclass
class Args(plumbing.RunArgs):  # the flags every script has (--env, --seed, --resume, ...) are in plumbing.RunArgs
    preset: Literal["rl-zoo3", "tianshou"] | None = None
    """a named set of settings for the flags not given (the PRESETS table in trpo.py: what each sets, and why)"""
    total_timesteps: int | None = None
    """environment steps to train for (default: 100,000 discrete, 1,000,000 continuous)"""
    num_envs: int | None = None
    """N, parallel environments (default: 4 discrete, 16 continuous)"""
    num_steps: int | None = None
    """T, steps per environment per rollout; N*T 512-2048 typical (default: 128 discrete, 64 continuous)"""
    max_kl: float = 0.01
    """delta, radius of the mean-KL trust region; 0.005-0.05"""
    cg_iters: int | None = None
    """conjugate gradient iterations for x ~ F^-1 g; 10-25 (default: 15 discrete, 25 continuous)"""
    cg_damping: float | None = None
    """damping added to the Fisher: F v + damping v; 1e-3-0.1 (default: 0.1)"""
    line_search_steps: int = 10
    """step fractions zeta^j, j = 0 .. steps-1, tried before the update is rejected; 10 typical"""
    line_search_shrink: float = 0.8
    """zeta, the backtracking factor in (0, 1); 0.5-0.8"""
    accept_ratio: float = 0.1
    """smallest improvement / expected improvement (zeta^j g . Delta) a step must reach; 0-0.5 (0: any improvement)"""
    critic_epochs: int | None = None
    """epochs of Adam over the rollout for the critic V_phi per update; 5-30 (default: 20)"""
    critic_minibatch_size: int | None = None
    """samples per critic mini-batch; must divide N*T; 0: the whole batch (default: 128 discrete, 0 continuous)"""
    learning_rate: float | None = None
    """alpha, the critic's Adam step size; 1e-4-3e-3 (default: 1e-3)"""
    anneal_lr: bool | None = None
    """anneal the critic's learning rate linearly to 0 over the run (default: off discrete, on continuous)"""
    gamma: float | None = None
    """gamma, discount factor in [0, 1]; 0.98-0.999 typical (default: 0.99)"""
    gae_lambda: float | None = None
    """lambda of GAE in [0, 1]; 0.9-0.99 typical (default: 0.98 discrete, 0.95 continuous)"""
    norm_adv: bool = True
    """normalise A_hat over the batch: (A_hat - mean) / std"""
    norm_obs: bool | None = None
    """normalise observations with running statistics (default: off discrete, on continuous)"""
    norm_reward: bool | None = None
    """scale rewards by the running std of the discounted return (default: on)"""
    hidden_size: int = 64
    """width of the two tanh hidden layers of actor and critic"""
    log_std_init: float | None = None
    """log sigma of the Gaussian policy at the start, continuous actions; -1.5-0 (default: -0.5, sigma = 0.61)"""


# Defaults by action space: (discrete, continuous). Discrete: tuned on CartPole-v1 here. rl-zoo3's CartPole TRPO
# damping 1e-3 gave full steps whose true KL was 2-15 delta (a backtrack on most updates) and 475 after ~90k steps;
# damping 0.1, 20 critic epochs and reward scaling take every full step and reach 475 in ~25k steps (seeds 1, 2),
# staying at 500. Continuous: Tianshou's MuJoCo TRPO settings (its benchmark's examples/mujoco/mujoco_trpo.py, our
# reward scaling kept where it scales the critic's targets): 16 envs x 64 steps,
# the critic trained by 20 full-batch Adam steps per update at 1e-3 annealed to 0, log sigma -0.5 at the start; 25 CG
# iterations, damping 0.1, normalised observations and rewards. At 1M steps (3 seeds) they beat rl-zoo3's settings,
# the defaults until then (--preset rl-zoo3), on HalfCheetah-v5, Hopper-v5 and Walker2d-v5
# (benchmarks/results/trpo/tianshou_1m/). rl-zoo3's delta is not ours for a Gaussian: sb3-contrib averages the KL
# over the action dimensions as well as the states, where delta here bounds the KL of the whole action distribution
# (summed over dimensions, as in the paper and in Tianshou). sb3-contrib's trust region is the one of
# --max-kl delta*act_dim --cg-damping 0.1*act_dim here (the results in benchmarks/results/trpo/).
DEFAULTS = {  # fmt: skip
    "total_timesteps": (100_000, 1_000_000),
    "num_envs": (4, 16),
    "num_steps": (128, 64),
    "cg_iters": (15, 25),
    "cg_damping": (0.1, 0.1),
    "critic_epochs": (20, 20),
    "critic_minibatch_size": (128, 0),  # 0: the whole batch of N*T steps
    "learning_rate": (1e-3, 1e-3),
    "gamma": (0.99, 0.99),
    "gae_lambda": (0.98, 0.95),
    "norm_obs": (False, True),
    "norm_reward": (True, True),
    "anneal_lr": (False, True),
    "log_std_init": (0.0, -0.5),
}
DISCRETE_DEFAULTS = {k: v[0] for k, v in DEFAULTS.items()}
CONTINUOUS_DEFAULTS = {k: v[1] for k, v in DEFAULTS.items()}
# --preset NAME fills the flags not given: rl-zoo3 = rl-zoo3's MuJoCo TRPO (sb3-contrib's; its HalfCheetah entry also
# has --max-kl 0.04, in its KL: see above): 2 envs x 1024 steps, 20 critic epochs of mini-batch 128 at a constant
# 1e-3, log sigma 0; tianshou = the continuous defaults, by name (for discrete actions too).
PRESETS = {
    "rl-zoo3": dict(num_envs=2, num_steps=1024, critic_minibatch_size=128, anneal_lr=False, log_std_init=0.0),
    "tianshou": dict(num_envs=16, num_steps=64, critic_minibatch_size=0, anneal_lr=True, log_std_init=-0.5),
}


# ----------------------------------------------------------------------------------------------
# Networks: pi_theta (the actor) and V_phi (the critic)
# ----------------------------------------------------------------------------------------------


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(n_in: int, n_out: int, hidden: int, out_std: float) -> nn.Sequential:
    return nn.Sequential(
        layer_init(nn.Linear(n_in, hidden)),
        nn.Tanh(),
        layer_init(nn.Linear(hidden, hidden)),
        nn.Tanh(),
        layer_init(nn.Linear(hidden, n_out), std=out_std),
    )


class Agent(nn.Module):
    """Separate actor and critic MLPs (two tanh layers). The actor's output `head` is the Categorical's logits or
    [mu, log sigma] of a Gaussian with state-independent sigma (log pi, H and KL: plumbing's distributions)."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, hidden: int = 64):
        super().__init__()
        self.discrete = discrete
        self.critic = mlp(obs_dim, 1, hidden, out_std=1.0)
        self.actor = mlp(obs_dim, act_dim, hidden, out_std=0.01)
        if not discrete:
            self.actor_logstd = nn.Parameter(torch.zeros(act_dim))

    def value(self, s: torch.Tensor) -> torch.Tensor:
        """V_phi(s)."""
        return self.critic(s).squeeze(-1)

    def head(self, s: torch.Tensor) -> torch.Tensor:
        """Parameters of pi_theta(.|s): logits, or [mu, log sigma]."""
        out = self.actor(s)
        if self.discrete:
            return out
        return torch.cat([out, self.actor_logstd.expand_as(out)], -1)

    def log_prob(self, head: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return plumbing.categorical_log_prob(head, a)
        return plumbing.gaussian_log_prob(*head.chunk(2, -1), a)

    def entropy(self, head: torch.Tensor) -> torch.Tensor:
        return plumbing.categorical_entropy(head) if self.discrete else plumbing.gaussian_entropy(head.chunk(2, -1)[1])

    def kl(self, head_old: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Exact KL(pi_old(.|s) || pi_theta(.|s)) per state."""
        if self.discrete:
            return plumbing.categorical_kl(head_old, head)
        return plumbing.gaussian_kl(*head_old.chunk(2, -1), *head.chunk(2, -1))

    def mode(self, head: torch.Tensor) -> torch.Tensor:
        """The deterministic action: argmax of the logits, or the mean mu."""
        return head.argmax(-1) if self.discrete else head.chunk(2, -1)[0]


# ----------------------------------------------------------------------------------------------
# The algorithm's math: GAE, the critic's loss, the trust-region step
# ----------------------------------------------------------------------------------------------


def gae(r, V, V_next, terminated, ended, gamma: float, gae_lambda: float) -> np.ndarray:
    """Generalised advantage estimates over a rollout of shape (T, N):
    delta_t = r_t + gamma (1 - terminated_t) V_next_t - V_t, where V_next_t is V of the observation that
    followed s_t (on a truncation: the true final observation, not the reset one), and
    A_hat_t = delta_t + gamma lambda (1 - ended_t) A_hat_{t+1}, ended_t = terminated_t or truncated_t.
    """
    delta = r + gamma * (1.0 - terminated) * V_next - V
    A_hat = np.zeros_like(delta)
    last = np.zeros_like(delta[0])
    for t in reversed(range(len(delta))):
        last = delta[t] + gamma * gae_lambda * (1.0 - ended[t]) * last
        A_hat[t] = last
    return A_hat


def value_loss(V: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """1/2 (V_phi(s_t) - G_t)^2, averaged over the batch."""
    return 0.5 * ((V - G) ** 2).mean()


def actor_parameters(agent: Agent) -> list[nn.Parameter]:
    """theta: the actor's weights (and log sigma of a Gaussian). The critic's phi take no part in the step."""
    return list(agent.actor.parameters()) + ([] if agent.discrete else [agent.actor_logstd])


def flat(tensors) -> torch.Tensor:
    """Tensors (gradients, parameters) as one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def get_flat(params: list[nn.Parameter]) -> torch.Tensor:
    """A copy of theta as one vector."""
    return flat([p.detach() for p in params]).clone()


def set_flat(params: list[nn.Parameter], theta: torch.Tensor) -> None:
    """Copy the vector theta into the parameters: bit for bit, so that theta_old comes back exactly."""
    with torch.no_grad():
        i = 0
        for p in params:
            p.copy_(theta[i : i + p.numel()].view_as(p))
            i += p.numel()


def surrogate(log_rho: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """L(theta) = E[rho_t A_hat_t] with rho_t = exp(log pi_theta(a_t|s_t) - log pi_old(a_t|s_t))."""
    return (log_rho.exp() * A_hat).mean()


def make_policy_fn(agent: Agent, obs, actions, logp_old, A_hat, head_old) -> Callable:
    """The batch's () -> (L(theta), KL_bar(theta)) at the parameters set now, from one forward pass of the actor:
    L = E[rho_t A_hat_t] and KL_bar = mean over s_t of the exact KL(pi_old(.|s_t) || pi_theta(.|s_t))."""

    def policy_fn() -> tuple[torch.Tensor, torch.Tensor]:
        head = agent.head(obs)
        log_rho = agent.log_prob(head, actions) - logp_old
        return surrogate(log_rho, A_hat), agent.kl(head_old, head).mean()

    return policy_fn


def fisher_vector_product(mean_kl: torch.Tensor, params: list, damping: float) -> Callable:
    """v -> F v + damping v. F is the Hessian of the mean exact KL_bar(theta) = E_s[KL(pi_old || pi_theta)] at
    theta = theta_old (the Fisher information there), applied to v by double backward, grad((grad KL_bar) . v),
    so F is never formed. `mean_kl` is KL_bar evaluated at theta_old with a graph to `params`."""
    grad_kl = flat(torch.autograd.grad(mean_kl, params, create_graph=True))

    def Fv(v: torch.Tensor) -> torch.Tensor:
        return flat(torch.autograd.grad(grad_kl @ v, params, retain_graph=True)) + damping * v

    return Fv


def conjugate_gradient(Avp: Callable, b: torch.Tensor, iters: int, tol: float = 1e-10) -> torch.Tensor:
    """x ~ A^-1 b for a symmetric positive-definite A known only through v -> A v, from x = 0 (exact after n steps
    for n unknowns, in exact arithmetic). Stops once r^T r < tol, or at a direction of non-positive (or NaN)
    curvature p^T A p, keeping the x reached so far."""
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr < tol:
            break
        Ap = Avp(p)
        pAp = p @ Ap
        if not pAp > 0:
            break
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def full_step(x: torch.Tensor, xFx: float, max_kl: float) -> torch.Tensor | None:
    """Delta = sqrt(2 delta / x^T F x) x, so that the quadratic model of the KL, 1/2 Delta^T F Delta, equals delta.
    None (no step) when x^T F x is not a positive finite number: a faulty Fisher-vector product, or g = 0."""
    if not (math.isfinite(xFx) and xFx > 0 and torch.isfinite(x).all()):
        return None
    return math.sqrt(2.0 * max_kl / xFx) * x


def line_search(
    params, theta_old, Delta, expected, evaluate_fn, L_old, max_kl, steps, shrink, accept_ratio
) -> tuple[int, float, float]:
    """Backtracking: try theta_old + zeta^j Delta for j = 0 .. steps - 1 and accept the first whose exact mean KL is
    <= delta, whose surrogate is finite and improved (L - L_old > 0), and whose improvement is at least
    `accept_ratio` times the linear model's zeta^j g . Delta (`expected` = g . Delta). `evaluate_fn()` gives
    (L, KL_bar) at the parameters set now. Returns (j, L, KL_bar) of the accepted step; when none is accepted,
    theta_old is restored exactly and (-1, L_old, 0.0) is returned."""
    for j in range(steps):
        frac = shrink**j
        set_flat(params, theta_old + frac * Delta)
        L, kl = evaluate_fn()
        improvement = L - L_old
        if math.isfinite(L) and kl <= max_kl and improvement > 0 and improvement >= accept_ratio * frac * expected:
            return j, L, kl  # (comparisons with NaN are False: a NaN KL is never accepted)
    set_flat(params, theta_old)
    return -1, L_old, 0.0


def trpo_step(params: list, policy_fn: Callable, args: Args) -> dict:
    """One policy update with the hyperparameters of `args` (max_kl, cg_iters, cg_damping, line_search_steps,
    line_search_shrink, accept_ratio). `policy_fn()` returns (L(theta), KL_bar(theta)) at the parameters set now,
    with graphs to `params`. g = grad L(theta_old); x ~ F^-1 g (CG); Delta = sqrt(2 delta / x^T F x) x; the line
    search. Leaves `params` at the accepted step, or exactly at theta_old. Returns the step's numbers for the log."""
    theta_old = get_flat(params)
    L, kl = policy_fn()
    g = flat(torch.autograd.grad(L, params, retain_graph=True))
    L_old = L.item()
    if not (math.isfinite(L_old) and torch.isfinite(g).all()):
        raise RunFault(f"non-finite surrogate or gradient (L = {L_old})")
    Fv = fisher_vector_product(kl, params, args.cg_damping)
    x = conjugate_gradient(Fv, g, args.cg_iters)
    xFx = (x @ Fv(x)).item()
    info = dict(L_old=L_old, L=L_old, kl=0.0, xFx=xFx, expected=0.0, j=-1, step_norm=0.0)
    Delta = full_step(x, xFx, args.max_kl)
    if Delta is None:
        return info
    info["expected"] = expected = (g @ Delta).item()  # g . Delta = sqrt(2 delta x^T F x) > 0 for an exact x
    if not (math.isfinite(expected) and expected > 0):
        return info

    def evaluate_fn() -> tuple[float, float]:
        with torch.no_grad():
            L, kl = policy_fn()
        return L.item(), kl.item()

    search = (args.max_kl, args.line_search_steps, args.line_search_shrink, args.accept_ratio)
    j, L_new, kl_new = line_search(params, theta_old, Delta, expected, evaluate_fn, L_old, *search)
    step_norm = (get_flat(params) - theta_old).norm().item()
    return dict(info, L=L_new, kl=kl_new, j=j, step_norm=step_norm)


def main(args: Args, stop: plumbing.StopSignal | None = None) -> int:
    """Train; return the process exit status (0 done, 1 stopped by a fault, 130 interrupted)."""
    given = {k for k in DEFAULTS if getattr(args, k) is not None}
    args, ckpt = plumbing.resume_args(args, ALGORITHM)
    Box, Discrete = gym.spaces.Box, gym.spaces.Discrete
    obs_space, act_space = plumbing.env_spaces(args.env, ALGORITHM, obs=Box, act=(Discrete, Box))
    discrete = isinstance(act_space, Discrete)
    args = resolve_args(args, discrete)
    device = plumbing.setup(args)  # seeds, torch threads, headless rendering
    kind = "discrete" if discrete else "continuous"
    head = f"trpo on {args.env} ({kind} actions {act_space}); {kind} defaults, overridden where marked: "
    tail = f"; max_kl={args.max_kl}, line search {args.line_search_steps} x {args.line_search_shrink}, device={device}"
    plumbing.announce(args, ckpt, head, DEFAULTS, given, PRESETS.get(args.preset), tail)
    N, T = args.num_envs, args.num_steps
    batch_size = N * T
    num_iterations = args.total_timesteps // batch_size
    if "total_timesteps" in given and num_iterations * batch_size != args.total_timesteps:  # a budget the user chose
        print(f"note: training {num_iterations * batch_size} steps, whole rollouts of N*T = {batch_size} steps")

    obs_dim = int(np.prod(obs_space.shape))
    act_dim = int(act_space.n) if discrete else int(np.prod(act_space.shape))
    agent = plumbing.build(
        lambda: Agent(obs_dim, act_dim, discrete, args.hidden_size).to(device), f"--hidden-size {args.hidden_size}"
    )
    if not discrete:
        nn.init.constant_(agent.actor_logstd, args.log_std_init)
    theta = actor_parameters(agent)  # the policy's parameters, moved by the trust-region step
    optimizer = torch.optim.Adam(agent.critic.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)  # phi only
    obs_rms = plumbing.RunningMeanStd(obs_dim) if args.norm_obs else None
    ret_rms = plumbing.RunningMeanStd(()) if args.norm_reward else None
    global_step, iteration, rejected = 0, 0, 0
    if ckpt is not None:
        plumbing.restore(ckpt, model=agent, optimizer=optimizer, obs_rms=obs_rms, ret_rms=ret_rms)
        global_step, iteration = ckpt["global_step"], ckpt["iteration"]
        print(f"resumed {args.resume} at global step {global_step}")

    def state() -> dict:  # what a checkpoint holds of the run (plumbing adds the format, algorithm, env id and args)
        return {"global_step": global_step, "iteration": iteration, "model": agent.state_dict(),
                "optimizer": optimizer.state_dict(), "obs_rms": obs_rms and obs_rms.state_dict(),
                "ret_rms": ret_rms and ret_rms.state_dict()}  # fmt: skip

    run = plumbing.Run(args, ALGORITHM, ckpt, stop, evaluate, state)  # the run directory: nothing written before
    envs = run.vector_env(plumbing.make_env, N)

    # ---- rollout storage, shape (T, N, ...) ----
    obs = np.zeros((T, N, obs_dim), np.float32)
    actions = np.zeros((T, N) if discrete else (T, N, act_dim), np.float32)
    logp_old = np.zeros((T, N), np.float32)
    rewards = np.zeros((T, N), np.float32)
    terminated = np.zeros((T, N), np.float32)
    ended = np.zeros((T, N), np.float32)
    values = np.zeros((T, N), np.float32)
    V_final = np.zeros((T, N), np.float32)  # V(true final observation) where an episode was truncated
    truncated_only = np.zeros((T, N), bool)

    next_obs, _ = envs.reset(seed=[args.seed + global_step + i for i in range(N)])
    if obs_rms is not None:
        obs_rms.update(next_obs)
    rng = np.random.default_rng((args.seed, global_step))  # the rollout's action noise (a resumed run: a new stream)
    scale_reward = plumbing.RewardScaler(N, args.gamma, ret_rms) if ret_rms is not None else None
    with run.fault_guard():
        while run.training() and iteration < num_iterations:
            iteration += 1
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = run.learning_rate(global_step, num_iterations * batch_size)

            # ---- rollout with pi_old ----
            pi_old = RolloutPolicy(agent, rng)  # pi_theta and V_phi in numpy, fast for one step of N envs
            for t in range(T):
                s = normalize_obs(next_obs, obs_rms)
                obs[t] = s
                a, logp_old[t], values[t] = pi_old.act(s)
                actions[t] = a
                env_a = a if discrete else np.clip(a, act_space.low, act_space.high)
                next_obs, r, term, trunc, infos = envs.step(env_a)
                global_step += N
                done = term | trunc
                run.episodes(r, done, global_step)
                if obs_rms is not None:
                    obs_rms.update(next_obs)
                if scale_reward is not None:
                    r = scale_reward(r, done)
                rewards[t], terminated[t], ended[t] = r, term, done
                truncated_only[t] = trunc & ~term
                if truncated_only[t].any():
                    idx = np.nonzero(truncated_only[t])[0]
                    V_final[t, idx] = pi_old.value(normalize_obs(np.stack(infos["final_obs"][idx]), obs_rms))
            V_last = pi_old.value(normalize_obs(next_obs, obs_rms))

            # ---- advantages and returns ----
            V_next = np.concatenate([values[1:], V_last[None]], 0)
            V_next = np.where(truncated_only, V_final, V_next)
            A_hat = gae(rewards, values, V_next, terminated, ended, args.gamma, args.gae_lambda)
            G = A_hat + values
            b_obs = torch.as_tensor(obs.reshape(batch_size, obs_dim), device=device)
            b_actions = torch.as_tensor(actions.reshape((batch_size,) + actions.shape[2:]), device=device)
            b_logp_old = torch.as_tensor(logp_old.reshape(-1), device=device)
            b_A = torch.as_tensor(A_hat.reshape(-1), device=device)
            b_G = torch.as_tensor(G.reshape(-1), device=device)
            if args.norm_adv:
                b_A = (b_A - b_A.mean()) / (b_A.std() + 1e-8)
            with torch.no_grad():
                b_head_old = agent.head(b_obs)

            # ---- policy: one trust-region step on theta ----
            policy_fn = make_policy_fn(agent, b_obs, b_actions, b_logp_old, b_A, b_head_old)
            step = trpo_step(theta, policy_fn, args)
            rejected += step["j"] < 0

            # ---- critic: epochs of Adam over shuffled mini-batches ----
            for _epoch in range(args.critic_epochs):
                perm = torch.randperm(batch_size, device=device)
                for start in range(0, batch_size, args.critic_minibatch_size):
                    mb = perm[start : start + args.critic_minibatch_size]
                    v_loss = value_loss(agent.value(b_obs[mb]), b_G[mb])
                    if not torch.isfinite(v_loss):
                        raise RunFault(f"non-finite loss at global step {global_step} (value {v_loss.item()})")
                    optimizer.zero_grad()
                    v_loss.backward()
                    optimizer.step()
            if not plumbing.all_finite(agent):  # a finite loss can still step to inf or NaN (a huge learning rate)
                raise RunFault(f"non-finite parameters after the update at global step {global_step}")

            # ---- log: exact KL and entropy over the whole batch, the step's numbers ----
            with torch.no_grad():
                b_head = agent.head(b_obs)
                d = agent.kl(b_head_old, b_head).mean().item()
                entropy = agent.entropy(b_head).mean()
            accepted = max(step["j"], 0)  # the expected improvement of the step taken (of the full step if none)
            run.update_done(global_step, {
                "charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/line_search_steps": step["j"],
                "charts/step_norm": step["step_norm"], "losses/policy_loss": -step["L"],
                "losses/surrogate_improvement": step["L"] - step["L_old"],
                "losses/expected_improvement": args.line_search_shrink**accepted * step["expected"],
                "losses/xFx": step["xFx"], "losses/kl_exact": d, "losses/value_loss": v_loss.item(),
                "losses/entropy": entropy.item(),
                "losses/explained_variance": plumbing.explained_variance(values.ravel(), G.ravel()),
            })  # fmt: skip
    if rejected:
        print(f"line search: {rejected} update(s) found no acceptable step and kept theta_old exactly")
    return run.end(envs)


def resolve_args(args: Args, discrete: bool) -> Args:
    """Fill the defaults that depend on the action space (a flag given > the preset > the default), then check that
    the values fit; --critic-minibatch-size 0 becomes the whole batch."""
    plumbing.check_common_args(args)
    defaults = DISCRETE_DEFAULTS if discrete else CONTINUOUS_DEFAULTS
    args = plumbing.fill_defaults(args, {**defaults, **PRESETS.get(args.preset, {})})
    batch_size = args.num_envs * args.num_steps
    if args.critic_minibatch_size == 0 and batch_size >= 1:
        args = dataclasses.replace(args, critic_minibatch_size=batch_size)
    plumbing.require(
        [
            (0.0 <= args.gamma <= 1.0, f"--gamma must lie in [0, 1], got {args.gamma}"),
            (0.0 <= args.gae_lambda <= 1.0, f"--gae-lambda must lie in [0, 1], got {args.gae_lambda}"),
            (args.num_envs >= 1 and args.num_steps >= 1, "--num-envs and --num-steps must be at least 1"),
            (
                args.critic_minibatch_size >= 1 and batch_size % args.critic_minibatch_size == 0,
                f"--critic-minibatch-size {args.critic_minibatch_size} must divide the batch num_envs*num_steps = "
                f"{batch_size} (or be 0: the whole batch)",
            ),
            (
                args.total_timesteps >= batch_size,
                f"--total-timesteps {args.total_timesteps} is less than one rollout ({batch_size} steps)",
            ),
            (args.max_kl > 0, f"--max-kl must be positive, got {args.max_kl}"),
            (args.cg_iters >= 1, "--cg-iters must be at least 1"),
            (args.cg_damping >= 0, "--cg-damping must be >= 0"),
            (args.line_search_steps >= 1, "--line-search-steps must be at least 1"),
            (
                0 < args.line_search_shrink < 1,
                f"--line-search-shrink must lie in (0, 1), got {args.line_search_shrink}",
            ),
            (0 <= args.accept_ratio < 1, f"--accept-ratio must lie in [0, 1), got {args.accept_ratio}"),
            (args.critic_epochs >= 1, "--critic-epochs must be at least 1"),
            (args.learning_rate > 0, "--learning-rate must be positive"),
            (math.isfinite(args.log_std_init), f"--log-std-init must be a finite number, got {args.log_std_init}"),
            (args.threads >= 1 and args.hidden_size >= 1, "--threads and --hidden-size must be at least 1"),
        ]
    )
    return args


def evaluate(ckpt: dict, episodes: int, seed: int, *more, **kw) -> np.ndarray:
    """Returns of the deterministic policy (argmax, or the mean action clipped to the bounds) over `episodes`
    episodes, episode k reset with seed + k; more: capture_video, video_folder, device, progress."""
    return plumbing.evaluate_actor_critic(Agent, ckpt, episodes, seed, *more, **kw)


if __name__ == "__main__":
    sys.exit(plumbing.script_cli(Args, main, __doc__))
