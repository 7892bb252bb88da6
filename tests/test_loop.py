"""The training kernel: schedules, optimisers, EMA, evaluation settings,
determinism, and that the teacher labels exactly the batch the student sees."""
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from rd3core import Runtime
from rd3core.config import build
from rd3core.data import Split, carve_heldout, load_dataset
from rd3core.labels import EpochwiseLabels, HardLabels, TeacherEnsemble
from rd3core.loop import draw_views, evaluate, make_batch, make_optimizer, train
from rd3core.pipeline import TeacherSpec, build_model, posteval, train_teacher
from rd3core.protocol import OptimSpec, Protocol, ScheduleSpec, resolve_protocol
from rd3core.synth import synthesize
from rd3core.synth.random_real import RandomRealParams

ARCH = "convnet2-w8"


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher(digits):
    return train_teacher(digits, TeacherSpec(arch=ARCH, epochs=2, batch_size=256)).model


@pytest.fixture(scope="module")
def distilled(digits):
    return synthesize("random_real", digits, None, RandomRealParams(ipc=4), seed=0)


def protocol(**over):
    base = {"student": ARCH, "epochs": 3, "batch_size": 16, "augment": {"flip": False}, "loss": {"temperature": 4}}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return build(Protocol, base)


# ---------------------------------------------------------------------- schedules

@pytest.mark.parametrize("zeta", [1.0, 2.0, 3.0])
def test_smoothed_cosine_ends_at_half_one_plus_cos_pi_over_zeta(zeta):
    s = ScheduleSpec(name="cosine", zeta=zeta)
    assert s.factor(0, 10) == 1.0
    assert s.factor(10, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / zeta)))
    assert s.factor(5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5 / zeta)))


def test_cosine_to_zero_warmup_step_and_per_epoch():
    assert ScheduleSpec(zeta=1).factor(10, 10) == pytest.approx(0.0, abs=1e-12)
    warm = ScheduleSpec(warmup_epochs=4)
    assert [warm.factor(e, 20) for e in (0, 1, 2)] == [0.0, 0.25, 0.5]
    assert warm.factor(4, 20) == 1.0 and warm.factor(12, 20) == pytest.approx(0.5)
    step = ScheduleSpec(name="step", milestones=(3, 6), step_gamma=0.1)
    assert [step.factor(e, 9) for e in (0, 2.9, 3, 5.5, 6, 8)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    per_epoch = ScheduleSpec(per="epoch", zeta=2)
    assert per_epoch.factor(3.7, 10) == per_epoch.factor(3, 10) != per_epoch.factor(4, 10)
    assert ScheduleSpec(name="constant").factor(7.5, 10) == 1.0


def test_loop_sets_the_scheduled_lr(digits, distilled):
    p = protocol(epochs=4, labels={"mode": "hard"}, optim={"lr": 0.01}, schedule={"zeta": 2, "per": "epoch"})
    rows = posteval(distilled, digits, p, {}, seed=0)["epochs"]
    # The lr in effect during the last step of each epoch (per-epoch steps).
    assert [r["lr"] for r in rows] == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * e / 8)) for e in range(4)])


# ---------------------------------------------------------------------- optimisers

def test_optimizers_and_weight_decay_exclusion(digits):
    model = build_model("convnet2-w8-bn", digits, 0)
    assert isinstance(make_optimizer(model, OptimSpec(name="sgd", momentum=0.8)), torch.optim.SGD)
    assert isinstance(make_optimizer(model, OptimSpec(name="adam")), torch.optim.Adam)
    assert isinstance(make_optimizer(model, OptimSpec(name="adamw")), torch.optim.AdamW)
    opt = make_optimizer(model, OptimSpec(weight_decay=0.05, no_decay_norm_bias=True))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    one = make_optimizer(model, OptimSpec(weight_decay=0.05))
    assert len(one.param_groups) == 1 and one.param_groups[0]["weight_decay"] == 0.05


# ---------------------------------------------------------------------- the kernel

def test_teacher_labels_exactly_the_augmented_batch_the_student_sees(digits, teacher, distilled):
    p = protocol(augment={"crop": "rrc", "scale": [0.3, 1.0], "flip": True, "mix": "cutmix", "shuffle_patches": 2},
                 epochs=2)
    seen_by_teacher, seen_by_student = [], []

    class Recording(EpochwiseLabels):
        def __call__(self, x, idx, params, block, step):
            seen_by_teacher.append(x.clone())
            return super().__call__(x, idx, params, block, step)

    student = build_model(ARCH, digits, 0)
    student.register_forward_pre_hook(lambda m, args: seen_by_student.append(args[0].clone()) if m.training else None)
    train(student, Split(distilled.images, distilled.labels), digits.info, p,
          Recording(TeacherEnsemble([teacher])), batch_size=16, seed=5)
    assert len(seen_by_teacher) == len(seen_by_student) == 2 * 3
    for a, b in zip(seen_by_teacher, seen_by_student):
        assert torch.equal(a, b)
    # ... and it is the augmented batch drawn from the seed, not the clean one.
    views = draw_views(p.augment, 40, 16, (16, 16), (16, 16), 5, 0)
    idx = views.order[:16]
    expected = make_batch(distilled.images[idx], views.params[0], p.augment, digits.info, Runtime())
    assert torch.equal(seen_by_teacher[0], expected)
    assert not torch.equal(expected, digits.info.normalize(distilled.images[idx].float()))


@pytest.mark.parametrize("mode", ["hard", "static", "epochwise", "stored"])
def test_same_config_and_seed_gives_the_same_numbers_to_the_last_digit(digits, teacher, distilled, mode):
    p = protocol(labels={"mode": mode}, augment={"mix": "cutmix", "flip": True}, epochs=3)
    a = posteval(distilled, digits, p, {ARCH: teacher}, seed=1)
    b = posteval(distilled, digits, p, {ARCH: teacher}, seed=1)
    c = posteval(distilled, digits, p, {ARCH: teacher}, seed=2)
    assert a["metrics"] == b["metrics"]
    assert [r["loss"] for r in a["epochs"]] == [r["loss"] for r in b["epochs"]]
    assert [r["loss"] for r in a["epochs"]] != [r["loss"] for r in c["epochs"]]


@pytest.mark.parametrize("kind", ["kl", "soft_ce", "mse"])
@pytest.mark.parametrize("mode", ["static", "epochwise", "stored"])
def test_every_loss_trains_with_every_teacher_label_source(digits, teacher, distilled, kind, mode):
    p = protocol(labels={"mode": mode}, loss={"kind": kind, "gamma": 0.1}, epochs=2, ema_decay=0.9)
    out = posteval(distilled, digits, p, {ARCH: teacher}, seed=0, runtime=Runtime(channels_last=False))
    assert all(math.isfinite(r["loss"]) for r in out["epochs"]) and 0 <= out["metrics"]["top1"] <= 1


def test_memory_layout_changes_speed_not_results(digits, teacher, distilled):
    # NHWC (the default) and NCHW compute the same functions; only the summation
    # order inside the kernels differs, so losses agree to float rounding.
    p = protocol(labels={"mode": "epochwise"}, augment={"mix": "cutmix", "flip": True}, epochs=2)
    nhwc = posteval(distilled, digits, p, {ARCH: teacher}, seed=3, runtime=Runtime(channels_last=True))
    nchw = posteval(distilled, digits, p, {ARCH: teacher}, seed=3, runtime=Runtime(channels_last=False))
    assert [r["loss"] for r in nhwc["epochs"]] == pytest.approx([r["loss"] for r in nchw["epochs"]], rel=1e-4)
    assert Runtime().channels_last and Runtime.auto().channels_last


def test_run_records_epochs_phases_throughput_and_memory(digits, teacher, distilled):
    out = posteval(distilled, digits, protocol(epochs=3, loss={"temperature_end": 1.0}), {ARCH: teacher}, seed=0)
    assert [r["epoch"] for r in out["epochs"]] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and 0 <= r["train_top1"] <= 1 for r in out["epochs"])
    assert [r["temperature"] for r in out["epochs"]] == [4.0, 2.5, 1.0]
    t = out["timing"]
    for key in ("train_s", "eval_s", "images_per_s", "peak_memory_bytes", "phase_augment_s", "phase_labels_s",
                "phase_student_s", "phase_load_s", "setup_s"):
        assert key in t and t[key] >= 0
    assert t["phase_labels_s"] > 0 and t["peak_memory_bytes"] > 1e6
    assert 0 <= out["metrics"]["top1"] <= 1 and "test_top1" in out["epochs"][-1]


def test_ema_weights_are_what_is_evaluated(digits, distilled):
    p_raw = protocol(labels={"mode": "hard"}, epochs=2)
    p_ema = protocol(labels={"mode": "hard"}, epochs=2, ema_decay=0.9)
    data = Split(distilled.images, distilled.labels)
    raw_model = build_model(ARCH, digits, 0)
    raw = train(raw_model, data, digits.info, p_raw, HardLabels(), batch_size=16, seed=0, test=digits.test)
    student = build_model(ARCH, digits, 0)
    ema = train(student, data, digits.info, p_ema, HardLabels(), batch_size=16, seed=0, test=digits.test)
    assert ema.model is not student
    # The raw student trained exactly as without EMA; the EMA lags behind it.
    for a, b in zip(raw_model.parameters(), student.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(ema.model.parameters(), student.parameters()))
    assert ema.metrics["top1"] == evaluate(ema.model, digits.test, digits.info, Runtime())


@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_ema_is_the_decay_recurrence_bit_for_bit(digits, distilled, decay):
    # ema_0 = the initial weights; after every optimiser step ema = lerp(ema, w, 1 - decay)
    # (swa_utils' EMA update); buffers are the student's own.
    data = Split(distilled.images, distilled.labels)
    student = build_model(ARCH, digits, 0)
    ema = [p.detach().clone() for p in student.parameters()]
    hook = register_optimizer_step_post_hook(
        lambda *_: [e.lerp_(p.detach(), 1.0 - decay) for e, p in zip(ema, student.parameters())])
    try:
        out = train(student, data, digits.info, protocol(labels={"mode": "hard"}, epochs=2, ema_decay=decay),
                    HardLabels(), batch_size=16, seed=0)
    finally:
        hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(out.model.parameters(), ema))
    assert all(torch.equal(a, b) for a, b in zip(out.model.buffers(), student.buffers()))


def test_eval_interval_best_on_test_and_heldout_are_named_apart(digits, distilled):
    p = protocol(labels={"mode": "hard"}, epochs=4, eval={"interval": 2, "record_best_on_test": True})
    carved = carve_heldout(digits, 3)  # the held-out split is the dataset's (tests/test_heldout.py)
    out = posteval(synthesize("random_real", carved, None, RandomRealParams(ipc=4), seed=0), carved, p, {}, seed=0)
    evaluated = [r["epoch"] for r in out["epochs"] if "test_top1" in r]
    assert evaluated == [2, 4]
    m = out["metrics"]
    assert m["top1"] == out["epochs"][-1]["test_top1"]
    assert m["top1_best_on_test"] == max(r["test_top1"] for r in out["epochs"] if "test_top1" in r)
    assert m["heldout_selected_epoch"] in (2.0, 4.0) and "top1_heldout_selected" in m
    plain = posteval(distilled, digits, protocol(labels={"mode": "hard"}, epochs=4), {}, seed=0)
    assert set(plain["metrics"]) == {"top1", "final_loss"}
    late = protocol(labels={"mode": "hard"}, epochs=4, eval={"interval": 1, "record_best_on_test": True,
                                                              "best_after_fraction": 0.5})
    rows = posteval(distilled, digits, late, {}, seed=0)
    assert rows["metrics"]["top1_best_on_test"] == max(r["test_top1"] for r in rows["epochs"][2:])


def test_flip_tta_sums_the_logits_of_both_views(digits):
    model = build_model(ARCH, digits, 3).eval()
    x = digits.info.normalize(digits.test.images.float())
    with torch.no_grad():
        expected = ((model(x) + model(torch.flip(x, dims=[3]))).argmax(1) == digits.test.labels).float().mean()
    assert evaluate(model, digits.test, digits.info, Runtime(), flip_tta=True) == pytest.approx(float(expected))


def test_rded_batch_rule_is_used_by_posteval(digits, distilled):
    p = resolve_protocol("rded", "digits", {"student": ARCH, "epochs": 1, "labels": {"mode": "hard"}})
    assert posteval(distilled, digits, p, {}, seed=0)["resolved"]["batch_size"] == 10  # IPC 4 -> rung IPC1


def test_teacher_pretraining_records_its_test_accuracy(digits, teacher):
    result = train_teacher(digits, TeacherSpec(arch=ARCH, epochs=1, batch_size=256))
    assert 0.1 < result.metrics["top1"] <= 1
