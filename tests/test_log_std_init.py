"""--log-std-init, the Gaussian policy's log sigma at the start, in every policy-gradient script."""

import pytest
import torch
from conftest import run_script, train

# One update that cannot move log sigma by more than ~1e-4: a vanishing learning rate, or (TRPO, whose actor step
# is set by the trust region, not by a learning rate) a vanishing trust region.
ONE_FROZEN_UPDATE = {
    "ppo": ["--num-envs", "2", "--num-steps", "32", "--minibatch-size", "32", "--update-epochs", "1",
            "--learning-rate", "1e-9", "--total-timesteps", "64"],
    "a2c": ["--num-envs", "2", "--num-steps", "8", "--learning-rate", "1e-9", "--total-timesteps", "16"],
    "trpo": ["--num-envs", "2", "--num-steps", "32", "--critic-minibatch-size", "32", "--max-kl", "1e-10",
             "--total-timesteps", "64"],
    "reinforce": ["--num-envs", "2", "--episodes-per-update", "2", "--learning-rate", "1e-9",
                  "--total-timesteps", "400"],
}  # fmt: skip


@pytest.mark.parametrize("script", sorted(ONE_FROZEN_UPDATE))
@pytest.mark.parametrize("log_std", [-1.5, None])
def test_log_sigma_starts_at_the_flag(script, log_std, tmp):
    flags = [] if log_std is None else ["--log-std-init", str(log_std)]
    run = train(script, tmp, "--env", "Pendulum-v1", *ONE_FROZEN_UPDATE[script], *flags, "--eval-episodes", "0")
    ckpt = torch.load(next(run.glob("*.pt")), weights_only=False)
    expected = ckpt["args"]["log_std_init"]  # the default, resolved for continuous actions, when no flag was given
    if log_std is not None:
        assert expected == log_std
    torch.testing.assert_close(ckpt["model"]["actor_logstd"], torch.full((1,), float(expected)), atol=1e-3, rtol=0)


@pytest.mark.parametrize("script", sorted(ONE_FROZEN_UPDATE))
def test_non_finite_log_sigma_exits_2_writing_nothing(script, tmp):
    proc = run_script(script, "--env", "Pendulum-v1", "--log-std-init", "inf", "--run-dir", str(tmp / "runs"),
                      cwd=tmp, check=False)  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --log-std-init"), proc.stderr
    assert list(tmp.iterdir()) == []
