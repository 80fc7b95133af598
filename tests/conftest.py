"""Fixtures shared by the whole suite: the shared data beside the checkout, model
repositories exported once per session, and what the suite fetches for itself into
``.cache/tests`` (torchvision's model code, the ServiceMonitor validators)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tools import perf_analyzer as perf_analyzer_tool
from tools.perf_analyzer import PerfAnalyzer

# Servers started by the suite keep their given settings: no tuning cached on the machine
# applies, and none is measured in the background (CPU the other tests need). The tests of
# tuning itself set it.
os.environ.setdefault("RESNET_SERVE_TUNING", "off")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESNET_SERVE_SHARED", ROOT.parent / "shared"))
WEIGHTS_HOME = SHARED / "weights"
CIFAR_TEST = SHARED / "data" / "cifar10-test-846.npz"
CIFAR_TRAIN = SHARED / "data" / "cifar10-train-932.npz"
# What the suite installs for itself; never under ../shared, which it only reads.
CACHE = ROOT / ".cache" / "tests"
TORCHVISION_VERSION = "0.28.0"
# Several test servers run at once (this suite's, other sessions'): none may bind the
# default gRPC port (8001). A test that serves gRPC passes grpc_port=<a free port>; the
# servers the suite starts as processes inherit this.
os.environ["RESNET_SERVE_GRPC_PORT"] = "0"


# --- ../shared is read, never written ---------------------------------------------------

_SHARED_KEY = pytest.StashKey[dict[str, tuple[int, int, int]]]()
_SHARED_WRITTEN = pytest.StashKey[list[str]]()


def _shared_state() -> dict[str, tuple[int, int, int]]:
    """Every path under the parts of ../shared the suite reads: (mode, size, mtime). A
    file written, added or removed there, even a temporary one, changes it."""
    out = {}
    for top in (WEIGHTS_HOME, CIFAR_TEST.parent):
        if not top.is_dir():
            continue
        for p in [top, *top.rglob("*")]:
            st = p.lstat()
            out[p.relative_to(SHARED).as_posix()] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SHARED_KEY] = _shared_state()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_SHARED_KEY, None)
    if before is None:
        return
    after = _shared_state()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    session.config.stash[_SHARED_WRITTEN] = changed
    if changed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    changed = terminalreporter.config.stash.get(_SHARED_WRITTEN, [])
    if changed:
        terminalreporter.write_sep("=", f"FAILED: the suite wrote into {SHARED}", red=True)
        terminalreporter.write_line("It must only read it. Changed: " + ", ".join(changed[:20]))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the suite needs ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def cifar_test() -> dict[str, np.ndarray]:
    with np.load(_require(CIFAR_TEST)) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture
def torch_home(monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch.hub's cache pointed at the shared, offline copy of the CIFAR checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(_require(WEIGHTS_HOME)))
    return WEIGHTS_HOME


@pytest.fixture(scope="session")
def cifar_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with resnet20_cifar10 and resnet56_cifar10, real weights."""
    pytest.importorskip("torch")
    from resnet_serve.models.catalog import get_variant
    from resnet_serve.models.export import export_variant
    from resnet_serve.models.weights import resolve

    repo = tmp_path_factory.mktemp("repository")
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(_require(WEIGHTS_HOME))
    try:
        for name in ("resnet20_cifar10", "resnet56_cifar10"):
            variant = get_variant(name)
            export_variant(variant, resolve(variant, "default"), repo)
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old
    return repo


# --- what the suite fetches for itself -------------------------------------------------


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """``CACHE/name``, made once by ``build(tmp)`` into a temporary directory beside it and
    renamed into place: a directory that exists is complete, and two runs that race both
    build, one rename wins and the other's copy is dropped."""
    target = CACHE / name
    if target.is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=CACHE))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 is for the building, not the result
        try:
            tmp.rename(target)
        except OSError:  # another run got there first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_setup_step(argv: list[str], what: str, **kw: object) -> None:
    """A setup command the suite needs (pip download, npm ci): its failure is a test
    failure with the command and its output, never a skip."""
    try:
        proc = subprocess.run(  # type: ignore[call-overload]
            argv, capture_output=True, text=True, timeout=600, check=False, **kw
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{what}: {' '.join(argv)}: {exc}")
    if proc.returncode != 0:
        pytest.fail(
            f"{what}: {' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )


def _unpack_torchvision(tmp: Path) -> None:
    wheels = tmp / "wheel"
    run_setup_step(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
         f"torchvision=={TORCHVISION_VERSION}", "-d", str(wheels)],
        f"downloading the torchvision {TORCHVISION_VERSION} wheel (PyPI)",
    )  # fmt: skip
    (wheel,) = wheels.glob("torchvision-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp, [n for n in zf.namelist() if n.startswith("torchvision/")])
    shutil.rmtree(wheels)


@pytest.fixture(scope="session")
def torchvision_src() -> Path:
    """torchvision's own model code: its wheel, unpacked (not installed: its compiled ops
    do not load with the CPU torch build, and only the plain-Python model code is used).
    RESNET_SERVE_TORCHVISION_SRC names an unpacked wheel to use instead."""
    given = os.environ.get("RESNET_SERVE_TORCHVISION_SRC")
    if given:
        if not (Path(given) / "torchvision" / "models" / "resnet.py").is_file():
            pytest.fail(f"RESNET_SERVE_TORCHVISION_SRC={given} holds no unpacked torchvision")
        return Path(given)
    return cached(f"torchvision-{TORCHVISION_VERSION}", _unpack_torchvision)


@pytest.fixture(scope="session")
def timm() -> ModuleType:
    """timm's own code (tools/timm_source.py), its wheel fetched once into .cache/."""
    pytest.importorskip("torch")
    from tools.timm_source import Unavailable, load_timm

    try:
        return load_timm()
    except Unavailable as exc:
        # Like the suite's other fetches: under CI a missing check is a failure, not a pass.
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


# --- Triton's perf_analyzer --------------------------------------------------------------


@pytest.fixture(scope="session")
def perf_analyzer() -> PerfAnalyzer:
    """Triton's perf_analyzer (tools/perf_analyzer.py), from its wheel into .cache/tests,
    checked by running it. Not there or not starting (Debian's libb64-0d missing): a skip,
    a failure under CI."""
    try:
        return PerfAnalyzer.at(cached(perf_analyzer_tool.HOME_NAME, perf_analyzer_tool.install))
    except perf_analyzer_tool.Unavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (.ci/run installs libb64-0d)")
        pytest.skip(str(exc))


# --- KServe's Python client ----------------------------------------------------------

# KServe's SDK and only what its client modules import beyond the project's own packages:
# its package __init__ also loads its model server and Kubernetes SDK (434 MB installed
# with every dependency, measured), which tests/service/kserve_client.py skips. 92 MB.
KSERVE = (
    "kserve==0.21.0", "pandas==2.3.3", "psutil==5.9.8", "cloudevents==1.13.0",
    "deprecation==2.1.0", "six==1.17.0", "pytz==2026.6",
)  # fmt: skip


@pytest.fixture(scope="session")
def kserve_path() -> Path:
    """A directory with KServe's SDK (``pip install --target --no-deps``) in .cache/tests,
    for PYTHONPATH: its pins are not the project's, so its client runs in a subprocess."""

    def install(tmp: Path) -> None:
        run_setup_step(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--no-deps", "--target", str(tmp), *KSERVE],
            f"installing {KSERVE[0]} (PyPI)",
        )  # fmt: skip

    return cached(KSERVE[0].replace("==", "-"), install)


# The folders that install as resnet_serve.<name> (pyproject's package-dir).
PACKAGES = ("contract", "service", "models", "bench", "client")


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The distribution's wheel, built once from a copy of the sources, as ``pip install .``
    builds it (the checkout itself gets no build/ or egg-info from it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp / "dist").glob("resnet_serve-*.whl")
    return wheel
