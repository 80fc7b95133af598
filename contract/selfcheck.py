"""The load-time self-check: a model proves on *this* CPU what it proved where it was made.

An exported graph is served on machines its exporter never saw, and the same int8 graph
computes differently on different instruction sets (AVX2 without VNNI saturates the
int16 sums of ``vpmaddubsw``). So the export stores a small reference set beside the
model (``reference.npz``: preprocessed images and the fp32 graph's logits on them) and
the acceptance bounds in ``model.json`` (``self_check``); during startup the runtime runs
the model on those images and refuses it, or warns, when it falls outside them.

Both halves use this module: the exporter to measure and record, the runtime to check.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_FILE = "reference.npz"
# Enough to see a systematic error in the logits (the RMS below averages over every
# logit of every image), few enough to cost well under a second at startup.
REFERENCE_IMAGES = 32
# Slack over what the export machine measured. Integer kernels are exact wherever they do
# not overflow, and float kernels differ between CPUs by ~1e-6, so a correct CPU lands
# within a fraction of these; a saturating int8 kernel lands several times above (AVX2
# without VNNI: RMS error 0.15 against 0.03, docs/precision.md).
ERROR_FACTOR = 2.0
ERROR_FLOOR = {"fp32": 1e-3, "fp16": 5e-3, "int8": 0.01}
# Images whose top-1 may flip against the export machine's measurement: near-ties can
# flip on any CPU, a broken kernel flips far more.
TOP1_SLACK_IMAGES = 2
# The CPU features that change how onnxruntime's CPU kernels compute, as numpy names them
# (it reads CPUID itself, so this is what the process really runs on, also in a VM or an
# emulator), then those numpy does not track, from the kernel's /proc/cpuinfo.
ISA_CPUID = ("AVX2", "FMA3", "AVX512F", "AVX512BW", "AVX512VNNI", "AVX512BF16", "AVX512FP16")
ISA_PROC = ("avx_vnni", "amx_int8", "amx_bf16")


def _cpuid_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy 1.x
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return {}
    return dict(__cpu_features__)


@cache
def cpu_description() -> str:
    """``"<model name> (ISA: AVX2, FMA3, AVX512F, ...)"``: the instruction sets present,
    so that a refusal says what this CPU has (and, by omission, lacks)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(flags_line[1].split()) if flags_line else set()
    cpuid = _cpuid_features()
    present = [f for f in ISA_CPUID if cpuid.get(f)] + [f.upper() for f in ISA_PROC if f in flags]
    if not model:
        import platform

        name = platform.processor() or platform.machine() or "unknown CPU"
    else:
        name = model[1].strip()
    return f"{name} (ISA: {', '.join(present) or 'no AVX2'})"


def logits_error(reference: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, RMS error relative to the reference's RMS) of two logit arrays."""
    ref = reference.astype(np.float64)
    out = got.astype(np.float64)
    agreement = float(np.mean(ref.argmax(1) == out.argmax(1)))
    scale = float(np.sqrt(np.mean(ref**2))) or 1.0
    rms = float(np.sqrt(np.mean((out - ref) ** 2)) / scale)
    return agreement, rms if np.isfinite(rms) else float("inf")


def criteria(precision: str, count: int, agreement: float, rms: float) -> dict[str, float]:
    """The bounds a serving CPU must meet, from what the export machine measured."""
    floor = ERROR_FLOOR.get(precision, ERROR_FLOOR["int8"])
    return {
        "min_top1_agreement": round(max(0.0, agreement - TOP1_SLACK_IMAGES / count), 6),
        "max_logits_rms_rel_err": float(f"{max(ERROR_FACTOR * rms, rms + floor):.4g}"),
    }


def record(
    directory: Path,
    images: np.ndarray,
    reference_logits: np.ndarray,
    model_logits: np.ndarray,
    *,
    precision: str,
    source: str,
) -> dict[str, Any]:
    """Write ``reference.npz`` into ``directory``; return model.json's ``self_check``."""
    np.savez_compressed(
        directory / REFERENCE_FILE,
        images=np.ascontiguousarray(images, dtype=np.uint8),
        logits=np.ascontiguousarray(reference_logits, dtype=np.float32),
    )
    agreement, rms = logits_error(reference_logits, model_logits)
    return {
        "file": REFERENCE_FILE,
        "images": len(images),
        "source": source,
        "reference": "fp32 ONNX graph on the export machine",
        "measured": {"top1_agreement": agreement, "logits_rms_rel_err": rms},
        **criteria(precision, len(images), agreement, rms),
        "export_cpu": cpu_description(),
    }


@dataclass(frozen=True)
class SelfCheck:
    """The outcome of one model's check on this machine."""

    passed: bool
    top1_agreement: float
    logits_rms_rel_err: float
    min_top1_agreement: float
    max_logits_rms_rel_err: float
    images: int
    cpu: str

    @property
    def reason(self) -> str:
        """One line: what fell outside which bound, on which CPU."""
        faults = []
        if not self.top1_agreement >= self.min_top1_agreement:
            faults.append(
                f"top-1 agreement {self.top1_agreement:.3f} < {self.min_top1_agreement:.3f}"
            )
        if not self.logits_rms_rel_err <= self.max_logits_rms_rel_err:
            got, bound = self.logits_rms_rel_err, self.max_logits_rms_rel_err
            faults.append(f"logits RMS error {got:.4g} > {bound:.4g}")
        verdict = "; ".join(faults) if faults else "within bounds"
        return f"{verdict} on {self.images} reference images, on {self.cpu}"

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "top1_agreement": self.top1_agreement,
            "logits_rms_rel_err": self.logits_rms_rel_err,
            "min_top1_agreement": self.min_top1_agreement,
            "max_logits_rms_rel_err": self.max_logits_rms_rel_err,
            "images": self.images,
            "cpu": self.cpu,
        }


class ReferenceSetError(Exception):
    """A reference set that model.json names but that cannot be used."""


def load_reference(model_dir: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, logits) of a model's reference set; None for a model exported without one."""
    block = meta.get("self_check")
    if not block:
        return None
    path = model_dir / str(block.get("file", REFERENCE_FILE))
    try:
        with np.load(path, allow_pickle=False) as data:
            images, logits = data["images"], data["logits"]
    except (OSError, KeyError, ValueError) as exc:
        raise ReferenceSetError(f"{path}: unreadable reference set ({exc})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(logits):
        raise ReferenceSetError(f"{path}: images and logits do not match")
    return images, logits


def run_check(
    meta: dict[str, Any],
    images: np.ndarray,
    reference_logits: np.ndarray,
    logits_of: Callable[[np.ndarray], np.ndarray],
    batch: int,
) -> SelfCheck:
    """Run the model (``logits_of`` a batch) on the reference images in batches of at
    most ``batch`` and compare with the recorded bounds."""
    parts = [logits_of(images[i : i + batch]) for i in range(0, len(images), batch)]
    agreement, rms = logits_error(reference_logits, np.concatenate(parts))
    block = meta["self_check"]
    min_agreement = float(block["min_top1_agreement"])
    max_rms = float(block["max_logits_rms_rel_err"])
    return SelfCheck(
        passed=agreement >= min_agreement and rms <= max_rms,
        top1_agreement=agreement,
        logits_rms_rel_err=rms,
        min_top1_agreement=min_agreement,
        max_logits_rms_rel_err=max_rms,
        images=len(images),
        cpu=cpu_description(),
    )


def synthetic_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth, image-like uint8 ``[count, size, size, 3]`` (blurred colour fields with
    edges) for models exported without calibration images: unlike white noise they give
    a trained network varied, confident outputs to compare."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(4 + i % 5, 4 + i % 7, 3), dtype=np.uint8)
        out[i] = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    return out
