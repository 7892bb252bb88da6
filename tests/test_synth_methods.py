"""Each synthesis method does its job, on digits with a small BatchNorm teacher
trained once for the module (a few seconds on a CPU)."""
import textwrap

import pytest
import torch

from orchestrator.expand import expand
from orchestrator.spec import StudyError, load_study
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


def test_every_method_records_cost(data, teacher):
    for name, params in [("random_real", {"ipc": 1}), ("herding", {"ipc": 1}), ("rded", {"ipc": 1}),
                         ("sre2l", {"ipc": 1, "iterations": 2}), ("cda", {"ipc": 1, "iterations": 2})]:
        out = synthesize(name, data, teacher, make(name, **params), seed=0)
        assert out.meta["method"] == name and out.meta["wall_s"] > 0
        expected = out.images.numel() * out.images.element_size() + out.labels.numel() * 8
        assert out.meta["bytes"] == expected and out.meta["images"] == 10
        assert out.meta["made_with"]["seed"] == 0 and out.meta["made_with"]["params"]["ipc"] == 1
