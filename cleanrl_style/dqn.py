"""Deep Q-Network (DQN) with Double DQN, Dueling networks, prioritised replay and n-step returns, in one file.

Notation of the study notes (see NOTATION.md in this folder, "Value-based" and "Beyond the notes"):

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

Run (Double DQN with 3-step returns are the defaults):
    python cleanrl_style/dqn.py --env CartPole-v1
    python cleanrl_style/dqn.py --env CartPole-v1 --no-double --n-step 1        (plain DQN: the notes' target)
    python cleanrl_style/dqn.py --env CartPole-v1 --dueling --prioritized      (all four variants)
    python cleanrl_style/dqn.py --env Acrobot-v1
    python cleanrl_style/dqn.py --env CartPole-v1 --compile                    (the gradient step compiled: faster)
"""

import copy
import dataclasses
import sys
from dataclasses import dataclass
from typing import Annotated, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import plumbing
from plumbing import RunFault

ALGORITHM = "dqn"


@dataclass
class Args(plumbing.RunArgs):  # the flags every script has (--env, --seed, --resume, ...) are in plumbing.RunArgs
    env: Annotated[str, tyro.conf.arg(aliases=("--env-id",))] = "CartPole-v1"
    """gymnasium environment id (Box observations, Discrete actions)"""
    # The defaults (tuned so that CartPole-v1 is solved fast), printed at start:
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
    compile: bool = False
    """torch.compile each gradient step into one program: the same computation, faster after a one-off ~10-60 s"""


# The hyperparameters printed at start: dqn's own flags, in the order of Args (--compile changes the speed only).
COMMON = {f.name for f in dataclasses.fields(plumbing.RunArgs)} | {"compile"}
HYPERPARAMETERS = tuple(f.name for f in dataclasses.fields(Args) if f.name not in COMMON)
LOG_EVERY = 250  # environment steps between two rows of charts/* and losses/* (and the last-good-state snapshot)


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


def epsilon_greedy(greedy, s: np.ndarray, epsilon: float, n_actions: int, rng) -> np.ndarray:
    """a_t per env: greedy(s_t) = argmax_a Q(s_t, a; theta) with probability 1 - epsilon, a uniform random action
    otherwise (the network is not run when every env explores)."""
    explore = rng.random(len(s)) < epsilon
    a = rng.integers(n_actions, size=len(s))
    if not explore.all():
        a = np.where(explore, a, greedy(s))
    return a


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


def q_loss(q_network: nn.Module, target_network: nn.Module, args: Args, s, a, G, s_next, discount, w=None) -> tuple:
    """L(theta) on a mini-batch, y from theta^- (Double: a' chosen by theta) with no gradient through it; returns
    (L, the mean of Q(s_t, a_t; theta), delta = y - Q(s_t, a_t; theta) (B,), the TD errors PER's priorities follow).
    w: PER's importance weights (B,), or None."""
    with torch.no_grad():
        Q_next_online = q_network(s_next) if args.double else None
        y = td_target(G, discount, target_network(s_next), Q_next_online)
    Q_sa = q_network(s).gather(-1, a[:, None]).squeeze(-1)
    loss = td_loss(Q_sa, y, args.loss, w)
    return loss, Q_sa.detach().mean(), (y - Q_sa).detach()


def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    """theta^- <- tau theta + (1 - tau) theta^- (tau = 1: a copy)."""
    with torch.no_grad():
        for p_target, p in zip(target_network.parameters(), q_network.parameters()):
            if tau == 1.0:
                p_target.copy_(p)
            else:
                p_target.lerp_(p, tau)


def true_next_obs(next_obs: np.ndarray, done: np.ndarray, infos: dict) -> np.ndarray:
    """s_{t+1} of each env (N, obs_dim): where an episode ended, its true final observation (infos["final_obs"] of
    gymnasium's same-step autoreset), not the next episode's first."""
    if not done.any():
        return next_obs
    s_next = next_obs.copy()
    s_next[done] = np.stack(infos["final_obs"][done])
    return s_next


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
    with np.errstate(over="ignore", under="ignore"):  # inf or 0 out of float range: update_priorities stops on it
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
        if not (np.isfinite(s).all() and np.isfinite(G).all() and np.isfinite(s_next).all()):  # kept out of the buffer
            raise RunFault("the env returned a non-finite observation or reward")
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

    def batch(self, idx: np.ndarray, device) -> tuple[torch.Tensor, ...]:
        """The transitions idx as tensors: s (B, obs_dim), a (B,), G (B,), s' (B, obs_dim), discount (B,)."""
        arrays = (self.obs, self.actions, self.G, self.next_obs, self.discount)
        return tuple(torch.as_tensor(x[idx], device=device) for x in arrays)

    def update_priorities(self, idx: np.ndarray, p: np.ndarray) -> None:
        if not (np.isfinite(p) & (p > 0)).all():  # (|delta| + eps_p)^alpha_p beyond float64: 0 or inf
            raise RunFault(f"a priority (|delta| + eps_p)^alpha_p out of float range ({p.min():.3g} to {p.max():.3g})")
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


def main(args: Args, stop: plumbing.StopSignal | None = None) -> int:
    """Train; return the process exit status (0 done, 1 stopped by a fault, 130 interrupted)."""
    given = {k for k in HYPERPARAMETERS if getattr(args, k) != getattr(Args(), k)}
    args, ckpt = plumbing.resume_args(args, ALGORITHM)
    obs_space, act_space = plumbing.env_spaces(args.env, ALGORITHM, obs=gym.spaces.Box, act=gym.spaces.Discrete)
    args = resolve_args(args)
    device = plumbing.setup(args)  # seeds, torch threads, headless rendering
    head = f"dqn on {args.env} ({act_space} actions); defaults, overridden where marked: "
    plumbing.announce(args, ckpt, head, HYPERPARAMETERS, given, tail=f"; device={device}")
    N = args.num_envs
    total = args.total_timesteps // N * N
    if total != args.total_timesteps:
        print(f"note: training {total} steps, whole vector steps of N = {N} envs")

    obs_dim, n_actions = int(np.prod(obs_space.shape)), int(act_space.n)
    sizes = f"--hidden-size {args.hidden_size}, --buffer-size {args.buffer_size}"
    q_network, target_network, rb = plumbing.build(
        lambda: networks_and_buffer(args, obs_dim, n_actions, device), sizes, built="the networks and buffer"
    )
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)
    global_step, grad_steps, target_updates = 0, 0, 0
    if ckpt is not None:
        plumbing.restore(ckpt, model=q_network, target_model=target_network, optimizer=optimizer, replay_buffer=rb)
        global_step, grad_steps, target_updates = ckpt["global_step"], ckpt["grad_steps"], ckpt["target_updates"]
        print(f"resumed {args.resume} at global step {global_step} with {rb.size} transitions in the buffer")
    greedy = plumbing.GreedyQ(q_network)  # argmax_a Q(s, a; theta) in numpy, on theta's own memory (speed only)
    update_step = gradient_step(q_network, target_network, optimizer, args)  # L(theta), then one step of Adam
    rng = np.random.default_rng([args.seed, global_step])  # epsilon-greedy and the mini-batches

    def state() -> dict:  # what a checkpoint holds of the run: of the buffer, its fill level (with_buffer adds it)
        return {"global_step": global_step, "grad_steps": grad_steps, "target_updates": target_updates,
                "model": q_network.state_dict(), "target_model": target_network.state_dict(),
                "optimizer": optimizer.state_dict(), "buffer_pos": rb.pos, "buffer_size": rb.size}  # fmt: skip

    def with_buffer(kept: dict) -> dict:  # a kept state's checkpoint: the buffer up to its fill level at that state
        return {**kept, "replay_buffer": rb.state_dict(kept["buffer_pos"], kept["buffer_size"])}

    run = plumbing.Run(args, ALGORITHM, ckpt, stop, evaluate, state, to_checkpoint=with_buffer)  # the run directory
    envs = run.vector_env(plumbing.make_env, N)
    n_step = NStepBuilder(N, args.n_step, args.gamma, obs_dim)

    s, _ = envs.reset(seed=[args.seed + global_step + i for i in range(N)])
    with run.fault_guard():
        while run.training() and global_step < total:  # blocks of LOG_EVERY steps, logged and kept as last good state
            block_end = min(total, (global_step // LOG_EVERY + 1) * LOG_EVERY)
            losses, q_means = [], []
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = run.learning_rate(global_step, total)
            while global_step < block_end:
                # ---- act epsilon-greedily, step the envs, store the n-step transitions ----
                epsilon = linear_schedule(global_step, total, args.epsilon_start, args.epsilon_end,
                                          args.epsilon_decay_fraction)  # fmt: skip
                a = epsilon_greedy(greedy, s, epsilon, n_actions, rng)
                next_obs, r, term, trunc, infos = envs.step(a)
                global_step += N
                run.episodes(r, term | trunc, global_step)
                emitted = n_step.add(s, a, r, true_next_obs(next_obs, term | trunc, infos), term, trunc)
                if emitted is not None:
                    rb.add(*emitted)
                s = next_obs

                # ---- gradient steps on the TD target: one per --train-frequency env steps after --learning-starts ----
                due = max(global_step - args.learning_starts, 0) // args.train_frequency - grad_steps
                if rb.size < args.batch_size:  # too few transitions for a mini-batch yet: skip these steps
                    grad_steps, due = grad_steps + due, 0
                per_beta = linear_schedule(global_step, total, args.per_beta, 1.0, 1.0)
                for _ in range(due):
                    idx, w = rb.sample(args.batch_size, rng, per_beta)
                    batch = rb.batch(idx, device) + (torch.as_tensor(w, device=device) if args.prioritized else None,)
                    loss, Q_mean, delta = update_step(*batch)  # theta <- Adam's step on grad L(theta)
                    if not torch.isfinite(loss):  # (the step was not taken)
                        raise RunFault(f"non-finite TD loss {loss.item()} at global step {global_step}")
                    grad_steps += 1
                    if args.prioritized:
                        rb.update_priorities(idx, per_priority(delta.cpu().numpy(), args.per_eps, args.per_alpha))
                    losses.append(loss.item())
                    q_means.append(Q_mean.item())

                # ---- target network: every --target-network-frequency env steps, apart from the train check ----
                if grad_steps > 0 and every(global_step - N, global_step, args.target_network_frequency):
                    update_target(target_network, q_network, args.tau)
                    target_updates += 1

            # ---- after the block: theta checked, the block logged and kept as the last good state ----
            if not plumbing.all_finite(q_network):  # a finite loss can still step to inf or NaN (a huge learning rate)
                raise RunFault(f"non-finite parameters after the gradient steps up to global step {global_step}")
            scalars = {"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/epsilon": epsilon,
                       "charts/grad_steps": grad_steps, "charts/target_updates": target_updates,
                       "charts/buffer_size": rb.size}  # fmt: skip
            if args.prioritized:
                scalars["charts/per_beta"] = per_beta
            if losses:
                scalars |= {"losses/td_loss": np.mean(losses), "losses/q_values": np.mean(q_means)}
            run.update_done(global_step, scalars)
    return run.end(envs)


def resolve_args(args: Args) -> Args:
    """Check that the values fit (dqn's defaults do not depend on the spaces)."""
    plumbing.check_common_args(args)
    plumbing.require(
        [
            (0.0 <= args.gamma <= 1.0, f"--gamma must lie in [0, 1], got {args.gamma}"),
            (args.num_envs >= 1, "--num-envs must be at least 1"),
            (
                args.total_timesteps >= args.num_envs,
                f"--total-timesteps {args.total_timesteps} is less than one vector step ({args.num_envs} steps)",
            ),
            (args.learning_rate > 0, "--learning-rate must be positive"),
            (
                1 <= args.batch_size <= args.buffer_size,
                f"--batch-size {args.batch_size} must lie in [1, --buffer-size {args.buffer_size}]",
            ),
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
    )
    return args


def networks_and_buffer(args: Args, obs_dim: int, n_actions: int, device: torch.device) -> tuple:
    """Q(.; theta), its copy Q(.; theta^-) and the empty replay buffer."""
    q_network = QNetwork(obs_dim, n_actions, args.hidden_size, args.dueling).to(device)
    return q_network, copy.deepcopy(q_network), ReplayBuffer(args.buffer_size, obs_dim, args.prioritized)


def gradient_step(q_network: nn.Module, target_network: nn.Module, optimizer: torch.optim.Adam, args: Args):
    """update_step(*batch): q_loss on a mini-batch, then theta <- Adam's step on grad L(theta), the gradient norm
    clipped to --max-grad-norm; theta^- and, with --double, theta give y under no_grad. The step (plumbing's) is
    torch's loop, or with --compile the same step as one compiled program; it is not taken when L is not finite."""
    loss = lambda q, *batch: q_loss(q, target_network, args, *batch)  # noqa: E731
    return plumbing.make_gradient_step(q_network, optimizer, loss, args.max_grad_norm, args.compile)


def evaluate(
    ckpt: dict,
    episodes: int,
    seed: int,
    capture_video: bool = False,
    video_folder: str | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Returns of `episodes` episodes of the greedy policy argmax_a Q(s, a; theta). Episode k resets with seed + k."""
    obs_space, act_space = plumbing.env_spaces(ckpt["env_id"])
    a = ckpt["args"]
    q_network = QNetwork(int(np.prod(obs_space.shape)), int(act_space.n), a["hidden_size"], a["dueling"]).to(device)
    q_network.load_state_dict(ckpt["model"])
    greedy = plumbing.GreedyQ(q_network)  # argmax_a Q(s, a; theta), as in training
    env = plumbing.eval_env(ckpt["env_id"], capture_video, video_folder)
    return plumbing.play_episodes(env, lambda s: int(greedy(s[None])[0]), episodes, seed, progress)


if __name__ == "__main__":
    sys.exit(plumbing.script_cli(Args, main, __doc__))
