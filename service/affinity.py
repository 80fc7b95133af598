"""``--cpu-affinity``: each CPU session's threads pinned to cores of their own.

A session with T intra-op threads runs on the thread that calls it plus T - 1 onnxruntime
pool threads. Unpinned, the kernel places them as it wakes them: with a lone client on
2 cores, a run sometimes starts with its caller on the core where the pool thread is
spinning, and runs at about half speed until one of them migrates (ResNet-50 at one
client: the slowest 5% of requests spent 26.9 ms in inference against a median of 18.5;
pinned, 19.0, and the p99 fell by a quarter: docs/benchmarks.md, "Pinned sessions").
Pinned, the caller sits on the first of the session's cores and each pool thread on one of
the others (onnxruntime's ``session.intra_op_thread_affinities``). Under load it costs:
decode threads then share cores with session threads that cannot move (4% fewer img/s
at 16 clients).

The cores come from the process's allowed set (containers' cpusets, ``taskset``). With
``--workers N`` each worker takes its own slice of them, so that the workers' sessions do
not share cores. Off by default, also because processes that do not know of each other
(two replicas on one host without a CPU manager) would pin to the same first cores.
"""

from __future__ import annotations

import os

from resnet_serve.service.workers import COUNT_ENV, worker_index


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, in order; empty where the OS cannot pin threads."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return []


def share(cpus: list[int], index: int, count: int) -> list[int]:
    """Worker ``index`` of ``count``'s slice of ``cpus``: contiguous, as even as the count
    allows; a worker beyond the number of CPUs gets one, shared round-robin."""
    if count <= 1 or not cpus:
        return cpus
    if count >= len(cpus):
        return [cpus[index % len(cpus)]]
    start, end = index * len(cpus) // count, (index + 1) * len(cpus) // count
    return cpus[start:end]


def process_cpus() -> list[int]:
    """The CPUs this process's sessions are pinned within: all it may use, or its worker's
    slice of them under ``--workers``."""
    cpus = allowed_cpus()
    index = worker_index()
    if index is None:
        return cpus
    return share(cpus, index, int(os.environ.get(COUNT_ENV, "1")))


def session_cores(cpus: list[int], session: int, threads: int) -> list[int]:
    """The cores of session number ``session`` with ``threads`` threads: consecutive, the
    sessions one after another, wrapping around when there are more threads than cores."""
    return [cpus[(session * threads + k) % len(cpus)] for k in range(threads)]


def pool_affinities(cores: list[int]) -> str:
    """onnxruntime's affinity string for a session's pool threads (all but the caller's
    first core): one entry per thread, ``;``-separated, logical processors numbered from 1."""
    return ";".join(str(c + 1) for c in cores[1:])


def pin_this_thread(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})  # 0: the calling thread (Linux)
