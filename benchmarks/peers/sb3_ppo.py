"""Stable-Baselines3 PPO, logged in this project's TensorBoard layout so its runs read like ours.

    python benchmarks/peers/sb3_ppo.py --env CartPole-v1 --zoo      # rl-zoo3's tuned CartPole settings
    python benchmarks/peers/sb3_ppo.py --env HalfCheetah-v5         # SB3's defaults

Writes runs/{env}__sb3-ppo__{seed}__{unix_time}/ with charts/episodic_return and
charts/episodic_length per finished episode, and charts/SPS (env steps over the seconds of learn()).
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    env: str = "CartPole-v1"
    """gymnasium environment id"""
    seed: int = 1
    """seed of SB3 and the environments"""
    total_timesteps: int = 100_000
    """environment steps"""
    zoo: bool = False
    """use rl-zoo3's tuned CartPole-v1 hyperparameters instead of SB3's defaults"""
    run_dir: str = "runs"
    """parent directory of the run directory"""
    threads: int = 1
    """torch CPU threads"""


# rl-zoo3 hyperparams/ppo.yml, CartPole-v1 (lin_ = linear decay to 0 over the run)
ZOO_CARTPOLE = dict(n_envs=8, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                    ent_coef=0.0, learning_rate=1e-3, clip_range=0.2)


def main(args: Args) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(args.threads)
    run = Path(args.run_dir) / f"{args.env}__sb3-ppo__{args.seed}__{int(time.time())}"
    writer = SummaryWriter(str(run))

    class Log(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], self.num_timesteps)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], self.num_timesteps)
            return True

    if args.zoo:
        hp = dict(ZOO_CARTPOLE)
        n_envs = hp.pop("n_envs")
        lr, clip = hp.pop("learning_rate"), hp.pop("clip_range")
        hp.update(learning_rate=lambda f: f * lr, clip_range=lambda f: f * clip)
    else:
        hp, n_envs = {}, 1
    env = make_vec_env(args.env, n_envs=n_envs, seed=args.seed)
    model = PPO("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, **hp)
    t0 = time.time()
    model.learn(args.total_timesteps, callback=Log())
    writer.add_scalar("charts/SPS", model.num_timesteps / (time.time() - t0), model.num_timesteps)
    writer.close()
    print(f"sb3-ppo {args.env} seed {args.seed}: {model.num_timesteps} steps, run in {run}")


if __name__ == "__main__":
    main(tyro.cli(Args))
    sys.exit(0)
