"""grpo.py: group advantages (outcome and process, with and without std), groups of episodes from one start state on
real envs, the loss by hand (seq-mean and token-mean, Clip-Higher, GSPO's ratio, the KL to pi_ref and its placement),
the KL estimators against the exact KL, dynamic sampling, and runs (learning on CartPole-v1, determinism, a ppo.py
checkpoint as pi_ref)."""

import math
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SCRIPTS, run_script, scalars, script_env, train

import plumbing
from cleanrl_style import grpo

# ---- group advantages ----


def test_outcome_advantages_by_hand_with_and_without_std():
    R = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])  # two groups of G = 4
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # group 1: mean 3, Bessel-corrected std
    A_hat = grpo.outcome_advantages(R, std_norm=True)
    torch.testing.assert_close(A_hat[0], torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-8))
    torch.testing.assert_close(A_hat[1], torch.zeros(4))  # all equal: no signal, and no division by zero
    torch.testing.assert_close(grpo.outcome_advantages(R, std_norm=False)[0], torch.tensor([-2.0, -1.0, 0.0, 3.0]))


def test_process_advantages_by_hand():
    r = torch.tensor([[[1.0, 2.0, 7.0], [0.0, 1.0, 3.0]]])  # one group, G = 2; episode 1 has 2 steps (7 is padding)
    mask = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]])
    mean = 7 / 5  # over the group's five rewards 1, 2, 0, 1, 3
    dev = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]) - mean
    std = math.sqrt(((dev**2)[[0, 0, 1, 1, 1], [0, 1, 0, 1, 2]]).sum() / 4)
    for std_norm, scale in [(True, std), (False, 1.0)]:
        rt = dev / scale
        for gamma in [1.0, 0.5]:
            g2 = gamma**2
            want = [[rt[0, 0] + gamma * rt[0, 1], rt[0, 1], 0.0],
                    [rt[1, 0] + gamma * rt[1, 1] + g2 * rt[1, 2], rt[1, 1] + gamma * rt[1, 2], rt[1, 2]]]  # fmt: skip
            got = grpo.process_advantages(r, mask, gamma, std_norm)[0]
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_outcome_return_is_the_discounted_sum_from_the_start():
    r = torch.tensor([[1.0, 2.0, 4.0]])
    assert grpo.reward_to_go(r, 0.5)[0, 0].item() == 1 + 0.5 * 2 + 0.25 * 4


# ---- groups of episodes ----


def test_members_share_their_first_observation_and_groups_differ_on_a_real_env():
    P, G = 3, 4
    envs = [plumbing.make_env("CartPole-v1", i, False, "")() for i in range(P * G)]
    rng = np.random.default_rng(0)

    def act(s):
        a = rng.integers(0, 2, len(s))
        return a, a

    groups = grpo.sample_groups(envs, act, grpo.group_seeds(7, 0, P), G)
    assert len(groups) == P and all(len(g) == G for g in groups)
    first = [[ep.obs[0] for ep in g] for g in groups]
    for k in range(P):
        for i in range(G):
            np.testing.assert_array_equal(first[k][i], first[k][0])
        assert len({len(ep.rewards) for ep in groups[k]}) > 1  # the policy's sampling makes the members differ
    assert not np.allclose(first[0][0], first[1][0]) and not np.allclose(first[1][0], first[2][0])
    for env in envs:
        env.close()


class FixedLengthEnv(gym.Env):
    """An episode of `length` steps; stepping it after its end, or resetting it twice, fails the test."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length: int):
        self.length, self.t, self.resets = length, 0, 0

    def reset(self, seed=None, options=None):
        self.t, self.resets = 0, self.resets + 1
        return np.array([seed], np.float32), {}

    def step(self, a):
        assert self.t < self.length, "stepped after the episode ended"
        self.t += 1
        return np.array([100.0 + self.t], np.float32), 1.0, self.t == self.length, False, {}


def test_an_ended_member_waits_for_its_group():
    lengths = [1, 3, 2, 5]
    envs = [FixedLengthEnv(n) for n in lengths]
    groups = grpo.sample_groups(envs, lambda s: (np.zeros(len(s)), np.zeros(len(s), int)), np.array([11, 22]), G=2)
    assert [len(ep.rewards) for g in groups for ep in g] == lengths
    assert [env.resets for env in envs] == [1, 1, 1, 1]  # no autoreset into a new start state
    assert [g[0].obs[0, 0] for g in groups] == [11, 22] and groups[1][1].obs[1:, 0].tolist() == [101, 102, 103, 104]
    torch.testing.assert_close(grpo.group_returns(groups), torch.tensor([[1.0, 3.0], [2.0, 5.0]]))


def test_group_seeds_are_new_for_each_group_sampled():
    assert grpo.group_seeds(1, 0, 3).tolist() == [1, 2, 3]
    assert grpo.group_seeds(1, 3, 3).tolist() == [4, 5, 6]


# ---- dynamic sampling ----


def test_dynamic_sampling_drops_exactly_the_zero_std_groups():
    R = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0001], [2.0, 1.0, 1.0]])
    assert grpo.has_signal(R).tolist() == [False, True, False, True, True]


# ---- the loss by hand ----


class LogProbStub:
    """A 'policy' whose head is the state and whose log pi(a|s) is the head: the test chooses log pi_theta."""

    def head(self, s):
        return s

    def log_prob(self, head, a):
        return head

    def entropy(self, head):
        return torch.zeros_like(head)


def loss_args(**kw):
    base = dict(ratio="token", clip_eps=0.2, clip_eps_high=0.2, loss_agg="seq-mean", kl_estimator="k3",
                kl_in="loss", beta=0.0, ent_coef=0.0)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


# two episodes of lengths 2 and 3: rho = (1.5, 0.5 | 1.1, 0.7, 1.0), A_hat = +1 and -1; the third step of
# episode 1 is padding with a huge ratio that must count nowhere
RHO = torch.tensor([[1.5, 0.5, 50.0], [1.1, 0.7, 1.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
A_HAT = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])


def loss_of(args, logp_ref=None):
    logp = RHO.log().requires_grad_()
    logp_ref = torch.zeros_like(logp) if logp_ref is None else logp_ref
    return grpo.minibatch_loss(LogProbStub(), args, logp, None, MASK, torch.zeros_like(logp), logp_ref, A_HAT)


def test_seq_mean_and_token_mean_on_episodes_of_unequal_length():
    # per-step terms: min(1.5, 1.2) = 1.2, min(0.5, 0.8) = 0.5 | -1.1, min(-0.7, -0.8) = -0.8, -1.0
    _, pg_seq, _, clipfrac = loss_of(loss_args())
    assert pg_seq.item() == pytest.approx(-((1.2 + 0.5) / 2 + (-1.1 - 0.8 - 1.0) / 3) / 2)
    _, pg_tok, _, _ = loss_of(loss_args(loss_agg="token-mean"))
    assert pg_tok.item() == pytest.approx(-(1.2 + 0.5 - 1.1 - 0.8 - 1.0) / 5)
    assert clipfrac.tolist() == pytest.approx([1 / 5, 1 / 5])  # low: rho 0.7 with A < 0; high: rho 1.5 with A > 0


def test_clip_higher_bounds_are_asymmetric():
    rho, A_hat = torch.tensor([1.5, 0.5, 1.25, 0.75]), torch.tensor([1.0, -1.0, 1.0, -1.0])
    got = grpo.clip_objective(rho, A_hat, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(got, torch.tensor([1.28, -0.8, 1.25, -0.8]))
    torch.testing.assert_close(grpo.clip_objective(rho, A_hat, 0.2, 0.2), torch.tensor([1.2, -0.8, 1.2, -0.8]))
    _, pg, _, clipfrac = loss_of(loss_args(clip_eps_high=0.6))  # 1.5 is now inside the bound
    assert pg.item() == pytest.approx(-((1.5 + 0.5) / 2 + (-1.1 - 0.8 - 1.0) / 3) / 2)
    assert clipfrac.tolist() == pytest.approx([1 / 5, 0.0])


def test_gspo_sequence_ratio():
    log_rho = torch.tensor([[0.1, 0.3, 5.0]])
    assert grpo.sequence_log_ratio(log_rho, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(0.2)
    s1, s2 = math.sqrt(1.5 * 0.5), (1.1 * 0.7 * 1.0) ** (1 / 3)  # 0.866 and 0.917: inside [0.8, 1.2]
    _, pg, _, _ = loss_of(loss_args(ratio="sequence"))
    assert pg.item() == pytest.approx(-(s1 - s2) / 2, rel=1e-5)
    _, pg, _, _ = loss_of(loss_args(ratio="sequence", clip_eps=0.05))  # s1 clipped to 0.95 (A > 0: min keeps s1)
    assert pg.item() == pytest.approx(-(s1 - 0.95) / 2, rel=1e-5)  # s2 clipped to 0.95 with A < 0: -0.95


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_the_kl_term_with_each_estimator_and_its_placement(estimator):
    logp_ref = torch.tensor([[-0.3, 0.2, 9.0], [0.1, -0.5, 0.4]])
    log_r = logp_ref - RHO.log()  # r = pi_ref / pi_theta (logp_old = 0, so log pi_theta = log rho)
    k = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": log_r.exp() - 1 - log_r}[estimator] * RHO  # weighted by rho
    want = ((k * MASK).sum(-1) / MASK.sum(-1)).mean()
    loss, pg, kl, _ = loss_of(loss_args(kl_estimator=estimator, beta=0.1), logp_ref)
    assert kl.item() == pytest.approx(want.item(), rel=1e-5)
    assert loss.item() == pytest.approx(pg.item() + 0.1 * want.item(), rel=1e-5)
    loss, pg, _, _ = loss_of(loss_args(kl_estimator=estimator, beta=0.1, kl_in="reward"), logp_ref)
    assert loss.item() == pg.item()  # in the reward, not in the loss
    r, logp_old = torch.tensor([1.0, 1.0]), torch.tensor([-0.2, -1.0])
    got = grpo.kl_in_reward(r, logp_old, torch.tensor([-0.5, -0.4]), beta=0.1)
    torch.testing.assert_close(got, torch.tensor([1.0 - 0.1 * 0.3, 1.0 - 0.1 * -0.6]))


# ---- the KL estimators against the exact KL(pi_theta || pi_ref) ----


def categorical(seed: int, K: int = 5, scale: float = 1.0):
    return torch.randn(K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_k1_and_k3_are_unbiased_by_monte_carlo(estimator, off_policy):
    """Samples from pi_old; weighted by rho = pi_theta/pi_old the mean estimates KL(pi_theta || pi_ref)."""
    z, z_ref = categorical(0), categorical(1)
    z_old = categorical(2) * 0.5 + z * 0.5 if off_policy else z
    exact = plumbing.categorical_kl(z, z_ref).item()
    a = torch.multinomial(
        torch.softmax(z_old, -1), 400_000, replacement=True, generator=torch.Generator().manual_seed(3)
    )
    logp, logp_old, logp_ref = (torch.log_softmax(x, -1)[a] for x in (z, z_old, z_ref))
    samples = grpo.kl_to_ref(logp, logp_ref, logp - logp_old, estimator)
    assert abs(samples.mean().item() - exact) < 4 * samples.std().item() / math.sqrt(len(a)) + 1e-4, exact


def test_k2_gradient_equals_the_exact_kl_gradient_near_the_reference():
    z_ref = categorical(1)
    z = (z_ref + 0.02 * categorical(4)).requires_grad_()
    pi_old = torch.softmax(z, -1).detach()  # the expectation over a ~ pi_old = pi_theta, taken exactly
    logp, logp_ref = torch.log_softmax(z, -1), torch.log_softmax(z_ref, -1)
    log_rho = logp - torch.log(pi_old)
    (g_k2,) = torch.autograd.grad((pi_old * grpo.kl_to_ref(logp, logp_ref, log_rho, "k2")).sum(), z)
    (g_exact,) = torch.autograd.grad(plumbing.categorical_kl(z, z_ref), z)
    assert g_exact.norm() > 1e-3
    assert (g_k2 - g_exact).norm() < 0.05 * g_exact.norm()


# ---- runs ----


def test_learns_cartpole(tmp_path):
    run = train("grpo", tmp_path, "--env", "CartPole-v1", "--seed", "1", "--total-timesteps", "120000")
    s = scalars(run)
    returns = np.array([v for _, v in s["charts/episodic_return"]])
    assert returns[:32].mean() < 60  # the start: a random policy
    assert returns[-32:].mean() > 300, returns[-32:].mean()  # the last update's 32 episodes
    assert s["eval/episodic_return"][-1][1] > 300


def test_same_seed_same_returns(tmp_path):
    flags = ["--seed", "3", "--total-timesteps", "3000", "--eval-episodes", "0", "--dynamic-sampling"]
    first, second = (scalars(train("grpo", tmp_path, *flags))["charts/episodic_return"] for _ in range(2))
    assert first == second and len(first) >= 64


def test_a_ppo_checkpoint_is_pi_ref_and_the_start(tmp_path):
    ppo_run = train("ppo", tmp_path, "--total-timesteps", "512", "--eval-episodes", "0")
    flags = ["--ref-policy", str(ppo_run / "ppo.pt"), "--beta", "0.1", "--total-timesteps", "1000"]
    run = train("grpo", tmp_path, *flags, "--eval-episodes", "0")
    kl = [v for _, v in scalars(run)["losses/kl_ref_exact"]]
    assert 0 < kl[0] < 0.05  # pi_theta started at pi_ref and moved a little
    ppo_model = torch.load(ppo_run / "ppo.pt", weights_only=True)["model"]
    ref_model = torch.load(run / "grpo.pt", weights_only=True)["ref_model"]
    assert ref_model.keys() == ppo_model.keys() and all(torch.equal(ref_model[k], ppo_model[k]) for k in ppo_model)


def test_a_non_finite_update_stops_with_a_finite_last_good_checkpoint(tmp_path):
    flags = ["--learning-rate", "1e38", "--total-timesteps", "20000", "--no-progress"]
    proc = run_script("grpo", *flags, "--run-dir", str(tmp_path / "runs"), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "grpo.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for part in ("model", "ref_model") for v in ckpt[part].values())
    assert "nan" not in run_script("evaluate", str(run / "grpo.pt"), "--episodes", "1", cwd=tmp_path).stdout


def test_sigterm_checkpoints_and_resume_goes_on_with_new_start_states(tmp_path):
    cmd = [sys.executable, str(SCRIPTS / "grpo.py"), "--no-progress", "--total-timesteps", "100000000",
           "--run-dir", str(tmp_path / "runs"), "--checkpoint-every", "0", "--eval-episodes", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list((tmp_path / "runs").glob("*/events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"--resume" in err, err
    (run,) = (tmp_path / "runs").iterdir()
    first = torch.load(run / "grpo.pt", weights_only=True)
    assert first["global_step"] > 0 and first["groups_sampled"] == 4 * first["iteration"]
    total = str(first["global_step"] + 2000)
    run_script("grpo", "--no-progress", "--resume", str(run / "grpo.pt"), "--total-timesteps", total, cwd=tmp_path)
    second = torch.load(run / "grpo.pt", weights_only=True)
    assert second["global_step"] >= int(total) and second["groups_sampled"] > first["groups_sampled"]
    steps = [s for s, _ in scalars(run)["charts/SPS"]]
    assert steps == sorted(set(steps)) and steps[-1] == second["global_step"]


def test_the_beta_study_reports_what_its_runs_logged(tmp_path):
    """benchmarks.grpo_study beta: a brief ppo.py policy as pi_ref, grpo.py from it for each beta; the table's
    figures are the runs' own (read back here from their event files), and the figure is written."""
    out = tmp_path / "beta"
    cmd = [sys.executable, "-m", "benchmarks.grpo_study", "beta", "--sft-steps", "1500", "--steps", "3000"]
    cmd += ["--betas", "0", "0.5", "--seeds", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, env=script_env(), capture_output=True)
    table = (out / "README.md").read_text()
    for beta in ("0.0", "0.5"):
        run = next((out / f"beta_{beta}" / "seed_1").glob("*__grpo__1__*"))
        logged = {tag: [v for _, v in pairs] for tag, pairs in scalars(run).items()}
        final = np.mean(logged["charts/episodic_return"][-20:])
        kl = np.mean(logged["losses/kl_ref_exact"][-5:])
        assert f"| {beta} | {final:.1f} ({final:.0f}) | {kl:.4f} ({kl:.4f}) |" in table
        assert logged["losses/kl_ref_exact"][0] < 0.05  # pi_theta starts at pi_ref: the first update's KL is small
    assert (out / "beta.png").stat().st_size > 10_000
