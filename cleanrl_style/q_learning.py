"""Tabular Q-learning: off-policy TD control with an epsilon-greedy behaviour policy, in one file.

Notation of the study notes (see NOTATION.md in this folder):

    Q-learning   Q(s_t, a_t) <- Q(s_t, a_t) + alpha (r_t + gamma max_a' Q(s_{t+1}, a') - Q(s_t, a_t))
    TD error     delta_t = r_t + gamma max_a' Q(s_{t+1}, a') - Q(s_t, a_t)
    epsilon-greedy: argmax_a Q(s, a) with probability 1 - epsilon, a uniformly random action otherwise

The target bootstraps from the greedy action at s_{t+1} whatever the behaviour policy does next (that
is what makes it off-policy: it learns Q* while exploring). At a terminal s_{t+1} the bootstrap term
is 0; at a time-limit truncation it is not (the MDP did not end): the target uses the true final
observation.

Discrete observations index the table directly. Box observations (CartPole-v1) are discretised:
each dimension is cut into --bins equal-width bins between --obs-low and --obs-high (values outside
fall into the end bins); the defaults are the space's bounds, or a tuned table for CartPole-v1.

Run:
    python cleanrl_style/q_learning.py                          # CliffWalking-v1
    python cleanrl_style/q_learning.py --env CartPole-v1
    python cleanrl_style/q_learning.py --env Taxi-v4
"""

import sys
from dataclasses import dataclass
from typing import Annotated

import gymnasium as gym
import numpy as np
import torch
import tyro

import plumbing
from plumbing import Discretizer, RunFault, make_discretizer

ALGORITHM = "q_learning"


@dataclass
class Args(plumbing.RunArgs):  # the flags every script has (--seed, --resume, ...) are in plumbing.RunArgs
    env: Annotated[str, tyro.conf.arg(aliases=("--env-id",))] = "CliffWalking-v1"
    """gymnasium environment id (Discrete actions; Discrete or Box observations)"""
    total_timesteps: int | None = None
    """environment steps to train for (default: 100,000 discrete observations, 500,000 Box)"""
    alpha: float | None = None
    """alpha, step size of the update at the start (default: 0.5 discrete observations, 0.1 Box)"""
    alpha_end: float | None = None
    """alpha at the end of the run, reached linearly from --alpha (default: --alpha, a constant step size)"""
    gamma: float = 0.99
    """gamma, discount factor in [0, 1]"""
    epsilon_start: float | None = None
    """epsilon at the start (default: 0.1 discrete observations, 1.0 Box)"""
    epsilon_end: float | None = None
    """epsilon at the end of the decay (default: 0.1 discrete observations, 0.01 Box)"""
    epsilon_decay_fraction: float = 0.5
    """fraction of the run over which epsilon decays linearly from start to end (constant if they are equal)"""
    bins: tuple[int, ...] | None = None
    """Box observations: bins per dimension, one value for all or one per dimension (default: 6; CartPole-v1: tuned)"""
    obs_low: tuple[float, ...] | None = None
    """Box observations: lower bound per dimension (default: the space's, -5 where infinite; CartPole-v1: tuned)"""
    obs_high: tuple[float, ...] | None = None
    """Box observations: upper bound per dimension (default: the space's, 5 where infinite; CartPole-v1: tuned)"""


# Defaults by observation space: (Discrete, Box).
DEFAULTS = {
    "total_timesteps": (100_000, 500_000),
    "alpha": (0.5, 0.1),
    "epsilon_start": (0.1, 1.0),
    "epsilon_end": (0.1, 0.01),
}
LOG_EVERY = 1000  # steps between two logs of charts/learning_rate, charts/epsilon, losses/td_error and charts/SPS


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


def q_learning_target(r: float, Q_next: np.ndarray, terminated: bool, gamma: float) -> float:
    """r_t + gamma max_a' Q(s_{t+1}, a'); just r_t when s_{t+1} is terminal."""
    return float(r) if terminated else float(r) + gamma * float(Q_next.max())


def td_update(Q: np.ndarray, s: int, a: int, target: float, alpha: float) -> float:
    """Q(s, a) <- Q(s, a) + alpha (target - Q(s, a)); returns the TD error delta = target - Q(s, a)."""
    delta = target - Q[s, a]
    Q[s, a] += alpha * delta
    return float(delta)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def main(args: Args, stop: plumbing.StopSignal | None = None) -> int:
    """Train; return the process exit status (0 done, 1 stopped by a fault, 130 interrupted)."""
    args, ckpt = plumbing.resume_args(args, ALGORITHM)
    obs_space, act_space = plumbing.tabular_spaces(args.env, ALGORITHM)
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
    plumbing.setup(args)  # seeds, headless rendering (the table lives in numpy: no torch device)
    rng = np.random.default_rng(args.seed)
    Q = np.zeros((phi.n_states, n_actions))
    global_step, episode = 0, 0
    if ckpt is not None:
        Q = ckpt["model"]["Q"].numpy().copy()
        global_step, episode = ckpt["global_step"], ckpt["episode"]
        rng = np.random.default_rng([args.seed, global_step])
        print(f"resumed {args.resume} at global step {global_step}")

    def state() -> dict:  # what a checkpoint holds of the run (plumbing adds the format, algorithm, env id and args)
        model = {"Q": torch.from_numpy(Q)}  # plumbing copies it
        return dict(global_step=global_step, episode=episode, model=model, optimizer={}, discretizer=phi.state_dict())

    # the run directory (nothing written before); live: the table is checked before each update, so it is always
    # the last good state and a checkpoint is due after any step
    run = plumbing.Run(args, ALGORITHM, ckpt, stop, evaluate, state, live=True)
    env = plumbing.tabular_env(args.env, args.capture_video, run.video_folder("train"), "train")
    s = phi(env.reset(seed=args.seed + episode)[0])
    abs_deltas = []  # |delta_t| since the last log
    with run.fault_guard():
        while run.training() and global_step < args.total_timesteps:
            epsilon = linear_schedule(
                global_step, args.total_timesteps, args.epsilon_start, args.epsilon_end, args.epsilon_decay_fraction
            )
            alpha = linear_schedule(global_step, args.total_timesteps, args.alpha, args.alpha_end, 1.0)
            a = epsilon_greedy(Q[s], epsilon, rng)
            s_next_raw, r, terminated, truncated, _ = env.step(a)
            global_step += 1
            s_next = phi(s_next_raw)  # on a truncation: the true final observation, bootstrapped from
            target = q_learning_target(r, Q[s_next], terminated, args.gamma)
            if not np.isfinite(target):  # checked before the update, so the table stays the last good one
                raise RunFault(f"non-finite TD target {target} at global step {global_step}")
            delta = td_update(Q, s, a, target, alpha)
            abs_deltas.append(abs(delta))
            run.episodes([r], [terminated or truncated], global_step)
            s = s_next
            if terminated or truncated:
                episode += 1
                s = phi(env.reset()[0])
            if global_step % LOG_EVERY == 0 or global_step == args.total_timesteps:
                run.update_done(
                    global_step,
                    {"charts/learning_rate": alpha, "charts/epsilon": epsilon, "losses/td_error": np.mean(abs_deltas)},
                )
                abs_deltas = []
            run.step_done(global_step)  # the checkpoint, when --checkpoint-every says so
    plumbing.greedy_policy_picture(run, Q, global_step)  # grid worlds: greedy_policy.png, charts/greedy_policy
    return run.end(env)


def resolve_args(args: Args, discrete_obs: bool) -> Args:
    """Fill the defaults that depend on the observation space, then check that the values fit."""
    plumbing.check_common_args(args)
    args = plumbing.fill_defaults(args, {k: v[0 if discrete_obs else 1] for k, v in DEFAULTS.items()})
    args = plumbing.fill_defaults(args, {"alpha_end": args.alpha})
    plumbing.require(
        [
            (0.0 <= args.gamma <= 1.0, f"--gamma must lie in [0, 1], got {args.gamma}"),
            (0.0 < args.alpha <= 1.0, f"--alpha must lie in (0, 1], got {args.alpha}"),
            (0.0 < args.alpha_end <= 1.0, f"--alpha-end must lie in (0, 1], got {args.alpha_end}"),
            (0.0 <= args.epsilon_start <= 1.0 and 0.0 <= args.epsilon_end <= 1.0, "epsilon must lie in [0, 1]"),
            (0.0 <= args.epsilon_decay_fraction <= 1.0, "--epsilon-decay-fraction must lie in [0, 1]"),
            (args.total_timesteps >= 1, "--total-timesteps must be at least 1"),
        ]
    )
    return args


def evaluate(ckpt: dict, episodes: int, seed: int, *more, **kw) -> np.ndarray:
    """Returns of the greedy policy argmax_a Q(s, a) over `episodes` episodes, episode k reset with seed + k;
    more: capture_video, video_folder, device, progress."""
    return plumbing.evaluate_tabular(ckpt, episodes, seed, *more, **kw)


if __name__ == "__main__":
    sys.exit(plumbing.script_cli(Args, main, __doc__))
