"""State dicts with torchvision's key layout, for loading tests and parity checks."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

# Key -> shape of every torchvision ResNet state dict, read from torchvision 0.28's own
# model code by tools/torchvision_manifest.py (not from ours).
MANIFEST = (
    Path(__file__).resolve().parents[1] / "data" / "torchvision_resnet_state_dict_manifest.json"
)


@cache
def manifest() -> dict[str, dict[str, list[int]]]:
    return json.loads(MANIFEST.read_text())


def random_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every key, BatchNorm statistics included, so that parity checks
    exercise normalisation with non-trivial running means and variances."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(100, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bias")):
            out[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:  # BatchNorm gamma
            out[key] = torch.rand(shape, generator=g) * 0.5 + 0.75
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return out
