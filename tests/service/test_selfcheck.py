"""The load-time self-check: a model is run on its exported reference images on this CPU
and refused (or served with a warning) when its outputs fall outside the recorded bounds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from resnet_serve.contract import selfcheck
from tests.service import tiny
from tests.service.servers import free_port, metric_value, thread_server

R20 = "resnet20_cifar10"


def test_logits_error_measures_agreement_and_relative_rms() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert selfcheck.logits_error(ref, ref) == (1.0, 0.0)
    agreement, rms = selfcheck.logits_error(ref, ref[::-1])
    assert agreement == 0.0 and rms == pytest.approx(np.sqrt(1.0) / np.sqrt(0.5))
    _, rms = selfcheck.logits_error(ref, ref * 1.1)
    assert rms == pytest.approx(0.1)
    assert selfcheck.logits_error(ref, np.full_like(ref, np.nan))[1] == float("inf")


def test_criteria_leave_slack_over_the_export_machine() -> None:
    # int8 measured 0.031 at export (resnet20); a saturating AVX2 kernel measured 0.15.
    bounds = selfcheck.criteria("int8", 32, 1.0, 0.031)
    assert bounds == {"min_top1_agreement": 0.9375, "max_logits_rms_rel_err": 0.062}
    assert bounds["max_logits_rms_rel_err"] < 0.15
    # fp32 against itself: only float noise between CPUs is allowed.
    assert selfcheck.criteria("fp32", 32, 1.0, 0.0)["max_logits_rms_rel_err"] == 1e-3


def test_cpu_description_names_the_isa() -> None:
    text = selfcheck.cpu_description()
    assert "ISA:" in text and text == selfcheck.cpu_description()


def test_export_records_a_reference_set(cifar_repository: Path) -> None:
    # What resnet-export records, on a real export; the checks at load below use the tiny
    # model, whose reference set is recorded the same way (tests/service/tiny.py).
    model_dir = cifar_repository / R20
    meta = json.loads((model_dir / "model.json").read_text())
    block = meta["self_check"]
    assert block["file"] == "reference.npz" and block["images"] == 32
    assert block["source"] == "synthetic"
    assert block["measured"] == {"top1_agreement": 1.0, "logits_rms_rel_err": 0.0}
    images, logits = selfcheck.load_reference(model_dir, meta)  # type: ignore[misc]
    assert images.shape == (32, 32, 32, 3) and images.dtype == np.uint8
    assert logits.shape == (32, 10) and logits.dtype == np.float32
    # Image-like, not noise: a trained network gives them varied answers.
    assert len(set(logits.argmax(1).tolist())) >= 3


def _copy_model(src: Path, dst_repo: Path) -> Path:
    dst = dst_repo / src.name
    shutil.copytree(src.resolve(), dst)
    return dst


def _tamper(model_dir: Path) -> None:
    """Reference logits as a CPU that computes differently would have them: each image's
    top two classes swapped, so the recorded answers disagree with this machine's."""
    with np.load(model_dir / "reference.npz") as d:
        images, logits = d["images"], d["logits"].copy()
    order = np.argsort(logits, axis=1)
    rows = np.arange(len(logits))
    top, second = order[:, -1], order[:, -2]
    logits[rows, top], logits[rows, second] = logits[rows, second], logits[rows, top].copy()
    np.savez_compressed(model_dir / "reference.npz", images=images, logits=logits)


def _serve(repo: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RESNET_SERVE_LOG_LEVEL": "warning"}
    return subprocess.run(
        [sys.executable, "-m", "resnet_serve.service.cli", "--repository", str(repo),
         "--port", str(free_port()), *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_a_model_outside_its_bounds_is_refused_with_one_line(
    tiny_repository: Path, tmp_path: Path
) -> None:
    _tamper(_copy_model(tiny_repository / tiny.NAME, tmp_path))
    proc = _serve(tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    (line,) = lines
    assert f"model {tiny.NAME} (fp32) failed its self-check: top-1 agreement 0.000 < 0.938" in line
    assert "logits RMS error" in line and "32 reference images" in line
    assert "ISA:" in line and "--self-check warn" in line


def test_warn_serves_the_model_and_says_so(tiny_repository: Path, tmp_path: Path) -> None:
    _tamper(_copy_model(tiny_repository / tiny.NAME, tmp_path))
    with thread_server(tmp_path, self_check="warn") as srv:
        metrics = httpx.get(srv.url + "/metrics").text
        assert metric_value(metrics, "resnet_serve_model_self_check", model=tiny.NAME) == 0.0
        info = httpx.get(f"{srv.url}/v1/models/{tiny.NAME}").json()
        result = info["self_check_result"]
        assert result["passed"] is False and result["top1_agreement"] == 0.0
        assert "ISA:" in result["cpu"]
        listed = httpx.get(srv.url + "/v1/models").json()
        assert listed["models"][0]["self_check_result"]["passed"] is False


def test_a_passing_model_reports_its_check(tiny_repository: Path, tmp_path: Path) -> None:
    _copy_model(tiny_repository / tiny.NAME, tmp_path)
    with thread_server(tmp_path) as srv:
        metrics = httpx.get(srv.url + "/metrics").text
        assert metric_value(metrics, "resnet_serve_model_self_check", model=tiny.NAME) == 1.0
        assert metric_value(metrics, "resnet_serve_time_to_ready_seconds") > 0
        result = httpx.get(f"{srv.url}/v1/models/{tiny.NAME}").json()["self_check_result"]
        assert result["passed"] is True and result["images"] == 32
        assert result["top1_agreement"] == 1.0 and result["logits_rms_rel_err"] < 1e-5


def test_off_and_old_exports_skip_the_check(tiny_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_repository / tiny.NAME, tmp_path)
    _tamper(model_dir)
    with thread_server(tmp_path, self_check="off") as srv:
        metrics = httpx.get(srv.url + "/metrics").text
        assert "resnet_serve_model_self_check{" not in metrics
        assert httpx.get(f"{srv.url}/v1/models/{tiny.NAME}").json()["self_check_result"] is None
    # A model exported before reference sets existed has no self_check block: served.
    meta = json.loads((model_dir / "model.json").read_text())
    del meta["self_check"]
    (model_dir / "model.json").write_text(json.dumps(meta))
    (model_dir / "reference.npz").unlink()
    with thread_server(tmp_path) as srv:
        assert httpx.get(srv.url + "/readyz").status_code == 200


def test_an_unreadable_reference_set_is_a_load_error(tiny_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_repository / tiny.NAME, tmp_path)
    (model_dir / "reference.npz").write_bytes(b"not an npz")
    proc = _serve(tmp_path)
    assert proc.returncode == 2
    assert "reference.npz: unreadable reference set" in proc.stderr
    assert "Traceback" not in proc.stderr
