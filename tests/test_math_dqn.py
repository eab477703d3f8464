"""dqn.py's loop, watched on tiny in-process runs (a few hundred steps on a counting env): the target's bootstrap
comes from theta^- (Double: a' chosen by theta) on the true final observation at a time limit, the Polyak update,
beta_p reaching 1, the target network in the checkpoint and back on --resume; the buffer's largest priority kept
across a checkpoint."""

import contextlib
import io

import numpy as np
import pytest
import torch
from test_math_common import common

from cleanrl_style import dqn

GAMMA = 0.9


def quiet(args: dqn.Args) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return dqn.main(args)


def watch_networks(monkeypatch) -> tuple[list, dict]:
    """Record every forward pass of Q(.; theta) ("online") and Q(.; theta^-) ("target"): (role, input, output)."""
    calls, nets = [], {}
    real = dqn.networks_and_buffer

    def networks_and_buffer(args, obs_dim, n_actions, device):
        q, target, rb = real(args, obs_dim, n_actions, device)
        for net, role in ((q, "online"), (target, "target")):
            net.register_forward_hook(lambda m, inp, out, role=role: calls.append((role, inp[0].clone(), out)))
        nets.update(q=q, target=target, rb=rb)
        return q, target, rb

    monkeypatch.setattr(dqn, "networks_and_buffer", networks_and_buffer)
    return calls, nets


# ---- units ----


def test_polyak_update_by_hand():
    torch.manual_seed(0)
    online, target = dqn.QNetwork(3, 2, 8, False), dqn.QNetwork(3, 2, 8, False)
    before = [p.detach().clone() for p in target.parameters()]
    dqn.update_target(target, online, 0.25)
    for p_t, p_before, p in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(p_t, 0.25 * p + 0.75 * p_before, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p_t, p)
    dqn.update_target(target, online, 1.0)
    assert all(torch.equal(p_t, p) for p_t, p in zip(target.parameters(), online.parameters()))


def test_the_largest_priority_survives_a_checkpoint():
    """--resume: new transitions still enter at the largest priority seen before the checkpoint, not at 1."""
    rb = dqn.ReplayBuffer(8, 1, prioritized=True)
    rb.add(np.zeros((3, 1)), np.zeros(3, int), np.zeros(3), np.zeros((3, 1)), np.zeros(3))
    rb.update_priorities(np.array([0, 1]), np.array([7.5, 0.5]))
    rb.update_priorities(np.array([0]), np.array([2.0]))  # the largest so far stays 7.5
    state = rb.state_dict(rb.pos, rb.size)
    resumed = dqn.ReplayBuffer(8, 1, prioritized=True)
    resumed.load_state_dict(state)
    assert resumed.max_priority == rb.max_priority == 7.5
    resumed.add(np.zeros((1, 1)), np.zeros(1, int), np.zeros(1), np.zeros((1, 1)), np.zeros(1))
    assert resumed.tree.leaves(np.arange(4)).tolist() == [2.0, 0.5, 1.0, 7.5]


# ---- the loop's target ----


@pytest.mark.parametrize("double", [True, False])
def test_the_loops_target_bootstraps_from_theta_minus_on_the_true_final_observation(double, tmp, monkeypatch):
    """Every gradient step's y = G + gamma^k Q(s', a*; theta^-) with Q(s', .; theta^-) computed by the target
    network on s', a* = argmax Q(s', .; theta) (Double) or of theta^- (DQN). The env counts steps (s = [t],
    reward 1, cut at t = 5), so G = (1 - gamma^k) / (1 - gamma) tells k: the discount is gamma^k (a truncation
    never cuts the bootstrap), and s' is never the reset observation [0] but [5] where the window hit the time
    limit."""
    calls, _ = watch_networks(monkeypatch)
    targets = []
    real = dqn.td_target

    def td_target(G, discount, Q_next_target, Q_next_online=None):
        y = real(G, discount, Q_next_target, Q_next_online)
        targets.append((G.clone(), discount.clone(), Q_next_target, Q_next_online, y.clone(), list(calls[-3:])))
        return y

    monkeypatch.setattr(dqn, "td_target", td_target)
    monkeypatch.chdir(tmp)
    flags = dict(n_step=2, gamma=GAMMA, total_timesteps=120, learning_starts=20, batch_size=16, double=double,
                 target_network_frequency=50, save_model=False)  # fmt: skip
    assert quiet(dqn.Args(**common(tmp, **flags))) == 0
    assert len(targets) == 100
    finals = 0
    for G, discount, Q_next_target, Q_next_online, y, recent in targets:
        (target_call,) = [c for c in recent if c[2] is Q_next_target]
        assert target_call[0] == "target"  # theta^-, not theta
        s_next = target_call[1]
        if double:
            (online_call,) = [c for c in recent if c[2] is Q_next_online]
            assert online_call[0] == "online" and torch.equal(online_call[1], s_next)  # a' chosen by theta on s'
            a_star = Q_next_online.argmax(-1)
        else:
            assert Q_next_online is None
            a_star = Q_next_target.argmax(-1)
        k = torch.round(torch.log(1 - G * (1 - GAMMA)) / np.log(GAMMA))
        assert set(k.tolist()) <= {1.0, 2.0}
        assert (s_next[:, 0] >= 1).all()  # never the reset observation
        torch.testing.assert_close(discount, GAMMA**k, rtol=1e-6, atol=1e-7)
        bootstrap = Q_next_target.gather(-1, a_star[:, None])[:, 0]
        torch.testing.assert_close(y, G + GAMMA**k * bootstrap, rtol=1e-5, atol=1e-6)
        finals += int((s_next[:, 0] == 5).sum())
    assert finals > 100  # many targets bootstrapped from the true final observation [5]


# ---- the target network: Polyak update, checkpoint, --resume; beta_p ----


def test_the_checkpoint_holds_theta_minus_and_resume_restores_it(tmp, monkeypatch):
    """tau = 0.5 every 100 steps: each update is theta^- <- 0.5 theta + 0.5 theta^- (by hand, in the loop); the
    checkpoint's target_model is the live theta^- (not theta); resuming to 350 steps (no update in (300, 350])
    keeps it exactly. With --prioritized, beta_p goes linearly from 0.4 to exactly 1 at the last step."""
    calls, nets = watch_networks(monkeypatch)
    updates, betas = [], []
    real_update, real_weights = dqn.update_target, dqn.importance_weights

    def update_target(target_network, q_network, tau):
        before = [p.detach().clone() for p in target_network.parameters()]
        real_update(target_network, q_network, tau)
        for p_t, p_before, p in zip(target_network.parameters(), before, q_network.parameters()):
            torch.testing.assert_close(p_t, 0.5 * p + 0.5 * p_before, rtol=1e-6, atol=1e-7)
        updates.append(tau)

    def importance_weights(P, n, per_beta):
        betas.append(per_beta)
        return real_weights(P, n, per_beta)

    monkeypatch.setattr(dqn, "update_target", update_target)
    monkeypatch.setattr(dqn, "importance_weights", importance_weights)
    monkeypatch.chdir(tmp)
    flags = dict(tau=0.5, target_network_frequency=100, learning_starts=50, batch_size=16, total_timesteps=300,
                 n_step=1, prioritized=True, learning_rate=0.01)  # fmt: skip
    assert quiet(dqn.Args(**common(tmp, **flags))) == 0
    assert updates == [0.5, 0.5, 0.5]
    assert len(betas) == 250 and betas[-1] == pytest.approx(1.0, abs=1e-12)
    assert betas[0] == pytest.approx(0.4 + 0.6 * 51 / 300) and np.all(np.diff(betas) > 0)
    (path,) = (tmp / "runs").glob("*/dqn.pt")
    first = torch.load(path, weights_only=True)
    live = nets["target"].state_dict()
    for k, v in first["target_model"].items():
        assert torch.equal(v, live[k]), k
    assert any(not torch.equal(v, first["model"][k]) for k, v in first["target_model"].items())
    assert quiet(dqn.Args(resume=str(path), total_timesteps=350, run_dir=str(tmp / "runs"), progress=False)) == 0
    second = torch.load(path, weights_only=True)
    assert second["global_step"] == 350 and len(updates) == 3
    for k, v in first["target_model"].items():
        assert torch.equal(second["target_model"][k], v), k
    assert any(not torch.equal(v, second["model"][k]) for k, v in second["target_model"].items())
