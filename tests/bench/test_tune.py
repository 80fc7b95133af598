"""``resnet-bench --tune``: the search on the photo corpus, its file and its cache entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_serve.bench.cli import main
from resnet_serve.service import tuning


def test_tune_alone_writes_the_file_and_the_cache(
    cifar_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("skimage")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main([
        "--tune", "--tune-budget", "3", "--tune-rounds", "1",
        "--repository", str(cifar_repository), "--model", "resnet20_cifar10",
        "--corpus-size", "8", "--corpus-dir", str(tmp_path / "corpus"),
        "--server-arg=--max-batch-size 4", "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    (choice,) = tuning.load_file(out / "tuning.json")
    assert choice.model == "resnet20_cifar10"
    assert choice.settings["max_batch_size"] in (1, 2, 4)
    (cached,) = (tmp_path / "cache" / "resnet-serve" / "tuning").glob("*.json")
    assert cached == tuning.cache_path(choice.key)
    text = (out / "results.md").read_text()
    assert "## Tuning" in text and "| pipeline |" in text and "| engine |" in text
    # Searched again with --tuning auto and that choice cached: the search's bounds are the
    # options as given (every batch size up to the default 32), not the cached choice's.
    monkeypatch.setenv("RESNET_SERVE_TUNING", "auto")
    rc = main([
        "--tune", "--tune-budget", "3", "--tune-rounds", "1",
        "--repository", str(cifar_repository), "--model", "resnet20_cifar10",
        "--corpus-size", "8", "--corpus-dir", str(tmp_path / "corpus"),
        "--out", str(tmp_path / "again"), "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    (again,) = tuning.load_file(tmp_path / "again" / "tuning.json")
    engine = {m["max_batch_size"] for m in again.measured if m["stage"] == "engine"}
    assert engine == {1, 2, 4, 8, 16, 32}


def test_tune_needs_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tune", "--out", str(tmp_path)]) == 2
    assert "--tune needs --repository and --model" in capsys.readouterr().err


def test_warns_when_the_service_would_tune_during_the_run(
    cifar_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnet_serve.bench.cli import _tunes_in_background
    from resnet_serve.service.settings import Settings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model_dir = cifar_repository / "resnet20_cifar10"
    assert _tunes_in_background(model_dir, Settings(tuning="auto"))
    assert not _tunes_in_background(model_dir, Settings(tuning="off"))
    assert not _tunes_in_background(None, Settings(tuning="auto"))
