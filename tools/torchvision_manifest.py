"""Regenerate tests/data/torchvision_resnet_state_dict_manifest.json from torchvision itself.

torchvision's compiled ops do not load with the CPU-only torch build used here, but its
model definitions are plain Python: this loads ``torchvision.models.resnet`` from an
unpacked wheel without running the package's ``__init__`` (which loads the ops).

    pip download --no-deps torchvision==0.28.0 -d /tmp/tv
    (cd /tmp/tv && unzip -q torchvision-*.whl)
    python tools/torchvision_manifest.py /tmp/tv \
        > tests/data/torchvision_resnet_state_dict_manifest.json
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path
from types import ModuleType

NAMES = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]  # fmt: skip


def register_torchvision(unpacked_wheel: Path) -> None:
    """Make ``torchvision.*`` importable from an unpacked wheel without running the
    package's ``__init__`` (which loads the compiled ops)."""
    pkg = types.ModuleType("torchvision")
    pkg.__path__ = [str(unpacked_wheel / "torchvision")]
    sys.modules.setdefault("torchvision", pkg)


def load_torchvision_resnet(unpacked_wheel: Path) -> ModuleType:
    register_torchvision(unpacked_wheel)
    return importlib.import_module("torchvision.models.resnet")


def main() -> None:
    tv = load_torchvision_resnet(Path(sys.argv[1]))
    manifest = {
        name: {k: list(v.shape) for k, v in getattr(tv, name)().state_dict().items()}
        for name in NAMES
    }
    json.dump(manifest, sys.stdout)


if __name__ == "__main__":
    main()
