"""The distribution's packages: each of the repository's folders that is present, installed
as ``resnet_serve.<folder>``. Present, because the runtime images build from contract/ and
service/ alone (no torch code in them); everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
FOLDERS = [
    name
    for name in ("contract", "service", "models", "bench", "client")
    if (HERE / name / "__init__.py").is_file()
]

# Each folder's own subpackages too (bench/peers).
PACKAGES = {
    f"resnet_serve.{name}" + (f".{sub}" if sub else ""): str(Path(name, *sub.split(".")))
    for name in FOLDERS
    for sub in ["", *find_packages(where=str(HERE / name))]
}

setup(packages=list(PACKAGES), package_dir=PACKAGES)
