"""The distribution's packages: each of the repository's folders that is present, installed
as ``resnet_serve.<folder>``. Present, because the runtime images build from contract/ and
service/ alone (no torch code in them); everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
FOLDERS = [
    name
    for name in ("contract", "service", "models", "bench", "client")
    if (HERE / name / "__init__.py").is_file()
]

setup(
    packages=[f"resnet_serve.{name}" for name in FOLDERS],
    package_dir={f"resnet_serve.{name}": name for name in FOLDERS},
)
