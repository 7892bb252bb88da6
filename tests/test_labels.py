"""Label sources: multi-teacher combination, static and epoch-wise relabelling,
teachers frozen under inference mode."""
import pytest
import torch
from torch import nn

from rd3core.augment import AugParams
from rd3core.labels import EpochwiseLabels, StaticLabels, TeacherEnsemble


class Fixed(nn.Module):
    """A 'teacher' with a BN layer (to catch train-mode use) and a scale."""

    def __init__(self, scale, seed=0):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("proj", torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)))
        self.scale = scale
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.bn(x.flatten(1)[:, :4]) @ self.proj * self.scale


def x(n=5, seed=0):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_mean_of_logits():
    a, b = Fixed(1.0, seed=1), Fixed(3.0, seed=2)
    out = TeacherEnsemble([a, b], "mean")(x())
    torch.testing.assert_close(out, (a(x()) + b(x())) / 2)


def test_norm_mean_equalises_each_teachers_norm_before_averaging():
    a, b = Fixed(1.0, seed=1), Fixed(10.0, seed=2)
    out = TeacherEnsemble([a, b], "norm_mean")(x())
    la, lb = a(x()), b(x())
    target = (la.norm(dim=1, keepdim=True) + lb.norm(dim=1, keepdim=True)) / 2
    expected = (la / la.norm(dim=1, keepdim=True) + lb / lb.norm(dim=1, keepdim=True)) / 2 * target
    torch.testing.assert_close(out, expected)
    # With a plain mean the large teacher would dominate; here both directions count equally.
    assert not torch.allclose(out, TeacherEnsemble([a, b], "mean")(x()))


def test_teachers_stay_frozen_in_eval_mode():
    t = Fixed(1.0)
    ens = TeacherEnsemble([t])
    ens.train()
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    before = t.bn.running_mean.clone()
    out = ens(x() * 5 + 3)
    assert torch.equal(t.bn.running_mean, before)  # no BN statistic update
    assert out.is_inference() and not out.requires_grad


def params(n, perm=None, lam=1.0):
    return AugParams(n=n, in_hw=(2, 2), out_hw=(2, 2), mix_perm=perm, mix_lam=lam)


def test_static_labels_mix_the_two_images_logits():
    t = Fixed(2.0)
    clean = x(6)
    labels = StaticLabels(TeacherEnsemble([t]), clean)
    idx = torch.tensor([4, 1, 3])
    perm = torch.tensor([2, 0, 1])
    got = labels(None, idx, params(3, perm, 0.25), 0, 0)
    ref = TeacherEnsemble([t])(clean)[idx]
    torch.testing.assert_close(got, 0.25 * ref + 0.75 * ref[perm])
    calls = t.calls
    labels(None, idx, params(3), 0, 1)
    assert t.calls == calls  # computed once, never again


def test_epochwise_labels_see_the_batch_and_reuse_within_a_block():
    t = Fixed(1.0)
    fresh = EpochwiseLabels(TeacherEnsemble([t]))
    batch = x(4, seed=3)
    torch.testing.assert_close(fresh(batch, None, params(4), 0, 0), TeacherEnsemble([t])(batch))
    reuse = EpochwiseLabels(TeacherEnsemble([t]), reuse_within_block=True)
    calls = t.calls
    first = reuse(batch, None, params(4), 0, 0)
    again = reuse(batch * 0, None, params(4), 0, 0)  # same block and step: replayed
    assert t.calls == calls + 1 and torch.equal(first, again)
    reuse(batch, None, params(4), 1, 0)  # next block: relabelled
    assert t.calls == calls + 2


@pytest.mark.parametrize("combine", ["mean", "norm_mean"])
def test_single_teacher_is_passed_through(combine):
    t = Fixed(1.5)
    torch.testing.assert_close(TeacherEnsemble([t], combine)(x()), t(x()))
