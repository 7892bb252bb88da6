"""Batched augmentation: every drawn parameter is checked against the pixels it
produced, and apply() is a pure function of the parameters."""
import math
from dataclasses import replace

import pytest
import torch

from rd3core import augment as aug
from rd3core.augment import AugmentSpec, AugParams


def images(n=8, c=3, h=16, w=16, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seed", range(20))
def test_cutmix_box_and_lambda_match_the_mixed_pixels(seed):
    x = images()
    spec = AugmentSpec(crop="none", flip=False, mix="cutmix", mix_alpha=1.0)
    out, p = aug.augment(x, spec, gen(seed))
    y0, y1, x0, x1 = p.mix_box
    partner = x[p.mix_perm]
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert torch.equal(out[:, :, inside], partner[:, :, inside])
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
    assert p.mix_lam == pytest.approx(1 - inside.sum().item() / 256)
    assert 0 <= p.mix_lam <= 1


def test_mixup_blends_with_the_recorded_partner_and_lambda():
    x = images()
    out, p = aug.augment(x, AugmentSpec(crop="none", flip=False, mix="mixup", mix_alpha=0.8), gen(3))
    assert p.mix_box is None and 0 < p.mix_lam < 1
    torch.testing.assert_close(out, p.mix_lam * x + (1 - p.mix_lam) * x[p.mix_perm])


def test_mix_prob_zero_never_mixes():
    p = aug.draw(AugmentSpec(mix="cutmix", mix_prob=0.0), 8, 16, 16, gen())
    assert not p.mixed() and p.mix_lam == 1.0


def test_flip_mirrors_exactly_the_flagged_images():
    x = images()
    out, p = aug.augment(x, AugmentSpec(crop="none", flip=True, mix="none"), gen(1))
    assert 0 < p.flip.sum() < len(x)
    torch.testing.assert_close(out[p.flip], torch.flip(x[p.flip], dims=[3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~p.flip], x[~p.flip], atol=1e-5, rtol=0)


def test_crop_box_is_the_slice_it_names():
    x = images(n=2)
    boxes = torch.tensor([[2, 3, 8, 8], [8, 0, 8, 8]], dtype=torch.int16)
    p = AugParams(n=2, in_hw=(16, 16), out_hw=(8, 8), crop=boxes)
    out = aug.apply(x, p, AugmentSpec(mix="none"))
    torch.testing.assert_close(out[0], x[0, :, 2:10, 3:11], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1, :, 8:16, 0:8], atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_padded_crop_is_an_integer_shift_with_zero_fill(seed):
    x = images()
    out, p = aug.augment(x, AugmentSpec(crop="pad", padding=4, flip=False, mix="none"), gen(seed))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        top, left = int(p.crop[i, 0]) + 4, int(p.crop[i, 1]) + 4
        torch.testing.assert_close(out[i], padded[i, :, top:top + 16, left:left + 16], atol=1e-5, rtol=0)


def test_rrc_boxes_respect_scale_and_ratio():
    spec = AugmentSpec(crop="rrc", scale=(0.25, 0.5), ratio=(0.75, 4 / 3), flip=False, mix="none")
    p = aug.draw(spec, 500, 32, 32, gen())
    top, left, h, w = p.crop.float().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    # Rounding of the sides moves the area by up to about one row and column.
    assert (area > 0.25 - 2 * 33 / 1024).all() and (area < 0.5 + 2 * 33 / 1024).all()
    assert area.std() > 0.02  # actually random


def test_rrc_output_size_differs_from_input_for_streamed_decodes():
    x = images(n=4, h=36, w=36)
    out, p = aug.augment(x, AugmentSpec(crop="rrc", mix="cutmix"), gen(), out_hw=(32, 32))
    assert out.shape == (4, 3, 32, 32) and p.in_hw == (36, 36)
    assert p.mix_box[1] <= 32 and p.mix_box[3] <= 32  # the CutMix box lives on the output


def test_shuffle_patches_permutes_column_then_row_strips():
    x = images(n=6, h=16, w=16)
    out, p = aug.augment(x, AugmentSpec(crop="none", flip=False, mix="none", shuffle_patches=2), gen(2))
    for i in range(6):
        cols, rows = p.patch_cols[i].long(), p.patch_rows[i].long()
        for r in range(2):
            for c in range(2):
                sr, sc = rows[r], cols[c]
                assert torch.equal(out[i, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8],
                                   x[i, :, 8 * sr:8 * sr + 8, 8 * sc:8 * sc + 8])
    assert not torch.equal(out, x)  # some image was shuffled


def test_shuffle_patches_keeps_a_border_that_f_does_not_divide():
    x = images(n=3, h=17, w=17)
    swap, keep = torch.tensor([[1, 0]] * 3, dtype=torch.int8), torch.tensor([[0, 1]] * 3, dtype=torch.int8)
    out = aug.shuffle_patches(x, swap, keep)
    assert torch.equal(out[..., 16], x[..., 16])  # the 17th column stays
    assert torch.equal(out[..., :8], x[..., 8:16]) and torch.equal(out[..., 8:16], x[..., :8])
    rows = aug.shuffle_patches(x, keep, swap)
    assert torch.equal(rows[:, :, :8], x[:, :, 8:16]) and torch.equal(rows[:, :, 16], x[:, :, 16])


def test_randaugment_is_a_pure_function_of_its_params():
    x = images(n=16)
    spec = AugmentSpec(crop="none", flip=False, mix="none", randaugment=(2, 9))
    p = aug.draw(spec, 16, 16, 16, gen(4))
    a, b = aug.apply(x, p, spec), aug.apply(x, p, spec)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert a.min() >= -1e-6 and a.max() <= 1 + 1e-6
    identity = AugParams(n=16, in_hw=(16, 16), out_hw=(16, 16), ra_ops=torch.zeros(16, 2, dtype=torch.int8),
                         ra_signs=torch.ones(16, 2, dtype=torch.int8))
    assert torch.equal(aug.apply(x, identity, spec), x)


def test_randaugment_equalize_needs_randaugment_and_leaves_the_other_draws_alone():
    assert dict(AugmentSpec(randaugment_equalize=True).validate()) == {
        "randaugment_equalize": "has no effect without randaugment"}
    base = AugmentSpec(crop="rrc", mix="cutmix", randaugment=(2, 9))
    off, on = aug.draw(base, 64, 16, 16, gen(3)), aug.draw(replace(base, randaugment_equalize=True), 64, 16, 16, gen(3))
    # Off, the op ids are the 13-op draws every stored label holds (equalize never
    # drawn); on, the same generator calls with 14 choices: nothing else moves.
    assert off.ra_ops.max() < 13 and (on.ra_ops == 13).any()
    assert torch.equal(off.crop, on.crop) and torch.equal(off.mix_perm, on.mix_perm) and off.mix_box == on.mix_box


def test_same_seed_same_draw_and_state_round_trip():
    spec = AugmentSpec(crop="rrc", mix="cutmix", shuffle_patches=2, randaugment=(2, 5))
    a, b = aug.draw(spec, 8, 16, 16, gen(7)), aug.draw(spec, 8, 16, 16, gen(7))
    c = AugParams.from_state(a.state())
    x = images()
    assert torch.equal(aug.apply(x, a, spec), aug.apply(x, b, spec))
    assert torch.equal(aug.apply(x, a, spec), aug.apply(x, c, spec))
    assert not torch.equal(aug.apply(x, aug.draw(spec, 8, 16, 16, gen(8)), spec), aug.apply(x, a, spec))


def test_applying_to_the_wrong_input_size_is_refused():
    p = aug.draw(AugmentSpec(), 4, 16, 16, gen())
    with pytest.raises(ValueError, match="drawn for"):
        aug.apply(images(n=4, h=32, w=32), p, AugmentSpec())


def test_cutmix_lambda_is_beta_distributed():
    lams = [aug.draw(AugmentSpec(crop="none", flip=False), 4, 64, 64, gen(s)).mix_lam for s in range(400)]
    # lam ~ Beta(1, 1) before the box is clipped to the image, which only
    # shrinks the pasted area: the kept share is at least the drawn lam, so its
    # mean lies between 0.5 and 0.75 and it still spans most of [0, 1].
    mean = sum(lams) / len(lams)
    assert 0.5 < mean < 0.75 and min(lams) < 0.25 and max(lams) > 0.95
    assert not math.isnan(mean)
