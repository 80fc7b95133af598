"""How many client connections a process can hold: its open-files limit, raised to the
hard one, less what everything else needs."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)
# Descriptors kept for everything but client connections: the listening sockets, model
# files, onnxruntime's and the decoders' threads, logs, the gRPC port.
RESERVED_FDS = 256


def raise_fd_limit() -> int:
    """The soft open-files limit raised to the hard one (as Go's runtime does): a server's
    connections are its descriptors. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a hard limit the kernel will not grant
            pass
    return soft


def connection_limit(configured: int, fd_limit: int) -> int:
    """``configured``, or (0) what the descriptors allow; never more than they allow, so
    that refusing stays possible: a process out of descriptors can no longer accept a
    connection to refuse it."""
    allowed = max(1, fd_limit - RESERVED_FDS) if fd_limit != resource.RLIM_INFINITY else 65536
    if configured <= 0:
        return allowed
    if configured > allowed:
        log.warning(
            "--max-connections %d is more than the open-files limit allows (%d, limit %d); "
            "using %d: raise the limit (ulimit -n, LimitNOFILE=) to allow more",
            configured, allowed, fd_limit, allowed,
        )  # fmt: skip
        return allowed
    return configured
