"""GRPO against a reference policy, the notes' setting in miniature: beta's pull toward pi_ref.

    python -m benchmarks.grpo_study beta [--env CartPole-v1] [--sft-steps 6000] [--steps 100000]
                                         [--betas 0 0.01 0.1] [--seeds 1 2 3] [--out benchmarks/out/grpo_beta]

In the notes GRPO fine-tunes a language model that supervised training (SFT) made first, and the KL term
beta D(pi_theta || pi_ref) keeps the policy near that model. Here the "SFT model" is a ppo.py policy trained
briefly (--sft-steps; it balances the pole for a while, not to the end); grpo.py starts from it, takes it as
pi_ref (--ref-policy), and trains with each beta. The figure shows, per beta, the return (mean of the last 20
episodes) and the exact KL(pi_theta || pi_ref) over the visited states (losses/kl_ref_exact) against env steps;
the table gives their last values, the SFT policy's own return beside them. Runs that finished are kept: the
same command again only runs what is missing.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.events import load_scalars  # noqa: E402
from benchmarks.machine import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 20


def script(name: str, flags: list, run_dir: Path) -> Path:
    """Run cleanrl_style/{name}.py once into run_dir (skipped when a finished run is there); its run directory."""
    done = sorted(run_dir.glob("*/*.pt"))
    if not done:
        cmd = [sys.executable, str(ROOT / "cleanrl_style" / f"{name}.py"), *flags, "--run-dir", str(run_dir)]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd + ["--no-progress"], check=True, env=dict(os.environ, MUJOCO_GL="egl"))
        done = sorted(run_dir.glob("*/*.pt"))
    return done[-1].parent


def curve(run: Path, tag: str) -> tuple:
    steps, _, values = load_scalars(run)[tag]
    if tag == "charts/episodic_return":  # the mean of the last WINDOW episodes (of those so far, at the start)
        total = np.cumsum(np.concatenate([[0.0], values]))
        i = np.arange(1, len(values) + 1)
        values = (total[i] - total[np.maximum(i - WINDOW, 0)]) / np.minimum(i, WINDOW)
    return steps.astype(float), values


def beta_study(a: argparse.Namespace) -> int:
    out = Path(a.out)
    sft = script("ppo", ["--env", a.env, "--seed", "1", "--total-timesteps", str(a.sft_steps)], out / "sft")
    sft_eval = float(load_scalars(sft)["eval/episodic_return"][2][-1])
    ckpt = next(sft.glob("*.pt"))
    runs = {}
    for beta in a.betas:
        for seed in a.seeds:
            flags = ["--env", a.env, "--seed", str(seed), "--total-timesteps", str(a.steps)]
            flags += ["--ref-policy", str(ckpt), "--beta", str(beta)]
            runs.setdefault(beta, []).append(script("grpo", flags, out / f"beta_{beta}" / f"seed_{seed}"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = []
    for k, (beta, seed_runs) in enumerate(runs.items()):
        color = f"C{k}"
        finals, kls, evals = [], [], []
        for j, run in enumerate(seed_runs):
            for ax, tag in zip(axes, ("charts/episodic_return", "losses/kl_ref_exact")):
                x, y = curve(run, tag)
                ax.plot(x, y, color=color, alpha=0.8, lw=1, label=f"beta = {beta}" if j == 0 else None)
            finals.append(load_scalars(run)["charts/episodic_return"][2][-WINDOW:].mean())
            kls.append(load_scalars(run)["losses/kl_ref_exact"][2][-5:].mean())
            evals.append(load_scalars(run)["eval/episodic_return"][2][-1])
        rows.append((beta, finals, kls, evals))
    axes[0].axhline(sft_eval, color="k", ls=":", lw=1, label=f"pi_ref (SFT) eval {sft_eval:.0f}")
    axes[0].set(xlabel="env steps", ylabel=f"return (mean of last {WINDOW} episodes)", title=f"{a.env}: return")
    axes[1].set(xlabel="env steps", ylabel="KL(pi_theta || pi_ref), exact, per state", title="distance from pi_ref")
    axes[1].set_yscale("symlog", linthresh=1e-3)
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"grpo.py fine-tuning a ppo.py policy ({a.sft_steps} steps) with KL to it; {len(a.seeds)} seeds, one line each"
    )
    fig.tight_layout()
    fig.savefig(out / "beta.png", dpi=110)

    command = "python -m benchmarks.grpo_study beta " + " ".join(sys.argv[2:])
    lines = [
        f"# grpo.py with a KL to a ppo.py reference policy, {a.env}",
        "",
        f"Command: `{command}`",
        "",
        stamp(),
        "",
        f"pi_ref: ppo.py, seed 1, {a.sft_steps} steps; its deterministic evaluation: {sft_eval:.1f}.",
        f"grpo.py: {a.steps} steps from pi_ref, its other flags the defaults; seeds {a.seeds}.",
        "",
        f"| beta | final return (last {WINDOW} episodes), per seed | exact KL to pi_ref, last 5 updates | eval |",
        "|---|---|---|---|",
    ]
    for beta, finals, kls, evals in rows:
        per = ", ".join(f"{v:.0f}" for v in finals)
        lines.append(
            f"| {beta} | {np.mean(finals):.1f} ({per}) | {np.mean(kls):.4f} ({', '.join(f'{v:.4f}' for v in kls)})"
            f" | {np.mean(evals):.1f} |"
        )
    lines += ["", "![return and KL to pi_ref](beta.png)", ""]
    (out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grpo_study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="study", required=True)
    b = sub.add_parser("beta", help="fine-tune a brief ppo.py policy with GRPO and a KL to it, for several beta")
    b.add_argument("--env", default="CartPole-v1")
    b.add_argument("--sft-steps", type=int, default=6_000)
    b.add_argument("--steps", type=int, default=100_000)
    b.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    b.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    b.add_argument("--out", default="benchmarks/out/grpo_beta")
    a = p.parse_args(argv)
    return beta_study(a)


if __name__ == "__main__":
    sys.exit(main())
