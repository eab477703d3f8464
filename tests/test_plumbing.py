"""The shared module of the scripts, cleanrl_style/plumbing.py, tested directly: it exists once (no script carries
a copy of it, and it imports no script), and its pieces do what the scripts rely on."""

import ast
import copy
import dataclasses
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SCRIPTS, TRAINING_SCRIPTS, run_script

import plumbing
from cleanrl_style import ppo

# Names a script defines for itself by nature, though plumbing has a function of the same name for other uses.
ALGORITHM_OWN = {"main", "evaluate", "make_env"}


def top_level_names(path: Path) -> set:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("script", TRAINING_SCRIPTS + ["evaluate"])
def test_no_script_carries_a_copy_of_the_plumbing(script):
    copied = (top_level_names(SCRIPTS / f"{script}.py") & top_level_names(SCRIPTS / "plumbing.py")) - ALGORITHM_OWN
    assert not copied, f"{script}.py defines {sorted(copied)}, which plumbing.py has: use plumbing's"


def test_the_copy_check_catches_a_copy(tmp):
    source = (SCRIPTS / "ppo.py").read_text() + "\n\ndef save_checkpoint(path, ckpt):\n    pass\n"
    (tmp / "ppo.py").write_text(source)
    assert "save_checkpoint" in top_level_names(tmp / "ppo.py") & top_level_names(SCRIPTS / "plumbing.py")


def test_plumbing_imports_no_script():
    tree = ast.parse((SCRIPTS / "plumbing.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & set(TRAINING_SCRIPTS + ["evaluate", "cleanrl_style"]), imported


# ---- the command line ----


def test_whole_numbers_written_as_floats_are_read_as_numbers():
    argv = ["--total-timesteps", "1e5", "--learning-rate", "1e-3", "--checkpoint-every=2.5e4", "--seed", "3"]
    assert plumbing.whole_numbers(ppo.Args, argv) == [
        "--total-timesteps", "100000", "--learning-rate", "1e-3", "--checkpoint-every=25000", "--seed", "3",
    ]  # fmt: skip
    with pytest.raises(plumbing.UsageError, match="--total-timesteps takes a whole number, got 1.5e-3"):
        plumbing.whole_numbers(ppo.Args, ["--total-timesteps", "1.5e-3"])
    assert plumbing.whole_numbers(ppo.Args, ["--env", "1e5"]) == ["--env", "1e5"]  # a string flag is left alone


def test_total_timesteps_1e5_runs_and_1_5_is_one_error_line(tmp):
    proc = run_script("ppo", "--total-timesteps", "2.56e2", "--eval-episodes", "0", "--no-progress",
                      "--run-dir", str(tmp / "runs"), cwd=tmp)  # fmt: skip
    assert "256 steps" in proc.stdout
    proc = run_script("ppo", "--total-timesteps", "1.5", "--run-dir", str(tmp / "runs2"), cwd=tmp, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --total-timesteps takes a whole number, got 1.5"
    ]
    assert not (tmp / "runs2").exists()


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_help_gives_one_default_per_flag(script, tmp):
    out = run_script(script, "--help", cwd=tmp, check=False).stdout
    out = re.sub(r"[│╭╮╰╯─]", " ", out)
    flags = re.split(r"\n\s+(?=--|-h)", out)
    for text in flags:
        assert len(re.findall(r"\(default", text)) <= 1, text
    assert "(default: None)" not in out


def test_exp_name_defaults_to_the_script_file_name():
    assert plumbing.with_exp_name(ppo.Args()).exp_name == "ppo"
    assert plumbing.with_exp_name(ppo.Args(exp_name="mine")).exp_name == "mine"


def test_env_spaces_names_what_the_algorithm_needs():
    with pytest.raises(plumbing.UsageError, match="dqn needs Box observations and Discrete actions; Pendulum-v1"):
        plumbing.env_spaces("Pendulum-v1", "dqn", obs=gym.spaces.Box, act=gym.spaces.Discrete)
    with pytest.raises(plumbing.UsageError, match="unknown environment id 'NoSuchEnv-v0'"):
        plumbing.env_spaces("NoSuchEnv-v0")
    obs, act = plumbing.env_spaces("CartPole-v1", "ppo", obs=gym.spaces.Box, act=(gym.spaces.Discrete, gym.spaces.Box))
    assert obs.shape == (4,) and act.n == 2


def test_require_raises_the_first_failing_message():
    plumbing.require([(True, "a"), (True, "b")])
    with pytest.raises(plumbing.UsageError, match="^b$"):
        plumbing.require([(True, "a"), (False, "b"), (False, "c")])


# ---- statistics and the reward scale ----


def test_reward_scaler_is_the_running_std_of_the_discounted_return():
    """Against the computation written out: the discounted return per env, its variance over everything seen, the
    reward divided by its std and clipped, the return reset at an episode's end."""
    rng = np.random.default_rng(0)
    scaler = plumbing.RewardScaler(3, 0.9, plumbing.RunningMeanStd(()))
    discounted, seen = np.zeros(3), []
    for _ in range(50):
        r, done = rng.normal(5.0, 20.0, 3), rng.random(3) < 0.1
        discounted = 0.9 * discounted + r
        seen.append(discounted.copy())
        all_seen = np.concatenate(seen)
        var = (all_seen.var() * len(all_seen) + 1e-4 * 1.0 + 1e-4 * all_seen.mean() ** 2) / (len(all_seen) + 1e-4)
        expected = np.clip(r / np.sqrt(var + 1e-8), -10, 10)
        np.testing.assert_allclose(scaler(r, done), expected, rtol=1e-6)
        discounted[done] = 0.0


def test_checkpoint_due_at_each_multiple_crossed():
    args = ppo.Args(checkpoint_every=1000)
    assert plumbing.checkpoint_due(args, 1024, 768) and not plumbing.checkpoint_due(args, 1792, 1024)
    assert not plumbing.checkpoint_due(dataclasses.replace(args, checkpoint_every=0), 5000, 0)
    assert not plumbing.checkpoint_due(dataclasses.replace(args, save_model=False), 5000, 0)


# ---- evaluation ----


def test_play_episodes_seeds_episode_k_with_seed_plus_k():
    def act(s):
        return int(s[2] > 0)  # push toward the pole's lean

    returns = plumbing.play_episodes(gym.make("CartPole-v1"), act, 3, seed=7)
    for k, G in enumerate(returns):
        env = gym.make("CartPole-v1")
        s, _ = env.reset(seed=7 + k)
        total, done = 0.0, False
        while not done:
            s, r, term, trunc, _ = env.step(act(s))
            total, done = total + r, term or trunc
        assert total == G
    assert len(set(returns.tolist())) > 1  # different seeds, different episodes


def test_monitor_says_when_no_episode_has_finished(tmp):
    writer = torch.utils.tensorboard.SummaryWriter(str(tmp))
    monitor = plumbing.Monitor(writer, ppo.Args(total_timesteps=100, progress=False), 0)
    monitor.update(10)
    assert monitor.bar.postfix == "no episode finished yet"
    monitor.episode(12.0, 12, 20)
    monitor.update(20)
    assert monitor.bar.postfix == "return 12.0"
    monitor.close()
    writer.close()


# ---- the run's life: faults keep the last good state ----


def test_a_fault_after_an_update_keeps_the_state_of_the_last_good_update(tmp):
    args = plumbing.with_exp_name(ppo.Args(run_dir=str(tmp / "runs"), progress=False, total_timesteps=100))
    args = dataclasses.replace(args, eval_episodes=0)
    weights = torch.zeros(3)
    step = 0

    def state():
        return {"global_step": step, "model": {"w": weights}}

    run = plumbing.Run(args, "ppo", None, None, lambda *a: np.zeros(1), state)
    with run.fault_guard():
        while run.training():
            step += 10
            weights += 1.0
            run.update_done(step, {"losses/x": 1.0})
            if step == 30:
                weights.fill_(float("nan"))
                raise plumbing.RunFault("non-finite parameters")
    assert run.end() == 1
    ckpt = torch.load(run.ckpt_path, weights_only=True)
    assert ckpt["global_step"] == 30 and torch.equal(ckpt["model"]["w"], torch.full((3,), 3.0))
    assert ckpt["format_version"] == plumbing.CHECKPOINT_FORMAT and ckpt["algorithm"] == "ppo"


# ---- the small math several scripts hold by design (each where a reader needs it) stays one text ----

SHARED_BY_DESIGN = {
    "Agent": ["ppo", "a2c", "trpo", "reinforce", "grpo"],
    "mlp": ["ppo", "a2c", "trpo", "reinforce", "grpo"],
    "layer_init": ["ppo", "a2c", "trpo", "reinforce", "grpo"],
    "gae": ["ppo", "a2c", "trpo"],
    "linear_schedule": ["q_learning", "sarsa", "dqn"],
    "epsilon_greedy": ["q_learning", "sarsa"],
    "td_update": ["q_learning", "sarsa"],
}


def definition(script: str, name: str) -> str:
    source = (SCRIPTS / f"{script}.py").read_text()
    node = next(n for n in ast.parse(source).body if getattr(n, "name", None) == name)
    return ast.get_source_segment(source, node)


@pytest.mark.parametrize("name", sorted(SHARED_BY_DESIGN))
def test_small_math_held_by_several_scripts_is_the_same_text_in_each(name):
    first, *others = SHARED_BY_DESIGN[name]
    for script in others:
        assert definition(script, name) == definition(first, name), f"{name}: {script}.py differs from {first}.py"


# ---- the gradient step every script with --compile calls: eager, torch's own loop ----


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05], ids=["no-bound", "clipped"])
def test_the_eager_gradient_step_is_torchs_loop_and_skips_what_it_must(max_grad_norm):
    """gradient_step(compile=False) moves the parameters and Adam's state bit for bit as zero_grad, backward,
    clip_grad_norm_ (when the bound is > 0) and step written by hand; it returns loss_fn's outputs and the norm
    before clipping; a non-finite loss or a refused mini-batch (accept false) leaves the parameters and Adam's state
    as they were."""
    torch.manual_seed(0)
    mine = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    hand = copy.deepcopy(mine)
    opt_mine, opt_hand = (torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (mine, hand))

    def loss_fn(module, x, y):
        loss = ((module(x).squeeze(-1) - y) ** 2).mean()
        return loss, loss.detach() * 2  # a diagnostic beside L

    accept = lambda out: ~(out[1] >= 50.0)  # noqa: E731 (a NaN diagnostic passes: only the finite check stops it)
    step = plumbing.make_gradient_step(mine, opt_mine, loss_fn, max_grad_norm, accept=accept)
    assert isinstance(step, plumbing.EagerStep)
    skipped = 0
    for i in range(12):
        x, y = torch.randn(16, 4), 3.0 * torch.randn(16)
        if i == 4:
            y = torch.full((16,), float("nan"))  # a non-finite loss
        if i == 8:
            y = y + 100.0  # a refused mini-batch: 2 L >= 50
        before = [p.detach().clone() for p in mine.parameters()], copy.deepcopy(opt_mine.state_dict()["state"])
        outputs = step(x, y)
        loss = loss_fn(hand, x, y)[0]
        torch.testing.assert_close(outputs[0], loss, rtol=0, atol=0, equal_nan=True)
        if i in (4, 8):
            skipped += 1
            for p, p_before in zip(mine.parameters(), before[0]):
                assert torch.equal(p.detach(), p_before)
            for k, st in opt_mine.state_dict()["state"].items():
                assert all(torch.equal(v, before[1][k][name]) for name, v in st.items())
            continue
        opt_hand.zero_grad()
        loss.backward()
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(hand.parameters(), max_grad_norm)
            assert norm > max_grad_norm  # the bound was active
            assert torch.equal(step.grad_norm, norm)
        opt_hand.step()
        for p, q in zip(mine.parameters(), hand.parameters()):
            assert torch.equal(p.detach(), q.detach())
    assert skipped == 2


# ---- the compiled gradient step: the optimisers it writes out ----


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.01),
        lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.RMSprop(p, lr=0.1, centered=True),
    ],
    ids=["sgd", "adam-weight-decay", "rmsprop-momentum", "rmsprop-centred"],
)
def test_compiled_step_refuses_an_optimiser_it_does_not_write_out(make):
    """compiled_step writes Adam and RMSprop out by hand: any other rule, or an option the hand-written rule leaves
    out, is refused at once rather than stepped with the wrong arithmetic."""
    module = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="compiled_step writes out"):
        plumbing.compiled_step(module, make(module.parameters()), lambda m, x: (m(x).sum(),), 1.0)
