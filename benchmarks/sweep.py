"""Run every (algorithm, env, seed) of a suite, each as its own process, and keep the record.

Layout under --out DIR (KEY is {algo}__{env}__{seed}, with any '/' of the env id written '+'):
    DIR/runs/KEY/{the script's run directory}    TensorBoard events, checkpoint
    DIR/logs/KEY.log                             the process's stdout and stderr
    DIR/status/KEY.json                          algo, env, seed, command, exit status, start time, seconds

A run counts as finished when its status file says exit status 0. A later call with the same
arguments skips finished runs and redoes the others (their half-written run directory is cleared;
the log of the failed attempt is kept beside the new one as .log.1, .log.2, ...).

A suite file that is not what SUITE_KEYS says, or an unknown algorithm or peer, raise SweepError
before anything is written (the command line makes it one `error:` line, exit 2).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SUITES = Path(__file__).resolve().parent / "suites"


class SweepError(ValueError):
    """A user's mistake or a broken file: one line for the user, exit status 2, nothing written."""


@dataclass
class Suite:
    name: str
    algos: list
    envs: list
    seeds: list
    total_timesteps: "int | None" = None
    thresholds: dict = field(default_factory=dict)
    threshold_windows: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)


def _is(kind):
    return lambda v: isinstance(v, kind) and not isinstance(v, bool)


def _list_of(kind):
    return lambda v: isinstance(v, list) and len(v) > 0 and all(map(_is(kind), v))


def _table_of(ok):
    return lambda v: isinstance(v, dict) and all(ok(x) for x in v.values())


# key of the suite file: (required, test of its value, what it must be)
SUITE_KEYS = {
    "algos": (True, _list_of(str), "a non-empty list of algorithm names"),
    "envs": (True, _list_of(str), "a non-empty list of environment ids"),
    "seeds": (True, _list_of(int), "a non-empty list of integer seeds"),
    "total_timesteps": (False, lambda v: _is(int)(v) and v > 0, "a positive integer"),
    "thresholds": (False, _table_of(_is((int, float))), 'a table of numbers ("env" = 475)'),
    "threshold_windows": (False, _table_of(lambda v: _is(int)(v) and v > 0), "a table of positive integers"),
    "flags": (False, _table_of(_list_of(str)), 'a table of lists of strings ("ppo" = ["--eval-episodes", "2"])'),
}


def load_suite(name: str) -> Suite:
    """A suite by name (benchmarks/suites/NAME.toml) or by the path of a .toml file; SweepError if it is wrong."""
    path = Path(name) if name.endswith(".toml") else SUITES / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITES.glob("*.toml")))
        raise SweepError(f"unknown suite '{name}' (known: {known})")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: TOMLDecodeError, UnicodeDecodeError
        raise SweepError(f"{path}: not a readable TOML file: {str(e).splitlines()[0]}") from None
    for key, (required, ok, want) in SUITE_KEYS.items():
        if key not in data:
            if required:
                raise SweepError(f"{path}: missing key '{key}' ({want})")
        elif not ok(data[key]):
            raise SweepError(f"{path}: '{key}' must be {want}, not {data[key]!r}")
    unknown = sorted(set(data) - set(SUITE_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(SUITE_KEYS)})")
    return Suite(name=path.stem, **{k: data[k] for k in SUITE_KEYS if k in data})


def peer_algos() -> tuple:
    """The algorithms of benchmarks/peers/sb3.py (its --algo choices); imported only when a peer is asked for."""
    from typing import get_args

    from benchmarks.peers.sb3 import Args

    return get_args(next(f.type for f in fields(Args) if f.name == "algo"))


def check_algos(algos: list) -> None:
    """SweepError naming the algorithms that are neither a script of cleanrl_style/ nor a known peer sb3-{algo}."""
    ours = [a for a in algos if not a.startswith("sb3-") and not (ROOT / "cleanrl_style" / f"{a}.py").is_file()]
    if ours:
        raise SweepError(f"no script for {', '.join(ours)} in cleanrl_style/")
    peers = [a for a in algos if a.startswith("sb3-")]
    known = peer_algos() if peers else ()
    unknown = [a for a in peers if a[4:] not in known]
    if unknown:
        raise SweepError(f"unknown peer {', '.join(unknown)} (peers: {', '.join('sb3-' + k for k in known)})")


def safe(name: str) -> str:
    """A file name for an env id: '/' (a namespace, as in phys2d/CartPole-v1) becomes '+', which ids cannot hold."""
    return name.replace("/", "+")


@dataclass(frozen=True)
class Run:
    algo: str
    env: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.algo}__{safe(self.env)}__{self.seed}"


def script_for(algo: str) -> Path:
    """Our scripts live in cleanrl_style/{algo}.py; peers are named sb3-{algo}."""
    if algo.startswith("sb3-"):
        return ROOT / "benchmarks" / "peers" / "sb3.py"
    return ROOT / "cleanrl_style" / f"{algo}.py"


def command(run: Run, suite: Suite, out: Path) -> list:
    cmd = [sys.executable, str(script_for(run.algo))]
    if run.algo.startswith("sb3-"):
        cmd += ["--algo", run.algo[4:]]
    cmd += ["--env", run.env, "--seed", str(run.seed), "--no-progress", "--run-dir", str(out / "runs" / run.key)]
    if suite.total_timesteps is not None:
        cmd += ["--total-timesteps", str(suite.total_timesteps)]
    cmd += list(suite.flags.get(run.algo, [])) + list(suite.flags.get(f"{run.algo}:{run.env}", []))
    return cmd


def read_status(out: Path, run: Run) -> "dict | None":
    path = out / "status" / f"{run.key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def execute(run: Run, suite: Suite, out: Path) -> dict:
    """Run one (algo, env, seed) to the end; write its status file last, atomically."""
    run_parent = out / "runs" / run.key
    if run_parent.exists():
        shutil.rmtree(run_parent)  # a half-written run from an attempt that did not finish
    log = out / "logs" / f"{run.key}.log"
    if log.exists():
        k = 1
        while log.with_suffix(f".log.{k}").exists():
            k += 1
        log.rename(log.with_suffix(f".log.{k}"))
    cmd = command(run, suite, out)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    status = {
        "algo": run.algo,
        "env": run.env,
        "seed": run.seed,
        "command": cmd,
        "returncode": rc,
        "start_time": start,
        "seconds": time.time() - start,
        "log": str(log),
    }
    tmp = out / "status" / f"{run.key}.json.tmp"
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, out / "status" / f"{run.key}.json")
    return status


def log_tail(status: dict, lines: int = 8) -> str:
    try:
        return "\n".join(Path(status["log"]).read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def sweep(suite: Suite, out: Path, workers: int, backend: str = "local", ray_address: "str | None" = None) -> int:
    """Run what is not finished yet; print a progress line; return the exit status (1 if any run failed)."""
    for sub in ("runs", "logs", "status"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(suite.__dict__, indent=1))
    runs = [Run(a, e, s) for a in suite.algos for e in suite.envs for s in suite.seeds]
    todo = [r for r in runs if (read_status(out, r) or {}).get("returncode") != 0]
    print(
        f"{suite.name}: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run "
        f"({backend}, {workers} at a time) -> {out}",
        flush=True,
    )
    results = []

    def show(status: dict) -> None:
        results.append(status)
        failed = sum(r["returncode"] != 0 for r in results)
        done = len(results)
        bar = "#" * int(30 * done / max(len(todo), 1))
        mark = "ok" if status["returncode"] == 0 else f"FAILED (exit {status['returncode']})"
        print(
            f"[{bar:<30}] {done}/{len(todo)} ({failed} failed) {status['algo']} {status['env']} "
            f"seed {status['seed']}: {mark} in {status['seconds']:.0f} s",
            flush=True,
        )

    if backend == "ray":
        import ray

        if ray_address:  # an existing cluster
            ray.init(address=ray_address, log_to_driver=False)
        else:  # a local instance with --workers CPUs
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=1)(execute)
        pending = [remote.remote(r, suite, out) for r in todo]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            show(ray.get(ready[0]))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in as_completed([pool.submit(execute, r, suite, out) for r in todo]):
                show(future.result())

    failed = [r for r in runs if (read_status(out, r) or {}).get("returncode") != 0]
    for r in failed:
        status = read_status(out, r)
        print(
            f"\nFAILED {r.algo} {r.env} seed {r.seed} (exit {status['returncode'] if status else '?'}); "
            f"log {status['log'] if status else '?'}:\n{log_tail(status) if status else ''}",
            file=sys.stderr,
        )
    if failed:
        print(f"\n{len(failed)} of {len(runs)} runs failed: " + ", ".join(r.key for r in failed), file=sys.stderr)
        return 1
    print(f"all {len(runs)} runs finished")
    return 0
