"""tools/stage_tail.py against a real server: the Server-Timing stages of sequential
requests, and the slowest ones set apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.service.servers import encode, thread_server
from tools import stage_tail


def test_server_timing_is_parsed() -> None:
    header = 'queue;dur=0.05, preprocess;dur=2.1;desc="decode", inference;dur=19.25'
    assert stage_tail.server_timing(header) == {
        "queue": 0.05, "preprocess": 2.1, "inference": 19.25,
    }  # fmt: skip
    assert stage_tail.server_timing("") == {}


def test_stages_of_sequential_requests(
    cifar_repository: Path, cifar_test: dict[str, np.ndarray]
) -> None:
    images = [encode(img, "PNG") for img in cifar_test["images"][:4]]
    with thread_server(cifar_repository, models="resnet20_cifar10") as srv:
        rows = stage_tail.measure(srv.url, "resnet20_cifar10", images, 40, warmup=2)
    assert len(rows) == 40
    assert all(latency > 0 for latency, _ in rows)
    assert all({"preprocess", "inference"} <= set(stages) for _, stages in rows)
    # The server's own stages fit inside the latency the client saw.
    assert all(sum(stages.values()) <= latency for latency, stages in rows)
    text = stage_tail.summary(rows)
    assert text.startswith("40 requests: latency p50 ")
    assert "| inference |" in text and "| latency |" in text
