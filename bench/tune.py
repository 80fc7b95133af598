"""``resnet-bench --tune``: the full search of ``service.tuning`` on the benchmark's photo
corpus, written where ``resnet-serve --tuning FILE`` and ``--tuning auto`` read it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from resnet_serve.service import tuner, tuning
from resnet_serve.service.repository import load_model_spec
from resnet_serve.service.settings import Settings


def run(
    model_dir: Path,
    images: Sequence[bytes],
    settings: Settings,
    out: Path,
    budget_s: float,
    rounds: int,
    log: Callable[[str], None],
) -> Path:
    """Search, then write ``out/tuning.json`` and this machine's cache entry; the file's
    path (for ``--tuning``)."""
    spec = load_model_spec(model_dir)
    log(f"tuning {spec.name}: about {budget_s:g} s, {rounds} round(s) per configuration")
    choice = tuner.search(
        spec, images, budget_s=budget_s, latency_bound_ms=settings.latency_slo_ms / 2,
        max_batch=settings.max_batch_size, rounds=rounds, full=True, log_fn=log,
    )  # fmt: skip
    path = out / "tuning.json"
    tuning.save([choice], path)
    cache = tuning.cache_path(choice.key)
    tuning.save([choice], cache)
    log(
        f"tuning {spec.name}: chose {choice.settings}: {choice.img_s:.1f} img/s offline, batch "
        f"p50 {choice.batch_p50_ms:.1f} ms ({choice.seconds:.0f} s); wrote {path} and {cache}"
    )
    return path


def markdown(path: Path) -> str:
    """The search's measurements as a table, best first."""
    (choice,) = tuning.load_file(path)
    lines = [
        "## Tuning (offline, this machine)",
        "",
        f"Chosen: `{choice.settings}`, {choice.img_s:.1f} img/s, batch p50 "
        f"{choice.batch_p50_ms:.1f} ms (bound {choice.latency_bound_ms:g} ms); key "
        f"`{choice.key}`; {choice.seconds:.0f} s.",
        "",
        "Pipelines are compared as served: their img/s with the service's own CPU per batch "
        "added (`served_img_s`, resnet_serve/service/tuner.py).",
        "",
        "| stage | max batch | sessions | intra-op | decode | img/s | as served | batch p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    score = lambda m: m.get("served_img_s", m["img_s"])  # noqa: E731
    rows = sorted(choice.measured, key=lambda m: (m["stage"] != "pipeline", -score(m)))
    for m in rows:
        decode = m["decode_workers"] if m["stage"] == "pipeline" else "-"
        served = f"{m['served_img_s']:.1f}" if "served_img_s" in m else "-"
        lines.append(
            f"| {m['stage']} | {m['max_batch_size']} | {m['sessions_per_device']} | "
            f"{m['intra_op_threads']} | {decode} | {m['img_s']:.1f} | {served} | "
            f"{m['batch_p50_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"
