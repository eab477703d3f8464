"""Evaluate a checkpoint written by any script of cleanrl_style/.

Rebuilds the agent from the checkpoint (through the `evaluate` function of the script that wrote it),
runs the deterministic policy (greedy, or the mean action) with the saved observation statistics
frozen, and prints the mean and standard deviation of the episode returns.

    python cleanrl_style/evaluate.py runs/CartPole-v1__ppo__1__1700000000/ppo.pt --episodes 10
    python cleanrl_style/evaluate.py CHECKPOINT --capture-video        # videos/eval_{run_name}/
"""

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro

import plumbing

SCRIPTS = Path(__file__).resolve().parent


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """path of a checkpoint (.pt) written by a training script"""
    episodes: int = 10
    """number of evaluation episodes"""
    seed: int | None = None
    """episode k resets with seed + 2^32 + k, apart from the seeds of training (default: the training run's seed, as in
    its final evaluation)"""
    capture_video: bool = False
    """record the first episode as mp4 under --video-dir/eval_{run_name}"""
    video_dir: str = "videos"
    """parent directory of the video directory"""
    device: Annotated[str, tyro.conf.arg(help="torch device (cpu or cuda)")] = "cpu"


def load_script(algorithm: str):
    """Import cleanrl_style/{algorithm}.py as a module (importing a script trains nothing); a UsageError if no
    training script has that name."""
    path = SCRIPTS / f"{algorithm}.py"
    if not algorithm.isidentifier() or algorithm.startswith("_") or not path.is_file():
        raise plumbing.UsageError(f"the checkpoint names algorithm '{algorithm}', which has no script in {SCRIPTS}")
    spec = importlib.util.spec_from_file_location(f"cleanrl_style_{algorithm}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if getattr(module, "ALGORITHM", None) != algorithm or not callable(getattr(module, "evaluate", None)):
        raise plumbing.UsageError(f"the checkpoint names algorithm '{algorithm}', which is not a training script")
    return module


def main(args: Args) -> int:
    if args.episodes < 1:
        return fail("--episodes must be at least 1")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        return fail(f"--seed must lie in [0, 2^32 - 1], got {args.seed}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        return fail(f"--device {args.device}: use cpu, or cuda where CUDA is available")
    video_name = f"eval_{Path(args.checkpoint).resolve().parent.name}"
    why = plumbing.unwritable_reason(args.video_dir, video_name) if args.capture_video else None
    if why is not None:
        return fail(f"--video-dir '{args.video_dir}' is not writable: {why}")
    try:  # the checkpoint's header, its algorithm's script, and its entries loaded into that script's agent
        ckpt = plumbing.load_checkpoint(args.checkpoint)
        script = load_script(ckpt["algorithm"])
        seed = ckpt["args"].get("seed") if args.seed is None else args.seed
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise plumbing.UsageError(f"'{args.checkpoint}' holds no seed in [0, 2^32 - 1]; give --seed")
        with plumbing.checkpoint_fits(ckpt, f"the {ckpt['algorithm']} script's agent"):
            script.evaluate(ckpt, 0, seed, False, None, args.device, False)  # builds and loads, plays no episode
    except plumbing.UsageError as e:
        return fail(str(e))
    plumbing.headless_rendering()
    video_folder = str(Path(args.video_dir) / video_name)
    seed = plumbing.evaluation_seed(seed)  # episode k resets with seed + 2^32 + k, as in the run's final evaluation
    try:
        progress = sys.stderr.isatty()  # a bar over the episodes on a terminal
        returns = script.evaluate(ckpt, args.episodes, seed, args.capture_video, video_folder, args.device, progress)
    except plumbing.UsageError as e:  # the checkpoint's env is not registered here, or cannot be made
        return fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(
        f"{ckpt['algorithm']} on {ckpt['env_id']} at step {ckpt['global_step']}: "
        f"return {np.mean(returns):.3f} ± {np.std(returns):.3f} over {len(returns)} episodes"
    )
    if args.capture_video:
        print(f"video: {video_folder}")
    return 0


def fail(message: str) -> int:
    print(f"error: {plumbing.one_line(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args, description=__doc__.split("\n\n")[0])))
