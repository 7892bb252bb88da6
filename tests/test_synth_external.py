"""Importing an external distilled set: every accepted layout loads exactly,
every bad input is refused with the file and the problem named, the cache key
follows the content, and study validation catches a bad set before running."""
import shutil
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.cli import main
from rd3core.config import ConfigError, build
from rd3core.data import dataset_info, load_dataset
from rd3core.synth import METHODS, synthesize
from rd3core.synth.external import ExternalParams, ExternalSetError, load_external

INFO = dataset_info("digits")


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits")


def a_set(ipc=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (10 * ipc, 1, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.arange(10).repeat(ipc)
    return images, labels


def params(path, **kw):
    return build(ExternalParams, {"path": str(path), **kw})


def write_folder(root, images, labels, name=lambda c: str(c)):
    for i, (img, c) in enumerate(zip(images, labels)):
        folder = root / name(int(c))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"img{i:03d}.png")


def expect_sorted(images, labels):
    order = torch.sort(labels, stable=True).indices
    return images[order], labels[order]


def test_tensor_files_load_exactly(tmp_path, data):
    images, labels = a_set()
    soft = torch.randn(30, 10)
    torch.save({"images": images, "labels": labels, "soft_labels": soft}, tmp_path / "set.pt")
    np.savez(tmp_path / "set.npz", images=images.float().div(255).numpy(), labels=labels.numpy())
    out = synthesize("external", data, None, params(tmp_path / "set.pt", ipc=3), seed=0)
    want_images, want_labels = expect_sorted(images, labels)
    assert torch.equal(out.images, want_images) and torch.equal(out.labels, want_labels)
    assert torch.equal(out.soft_labels, soft[torch.sort(labels, stable=True).indices])
    assert out.meta["soft_labels_bytes"] == 30 * 10 * 4 and out.meta["format"] == "pt"
    npz = synthesize("external", data, None, params(tmp_path / "set.npz"), seed=0)
    assert npz.images.dtype == torch.float32 and torch.allclose(npz.images * 255, want_images.float(), atol=1e-3)


@pytest.mark.parametrize("naming", ["plain", "sre2l"])
def test_imagefolder_directory_and_tarball(tmp_path, data, naming):
    images, labels = a_set(ipc=2)
    name = str if naming == "plain" else (lambda c: f"new{c:03d}")
    write_folder(tmp_path / "syn" / "inner", images, labels, name)
    (tmp_path / "syn" / "inner" / ".DS_Store").write_text("ignored")
    folder = load_external(params(tmp_path / "syn" / "inner"), INFO, data.classes)
    want_images, want_labels = expect_sorted(images, labels)
    assert torch.equal(folder.labels, want_labels) and torch.equal(folder.images, want_images)
    with tarfile.open(tmp_path / "syn.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "syn", arcname="syn")
    packed = load_external(params(tmp_path / "syn.tar.gz", ipc=2), INFO, data.classes)
    assert torch.equal(packed.images, folder.images) and torch.equal(packed.labels, folder.labels)


def refused(path, match, **kw):
    with pytest.raises(ExternalSetError) as err:
        load_external(params(path, **kw), INFO, tuple(str(c) for c in range(10)))
    assert str(path) in str(err.value), err.value  # names the file
    assert match in str(err.value), err.value
    return str(err.value)


def test_bad_tensor_files_are_refused_with_the_problem_named(tmp_path):
    images, labels = a_set()

    def save(name, **entries):
        torch.save(entries, tmp_path / name)
        return tmp_path / name

    refused(save("nhwc.pt", images=images.permute(0, 2, 3, 1), labels=labels), "[N, 1, 16, 16]")
    refused(save("size.pt", images=images[:, :, :8, :8], labels=labels), "images have shape [30, 1, 8, 8]")
    refused(save("range.pt", images=images, labels=labels + 1), "labels [10] are outside 0-9")
    refused(save("neg.pt", images=images, labels=labels - 1), "labels [-1] are outside")
    refused(save("missing.pt", images=images, labels=torch.where(labels == 7, 3, labels)), "classes [7] have no images")
    refused(save("count.pt", images=images, labels=labels, num_classes=torch.tensor(100)), "num_classes is 100")
    refused(save("soft.pt", images=images, labels=labels, soft_labels=torch.randn(30, 100)), "soft_labels have shape")
    refused(save("len.pt", images=images, labels=labels[:-1]), "labels have shape [29]")
    refused(save("floatlab.pt", images=images, labels=labels.float()), "expected integer class indices")
    refused(save("normed.pt", images=images.float() / 255 * 4 - 2, labels=labels), "unnormalised pixels in [0, 1]")
    refused(save("keys.pt", images=images, labels=labels, extra=labels), "unknown keys ['extra']")
    refused(save("nolabels.pt", images=images), "missing keys ['labels']")
    refused(save("ipc.pt", images=images, labels=labels), "ipc is 4 but classes hold", ipc=4)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    refused(tmp_path / "junk.npz", "cannot be read as npz")


def test_bad_image_folders_are_refused_with_the_problem_named(tmp_path):
    images, labels = a_set(ipc=1)
    write_folder(tmp_path / "nine", images[:9], labels[:9])
    refused(tmp_path / "nine", "has 9 class folders; dataset 'digits' has 10 classes")
    write_folder(tmp_path / "eleven", torch.cat([images, images[:1]]), torch.cat([labels, torch.tensor([10])]))
    refused(tmp_path / "eleven", "has 11 class folders")
    write_folder(tmp_path / "names", images, labels, lambda c: "abcdefghij"[c])
    refused(tmp_path / "names", "neither the dataset's class names")
    write_folder(tmp_path / "big", images, labels)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big" / "3" / "img003.png")
    refused(tmp_path / "big", "3/img003.png is 32x32 px; dataset 'digits' needs 16x16")
    write_folder(tmp_path / "junkfile", images, labels)
    (tmp_path / "junkfile" / "4" / "notes.txt").write_text("hello")
    refused(tmp_path / "junkfile", "4/notes.txt is not a readable image")
    write_folder(tmp_path / "loose", images, labels)
    shutil.copy(tmp_path / "loose" / "0" / "img000.png", tmp_path / "loose" / "stray.png")
    refused(tmp_path / "loose", "files outside a class folder")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b garbage")
    refused(tmp_path / "broken.tar.gz", "not a readable tar archive")


def test_params_check_the_path_and_format(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        params(tmp_path / "absent.pt")
    (tmp_path / "set.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        params(tmp_path / "set.bin")


def test_cache_key_follows_the_content_not_the_path(tmp_path):
    images, labels = a_set()
    torch.save({"images": images, "labels": labels}, tmp_path / "a.pt")
    shutil.copy(tmp_path / "a.pt", tmp_path / "b.pt")
    method = METHODS.get("external")
    key_a = method.key_inputs(params(tmp_path / "a.pt"), 0)
    assert key_a == method.key_inputs(params(tmp_path / "b.pt"), 5)  # same bytes, any seed: one artifact
    torch.save({"images": images.flip(0), "labels": labels.flip(0)}, tmp_path / "a.pt")
    assert method.key_inputs(params(tmp_path / "a.pt"), 0) != key_a
    assert "content_sha256" in key_a and "path" not in key_a["params"]


def test_study_validation_refuses_a_bad_set_before_running(tmp_path, capsys):
    images, labels = a_set()
    torch.save({"images": images, "labels": labels + 1}, tmp_path / "bad.pt")
    study = tmp_path / "ext.yaml"
    study.write_text(textwrap.dedent(f"""\
        name: ext
        dataset: {{name: digits}}
        teachers: [{{arch: convnet3-w16, epochs: 1}}]
        methods:
          - {{name: external, path: {tmp_path / 'bad.pt'}}}
        protocol: {{preset: rd3, overrides: {{labels: {{mode: hard}}}}}}
        """))
    assert main(["validate", str(study)]) == 2
    err = capsys.readouterr().err
    assert "ext.yaml:5: methods[0].path" in err and "bad.pt" in err and "labels [10] are outside 0-9" in err
    torch.save({"images": images, "labels": labels}, tmp_path / "bad.pt")
    assert main(["validate", str(study)]) == 0
    assert main(["run", str(study), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "synth        1 to run" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
