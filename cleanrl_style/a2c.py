"""Synchronous advantage actor-critic (A2C) with GAE: one gradient step per rollout, in one file.

Notation of the study notes (see NOTATION.md in this folder):

    rollout      T steps of N envs with pi_theta, storing s_t, a_t, r_t, V(s_t)
    TD residual  delta_t = r_t + gamma V(s_{t+1}) - V(s_t)             (no bootstrap past a termination)
    GAE          A_hat_t = delta_t + gamma lambda A_hat_{t+1}          (the sum stops at an episode end)
                 lambda = 0: A_hat_t = delta_t (TD, low variance, biased by V);
                 lambda = 1: A_hat_t = r_t + gamma r_{t+1} + ... + gamma^(T-1-t) r_{T-1} + gamma^(T-t) V(s_T) - V(s_t),
                 the (T-t)-step return minus V(s_t): it bootstraps from V at the rollout's end, so it is Monte
                 Carlo only where the episode ends inside the rollout (the sum stops there)
    return       G_t = A_hat_t + V_old(s_t)                            (the critic's target)
    actor        theta <- theta + alpha grad log pi_theta(a_t|s_t) A_hat_t
    total loss   -E[log pi_theta(a_t|s_t) A_hat_t] + c1 * 1/2 (V_phi(s_t) - G_t)^2 - c2 * H[pi_theta(.|s_t)]

This is ppo.py without what PPO adds: the rollout is used for one gradient step (no epochs, no
mini-batches), so pi_theta = pi_old at that step, the ratio rho_t is 1 and there is nothing to clip.
A_hat_t enters the actor's loss as a constant (computed from V under no_grad): the actor's gradient
must not flow into the critic through A_hat.

When an episode is cut by a time limit (truncation) the MDP did not end there, so delta_t bootstraps
from V of the true final observation; after a termination it never bootstraps.

Optimiser: RMSprop as in the A2C/A3C papers, or Adam (--optimizer). PyTorch's RMSprop is not
TensorFlow's (which the papers and OpenAI baselines used): PyTorch adds eps outside the square root and
starts the running mean of g^2 at 0, TensorFlow adds it inside and starts it at 1, so PyTorch's first steps
are far larger (Stable-Baselines3 PR #110 and its RMSpropTFLike). Here: torch.optim.RMSprop with
alpha = 0.99, eps = 1e-5.

Run:
    python cleanrl_style/a2c.py --env CartPole-v1
    python cleanrl_style/a2c.py --env CartPole-v1 --gae-lambda 0      # TD advantages
    python cleanrl_style/a2c.py --env HalfCheetah-v5
    python cleanrl_style/a2c.py --env HalfCheetah-v5 --compile       # the gradient step compiled: faster
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

ALGORITHM = "a2c"


@dataclass
class Args(plumbing.RunArgs):  # the flags every script has (--env, --seed, --resume, ...) are in plumbing.RunArgs
    total_timesteps: int | None = None
    """environment steps to train for (default: 150,000 discrete, 1,000,000 continuous)"""
    num_envs: int | None = None
    """N, parallel environments (default: 8 discrete, 4 continuous)"""
    num_steps: int | None = None
    """T, steps per environment per rollout (default: 5 discrete, 8 continuous)"""
    learning_rate: float | None = None
    """alpha, step size of the optimiser (default: 2e-3 discrete, 9.6e-4 continuous)"""
    optimizer: Literal["rmsprop", "adam"] | None = None
    """rmsprop (PyTorch's, alpha 0.99, eps 1e-5) or adam (eps 1e-5) (default: adam discrete, rmsprop continuous)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run"""
    gamma: float | None = None
    """gamma, discount factor in [0, 1] (default: 0.98 discrete, 0.99 continuous)"""
    gae_lambda: float | None = None
    """lambda of GAE in [0, 1]: 0 is TD, 1 bootstraps at the rollout's end (default: 0.8 discrete, 0.9 continuous)"""
    norm_adv: bool | None = None
    """normalise A_hat over the batch: (A_hat - mean) / std (default: on discrete, off continuous)"""
    ent_coef: float | None = None
    """c2, entropy bonus coefficient (default: 0)"""
    vf_coef: float | None = None
    """c1, value loss coefficient (default: 0.5 discrete, 0.4 continuous)"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this value (0 disables)"""
    norm_obs: bool | None = None
    """normalise observations with running statistics (default: off discrete, on continuous)"""
    norm_reward: bool | None = None
    """scale rewards by the running std of the discounted return (default: off discrete, on continuous)"""
    hidden_size: int = 64
    """width of the two tanh hidden layers of actor and critic"""
    log_std_init: float | None = None
    """log sigma of the Gaussian policy at the start, continuous actions (default: -0.5, sigma = 0.61)"""
    compile: bool = False
    """torch.compile the gradient step (loss, gradient, clipping, optimiser) into one program: the same computation,
    faster after a one-off compilation of ~10-60 s"""


# Defaults by action space: (discrete, continuous). Discrete: chosen by measurement on CartPole-v1 (see the README and
# benchmarks/results/pg/). Continuous: rl-zoo3's tuned PyBullet A2C settings without gSDE (4 envs x 8 steps, RMSprop
# 9.6e-4 annealed, lambda 0.9, c1 = 0.4, c2 = 0, observation and reward normalisation), chosen on HalfCheetah-v5 over
# Tianshou's MuJoCo settings (16 x 5, RMSprop 7e-4, lambda 0.95, c2 = 0.01) and SB3's (1 x 5, lambda 1):
# benchmarks/results/pg/tuning.md. Not quite rl-zoo3's c1: our value loss is c1 * 1/2 (V - G)^2 where SB3's is
# c1 * (V - G)^2 (no 1/2), so our c1 = 0.4 weighs the value loss half as much as rl-zoo3's 0.4 does (theirs is our
# 0.8); 0.4 is what the measurements above ran with. The Gaussian's log sigma starts at -0.5 (Tianshou's, sigma 0.61;
# rl-zoo3's -2 goes with gSDE): at 1M steps (3 seeds) it beat 0 (sigma 1) on HalfCheetah-v5, Hopper-v5 and Walker2d-v5
# (benchmarks/results/pg/mujoco_a2c_logstd/). On Walker2d-v5, --gae-lambda 0.95 does better (1188 against 973;
# worse on HalfCheetah-v5): benchmarks/results/pg/README.md.
DEFAULTS = {  # fmt: skip
    "total_timesteps": (150_000, 1_000_000),
    "num_envs": (8, 4),
    "num_steps": (5, 8),
    "learning_rate": (2e-3, 9.6e-4),
    "optimizer": ("adam", "rmsprop"),
    "gamma": (0.98, 0.99),
    "gae_lambda": (0.8, 0.9),
    "norm_adv": (True, False),
    "ent_coef": (0.0, 0.0),
    "vf_coef": (0.5, 0.4),
    "norm_obs": (False, True),
    "norm_reward": (False, True),
    "log_std_init": (0.0, -0.5),
}
DISCRETE_DEFAULTS = {k: v[0] for k, v in DEFAULTS.items()}
CONTINUOUS_DEFAULTS = {k: v[1] for k, v in DEFAULTS.items()}


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


def policy_loss(logp: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """-E[log pi_theta(a_t|s_t) A_hat_t]: its gradient is minus the policy gradient. A_hat is a constant here
    (detached): the gradient goes to the actor through log pi only, never into the critic through A_hat."""
    return -(logp * A_hat.detach()).mean()


def value_loss(V: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """1/2 (V_phi(s_t) - G_t)^2, averaged over the batch."""
    return 0.5 * ((V - G) ** 2).mean()


def a2c_loss(agent: Agent, args: Args, s, a, A_hat, G) -> tuple:
    """The total loss on the rollout and what the loop logs of it: (loss, policy loss, value loss, pi_theta's
    parameters on the batch before the step (detached))."""
    head = agent.head(s)
    pg_loss = policy_loss(agent.log_prob(head, a), A_hat)
    v_loss = value_loss(agent.value(s), G)
    loss = pg_loss + args.vf_coef * v_loss
    if args.ent_coef != 0:  # the bonus -c2 H (left out of the graph, not multiplied by 0, when c2 = 0)
        loss = loss - args.ent_coef * agent.entropy(head).mean()
    return loss, pg_loss.detach(), v_loss.detach(), head.detach()


def make_optimizer(params, name: str, learning_rate: float) -> torch.optim.Optimizer:
    """rmsprop: PyTorch's RMSprop (alpha 0.99, eps 1e-5; not TensorFlow's, see the module docstring); adam: eps 1e-5."""
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=learning_rate, alpha=0.99, eps=1e-5)
    return torch.optim.Adam(params, lr=learning_rate, eps=1e-5)


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
    head = f"a2c on {args.env} ({kind} actions {act_space}); {kind} defaults, overridden where marked: "
    plumbing.announce(args, ckpt, head, DEFAULTS, given, tail=f"; device={device}")
    N, T = args.num_envs, args.num_steps
    batch_size = N * T
    num_iterations = args.total_timesteps // batch_size
    log_every = max(1, 1000 // batch_size)  # diagnostics and the last good state about once per 1,000 steps
    if "total_timesteps" in given and num_iterations * batch_size != args.total_timesteps:  # a budget the user chose
        print(f"note: training {num_iterations * batch_size} steps, whole rollouts of N*T = {batch_size} steps")

    obs_dim = int(np.prod(obs_space.shape))
    act_dim = int(act_space.n) if discrete else int(np.prod(act_space.shape))
    agent = plumbing.build(
        lambda: Agent(obs_dim, act_dim, discrete, args.hidden_size).to(device), f"--hidden-size {args.hidden_size}"
    )
    if not discrete:
        nn.init.constant_(agent.actor_logstd, args.log_std_init)
    optimizer = make_optimizer(agent.parameters(), args.optimizer, args.learning_rate)
    obs_rms = plumbing.RunningMeanStd(obs_dim) if args.norm_obs else None
    ret_rms = plumbing.RunningMeanStd(()) if args.norm_reward else None
    global_step, iteration = 0, 0
    if ckpt is not None:
        plumbing.restore(ckpt, model=agent, optimizer=optimizer, obs_rms=obs_rms, ret_rms=ret_rms)
        global_step, iteration = ckpt["global_step"], ckpt["iteration"]
        print(f"resumed {args.resume} at global step {global_step}")
    update_step = gradient_step(agent, optimizer, args)  # the loss, then one step of the optimiser

    def state() -> dict:  # what a checkpoint holds of the run (plumbing adds the format, algorithm, env id and args)
        return {"global_step": global_step, "iteration": iteration, "model": agent.state_dict(),
                "optimizer": optimizer.state_dict(), "obs_rms": obs_rms and obs_rms.state_dict(),
                "ret_rms": ret_rms and ret_rms.state_dict()}  # fmt: skip

    run = plumbing.Run(args, ALGORITHM, ckpt, stop, evaluate, state)  # the run directory: nothing written before
    envs = run.vector_env(plumbing.make_env, N)

    # ---- rollout storage, shape (T, N, ...) ----
    obs = np.zeros((T, N, obs_dim), np.float32)
    actions = np.zeros((T, N) if discrete else (T, N, act_dim), np.float32)
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

            # ---- rollout with pi_theta ----
            pi = RolloutPolicy(agent, rng)  # pi_theta and V_phi in numpy, fast for one step of N envs
            for t in range(T):
                s = normalize_obs(next_obs, obs_rms)
                obs[t] = s
                a, _, values[t] = pi.act(s)
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
                    V_final[t, idx] = pi.value(normalize_obs(np.stack(infos["final_obs"][idx]), obs_rms))
            V_last = pi.value(normalize_obs(next_obs, obs_rms))

            # ---- advantages and returns ----
            V_next = np.concatenate([values[1:], V_last[None]], 0)
            V_next = np.where(truncated_only, V_final, V_next)
            A_hat = gae(rewards, values, V_next, terminated, ended, args.gamma, args.gae_lambda)
            G = A_hat + values
            b_obs = torch.as_tensor(obs.reshape(batch_size, obs_dim), device=device)
            b_actions = torch.as_tensor(actions.reshape((batch_size,) + actions.shape[2:]), device=device)
            b_A = torch.as_tensor(A_hat.reshape(-1), device=device)
            b_G = torch.as_tensor(G.reshape(-1), device=device)
            if args.norm_adv:
                b_A = (b_A - b_A.mean()) / (b_A.std() + 1e-8)

            # ---- update: one gradient step on the whole rollout (pi_theta = pi_old here, so rho = 1) ----
            batch = (b_obs, b_actions, b_A, b_G)
            loss, pg_loss, v_loss, head = update_step(*batch)  # theta <- the optimiser's step on grad L
            if not torch.isfinite(loss):  # (the step was not taken)
                losses = f"policy {pg_loss.item()}, value {v_loss.item()}"
                raise RunFault(f"non-finite loss at global step {global_step} ({losses})")
            if not plumbing.all_finite(agent):  # a finite loss can still step to inf or NaN (a huge learning rate)
                raise RunFault(f"non-finite parameters after the update at global step {global_step}")

            # ---- log, and keep this state as the last good one (what a stop or a fault leaves in the checkpoint),
            # every log_every updates: an update can be 5 steps, and logging and copying the state after each one
            # would cost more than the update. The exact KL of the step and the entropy over the whole batch ----
            if iteration % log_every == 0 or iteration == num_iterations:
                with torch.no_grad():
                    b_head = agent.head(b_obs)
                    d = agent.kl(head, b_head).mean().item()
                    entropy = agent.entropy(b_head).mean()
                run.update_done(global_step, {
                    "charts/learning_rate": optimizer.param_groups[0]["lr"], "losses/policy_loss": pg_loss.item(),
                    "losses/value_loss": v_loss.item(), "losses/entropy": entropy.item(), "losses/kl_exact": d,
                    "losses/grad_norm": update_step.grad_norm.item(),
                    "losses/explained_variance": plumbing.explained_variance(values.ravel(), G.ravel()),
                })  # fmt: skip
    return run.end(envs)


def resolve_args(args: Args, discrete: bool) -> Args:
    """Fill the defaults that depend on the action space, then check that the values fit."""
    plumbing.check_common_args(args)
    args = plumbing.fill_defaults(args, DISCRETE_DEFAULTS if discrete else CONTINUOUS_DEFAULTS)
    batch_size = args.num_envs * args.num_steps
    plumbing.require(
        [
            (0.0 <= args.gamma <= 1.0, f"--gamma must lie in [0, 1], got {args.gamma}"),
            (0.0 <= args.gae_lambda <= 1.0, f"--gae-lambda must lie in [0, 1], got {args.gae_lambda}"),
            (args.num_envs >= 1 and args.num_steps >= 1, "--num-envs and --num-steps must be at least 1"),
            (
                args.total_timesteps >= batch_size,
                f"--total-timesteps {args.total_timesteps} is less than one rollout ({batch_size} steps)",
            ),
            (args.learning_rate > 0, "--learning-rate must be positive"),
            (args.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (math.isfinite(args.log_std_init), f"--log-std-init must be a finite number, got {args.log_std_init}"),
            (args.threads >= 1 and args.hidden_size >= 1, "--threads and --hidden-size must be at least 1"),
        ]
    )
    return args


def gradient_step(agent: Agent, optimizer: torch.optim.Optimizer, args: Args):
    """update_step(*rollout): a2c_loss, then theta <- the optimiser's step (RMSprop or Adam) on its gradient, the
    global norm clipped to --max-grad-norm (update_step.grad_norm: the norm before clipping). The step (plumbing's)
    is torch's loop, or with --compile the same step as one compiled program; not taken on a non-finite loss."""
    loss = lambda module, *batch: a2c_loss(module, args, *batch)  # noqa: E731
    return plumbing.make_gradient_step(agent, optimizer, loss, args.max_grad_norm, args.compile)


def evaluate(ckpt: dict, episodes: int, seed: int, *more, **kw) -> np.ndarray:
    """Returns of the deterministic policy (argmax, or the mean action clipped to the bounds) over `episodes`
    episodes, episode k reset with seed + k; more: capture_video, video_folder, device, progress."""
    return plumbing.evaluate_actor_critic(Agent, ckpt, episodes, seed, *more, **kw)


if __name__ == "__main__":
    sys.exit(plumbing.script_cli(Args, main, __doc__))
