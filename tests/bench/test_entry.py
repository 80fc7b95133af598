"""``resnet-bench`` without the ``bench`` extra: one line naming the extra, exit code 2,
whichever of its packages is missing. Run as the installed script, with the package's
import blocked (``sys.modules[name] = None``, set by a sitecustomize)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_serve.bench.entry import BENCH_EXTRA, INSTALL
from tests.conftest import ROOT


def _resnet_bench(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("resnet-bench")
    assert script.exists(), f"{script} missing: pip install -e . first"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("module", sorted(BENCH_EXTRA))
def test_missing_bench_extra_is_one_line_and_exit_code_2(tmp_path: Path, module: str) -> None:
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = _resnet_bench("--url", "http://127.0.0.1:9", env=env)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert INSTALL in line and BENCH_EXTRA[module] in line, line


def test_with_the_extra_the_benchmark_runs() -> None:
    proc = _resnet_bench("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: resnet-bench")


def test_the_checked_packages_are_the_extra_and_the_readme_names_it() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    (extra,) = re.findall(r"^bench = \[(.*)\]$", pyproject, re.M)
    assert set(re.findall(r'"([A-Za-z0-9_.-]+)', extra)) == set(BENCH_EXTRA.values())
    performance = (ROOT / "README.md").read_text().split("## Performance")[1].split("\n## ")[0]
    assert INSTALL in performance
