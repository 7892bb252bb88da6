"""Teacher checkpoints made by other code: every layout loads into our
architecture and computes exactly what the network it came from computes;
every wrong file is one clear error naming the file, the key and what was
expected (from the study: exit status 2, nothing written, no traceback)."""
import os
import pickle

import pytest
import torch
import torchvision
from torch import nn

from elsewhere import RDEDConvNet, dc_convnet, randomise_bn, sre2l_cifar_resnet18
from orchestrator.cli import main
from rd3core.data import DATASETS
from rd3core.models import create_model
from rd3core.teachers import LAYOUTS, TeacherSpec, source_problems
from rd3core.teachers.checkpoints import CheckpointError, load_into, read_state_dict

CIFAR = DATASETS.get("cifar10")[0]  # 3 x 32 x 32, 10 classes
DIGITS = DATASETS.get("digits")[0]  # 1 x 16 x 16


def same_function(theirs: nn.Module, ours: nn.Module, channels=3, size=32):
    x = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=0, atol=1e-5)


def load(path, arch, layout, info=CIFAR, num_classes=10) -> nn.Module:
    spec = TeacherSpec(arch=arch, checkpoint=str(path), layout=layout)
    assert list(spec.validate()) == [] and list(source_problems(spec, info)) == []
    model = create_model(arch, num_classes, info.channels, info.size)
    return load_into(model, read_state_dict(path), str(path), layout, arch)


# --- each layout loads exactly ---------------------------------------------------------

def test_rded_conv3_layout(tmp_path):
    torch.manual_seed(0)
    theirs = randomise_bn(RDEDConvNet(width=16))
    assert "layers.conv.0.weight" in theirs.state_dict() and "layers.norm.2.running_var" in theirs.state_dict()
    path = tmp_path / "cifar10_conv3.pth"
    torch.save({"model": theirs.state_dict()}, path)  # RDED's own checkpoint layout
    same_function(theirs, load(path, "convnet3-w16-bn", "rded"))


@pytest.mark.parametrize("norm, arch", [("instancenorm", "convnet3-w16"), ("batchnorm", "convnet3-w16-bn"),
                                        ("none", "convnet3-w16-nn")])
def test_dc_mtt_ddranking_convnet_layout(norm, arch, tmp_path):
    torch.manual_seed(0)
    theirs = randomise_bn(dc_convnet(norm))
    path = tmp_path / "ConvNet.pt"
    torch.save(theirs.state_dict(), path)  # DD-Ranking loads a plain state dict
    same_function(theirs, load(path, arch, "dc"))


def test_torchvision_resnet_layout(tmp_path):
    torch.manual_seed(0)
    theirs = randomise_bn(torchvision.models.resnet18(num_classes=10))
    path = tmp_path / "resnet18.pth"
    torch.save(theirs.state_dict(), path)
    same_function(theirs, load(path, "tv/resnet18", "torchvision"), size=64)


def test_sre2l_small_stem_resnet18_layout(tmp_path):
    torch.manual_seed(0)
    theirs = randomise_bn(sre2l_cifar_resnet18())
    path = tmp_path / "ckpt.pth"
    # SRe2L's squeeze script: DataParallel's keys, under "state_dict", with its accuracy and epoch.
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}, "acc": 95.1, "epoch": 199},
               path)
    same_function(theirs, load(path, "resnet18", "torchvision"))


def test_timm_resnet_layout_in_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    theirs = randomise_bn(timm.create_model("resnet10t", num_classes=10))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
    same_function(theirs, load(path, "timm/resnet10t", "timm"))


def test_our_own_layout_and_a_teacher_artifact(tmp_path):
    from rd3core.artifacts import ArtifactStore

    torch.manual_seed(0)
    theirs = randomise_bn(create_model("convnet3-w16-bn", 10, 3, 32))
    store = ArtifactStore(tmp_path / "artifacts")
    info = store.save("teacher", "k" * 24, {"state_dict": theirs.state_dict()})
    same_function(theirs, load(info.path / "payload.pt", "convnet3-w16-bn", "ours"))
    torch.save(theirs.state_dict(), tmp_path / "plain.pth")
    same_function(theirs, load(tmp_path / "plain.pth", "convnet3-w16-bn", "ours"))


def test_every_layout_has_a_load_test():
    tested = {"rded", "dc", "torchvision", "timm", "ours"}
    assert set(LAYOUTS.names()) == tested


# --- wrong files: one clear message each ------------------------------------------------

class Boom:
    """A pickle that would run code when loaded: it must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write(tmp_path, case) -> tuple[str, str, str]:
    """(file, arch, layout) for a broken case."""
    path = tmp_path / f"{case}.pth"
    good = RDEDConvNet(width=16).state_dict()
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        torch.save({"model": good}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "not_a_checkpoint":
        path.write_text("model weights are somewhere else\n")
    elif case == "whole_model":
        torch.save(RDEDConvNet(width=16), path)
    elif case == "code":
        path.write_bytes(pickle.dumps({"model": Boom(str(tmp_path / "pwned"))}, protocol=2))
    elif case == "code_newer_pickle":
        path.write_bytes(pickle.dumps({"model": Boom(str(tmp_path / "pwned"))}, protocol=5))
    elif case == "no_weights":
        torch.save({"acc": 93.0, "epoch": 10}, path)
    elif case == "wrong_layout":
        torch.save({"model": good}, path)
        return str(path), "convnet3-w16-bn", "dc"
    elif case == "wrong_width":
        torch.save({"model": good}, path)
        return str(path), "convnet3-w32-bn", "rded"
    elif case == "batchnorm_into_instance_norm":
        torch.save({"model": good}, path)
        return str(path), "convnet3-w16", "rded"
    elif case == "other_input_size":
        torch.save({"model": RDEDConvNet(width=16, size=64).state_dict()}, path)
        return str(path), "convnet3-w16-bn", "rded"
    elif case == "damaged_safetensors":
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    return str(path), "convnet3-w16-bn", "rded"


BROKEN = {  # case -> fragments the message must hold (beside the file's path)
    "empty": ["is empty (0 bytes)"],
    "truncated": ["damaged or truncated PyTorch zip archive"],
    "not_a_checkpoint": ["not a PyTorch checkpoint: expected a file written by torch.save", "not a zip archive"],
    "whole_model": ["pickled Python objects", "never executed", "save model.state_dict()"],
    "code": ["pickled Python objects", "(posix.mkdir)", "never executed"],
    "code_newer_pickle": ["not a PyTorch checkpoint", "nothing in it was run"],
    "no_weights": ["no weights found", "'model', 'state_dict'", "['acc', 'epoch']"],
    "wrong_layout": ["(layout dc) does not fit arch 'convnet3-w16-bn'", "unexpected keys layers.conv.0.weight",
                     "layout: rded fits this file"],
    "wrong_width": ["features.0.weight: expected shape [32, 3, 3, 3], the file has [16, 3, 3, 3]"],
    "batchnorm_into_instance_norm": ["unexpected keys features.1.running_mean",
                                     "a BatchNorm variant of the arch (e.g. convnet3-bn)"],
    "other_input_size": ["classifier.weight: expected shape [10, 256], the file has [10, 1024]",
                         "trained at another input size"],
    "damaged_safetensors": ["not a readable safetensors file"],
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_wrong_file_is_one_clear_problem(case, tmp_path):
    path, arch, layout = _write(tmp_path, case)
    spec = TeacherSpec(arch=arch, checkpoint=path, layout=layout)
    problems = list(source_problems(spec, CIFAR))
    assert [key for key, _ in problems] == ["checkpoint"]
    message = problems[0][1]
    assert message.startswith(path) and all(f in message for f in BROKEN[case]), message
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran
    with pytest.raises(CheckpointError):
        load_into(create_model(arch, 10, 3, 32), read_state_dict(path), path, layout, arch)


STUDY = """\
name: ckpt
dataset: {{name: cifar10, root: {root}}}
teachers:
  - arch: {arch}
    checkpoint: {path}
    layout: {layout}
methods:
  - {{name: random_real, ipc: 1}}
"""


@pytest.mark.parametrize("case", ["truncated", "code", "wrong_layout", "not_a_checkpoint"])
def test_a_study_with_a_wrong_file_exits_2_naming_file_and_key(case, tmp_path, capsys):
    path, arch, layout = _write(tmp_path, case)
    study = tmp_path / "ckpt.yaml"
    study.write_text(STUDY.format(root=tmp_path, arch=arch, path=path, layout=layout))
    out = tmp_path / "out"
    for command in (["validate", str(study)], ["run", str(study), "--out", str(out), "--executor", "local"],
                    ["run", str(study), "--out", str(out), "--dry-run"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {study}:5: teachers[0].checkpoint: {path}"), err
        assert BROKEN[case][0] in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "pwned").exists()


def test_one_channel_input_is_refused_for_field_convnets(tmp_path):
    # DC's and RDED's ConvNet pad their first convolution by 3 on 1-channel input;
    # ours does not: the same weights would compute something else.
    torch.save(dc_convnet("instancenorm", channels=1, size=16).state_dict(), tmp_path / "mnist.pt")
    spec = TeacherSpec(arch="convnet3-w16", checkpoint=str(tmp_path / "mnist.pt"), layout="dc")
    [(key, message)] = list(source_problems(spec, DIGITS))
    assert key == "layout" and "pads its first convolution by 3" in message
