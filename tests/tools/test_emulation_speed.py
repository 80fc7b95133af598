"""tools/emulation_speed.py (docs/benchmarks.md, tenth session): it times both kinds of
work natively and under the emulator, and the emulated process does see an AVX2-only CPU
(numpy's run-time CPUID), whatever CPU runs the test. No timing is asserted."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.service import tiny
from tools import emulation_speed


def test_times_the_engine_and_python_natively_and_on_an_avx2_only_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("qemu-x86_64") is None:
        message = "qemu-x86_64 not found (apt-get install qemu-user)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tiny.export(tmp_path)
    model = tmp_path / tiny.NAME / "model.onnx"
    assert emulation_speed.main(["--model", str(model), "--batch", "2", "--seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    for row in ("onnxruntime batch, ms", "Python loop, ms"):
        m = re.search(rf"\| {re.escape(row)} \| (\d+\.\d+) \| (\d+\.\d+) \| (\d+\.\d)x \|", out)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out
    assert "| avx2 (CPUID, numpy) | True | True | |" in out
    assert re.search(r"\| avx512f \(CPUID, numpy\) \| (True|False) \| False \| \|", out), out


def test_needs_the_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit):
        emulation_speed.main(["--model", "m.onnx"])
