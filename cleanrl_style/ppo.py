"""Proximal Policy Optimisation (PPO): the clipped objective and the adaptive-KL penalty, in one file.

Notation of the study notes (see NOTATION.md):

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
    python cleanrl_style/ppo.py --env HalfCheetah-v5
    python cleanrl_style/ppo.py --env HalfCheetah-v5 --preset paper
    python cleanrl_style/ppo.py --env Walker2d-v5 --preset wide --compile
"""

import collections
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

ALGORITHM = "ppo"


@dataclass
class Args:
    env: Annotated[str, tyro.conf.arg(aliases=("--env-id",))] = "CartPole-v1"
    """gymnasium environment id (Box observations; Discrete or Box actions)"""
    seed: int = 1
    """seed of Python, numpy, torch and the environments"""
    preset: Literal["paper", "tianshou", "wide"] | None = None
    """a named set of settings for the flags not given (the PRESETS table in ppo.py: what each sets, and why)"""
    total_timesteps: int | None = None
    """environment steps to train for (default: 100,000 discrete, 1,000,000 continuous)"""
    num_envs: int | None = None
    """N, parallel environments (default: 8 discrete, 64 continuous)"""
    num_steps: int | None = None
    """T, steps per environment per rollout (default: 32 discrete, 32 continuous)"""
    update_epochs: int | None = None
    """epochs over the rollout per update (default: 10 discrete, 10 continuous)"""
    minibatch_size: int | None = None
    """samples per mini-batch; must divide N*T (default: 64 discrete, 64 continuous)"""
    learning_rate: float | None = None
    """alpha, Adam step size (default: 1e-3 discrete, 3e-4 continuous)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run"""
    gamma: float | None = None
    """gamma, discount factor in [0, 1] (default: 0.98 discrete, 0.99 continuous)"""
    gae_lambda: float | None = None
    """lambda of GAE in [0, 1] (default: 0.8 discrete, 0.95 continuous)"""
    loss: Literal["clip", "kl"] = "clip"
    """policy objective: clip (L^CLIP) or kl (adaptive-KL penalty)"""
    clip_eps: float = 0.2
    """epsilon, the clip range of rho in L^CLIP"""
    beta: float = 1.0
    """beta, initial KL penalty coefficient (--loss kl)"""
    kl_target: float = 0.01
    """d_targ, target KL of the adaptive-beta rule (--loss kl)"""
    kl_estimator: Literal["exact", "k1", "k2", "k3"] = "exact"
    """estimator of KL(pi_old || pi_theta) in the penalty (--loss kl); exact is the analytic KL"""
    norm_adv: bool | None = None
    """normalise A_hat over the batch: (A_hat - mean) / std (default: on discrete, off continuous)"""
    recompute_adv: bool | None = None
    """recompute A_hat and G with the critic as it is before every epoch after the first (default: off discrete, on
    continuous)"""
    clip_vloss: bool = False
    """clip the value loss around V_old with the range --clip-eps"""
    ent_coef: float = 0.0
    """c2, entropy bonus coefficient"""
    vf_coef: float | None = None
    """c1, value loss coefficient (default: 0.5 discrete, 0.25 continuous)"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this value (0 disables)"""
    target_kl: float | None = None
    """stop the update early once a mini-batch's k3 KL exceeds this (off by default)"""
    norm_obs: bool | None = None
    """normalise observations with running statistics (default: off discrete, on continuous)"""
    norm_reward: bool | None = None
    """scale rewards by the running std of the discounted return (default: off discrete, on continuous)"""
    hidden_size: int | None = None
    """width of the two tanh hidden layers of actor and critic (default: 64)"""
    log_std_init: float | None = None
    """log sigma of the Gaussian policy at the start, continuous actions (default: -0.5, sigma = 0.61)"""
    exp_name: str = Path(__file__).stem
    """experiment name, part of the run directory name"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """torch device: auto picks cuda when available"""
    torch_deterministic: bool = True
    """make cuDNN deterministic"""
    threads: int = 1
    """torch CPU threads"""
    compile: bool = False
    """torch.compile the update's mini-batch step (loss, gradient, clipping, Adam) into one program: faster updates
    after a one-off compilation of ~20-60 s (cached on disk for later runs); the same computation as without"""
    capture_video: bool = False
    """record videos of env 0 and of the final evaluation under --video-dir/{run_name}"""
    save_model: bool = True
    """write the checkpoint at the end, every --checkpoint-every steps and on Ctrl-C"""
    checkpoint_every: int = 100_000
    """write a checkpoint every this many environment steps (0: only at the end)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes at the end"""
    run_dir: str = "runs"
    """parent directory of the run directories"""
    video_dir: str = "videos"
    """parent directory of the video directories"""
    resume: str | None = None
    """checkpoint to resume from: its run, hyperparameters and state go on (--total-timesteps may extend it)"""
    progress: bool = True
    """show a progress bar on a terminal"""


# Defaults that depend on the action space. Discrete: tuned so that CartPole-v1 is solved fast.
# Continuous: Tianshou's MuJoCo PPO settings (its benchmark's examples/mujoco/mujoco_ppo.py; our reward scaling
# kept): 64 envs x 32 steps (the same 2048 steps per rollout), c1 0.25, no advantage normalisation, A_hat recomputed
# every epoch, log sigma -0.5 at the start. At 1M steps (3 seeds) they beat the PPO paper's settings on
# HalfCheetah-v5, Hopper-v5 and Walker2d-v5 (benchmarks/results/ppo_presets/); the paper's: --preset paper.
DISCRETE_DEFAULTS = dict(
    total_timesteps=100_000,
    num_envs=8,
    num_steps=32,
    update_epochs=10,
    minibatch_size=64,
    learning_rate=1e-3,
    gamma=0.98,
    gae_lambda=0.8,
    norm_obs=False,
    norm_reward=False,
    norm_adv=True,
    recompute_adv=False,
    vf_coef=0.5,
    log_std_init=0.0,
    hidden_size=64,
)
CONTINUOUS_DEFAULTS = dict(
    total_timesteps=1_000_000,
    num_envs=64,
    num_steps=32,
    update_epochs=10,
    minibatch_size=64,
    learning_rate=3e-4,
    gamma=0.99,
    gae_lambda=0.95,
    norm_obs=True,
    norm_reward=True,
    norm_adv=False,
    recompute_adv=True,
    vf_coef=0.25,
    log_std_init=-0.5,
    hidden_size=64,
)
# --preset NAME: another set of settings, measured against the defaults; each fills only the flags not given.
PRESETS = {
    # The PPO paper's MuJoCo settings (Schulman et al. 2017, Table 3), the continuous defaults until the sweep in
    # benchmarks/results/ppo_presets/; also SB3's PPO defaults (benchmarks.ppo_speed compares the two with them).
    "paper": dict(num_envs=1, num_steps=2048, vf_coef=0.5, norm_adv=True, recompute_adv=False, log_std_init=0.0),
    # Tianshou's MuJoCo PPO (its benchmark's examples/mujoco/mujoco_ppo.py): 64 envs x 32 steps (the same 2048
    # steps per rollout), c1 0.25, no advantage normalisation, A_hat recomputed every epoch, log sigma -0.5 at the
    # start: the continuous defaults, here for discrete actions or to name them.
    "tianshou": dict(num_envs=64, num_steps=32, vf_coef=0.25, norm_adv=False, recompute_adv=True, log_std_init=-0.5),
}
# Tianshou's settings with 256-unit hidden layers (rl-zoo3's width for its tuned Walker2d PPO): at 1M steps, 3 seeds,
# Walker2d-v5 3687 and HalfCheetah-v5 6890 against 3410 and 6166 with 64 units (benchmarks/results/ppo_presets/,
# suites ppo_walker_h256 and ppo_h256); Hopper-v5 worse, and ~2.6x slower.
PRESETS["wide"] = dict(PRESETS["tianshou"], hidden_size=256)


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


def make_env(env_id: str, idx: int, capture_video: bool, video_folder: str):
    def thunk():
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, video_folder, name_prefix="train", disable_logger=True)
        else:
            env = gym.make(env_id)
        return gym.wrappers.FlattenObservation(env)

    return thunk


class RunningMeanStd:
    """Running mean and variance of a stream of batches (parallel Welford / Chan et al.)."""

    def __init__(self, shape=()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        n = x.shape[0]
        batch_mean, batch_var = x.mean(0), (x.var(0) if n > 1 else 0.0)
        delta, total = batch_mean - self.mean, self.count + n
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var, self.count = m2 / total, total

    def state_dict(self) -> dict:
        return {"mean": torch.tensor(self.mean), "var": torch.tensor(self.var), "count": float(self.count)}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.var, self.count = d["mean"].numpy().copy(), d["var"].numpy().copy(), float(d["count"])


def normalize_obs(s: np.ndarray, obs_rms: RunningMeanStd | None, clip: float = 10.0) -> np.ndarray:
    """(s - mean) / sqrt(var + 1e-8), clipped to [-10, 10]; the identity without statistics."""
    if obs_rms is None:
        return s.astype(np.float32)
    return np.clip((s - obs_rms.mean) / np.sqrt(obs_rms.var + 1e-8), -clip, clip).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Networks and the policy's distributions
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


LOG_2PI = math.log(2 * math.pi)


def categorical_log_prob(logits: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of a Categorical over `logits`."""
    return F.log_softmax(logits, -1).gather(-1, a.long().unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_a pi(a|s) log pi(a|s)."""
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def categorical_kl(logits_old: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi_old || pi_theta) = sum_a pi_old(a|s) (log pi_old(a|s) - log pi_theta(a|s))."""
    logp_old, logp = F.log_softmax(logits_old, -1), F.log_softmax(logits, -1)
    return (logp_old.exp() * (logp_old - logp)).sum(-1)


def gaussian_log_prob(mu: torch.Tensor, log_std: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of a diagonal Gaussian N(mu, sigma^2), summed over action dimensions."""
    return (-0.5 * ((a - mu) / log_std.exp()) ** 2 - log_std - 0.5 * LOG_2PI).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """H = sum_i (log sigma_i + 1/2 log(2 pi e))."""
    return (log_std + 0.5 * (1.0 + LOG_2PI)).sum(-1)


def gaussian_kl(mu_old, log_std_old, mu, log_std) -> torch.Tensor:
    """Exact KL(N_old || N_theta) = sum_i log(s_i/s_old_i) + (s_old_i^2 + (mu_old_i - mu_i)^2) / (2 s_i^2) - 1/2."""
    return (
        log_std - log_std_old + ((2 * log_std_old).exp() + (mu_old - mu) ** 2) / (2 * (2 * log_std).exp()) - 0.5
    ).sum(-1)


class Agent(nn.Module):
    """Separate actor and critic MLPs (two tanh layers). The actor's output `head` is the
    Categorical's logits (discrete) or [mu, log sigma] of a Gaussian with state-independent sigma."""

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
            return categorical_log_prob(head, a)
        mu, log_std = head.chunk(2, -1)
        return gaussian_log_prob(mu, log_std, a)

    def entropy(self, head: torch.Tensor) -> torch.Tensor:
        return categorical_entropy(head) if self.discrete else gaussian_entropy(head.chunk(2, -1)[1])

    def kl(self, head_old: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Exact KL(pi_old(.|s) || pi_theta(.|s)) per state."""
        if self.discrete:
            return categorical_kl(head_old, head)
        return gaussian_kl(*head_old.chunk(2, -1), *head.chunk(2, -1))

    def mode(self, head: torch.Tensor) -> torch.Tensor:
        """The deterministic action: argmax of the logits, or the mean mu."""
        return head.argmax(-1) if self.discrete else head.chunk(2, -1)[0]


class RolloutPolicy:
    """pi_theta and V_phi for the rollout, in numpy, from a snapshot of the agent's weights.

    The same functions as Agent.head and Agent.value (tests check that log pi and V agree with them to
    float32 rounding), without PyTorch's per-operation overhead: one observation through 64-unit layers
    is ~30 us here against ~170 us for the same forward pass in torch. The snapshot does not follow the
    parameters: take a new one after every update. a ~ pi_theta(.|s) draws from `rng`."""

    def __init__(self, agent: Agent, rng: np.random.Generator):
        def weights(net: nn.Sequential) -> list:
            return [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy())
                    for m in net if isinstance(m, nn.Linear)]  # fmt: skip

        self.discrete, self.rng = agent.discrete, rng
        self.actor, self.critic = weights(agent.actor), weights(agent.critic)
        if not agent.discrete:
            self.log_std = agent.actor_logstd.detach().cpu().numpy().copy()
            self.std = np.exp(self.log_std)

    @staticmethod
    def mlp(x: np.ndarray, layers: list) -> np.ndarray:
        """tanh hidden layers, linear output: the forward pass of mlp()."""
        for W, b in layers[:-1]:
            x = np.tanh(x @ W + b)
        W, b = layers[-1]
        return x @ W + b

    def value(self, s: np.ndarray) -> np.ndarray:
        """V_phi(s)."""
        return self.mlp(s, self.critic)[:, 0]

    def act(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rollout's step: a ~ pi_theta(.|s), log pi_theta(a|s) and V(s). Discrete: a by the inverse CDF
        of softmax(logits); Gaussian: a = mu + sigma z and log pi = sum(-z^2/2 - log sigma - log(2 pi)/2)."""
        out = self.mlp(s, self.actor)
        if self.discrete:
            logp_all = out - out.max(-1, keepdims=True)
            logp_all -= np.log(np.exp(logp_all).sum(-1, keepdims=True))
            u = self.rng.random((len(out), 1), dtype=np.float32)
            a = np.minimum((np.exp(logp_all).cumsum(-1) < u).sum(-1), out.shape[-1] - 1)
            return a, logp_all[np.arange(len(a)), a], self.value(s)
        z = self.rng.standard_normal(out.shape, dtype=np.float32)
        return out + self.std * z, (-0.5 * z**2 - self.log_std - np.float32(0.5 * LOG_2PI)).sum(-1), self.value(s)


# ----------------------------------------------------------------------------------------------
# The algorithm's math
# ----------------------------------------------------------------------------------------------


def gae(r, V, V_next, terminated, ended, gamma: float, gae_lambda: float) -> np.ndarray:
    """Generalised advantage estimates over a rollout of shape (T, N).

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


def explained_variance(V: np.ndarray, G: np.ndarray) -> float:
    """1 - Var(G - V) / Var(G): 1 is a perfect critic, 0 no better than a constant."""
    var_G = np.var(G)
    return float("nan") if var_G == 0 else float(1.0 - np.var(G - V) / var_G)


# ----------------------------------------------------------------------------------------------
# Arguments and evaluation
# ----------------------------------------------------------------------------------------------


def minibatch_loss(agent: Agent, args: Args, s, a, logp_old, A_hat, G, V_old, head_old, beta: torch.Tensor):
    """The loss of one mini-batch, -L^{CLIP or KL} + c1 1/2 (V_phi(s_t) - G_t)^2 - c2 H, its two parts, and the
    diagnostics the loop logs of it: [k1, k3, clip fraction]. One function so that --compile can compile it
    whole (beta is a tensor so that a new value does not recompile it)."""
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
        if args.kl_estimator == "exact":
            kl = agent.kl(head_old, head)
        else:
            kl = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}[args.kl_estimator](log_rho)
        pg_loss = -(rho * A_hat).mean() + beta * kl.mean()
    v_loss = value_loss(agent.value(s), G, V_old, args.clip_eps if args.clip_vloss else None)
    loss = pg_loss + args.vf_coef * v_loss
    if args.ent_coef != 0:  # the bonus -c2 H (left out of the graph, not multiplied by 0, when c2 = 0)
        loss = loss - args.ent_coef * agent.entropy(head).mean()
    return loss, pg_loss, v_loss, diagnostics


def compiled_update_step(agent: Agent, optimizer: torch.optim.Adam, args: Args):
    """--compile: the update's mini-batch step as one compiled program. It does what the eager loop does with
    minibatch_loss, loss.backward(), clip_grad_norm_ and optimizer.step() -- the loss, its gradient (torch.func),
    the global gradient norm clipped to --max-grad-norm, and Adam's step written out -- in place on the agent's
    parameters and on the optimizer's own state tensors, so that checkpoints and resuming see the same state.
    As the eager loop, it leaves everything as it was when the loss is not finite or, with --target-kl, when the
    mini-batch's k3 exceeds it (the loop then stops; tests/test_ppo_math.py checks the step against the eager one).
    Returns step(s, a, logp_old, A_hat, G, V_old, head_old, beta) -> (loss, pg_loss, v_loss, diagnostics)."""
    names = [name for name, _ in agent.named_parameters()]
    params = [p for _, p in agent.named_parameters()]
    weights = [p.detach() for p in params]  # the same storage, outside autograd: the step writes into them
    for p in params:  # Adam's state as torch's (fused) Adam starts it, unless a checkpoint loaded one
        if not optimizer.state[p]:
            optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
    state = [optimizer.state[p] for p in params]
    group = optimizer.param_groups[0]
    (beta1, beta2), eps = group["betas"], group["eps"]
    lr = torch.zeros((), device=params[0].device)  # a tensor, so that annealing it does not recompile

    class Loss(nn.Module):  # torch.func.functional_call runs a module's forward with given weights: the loss's
        def __init__(self):
            super().__init__()
            self.agent = agent

        def forward(self, *batch):
            return minibatch_loss(self.agent, args, *batch)

    loss_module = Loss()

    def loss_and_aux(weights, batch):
        loss, pg_loss, v_loss, diagnostics = torch.func.functional_call(
            loss_module, {f"agent.{name}": w for name, w in zip(names, weights)}, batch
        )
        return loss, (loss, pg_loss, v_loss, diagnostics)

    grad_and_value = torch.func.grad(loss_and_aux, has_aux=True)

    def step(lr, *batch):
        grads, (loss, pg_loss, v_loss, diagnostics) = grad_and_value(weights, batch)
        take = torch.isfinite(loss)
        if args.target_kl is not None:
            take = take & (diagnostics[1] <= args.target_kl)
        if args.max_grad_norm > 0:  # clip_grad_norm_: scale all gradients so that their joint norm is at most the bound
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            grads = [g * torch.clamp(args.max_grad_norm / (norm + 1e-6), max=1.0) for g in grads]
        with torch.no_grad():
            for w, g, st in zip(weights, grads, state):  # Adam, as torch.optim.Adam computes it
                m, v, t = st["exp_avg"], st["exp_avg_sq"], st["step"]
                t_new = t + take.float()
                m_new = m.lerp(g, 1.0 - beta1)
                v_new = v * beta2 + (1.0 - beta2) * g * g
                denom = (v_new.sqrt() / (1.0 - beta2**t_new).sqrt()) + eps
                w_new = w - (lr / (1.0 - beta1**t_new)) * m_new / denom
                w.copy_(torch.where(take, w_new, w))
                m.copy_(torch.where(take, m_new, m))
                v.copy_(torch.where(take, v_new, v))
                t.copy_(t_new)
        return loss, pg_loss, v_loss, diagnostics

    compiled = torch.compile(step)

    def run(*batch):
        lr.fill_(group["lr"])
        return compiled(lr, *batch)

    return run


def resolve_args(args: Args, discrete: bool) -> Args:
    """Fill the defaults that depend on the action space, then check that the values fit."""
    check_common_args(args)
    defaults = DISCRETE_DEFAULTS if discrete else CONTINUOUS_DEFAULTS
    defaults = {**defaults, **PRESETS.get(args.preset, {})}  # a flag given > the preset > the default
    args = dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})
    batch_size = args.num_envs * args.num_steps
    checks = [
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
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return args


def build_agent(ckpt: dict, device: str = "cpu") -> tuple[Agent, RunningMeanStd | None, gym.Env]:
    """Rebuild the agent and the frozen observation statistics from a checkpoint."""
    obs_space, act_space = env_spaces(ckpt["env_id"])
    discrete = isinstance(act_space, gym.spaces.Discrete)
    obs_dim = int(np.prod(obs_space.shape))
    act_dim = int(act_space.n) if discrete else int(np.prod(act_space.shape))
    agent = Agent(obs_dim, act_dim, discrete, ckpt["args"]["hidden_size"]).to(device)
    agent.load_state_dict(ckpt["model"])
    obs_rms = None
    if ckpt["obs_rms"] is not None:
        obs_rms = RunningMeanStd(obs_dim)
        obs_rms.load_state_dict(ckpt["obs_rms"])
    return agent, obs_rms, act_space


def evaluate(
    ckpt: dict,
    episodes: int,
    seed: int,
    capture_video: bool = False,
    video_folder: str | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Returns of `episodes` episodes of the deterministic policy (argmax, or the mean action clipped to
    the bounds), with the checkpoint's observation statistics frozen. Episode k resets with seed + k."""
    agent, obs_rms, act_space = build_agent(ckpt, device)
    if capture_video:
        env = gym.make(ckpt["env_id"], render_mode="rgb_array")
        env = gym.wrappers.RecordVideo(
            env, video_folder, name_prefix="eval", episode_trigger=lambda e: e == 0, disable_logger=True
        )
    else:
        env = gym.make(ckpt["env_id"])
    env = gym.wrappers.FlattenObservation(env)
    returns = []
    for k in range(episodes):
        s, _ = env.reset(seed=seed + k)
        G, done = 0.0, False
        while not done:
            with torch.inference_mode():
                head = agent.head(torch.as_tensor(normalize_obs(s[None], obs_rms), device=device))
                a = agent.mode(head)[0].cpu().numpy()
            if not agent.discrete:
                a = np.clip(a, act_space.low, act_space.high)
            s, r, terminated, truncated, _ = env.step(a)
            G += float(r)
            done = terminated or truncated
        returns.append(G)
    env.close()
    return np.array(returns)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def main(args: Args, stop: "StopSignal | None" = None) -> int:
    """Train; return the process exit status (0 done, 1 stopped by a fault, 130 interrupted)."""
    t_start = time.time()
    stop = stop or StopSignal(install=False)
    given = {k for k in DISCRETE_DEFAULTS if getattr(args, k) is not None}
    args, ckpt = resume_args(args)
    obs_space, act_space = env_spaces(args.env)
    if not isinstance(obs_space, gym.spaces.Box) or not isinstance(act_space, (gym.spaces.Discrete, gym.spaces.Box)):
        raise UsageError(
            f"ppo needs Box observations and Discrete or Box actions; {args.env} has {obs_space} and {act_space}"
        )
    discrete = isinstance(act_space, gym.spaces.Discrete)
    args = resolve_args(args, discrete)
    device = torch.device(pick_device(args.device))
    kind = "discrete" if discrete else "continuous"
    marks = dict.fromkeys(given, " (flag)") | {k: " (preset)" for k in PRESETS.get(args.preset, {}) if k not in given}
    marks = dict.fromkeys(DISCRETE_DEFAULTS, " (saved)") if ckpt is not None else marks
    print(
        f"ppo on {args.env} ({kind} actions {act_space}); {kind} defaults, overridden where marked: "
        + ", ".join(f"{k}={getattr(args, k)}{marks.get(k, '')}" for k in DISCRETE_DEFAULTS)
        + f"; loss={args.loss}, device={device}"
    )
    N, T = args.num_envs, args.num_steps
    batch_size = N * T
    num_iterations = args.total_timesteps // batch_size
    if "total_timesteps" in given and num_iterations * batch_size != args.total_timesteps:  # a budget the user chose
        print(f"note: training {num_iterations * batch_size} steps, whole rollouts of N*T = {batch_size} steps")
    seed_everything(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.threads)
    headless_rendering()

    obs_dim = int(np.prod(obs_space.shape))
    act_dim = int(act_space.n) if discrete else int(np.prod(act_space.shape))
    try:
        agent = Agent(obs_dim, act_dim, discrete, args.hidden_size).to(device)
    except RuntimeError as e:  # out of memory for the networks asked for
        raise UsageError(f"cannot build the networks (--hidden-size {args.hidden_size}): {first_line(e)}") from None
    if not discrete:
        nn.init.constant_(agent.actor_logstd, args.log_std_init)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    obs_rms = RunningMeanStd(obs_dim) if args.norm_obs else None
    ret_rms = RunningMeanStd(()) if args.norm_reward else None
    beta, global_step, iteration = args.beta, 0, 0
    if ckpt is not None:
        agent.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if obs_rms is not None:
            obs_rms.load_state_dict(ckpt["obs_rms"])
        if ret_rms is not None:
            ret_rms.load_state_dict(ckpt["ret_rms"])
        beta, global_step, iteration = ckpt["beta"], ckpt["global_step"], ckpt["iteration"]
        print(f"resumed {args.resume} at global step {global_step}")
    update_step = compiled_update_step(agent, optimizer, args) if args.compile else None

    def checkpoint() -> dict:
        """The whole state of the run, copied (so that it stays the state of this moment)."""
        return snapshot({
            "format_version": CHECKPOINT_FORMAT, "algorithm": ALGORITHM, "env_id": args.env,
            "args": dataclasses.asdict(args), "global_step": global_step, "iteration": iteration,
            "model": agent.state_dict(), "optimizer": optimizer.state_dict(), "beta": beta,
            "obs_rms": obs_rms.state_dict() if obs_rms else None, "ret_rms": ret_rms.state_dict() if ret_rms else None,
        })  # fmt: skip

    # ---- run directory (nothing is written before this point) and environments ----
    run_path, writer = start_run(args, ckpt, t_start)
    ckpt_path = run_path / f"{args.exp_name}.pt"
    # N copies that autoreset in the same step, so that the true final observation of an episode is at hand
    video_folder = str(Path(args.video_dir) / run_path.name / "train")
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env, i, args.capture_video, video_folder) for i in range(N)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    envs.action_space.seed(args.seed)

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
    discounted = np.zeros(N)  # running discounted return, for the reward scale
    ep_return, ep_length = np.zeros(N), np.zeros(N, np.int64)
    monitor = Monitor(writer, args, global_step)
    last_good, status = checkpoint(), 0
    try:
        while iteration < num_iterations and not stop.requested.is_set():
            iteration += 1
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1) / num_iterations) * args.learning_rate

            # ---- rollout with pi_old ----
            pi_old = RolloutPolicy(agent, rng)
            for t in range(T):
                s = normalize_obs(next_obs, obs_rms)
                obs[t] = s
                a, logp_old[t], values[t] = pi_old.act(s)
                actions[t] = a
                env_a = a if discrete else np.clip(a, act_space.low, act_space.high)
                next_obs, r, term, trunc, infos = envs.step(env_a)
                global_step += N
                done = term | trunc
                ep_return += r
                ep_length += 1
                if obs_rms is not None:
                    obs_rms.update(next_obs)
                if ret_rms is not None:
                    discounted = discounted * args.gamma + r
                    ret_rms.update(discounted)
                    r = np.clip(r / np.sqrt(ret_rms.var + 1e-8), -10.0, 10.0)
                    discounted[done] = 0.0
                rewards[t], terminated[t], ended[t] = r, term, done
                truncated_only[t] = trunc & ~term
                if truncated_only[t].any():
                    idx = np.nonzero(truncated_only[t])[0]
                    obs_final[t, idx] = normalize_obs(np.stack(infos["final_obs"][idx]), obs_rms)
                    V_final[t, idx] = pi_old.value(obs_final[t, idx])
                for i in np.nonzero(done)[0]:
                    monitor.episode(ep_return[i], ep_length[i], global_step)
                    ep_return[i], ep_length[i] = 0.0, 0
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
                    if args.compile:  # the loss and the step below in one compiled program (taken there, or not)
                        loss, pg_loss, v_loss, mb_diagnostics = update_step(*batch, beta_t)
                    else:
                        loss, pg_loss, v_loss, mb_diagnostics = minibatch_loss(agent, args, *batch, beta_t)
                    diagnostics.append(mb_diagnostics)
                    if args.target_kl is not None and mb_diagnostics[1].item() > args.target_kl:
                        early_stop = True
                        break
                    if not torch.isfinite(loss):
                        losses = f"policy {pg_loss.item()}, value {v_loss.item()}"
                        raise RunFault(f"non-finite loss at global step {global_step} ({losses})")
                    if not args.compile:
                        optimizer.zero_grad()
                        loss.backward()
                        if args.max_grad_norm > 0:
                            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                        optimizer.step()
                    steps_done += 1
                if early_stop:
                    break
            # a finite loss can still take a step to inf or NaN parameters (a huge learning rate)
            if not all(torch.isfinite(p).all() for p in agent.parameters()):
                raise RunFault(f"non-finite parameters after the update at global step {global_step}")

            # ---- after the update: exact KL and entropy over the whole batch, the beta rule, diagnostics ----
            with torch.no_grad():
                b_head = agent.head(b_obs)
                d = agent.kl(b_head_old, b_head).mean().item()
                entropy = agent.entropy(b_head).mean()
            if args.loss == "kl":
                beta = adapt_beta(beta, d, args.kl_target)
            k1, k3, clipfrac = torch.stack(diagnostics).mean(0).tolist()
            for tag, value in [
                ("charts/learning_rate", optimizer.param_groups[0]["lr"]), ("charts/beta", beta),
                ("charts/update_minibatches", steps_done), ("losses/policy_loss", pg_loss.item()),
                ("losses/value_loss", v_loss.item()), ("losses/entropy", entropy.item()),
                ("losses/approx_kl", k3), ("losses/kl_k1", k1), ("losses/kl_k3", k3), ("losses/kl_exact", d),
                ("losses/clipfrac", clipfrac),
                ("losses/explained_variance", explained_variance(values.ravel(), G.ravel())),
            ]:  # fmt: skip
                writer.add_scalar(tag, value, global_step)
            monitor.update(global_step)
            previous_step, last_good = last_good["global_step"], checkpoint()
            if checkpoint_due(args, global_step, previous_step):
                save_checkpoint(ckpt_path, last_good)
    except RunFault as e:
        monitor.close()
        print(
            f"error: {e}; stopping with the last good state (global step {last_good['global_step']})", file=sys.stderr
        )
        status = 1
    monitor.close()
    envs.close()
    status = end_run(args, last_good, ckpt_path, writer, status, stop)
    writer.close()
    print(f"done in {time.time() - t_start:.1f} s: {last_good['global_step']} steps, run in {run_path}")
    return status


# ----------------------------------------------------------------------------------------------
# Plumbing: the same in every script of cleanrl_style/, byte for byte (tests/test_plumbing.py).
# Copy it from ppo.py into a new script; never edit one copy alone.
# ----------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1
RECENT_EPISODES = 20  # the progress bar shows the mean return of this many recent training episodes
# Flags a resumed run takes from the command line, and flags it may change (a longer run, another evaluation);
# every other flag must agree with the checkpoint's saved value.
RESUME_FROM_COMMAND_LINE = ("resume", "device", "progress", "threads", "compile")
RESUME_MAY_CHANGE = ("total_timesteps", "eval_episodes", "capture_video", "video_dir", "save_model", "checkpoint_every")


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2, before anything is written."""


class RunFault(Exception):
    """A fault during training (a non-finite loss or parameter, a checkpoint that cannot be written): reported
    as one line on stderr with exit status 1; the last good state is what the checkpoint keeps."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def env_spaces(env_id: str) -> tuple[gym.Space, gym.Space]:
    """Observation and action space of `env_id`, or a UsageError if it is unknown or cannot be made."""
    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        raise UsageError(f"unknown environment id '{env_id}' ({type(e).__name__})") from None
    try:
        env = gym.make(env_id)
    except Exception as e:  # registered, but a dependency is missing (Box2D for LunarLander) or it fails to build
        raise UsageError(f"cannot make '{env_id}': {first_line(e)}") from None
    spaces = env.observation_space, env.action_space
    env.close()
    return spaces


def writable_dir(path: str) -> bool:
    """True if `path` is a directory this process can write in, or one it can create."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def check_common_args(args) -> None:
    """The flags every script has: a seed numpy accepts, a name that is not a path, directories that can be written."""
    checks = [
        (0 <= args.seed < 2**32, f"--seed must lie in [0, 2^32 - 1], got {args.seed}"),
        (
            args.exp_name not in ("", ".", "..") and not set("/\\").intersection(args.exp_name),
            f"--exp-name must be a plain name without a path separator, got '{args.exp_name}'",
        ),
        (args.eval_episodes >= 0, "--eval-episodes must be >= 0"),
        (args.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
        (args.device != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but CUDA is not available"),
        (
            args.resume is not None or writable_dir(args.run_dir),
            f"--run-dir '{args.run_dir}' is not a writable directory",
        ),
        (not args.capture_video or writable_dir(args.video_dir), f"--video-dir '{args.video_dir}' is not writable"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def load_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # missing, unreadable
        raise UsageError(f"cannot load checkpoint '{path}': {first_line(e)}") from None
    except Exception as e:  # empty, truncated, text or random bytes, or more than tensors and plain data
        raise UsageError(f"'{path}' is not a checkpoint written by these scripts ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("algorithm") != ALGORITHM or not isinstance(ckpt.get("args"), dict):
        raise UsageError(f"'{path}' is not a {ALGORITHM} checkpoint")
    return ckpt


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Write atomically: a crash mid-write never leaves a half-written checkpoint behind, and a failed write (a full
    disk) leaves the previous checkpoint as it was and no temporary file."""
    tmp = path.with_suffix(".pt.tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise RunFault(f"cannot write checkpoint '{path}': {first_line(e)}") from None


def resume_args(args):
    """--resume PATH: (the checkpoint's args, the checkpoint); otherwise (args, None). The resumed run keeps its
    hyperparameters: a flag given with a value that contradicts the checkpoint is refused (a flag left at its
    default cannot be told from an absent one and is taken from the checkpoint)."""
    if args.resume is None:
        return args, None
    ckpt = load_checkpoint(args.resume)
    default = type(args)()
    saved = {f.name: ckpt["args"].get(f.name, getattr(default, f.name)) for f in dataclasses.fields(args)}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    given = {k: v for k, v in dataclasses.asdict(args).items() if v != getattr(default, k)}
    conflicts = [
        f"--{k.replace('_', '-')} {v} (saved: {saved[k]})"
        for k, v in given.items()
        if k not in RESUME_FROM_COMMAND_LINE + RESUME_MAY_CHANGE and v != saved[k]
    ]
    if conflicts:
        raise UsageError(
            "a resumed run keeps its saved hyperparameters; drop "
            + ", ".join(conflicts)
            + f" (with --resume, only --{', --'.join(k.replace('_', '-') for k in RESUME_MAY_CHANGE)} may change)"
        )
    kept = {k: getattr(args, k) for k in RESUME_FROM_COMMAND_LINE if k in saved}
    changed = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    return dataclasses.replace(default, **{**saved, **kept, **changed}), ckpt


def pick_device(device: str) -> str:
    """auto: cuda when available, else cpu."""
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def headless_rendering() -> None:
    """Render without a screen, unless the user chose otherwise: MuJoCo through EGL, pygame (classic control)
    through SDL's dummy video driver."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if "DISPLAY" not in os.environ:
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def start_run(args, ckpt: dict | None, t_start: float) -> tuple[Path, SummaryWriter]:
    """The run directory runs/{env}__{exp_name}__{seed}__{unix_time} (never shared: a second run started in the same
    second gets a suffix -2, -3, ...), or the resumed run's own; args.json; the TensorBoard writer, which on resume
    purges the events logged past the checkpoint's step (by a run killed after its last checkpoint)."""
    try:
        if ckpt is not None:
            run_path = Path(args.resume).parent
        else:
            name = f"{args.env.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(t_start)}"
            Path(args.run_dir).mkdir(parents=True, exist_ok=True)
            run_path, k = Path(args.run_dir) / name, 1
            while True:
                try:
                    run_path.mkdir()
                    break
                except FileExistsError:
                    k += 1
                    run_path = Path(args.run_dir) / f"{name}-{k}"
        (run_path / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        writer = SummaryWriter(str(run_path), purge_step=ckpt["global_step"] + 1 if ckpt is not None else None)
    except OSError as e:
        raise UsageError(f"cannot write the run directory under '{args.run_dir}': {first_line(e)}") from None
    table = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return run_path, writer


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) ask the training loop to stop at the end of the
    current update, which checkpoints and exits 130. Once `immediate` is set (the final evaluation), they interrupt
    at once with KeyboardInterrupt. Installed only in the main thread; `restore` puts the old handlers back."""

    def __init__(self, install: bool = True):
        self.requested = threading.Event()
        self.immediate = False
        self.previous = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        self.requested.set()
        if self.immediate:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class Monitor:
    """Finished training episodes to TensorBoard (charts/episodic_return and charts/episodic_length at their global
    step), charts/SPS, and a tqdm progress bar (steps, steps per second, mean return of the last RECENT_EPISODES
    episodes), shown only with --progress on a terminal."""

    def __init__(self, writer: SummaryWriter, args, global_step: int):
        self.writer, self.recent = writer, collections.deque(maxlen=RECENT_EPISODES)
        self.start_step, self.start_time = global_step, time.time()
        enabled = args.progress and sys.stderr.isatty()
        self.bar = tqdm(total=args.total_timesteps, initial=global_step, unit="step", disable=not enabled)

    def episode(self, G: float, length: int, global_step: int) -> None:
        self.writer.add_scalar("charts/episodic_return", G, global_step)
        self.writer.add_scalar("charts/episodic_length", length, global_step)
        self.recent.append(float(G))

    def update(self, global_step: int) -> None:
        """Log charts/SPS (steps per second since this process started training) and move the bar."""
        sps = (global_step - self.start_step) / max(time.time() - self.start_time, 1e-9)
        self.writer.add_scalar("charts/SPS", sps, global_step)
        if self.recent:
            self.bar.set_postfix_str(f"return {np.mean(self.recent):.1f}", refresh=False)
        self.bar.update(global_step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def snapshot(state):
    """A copy of a run's state that later training cannot change: tensors cloned, arrays copied, dicts, lists and
    tuples rebuilt, anything else deep-copied. The same as copy.deepcopy, about 5x faster on a state dict (A2C
    takes one after every update of a few dozen steps)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, np.ndarray):
        return state.copy()
    if isinstance(state, dict):  # the same kind of dict (a state_dict's OrderedDict keeps its _metadata)
        out = copy.copy(state)
        for k, v in state.items():
            out[k] = snapshot(v)
        return out
    if type(state) in (list, tuple):
        return type(state)(snapshot(v) for v in state)
    return copy.deepcopy(state)


def checkpoint_due(args, global_step: int, saved_step: int) -> bool:
    """A periodic checkpoint is due when the run crossed a multiple of --checkpoint-every since `saved_step`."""
    every = args.checkpoint_every
    return args.save_model and every > 0 and global_step // every > saved_step // every


def end_run(args, ckpt: dict, ckpt_path: Path, writer: SummaryWriter, status: int, stop: StopSignal) -> int:
    """The ending of every run: write the checkpoint `ckpt` (the last good state); if training was not stopped,
    evaluate the deterministic policy (eval/episodic_return). Returns the exit status: 0, 1 (a fault), 130."""
    if args.save_model:
        try:
            save_checkpoint(ckpt_path, ckpt)
            print(f"checkpoint: {ckpt_path} (global step {ckpt['global_step']})")
        except RunFault as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
    if stop.requested.is_set():
        resume = f"; resume with --resume {ckpt_path}" if args.save_model else ""
        print(f"interrupted at global step {ckpt['global_step']}{resume}", file=sys.stderr)
        return 130
    if status == 0 and args.eval_episodes > 0:
        stop.immediate = True
        try:
            video_folder = str(Path(args.video_dir) / ckpt_path.parent.name / "eval")
            device = pick_device(args.device)
            returns = evaluate(ckpt, args.eval_episodes, args.seed, args.capture_video, video_folder, device)
        except KeyboardInterrupt:
            print("interrupted during the final evaluation (the checkpoint is written)", file=sys.stderr)
            return 130
        writer.add_scalar("eval/episodic_return", returns.mean(), ckpt["global_step"])
        writer.add_scalar("eval/episodic_return_std", returns.std(), ckpt["global_step"])
        print(f"eval: {returns.mean():.2f} +- {returns.std():.2f} over {len(returns)} episodes")
    return status


def cli() -> int:
    """The command line: parse the flags, train, and turn bad input into one line on stderr with exit status 2."""
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    stop = StopSignal()
    try:
        return main(args, stop)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        stop.restore()


if __name__ == "__main__":
    sys.exit(cli())
