"""Self-tuning: the search (on the tiny model: its mechanics, not its numbers), a tuning
file applied at startup (and shown in /v1/models/{m}), options given explicitly winning
over it, and --tuning auto measuring in the background, caching, and using the cache at
the next start. Nothing here depends on which configuration wins: that is the machine's
business."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import pytest

from resnet_serve.service import tuner, tuning
from resnet_serve.service.repository import RepositoryError, load_model_spec
from resnet_serve.service.settings import Settings
from tests.service import tiny
from tests.service.servers import ProcessServer, children, metric_value, wait_until

MODEL = tiny.NAME


def _choice(spec_dir: Path, img_s: float = 1.0, **settings: int) -> tuning.Choice:
    spec = load_model_spec(spec_dir)
    return tuning.Choice(
        model=spec.name, key=tuning.machine_key(spec), settings=settings, img_s=img_s,
        batch_p50_ms=1.0, latency_bound_ms=500.0, measured_at="2026-01-01T00:00:00+00:00",
        seconds=1.0,
    )  # fmt: skip


def test_search_measures_and_picks_a_candidate(tiny_repository: Path, tmp_path: Path) -> None:
    spec = load_model_spec(tiny_repository / MODEL)
    images = tuner.synthetic_jpegs(4)
    lines: list[str] = []
    choice = tuner.search(spec, images, budget_s=3.0, max_batch=8, log_fn=lines.append)
    assert choice.key["model_sha256"] == spec.metadata["onnx_sha256"]
    assert choice.key["cpus"] >= 1 and choice.key["onnxruntime"]
    engine = [m for m in choice.measured if m["stage"] == "engine"]
    pipelines = [m for m in choice.measured if m["stage"] == "pipeline"]
    assert [m["max_batch_size"] for m in engine] == [1, 2, 4, 8]
    assert pipelines and all(m["img_s"] > 0 and m["batch_p50_ms"] > 0 for m in pipelines)
    chosen = {k: choice.settings[k] for k in tuning.TUNED_FIELDS}
    assert chosen in [{k: m[k] for k in tuning.TUNED_FIELDS} for m in pipelines]
    # The winner is the fastest as served within the tie margin.
    served = {m["max_batch_size"]: m["served_img_s"] for m in pipelines}
    won = tuner.served_img_s(choice.img_s, choice.settings["max_batch_size"], choice.key["cpus"])
    assert won >= max(served.values()) * (1 - tuner.TIE) - 0.01
    assert choice.key["selection"] == tuning.SELECTION
    assert len(lines) == len(engine) + len(pipelines)  # one round
    path = tmp_path / "t.json"
    tuning.save([choice], path)
    (back,) = tuning.load_file(path)
    assert back.to_json() == choice.to_json()


def _measured(batch: int, img_s: float) -> tuner.Measured:
    return tuner.Measured(tuner.Candidate(batch, 1, 2, 1), img_s, 1.0)


def test_batches_are_compared_as_served_not_offline_alone() -> None:
    # ResNet-20 on two cores (docs/benchmarks.md, ninth session): offline, a batch of 2 was
    # within the tie of a batch of 8 and won as the cheaper; served, each batch costs the
    # service CPU that the pipeline never pays, and a cap of 2 served 0.85 of a larger one.
    small, large = _measured(2, 3904.6), _measured(8, 3893.5)
    assert tuner._better(large, small, cores=2) and not tuner._better(small, large, cores=2)
    assert tuner.served_img_s(3904.6, 2, 2) < tuner.served_img_s(3893.5, 8, 2)
    # A big model (ResNet-50, about 50 img/s): the batch's cost is nothing beside an
    # image's, and the smaller batch within the tie still wins.
    small, large = _measured(4, 53.6), _measured(16, 53.4)
    assert tuner._better(small, large, cores=2) and not tuner._better(large, small, cores=2)
    assert tuner.served_img_s(53.6, 4, 2) > 53.6 * 0.998
    # A clearly faster small batch still wins.
    assert tuner._better(_measured(2, 5000.0), _measured(8, 3900.0), cores=2)


def test_a_choice_by_an_older_rule_is_measured_again(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spec = load_model_spec(tiny_repository / MODEL)
    choice = _choice(tiny_repository / MODEL, max_batch_size=2)
    old_key = {k: v for k, v in choice.key.items() if k != "selection"}  # as cached before
    tuning.save([dataclasses.replace(choice, key=old_key)], tuning.cache_path(old_key))
    assert tuning.find(spec, Settings(tuning="auto")) == (None, True)
    tuning.save([choice], tuning.cache_path(choice.key))
    found, missing = tuning.find(spec, Settings(tuning="auto"))
    assert found is not None and found.settings == {"max_batch_size": 2} and not missing


def test_apply_keeps_what_was_given() -> None:
    choice = tuning.Choice("m", {}, {"max_batch_size": 4, "intra_op_threads": 1,
                                      "sessions_per_device": 2, "decode_workers": 1},
                           1.0, 1.0, 1.0, "", 1.0)  # fmt: skip
    tuned = tuning.apply(choice, Settings(max_batch_size=16))
    assert (tuned.max_batch_size, tuned.sessions_per_device, tuned.decode_workers) == (16, 2, 1)
    assert tuning.apply(None, Settings()) == Settings()
    assert tuning.apply(choice, Settings(batch_buckets=[1, 32])).max_batch_size == 32


def test_a_tuning_file_is_applied_and_reported(tiny_repository: Path, tmp_path: Path) -> None:
    path = tmp_path / "tuning.json"
    settings = {"max_batch_size": 4, "intra_op_threads": 1, "sessions_per_device": 2,
                "decode_workers": 1}  # fmt: skip
    tuning.save([_choice(tiny_repository / MODEL, **settings)], path)
    srv = ProcessServer(tiny_repository, tuning=str(path)).start()
    try:
        info = httpx.get(srv.url + f"/v1/models/{MODEL}").json()
        assert info["tuning"]["settings"] == settings
        assert info["tuning"]["source"] == str(path)
        text = httpx.get(srv.url + "/metrics").text
        assert metric_value(text, "resnet_serve_max_batch_size", model=MODEL) == 4
        assert metric_value(text, "resnet_serve_sessions", model=MODEL) == 2
    finally:
        assert srv.stop() == 0
    # An option given explicitly wins over the file.
    srv = ProcessServer(tiny_repository, tuning=str(path), max_batch_size="8").start()
    try:
        text = httpx.get(srv.url + "/metrics").text
        assert metric_value(text, "resnet_serve_max_batch_size", model=MODEL) == 8
        assert metric_value(text, "resnet_serve_sessions", model=MODEL) == 2
    finally:
        assert srv.stop() == 0


def test_a_tuning_file_for_another_model_is_refused(tiny_repository: Path, tmp_path: Path) -> None:
    path = tmp_path / "tuning.json"
    # Tuning is matched on model.onnx: another model's is another file.
    mine = _choice(tiny_repository / MODEL, max_batch_size=4)
    other = dataclasses.replace(mine, model="other", key={**mine.key, "model_sha256": "0" * 64})
    tuning.save([other], path)
    spec = load_model_spec(tiny_repository / MODEL)
    with pytest.raises(RepositoryError, match="no tuning for model"):
        tuning.find(spec, Settings(tuning=str(path)))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RepositoryError, match="cannot read"):
        tuning.find(spec, Settings(tuning=str(tmp_path / "bad.json")))


def test_auto_measures_in_the_background_then_uses_the_cache(
    tiny_repository: Path, tmp_path: Path
) -> None:
    srv = ProcessServer(tiny_repository, tuning="auto", tuning_budget_s="2", log_level="info")
    srv.env["XDG_CACHE_HOME"] = str(tmp_path)
    srv.start()  # ready without waiting for any measurement
    try:
        assert httpx.get(srv.url + f"/v1/models/{MODEL}").json()["tuning"] is None
        cache = tmp_path / "resnet-serve" / "tuning"
        wait_until(lambda: any(cache.glob("*.json")), timeout=180)
        assert "tuned in" in srv.output()
    finally:
        assert srv.stop() == 0
    (entry,) = cache.glob("*.json")
    (choice,) = tuning.load_file(entry)
    srv = ProcessServer(tiny_repository, tuning="auto")
    srv.env["XDG_CACHE_HOME"] = str(tmp_path)
    srv.start()
    try:
        info = httpx.get(srv.url + f"/v1/models/{MODEL}").json()["tuning"]
        assert info["source"] == f"cache {entry}"
        assert info["settings"] == choice.settings
        text = httpx.get(srv.url + "/metrics").text
        assert (
            metric_value(text, "resnet_serve_max_batch_size", model=MODEL)
            == (choice.settings["max_batch_size"])
        )
    finally:
        assert srv.stop() == 0
    # Another model file (or CPU, or onnxruntime) is another key: not this entry.
    other = dataclasses.replace(choice, key={**choice.key, "model_sha256": "0" * 64})
    assert tuning.cache_path(other.key) != entry
    assert json.loads(entry.read_text())["format_version"] == tuning.FORMAT_VERSION


def test_a_choice_of_single_threaded_sessions_is_served_as_workers(
    tiny_repository: Path, tmp_path: Path
) -> None:
    """Two sessions of one intra-op thread each, for a model fast enough that the event
    loop is the limit: two worker processes of one session each (each its own event loop),
    unless the layout is given; the choice is reported as is."""
    from resnet_serve.service.workers import LOOP_BOUND_IMG_S, tuned_layout

    path = tmp_path / "tuning.json"
    chosen = {"max_batch_size": 4, "intra_op_threads": 1, "sessions_per_device": 2,
              "decode_workers": 1}  # fmt: skip
    fast = LOOP_BOUND_IMG_S * 3
    tuning.save([_choice(tiny_repository / MODEL, fast, **chosen)], path)
    base = {"repository": tiny_repository, "tuning": str(path)}
    laid = tuned_layout(Settings(**base))
    assert (laid.workers, laid.intra_op_threads) == (2, 1)
    for given in ({"workers": 1}, {"sessions_per_device": 2}, {"intra_op_threads": 2},
                  {"tuning": "off"}):  # fmt: skip
        assert tuned_layout(Settings(**{**base, **given})).workers == 1, given
    # A choice of one session with all the cores' threads keeps one process; so does a
    # slow model's choice of single-threaded sessions (its event loop is not the limit).
    one = tmp_path / "one.json"
    tuning.save([_choice(tiny_repository / MODEL, fast, intra_op_threads=2)], one)
    assert tuned_layout(Settings(repository=tiny_repository, tuning=str(one))).workers == 1
    slow = tmp_path / "slow.json"
    tuning.save([_choice(tiny_repository / MODEL, LOOP_BOUND_IMG_S / 2, **chosen)], slow)
    assert tuned_layout(Settings(repository=tiny_repository, tuning=str(slow))).workers == 1

    srv = ProcessServer(tiny_repository, tuning=str(path), log_level="info").start()
    try:
        assert srv.proc is not None and len(children(srv.proc.pid)) == 2
        assert "tuned layout: 2 worker processes" in srv.output()
        info = httpx.get(srv.url + f"/v1/models/{MODEL}").json()
        assert info["tuning"]["settings"] == chosen
        # Each worker: one session of one thread; on two cores also one decode thread, so
        # the session decodes (SessionPool.decodes).
        from resnet_serve.service.settings import cpu_count

        one_core_each = max(1, cpu_count() // 2) == 1
        assert info["decoding"] == ("session threads" if one_core_each else "decode pool")
        text = httpx.get(srv.url + "/metrics").text
        assert metric_value(text, "resnet_serve_sessions", model=MODEL) == 2  # one each
        assert metric_value(text, "resnet_serve_max_batch_size", model=MODEL) == 4
    finally:
        assert srv.stop() == 0
