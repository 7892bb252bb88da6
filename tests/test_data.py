"""Datasets: the facts table, ImageFolder trees and tarballs, torchvision's CIFAR
pickles, Tiny-ImageNet's val layout, streaming with workers, and a short run
on the real CIFAR-10."""
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from rd3core import Runtime
from rd3core.data import DatasetInfo, list_datasets, load_dataset, load_imagefolder
from rd3core.data.imagefiles import StreamSplit, list_directory
from rd3core.loop import evaluate
from rd3core.pipeline import TeacherSpec, build_model, posteval, train_teacher
from rd3core.protocol import resolve_protocol
from rd3core.synth import synthesize
from rd3core.synth.random_real import RandomRealParams

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 230)]
INFO = DatasetInfo("tinyfolder", 3, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cifar", "generated", resize=36,
                   stream=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RD3_CACHE", str(tmp_path / "cache"))


def make_folder(root, per_class=(12, 6), size=(40, 48), test_dir="val"):
    rng = np.random.default_rng(0)
    for split, count in zip(("train", test_dir), per_class):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                noise = rng.integers(-60, 60, (size[1], size[0], 3))
                Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_facts_table():
    assert {"digits", "cifar10", "cifar100", "tinyimagenet", "imagenet1k", "imagenette", "imagewoof"} <= set(
        list_datasets())
    from rd3core.data import dataset_info
    imnet = dataset_info("imagenet1k")
    assert (imnet.num_classes, imnet.size, imnet.resize, imnet.stream, imnet.family) == (1000, 224, 256, True,
                                                                                        "imagenet")
    assert imnet.test_transform == "resize short side to 256, centre crop 224"
    assert dataset_info("imagewoof").num_classes == dataset_info("imagenette").num_classes == 10
    assert not dataset_info("cifar10").stream and dataset_info("tinyimagenet").size == 64


def test_streamed_split_trains_a_teacher_and_evaluates_like_the_resident_one(tmp_path):
    root = make_folder(tmp_path / "folder")
    streamed = load_imagefolder(root, INFO)
    resident = load_imagefolder(root, INFO, stream=False)
    assert isinstance(streamed.train, StreamSplit) and isinstance(resident.train.images, torch.Tensor)
    assert len(streamed.train) == 36 and len(streamed.test) == 18 and streamed.classes == resident.classes
    assert streamed.train.train_hw == (36, 36)
    # The same decode (short side 36, centre crop 32) either way.
    assert torch.equal(streamed.test.images[torch.arange(18)], resident.test.images)
    assert torch.equal(streamed.test.labels, resident.test.labels)

    runtime = Runtime(workers=2)
    spec = TeacherSpec(arch="convnet2-w8", epochs=4, batch_size=8)
    torch.set_num_threads(1)
    a = train_teacher(streamed, spec, runtime)
    b = train_teacher(streamed, spec, Runtime(workers=0))
    assert a.metrics == b.metrics  # workers decode only: same numbers
    assert a.metrics["top1"] > 0.6  # three colours: far above chance (1/3)
    assert a.timing["phase_load_s"] >= 0
    same = evaluate(a.model, streamed.test, INFO, runtime, batch_size=5)
    assert same == evaluate(a.model, resident.test, INFO, runtime, batch_size=5) == a.metrics["top1"]

    # Post-evaluation of a tiny distilled set drawn from the streamed split stays tensor-based.
    distilled = synthesize("random_real", streamed, None, RandomRealParams(ipc=2), seed=0)
    assert isinstance(distilled.images, torch.Tensor) and distilled.images.shape == (6, 3, 32, 32)
    p = resolve_protocol("rd3", "cifar", {"student": "convnet2-w8", "epochs": 2})
    out = posteval(distilled, streamed, p, {"convnet2-w8": a.model}, seed=0, runtime=runtime)
    assert 0 <= out["metrics"]["top1"] <= 1


def test_streamed_archives_are_refused_with_what_to_do(tmp_path):
    root = make_folder(tmp_path / "folder", per_class=(2, 1))
    archive = tmp_path / "f.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="folder")
    with pytest.raises(ValueError, match="extracted directory"):
        load_imagefolder(archive, INFO)
    resident = load_imagefolder(archive, INFO, stream=False)  # a tarball is fine for a resident set
    assert len(resident.train) == 6 and resident.train.images.shape[1:] == (3, 32, 32)


def test_folder_with_test_dir_and_wrong_class_count(tmp_path):
    root = make_folder(tmp_path / "folder", per_class=(2, 1), test_dir="test")
    assert len(load_imagefolder(root, INFO, stream=False).test) == 3
    wrong = DatasetInfo("x", 5, 3, 32, (0.5,) * 3, (0.25,) * 3, "cifar", "generated")
    with pytest.raises(ValueError, match="3 classes, expected 5"):
        load_imagefolder(root, wrong)


def test_tiny_imagenet_original_val_layout(tmp_path):
    root = tmp_path / "tiny"
    lines = []
    for c, wnid in enumerate(["n01", "n02"]):
        (root / "train" / wnid / "images").mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored")
        for i in range(3):
            Image.new("RGB", (64, 64), COLOURS[c]).save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    for i, wnid in enumerate(["n02", "n01", "n02"]):
        Image.new("RGB", (64, 64), COLOURS[int(wnid[-1]) - 1]).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines))
    entries = list_directory(root)
    assert sorted((s, c) for s, c, _ in entries if s == "test") == [("test", "n01"), ("test", "n02"), ("test", "n02")]
    info = DatasetInfo("tiny2", 2, 3, 64, (0.5,) * 3, (0.25,) * 3, "tiny", "generated")
    ds = load_imagefolder(root, info)
    assert len(ds.train) == 6 and ds.test.labels.tolist() == [1, 0, 1]  # val_0..2: n02, n01, n02


def fake_cifar_pickles(root, name="cifar-10-batches-py"):
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(1, 6):
        data = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [i % 10, 1, 2, 3]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(data))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                                                     b"labels": [7, 8, 9]}))
    names = [n.encode() for n in "airplane automobile bird cat deer dog frog horse ship truck".split()]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return folder


def test_cifar_from_torchvisions_own_format(tmp_path):
    folder = fake_cifar_pickles(tmp_path / "tv")
    ds = load_dataset("cifar10", str(tmp_path / "tv"))
    assert ds.record["format"] == "torchvision-pickle"
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.train.labels[:4].tolist() == [1, 1, 2, 3] and ds.test.labels.tolist() == [7, 8, 9]
    raw = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    assert torch.equal(ds.train.images[0], torch.from_numpy(raw.reshape(3, 32, 32)))
    assert ds.classes[0] == "airplane"
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    again = load_dataset("cifar10", str(archive))
    assert torch.equal(again.train.images, ds.train.images) and again.record["format"] == "torchvision-pickle"


@pytest.mark.slow
def test_short_run_on_real_cifar10(cifar_tarball, monkeypatch):
    monkeypatch.delenv("RD3_CACHE")  # the real set is decoded once into the shared cache
    torch.set_num_threads(2)
    data = load_dataset("cifar10", str(cifar_tarball))
    assert (len(data.train), len(data.test), data.train.images.shape[1:]) == (50000, 10000, (3, 32, 32))
    assert data.classes[:2] == ("airplane", "automobile")
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    small = type(data)(data.info, data.train.subset(torch.arange(0, 50000, 20)),
                       data.test.subset(torch.arange(0, 10000, 10)), data.classes, data.record)
    teacher = train_teacher(small, TeacherSpec(arch="convnet3-w16-bn", epochs=3, batch_size=128))
    assert teacher.metrics["top1"] > 0.25  # 10 classes: chance is 0.1
    distilled = synthesize("random_real", small, None, RandomRealParams(ipc=10), seed=0)
    p = resolve_protocol("rded", "cifar", {"student": "convnet3-w16-bn", "epochs": 10, "batch_size": 10})
    out = posteval(distilled, small, p, {"convnet3-w16-bn": teacher.model}, seed=0)
    assert out["epochs"][-1]["loss"] < out["epochs"][0]["loss"]
    assert 0.15 < out["metrics"]["top1"] <= 1
