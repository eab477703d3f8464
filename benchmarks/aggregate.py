"""Aggregates across envs with rliable (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice").

Each run's score is its final deterministic evaluation (eval/episodic_return), normalised per env by a stated
reference: (score - random) / (best - random), so 0 is a uniformly random policy and 1 the best published score
(REFERENCE below, each number with its source). Per algorithm, over the envs of the report that have a
reference (an algorithm missing one of them is left out, and so is a seed it did not run on every env):
- IQM and mean of the normalised scores of all (run, env) pairs, with 95% stratified bootstrap CIs (the runs
  resampled within each env; rliable's get_interval_estimates, percentile method);
- the performance profile: the share of (run, env) pairs scoring above tau, for tau from 0 to 1.25, with 95% CIs;
- the probability of improvement of each of our scripts over its peer (ppo over sb3-ppo, trpo over sb3-trpo, a2c
  over sb3-a2c, dqn over sb3-dqn, where both ran), and in a report of a suite with variants, of each variant over
  its script's defaults (dqn+per over dqn): P(X > Y), the Mann-Whitney U statistic over the two algorithms'
  runs on each env, averaged over envs, with a 95% CI from resampling each algorithm's runs independently.
rliable is the bench extra (pip install -e ".[bench]"); this module imports it only in the functions that use it.

    python -m benchmarks.aggregate --random CartPole-v1 Acrobot-v1    # measure the random policy's score
"""

import argparse
import sys
from contextlib import contextmanager

import numpy as np

REPS = 2000  # bootstrap resamples
TAUS = np.linspace(0.0, 1.25, 126)  # the performance profile's thresholds on the normalised score

# env -> (random policy's score, best published score, source of each). Random: a uniformly random policy, the mean
# return of 100 episodes measured here on these env versions (`python -m benchmarks.aggregate --random ENV`,
# seed 0; gymnasium 1.4.0, mujoco 3.3.7). D4RL's random scores of the older MuJoCo envs (Fu et al. 2020,
# d4rl/infos.py REF_MIN_SCORE: HalfCheetah -280.2, Hopper -20.3, Walker2d 1.6, Ant -325.6) are near these, but for
# Ant (-325.6 there, -60.5 here): the env versions differ. Best: the highest mean
# return of any algorithm in rl-zoo3's table of trained agents (github.com/DLR-RM/rl-baselines3-zoo, benchmark.md;
# deterministic evaluation, one trained agent each, v3 MuJoCo envs), CartPole-v1's the episode limit (500) that
# several of them reach.
RANDOM_SOURCE = "uniformly random policy, 100 episodes, measured here (python -m benchmarks.aggregate --random)"
ZOO = "rl-zoo3 benchmark.md"
REFERENCE = {
    "CartPole-v1": (23.7, 500.0, RANDOM_SOURCE, f"{ZOO}: ppo, a2c, dqn, trpo (the 500-step limit)"),
    "Acrobot-v1": (-497.1, -69.135, RANDOM_SOURCE, f"{ZOO}: qrdqn, 100k steps"),
    "MountainCar-v0": (-200.0, -100.849, RANDOM_SOURCE, f"{ZOO}: dqn, 120k steps"),
    "HalfCheetah-v5": (-285.9, 12089.939, RANDOM_SOURCE, f"{ZOO}: tqc on HalfCheetah-v3, 1M steps"),
    "Hopper-v5": (18.9, 3754.199, RANDOM_SOURCE, f"{ZOO}: tqc on Hopper-v3, 1M steps"),
    "Walker2d-v5": (1.8, 4933.148, RANDOM_SOURCE, f"{ZOO}: trpo on Walker2d-v3, 1M steps"),
    "Swimmer-v5": (0.8, 365.663, RANDOM_SOURCE, f"{ZOO}: trpo on Swimmer-v3, 1M steps"),
    "Ant-v5": (-60.5, 5813.274, RANDOM_SOURCE, f"{ZOO}: td3 on Ant-v3, 1M steps"),
    "InvertedPendulum-v5": (5.2, 1000.0, RANDOM_SOURCE, "the 1000-step limit, reward 1 per step"),
}
# our scripts and their peers, for the probability of improvement
PEERS = {"ppo": "sb3-ppo", "trpo": "sb3-trpo", "a2c": "sb3-a2c", "dqn": "sb3-dqn"}


def normalise(env: str, score: float) -> float:
    random, best, _, _ = REFERENCE[env]
    return (score - random) / (best - random)


def score_matrices(finished: list) -> tuple:
    """({algo: (runs x envs) normalised scores}, the envs (columns), [lines on what was left out]) from the finished
    runs of a report (dicts with algo, env, seed and tags)."""
    scored = [r for r in finished if r["env"] in REFERENCE and "eval/episodic_return" in r["tags"]]
    envs = list(dict.fromkeys(r["env"] for r in scored))
    every_env = dict.fromkeys(r["env"] for r in finished)
    notes = [f"{e}: no reference score here (benchmarks/aggregate.py REFERENCE), not aggregated" for e in every_env]
    notes = [n for e, n in zip(every_env, notes) if e not in REFERENCE]
    scores = {}
    for algo in dict.fromkeys(r["algo"] for r in scored):
        runs = {(r["env"], r["seed"]): r for r in scored if r["algo"] == algo}
        missing = [e for e in envs if not any(k[0] == e for k in runs)]
        if missing:
            notes.append(f"{algo}: no finished run with an evaluation on {', '.join(missing)}, left out")
            continue
        seeds = sorted(set.intersection(*({s for e2, s in runs if e2 == e} for e in envs)))
        dropped = sorted({s for _, s in runs} - set(seeds))
        if not seeds:
            notes.append(f"{algo}: no seed ran on every env, left out")
            continue
        if dropped:
            notes.append(f"{algo}: seeds {dropped} did not run on every env, left out of the aggregates")
        scores[algo] = np.array(
            [[normalise(e, float(runs[e, s]["tags"]["eval/episodic_return"][2][-1])) for e in envs] for s in seeds]
        )
    return scores, envs, notes


@contextmanager
def seeded(seed: int):
    """rliable's bootstrap draws from numpy's global generator: seed it for reproducible CIs, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def aggregates(scores: dict, seed: int = 0) -> dict:
    """{algo: {"IQM": (point, lo, hi), "mean": (point, lo, hi)}}: rliable's stratified bootstrap, 95% CIs."""
    from rliable import library as rly
    from rliable import metrics

    def both(s):
        return np.array([metrics.aggregate_iqm(s), metrics.aggregate_mean(s)])

    with seeded(seed):
        point, ci = rly.get_interval_estimates(scores, both, reps=REPS)
    return {
        a: {
            name: (float(point[a][i]), float(ci[a][0, i]), float(ci[a][1, i])) for i, name in enumerate(["IQM", "mean"])
        }
        for a in scores
    }


def profiles(scores: dict, seed: int = 0) -> tuple:
    """({algo: share of (run, env) scores > tau for tau in TAUS}, {algo: (2, len(TAUS)) 95% CI})."""
    from rliable import library as rly

    def above(m: np.ndarray, taus: np.ndarray) -> np.ndarray:  # rliable's score distribution, in one numpy step
        return (m.reshape(-1, 1) > taus).mean(0)

    with seeded(seed):
        return rly.create_performance_profile(scores, TAUS, custom_profile_func=above, reps=REPS)


def improvements(scores: dict, seed: int = 0, versus: "dict | None" = None) -> dict:
    """{(X, Y): (P(X > Y), lo, hi)} for each pair X: Y of `versus` (default PEERS: each of our scripts and its peer)
    where both ran on the same envs."""
    from rliable import library as rly
    from rliable import metrics

    versus = PEERS if versus is None else versus
    pairs = {f"{a},{p}": (scores[a], scores[p]) for a, p in versus.items() if a in scores and p in scores}
    if not pairs:
        return {}
    with seeded(seed):
        point, ci = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=REPS)
    return {tuple(k.split(",")): (float(point[k]), *map(float, np.ravel(ci[k]))) for k in pairs}


def random_return(env_id: str, episodes: int = 100, seed: int = 0) -> float:
    """The mean return of a uniformly random policy over `episodes` episodes (episode k reset with seed + k)."""
    import gymnasium as gym

    env = gym.make(env_id)
    env.action_space.seed(seed)
    total = 0.0
    for k in range(episodes):
        env.reset(seed=seed + k)
        done = False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total += float(reward)
            done = terminated or truncated
    env.close()
    return total / episodes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random", nargs="+", metavar="ENV", required=True, help="measure a random policy's score")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for env in args.random:
        print(f"{env}: {random_return(env, args.episodes, args.seed):.1f} (mean of {args.episodes} episodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
