"""tools/loop_calls.py (docs/benchmarks.md, eighth session) still runs on both servers: its
count is per request and per file, never checked against a figure (that depends on the
code being measured, not on this tool)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.service import tiny
from tools import loop_calls


def _tiny_repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    tiny.export(repo)
    return repo


@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw"])
@pytest.mark.parametrize("floor", [False, True], ids=["service", "floor"])
def test_loop_calls_counts_a_servers_calls_per_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], floor: bool, raw: bool
) -> None:
    repo = _tiny_repository(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (tiny.CROP, tiny.CROP, 3), np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    args = ["--repository", str(repo), "--model", tiny.NAME, "--images", str(images),
            "--clients", "2", "--seconds", "1", "--top", "1000",
            *(["--floor"] if floor else []), *(["--raw"] if raw else [])]  # fmt: skip
    assert loop_calls.main(args) == 0
    out = capsys.readouterr().out
    m = re.search(r"(\d+) requests .*: (\d+\.\d) Python function calls per request", out)
    assert m and int(m.group(1)) > 0 and float(m.group(2)) > 10, out
    # Every file the loop ran is listed: the parser both share, unless the image is the
    # body (--raw) and no form is parsed.
    assert ("python_multipart" in out) is not raw, out


def test_loop_calls_cpu_reads_the_threads_cpu_per_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _tiny_repository(tmp_path)
    args = ["--repository", str(repo), "--model", tiny.NAME, "--clients", "2", "--seconds", "1",
            "--cpu"]  # fmt: skip
    assert loop_calls.main(args) == 0
    out = capsys.readouterr().out
    m = re.search(r"event loop thread (\d+\.\d) us CPU per request, other threads", out)
    assert m and float(m.group(1)) > 0, out


@pytest.mark.parametrize("floor", [False, True], ids=["service", "floor"])
def test_loop_calls_cpu_sums_the_event_loops_of_every_serving_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], floor: bool
) -> None:
    repo = _tiny_repository(tmp_path)
    args = ["--repository", str(repo), "--model", tiny.NAME, "--clients", "4", "--seconds", "1",
            "--cpu", "--workers", "2", *(["--floor"] if floor else [])]  # fmt: skip
    assert loop_calls.main(args) == 0
    out = capsys.readouterr().out
    m = re.search(r"2 processes.*event loop threads (\d+\.\d) us CPU per request, other", out)
    assert m and float(m.group(1)) > 0, out


def test_loop_calls_profiles_one_process_only() -> None:
    with pytest.raises(SystemExit):
        loop_calls.main(["--repository", ".", "--model", "m", "--workers", "2"])


def test_a_supervisors_threads_are_never_counted_as_an_event_loop() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        keys = loop_calls.tree_cpu_seconds(os.getpid())
        assert (os.getpid(), -1) in keys and (child.pid, child.pid) in keys
        assert not any(proc == os.getpid() and tid != -1 for proc, tid in keys)
    finally:
        child.kill()
        child.wait()
