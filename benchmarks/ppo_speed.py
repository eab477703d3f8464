"""PPO speed beside Stable-Baselines3, run the same way on this machine (needs the peers extra).

    python -m benchmarks.ppo_speed cartpole --seeds 1 2 3
        whole-process wall-clock seconds and env steps until the mean of the last 20 episodes reaches
        475 on CartPole-v1: ppo.py with default flags, SB3 PPO with rl-zoo3's tuned hyperparameters.
    python -m benchmarks.ppo_speed sps --env HalfCheetah-v5 --steps 40960 [--settings defaults]
        training steps per second, ppo.py --preset paper (eager, and with --compile) beside SB3's defaults,
        the same PPO settings, one torch thread each; with --settings defaults, ppo.py's own defaults (64 envs
        x 32 steps) beside SB3 with that rollout shape and beside SB3's defaults. "training SPS": env steps
        over the seconds of training, the first update (and so --compile's compilation) included; "after the
        first update": from the end of the first update to the end of the last, the steady rate of a long run.

    python -m benchmarks.ppo_speed minibatch
        one mini-batch step of ppo.py's HalfCheetah update (64 samples, 64-unit networks, one thread) in
        this process: eager, with the loss compiled (what --compile did until 2026-11-24), and with the whole
        step compiled (--compile now: loss, gradient, clipping and Adam in one program); milliseconds per
        step, and the seconds of the first epoch (the compilation, from an empty cache).

Runs go one at a time, ours and SB3's alternating, so both see the same machine load. Prints a
markdown table; --out also writes it (with the command, the date and the machine) to a file.
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.events import first_crossing, load_scalars, newest_run
from benchmarks.machine import stamp

ROOT = Path(__file__).resolve().parents[1]


def timed_run(cmd: list, run_parent: Path, pattern: str) -> tuple:
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return t0, time.time() - t0, load_scalars(newest_run(run_parent, pattern))


def cartpole(args) -> str:
    rows = []
    for seed in args.seeds:
        for name, cmd, pattern in [
            (
                "ppo.py (defaults)",
                [
                    sys.executable,
                    "cleanrl_style/ppo.py",
                    "--env",
                    "CartPole-v1",
                    "--seed",
                    str(seed),
                    "--no-progress",
                    "--eval-episodes",
                    "0",
                    "--run-dir",
                    str(args.run_dir),
                ],
                f"CartPole-v1__ppo__{seed}__*",
            ),
            (
                "SB3 PPO (rl-zoo3)",
                [
                    sys.executable,
                    "benchmarks/peers/sb3.py",
                    "--algo",
                    "ppo",
                    "--env",
                    "CartPole-v1",
                    "--zoo",
                    "--eval-episodes",
                    "0",
                    "--seed",
                    str(seed),
                    "--run-dir",
                    str(args.run_dir),
                ],
                f"CartPole-v1__sb3-ppo__{seed}__*",
            ),
        ]:
            t0, total, tags = timed_run(cmd, args.run_dir, pattern)
            steps, walls, returns = tags["charts/episodic_return"]
            i = first_crossing(returns, 475.0, 20)
            rows.append(
                (name, seed, None if i is None else int(steps[i]), None if i is None else float(walls[i] - t0), total)
            )
            print(rows[-1], flush=True)
    lines = [
        "| implementation | seed | env steps to 475 | wall-clock s to 475 (whole process) | whole run s |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {s} | {st if st is not None else 'never'} | {w:.2f} | {tot:.1f} |"
        if w is not None
        else f"| {n} | {s} | never | never | {tot:.1f} |"
        for n, s, st, w, tot in rows
    ]
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name and r[3] is not None]
        if mine:
            lines.append(
                f"| **{name}: mean** | | {np.mean([r[2] for r in mine]):,.0f} | {np.mean([r[3] for r in mine]):.2f} | |"
            )
    return "\n".join(lines)


def sps(args) -> str:
    """--settings paper: ppo.py --preset paper (eager and --compile) beside SB3's defaults, the same PPO settings.
    --settings defaults: ppo.py with its own continuous defaults (Tianshou's: 64 envs x 32 steps), eager and
    --compile, beside SB3 given the same rollout shape (--n-envs 64 --n-steps 32; the rest of the update is
    the same: 2048 steps, 10 epochs of mini-batch 64) and beside SB3's defaults (1 env x 2048 steps)."""
    rows = []
    ours = [sys.executable, "cleanrl_style/ppo.py", "--env", args.env, "--total-timesteps", str(args.steps)]
    ours += ["--no-progress", "--eval-episodes", "0", "--no-save-model", "--run-dir", str(args.run_dir)]
    peer = [sys.executable, "benchmarks/peers/sb3.py", "--algo", "ppo", "--env", args.env, "--eval-episodes", "0"]
    peer += ["--total-timesteps", str(args.steps), "--run-dir", str(args.run_dir)]
    if args.settings == "paper":
        label = "ppo.py --preset paper"
        ours += ["--preset", "paper"]
        peers = [("SB3 PPO (defaults)", [])]
    else:
        label = "ppo.py (defaults)"
        peers = [("SB3 PPO, 64 envs x 32 steps", ["--n-envs", "64", "--n-steps", "32"]), ("SB3 PPO (defaults)", [])]
    for seed in args.seeds:
        ours_pattern, peer_pattern = f"{args.env}__ppo__{seed}__*", f"{args.env}__sb3-ppo__{seed}__*"
        jobs = [(label, ours + ["--seed", str(seed)], ours_pattern)]
        jobs.append((f"{label} --compile", ours + ["--seed", str(seed), "--compile"], ours_pattern))
        jobs += [(name, peer + ["--seed", str(seed)] + extra, peer_pattern) for name, extra in peers]
        for name, cmd, pattern in jobs:
            rows.append(measure_sps(name, seed, cmd, args.run_dir, pattern))
    return sps_table(rows, "one thread each", n_peers=len(peers))


def minibatch(args) -> str:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_")  # a cold cache: real compile times
    import torch

    from cleanrl_style import ppo

    torch.set_num_threads(1)
    torch.manual_seed(0)
    run_args = ppo.resolve_args(ppo.Args(env="HalfCheetah-v5"), discrete=False)
    agent = ppo.Agent(17, 6, discrete=False)
    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5, fused=True)
    n, B = 2048, run_args.minibatch_size
    s, a, A_hat, G, V_old = torch.randn(n, 17), torch.randn(n, 6), torch.randn(n), torch.randn(n), torch.randn(n)
    with torch.no_grad():
        head_old = agent.head(s)
        logp_old = agent.log_prob(head_old, a)
    beta = torch.tensor(1.0)

    def clip_and_step():
        torch.nn.utils.clip_grad_norm_(agent.parameters(), run_args.max_grad_norm)
        optimizer.step()

    def epoch(loss_fn, step_fn) -> None:
        """One epoch of ppo.py's update: shuffled mini-batches of B samples."""
        perm = torch.randperm(n)
        for start in range(0, n, B):
            mb = perm[start : start + B]
            loss = loss_fn(
                agent, run_args, s[mb], a[mb], logp_old[mb], A_hat[mb], G[mb], V_old[mb], head_old[mb], beta
            )[0]
            optimizer.zero_grad()
            loss.backward()
            step_fn()

    def whole_step_epoch(update_step) -> None:
        """The same epoch with ppo.gradient_step with --compile (loss, gradient, clipping and Adam in one program)."""
        perm = torch.randperm(n)
        for start in range(0, n, B):
            mb = perm[start : start + B]
            update_step(s[mb], a[mb], logp_old[mb], A_hat[mb], G[mb], V_old[mb], head_old[mb], beta)

    compiled_loss = torch.compile(ppo.minibatch_loss)  # both compile at their first call
    update_step = ppo.gradient_step(agent, optimizer, dataclasses.replace(run_args, compile=True))
    rows = []
    for name, run_epoch in [
        ("eager (ppo.py)", lambda: epoch(ppo.minibatch_loss, clip_and_step)),
        ("loss compiled (ppo.py --compile until 2026-11-24)", lambda: epoch(compiled_loss, clip_and_step)),
        ("whole step compiled (ppo.py --compile)", lambda: whole_step_epoch(update_step)),
    ]:
        t0 = time.perf_counter()
        run_epoch()  # the first epoch compiles
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            run_epoch()
        ms = (time.perf_counter() - t0) / (args.epochs * n // B) * 1e3
        rows.append((name, ms, first))
        print(rows[-1], flush=True)
    lines = ["| mini-batch step | ms per step | first epoch s (compilation included) |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.3f} | {first:.1f} |" for name, ms, first in rows]
    return "\n".join(lines)


def measure_sps(name: str, seed: int, cmd: list, run_dir: Path, pattern: str) -> tuple:
    """(name, seed, training SPS of the last update, SPS after the first update or None, whole-process seconds)
    of one timed run. The second comes from the wall times of our charts/SPS events (one per update); SB3
    logs charts/SPS once, at the end."""
    _, total, tags = timed_run(cmd, run_dir, pattern)
    steps, walls, values = tags["charts/SPS"]
    steady = float((steps[-1] - steps[0]) / (walls[-1] - walls[0])) if len(steps) > 1 else None
    row = (name, seed, float(values[-1]), steady, total)
    print(row, flush=True)
    return row


def sps_table(rows: list, ratio_label: str, n_peers: int = 1) -> str:
    """Markdown table of measure_sps rows, the mean per implementation, and the ratio of each of ours to each
    peer (the last n_peers implementations), by training SPS and, where both have it, by the steady rate."""
    lines = [
        "| implementation | seed | training SPS | after the first update | whole process s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {s} | {v:,.0f} | {f'{w:,.0f}' if w else '–'} | {t:.1f} |" for n, s, v, w, t in rows]
    names = list(dict.fromkeys(r[0] for r in rows))
    means = {n: np.mean([r[2] for r in rows if r[0] == n]) for n in names}
    steady = {
        n: np.mean([r[3] for r in rows if r[0] == n]) if all(r[3] for r in rows if r[0] == n) else None for n in names
    }
    lines += [f"| **{n}: mean** | | {means[n]:,.0f} | {f'{steady[n]:,.0f}' if steady[n] else '–'} | |" for n in names]
    for peer in names[len(names) - n_peers :]:
        for n in names[: len(names) - n_peers]:
            line = f"\nRatio {n} / {peer} ({ratio_label}), training SPS: **{means[n] / means[peer]:.2f}×**"
            if steady[n]:
                line += f"; after the first update: **{steady[n] / means[peer]:.2f}×**"
            lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["cartpole", "sps", "minibatch"])
    parser.add_argument("--epochs", type=int, default=10, help="minibatch: timed epochs of 32 steps each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--steps", type=int, default=40960)
    parser.add_argument(
        "--settings",
        choices=["paper", "defaults"],
        default="paper",
        help="sps: ppo.py --preset paper beside SB3's defaults (the same settings), or ppo.py's defaults beside "
        "SB3 with the same rollout shape and beside SB3's defaults",
    )
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "speed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    table = {"cartpole": cartpole, "sps": sps, "minibatch": minibatch}[args.what](args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"Command: `python -m benchmarks.ppo_speed {' '.join(sys.argv[1:])}`\n\n{stamp()}\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
