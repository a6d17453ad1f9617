"""train/augment.py: augmentation on the device for consistent distillation. What a run relies on: a step's draws
are a function of (seed, rank, step) alone (exact resume), nothing changes when every flag is off, and each
transform does what its flag says."""
import pytest
import torch

from train.augment import AugmentConfig, DeviceAugment
from train.distill import relational_loss

FULL = AugmentConfig(crop_scale=(0.7, 1.0), crop_ratio=(0.8, 1.25), shift=0.05, rotate=10, color_jitter=0.3,
                     gaussian_blur_prob=0.5, grayscale_prob=0.3, mixup=0.4, cutmix=1.0, mixup_prob=0.8)


def _pixels(b=6, seed=0):
    return torch.rand(b, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 255


def test_a_step_draws_the_same_whatever_came_before_and_steps_differ():
    x = _pixels()
    a, b = DeviceAugment(FULL, seed=3), DeviceAugment(FULL, seed=3)
    for k in range(4):  # a's history differs from b's: the output must not
        a(x, 100 + k)
    first = a(x, 7)
    assert torch.equal(first, b(x, 7))
    assert not torch.equal(first, b(x, 8))
    assert not torch.equal(first, DeviceAugment(FULL, seed=4)(x, 7))
    assert not torch.equal(first, DeviceAugment(FULL, seed=3, rank=1)(x, 7))
    assert first.shape == x.shape and first.min() >= 0 and first.max() <= 255


def test_every_flag_off_is_the_identity_and_the_cache_stays_usable():
    x = _pixels()
    assert not AugmentConfig().active and DeviceAugment(AugmentConfig())(x, 5) is x
    assert AugmentConfig(mixup=0.2).active and AugmentConfig(rotate=1).geometric
    assert not AugmentConfig(mixup=0.2, mixup_prob=0).active


def test_a_crop_of_a_quarter_of_the_area_is_a_2x_zoom_inside_the_image():
    ramp = torch.arange(112, dtype=torch.float32).view(1, 1, 1, 112).expand(4, 3, 112, 112).contiguous()
    out = DeviceAugment(AugmentConfig(crop_scale=(0.25, 0.25)), seed=1)(ramp, 0)
    slope = (out[:, 0, 56, 80] - out[:, 0, 56, 30]) / 50
    torch.testing.assert_close(slope, torch.full((4,), 0.5), atol=1e-3, rtol=0)
    assert out[:, :, 10:-10, 10:-10].min() >= 0 and out.max() <= 111  # no zero padding: the crop lies inside
    centres = out[:, 0, 56, 55:57].mean(1)
    assert centres.min() >= 27.5 and centres.max() <= 83.5 and centres.std() > 1  # random positions, within bounds


def test_mixing_combines_each_face_with_one_partner_only():
    x = torch.arange(6, dtype=torch.float32).mul(40).view(6, 1, 1, 1).expand(6, 3, 112, 112).contiguous()
    mixed = DeviceAugment(AugmentConfig(mixup=1.0), seed=0)(x, 3)
    lam = (mixed[:, 0, 0, 0] - x.roll(1, 0)[:, 0, 0, 0]) / (x - x.roll(1, 0))[:, 0, 0, 0]
    assert torch.allclose(lam, lam[0].expand(6), atol=1e-5) and 0 < lam[0] < 1  # one lambda per batch
    assert torch.equal(mixed, mixed[:, :, :1, :1].expand_as(mixed))  # mixup keeps each image flat
    cut = DeviceAugment(AugmentConfig(cutmix=1.0), seed=0)
    for step in range(5):
        out = cut(x, step)
        for i in range(6):
            assert set(out[i].unique().tolist()) <= {x[i, 0, 0, 0].item(), x[i - 1, 0, 0, 0].item()}


def test_colour_grayscale_and_blur():
    x = _pixels()
    gray = DeviceAugment(AugmentConfig(grayscale_prob=1.0))(x, 0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    flat = torch.full((2, 3, 112, 112), 77.0)
    torch.testing.assert_close(DeviceAugment(AugmentConfig(gaussian_blur_prob=1.0))(flat, 0), flat)
    dot = torch.zeros(2, 3, 112, 112)
    dot[:, :, 50, 60] = 100
    blurred = DeviceAugment(AugmentConfig(gaussian_blur_prob=1.0))(dot, 0)
    torch.testing.assert_close(blurred.sum(dim=(2, 3)), torch.full((2, 3), 100.0))
    assert blurred[:, :, 50, 60].max() < 100 and blurred[:, :, 48:53, 58:63].sum() == pytest.approx(600, rel=1e-5)
    jit = DeviceAugment(AugmentConfig(color_jitter=0.5), seed=2)(x, 0)
    assert jit.min() >= 0 and jit.max() <= 255 and not torch.equal(jit, x)


def test_relational_loss_is_zero_exactly_when_the_pairs_cosines_match():
    t = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    assert relational_loss(3 * t @ q, t).item() == pytest.approx(0, abs=1e-10)  # a rotation and a scale keep cosines
    s = torch.randn(8, 16, generator=torch.Generator().manual_seed(2)).requires_grad_()
    loss = relational_loss(s, t)
    loss.backward()
    assert loss.item() > 0.01 and torch.isfinite(s.grad).all()
