"""Proximal Policy Optimisation (PPO): the clipped objective and the adaptive-KL penalty, in one file.

Notation of the study notes (see NOTATION.md in this folder):

    rollout      T steps of N envs with pi_old, storing s_t, a_t, r_t, log pi_old(a_t|s_t), V(s_t)
    TD residual  delta_t = r_t + gamma V(s_{t+1}) - V(s_t)             (no bootstrap past a termination)
    GAE          A_hat_t = delta_t + gamma lambda A_hat_{t+1}          (the sum stops at an episode end)
    return       G_t = A_hat_t + V_old(s_t)                            (the critic's target)
    ratio        rho_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)
    PPO-Clip     L^CLIP = E[min(rho_t A_hat_t, clip(rho_t, 1 - eps, 1 + eps) A_hat_t)]
    PPO-KL       L^KL   = E[rho_t A_hat_t] - beta KL(pi_old || pi_theta),
                 after each update: d < d_targ / 1.5 -> beta / 2,  d > 1.5 d_targ -> 2 beta
    KL estimates k1 = -log rho,  k2 = 1/2 (log rho)^2,  k3 = (rho - 1) - log rho
    total loss   -L^{CLIP or KL} + c1 * 1/2 (V_phi(s_t) - G_t)^2 - c2 * H[pi_theta(.|s_t)]

When an episode is cut by a time limit (truncation) the MDP did not end there, so delta_t bootstraps
from V of the true final observation; after a termination it never bootstraps.

Run:
    python cleanrl_style/ppo.py --env CartPole-v1
    python cleanrl_style/ppo.py --env CartPole-v1 --loss kl --kl-estimator k3
    python cleanrl_style/ppo.py --env HalfCheetah-v5            (--preset paper: the PPO paper's settings)
    python cleanrl_style/ppo.py --env Walker2d-v5 --preset wide --compile
"""

import math
import sys
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

import plumbing
from plumbing import RolloutPolicy, RunFault, normalize_obs

ALGORITHM = "ppo"


@dataclass
class Args(plumbing.RunArgs):  # the flags every script has (--env, --seed, --resume, ...) are in plumbing.RunArgs
    preset: Literal["paper", "tianshou", "wide"] | None = None
    """a named set of settings for the flags not given (the PRESETS table in ppo.py: what each sets, and why)"""
    total_timesteps: int | None = None
    """environment steps to train for (default: 100,000 discrete, 1,000,000 continuous)"""
    num_envs: int | None = None
    """N, parallel environments (default: 8 discrete, 64 continuous)"""
    num_steps: int | None = None
    """T, steps per environment per rollout (default: 32)"""
    update_epochs: int | None = None
    """epochs over the rollout per update (default: 10)"""
    minibatch_size: int | None = None
    """samples per mini-batch; must divide N*T (default: 64)"""
    learning_rate: float | None = None
    """alpha, Adam step size, 1e-4 to 3e-3 (default: 1e-3 discrete, 3e-4 continuous)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run"""
    gamma: float | None = None
    """gamma, discount factor in [0, 1] (default: 0.98 discrete, 0.99 continuous)"""
    gae_lambda: float | None = None
    """lambda of GAE in [0, 1]; 0 gives the TD residual (default: 0.8 discrete, 0.95 continuous)"""
    loss: Literal["clip", "kl"] = "clip"
    """policy objective: clip (L^CLIP) or kl (adaptive-KL penalty)"""
    clip_eps: float = 0.2
    """epsilon, the clip range of rho in L^CLIP; 0.1-0.3"""
    beta: float = 1.0
    """beta, initial KL penalty coefficient (--loss kl)"""
    kl_target: float = 0.01
    """d_targ, target KL of the adaptive-beta rule (--loss kl); 0.003-0.03"""
    kl_estimator: Literal["exact", "k1", "k2", "k3"] = "exact"
    """estimator of KL(pi_old || pi_theta) in the penalty (--loss kl); exact is the analytic KL"""
    norm_adv: bool | None = None
    """normalise A_hat over the batch: (A_hat - mean) / std (default: on discrete, off continuous)"""
    recompute_adv: bool | None = None
    """recompute A_hat and G with the critic before each epoch after the first (default: off discrete, on continuous)"""
    clip_vloss: bool = False
    """clip the value loss around V_old with the range --clip-eps"""
    ent_coef: float = 0.0
    """c2, entropy bonus coefficient; 0-0.01"""
    vf_coef: float | None = None
    """c1, value loss coefficient (default: 0.5 discrete, 0.25 continuous)"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this value (0 disables)"""
    target_kl: float | None = None
    """stop the update early once a mini-batch's k3 KL exceeds this (default: off)"""
    norm_obs: bool | None = None
    """normalise observations with running statistics (default: off discrete, on continuous)"""
    norm_reward: bool | None = None
    """scale rewards by the running std of the discounted return (default: off discrete, on continuous)"""
    hidden_size: int | None = None
    """width of the two tanh hidden layers of actor and critic (default: 64)"""
    log_std_init: float | None = None
    """log sigma of the Gaussian policy at the start, continuous actions (default: -0.5, sigma = 0.61)"""
    compile: bool = False
    """torch.compile each mini-batch step (loss, gradient, clipping, Adam) into one program: the same computation,
    faster after a one-off compilation of ~20-60 s"""


# Defaults by action space: (discrete, continuous). Discrete: tuned to solve CartPole-v1 fast. Continuous: Tianshou's
# MuJoCo PPO (our reward scaling kept), better than the PPO paper's settings (--preset paper) at 1M steps on
# HalfCheetah-v5, Hopper-v5 and Walker2d-v5 (benchmarks/results/ppo_presets/).
DEFAULTS = {  # fmt: skip
    "total_timesteps": (100_000, 1_000_000),
    "num_envs": (8, 64),
    "num_steps": (32, 32),
    "update_epochs": (10, 10),
    "minibatch_size": (64, 64),
    "learning_rate": (1e-3, 3e-4),
    "gamma": (0.98, 0.99),
    "gae_lambda": (0.8, 0.95),
    "norm_obs": (False, True),
    "norm_reward": (False, True),
    "norm_adv": (True, False),
    "recompute_adv": (False, True),
    "vf_coef": (0.5, 0.25),
    "log_std_init": (0.0, -0.5),
    "hidden_size": (64, 64),
}
DISCRETE_DEFAULTS = {k: v[0] for k, v in DEFAULTS.items()}
CONTINUOUS_DEFAULTS = {k: v[1] for k, v in DEFAULTS.items()}
# --preset NAME fills the flags not given: paper = the PPO paper's MuJoCo settings (Schulman et al. 2017, Table 3, and
# SB3's); tianshou = the continuous defaults, by name; wide = tianshou with 256-unit layers (rl-zoo3's width):
# Walker2d-v5 3687 and HalfCheetah-v5 6890 against 3410 and 6166 at 1M steps, Hopper-v5 worse, ~2.6x slower.
PRESETS = {
    "paper": dict(num_envs=1, num_steps=2048, vf_coef=0.5, norm_adv=True, recompute_adv=False, log_std_init=0.0),
    "tianshou": dict(num_envs=64, num_steps=32, vf_coef=0.25, norm_adv=False, recompute_adv=True, log_std_init=-0.5),
}
PRESETS["wide"] = dict(PRESETS["tianshou"], hidden_size=256)


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
# The algorithm's math
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


def clip_objective(rho: torch.Tensor, A_hat: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """Per-step terms of L^CLIP: min(rho A_hat, clip(rho, 1 - eps, 1 + eps) A_hat)."""
    return torch.min(rho * A_hat, torch.clamp(rho, 1.0 - clip_eps, 1.0 + clip_eps) * A_hat)


def kl_k1(log_rho: torch.Tensor) -> torch.Tensor:
    """k1 = -log r with r = rho: unbiased estimate of KL(pi_old || pi_theta), high variance."""
    return -log_rho


def kl_k2(log_rho: torch.Tensor) -> torch.Tensor:
    """k2 = 1/2 (log r)^2: biased, but its gradient is the true KL's at theta = theta_old."""
    return 0.5 * log_rho**2


def kl_k3(log_rho: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r: unbiased, low variance, never negative."""
    return torch.expm1(log_rho) - log_rho


def adapt_beta(beta: float, d: float, kl_target: float) -> float:
    """The PPO paper's rule: d < d_targ / 1.5 -> beta / 2; d > 1.5 d_targ -> 2 beta; else unchanged."""
    if d < kl_target / 1.5:
        return beta / 2.0
    if d > kl_target * 1.5:
        return beta * 2.0
    return beta


def value_loss(V: torch.Tensor, G: torch.Tensor, V_old: torch.Tensor, clip_eps: float | None) -> torch.Tensor:
    """1/2 (V - G)^2, or with clipping 1/2 max((V - G)^2, (V_clip - G)^2), V_clip = V_old + clip(V - V_old, +-eps)."""
    loss = (V - G) ** 2
    if clip_eps is not None:
        V_clip = V_old + torch.clamp(V - V_old, -clip_eps, clip_eps)
        loss = torch.max(loss, (V_clip - G) ** 2)
    return 0.5 * loss.mean()


def minibatch_loss(agent: Agent, args: Args, s, a, logp_old, A_hat, G, V_old, head_old, beta: torch.Tensor):
    """The loss of one mini-batch, -L^{CLIP or KL} + c1 1/2 (V_phi(s_t) - G_t)^2 - c2 H, its two parts, and the
    diagnostics the loop logs of it: [k1, k3, clip fraction]. (beta is a tensor so that --compile, which compiles
    this function whole, does not recompile it for a new value.)"""
    head = agent.head(s)
    log_rho = agent.log_prob(head, a) - logp_old
    rho = log_rho.exp()
    with torch.no_grad():
        diagnostics = torch.stack(
            [kl_k1(log_rho).mean(), kl_k3(log_rho).mean(), ((rho - 1.0).abs() > args.clip_eps).float().mean()]
        )
    if args.loss == "clip":
        pg_loss = -clip_objective(rho, A_hat, args.clip_eps).mean()
    else:
        estimator = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}.get(args.kl_estimator)  # None: the exact KL
        kl = agent.kl(head_old, head) if estimator is None else estimator(log_rho)
        pg_loss = -(rho * A_hat).mean() + beta * kl.mean()
    v_loss = value_loss(agent.value(s), G, V_old, args.clip_eps if args.clip_vloss else None)
    loss = pg_loss + args.vf_coef * v_loss
    if args.ent_coef != 0:  # the bonus -c2 H (left out of the graph, not multiplied by 0, when c2 = 0)
        loss = loss - args.ent_coef * agent.entropy(head).mean()
    return loss, pg_loss, v_loss, diagnostics


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
    head = f"ppo on {args.env} ({kind} actions {act_space}); {kind} defaults, overridden where marked: "
    tail = f"; loss={args.loss}, device={device}"
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
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    obs_rms = plumbing.RunningMeanStd(obs_dim) if args.norm_obs else None
    ret_rms = plumbing.RunningMeanStd(()) if args.norm_reward else None
    beta, global_step, iteration = args.beta, 0, 0
    if ckpt is not None:
        plumbing.restore(ckpt, model=agent, optimizer=optimizer, obs_rms=obs_rms, ret_rms=ret_rms)
        beta, global_step, iteration = ckpt["beta"], ckpt["global_step"], ckpt["iteration"]
        print(f"resumed {args.resume} at global step {global_step}")
    update_step = gradient_step(agent, optimizer, args)  # the mini-batch loss, then one step of Adam

    def state() -> dict:  # what a checkpoint holds of the run (plumbing adds the format, algorithm, env id and args)
        return {"global_step": global_step, "iteration": iteration, "model": agent.state_dict(),
                "optimizer": optimizer.state_dict(), "beta": beta, "obs_rms": obs_rms and obs_rms.state_dict(),
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
    obs_final = np.zeros((T, N, obs_dim), np.float32)  # that observation (normalised), for --recompute-adv
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
                    obs_final[t, idx] = normalize_obs(np.stack(infos["final_obs"][idx]), obs_rms)
                    V_final[t, idx] = pi_old.value(obs_final[t, idx])
            s_last = normalize_obs(next_obs, obs_rms)
            V_last = pi_old.value(s_last)

            # ---- advantages and returns ----
            def advantages(V, V_last, V_final):
                """A_hat and G = A_hat + V over the rollout, from the critic's V(s_t), V(s_T) and V(final obs)."""
                V_next = np.concatenate([V[1:], V_last[None]], 0)
                V_next = np.where(truncated_only, V_final, V_next)
                A_hat = gae(rewards, V, V_next, terminated, ended, args.gamma, args.gae_lambda)
                b_A = torch.as_tensor(A_hat.reshape(-1), device=device)
                if args.norm_adv:
                    b_A = (b_A - b_A.mean()) / (b_A.std() + 1e-8)
                return A_hat + V, b_A

            G, b_A = advantages(values, V_last, V_final)
            b_obs = torch.as_tensor(obs.reshape(batch_size, obs_dim), device=device)
            b_actions = torch.as_tensor(actions.reshape((batch_size,) + actions.shape[2:]), device=device)
            b_logp_old = torch.as_tensor(logp_old.reshape(-1), device=device)
            b_G = torch.as_tensor(G.reshape(-1), device=device)
            b_V = torch.as_tensor(values.reshape(-1), device=device)
            with torch.no_grad():
                b_head_old = agent.head(b_obs)
            beta_t = torch.tensor(beta, device=device)

            # ---- update: epochs over shuffled mini-batches ----
            diagnostics = []  # per mini-batch: k1, k3, clip fraction
            steps_done, early_stop = 0, False
            for epoch in range(args.update_epochs):
                if args.recompute_adv and epoch > 0:  # A_hat and G again, from the critic as the last epoch left it
                    with torch.no_grad():
                        V_now = [
                            agent.value(torch.as_tensor(x, device=device)).cpu().numpy()
                            for x in (obs, s_last, obs_final)
                        ]
                    G_now, b_A = advantages(*V_now)
                    b_G = torch.as_tensor(G_now.reshape(-1), device=device)
                perm = torch.randperm(batch_size, device=device)
                for start in range(0, batch_size, args.minibatch_size):
                    mb = perm[start : start + args.minibatch_size]
                    batch = (b_obs[mb], b_actions[mb], b_logp_old[mb], b_A[mb], b_G[mb], b_V[mb], b_head_old[mb])
                    loss, pg_loss, v_loss, mb_diagnostics = update_step(*batch, beta_t)  # theta <- Adam's step
                    diagnostics.append(mb_diagnostics)
                    if args.target_kl is not None and mb_diagnostics[1].item() > args.target_kl:
                        early_stop = True  # (the step was not taken)
                        break
                    if not torch.isfinite(loss):  # (the step was not taken)
                        losses = f"policy {pg_loss.item()}, value {v_loss.item()}"
                        raise RunFault(f"non-finite loss at global step {global_step} ({losses})")
                    steps_done += 1
                if early_stop:
                    break
            if not plumbing.all_finite(agent):  # a finite loss can still step to inf or NaN (a huge learning rate)
                raise RunFault(f"non-finite parameters after the update at global step {global_step}")

            # ---- after the update: exact KL and entropy over the whole batch, the beta rule, diagnostics ----
            with torch.no_grad():
                b_head = agent.head(b_obs)
                d = agent.kl(b_head_old, b_head).mean().item()
                entropy = agent.entropy(b_head).mean()
            if args.loss == "kl":
                beta = adapt_beta(beta, d, args.kl_target)
            k1, k3, clipfrac = torch.stack(diagnostics).mean(0).tolist()
            run.update_done(global_step, {
                "charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/beta": beta,
                "charts/update_minibatches": steps_done, "losses/policy_loss": pg_loss.item(),
                "losses/value_loss": v_loss.item(), "losses/entropy": entropy.item(),
                "losses/approx_kl": k3, "losses/kl_k1": k1, "losses/kl_k3": k3, "losses/kl_exact": d,
                "losses/clipfrac": clipfrac,
                "losses/explained_variance": plumbing.explained_variance(values.ravel(), G.ravel()),
            })  # fmt: skip
    return run.end(envs)


def resolve_args(args: Args, discrete: bool) -> Args:
    """Fill the defaults that depend on the action space (a flag given > the preset > the default), then check that
    the values fit."""
    plumbing.check_common_args(args)
    defaults = DISCRETE_DEFAULTS if discrete else CONTINUOUS_DEFAULTS
    args = plumbing.fill_defaults(args, {**defaults, **PRESETS.get(args.preset, {})})
    batch_size = args.num_envs * args.num_steps
    plumbing.require(
        [
            (0.0 <= args.gamma <= 1.0, f"--gamma must lie in [0, 1], got {args.gamma}"),
            (0.0 <= args.gae_lambda <= 1.0, f"--gae-lambda must lie in [0, 1], got {args.gae_lambda}"),
            (args.num_envs >= 1 and args.num_steps >= 1, "--num-envs and --num-steps must be at least 1"),
            (
                args.minibatch_size >= 1 and batch_size % args.minibatch_size == 0,
                f"--minibatch-size {args.minibatch_size} does not divide the batch num_envs*num_steps = {batch_size}",
            ),
            (
                args.total_timesteps >= batch_size,
                f"--total-timesteps {args.total_timesteps} is less than one rollout ({batch_size} steps)",
            ),
            (args.update_epochs >= 1, "--update-epochs must be at least 1"),
            (args.learning_rate > 0, "--learning-rate must be positive"),
            (args.clip_eps > 0, "--clip-eps must be positive"),
            (args.beta >= 0 and args.kl_target > 0, "--beta must be >= 0 and --kl-target > 0"),
            (args.target_kl is None or args.target_kl > 0, "--target-kl must be positive"),
            (args.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (args.vf_coef >= 0, "--vf-coef must be >= 0"),
            (math.isfinite(args.log_std_init), f"--log-std-init must be a finite number, got {args.log_std_init}"),
            (args.threads >= 1 and args.hidden_size >= 1, "--threads and --hidden-size must be at least 1"),
        ]
    )
    return args


def gradient_step(agent: Agent, optimizer: torch.optim.Adam, args: Args):
    """update_step(*mini_batch, beta): minibatch_loss, then theta <- Adam's step on its gradient, the global norm
    clipped to --max-grad-norm. The step (plumbing's) is torch's loop, or with --compile the same step as one
    compiled program; it is not taken when the loss is not finite or, with --target-kl, when k3 exceeds it."""
    accept = (lambda out: out[3][1] <= args.target_kl) if args.target_kl is not None else None
    loss = lambda module, *batch: minibatch_loss(module, args, *batch)  # noqa: E731
    return plumbing.make_gradient_step(agent, optimizer, loss, args.max_grad_norm, args.compile, accept)


def evaluate(ckpt: dict, episodes: int, seed: int, *more, **kw) -> np.ndarray:
    """Returns of the deterministic policy (argmax, or the mean action clipped to the bounds) over `episodes`
    episodes, episode k reset with seed + k; more: capture_video, video_folder, device, progress."""
    return plumbing.evaluate_actor_critic(Agent, ckpt, episodes, seed, *more, **kw)


if __name__ == "__main__":
    sys.exit(plumbing.script_cli(Args, main, __doc__))
