"""Our batched augmentation against torchvision.transforms.v2 on the same draws.

Each op's parameters are drawn once (our crop box and flip mask, a RandAugment
op, sign and magnitude, a CutMix lambda and centre) and torchvision's functional
op is applied with those parameters; the outputs agree within the tolerance each
test states, and where ours differs on purpose the test says where (the list is
in docs/PROTOCOL.md, "Fidelity to torchvision"). Where torchvision draws the
parameters itself (RandomResizedCrop's box, CutMix's and MixUp's lambda), the two
distributions are compared over many seeded draws, so every test is
deterministic. The last tests plant a bug into what each check compares and see
the check catch it.

torchvision is pinned (constraints.txt); its RandAugment magnitude table is read
from the class (``_AUGMENTATION_SPACE``) so that our scales are checked against
the table itself rather than against our reading of it.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from rd3core import augment as aug
from rd3core import randaugment as ra
from rd3core.augment import AugmentSpec, AugParams
from rd3core.losses import hard_ce

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BILINEAR = InterpolationMode.BILINEAR
TV_SPACE = v2.RandAugment._AUGMENTATION_SPACE
TV_NAME = {"identity": "Identity", "brightness": "Brightness", "color": "Color", "contrast": "Contrast",
           "sharpness": "Sharpness", "posterize": "Posterize", "solarize": "Solarize",
           "autocontrast": "AutoContrast", "equalize": "Equalize", "rotate": "Rotate", "shear_x": "ShearX",
           "shear_y": "ShearY", "translate_x": "TranslateX", "translate_y": "TranslateY"}


def images(n=8, c=3, h=16, w=16, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ crop and flip

def crop_flip_gap(x: torch.Tensor, p: AugParams, out: torch.Tensor) -> float:
    """Largest |ours - torchvision| over the pixels whose sampling point lies
    inside the crop box, torchvision being resized_crop (bilinear, no antialias)
    then horizontal_flip where flipped."""
    oh, ow = p.out_hw
    gap = 0.0
    for i in range(p.n):
        top, left, h, w = (int(v) for v in p.crop[i])
        ref = TF.resized_crop(x[i], top, left, h, w, [oh, ow], interpolation=BILINEAR, antialias=False)
        # Where a sampling point falls outside the box (the outer half pixel of an
        # enlarged crop), ours reads the image's neighbouring pixels (zeros beyond
        # its edge) and torchvision repeats the box's edge pixel.
        ys = top + (torch.arange(oh) + 0.5) * h / oh - 0.5
        xs = left + (torch.arange(ow) + 0.5) * w / ow - 0.5
        inside = ((ys >= top) & (ys <= top + h - 1))[:, None] & ((xs >= left) & (xs <= left + w - 1))[None, :]
        if p.flip is not None and p.flip[i]:
            ref, inside = TF.horizontal_flip(ref), inside.flip(1)
        gap = max(gap, (out[i].cpu() - ref).abs()[:, inside].max().item())
    return gap


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_hw,out_hw,scale", [((32, 32), (32, 32), (0.08, 1.0)), ((36, 36), (32, 32), (0.08, 1.0)),
                                                ((24, 40), (16, 16), (0.3, 1.0)), ((64, 64), (32, 32), (0.5, 1.0))])
def test_resized_crop_and_flip_match_torchvision_inside_the_box(device, in_hw, out_hw, scale):
    # Tolerance 1e-5: both sample with bilinear weights; ours computes the source
    # coordinate through a normalised affine map, torchvision through interpolate's
    # scale, which differ in float32 rounding only (seen: <= 4e-6).
    x = images(64, h=in_hw[0], w=in_hw[1], seed=1)
    spec = AugmentSpec(crop="rrc", scale=scale, flip=True, mix="none")
    p = aug.draw(spec, 64, *in_hw, torch.Generator().manual_seed(2), out_hw)
    assert 0 < p.flip.sum() < 64
    assert crop_flip_gap(x, p, aug.apply(x.to(device), p, spec)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_whole_image_crop_flip_and_padded_crop_are_exact_everywhere(device):
    # RDED's f = 1 recipe (RRC(1, 1), every CIFAR cell of the shipped studies) crops
    # the whole image: no resampling, so flip is exact up to the border.
    x = images(32, h=32, w=32)
    spec = AugmentSpec(crop="rrc", scale=(1.0, 1.0), flip=True, mix="none")
    p = aug.draw(spec, 32, 32, 32, torch.Generator().manual_seed(0))
    assert (p.crop == torch.tensor([0, 0, 32, 32], dtype=torch.int16)).all()
    out = aug.apply(x.to(device), p, spec).cpu()
    ref = torch.where(p.flip.view(-1, 1, 1, 1), TF.horizontal_flip(x), x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # RandomCrop(size, padding, fill 0): ours records the shift from the unpadded origin.
    spec = AugmentSpec(crop="pad", padding=4, flip=False, mix="none")
    p = aug.draw(spec, 32, 32, 32, torch.Generator().manual_seed(1))
    out = aug.apply(x.to(device), p, spec).cpu()
    padded = TF.pad(x, [4, 4, 4, 4], fill=0)
    for i in range(32):
        top, left = int(p.crop[i, 0]) + 4, int(p.crop[i, 1]) + 4
        torch.testing.assert_close(out[i], TF.crop(padded[i], top, left, 32, 32), atol=1e-6, rtol=0)


def tv_rrc_boxes(n: int, h: int, w: int, scale, ratio, seed: int) -> torch.Tensor:
    t = v2.RandomResizedCrop(8, scale=scale, ratio=ratio)
    torch.manual_seed(seed)
    blank = torch.zeros(1, h, w)
    return torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                         for p in (t.make_params([blank]) for _ in range(n))])


def box_distribution_p(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The smallest p-value of: chi-square on the joint (height, width) counts, KS
    on top, KS on left. Rare (h, w) pairs are pooled so every column holds >= 10."""
    pairs = sorted({tuple(r) for r in torch.cat([ours, theirs])[:, 2:].tolist()})
    count = {hw: [0, 0] for hw in pairs}
    for side, boxes in enumerate((ours, theirs)):
        for hw in map(tuple, boxes[:, 2:].tolist()):
            count[hw][side] += 1
    table = np.array(list(count.values())).T
    common = table.sum(0) >= 10
    table = np.column_stack([table[:, common], table[:, ~common].sum(1)])
    table = table[:, table.sum(0) > 0]
    ps = [stats.chi2_contingency(table).pvalue if table.shape[1] > 1 else 1.0]
    ps += [stats.ks_2samp(ours[:, k].numpy(), theirs[:, k].numpy()).pvalue for k in (0, 1)]
    return min(ps)


RRC_CASES = [((32, 32), (0.08, 1.0), (3 / 4, 4 / 3)),  # the field's default
             ((24, 40), (0.2, 1.0), (0.5, 1.5))]  # non-square and an asymmetric ratio: an axis swap shows


@pytest.mark.parametrize("hw,scale,ratio", RRC_CASES)
def test_rrc_box_distribution_matches_torchvision(hw, scale, ratio):
    # 20,000 boxes each, fixed seeds. A threshold of 1e-3 on the smallest of three
    # p-values: the same sampler passes with room (seen 0.03 to 0.99 across seeds),
    # a swapped axis scores 1e-200 (test_planted_bugs_fail_the_checks).
    ours = aug._rrc_boxes(20000, *hw, AugmentSpec(scale=scale, ratio=ratio), torch.Generator().manual_seed(0))
    assert box_distribution_p(ours.long(), tv_rrc_boxes(20000, *hw, scale, ratio, seed=0)) > 1e-3


def test_rrc_whole_image_scale_falls_back_like_torchvision():
    # scale (1, 1) at ratio (3/4, 4/3): every box torchvision gives is the whole image
    # (a valid try rounds to it, or the fallback takes it); ours must too.
    ours = aug._rrc_boxes(2000, 32, 32, AugmentSpec(scale=(1.0, 1.0)), torch.Generator().manual_seed(0))
    theirs = tv_rrc_boxes(2000, 32, 32, (1.0, 1.0), (3 / 4, 4 / 3), seed=0)
    assert (theirs == torch.tensor([0, 0, 32, 32])).all() and (ours.long() == torch.tensor([0, 0, 32, 32])).all()


# ------------------------------------------------------------ RandAugment ops

def tv_magnitude(op: str, magnitude: int, hw) -> float:
    table = TV_SPACE[TV_NAME[op]][0](31, *hw)
    return 0.0 if table is None else float(table[magnitude])


def tv_op(op: str, x: torch.Tensor, sign: int, magnitude: int) -> torch.Tensor:
    """torchvision's RandAugment op on float images in [0, 1] at our sign and
    magnitude bin (posterize on the image as uint8), called the way ours works
    where the two differ on purpose: bilinear (torchvision's RandAugment samples
    nearest), shear about the image centre (torchvision's: the top-left corner,
    a further shift of up to shear x height / 2 pixels) and the translation not
    truncated to whole pixels (torchvision's is)."""
    h, w = x.shape[-2:]
    m = sign * tv_magnitude(op, magnitude, (h, w))
    if op == "identity":
        return x
    if op in ("brightness", "color", "contrast", "sharpness"):
        fn = {"brightness": TF.adjust_brightness, "color": TF.adjust_saturation,
              "contrast": TF.adjust_contrast, "sharpness": TF.adjust_sharpness}[op]
        return fn(x, 1.0 + m)
    if op == "posterize":
        return TF.posterize((x * 255).round().to(torch.uint8), int(tv_magnitude(op, magnitude, (h, w)))) / 255
    if op == "solarize":
        return TF.solarize(x, tv_magnitude(op, magnitude, (h, w)))
    if op in ("autocontrast", "equalize"):
        return TF.autocontrast(x) if op == "autocontrast" else TF.equalize(x)
    if op == "rotate":
        return TF.rotate(x, m, interpolation=BILINEAR)
    if op.startswith("shear"):
        shear = math.degrees(math.atan(m))
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, interpolation=BILINEAR,
                         shear=[shear, 0.0] if op == "shear_x" else [0.0, shear], center=[w / 2, h / 2])
    # Our sign +1 moves the content towards -x (-y): the same fair coin, mirrored.
    return TF.affine(x, angle=0.0, translate=[-m, 0.0] if op == "translate_x" else [0.0, -m], scale=1.0,
                     shear=[0.0, 0.0], interpolation=BILINEAR)


# Beyond float32 rounding (1e-5): color and contrast take luma with 0.299 for red
# where torchvision takes 0.2989, |diff| <= 1e-4 * |1 - factor| <= 9e-5.
TOLERANCE = {"color": 1e-4, "contrast": 1e-4}


def op_gap(op: str, x: torch.Tensor, signs: torch.Tensor, magnitude: int, device: str) -> float:
    n = x.shape[0]
    ops = torch.full((n, 1), ra.OPS.index(op), dtype=torch.int8)
    if op == "posterize":
        x = (x * 255).round() / 255  # posterize is torchvision's uint8 op
    ours = ra.apply_randaugment(x.to(device), ops, signs.view(n, 1).to(torch.int8), magnitude).cpu()
    ref = torch.stack([tv_op(op, x[i:i + 1], int(signs[i]), magnitude)[0] for i in range(n)])
    if op == "sharpness":
        # torchvision leaves the 1-pixel border unsharpened; ours blurs it with the edge replicated.
        ours, ref = ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1]
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ra.OPS)
def test_randaugment_ops_match_torchvision_on_the_same_draws(op, device):
    x = images(8, h=16, w=20)
    signs = torch.tensor([1, -1] * 4)
    for magnitude in (0, 9, 17, 30):
        assert op_gap(op, x, signs, magnitude, device) < TOLERANCE.get(op, 1e-5), magnitude


def test_randaugment_applies_each_images_own_op():
    # One batch, every op at once (grouped by op inside apply_randaugment): each
    # image equals torchvision's op alone on it.
    n = len(ra.OPS)
    x = (images(n, h=16, w=16) * 255).round() / 255  # posterize among them
    ops = torch.arange(n, dtype=torch.int8).view(n, 1)
    signs = torch.tensor([1, -1] * 7, dtype=torch.int8).view(n, 1)
    out = ra.apply_randaugment(x, ops, signs, 9)
    for i, op in enumerate(ra.OPS):
        ref = tv_op(op, x[i:i + 1], int(signs[i]), 9)[0]
        a, b = (out[i], ref) if op != "sharpness" else (out[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1])
        assert (a - b).abs().max() < TOLERANCE.get(op, 1e-5), op


def test_solarize_on_uint8_levels_differs_only_at_torchvision_rounded_thresholds():
    # On uint8 images torchvision's threshold is 255 x linspace(1, 0, 31)[m] in
    # float32, a hair above the integer level for bins 16, 18 and 24: pixels at
    # exactly that level are inverted by ours and not by torchvision. No other bin
    # (EDC's magnitude 9 among them) and no other pixel differs.
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    differs = []
    for m in range(31):
        theirs = TF.solarize(levels, 255 * tv_magnitude("solarize", m, (16, 16))) / 255
        ours = ra.apply_randaugment(levels / 255, torch.tensor([[ra.OPS.index("solarize")]]), torch.ones(1, 1), m)
        wrong = (ours - theirs).abs() > 1e-6  # (1 - x in float against 255 - k: rounding)
        if wrong.any():
            differs.append(m)
            assert wrong.sum() == 3  # one level, three channels
    assert differs == [16, 18, 24]


def test_randaugment_op_list_is_torchvisions_and_equalize_only_with_the_option():
    assert {TV_NAME[op] for op in ra.OPS} == set(TV_SPACE)
    assert ra.OPS[-1] == "equalize" and ra.num_ops(False) == 13 and ra.num_ops(True) == 14
    for equalize in (False, True):
        spec = AugmentSpec(crop="none", flip=False, mix="none", randaugment=(2, 9), randaugment_equalize=equalize)
        p = aug.draw(spec, 7000, 8, 8, torch.Generator().manual_seed(0))
        counts = torch.bincount(p.ra_ops.flatten().long(), minlength=14)
        assert (counts[13] > 0) == equalize
        # torchvision: each op uniformly, the sign a fair coin.
        assert stats.chisquare(counts[:ra.num_ops(equalize)].numpy()).pvalue > 1e-3
        assert abs((p.ra_signs == 1).float().mean().item() - 0.5) < 0.01


# ------------------------------------------------------------ CutMix and MixUp

def tv_cutmix_draw(seed: int, h: int, w: int):
    """torchvision's CutMix params for one seed, and the lambda and centre it drew
    (the same global-RNG draws, in make_params' order)."""
    cutmix = v2.CutMix(alpha=1.0, num_classes=10)
    blank = torch.zeros(1, 3, h, w)
    torch.manual_seed(seed)
    params = cutmix.make_params([blank])
    torch.manual_seed(seed)
    lam = float(cutmix._dist.sample(()))
    cx, cy = int(torch.randint(w, (1,))), int(torch.randint(h, (1,)))
    return params, lam, cy, cx


def cutmix_mismatches(hw, seeds=range(300)) -> int:
    """Seeds at which aug.cutmix_box, given torchvision's lambda and centre, gives
    another box or label weight than torchvision's CutMix."""
    bad = 0
    for seed in seeds:
        params, lam, cy, cx = tv_cutmix_draw(seed, *hw)
        (y0, y1, x0, x1), kept = aug.cutmix_box(lam, cy, cx, *hw)
        bad += (x0, y0, x1, y1) != params["box"] or kept != params["lam_adjusted"]
    return bad


@pytest.mark.parametrize("hw", [(32, 32), (24, 40), (7, 9)])
def test_cutmix_box_and_lambda_match_torchvision_on_the_same_draws(hw):
    # Exact: integer box arithmetic, the same float expression for the weight.
    assert cutmix_mismatches(hw) == 0


def test_cutmix_and_mixup_pixels_and_labels_match_torchvision():
    # torchvision pairs each sample with the one before it (roll(1)); SRe2L and RDED
    # (and ours) pair by a random permutation. Given torchvision's pairing as our
    # partner, the mixed pixels are identical and the mixed hard-label CE equals
    # CE against torchvision's mixed one-hot labels.
    n, k = 8, 10
    x, y = images(n), torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    partner = torch.arange(n).roll(1)
    params, _, _, _ = tv_cutmix_draw(3, 16, 16)
    x0, y0, x1, y1 = params["box"]
    for kind, tv, tv_params, lam in (
            ("cutmix", v2.CutMix(num_classes=k), params, params["lam_adjusted"]),
            ("mixup", v2.MixUp(alpha=0.8, num_classes=k), {"lam": 0.37}, 0.37)):
        p = AugParams(n=n, in_hw=(16, 16), out_hw=(16, 16), mix_perm=partner, mix_lam=lam,
                      mix_box=(y0, y1, x0, x1) if kind == "cutmix" else None)
        tv_params = {**tv_params, "labels": y, "batch_size": n}
        torch.testing.assert_close(aug.apply(x, p, AugmentSpec(mix=kind)), tv.transform(x, tv_params), atol=1e-7, rtol=0)
        soft = tv.transform(y, {**tv_params, "labels": y})
        torch.testing.assert_close(hard_ce(logits, y, y[partner], lam), F.cross_entropy(logits, soft), atol=1e-6, rtol=0)


def mix_lambda_p(kind: str, alpha: float, hw=(24, 40), n: int = 3000) -> float:
    """KS p-value of our label weights against torchvision's over n seeded draws:
    MixUp's lam ~ Beta(alpha, alpha) (ours numpy's sampler, torchvision torch's),
    CutMix's weight after the box is clipped (torchvision's lam_adjusted), whose
    law carries the box definition too."""
    spec = AugmentSpec(crop="none", flip=False, mix=kind, mix_alpha=alpha)
    gen = torch.Generator().manual_seed(0)
    ours = np.array([aug.draw(spec, 2, *hw, gen).mix_lam for _ in range(n)])
    tv = (v2.MixUp if kind == "mixup" else v2.CutMix)(alpha=alpha, num_classes=2)
    torch.manual_seed(0)
    blank = [torch.zeros(1, 3, *hw)]
    theirs = np.array([tv.make_params(blank)["lam" if kind == "mixup" else "lam_adjusted"] for _ in range(n)])
    p = stats.ks_2samp(ours, theirs).pvalue
    return min(p, stats.kstest(ours, stats.beta(alpha, alpha).cdf).pvalue) if kind == "mixup" else p


@pytest.mark.parametrize("kind,alpha", [("mixup", 0.8), ("mixup", 1.0), ("cutmix", 1.0), ("cutmix", 0.5)])
def test_mix_lambda_distribution_matches_torchvision(kind, alpha):
    assert mix_lambda_p(kind, alpha) > 1e-3


# ------------------------------------------------------------ the checks can fail

def swap_axes(boxes: torch.Tensor) -> torch.Tensor:
    return boxes[:, [1, 0, 3, 2]]


def test_planted_bugs_fail_the_checks(monkeypatch):
    """Each check above, run on ours with one planted bug, fails."""
    rrc_boxes, crop_theta, op, cutmix_box = aug._rrc_boxes, aug.crop_theta, ra._op, aug.cutmix_box
    # 1. The box sampler with its axes swapped (top <-> left, height <-> width).
    monkeypatch.setattr(aug, "_rrc_boxes", lambda *a: swap_axes(rrc_boxes(*a)))
    hw, scale, ratio = RRC_CASES[1]
    ours = aug._rrc_boxes(20000, *hw, AugmentSpec(scale=scale, ratio=ratio), torch.Generator().manual_seed(0))
    assert box_distribution_p(ours.long(), tv_rrc_boxes(20000, *hw, scale, ratio, seed=0)) < 1e-12
    # 2. The crop applied with the box's axes swapped.
    monkeypatch.setattr(aug, "crop_theta", lambda crop, *a: crop_theta(swap_axes(crop), *a))
    x = images(16, h=32, w=32, seed=1)
    spec = AugmentSpec(crop="rrc", scale=(0.2, 0.6), ratio=(0.5, 0.8), flip=True, mix="none")
    p = aug.draw(spec, 16, 32, 32, torch.Generator().manual_seed(2))
    assert crop_flip_gap(x, p, aug.apply(x, p, spec)) > 0.1
    # 3. RandAugment with a mirrored rotation, then with brightness one magnitude bin up.
    x, signs = images(8, h=16, w=20), torch.tensor([1, -1] * 4)
    monkeypatch.setattr(ra, "_op", lambda name, x, s, mag: op(name, x, -s if name == "rotate" else s, mag))
    assert op_gap("rotate", x, signs, 9, "cpu") > 0.01
    monkeypatch.setattr(ra, "_op", lambda name, x, s, mag: op(name, x, s, mag + 1 / 30))
    assert op_gap("brightness", x, signs, 9, "cpu") > 0.01
    # 4. CutMix's half side taken as the whole side: boxes and their law both differ.
    def whole_side(lam, cy, cx, oh, ow):
        (y0, y1, x0, x1), _ = cutmix_box(1 - 4 * (1 - lam) if lam > 0.75 else 0.0, cy, cx, oh, ow)
        return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / (oh * ow)
    monkeypatch.setattr(aug, "cutmix_box", whole_side)
    assert cutmix_mismatches((32, 32), range(50)) > 25
    assert mix_lambda_p("cutmix", 1.0) < 1e-12
