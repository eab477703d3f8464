"""a2c.py's speed machinery changes nothing it computes: --compile's gradient step is the eager one step by step
(losses, the gradient norm, parameters and the optimiser's state, RMSprop and Adam), a compiled run trains and
checkpoints the optimiser's state, and the state kept once per log period is what a fault leaves."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import scalars, train

import plumbing
from cleanrl_style import a2c


@pytest.mark.parametrize(
    "discrete,flags",
    [
        (False, dict(optimizer="rmsprop", ent_coef=0.01, max_grad_norm=0.05)),  # the bound clips every step
        (True, dict(optimizer="adam", max_grad_norm=0.0)),  # no clipping
    ],
    ids=["gaussian-rmsprop-clipped", "categorical-adam"],
)
def test_compiled_step_is_the_eager_step(discrete, flags):
    """gradient_step with --compile moves the parameters and the optimiser's state as a2c_loss, backward,
    clip_grad_norm_ and torch's RMSprop or Adam do, step after step with an annealed learning rate; it returns the
    same losses and pi's parameters before the step, and clip_grad_norm_'s norm; a non-finite loss changes nothing."""
    torch.manual_seed(0)
    args = a2c.resolve_args(a2c.Args(env="CartPole-v1" if discrete else "Pendulum-v1", **flags), discrete)
    obs_dim, act_dim, B = 5, 3 if discrete else 2, 40
    eager = a2c.Agent(obs_dim, act_dim, discrete)
    compiled = copy.deepcopy(eager)
    opt_eager = a2c.make_optimizer(eager.parameters(), args.optimizer, 3e-3)
    opt_compiled = a2c.make_optimizer(compiled.parameters(), args.optimizer, 3e-3)
    step = a2c.gradient_step(compiled, opt_compiled, dataclasses.replace(args, compile=True))
    for i in range(12):
        for opt in (opt_eager, opt_compiled):
            opt.param_groups[0]["lr"] = 3e-3 * (1.0 - i / 12)
        s = torch.randn(B, obs_dim)
        a = torch.randint(0, act_dim, (B,)).float() if discrete else torch.randn(B, act_dim)
        A_hat, G = torch.randn(B), 5.0 * torch.randn(B)
        if i == 9:  # a non-finite loss
            G = torch.full((B,), float("nan"))
        out = a2c.a2c_loss(eager, args, s, a, A_hat, G)
        before = [p.detach().clone() for p in compiled.parameters()]
        out_compiled = step(s, a, A_hat, G)
        for x, y in zip(out_compiled, out):  # to float32 rounding (the value loss is ~10 here)
            torch.testing.assert_close(x, y.detach(), atol=1e-5, rtol=1e-4, equal_nan=True)
        if i == 9:
            for p, p_before in zip(compiled.parameters(), before):
                torch.testing.assert_close(p.detach(), p_before, rtol=0, atol=0)
            continue
        opt_eager.zero_grad()
        out[0].backward()
        norm = torch.nn.utils.clip_grad_norm_(eager.parameters(), args.max_grad_norm or float("inf"))
        assert args.max_grad_norm == 0 or norm > args.max_grad_norm  # the bound was active
        torch.testing.assert_close(step.grad_norm, norm, atol=1e-5, rtol=1e-5)
        opt_eager.step()
        for p, q in zip(compiled.parameters(), eager.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), atol=3e-6, rtol=1e-5)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        state_c, state_e = opt_compiled.state[p], opt_eager.state[q]
        assert state_c.keys() == state_e.keys()
        torch.testing.assert_close(state_c["step"], state_e["step"], rtol=0, atol=0)
        assert state_c["step"].item() == 11  # the non-finite step was not counted
        for k in state_c.keys() - {"step"}:
            torch.testing.assert_close(state_c[k], state_e[k], atol=1e-7, rtol=1e-4)


def test_a_compiled_run_trains_and_checkpoints_the_optimisers_state(tmp):
    """a2c.py --compile on InvertedPendulum-v5 with SB3's rollout (1 env x 5 steps, RMSprop): it logs finite losses
    and gradient norms, and the checkpoint's RMSprop state counts every update."""
    flags = ["--env", "InvertedPendulum-v5", "--num-envs", "1", "--num-steps", "5", "--optimizer", "rmsprop"]
    run = train("a2c", tmp, *flags, "--total-timesteps", "3000", "--eval-episodes", "0", "--compile")
    tags = scalars(run)
    for tag in ["losses/policy_loss", "losses/value_loss", "losses/grad_norm"]:
        assert len(tags[tag]) == 3 and np.isfinite([v for _, v in tags[tag]]).all(), tag
    ckpt = torch.load(run / "a2c.pt", weights_only=True)
    assert ckpt["iteration"] == 600 and ckpt["global_step"] == 3000
    for state in ckpt["optimizer"]["state"].values():
        assert state["step"].item() == 600 and state["square_avg"].abs().sum() > 0


def test_a_fault_leaves_the_state_kept_at_the_last_log(tmp, monkeypatch):
    """The last good state is kept once per log period (200 updates of 5 steps here): parameters that turn
    non-finite in update 250 stop the run with the state of update 200 in the checkpoint, finite."""
    agents, calls = [], []

    class RecordingAgent(a2c.Agent):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            agents.append(self)

    real_gae = a2c.gae

    def gae(*args):
        calls.append(1)
        if len(calls) == 250:  # as if update 250's step had gone to inf
            with torch.no_grad():
                agents[-1].critic[0].weight[0, 0] = float("inf")
        return real_gae(*args)

    monkeypatch.setattr(a2c, "Agent", RecordingAgent)
    monkeypatch.setattr(a2c, "gae", gae)
    monkeypatch.chdir(tmp)
    args = a2c.Args(env="CartPole-v1", num_envs=1, num_steps=5, total_timesteps=5000, run_dir=str(tmp / "runs"),
                    progress=False, eval_episodes=0)  # fmt: skip
    assert a2c.main(args) == 1
    (path,) = (tmp / "runs").glob("*/a2c.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["iteration"] == 200 and ckpt["global_step"] == 1000
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert plumbing.all_finite(agents[-1]) is False
