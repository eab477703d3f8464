"""Hyperparameter search with Optuna over one of our scripts, on one machine or many.

    python -m benchmarks tune --algo trpo --env Hopper-v5 [--env Walker2d-v5 ...] --trials 50
                              --total-timesteps 300000 --seeds 1 [2 ...] --study NAME [--storage URL]
                              [--space FILE] [--workers K] [--backend local|ray] [--pruner median|halving|none]
                              [--out DIR]

Search space: benchmarks/spaces/ALGO.toml (or --space FILE), one key per flag of the script, e.g.
`max-kl = { distribution = "float", low = 0.005, high = 0.05, log = true }`; "int" takes low, high and log or
step too, "categorical" takes choices. Each flag must be a field of the script's Args whose type fits the
distribution; the flags the tuner sets itself (--env, --seed, --total-timesteps, --run-dir, --resume, --progress)
cannot be in it. Floats are rounded to 4 significant digits before they are run, so that the value printed at the
end is the one that ran.

Trials. Optuna's TPE sampler proposes the flags; the trial runs the script once per (env, seed), each run its own
process, through the harness's own machinery (benchmarks/sweep.py's `execute`: the trial's directory is a sweep
directory, the runs are launched with the harness's flags, a stopped run resumes from its checkpoint) on the local
process pool or on Ray (--backend ray). --workers runs go at once; a new trial starts while fewer runs than that
are running or queued, so with --workers a multiple of envs x seeds a trial's runs run side by side.

Score: per run, the mean return of its last 100 training episodes (charts/episodic_return, as the report's final
return), averaged over seeds; with several envs, each env's average is normalised first, (score - random) /
(best - random) with REFERENCE below, and the trial's score is the mean over envs. The study maximises it.

Pruning: every few seconds the trial's event files are read as they grow; at each twentieth of the budget that all
its runs have passed, the same score on the episodes finished so far is reported to Optuna. The default pruner is
the median rule (--pruner median): from the sixth trial on and past the first quarter of the budget, a trial whose
score at a point is below the median of the other trials' scores at that point is stopped. Chosen over successive
halving (--pruner halving, which keeps a third of the trials at each rung) because learning curves are noisy and
some settings start late: the median rule stops only what is below half of what was seen at the same point, and
with the few tens of trials that two cores allow, halving's fixed cut drops too many. A pruned trial's scripts get
SIGINT (through the trial directory's .stop file, as a stopped sweep's do), write their checkpoints and exit 130;
the trial is recorded as pruned, with its last reported score.

--trials N is the size of the study: the trials of every state, from every machine that works on it. The same
command again first resumes this directory's unfinished trials (from their checkpoints), then adds trials until the
study holds N: once it does, it starts nothing and prints the summary again; a larger N adds the difference.
A trial that fails (a script exiting with an error: a setting the script refuses, a run that diverges) is recorded
as failed, with its log's tail, and counts among the N.

Ctrl-C or SIGTERM: no trial or run starts; the running scripts write their checkpoints and exit 130; their trials
stay running in the study, owned by this directory; `tune` writes the summary of the trials finished so far
(DIR/summary.md and the plots), exits 130, and the same command resumes them.

Storage: by default SQLite in DIR/study.db (nothing to install or start). Any database URL Optuna accepts lets
several harness processes, on one machine or several, work on one study at once: each runs the same command with
the same --storage and --study, and its own --out. PostgreSQL, for example:
    docker run -d --name optuna-db -p 5432:5432 -e POSTGRES_PASSWORD=optuna -e POSTGRES_DB=optuna postgres:16
    pip install psycopg2-binary
    python -m benchmarks tune ... --storage postgresql://postgres:optuna@HOST:5432/optuna
`optuna-dashboard URL` (the tune extra installs it; `optuna-dashboard sqlite:///DIR/study.db` for the default)
shows the study live in a browser at http://127.0.0.1:8080.

At the end: DIR/summary.md (printed too): the best trial's command lines, the top trials, and the PRESETS entry
(cleanrl_style/ALGO.py's PRESETS table) of the best setting; DIR/best.toml, a suite with the best setting
(`python -m benchmarks run --suite DIR/best.toml --seeds ... --total-timesteps ...` runs it again); DIR/history.png
and DIR/importance.png, Optuna's optimisation history and parameter importances (its default evaluator, PED-ANOVA,
needs only numpy).

Layout under --out DIR (default benchmarks/out/tune/STUDY):
    DIR/study.db                    the study (default storage)
    DIR/trials/NNNN/                trial NNNN: a sweep directory, runs/KEY, logs/KEY.log, status/KEY.json with
                                    KEY = ALGO__ENV__SEED__tNNNN; a .stop file once it was pruned or stopped
    DIR/summary.md, DIR/best.toml, DIR/history.png, DIR/importance.png

Bad input (an unknown algorithm, env or flag, a flag whose type does not fit its distribution, a space file that
does not parse or holds a range that does not, a storage that cannot be opened, a study of that name made with
other settings, a DIR in use): one `error:` line, exit status 2, nothing written.
"""

import concurrent.futures
import dataclasses
import importlib.util
import json
import signal
import socket
import sys
import threading
import types
import typing
import warnings
from pathlib import Path

from benchmarks.events import load_scalars
from benchmarks.report import FINAL
from benchmarks.sweep import (
    HELD,
    INTERRUPTED,
    ROOT,
    STOP,
    Run,
    Suite,
    SweepError,
    algorithm_scripts,
    check_distinct,
    command,
    execute,
    lock,
    log_tail,
    read_status,
    safe,
    settings,
    unlock,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SPACES = Path(__file__).resolve().parent / "spaces"
REPORTS = 20  # points of the budget at which a trial's score so far is reported to the pruner
POLL = 5.0  # seconds between two reads of the running trials' event files
TOP = 10  # trials in the summary's table
SET_BY_TUNER = ("env", "seed", "total_timesteps", "run_dir", "resume", "progress")

# The normalisation of a score over several envs: (score - random) / (best - random). It must match the aggregate
# report's (benchmarks/report.py's reference table, once it has one: then import it from there).
# random: a uniform-random policy's mean return over 100 episodes (seeds 0-99), gymnasium 1.4.0, measured here
# (benchmarks/results/tune/README.md). best: the highest mean_reward of any algorithm in rl-zoo3's benchmark.md
# (DLR-RM/rl-baselines3-zoo, commit 0088472; its MuJoCo rows are the -v3 envs).
REFERENCE = {  # fmt: skip
    "CartPole-v1": (23.7, 500.0),
    "Acrobot-v1": (-497.1, -69.1),
    "MountainCar-v0": (-200.0, -100.8),
    "Pendulum-v1": (-1207.6, -151.9),
    "HalfCheetah-v5": (-285.9, 12089.9),
    "Hopper-v5": (18.9, 3754.2),
    "Walker2d-v5": (1.8, 4933.1),
    "Ant-v5": (-60.5, 5813.3),
    "Swimmer-v5": (0.8, 365.7),
}


def normalised(env: str, score: float) -> float:
    random, best = REFERENCE[env]
    return (score - random) / (best - random)


def trial_score(per_env: dict) -> float:
    """{env: [one value per seed]} -> the trial's score: the mean over seeds; over several envs, the mean over envs
    of each env's normalised mean."""
    means = {env: sum(v) / len(v) for env, v in per_env.items()}
    if len(means) == 1:
        return next(iter(means.values()))
    return sum(normalised(env, m) for env, m in means.items()) / len(means)


def final_mean(steps: list, returns: list, upto: "int | None" = None) -> "float | None":
    """Mean of the last FINAL episodes that ended at or before env step `upto` (all of them: None); None if none."""
    kept = [r for s, r in zip(steps, returns) if upto is None or s <= upto][-FINAL:]
    return sum(kept) / len(kept) if kept else None


# ----------------------------------------------------------------------------------------------
# The search space and the script's flags
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Param:
    name: str  # the Args field, as in PRESETS (max_kl)
    distribution: object  # an optuna distribution
    switch: bool  # a plain bool flag: --name / --no-name (an optional bool takes --name True|False)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# keys of a flag's table in a space file, per distribution
SPACE_KEYS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}


def distribution_of(path: Path, flag: str, spec) -> object:
    """The optuna distribution a flag's table describes; SweepError saying what is wrong with it."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"{path}: '{flag}'"
    if not isinstance(spec, dict):
        raise SweepError(f'{where} must be a table such as {{ distribution = "float", low = 0.1, high = 0.3 }}')
    kind = spec.get("distribution")
    if kind not in SPACE_KEYS:
        raise SweepError(f"{where}: distribution must be one of {', '.join(SPACE_KEYS)}, not {kind!r}")
    unknown = sorted(set(spec) - SPACE_KEYS[kind] - {"distribution"})
    if unknown:
        raise SweepError(f"{where}: unknown key '{unknown[0]}' for a {kind} (keys: {', '.join(SPACE_KEYS[kind])})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, (str, int, float)) for c in choices):
            raise SweepError(f"{where}: choices must be a non-empty list of strings, numbers or booleans")
        check_distinct(choices, where + "'s choices")
        return CategoricalDistribution(choices)
    want = int if kind == "int" else (int, float)
    for key in ("low", "high"):
        if key not in spec:
            raise SweepError(f"{where}: missing '{key}' (a {kind} needs low and high)")
        if not _number(spec[key]) or not isinstance(spec[key], want):
            raise SweepError(f"{where}: '{key}' must be {'an integer' if kind == 'int' else 'a number'}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not low < high:
        raise SweepError(f"{where}: low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise SweepError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise SweepError(f"{where}: a log scale needs low > 0, not {low}")
    if step is not None and (log or not _number(step) or not isinstance(step, want) or step <= 0):
        raise SweepError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}, without log")
    if kind == "int":
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=step)


def load_space(path: Path) -> dict:
    """{flag name (as written): distribution} of a space file; SweepError if it does not parse."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: TOMLDecodeError, UnicodeDecodeError
        raise SweepError(f"{path}: not a readable TOML file: {str(e).splitlines()[0]}") from None
    if not data:
        raise SweepError(f"{path}: no flag to search")
    return {flag: distribution_of(path, flag, spec) for flag, spec in data.items()}


def script_fields(algo: str) -> dict:
    """{field: type} of the Args of cleanrl_style/{algo}.py, imported (importing a script trains nothing)."""
    scripts = str(ROOT / "cleanrl_style")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)  # the scripts import their shared module as `plumbing`
    spec = importlib.util.spec_from_file_location(f"_tuned_{algo}", ROOT / "cleanrl_style" / f"{algo}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return typing.get_type_hints(module.Args)


def _accepts(hint, value) -> bool:
    """Whether a value of the space can be given to a flag of this type."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if typing.get_origin(option) is typing.Literal:
            if value in typing.get_args(option) and type(value) in {type(a) for a in typing.get_args(option)}:
                return True
        elif option is bool:
            if isinstance(value, bool):
                return True
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif option is float:
            if _number(value):
                return True
        elif option is str and isinstance(value, str):
            return True
    return False


def check_space(algo: str, space: dict, path: Path) -> list:
    """The Params of a space for cleanrl_style/{algo}.py; SweepError for a flag the script lacks, one the tuner sets,
    or a distribution whose values the flag cannot take."""
    from optuna.distributions import CategoricalDistribution

    fields = script_fields(algo)
    params = []
    for flag, dist in space.items():
        name = flag.removeprefix("--").replace("-", "_")
        if name in SET_BY_TUNER:
            raise SweepError(f"{path}: '{flag}' is set by the tuner (--env, --seed, --total-timesteps, ...)")
        if name not in fields:
            raise SweepError(f"{path}: {algo}.py has no flag --{name.replace('_', '-')} (python cleanrl_style/"
                             f"{algo}.py --help lists its flags)")  # fmt: skip
        hint = fields[name]
        if isinstance(dist, CategoricalDistribution):
            values = dist.choices
        else:  # both ends, as the type they are drawn as
            kind = int if type(dist).__name__ == "IntDistribution" else float
            values = (kind(dist.low), kind(dist.high))
        bad = [v for v in values if not _accepts(hint, v)]
        if bad:
            raise SweepError(f"{path}: --{name.replace('_', '-')} takes {_type_name(hint)}, not {bad[0]!r}")
        params.append(Param(name, dist, switch=hint is bool))
    return params


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def rounded(value):
    """A sampled float to 4 significant digits (what runs, and what the summary prints); other values as they are."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def flags_of(params: list, values: dict) -> list:
    """The command-line words that set `values` ({field: value})."""
    words = []
    for p in params:
        v = values[p.name]
        if p.switch:
            words.append(p.flag if v else "--no-" + p.flag[2:])
        else:
            words += [p.flag, str(v)]
    return words


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    """The `tune` subcommand of python -m benchmarks."""
    p = sub.add_parser("tune", help="search a script's hyperparameters with Optuna (resumable)")
    p.add_argument("--algo", required=True, help="a script of cleanrl_style/: ppo, trpo, a2c, ...")
    p.add_argument("--env", required=True, nargs="+", action="extend", help="env id; several: scores normalised")
    p.add_argument("--trials", required=True, type=int, help="trials in the study, all machines together")
    p.add_argument("--total-timesteps", required=True, type=int, help="each run's budget")
    p.add_argument("--seeds", required=True, nargs="+", type=int, help="one run per env and seed in each trial")
    p.add_argument("--study", required=True, help="the study's name in the storage")
    p.add_argument("--storage", help="an Optuna database URL (default: sqlite:///DIR/study.db)")
    p.add_argument("--space", type=Path, help="a search space file (default: benchmarks/spaces/ALGO.toml)")
    p.add_argument("--workers", type=int, default=2, help="runs at once (default: 2)")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="process pool, or a Ray cluster")
    p.add_argument("--ray-address", help="Ray cluster address (default: start or join a local one)")
    p.add_argument("--pruner", choices=["median", "halving", "none"], default="median", help="(default: median)")
    p.add_argument("--out", type=Path, help="output directory (default: benchmarks/out/tune/STUDY)")


@dataclasses.dataclass
class Config:
    algo: str
    envs: list
    seeds: list
    total_timesteps: int
    trials: int
    study: str
    storage: "str | None"
    space_path: Path
    params: list
    workers: int
    backend: str
    ray_address: "str | None"
    pruner: str
    out: Path


def check(args) -> Config:
    """The validated settings of a `tune` command; SweepError, with nothing written, for bad input."""
    if importlib.util.find_spec("optuna") is None:
        raise SweepError('tune needs Optuna: pip install -e ".[tune]"')
    scripts = algorithm_scripts()
    if args.algo not in scripts:
        raise SweepError(f"no algorithm script {args.algo} in cleanrl_style/ (algorithms: {', '.join(scripts)})")
    check_distinct(args.env, "--env")
    check_distinct(args.seeds, "--seeds")
    for flag in ("trials", "total_timesteps", "workers"):
        if getattr(args, flag) < 1:
            raise SweepError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise SweepError('--backend ray needs Ray: pip install -e ".[ray]"')
    import gymnasium as gym

    for env in args.env:
        try:
            gym.spec(env)
        except gym.error.Error:
            raise SweepError(f"unknown env id '{env}'") from None
        if len(args.env) > 1 and env not in REFERENCE:
            raise SweepError(
                f"no reference scores for {env} to normalise it beside other envs (known: {', '.join(REFERENCE)}); "
                "tune it alone, or add it to REFERENCE in benchmarks/tune.py"
            )
    space_path = args.space if args.space is not None else SPACES / f"{args.algo}.toml"
    if not space_path.is_file():
        raise SweepError(f"no search space file {space_path}")
    params = check_space(args.algo, load_space(space_path), space_path)
    out = (args.out or ROOT / "benchmarks" / "out" / "tune" / args.study).resolve()
    return Config(
        args.algo, list(args.env), list(args.seeds), args.total_timesteps, args.trials, args.study, args.storage,
        space_path, params, args.workers, args.backend, args.ray_address, args.pruner, out,
    )  # fmt: skip


def open_storage(url: str):
    """Optuna's storage at `url`; SweepError if it cannot be opened."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # several writers wait their turn
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # a bad URL, a missing driver, a database that refuses: all one line for the user
        raise SweepError(f"cannot open the storage {url}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def study_settings(cfg: Config) -> dict:
    from optuna.distributions import distribution_to_json

    space = {p.name: json.loads(distribution_to_json(p.distribution)) for p in cfg.params}
    return {"algo": cfg.algo, "envs": cfg.envs, "seeds": cfg.seeds, "total_timesteps": cfg.total_timesteps,
            "space": space}  # fmt: skip


def make_pruner(cfg: Config):
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=cfg.total_timesteps // 4)
    if cfg.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.total_timesteps // 10, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: Config, storage, pruner):
    """The study (made if new, with the command's settings); SweepError if one of that name has other settings."""
    import optuna

    # constant_liar: a trial started while others run is told their (pessimistic) results, so that TPE does not
    # propose the same point to trials running at once
    sampler = optuna.samplers.TPESampler(constant_liar=True)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = optuna.create_study(
            study_name=cfg.study, storage=storage, sampler=sampler, pruner=pruner, direction="maximize"
        )
        study.set_user_attr("settings", study_settings(cfg))
        return study
    made = study.user_attrs.get("settings")
    if made != study_settings(cfg):
        differ = [k for k in study_settings(cfg) if (made or {}).get(k) != study_settings(cfg)[k]]
        raise SweepError(
            f"study '{cfg.study}' in {storage.url if hasattr(storage, 'url') else cfg.storage} was made with other "
            f"settings ({', '.join(differ) or 'not by this tuner'}): use another --study"
        )
    return study


def main(args, pruner=None, poll: float = POLL) -> int:
    """python -m benchmarks tune: run the study to --trials; exit status 0, 1 (every trial failed), 2 (bad input),
    130 (stopped). `pruner` (an optuna pruner) replaces --pruner's; `poll`: seconds between two reads of the events."""
    try:
        cfg = check(args)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        pruner = pruner or make_pruner(cfg)
        if cfg.storage is not None:  # a URL that cannot be opened, or a study made otherwise, leaves DIR unmade
            study = open_study(cfg, open_storage(cfg.storage), pruner)
            lock(cfg.out)
        else:  # DIR/study.db: a study made otherwise is in a DIR made before
            lock(cfg.out)
            try:
                study = open_study(cfg, open_storage(f"sqlite:///{cfg.out / 'study.db'}"), pruner)
            except SweepError:
                unlock(cfg.out)
                raise
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return Tuner(cfg, study, poll).run()
    finally:
        unlock(cfg.out)


# ----------------------------------------------------------------------------------------------
# Trials: their runs, their progress, their end
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrialRun(Run):
    """A run of a trial: its key carries the trial's number, so that runs of trials going at once stay apart (the
    harness keys its running processes by it)."""

    trial: int = 0

    @property
    def key(self) -> str:
        return f"{self.algo}__{safe(self.env)}__{self.seed}__t{self.trial:04d}"


class Tail:
    """The training episodes a run has logged so far, read from its event files as they grow (only the new part of
    each file at every read), and the latest env step it logged."""

    def __init__(self, parent: Path):
        self.parent, self.loaders = parent, {}
        self.steps, self.returns, self.step = [], [], 0

    def read(self) -> None:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.compat.proto.event_pb2 import SessionLog
        from tensorboard.util.tensor_util import make_ndarray

        for path in sorted(self.parent.rglob("events.out.tfevents.*")):  # a resumed run adds a file
            if path not in self.loaders:
                self.loaders[path] = EventFileLoader(str(path))
            for event in self.loaders[path].Load():
                if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                    # a resumed run restarts at its checkpoint: what the killed attempt logged past it is void
                    kept = [i for i, s in enumerate(self.steps) if s < event.step]
                    self.steps, self.returns = [self.steps[i] for i in kept], [self.returns[i] for i in kept]
                    self.step = min(self.step, event.step)
                    continue
                self.step = max(self.step, event.step)
                for value in event.summary.value:
                    if value.tag == "charts/episodic_return":
                        self.steps.append(event.step)
                        self.returns.append(float(make_ndarray(value.tensor).item()))


@dataclasses.dataclass
class Active:
    """A trial this process runs: its optuna Trial, directory, suite (its flags), runs and their outcomes."""

    trial: object
    dir: Path
    suite: Suite
    flags: list
    runs: list
    handles: dict = dataclasses.field(default_factory=dict)  # a pending run's handle -> the run
    results: dict = dataclasses.field(default_factory=dict)  # run -> its status (None: never started)
    tails: dict = dataclasses.field(default_factory=dict)
    reported: set = dataclasses.field(default_factory=set)
    pruned: bool = False

    @property
    def number(self) -> int:
        return self.trial.number


class LocalPool:
    def __init__(self, workers: int):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

    def submit(self, run, suite, out):
        return self.pool.submit(execute, run, suite, out)

    def wait(self, handles: list, timeout: float) -> list:
        done, _ = concurrent.futures.wait(handles, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return list(done)

    def result(self, handle):
        return handle.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class RayPool:
    def __init__(self, workers: int, address: "str | None"):
        import ray

        self.ray = ray
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        self.remote = ray.remote(num_cpus=1)(execute)

    def submit(self, run, suite, out):
        return self.remote.remote(run, suite, out)

    def wait(self, handles: list, timeout: float) -> list:
        ready, rest = self.ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:
            ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return ready

    def result(self, handle):
        return self.ray.get(handle)

    def close(self) -> None:
        pass


HOST = socket.gethostname()


class Tuner:
    def __init__(self, cfg: Config, study, poll: float = POLL):
        self.cfg, self.study, self.poll = cfg, study, poll
        self.active: list = []
        self.signals: list = []
        self.grid = [cfg.total_timesteps * i // REPORTS for i in range(1, REPORTS + 1)]

    # which trials

    def count(self) -> int:
        return len(self.study.get_trials(deepcopy=False))

    def unfinished(self) -> list:
        """This directory's trials that a stop (or a killed harness) left running: resumed first."""
        from optuna.trial import TrialState

        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t for t in running if t.user_attrs.get("out") == str(self.cfg.out) and t.user_attrs.get("host") == HOST]

    def new_trial(self):
        trial = self.study.ask({p.name: p.distribution for p in self.cfg.params})
        values = {p.name: rounded(trial.params[p.name]) for p in self.cfg.params}
        trial.set_user_attr("out", str(self.cfg.out))
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("values", values)
        trial.set_user_attr("flags", flags_of(self.cfg.params, values))
        return trial

    def launch(self, pool, trial, flags: list, reported: set) -> None:
        """Start the runs of a trial that are not finished (a resumed one's resume from their checkpoints)."""
        cfg = self.cfg
        out = cfg.out / "trials" / f"{trial.number:04d}"
        suite = Suite(f"{cfg.study}-{trial.number:04d}", [cfg.algo], cfg.envs, cfg.seeds, cfg.total_timesteps,
                      flags={cfg.algo: list(flags)})  # fmt: skip
        for sub in ("runs", "logs", "status"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        (out / ".stop").unlink(missing_ok=True)  # left by the stop this trial resumes from
        HELD[out] = HELD[cfg.out]  # the lock on DIR goes with the trial's scripts too
        runs = [TrialRun(cfg.algo, env, seed, trial=trial.number) for env in cfg.envs for seed in cfg.seeds]
        active = Active(trial, out, suite, list(flags), runs, reported=set(reported))
        for run in runs:
            active.tails[run] = Tail(out / "runs" / run.key)
            status = read_status(out, run)
            if (
                status
                and status["returncode"] == 0
                and settings(status["command"]) == settings(command(run, suite, out))
            ):
                active.results[run] = status  # finished before the stop
            else:
                active.handles[pool.submit(run, suite, out)] = run
        self.active.append(active)
        what = " ".join(flags)
        print(f"trial {trial.number}: {what} ({len(active.handles)} runs)", flush=True)

    # progress and pruning

    def progress(self, a: Active) -> None:
        """Report the trial's score at the points of the budget all its runs have passed; prune if Optuna says so."""
        if a.pruned:
            return
        for run, tail in a.tails.items():
            if run not in a.results or a.results[run] is not None:
                tail.read()
        new = False
        for g in self.grid:
            if g in a.reported:
                continue
            passed = all(
                (a.results.get(run) or {}).get("returncode") == 0 or tail.step >= g for run, tail in a.tails.items()
            )
            if not passed:
                break
            per_env = {}
            for run, tail in a.tails.items():
                per_env.setdefault(run.env, []).append(final_mean(tail.steps, tail.returns, upto=g))
            if any(v is None for vs in per_env.values() for v in vs):
                continue  # an episode has yet to end in some run
            a.trial.report(trial_score(per_env), g)
            a.reported.add(g)
            new = True
        if new and a.handles and a.trial.should_prune():
            a.pruned = True
            (a.dir / ".stop").touch()  # the harness's runs see it: SIGINT to the scripts, checkpoints, exit 130
            print(f"trial {a.number}: pruned at step {max(a.reported):,} (score so far below the pruner's mark)")

    def finish(self, a: Active, stopping: bool) -> "str | None":
        """Tell the study how a trial whose runs all ended went; None if a stop left it to resume."""
        from optuna.trial import TrialState

        codes = {run.key: (s or {}).get("returncode") for run, s in a.results.items()}
        a.trial.set_user_attr("exit_codes", codes)
        if a.pruned:
            self.study.tell(a.trial, state=TrialState.PRUNED)
            return "pruned"
        if any(c != 0 for c in codes.values()):
            if stopping:
                return None
            bad = next(s for s in a.results.values() if s is not None and s["returncode"] != 0)
            self.study.tell(a.trial, state=TrialState.FAIL)
            print(f"trial {a.number}: FAILED ({bad['algo']} {bad['env']} seed {bad['seed']}, exit "
                  f"{bad['returncode']}; log {bad['log']}):\n{log_tail(bad)}", file=sys.stderr)  # fmt: skip
            return "failed"
        per_env = {}
        for run in a.runs:
            runs_dir = sorted({p.parent for p in (a.dir / "runs" / run.key).rglob("events.out.tfevents.*")})
            tags = load_scalars(runs_dir[-1]) if runs_dir else {}
            steps, _, values = tags.get("charts/episodic_return", ([], [], []))
            per_env.setdefault(run.env, []).append(final_mean(list(steps), list(values)))
        if any(v is None for vs in per_env.values() for v in vs):
            self.study.tell(a.trial, state=TrialState.FAIL)
            print(f"trial {a.number}: FAILED (a run ended no training episode)", file=sys.stderr)
            return "failed"
        a.trial.set_user_attr("returns", per_env)
        score = trial_score(per_env)
        self.study.tell(a.trial, score)
        return f"score {score:.4g}"

    # the loop

    def run(self) -> int:
        cfg = self.cfg
        resume = self.unfinished()
        print(f"{cfg.study}: {self.count()} of {cfg.trials} trials in the study, {len(resume)} to resume here "
              f"({cfg.algo} on {' '.join(cfg.envs)}, seeds {' '.join(map(str, cfg.seeds))}, "
              f"{cfg.total_timesteps:,} steps; {cfg.backend}, {cfg.workers} runs at a time) -> {cfg.out}",
              flush=True)  # fmt: skip
        pool = RayPool(cfg.workers, cfg.ray_address) if cfg.backend == "ray" else LocalPool(cfg.workers)

        def on_signal(signum, frame) -> None:
            self.signals.append(signum)
            STOP.set()  # the local pool's runs: SIGINT to their scripts, and queued ones never start
            for a in self.active:
                (a.dir / ".stop").touch()  # and Ray's

        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        from optuna.trial import Trial

        outcomes = []
        try:
            while True:
                stopping = bool(self.signals)
                pending = sum(len(a.handles) for a in self.active)
                while not stopping and pending < cfg.workers and (resume or self.count() < cfg.trials):
                    if resume:
                        frozen = resume.pop(0)
                        trial = Trial(self.study, frozen._trial_id)  # the running trial, as it is in the storage
                        self.launch(pool, trial, frozen.user_attrs["flags"], set(frozen.intermediate_values))
                    else:
                        trial = self.new_trial()
                        self.launch(pool, trial, trial.user_attrs["flags"], set())
                    pending = sum(len(a.handles) for a in self.active)
                if not self.active:
                    break
                handles = [h for a in self.active for h in a.handles]
                done = pool.wait(handles, self.poll) if handles else []
                for h in done:
                    for a in self.active:
                        if h in a.handles:
                            a.results[a.handles.pop(h)] = pool.result(h)
                for a in list(self.active):
                    if not a.pruned and not self.signals:
                        self.progress(a)
                    if not a.handles:
                        outcome = self.finish(a, bool(self.signals))
                        self.active.remove(a)
                        HELD.pop(a.dir, None)
                        if outcome is None:
                            print(f"trial {a.number}: stopped; the same command resumes it", flush=True)
                        else:
                            outcomes.append(outcome)
                            print(f"trial {a.number}: {outcome} ({self.count()} of {cfg.trials})", flush=True)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            STOP.clear()
            pool.close()
        if self.signals:
            write_summary(self.study, cfg)  # the trials finished so far, so that a stopped study can be read
            name = signal.Signals(self.signals[0]).name
            print(f"\n{name}: stopped; the trials finished so far are in {shown(cfg.out / 'summary.md')}; the same "
                  "command again resumes this directory's unfinished trials", file=sys.stderr)  # fmt: skip
            return INTERRUPTED
        print(write_summary(self.study, cfg))
        from optuna.trial import TrialState

        if (
            outcomes
            and all(o == "failed" for o in outcomes)
            and not self.study.get_trials(states=(TrialState.COMPLETE,))
        ):
            return 1
        return 0


# ----------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------


def shown(path: Path) -> str:
    """A path as a command line in the summary gives it: relative to the working directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_summary(study, cfg: Config) -> str:
    """DIR/summary.md (returned), DIR/history.png and DIR/importance.png of the study as it is now."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    trials = study.get_trials(deepcopy=False)
    counts = {
        s.name.lower(): sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)
    }
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    seeds = " ".join(map(str, cfg.seeds))
    lines = [
        f"# Study {cfg.study}: {cfg.algo}.py on {', '.join(cfg.envs)}",
        "",
        f"{cfg.total_timesteps:,} steps per run, seeds {seeds}; {len(trials)} trials ("
        + ", ".join(f"{n} {state}" for state, n in counts.items())
        + f"); search space {cfg.space_path.name}. Score: the mean return of the last {FINAL} training episodes, "
        + ("mean over seeds." if len(cfg.envs) == 1 else "mean over seeds, normalised per env, mean over envs."),
        "",
    ]
    if not done:
        lines.append("No trial has completed yet.")
        (cfg.out / "summary.md").write_text("\n".join(lines) + "\n")
        return "\n".join(lines)
    best = done[0]
    values = best.user_attrs["values"]
    lines += [f"## Best: trial {best.number}, score {best.value:.4g}", "", "```"]
    for env in cfg.envs:
        args = ["python", f"cleanrl_style/{cfg.algo}.py", "--env", env, "--seed", str(cfg.seeds[0])]
        lines.append(" ".join(args + ["--total-timesteps", str(cfg.total_timesteps), *best.user_attrs["flags"]]))
    preset = ", ".join(f"{k}={v!r}" for k, v in values.items())
    lines += [
        "```",
        "",
        f"(the other seeds: {seeds}). As an entry of PRESETS in cleanrl_style/{cfg.algo}.py "
        "(then `--preset tuned`, with tuned added to the Literal of --preset):",
        "",
        "```python",
        f'    "tuned": dict({preset}),  # python -m benchmarks tune, study {cfg.study}, trial {best.number}',
        "```",
        "",
        "To run it again beside the defaults, on other seeds and another budget, best.toml is a suite with it:",
        "",
        "```",
        f"python -m benchmarks run --suite {shown(cfg.out / 'best.toml')} --seeds 2 3 4 5 6 --total-timesteps 1000000 "
        f"--out benchmarks/out/{cfg.study}-best",
        "```",
        "",
        f"## Top {min(TOP, len(done))} of {len(done)} completed trials",
        "",
    ]
    (cfg.out / "best.toml").write_text(
        f"# the best setting of study {cfg.study} (trial {best.number}, score {best.value:.4g}): benchmarks/tune.py\n"
        f"algos = [{json.dumps(cfg.algo)}]\nenvs = {json.dumps(cfg.envs)}\nseeds = {json.dumps(cfg.seeds)}\n"
        f"total_timesteps = {cfg.total_timesteps}\n\n[flags]\n"
        f"{json.dumps(cfg.algo)} = {json.dumps(best.user_attrs['flags'])}\n"
    )
    names = [p.name for p in cfg.params]
    header = ["rank", "trial", "score"] + [f"{env} (per seed)" for env in cfg.envs] + names
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, t in enumerate(done[:TOP], 1):
        returns = [", ".join(f"{v:.1f}" for v in t.user_attrs["returns"][env]) for env in cfg.envs]
        row = [str(rank), str(t.number), f"{t.value:.4g}"] + returns + [str(t.user_attrs["values"][n]) for n in names]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = plot_optimization_history(study)
        ax.figure.savefig(cfg.out / "history.png", dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        lines.append("Optuna's optimisation history: history.png.")
        try:
            ax = plot_param_importances(study)
            ax.figure.savefig(cfg.out / "importance.png", dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            importance = optuna.importance.get_param_importances(study)
            lines.append(
                "Parameter importances (PED-ANOVA), importance.png: "
                + ", ".join(f"{k} {v:.2f}" for k, v in importance.items())
                + "."
            )
        except (RuntimeError, ValueError) as e:  # too few completed trials to tell
            lines.append(f"Parameter importances: not computed ({str(e).splitlines()[0]}).")
    (cfg.out / "summary.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)
