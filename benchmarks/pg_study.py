"""Variants of one algorithm side by side, one suite each: REINFORCE's baselines and A2C's GAE lambda.

    python -m benchmarks.pg_study baselines [--workers 2] [--out benchmarks/out/reinforce_baselines]
    python -m benchmarks.pg_study lambda    [--workers 2] [--out benchmarks/out/a2c_lambda]
    python -m benchmarks.pg_study baselines --report-only
    python -m benchmarks.pg_study lambda --env HalfCheetah-v5 --total-timesteps 300000 --seeds 1 2

The study's suite (benchmarks/suites/reinforce_baselines.toml, a2c_lambda.toml: one variant per baseline or
lambda) runs as any sweep of the harness (the same runs, logs, status files, resumable; `python -m benchmarks
report --out OUT` reports it too). --env, --seeds and --total-timesteps replace the suite's own (CartPole-v1, 3
seeds, its budget; the threshold of another env is the mujoco or classic suite's, and OUT defaults to
benchmarks/out/{suite}_{env}). Then OUT/study.md compares the variants on the env: final return, seeds reaching
the threshold, steps and seconds to it (benchmarks/report.py's summary), and for the baselines the variance of the
gradient estimate (losses/pg_variance): at the first update, where every variant scores the same K episodes (same
seed, same initial policy), and its median over the run. Figures: OUT/learning_curves.png (one curve per variant)
and, for the baselines, OUT/pg_variance.png.

The variance is exactly zero (to rounding) in an update whose K episodes all have the same returns, as when
every one of them lasts CartPole's 500 steps: with the mean, rloo or group baseline every advantage is then zero,
and so is every per-episode gradient. Such updates carry no gradient at all; the figure leaves them out of the
variance's curve (whose log would fall to minus infinity) and draws their share per update beside it.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.machine import stamp  # noqa: E402
from benchmarks.report import GRID, figure, fmt_ci, load_runs, on_grid, seeds_label, summarise  # noqa: E402
from benchmarks.sweep import ROOT, SweepError, check_distinct, load_suite, sweep  # noqa: E402

STUDIES = {"baselines": "reinforce_baselines", "lambda": "a2c_lambda"}
TITLES = {"baselines": "REINFORCE baselines", "lambda": "A2C: GAE lambda"}
ZERO = 1e-9  # an update's variance at most this times the run's largest is zero up to rounding: no gradient at all
WINDOW = 10  # updates in the running median and the running share


def zero_updates(v: np.ndarray) -> np.ndarray:
    """The updates whose gradient estimate is zero (to rounding): all K episodes had the same returns."""
    return v <= ZERO * max(float(np.max(v)), 0.0) if len(v) else np.zeros(0, bool)


def variance_figure(by_variant: dict, path: Path, env: str) -> None:
    """losses/pg_variance against env steps, per variant. Left: the mean over seeds of log10 of a running median
    over the updates with a gradient (a seed's curve ends where its last such update does; the mean is over the
    seeds that have a value there). Right: the share of updates with no gradient at all (zero variance)."""
    fig, (ax, ax0) = plt.subplots(1, 2, figsize=(12, 4.2))
    x_max = max(float(r["tags"]["losses/pg_variance"][0][-1]) for runs in by_variant.values() for r in runs)
    grid = np.linspace(0, x_max, GRID)
    for name, runs in by_variant.items():
        curves, shares = [], []
        for r in runs:
            steps, _, v = r["tags"]["losses/pg_variance"]
            steps = steps.astype(float)
            zero = zero_updates(v)
            shares.append(on_grid(steps, running_mean_bool(zero), grid))
            kept_steps, kept = steps[~zero], v[~zero]
            if len(kept) == 0:
                curves.append(np.full(GRID, np.nan))
                continue
            med = np.array([np.median(kept[max(0, i - WINDOW + 1) : i + 1]) for i in range(len(kept))])
            curve = on_grid(kept_steps, np.log10(med), grid)
            curves.append(np.where(grid <= steps[-1], curve, np.nan))
        curves, shares = np.array(curves), np.array(shares)
        counted = np.isfinite(curves).sum(0)
        ok = counted > 0
        mean = np.nansum(np.where(np.isfinite(curves), curves, 0.0), 0)[ok] / counted[ok]
        (line,) = ax.plot(grid[ok], mean, label=f"{name} ({seeds_label(len(runs))})")
        ok0 = np.all(np.isfinite(shares), 0)
        ax0.plot(grid[ok0], shares[:, ok0].mean(0), color=line.get_color(), label=name)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("log10 variance of the gradient estimate")
    ax.set_title(f"tr Cov(g_i) / K, median of {WINDOW} updates with a gradient", fontsize=10)
    ax0.set_xlabel("environment steps")
    ax0.set_ylabel(f"share of the last {WINDOW} updates")
    ax0.set_ylim(-0.03, 1.03)
    ax0.set_title("updates with no gradient: the K episodes' returns all equal (e.g. all 500)", fontsize=10)
    for a in (ax, ax0):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"REINFORCE on {env}: mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def running_mean_bool(flags: np.ndarray) -> np.ndarray:
    """The share of True among the last WINDOW values at each index (fewer at the start)."""
    c = np.cumsum(np.insert(flags.astype(np.float64), 0, 0.0))
    idx = np.arange(1, len(flags) + 1)
    lo = np.maximum(idx - WINDOW, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def study_suite(study: str, args):
    """The study's suite with the command line's --env, --seeds and --total-timesteps in place of its own."""
    suite = load_suite(STUDIES[study])
    if args.env:
        thresholds = {**load_suite("classic").thresholds, **load_suite("mujoco").thresholds, **suite.thresholds}
        suite = dataclasses.replace(suite, envs=[args.env], thresholds=thresholds)
    if args.seeds:
        suite = dataclasses.replace(suite, seeds=args.seeds)
    if args.total_timesteps:
        suite = dataclasses.replace(suite, total_timesteps=args.total_timesteps)
    return suite


def compare(study: str, out: Path, command: str, args) -> Path:
    """Write OUT/study.md and the figures from the study's sweep directory; return the report's path."""
    suite = study_suite(study, args)
    finished, failed_all = load_runs(out) if (out / "status").is_dir() else ([], [])
    env = suite.envs[0]
    by_variant = {name: [r for r in finished if r["algo"] == name and r["env"] == env] for name in suite.algos}
    failed_all = [f for f in failed_all if f["env"] == env]
    threshold = suite.thresholds.get(env)
    lines = [f"# {TITLES[study]} on {env}", ""]
    lines += [f"Command: `{command}`  ", stamp(), ""]
    lines += [
        "Final return: IQM over seeds of the mean of the last 100 training episodes; eval: the deterministic policy "
        "at the end; brackets: 95% bootstrap CI over seeds. Steps and seconds to the threshold (mean of 20 "
        f"episodes >= {threshold:g}): mean over the seeds that reached it."
        + (
            " pg_variance: tr Cov(g_i) / K of the update's K per-episode gradients; the median over the run counts "
            "the updates with a gradient only, and 'no gradient' is the share of updates whose K episodes all had "
            "the same returns (every advantage zero)."
            if study == "baselines"
            else ""
        ),
        "",
    ]
    head = "| variant | seeds | final return | eval return | reached | env steps to threshold | seconds to it |"
    rule = "|---|---|---|---|---|---|---|"
    if study == "baselines":
        head += (
            " pg_variance, first update | pg_variance, median over the run | grad norm, median |"
            " pg_variance / grad norm², median | no gradient |"
        )
        rule += "---|---|---|---|---|"
    lines += [head, rule]
    for name, runs in by_variant.items():
        if not runs:
            lines.append(f"| {name} | 0 | (not run) | | | | |")
            continue
        s = summarise(runs, threshold)
        steps = f"{np.mean(s['steps_to']):,.0f}" if s["steps_to"] else "–"
        secs = f"{np.mean(s['secs_to']):.1f}" if s["secs_to"] else "–"
        row = f"| {name} | {s['n']} | {fmt_ci(s['final'])} | {fmt_ci(s['eval'])} | {len(s['steps_to'])}/{s['n']} | "
        row += f"{steps} | {secs} |"
        if study == "baselines":
            variances = [r["tags"]["losses/pg_variance"][2] for r in runs]
            zero = [zero_updates(v) for v in variances]
            norms = [r["tags"]["losses/grad_norm"][2] for r in runs]
            first = [v[0] for v in variances]
            median = [np.median(v[~z]) for v, z in zip(variances, zero) if (~z).any()]
            norm = [np.median(n[~z]) for n, z in zip(norms, zero) if (~z).any()]
            noise = [np.median(v[~z] / n[~z] ** 2) for v, n, z in zip(variances, norms, zero) if (~z).any()]
            share = np.mean([z.mean() for z in zero])
            row += f" {np.mean(first):.3g} | {np.mean(median):.3g} | {np.mean(norm):.3g} | {np.mean(noise):.3g} |"
            row += f" {share:.0%} |"
        lines.append(row)
    for f in failed_all:
        lines.append(f"| {f['algo']} seed {f['seed']} | {f['outcome']} | | | | | |")
    done = {k: v for k, v in by_variant.items() if v}
    if done:
        figure(env, done, out / "learning_curves.png", [])
        lines += ["", "![learning curves](learning_curves.png)"]
        if study == "baselines":
            variance_figure(done, out / "pg_variance.png", env)
            lines += ["", "![variance of the gradient estimate](pg_variance.png)"]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "study.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=["baselines", "lambda"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="compare what has been run; run nothing")
    parser.add_argument("--env", help="run the study on this env instead of CartPole-v1")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the suites' seeds")
    parser.add_argument("--total-timesteps", type=int, help="override the suites' budget")
    args = parser.parse_args(argv)
    default_out = STUDIES[args.study] + (f"_{args.env.replace('/', '-')}" if args.env else "")
    out = (args.out or ROOT / "benchmarks" / "out" / default_out).resolve()
    # the command that runs the study (--report-only redraws the same report)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "python -m benchmarks.pg_study " + " ".join(given)
    status = 0
    try:
        if args.seeds:
            check_distinct(args.seeds, "--seeds")
        if not args.report_only:
            status = sweep(study_suite(args.study, args), out, args.workers)
            if status == 130:  # interrupted: the same command resumes the study
                return status
        print(f"report: {compare(args.study, out, command, args)}")
    except (SweepError, ValueError) as e:  # a broken status file of the report is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
