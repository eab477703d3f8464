"""Stable-Baselines3 (and sb3-contrib) runs, logged in this project's TensorBoard layout.

    python benchmarks/peers/sb3.py --algo ppo --env CartPole-v1 --zoo    # rl-zoo3's tuned CartPole PPO
    python benchmarks/peers/sb3.py --algo ppo --env HalfCheetah-v5       # SB3's defaults

Takes the flags the benchmark harness gives every script (--env, --seed, --total-timesteps,
--run-dir, --eval-episodes, --no-progress, --exp-name) and writes runs/{env}__sb3-{algo}__{seed}__{unix_time}/
with charts/episodic_return and charts/episodic_length per finished episode, charts/SPS (env steps
over the seconds of learn()) and eval/episodic_return (the deterministic policy at the end).
Hyperparameters are SB3's defaults unless --zoo. Needs the peers extra: pip install -e ".[peers]".

Checkpoints, so that a sweep stopped or killed mid-run goes on instead of starting the run afresh: every
--checkpoint-every steps, at the end, and on Ctrl-C (SIGINT: the run stops at the next step, saves, exits 130), the
model goes to RUN/sb3-{algo}.zip (SB3's own save, written to a temporary file first), with VecNormalize's statistics
(sb3-{algo}.vecnormalize.pkl) and, until the run ends, DQN's replay buffer (sb3-{algo}.replay.pkl) beside it.
--resume RUN/sb3-{algo}.zip loads them and learns the remaining steps in the same run directory
(reset_num_timesteps=False: the learning-rate and exploration schedules go on where they were); the episodes logged
after the checkpoint by the stopped attempt are dropped from TensorBoard's view (purge_step). The environments start
new episodes, seeded seed + steps done.
"""

import ast
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    algo: Literal["ppo", "a2c", "dqn", "trpo"] = "ppo"
    """the SB3 algorithm (trpo comes from sb3-contrib)"""
    env: Annotated[str, tyro.conf.arg(aliases=("--env-id",))] = "CartPole-v1"
    """gymnasium environment id"""
    seed: int = 1
    """seed of SB3 and the environments"""
    total_timesteps: int | None = None
    """environment steps (default: 100,000 discrete actions, 1,000,000 continuous)"""
    zoo: bool = False
    """rl-zoo3's tuned hyperparameters (CartPole-v1: PPO, DQN; MuJoCo: TRPO, A2C) instead of SB3's defaults"""
    eval_episodes: int = 10
    """deterministic evaluation episodes at the end"""
    run_dir: str = "runs"
    """parent directory of the run directory"""
    threads: int = 1
    """torch CPU threads"""
    progress: bool = True
    """accepted for the harness; SB3's own output is off"""
    n_envs: int | None = None
    """parallel environments (DummyVecEnv), overriding the defaults' or rl-zoo3's number"""
    n_steps: int | None = None
    """steps per environment per rollout (on-policy algorithms), overriding the defaults' or rl-zoo3's number"""
    exp_name: str | None = None
    """the run's name in its directory's name (default: sb3-{algo}); the harness gives a variant's name"""
    hp: tuple[str, ...] = ()
    """more hyperparameters of the SB3 algorithm as NAME=VALUE, VALUE a Python literal, applied last (for example
    --hp batch_size=64 train_freq=1 "policy_kwargs={'net_arch': [128, 128]}")"""
    sps_every: int = 0
    """also log charts/SPS every this many env steps while learning (0: once, at the end), so that a benchmark can
    read the steady rate between two points of the run"""
    checkpoint_every: int = 100_000
    """save the checkpoint every this many env steps (0: only at the end and on Ctrl-C)"""
    resume: str | None = None
    """a checkpoint (RUN/sb3-ALGO.zip) to go on from, with the same flags; its run directory is continued"""


# rl-zoo3 hyperparams/ppo.yml, CartPole-v1 (lin_ = linear decay to 0 over the run)
ZOO = {
    ("ppo", "CartPole-v1"): dict(
        n_envs=8,
        n_steps=32,
        batch_size=256,
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=20,
        ent_coef=0.0,
        learning_rate=1e-3,
        clip_range=0.2,
    ),
    # rl-zoo3 hyperparams/dqn.yml, CartPole-v1 (constant learning rate; n_timesteps 5e4)
    ("dqn", "CartPole-v1"): dict(
        n_envs=1,
        learning_rate=2.3e-3,
        batch_size=64,
        buffer_size=100_000,
        learning_starts=1000,
        gamma=0.99,
        target_update_interval=10,
        train_freq=256,
        gradient_steps=128,
        exploration_fraction=0.16,
        exploration_final_eps=0.04,
        policy_kwargs=dict(net_arch=[256, 256]),
    ),
}
# rl-zoo3 hyperparams/trpo.yml, the MuJoCo entries (written there for v4; the same for v5). normalize: VecNormalize
# of observations and rewards (rl-zoo3's defaults, its gamma the algorithm's); evaluation uses the frozen obs stats.
_TRPO_MUJOCO = dict(
    normalize=True,
    n_envs=2,
    batch_size=128,
    n_steps=1024,
    gamma=0.99,
    gae_lambda=0.95,
    sub_sampling_factor=1,
    cg_max_steps=25,
    cg_damping=0.1,
    n_critic_updates=20,
    learning_rate=1e-3,
)
# rl-zoo3 hyperparams/a2c.yml, the MuJoCo entries: SB3's A2C defaults (1 env, 5 steps, RMSprop 7e-4) and VecNormalize
_A2C_MUJOCO = dict(normalize=True, n_envs=1)
for _env in ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5"):
    ZOO["trpo", _env] = dict(_TRPO_MUJOCO, **({"target_kl": 0.04} if _env == "HalfCheetah-v5" else {}))
    ZOO["a2c", _env] = dict(_A2C_MUJOCO)
STOPS = (signal.SIGINT, signal.SIGTERM)
LINEAR = {("ppo", "CartPole-v1"): ("learning_rate", "clip_range")}  # the entries' lin_ schedules


def main(args: Args) -> int:
    from stable_baselines3 import A2C, DQN, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    try:
        gym.spec(args.env)
    except gym.error.Error as e:
        print(f"error: unknown environment id '{args.env}' ({type(e).__name__})", file=sys.stderr)
        return 2
    if args.algo == "trpo":
        from sb3_contrib import TRPO as Algo
    else:
        Algo = {"ppo": PPO, "a2c": A2C, "dqn": DQN}[args.algo]
    torch.set_num_threads(args.threads)
    discrete = isinstance(gym.make(args.env).action_space, gym.spaces.Discrete)
    total = args.total_timesteps or (100_000 if discrete else 1_000_000)
    hp, n_envs, normalize = {}, 1, False
    if args.zoo:
        if (args.algo, args.env) not in ZOO:
            print(f"error: no rl-zoo3 hyperparameters here for {args.algo} on {args.env}", file=sys.stderr)
            return 2
        hp = dict(ZOO[(args.algo, args.env)])
        n_envs = hp.pop("n_envs")
        normalize = hp.pop("normalize", False)
        for k in LINEAR.get((args.algo, args.env), ()):
            if k in hp:
                hp[k] = (lambda v: lambda f: f * v)(hp[k])
    for name, value in (("n_envs", args.n_envs), ("n_steps", args.n_steps)):
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1, got {value}", file=sys.stderr)
            return 2
    if args.n_steps is not None:
        if args.algo == "dqn":
            print("error: --n-steps is for the on-policy algorithms (ppo, a2c, trpo), not dqn", file=sys.stderr)
            return 2
        hp["n_steps"] = args.n_steps
    n_envs = args.n_envs or n_envs
    for item in args.hp:
        name, eq, text = item.partition("=")
        try:
            hp[name] = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            eq = ""
        if not eq or not name.isidentifier():
            print(f"error: --hp takes NAME=VALUE with VALUE a Python literal, got '{item}'", file=sys.stderr)
            return 2
    exp_name = args.exp_name if args.exp_name is not None else f"sb3-{args.algo}"
    if exp_name in ("", ".", "..") or set("/\\").intersection(exp_name):
        print(f"error: --exp-name must be a plain name without a path separator, got '{exp_name}'", file=sys.stderr)
        return 2
    if args.checkpoint_every < 0:
        print(f"error: --checkpoint-every must be >= 0, got {args.checkpoint_every}", file=sys.stderr)
        return 2
    stem = f"sb3-{args.algo}"  # the checkpoint's files: RUN/{stem}.zip and, beside it, what SB3 keeps apart
    if args.resume is not None:
        ckpt = Path(args.resume)
        if ckpt.name != f"{stem}.zip" or not ckpt.is_file():
            print(
                f"error: --resume {args.resume} is not a {stem}.zip checkpoint written by this script", file=sys.stderr
            )
            return 2
        run = ckpt.parent
    else:
        run = Path(args.run_dir) / f"{args.env}__{exp_name}__{args.seed}__{int(time.time())}"
    hyperparameters = (
        "hyperparameters",
        f"SB3 {args.algo}, {'rl-zoo3' if args.zoo else 'defaults'}: "
        f"{ZOO.get((args.algo, args.env)) if args.zoo else {}}"
        + (f"; overridden: n_envs={args.n_envs}, n_steps={args.n_steps}" if args.n_envs or args.n_steps else "")
        + (f"; --hp: {', '.join(args.hp)}" if args.hp else ""),
    )

    class Log(BaseCallback):
        def _on_step(self) -> bool:
            every, step = args.sps_every, self.num_timesteps
            if every and step // every > (step - n_envs) // every:  # a multiple of --sps-every passed in this step
                writer.add_scalar("charts/SPS", (step - done) / (time.time() - t0), step)
            every = args.checkpoint_every
            if every and step // every > (step - n_envs) // every and step < total:
                save()
            for info in self.locals["infos"]:
                if "episode" in info:
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], self.num_timesteps)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], self.num_timesteps)
            return not stopped

    if args.resume is None:
        done = 0
        env = make_vec_env(args.env, n_envs=n_envs, seed=args.seed)
        if normalize:
            env = VecNormalize(env, gamma=hp.get("gamma", 0.99))
        model = Algo("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, **hp)
    else:
        try:
            env = make_vec_env(args.env, n_envs=n_envs, seed=args.seed)  # reseeded below, before its first reset
            if normalize:
                env = VecNormalize.load(str(run / f"{stem}.vecnormalize.pkl"), env)
            model = Algo.load(ckpt, env=env, device="cpu")
            done = model.num_timesteps
            if hasattr(model, "replay_buffer"):
                model.load_replay_buffer(run / f"{stem}.replay.pkl")
        except Exception as e:  # another algorithm's or env's checkpoint, a file missing or unreadable
            print(f"error: cannot resume from {ckpt}: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        model.set_random_seed(args.seed + done)
        print(f"resumed {ckpt} at step {done}")
    resumed = args.resume is not None
    writer = SummaryWriter(str(run), purge_step=done if resumed else None)  # drops what a stopped attempt logged later
    if not resumed:
        writer.add_text(*hyperparameters)

    def save(final: bool = False) -> None:
        """The checkpoint: SB3's zip written to a temporary file and renamed over the last one, after the files kept
        beside it (VecNormalize's statistics, DQN's replay buffer), each written the same way. At the end the replay
        buffer (tens of MB: SB3 stores its whole capacity) is removed: a finished run is not resumed."""
        if normalize:
            env.save(str(run / f".{stem}.vecnormalize.pkl"))
            os.replace(run / f".{stem}.vecnormalize.pkl", run / f"{stem}.vecnormalize.pkl")
        if hasattr(model, "replay_buffer") and final:
            (run / f"{stem}.replay.pkl").unlink(missing_ok=True)
        elif hasattr(model, "replay_buffer"):
            model.save_replay_buffer(run / f".{stem}.replay.pkl")
            os.replace(run / f".{stem}.replay.pkl", run / f"{stem}.replay.pkl")
        model.save(run / f".{stem}.zip")
        os.replace(run / f".{stem}.zip", run / f"{stem}.zip")

    stopped = []  # SIGINT or SIGTERM: learn() stops at the next step, the checkpoint is saved, exit 130
    previous = {sig: signal.signal(sig, lambda signum, frame: stopped.append(signum)) for sig in STOPS}
    t0 = time.time()
    try:
        model.learn(total - done, callback=Log(), reset_num_timesteps=not resumed)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        save()
        writer.close()
        print(f"stopped at step {model.num_timesteps}; checkpoint {run / f'{stem}.zip'}", file=sys.stderr)
        return 130
    save(final=True)
    writer.add_scalar("charts/SPS", (model.num_timesteps - done) / (time.time() - t0), model.num_timesteps)
    if args.eval_episodes > 0:
        if normalize:  # the policy sees normalised observations: evaluate through the training statistics, frozen
            eval_env = VecNormalize(make_vec_env(args.env, n_envs=1, seed=args.seed), training=False, norm_reward=False)
            eval_env.obs_rms = env.obs_rms
        else:
            eval_env = gym.make(args.env)
            eval_env.reset(seed=args.seed)
        returns, _ = evaluate_policy(
            model, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True, return_episode_rewards=True
        )
        writer.add_scalar("eval/episodic_return", float(np.mean(returns)), model.num_timesteps)
    writer.close()
    print(f"sb3-{args.algo} {args.env} seed {args.seed}: {model.num_timesteps} steps, run in {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
