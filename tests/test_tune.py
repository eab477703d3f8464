"""python -m benchmarks tune: a small real study end to end, its resume, a pruned trial, and bad input refused."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import one_error_line

from benchmarks import tune
from benchmarks.events import load_scalars
from benchmarks.sweep import load_suite

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parents[1]

# ppo with a fixed, quick ending: the tuner's space may fix a flag by giving it one choice
SPACE = """
learning-rate = { distribution = "float", low = 1e-4, high = 3e-3, log = true }
clip-eps = { distribution = "float", low = 0.1, high = 0.3 }
eval-episodes = { distribution = "categorical", choices = [0] }
"""


def parse(*args) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tune.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["tune", *args])


def study_of(out: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def statuses(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("trials/*/status/*.json")}


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(SPACE)
    return path


def test_a_study_end_to_end_then_resumed(tmp_path, capsys, space):
    """2 trials x (CartPole-v1, Acrobot-v1): the scores are the normalised means of the last 100 episodes read back
    from the runs' event files; the same command with --trials 3 adds one trial and runs nothing else again."""
    out = tmp_path / "study"
    args = ["--algo", "ppo", "--env", "CartPole-v1", "--env", "Acrobot-v1", "--total-timesteps", "4096"]
    args += ["--seeds", "1", "--study", "tiny", "--space", str(space), "--out", str(out), "--workers", "4"]
    assert tune.main(parse(*args, "--trials", "2")) == 0
    printed = capsys.readouterr().out
    study = study_of(out, "tiny")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        # what ran is what the trial says: its rounded values on the command line of each of its runs
        runs = {k: s for k, s in statuses(out).items() if k.endswith(f"__t{t.number:04d}")}
        assert len(runs) == 2 and all(s["returncode"] == 0 for s in runs.values())
        for s in runs.values():
            cmd = s["command"]
            assert float(cmd[cmd.index("--learning-rate") + 1]) == t.user_attrs["values"]["learning_rate"]
            assert (
                abs(t.user_attrs["values"]["learning_rate"] - t.params["learning_rate"])
                < 1e-3 * t.params["learning_rate"]
            )
            assert cmd[cmd.index("--total-timesteps") + 1] == "4096"
        # the score, by hand: per env the mean of the last 100 training episodes, (x - random) / (best - random)
        by_hand = []
        for env, (random, best) in (("CartPole-v1", (23.7, 500.0)), ("Acrobot-v1", (-497.1, -69.1))):
            run_dir = next((out / "trials" / f"{t.number:04d}" / "runs").glob(f"ppo__{env}__1__*/*"))
            returns = load_scalars(run_dir)["charts/episodic_return"][2]
            assert t.user_attrs["returns"][env] == [pytest.approx(returns[-100:].mean(), rel=1e-6)]
            by_hand.append((returns[-100:].mean() - random) / (best - random))
        assert t.value == pytest.approx(sum(by_hand) / 2, rel=1e-6)
        # the learning curve was reported to the pruner as the runs went (at least at the end of the budget)
        assert 4096 in t.intermediate_values
    summary = (out / "summary.md").read_text()
    best = max(study.trials, key=lambda t: t.value)
    assert f"Best: trial {best.number}" in summary
    lr = best.user_attrs["values"]["learning_rate"]
    assert f"--learning-rate {lr}" in printed and f"learning_rate={lr!r}" in summary  # command and PRESETS
    suite = load_suite(str(out / "best.toml"))  # the best setting as a suite the harness runs again
    assert suite.flags == {"ppo": best.user_attrs["flags"]} and suite.envs == ["CartPole-v1", "Acrobot-v1"]
    for png in ("history.png", "importance.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    first = {k: s["start_time"] for k, s in statuses(out).items()}

    assert tune.main(parse(*args, "--trials", "3")) == 0
    study = study_of(out, "tiny")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    again = statuses(out)
    assert {k: again[k]["start_time"] for k in first} == first  # the finished runs were not run again
    assert sorted(set(again) - set(first)) == ["ppo__Acrobot-v1__1__t0002", "ppo__CartPole-v1__1__t0002"]

    assert tune.main(parse(*args, "--trials", "3")) == 0  # the study holds 3: nothing to start
    assert len(study_of(out, "tiny").trials) == 3 and statuses(out) == again


def test_a_pruned_trial_is_stopped_and_recorded_as_pruned(tmp_path, space):
    """A pruner that stops every trial at its first report: the script gets SIGINT while it trains, writes its
    checkpoint and exits 130; the trial is PRUNED with the score it reported."""
    out = tmp_path / "pruned"
    args = parse("--algo", "ppo", "--env", "CartPole-v1", "--total-timesteps", "400000", "--seeds", "1", "--trials",
                 "1", "--study", "p", "--space", str(space), "--out", str(out))  # fmt: skip
    t0 = time.time()
    rc = tune.main(args, pruner=optuna.pruners.ThresholdPruner(lower=1e9), poll=0.5)
    assert rc == 0
    (trial,) = study_of(out, "p").trials
    assert trial.state.name == "PRUNED"
    assert min(trial.intermediate_values) == 20000  # reported from the first twentieth of the budget on
    (status,) = statuses(out).values()
    assert status["returncode"] == 130
    assert trial.user_attrs["exit_codes"] == {"ppo__CartPole-v1__1__t0000": 130}
    (ckpt,) = (out / "trials" / "0000" / "runs").rglob("*.pt")
    step = torch.load(ckpt, weights_only=True)["global_step"]
    assert max(trial.intermediate_values) <= step < 400000  # stopped at the first check, long before the end
    assert "interrupted at global step" in Path(status["log"]).read_text()
    assert time.time() - t0 < 60  # 400k steps would take minutes


def test_ctrl_c_stops_and_the_same_command_resumes(tmp_path, space):
    """SIGINT to the tuner: its running script checkpoints and exits 130, the trial stays RUNNING, `tune` exits 130;
    the same command resumes the trial's run from its checkpoint and completes it."""
    out = tmp_path / "stopped"
    args = ["--algo", "ppo", "--env", "CartPole-v1", "--total-timesteps", "30000", "--seeds", "1", "--trials", "1"]
    args += ["--study", "s", "--space", str(space), "--out", str(out), "--pruner", "none"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "tune", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list(out.glob("trials/0000/runs/*/*/events.out.tfevents.*")) or not any(
        p.stat().st_size > 4000 for p in out.glob("trials/0000/runs/*/*/events.out.tfevents.*")
    ):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    (trial,) = study_of(out, "s").trials
    assert trial.state.name == "RUNNING"
    # the summary of what finished so far: nothing, with the trial still running
    assert "1 trials (1 running)" in (out / "summary.md").read_text() and "summary.md" in stderr
    (status,) = statuses(out).values()
    assert status["returncode"] == 130
    (ckpt,) = out.glob("trials/0000/runs/*/*/ppo.pt")
    stopped_at = torch.load(ckpt, weights_only=True)["global_step"]
    assert stopped_at < 30000

    assert tune.main(parse(*args)) == 0  # the same command (here in this process)
    (trial,) = study_of(out, "s").trials
    assert trial.state.name == "COMPLETE"
    (status,) = statuses(out).values()
    assert status["returncode"] == 0 and status["attempts"][-1]["resumed_from"] == str(ckpt)
    assert torch.load(ckpt, weights_only=True)["global_step"] >= 29000


@pytest.mark.parametrize(
    "text, says",
    [
        ('max-kl = { distribution = "float", low = 0.01, high = 0.1 }', "ppo.py has no flag --max-kl"),
        ('learning-rate = { distribution = "float", low = 0.01, high = 0.001 }', "low (0.01) must be below high"),
        ('learning-rate = { distribution = "float", low = 0.0, high = 0.1, log = true }', "a log scale needs low > 0"),
        ('learning-rate = { distribution = "normal", low = 0.0, high = 0.1 }', "distribution must be one of"),
        ('learning-rate = { distribution = "float", low = "a", high = 0.1 }', "'low' must be a number"),
        ('learning-rate = { distribution = "float", low = 0.001 }', "missing 'high'"),
        ('learning-rate = { distribution = "float", lo = 0.001, high = 0.1 }', "unknown key 'lo'"),
        ('update-epochs = { distribution = "float", low = 1.0, high = 10.0 }', "--update-epochs takes"),
        ('loss = { distribution = "categorical", choices = ["clip", "trust"] }', "--loss takes"),
        ('loss = { distribution = "categorical", choices = [] }', "choices must be a non-empty list"),
        ('seed = { distribution = "int", low = 1, high = 9 }', "'seed' is set by the tuner"),
        ("learning-rate = [0.001, 0.1", "not a readable TOML file"),
        ("", "no flag to search"),
    ],
)
def test_a_bad_space_is_one_error_line(tmp_path, capsys, text, says):
    path = tmp_path / "space.toml"
    path.write_text(text)
    out = tmp_path / "out"
    args = parse("--algo", "ppo", "--env", "CartPole-v1", "--total-timesteps", "1000", "--seeds", "1", "--trials",
                 "1", "--study", "x", "--space", str(path), "--out", str(out))  # fmt: skip
    one_error_line(tune.main(args), capsys.readouterr().err, says)
    assert not out.exists()


@pytest.mark.parametrize(
    "change, says",
    [
        ({"--algo": ["sac"]}, "no algorithm script sac"),
        ({"--env": ["NoSuchEnv-v0"]}, "unknown env id 'NoSuchEnv-v0'"),
        ({"--env": ["CartPole-v1", "InvertedPendulum-v5"]}, "no reference scores for InvertedPendulum-v5"),
        ({"--storage": ["sqlite:////no/such/dir/study.db"]}, "cannot open the storage"),
        ({"--storage": ["nonsense://x"]}, "cannot open the storage"),
        ({"--seeds": ["1", "1"]}, "--seeds lists 1 twice"),
        ({"--trials": ["0"]}, "--trials must be >= 1"),
    ],
)
def test_bad_arguments_are_one_error_line(tmp_path, capsys, space, change, says):
    out = tmp_path / "out"
    words = {"--algo": ["ppo"], "--env": ["CartPole-v1"], "--total-timesteps": ["1000"], "--seeds": ["1"],
             "--trials": ["1"], "--study": ["x"], "--space": [str(space)], "--out": [str(out)]}  # fmt: skip
    args = parse(*(w for k, v in {**words, **change}.items() for w in (k, *v)))
    one_error_line(tune.main(args), capsys.readouterr().err, says)
    assert not out.exists()


def test_a_study_made_with_other_settings_is_refused(tmp_path, capsys, space):
    out = tmp_path / "out"
    common = ["--algo", "ppo", "--env", "CartPole-v1", "--seeds", "1", "--trials", "1", "--study", "x"]
    common += ["--space", str(space), "--out", str(out)]
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="x", storage=storage, direction="maximize")
    study.set_user_attr("settings", {"algo": "ppo"})
    assert tune.main(parse(*common, "--total-timesteps", "1000", "--storage", storage)) == 2
    err = capsys.readouterr().err
    assert "study 'x'" in err and "other settings (envs, seeds, total_timesteps, space)" in err
    assert not out.exists()


def test_every_shipped_space_fits_its_script():
    """benchmarks/spaces/ALGO.toml for each script, and each checks against that script's Args."""
    from benchmarks.sweep import algorithm_scripts

    assert sorted(p.stem for p in tune.SPACES.glob("*.toml")) == algorithm_scripts()
    for algo in algorithm_scripts():
        path = tune.SPACES / f"{algo}.toml"
        params = tune.check_space(algo, tune.load_space(path), path)
        assert params, algo


def test_flags_and_normalisation():
    # a plain bool is a switch (--x / --no-x); an optional bool takes a value, as tyro reads them
    p = [tune.Param(name, None, switch=name == "norm_adv") for name in ("max_kl", "norm_adv", "norm_obs", "optimizer")]
    values = {"max_kl": tune.rounded(0.0213456789), "norm_adv": False, "norm_obs": True, "optimizer": "adam"}
    words = ["--max-kl", "0.02135", "--no-norm-adv", "--norm-obs", "True", "--optimizer", "adam"]
    assert tune.flags_of(p, values) == words
    assert tune.flags_of(p[1:2], {"norm_adv": True}) == ["--norm-adv"]
    # one env: the raw mean over seeds; several: each env's mean normalised by (random, best), then averaged
    assert tune.trial_score({"Hopper-v5": [1000.0, 2000.0]}) == 1500.0
    hopper = (1500.0 - 18.9) / (3754.2 - 18.9)
    walker = (3000.0 - 1.8) / (4933.1 - 1.8)
    assert tune.trial_score({"Hopper-v5": [1000.0, 2000.0], "Walker2d-v5": [3000.0]}) == pytest.approx(
        (hopper + walker) / 2
    )
    assert tune.final_mean([10, 20, 30], [1.0, 2.0, 6.0], upto=25) == 1.5
    assert tune.final_mean(list(range(150)), [0.0] * 50 + [1.0] * 100) == 1.0  # the last 100 only
    assert tune.final_mean([10], [1.0], upto=5) is None


def test_the_summary_shows_paths_below_the_working_directory_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tune.shown(tmp_path / "benchmarks" / "out" / "best.toml") == "benchmarks/out/best.toml"
    assert tune.shown(tmp_path.parent / "elsewhere" / "best.toml") == str(tmp_path.parent / "elsewhere" / "best.toml")
