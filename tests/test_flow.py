"""The flow-matching maths, checked against the diffusers scheduler the pipelines use."""

import itertools
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from common.errors import UserError
from data_tools.buckets import make_buckets
from trainer.config import load_config
from trainer.flow import (
    FlowConfig,
    dynamic_mu,
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
    stepped = scheduler.step(
        velocity_target(x0, noise), scheduler.timesteps[0], xt, return_dict=False
    )[0]
    torch.testing.assert_close(stepped, x0, rtol=1e-5, atol=1e-5)


def test_sigma_samplers_stay_in_range_and_have_the_right_centre():
    g = torch.Generator().manual_seed(0)
    uniform = sample_sigmas("uniform", 20000, g)
    assert uniform.min() >= 0 and uniform.max() < 1
    assert abs(uniform.mean().item() - 0.5) < 0.01
    logit = sample_sigmas("logit_normal", 20000, g, mean=1.0, std=0.5)
    assert abs(logit.median().item() - 1 / (1 + math.exp(-1.0))) < 0.01
    with pytest.raises(ValueError):
        sample_sigmas("beta", 1, g)


def test_time_shift_matches_the_scheduler_exponential_shift():
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, time_shift_type="exponential"
    )
    sigma = torch.linspace(0.05, 0.95, 10)
    mu = 1.3
    theirs = scheduler.time_shift(mu, 1.0, sigma)
    torch.testing.assert_close(time_shift(sigma, math.exp(mu)), theirs)
    assert torch.equal(time_shift(sigma, 1.0), sigma)


def test_dynamic_shift_is_flux1s_and_is_the_default():
    cfg = FlowConfig()
    assert cfg.shift == "dynamic"
    # mu linear in image tokens: 0.5 at 256 (256^2 px), 0.7167 at 1024 tokens (512^2), 1.15 at 4096 (1024^2)
    for tokens, mu in [(256, 0.5), (1024, 0.5 + 0.65 * 768 / 3840), (4096, 1.15)]:
        assert math.isclose(dynamic_mu(tokens), mu, rel_tol=1e-9)
        assert math.isclose(shift_factor(cfg, tokens), math.exp(mu), rel_tol=1e-9)
    assert round(shift_factor(cfg, 4096), 2) == 3.16


def test_dynamic_shift_grows_monotonically_over_bucket_sizes():
    """The empirical (sampling) mu is not monotonic; the training shift must be, over every bucket of every size."""
    sizes = sorted({w * h // 256 for res in range(256, 1601, 32) for w, h in make_buckets(res)})
    shifts = [shift_factor(FlowConfig(), n) for n in sizes]
    assert all(a < b for a, b in itertools.pairwise(shifts))
    empirical = [shift_factor(FlowConfig(shift="empirical"), n) for n in sizes]
    assert any(a > b for a, b in itertools.pairwise(empirical))  # why it is not the default


def test_sigma_distribution_at_1024():
    g = torch.Generator().manual_seed(0)
    sigmas = training_sigmas(FlowConfig(), 200_000, 4096, g)
    s = math.exp(1.15)
    # 0.76: the median of logit-normal(0, 1) shifted
    assert abs(sigmas.median().item() - s / (1 + s)) < 0.005
    assert abs(sigmas.median().item() - 0.76) < 0.01
    old = training_sigmas(
        FlowConfig(shift="empirical"), 200_000, 4096, torch.Generator().manual_seed(0)
    )
    below, old_below = (sigmas < 0.5).float().mean().item(), (old < 0.5).float().mean().item()
    # 12.6 % of samples below 0.5 now, 2.2 % with the old default
    assert 0.11 < below < 0.14 and old_below < 0.03


def test_other_shifts_and_the_sigma_range():
    assert shift_factor(FlowConfig(shift="none"), 4096) == 1.0
    assert shift_factor(FlowConfig(shift="fixed", shift_value=3.0), 10) == 3.0
    assert math.isclose(
        math.log(shift_factor(FlowConfig(shift="empirical"), 4096)), empirical_mu(4096, 50)
    )
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    plain = training_sigmas(FlowConfig(shift="none"), 1000, 4096, g1)
    shifted = training_sigmas(FlowConfig(), 1000, 4096, g2)
    # a shift > 1 means noisier sigmas
    assert torch.all(shifted >= plain) and shifted.mean() > plain.mean()
    ranged = training_sigmas(
        FlowConfig(sigma_min=0.2, sigma_max=0.6), 1000, 4096, torch.Generator().manual_seed(1)
    )
    assert ranged.min() >= 0.2 and ranged.max() <= 0.6


def test_the_retired_shift_value_says_what_to_write():
    with pytest.raises(
        UserError, match="config key 'flow.shift': 'resolution' .* is now called 'empirical'"
    ):
        load_config(None, ["model.path=m", "data.path=d", "flow.shift=resolution"])
    with pytest.raises(UserError, match="flow.sigma_min .* must be below flow.sigma_max"):
        load_config(
            None, ["model.path=m", "data.path=d", "flow.sigma_min=0.5", "flow.sigma_max=0.5"]
        )


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


def test_an_image_in_a_short_batch_weighs_what_any_other_does():
    """A bucket's remainder batch of 1 (configured batch size 2) must not count its image twice."""
    pred = torch.zeros(1, 3, 4)
    target = torch.ones(1, 3, 4)
    full = flow_loss(torch.zeros(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2), batch_size=2)
    short = flow_loss(pred, target, torch.ones(1), batch_size=2)
    # per image: the same share of the gradient
    assert short.item() == pytest.approx(full.item() / 2)
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    target[0, 1:] = 5.0  # errors only where the mask is 0
    assert flow_loss(pred, target, torch.ones(1), token_weights=mask).item() == pytest.approx(1.0)
