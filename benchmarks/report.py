"""Turn a sweep's event files into a markdown report, PNG learning curves and a CSV of the curves.

Per run: the training curve is the mean of the last 20 finished episodes, read at each point of a
common grid of env steps (and of whole-process seconds). Per algorithm (or variant) and env: the mean
over seeds, solid where every seed has a value and dashed where only some do (seeds end at different
seconds: the mean over those still running), with a 95% percentile-bootstrap band from 3 seeds on. In
the table: the IQM over seeds (with a 95% bootstrap CI from 3 seeds on) of the mean of the last 100
training episodes and of the final deterministic evaluation, the env steps and seconds until the
20-episode mean first reaches the suite's threshold, and the steps per second. Across the envs with a
reference score: rliable's aggregates of the normalised final evaluations (benchmarks/aggregate.py),
their figures, and out/scores.csv.

Not in the table's numbers, each on a line of its own: failed and unfinished runs; runs that finished
without a training episode (a budget shorter than an episode of every env); runs whose event file ends
inside a record (cut short: TensorBoard would read it up to the cut and say nothing), named in the
report and on stderr. A broken suite.json or status file is a ValueError naming the file.
"""

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.events import first_crossing, load_scalars, truncated_at  # noqa: E402
from benchmarks.machine import stamp
from benchmarks.stats import bootstrap_band, bootstrap_ci, iqm  # noqa: E402
from benchmarks.sweep import SUITE_KEYS, Run, _is, safe  # noqa: E402

WINDOW = 20  # episodes in the running mean of a curve, and by default in the threshold test
FINAL = 100  # training episodes in the final-return figure
GRID = 100  # points of the common grid


def _times(status: dict) -> bool:
    """When the run's attempts started (elapsed() needs them): a list of attempts, or the one start time."""
    attempts = status.get("attempts")
    if attempts:
        return isinstance(attempts, list) and all(
            isinstance(a, dict) and _is((int, float))(a.get("start_time")) for a in attempts
        )
    return _is((int, float))(status.get("start_time"))


# what report() reads of a status file: (test, what it must be)
STATUS_KEYS = {
    "algo": (_is(str), "the algorithm's name"),
    "env": (_is(str), "the env id"),
    "seed": (_is(int), "an integer seed"),
    "returncode": (lambda v: v is None or _is(int)(v), "an exit status or null"),
    "log": (_is(str), "the path of the run's log"),
}


def read_status_file(path: Path) -> dict:
    """A status file as report() needs it; ValueError naming the file and what is wrong with it."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: broken status file ({str(e).splitlines()[0]})") from None
    if not isinstance(status, dict):
        raise ValueError(f"{path}: broken status file (a JSON {type(status).__name__}, not a table)")
    for key, (ok, want) in STATUS_KEYS.items():
        if key not in status or not ok(status[key]):
            raise ValueError(f"{path}: broken status file ('{key}' must be {want}, not {status.get(key)!r})")
    if not _times(status):
        raise ValueError(f"{path}: broken status file (no start time: 'attempts' or 'start_time')")
    return status


def read_suite_json(out: Path) -> dict:
    """DIR/suite.json, the suite the sweep ran ({} if there is none); ValueError if it is not the table it wrote."""
    path = out / "suite.json"
    if not path.exists():
        return {}
    try:
        suite = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({str(e).splitlines()[0]})") from None
    if not isinstance(suite, dict):
        raise ValueError(f"{path}: not a table of the suite's settings but a JSON {type(suite).__name__}")
    if not isinstance(suite.get("name", ""), str):
        raise ValueError(f"{path}: 'name' must be a string, not {suite['name']!r}")
    for key in ("thresholds", "threshold_windows"):
        _, ok, want = SUITE_KEYS[key]
        if key in suite and not ok(suite[key]):
            raise ValueError(f"{path}: '{key}' must be {want}, not {suite[key]!r}")
    return suite


def load_runs(out: Path) -> tuple[list, list]:
    """(finished runs with their scalars, the runs left out of the table) of a sweep directory; ValueError on a
    broken file. Each run left out has an "outcome" (what to print for it) and "failed" (whether it failed)."""
    finished, left_out = [], []
    for path in sorted((out / "status").glob("*.json")):
        status = read_status_file(path)
        run_parent = out / "runs" / Run(status["algo"], status["env"], status["seed"]).key
        returncode = status["returncode"]
        if returncode is None:
            left_out.append({**status, "outcome": "unfinished (no exit status)", "failed": True})
            continue
        if returncode != 0:
            left_out.append({**status, "outcome": f"FAILED (exit {returncode})", "failed": True})
            continue
        # the script's run directory: where its event files are (a namespaced env id may nest it one level deeper)
        run_dirs = sorted({p.parent for p in run_parent.rglob("events.out.tfevents.*")})
        if not run_dirs:
            left_out.append({**status, "outcome": "finished, but no event file", "failed": False})
            continue
        # TensorBoard reads the files in the order of their names (the time each attempt began)
        files = sorted(run_dirs[-1].glob("events.out.tfevents.*"))
        cut = [(f, at, f.stat().st_size, f == files[-1]) for f in files for at in [truncated_at(f)] if at is not None]
        if cut and cut[-1][3]:  # the newest file is cut: the run's record stops early, its numbers are not the run's
            left_out.append({**status, "outcome": "finished, event file truncated", "failed": False, "cut": cut})
            continue
        tags = load_scalars(run_dirs[-1])
        if "charts/episodic_return" not in tags:
            steps = max((int(v[0].max()) for v in tags.values() if len(v[0])), default=0)
            outcome = f"finished, no training episode ended in {steps:,} env steps"
            left_out.append({**status, "outcome": outcome, "failed": False, "cut": cut})
            continue
        # an earlier attempt's file cut short (a killed script) is followed by the attempt that resumed it: kept
        finished.append({**status, "run_dir": str(run_dirs[-1]), "tags": tags, "cut": cut})
    return finished, left_out


def elapsed(run: dict, walls: np.ndarray) -> np.ndarray:
    """Seconds of the run's processes at each wall time: from the start of the attempt it falls in, plus the
    seconds of the attempts before it (a run resumed from its checkpoint does not count the time in between)."""
    attempts = run.get("attempts") or [{"start_time": run["start_time"], "seconds": run.get("seconds")}]
    starts = np.array([a["start_time"] for a in attempts])
    before = np.concatenate([[0.0], np.cumsum([a["seconds"] or 0.0 for a in attempts[:-1]])])
    k = np.clip(np.searchsorted(starts, walls, side="right") - 1, 0, None)
    return walls - starts[k] + before[k]


def running_mean(values: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Mean of the last `window` values at each index (fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def on_grid(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The step function (x_i, y_i) at each grid point: y of the last x_i <= g; NaN before x_0 and after x_n."""
    i = np.searchsorted(x, grid, side="right") - 1
    return np.where((i >= 0) & (grid <= x[-1]), y[np.clip(i, 0, None)], np.nan)


def summarise(runs: list, threshold: "float | None", window: int = WINDOW) -> dict:
    final = [float(np.mean(r["tags"]["charts/episodic_return"][2][-FINAL:])) for r in runs]
    evals = [float(r["tags"]["eval/episodic_return"][2][-1]) for r in runs if "eval/episodic_return" in r["tags"]]
    steps_to, secs_to = [], []
    if threshold is not None:
        for r in runs:
            steps, walls, returns = r["tags"]["charts/episodic_return"]
            i = first_crossing(returns, threshold, window)
            if i is not None:
                steps_to.append(int(steps[i]))
                secs_to.append(float(elapsed(r, walls[i : i + 1])[0]))
    sps = [float(r["tags"]["charts/SPS"][2][-1]) for r in runs if "charts/SPS" in r["tags"]]
    return {"n": len(runs), "final": final, "eval": evals, "steps_to": steps_to, "secs_to": secs_to, "sps": sps}


MIN_BAND = 3  # seeds: no 95% band or CI from fewer (a bootstrap over 1 or 2 values is their range, not a CI)


def seeds_label(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def fmt_ci(values: list) -> str:
    """IQM over seeds with its 95% bootstrap CI in brackets; the IQM alone from fewer than MIN_BAND seeds."""
    if not values:
        return "–"
    if len(values) < MIN_BAND:
        return f"{iqm(values):.1f}"
    lo, hi = bootstrap_ci(values)
    return f"{iqm(values):.1f} [{lo:.1f}, {hi:.1f}]"


def draw_mean(ax, grid: np.ndarray, curves: np.ndarray, label: str, color=None) -> None:
    """The mean over seeds of curves on a common grid (NaN where a seed has no value: before its first episode, after
    its end). Solid where every seed has a value, with a 95% bootstrap band from MIN_BAND seeds on; dashed where only
    some do (the mean over the seeds still running: in seconds, seeds end at different times)."""
    present = np.isfinite(curves)
    count = present.sum(0)
    some = count > 0
    if not some.any():
        return
    mean = np.full(len(grid), np.nan)
    mean[some] = np.where(present, curves, 0.0).sum(0)[some] / count[some]
    full = count == len(curves)
    (line,) = ax.plot(grid, np.where(full, mean, np.nan), label=label, color=color)
    if (some & ~full).any():
        # the dashed part joins the solid one: the grid points next to a solid point are drawn in both
        edge = some & ~full
        beside = np.zeros_like(edge)
        beside[1:] |= edge[:-1]
        beside[:-1] |= edge[1:]
        edge |= full & beside
        ax.plot(grid, np.where(edge, mean, np.nan), color=line.get_color(), linestyle="--", linewidth=1)
    if len(curves) >= MIN_BAND and full.any():
        _, lo, hi = bootstrap_band(curves[:, full])
        ax.fill_between(grid[full], lo, hi, color=line.get_color(), alpha=0.2)


LOG_RATIO = 4  # the x axis of a panel is logarithmic when one curve ends this many times further out than another


def x_axis(firsts: list, ends: list) -> tuple[np.ndarray, str]:
    """The drawing grid and the scale ("linear" or "log") of a panel whose curves start at `firsts` and end at `ends`
    (env steps or seconds). When the longest curve is LOG_RATIO times the shortest (q_learning's 500k steps beside
    dqn's 30k), a linear axis squeezes the short ones against 0: the axis is then logarithmic, the grid geometric
    so that each curve gets points of its own, from the first point any curve has but at most two decades below the
    shortest curve's end (the first few episodes, where nothing is learnt yet, do not take half the axis)."""
    x_max = max(ends)
    if min(ends) > 0 and x_max >= LOG_RATIO * min(ends):
        x_min = max(min(x for x in firsts if x > 0), min(ends) / 100)
        return np.geomspace(x_min, x_max, GRID), "log"
    return np.linspace(0, x_max, GRID), "linear"


def colours(algos: list) -> dict:
    """A colour for each curve: tab10's when 10 are enough; else tab20's pairs, a peer ("sb3-ppo") in the light
    shade of its script's hue ("ppo"), the rest a hue each (cycling past 10)."""
    if len(algos) <= 10:
        return {a: f"C{i}" for i, a in enumerate(algos)}
    tab20 = plt.get_cmap("tab20").colors
    hue = {}
    for a in algos:
        if not (a.startswith("sb3-") and a[4:] in algos):
            hue[a] = len(hue) % 10
    out = {a: tab20[2 * hue[a]] for a in hue}
    for a in algos:
        if a not in out:
            out[a] = tab20[2 * hue[a[4:]] + 1]
    return out


def figure(env: str, by_algo: dict, path: Path, csv_rows: list, colour: "dict | None" = None) -> None:
    """figures/{env}.png: each algorithm's curve over env steps and over seconds; `colour` (by default colours() of
    by_algo) keeps an algorithm's colour the same in every figure of a report."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    partial = False
    colour = colour or colours(list(by_algo))
    for ax, xkey in zip(axes, ["steps", "seconds"]):
        series = {}
        for algo, runs in by_algo.items():
            per_seed = []
            for r in runs:
                steps, walls, returns = r["tags"]["charts/episodic_return"]
                x = steps.astype(float) if xkey == "steps" else elapsed(r, walls)
                per_seed.append((x, running_mean(returns), r["seed"]))
            series[algo] = per_seed
        ends = [float(x[-1]) for per_seed in series.values() for x, _, _ in per_seed]
        grid, scale = x_axis([float(x[0]) for per_seed in series.values() for x, _, _ in per_seed], ends)
        csv_grid = np.linspace(0, max(ends), GRID)  # curves.csv: the same linear grid whatever the figure's axis
        for algo, per_seed in series.items():
            curves = np.array([on_grid(x, y, grid) for x, y, _ in per_seed])
            if xkey == "steps":
                for x, y, seed in per_seed:
                    curve = on_grid(x, y, csv_grid)
                    csv_rows.extend((env, algo, seed, int(g), v) for g, v in zip(csv_grid, curve) if np.isfinite(v))
            partial |= bool((np.isfinite(curves).any(0) & ~np.isfinite(curves).all(0)).any())
            draw_mean(ax, grid, curves, f"{algo} ({seeds_label(len(per_seed))})", colour[algo])
        ax.set_xscale(scale)
        label = "environment steps" if xkey == "steps" else "wall-clock seconds (whole process)"
        ax.set_xlabel(label + (", log scale" if scale == "log" else ""))
        ax.set_ylabel(f"episodic return (mean of last {WINDOW})")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    title = f"{env}: mean over seeds, 95% bootstrap band where {MIN_BAND} or more seeds have a value"
    fig.suptitle(title + ("; dashed: the mean over the seeds still running" if partial else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def aggregate_section(out: Path, finished: list, colour: "dict | None" = None, variants: "dict | None" = None) -> list:
    """The report's lines on the aggregates across envs (benchmarks/aggregate.py, with rliable), and their figures
    out/figures/aggregates.png and out/figures/profiles.png and the scores in out/scores.csv; [] if no env of the
    report has a reference score. `variants`: the suite's ({name: {"algo": script, ...}}), each compared with its
    script's defaults when both ran."""
    from benchmarks import aggregate

    scores, envs, notes = aggregate.score_matrices(finished)
    if not scores:
        return []
    lines = [
        "## Aggregates across envs",
        "",
        f"Each run's final deterministic evaluation, normalised on its env: (score - random) / (best - random), "
        f"over {', '.join(envs)}. IQM: the mean of the middle half of all (run, env) scores; brackets: 95% stratified "
        "bootstrap CIs (runs resampled within each env), with rliable (Agarwal et al. 2021).",
        "",
    ]
    try:
        import rliable  # noqa: F401
    except ImportError:
        return lines + ['(not computed: rliable is not installed; pip install -e ".[bench]")', ""]
    agg = aggregate.aggregates(scores)
    lines += ["| algorithm | runs x envs | IQM | mean |", "|---|---|---|---|"]
    for algo, a in agg.items():
        # no CI from fewer than MIN_BAND runs per env, as in the table above
        few = scores[algo].shape[0] < MIN_BAND
        cells = [f"{p:.3f}" if few else f"{p:.3f} [{lo:.3f}, {hi:.3f}]" for p, lo, hi in (a["IQM"], a["mean"])]
        lines.append(f"| {algo} | {scores[algo].shape[0]} x {scores[algo].shape[1]} | {cells[0]} | {cells[1]} |")
    lines.append("")
    # each of our scripts over its peer, and each variant over its script's defaults
    versus = {**aggregate.PEERS, **{name: v["algo"] for name, v in (variants or {}).items()}}
    better = aggregate.improvements(scores, versus=versus)
    if better:
        lines += [
            "Probability of improvement P(X > Y), of each of our scripts over its peer and each variant over its "
            "script's defaults: the chance that a run of X scores above a run of Y on an env "
            "(Mann-Whitney U over their runs), averaged over the envs; 95% CI from resampling each one's runs.",
            "",
            "| X | Y | P(X > Y) |",
            "|---|---|---|",
        ]
        for (x, y), (p, lo, hi) in better.items():
            few = min(scores[x].shape[0], scores[y].shape[0]) < MIN_BAND
            lines.append(f"| {x} | {y} | {p:.2f} |" if few else f"| {x} | {y} | {p:.2f} [{lo:.2f}, {hi:.2f}] |")
        lines.append("")
    lines += ["| env | random | best | random: source | best: source |", "|---|---|---|---|---|"]
    for env in envs:
        random, best, random_source, best_source = aggregate.REFERENCE[env]
        lines.append(f"| {env} | {random:g} | {best:g} | {random_source} | {best_source} |")
    lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    profile, profile_ci = aggregate.profiles(scores)
    aggregates_figure(agg, profile, profile_ci, out / "figures", colour)
    lines += ["![aggregates](figures/aggregates.png)", "", "![performance profiles](figures/profiles.png)", ""]
    with open(out / "scores.csv", "w") as fh:
        fh.write("algo,env,run,normalised_score\n")
        for algo, m in scores.items():
            fh.writelines(f"{algo},{env},{i},{m[i, j]:.6f}\n" for i in range(m.shape[0]) for j, env in enumerate(envs))
    return lines


def aggregates_figure(agg: dict, profile: dict, profile_ci: dict, folder: Path, colour: "dict | None" = None) -> None:
    """figures/aggregates.png: IQM and mean with their CIs per algorithm; figures/profiles.png: the performance
    profiles (share of runs above tau) with their 95% bands."""
    from benchmarks.aggregate import TAUS

    algos = list(agg)
    colour = colour or colours(algos)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.9 + 0.35 * len(algos)), sharey=True)
    for ax, metric in zip(axes, ["IQM", "mean"]):
        for i, algo in enumerate(algos):
            p, lo, hi = agg[algo][metric]
            ax.barh(i, hi - lo, left=lo, height=0.6, alpha=0.6, color=colour[algo])
            ax.plot([p, p], [i - 0.3, i + 0.3], color="black", linewidth=1.5)
        ax.set_title(f"{metric} of normalised scores")
        ax.set_xlabel("normalised score (0: random, 1: best published)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(algos)), algos)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(folder / "aggregates.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algo in algos:
        ax.plot(TAUS, profile[algo], color=colour[algo], label=algo)
        ax.fill_between(TAUS, profile_ci[algo][0], profile_ci[algo][1], color=colour[algo], alpha=0.15)
    ax.set_xlabel("normalised score tau")
    ax.set_ylabel("fraction of runs with score > tau")
    ax.set_title("performance profiles, 95% stratified bootstrap bands")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "profiles.png", dpi=90)
    plt.close(fig)


def report(out: Path, command: str = "") -> Path:
    """Write out/report.md, out/figures/{env}.png and out/curves.csv; return the report's path."""
    suite = read_suite_json(out)
    thresholds, windows = suite.get("thresholds", {}), suite.get("threshold_windows", {})
    finished, left_out = load_runs(out)
    # in the suite's order of algorithms (variants included), then any other
    order = {a: i for i, a in enumerate(suite.get("algos", []))}
    finished.sort(key=lambda r: order.get(r["algo"], len(order)))
    failed = [f for f in left_out if f["failed"]]
    colour = colours(list(dict.fromkeys(r["algo"] for r in finished)))  # one colour per algorithm in every figure
    (out / "figures").mkdir(exist_ok=True)
    envs = list(dict.fromkeys([r["env"] for r in finished] + [f["env"] for f in left_out]))
    lines = [f"# Benchmark report: {suite.get('name', out.name)}", ""]
    if command:
        lines.append(f"Command: `{command}`  ")
    lines += [
        f"{stamp()}",
        "",
        f"Final return: IQM over seeds of the mean of the last {FINAL} training episodes; eval: IQM of the "
        "deterministic evaluation at the end; brackets: 95% bootstrap CI over seeds. Steps and seconds to the "
        "threshold: mean over the seeds whose running mean of episodes reached it (seconds from process start).",
        "",
    ]
    csv_rows = []
    for env in envs:
        runs = [r for r in finished if r["env"] == env]
        by_algo = {a: [r for r in runs if r["algo"] == a] for a in dict.fromkeys(r["algo"] for r in runs)}
        threshold, window = thresholds.get(env), windows.get(env, WINDOW)
        lines += [
            f"## {env}" + (f" (threshold {threshold:g}, mean of {window} episodes)" if threshold is not None else ""),
            "",
            "| algorithm | seeds | final return | eval return | reached | env steps to threshold | "
            "seconds to threshold | steps per second |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for algo, algo_runs in by_algo.items():
            s = summarise(algo_runs, threshold, window)
            steps = f"{np.mean(s['steps_to']):,.0f}" if s["steps_to"] else "–"
            secs = f"{np.mean(s['secs_to']):.1f}" if s["secs_to"] else "–"
            sps = f"{np.mean(s['sps']):,.0f}" if s["sps"] else "–"
            lines.append(
                f"| {algo} | {s['n']} | {fmt_ci(s['final'])} | {fmt_ci(s['eval'])} | "
                f"{len(s['steps_to'])}/{s['n']} | {steps} | {secs} | {sps} |"
            )
        for f in left_out:
            if f["env"] == env:
                lines.append(f"| {f['algo']} seed {f['seed']} | {f['outcome']} | | | | | | |")
        if by_algo:
            png = out / "figures" / f"{safe(env)}.png"
            figure(env, by_algo, png, csv_rows, colour)
            lines += ["", f"![{env}](figures/{png.name})"]
        lines.append("")
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- {f['algo']} on {f['env']}, seed {f['seed']}: {f['outcome']}, log `{f['log']}`" for f in failed]
        lines.append("")
    cut = [(r, *c) for r in finished + left_out for c in r.get("cut", [])]
    if cut:
        lines += ["## Truncated event files", ""]
        for r, file, at, size, newest in cut:
            says = (
                f"{r['algo']} on {r['env']}, seed {r['seed']}: `{file}` ends inside a record (whole records up to "
                f"byte {at:,} of {size:,}): "
            )
            if newest:
                says += "the run is left out of the table (its numbers would stop at the cut)"
            else:
                says += "an earlier attempt's file; the run went on from its checkpoint in a later one, kept"
            lines.append(f"- {says}")
            print(f"warning: truncated event file: {says}", file=sys.stderr)
        lines.append("")
    lines += aggregate_section(out, finished, colour, suite.get("variants"))
    with open(out / "curves.csv", "w") as fh:
        fh.write("env,algo,seed,step,return_mean_last_20\n")
        fh.writelines(f"{e},{a},{s},{x},{v:.4f}\n" for e, a, s, x, v in csv_rows)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
