"""Tabular SARSA (and Expected SARSA): on-policy TD control with an epsilon-greedy policy, in one file.

Notation of the study notes (see NOTATION.md):

    SARSA        Q(s_t, a_t) <- Q(s_t, a_t) + alpha (r_t + gamma Q(s_{t+1}, a_{t+1}) - Q(s_t, a_t))
    Expected     Q(s_t, a_t) <- Q(s_t, a_t) + alpha (r_t + gamma sum_a' pi(a'|s_{t+1}) Q(s_{t+1}, a') - Q(s_t, a_t))
    TD error     delta_t = target - Q(s_t, a_t)
    epsilon-greedy: argmax_a Q(s, a) with probability 1 - epsilon, a uniformly random action otherwise

a_{t+1} is the action the epsilon-greedy policy really takes next, chosen before the update: SARSA
learns Q^pi of the policy that explores (on-policy), so it prices in the exploration's cost. Expected
SARSA (--expected) replaces the sampled a_{t+1} by its expectation under pi. At a terminal s_{t+1}
the bootstrap term is 0; at a time-limit truncation it is not (the MDP did not end): the target uses
the true final observation and an action drawn there by the policy.

Discrete observations index the table directly. Box observations (CartPole-v1) are discretised:
each dimension is cut into --bins equal-width bins between --obs-low and --obs-high (values outside
fall into the end bins); the defaults are the space's bounds, or a tuned table for CartPole-v1.

Run:
    python cleanrl_style/sarsa.py                               # CliffWalking-v1
    python cleanrl_style/sarsa.py --expected                    # Expected SARSA
    python cleanrl_style/sarsa.py --env CartPole-v1
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
import matplotlib
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ALGORITHM = "sarsa"


@dataclass
class Args:
    env: Annotated[str, tyro.conf.arg(aliases=("--env-id",))] = "CliffWalking-v1"
    """gymnasium environment id (Discrete actions; Discrete or Box observations)"""
    seed: int = 1
    """seed of Python, numpy and the environment"""
    total_timesteps: int | None = None
    """environment steps to train for (default: 100,000 discrete observations, 500,000 Box)"""
    alpha: float | None = None
    """alpha, step size of the update at the start (default: 0.5 discrete observations, 0.1 Box)"""
    alpha_end: float | None = None
    """alpha at the end of the run, reached linearly from --alpha (default: 0.05 discrete observations; Box: --alpha)"""
    gamma: float = 0.99
    """gamma, discount factor in [0, 1]"""
    expected: bool = False
    """Expected SARSA: bootstrap from sum_a' pi(a'|s') Q(s', a') instead of Q(s', a')"""
    epsilon_start: float | None = None
    """epsilon at the start (default: 0.1 discrete observations, 1.0 Box)"""
    epsilon_end: float | None = None
    """epsilon at the end of the decay (default: 0.1 discrete observations, 0.01 Box)"""
    epsilon_decay_fraction: float = 0.5
    """fraction of the run over which epsilon decays linearly from start to end (constant if they are equal)"""
    bins: tuple[int, ...] | None = None
    """Box observations: bins per dimension, one value for all or one per dimension"""
    obs_low: tuple[float, ...] | None = None
    """Box observations: lower bound per dimension of the discretisation"""
    obs_high: tuple[float, ...] | None = None
    """Box observations: upper bound per dimension of the discretisation"""
    exp_name: str = Path(__file__).stem
    """experiment name, part of the run directory name"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """accepted for a uniform command line; the Q-table lives in numpy on the CPU"""
    torch_deterministic: bool = True
    """accepted for a uniform command line (no torch computation here)"""
    capture_video: bool = False
    """record videos of training episodes and of the final evaluation under --video-dir/{run_name}"""
    save_model: bool = True
    """write the checkpoint at the end, every --checkpoint-every steps and on Ctrl-C"""
    checkpoint_every: int = 100_000
    """write a checkpoint every this many environment steps (0: only at the end)"""
    eval_episodes: int = 10
    """greedy evaluation episodes at the end"""
    run_dir: str = "runs"
    """parent directory of the run directories"""
    video_dir: str = "videos"
    """parent directory of the video directories"""
    resume: str | None = None
    """checkpoint to resume from: its run, hyperparameters, Q-table and step go on"""
    progress: bool = True
    """show a progress bar on a terminal"""


# Discrete observations: alpha decays from 0.5 to 0.05 over the run, so that the sampled targets stop moving Q
# and the greedy policy settles (with a constant 0.5, CliffWalking's greedy policy loops in 5 of 10 seeds).
DISCRETE_OBS_DEFAULTS = dict(total_timesteps=100_000, alpha=0.5, alpha_end=0.05, epsilon_start=0.1, epsilon_end=0.1)
BOX_OBS_DEFAULTS = dict(total_timesteps=500_000, alpha=0.1, epsilon_start=1.0, epsilon_end=0.01)
# Box observations: bounds where the space gives none (or gives far wider ones than an episode visits)
KNOWN_DISCRETISATIONS = {
    # cart position, cart velocity, pole angle (the episode ends at +-12 degrees), pole angular velocity
    "CartPole-v1": dict(bins=(3, 3, 8, 8), obs_low=(-2.4, -3.0, -0.21, -3.5), obs_high=(2.4, 3.0, 0.21, 3.5)),
}
UNBOUNDED_LIMIT = 5.0  # bound used for a Box dimension that is infinite and not in the table
EVAL_STEP_LIMIT = 1_000  # evaluation step cap for envs without a time limit (a greedy policy may loop)


# ----------------------------------------------------------------------------------------------
# Environment and discretisation
# ----------------------------------------------------------------------------------------------


class Discretizer:
    """Maps an observation to a row of the Q-table. Discrete: the observation itself. Box: the bin
    of each dimension (equal-width bins between low and high, clipped at both ends), combined in
    row-major order into one index."""

    def __init__(self, n_states: int | None = None, bins=None, low=None, high=None):
        self.bins = None if bins is None else np.asarray(bins, np.int64)
        self.low = None if low is None else np.asarray(low, np.float64)
        self.high = None if high is None else np.asarray(high, np.float64)
        self.n_states = int(n_states) if bins is None else int(np.prod(self.bins))

    def __call__(self, s) -> int:
        if self.bins is None:
            return int(s)
        frac = (np.asarray(s, np.float64) - self.low) / (self.high - self.low)
        idx = np.clip((frac * self.bins).astype(np.int64), 0, self.bins - 1)
        return int(np.ravel_multi_index(idx, self.bins))

    def state_dict(self) -> dict:
        if self.bins is None:
            return {"n_states": self.n_states}
        return {"bins": self.bins.tolist(), "low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "Discretizer":
        return cls(d.get("n_states"), d.get("bins"), d.get("low"), d.get("high"))


def make_discretizer(args: "Args", obs_space: gym.Space) -> Discretizer:
    if isinstance(obs_space, gym.spaces.Discrete):
        return Discretizer(n_states=obs_space.n)
    dim = int(np.prod(obs_space.shape))
    known = KNOWN_DISCRETISATIONS.get(args.env, {})
    bins = args.bins or known.get("bins") or (6,)
    low = (
        args.obs_low
        or known.get("obs_low")
        or tuple(np.where(np.isfinite(obs_space.low), obs_space.low, -UNBOUNDED_LIMIT))
    )
    high = (
        args.obs_high
        or known.get("obs_high")
        or tuple(np.where(np.isfinite(obs_space.high), obs_space.high, UNBOUNDED_LIMIT))
    )
    bins = tuple(bins) * dim if len(bins) == 1 else tuple(bins)
    if len(bins) != dim or len(low) != dim or len(high) != dim:
        raise UsageError(f"--bins, --obs-low and --obs-high need 1 or {dim} values for {args.env}")
    if min(bins) < 1 or any(h <= l for l, h in zip(low, high)):
        raise UsageError("--bins must be >= 1 and --obs-high above --obs-low in every dimension")
    n_states = math.prod(int(b) for b in bins)  # Python integers: 6^64 does not wrap around as int64 would
    if n_states > 10_000_000:
        raise UsageError(f"{n_states:,} states: too many for a table; use fewer --bins")
    return Discretizer(bins=bins, low=low, high=high)


def make_env(env_id: str, capture_video: bool, video_folder: str, name_prefix: str, trigger=None) -> gym.Env:
    if capture_video:
        env = gym.make(env_id, render_mode="rgb_array")
        return gym.wrappers.RecordVideo(
            env, video_folder, name_prefix=name_prefix, episode_trigger=trigger, disable_logger=True
        )
    return gym.make(env_id)


# ----------------------------------------------------------------------------------------------
# The algorithm's math
# ----------------------------------------------------------------------------------------------


def linear_schedule(step: int, total: int, start: float, end: float, decay_fraction: float) -> float:
    """Linear decay from start to end over the first decay_fraction of the run, then constant."""
    duration = decay_fraction * total
    if duration <= 0:
        return end
    return start + (end - start) * min(step / duration, 1.0)


def epsilon_greedy(Q_s: np.ndarray, epsilon: float, rng: np.random.Generator) -> int:
    """argmax_a Q(s, a) (ties broken at random) with probability 1 - epsilon, else a random action."""
    if rng.random() < epsilon:
        return int(rng.integers(len(Q_s)))
    return int(rng.choice(np.flatnonzero(Q_s == Q_s.max())))


def sarsa_target(r: float, Q_next: np.ndarray, a_next: int, terminated: bool, gamma: float) -> float:
    """r_t + gamma Q(s_{t+1}, a_{t+1}); just r_t when s_{t+1} is terminal."""
    return float(r) if terminated else float(r) + gamma * float(Q_next[a_next])


def epsilon_greedy_probs(Q_s: np.ndarray, epsilon: float) -> np.ndarray:
    """pi(a|s) of epsilon-greedy: epsilon / |A| each, plus 1 - epsilon shared by the maximisers."""
    greedy = Q_s == Q_s.max()
    return epsilon / len(Q_s) + (1.0 - epsilon) * greedy / greedy.sum()


def expected_sarsa_target(r: float, Q_next: np.ndarray, epsilon: float, terminated: bool, gamma: float) -> float:
    """r_t + gamma sum_a' pi(a'|s_{t+1}) Q(s_{t+1}, a'); just r_t when s_{t+1} is terminal."""
    return float(r) if terminated else float(r) + gamma * float(epsilon_greedy_probs(Q_next, epsilon) @ Q_next)


def td_update(Q: np.ndarray, s: int, a: int, target: float, alpha: float) -> float:
    """Q(s, a) <- Q(s, a) + alpha (target - Q(s, a)); returns the TD error delta = target - Q(s, a)."""
    delta = target - Q[s, a]
    Q[s, a] += alpha * delta
    return float(delta)


# ----------------------------------------------------------------------------------------------
# Pictures, arguments, checkpoint, evaluation
# ----------------------------------------------------------------------------------------------

# Grid worlds: (rows, cols) of the grid and the (dx, dy) arrow of each action, y pointing up.
GRID_ARROWS = {
    "CliffWalking": {0: (0, 1), 1: (1, 0), 2: (0, -1), 3: (-1, 0)},  # up, right, down, left
    "FrozenLake": {0: (-1, 0), 1: (0, -1), 2: (1, 0), 3: (0, 1)},  # left, down, right, up
}


def grid_shape(env: gym.Env) -> tuple[int, int] | None:
    u = env.unwrapped
    if hasattr(u, "shape") and len(u.shape) == 2:
        return tuple(u.shape)
    if hasattr(u, "nrow") and hasattr(u, "ncol"):
        return (u.nrow, u.ncol)
    return None


def policy_figure(Q: np.ndarray, env_id: str, shape: tuple[int, int], title: str):
    """The greedy policy as arrows over V(s) = max_a Q(s, a) as a heat map."""
    arrows = next(v for k, v in GRID_ARROWS.items() if env_id.startswith(k))
    rows, cols = shape
    visited = ~np.all(Q == 0, axis=1)  # states never updated: terminal, a hole, the cliff, or unvisited
    V = np.ma.masked_array(Q.max(1), ~visited).reshape(rows, cols)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * cols + 1.5), max(2.5, 0.6 * rows + 0.8)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(V, cmap=cmap)
    fig.colorbar(im, ax=ax, label="V(s) = max_a Q(s, a)")
    for s in np.flatnonzero(visited):
        dx, dy = arrows[int(np.argmax(Q[s]))]
        r, c = divmod(s, cols)
        ax.arrow(
            c - 0.25 * dx,
            r + 0.25 * dy,
            0.5 * dx,
            -0.5 * dy,
            head_width=0.18,
            head_length=0.15,
            length_includes_head=True,
            color="white",
        )
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def resolve_args(args: Args, discrete_obs: bool) -> Args:
    check_common_args(args)
    defaults = DISCRETE_OBS_DEFAULTS if discrete_obs else BOX_OBS_DEFAULTS
    args = dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})
    if args.alpha_end is None:
        args = dataclasses.replace(args, alpha_end=args.alpha)
    checks = [
        (0.0 <= args.gamma <= 1.0, f"--gamma must lie in [0, 1], got {args.gamma}"),
        (0.0 < args.alpha <= 1.0, f"--alpha must lie in (0, 1], got {args.alpha}"),
        (0.0 < args.alpha_end <= 1.0, f"--alpha-end must lie in (0, 1], got {args.alpha_end}"),
        (0.0 <= args.epsilon_start <= 1.0 and 0.0 <= args.epsilon_end <= 1.0, "epsilon must lie in [0, 1]"),
        (0.0 <= args.epsilon_decay_fraction <= 1.0, "--epsilon-decay-fraction must lie in [0, 1]"),
        (args.total_timesteps >= 1, "--total-timesteps must be at least 1"),
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
    """Returns of `episodes` episodes of the greedy policy argmax_a Q(s, a) (first maximum on ties).
    Episode k resets with seed + k; an env without a time limit is cut at EVAL_STEP_LIMIT steps."""
    env_spaces(ckpt["env_id"])  # one clear line if the env is not registered here
    Q = ckpt["model"]["Q"].numpy()
    phi = Discretizer.from_state_dict(ckpt["discretizer"])
    env = make_env(ckpt["env_id"], capture_video, video_folder, "eval", trigger=lambda e: e == 0)
    if env.spec is None or env.spec.max_episode_steps is None:
        env = gym.wrappers.TimeLimit(env, EVAL_STEP_LIMIT)
    returns = []
    for k in range(episodes):
        s, _ = env.reset(seed=seed + k)
        G, done = 0.0, False
        while not done:
            s, r, terminated, truncated, _ = env.step(int(np.argmax(Q[phi(s)])))
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
    args, ckpt = resume_args(args)
    obs_space, act_space = env_spaces(args.env)
    if not isinstance(act_space, gym.spaces.Discrete):
        raise UsageError(f"tabular {ALGORITHM} needs a Discrete action space; {args.env} has {act_space}")
    if not isinstance(obs_space, (gym.spaces.Discrete, gym.spaces.Box)):
        raise UsageError(f"tabular {ALGORITHM} needs Discrete or Box observations; {args.env} has {obs_space}")
    discrete_obs = isinstance(obs_space, gym.spaces.Discrete)
    args = resolve_args(args, discrete_obs)
    phi = Discretizer.from_state_dict(ckpt["discretizer"]) if ckpt else make_discretizer(args, obs_space)
    n_actions = int(act_space.n)
    print(
        f"{ALGORITHM} on {args.env}: {phi.n_states:,} states x {n_actions} actions"
        + ("" if discrete_obs else f" (bins {phi.bins.tolist()}, low {phi.low.tolist()}, high {phi.high.tolist()})")
        + f"; total_timesteps={args.total_timesteps}, alpha {args.alpha} -> {args.alpha_end}, gamma={args.gamma}, "
        f"epsilon {args.epsilon_start} -> {args.epsilon_end} over {args.epsilon_decay_fraction:.0%} of the run"
    )
    seed_everything(args.seed, args.torch_deterministic)
    headless_rendering()
    rng = np.random.default_rng(args.seed)
    Q = np.zeros((phi.n_states, n_actions))
    global_step, episode = 0, 0
    if ckpt is not None:
        Q = ckpt["model"]["Q"].numpy().copy()
        global_step, episode = ckpt["global_step"], ckpt["episode"]
        rng = np.random.default_rng([args.seed, global_step])
        print(f"resumed {args.resume} at global step {global_step}")

    def checkpoint() -> dict:
        return {
            "format_version": CHECKPOINT_FORMAT, "algorithm": ALGORITHM, "env_id": args.env,
            "args": dataclasses.asdict(args), "global_step": global_step, "episode": episode,
            "model": {"Q": torch.from_numpy(Q.copy())}, "optimizer": {}, "discretizer": phi.state_dict(),
        }  # fmt: skip

    # ---- run directory (nothing is written before this point) and environment ----
    run_path, writer = start_run(args, ckpt, t_start)
    ckpt_path = run_path / f"{args.exp_name}.pt"
    env = make_env(args.env, args.capture_video, str(Path(args.video_dir) / run_path.name / "train"), "train")
    s = phi(env.reset(seed=args.seed + episode)[0])
    epsilon = linear_schedule(global_step, args.total_timesteps, args.epsilon_start, args.epsilon_end,
                              args.epsilon_decay_fraction)  # fmt: skip
    a = epsilon_greedy(Q[s], epsilon, rng)
    ep_return, ep_length = 0.0, 0
    abs_deltas = []
    monitor = Monitor(writer, args, global_step)
    saved_step, status = global_step, 0
    try:
        while global_step < args.total_timesteps and not stop.requested.is_set():
            epsilon = linear_schedule(global_step, args.total_timesteps, args.epsilon_start, args.epsilon_end,
                                      args.epsilon_decay_fraction)  # fmt: skip
            alpha = linear_schedule(global_step, args.total_timesteps, args.alpha, args.alpha_end, 1.0)
            s_next_raw, r, terminated, truncated, _ = env.step(a)
            global_step += 1
            s_next = phi(s_next_raw)  # on a truncation: the true final observation, bootstrapped from
            a_next = epsilon_greedy(Q[s_next], epsilon, rng)  # a_{t+1}, from the same policy: on-policy
            if args.expected:
                target = expected_sarsa_target(r, Q[s_next], epsilon, terminated, args.gamma)
            else:
                target = sarsa_target(r, Q[s_next], a_next, terminated, args.gamma)
            if not np.isfinite(target):  # checked before the update, so the table stays the last good one
                raise RunFault(f"non-finite TD target {target} at global step {global_step}")
            delta = td_update(Q, s, a, target, alpha)
            abs_deltas.append(abs(delta))
            ep_return += float(r)
            ep_length += 1
            s, a = s_next, a_next
            if terminated or truncated:
                episode += 1
                monitor.episode(ep_return, ep_length, global_step)
                ep_return, ep_length = 0.0, 0
                s = phi(env.reset()[0])
                a = epsilon_greedy(Q[s], epsilon, rng)
            if global_step % 1000 == 0 or global_step == args.total_timesteps:
                writer.add_scalar("charts/learning_rate", alpha, global_step)
                writer.add_scalar("charts/epsilon", epsilon, global_step)
                writer.add_scalar("losses/td_error", float(np.mean(abs_deltas)), global_step)
                abs_deltas = []
                monitor.update(global_step)
            if checkpoint_due(args, global_step, saved_step):
                save_checkpoint(ckpt_path, checkpoint())
                saved_step = global_step
    except RunFault as e:
        monitor.close()
        print(f"error: {e}; stopping with the last good state", file=sys.stderr)
        status = 1
    monitor.close()
    env.close()
    shape = grid_shape(gym.make(args.env)) if any(args.env.startswith(k) for k in GRID_ARROWS) else None
    if shape is not None:
        fig = policy_figure(Q, args.env, shape, f"{ALGORITHM} greedy policy, {args.env}, step {global_step}")
        fig.savefig(run_path / "greedy_policy.png", dpi=100)
        writer.add_figure("charts/greedy_policy", fig, global_step)
    status = end_run(args, checkpoint(), ckpt_path, writer, status, stop)
    writer.close()
    print(f"done in {time.time() - t_start:.1f} s: {global_step} steps, {episode} episodes, run in {run_path}")
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
