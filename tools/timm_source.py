"""timm's own model and transform code, for the tests and for the state dict manifest.

timm imports torchvision, whose package ``__init__`` loads compiled ops that the CPU torch
build used here cannot load. The torchvision modules timm imports (transforms, datasets,
models, the Python side of ops) load without them, so only that ``__init__`` is skipped:
torchvision is registered as a bare package over its unpacked wheel, as
tools/torchvision_manifest.py does, and timm is then imported unchanged, ``__init__``
included, from its own unpacked wheel. The code that runs is timm's.

Regenerate tests/data/timm_resnetv2_state_dict_manifest.json with

    python -m tools.timm_source > tests/data/timm_resnetv2_state_dict_manifest.json

(it fetches the pinned wheels into .cache/ with ``pip download --no-deps``, once).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

from tools.torchvision_manifest import register_torchvision

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
TIMM_VERSION = "1.0.31"
# The version .ci/run unpacks for tests/models/test_resnet.py; the same directory is reused.
TORCHVISION_VERSION = "0.28.0"
MANIFEST_NAMES = ("resnetv2_50", "resnetv2_101")


class Unavailable(Exception):
    """The wheels could not be fetched (no index reachable); the message says which."""


def unpacked_wheel(project: str, version: str, cache: Path = CACHE) -> Path:
    """``<cache>/<project>-<version>``, holding the wheel's files; fetched on first use."""
    target = cache / f"{project}-{version}"
    if (target / project).is_dir():
        return target
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{project}=={version}",
         "-d", str(target)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    wheels = sorted(target.glob(f"{project}-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise Unavailable(f"pip download {project}=={version} failed: {proc.stderr.strip()}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(target)
    return target


def load_timm(cache: Path = CACHE) -> ModuleType:
    """timm as installed, or from its wheel; ``RESNET_SERVE_TIMM_SRC`` and
    ``RESNET_SERVE_TORCHVISION_SRC`` name already unpacked wheels."""
    if importlib.util.find_spec("torchvision") is None:
        tv = os.environ.get("RESNET_SERVE_TORCHVISION_SRC")
        register_torchvision(
            Path(tv) if tv else unpacked_wheel("torchvision", TORCHVISION_VERSION, cache)
        )
    if importlib.util.find_spec("timm") is None:
        src = os.environ.get("RESNET_SERVE_TIMM_SRC")
        sys.path.insert(0, src or str(unpacked_wheel("timm", TIMM_VERSION, cache)))
    return importlib.import_module("timm")


def main() -> None:
    timm = load_timm()
    models = {
        name: {k: list(v.shape) for k, v in timm.create_model(name).state_dict().items()}
        for name in MANIFEST_NAMES
    }
    json.dump({"timm_version": timm.__version__, "models": models}, sys.stdout)


if __name__ == "__main__":
    main()
