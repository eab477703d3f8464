"""Variants in a suite: one algorithm with a set of flags under a name of its own, run, resumed and reported like any
algorithm (issue 23). One real sweep (two variants of ppo.py on CartPole-v1, 256 steps), and bad definitions."""

import json

import pytest
from conftest import TRAINING_SCRIPTS, one_error_line, run_main

from benchmarks.events import load_scalars
from benchmarks.sweep import load_suite

VARIANTS = """
algos = ["ppo-k3", "ppo-k1"]
envs = ["CartPole-v1"]
seeds = [1, 2]
total_timesteps = 256

[flags]
"ppo" = ["--eval-episodes", "1", "--num-envs", "2"]
"ppo-k3:CartPole-v1" = ["--kl-target", "0.02"]

[variants]
"ppo-k1" = { algo = "ppo", flags = ["--loss", "kl", "--kl-estimator", "k1", "--num-envs", "4"] }
"ppo-k3" = { algo = "ppo", flags = ["--loss", "kl", "--kl-estimator", "k3"] }
"""


def row(report, first_cell):
    return next(line for line in report.splitlines() if line.startswith(f"| {first_cell} |"))


def test_variants_run_resume_and_report_as_algorithms(tmp, capsys):
    suite = tmp / "variants.toml"
    suite.write_text(VARIANTS)
    out = tmp / "out"
    rc, stdout, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(out), "--workers", "2")
    assert rc == 0, err
    saved = {}
    for name, estimator, envs, kl_target in [("ppo-k1", "k1", 4, 0.01), ("ppo-k3", "k3", 2, 0.02)]:
        for seed in [1, 2]:
            key = f"{name}__CartPole-v1__{seed}"
            status = json.loads((out / "status" / f"{key}.json").read_text())
            assert status["algo"] == name and status["variant_of"] == "ppo" and status["returncode"] == 0
            # its own run directory, and the script's run (TensorBoard's name) carries the variant's name
            (run,) = (out / "runs" / key).iterdir()
            assert run.name.startswith(f"CartPole-v1__{name}__{seed}__"), run.name
            assert (run / f"{name}.pt").is_file()
            # the variant's flags after the algorithm's (its --num-envs wins), and its per-env [flags] entry
            args = json.loads((run / "args.json").read_text())
            assert (args["loss"], args["kl_estimator"], args["num_envs"]) == ("kl", estimator, envs)
            assert (args["eval_episodes"], args["kl_target"], args["exp_name"]) == (1, kl_target, name)
            saved[key] = load_scalars(run)["eval/episodic_return"][2][-1]

    # reported as two algorithms: a row and a curve each, with the numbers of their own event files
    report = (out / "report.md").read_text()
    for name in ["ppo-k1", "ppo-k3"]:
        cells = [c.strip() for c in row(report, name).split("|")[1:-1]]
        evals = [saved[f"{name}__CartPole-v1__{s}"] for s in (1, 2)]
        assert cells[1] == "2" and float(cells[3].split()[0]) == pytest.approx(sum(evals) / 2, abs=0.051), cells
    assert report.index("| ppo-k3 |") < report.index("| ppo-k1 |")  # in the suite's order
    curves = (out / "curves.csv").read_text().splitlines()
    assert {line.split(",")[1] for line in curves[1:]} == {"ppo-k1", "ppo-k3"}

    # resumed like any algorithm: a run whose machine stopped (its status still says running) goes on from its
    # checkpoint, named after the variant, with the same command; the finished ones are left alone
    key = "ppo-k3__CartPole-v1__2"
    status = json.loads((out / "status" / f"{key}.json").read_text())
    (out / "status" / f"{key}.json").write_text(json.dumps(dict(status, returncode=None)))
    rc, stdout, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(out), "--no-report")
    assert rc == 0 and "4 runs, 3 already finished, 1 to run (1 from a checkpoint" in stdout, stdout + err
    again = json.loads((out / "status" / f"{key}.json").read_text())
    assert again["returncode"] == 0 and again["attempts"][-1]["resumed_from"].endswith("/ppo-k3.pt")
    assert again["command"][: len(status["command"])] == status["command"]
    assert not (out / "superseded").exists() and len(list((out / "runs" / key).iterdir())) == 1


BASE = 'algos = ["ppo"]\nenvs = ["CartPole-v1"]\nseeds = [1]\n[variants]\n'


@pytest.mark.parametrize(
    "variant, says",
    [
        ('"" = { algo = "ppo" }', "a variant has an empty name"),
        ('"ppo" = { algo = "ppo", flags = ["--loss", "kl"] }', "variant 'ppo' has the name of a script or peer"),
        ('"sb3-ppo" = { algo = "ppo" }', "variant 'sb3-ppo' has the name of a script or peer"),
        ('"x" = { algo = "no_such_algo" }', "no algorithm script for no_such_algo"),
        ('"x" = { algo = "sb3-foo" }', "unknown peer sb3-foo"),
        ('"x" = { flags = ["--loss", "kl"] }', "variant 'x': 'algo' must be the name of a script or peer"),
        ('"x" = { algo = "ppo", flags = "--loss kl" }', "variant 'x': 'flags' must be a list of strings"),
        ('"x" = { algo = "ppo", flags = ["--num-envs", 4] }', "variant 'x': 'flags' must be a list of strings"),
        ('"x" = { algo = "ppo", flag = ["--loss", "kl"] }', "variant 'x': unknown key 'flag'"),
        ('"x/y" = { algo = "ppo" }', "variant name 'x/y' must be letters, digits"),
        ('"../x" = { algo = "ppo" }', "variant name '../x' must be letters, digits"),
        ('"a b" = { algo = "ppo" }', "variant name 'a b' must be letters, digits"),
        ('"ppo__x" = { algo = "ppo" }', "variant name 'ppo__x' must be letters, digits"),
        ('"x" = { algo = "y" }\n"y" = { algo = "ppo" }', "variant 'x': its algo 'y' is a variant"),
        ('"x" = "ppo"', "'variants' must be a table of tables"),
    ],
)
def test_a_bad_variant_is_one_error_line(tmp, capsys, variant, says):
    suite = tmp / "bad.toml"
    suite.write_text(BASE + variant + "\n")
    rc, stdout, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(tmp / "o"))
    one_error_line(rc, err, str(suite), says)
    assert not (tmp / "o").exists()


def test_a_name_in_algos_that_is_no_algorithm_nor_variant_is_refused(tmp, capsys):
    suite = tmp / "s.toml"
    suite.write_text(BASE.replace('["ppo"]', '["ppo", "ppo-kl"]') + '"ppo-k1" = { algo = "ppo" }\n')
    rc, stdout, err = run_main(capsys, "run", "--suite", str(suite), "--out", str(tmp / "o"))
    one_error_line(rc, err, "no algorithm script for ppo-kl")
    assert not (tmp / "o").exists()
    # --algos may name a variant the suite defines, and it is checked as one
    rc, stdout, err = run_main(capsys, "run", "--suite", str(suite), "--algos", "ppo-k2", "--out", str(tmp / "o"))
    one_error_line(rc, err, "no algorithm script for ppo-k2")
    assert not (tmp / "o").exists()


def test_the_suites_variants_are_well_formed():
    """Every suite of benchmarks/suites/ loads, and each variant it lists runs a script or a peer."""
    from benchmarks.sweep import SUITES

    for path in sorted(SUITES.glob("*.toml")):
        suite = load_suite(path.stem)
        for name in suite.algos:
            base = suite.base(name)
            assert base in TRAINING_SCRIPTS or base.startswith("sb3-"), (path, name)
