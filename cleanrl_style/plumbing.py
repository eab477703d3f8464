"""Everything a training run needs that is not the algorithm, written once for every script in cleanrl_style/.

An algorithm script (ppo.py, dqn.py, ...) holds its equations, its networks and its loop. It imports this module
for the rest, in a few visible calls:

    args, ckpt = plumbing.resume_args(args, ALGORITHM)            # --resume: the saved run's settings and state
    obs_space, act_space = plumbing.env_spaces(args.env)           # an unknown env id is one error line, exit 2
    device = plumbing.setup(args)                                  # seeds, threads, device, headless rendering
    run = plumbing.Run(args, ALGORITHM, ckpt, stop, evaluate, state)   # run directory, TensorBoard, checkpoints
    envs = run.vector_env(make_env, N)
    with run.fault_guard():                                        # a fault stops with the last good state
        while run.training() and ...:                              # Ctrl-C / SIGTERM end the loop cleanly
            ...                                                    # the algorithm
            run.episodes(r, done, global_step)                     # charts/episodic_return and _length
            run.update_done(global_step, {"losses/...": value})    # scalars, SPS, progress, last good state
    return run.end(envs)                                           # checkpoint, final evaluation, exit status

What lives here, top to bottom: errors and checks of the command line; the flags every script shares (RunArgs);
environments and their spaces; observation/reward statistics; the numpy rollout policy, the numpy greedy Q and the
compiled gradient step (speed); checkpoints and --resume; the run directory, TensorBoard, signals and the progress
bar (Run); the deterministic evaluation; the tabular scripts' shared parts (Discretizer, env, greedy evaluation,
policy picture); the command-line wrapper (cli). It imports no algorithm script: a script hands it what it needs
(its name, its Args, its evaluate function, a function returning its state).

To copy an algorithm out of this repository, copy its script together with this file.
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
import tempfile
import threading
import time
import typing
from collections.abc import Callable
from contextlib import contextmanager
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

CHECKPOINT_FORMAT = 1  # the format_version a checkpoint is written with
CHECKPOINT_FORMATS_READ = tuple(range(1, CHECKPOINT_FORMAT + 1))  # the versions this code reads
RECENT_EPISODES = 20  # the progress bar shows the mean return of this many recent training episodes
# Flags a resumed run takes from the command line, and flags it may change (a longer run, another evaluation);
# every other flag must agree with the checkpoint's saved value.
RESUME_FROM_COMMAND_LINE = ("resume", "device", "progress", "threads", "compile")
RESUME_MAY_CHANGE = ("total_timesteps", "eval_episodes", "capture_video", "video_dir", "save_model", "checkpoint_every")


# ----------------------------------------------------------------------------------------------
# Errors and the flags every script shares
# ----------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2, before anything is written."""


class RunFault(Exception):
    """A fault during training (a non-finite loss or parameter, a checkpoint that cannot be written): reported
    as one line on stderr with exit status 1; the last good state is what the checkpoint keeps."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def one_line(text: str) -> str:
    """`text` with its line breaks and runs of white space as single spaces: an error message stays one line even
    when it holds a printed numpy array (a Box space's bounds)."""
    return " ".join(str(text).split())


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise a UsageError with the message of the first check that fails: [(ok, message), ...]."""
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


ENV_BYTES = 2_000  # memory of one env with its wrappers, a lower bound (a CartPole-v1 takes ~3.7 kB, MuJoCo's more)
STEP_BYTES = 32  # memory of one env step in a rollout, a lower bound (8 float32: s, a, r, V, log pi, flags, A_hat)


def check_numbers(args) -> None:
    """Every float flag (and each value of a tuple of floats) finite: none of them means anything at nan or +-inf.
    --num-envs (times --num-steps where the script has it) small enough for the memory of this machine: the envs
    and the rollout's storage, counted at ENV_BYTES and STEP_BYTES, lower bounds, so a run that fits is never
    refused."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if not all(math.isfinite(v) for v in values if isinstance(v, float)):
            raise UsageError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    num_envs, num_steps = getattr(args, "num_envs", None) or 1, getattr(args, "num_steps", None) or 1
    needed = num_envs * (ENV_BYTES + STEP_BYTES * num_steps)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise UsageError(
            f"--num-envs {num_envs} would need at least {needed / 2**30:,.0f} GiB for its envs and rollout, more than"
            f" this machine's {memory / 2**30:,.0f} GiB"
        )


@dataclass
class RunArgs:
    """The flags of every script (an algorithm's Args adds its own after these)."""

    env: Annotated[str, tyro.conf.arg(aliases=("--env-id",))] = "CartPole-v1"
    """gymnasium environment id"""
    seed: int = 1
    """seed of Python, numpy, torch and the environments"""
    exp_name: str | None = None
    """experiment name, part of the run directory name (default: the script's file name)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """torch device: auto picks cuda when available (the tabular scripts compute in numpy and ignore it)"""
    torch_deterministic: bool = True
    """make cuDNN deterministic"""
    threads: int = 1
    """torch CPU threads"""
    capture_video: bool = False
    """record videos of training episodes (env 0) and of the final evaluation under --video-dir/{run_name}"""
    save_model: bool = True
    """write the checkpoint at the end, every --checkpoint-every steps and on Ctrl-C"""
    checkpoint_every: int = 100_000
    """write a checkpoint every this many environment steps (0: only at the end)"""
    eval_episodes: int = 10
    """deterministic (greedy or mean-action) evaluation episodes at the end"""
    run_dir: str = "runs"
    """parent directory of the run directories"""
    video_dir: str = "videos"
    """parent directory of the video directories"""
    resume: str | None = None
    """checkpoint to resume from: its run, hyperparameters and state go on (--total-timesteps may extend it)"""
    progress: bool = True
    """show a progress bar on a terminal"""


def writable_dir(path: str, name: str | None = None) -> bool:
    """True if `path` is a directory this process can write in, or one it can create (with a folder `name` in it)."""
    return unwritable_reason(path, name) is None


def unwritable_reason(path: str, name: str | None = None) -> str | None:
    """Why the folder `path` (and the folder `name` inside it) cannot be made and written, or None if it can: the
    nearest existing folder above it takes a test write (a permission bit says little to root, and nothing of /proc
    or a read-only file system), and every name still to be made fits the file system's length limit. The test write
    leaves nothing behind."""
    p = Path(path).absolute()
    missing = [name] if name else []
    while not os.path.lexists(p):  # (a name too long to look up counts as missing: its length is checked below)
        missing.insert(0, p.name)
        p = p.parent
    if not p.is_dir():
        return f"'{p}' is not a directory"
    try:
        name_max, path_max = os.pathconf(p, "PC_NAME_MAX"), os.pathconf(p, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in missing:
        if len(os.fsencode(part)) > name_max:
            return f"the folder name '{part[:40]}...' is {len(os.fsencode(part))} bytes, over the limit of {name_max}"
    if len(os.fsencode(str(p.joinpath(*missing)))) >= path_max:
        return f"the path would be longer than the limit of {path_max} bytes"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=p))
    except OSError as e:
        return f"a test write in '{p}' failed: {e.strerror or first_line(e)}"
    return None


def run_name(args, t_start: float) -> str:
    """The name of a new run's directory (and of its video folder): {env}__{exp_name}__{seed}__{unix_time}, as
    start_run makes it."""
    return f"{args.env.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(t_start)}"


def check_common_args(args) -> None:
    """The flags every script has: a seed numpy accepts, a name that is not a path, directories that can be written."""
    check_numbers(args)  # finite float flags, envs that fit in memory
    require(
        [
            (0 <= args.seed < 2**32, f"--seed must lie in [0, 2^32 - 1], got {args.seed}"),
            (
                args.exp_name is None  # not given: the script's name
                or (args.exp_name not in ("", ".", "..") and not set("/\\").intersection(args.exp_name)),
                f"--exp-name must be a plain name without a path separator, got '{args.exp_name}'",
            ),
            (args.eval_episodes >= 0, "--eval-episodes must be >= 0"),
            (args.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
            (args.device != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but CUDA is not available"),
        ]
    )
    # the folders a run will make: runs/{run_name} (a resumed run's own exists) and videos/{run_name}/{train,eval}
    name = Path(args.resume).parent.name if args.resume is not None else run_name(args, time.time())
    why = None if args.resume is not None else unwritable_reason(args.run_dir, name)
    require([(why is None, f"--run-dir '{args.run_dir}' is not a writable directory: {why}")])
    why = unwritable_reason(args.video_dir, name) if args.capture_video else None
    require([(why is None, f"--video-dir '{args.video_dir}' is not writable: {why}")])


def fill_defaults(args, defaults: dict):
    """args with each flag left at None (not given) set from `defaults`."""
    return dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})


def announce(args, ckpt: dict | None, head: str, keys, given=(), preset=(), tail: str = "") -> None:
    """The settings line a run starts with: `head`, then each of `keys` with its value, marked (flag), (preset) or,
    on a resumed run, (saved), except a flag a resumed run may change (--total-timesteps) given again: (flag); then
    `tail`."""
    marks = dict.fromkeys(preset or (), " (preset)") | dict.fromkeys(given, " (flag)")
    if ckpt is not None:
        marks = dict.fromkeys(keys, " (saved)") | dict.fromkeys(set(given) & set(RESUME_MAY_CHANGE), " (flag)")
    print(head + ", ".join(f"{k}={getattr(args, k)}{marks.get(k, '')}" for k in keys) + tail)


# ----------------------------------------------------------------------------------------------
# Environments, devices, seeds
# ----------------------------------------------------------------------------------------------


def env_spaces(env_id: str, algorithm: str | None = None, obs=None, act=None) -> tuple[gym.Space, gym.Space]:
    """Observation and action space of `env_id`, or a UsageError if it is unknown or cannot be made, or if its spaces
    are not of the types `obs` and `act` (a space class or a tuple of them) that `algorithm` can handle."""
    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        raise UsageError(f"unknown environment id '{env_id}' ({type(e).__name__})") from None
    try:
        env = gym.make(env_id)
    except Exception as e:  # registered, but a dependency is missing (Box2D for LunarLander) or it fails to build
        raise UsageError(f"cannot make '{env_id}': {first_line(e)}") from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if (obs is not None and not isinstance(obs_space, obs)) or (act is not None and not isinstance(act_space, act)):
        names = [" or ".join(t.__name__ for t in (k if isinstance(k, tuple) else (k,))) for k in (obs, act)]
        needs = f"{algorithm} needs {names[0]} observations and {names[1]} actions"
        raise UsageError(f"{needs}; {env_id} has {obs_space} and {act_space}")
    return obs_space, act_space


def restore(ckpt: dict, **parts) -> None:
    """Load each of `parts` (name=object with load_state_dict, or None to skip) from the checkpoint's entry of that
    name: restore(ckpt, model=agent, optimizer=optimizer, obs_rms=obs_rms). An entry missing or one that does not fit
    its part (names, shapes) is a UsageError."""
    for name, part in parts.items():
        if part is None:
            continue
        with checkpoint_fits(ckpt, f"the {name} built from its args"):
            entry = ckpt[name]
            if isinstance(part, RunningMeanStd) and tuple(entry["mean"].shape) != part.mean.shape:
                raise ValueError(f"statistics of shape {tuple(entry['mean'].shape)}, observations of {part.mean.shape}")
            part.load_state_dict(entry)


def make_env(env_id: str, idx: int, capture_video: bool, video_folder: str):
    """A thunk that makes env `idx` of a vector env: observations flattened, env 0 recorded with --capture-video."""

    def thunk():
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, video_folder, name_prefix="train", disable_logger=True)
        else:
            env = gym.make(env_id)
        return gym.wrappers.FlattenObservation(env)

    return thunk


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


def setup(args) -> torch.device:
    """Seed Python, numpy and torch, set torch's CPU threads, render headless; returns the torch device."""
    seed_everything(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.threads)
    headless_rendering()
    return torch.device(pick_device(args.device))


def build(make: Callable, what: str, built: str = "the networks"):
    """make(), with running out of memory for the networks or buffers asked for (`what`: the flags that size them)
    turned into a UsageError that names what was `built`."""
    try:
        return make()
    except (RuntimeError, MemoryError) as e:
        raise UsageError(f"cannot build {built} ({what}): {first_line(e)}") from None


# ----------------------------------------------------------------------------------------------
# Observation and reward normalisation
# ----------------------------------------------------------------------------------------------


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


class RewardScaler:
    """r / sqrt(Var[discounted return] + 1e-8), clipped to [-10, 10], with the variance tracked over the running
    discounted return of each env (reset at an episode's end): the reward scaling of PPO implementations."""

    def __init__(self, num_envs: int, gamma: float, ret_rms: RunningMeanStd):
        self.gamma, self.ret_rms = gamma, ret_rms
        self.discounted = np.zeros(num_envs)

    def __call__(self, r: np.ndarray, done: np.ndarray) -> np.ndarray:
        self.discounted = self.discounted * self.gamma + r
        self.ret_rms.update(self.discounted)
        r = np.clip(r / np.sqrt(self.ret_rms.var + 1e-8), -10.0, 10.0)
        self.discounted[done] = 0.0
        return r


# ----------------------------------------------------------------------------------------------
# The policy's distributions: Categorical (discrete actions) and diagonal Gaussian (continuous)
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Speed: the policy in numpy for the rollout, and a compiled update step
# ----------------------------------------------------------------------------------------------


class RolloutPolicy:
    """pi_theta and V_phi for the rollout, in numpy, from a snapshot of an actor-critic agent's weights (an agent
    with `actor` and `critic` MLPs of tanh hidden layers, `discrete`, and for a Gaussian `actor_logstd`).

    It replaces `agent.head(s)` / `agent.value(s)` in torch during the rollout (tests check that log pi and V agree
    with them to float32 rounding), without PyTorch's per-operation overhead: one observation through 64-unit
    layers is ~30 us here against ~170 us for the same forward pass in torch. The snapshot does not follow the
    parameters: take a new one after every update. a ~ pi_theta(.|s) draws from `rng`."""

    def __init__(self, agent: nn.Module, rng: np.random.Generator):
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
        """tanh hidden layers, linear output: the forward pass of the scripts' mlp()."""
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


class GreedyQ:
    """argmax_a Q(s, a; theta) in numpy, for acting epsilon-greedily and for the evaluation: dqn.py's QNetwork (a
    `torso` of Linear and ReLU, then a `head`, or with `dueling` a `V` and an `A` stream, each Linear, ReLU, Linear)
    run on numpy views of theta's own memory, so that it follows every gradient step (the optimisers and
    compiled_step write theta in place) with nothing to copy or refresh.

    It replaces `q_network(torch.as_tensor(s)).argmax(-1)` under torch.inference_mode(), which costs ~25 us per call
    for one observation here against ~7 us in numpy; the Q-values agree with torch's to float32 rounding and the test
    checks that the greedy actions are the same. A network on another device than the CPU is run in torch."""

    def __init__(self, q_network: nn.Module):
        self.q_network = q_network
        self.on_cpu = all(p.device.type == "cpu" for p in q_network.parameters())
        if not self.on_cpu:
            return

        def layers(net: nn.Sequential) -> list:  # [(W (out, in), b, followed by a ReLU?)]: views, not copies
            mods = list(net) + [None]
            return [
                (m.weight.detach().numpy(), m.bias.detach().numpy(), isinstance(after, nn.ReLU))
                for m, after in zip(mods, mods[1:])
                if isinstance(m, nn.Linear)
            ]

        self.torso = layers(q_network.torso)
        self.streams = [layers(q_network.V), layers(q_network.A)] if q_network.dueling else [layers(q_network.head)]

    @staticmethod
    def forward(x: np.ndarray, layers: list) -> np.ndarray:
        for W, b, relu in layers:
            x = x @ W.T + b
            if relu:
                x = np.maximum(x, 0.0)
        return x

    def q_values(self, s: np.ndarray) -> np.ndarray:
        """Q(s, .; theta), (N, |A|); dueling: V(s) + A(s, a) - (1/|A|) sum_a' A(s, a')."""
        h = self.forward(np.asarray(s, np.float32), self.torso)
        if len(self.streams) == 1:
            return self.forward(h, self.streams[0])
        V, A = (self.forward(h, stream) for stream in self.streams)
        return V + A - A.mean(-1, keepdims=True)

    def __call__(self, s: np.ndarray) -> np.ndarray:
        """argmax_a Q(s, a; theta) per row of s (N, obs_dim): (N,) int64, the first maximum on ties as torch's."""
        if not self.on_cpu:
            device = next(self.q_network.parameters()).device
            with torch.inference_mode():
                return self.q_network(torch.as_tensor(s, dtype=torch.float32, device=device)).argmax(-1).cpu().numpy()
        return self.q_values(s).argmax(-1)


def make_gradient_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    max_grad_norm: float,
    compile: bool = False,
    accept: Callable | None = None,
):
    """theta <- the optimiser's step on grad L(theta), the global gradient norm clipped to max_grad_norm (0: not
    clipped), as one call for ppo, a2c and dqn: step = make_gradient_step(...); outputs = step(*batch), where
    outputs = loss_fn(module, *batch) = (L, *diagnostics). The step is not taken when L is not finite or when
    accept(outputs) is false (ppo's --target-kl); step.grad_norm is the norm of the last step taken (a2c logs it).
    compile=False: EagerStep, torch's own loop (backward, clip_grad_norm_, optimizer.step()); compile=True: the same
    step as one compiled program (compiled_step, below), for speed only. The loop then reads the same either way."""
    if compile:
        return compiled_step(module, optimizer, loss_fn, max_grad_norm, accept)
    return EagerStep(module, optimizer, loss_fn, max_grad_norm, accept)


class EagerStep:
    """The gradient step as every PyTorch training loop writes it (make_gradient_step with compile=False)."""

    def __init__(self, module, optimizer, loss_fn: Callable, max_grad_norm: float, accept: Callable | None = None):
        self.module, self.optimizer, self.loss_fn = module, optimizer, loss_fn
        self.max_grad_norm, self.accept = max_grad_norm, accept
        self.grad_norm = None

    def __call__(self, *batch):
        outputs = self.loss_fn(self.module, *batch)
        if torch.isfinite(outputs[0]) and (self.accept is None or self.accept(outputs)):
            self.optimizer.zero_grad()
            outputs[0].backward()
            # scales every gradient by min(1, max_grad_norm / norm); with no bound (inf) the factor is exactly 1
            self.grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm or math.inf)
            self.optimizer.step()
        return outputs


class CompiledStep:
    """--compile: one gradient step as one compiled program (made by compiled_step). step(*batch) returns the loss
    function's outputs; step.grad_norm is the global gradient norm of that step, before clipping."""

    def __init__(self, compiled: Callable, lr: torch.Tensor, group: dict):
        self.compiled, self.lr, self.group = compiled, lr, group
        self.grad_norm = None

    def __call__(self, *batch):
        self.lr.fill_(self.group["lr"])  # the learning rate is a tensor input: annealing it does not recompile
        outputs, self.grad_norm = self.compiled(self.lr, *batch)
        return outputs


def _optimizer_update(optimizer: torch.optim.Optimizer) -> tuple[Callable, tuple[str, ...]]:
    """The update rule of `optimizer` written out as torch computes it, and the names of its state tensors: Adam
    (torch.optim.Adam, fused or not: the same arithmetic) or RMSprop (no momentum, not centred). Refuses the options
    the rule does not write out (weight decay, amsgrad, maximize, momentum, centred)."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.Adam):
        if group["weight_decay"] or group["amsgrad"] or group["maximize"]:
            raise ValueError("compiled_step writes out Adam without weight decay, amsgrad or maximize")
        (beta1, beta2), eps = group["betas"], group["eps"]

        def adam(w, g, st, t, lr):  # m <- lerp(m, g, 1 - beta1), v <- beta2 v + (1 - beta2) g^2, bias-corrected step
            m = st["exp_avg"].lerp(g, 1.0 - beta1)
            v = st["exp_avg_sq"] * beta2 + (1.0 - beta2) * g * g
            denom = (v.sqrt() / (1.0 - beta2**t).sqrt()) + eps
            return w - (lr / (1.0 - beta1**t)) * m / denom, {"exp_avg": m, "exp_avg_sq": v}

        return adam, ("exp_avg", "exp_avg_sq")
    if isinstance(optimizer, torch.optim.RMSprop):
        if group["weight_decay"] or group["momentum"] or group["centered"] or group["maximize"]:
            raise ValueError("compiled_step writes out RMSprop without weight decay, momentum, centring or maximize")
        alpha, eps = group["alpha"], group["eps"]

        def rmsprop(w, g, st, t, lr):  # E[g^2] <- alpha E[g^2] + (1 - alpha) g^2, w <- w - lr g / (sqrt(E[g^2]) + eps)
            square_avg = st["square_avg"] * alpha + (1.0 - alpha) * g * g
            return w - lr * g / (square_avg.sqrt() + eps), {"square_avg": square_avg}

        return rmsprop, ("square_avg",)
    raise ValueError(f"compiled_step writes out Adam and RMSprop, not {type(optimizer).__name__}")


def compiled_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    max_grad_norm: float,
    accept: Callable | None = None,
) -> CompiledStep:
    """--compile (make_gradient_step with compile=True): one gradient step as one compiled program, for every script
    that has the flag (ppo's mini-batch step, a2c's step on the rollout, dqn's step on a replay mini-batch). It
    computes what EagerStep does with torch's loop,

        outputs = loss_fn(module, *batch)        # (loss, *diagnostics)
        optimizer.zero_grad(); loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)   # when max_grad_norm > 0
        optimizer.step()                                                # Adam or RMSprop

    with the loss, its gradient (torch.func), the global gradient norm clipping and the optimiser's step written out,
    in place on the module's parameters and on the optimizer's own state tensors, so that checkpoints and resuming
    see the same state. loss_fn may use other modules (dqn's target network) and torch.no_grad() inside: no
    gradient flows there, as in the eager loop. The step is left untaken (parameters and optimiser state as they
    were) when the loss is not finite or when accept(outputs), a boolean tensor, is false. Returns a CompiledStep:
    step(*batch) -> outputs, and step.grad_norm. The tests of this function check it step by step against the eager
    path, for each script and optimiser."""
    names = [name for name, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    weights = [p.detach() for p in params]  # the same storage, outside autograd: the step writes into them
    group = optimizer.param_groups[0]
    update, state_names = _optimizer_update(optimizer)
    for p in params:  # the optimiser's state as torch starts it, unless a checkpoint loaded one
        if not optimizer.state[p]:
            on_device = group.get("fused") or group.get("capturable")  # else torch keeps the step count on the CPU
            step_device = p.device if on_device else torch.device("cpu")
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=step_device)}
            optimizer.state[p].update(
                {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k in state_names}
            )
    state = [optimizer.state[p] for p in params]
    lr = torch.zeros((), device=params[0].device)

    class Loss(nn.Module):  # torch.func.functional_call runs a module's forward with given weights: the loss's
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, *batch):
            return loss_fn(self.module, *batch)

    loss_module = Loss()

    def loss_and_aux(weights, batch):
        outputs = torch.func.functional_call(loss_module, {f"module.{n}": w for n, w in zip(names, weights)}, batch)
        return outputs[0], outputs

    grad_and_value = torch.func.grad(loss_and_aux, has_aux=True)

    def step(lr, *batch):
        grads, outputs = grad_and_value(weights, batch)
        take = torch.isfinite(outputs[0])
        if accept is not None:
            take = take & accept(outputs)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if max_grad_norm > 0:  # clip_grad_norm_: scale all gradients so that their joint norm is at most the bound
            grads = [g * torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) for g in grads]
        with torch.no_grad():
            for w, g, st in zip(weights, grads, state):
                t = st["step"] + take.float()
                w_new, st_new = update(w, g, st, t, lr)
                w.copy_(torch.where(take, w_new, w))
                for k, v in st_new.items():
                    st[k].copy_(torch.where(take, v, st[k]))
                st["step"].copy_(t)
        return outputs, norm

    return CompiledStep(torch.compile(step), lr, group)


def explained_variance(V: np.ndarray, G: np.ndarray) -> float:
    """1 - Var(G - V) / Var(G), the critic's diagnostic: 1 is a perfect critic, 0 no better than a constant."""
    var_G = np.var(G)
    return float("nan") if var_G == 0 else float(1.0 - np.var(G - V) / var_G)


def all_finite(module: nn.Module) -> bool:
    """True if every parameter of `module` is finite (a finite loss can still step to inf or NaN parameters)."""
    return all(torch.isfinite(p).all() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Checkpoints and --resume
# ----------------------------------------------------------------------------------------------


class Checkpoint(dict):
    """A loaded checkpoint: a dict whose missing entry (a key renamed, or a checkpoint of another version) is a
    UsageError that names it, where a plain dict would raise a KeyError with a traceback."""

    def __init__(self, ckpt: dict, path: str):
        super().__init__(ckpt)
        self.path = path

    def __missing__(self, key):
        raise UsageError(f"checkpoint '{self.path}' has no '{key}' entry, which {self.get('algorithm')} needs")


def load_checkpoint(path: str, algorithm: str | None = None) -> Checkpoint:
    """The checkpoint at `path`, read with weights_only, after checking what every checkpoint holds: a format version
    this code reads, the algorithm (`algorithm`, when given), the env id, the args and the global step. Anything else
    is a UsageError: an unreadable file, another file, another algorithm's or another version's checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # missing, unreadable
        raise UsageError(f"cannot load checkpoint '{path}': {first_line(e)}") from None
    except Exception as e:  # empty, truncated, text or random bytes, or more than tensors and plain data
        raise UsageError(f"'{path}' is not a checkpoint written by these scripts ({type(e).__name__})") from None
    header = {"format_version": int, "algorithm": str, "env_id": str, "args": dict, "global_step": int}
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), t) for k, t in header.items()):
        raise UsageError(f"'{path}' is not a checkpoint written by these scripts (no {', '.join(header)})")
    version = ckpt["format_version"]
    if version not in CHECKPOINT_FORMATS_READ:
        reads = ", ".join(str(v) for v in CHECKPOINT_FORMATS_READ)
        raise UsageError(f"'{path}' has checkpoint format version {version}; this code reads version {reads}")
    if algorithm is not None and ckpt["algorithm"] != algorithm:
        raise UsageError(f"'{path}' is a {ckpt['algorithm']} checkpoint, not a {algorithm} one")
    ckpt = Checkpoint(ckpt, path)
    if "discretizer" in ckpt:  # a Q-table: one row per state of its discretizer
        with checkpoint_fits(ckpt, "its discretizer"):
            Q, phi = ckpt["model"]["Q"], Discretizer.from_state_dict(ckpt["discretizer"])
            if Q.ndim != 2 or Q.shape[0] != phi.n_states:
                raise ValueError(f"a Q-table of shape {tuple(Q.shape)} for {phi.n_states} states")
    return ckpt


@contextmanager
def checkpoint_fits(ckpt: dict, what: str):
    """Around loading a checkpoint's entries into the objects built from its args: an entry missing, or one that does
    not fit them (a renamed tensor, a shape that disagrees with --hidden-size), is a UsageError that says so."""
    try:
        yield
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]  # load_state_dict: a head, then one line a tensor
        detail = one_line(" ".join(lines[:2]))[:300] + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
        where = getattr(ckpt, "path", None) or "the checkpoint"
        raise UsageError(f"'{where}' does not fit {what}: {type(e).__name__}: {detail}") from None


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


def resume_args(args, algorithm: str):
    """--resume PATH: (the checkpoint's args, the checkpoint); otherwise (args, None). The resumed run keeps its
    hyperparameters: a flag given with a value that contradicts the checkpoint is refused (a flag left at its
    default cannot be told from an absent one and is taken from the checkpoint). An --exp-name not given is the
    script's file name (on resume: the saved one)."""
    if args.resume is None:
        return with_exp_name(args, algorithm), None
    ckpt = load_checkpoint(args.resume, algorithm)
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
    return with_exp_name(dataclasses.replace(default, **{**saved, **kept, **changed}), algorithm), ckpt


def with_exp_name(args, algorithm: str | None = None):
    """args with --exp-name, when not given, set to the file name of the script that defines Args (or, for a script
    loaded without a module entry, `algorithm`)."""
    if args.exp_name is not None:
        return args
    module = type(args).__module__  # "__main__" when run as a file, "cleanrl_style.ppo" when imported
    file = getattr(sys.modules.get(module), "__file__", None)
    return dataclasses.replace(args, exp_name=Path(file).stem if file else algorithm or module.rsplit(".", 1)[-1])


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


def annealed_lr(lr: float, step: int, total: int, start: int = 0) -> float:
    """The learning rate at global step `step` of a linear annealing from `lr` at step `start` to 0 at step `total`:
    lr (1 - (step - start) / (total - start)), never below 0. A run anneals from step 0; one extended by --resume
    with a larger --total-timesteps starts a new annealing where it resumes (anneal_start): back to `lr` there, down
    to 0 at the new total."""
    if total <= start:
        return 0.0
    return max(1.0 - (step - start) / (total - start), 0.0) * lr


def anneal_start(args, ckpt: dict | None) -> int:
    """The global step where the run's learning-rate annealing began: 0 for a new run; for a resumed one, the saved
    run's (its checkpoint's anneal_start, 0 when absent), or the step it resumes from when --total-timesteps changed."""
    if ckpt is None:
        return 0
    if args.total_timesteps != ckpt["args"].get("total_timesteps"):
        return ckpt["global_step"]
    return ckpt.get("anneal_start", 0)


# ----------------------------------------------------------------------------------------------
# The run: directory, TensorBoard, signals, progress, the last good state, the end
# ----------------------------------------------------------------------------------------------


def start_run(args, ckpt: dict | None, t_start: float) -> tuple[Path, SummaryWriter]:
    """The run directory runs/{env}__{exp_name}__{seed}__{unix_time} (never shared: a second run started in the same
    second gets a suffix -2, -3, ...), or the resumed run's own; args.json; the TensorBoard writer, which on resume
    purges the events logged past the checkpoint's step (by a run killed after its last checkpoint)."""
    args = with_exp_name(args)
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
    at once with KeyboardInterrupt. Installed only in the main thread; `restore` puts the old handlers back, `ignore`
    (a script's own process, once the run is over) ignores the signals until the process has exited."""

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

    def ignore(self) -> None:
        """SIG_IGN from now on (kept through the interpreter's shutdown, where a Python handler is not): a signal
        after the run is over can no longer turn its exit status into -2 or -15, or into a traceback."""
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)
        self.previous = {}


class Monitor:
    """Finished training episodes to TensorBoard (charts/episodic_return and charts/episodic_length at their global
    step), charts/SPS, and a tqdm progress bar (steps, steps per second, mean return of the last RECENT_EPISODES
    episodes, or that none has finished yet), shown only with --progress on a terminal."""

    def __init__(self, writer: SummaryWriter, args, global_step: int):
        self.writer, self.recent = writer, collections.deque(maxlen=RECENT_EPISODES)
        self.start_step, self.start_time = global_step, time.time()
        self.bar = tqdm(total=args.total_timesteps, initial=global_step, unit="step", disable=not show_progress(args))

    def episode(self, G: float, length: int, global_step: int) -> None:
        self.writer.add_scalar("charts/episodic_return", G, global_step)
        self.writer.add_scalar("charts/episodic_length", length, global_step)
        self.recent.append(float(G))

    def update(self, global_step: int) -> None:
        """Log charts/SPS (steps per second since this process started training) and move the bar."""
        sps = (global_step - self.start_step) / max(time.time() - self.start_time, 1e-9)
        self.writer.add_scalar("charts/SPS", sps, global_step)
        postfix = f"return {np.mean(self.recent):.1f}" if self.recent else "no episode finished yet"
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(global_step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def show_progress(args) -> bool:
    return args.progress and sys.stderr.isatty()


class Run:
    """One training run, from its directory to its exit status.

    Made after the networks (so that bad input has written nothing): it makes the run directory and its TensorBoard
    writer. `state()` returns the algorithm's state (global_step first, then networks, optimiser, statistics ...);
    the run adds the format version, the algorithm, the env id and the args, and keeps a copy taken after each
    update as the last good state, which is what the checkpoint holds at the end, on Ctrl-C and after a fault.
    `to_checkpoint(state)` turns a kept state into what is written (the default writes it as it is).
    `live=True` (the tabular scripts, which check a step before it changes their table): the state is good at every
    step, so no copy is kept; `step_done(global_step)` after each step writes the checkpoint when --checkpoint-every
    says so, `update_done` only logs, and the checkpoint at the end, on Ctrl-C or after a fault is the state then."""

    def __init__(
        self, args, algorithm: str, ckpt, stop, evaluate: Callable, state: Callable, to_checkpoint=None, live=False
    ):
        self.t_start = time.time()
        self.args, self.algorithm, self.evaluate = args, algorithm, evaluate
        self.stop = stop or StopSignal(install=False)
        self.state, self.to_checkpoint = state, to_checkpoint or (lambda s: s)
        self.path, self.writer = start_run(args, ckpt, self.t_start)
        self.ckpt_path = self.path / f"{args.exp_name}.pt"
        self.monitor, self.last_good, self.status = None, None, 0
        self.ep_return = self.ep_length = None
        self.live, self.saved_step = live, None  # live: the step of the last checkpoint written (or of the start)
        self.anneal_start = anneal_start(args, ckpt)  # where the learning rate's annealing began (learning_rate)
        # the checkpoint file: the global step it holds (None: none written yet, or one this run did not write), and
        # whether a write of it failed (the file is then left as it was, and the end does not try again)
        resumed_here = ckpt is not None and Path(args.resume).resolve() == self.ckpt_path.resolve()
        self.written_step, self.write_failed = ckpt["global_step"] if resumed_here else None, False

    def video_folder(self, kind: str) -> str:
        """videos/{run_name}/{kind}: where --capture-video writes the training ("train") or evaluation videos."""
        return str(Path(self.args.video_dir) / self.path.name / kind)

    def vector_env(self, make_env: Callable, num_envs: int) -> gym.vector.SyncVectorEnv:
        """N copies of the env that autoreset in the same step, so that the true final observation of an episode is
        at hand (infos["final_obs"]); the action space seeded with --seed."""
        envs = gym.vector.SyncVectorEnv(
            [make_env(self.args.env, i, self.args.capture_video, self.video_folder("train")) for i in range(num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
        envs.action_space.seed(self.args.seed)
        return envs

    def full_state(self) -> dict:
        """The whole state of the run, copied (so that it stays the state of this moment)."""
        args = self.args
        header = {"format_version": CHECKPOINT_FORMAT, "algorithm": self.algorithm, "env_id": args.env}
        if self.anneal_start:  # a run extended by --resume --total-timesteps: where its annealing began
            header["anneal_start"] = self.anneal_start
        return snapshot({**header, "args": dataclasses.asdict(args), **self.state()})

    def training(self) -> bool:
        """The loop's condition: False once Ctrl-C or SIGTERM asked to stop. The first call starts the clock and the
        progress bar and keeps the state at the start as the last good one."""
        if self.monitor is None:
            self.last_good = self.full_state()
            self.saved_step = self.last_good["global_step"]
            self.monitor = Monitor(self.writer, self.args, self.last_good["global_step"])
        return not self.stop.requested.is_set()

    def episodes(self, r: np.ndarray, done: np.ndarray, global_step: int) -> None:
        """Add a vector step's rewards to each env's episode; log the episodes that `done` ends."""
        if self.ep_return is None:
            self.ep_return, self.ep_length = np.zeros(len(r)), np.zeros(len(r), np.int64)
        self.ep_return += r
        self.ep_length += 1
        for i in np.nonzero(done)[0]:
            self.monitor.episode(self.ep_return[i], self.ep_length[i], global_step)
            self.ep_return[i], self.ep_length[i] = 0.0, 0

    def update_done(self, global_step: int, scalars: dict) -> None:
        """After an update: log `scalars` ({tag: value}) and charts/SPS, move the progress bar, keep the state as the
        last good one, and write the checkpoint when --checkpoint-every says so."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step)
        self.monitor.update(global_step)
        if self.live:  # the state is good at every step: step_done writes the checkpoints
            return
        previous_step, self.last_good = self.last_good["global_step"], self.full_state()
        if checkpoint_due(self.args, global_step, previous_step):
            self.write_checkpoint(self.last_good)

    def step_done(self, global_step: int) -> None:
        """live: after each step, write the checkpoint of the state now when --checkpoint-every says so."""
        if checkpoint_due(self.args, global_step, self.saved_step):
            self.write_checkpoint(self.full_state())
            self.saved_step = global_step

    def write_checkpoint(self, state: dict) -> None:
        """A periodic checkpoint of `state`. A write that fails (a full disk) leaves the file as it was and stops the
        run with a RunFault that names the step the file keeps; the end then does not write again."""
        try:
            save_checkpoint(self.ckpt_path, self.to_checkpoint(state))
        except RunFault as e:
            self.write_failed = True
            if self.written_step is not None:
                kept = f"the checkpoint keeps global step {self.written_step}"
            else:
                kept = "the checkpoint is left as it was" if self.ckpt_path.exists() else "no checkpoint is written"
            raise RunFault(f"{e}; stopping: {kept}") from None
        self.written_step = state["global_step"]

    def learning_rate(self, step: int, total: int) -> float:
        """--learning-rate annealed linearly to 0 at `total` steps, from the step its annealing began (annealed_lr);
        the scripts set it before each update with --anneal-lr."""
        return annealed_lr(self.args.learning_rate, step, total, self.anneal_start)

    @contextmanager
    def fault_guard(self):
        """Around the loop: a RunFault (a non-finite loss, a checkpoint that cannot be written) ends training with
        one error line and exit status 1; the checkpoint then holds the last good state."""
        try:
            yield
        except RunFault as e:
            if self.monitor is not None:
                self.monitor.close()
            step = self.last_good["global_step"] if self.last_good else "?"
            where = "" if self.live else f" (global step {step})"  # live: the state of the step the fault names
            if self.write_failed:  # the message names the step the checkpoint keeps
                print(f"error: {e}", file=sys.stderr)
            else:
                print(f"error: {e}; stopping with the last good state{where}", file=sys.stderr)
            self.status = 1

    def end(self, *envs) -> int:
        """Close the envs, write the checkpoint of the last good state, evaluate the deterministic policy unless the
        run was stopped, and return the exit status (0 done, 1 a fault, 130 interrupted). A resumed run that had
        nothing left to train (its --total-timesteps reached) says so and returns 0, writing and logging nothing."""
        if self.monitor is not None:
            self.monitor.close()
        for env in envs:
            env.close()
        if self.nothing_trained_on_resume():
            step = self.state()["global_step"]
            print(
                f"already finished: global step {step} of --total-timesteps {self.args.total_timesteps}, nothing to "
                "train (a larger --total-timesteps extends the run; evaluate.py evaluates it again)"
            )
            self.writer.close()
            return 0
        last_good = self.to_checkpoint(self.full_state() if self.live else (self.last_good or self.full_state()))
        args, write = self.args, not self.write_failed  # after a failed periodic write the file stays as it was
        status = end_run(args, last_good, self.ckpt_path, self.writer, self.status, self.stop, self.evaluate, write)
        self.writer.close()
        print(f"done in {time.time() - self.t_start:.1f} s: {last_good['global_step']} steps, run in {self.path}")
        return status

    def nothing_trained_on_resume(self) -> bool:
        """True for a resumed run whose loop ended without an update (neither stopped nor a fault): it was finished."""
        return (
            self.args.resume is not None
            and self.status == 0
            and not self.stop.requested.is_set()
            and self.monitor is not None
            and self.state()["global_step"] == self.monitor.start_step
        )


def end_run(
    args, ckpt: dict, ckpt_path: Path, writer: SummaryWriter, status: int, stop: StopSignal, evaluate, write=True
) -> int:
    """The ending of every run: write the checkpoint `ckpt` (the last good state; not with write=False, after a
    periodic write failed); if training was not stopped, evaluate the deterministic policy (eval/episodic_return) on
    episodes seeded by evaluation_seed. Once evaluated, a signal no longer changes the outcome. Returns the exit
    status: 0, 1 (a fault), 130."""
    if args.save_model and write:
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
            seed = evaluation_seed(args.seed)
            returns = evaluate(
                ckpt, args.eval_episodes, seed, args.capture_video, video_folder, device, show_progress(args)
            )
            stop.immediate = False  # evaluated: from here a signal only sets stop.requested, the status stands
        except KeyboardInterrupt:
            stop.immediate = False
            print("interrupted during the final evaluation (the checkpoint is written)", file=sys.stderr)
            return 130
        writer.add_scalar("eval/episodic_return", returns.mean(), ckpt["global_step"])
        writer.add_scalar("eval/episodic_return_std", returns.std(), ckpt["global_step"])
        print(f"eval: {returns.mean():.2f} +- {returns.std():.2f} over {len(returns)} episodes")
    return status


# ----------------------------------------------------------------------------------------------
# Deterministic evaluation
# ----------------------------------------------------------------------------------------------


def eval_env(env_id: str, capture_video: bool, video_folder: str | None) -> gym.Env:
    """One env for evaluation, observations flattened; with capture_video its first episode is recorded."""
    if capture_video:
        env = gym.make(env_id, render_mode="rgb_array")
        env = gym.wrappers.RecordVideo(
            env, video_folder, name_prefix="eval", episode_trigger=lambda e: e == 0, disable_logger=True
        )
    else:
        env = gym.make(env_id)
    return gym.wrappers.FlattenObservation(env)


EVAL_SEED_OFFSET = 2**32


def evaluation_seed(seed: int) -> int:
    """The `seed` the evaluation of a run of --seed `seed` passes to play_episodes: seed + 2^32, so that evaluation
    episode k resets with seed + 2^32 + k, apart from every seed training resets with (seed + global step + i,
    below seed + 2^32 for a run of fewer than 2^32 steps): evaluation starts from states that training's resets did
    not. The final evaluation and evaluate.py use it."""
    return seed + EVAL_SEED_OFFSET


def play_episodes(env: gym.Env, act: Callable, episodes: int, seed: int, progress: bool = False) -> np.ndarray:
    """Returns of `episodes` episodes of the policy `act(s) -> a`; episode k resets with seed + k (a run's evaluation
    passes evaluation_seed(--seed), a range training never resets with). With `progress`, a bar counts the episodes
    (and their steps, since an episode with a video can take minutes). Closes `env`."""
    recording = any(isinstance(w, gym.wrappers.RecordVideo) for w in _wrappers(env))
    desc = "evaluating" + (" (recording the first episode)" if recording else "")
    bar = tqdm(total=episodes, desc=desc, unit="episode", disable=not progress)
    returns = []
    for k in range(episodes):
        s, _ = env.reset(seed=seed + k)
        G, done, steps = 0.0, False, 0
        while not done:
            s, r, terminated, truncated, _ = env.step(act(s))
            G += float(r)
            done = terminated or truncated
            steps += 1
            if steps % 100 == 0:
                bar.set_postfix_str(f"episode {k + 1}: {steps} steps", refresh=True)
        returns.append(G)
        bar.set_postfix_str(f"return {np.mean(returns):.1f}", refresh=False)
        bar.update(1)
    bar.close()
    env.close()
    return np.array(returns)


def load_actor_critic(
    Agent: type, ckpt: dict, device: str = "cpu"
) -> tuple[nn.Module, RunningMeanStd | None, gym.Space]:
    """Rebuild an actor-critic agent (ppo, a2c, trpo, reinforce: Agent(obs_dim, act_dim, discrete, hidden)) and its
    frozen observation statistics from a checkpoint; also returns the env's action space."""
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


def evaluate_actor_critic(
    Agent: type,
    ckpt: dict,
    episodes: int,
    seed: int,
    capture_video: bool = False,
    video_folder: str | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Returns of `episodes` episodes of an actor-critic checkpoint's deterministic policy (argmax, or the mean action
    clipped to the bounds), with the checkpoint's observation statistics frozen. Episode k resets with seed + k."""
    agent, obs_rms, act_space = load_actor_critic(Agent, ckpt, device)

    def act(s: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            head = agent.head(torch.as_tensor(normalize_obs(s[None], obs_rms), device=device))
            a = agent.mode(head)[0].cpu().numpy()
        return a if agent.discrete else np.clip(a, act_space.low, act_space.high)

    env = eval_env(ckpt["env_id"], capture_video, video_folder)
    return play_episodes(env, act, episodes, seed, progress)


def _wrappers(env: gym.Env):
    while isinstance(env, gym.Wrapper):
        yield env
        env = env.env


# ----------------------------------------------------------------------------------------------
# Tabular: what q_learning.py and sarsa.py share besides their update rules (the Q-table's rows, the env, the
# greedy evaluation, the picture of the greedy policy)
# ----------------------------------------------------------------------------------------------

# Box observations: bounds where the space gives none (or gives far wider ones than an episode visits)
KNOWN_DISCRETISATIONS = {
    # cart position, cart velocity, pole angle (the episode ends at +-12 degrees), pole angular velocity
    "CartPole-v1": dict(bins=(3, 3, 8, 8), obs_low=(-2.4, -3.0, -0.21, -3.5), obs_high=(2.4, 3.0, 0.21, 3.5)),
}
UNBOUNDED_LIMIT = 5.0  # bound used for a Box dimension that is infinite and not in the table
EVAL_STEP_LIMIT = 1_000  # evaluation step cap for envs without a time limit (a greedy policy may loop)
# Grid worlds: the (dx, dy) arrow of each action, y pointing up.
GRID_ARROWS = {
    "CliffWalking": {0: (0, 1), 1: (1, 0), 2: (0, -1), 3: (-1, 0)},  # up, right, down, left
    "FrozenLake": {0: (-1, 0), 1: (0, -1), 2: (1, 0), 3: (0, 1)},  # left, down, right, up
}


def tabular_spaces(env_id: str, algorithm: str) -> tuple[gym.Space, gym.Space]:
    """Observation and action space of `env_id`, or a UsageError unless a table can hold them: Discrete actions,
    Discrete or Box observations."""
    obs_space, act_space = env_spaces(env_id)
    Box, Discrete = gym.spaces.Box, gym.spaces.Discrete
    require(
        [
            (
                isinstance(act_space, Discrete),
                f"tabular {algorithm} needs a Discrete action space; {env_id} has {act_space}",
            ),
            (
                isinstance(obs_space, (Discrete, Box)),
                f"tabular {algorithm} needs Discrete or Box observations; {env_id} has {obs_space}",
            ),
        ]
    )
    return obs_space, act_space


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


def make_discretizer(args, obs_space: gym.Space) -> Discretizer:
    """The Discretizer of a tabular script's --bins, --obs-low and --obs-high (default: 6 bins per dimension between
    the space's bounds, +-UNBOUNDED_LIMIT where infinite, or the KNOWN_DISCRETISATIONS of the env)."""
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
    if min(bins) < 1 or not all(l < h and math.isfinite(h - l) for l, h in zip(low, high)):  # nan, inf: refused
        raise UsageError("--bins must be >= 1 and --obs-high above --obs-low, both finite, in every dimension")
    n_states = math.prod(int(b) for b in bins)  # Python integers: 6^64 does not wrap around as int64 would
    if n_states > 10_000_000:
        raise UsageError(f"{n_states:,} states: too many for a table; use fewer --bins")
    return Discretizer(bins=bins, low=low, high=high)


def tabular_env(env_id: str, capture_video: bool, video_folder: str, name_prefix: str, trigger=None) -> gym.Env:
    """One env, its observations as they are (a Discrete one indexes the table); with capture_video the episodes
    `trigger` picks (default: gymnasium's schedule) are recorded."""
    if capture_video:
        env = gym.make(env_id, render_mode="rgb_array")
        return gym.wrappers.RecordVideo(
            env, video_folder, name_prefix=name_prefix, episode_trigger=trigger, disable_logger=True
        )
    return gym.make(env_id)


def evaluate_tabular(
    ckpt: dict,
    episodes: int,
    seed: int,
    capture_video: bool = False,
    video_folder: str | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Returns of `episodes` episodes of a Q-table checkpoint's greedy policy argmax_a Q(s, a) (first maximum on
    ties); `device` is not used. Episode k resets with seed + k; an env without a time limit is cut at
    EVAL_STEP_LIMIT steps."""
    env_spaces(ckpt["env_id"])  # one clear line if the env is not registered here
    Q = ckpt["model"]["Q"].numpy()
    phi = Discretizer.from_state_dict(ckpt["discretizer"])
    env = tabular_env(ckpt["env_id"], capture_video, video_folder, "eval", trigger=lambda e: e == 0)
    if env.spec is None or env.spec.max_episode_steps is None:
        env = gym.wrappers.TimeLimit(env, EVAL_STEP_LIMIT)
    return play_episodes(env, lambda s: int(np.argmax(Q[phi(s)])), episodes, seed, progress)


def grid_shape(env: gym.Env) -> tuple[int, int] | None:
    """(rows, cols) of a grid world, or None."""
    u = env.unwrapped
    if hasattr(u, "shape") and len(u.shape) == 2:
        return tuple(u.shape)
    if hasattr(u, "nrow") and hasattr(u, "ncol"):
        return (u.nrow, u.ncol)
    return None


def policy_figure(Q: np.ndarray, env_id: str, shape: tuple[int, int], title: str):
    """The greedy policy as arrows over V(s) = max_a Q(s, a) as a heat map."""
    import matplotlib

    matplotlib.use("Agg")  # pictures into files, no screen
    import matplotlib.pyplot as plt

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


def greedy_policy_picture(run: Run, Q: np.ndarray, global_step: int) -> None:
    """Grid worlds (GRID_ARROWS): the policy_figure of Q written to greedy_policy.png in the run directory and logged
    as charts/greedy_policy; other envs: nothing."""
    env_id = run.args.env
    shape = grid_shape(gym.make(env_id)) if any(env_id.startswith(k) for k in GRID_ARROWS) else None
    if shape is not None:
        fig = policy_figure(Q, env_id, shape, f"{run.algorithm} greedy policy, {env_id}, step {global_step}")
        fig.savefig(run.path / "greedy_policy.png", dpi=100)
        run.writer.add_figure("charts/greedy_policy", fig, global_step)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def cli(Args: type, main: Callable, doc: str, argv: list[str] | None = None, ignore_signals_after=False) -> int:
    """The command line of a script: parse the flags, train, and turn bad input into one line on stderr with exit
    status 2. A whole number written as a float (--total-timesteps 1e5) is read as the number. Ctrl-C and SIGTERM
    ask the run to stop from the start of cli (a StopSignal); at its end the previous handlers are put back, or with
    `ignore_signals_after` (script_cli) the signals are ignored."""
    stop = StopSignal()
    try:
        argv = whole_numbers(Args, sys.argv[1:] if argv is None else list(argv))
        args = tyro.cli(one_default_in_help(Args), args=argv, description=doc.split("\n\n")[0])
        return main(args, stop)
    except UsageError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if ignore_signals_after:
            stop.ignore()
        else:
            stop.restore()


def script_cli(Args: type, main: Callable, doc: str) -> int:
    """cli for a script run as a program (its `if __name__ == "__main__":`): once the run is over, Ctrl-C and SIGTERM
    are ignored until the process has exited, so that a finished run exits with its own status, never -2 or -15 or
    a traceback. (A signal during the imports, before this is called, still interrupts as Python does by default.)"""
    return cli(Args, main, doc, ignore_signals_after=True)


def whole_numbers(Args: type, argv: list[str]) -> list[str]:
    """argv with the values of integer flags written as 1e5 or 2.5e4 rewritten as 100000 and 25000; a value that is
    not whole (1.5) is a UsageError that says so."""
    hints = typing.get_type_hints(Args)
    int_flags = {f"--{name.replace('_', '-')}" for name, hint in hints.items() if int in _base_types(hint)}
    out = []
    for i, word in enumerate(argv):
        flag, eq, value = word.partition("=")
        if not eq:
            flag, value = (argv[i - 1], word) if i > 0 else ("", word)
        if flag in int_flags and _is_float_text(value):
            number = float(value)
            if not number.is_integer():
                raise UsageError(f"{flag} takes a whole number, got {value}")
            word = f"{flag}={int(number)}" if eq else str(int(number))
        out.append(word)
    return out


def _base_types(hint) -> tuple:
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    args = typing.get_args(hint)
    return args if args else (hint,)


def _is_float_text(text: str) -> bool:
    try:
        int(text)
        return False
    except ValueError:
        pass
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def one_default_in_help(Args: type) -> type:
    """Args, with tyro's "(default: None)" left out of --help: a flag whose default is None states its default in its
    own text (one that depends on the action space or on another flag), or has none (--resume). Their annotations
    gain a tyro marker."""
    hints = typing.get_type_hints(Args, include_extras=True)
    for f in dataclasses.fields(Args):
        if f.default is None:
            owner = next(c for c in Args.__mro__ if f.name in c.__dict__.get("__annotations__", {}))
            owner.__annotations__[f.name] = Annotated[hints[f.name], tyro.conf.arg(help_behavior_hint="")]
    return Args
