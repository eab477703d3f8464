"""Deep Q-Network (DQN) with Double DQN, Dueling networks, prioritised replay and n-step returns, in one file.

Notation of the study notes (see NOTATION.md, "Value-based" and "Beyond the notes"):

    epsilon-greedy  a_t = argmax_a Q(s_t, a; theta) with probability 1 - epsilon, a random action otherwise
    replay          (s_t, a_t, G_t^(n), s_{t+k}, gamma^k) in preallocated arrays; random mini-batches
    n-step return   G_t^(n) = sum_{j<k} gamma^j r_{t+j},  k = min(n, steps to the episode's end)
    target          y = G_t^(n) + gamma^k (1 - terminated) max_a' Q(s_{t+k}, a'; theta^-)
    Double DQN      y = G_t^(n) + gamma^k (1 - terminated) Q(s_{t+k}, argmax_a' Q(s_{t+k}, a'; theta); theta^-)
    loss            L(theta) = E[w_i l(y - Q(s_t, a_t; theta))],  l = Huber or squared,  w_i = 1 without PER
    target network  theta^- <- tau theta + (1 - tau) theta^-  every --target-network-frequency steps (tau = 1: copy)
    Dueling         Q(s, a) = V(s) + A(s, a) - (1/|A|) sum_a' A(s, a')
    prioritised     p_i = (|delta_i| + eps_p)^alpha_p,  P(i) = p_i / sum_k p_k,
    replay          w_i = (C P(i))^-beta_p / max_j w_j  (max over the sampled mini-batch), beta_p annealed to 1

The n-step sum stops at an episode's end, per env of the vector: after a termination the target never
bootstraps (gamma^k (1 - terminated) = 0); after a time-limit truncation the MDP did not end, so it bootstraps
from the true final observation (gymnasium's autoreset in the same step puts it in infos["final_obs"]) with
gamma^k for the k steps taken.

Run:
    python cleanrl_style/dqn.py --env CartPole-v1
    python cleanrl_style/dqn.py --env CartPole-v1 --double --dueling --prioritized --n-step 3
    python cleanrl_style/dqn.py --env Acrobot-v1
"""

import collections
import copy
import dataclasses
import json
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

ALGORITHM = "dqn"


@dataclass
class Args:
    env: Annotated[str, tyro.conf.arg(aliases=("--env-id",))] = "CartPole-v1"
    """gymnasium environment id (Box observations, Discrete actions)"""
    seed: int = 1
    """seed of Python, numpy, torch and the environments"""
    total_timesteps: int = 30_000
    """environment steps to train for (all envs together)"""
    num_envs: int = 1
    """N, parallel environments; each vector step stores N transitions"""
    learning_rate: float = 1e-3
    """alpha, Adam step size; 1e-4-3e-3"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run"""
    buffer_size: int = 100_000
    """C, replay capacity in transitions (the oldest are overwritten); 1e4-1e6"""
    gamma: float = 0.99
    """gamma, discount factor in [0, 1]"""
    tau: float = 1.0
    """tau, target update theta^- <- tau theta + (1 - tau) theta^-; 1 is a hard copy, 0.005-0.05 Polyak"""
    target_network_frequency: int = 100
    """update theta^- every this many environment steps (counted apart from --train-frequency); 1-10,000"""
    batch_size: int = 64
    """transitions per mini-batch; 32-256"""
    learning_starts: int = 1_000
    """environment steps of epsilon-greedy play before the first gradient step; 100-10,000"""
    train_frequency: int = 1
    """one gradient step per this many environment steps (all envs together); 1-10"""
    epsilon_start: float = 1.0
    """epsilon of epsilon-greedy at the start, in [0, 1]"""
    epsilon_end: float = 0.01
    """epsilon at the end of the decay, in [0, 1]"""
    epsilon_decay_fraction: float = 0.2
    """fraction of the run over which epsilon decays linearly from start to end; 0.05-0.5"""
    loss: Literal["huber", "mse"] = "huber"
    """l, the TD loss: huber (smooth L1, delta = 1) or mse (squared error)"""
    max_grad_norm: float = 10.0
    """clip the global gradient norm to this value (0 disables)"""
    hidden_size: int = 128
    """width of the two ReLU hidden layers of Q (dueling: the torso and each stream)"""
    double: bool = True
    """Double DQN: choose a' with theta, evaluate it with theta^-"""
    dueling: bool = False
    """Dueling network: separate V and A streams after a shared torso"""
    prioritized: bool = False
    """proportional prioritised replay (Schaul et al. 2016) with a sum tree"""
    per_alpha: float = 0.6
    """alpha_p, priority exponent of prioritised replay (0: uniform); 0.4-0.7"""
    per_beta: float = 0.4
    """beta_p at the start, annealed linearly to 1 over the run; 0.4-0.6"""
    per_eps: float = 0.01
    """eps_p, added to |delta| so that no transition has zero priority"""
    n_step: int = 3
    """n, steps of the n-step return; 1-5"""
    exp_name: str = Path(__file__).stem
    """experiment name, part of the run directory name"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """torch device: auto picks cuda when available"""
    torch_deterministic: bool = True
    """make cuDNN deterministic"""
    threads: int = 1
    """torch CPU threads"""
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


# The hyperparameters printed at start (tuned so that CartPole-v1 is solved fast).
HYPERPARAMETERS = (
    "total_timesteps", "num_envs", "learning_rate", "anneal_lr", "buffer_size", "gamma", "tau",
    "target_network_frequency", "batch_size", "learning_starts", "train_frequency", "epsilon_start", "epsilon_end",
    "epsilon_decay_fraction", "loss", "max_grad_norm", "hidden_size", "double", "dueling", "prioritized", "per_alpha",
    "per_beta", "per_eps", "n_step",
)  # fmt: skip
LOG_EVERY = 250  # environment steps between two rows of charts/* and losses/* (and the last-good-state snapshot)


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


# ----------------------------------------------------------------------------------------------
# The Q-network
# ----------------------------------------------------------------------------------------------


def dueling_aggregate(V: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Q(s, a) = V(s) + A(s, a) - (1/|A|) sum_a' A(s, a'); V (B, 1), A (B, |A|) -> Q (B, |A|)."""
    return V + A - A.mean(-1, keepdim=True)


class QNetwork(nn.Module):
    """Q(s, .; theta): two ReLU layers and a linear head, or (--dueling) one shared ReLU layer, then a V stream and
    an A stream of one ReLU layer and a linear output each."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int, dueling: bool):
        super().__init__()
        self.dueling = dueling
        self.torso = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU())
        if dueling:
            self.V = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            self.A = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_actions))
        else:
            self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_actions))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        h = self.torso(s)
        if self.dueling:
            return dueling_aggregate(self.V(h), self.A(h))
        return self.head(h)


# ----------------------------------------------------------------------------------------------
# The algorithm's math
# ----------------------------------------------------------------------------------------------


def linear_schedule(step: int, total: int, start: float, end: float, decay_fraction: float) -> float:
    """Linear decay from start to end over the first decay_fraction of the run, then constant."""
    duration = decay_fraction * total
    if duration <= 0:
        return end
    return start + (end - start) * min(step / duration, 1.0)


def td_target(G: torch.Tensor, discount: torch.Tensor, Q_next_target: torch.Tensor, Q_next_online=None):
    """y = G + discount * Q(s', a*; theta^-), with discount = gamma^k (1 - terminated), shapes (B,) and (B, |A|).

    a* = argmax_a' Q(s', a'; theta^-) (DQN), or argmax_a' Q(s', a'; theta) when Q_next_online is given (Double)."""
    a_star = (Q_next_target if Q_next_online is None else Q_next_online).argmax(-1, keepdim=True)
    return G + discount * Q_next_target.gather(-1, a_star).squeeze(-1)


def td_loss(Q_sa: torch.Tensor, y: torch.Tensor, kind: str, w: torch.Tensor | None = None) -> torch.Tensor:
    """E[w_i l(y_i - Q(s_i, a_i))]: l is the Huber loss (delta = 1) or the squared error; w_i = 1 without PER."""
    if kind == "huber":
        l = F.smooth_l1_loss(Q_sa, y, reduction="none")
    else:
        l = (y - Q_sa) ** 2
    return l.mean() if w is None else (w * l).mean()


class NStepBuilder:
    """Per env of the vector, a window of the last n (s, a, r); it emits (s_t, a_t, G_t^(n), s_{t+k}, gamma^k)
    transitions, k <= n, with discount = 0 after a termination.

    A full window emits its oldest entry with k = n and s_{t+n} the observation after the newest step. When an
    episode ends (terminated or truncated), every pending entry of that env is emitted with the sum cut at the end,
    s_{t+k} the true final observation and discount gamma^k (truncated) or 0 (terminated); the window is emptied, so
    no sum runs into the next episode or into another env. With n = 1 this is the one-step transition."""

    def __init__(self, num_envs: int, n: int, gamma: float, obs_dim: int):
        self.n, self.gamma = n, gamma
        self.obs = np.zeros((num_envs, n, obs_dim), np.float32)  # (N, n, obs_dim)
        self.actions = np.zeros((num_envs, n), np.int64)  # (N, n)
        self.rewards = np.zeros((num_envs, n), np.float64)  # (N, n)
        self.count = np.zeros(num_envs, np.int64)  # (N,) entries in each window
        self.gamma_pow = gamma ** np.arange(n + 1)  # gamma^0 .. gamma^n

    def add(self, s, a, r, s_next, terminated, truncated) -> tuple:
        """One vector step: s (N, obs_dim), a, r, terminated, truncated (N,), s_next (N, obs_dim) the observation
        after the step (on an episode's end: the true final one). Returns (s, a, G, s', discount) arrays of the
        emitted transitions, first dimension the number emitted."""
        envs = np.arange(len(s))
        c = self.count
        self.obs[envs, c], self.actions[envs, c], self.rewards[envs, c] = s, a, r
        self.count = c = c + 1
        out = []
        full = (c == self.n) & ~(terminated | truncated)
        if full.any():
            G = self.rewards[full] @ self.gamma_pow[: self.n]
            discount = np.full(len(G), self.gamma_pow[self.n])
            out.append((self.obs[full, 0], self.actions[full, 0], G, s_next[full], discount))
            self.obs[full, :-1], self.actions[full, :-1] = self.obs[full, 1:], self.actions[full, 1:]
            self.rewards[full, :-1] = self.rewards[full, 1:]
            self.count[full] -= 1
        for i in np.nonzero(terminated | truncated)[0]:
            k = int(c[i])
            steps = np.arange(k, 0, -1)  # entry j sums the k - j steps left to the end
            G = np.array([self.rewards[i, j:k] @ self.gamma_pow[: k - j] for j in range(k)])
            discount = np.zeros(k) if terminated[i] else self.gamma_pow[steps]
            out.append((self.obs[i, :k], self.actions[i, :k], G, np.repeat(s_next[i : i + 1], k, 0), discount))
            self.count[i] = 0
        if not out:
            return None
        return tuple(np.concatenate(x) for x in zip(*out))


class SumTree:
    """A binary tree over `capacity` leaves (rounded up to a power of two) whose every node holds the sum of its
    children: the total priority is the root, and the leaf holding the prefix sum v is found in log2(capacity) steps.
    Leaves hold p_i = (|delta_i| + eps_p)^alpha_p; empty leaves hold 0 and are never drawn."""

    def __init__(self, capacity: int):
        self.size = 1 << max(int(capacity - 1).bit_length(), 0)  # leaves, a power of two
        self.nodes = np.zeros(2 * self.size)  # node k has children 2k, 2k + 1; the root is 1, leaves size..2 size-1

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def leaves(self, idx: np.ndarray) -> np.ndarray:
        return self.nodes[self.size + idx]

    def update(self, idx: np.ndarray, p: np.ndarray) -> None:
        """Set the leaves idx to p (a later duplicate wins) and recompute the sums on their paths to the root."""
        k = self.size + np.asarray(idx)
        self.nodes[k] = p
        while k[0] > 1:  # every index is on the same level, so they reach the root together
            k = np.unique(k // 2)
            self.nodes[k] = self.nodes[2 * k] + self.nodes[2 * k + 1]

    def find(self, v: np.ndarray) -> np.ndarray:
        """Indices of the leaves whose prefix-sum intervals [sum_{j<i} p_j, sum_{j<=i} p_j) contain the values v."""
        k = np.ones(len(v), np.int64)
        v = np.array(v, np.float64)
        while k[0] < self.size:
            left = self.nodes[2 * k]
            right = (v >= left) & (self.nodes[2 * k + 1] > 0)  # a value rounded past the total stays in the left
            v = np.where(right, v - left, v)
            k = 2 * k + right
        return k - self.size

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Stratified proportional sampling: one draw uniform in each of batch_size equal slices of [0, total).
        Returns the indices and their probabilities P(i) = p_i / sum_k p_k."""
        total = self.total
        v = (np.arange(batch_size) + rng.random(batch_size)) * (total / batch_size)
        idx = self.find(np.minimum(v, np.nextafter(total, 0)))
        return idx, self.leaves(idx) / total


def per_priority(delta: np.ndarray, per_eps: float, per_alpha: float) -> np.ndarray:
    """p_i = (|delta_i| + eps_p)^alpha_p, the leaf value of a transition after its TD error delta_i."""
    return (np.abs(delta) + per_eps) ** per_alpha


def importance_weights(P: np.ndarray, n: int, per_beta: float) -> np.ndarray:
    """w_i = (n P(i))^-beta_p / max_j w_j over the sampled mini-batch (n transitions stored): the weights only scale
    updates down, and the largest of each mini-batch is 1 (the PER paper's normalisation, per its author)."""
    w = (n * P) ** -per_beta
    return w / w.max()


class ReplayBuffer:
    """C transitions (s, a, G, s', discount) in preallocated numpy arrays, a ring that overwrites the oldest;
    with `prioritized`, a SumTree of their priorities, new transitions entering at the largest priority so far."""

    def __init__(self, capacity: int, obs_dim: int, prioritized: bool):
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.obs = np.zeros((capacity, obs_dim), np.float32)  # (C, obs_dim) s_t
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)  # (C, obs_dim) s_{t+k}
        self.actions = np.zeros(capacity, np.int64)  # (C,) a_t
        self.G = np.zeros(capacity, np.float32)  # (C,) n-step return
        self.discount = np.zeros(capacity, np.float32)  # (C,) gamma^k (1 - terminated)
        self.tree = SumTree(capacity) if prioritized else None
        self.max_priority = 1.0

    def add(self, s, a, G, s_next, discount) -> None:
        idx = (self.pos + np.arange(len(a))) % self.capacity
        self.obs[idx], self.actions[idx], self.G[idx], self.next_obs[idx], self.discount[idx] = (
            s, a, G, s_next, discount
        )  # fmt: skip
        if self.tree is not None:
            self.tree.update(idx, np.full(len(idx), self.max_priority))
        self.pos = int((self.pos + len(a)) % self.capacity)
        self.size = min(self.size + len(a), self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator, per_beta: float) -> tuple[np.ndarray, np.ndarray]:
        """Indices of a mini-batch and their importance weights (all 1 for uniform sampling)."""
        if self.tree is None:
            return rng.integers(self.size, size=batch_size), np.ones(batch_size, np.float32)
        idx, P = self.tree.sample(batch_size, rng)
        return idx, importance_weights(P, self.size, per_beta).astype(np.float32)

    def update_priorities(self, idx: np.ndarray, p: np.ndarray) -> None:
        self.tree.update(idx, p)
        self.max_priority = max(self.max_priority, float(p.max()))

    def state_dict(self, pos: int, size: int) -> dict:
        """The first `size` transitions (all of them once the ring is full) and their priorities, as tensors."""
        d = {k: torch.from_numpy(getattr(self, k)[:size].copy()) for k in ("obs", "next_obs", "actions", "G")}
        d.update(discount=torch.from_numpy(self.discount[:size].copy()), pos=pos, size=size)
        if self.tree is not None:
            d.update(priorities=torch.from_numpy(self.tree.leaves(np.arange(size))), max_priority=self.max_priority)
        return d

    def load_state_dict(self, d: dict) -> None:
        size = d["size"]
        for k in ("obs", "next_obs", "actions", "G", "discount"):
            getattr(self, k)[:size] = d[k].numpy()
        self.pos, self.size = d["pos"], size
        if self.tree is not None:
            self.tree.update(np.arange(size), d["priorities"].numpy())
            self.max_priority = d["max_priority"]


def every(step_before: int, step_after: int, period: int) -> bool:
    """True when a multiple of `period` lies in (step_before, step_after]: a step counter that moves by N per
    vector step still fires once per period (a test `step % period == 0` nested inside the train-frequency
    check fires only at common multiples, CleanRL #322)."""
    return step_after // period > step_before // period


# ----------------------------------------------------------------------------------------------
# Arguments and evaluation
# ----------------------------------------------------------------------------------------------


def resolve_args(args: Args, discrete: bool) -> Args:
    """Check that the values fit (dqn's defaults do not depend on the spaces)."""
    check_common_args(args)
    checks = [
        (0.0 <= args.gamma <= 1.0, f"--gamma must lie in [0, 1], got {args.gamma}"),
        (args.num_envs >= 1, "--num-envs must be at least 1"),
        (
            args.total_timesteps >= args.num_envs,
            f"--total-timesteps {args.total_timesteps} is less than one vector step ({args.num_envs} steps)",
        ),
        (args.learning_rate > 0, "--learning-rate must be positive"),
        (args.buffer_size >= 1 and args.batch_size >= 1, "--buffer-size and --batch-size must be at least 1"),
        (0.0 < args.tau <= 1.0, f"--tau must lie in (0, 1], got {args.tau}"),
        (args.target_network_frequency >= 1, "--target-network-frequency must be at least 1"),
        (args.learning_starts >= 0, "--learning-starts must be >= 0"),
        (args.train_frequency >= 1, "--train-frequency must be at least 1"),
        (0.0 <= args.epsilon_start <= 1.0 and 0.0 <= args.epsilon_end <= 1.0, "epsilon must lie in [0, 1]"),
        (0.0 <= args.epsilon_decay_fraction <= 1.0, "--epsilon-decay-fraction must lie in [0, 1]"),
        (args.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
        (args.per_alpha >= 0, "--per-alpha must be >= 0"),
        (0.0 <= args.per_beta <= 1.0, f"--per-beta must lie in [0, 1], got {args.per_beta}"),
        (args.per_eps > 0, "--per-eps must be positive"),
        (args.n_step >= 1, "--n-step must be at least 1"),
        (args.threads >= 1 and args.hidden_size >= 1, "--threads and --hidden-size must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return args


def evaluate(
    ckpt: dict,
    episodes: int,
    seed: int,
    capture_video: bool = False,
    video_folder: str | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Returns of `episodes` episodes of the greedy policy argmax_a Q(s, a; theta). Episode k resets with seed + k."""
    obs_space, act_space = env_spaces(ckpt["env_id"])
    a = ckpt["args"]
    q_network = QNetwork(int(np.prod(obs_space.shape)), int(act_space.n), a["hidden_size"], a["dueling"]).to(device)
    q_network.load_state_dict(ckpt["model"])
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
                a_t = int(q_network(torch.as_tensor(s[None], dtype=torch.float32, device=device)).argmax(-1)[0])
            s, r, terminated, truncated, _ = env.step(a_t)
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
    default = Args()
    given = {k for k in HYPERPARAMETERS if getattr(args, k) != getattr(default, k)}
    args, ckpt = resume_args(args)
    obs_space, act_space = env_spaces(args.env)
    if not isinstance(obs_space, gym.spaces.Box) or not isinstance(act_space, gym.spaces.Discrete):
        raise UsageError(f"dqn needs Box observations and Discrete actions; {args.env} has {obs_space} and {act_space}")
    args = resolve_args(args, True)
    device = torch.device(pick_device(args.device))
    mark = " (saved)" if ckpt is not None else " (flag)"
    print(
        f"dqn on {args.env} ({act_space} actions); defaults, overridden where marked: "
        + ", ".join(f"{k}={getattr(args, k)}{mark if k in given or ckpt else ''}" for k in HYPERPARAMETERS)
        + f"; device={device}"
    )
    N = args.num_envs
    total = args.total_timesteps // N * N
    if total != args.total_timesteps:
        print(f"note: training {total} steps, whole vector steps of N = {N} envs")
    seed_everything(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.threads)
    headless_rendering()

    obs_dim, n_actions = int(np.prod(obs_space.shape)), int(act_space.n)
    try:
        q_network = QNetwork(obs_dim, n_actions, args.hidden_size, args.dueling).to(device)
        target_network = copy.deepcopy(q_network)
        rb = ReplayBuffer(args.buffer_size, obs_dim, args.prioritized)
    except (RuntimeError, MemoryError) as e:  # out of memory for the networks or the buffer asked for
        raise UsageError(
            f"cannot build the networks and buffer (--hidden-size {args.hidden_size}, --buffer-size "
            f"{args.buffer_size}): {first_line(e)}"
        ) from None
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)
    global_step, grad_steps, target_updates = 0, 0, 0
    if ckpt is not None:
        q_network.load_state_dict(ckpt["model"])
        target_network.load_state_dict(ckpt["target_model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rb.load_state_dict(ckpt["replay_buffer"])
        global_step, grad_steps, target_updates = ckpt["global_step"], ckpt["grad_steps"], ckpt["target_updates"]
        print(f"resumed {args.resume} at global step {global_step} with {rb.size} transitions in the buffer")
    rng = np.random.default_rng([args.seed, global_step])  # epsilon-greedy and the mini-batches

    def state() -> dict:
        """The run's state but the buffer's contents (its fill level only), copied: the last good state."""
        return snapshot({
            "format_version": CHECKPOINT_FORMAT, "algorithm": ALGORITHM, "env_id": args.env,
            "args": dataclasses.asdict(args), "global_step": global_step, "grad_steps": grad_steps,
            "target_updates": target_updates, "model": q_network.state_dict(),
            "target_model": target_network.state_dict(), "optimizer": optimizer.state_dict(),
            "buffer_pos": rb.pos, "buffer_size": rb.size,
        })  # fmt: skip

    def checkpoint(s: dict) -> dict:
        """A state with the buffer's transitions up to its fill level at that state."""
        return {**s, "replay_buffer": rb.state_dict(s["buffer_pos"], s["buffer_size"])}

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
    n_step = NStepBuilder(N, args.n_step, args.gamma, obs_dim)

    s, _ = envs.reset(seed=[args.seed + global_step + i for i in range(N)])
    ep_return, ep_length = np.zeros(N), np.zeros(N, np.int64)
    monitor = Monitor(writer, args, global_step)
    last_good, status = state(), 0
    try:
        while global_step < total and not stop.requested.is_set():
            block_end = min(total, (global_step // LOG_EVERY + 1) * LOG_EVERY)
            losses, q_means = [], []
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - global_step / total) * args.learning_rate
            while global_step < block_end:
                # ---- act epsilon-greedily, step the envs, store the n-step transitions ----
                epsilon = linear_schedule(global_step, total, args.epsilon_start, args.epsilon_end,
                                          args.epsilon_decay_fraction)  # fmt: skip
                explore = rng.random(N) < epsilon
                a = rng.integers(n_actions, size=N)
                if not explore.all():
                    with torch.inference_mode():
                        greedy = q_network(torch.as_tensor(s, dtype=torch.float32, device=device)).argmax(-1)
                    a = np.where(explore, a, greedy.cpu().numpy())
                next_obs, r, term, trunc, infos = envs.step(a)
                global_step += N
                done = term | trunc
                s_next = next_obs  # on an episode's end: the true final observation, not the reset one
                if done.any():
                    s_next = next_obs.copy()
                    s_next[done] = np.stack(infos["final_obs"][done])
                emitted = n_step.add(s, a, r, s_next, term, trunc)
                if emitted is not None:
                    rb.add(*emitted)
                ep_return += r
                ep_length += 1
                for i in np.nonzero(done)[0]:
                    monitor.episode(ep_return[i], ep_length[i], global_step)
                    ep_return[i], ep_length[i] = 0.0, 0
                s = next_obs

                # ---- gradient steps: one per --train-frequency env steps after --learning-starts ----
                due = max(global_step - args.learning_starts, 0) // args.train_frequency - grad_steps
                if rb.size < args.batch_size:  # too few transitions for a mini-batch yet: skip these steps
                    grad_steps, due = grad_steps + due, 0
                per_beta = linear_schedule(global_step, total, args.per_beta, 1.0, 1.0)
                for _ in range(due):
                    idx, w = rb.sample(args.batch_size, rng, per_beta)
                    b_obs = torch.as_tensor(rb.obs[idx], device=device)
                    b_next = torch.as_tensor(rb.next_obs[idx], device=device)
                    with torch.no_grad():
                        Q_next_online = q_network(b_next) if args.double else None
                        y = td_target(torch.as_tensor(rb.G[idx], device=device),
                                      torch.as_tensor(rb.discount[idx], device=device),
                                      target_network(b_next), Q_next_online)  # fmt: skip
                    Q_sa = q_network(b_obs).gather(-1, torch.as_tensor(rb.actions[idx], device=device)[:, None])
                    Q_sa = Q_sa.squeeze(-1)
                    loss = td_loss(Q_sa, y, args.loss, torch.as_tensor(w, device=device) if args.prioritized else None)
                    if not torch.isfinite(loss):
                        raise RunFault(f"non-finite TD loss {loss.item()} at global step {global_step}")
                    optimizer.zero_grad()
                    loss.backward()
                    if args.max_grad_norm > 0:
                        nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)
                    optimizer.step()
                    grad_steps += 1
                    if args.prioritized:
                        delta = (y - Q_sa).detach().cpu().numpy()
                        rb.update_priorities(idx, per_priority(delta, args.per_eps, args.per_alpha))
                    losses.append(loss.item())
                    q_means.append(Q_sa.mean().item())

                # ---- target network: every --target-network-frequency env steps, apart from the train check ----
                if grad_steps > 0 and every(global_step - N, global_step, args.target_network_frequency):
                    with torch.no_grad():
                        for p_target, p in zip(target_network.parameters(), q_network.parameters()):
                            if args.tau == 1.0:
                                p_target.copy_(p)
                            else:
                                p_target.lerp_(p, args.tau)
                    target_updates += 1

            # a finite loss can still take a step to inf or NaN parameters (a huge learning rate)
            if not all(torch.isfinite(p).all() for p in q_network.parameters()):
                raise RunFault(f"non-finite parameters after the gradient steps up to global step {global_step}")
            for tag, value in [
                ("charts/learning_rate", optimizer.param_groups[0]["lr"]), ("charts/epsilon", epsilon),
                ("charts/grad_steps", grad_steps), ("charts/target_updates", target_updates),
                ("charts/buffer_size", rb.size),
            ] + ([("charts/per_beta", per_beta)] if args.prioritized else []) + (
                [("losses/td_loss", np.mean(losses)), ("losses/q_values", np.mean(q_means))] if losses else []
            ):  # fmt: skip
                writer.add_scalar(tag, value, global_step)
            monitor.update(global_step)
            previous_step, last_good = last_good["global_step"], state()
            if checkpoint_due(args, global_step, previous_step):
                save_checkpoint(ckpt_path, checkpoint(last_good))
    except RunFault as e:
        monitor.close()
        print(
            f"error: {e}; stopping with the last good state (global step {last_good['global_step']})", file=sys.stderr
        )
        status = 1
    monitor.close()
    envs.close()
    status = end_run(args, checkpoint(last_good), ckpt_path, writer, status, stop)
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
