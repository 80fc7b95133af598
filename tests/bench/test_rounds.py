"""``--rounds``: the systems' sweeps interleaved with every server up once, and the
baselines' ratios as medians of paired rounds."""

from __future__ import annotations

from typing import Any

import pytest

from resnet_serve.bench.cli import run_systems
from resnet_serve.bench.load import StepResult
from resnet_serve.bench.report import paired_ratios, pipeline_paired


def _step(system: str, c: int, r: int, ok: int, p50: float) -> StepResult:
    return StepResult(
        system=system, concurrency=c, images_per_request=1, window_s=1.0, ok=ok, errors={},
        latencies_ms=[p50] * 3, client_cpu_s=0.0, round=r,
    )  # fmt: skip


def test_paired_ratios_are_medians_of_the_rounds() -> None:
    steps = [
        _step("service", 1, 1, 10, 50.0), _step("ort", 1, 1, 5, 100.0),
        _step("service", 1, 2, 10, 50.0), _step("ort", 1, 2, 10, 50.0),
        _step("service", 1, 3, 30, 10.0), _step("ort", 1, 3, 10, 40.0),
        _step("service", 4, 1, 40, 1.0), _step("ort", 4, 1, 20, 1.0),
        _step("service", 4, 2, 40, 1.0), _step("ort", 4, 2, 40, 1.0),
        _step("service", 4, 3, 40, 1.0), _step("ort", 4, 3, 80, 1.0),
    ]  # fmt: skip
    rows = {r.name: r for r in paired_ratios(steps, "ort")}
    assert rows["service@1 / ort@1 (img/s), paired rounds"].value == pytest.approx(2.0)
    assert rows["service@4 / ort@4 (img/s), paired rounds"].value == pytest.approx(1.0)
    assert rows["service@4 / ort@4 (img/s), paired rounds"].note == (
        "median of 3: 2.00, 1.00, 0.50"
    )
    assert rows["ort 1-client p50 / service 1-client p50 (ms), paired rounds"].value == (
        pytest.approx(2.0)
    )
    # One round: nothing to pair.
    assert paired_ratios([s for s in steps if s.round == 1], "ort") == []


def test_rounds_interleave_the_sweeps_with_each_server_up_once() -> None:
    events: list[str] = []

    class Server:
        def __init__(self, name: str) -> None:
            self.name = name
            events.append(f"start {name}")

        def stop(self) -> None:
            events.append(f"stop {self.name}")

    def sweep_of(name: str) -> Any:
        def sweep(server: Any) -> list[StepResult]:
            assert server is None or server.name == name
            events.append(f"sweep {name}")
            return [_step(name, 1, 0, 1, 1.0)]

        return sweep

    systems = [
        ("ort", lambda: Server("ort"), sweep_of("ort")),
        ("service", lambda: Server("service"), sweep_of("service")),
    ]
    steps = run_systems(systems, 2, lambda _: None, lambda r: events.append(f"round {r}"))  # type: ignore[arg-type]
    assert events == [
        "start ort", "start service", "round 1", "sweep ort", "sweep service", "round 2",
        "sweep ort", "sweep service", "stop service", "stop ort",
    ]  # fmt: skip
    assert [(s.system, s.round) for s in steps] == [
        ("ort", 1), ("service", 1), ("ort", 2), ("service", 2),
    ]  # fmt: skip
    events.clear()
    run_systems(systems, 1, lambda _: None)  # type: ignore[arg-type]
    assert events == ["start ort", "sweep ort", "stop ort", "start service", "sweep service",
                      "stop service"]  # fmt: skip


def test_the_service_over_the_pipeline_of_the_same_round() -> None:
    steps = [
        _step("service", 16, 1, 90, 1.0), _step("service", 16, 2, 80, 1.0),
        _step("service", 16, 3, 120, 1.0), _step("service", 1, 1, 10, 1.0),
    ]  # fmt: skip
    (row,) = pipeline_paired(steps, [100.0, 100.0, 100.0], 16)
    assert row.name == "service@16 / offline pipeline (img/s), paired rounds"
    assert row.value == pytest.approx(0.9)
    assert row.note == (
        "median of 3: 0.90, 0.80, 1.20 (pipeline img/s by round: 100.0, 100.0, 100.0)"
    )
    # Each round against its own pipeline figure, not the best one.
    (row,) = pipeline_paired(steps, [90.0, 160.0, 120.0], 16)
    assert row.value == pytest.approx(1.0) and row.note.startswith("median of 3: 1.00, 0.50, 1.00")
    # One round, or a round without the service at that load: nothing to pair.
    assert pipeline_paired(steps, [100.0], 16) == []
    assert pipeline_paired(steps, [100.0, 100.0, 100.0], 4) == []
