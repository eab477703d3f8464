"""The benchmark harness: sweeps over algorithms x environments x seeds, and their reports.

    python -m benchmarks run --suite classic [--algos ppo sb3-ppo] [--envs CartPole-v1] [--seeds 1 2 3]
                             [--total-timesteps N] [--workers N] [--out DIR] [--backend local|ray]
    python -m benchmarks report [--out DIR]
    python -m benchmarks tune --algo ALGO --env ENV --trials N --total-timesteps T --seeds S... --study NAME
                              (hyperparameter search with Optuna: benchmarks/tune.py says how)

Each run is its own process with one torch thread; --workers run at once (default: the cores). A
second `run` with the same arguments skips the runs that finished with the same command, resumes the
unfinished ones from their checkpoints (a run with none starts afresh), and sets aside in
DIR/superseded/ the runs made with other settings (another budget, other flags) before redoing them:
nothing is deleted but half-written runs with no checkpoint. A failed run is reported with the tail
of its log, the sweep goes on, and `run` exits 1 naming every failed run. Ctrl-C or SIGTERM stops
the sweep: no new run starts, the running scripts checkpoint and stop, `run` lists what finished and
what did not, writes no report and exits 130; the same command goes on from there. A mistake in the
arguments or the suite file (an algorithm, env or seed listed twice too), a broken status file, an --out
that is a file or cannot be made, or an --out that another sweep (or the scripts of a killed one) still
works in, is one `error:` line, exit 2, nothing written.
`report` reads the event files under DIR and writes DIR/report.md, DIR/figures/*.png and
DIR/curves.csv; a run that finished without a training episode is listed as such, a run whose event
file was cut short is named (in the report and on stderr) and left out of the table's numbers, and a
broken suite.json or status file is one `error:` line, exit 2. Peers (the peers extra): sb3-ppo,
sb3-a2c, sb3-dqn, sb3-trpo in --algos.
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

from benchmarks import tune
from benchmarks.report import report
from benchmarks.sweep import INTERRUPTED, ROOT, SweepError, check_algos, check_distinct, load_suite, sweep


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite (resumable)")
    run.add_argument("--suite", required=True, help="a file benchmarks/suites/NAME.toml: smoke, classic, mujoco")
    run.add_argument(
        "--algos",
        nargs="+",
        help="override the suite's algorithms (peers: sb3-ppo, sb3-a2c, ...; the suite's variants)",
    )
    run.add_argument("--envs", nargs="+", help="override the suite's environments")
    run.add_argument("--seeds", nargs="+", type=int, help="override the suite's seeds")
    run.add_argument("--total-timesteps", type=int, help="override the suite's budget")
    run.add_argument("--workers", type=int, default=os.cpu_count(), help="runs at once (default: the cores)")
    run.add_argument("--out", type=Path, help="output directory (default: benchmarks/out/SUITE)")
    run.add_argument("--backend", choices=["local", "ray"], default="local", help="process pool, or a Ray cluster")
    run.add_argument("--ray-address", help="Ray cluster address (default: start or join a local one)")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    rep = sub.add_parser("report", help="write the report of a sweep directory")
    rep.add_argument("--out", type=Path, required=True, help="the sweep's output directory")
    tune.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "tune":
        return tune.main(args)

    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.command == "report":
        if not (args.out / "status").is_dir():
            print(f"error: {args.out} holds no sweep (no status/ directory)", file=sys.stderr)
            return 2
        try:
            print(report(args.out, command))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        suite = load_suite(args.suite)
        for flag in ("algos", "envs", "seeds"):
            if getattr(args, flag) is not None:
                check_distinct(getattr(args, flag), f"--{flag}")
        overrides = {
            "algos": args.algos,
            "envs": args.envs,
            "seeds": args.seeds,
            "total_timesteps": args.total_timesteps,
        }
        suite = dataclasses.replace(suite, **{k: v for k, v in overrides.items() if v is not None})
        check_algos(suite.algos, suite.variants)
        if args.workers < 1:
            raise SweepError("--workers must be >= 1")
        if args.backend == "ray" and importlib.util.find_spec("ray") is None:
            raise SweepError('--backend ray needs Ray: pip install -e ".[ray]"')
        # absolute: the scripts run in the repository root, and the commands recorded must not depend on the cwd
        out = (args.out or ROOT / "benchmarks" / "out" / suite.name).resolve()
        status = sweep(suite, out, args.workers, args.backend, args.ray_address)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.no_report and status != INTERRUPTED:
        print(f"report: {report(out, command)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
