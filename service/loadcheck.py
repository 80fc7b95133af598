"""The load-time self-check of a served model: its reference set (``contract.selfcheck``)
run on each device's first session before the model serves."""

from __future__ import annotations

import logging
import time

import numpy as np

from resnet_serve.contract.schema import LOGITS, ModelSpec, RepositoryError
from resnet_serve.contract.selfcheck import ReferenceSetError, SelfCheck, load_reference, run_check
from resnet_serve.service.metrics import Metrics
from resnet_serve.service.sessions import Runner, SessionPool
from resnet_serve.service.settings import Settings

log = logging.getLogger(__name__)


def self_check(
    spec: ModelSpec, pool: SessionPool, settings: Settings, metrics: Metrics
) -> SelfCheck | None:
    """Run the model on its reference set on each device; refuse it (RepositoryError) or
    warn when the result falls outside the bounds recorded at export."""
    if settings.self_check == "off":
        return None
    try:
        reference = load_reference(spec.path, spec.metadata)
    except ReferenceSetError as exc:
        raise RepositoryError(f"model {spec.name}: {exc}") from None
    if reference is None:
        log.info("%s: exported without a reference set; self-check skipped", spec.name)
        return None
    images, logits = reference
    t = time.perf_counter()
    results = []
    for worker in pool.first_per_device():

        def logits_of(batch: np.ndarray, w: Runner = worker) -> np.ndarray:
            return w.run(batch, (LOGITS,))[0]

        results.append(
            run_check(spec.metadata, images, logits, logits_of, batch=settings.max_batch_size)
        )
    result = next((r for r in results if not r.passed), results[0])
    metrics.model_self_check.labels(spec.name).set(1 if result.passed else 0)
    precision = spec.metadata.get("precision", "fp32")
    if result.passed:
        log.info(
            "%s: self-check passed in %.2fs: %s",
            spec.name, time.perf_counter() - t, result.reason,
        )  # fmt: skip
        return result
    message = f"model {spec.name} ({precision}) failed its self-check: {result.reason}"
    if settings.self_check == "refuse":
        raise RepositoryError(
            f"{message}. Its outputs on this CPU are not those it was exported with; export "
            "it in another format (docs/precision.md) or serve it anyway with --self-check warn"
        )
    log.warning("%s; served anyway (--self-check warn)", message)
    return result
