"""Each synthesis method does its job, on digits with a small BatchNorm teacher
trained once for the module (a few seconds on a CPU)."""
import math
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from orchestrator.study.expand import expand
from orchestrator.study.spec import StudyError, load_study
from rd3core.config import ConfigError, build
from rd3core.data import as_float, load_dataset
from rd3core.loop import Runtime
from rd3core.models import create_model
from rd3core.pipeline import TeacherSpec, train_teacher
from rd3core.seeding import generator
from rd3core.synth import METHODS, synthesize
from rd3core.synth import teacher as teacher_ops
from rd3core.synth.cda import CDAParams, min_scale
from rd3core.synth.herding import class_features
from rd3core.synth.rded import random_crops, rded_select, tile
from rd3core.synth import sre2l as sre2l_module
from rd3core.synth.sre2l import bn_matching_loss, recover


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher(data):
    torch.set_num_threads(1)  # the machine is shared; two threads gain little at this size
    spec = build(TeacherSpec, {"arch": "convnet3-w32-bn", "epochs": 4,
                               "augment": {"crop": "pad", "padding": 2, "flip": False, "mix": "none"}})
    result = train_teacher(data, spec)
    assert result.metrics["top1"] > 0.8  # a teacher worth distilling from
    return result.model.eval()


def make(name, **params):
    return build(METHODS.get(name).params, params)


def norm(data, images):
    return data.info.normalize(as_float(images))


# --- SRe2L ---------------------------------------------------------------------------

def test_sre2l_lowers_bn_matching_loss_and_makes_recognisable_images(data, teacher):
    init = synthesize("sre2l", data, teacher, make("sre2l", ipc=3, iterations=0), seed=0)
    out = synthesize("sre2l", data, teacher, make("sre2l", ipc=3, iterations=40), seed=0)
    assert out.images.shape == (30, 1, 16, 16) and out.images.dtype == torch.uint8  # as published: 8-bit

    assert torch.equal(out.labels, torch.arange(10).repeat_interleave(3))
    before = bn_matching_loss(teacher, norm(data, init.images))
    after = bn_matching_loss(teacher, norm(data, out.images))
    assert after < 0.75 * before, (before, after)
    assert out.meta["bn_loss_final"] < out.meta["bn_loss_init"]
    # The CE term: the teacher now reads the intended class from most images.
    predicted = teacher_ops.logits(teacher, norm(data, out.images)).argmax(1)
    assert (predicted == out.labels).float().mean() > 0.9
    assert out.meta["wall_s"] > 0 and out.meta["images_bytes"] == 30 * 256


def test_sre2l_is_seeded_and_real_init_starts_from_real_images(data, teacher):
    a = synthesize("sre2l", data, teacher, make("sre2l", ipc=2, iterations=5), seed=3)
    b = synthesize("sre2l", data, teacher, make("sre2l", ipc=2, iterations=5), seed=3)
    c = synthesize("sre2l", data, teacher, make("sre2l", ipc=2, iterations=5), seed=4)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    real0 = synthesize("sre2l", data, teacher, make("sre2l", ipc=2, iterations=0, init="real", precision="float32"),
                       seed=0)
    assert real0.images.dtype == torch.float32
    assert real0.source_indices is not None
    assert torch.allclose(real0.images, as_float(data.train.images[real0.source_indices]), atol=1e-5)
    assert torch.equal(data.train.labels[real0.source_indices], real0.labels)
    real = synthesize("sre2l", data, teacher, make("sre2l", ipc=2, iterations=10, init="real", precision="float32"),
                      seed=0)
    assert not torch.allclose(real.images, real0.images)  # optimised from there


def test_sre2l_refuses_a_teacher_without_batchnorm(data):
    plain = create_model("convnet3-w16", 10, 1, 16)
    with pytest.raises(ValueError, match="needs a teacher with BatchNorm"):
        synthesize("sre2l", data, plain, make("sre2l", ipc=1, iterations=1), seed=0)


def tiny_bn_teacher():
    """Three BN layers (two 2-d, one 1-d) with running statistics far from what
    random inputs produce, so every r_l is large and distinct."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6), nn.Linear(6, 10))
    for bn in (model[1], model[4], model[8]):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 2 + 0.5)
        bn.weight.data.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    return model.eval(), [model[1], model[4], model[8]]


def bn_r_by_hand(model, layers, x, unbiased=False):
    """r_l from each BN layer's input in eval mode: ||var_run - var_batch||_2 +
    ||mean_run - mean_batch||_2 over N (and H, W), written out without the library."""
    seen = []
    handles = [layer.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()))
               for layer in layers]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    rs = []
    for layer, a in zip(layers, seen):
        dims = (0, 2, 3) if a.ndim == 4 else (0,)
        n = math.prod(a.shape[d] for d in dims)
        mean = a.sum(dims) / n
        centred = a - mean.view(1, -1, *[1] * (a.ndim - 2))
        var = (centred ** 2).sum(dims) / (n - 1 if unbiased else n)
        rs.append(float(((layer.running_var - var) ** 2).sum().sqrt() + ((layer.running_mean - mean) ** 2).sum().sqrt()))
    return rs


def test_bn_matching_loss_is_first_layer_weighted_sum_of_hand_computed_r():
    model, layers = tiny_bn_teacher()
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in layers]
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))  # N*H*W = 48: biased != unbiased
    r = bn_r_by_hand(model, layers, x)
    assert min(r) > 0.5 and len(set(round(v, 3) for v in r)) == 3
    assert bn_matching_loss(model, x) == pytest.approx(10 * r[0] + r[1] + r[2], rel=1e-5)
    assert bn_matching_loss(model, x, first_bn_weight=1.0) == pytest.approx(sum(r), rel=1e-5)
    assert bn_matching_loss(model, x, first_bn_weight=0.0) == pytest.approx(r[1] + r[2], rel=1e-5)
    # The test tells the biased variance from the unbiased one.
    unbiased = bn_r_by_hand(model, layers, x, unbiased=True)
    assert abs((10 * unbiased[0] + unbiased[1] + unbiased[2]) - (10 * r[0] + r[1] + r[2])) > 1e-3
    # Measuring does not touch the teacher's running statistics (eval mode).
    for bn, (mean, var) in zip(layers, before):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)


def test_sre2l_bn_term_not_cross_entropy_lowers_the_bn_loss(data, teacher):
    # Control for the test above: CE alone barely moves the BN statistics, so the
    # drop seen there comes from the r_bn term.
    init = synthesize("sre2l", data, teacher, make("sre2l", ipc=3, iterations=0), seed=0)
    ce_only = synthesize("sre2l", data, teacher, make("sre2l", ipc=3, iterations=40, r_bn=0.0), seed=0)
    default = synthesize("sre2l", data, teacher, make("sre2l", ipc=3, iterations=40), seed=0)
    before = bn_matching_loss(teacher, norm(data, init.images))
    without = bn_matching_loss(teacher, norm(data, ce_only.images))
    with_bn = bn_matching_loss(teacher, norm(data, default.images))
    assert without > 0.85 * before, (before, without)
    assert with_bn < 0.5 * without, (without, with_bn)


class StepRecorder:
    """Global optimiser step hooks: what recover's optimiser is and does, without
    touching production code. ``before`` holds each iterate as the step sees it
    (the previous one after its clamp), ``after`` it right after the update
    (before the clamp)."""

    def __init__(self):
        self.optimizers, self.lrs, self.before, self.after = [], [], [], []

    def __enter__(self):
        def pre(opt, args, kwargs):
            if not self.optimizers or self.optimizers[-1] is not opt:
                self.optimizers.append(opt)
                self.lrs.append([])
            self.lrs[-1].append(opt.param_groups[0]["lr"])
            self.before.append(opt.param_groups[0]["params"][0].detach().clone())

        def post(opt, args, kwargs):
            self.after.append(opt.param_groups[0]["params"][0].detach().clone())

        self.handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_sre2l_clamps_every_iterate_to_the_valid_pixel_range(data, teacher, monkeypatch):
    stored = []
    real_store = sre2l_module.store_images

    def store_images(images, precision):
        stored.append(images.clone())
        return real_store(images, precision)
    monkeypatch.setattr(sre2l_module, "store_images", store_images)
    mean, std = torch.tensor(data.info.mean).view(1, -1, 1, 1), torch.tensor(data.info.std).view(1, -1, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    with StepRecorder() as rec:  # lr 2: Adam's first steps move pixels ~2 std, far past the range
        out = synthesize("sre2l", data, teacher, make("sre2l", ipc=1, iterations=6, lr=2.0, precision="float32"),
                         seed=0)
    assert len(rec.before) == len(rec.after) == 6
    assert (rec.before[0] < lo).any()  # N(0, 1) noise starts partly outside, as in SRe2L
    assert any(((a < lo - 0.1) | (a > hi + 0.1)).any() for a in rec.after)  # the updates overshoot...
    for x in rec.before[1:]:  # ...and every iterate after a step is back inside
        assert (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all()
        assert (x == lo).any()  # pinned at the bound, not squashed or rescaled
    # The last iterate is inside too before store_images' own clamp to [0, 1].
    (last,) = stored
    assert last.min() >= -1e-6 and last.max() <= 1 + 1e-6 and (last < 1e-6).any()
    assert out.images.min() >= 0 and out.images.max() <= 1


def test_sre2l_adam_betas_and_cosine_lr_per_batch(data, teacher):
    steps, lr = 8, 0.3
    with StepRecorder() as rec:
        synthesize("sre2l", data, teacher, make("sre2l", ipc=2, iterations=steps, lr=lr, batch_size=10), seed=0)
    assert len(rec.optimizers) == 2  # a fresh optimiser (and schedule) per batch of 10
    for opt, lrs in zip(rec.optimizers, rec.lrs):
        assert type(opt) is torch.optim.Adam
        group = opt.param_groups[0]
        assert tuple(group["betas"]) == (0.5, 0.9) and group["eps"] == 1e-8 and group["weight_decay"] == 0
        assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * i / steps)) * lr for i in range(steps)])
    assert rec.lrs[0][0] == pytest.approx(lr) and rec.lrs[0][-1] < 0.05 * lr


def record_rolls(monkeypatch):
    drawn = []
    real_roll = torch.roll

    def roll(x, shifts, dims=None):
        drawn.append(tuple(shifts))
        return real_roll(x, shifts, dims)
    monkeypatch.setattr(torch, "roll", roll)
    return drawn


def test_sre2l_jitter_rolls_stay_within_the_configured_range(data, teacher, monkeypatch):
    rolls = record_rolls(monkeypatch)
    out = synthesize("sre2l", data, teacher, make("sre2l", ipc=1, iterations=60, jitter=3), seed=0)
    assert out.meta["jitter"] == 3 and len(rolls) == 60
    # SRe2L's recover draws each offset with random.randint(0, jitter): 0..jitter inclusive.
    assert {dx for dx, _ in rolls} == {0, 1, 2, 3} and {dy for _, dy in rolls} == {0, 1, 2, 3}
    assert len(set(rolls)) > 8  # the two offsets are drawn independently
    rolls.clear()
    out = synthesize("sre2l", data, teacher, make("sre2l", ipc=1, iterations=30), seed=0)
    assert out.meta["jitter"] == 2  # default at 16 px: size // 8
    assert len(rolls) == 30 and {v for r in rolls for v in r} == {0, 1, 2}
    rolls.clear()
    synthesize("sre2l", data, teacher, make("sre2l", ipc=1, iterations=5, jitter=0), seed=0)
    assert rolls == []


def test_study_validation_catches_a_teacher_without_batchnorm(tmp_path):
    text = textwrap.dedent("""\
        name: nobn
        dataset: {name: digits}
        teachers: [{arch: convnet3-w16, epochs: 1}]
        methods:
          - {name: random_real, ipc: 2}
          - {name: cda, ipc: 2}
        """)
    study = load_study(tmp_path / "nobn.yaml", text=text)
    with pytest.raises(StudyError) as err:
        expand(study)
    assert len(err.value.messages) == 1
    message = err.value.messages[0]
    assert "nobn.yaml:6" in message and "methods[1].name" in message and "BatchNorm" in message
    assert "convnet3-w16" in message
    expand(load_study(tmp_path / "bn.yaml", text=text.replace("convnet3-w16,", "convnet3-w16-bn,")))


# --- CDA -----------------------------------------------------------------------------

def test_cda_curriculum_shapes():
    cos = CDAParams()
    assert min_scale(cos, 0.0) == pytest.approx(1.0)
    assert min_scale(cos, 0.5) == pytest.approx(0.08 + 0.92 * 0.5)
    assert min_scale(cos, 0.999) == pytest.approx(0.08, abs=1e-4)
    ts = [i / 100 for i in range(100)]
    values = [min_scale(cos, t) for t in ts]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert min_scale(CDAParams(curriculum="linear"), 0.25) == pytest.approx(1 - 0.92 * 0.25)
    assert {min_scale(CDAParams(curriculum="step"), t) for t in ts} == {1.0}
    half = CDAParams(milestone=0.5)
    assert min_scale(half, 0.25) == pytest.approx(0.54) and min_scale(half, 0.6) == pytest.approx(0.08)
    with pytest.raises(ConfigError, match="crop"):
        make("cda", crop="none")


def test_cda_crops_follow_the_curriculum(data, teacher):
    params = make("cda", ipc=2, iterations=40)
    distilled, trace = recover(data, teacher, params, 0, Runtime(), lambda t: min_scale(params, t))
    expected = [min_scale(params, i / 40) for i in range(40)]
    assert trace["min_scale"] == pytest.approx(expected)
    areas = trace["crop_area"]  # mean area fraction of the crops actually drawn
    assert all(a >= s - 0.02 for a, s in zip(areas, expected))
    assert sum(areas[:6]) / 6 > 0.95 and sum(areas[-6:]) / 6 < 0.75
    _, plain = recover(data, teacher, make("sre2l", ipc=2, iterations=10, crop="rrc"), 0, Runtime())
    assert set(plain["min_scale"]) == {0.08}  # SRe2L: no curriculum
    assert distilled.images.shape == (20, 1, 16, 16)


# --- RDED ----------------------------------------------------------------------------

def test_rded_picks_score_lower_teacher_ce_than_random_crops_of_the_same_images(data, teacher):
    params = make("rded", ipc=5, candidates_per_class=40, crops_per_image=5, precision="float32")
    distilled, scores = rded_select(data, teacher, params, seed=0)
    assert distilled.images.shape == (50, 1, 16, 16)
    picked = teacher_ops.cross_entropy(teacher, norm(data, distilled.images), distilled.labels)
    assert torch.allclose(picked, scores, atol=1e-4)  # the stored images are what was scored
    sources = as_float(data.train.images[distilled.source_indices])
    rand = random_crops(sources, 1, 16, params.crop_scale, generator(99, "other crops"))
    random_ce = teacher_ops.cross_entropy(teacher, norm(data, rand), distilled.labels)
    assert picked.mean() < 0.5 * random_ce.mean(), (picked.mean(), random_ce.mean())
    for c in range(10):
        sel = distilled.labels == c
        assert picked[sel].mean() <= random_ce[sel].mean()


def test_rded_tiles_f_by_f():
    n, f, side = 3, 2, 4
    patches = torch.arange(f * f * n, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, side, side)
    images = tile(patches, f, n, f * side)
    for i in range(n):
        for k in range(f * f):
            r, c = divmod(k, f)
            block = images[i, 0, r * side:(r + 1) * side, c * side:(c + 1) * side]
            assert (block == k * n + i).all()


def test_rded_factor_two_on_digits(data, teacher):
    out = synthesize("rded", data, teacher, make("rded", ipc=2, factor=2, candidates_per_class=30), seed=1)
    assert out.images.shape == (20, 1, 16, 16) and out.source_indices.shape == (20, 4)
    assert (data.train.labels[out.source_indices] == out.labels[:, None]).all()
    with pytest.raises(ValueError, match="fewer than ipc"):
        synthesize("rded", data, teacher, make("rded", ipc=60, factor=2), seed=1)


# --- herding, full_real, random_real ---------------------------------------------------

def test_herding_mean_is_closer_to_the_class_mean_than_random_subsets(data, teacher):
    ipc = 5
    out = synthesize("herding", data, teacher, make("herding", ipc=ipc), seed=0)
    assert torch.equal(data.train.labels[out.source_indices], out.labels)
    gen = generator(7, "random subsets")
    herd_all, rand_all = [], []
    for c in range(10):
        members = torch.nonzero(data.train.labels == c).flatten()
        feats = class_features(data, teacher, members, True)
        mu = feats.mean(0)
        chosen = torch.isin(members, out.source_indices)
        herd_dist = torch.linalg.vector_norm(feats[chosen].mean(0) - mu)
        rand_dist = torch.stack([torch.linalg.vector_norm(feats[torch.randperm(len(members), generator=gen)[:ipc]]
                                                          .mean(0) - mu) for _ in range(50)])
        assert herd_dist < rand_dist.mean(), (c, float(herd_dist), float(rand_dist.mean()))
        herd_all.append(float(herd_dist))
        rand_all.append(float(rand_dist.mean()))
    assert sum(herd_all) < 0.6 * sum(rand_all), (herd_all, rand_all)


def test_full_real_is_the_whole_split_and_shared_by_seeds(data):
    out = synthesize("full_real", data, None, make("full_real"), seed=0)
    assert torch.equal(out.images, data.train.images) and torch.equal(out.labels, data.train.labels)
    method = METHODS.get("full_real")
    assert method.key_inputs(make("full_real"), 0) == method.key_inputs(make("full_real"), 1)
    with pytest.raises(ConfigError, match="whole training split"):
        make("full_real", ipc=10)
    rr = METHODS.get("random_real")
    assert rr.key_inputs(make("random_real"), 0) != rr.key_inputs(make("random_real"), 1)


def test_random_real_is_class_balanced_seeded_and_without_duplicates(data):
    a = synthesize("random_real", data, None, make("random_real", ipc=7), seed=0)
    b = synthesize("random_real", data, None, make("random_real", ipc=7), seed=0)
    c = synthesize("random_real", data, None, make("random_real", ipc=7), seed=1)
    idx = a.source_indices
    assert idx.shape == (70,) and len(set(idx.tolist())) == 70
    assert torch.equal(torch.bincount(a.labels, minlength=10), torch.full((10,), 7))
    assert torch.equal(data.train.labels[idx], a.labels)  # the labels are the images' own
    assert torch.equal(a.images, data.train.images[idx])
    assert torch.equal(b.source_indices, idx) and torch.equal(b.images, a.images)
    assert not torch.equal(c.source_indices, idx)
    assert len(set(c.source_indices.tolist()) & set(idx.tolist())) < 35  # a different draw, not a reshuffle
    with pytest.raises(ValueError, match="fewer than ipc"):
        synthesize("random_real", data, None, make("random_real", ipc=1000), seed=0)


# --- external sets ---------------------------------------------------------------------

def test_imported_soft_labels_are_flagged_not_silently_ignored(data, tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.arange(10).repeat(2)
    torch.save({"images": images, "labels": labels, "soft_labels": torch.randn(20, 10, generator=gen)},
               tmp_path / "soft.pt")
    torch.save({"images": images, "labels": labels}, tmp_path / "plain.pt")
    with pytest.warns(UserWarning, match=r"soft labels in .*soft\.pt are not used by any label mode") as caught:
        out = synthesize("external", data, None, make("external", path=str(tmp_path / "soft.pt")), seed=0)
    assert "remove key 'soft_labels'" in str(caught[0].message)
    assert out.meta["warnings"] == [str(caught[0].message)]  # the stored set says so too
    assert out.soft_labels is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = synthesize("external", data, None, make("external", path=str(tmp_path / "plain.pt")), seed=0)
    assert "warnings" not in plain.meta and plain.soft_labels is None


def test_every_method_records_cost(data, teacher):
    for name, params in [("random_real", {"ipc": 1}), ("herding", {"ipc": 1}), ("rded", {"ipc": 1}),
                         ("sre2l", {"ipc": 1, "iterations": 2}), ("cda", {"ipc": 1, "iterations": 2})]:
        out = synthesize(name, data, teacher, make(name, **params), seed=0)
        assert out.meta["method"] == name and out.meta["wall_s"] > 0
        expected = out.images.numel() * out.images.element_size() + out.labels.numel() * 8
        assert out.meta["bytes"] == expected and out.meta["images"] == 10
        assert out.meta["made_with"]["seed"] == 0 and out.meta["made_with"]["params"]["ipc"] == 1
