"""Variants of one algorithm side by side, each its own suite: REINFORCE's baselines and A2C's GAE lambda.

    python -m benchmarks.pg_study baselines [--workers 2] [--out benchmarks/out/pg_baselines]
    python -m benchmarks.pg_study lambda    [--workers 2] [--out benchmarks/out/pg_lambda]
    python -m benchmarks.pg_study baselines --report-only
    python -m benchmarks.pg_study lambda --env HalfCheetah-v5 --total-timesteps 300000 --seeds 1 2

Each TOML file of benchmarks/suites/pg_{study}/ is a suite of the harness (the same runs, logs, status files,
resumable); its runs go under OUT/{file name}/. --env, --seeds and --total-timesteps replace the suites' own
(CartPole-v1, 3 seeds, their budget; the threshold of another env is the mujoco or classic suite's, and OUT
defaults to benchmarks/out/pg_{study}_{env}). Then OUT/report.md compares the variants on the env: final
return, seeds reaching the threshold, steps and seconds to it (benchmarks/report.py's summary), and for the
baselines the variance of the gradient estimate (losses/pg_variance): at the first update, where every variant
scores the same K episodes (same seed, same initial policy), and its median over the run. Figures:
OUT/learning_curves.png (one curve per variant) and, for the baselines, OUT/pg_variance.png.
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
from benchmarks.report import GRID, figure, fmt_ci, load_runs, on_grid, summarise  # noqa: E402
from benchmarks.sweep import ROOT, SUITES, SweepError, check_distinct, load_suite, sweep  # noqa: E402

ORDER = {"baselines": ["none", "mean", "value", "rloo", "group"]}


def variant_files(study: str) -> list:
    """The study's suite files, in the order of the table: the baselines as named, lambda by value."""
    files = sorted((SUITES / f"pg_{study}").glob("*.toml"))
    if study in ORDER:
        return sorted(files, key=lambda p: ORDER[study].index(p.stem))
    return sorted(files, key=lambda p: float(p.stem.split("_")[-1]))


def label(study: str, path: Path) -> str:
    return f"baseline {path.stem}" if study == "baselines" else f"lambda = {path.stem.split('_')[-1]}"


def variance_figure(by_variant: dict, path: Path, env: str) -> None:
    """losses/pg_variance against env steps, per variant: the mean over seeds of log10 of a 10-update running median."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x_max = max(float(r["tags"]["losses/pg_variance"][0][-1]) for runs in by_variant.values() for r in runs)
    grid = np.linspace(0, x_max, GRID)
    for name, runs in by_variant.items():
        curves = []
        for r in runs:
            steps, _, v = r["tags"]["losses/pg_variance"]
            med = np.array([np.median(v[max(0, i - 9) : i + 1]) for i in range(len(v))])
            curves.append(on_grid(steps.astype(float), np.log10(np.maximum(med, 1e-12)), grid))
        curves = np.array(curves)
        ok = np.all(np.isfinite(curves), 0)
        ax.plot(grid[ok], curves[:, ok].mean(0), label=f"{name} ({len(runs)} seeds)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("log10 variance of the gradient estimate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"REINFORCE on {env}: tr Cov(g_i) / K per update")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def variant_suite(path: Path, args):
    """The variant's suite with the command line's --env, --seeds and --total-timesteps in place of its own."""
    suite = load_suite(str(path))
    if args.env:
        thresholds = {**load_suite("classic").thresholds, **load_suite("mujoco").thresholds, **suite.thresholds}
        suite = dataclasses.replace(suite, envs=[args.env], thresholds=thresholds)
    if args.seeds:
        suite = dataclasses.replace(suite, seeds=args.seeds)
    if args.total_timesteps:
        suite = dataclasses.replace(suite, total_timesteps=args.total_timesteps)
    return suite


def compare(study: str, out: Path, command: str, args) -> Path:
    """Write OUT/report.md and the figures from the variants' sweep directories; return the report's path."""
    by_variant, failed_all, suites = {}, [], {}
    for path in variant_files(study):
        suites[label(study, path)] = variant_suite(path, args)
        finished, failed = load_runs(out / path.stem) if (out / path.stem / "status").is_dir() else ([], [])
        by_variant[label(study, path)] = finished
        failed_all += failed
    env = next(iter(suites.values())).envs[0]
    threshold = next(iter(suites.values())).thresholds.get(env)
    lines = [f"# {'REINFORCE baselines' if study == 'baselines' else 'A2C: GAE lambda'} on {env}", ""]
    lines += [f"Command: `{command}`  ", stamp(), ""]
    lines += [
        "Final return: IQM over seeds of the mean of the last 100 training episodes; eval: the deterministic policy "
        "at the end; brackets: 95% bootstrap CI over seeds. Steps and seconds to the threshold (mean of 20 "
        f"episodes >= {threshold:g}): mean over the seeds that reached it.",
        "",
    ]
    head = "| variant | seeds | final return | eval return | reached | env steps to threshold | seconds to it |"
    rule = "|---|---|---|---|---|---|---|"
    if study == "baselines":
        head += " pg_variance, first update | pg_variance, median over the run | grad norm, median |"
        rule += "---|---|---|"
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
            first = [r["tags"]["losses/pg_variance"][2][0] for r in runs]
            median = [np.median(r["tags"]["losses/pg_variance"][2]) for r in runs]
            norm = [np.median(r["tags"]["losses/grad_norm"][2]) for r in runs]
            noise = [
                np.median(r["tags"]["losses/pg_variance"][2] / r["tags"]["losses/grad_norm"][2] ** 2) for r in runs
            ]
            row += f" {np.mean(first):.3g} | {np.mean(median):.3g} | {np.mean(norm):.3g} | {np.mean(noise):.3g} |"
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
    path = out / "report.md"
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
    default_out = f"pg_{args.study}" + (f"_{args.env.replace('/', '-')}" if args.env else "")
    out = (args.out or ROOT / "benchmarks" / "out" / default_out).resolve()
    # the command that runs the study (--report-only redraws the same report)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "python -m benchmarks.pg_study " + " ".join(given)
    status = 0
    try:
        if args.seeds:
            check_distinct(args.seeds, "--seeds")
        if not args.report_only:
            for path in variant_files(args.study):
                status = max(status, sweep(variant_suite(path, args), out / path.stem, args.workers))
                if status == 130:  # interrupted: run no further variant; the same command resumes the study
                    return status
        print(f"report: {compare(args.study, out, command, args)}")
    except (SweepError, ValueError) as e:  # a broken status file of the report is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
