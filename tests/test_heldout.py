"""Held-out selection (eval.heldout_per_class) is only honest when no distilled
image is a held-out image: synthesis sees the whole training split, so a set
that picked held-out images is refused before anything trains."""
import pytest
import torch

from rd3core.config import build
from rd3core.data import load_dataset
from rd3core.pipeline import HELDOUT_SEED, HeldoutOverlap, check_heldout, heldout_split, posteval
from rd3core.protocol import Protocol
from rd3core.synth import DistilledSet, synthesize
from rd3core.synth.full_real import FullRealParams
from rd3core.synth.random_real import RandomRealParams

ARCH = "convnet2-w8"
PER_CLASS = 3


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_dataset("digits")


def protocol(per_class=PER_CLASS):
    return build(Protocol, {"student": ARCH, "epochs": 2, "batch_size": 16, "labels": {"mode": "hard"},
                            "augment": {"flip": False}, "eval": {"interval": 1, "heldout_per_class": per_class}})


def overlap(distilled, held_idx):
    return int(torch.isin(distilled.source_indices.flatten(), held_idx).sum())


def test_heldout_split_is_a_fixed_class_balanced_draw(digits):
    split, idx = heldout_split(digits, PER_CLASS)
    again, idx2 = heldout_split(digits, PER_CLASS)
    assert torch.equal(idx, idx2) and torch.equal(split.images, again.images)
    assert torch.bincount(split.labels, minlength=10).tolist() == [PER_CLASS] * 10
    assert torch.equal(split.labels, digits.train.labels[idx])
    assert not torch.equal(heldout_split(digits, PER_CLASS, seed=HELDOUT_SEED + 1)[1], idx)


def test_a_set_that_picked_heldout_images_is_refused_before_training(digits):
    distilled = synthesize("random_real", digits, None, RandomRealParams(ipc=10), seed=0)
    _, held_idx = heldout_split(digits, PER_CLASS)
    assert overlap(distilled, held_idx) > 0  # this draw does pick held-out images
    epochs = []
    with pytest.raises(HeldoutOverlap, match="held-out images.*heldout_per_class=3"):
        posteval(distilled, digits, protocol(), {}, seed=0, on_epoch=epochs.append)
    assert epochs == []  # refused before any training


def test_the_whole_training_split_is_refused(digits):
    distilled = synthesize("full_real", digits, None, FullRealParams(), seed=0)
    with pytest.raises(HeldoutOverlap):
        posteval(distilled, digits, protocol(), {}, seed=0)


def test_a_disjoint_set_runs_and_records_the_split(digits):
    distilled = synthesize("random_real", digits, None, RandomRealParams(ipc=4), seed=0)
    _, held_idx = heldout_split(digits, PER_CLASS)
    assert overlap(distilled, held_idx) == 0
    out = posteval(distilled, digits, protocol(), {}, seed=0)
    assert out["resolved"]["heldout"] == {"per_class": PER_CLASS, "seed": HELDOUT_SEED, "images": 10 * PER_CLASS,
                                          "overlap_checked": True}
    assert "top1_heldout_selected" in out["metrics"] and "heldout_overlap" not in out["metrics"]
    assert "heldout" not in posteval(distilled, digits, protocol(0), {}, seed=0)["resolved"]


def test_crops_of_several_images_count_each_source(digits):
    # RDED-style sets record f*f source images per distilled image.
    _, held_idx = heldout_split(digits, PER_CLASS)
    free = torch.tensor([i for i in range(len(digits.train)) if i not in set(held_idx.tolist())][:8])
    images = digits.train.images[:2]
    clean = DistilledSet(images, digits.train.labels[:2], source_indices=free.view(2, 4))
    assert check_heldout(clean, held_idx, PER_CLASS) is True
    dirty = DistilledSet(images, digits.train.labels[:2],
                         source_indices=torch.cat([free[:7], held_idx[:1]]).view(2, 4))
    with pytest.raises(HeldoutOverlap, match="1 of the distilled"):
        check_heldout(dirty, held_idx, PER_CLASS)


def test_sets_without_source_images_are_not_checked_and_say_so(digits):
    gen = torch.Generator().manual_seed(0)
    shape = tuple(digits.train.images.shape[1:])
    noise = DistilledSet(torch.rand(20, *shape, generator=gen), torch.arange(10).repeat(2))
    out = posteval(noise, digits, protocol(), {}, seed=0)
    assert out["resolved"]["heldout"]["overlap_checked"] is False
