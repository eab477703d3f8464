"""trpo.py: the Fisher-vector product against the explicit Hessian, conjugate gradient, the step-size rule, the
line search and its guards, then real runs (learning, determinism, faults)."""

import dataclasses
import math
import sys
import time

import numpy as np
import pytest
import torch
from conftest import run_script, scalars, train
from torch.func import functional_call

import plumbing
from cleanrl_style import trpo


def tiny_policy(discrete: bool, seed: int = 0, n: int = 16):
    """A tiny agent in float64, a batch of states, actions sampled from pi_old and random advantages."""
    torch.manual_seed(seed)
    agent = trpo.Agent(obs_dim=3, act_dim=2, discrete=discrete, hidden=4).double()
    with torch.no_grad():  # a policy far from uniform, so that the Fisher is not a trivial one
        agent.actor[-1].weight.normal_(0.0, 1.0)
        if not discrete:
            agent.actor_logstd.copy_(torch.tensor([-0.3, 0.4]))
    obs = torch.randn(n, 3, dtype=torch.float64)
    a, _, _ = trpo.RolloutPolicy(agent, np.random.default_rng(seed)).act(obs.numpy())
    a = torch.as_tensor(a)
    with torch.no_grad():
        head_old = agent.head(obs)
        logp_old = agent.log_prob(head_old, a)  # in float64, as the update recomputes it
    A_hat = torch.randn(n, dtype=torch.float64)
    return agent, obs, a, logp_old, A_hat, head_old


def explicit_kl_hessian(agent, obs, head_old) -> torch.Tensor:
    """The Hessian of KL_bar(theta) = mean_s KL(pi_old || pi_theta) with respect to the flat theta, by
    torch.autograd.functional.hessian (the matrix F that the Fisher-vector product must never form)."""
    names = [n for n, _ in agent.actor.named_parameters()]
    params = trpo.actor_parameters(agent)
    shapes = [p.shape for p in params]
    theta_old = trpo.get_flat(params)

    def mean_kl(theta):
        pieces, i = [], 0
        for shape in shapes:
            pieces.append(theta[i : i + math.prod(shape)].view(shape))
            i += math.prod(shape)
        out = functional_call(agent.actor, dict(zip(names, pieces)), (obs,))
        head = out if agent.discrete else torch.cat([out, pieces[-1].expand_as(out)], -1)
        return agent.kl(head_old, head).mean()

    return torch.autograd.functional.hessian(mean_kl, theta_old)


@pytest.mark.parametrize("discrete", [True, False])
def test_fisher_vector_product_equals_the_explicit_kl_hessian(discrete):
    agent, obs, a, logp_old, A_hat, head_old = tiny_policy(discrete)
    params = trpo.actor_parameters(agent)
    H = explicit_kl_hessian(agent, obs, head_old)
    n = sum(p.numel() for p in params)
    assert H.shape == (n, n) and H.abs().max() > 1e-2  # a Fisher worth comparing against
    _, kl = trpo.make_policy_fn(agent, obs, a, logp_old, A_hat, head_old)()
    for damping in [0.0, 0.1]:
        Fv = trpo.fisher_vector_product(kl, params, damping)
        for k in range(3):
            v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
            torch.testing.assert_close(Fv(v), H @ v + damping * v, rtol=1e-9, atol=1e-12)
    # a Fisher is symmetric positive semi-definite
    torch.testing.assert_close(H, H.T)
    assert torch.linalg.eigvalsh(H).min() > -1e-10


def test_conjugate_gradient_solves_a_random_spd_system_in_n_steps():
    g = torch.Generator().manual_seed(0)
    n = 30
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    A = Q @ torch.diag(torch.logspace(0, 1, n, dtype=torch.float64)) @ Q.T  # eigenvalues 1 .. 10
    b = torch.randn(n, dtype=torch.float64, generator=g)
    calls = []

    def Avp(v):
        calls.append(1)
        return A @ v

    x = trpo.conjugate_gradient(Avp, b, iters=n, tol=1e-24)
    assert len(calls) <= n
    assert (A @ x - b).norm() / b.norm() < 1e-8
    # fewer iterations: a worse but finite answer, still a descent on the quadratic model
    x5 = trpo.conjugate_gradient(lambda v: A @ v, b, iters=5)
    assert (A @ x5 - b).norm() > 1e-3 and b @ x5 > 0


@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_conjugate_gradient_stops_at_non_positive_curvature(bad):
    b = torch.ones(4, dtype=torch.float64)
    x = trpo.conjugate_gradient(lambda v: -v if bad == "negative" else v * math.nan, b, iters=10)
    assert torch.equal(x, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("discrete", [True, False])
def test_full_step_meets_the_kl_model_exactly(discrete):
    """1/2 Delta^T F Delta = delta for Delta = sqrt(2 delta / x^T F x) x, with the damped F the step used (checked
    with the explicit Hessian too), and the true KL at the full step is close to delta for a small delta."""
    agent, obs, a, logp_old, A_hat, head_old = tiny_policy(discrete, seed=1, n=32)
    params = trpo.actor_parameters(agent)
    policy_fn = trpo.make_policy_fn(agent, obs, a, logp_old, A_hat, head_old)
    L, kl = policy_fn()
    g = trpo.flat(torch.autograd.grad(L, params, retain_graph=True))
    damping, max_kl = 0.01, 1e-4
    Fv = trpo.fisher_vector_product(kl, params, damping)
    x = trpo.conjugate_gradient(Fv, g, iters=50)
    Delta = trpo.full_step(x, (x @ Fv(x)).item(), max_kl)
    assert 0.5 * (Delta @ Fv(Delta)).item() == pytest.approx(max_kl, rel=1e-9)
    H = explicit_kl_hessian(agent, obs, head_old)
    assert 0.5 * (Delta @ (H @ Delta + damping * Delta)).item() == pytest.approx(max_kl, rel=1e-9)
    theta_old = trpo.get_flat(params)
    trpo.set_flat(params, theta_old + Delta)
    with torch.no_grad():
        true_kl = policy_fn()[1].item()
    assert 0.5 * max_kl < true_kl < max_kl * 1.2  # damping makes the model a little conservative


def test_full_step_refuses_a_bad_curvature():
    x = torch.ones(3)
    for xFx in [-1.0, 0.0, math.nan, math.inf]:
        assert trpo.full_step(x, xFx, 0.01) is None, xFx
    assert trpo.full_step(torch.tensor([1.0, math.nan]), 1.0, 0.01) is None
    assert trpo.full_step(x, 2.0, 0.01) is not None


@pytest.mark.parametrize("fault", ["negative", "nan", "zero"])
def test_a_faulty_fisher_vector_product_leaves_theta_old_exactly(fault, monkeypatch):
    """sb3-contrib #38: a negative or NaN x^T F x from a faulty Fisher-vector product must not become a step."""
    agent, obs, a, logp_old, A_hat, head_old = tiny_policy(False, seed=2)
    params = trpo.actor_parameters(agent)
    before = [p.detach().clone() for p in params]
    factor = {"negative": -1.0, "nan": math.nan, "zero": 0.0}[fault]
    monkeypatch.setattr(trpo, "fisher_vector_product", lambda kl, params, damping: lambda v: factor * v)
    args = trpo.Args(
        max_kl=0.01, cg_iters=10, cg_damping=0.1, line_search_steps=10, line_search_shrink=0.8, accept_ratio=0.1
    )
    step = trpo.trpo_step(params, trpo.make_policy_fn(agent, obs, a, logp_old, A_hat, head_old), args)
    assert step["j"] == -1 and step["step_norm"] == 0.0
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def linear_problem(theta_old, direction, curvature=1.0):
    """A parameter vector with L(theta) = direction . theta and KL_bar(theta) = curvature/2 |theta - theta_old|^2."""
    param = torch.nn.Parameter(theta_old.clone())

    def evaluate_fn():
        with torch.no_grad():
            return (direction @ param).item(), (0.5 * curvature * (param - theta_old).pow(2).sum()).item()

    return [param], evaluate_fn


def test_line_search_backtracks_when_the_full_step_breaks_the_kl():
    """The full step has KL = 4 delta: zeta^j must shrink it to KL <= delta, zeta^(2j) <= 1/4, so j = 4 for
    zeta = 0.8 (0.8^3 = 0.512 is not enough, 0.8^4 = 0.41 is)."""
    theta_old = torch.tensor([0.3, -1.2], dtype=torch.float64)
    direction = torch.tensor([1.0, 2.0], dtype=torch.float64)
    max_kl = 0.01
    params, evaluate_fn = linear_problem(theta_old, direction)
    Delta = direction / direction.norm() * math.sqrt(2 * 4 * max_kl)  # 1/2 |Delta|^2 = 4 delta
    L_old = evaluate_fn()[0]
    expected = (direction @ Delta).item()
    j, L, kl = trpo.line_search(params, theta_old, Delta, expected, evaluate_fn, L_old, max_kl, 10, 0.8, 0.1)
    assert j == 4 and kl <= max_kl and L_old < L
    torch.testing.assert_close(params[0].detach(), theta_old + 0.8**4 * Delta, rtol=0, atol=1e-15)
    # a full step inside the region is taken whole
    j, _, _ = trpo.line_search(params, theta_old, Delta / 2, expected / 2, evaluate_fn, L_old, max_kl, 10, 0.8, 0.1)
    assert j == 0


def test_line_search_never_takes_a_worse_surrogate_and_restores_theta_old_exactly():
    """Tianshou PR #1287: after a failed search the parameters must be theta_old, bit for bit, not the last try."""
    theta_old = torch.tensor([0.1234567, -2.7182818, 3.1415926], dtype=torch.float32)
    direction = torch.tensor([1.0, -1.0, 0.5])
    params, evaluate_fn = linear_problem(theta_old, -direction)  # L falls along Delta, however short the step
    Delta = 0.01 * direction
    j, L, kl = trpo.line_search(params, theta_old, Delta, 1.0, evaluate_fn, evaluate_fn()[0], 0.01, 10, 0.8, 0.0)
    assert (j, kl) == (-1, 0.0)
    assert torch.equal(params[0].detach(), theta_old)


def test_line_search_checks_the_expected_improvement_ratio():
    """A step that improves L by 1% of what the linear model g . Delta promised is refused at accept ratio 0.1."""
    theta_old = torch.zeros(2, dtype=torch.float64)
    direction = torch.tensor([1.0, 0.0], dtype=torch.float64)
    params, evaluate_fn = linear_problem(theta_old, direction)
    Delta = torch.tensor([0.01, 0.0], dtype=torch.float64)
    expected = 100 * (direction @ Delta).item()  # the model promised 100 times the real improvement
    j, _, _ = trpo.line_search(params, theta_old, Delta, expected, evaluate_fn, 0.0, 1.0, 10, 0.8, 0.1)
    assert j == -1 and torch.equal(params[0].detach(), theta_old)
    j, _, _ = trpo.line_search(params, theta_old, Delta, expected, evaluate_fn, 0.0, 1.0, 10, 0.8, 0.0)
    assert j == 0


def test_line_search_never_accepts_a_nan():
    theta_old = torch.zeros(2, dtype=torch.float64)
    params = [torch.nn.Parameter(theta_old.clone())]
    for bad in [(math.nan, 0.0), (1.0, math.nan), (math.inf, 0.0), (1.0, math.inf)]:
        j, _, _ = trpo.line_search(params, theta_old, torch.ones(2, dtype=torch.float64), 1.0, lambda b=bad: b, 0.0,
                                   0.01, 5, 0.8, 0.0)  # fmt: skip
        assert j == -1, bad
        assert torch.equal(params[0].detach(), theta_old)


def test_line_search_on_random_problems_never_breaks_its_conditions():
    """Random non-linear L and KL: an accepted step has KL <= delta, L improved and the ratio met; a rejected one
    leaves theta_old exactly."""
    rng = np.random.default_rng(0)
    accepted = rejected = 0
    for _ in range(300):
        n = int(rng.integers(1, 6))
        theta_old = torch.tensor(rng.normal(size=n))
        w, c = torch.tensor(rng.normal(size=n)), torch.tensor(rng.uniform(0.1, 5.0, size=n))
        param = torch.nn.Parameter(theta_old.clone())

        def evaluate_fn(param=param, theta_old=theta_old, w=w, c=c):
            with torch.no_grad():
                u = param - theta_old
                return torch.sin(w @ param).item(), (0.5 * (c * u**2).sum() + (u**3).sum().abs()).item()

        Delta = torch.tensor(rng.normal(size=n)) * rng.uniform(0.01, 1.0)
        max_kl, ratio = float(rng.uniform(1e-3, 0.1)), float(rng.choice([0.0, 0.1, 0.5]))
        L_old = evaluate_fn()[0]
        expected = abs((w * math.cos((w @ theta_old).item()) @ Delta).item())
        j, L, kl = trpo.line_search([param], theta_old, Delta, expected, evaluate_fn, L_old, max_kl, 10, 0.8, ratio)
        if j >= 0:
            accepted += 1
            assert (L, kl) == evaluate_fn()
            assert kl <= max_kl and L_old < L and L - L_old >= ratio * 0.8**j * expected
        else:
            rejected += 1
            assert torch.equal(param.detach(), theta_old)
    assert accepted > 30 and rejected > 30  # both branches were tried


# ---- real runs ----


def best_mean_of_20(returns: list) -> float:
    r = np.array([v for _, v in returns])
    assert len(r) >= 20, f"only {len(r)} episodes"
    return max(r[i - 20 : i].mean() for i in range(20, len(r) + 1))


def check_trust_region_log(tags: dict, max_kl: float) -> None:
    """Every update stayed inside the trust region, improved L where it stepped, and kept theta_old where not."""
    steps = dict(tags["charts/line_search_steps"])
    kl = dict(tags["losses/kl_exact"])
    gain = dict(tags["losses/surrogate_improvement"])
    expected = dict(tags["losses/expected_improvement"])
    norm = dict(tags["charts/step_norm"])
    assert len(steps) == len(kl) > 0
    assert sum(j >= 0 for j in steps.values()) >= 0.8 * len(steps)  # most updates found a step
    for s, j in steps.items():
        assert kl[s] <= max_kl, (s, kl[s])  # the exact KL over the batch, measured after the update
        if j >= 0:
            assert gain[s] > 0 and gain[s] >= 0.1 * expected[s] * (1 - 1e-6) and norm[s] > 0
        else:
            assert gain[s] == 0 and kl[s] == 0 and norm[s] == 0


def test_cartpole_is_solved(tmp):
    run = train("trpo", tmp, "--total-timesteps", "40960", "--seed", "1")
    tags = scalars(run)
    assert best_mean_of_20(tags["charts/episodic_return"]) >= 475
    assert tags["eval/episodic_return"][-1][1] >= 475
    check_trust_region_log(tags, 0.01)


@pytest.mark.parametrize(
    "flags", [["--total-timesteps", "61440"], ["--preset", "rl-zoo3", "--total-timesteps", "40960"]]
)
def test_inverted_pendulum_learns_to_balance(flags, tmp):
    run = train("trpo", tmp, "--env", "InvertedPendulum-v5", *flags, "--seed", "1")
    tags = scalars(run)
    assert best_mean_of_20(tags["charts/episodic_return"]) >= 950
    assert tags["eval/episodic_return"][-1][1] >= 950
    check_trust_region_log(tags, 0.01)


@pytest.mark.parametrize("env", ["CartPole-v1", "InvertedPendulum-v5"])
def test_same_seed_same_returns(env, tmp):
    flags = ["--env", env, "--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "256", "--eval-episodes", "0"]
    logs, models = [], []
    for _ in range(2):
        run = train("trpo", tmp, *flags)
        logs.append(scalars(run)["charts/episodic_return"])
        models.append(torch.load(run / "trpo.pt", weights_only=True)["model"])
        time.sleep(1.0)  # a different unix time, so a different run directory
    assert len(logs[0]) > 5
    assert logs[0] == logs[1]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-kl", "0"],
        ["--line-search-shrink", "1.0"],
        ["--line-search-steps", "0"],
        ["--cg-iters", "0"],
        ["--cg-damping", "-0.1"],
        ["--accept-ratio", "1.0"],
        ["--critic-minibatch-size", "100"],  # does not divide the batch of 4 * 128
        ["--critic-minibatch-size", "-3"],
        ["--critic-epochs", "0"],
    ],
)
def test_bad_hyperparameters_exit_2_before_writing(flags, tmp, monkeypatch, capsys):
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(sys, "argv", ["trpo.py", *flags, "--run-dir", str(tmp / "runs"), "--no-progress"])
    assert plumbing.cli(trpo.Args, trpo.main, trpo.__doc__) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and flags[0] in lines[0], lines
    assert list(tmp.iterdir()) == []


def test_bad_hyperparameters_exit_2_as_a_process(tmp):
    proc = run_script("trpo", "--max-kl", "-1", "--run-dir", str(tmp / "runs"), cwd=tmp, check=False)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "--max-kl" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("broken", ["surrogate", "value_loss"])
def test_nan_loss_stops_with_last_good_checkpoint(broken, tmp, monkeypatch, capsys):
    """A NaN in the third update (the surrogate at theta_old, or a critic mini-batch loss) stops the run with
    exit status 1 and the checkpoint of the state after the second update."""
    calls = []
    real = getattr(trpo, broken)
    d = trpo.DISCRETE_DEFAULTS  # L with a graph once per update; the value loss once per critic mini-batch
    batches = d["num_envs"] * d["num_steps"] // d["critic_minibatch_size"]
    per_update = 1 if broken == "surrogate" else d["critic_epochs"] * batches

    def breaks_in_the_third_update(*a, **k):
        out = real(*a, **k)
        if torch.is_grad_enabled():  # not the line search's evaluations
            calls.append(1)
        return out * math.nan if len(calls) > 2 * per_update else out

    monkeypatch.setattr(trpo, broken, breaks_in_the_third_update)
    monkeypatch.chdir(tmp)
    args = trpo.Args(total_timesteps=5120, run_dir=str(tmp / "runs"), progress=False, eval_episodes=0)
    assert trpo.main(args) == 1
    assert "non-finite" in capsys.readouterr().err
    (run,) = list((tmp / "runs").iterdir())
    ckpt = torch.load(run / "trpo.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert ckpt["global_step"] == 1024 and ckpt["iteration"] == 2


def test_resume_continues_the_run_and_the_critic_optimiser(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    common = dict(run_dir=str(tmp / "runs"), progress=False, eval_episodes=0)
    assert trpo.main(trpo.Args(total_timesteps=1024, **common)) == 0
    (run,) = list((tmp / "runs").iterdir())
    ckpt_path = run / "trpo.pt"
    adam_steps = torch.load(ckpt_path, weights_only=True)["optimizer"]["state"][0]["step"].item()
    d = trpo.DISCRETE_DEFAULTS
    per_update = d["critic_epochs"] * d["num_envs"] * d["num_steps"] // d["critic_minibatch_size"]
    assert adam_steps == 2 * per_update
    assert trpo.main(trpo.Args(resume=str(ckpt_path), total_timesteps=2048, **common)) == 0
    resumed = torch.load(ckpt_path, weights_only=True)
    assert resumed["global_step"] == 2048 and resumed["iteration"] == 4
    assert resumed["optimizer"]["state"][0]["step"].item() == 4 * per_update
    assert [s for s, _ in scalars(run)["charts/SPS"]] == [512, 1024, 1536, 2048]


def test_preset_fills_the_flags_not_given(tmp):
    """--preset NAME: its settings where no flag was given, a given flag wins, the other flags keep their defaults;
    the run prints which values came from the preset and starts the Gaussian's log sigma at the preset's value."""
    for name, preset in trpo.PRESETS.items():
        resolved = trpo.resolve_args(trpo.Args(env="Hopper-v5", preset=name, num_steps=512), discrete=False)
        expected = dict(preset, num_steps=512)
        if expected["critic_minibatch_size"] == 0:  # 0: the whole batch of N*T steps
            expected["critic_minibatch_size"] = resolved.num_envs * 512
        assert {k: getattr(resolved, k) for k in expected} == expected
        assert resolved.critic_epochs == trpo.CONTINUOUS_DEFAULTS["critic_epochs"]
    plain = trpo.resolve_args(trpo.Args(env="Hopper-v5", critic_minibatch_size=0), discrete=False)
    assert plain.critic_minibatch_size == plain.num_envs * plain.num_steps == 1024
    assert trpo.resolve_args(trpo.Args(env="Hopper-v5"), discrete=False) == plain
    plain = dataclasses.replace(plain, critic_minibatch_size=0)
    assert any(all(getattr(plain, k) == v for k, v in p.items()) for p in trpo.PRESETS.values())  # one is the default
    halved = trpo.resolve_args(trpo.Args(env="Hopper-v5", num_steps=32), discrete=False)  # the whole batch follows
    assert halved.critic_minibatch_size == 512
    zoo = trpo.resolve_args(trpo.Args(env="Hopper-v5", preset="rl-zoo3"), discrete=False)
    assert (zoo.num_envs, zoo.num_steps, zoo.critic_minibatch_size, zoo.anneal_lr, zoo.log_std_init) == (
        2, 1024, 128, False, 0.0,
    )  # fmt: skip
    proc = run_script(
        "trpo", "--env", "Pendulum-v1", "--preset", "tianshou", "--num-envs", "2", "--num-steps", "32",
        "--critic-minibatch-size", "64", "--max-kl", "1e-10", "--total-timesteps", "64", "--eval-episodes", "0",
        "--no-progress", "--run-dir", str(tmp / "runs"), cwd=tmp,
    )  # fmt: skip
    first = proc.stdout.splitlines()[0]
    assert "num_envs=2 (flag)" in first and "anneal_lr=True (preset)" in first and "log_std_init=-0.5 (preset)" in first
    (run,) = list((tmp / "runs").iterdir())
    ckpt = torch.load(run / "trpo.pt", weights_only=False)
    torch.testing.assert_close(ckpt["model"]["actor_logstd"], torch.full((1,), -0.5), atol=1e-3, rtol=0)
    assert ckpt["args"]["preset"] == "tianshou" and ckpt["args"]["anneal_lr"] is True
