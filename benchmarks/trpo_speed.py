"""TRPO training speed beside sb3-contrib's TRPO with the same settings, one torch thread each (needs the peers extra).

    python -m benchmarks.trpo_speed --env HalfCheetah-v5 --steps 20480 --seeds 1 2

trpo.py runs with sb3-contrib TRPO's defaults spelled out as flags (1 env x 2048 steps, 15 CG iterations, damping
0.1, 10 critic epochs of mini-batch 128 at Adam 1e-3, gamma 0.99, lambda 0.95, delta 0.01, 10 line-search steps x
0.8, no observation or reward normalisation); the peer runs with those defaults. Runs go one at a time, ours and
the peer's alternating, so both see the same machine load. Training SPS: env steps over the seconds of training
(charts/SPS of the last update; SB3: over learn()). --out also writes the table with the command and the machine.
"""

import argparse
import sys
from pathlib import Path

from benchmarks.machine import stamp
from benchmarks.ppo_speed import ROOT, measure_sps, sps_table

SB3_CONTRIB_DEFAULTS = [
    "--num-envs", "1", "--num-steps", "2048", "--cg-iters", "15", "--cg-damping", "0.1", "--critic-epochs", "10",
    "--critic-minibatch-size", "128", "--learning-rate", "1e-3", "--gamma", "0.99", "--gae-lambda", "0.95",
    "--max-kl", "0.01", "--line-search-steps", "10", "--line-search-shrink", "0.8", "--norm-obs", "False",
    "--norm-reward", "False", "--anneal-lr", "False", "--log-std-init", "0",
]  # fmt: skip


def sps(args) -> str:
    common = ["--env", args.env, "--total-timesteps", str(args.steps), "--eval-episodes", "0"]
    common += ["--run-dir", str(args.run_dir)]
    rows = []
    for seed in args.seeds:
        for name, cmd, pattern in [
            (
                "trpo.py (sb3-contrib's settings)",
                [sys.executable, "cleanrl_style/trpo.py", *common, "--seed", str(seed), "--no-progress"]
                + SB3_CONTRIB_DEFAULTS,
                f"{args.env}__trpo__{seed}__*",
            ),
            (
                "sb3-contrib TRPO (defaults)",
                [sys.executable, "benchmarks/peers/sb3.py", "--algo", "trpo", *common, "--seed", str(seed)],
                f"{args.env}__sb3-trpo__{seed}__*",
            ),
        ]:
            rows.append(measure_sps(name, seed, cmd, args.run_dir, pattern))
    return sps_table(rows, "one thread each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--steps", type=int, default=20480)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "speed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = sps(args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"Command: `python -m benchmarks.trpo_speed {' '.join(sys.argv[1:])}`\n\n{stamp()}\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
