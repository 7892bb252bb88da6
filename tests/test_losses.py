"""Distillation losses: each kind against its formula; targets are detached."""
import math

import pytest
import torch
import torch.nn.functional as F

from rd3core.losses import LossSpec, distill_loss, hard_ce, soft_loss


def logits(seed, n=6, c=5):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3


def test_kl_matches_its_definition_and_t_squared_scales_it():
    s, t = logits(0), logits(1)
    T = 4.0
    p_t = F.softmax(t / T, 1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    plain = soft_loss(s, t, LossSpec(kind="kl"), T)
    torch.testing.assert_close(plain, expected)
    torch.testing.assert_close(soft_loss(s, t, LossSpec(kind="kl", t_squared=True), T), expected * T * T)


def test_soft_ce_is_kl_plus_the_teacher_entropy():
    s, t = logits(2), logits(3)
    T = 2.0
    p_t = F.softmax(t / T, 1)
    entropy = -(p_t * p_t.log()).sum(1).mean()
    torch.testing.assert_close(soft_loss(s, t, LossSpec(kind="soft_ce"), T),
                               soft_loss(s, t, LossSpec(kind="kl"), T) + entropy)


def test_mse_is_on_raw_logits_whatever_the_temperature():
    s, t = logits(4), logits(5)
    for T in (1.0, 20.0):
        torch.testing.assert_close(soft_loss(s, t, LossSpec(kind="mse"), T), F.mse_loss(s, t))


@pytest.mark.parametrize("kind", ["kl", "soft_ce", "mse"])
def test_gamma_adds_the_mixed_hard_label_ce(kind):
    s, t = logits(6), logits(7)
    y_a, y_b, lam = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 2, 3, 4, 0, 1]), 0.3
    spec = LossSpec(kind=kind, gamma=0.1)
    base = soft_loss(s, t, spec, 4.0)
    ce = lam * F.cross_entropy(s, y_a) + (1 - lam) * F.cross_entropy(s, y_b)
    torch.testing.assert_close(distill_loss(s, t, y_a, y_b, lam, spec, 4.0), base + 0.1 * ce)
    torch.testing.assert_close(hard_ce(s, y_a, y_b, lam), ce)


def test_hard_labels_only_is_plain_cross_entropy():
    s, y = logits(8), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(distill_loss(s, None, y, None, 1.0, LossSpec(gamma=0.5), 4.0), F.cross_entropy(s, y))


@pytest.mark.parametrize("kind", ["kl", "soft_ce", "mse"])
def test_targets_are_detached(kind):
    s = logits(9).requires_grad_()
    t = logits(10).requires_grad_()
    distill_loss(s, t, torch.zeros(6, dtype=torch.long), None, 1.0, LossSpec(kind=kind, gamma=0.1), 3.0).backward()
    assert s.grad is not None and t.grad is None


def test_temperature_schedule_is_linear_from_start_to_end():
    spec = LossSpec(temperature=20, temperature_end=4)
    assert spec.temperature_at(0) == 20 and spec.temperature_at(1) == 4
    assert math.isclose(spec.temperature_at(0.25), 16)
    assert LossSpec(temperature=7).temperature_at(0.9) == 7
