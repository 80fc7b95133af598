"""Triton's protocol extensions that its tools need: model configuration, statistics and
the repository index, as plain dicts.

Pure builders, shared by every front end: the HTTP routes answer them as JSON as Triton
does, and a gRPC servicer turns them into Triton's messages with
``google.protobuf.json_format.ParseDict`` (``{"config": model_config(...)}`` into
``ModelConfigResponse``, ``model_statistics(...)`` into ``ModelStatisticsResponse``,
``{"models": repository_index(...)}`` into ``RepositoryIndexResponse``): every key is a
field of Triton's model_config.proto and grpc_service.proto.

The configuration is derived from the V2 model metadata (its inputs and outputs, one list
for both answers) and the serving limits; perf_analyzer reads it for ``max_batch_size``
(the first dimension of every tensor is the batch) and the scheduler in use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from resnet_serve.service.stats import OUTCOMES, STAGES, UNUSED, ModelStats
from resnet_serve.service.v2_encode import VERSION, model_metadata

if TYPE_CHECKING:
    from resnet_serve.service.runtime import Runtime, ServedModel
    from resnet_serve.service.v2_names import V2Model

BACKEND = "onnxruntime"
# V2 datatypes to model_config.proto's DataType names; BYTES is TYPE_STRING there.
DATA_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32", "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BYTES": "TYPE_STRING",
    "BF16": "TYPE_BF16",
}  # fmt: skip
# The V2 input's layout, when it is an image batch: [N, H, W, C].
IMAGE_FORMAT = "FORMAT_NHWC"
# Repository index states (Triton's model states).
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"


@dataclass(frozen=True)
class Instances:
    """Sessions of a model on one kind of device: Triton's instance group."""

    kind: str  # "cpu" | "cuda"
    count: int  # sessions in all, over ``gpus``
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class Scheduling:
    """How the service batches a model's requests."""

    max_batch_size: int
    preferred_batch_sizes: Sequence[int]
    max_queue_delay_us: int
    max_queue_size: int


def _tensor(entry: dict[str, Any], image: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": entry["name"],
        "data_type": DATA_TYPES[entry["datatype"]],
        # The metadata's first dimension is the batch (-1); with max_batch_size > 0 the
        # configuration leaves it out, as Triton's does.
        "dims": [int(d) for d in entry["shape"][1:]],
    }
    if image:
        out["format"] = IMAGE_FORMAT
    return out


def model_config(
    metadata: dict[str, Any], scheduling: Scheduling, instances: Iterable[Instances]
) -> dict[str, Any]:
    """Triton's model configuration (model_config.proto's ``ModelConfig``) of a model
    whose V2 metadata is ``metadata``."""
    name = metadata["name"]
    groups = []
    for group in instances:
        entry: dict[str, Any] = {
            "name": f"{name}_{group.kind}",
            "kind": "KIND_GPU" if group.kind == "cuda" else "KIND_CPU",
            "count": group.count,
        }
        if group.gpus:
            entry["gpus"] = list(group.gpus)
        groups.append(entry)
    return {
        "name": name,
        "platform": metadata["platform"],
        "backend": BACKEND,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": scheduling.max_batch_size,
        "input": [
            _tensor(t, image=t["datatype"] == "UINT8" and len(t["shape"]) == 4)
            for t in metadata["inputs"]
        ],
        "output": [_tensor(t, image=False) for t in metadata["outputs"]],
        "dynamic_batching": {
            "preferred_batch_size": list(scheduling.preferred_batch_sizes),
            "max_queue_delay_microseconds": scheduling.max_queue_delay_us,
            "default_queue_policy": {"max_queue_size": scheduling.max_queue_size},
        },
        "instance_group": groups,
    }


def _durations(stats: ModelStats, names: Iterable[str]) -> dict[str, dict[str, int]]:
    return {name: stats.durations[name].to_json() for name in names}


def model_stats(name: str, version: str, stats: ModelStats) -> dict[str, Any]:
    """One model's entry (grpc_service.proto's ``ModelStatistics``)."""
    return {
        "name": name,
        "version": version,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": _durations(stats, (*OUTCOMES, *STAGES, *UNUSED)),
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": b.compute_input.to_json(),
                "compute_infer": b.compute_infer.to_json(),
                "compute_output": b.compute_output.to_json(),
            }
            for size, b in sorted(stats.batches.items())
        ],
        "memory_usage": [],
        "response_stats": {},
    }


def model_statistics(entries: Iterable[tuple[str, str, ModelStats]]) -> dict[str, Any]:
    """``ModelStatisticsResponse``: ``(name, version, stats)`` of each model asked for."""
    return {"model_stats": [model_stats(*entry) for entry in entries]}


def index_entry(name: str, version: str, state: str, reason: str = "") -> dict[str, str]:
    """One model of ``RepositoryIndexResponse.models``."""
    return {"name": name, "version": version, "state": state, "reason": reason}


def repository_index(entries: Iterable[dict[str, str]], ready_only: bool) -> list[dict[str, str]]:
    """The index, or (``ready_only``: the request's ``ready``) its ready models only."""
    return [e for e in entries if not ready_only or e["state"] == READY]


# --- the served models' facts, for any front end ---


def config_of(runtime: Runtime, v2model: V2Model) -> dict[str, Any]:
    """``model_config`` of a served model (or its alias), from its sessions and the
    settings."""
    s = runtime.settings
    model = v2model.served
    groups: dict[str, list[int]] = {}
    for worker in model.pool.workers:
        groups.setdefault(worker.device.kind, []).append(worker.device.index)
    instances = [
        Instances(kind, len(indices), tuple(sorted(set(indices))) if kind == "cuda" else ())
        for kind, indices in groups.items()
    ]
    scheduling = Scheduling(
        max_batch_size=model.buckets[-1],
        preferred_batch_sizes=model.buckets,
        max_queue_delay_us=round(s.max_batch_delay_ms * 1000),
        max_queue_size=s.max_queue_images,
    )
    return model_config(model_metadata(model.spec, v2model.encoded), scheduling, instances)


def statistics_of(runtime: Runtime, models: Iterable[V2Model]) -> dict[str, Any]:
    """``model_statistics`` of ``models``: an alias's are its model's counts."""
    stats = runtime.metrics.stats
    return model_statistics((m.name, VERSION, stats.of(m.served.name)) for m in models)


def state_of(runtime: Runtime, model: ServedModel) -> tuple[str, str]:
    """A served model's repository state and, unless ready, why."""
    if model.pool.broken:
        return UNAVAILABLE, "no session able to run"
    if runtime.draining:
        return UNAVAILABLE, "the service is shutting down"
    if not model.ready:
        return LOADING, "warming up"
    return READY, ""


def index_of(runtime: Runtime, ready_only: bool) -> list[dict[str, str]]:
    """``repository_index`` of the served models."""
    entries = (index_entry(m.name, VERSION, *state_of(runtime, m)) for m in runtime.models.values())
    return repository_index(entries, ready_only)
