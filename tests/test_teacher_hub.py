"""torchvision's and timm's pretrained weights as teachers, loaded by their own
code from their own caches (TORCH_HOME, the Hugging Face cache), without any
network: the tests place files they wrote where the caches keep them, and a
missing file is a clear error naming the file and the folder."""
import urllib.error

import pytest
import torch
import torchvision

from orchestrator.cli import main
from rd3core.teachers import CheckpointError, TeacherSpec
from rd3core.teachers import hub

TV_WEIGHTS = "torchvision:ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1"  # a small model: a 5 MB file
TV_ARCH = "tv/shufflenet_v2_x0_5"
TIMM_ARCH = "timm/resnet10t"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty caches under tmp_path, and every download fails as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    import huggingface_hub
    import torch.hub
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    return calls


def torchvision_file(tmp_path):
    """A file where torch hub caches the weights, with weights we made."""
    found = hub.torchvision_weights(TV_WEIGHTS)
    assert found.folder == tmp_path / "torch" / "hub" / "checkpoints" and found.filename.endswith(".pth")
    torch.manual_seed(0)
    state = torchvision.models.shufflenet_v2_x0_5(num_classes=1000).state_dict()
    found.folder.mkdir(parents=True)
    torch.save(state, found.folder / found.filename)
    return found, state


def test_torchvision_weights_load_from_torch_hubs_cache(offline, tmp_path):
    spec = TeacherSpec(arch=TV_ARCH, weights=TV_WEIGHTS, input_norm="imagenet")
    assert list(spec.validate()) == []  # names only: no file needed to validate
    assert spec.hub_weights().cached() is None
    found, state = torchvision_file(tmp_path)
    assert spec.hub_weights().cached() == found.folder / found.filename
    loaded, path = hub.torchvision_state_dict(found)  # torchvision's own get_state_dict
    assert path == found.folder / found.filename and offline == []  # nothing downloaded
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    identity = spec.identity()
    assert identity["source"] == {"kind": "torchvision", "weights": "ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1",
                                  "file": found.filename}
    # An alias is recorded as the weights it stands for in this torchvision.
    alias = TeacherSpec(arch=TV_ARCH, weights="torchvision:ShuffleNet_V2_X0_5_Weights.DEFAULT", input_norm="imagenet")
    assert alias.identity() == identity


def test_torchvision_weights_missing_offline_name_the_file_and_folder(offline, tmp_path):
    found = hub.torchvision_weights(TV_WEIGHTS)
    with pytest.raises(CheckpointError) as err:
        found.fetch()
    message = str(err.value)
    assert offline, "the download was attempted through torch hub"
    assert f"place {found.filename} (from {found.url}) in {tmp_path / 'torch' / 'hub' / 'checkpoints'}" in message
    assert "TORCH_HOME" in message and "could not be downloaded (URLError" in message


def timm_cache(tmp_path):
    """timm's weights in the Hugging Face cache layout (refs/main -> snapshot)."""
    from safetensors.torch import save_file
    import timm

    found = hub.timm_weights(TIMM_ARCH)
    assert found.hf_repo == "timm/resnet10t.c3_in1k" and found.name == "resnet10t.c3_in1k"
    repo = tmp_path / "hf" / "hub" / "models--timm--resnet10t.c3_in1k"
    assert found.folder == repo
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    torch.manual_seed(0)
    state = timm.create_model("resnet10t", num_classes=1000).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / "0123abc" / "model.safetensors"))
    return found, state


def test_timm_pretrained_loads_from_the_hugging_face_cache(offline, tmp_path):
    spec = TeacherSpec(arch=TIMM_ARCH, pretrained=True, input_norm="imagenet")
    assert list(spec.validate()) == []
    found, state = timm_cache(tmp_path)
    model, path = hub.timm_pretrained(TIMM_ARCH, 1000, 3, 64)  # timm's own pretrained loading
    assert path.name == "model.safetensors" and offline == []
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # The recorded name says which weights ran, even when timm's default tag changes.
    assert spec.identity()["source"] == {"kind": "timm", "weights": "resnet10t.c3_in1k", "file": "model.safetensors"}


def test_timm_pretrained_missing_offline_says_what_to_download_and_where(offline, tmp_path):
    with pytest.raises(CheckpointError) as err:
        hub.timm_weights(TIMM_ARCH).fetch()
    message = str(err.value)
    assert "not in the Hugging Face cache" in message and "huggingface-cli download timm/resnet10t.c3_in1k" in message
    assert "models--timm--resnet10t.c3_in1k" in message and str(tmp_path / "hf" / "hub") in message


STUDY = """\
name: hub
dataset: {{name: imagenet1k, root: {root}}}
teachers:
  - arch: {arch}
    weights: {weights}
    input_norm: imagenet
methods:
  - {{name: random_real, ipc: 1}}
"""


def test_a_run_without_the_weights_cached_offline_exits_2_and_writes_nothing(offline, tmp_path, capsys):
    study = tmp_path / "hub.yaml"
    study.write_text(STUDY.format(root=tmp_path, arch=TV_ARCH, weights=TV_WEIGHTS))
    out = tmp_path / "out"
    assert main(["validate", str(study)]) == 0  # validation needs no file
    capsys.readouterr()
    assert main(["run", str(study), "--out", str(out), "--dry-run"]) == 0  # a dry run downloads nothing
    dry = capsys.readouterr()
    assert "warning: teachers[0]:" in dry.err and "a run downloads them first" in dry.err and offline == []
    assert "(1 to load from their weights, 0 to train)" in dry.out
    assert main(["run", str(study), "--out", str(out), "--executor", "local"]) == 2
    err = capsys.readouterr().err
    found = hub.torchvision_weights(TV_WEIGHTS)
    assert err.startswith(f"error: {study}:5: teachers[0].weights: torchvision weights") and found.filename in err
    assert str(found.folder) in err and "Traceback" not in err and not out.exists()


def test_a_run_finds_the_cached_weights_before_writing(offline, tmp_path):
    from orchestrator.study.expand import expand
    from orchestrator.execution.plan import build_plan
    from orchestrator.study.spec import load_study
    from orchestrator.study.teachers import fetch_hub_weights
    from rd3core.artifacts import ArtifactStore

    torchvision_file(tmp_path)
    study_path = tmp_path / "hub.yaml"
    study_path.write_text(STUDY.format(root=tmp_path, arch=TV_ARCH, weights=TV_WEIGHTS))
    study = load_study(study_path)
    fetch_hub_weights(study, build_plan(expand(study), ArtifactStore(tmp_path / "out", readonly=True)))
    assert offline == []


def test_weights_with_another_head_than_the_dataset_need_classes(offline, tmp_path, capsys):
    study = tmp_path / "hub.yaml"
    study.write_text(STUDY.format(root=tmp_path, arch=TV_ARCH, weights=TV_WEIGHTS).replace("imagenet1k", "imagenette"))
    assert main(["validate", str(study)]) == 2
    err = capsys.readouterr().err
    assert f"{study}:5: teachers[0].weights: torchvision weights ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1 have " \
           "1000 outputs, the teacher needs 10: list the 1000 classes" in err
