"""REINFORCE with a baseline: the Monte Carlo policy gradient over whole episodes, in one file.

Notation of the study notes (see NOTATION.md in this folder):

    batch         K whole episodes tau_1..tau_K with pi_theta, run over N envs (K / N episodes each)
    reward-to-go  G_t = sum_{k=0}^{T-t} gamma^k r_{t+k}   (--no-reward-to-go: G_t = R(tau) = G_0 at every t)
    estimator     grad J ~ (1/K) sum_i sum_t grad log pi_theta(a_t^i|s_t^i) (G_t^i - b_t^i)
    loss          -(1/K) sum_i sum_t log pi_theta(a_t^i|s_t^i) A_hat_t^i,  A_hat = G - b a constant (detached)
    baselines     --baseline none:  b = 0
                  --baseline mean:  b = the mean of G_t over the batch (every episode and step)
                  --baseline value: b = V_phi(s_t), the critic, trained on G_t: 1/2 (V_phi(s_t) - G_t)^2
                  --baseline rloo:  b_t^i = the mean of G_t^j over the other K - 1 episodes j
                  --baseline group: A_hat_t^i = (G_t^i - mean_j G_t^j) / std_j G_t^j over the K episodes (GRPO)

Why a baseline leaves the gradient unbiased: E_{a~pi(.|s)}[grad log pi(a|s)] = grad sum_a pi(a|s) = grad 1 = 0,
so E[grad log pi(a_t|s_t) b] = 0 for any b that does not depend on a_t or on what follows it.
- value: V_phi(s_t) is a function of s_t alone (with phi fixed during the batch): unbiased.
- rloo: the other episodes are drawn independently of episode i, so b^i cannot depend on a_t^i: unbiased for any
  K >= 2, and with no network.
- mean: the batch mean holds episode i's own returns, with weight 1/K: that part does depend on a_t^i, so the
  estimate is shrunk, by exactly (K - 1) / K in a one-step bandit; the bias vanishes as K grows (RLOO removes it).
- group: its mean is the batch mean at step t (shrunk as above), and dividing by std_t, which also depends on
  episode i, reweights each step t by 1 / std_t: not an estimate of grad J any more, but of a gradient whose
  scale does not depend on the reward's scale, and which weighs more the steps where the episodes agree.
(As in the notes, the estimator has no gamma^t in front of step t's term: with gamma < 1 it is not exactly the
gradient of the discounted J(theta), it weighs late steps more; at gamma = 1 it is exactly unbiased.)
For rloo and group, the baseline of step t is taken over the K episodes' G_t^j, and an episode j that ended before
t contributes G_t^j = 0 (no reward comes after its end) to the other episodes' baseline at t. The notes' forms are
over the returns R(tau_j): these are them at t = 0, where every episode is still running, but not at a later t,
with --no-reward-to-go too (G_t^j = R(tau_j) only while episode j lasts; once it has ended it counts 0, not its
return), unless every episode of the batch has the same length.

Episodes cut by a time limit (truncation): with the value baseline, G_t bootstraps from V_phi of the true final
observation, G_t = sum_k gamma^k r_{t+k} + gamma^{T-t} V_phi(s_T), as the MDP did not end there. The critic-free
baselines have no V to bootstrap from: for them the time limit ends the episode as a termination does (G_t sums
the rewards up to the cut), the return of the time-limited task the env defines.

The variance of the estimator, each update: with g_i the gradient of -sum_t log pi(a_t^i|s_t^i) A_hat_t^i (one
per episode), the update's gradient is (1/K) sum_i g_i, and its variance is estimated as tr Cov(g_i) / K
(losses/pg_variance, beside its norm losses/grad_norm). The g_i of mean, rloo and group share their baseline, so
they are not quite independent; the estimate is the usual one.

Run:
    python cleanrl_style/reinforce.py --env CartPole-v1
    python cleanrl_style/reinforce.py --env CartPole-v1 --baseline none
    python cleanrl_style/reinforce.py --env HalfCheetah-v5 --episodes-per-update 4 --num-envs 4
"""

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro

import plumbing
from plumbing import RolloutPolicy, RunFault, normalize_obs

ALGORITHM = "reinforce"
BASELINES = ("none", "mean", "value", "rloo", "group")


@dataclass
class Args(plumbing.RunArgs):  # the flags every script has (--env, --seed, --resume, ...) are in plumbing.RunArgs
    env: Annotated[str, tyro.conf.arg(aliases=("--env-id",))] = "CartPole-v1"
    """gymnasium environment id (Box observations; Discrete or Box actions; episodes that end)"""
    total_timesteps: int | None = None
    """environment steps; the last batch of episodes may end past it (default: 100k discrete, 1M continuous)"""
    num_envs: int | None = None
    """N, environments the K episodes of a batch are spread over; must divide K (default: 8)"""
    episodes_per_update: int | None = None
    """K, whole episodes per update, at least 2 (default: 8)"""
    learning_rate: float | None = None
    """alpha, Adam step size (default: 1e-2)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run"""
    gamma: float | None = None
    """gamma, discount factor in [0, 1] (default: 0.99)"""
    baseline: Literal["none", "mean", "value", "rloo", "group"] = "value"
    """b: none, the batch mean of G_t, a learned V_phi(s_t), rloo (leave-one-out mean), group ((G - mean) / std)"""
    reward_to_go: bool = True
    """weigh log pi(a_t|s_t) by the reward-to-go G_t; --no-reward-to-go: by the whole return R(tau)"""
    vf_steps: int | None = None
    """critic gradient steps on the batch per update (--baseline value) (default: 10)"""
    vf_coef: float = 0.5
    """c1, value loss coefficient (--baseline value)"""
    ent_coef: float = 0.0
    """c2, entropy bonus coefficient"""
    max_grad_norm: float = 0.0
    """clip the global gradient norm to this value (0 disables)"""
    norm_obs: bool | None = None
    """normalise observations with running statistics (default: off discrete, on continuous)"""
    norm_reward: bool | None = None
    """scale rewards by the running std of the discounted return (default: off discrete, on continuous)"""
    hidden_size: int = 64
    """width of the two tanh hidden layers of actor and critic"""
    log_std_init: float | None = None
    """log sigma of the Gaussian policy at the start, continuous actions (default: 0, sigma = 1)"""


# Defaults by action space: (discrete, continuous). Discrete: chosen by measurement on CartPole-v1 (see the README and
# benchmarks/results/pg/). Continuous: the learning rate chosen at 1M steps, 3 seeds (benchmarks/results/pg/): 1e-2
# beat 1e-3 on HalfCheetah-v5 (754 against -268: 1e-3 barely moves the policy in 125 updates of 8,000 steps),
# Hopper-v5 (1210 against 1017) and Walker2d-v5 (612 against 368). HalfCheetah-v5, whose episodes all last 1000
# steps, does better with --episodes-per-update 4 --num-envs 4 (1316 against 754; twice the updates), but on
# Hopper-v5 those small batches collapsed a seed, so K = 8 stays the default. Log sigma -0.5 at the start was
# worse on HalfCheetah (448). benchmarks/results/pg/README.md has each of these.
DEFAULTS = {  # fmt: skip
    "total_timesteps": (100_000, 1_000_000),
    "num_envs": (8, 8),
    "episodes_per_update": (8, 8),
    "learning_rate": (1e-2, 1e-2),
    "gamma": (0.99, 0.99),
    "vf_steps": (10, 10),
    "norm_obs": (False, True),
    "norm_reward": (False, True),
    "log_std_init": (0.0, 0.0),
}


# ----------------------------------------------------------------------------------------------
# Networks: pi_theta (the actor) and V_phi (the critic), as in ppo.py
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
# The batch: K whole episodes
# ----------------------------------------------------------------------------------------------


class EpisodeSampler:
    """K whole episodes with pi_theta, K / N from each of N separate envs: an env whose share is done waits (with a
    vector env's autoreset, a batch of the first K episodes to end would hold too many short ones). An episode is
    a dict of its (normalised) observations s_t, actions a_t, values V(s_t), (scaled) rewards r_t, its returns G_t
    and its raw return, which `log(return, length, global_step)` receives as it ends. The observation statistics
    count each observation the policy sees (the first of each episode, not the true final one), as ppo's do."""

    def __init__(self, envs: list, args: Args, act_space: gym.Space, obs_rms, ret_rms, global_step: int):
        self.envs, self.args, self.act_space, self.obs_rms = envs, args, act_space, obs_rms
        for i, env in enumerate(envs):
            env.action_space.seed(args.seed + i)
        self.next_obs = np.stack([env.reset(seed=args.seed + global_step + i)[0] for i, env in enumerate(envs)])
        if obs_rms is not None:
            obs_rms.update(self.next_obs)
        # r / std of the discounted return, one running return per env (reset at its episode's end)
        self.scalers = [plumbing.RewardScaler(1, args.gamma, ret_rms) for _ in envs] if ret_rms is not None else None

    @staticmethod
    def new_episode() -> dict:
        return {"obs": [], "actions": [], "rewards": [], "values": [], "raw": 0.0}

    def collect(self, pi: RolloutPolicy, K: int, global_step: int, log: Callable, stopped: Callable) -> tuple:
        """The batch's K episodes, in the order they ended, and the global step after them; fewer than K when
        stopped() (Ctrl-C, SIGTERM) turns true first, which is checked every step (an episode may never end)."""
        N, args, obs_rms = len(self.envs), self.args, self.obs_rms
        returns_of = reward_to_go if args.reward_to_go else whole_return
        current = [self.new_episode() for _ in range(N)]
        episodes, finished = [], np.zeros(N, np.int64)
        while len(episodes) < K and not stopped():
            active = np.nonzero(finished < K // N)[0]
            s = normalize_obs(self.next_obs[active], obs_rms)
            a, _, V = pi.act(s)
            for j, i in enumerate(active):
                env_a = a[j] if pi.discrete else np.clip(a[j], self.act_space.low, self.act_space.high)
                s_next, r, term, trunc, _ = self.envs[i].step(env_a)
                global_step += 1
                ep = current[i]
                ep["obs"].append(s[j])
                ep["actions"].append(a[j])
                ep["values"].append(V[j])
                ep["raw"] += float(r)
                if self.scalers is not None:
                    r = self.scalers[i](np.array([r]), np.array([term or trunc]))[0]
                ep["rewards"].append(float(r))
                if term or trunc:
                    bootstrap = 0.0
                    if trunc and not term and args.baseline == "value":  # the MDP went on: G_T = V(s_T)
                        bootstrap = float(pi.value(normalize_obs(s_next[None], obs_rms))[0])
                    ep["G"] = returns_of(np.array(ep["rewards"]), args.gamma, bootstrap)
                    episodes.append(ep)
                    log(ep["raw"], len(ep["rewards"]), global_step)
                    finished[i] += 1
                    current[i] = self.new_episode()
                    s_next, _ = self.envs[i].reset()
                if not np.isfinite(s_next).all():  # kept out of the statistics and the batch
                    raise RunFault(f"env {i} returned a non-finite observation at global step {global_step}")
                if obs_rms is not None:
                    obs_rms.update(s_next[None])
                self.next_obs[i] = s_next
        return episodes, global_step


# ----------------------------------------------------------------------------------------------
# The algorithm's math
# ----------------------------------------------------------------------------------------------


def reward_to_go(r: np.ndarray, gamma: float, bootstrap: float = 0.0) -> np.ndarray:
    """G_t = r_t + gamma G_{t+1} over one episode of length T, computed backwards from G_T = `bootstrap`
    (0 after a termination; V_phi of the true final observation after a truncation, value baseline only)."""
    G = np.zeros(len(r), np.float64)
    last = bootstrap
    for t in reversed(range(len(r))):
        last = r[t] + gamma * last
        G[t] = last
    return G


def whole_return(r: np.ndarray, gamma: float, bootstrap: float = 0.0) -> np.ndarray:
    """--no-reward-to-go: R(tau) = G_0 at every step t. The rewards before t cannot depend on a_t, so they add
    only variance (the notes' warning)."""
    return np.full(len(r), reward_to_go(r, gamma, bootstrap)[0])


def pad(episodes: list) -> tuple[np.ndarray, np.ndarray]:
    """K arrays of lengths T_i -> (K, max T_i) with zeros past each end, and the mask of real steps."""
    L = max(len(e) for e in episodes)
    out, mask = np.zeros((len(episodes), L)), np.zeros((len(episodes), L), bool)
    for i, e in enumerate(episodes):
        out[i, : len(e)], mask[i, : len(e)] = e, True
    return out, mask


def baseline_mean(G: np.ndarray, mask: np.ndarray) -> float:
    """b = the mean of G_t over every step of every episode of the batch."""
    return float(G[mask].mean())


def baseline_rloo(G: np.ndarray) -> np.ndarray:
    """b_t^i = (1 / (K - 1)) sum_{j != i} G_t^j over the K episodes (rows of G, zero past an episode's end)."""
    K = G.shape[0]
    return (G.sum(0, keepdims=True) - G) / (K - 1)


def group_advantages(G: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """GRPO's form: A_hat_t^i = (G_t^i - mean_j G_t^j) / (std_j G_t^j + eps), std with Bessel's correction."""
    return (G - G.mean(0, keepdims=True)) / (G.std(0, ddof=1, keepdims=True) + eps)


def advantages(G: np.ndarray, mask: np.ndarray, V: np.ndarray, baseline: str) -> np.ndarray:
    """A_hat = G - b for the chosen baseline, shape (K, max T_i), zero past each episode's end."""
    if baseline == "none":
        A_hat = G
    elif baseline == "mean":
        A_hat = G - baseline_mean(G, mask)
    elif baseline == "value":
        A_hat = G - V
    elif baseline == "rloo":
        A_hat = G - baseline_rloo(G)
    else:  # group
        A_hat = group_advantages(G)
    return np.where(mask, A_hat, 0.0)


def pg_loss(logp: torch.Tensor, A_hat: torch.Tensor, K: int) -> torch.Tensor:
    """-(1/K) sum_i sum_t log pi_theta(a_t^i|s_t^i) A_hat_t^i: its gradient is minus the REINFORCE estimate of
    grad J. A_hat is a constant (detached)."""
    return -(logp * A_hat.detach()).sum() / K


def pg_variance(g: torch.Tensor) -> float:
    """Variance of the estimator (1/K) sum_i g_i from its K per-episode gradients g (K, P): tr Cov(g_i) / K."""
    return float(g.var(0, unbiased=True).sum() / g.shape[0])


def value_loss(V: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """1/2 (V_phi(s_t) - G_t)^2, the mean over the batch's steps."""
    return 0.5 * ((V - G) ** 2).mean()


def episode_gradients(agent: Agent, params: list, episodes: list, A_hat: np.ndarray, ent_coef: float, device):
    """The per-episode gradients g_i of -sum_t log pi_theta(a_t^i|s_t^i) A_hat_t^i (- c2 sum_t H) with respect to
    the actor's `params`, one episode at a time: (g (K, P), the entropy H of every step, the loss (1/K) sum_i)."""
    g, entropies, loss = [], [], 0.0
    for i, ep in enumerate(episodes):
        T_i = len(ep["rewards"])
        s = torch.as_tensor(np.stack(ep["obs"]), device=device)
        a = torch.as_tensor(np.stack(ep["actions"]), device=device)
        head = agent.head(s)
        loss_i = pg_loss(agent.log_prob(head, a), torch.as_tensor(A_hat[i, :T_i], device=device), 1)
        entropy = agent.entropy(head)
        if ent_coef != 0:  # the bonus -c2 H (left out of the graph, not multiplied by 0, when c2 = 0)
            loss_i = loss_i - ent_coef * entropy.sum()
        g.append(torch.cat([x.flatten() for x in torch.autograd.grad(loss_i, params)]))
        entropies.append(entropy.detach())
        loss += loss_i.item() / len(episodes)
    return torch.stack(g), torch.cat(entropies), loss


def set_grads(params: list, flat: torch.Tensor) -> None:
    """Each parameter's .grad from its slice of the flat gradient `flat`."""
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def gradient_step(agent: Agent, optimizer: torch.optim.Adam, max_grad_norm: float) -> None:
    if max_grad_norm > 0:
        nn.utils.clip_grad_norm_(agent.parameters(), max_grad_norm)
    optimizer.step()


def fit_critic(agent: Agent, optimizer: torch.optim.Adam, s, G, args: Args, global_step: int) -> float:
    """--vf-steps Adam steps on c1 1/2 (V_phi(s_t) - G_t)^2 over the batch; the first also takes the actor's step,
    whose gradient is in place. Returns the last value loss."""
    for step in range(args.vf_steps):
        if step > 0:
            optimizer.zero_grad()
        v_loss = value_loss(agent.value(s), G)
        if not torch.isfinite(v_loss):
            raise RunFault(f"non-finite value loss at global step {global_step} ({v_loss.item()})")
        (args.vf_coef * v_loss).backward()
        gradient_step(agent, optimizer, args.max_grad_norm)
    return v_loss.item()


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
    head = f"reinforce on {args.env} ({kind} actions {act_space}); {kind} defaults, overridden where marked: "
    tail = f"; baseline={args.baseline}, reward_to_go={args.reward_to_go}, device={device}"
    plumbing.announce(args, ckpt, head, DEFAULTS, given, None, tail)
    N, K = args.num_envs, args.episodes_per_update

    obs_dim = int(np.prod(obs_space.shape))
    act_dim = int(act_space.n) if discrete else int(np.prod(act_space.shape))
    agent = plumbing.build(
        lambda: Agent(obs_dim, act_dim, discrete, args.hidden_size).to(device), f"--hidden-size {args.hidden_size}"
    )
    if not discrete:
        nn.init.constant_(agent.actor_logstd, args.log_std_init)
    actor_params = list(agent.actor.parameters()) + ([] if discrete else [agent.actor_logstd])
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    obs_rms = plumbing.RunningMeanStd(obs_dim) if args.norm_obs else None
    ret_rms = plumbing.RunningMeanStd(()) if args.norm_reward else None
    global_step, iteration = 0, 0
    if ckpt is not None:
        plumbing.restore(ckpt, model=agent, optimizer=optimizer, obs_rms=obs_rms, ret_rms=ret_rms)
        global_step, iteration = ckpt["global_step"], ckpt["iteration"]
        print(f"resumed {args.resume} at global step {global_step}")

    def state() -> dict:  # what a checkpoint holds of the run (plumbing adds the format, algorithm, env id and args)
        return {"global_step": global_step, "iteration": iteration, "model": agent.state_dict(),
                "optimizer": optimizer.state_dict(), "obs_rms": obs_rms and obs_rms.state_dict(),
                "ret_rms": ret_rms and ret_rms.state_dict()}  # fmt: skip

    run = plumbing.Run(args, ALGORITHM, ckpt, stop, evaluate, state)  # the run directory: nothing written before
    envs = [plumbing.make_env(args.env, i, args.capture_video, run.video_folder("train"))() for i in range(N)]
    sampler = EpisodeSampler(envs, args, act_space, obs_rms, ret_rms, global_step)
    rng = np.random.default_rng((args.seed, global_step))  # the rollout's action noise (a resumed run: a new stream)
    with run.fault_guard():
        while run.training() and global_step < args.total_timesteps:
            iteration += 1
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = run.learning_rate(global_step, args.total_timesteps)

            # ---- K whole episodes with pi_theta, K / N per env ----
            pi, log = RolloutPolicy(agent, rng), run.monitor.episode
            episodes, global_step = sampler.collect(pi, K, global_step, log, stopped=run.stop.requested.is_set)
            if len(episodes) < K:  # stopped during the batch: the checkpoint keeps the last update's state
                break

            # ---- returns G_t and the baseline: A_hat = G - b, (K, max T_i) ----
            G, mask = pad([ep["G"] for ep in episodes])
            V, _ = pad([np.array(ep["values"]) for ep in episodes])
            A_hat = advantages(G, mask, V, args.baseline)

            # ---- update: the actor by (1/K) sum_i g_i; the critic on G_t, its first step with the actor's ----
            g, entropy, loss = episode_gradients(agent, actor_params, episodes, A_hat, args.ent_coef, device)
            if not torch.isfinite(g).all():  # g: (K, number of actor parameters)
                raise RunFault(f"non-finite policy gradient at global step {global_step} (loss {loss})")
            g_mean = g.mean(0)
            optimizer.zero_grad()
            set_grads(actor_params, g_mean)
            v_loss, ev = float("nan"), float("nan")
            if args.baseline == "value":
                s = torch.as_tensor(np.concatenate([np.stack(ep["obs"]) for ep in episodes]), device=device)
                ev = plumbing.explained_variance(V[mask], G[mask])
                G_t = torch.as_tensor(G[mask], dtype=torch.float32, device=device)
                v_loss = fit_critic(agent, optimizer, s, G_t, args, global_step)
            else:
                gradient_step(agent, optimizer, args.max_grad_norm)
            if not plumbing.all_finite(agent):  # a finite loss can still step to inf or NaN (a huge learning rate)
                raise RunFault(f"non-finite parameters after the update at global step {global_step}")

            run.update_done(global_step, {
                "charts/learning_rate": optimizer.param_groups[0]["lr"], "losses/policy_loss": loss,
                "losses/value_loss": v_loss, "losses/entropy": entropy.mean().item(),
                "losses/pg_variance": pg_variance(g), "losses/grad_norm": g_mean.norm().item(),
                "losses/explained_variance": ev, "charts/batch_steps": int(mask.sum()),
            })  # fmt: skip
    return run.end(*envs)


def resolve_args(args: Args, discrete: bool) -> Args:
    """Fill the defaults that depend on the action space, then check that the values fit."""
    plumbing.check_common_args(args)
    args = plumbing.fill_defaults(args, {k: v[0 if discrete else 1] for k, v in DEFAULTS.items()})
    plumbing.require(
        [
            (0.0 <= args.gamma <= 1.0, f"--gamma must lie in [0, 1], got {args.gamma}"),
            (
                args.episodes_per_update >= 2,
                "--episodes-per-update must be at least 2 (the variance needs two episodes)",
            ),
            (
                args.num_envs >= 1 and args.episodes_per_update % args.num_envs == 0,
                f"--num-envs {args.num_envs} does not divide --episodes-per-update {args.episodes_per_update}",
            ),
            (args.total_timesteps >= 1, "--total-timesteps must be at least 1"),
            (args.learning_rate > 0, "--learning-rate must be positive"),
            (args.vf_steps >= 1, "--vf-steps must be at least 1"),
            (args.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
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
