"""The flow-matching maths, checked against the diffusers scheduler the pipelines use."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trainer.flow import (
    FlowConfig,
    empirical_mu,
    flow_loss,
    interpolate,
    loss_weights,
    sample_sigmas,
    shift_factor,
    time_shift,
    training_sigmas,
    velocity_target,
)


def test_interpolation_endpoints_and_velocity():
    x0, noise = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    xt = interpolate(x0, noise, sigma)
    # moving along the predicted velocity for the remaining sigma recovers the clean sample
    recovered = xt - sigma.view(-1, 1, 1) * velocity_target(x0, noise)
    torch.testing.assert_close(recovered, x0)


def test_interpolation_matches_scheduler_scale_noise():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    x0, noise = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    sigma = torch.tensor([0.37])
    ours = interpolate(x0, noise, sigma)
    theirs = scheduler.scale_noise(x0, torch.tensor([370.0]), noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_euler_step_with_true_velocity_lands_on_data():
    """One scheduler step from sigma to 0 with the exact velocity gives x0: the target has the right sign."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(sigmas=[0.6], device="cpu")
    x0, noise = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    xt = interpolate(x0, noise, torch.tensor([0.6]))
    stepped = scheduler.step(velocity_target(x0, noise), scheduler.timesteps[0], xt, return_dict=False)[0]
    torch.testing.assert_close(stepped, x0, rtol=1e-5, atol=1e-5)


def test_sigma_samplers_stay_in_range_and_have_the_right_centre():
    g = torch.Generator().manual_seed(0)
    uniform = sample_sigmas("uniform", 20000, g)
    assert 0 <= uniform.min() and uniform.max() < 1
    assert abs(uniform.mean().item() - 0.5) < 0.01
    logit = sample_sigmas("logit_normal", 20000, g, mean=1.0, std=0.5)
    assert abs(logit.median().item() - 1 / (1 + math.exp(-1.0))) < 0.01
    with pytest.raises(ValueError):
        sample_sigmas("beta", 1, g)


def test_time_shift_matches_the_scheduler_exponential_shift():
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sigma = torch.linspace(0.05, 0.95, 10)
    mu = 1.3
    theirs = scheduler.time_shift(mu, 1.0, sigma)
    torch.testing.assert_close(time_shift(sigma, math.exp(mu)), theirs)
    assert torch.equal(time_shift(sigma, 1.0), sigma)


def test_resolution_shift_grows_with_image_size():
    cfg = FlowConfig(shift="resolution")
    small, large = shift_factor(cfg, 256), shift_factor(cfg, 4096)
    assert 1.0 < small < large
    assert math.isclose(math.log(large), empirical_mu(4096, 50))
    assert shift_factor(FlowConfig(shift="none"), 4096) == 1.0
    assert shift_factor(FlowConfig(shift="fixed", shift_value=3.0), 10) == 3.0
    # a shift > 1 pushes training towards noisier sigmas
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    plain = training_sigmas(FlowConfig(shift="none"), 1000, 4096, g1)
    shifted = training_sigmas(cfg, 1000, 4096, g2)
    assert torch.all(shifted >= plain) and shifted.mean() > plain.mean()


def test_loss_weights_and_loss():
    sigma = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(loss_weights("none", sigma), torch.ones(3))
    torch.testing.assert_close(loss_weights("sigma_sqrt", sigma), sigma**-2)
    cos = loss_weights("cosmap", sigma)
    assert cos[1] == cos.max()  # cosmap peaks mid-trajectory
    pred, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    target[1] *= 2
    assert flow_loss(pred, target, torch.ones(2)).item() == pytest.approx((1 + 4) / 2)
    assert flow_loss(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
