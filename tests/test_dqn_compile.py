"""dqn.py's speed machinery changes nothing it computes: --compile's gradient step is the eager one, step by step
(loss, Q, the |delta| PER's priorities follow, parameters and Adam's state), the numpy greedy action is torch's, the
same seeds solve CartPole-v1 with and without --compile, and every variant still combines with it."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import run_script, scalars, train

import plumbing
from cleanrl_style import dqn

# ---- the compiled step against the eager one ----


def random_batch(B: int, obs_dim: int, n_actions: int, prioritized: bool) -> tuple:
    s, s_next = torch.randn(B, obs_dim), torch.randn(B, obs_dim)
    a, G = torch.randint(0, n_actions, (B,)), 3.0 * torch.randn(B)  # |delta| above and below Huber's 1
    discount = 0.99 * (torch.rand(B) > 0.2).float()  # some terminations
    w = torch.rand(B) if prioritized else None
    return s, a, G, s_next, discount, w


@pytest.mark.parametrize(
    "flags",
    [
        dict(),  # the defaults: Double DQN, Huber loss, gradient norm 10
        dict(double=False, dueling=True, prioritized=True, loss="mse", max_grad_norm=0.5),  # the bound clips
    ],
    ids=["defaults", "dueling-per-mse-clipped"],
)
def test_compiled_step_is_the_eager_step(flags):
    """gradient_step with --compile moves theta and Adam's state as q_loss, backward, clip_grad_norm_ and torch's fused
    Adam do, step after step with an annealed learning rate and theta^- copied from theta on the way; it returns
    the same loss, mean Q and delta = y - Q(s, a) (PER's priorities); a non-finite loss changes nothing."""
    torch.manual_seed(0)
    args = dqn.Args(**flags)
    obs_dim, n_actions, B = 4, 3, 64
    eager = dqn.QNetwork(obs_dim, n_actions, 32, args.dueling)
    eager_target = copy.deepcopy(eager)
    with torch.no_grad():  # theta^- not theta, so that the test tells which network y comes from
        for p in eager_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    compiled, compiled_target = copy.deepcopy(eager), copy.deepcopy(eager_target)
    opt_eager = torch.optim.Adam(eager.parameters(), lr=1e-2, fused=True)
    opt_compiled = torch.optim.Adam(compiled.parameters(), lr=1e-2, fused=True)
    step = dqn.gradient_step(compiled, compiled_target, opt_compiled, dataclasses.replace(args, compile=True))
    clipped = 0
    for i in range(16):
        for opt in (opt_eager, opt_compiled):
            opt.param_groups[0]["lr"] = 1e-2 * (1.0 - i / 16)
        batch = random_batch(B, obs_dim, n_actions, args.prioritized)
        if i == 12:  # a non-finite loss
            batch = batch[:2] + (torch.full((B,), float("nan")),) + batch[3:]
        out = dqn.q_loss(eager, eager_target, args, *batch)
        before = [p.detach().clone() for p in compiled.parameters()]
        out_compiled = step(*batch)
        for x, y in zip(out_compiled, out):
            torch.testing.assert_close(x, y.detach(), atol=1e-5, rtol=1e-5, equal_nan=True)
        if i == 12:
            assert not torch.isfinite(out[0])
            for p, p_before in zip(compiled.parameters(), before):
                torch.testing.assert_close(p.detach(), p_before, rtol=0, atol=0)
            continue
        opt_eager.zero_grad()
        out[0].backward()
        norm = torch.nn.utils.clip_grad_norm_(eager.parameters(), args.max_grad_norm)
        clipped += int(norm > args.max_grad_norm)
        torch.testing.assert_close(step.grad_norm, norm, atol=1e-5, rtol=1e-5)
        opt_eager.step()
        for p, q in zip(compiled.parameters(), eager.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), atol=2e-6, rtol=1e-5)
        if i == 6:  # theta^- <- theta in both: the compiled program reads theta^- as it is now
            dqn.update_target(eager_target, eager, 1.0)
            dqn.update_target(compiled_target, compiled, 1.0)
    if args.max_grad_norm < 1:
        assert clipped >= 10  # the bound was active
    for p, q in zip(compiled.parameters(), eager.parameters()):
        state_c, state_e = opt_compiled.state[p], opt_eager.state[q]
        torch.testing.assert_close(state_c["step"], state_e["step"], rtol=0, atol=0)
        assert state_c["step"].item() == 15  # the non-finite step was not counted
        torch.testing.assert_close(state_c["exp_avg"], state_e["exp_avg"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(state_c["exp_avg_sq"], state_e["exp_avg_sq"], atol=1e-8, rtol=1e-4)


# ---- acting: the numpy greedy action ----


@pytest.mark.parametrize("dueling", [False, True])
def test_numpy_greedy_action_is_torchs(dueling):
    """GreedyQ's Q-values agree with the network's to float32 rounding and its argmax is torch's, for one
    observation and for a batch; it reads theta's own memory, so it follows an optimiser step with no refresh."""
    torch.manual_seed(1)
    q_network = dqn.QNetwork(6, 5, 64, dueling)
    greedy = plumbing.GreedyQ(q_network)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=0.05)
    rng = np.random.default_rng(0)
    for _ in range(3):
        s = rng.normal(size=(4000, 6)).astype(np.float32) * 2
        with torch.no_grad():
            Q = q_network(torch.as_tensor(s))
        np.testing.assert_allclose(greedy.q_values(s), Q.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(greedy(s), Q.argmax(-1).numpy())
        for row in s[:200]:  # one observation, as the loop acts
            with torch.no_grad():
                expected = q_network(torch.as_tensor(row[None])).argmax(-1).item()
            assert greedy(row[None])[0] == expected
        optimizer.zero_grad()
        q_network(torch.as_tensor(s[:64])).pow(2).mean().backward()
        optimizer.step()  # in place: the numpy views see the new theta


def test_numpy_acting_leaves_the_run_as_torch_acting_left_it(tmp, monkeypatch):
    """The same seed gives the same logged returns and losses whether the greedy action comes from GreedyQ or from
    the network in torch (what dqn.py did before): acting in numpy changed no run."""

    class TorchGreedy:
        def __init__(self, q_network):
            self.q_network = q_network

        def __call__(self, s):
            with torch.inference_mode():
                return self.q_network(torch.as_tensor(s, dtype=torch.float32)).argmax(-1).numpy()

    logs = []
    for k, greedy in enumerate([plumbing.GreedyQ, TorchGreedy]):
        monkeypatch.setattr(plumbing, "GreedyQ", greedy)
        args = dqn.Args(run_dir=str(tmp / str(k)), progress=False, total_timesteps=2500, learning_starts=500,
                        eval_episodes=0, save_model=False, epsilon_decay_fraction=0.1)  # fmt: skip
        assert dqn.main(args) == 0
        logs.append(scalars(next((tmp / str(k)).iterdir())))
    for tag in ["charts/episodic_return", "losses/td_loss", "losses/q_values"]:
        assert logs[0][tag] == logs[1][tag], tag
    assert len(logs[0]["charts/episodic_return"]) > 20


# ---- runs ----


def solved_at(run) -> "int | None":
    """The first step at which the mean of the last 20 training episodes reaches 475."""
    steps, R = zip(*scalars(run)["charts/episodic_return"])
    R = np.array(R)
    return next((steps[i] for i in range(19, len(R)) if R[i - 19 : i + 1].mean() >= 475), None)


# Seed 5 at the defaults (30,000 steps: the budget sets the epsilon and learning-rate schedules, so it stays): solved
# at 23,891 steps eager and at 20,736 with --compile (benchmarks/results/speed/dqn_cartpole_solve.md); each run about
# 30 s on 2 cores when they are free, --compile's compilation included.
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
def test_the_same_seed_solves_cartpole_with_and_without_compile(compile_, tmp):
    flags = ["--seed", "5", "--eval-episodes", "0"] + (["--compile"] if compile_ else [])
    at = solved_at(train("dqn", tmp, *flags, timeout=1800))
    assert at is not None and at <= 30_000, at


def test_every_variant_combines_with_compile_and_adams_state_is_checkpointed(tmp):
    """--prioritized --dueling --n-step 3 --double --compile: the run logs finite losses and PER's beta_p; the
    checkpoint holds Adam's state with its step count equal to the gradient steps, and --resume with --compile
    goes on counting from it."""
    flags = ["--prioritized", "--dueling", "--n-step", "3", "--double", "--compile", "--learning-starts", "500"]
    run = train("dqn", tmp, *flags, "--total-timesteps", "1500", "--eval-episodes", "0")
    tags = scalars(run)
    assert np.isfinite([v for _, v in tags["losses/td_loss"]]).all() and "charts/per_beta" in tags
    ckpt = torch.load(run / "dqn.pt", weights_only=True)
    steps = [s["step"].item() for s in ckpt["optimizer"]["state"].values()]
    assert ckpt["grad_steps"] == 1000 and steps == [1000.0] * len(steps)
    assert all(s["exp_avg_sq"].abs().sum() > 0 for s in ckpt["optimizer"]["state"].values())
    run_script("dqn", "--no-progress", "--resume", str(run / "dqn.pt"), "--total-timesteps", "2000",
               "--eval-episodes", "0", "--compile", cwd=tmp)  # fmt: skip
    ckpt = torch.load(run / "dqn.pt", weights_only=True)
    steps = [s["step"].item() for s in ckpt["optimizer"]["state"].values()]
    assert ckpt["grad_steps"] == 1500 and steps == [1500.0] * len(steps)
