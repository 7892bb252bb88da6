"""`python -m orchestrator list presets|datasets|models|methods|layouts`: one registered
name per line, fed by the registries, and the names the project must have."""
import pytest

from conftest import run_cli
from orchestrator import cli
from rd3core.data import list_datasets
from rd3core.models import list_models
from rd3core.protocol import list_presets
from rd3core.synth import list_methods
from rd3core.teachers import list_layouts

REGISTRIES = {"presets": list_presets, "datasets": list_datasets, "models": list_models, "methods": list_methods,
              "layouts": list_layouts}
# What issue 3 says must exist (more may be registered).
REQUIRED = {
    "presets": {"sre2l", "cda", "rded", "gvbsm", "edc", "dwa", "lpld", "scdd", "ddranking", "rd3"},
    "datasets": {"digits", "cifar10", "cifar100", "tinyimagenet", "imagenet1k", "imagenette", "imagewoof"},
    "methods": {"random_real", "sre2l", "cda", "rded", "herding"},
    "models": {"convnet3", "resnet18"},
    "layouts": {"ours", "torchvision", "timm", "rded", "dc"},  # issue 10: teachers' checkpoint layouts
}


def lines(text: str) -> list[str]:
    assert text.endswith("\n") and not text.endswith("\n\n"), repr(text[-20:])
    return text[:-1].split("\n")


@pytest.mark.parametrize("what", sorted(REGISTRIES))
def test_list_prints_exactly_the_registry_names(what, capsys):
    assert cli.main(["list", what]) == 0
    out = capsys.readouterr()
    printed = lines(out.out)
    assert out.err == ""
    assert printed == REGISTRIES[what]()  # the registry's own order, nothing added or left out
    assert len(set(printed)) == len(printed) and all(n and n == n.strip() and " " not in n for n in printed)
    assert REQUIRED[what] <= set(printed), sorted(REQUIRED[what] - set(printed))


def test_unknown_list_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["list", "optimisers"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "optimisers" in err and all(w in err for w in REGISTRIES)


def test_list_in_a_real_process():
    proc = run_cli("list", "presets")
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == list_presets()
    assert REQUIRED["presets"] <= set(lines(proc.stdout))
