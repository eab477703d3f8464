"""Sutton & Barto's Example 6.6 (cliff walking), reproduced with q_learning.py and sarsa.py.

    python -m benchmarks.cliff --seeds 1 2 3 4 5 6 7 8 9 10

alpha = 0.5, epsilon = 0.1 constant, gamma = 1, as in the book. Writes, under --out
(benchmarks/results/cliff_walking by default): cliff_walking.png (sum of rewards per episode over the
first 500 episodes, mean over seeds, and the greedy paths of both methods), curves.csv and README.md
with the numbers, the command, the date and the machine.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.events import load_scalars  # noqa: E402
from benchmarks.machine import stamp

ROOT = Path(__file__).resolve().parents[1]
# Sutton & Barto, Example 6.6: constant alpha 0.5 and epsilon 0.1, gamma 1 (tests/test_tabular.py uses them too)
BOOK_SETTINGS = [
    "--alpha",
    "0.5",
    "--alpha-end",
    "0.5",
    "--epsilon-start",
    "0.1",
    "--epsilon-end",
    "0.1",
    "--gamma",
    "1.0",
]
FLAGS = [*BOOK_SETTINGS, "--total-timesteps", "30000", "--eval-episodes", "1", "--no-progress"]
METHODS = {"Q-learning": ("q_learning", []), "SARSA": ("sarsa", []), "Expected SARSA": ("sarsa", ["--expected"])}
EPISODES = 500


def greedy_path(ckpt_path: Path) -> tuple[list, float]:
    """States visited by the greedy policy from the start, and its return."""
    Q = torch.load(ckpt_path, weights_only=True)["model"]["Q"].numpy()
    env = gym.make("CliffWalking-v1")
    s, _ = env.reset(seed=0)
    path, G = [s], 0.0
    for _ in range(100):
        s, r, terminated, truncated, _ = env.step(int(np.argmax(Q[s])))
        path.append(s)
        G += r
        if terminated:
            return path, G
    return None, G  # the greedy policy loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cliff_walking")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "cliff")
    args = parser.parse_args()
    curves, eval_returns, paths = {}, {}, {}
    for name, (script, extra) in METHODS.items():
        curves[name], eval_returns[name] = [], []
        for seed in args.seeds:
            run_parent = args.run_dir / f"{name.replace(' ', '_')}_{seed}"
            subprocess.run(
                [
                    sys.executable,
                    f"cleanrl_style/{script}.py",
                    *FLAGS,
                    *extra,
                    "--seed",
                    str(seed),
                    "--run-dir",
                    str(run_parent),
                    "--exp-name",
                    script,
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            run = sorted(run_parent.iterdir())[-1]
            tags = load_scalars(run)
            returns = tags["charts/episodic_return"][2]
            assert len(returns) >= EPISODES, f"{name} seed {seed}: only {len(returns)} episodes"
            curves[name].append(returns[:EPISODES])
            eval_returns[name].append(float(tags["eval/episodic_return"][2][-1]))
            path, G = greedy_path(run / f"{script}.pt")
            if path is not None and name not in paths:
                paths[name] = (path, G, seed)
    args.out.mkdir(parents=True, exist_ok=True)

    fig, (ax, ax_grid) = plt.subplots(2, 1, figsize=(8, 8), gridspec_kw={"height_ratios": [3, 2]})
    colours = {"Q-learning": "tab:red", "SARSA": "tab:blue", "Expected SARSA": "tab:green"}
    for name, c in curves.items():
        mean = np.mean(c, 0)
        smooth = np.convolve(mean, np.ones(10) / 10, mode="valid")
        ax.plot(np.arange(len(smooth)) + 10, smooth, label=name, color=colours[name])
    ax.set_ylim(-100, 0)
    ax.set_xlabel("episode")
    ax.set_ylabel("sum of rewards during episode")
    ax.set_title(f"Cliff walking, alpha 0.5, epsilon 0.1, mean of {len(args.seeds)} seeds (10-episode moving average)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    grid = np.zeros((4, 12))
    grid[3, 1:11] = 1
    ax_grid.imshow(grid, cmap="Greys", vmin=0, vmax=3)
    for k, (name, (path, G, seed)) in enumerate(paths.items()):
        rows, cols = np.divmod(np.array(path), 12)
        ax_grid.plot(
            cols + (k - 1) * 0.08,
            rows + (k - 1) * 0.08,
            "-o",
            ms=3,
            color=colours[name],
            label=f"{name} greedy path, seed {seed} (return {G:.0f})",
        )
    ax_grid.text(0, 3, "S", ha="center", va="center", fontsize=12, weight="bold")
    ax_grid.text(11, 3, "G", ha="center", va="center", fontsize=12, weight="bold")
    ax_grid.text(5.5, 3, "the cliff", ha="center", va="center", color="white")
    ax_grid.set_xticks([])
    ax_grid.set_yticks([])
    ax_grid.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=1, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "cliff_walking.png", dpi=90)

    with open(args.out / "curves.csv", "w") as f:
        f.write("method,seed,episode,return\n")
        for name, c in curves.items():
            for seed, returns in zip(args.seeds, c):
                f.writelines(f"{name},{seed},{i},{r:g}\n" for i, r in enumerate(returns))
    rows = [
        "| method | mean return per episode, episodes 401–500 (mean ± std over seeds) | greedy return (each seed) |",
        "|---|---|---|",
    ]
    for name, c in curves.items():
        late = np.mean(np.array(c)[:, 400:500], 1)
        rows.append(
            f"| {name} | {late.mean():.1f} ± {late.std():.1f} | {', '.join(f'{g:g}' for g in eval_returns[name])} |"
        )
    (args.out / "README.md").write_text(
        "# Cliff walking (Sutton & Barto, Example 6.6)\n\n"
        f"Command: `python -m benchmarks.cliff --seeds {' '.join(map(str, args.seeds))}`  \n"
        f"{stamp()}  \n"
        f"Flags of every run: `{' '.join(FLAGS)}` (plus `--expected` for Expected SARSA)\n\n"
        + "\n".join(rows)
        + "\n\nThe book reports about −25 per episode for SARSA and about −50 for Q-learning: Q-learning learns the "
        "optimal path along the cliff (greedy return −13) but, exploring with epsilon = 0.1, often falls off it; "
        "SARSA learns the value of the exploring policy and so a safer path further away (−15 or −17).\n\n"
        "Greedy return −1000: the greedy policy of the final Q-table loops (evaluation stops at 1,000 steps). With "
        "the book's constant alpha = 0.5, SARSA's Q-values keep moving with each sampled a_{t+1}, and in the final "
        "snapshot of some seeds a wall-bumping action (which keeps the agent in place) briefly outranks the way "
        "forward; Expected SARSA, whose target averages over a_{t+1}, does not show it. The figure draws, for "
        "each method, the greedy path of the first seed whose greedy policy reaches the goal.\n\n"
        "![cliff walking](cliff_walking.png)\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
