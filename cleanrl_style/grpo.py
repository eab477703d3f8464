"""Group Relative Policy Optimisation (GRPO) on gym: group-relative advantages, no critic, a KL to a reference policy.

Notation of the study notes (see NOTATION.md in this folder). On gym a "prompt" is a start state and a "response" an
episode tau_i from it; a group is G episodes from one start state, and each update samples P groups.

    group        G episodes tau_1..tau_G with pi_old from one start state (the same reset seed; the policy's
                 sampling makes them differ); an episode that has ended waits for the rest of its group
    outcome      R_i = sum_t gamma^t r_{i,t},  A_hat_i = (R_i - mean(R_1..R_G)) / (std(R_1..R_G) + eps)
                 for every step t of episode i;  Dr. GRPO (--no-std-norm): A_hat_i = R_i - mean(R)
    process      r~_{i,t} = (r_{i,t} - mean) / std over all the group's rewards,  A_hat_{i,t} = sum_{t'>=t} r~_{i,t'}
    ratio        rho_{i,t} = pi_theta(a_{i,t}|s_{i,t}) / pi_old(a_{i,t}|s_{i,t})
                 GSPO (--ratio sequence): s_i = (pi_theta(tau_i) / pi_old(tau_i))^{1/|tau_i|}, one ratio per episode
    objective    L = (1/G) sum_i (1/|tau_i|) sum_t min(rho_{i,t} A_hat_i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high)
                     A_hat_i) - beta D(pi_theta || pi_ref)
                 token-mean (DAPO): (1/sum_i |tau_i|) sum_i sum_t instead of (1/G) sum_i (1/|tau_i|) sum_t
                 Clip-Higher (DAPO): eps_high > eps_low
    KL to pi_ref r = pi_ref(a|s) / pi_theta(a|s):  k1 = -log r,  k2 = 1/2 (log r)^2,  k3 = (r - 1) - log r;
                 on samples from pi_old each is weighted by rho = pi_theta / pi_old (the notes' unbiased form)
                 --kl-in loss: + beta D in the loss (GRPO);  --kl-in reward: r_t - beta k1_t per step (classic RLHF)

GRPO has no critic: the group's mean return is the baseline, and only the actor pi_theta is trained. For the same
reason a time-limit truncation simply ends the member's episode: there is no V to bootstrap from, so R_i is the return
of the steps taken. Dynamic sampling (DAPO) drops the groups whose returns are all equal (A_hat = 0: no signal) and
samples new ones until the batch holds P groups.

Run:
    python cleanrl_style/grpo.py --env CartPole-v1
    python cleanrl_style/grpo.py --env CartPole-v1 --clip-eps-high 0.28 --loss-agg token-mean --dynamic-sampling
    python cleanrl_style/grpo.py --env CartPole-v1 --ratio sequence --clip-eps 0.01
    python cleanrl_style/grpo.py --env CartPole-v1 --ref-policy runs/RUN/ppo.pt --beta 0.1
    python cleanrl_style/grpo.py --env HalfCheetah-v5 --supervision process --gamma 0.99
"""

import copy
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

import plumbing
from plumbing import RolloutPolicy, RunFault, normalize_obs

ALGORITHM = "grpo"


@dataclass
class Args(plumbing.RunArgs):  # the flags every script has (--env, --seed, --resume, ...) are in plumbing.RunArgs
    total_timesteps: int | None = None
    """environment steps to train for; the last update finishes its groups (default: 200,000 discrete, 1M continuous)"""
    group_size: int | None = None
    """G, episodes per group, all from one start state; 2-64 (default: 8 discrete, 4 continuous)"""
    groups_per_update: int | None = None
    """P, groups (start states) per update (default: 4 discrete, 1 continuous)"""
    num_minibatches: int | None = None
    """mini-batches of whole episodes per epoch, at most P*G (default: 4)"""
    update_epochs: int | None = None
    """epochs over the groups per update, pi_old fixed (default: 4 discrete, 10 continuous)"""
    learning_rate: float | None = None
    """alpha, Adam step size, 1e-4 to 3e-3 (default: 1e-3 discrete, 3e-4 continuous)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run"""
    gamma: float = 1.0
    """gamma, discount in R_i and in the process sum, in [0, 1]; GRPO's outcome return is undiscounted (1)"""
    supervision: Literal["outcome", "process"] = "outcome"
    """outcome: one A_hat_i per episode from its return; process: per-step rewards normalised over the group"""
    std_norm: bool = True
    """divide by the group's std (GRPO); --no-std-norm: A_hat_i = R_i - mean(R) (Dr. GRPO)"""
    loss_agg: Literal["seq-mean", "token-mean"] = "seq-mean"
    """seq-mean: mean over episodes of each episode's mean (GRPO); token-mean: mean over all steps (DAPO)"""
    ratio: Literal["token", "sequence"] = "token"
    """token: rho_{i,t} per step (GRPO); sequence: s_i, the geometric mean of rho over episode i (GSPO)"""
    clip_eps: float = 0.2
    """eps_low, the clip range of rho below 1; 0.1-0.3 (GSPO's sequence ratio wants ~0.001-0.01)"""
    clip_eps_high: float | None = None
    """eps_high, the clip range above 1; Clip-Higher (DAPO) sets it above eps_low, e.g. 0.28 (default: = clip_eps)"""
    beta: float = 0.0
    """beta, weight of the KL to pi_ref; 0-0.1 (0: no KL; GRPO's 0.04 is for a pi_ref worth staying near)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """estimator of D(pi_theta || pi_ref) in the loss: k1, k2 or k3 (GRPO's)"""
    kl_in: Literal["loss", "reward"] = "loss"
    """where the KL goes: loss (+ beta D, GRPO) or reward (r_t - beta k1_t, classic RLHF)"""
    ref_policy: str = "init"
    """pi_ref: init (the policy at the start) or a grpo.py or ppo.py checkpoint, which is also where pi_theta starts"""
    ref_update_every: int = 0
    """K, copy pi_theta into pi_ref every K updates (0: never)"""
    dynamic_sampling: bool = False
    """drop the groups whose returns are all equal and sample new ones until P groups are kept (DAPO)"""
    max_sampling_rounds: int = 8
    """dynamic sampling: at most this many rounds of P groups per update; then zero-std groups fill the batch"""
    ent_coef: float = 0.0
    """c2, entropy bonus coefficient; 0-0.01"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this value (0 disables)"""
    norm_obs: bool | None = None
    """normalise observations with running statistics (default: off discrete, on continuous)"""
    hidden_size: int | None = None
    """width of the two tanh hidden layers of the policy (default: 64)"""
    log_std_init: float | None = None
    """log sigma of the Gaussian policy at the start, continuous actions (default: -0.5, sigma = 0.61)"""


# Defaults by action space: (discrete, continuous). Discrete: solves CartPole-v1 (see README.md for the figures).
# Continuous: one group of 4 per update, ~4,000 steps on HalfCheetah-v5: four times the updates of 2 groups of 8,
# which barely learned there in 1M steps (1 seed each: final return 401 against -2; Hopper-v5 979 against 994).
DEFAULTS = {  # fmt: skip
    "total_timesteps": (200_000, 1_000_000),
    "group_size": (8, 4),
    "groups_per_update": (4, 1),
    "num_minibatches": (4, 4),
    "update_epochs": (4, 10),
    "learning_rate": (1e-3, 3e-4),
    "norm_obs": (False, True),
    "log_std_init": (0.0, -0.5),
    "hidden_size": (64, 64),
}
DISCRETE_DEFAULTS = {k: v[0] for k, v in DEFAULTS.items()}
CONTINUOUS_DEFAULTS = {k: v[1] for k, v in DEFAULTS.items()}


# ----------------------------------------------------------------------------------------------
# Networks: pi_theta (the actor). The Agent is ppo.py's, critic included, though GRPO never uses or trains it: one
# network text for the zoo, so that a ppo.py checkpoint loads here as pi_ref key for key, and plumbing's fast rollout
# policy and evaluation take it as they take ppo's. The optimiser gets only the actor's parameters.
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
# Sampling groups of episodes
# ----------------------------------------------------------------------------------------------


class Episode(NamedTuple):
    obs: np.ndarray  # (T, obs_dim), as the env gave them
    actions: np.ndarray  # (T,) or (T, act_dim), as sampled (before clipping to the bounds)
    rewards: np.ndarray  # (T,)


def sample_groups(envs: list, act, seeds: np.ndarray, G: int) -> list[list[Episode]]:
    """One whole episode in each of the P*G `envs`: the G members of group k reset with seeds[k] (one start state),
    then step together, act(s) -> (a, the action the env takes) for the members still running; a member whose episode
    ended (terminated or truncated) waits for its group, no autoreset. Returns P groups of G episodes."""
    s = np.stack([env.reset(seed=int(seeds[i // G]))[0] for i, env in enumerate(envs)])
    steps = [[] for _ in envs]  # per env: (s_t, a_t, r_t)
    live = np.ones(len(envs), bool)
    while live.any():
        idx = np.nonzero(live)[0]
        a, env_a = act(s[idx])
        for j, i in enumerate(idx):
            s_next, r, terminated, truncated, _ = envs[i].step(env_a[j])
            steps[i].append((s[i].copy(), a[j], float(r)))
            s[i] = s_next
            live[i] = not (terminated or truncated)
    episodes = [Episode(*(np.array(x, np.float32) for x in zip(*ep))) for ep in steps]
    return [episodes[k : k + G] for k in range(0, len(episodes), G)]


def group_seeds(seed: int, groups_sampled: int, P: int) -> np.ndarray:
    """The reset seeds of the next P groups: seed + groups sampled so far + k, distinct across the run, the same on a
    rerun, and new ones after --resume (the count is in the checkpoint)."""
    return seed + groups_sampled + np.arange(P)


def group_returns(groups: list[list[Episode]]) -> torch.Tensor:
    """The env's undiscounted return of each episode, shape (P, G)."""
    return torch.tensor([[float(ep.rewards.sum()) for ep in group] for group in groups])


def has_signal(R: torch.Tensor) -> torch.Tensor:
    """Dynamic sampling's test, per group (rows of R, shape (P, G)): True unless all G returns are equal."""
    return R.amax(-1) > R.amin(-1)


def pad(groups: list[list[Episode]], device) -> tuple[torch.Tensor, ...]:
    """The episodes as tensors (E, T_max, ...) with E = P*G, zero past each episode's end, and mask (E, T_max)."""
    episodes = [ep for group in groups for ep in group]
    T_max = max(len(ep.rewards) for ep in episodes)

    def stack(field: str) -> torch.Tensor:
        rows = [getattr(ep, field) for ep in episodes]
        out = np.zeros((len(rows), T_max) + rows[0].shape[1:], np.float32)
        for i, x in enumerate(rows):
            out[i, : len(x)] = x
        return torch.as_tensor(out, device=device)

    lengths = torch.tensor([len(ep.rewards) for ep in episodes], device=device)
    mask = (torch.arange(T_max, device=device) < lengths[:, None]).float()
    return stack("obs"), stack("actions"), stack("rewards"), mask


# ----------------------------------------------------------------------------------------------
# The algorithm's math
# ----------------------------------------------------------------------------------------------


def reward_to_go(r: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{t'>=t} gamma^{t'-t} r_{t'} along the last axis (r zero past an episode's end)."""
    G, running = torch.zeros_like(r), torch.zeros_like(r[..., 0])
    for t in reversed(range(r.shape[-1])):
        running = r[..., t] + gamma * running
        G[..., t] = running
    return G


def outcome_advantages(R: torch.Tensor, std_norm: bool, eps: float = 1e-8) -> torch.Tensor:
    """A_hat_i = (R_i - mean(R)) / (std(R) + eps) within each group (rows of R, shape (P, G)); std with Bessel's
    correction, as GRPO's. std_norm False: R_i - mean(R) (Dr. GRPO)."""
    A_hat = R - R.mean(-1, keepdim=True)
    return A_hat / (R.std(-1, keepdim=True) + eps) if std_norm else A_hat


def process_advantages(r: torch.Tensor, mask: torch.Tensor, gamma: float, std_norm: bool, eps: float = 1e-8):
    """DeepSeekMath's process supervision, shape (P, G, T): r~ = (r - mean) / (std + eps) over all the steps of a
    group's G episodes, then A_hat_{i,t} = sum_{t'>=t} gamma^{t'-t} r~_{i,t'}, zero past each episode's end."""
    n = mask.sum((1, 2), keepdim=True)
    mean = (r * mask).sum((1, 2), keepdim=True) / n
    r_tilde = (r - mean) * mask
    if std_norm:
        r_tilde = r_tilde / ((r_tilde**2).sum((1, 2), keepdim=True) / (n - 1)).sqrt().add(eps)
    return reward_to_go(r_tilde, gamma) * mask


def sequence_log_ratio(log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO: log s_i = (1/|tau_i|) sum_t log rho_{i,t}, shape (E,) from (E, T)."""
    return (log_rho * mask).sum(-1) / mask.sum(-1)


def clip_objective(rho: torch.Tensor, A_hat: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Per-step terms min(rho A_hat, clip(rho, 1 - eps_low, 1 + eps_high) A_hat); eps_high > eps_low: Clip-Higher."""
    return torch.min(rho * A_hat, torch.clamp(rho, 1.0 - eps_low, 1.0 + eps_high) * A_hat)


def aggregate(x: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """seq-mean: (1/E) sum_i (1/|tau_i|) sum_t x_{i,t} (GRPO); token-mean: (1/sum_i |tau_i|) sum_i sum_t x_{i,t}."""
    if loss_agg == "seq-mean":
        return ((x * mask).sum(-1) / mask.sum(-1)).mean()
    return (x * mask).sum() / mask.sum()


def kl_k1(log_r: torch.Tensor) -> torch.Tensor:
    """k1 = -log r, r = pi_ref/pi_theta: unbiased estimate of KL(pi_theta || pi_ref) on samples of pi_theta."""
    return -log_r


def kl_k2(log_r: torch.Tensor) -> torch.Tensor:
    """k2 = 1/2 (log r)^2: biased, but its gradient is the true KL's near pi_theta = pi_ref."""
    return 0.5 * log_r**2


def kl_k3(log_r: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r: unbiased, low variance, never negative (GRPO's)."""
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_to_ref(logp: torch.Tensor, logp_ref: torch.Tensor, log_rho: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-step estimate of D(pi_theta || pi_ref) on actions sampled from pi_old: rho k(r) with r = pi_ref/pi_theta,
    the importance weight rho = pi_theta/pi_old making it unbiased for samples of pi_old (seed 003)."""
    return log_rho.exp() * KL_ESTIMATORS[estimator](logp_ref - logp)


def kl_in_reward(r: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """--kl-in reward: r_t - beta k1_t, k1_t = log pi_old(a_t|s_t) - log pi_ref(a_t|s_t) of the sampled action."""
    return r - beta * kl_k1(logp_ref - logp_old)


def minibatch_loss(agent: Agent, args: Args, s, a, mask, logp_old, logp_ref, A_hat):
    """-L for a mini-batch of whole episodes (E, T): the clipped surrogate aggregated by --loss-agg, + beta D with
    --kl-in loss, - c2 H; returns the loss, its policy part, the KL estimate, and [clipfrac low, clipfrac high]."""
    head = agent.head(s)
    logp = agent.log_prob(head, a)
    log_rho = logp - logp_old  # (E, T)
    if args.ratio == "sequence":  # GSPO: one ratio s_i per episode, on each of its steps
        rho = sequence_log_ratio(log_rho, mask).exp()[:, None].expand_as(log_rho)
    else:
        rho = log_rho.exp()
    pg_loss = -aggregate(clip_objective(rho, A_hat, args.clip_eps, args.clip_eps_high), mask, args.loss_agg)
    kl = aggregate(kl_to_ref(logp, logp_ref, log_rho, args.kl_estimator), mask, args.loss_agg)
    loss = pg_loss + args.beta * kl if args.kl_in == "loss" and args.beta > 0 else pg_loss
    if args.ent_coef != 0:
        loss = loss - args.ent_coef * aggregate(agent.entropy(head), mask, args.loss_agg)
    with (
        torch.no_grad()
    ):  # where a bound binds: rho below 1 - eps_low with A_hat < 0, above 1 + eps_high with A_hat > 0
        low = ((rho < 1.0 - args.clip_eps) & (A_hat < 0)).float()
        high = ((rho > 1.0 + args.clip_eps_high) & (A_hat > 0)).float()
        clipfrac = torch.stack([(low * mask).sum(), (high * mask).sum()]) / mask.sum()
    return loss, pg_loss, kl, clipfrac


def main(args: Args, stop: plumbing.StopSignal | None = None) -> int:
    """Train; return the process exit status (0 done, 1 stopped by a fault, 130 interrupted)."""
    given = {k for k in DEFAULTS if getattr(args, k) is not None}
    args, ckpt = plumbing.resume_args(args, ALGORITHM)
    Box, Discrete = gym.spaces.Box, gym.spaces.Discrete
    obs_space, act_space = plumbing.env_spaces(args.env, ALGORITHM, obs=Box, act=(Discrete, Box))
    discrete = isinstance(act_space, Discrete)
    args = resolve_args(args, discrete)
    ref_ckpt = reference_checkpoint(args) if args.ref_policy != "init" and ckpt is None else None
    if ref_ckpt is not None:  # pi_ref's observation statistics come with it, frozen
        args = dataclasses.replace(args, norm_obs=ref_ckpt["obs_rms"] is not None)
    device = plumbing.setup(args)  # seeds, torch threads, headless rendering
    kind = "discrete" if discrete else "continuous"
    head = f"grpo on {args.env} ({kind} actions {act_space}); {kind} defaults, overridden where marked: "
    tail = f"; supervision={args.supervision}, ratio={args.ratio}, loss_agg={args.loss_agg}, device={device}"
    plumbing.announce(args, ckpt, head, DEFAULTS, given, (), tail)
    G, P = args.group_size, args.groups_per_update

    obs_dim = int(np.prod(obs_space.shape))
    act_dim = int(act_space.n) if discrete else int(np.prod(act_space.shape))
    agent = plumbing.build(
        lambda: Agent(obs_dim, act_dim, discrete, args.hidden_size).to(device), f"--hidden-size {args.hidden_size}"
    )
    if not discrete:
        nn.init.constant_(agent.actor_logstd, args.log_std_init)
    obs_rms = plumbing.RunningMeanStd(obs_dim) if args.norm_obs else None
    if ref_ckpt is not None:  # the notes' setting: pi_theta starts from the reference ("SFT") policy
        plumbing.restore(ref_ckpt, model=agent, obs_rms=obs_rms)
    actor_params = [p for name, p in agent.named_parameters() if not name.startswith("critic.")]
    optimizer = torch.optim.Adam(actor_params, lr=args.learning_rate, eps=1e-5, fused=True)
    ref = copy.deepcopy(agent).requires_grad_(False)  # pi_ref
    global_step, iteration, groups_sampled = 0, 0, 0
    if ckpt is not None:
        plumbing.restore(ckpt, model=agent, optimizer=optimizer, ref_model=ref, obs_rms=obs_rms)
        global_step, iteration, groups_sampled = ckpt["global_step"], ckpt["iteration"], ckpt["groups_sampled"]
        print(f"resumed {args.resume} at global step {global_step}")
    update_obs_rms = obs_rms is not None and args.ref_policy == "init"  # a checkpoint's statistics stay frozen

    def state() -> dict:  # what a checkpoint holds of the run (plumbing adds the format, algorithm, env id and args)
        return {"global_step": global_step, "iteration": iteration, "groups_sampled": groups_sampled,
                "model": agent.state_dict(), "optimizer": optimizer.state_dict(), "ref_model": ref.state_dict(),
                "obs_rms": obs_rms and obs_rms.state_dict()}  # fmt: skip

    run = plumbing.Run(args, ALGORITHM, ckpt, stop, evaluate, state)  # the run directory: nothing written before
    video = run.video_folder("train")
    envs = [plumbing.make_env(args.env, i, args.capture_video, video)() for i in range(P * G)]
    rng = np.random.default_rng((args.seed, global_step))  # the rollout's action noise (a resumed run: a new stream)

    def act(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # a ~ pi_old(.|s) (the loop's snapshot) and the env's a
        a = pi_old.act(normalize_obs(s, obs_rms))[0]
        return a, a if discrete else np.clip(a, act_space.low, act_space.high)

    with run.fault_guard():
        while run.training() and global_step < args.total_timesteps:
            iteration += 1
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = run.learning_rate(global_step, args.total_timesteps)

            # ---- sample P groups of G episodes with pi_old (dynamic sampling: keep the groups with a signal) ----
            pi_old = RolloutPolicy(agent, rng)  # pi_theta in numpy, fast for one step of P*G envs
            kept, zero_std, rounds = [], [], 0
            while len(kept) < P and rounds < (args.max_sampling_rounds if args.dynamic_sampling else 1):
                groups = sample_groups(envs, act, group_seeds(args.seed, groups_sampled, P), G)
                groups_sampled, rounds = groups_sampled + P, rounds + 1
                for episode in (ep for group in groups for ep in group):
                    global_step += len(episode.rewards)
                    run.monitor.episode(episode.rewards.sum(), len(episode.rewards), global_step)
                signal = has_signal(group_returns(groups))
                kept += [g for g, ok in zip(groups, signal) if ok or not args.dynamic_sampling]
                zero_std += [g for g, ok in zip(groups, signal) if not ok]
            groups = (kept + zero_std)[:P]  # dynamic sampling out of rounds: zero-std groups fill the batch
            obs, actions, rewards, mask = pad(groups, device)  # (E, T, ...), E = P*G
            s = torch.as_tensor(normalize_obs(obs.cpu().numpy(), obs_rms), device=device)
            if update_obs_rms:
                obs_rms.update(obs[mask.bool()].cpu().numpy())

            # ---- group advantages ----
            with torch.no_grad():
                logp_old = agent.log_prob(agent.head(s), actions)  # (E, T)
                logp_ref = ref.log_prob(ref.head(s), actions)
            if args.kl_in == "reward":  # classic RLHF: the KL in the reward
                rewards = kl_in_reward(rewards, logp_old, logp_ref, args.beta) * mask
            T = rewards.shape[1]
            if args.supervision == "outcome":
                R = reward_to_go(rewards, args.gamma)[:, 0].view(P, G)
                A_hat = outcome_advantages(R, args.std_norm).view(-1, 1).expand(-1, T) * mask
            else:
                A_hat = process_advantages(rewards.view(P, G, T), mask.view(P, G, T), args.gamma, args.std_norm)
                A_hat = A_hat.view(-1, T)

            # ---- update: epochs over mini-batches of whole episodes, pi_old fixed ----
            stats = []
            for _ in range(args.update_epochs):
                for mb in torch.randperm(P * G, device=device).tensor_split(args.num_minibatches):
                    T_mb = int(mask[mb].sum(-1).max())  # the mini-batch's longest episode: no all-padding columns
                    batch = (x[mb, :T_mb] for x in (s, actions, mask, logp_old, logp_ref, A_hat))
                    loss, pg_loss, kl, clipfrac = minibatch_loss(agent, args, *batch)
                    if not torch.isfinite(loss):
                        raise RunFault(f"non-finite loss at global step {global_step} (policy {pg_loss.item()})")
                    optimizer.zero_grad()
                    loss.backward()
                    if args.max_grad_norm > 0:
                        nn.utils.clip_grad_norm_(actor_params, args.max_grad_norm)
                    optimizer.step()
                    stats.append(torch.cat([torch.stack([pg_loss.detach(), kl.detach()]), clipfrac]))
            if not plumbing.all_finite(agent):  # a finite loss can still step to inf or NaN (a huge learning rate)
                raise RunFault(f"non-finite parameters after the update at global step {global_step}")
            if args.ref_update_every > 0 and iteration % args.ref_update_every == 0:
                ref.load_state_dict(agent.state_dict())

            # ---- log: exact KL(pi_theta || pi_ref) and entropy over the batch, group statistics ----
            with torch.no_grad():
                head = agent.head(s)
                kl_exact = aggregate(agent.kl(head, ref.head(s)), mask, "token-mean").item()
                entropy = aggregate(agent.entropy(head), mask, "token-mean").item()
            pg, kl_est, clip_low, clip_high = torch.stack(stats).mean(0).tolist()
            run.update_done(global_step, {
                "charts/learning_rate": optimizer.param_groups[0]["lr"], "losses/policy_loss": pg,
                "losses/entropy": entropy, "losses/kl_ref": kl_est, "losses/kl_ref_exact": kl_exact,
                "losses/clipfrac_low": clip_low, "losses/clipfrac_high": clip_high,
                "charts/group_return_std": group_returns(groups).std(-1).mean().item(),
                "charts/groups_dropped": 1.0 - 1.0 / rounds, "charts/groups_zero_std": len(zero_std) / (rounds * P),
            })  # fmt: skip
    return run.end(*envs)


def reference_checkpoint(args: Args) -> plumbing.Checkpoint:
    """--ref-policy PATH: a grpo.py or ppo.py checkpoint of the same env and network width, or a UsageError."""
    ckpt = plumbing.load_checkpoint(args.ref_policy)
    saved = ckpt["args"]
    plumbing.require(
        [
            (
                ckpt["algorithm"] in ("grpo", "ppo"),
                f"--ref-policy must be a grpo or ppo checkpoint, not {ckpt['algorithm']}",
            ),
            (ckpt["env_id"] == args.env, f"--ref-policy was trained on {ckpt['env_id']}, not --env {args.env}"),
            (
                saved.get("hidden_size") == args.hidden_size,
                f"--ref-policy has hidden size {saved.get('hidden_size')}, not --hidden-size {args.hidden_size}",
            ),
        ]
    )
    return ckpt


def resolve_args(args: Args, discrete: bool) -> Args:
    """Fill the defaults that depend on the action space (a flag given > the default), then check that the values
    fit."""
    plumbing.check_common_args(args)
    defaults = DISCRETE_DEFAULTS if discrete else CONTINUOUS_DEFAULTS
    args = plumbing.fill_defaults(args, {**defaults, "clip_eps_high": args.clip_eps})
    plumbing.require(
        [
            (args.group_size >= 2, "--group-size must be at least 2 (a group's std needs two episodes)"),
            (args.groups_per_update >= 1, "--groups-per-update must be at least 1"),
            (args.group_size * args.groups_per_update <= 65_536, "--group-size times --groups-per-update over 65536"),
            (
                1 <= args.num_minibatches <= args.group_size * args.groups_per_update,
                f"--num-minibatches must lie in [1, P*G = {args.group_size * args.groups_per_update}]",
            ),
            (args.total_timesteps >= 1, "--total-timesteps must be at least 1"),
            (args.update_epochs >= 1, "--update-epochs must be at least 1"),
            (0.0 <= args.gamma <= 1.0, f"--gamma must lie in [0, 1], got {args.gamma}"),
            (args.learning_rate > 0, "--learning-rate must be positive"),
            (0 < args.clip_eps < 1, f"--clip-eps must lie in (0, 1), got {args.clip_eps}"),
            (args.clip_eps_high > 0, "--clip-eps-high must be positive"),
            (args.beta >= 0, "--beta must be >= 0"),
            (args.ref_update_every >= 0, "--ref-update-every must be >= 0"),
            (args.max_sampling_rounds >= 1, "--max-sampling-rounds must be at least 1"),
            (args.max_grad_norm >= 0 and args.ent_coef >= 0, "--max-grad-norm and --ent-coef must be >= 0"),
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
