"""Shared fixtures: tiny studies on digits that run in seconds on a CPU."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data from the project root; one level further up from a worktree (wt/<name>).
SHARED_CIFAR = next((p for p in (ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
                                 ROOT.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz") if p.exists()),
                    ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")

TINY_STUDY = """\
name: {name}
dataset: {{name: digits}}
teachers:
  - arch: convnet3-w32
    epochs: 6
    augment: {{crop: pad, padding: 2, flip: false, mix: none}}
methods:
  - {{name: random_real, ipc: 5}}
protocol:
  preset: rd3
  overrides:
    student: convnet3-w32
    epochs: 150
    augment: {{flip: false}}
    loss: {{temperature: 4}}
factors:
  protocol.labels.mode: [hard, epochwise]
seeds: [0, 1]
"""


@pytest.fixture
def tiny_study(tmp_path: Path):
    def make(name: str = "tiny", text: str | None = None) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(text) if text is not None else TINY_STUDY.format(name=name))
        return path
    return make


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m orchestrator`` in a fresh process, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cifar_tarball() -> Path:
    if not SHARED_CIFAR.exists():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_CIFAR} (see ../shared/data/README.md)")
    return SHARED_CIFAR


def cifar_subset(tarball: Path, root: Path, train: int, test: int) -> Path:
    """``root/train/<class>/`` and ``root/test/<class>/`` holding the first ``train``
    and ``test`` images of each class of the real tarball, JPEG bytes unchanged."""
    import tarfile

    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(tarball) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in ("train", "test"):
                continue
            split, cls = parts[-3], parts[-2]
            if taken.get((split, cls), 0) >= (train if split == "train" else test):
                continue
            taken[split, cls] = taken.get((split, cls), 0) + 1
            target = root / split / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    assert len(taken) == 20 and set(taken.values()) == {train, test}
    return root


# --- Databases: the db tests run the same code on SQLite and on a real PostgreSQL ---

@pytest.fixture(scope="session")
def postgres_databases():
    """Databases on a real PostgreSQL server (see tests/pgserver.py); skips, or
    fails under RD3_REQUIRE_POSTGRES=1, when no server can be had."""
    import pgserver

    server = None
    admin = os.environ.get(pgserver.ENV_URL)
    if not admin:
        server = pgserver.LocalServer()
        try:
            admin = server.start()
        except Exception as exc:  # any reason: report it, the tests then skip or fail
            server.stop()
            pgserver.unavailable(f"{pgserver.ENV_URL} is not set and no local server could be started: {exc}")
    databases = pgserver.Databases(admin)
    try:
        databases.check()
    except Exception as exc:
        databases.close()
        if server:
            server.stop()
        pgserver.unavailable(f"cannot connect to {databases.url.render_as_string(hide_password=True)}: {exc}")
    yield databases
    databases.close()
    if server:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A fresh, empty results database URL on each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rd3.sqlite'}"
        return
    databases = request.getfixturevalue("postgres_databases")
    url = databases.create()
    yield url
    databases.drop(url)


@pytest.fixture
def db_engine(db_url):
    """An engine on a fresh database at the schema's head revision."""
    from db.schema import upgrade
    from db.session import make_engine

    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()
