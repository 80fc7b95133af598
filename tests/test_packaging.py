"""The installed distribution: every module under the one name ``resnet_serve``, so that
none can shadow, or be shadowed by, a user's own ``models`` or ``service``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import PACKAGES

SCRIPTS = {
    "resnet-serve": "resnet_serve.service.cli",
    "resnet-export": "resnet_serve.models.cli",
    "resnet-bench": "resnet_serve.bench.entry",
}


def test_the_wheel_installs_one_top_level_name(built_wheel: Path) -> None:
    names = zipfile.ZipFile(built_wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"resnet_serve"}
    for package in PACKAGES:
        assert f"resnet_serve/{package}/__init__.py" in names
    # A namespace package: another distribution may add to resnet_serve.
    assert "resnet_serve/__init__.py" not in names


def test_a_users_models_and_service_coexist_with_ours(built_wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # No dependencies: the test is about names, and these packages' __init__ import nothing.
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
         str(built_wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    project = tmp_path / "project"
    project.mkdir()
    (project / "models.py").write_text("WHO = 'the user'\n")
    (project / "service").mkdir()
    (project / "service" / "__init__.py").write_text("WHO = 'the user, again'\n")
    code = (
        "import models, service\n"
        "import resnet_serve.models, resnet_serve.service, resnet_serve.contract\n"
        "import resnet_serve.bench\n"  # (resnet_serve.client's __init__ needs httpx)
        "print(models.WHO); print(service.WHO)\n"
        "print(resnet_serve.models.__file__); print(resnet_serve.service.__file__)\n"
    )
    out = subprocess.run(
        [python, "-c", code], cwd=project, capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out[:2] == ["the user", "the user, again"]
    site = str(venv / "lib")
    assert all(line.startswith(site) for line in out[2:]), out
    for script, module in SCRIPTS.items():
        text = (venv / "bin" / script).read_text()
        assert f"from {module} import main" in text, text
