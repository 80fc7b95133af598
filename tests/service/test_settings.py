from __future__ import annotations

import pytest
from pydantic import ValidationError

from resnet_serve.service.cli import build_parser, settings_from_args
from resnet_serve.service.devices import Device, parse_devices, resolve_devices
from resnet_serve.service.settings import Settings


def test_default_buckets_per_device() -> None:
    s = Settings()
    assert s.max_batch_size == 32 and s.batch_buckets == []
    assert s.buckets_for("cuda") == [1, 2, 4, 8, 16, 32]
    assert s.buckets_for("cpu") == list(range(1, 33))
    assert Settings(max_batch_size=24).buckets_for("cuda") == [1, 2, 4, 8, 16, 24]
    assert Settings(batch_buckets=[1, 8, 32]).buckets_for("cpu") == [1, 8, 32]


def test_warmup_sizes_per_device() -> None:
    # The CPU warms one batch (no batch size has a first-run cost there); CUDA every
    # bucket (each new shape is a cuDNN search); either can be forced.
    s = Settings()
    assert s.warmup_sizes("cpu") == [1]
    assert s.warmup_sizes("cuda") == [1, 2, 4, 8, 16, 32]
    assert Settings(warmup_all_buckets=True).warmup_sizes("cpu") == list(range(1, 33))
    assert Settings(warmup_all_buckets=False).warmup_sizes("cuda") == [1]


def test_threads_are_divided_among_a_models_own_sessions(tiny_pair_repository) -> None:
    from resnet_serve.service.metrics import Metrics
    from resnet_serve.service.runtime import Runtime
    from resnet_serve.service.settings import cpu_count

    # Two models in one process: each model's session still gets every core (they run
    # when the other is idle; a share each would halve a lone busy model).
    rt = Runtime.load(Settings(repository=tiny_pair_repository, self_check="off"), Metrics())
    assert len(rt.models) == 2
    for model in rt.models.values():
        assert model.pool.workers[0].options.intra_op_num_threads == cpu_count()
    # Sessions of one model run at the same time: they share the cores.
    s = Settings(repository=tiny_pair_repository, sessions_per_device=2, self_check="off")
    rt = Runtime.load(s, Metrics())
    threads = {w.options.intra_op_num_threads for m in rt.models.values() for w in m.pool.workers}
    assert threads == {max(1, cpu_count() // 2)}


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_MODELS", "b, a")
    monkeypatch.setenv("RESNET_SERVE_BATCH_BUCKETS", "1,4,16")
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("RESNET_SERVE_JPEG_DRAFT", "false")
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_DELAY_MS", "3.5")
    s = Settings()
    assert s.models == ["b", "a"] and s.batch_buckets == [1, 4, 16]
    assert s.jpeg_draft is False and s.max_batch_delay_ms == 3.5


def test_cli_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_PORT", "9000")
    assert settings_from_args([]).port == 9000
    s = settings_from_args(["--port", "9100", "--no-jpeg-draft", "--models", "x,y"])
    assert s.port == 9100 and s.jpeg_draft is False and s.models == ["x", "y"]


def test_every_setting_is_a_flag() -> None:
    flags = {a.dest for a in build_parser()._actions}
    assert set(Settings.model_fields) <= flags


def test_invalid_values() -> None:
    with pytest.raises(ValidationError):
        Settings(max_batch_size=0)
    with pytest.raises(ValidationError):
        Settings(max_batch_size=16, batch_buckets=[1, 8])  # largest bucket must be the max


def test_devices() -> None:
    assert parse_devices("cpu") == [Device("cpu")]
    assert parse_devices("cuda") == [Device("cuda", 0)]
    assert parse_devices("cuda:0,1") == [Device("cuda", 0), Device("cuda", 1)]
    for bad in ("gpu", "cuda:", "cuda:a", "cuda:-1"):
        with pytest.raises(ValueError):
            parse_devices(bad)
    assert resolve_devices("cuda:0,1", ["CPUExecutionProvider"]) == [Device("cpu")]
    assert resolve_devices("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        Device("cuda", 1)
    ]
