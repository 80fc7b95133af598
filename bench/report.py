"""The results as a markdown report, a PNG plot and a JSON dump of every measurement."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from resnet_serve.bench import peers
from resnet_serve.bench.load import StepResult
from resnet_serve.bench.offline import OfflineResult, Rate

SYSTEM_LABELS = {
    "service": "resnet-serve",
    "naive": "naive FastAPI + PyTorch",
    "ort": "FastAPI + onnxruntime",
}
# The baselines and then the peers, in the order their rows and ratios appear.
BASELINES = ("ort", "naive", *peers.NAMES)
MARKERS = {"service": "o", "ort": "^", "naive": "s", **dict(zip(peers.NAMES, "DvP*X", strict=True))}


def label(system: str) -> str:
    """The report's name of a system; a peer's names its framework and version."""
    if system in peers.NAMES:
        return peers.peer(system).label
    return SYSTEM_LABELS.get(system, system)


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float | None  # None: not measurable in this run; ``note`` says why
    note: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "note": self.note}


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _step(steps: Sequence[StepResult], system: str, concurrency: int) -> StepResult | None:
    return next((s for s in steps if s.system == system and s.concurrency == concurrency), None)


def _peak(steps: Sequence[StepResult], system: str) -> StepResult | None:
    mine = [s for s in steps if s.system == system and s.ok > 0]
    return max(mine, key=lambda s: s.img_s) if mine else None


def _div(a: float, b: float) -> float | None:
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else None


def _baseline_ratios(
    steps: Sequence[StepResult],
    system: str,
    svc_c: StepResult | None,
    svc_1: StepResult | None,
    svc_peak: StepResult | None,
    c: int,
) -> list[Ratio]:
    """The service against one baseline: peak to peak, at ``c`` clients, one client's p50."""
    out: list[Ratio] = []
    peak = _peak(steps, system)
    if svc_peak is None or peak is None:
        return out
    out.append(Ratio(
        f"service peak / {system} peak (img/s)", _div(svc_peak.img_s, peak.img_s),
        f"{svc_peak.img_s:.1f} (at {svc_peak.concurrency}) / "
        f"{peak.img_s:.1f} (at {peak.concurrency})",
    ))  # fmt: skip
    at_c = _step(steps, system, c)
    if svc_c is not None and at_c is not None:
        out.append(Ratio(
            f"service@{c} / {system}@{c} (img/s)", _div(svc_c.img_s, at_c.img_s),
            f"{svc_c.img_s:.1f} / {at_c.img_s:.1f}",
        ))  # fmt: skip
    one = _step(steps, system, 1)
    if svc_1 is not None and one is not None:
        # Inverted, so that above 1 means "the service is better" in every row.
        a, b = one.percentile(50), svc_1.percentile(50)
        out.append(Ratio(
            f"{system} 1-client p50 / service 1-client p50 (ms)", _div(a, b), f"{a:.1f} / {b:.1f}"
        ))  # fmt: skip
    return out


def paired_ratios(steps: Sequence[StepResult], system: str) -> list[Ratio]:
    """With ``--rounds``: the service against ``system`` round by round, at every client
    count both ran (img/s), and one client's p50 inverted; each the median of the rounds'
    ratios, all of them in the note. A round pairs two sweeps a few seconds apart, so a
    slow spell of the machine weighs on both sides of its ratio."""
    rounds = sorted({s.round for s in steps})
    if len(rounds) < 2:
        return []
    out: list[Ratio] = []
    by_key = {(s.system, s.concurrency, s.round): s for s in steps}
    levels = sorted({s.concurrency for s in steps if s.system == system})
    for c in levels:
        pairs = [(by_key.get(("service", c, r)), by_key.get((system, c, r))) for r in rounds]
        if not all(a and b for a, b in pairs):
            continue
        values = [_div(a.img_s, b.img_s) for a, b in pairs]  # type: ignore[union-attr]
        if c == 1:
            lat = [_div(b.percentile(50), a.percentile(50)) for a, b in pairs]  # type: ignore[union-attr]
            out.append(_median_ratio(
                f"{system} 1-client p50 / service 1-client p50 (ms), paired rounds", lat
            ))  # fmt: skip
        out.append(_median_ratio(f"service@{c} / {system}@{c} (img/s), paired rounds", values))
    return out


def _median_ratio(name: str, values: list[float | None]) -> Ratio:
    known = [v for v in values if v is not None]
    note = ", ".join("n/a" if v is None else f"{v:.2f}" for v in values)
    median = float(np.median(known)) if known else None
    return Ratio(name, median, f"median of {len(values)}: {note}")


def pipeline_paired(
    steps: Sequence[StepResult], pipeline_rounds: Sequence[float], c: int
) -> list[Ratio]:
    """The service at ``c`` clients over the offline pipeline measured in the same round
    (``pipeline_rounds[r - 1]`` for round r), the median of the rounds' ratios."""
    by_round = {s.round: s for s in steps if s.system == "service" and s.concurrency == c}
    if len(pipeline_rounds) < 2 or len(by_round) != len(pipeline_rounds):
        return []
    values = [_div(by_round[r + 1].img_s, p) for r, p in enumerate(pipeline_rounds)]
    row = _median_ratio(f"service@{c} / offline pipeline (img/s), paired rounds", values)
    pipe = ", ".join(f"{p:.1f}" for p in pipeline_rounds)
    return [Ratio(row.name, row.value, f"{row.note} (pipeline img/s by round: {pipe})")]


def ratios(
    steps: Sequence[StepResult], offline: OfflineResult | None, at_concurrency: int = 16,
    pipeline_rounds: Sequence[float] = (),
) -> list[Ratio]:  # fmt: skip
    """The ratios table. ``pipeline_rounds``: the offline pipeline measured again at the
    start of each round of ``--rounds`` (``offline.PipelineProbe``)."""
    out: list[Ratio] = []
    c = at_concurrency
    svc_c, svc_1 = _step(steps, "service", c), _step(steps, "service", 1)
    svc_peak = _peak(steps, "service")
    out += pipeline_paired(steps, pipeline_rounds, c)
    if offline is not None:
        pipe = offline.pipeline.images_per_s
        if svc_c is not None:
            out.append(Ratio(
                f"service@{c} / offline pipeline (img/s)", _div(svc_c.img_s, pipe),
                f"{svc_c.img_s:.1f} / {pipe:.1f}",
            ))  # fmt: skip
        else:
            out.append(Ratio(f"service@{c} / offline pipeline (img/s)", None, f"no step at {c}"))
        if svc_peak is not None:
            out.append(Ratio(
                "service peak / offline pipeline (img/s)", _div(svc_peak.img_s, pipe),
                f"{svc_peak.img_s:.1f} (at {svc_peak.concurrency}) / {pipe:.1f}",
            ))  # fmt: skip
        single = offline.single_image.percentile(50)
        name = "service 1-client p50 / offline single-image p50 (ms)"
        if svc_1 is None:
            out.append(Ratio(name, None, "no step at concurrency 1"))
        elif svc_1.images_per_request != 1:
            out.append(Ratio(name, None, "requests carry several images"))
        else:
            p50 = svc_1.percentile(50)
            out.append(Ratio(name, _div(p50, single), f"{p50:.1f} / {single:.1f}"))
    for system in BASELINES:
        out += _baseline_ratios(steps, system, svc_c, svc_1, svc_peak, c)
        out += paired_ratios(steps, system)
    return out


def _ms(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _errors(s: StepResult) -> str:
    return ", ".join(f"{k}: {v}" for k, v in s.errors.items()) if s.errors else "0"


def _corpus_line(corpus: dict[str, Any]) -> str:
    source = corpus.get("source", "photos")
    kinds = ", ".join(f"{n} {ext.upper()}" for ext, n in (corpus.get("formats") or {}).items())
    if source == "photos":
        return f"corpus {corpus['count']} JPEGs"
    return f"images from `{source}` ({kinds or corpus['count']})"


def _cpu(seconds: float | None, window: float) -> str:
    # Percent of one core, as top shows it: 200% is both cores of a 2-core machine.
    return "-" if seconds is None or window <= 0 else f"{100.0 * seconds / window:.0f}%"


def _per_image(seconds: float | None, window: float, img_s: float) -> str:
    # CPU time per image: the budget a request spends, comparable across systems whatever
    # their rates (the offline pipeline's included), where percentages are not.
    if seconds is None or window <= 0 or img_s <= 0:
        return "-"
    return f"{1e6 * seconds / window / img_s:.0f}"


def _idle_line(idle_cpu: dict[str, float]) -> str:
    servers = ", ".join(f"{k} {_cpu(v, 1.0)}" for k, v in idle_cpu.items())
    return (
        "- CPU of each server while all were up and none loaded (with --rounds they share "
        f"the machine during each other's sweeps): {servers}"
    )


def _batch(s: StepResult) -> str:
    mean = s.mean_batch
    return "-" if mean is None else f"{mean:.1f}"


OFFLINE_LABELS = {
    "ort_batch1": "onnxruntime, batch 1",
    "ort_max_batch": "onnxruntime, batch {batch}",
    "decode_single": "decode + preprocess, 1 thread",
    "decode_pool": "decode + preprocess, {threads} threads",
    "pipeline": "pipeline: {threads} decode threads -> batches of {batch}",
    "single_image": "single image: decode + preprocess + batch 1",
}


def offline_label(rate: Rate) -> str:
    return OFFLINE_LABELS[rate.name].format(batch=rate.batch, threads=rate.threads)


def _model_line(info: dict[str, Any]) -> str:
    if not info:
        return "no model.json given"
    return (
        f"arch {info['arch']}, {info['precision']}, {info['input_px']} px input, "
        f"weights {info['weights']}"
    )


def markdown(
    meta: dict[str, Any],
    steps: Sequence[StepResult],
    offline: OfflineResult | None,
    ratio_rows: Sequence[Ratio],
) -> str:
    m = meta
    lines = [
        f"# resnet-bench: {m['model']} ({m['started_at']})",
        "",
        f"- machine: {m['machine']['cpu']}, {m['machine']['cpus_usable']} usable CPUs "
        f"(load average {m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after)",
        f"- model: `{m['model_dir'] or m['model']}` ({_model_line(m['model_info'])})",
        f"- load: `{m['endpoint_path']}`, {m['images_per_request']} image(s) per request"
        f"{' as the raw body' if m.get('body') == 'raw' else ''}"
        f"{' (baseline: 1)' if m.get('baseline') else ''}, {m['step']}, "
        f"warmup {m['warmup_s']:g} s per step, "
        f"{_corpus_line(m['corpus'])}, client {m.get('client', 'aiohttp')}",
        f"- service: {m['service']}",
        *([f"- baseline: {m['baseline']}"] if m.get("baseline") else []),
        *([_idle_line(m["idle_cpu"])] if m.get("idle_cpu") else []),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
        "## HTTP load",
        "",
        "| system | clients | img/s | req/s | p50 ms | p95 ms | p99 ms | errors "
        "| client CPU | server CPU | mean batch | client µs/img | server µs/img |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    many = len({s.round for s in steps}) > 1
    for s in steps:
        lines.append(
            f"| {label(s.system)}{f' (round {s.round})' if many else ''} "
            f"| {s.concurrency} | {s.img_s:.1f} "
            f"| {s.req_s:.1f} | {_ms(s.percentile(50))} | {_ms(s.percentile(95))} "
            f"| {_ms(s.percentile(99))} | {_errors(s)} | {_cpu(s.client_cpu_s, s.window_s)} "
            f"| {_cpu(s.server_cpu_s, s.window_s)} | {_batch(s)} "
            f"| {_per_image(s.client_cpu_s, s.window_s, s.img_s)} "
            f"| {_per_image(s.server_cpu_s, s.window_s, s.img_s)} |"
        )
    if offline is not None:
        lines += [
            "",
            "## Offline limits (same model file and preprocessing, no HTTP)",
            "",
            f"{offline.sessions} session(s) x {offline.intra_op_threads} intra-op threads, "
            f"{offline.decode_threads} decode threads, max batch {offline.max_batch}; "
            f"each the best of {offline.rounds} interleaved rounds of {offline.seconds:g} s. "
            "The pipeline runs its batches as the service does under load (onnxruntime's "
            "threads not spinning while decoding goes on, unless --spin-under-load).",
            "",
            "| measurement | img/s | p50 ms per call | CPU | CPU µs/img |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in offline.rates():
            known = math.isfinite(r.cpu_percent)
            cpu = f"{r.cpu_percent:.0f}%" if known else "-"
            per = _per_image(r.cpu_percent / 100, 1.0, r.images_per_s) if known else "-"
            lines.append(
                f"| {offline_label(r)} | {r.images_per_s:.1f} | {_ms(r.percentile(50))} | {cpu} "
                f"| {per} |"
            )
    if ratio_rows:
        lines += ["", "## Ratios", "", "| ratio | value | from |", "|---|---:|---|"]
        for r in ratio_rows:
            value = "n/a" if r.value is None else f"{r.value:.2f}"
            lines.append(f"| {r.name} | {value} | {r.note} |")
    return "\n".join(lines) + "\n"


def plot(
    path: Path, title: str, steps: Sequence[StepResult], offline: OfflineResult | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(13, 5))
    for system, marker in MARKERS.items():
        mine = [s for s in steps if s.system == system and s.round == 1]  # --rounds: the first
        if not mine:
            continue
        name = label(system)
        ax_t.plot([s.concurrency for s in mine], [s.img_s for s in mine], marker=marker,
                  label=name)  # fmt: skip
        ax_l.plot([s.img_s for s in mine], [s.percentile(99) for s in mine], marker=marker,
                  label=name)  # fmt: skip
        for s in mine:
            ax_l.annotate(str(s.concurrency), (s.img_s, s.percentile(99)), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))  # fmt: skip
    measured = [s.img_s for s in steps if s.ok > 0]
    if offline is not None:
        limits = (
            (offline.pipeline, "-", "tab:green"),
            (offline.ort_max_batch, "--", "tab:red"),
            (offline.ort_batch1, ":", "tab:red"),
            (offline.decode_pool, "-.", "tab:purple"),
        )
        # A limit far above everything else (decoding, for a large model) would squash the
        # curves into the bottom of the plot: it is named in the legend, not drawn.
        inference = [offline.pipeline, offline.ort_max_batch, offline.ort_batch1]
        top = 1.5 * max([*measured, *(r.images_per_s for r in inference)], default=0.0)
        for rate, style, color in limits:
            text = f"offline {offline_label(rate)}: {rate.images_per_s:.1f} img/s"
            if rate.images_per_s > top > 0:
                ax_t.plot([], [], linestyle=style, color=color, label=text + " (off scale)")
                continue
            ax_t.axhline(rate.images_per_s, linestyle=style, color=color, label=text, lw=1)
            ax_l.axvline(rate.images_per_s, linestyle=style, color=color, lw=1)
    ax_t.set_xscale("log", base=2)
    concurrencies = sorted({s.concurrency for s in steps})
    if concurrencies:
        ax_t.set_xticks(concurrencies, [str(c) for c in concurrencies])
    ax_t.set_xlabel("concurrent clients")
    ax_t.set_ylabel("images / s")
    ax_t.set_ylim(bottom=0)
    ax_t.set_title("throughput")
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    ax_l.set_xlabel("images / s")
    ax_l.set_ylabel("p99 latency (ms)")
    ax_l.set_yscale("log")
    ax_l.set_title("p99 latency vs throughput (labels: clients)")
    ax_l.grid(alpha=0.3, which="both")
    ax_l.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dump_json(
    path: Path,
    meta: dict[str, Any],
    steps: Sequence[StepResult],
    offline: OfflineResult | None,
    ratio_rows: Sequence[Ratio],
) -> None:
    doc = {
        "meta": meta,
        "steps": [s.to_json() for s in steps],
        "offline": offline.to_json() if offline is not None else None,
        "ratios": [r.to_json() for r in ratio_rows],
    }
    # NaN (a step without one success) is not JSON; null says the same.
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
