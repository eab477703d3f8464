"""dqn.py and a2c.py speed beside Stable-Baselines3, run the same way on this machine (needs the peers extra).

    python -m benchmarks.speed sps --algo dqn --rounds 5
        steady env steps per second (after the first compilation), one torch thread each: dqn.py with SB3 DQN's
        settings (--no-double --n-step 1), with --compile and eager, and dqn.py's defaults (Double DQN, 3-step
        returns) with --compile, beside SB3 DQN given the same settings (batch 64, one gradient step per env step,
        target copied every 100 steps, 128-128 ReLU, Adam 1e-3, replay 100k, learning starts 1000, the same epsilon
        schedule) on CartPole-v1.
    python -m benchmarks.speed sps --algo a2c --env HalfCheetah-v5 --rounds 5
        the same for a2c.py with SB3 A2C's settings (1 env x 5 steps, RMSprop 7e-4, lambda 1, c1 0.5, constant
        learning rate; observations and rewards normalised on both sides on MuJoCo, as rl-zoo3 runs SB3's A2C
        there), eager and --compile, and a2c.py at its own defaults (--compile), beside SB3 A2C.
    python -m benchmarks.speed solve --seeds 1 2 3 4 5
        dqn.py's defaults on CartPole-v1: env steps and whole-process seconds until the mean of the last 20
        episodes reaches 475, eager, --compile from an empty compilation cache, and --compile again (cached).
    python -m benchmarks.speed profile -- cleanrl_style/dqn.py --env CartPole-v1 --total-timesteps 10000
        where one run spends its time: py-spy samples of the process, each counted at the line of the script's
        main() it was in, grouped by the loop's "# ---- part ----" comments (samples outside main: start-up and
        exit).

Runs go one at a time, each round "ours, SB3, ours, ours" in turn, so that a round's runs see about the same load on
this shared machine; each ratio is ours over the SB3 run of its round, given as min / median / max over the rounds.
"Steady" is the rate between the first charts/SPS event at or after --warmup steps and the last one (SB3 logs
charts/SPS every --sps-every steps for it, benchmarks/peers/sb3.py --sps-every). The load average is read before
each run. Prints a markdown table; --out also writes it (with the command, the date and the machine) to a file.
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.events import first_crossing, load_scalars, newest_run
from benchmarks.machine import stamp

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
COMMON = ["--no-progress", "--eval-episodes", "0", "--no-save-model"]

# SB3 DQN given dqn.py's settings (its own defaults differ: batch 32, a gradient step every 4 env steps, target
# copied every 10,000 steps, 64-64 network, learning rate 1e-4, ...); epsilon 1 -> 0.01 over the first 20%.
SB3_DQN = ["learning_rate=1e-3", "buffer_size=100000", "learning_starts=1000", "batch_size=64", "train_freq=1",
           "gradient_steps=1", "target_update_interval=100", "exploration_fraction=0.2", "exploration_final_eps=0.01",
           "gamma=0.99", "max_grad_norm=10", "policy_kwargs={'net_arch': [128, 128]}"]  # fmt: skip
# dqn.py as SB3 DQN computes it: one-step targets of theta^- (no Double DQN), a constant learning rate
DQN_AS_SB3 = ["--no-double", "--n-step", "1", "--no-anneal-lr"]
# a2c.py with SB3 A2C's defaults: 1 env x 5 steps, RMSprop 7e-4 (alpha 0.99, eps 1e-5), lambda 1, c1 0.5, c2 0,
# gradient norm 0.5, constant learning rate, no advantage normalisation, log sigma 0 at the start
A2C_AS_SB3 = ["--num-envs", "1", "--num-steps", "5", "--learning-rate", "7e-4", "--optimizer", "rmsprop",
              "--gae-lambda", "1.0", "--gamma", "0.99", "--vf-coef", "0.5", "--ent-coef", "0", "--max-grad-norm",
              "0.5", "--no-anneal-lr", "--norm-adv", "False"]  # fmt: skip


def run_timed(cmd: list, run_dir: Path, pattern: str, env_extra: dict | None = None) -> tuple:
    """Run cmd to its end; (start time, whole-process seconds, {tag: (steps, walls, values)}, load average)."""
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), **(env_extra or {}))
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return t0, time.time() - t0, load_scalars(newest_run(run_dir, pattern)), load


def steady_sps(tags: dict, warmup: int) -> float:
    """Env steps per second between the first charts/SPS event at or after `warmup` steps and the last one."""
    steps, walls, _ = tags["charts/SPS"]
    keep = steps >= warmup
    steps, walls = steps[keep], walls[keep]
    if len(steps) < 2 or walls[-1] <= walls[0]:
        raise SystemExit(f"fewer than two charts/SPS events after step {warmup}: use more --steps")
    return float((steps[-1] - steps[0]) / (walls[-1] - walls[0]))


def jobs_for(args) -> tuple[list, tuple]:
    """[(name, command, run-name pattern)] of ours, and SB3's (name, command, pattern), for --algo and --env."""
    steps = ["--total-timesteps", str(args.steps), "--run-dir", str(args.run_dir)]
    ours = [PYTHON, f"cleanrl_style/{args.algo}.py", "--env", args.env, *steps, *COMMON, "--seed", str(args.seed)]
    peer = [PYTHON, "benchmarks/peers/sb3.py", "--algo", args.algo, "--env", args.env, *steps, "--eval-episodes", "0"]
    peer += ["--seed", str(args.seed), "--sps-every", str(args.sps_every)]
    pattern = f"{args.env}__{args.algo}__{args.seed}__*"
    if args.algo == "dqn":
        same = ours + DQN_AS_SB3
        variants = [
            ("dqn.py, SB3's settings, --compile", same + ["--compile"]),
            ("dqn.py, SB3's settings, eager", same),
            ("dqn.py defaults (Double, 3-step), --compile", ours + ["--compile"]),
        ]
        peer += ["--hp", *SB3_DQN]
        name = "SB3 DQN, the same settings"
    else:
        continuous = not args.env.startswith(("CartPole", "Acrobot", "MountainCar-v"))
        norm = ["--norm-obs", "True", "--norm-reward", "True", "--log-std-init", "0"] if continuous else []
        same = ours + A2C_AS_SB3 + norm
        variants = [
            ("a2c.py, SB3's settings, --compile", same + ["--compile"]),
            ("a2c.py, SB3's settings, eager", same),
            ("a2c.py defaults, --compile", ours + ["--compile"]),
        ]
        peer += ["--zoo"] if continuous else []  # rl-zoo3: SB3's A2C defaults with VecNormalize on MuJoCo
        name = "SB3 A2C" + (" (its defaults, VecNormalize)" if continuous else " (its defaults)")
    return [(n, c, pattern) for n, c in variants], (name, peer, f"{args.env}__sb3-{args.algo}__{args.seed}__*")


def sps(args) -> str:
    ours, (peer_name, peer_cmd, peer_pattern) = jobs_for(args)
    rows = []  # (round, name, steady SPS, whole-training SPS, whole-process s, load)
    for r in range(args.rounds):
        order = [ours[0], (peer_name, peer_cmd, peer_pattern), *ours[1:]]
        for name, cmd, pattern in order:
            _, total, tags, load = run_timed(cmd, args.run_dir, pattern)
            row = (r, name, steady_sps(tags, args.warmup), float(tags["charts/SPS"][2][-1]), total, load)
            rows.append(row)
            print(row, flush=True)
    names = [n for n, _, _ in ours] + [peer_name]
    lines = [
        "| implementation | steady SPS, median [min, max] | training SPS (first steps and compilation "
        "included), median | whole process s, median |",
        "|---|---|---|---|",
    ]
    for n in names:
        mine = [row for row in rows if row[1] == n]
        v = np.array([row[2] for row in mine])
        lines.append(
            f"| {n} | {np.median(v):,.0f} [{v.min():,.0f}, {v.max():,.0f}] | "
            f"{np.median([row[3] for row in mine]):,.0f} | {np.median([row[4] for row in mine]):.1f} |"
        )
    lines += [
        "",
        f"Ratio to {peer_name}, steady SPS, each round's runs paired (min / median / max over {args.rounds} rounds):",
        "",
    ]
    for n in names[:-1]:
        ratios = np.array(
            [
                next(row[2] for row in rows if row[0] == r and row[1] == n)
                / next(row[2] for row in rows if row[0] == r and row[1] == peer_name)
                for r in range(args.rounds)
            ]
        )
        lines.append(
            f"- {n}: **{np.median(ratios):.2f}×** ({ratios.min():.2f} / {np.median(ratios):.2f} / {ratios.max():.2f})"
        )
    loads = [row[5] for row in rows]
    lines += [
        "",
        f"Load average (1 min) before the runs: {min(loads):.1f} to {max(loads):.1f} (median "
        f"{np.median(loads):.1f}) on 2 cores. Commands (one round):",
        "",
        "```",
    ]
    lines += [" ".join(str(c) for c in cmd).replace(PYTHON, "python") for _, cmd, _ in ours]
    lines += [" ".join(f'"{c}"' if " " in str(c) else str(c) for c in peer_cmd).replace(PYTHON, "python"), "```"]
    return "\n".join(lines)


def solve(args) -> str:
    """dqn.py's defaults on CartPole-v1, each seed eager, --compile with an empty cache, --compile again."""
    cache = tempfile.mkdtemp(prefix="inductor_")  # one fresh compilation cache, shared by the cold and warm runs
    rows = []
    for seed in args.seeds:
        base = [PYTHON, "cleanrl_style/dqn.py", "--env", "CartPole-v1", "--seed", str(seed), "--run-dir"]
        base += [str(args.run_dir), "--no-progress", "--eval-episodes", "0"]
        for name, extra, fresh in [
            ("eager", [], False),
            ("--compile, empty cache", ["--compile"], True),
            ("--compile, cached", ["--compile"], False),
        ]:
            if fresh:
                cache = tempfile.mkdtemp(prefix="inductor_")
            t0, total, tags, load = run_timed(
                base + extra, args.run_dir, f"CartPole-v1__dqn__{seed}__*", {"TORCHINDUCTOR_CACHE_DIR": cache}
            )
            steps, walls, returns = tags["charts/episodic_return"]
            i = first_crossing(returns, 475.0, 20)
            rows.append(
                (
                    name,
                    seed,
                    None if i is None else int(steps[i]),
                    None if i is None else walls[i] - t0,
                    total,
                    float(returns[-20:].mean()),
                    load,
                )
            )
            print(rows[-1], flush=True)
    lines = [
        "| dqn.py defaults | seed | env steps to 475 | whole-process s to 475 | whole run s | last 20 episodes' "
        "mean | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, s, st, w, tot, last, load in rows:
        lines.append(
            f"| {n} | {s} | {st if st is not None else 'never'} | "
            f"{f'{w:.1f}' if w is not None else 'never'} | {tot:.1f} | {last:.1f} | {load:.1f} |"
        )
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        hit = [r for r in mine if r[2] is not None]
        if hit:
            lines.append(
                f"| **{name}: {len(hit)}/{len(mine)} solved, mean** | | {np.mean([r[2] for r in hit]):,.0f} "
                f"| {np.mean([r[3] for r in hit]):.1f} | {np.mean([r[4] for r in mine]):.1f} | | |"
            )
    return "\n".join(lines)


def profile(args) -> str:
    """py-spy samples of one run of a script, counted at the line of its main() and by the loop's parts."""
    script = Path(args.command[0])
    raw = Path(tempfile.mkdtemp(prefix="pyspy_")) / "raw.txt"
    py_spy = Path(PYTHON).parent / "py-spy"  # installed beside this Python (pip install py-spy), or on the PATH
    cmd = [
        str(py_spy) if py_spy.exists() else "py-spy",
        "record",
        "-r",
        str(args.rate),
        "-f",
        "raw",
        "-o",
        str(raw),
        "--",
        PYTHON,
        *args.command,
    ]
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    source = (ROOT / script).read_text().splitlines()
    main_line = next(i for i, line in enumerate(source, 1) if line.startswith("def main("))
    main_end = next((i for i, line in enumerate(source, 1) if i > main_line and re.match(r"\S", line)), len(source))
    part_of, part = {}, "set-up"  # each line of main -> the "# ---- part ----" comment above it
    for i in range(main_line, main_end):
        m = re.match(r"\s*# ---- (.+?)(?: ----|:|,? \(|$)", source[i - 1])
        part = m.group(1) if m else part
        part_of[i] = "end: checkpoint, evaluation" if "run.end(" in source[i - 1] else part
    frame = re.compile(r"(?:^|;)main \((?:[^;()]*/)?" + re.escape(script.name) + r":(\d+)\)")
    by_line, total = collections.Counter(), 0
    for record in raw.read_text().splitlines():
        stack, n = record.rsplit(" ", 1)
        total += int(n)
        hits = frame.findall(stack)
        by_line[int(hits[-1]) if hits else None] += int(n)
    if set(by_line) == {None}:
        raise SystemExit(f"no sample inside main() of {script}: did the run fail? {' '.join(args.command)}")
    by_part = collections.Counter()
    for line, n in by_line.items():
        by_part["start-up and exit (outside main)" if line is None else part_of.get(line, "set-up")] += n
    flags = args.command
    steps = int(float(flags[flags.index("--total-timesteps") + 1])) if "--total-timesteps" in flags else None
    per_step = (lambda n: f"{n / args.rate / steps * 1e6:,.0f}") if steps else (lambda n: "–")
    lines = ["| part of the run | share of samples | us per env step |", "|---|---|---|"]
    lines += [f"| {p} | {n / total:.1%} | {per_step(n)} |" for p, n in by_part.most_common()]
    lines += ["", f"| line of `{script.name}` | share | us per env step | code |", "|---|---|---|---|"]
    for line, n in by_line.most_common(args.top):
        if line is not None:
            lines.append(f"| {line} | {n / total:.1%} | {per_step(n)} | `{source[line - 1].strip()[:90]}` |")
    load = f"; load average {os.getloadavg()[0]:.1f} at the end"
    lines += ["", f"{total} samples at {args.rate} Hz ({total / args.rate:.1f} s of wall time{load})."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["sps", "solve", "profile"])
    parser.add_argument("--algo", choices=["dqn", "a2c"], default="dqn")
    parser.add_argument("--env", default=None, help="sps: default CartPole-v1 (dqn), HalfCheetah-v5 (a2c)")
    parser.add_argument(
        "--steps", type=int, default=None, help="sps: env steps per run (default 10,000 dqn, 20,000 a2c)"
    )
    parser.add_argument("--warmup", type=int, default=2000, help="sps: steady rate from this step on")
    parser.add_argument("--sps-every", type=int, default=250, help="sps: SB3's charts/SPS period in steps")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--rate", type=int, default=200, help="profile: samples per second")
    parser.add_argument("--top", type=int, default=20, help="profile: lines of main shown")
    parser.add_argument("--run-dir", type=Path, default=Path(tempfile.gettempdir()) / "speed_runs")
    parser.add_argument("--out", type=Path)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # profile: the script and its flags come after --
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1 :]
    args.env = args.env or ("CartPole-v1" if args.algo == "dqn" else "HalfCheetah-v5")
    args.steps = args.steps or (10_000 if args.algo == "dqn" else 20_000)
    if args.what == "profile" and not args.command:
        parser.error("profile needs the script and its flags after --")
    if args.rounds < 1 or args.warmup >= args.steps:
        parser.error("--rounds must be at least 1 and --warmup below --steps")
    table = {"sps": sps, "solve": solve, "profile": profile}[args.what](args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"Command: `python -m benchmarks.speed {' '.join(sys.argv[1:])}`\n\n{stamp()}\n\n{table}\n")


if __name__ == "__main__":
    main()
