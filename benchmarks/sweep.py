"""Run every (algorithm, env, seed) of a suite, each as its own process, and keep the record.

A suite is a TOML file (benchmarks/suites/NAME.toml): algos, envs, seeds, and optionally total_timesteps,
thresholds, threshold_windows, [flags] (extra flags per algorithm "ppo" or per algorithm and env "ppo:Hopper-v5")
and [variants]. A variant is one algorithm (a script of cleanrl_style/ or a peer sb3-*) with a set of flags under a
name of its own, listed in `algos` like any algorithm:

    algos = ["dqn", "dqn+per"]
    [variants]
    "dqn+per" = { algo = "dqn", flags = ["--prioritized"] }

A variant runs as its algorithm would in this suite (the algorithm's [flags] entries included), then its own flags,
then the [flags] entries under the variant's name ("dqn+per", "dqn+per:CartPole-v1"); a flag given twice takes its
last value, so a variant's flags override the algorithm's. It gets `--exp-name NAME` (the run directory's and
TensorBoard's name carry it), its own key, run directory, status file, curve and row. A variant's name is letters,
digits and . _ + - (no "__", which separates the parts of a key), and not the name of a script or a peer; its
algorithm is a script or a peer, not another variant.

Layout under --out DIR (KEY is {algo}__{env}__{seed}, with any '/' of the env id written '+'):
    DIR/runs/KEY/{the script's run directory}    TensorBoard events, checkpoint
    DIR/logs/KEY.log                             the process's stdout and stderr (.log.1, .log.2: earlier attempts)
    DIR/status/KEY.json                          algo, env, seed, command, exit status, attempts (start, seconds,
                                                 the checkpoint resumed from); written as the run starts (exit
                                                 status null) and again, atomically, when it ends
    DIR/superseded/{date-time}/                  runs made with other settings, set aside (a sweep directory too)

A run is finished when its status file records exit status 0 and the same command: the same
arguments, whatever the python executable and any `--resume PATH` (the arguments hold the absolute
paths of the script and of DIR, so a moved checkout or DIR counts as other settings). A later call
skips the finished runs and starts the others:
- a run whose status records another command (another --total-timesteps, other flags) is never
  reused nor deleted: its run directory, logs and status move to DIR/superseded/{date-time}/ (with
  the suite.json they were made under; `python -m benchmarks report --out` that folder still works),
  the call says so, and the run starts afresh under the new settings. Set aside rather than refused,
  so that changing the flags of one algorithm in a suite redoes its runs and only them;
- any other run that is not finished (stopped by Ctrl-C or SIGTERM, exit 130; killed; its machine
  stopped, so that its status still says it is running; a crash) resumes from the checkpoint in its
  run directory, if the script wrote one (ours, and the SB3 peers every 100k steps): the same command
  plus `--resume CHECKPOINT`, events appended in the same run directory. Without a checkpoint it
  starts afresh, its half-written run directory cleared. A run that keeps failing on resume (a
  checkpoint the script refuses) starts afresh once DIR/runs/KEY is removed by hand.

Ctrl-C or SIGTERM to the sweep (or `kill -INT PID`): no new run starts; SIGINT is forwarded to each
running script, which writes its checkpoint and exits 130; the sweep waits for them, prints what
finished and what did not, and exits 130. The same command again goes on where it stopped. With
--backend ray the stop travels to the Ray workers through the file DIR/.stop.

A suite file that is not what SUITE_KEYS says, an algorithm, env or seed listed twice, an unknown
algorithm or peer, a bad variant (see check_variants), a broken status file, an --out that is a file or cannot
be made, or a DIR in use raise SweepError before anything is written (the command line makes it one `error:`
line, exit 2).

One sweep at a time in DIR: the harness holds a lock on DIR (flock on the directory itself, so no file
is written) and hands it down to each script it starts. The OS releases it when the last of them ends,
so after `kill -9` of the harness a second one refuses to start in DIR until the orphaned scripts have
ended, instead of resuming their runs under them or clearing their live run directories.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SUITES = Path(__file__).resolve().parent / "suites"
INTERRUPTED = 130  # the exit status of a script stopped by Ctrl-C or SIGTERM, and of an interrupted sweep


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
    variants: dict = field(default_factory=dict)  # name -> {"algo": script or peer, "flags": [...]}

    def base(self, name: str) -> str:
        """The script or peer a name of `algos` runs: a variant's algorithm, else the name itself."""
        return self.variants[name]["algo"] if name in self.variants else name


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
    "variants": (False, _table_of(lambda v: isinstance(v, dict)), 'a table of tables ("v" = { algo = "ppo", ... })'),
}
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a file name: run directory, log, status, checkpoint


def check_distinct(values: list, where: str) -> None:
    """SweepError if a value is listed twice: the same run twice would run at once in one run directory."""
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if twice:
        raise SweepError(f"{where} lists {twice[0]!r} twice: the same run would run twice at once in one directory")


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
    for key in ("algos", "envs", "seeds"):
        check_distinct(data[key], f"{path}: '{key}'")
    variants = data.get("variants", {})
    check_variants(variants, f"{path}: ")
    variants = {name: {"algo": v["algo"], "flags": list(v.get("flags", []))} for name, v in variants.items()}
    return Suite(name=path.stem, **{k: data[k] for k in SUITE_KEYS if k in data and k != "variants"}, variants=variants)


def check_variants(variants: dict, where: str = "") -> None:
    """SweepError for a variant with an empty name or one unsafe in a path, the name of a script or a peer, an
    algorithm that is neither a script nor a known peer (nor another variant), flags that are not a list of strings,
    or a key other than algo and flags."""
    scripts = algorithm_scripts()
    for name, v in variants.items():
        if not name:
            raise SweepError(f"{where}a variant has an empty name")
        if not VARIANT_NAME.fullmatch(name) or "__" in name:
            raise SweepError(
                f"{where}variant name {name!r} must be letters, digits and . _ + - (starting with a letter or digit, "
                "no '__'): it names the run's directory and files"
            )
        if name in scripts or (name.startswith("sb3-") and name[4:] in peer_algos()):
            raise SweepError(f"{where}variant {name!r} has the name of a script or peer: name it otherwise")
        unknown = sorted(set(v) - {"algo", "flags"})
        if unknown:
            raise SweepError(f"{where}variant {name!r}: unknown key {unknown[0]!r} (known: algo, flags)")
        if not _is(str)(v.get("algo")):
            raise SweepError(
                f"{where}variant {name!r}: 'algo' must be the name of a script or peer, not {v.get('algo')!r}"
            )
        if not (isinstance(v.get("flags", []), list) and all(map(_is(str), v.get("flags", [])))):
            raise SweepError(f"{where}variant {name!r}: 'flags' must be a list of strings, not {v['flags']!r}")
        if v["algo"] in variants:
            raise SweepError(f"{where}variant {name!r}: its algo {v['algo']!r} is a variant (name a script or peer)")
    try:
        check_algos(sorted({v["algo"] for v in variants.values()}))
    except SweepError as e:
        raise SweepError(f"{where}a variant's algo: {e}") from None


def peer_algos() -> tuple:
    """The algorithms of benchmarks/peers/sb3.py (its --algo choices); imported only when a peer is asked for."""
    from typing import get_args

    from benchmarks.peers.sb3 import Args

    return get_args(next(f.type for f in fields(Args) if f.name == "algo"))


NOT_ALGORITHMS = ("plumbing", "evaluate")  # cleanrl_style/: the shared module and the evaluation entry point


def algorithm_scripts() -> list:
    """The algorithms of cleanrl_style/: its training scripts (not __init__.py, plumbing.py nor evaluate.py)."""
    scripts = (ROOT / "cleanrl_style").glob("*.py")
    return sorted(p.stem for p in scripts if not p.name.startswith("_") and p.stem not in NOT_ALGORITHMS)


def check_algos(algos: list, variants: "dict | None" = None) -> None:
    """SweepError naming the algorithms that are neither a script of cleanrl_style/, a known peer sb3-{algo}, nor one
    of the suite's `variants` (whose own algorithms check_variants checked)."""
    algos = [a for a in algos if a not in (variants or {})]
    scripts = algorithm_scripts()
    ours = [a for a in algos if not a.startswith("sb3-") and a not in scripts]
    if ours:
        raise SweepError(
            f"no algorithm script for {', '.join(ours)} in cleanrl_style/ (algorithms: {', '.join(scripts)})"
        )
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
    algo: str  # the name in the suite's algos: an algorithm, or a variant
    env: str
    seed: int
    base: str = field(default="", compare=False)  # the script or peer it runs (a variant's algorithm), "" if algo

    @property
    def script(self) -> str:
        return self.base or self.algo

    @property
    def key(self) -> str:
        return f"{self.algo}__{safe(self.env)}__{self.seed}"

    def __str__(self) -> str:
        return f"{self.algo} {self.env} seed {self.seed}"


def script_for(algo: str) -> Path:
    """Our scripts live in cleanrl_style/{algo}.py; peers are named sb3-{algo}."""
    if algo.startswith("sb3-"):
        return ROOT / "benchmarks" / "peers" / "sb3.py"
    return ROOT / "cleanrl_style" / f"{algo}.py"


def command(run: Run, suite: Suite, out: Path) -> list:
    """The script's command: its algorithm's flags, then (a variant) --exp-name NAME, its flags and its [flags]."""
    algo = suite.base(run.algo)
    cmd = [sys.executable, str(script_for(algo))]
    if algo.startswith("sb3-"):
        cmd += ["--algo", algo[4:]]
    cmd += ["--env", run.env, "--seed", str(run.seed), "--no-progress", "--run-dir", str(out / "runs" / run.key)]
    if suite.total_timesteps is not None:
        cmd += ["--total-timesteps", str(suite.total_timesteps)]
    cmd += list(suite.flags.get(algo, [])) + list(suite.flags.get(f"{algo}:{run.env}", []))
    if run.algo in suite.variants:
        cmd += ["--exp-name", run.algo] + suite.variants[run.algo]["flags"]
        cmd += list(suite.flags.get(run.algo, [])) + list(suite.flags.get(f"{run.algo}:{run.env}", []))
    return cmd


def settings(cmd: list) -> list:
    """What makes two commands the same run: the arguments after the python executable, less `--resume PATH`."""
    args = list(cmd[1:])
    if "--resume" in args:
        i = args.index("--resume")
        del args[i : i + 2]
    return args


def read_status(out: Path, run: Run) -> "dict | None":
    """The run's status file, None if there is none; SweepError if it is not a status file."""
    path = out / "status" / f"{run.key}.json"
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
        if not isinstance(status.get("command"), list) or not isinstance(status.get("returncode"), (int, type(None))):
            raise ValueError("no command or exit status")
    except (OSError, ValueError, AttributeError) as e:
        raise SweepError(
            f"{path}: broken status file ({str(e).splitlines()[0]}); move it away to redo the run"
        ) from None
    return status


def write_status(out: Path, run: Run, status: dict) -> None:
    path = out / "status" / f"{run.key}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)


def checkpoint_of(run: Run, out: Path) -> "Path | None":
    """The newest checkpoint the script left in the run's directory: ours write NAME.pt, the SB3 peers sb3-ALGO.zip."""
    pattern = "sb3-*.zip" if run.script.startswith("sb3-") else "*.pt"
    found = sorted((out / "runs" / run.key).rglob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def set_aside(out: Path, runs: list, superseded: Path) -> None:
    """Move the runs' directories, logs and status files to `superseded`, itself laid out as a sweep directory."""
    for sub in ("runs", "logs", "status"):
        (superseded / sub).mkdir(parents=True, exist_ok=True)
    if (out / "suite.json").is_file():
        shutil.copy2(out / "suite.json", superseded / "suite.json")
    for run in runs:
        if (out / "runs" / run.key).exists():
            os.replace(out / "runs" / run.key, superseded / "runs" / run.key)
        for log in (out / "logs").glob(f"{run.key}.log*"):
            os.replace(log, superseded / "logs" / log.name)
        status = json.loads((out / "status" / f"{run.key}.json").read_text())
        status["log"] = str(superseded / "logs" / f"{run.key}.log")
        write_status(superseded, run, status)
        (out / "status" / f"{run.key}.json").unlink()


# Stopping. The local backend's signal handler sets STOP and forwards SIGINT to the processes in
# RUNNING at once; a Ray worker sees the file DIR/.stop and forwards SIGINT itself.
STOP = threading.Event()
RUNNING: dict = {}  # run key -> Popen of the scripts this process started and has not yet seen end
SIGNALLED: set = set()  # run keys whose script was sent SIGINT
LOCK = threading.RLock()  # re-entrant: the signal handler may run while the main thread holds it


HELD: dict = {}  # sweep directory -> the descriptor of DIR this process holds the lock on, passed to its scripts


def lock(out: Path) -> int:
    """Make DIR if need be and lock it for this sweep (see the module docstring); SweepError if it is a file, cannot
    be made, or is locked by another sweep or by the scripts of one that was killed."""
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise SweepError(f"cannot make the sweep directory --out {out}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SweepError(
            f"{out} is in use by another sweep (its harness, or the scripts of one that was killed, still run): "
            "wait for them to end, or use another --out"
        ) from None
    HELD[out] = fd
    return fd


def unlock(out: Path) -> None:
    fd = HELD.pop(out, None)
    if fd is not None:
        os.close(fd)


def stop_requested(out: Path) -> bool:
    return STOP.is_set() or (out / ".stop").exists()


def interrupt(key: str) -> None:
    """Send SIGINT to the script of run `key` once: it writes its checkpoint and exits 130."""
    with LOCK:
        proc = RUNNING.get(key)
        if proc is not None and key not in SIGNALLED and proc.poll() is None:
            SIGNALLED.add(key)
            proc.send_signal(signal.SIGINT)


def attempts_so_far(out: Path, run: Run, status: "dict | None") -> list:
    """The earlier attempts of a run that goes on from its checkpoint: start time, seconds, checkpoint of each.
    Where the process or its machine stopped before the status could say so, its files' times tell."""
    times = [p.stat().st_mtime for p in (out / "runs" / run.key).rglob("*") if p.is_file()]
    if status is None or status.get("start_time") is None:  # a sweep that did not record it
        return [{"start_time": min(times), "seconds": max(times) - min(times), "resumed_from": None}] if times else []
    attempts = status.get("attempts") or [dict(status, resumed_from=None)]
    last = {k: attempts[-1].get(k) for k in ("start_time", "seconds", "resumed_from")}
    if last["seconds"] is None:
        last["seconds"] = max(times, default=last["start_time"]) - last["start_time"]
    return attempts[:-1] + [last]


def execute(run: Run, suite: Suite, out: Path) -> "dict | None":
    """Run one (algo, env, seed) to its end, from its checkpoint if there is one; None if a stop came first."""
    with LOCK:
        if stop_requested(out):
            return None
        cmd = command(run, suite, out)
        resume = checkpoint_of(run, out)
        if resume is not None:
            cmd += ["--resume", str(resume)]
            earlier = attempts_so_far(out, run, read_status(out, run))
        else:
            earlier = []
            if (out / "runs" / run.key).exists():
                shutil.rmtree(out / "runs" / run.key)  # a half-written run with no checkpoint: nothing to keep
        log = out / "logs" / f"{run.key}.log"
        if log.exists():
            k = 1
            while log.with_suffix(f".log.{k}").exists():
                k += 1
            log.rename(log.with_suffix(f".log.{k}"))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
        start = time.time()
        attempt = {"start_time": start, "seconds": None, "resumed_from": str(resume) if resume else None}
        status = {
            "algo": run.algo,
            **({"variant_of": run.base} if run.base else {}),
            "env": run.env,
            "seed": run.seed,
            "command": cmd,
            "returncode": None,  # running
            "start_time": earlier[0]["start_time"] if earlier else start,
            "seconds": None,
            "attempts": earlier + [attempt],
            "log": str(log),
        }
        write_status(out, run, status)
        # a child inherits the signal mask, and a Ray worker blocks SIGINT: unblocked, the script can be stopped
        mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            with open(log, "w") as f:
                # the lock on DIR goes with the script: DIR stays locked while it runs, even if this process dies
                held = tuple(fd for fd in [HELD.get(out)] if fd is not None)  # none in a Ray worker
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, pass_fds=held)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        RUNNING[run.key] = proc
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop_requested(out):
                    interrupt(run.key)
            except KeyboardInterrupt:  # Ray's cancel of the task
                interrupt(run.key)
    finally:
        with LOCK:
            RUNNING.pop(run.key, None)
            SIGNALLED.discard(run.key)
    attempt["seconds"] = time.time() - start
    status.update(returncode=rc, seconds=sum(a["seconds"] for a in status["attempts"]))
    write_status(out, run, status)
    return status


def log_tail(status: dict, lines: int = 8) -> str:
    try:
        return "\n".join(Path(status["log"]).read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def plan(suite: Suite, out: Path) -> tuple:
    """(every run, the finished ones, those made with other settings); reads only, SweepError on a broken file."""
    bases = {a: suite.base(a) if a in suite.variants else "" for a in suite.algos}
    runs = [Run(a, e, s, bases[a]) for a in suite.algos for e in suite.envs for s in suite.seeds]
    finished, superseded = [], []
    for r in runs:
        status = read_status(out, r)
        if status is not None and settings(status["command"]) != settings(command(r, suite, out)):
            superseded.append(r)
        elif status is not None and status.get("returncode") == 0:
            finished.append(r)
    return runs, finished, superseded


def sweep(suite: Suite, out: Path, workers: int, backend: str = "local", ray_address: "str | None" = None) -> int:
    """Run what is not finished yet; print a progress line per run; return the exit status (0 all finished,
    1 some failed, 130 stopped by SIGINT or SIGTERM). SweepError, before anything is written, on a broken file."""
    out = out.resolve()  # the scripts run in the repository root
    lock(out)
    try:
        return run_sweep(suite, out, workers, backend, ray_address)
    finally:
        unlock(out)


def run_sweep(suite: Suite, out: Path, workers: int, backend: str, ray_address: "str | None") -> int:
    """sweep() in the directory it holds the lock on."""
    runs, finished, superseded = plan(suite, out)
    try:
        for sub in ("runs", "logs", "status"):
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SweepError(f"cannot write in the sweep directory --out {out}: {e.strerror}") from None
    (out / ".stop").unlink(missing_ok=True)  # left by a Ray sweep whose driver was killed
    if superseded:
        aside = out / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        while aside.exists():
            aside = aside.with_name(aside.name + "+")
        set_aside(out, superseded, aside)
        print(
            f"{len(superseded)} runs were made with other settings (other flags or budget), "
            f"set aside in {aside}: " + ", ".join(r.key for r in superseded),
            flush=True,
        )
    (out / "suite.json").write_text(json.dumps(suite.__dict__, indent=1))
    todo = [r for r in runs if r not in finished]
    resuming = sum(checkpoint_of(r, out) is not None for r in todo)
    print(
        f"{suite.name}: {len(runs)} runs, {len(finished)} already finished, {len(todo)} to run "
        f"({resuming} from a checkpoint; {backend}, {workers} at a time) -> {out}",
        flush=True,
    )
    results = []

    def show(status: "dict | None") -> None:
        if status is None:  # not started: a stop came first
            return
        results.append(status)
        failed = sum(r["returncode"] != 0 for r in results)
        done = len(results)
        bar = "#" * int(30 * done / max(len(todo), 1))
        rc = status["returncode"]
        mark = "ok" if rc == 0 else f"stopped (exit {rc})" if rc == INTERRUPTED or rc < 0 else f"FAILED (exit {rc})"
        print(
            f"[{bar:<30}] {done}/{len(todo)} ({failed} not ok) {status['algo']} {status['env']} "
            f"seed {status['seed']}: {mark} in {status['attempts'][-1]['seconds']:.0f} s",
            flush=True,
        )

    signals = []

    def on_signal(signum, frame) -> None:
        signals.append(signum)
        STOP.set()
        if backend == "ray":
            (out / ".stop").touch()
        with LOCK:
            for key in list(RUNNING):
                interrupt(key)

    previous = {}
    try:
        if backend == "ray":
            import ray

            if ray_address:  # an existing cluster
                ray.init(address=ray_address, log_to_driver=False)
            else:  # a local instance with --workers CPUs
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        if backend == "ray":
            remote = ray.remote(num_cpus=1)(execute)
            pending = [remote.remote(r, suite, out) for r in todo]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in ready:
                    show(ray.get(ref))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pending = {pool.submit(execute, r, suite, out) for r in todo}
                while pending:
                    done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in done:
                        show(future.result())
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        STOP.clear()
        (out / ".stop").unlink(missing_ok=True)

    statuses = {r: read_status(out, r) for r in runs}
    not_ok = [r for r in runs if (statuses[r] or {}).get("returncode") != 0]
    if signals:
        name = signal.Signals(signals[0]).name
        print(f"\n{name}: stopped; {len(runs) - len(not_ok)} of {len(runs)} runs finished", file=sys.stderr)
        started = {(s["algo"], s["env"], s["seed"]) for s in results}
        for r in not_ok:
            how = f"exit {statuses[r]['returncode']}" if (r.algo, r.env, r.seed) in started else "not started"
            ckpt = checkpoint_of(r, out)
            print(
                f"  not finished: {r} ({how}; {f'resumes from {ckpt}' if ckpt else 'starts afresh'})", file=sys.stderr
            )
        print("the same command again goes on from here", file=sys.stderr)
        return INTERRUPTED
    for r in not_ok:
        status, ckpt = statuses[r], checkpoint_of(r, out)
        print(
            f"\nFAILED {r} (exit {status['returncode'] if status else '?'}"
            f"{f'; resumes from {ckpt} next time' if ckpt else ''}); "
            f"log {status['log'] if status else '?'}:\n{log_tail(status) if status else ''}",
            file=sys.stderr,
        )
    if not_ok:
        print(f"\n{len(not_ok)} of {len(runs)} runs failed: " + ", ".join(r.key for r in not_ok), file=sys.stderr)
        return 1
    print(f"all {len(runs)} runs finished")
    return 0
