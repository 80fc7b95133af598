"""What a request costs while the codec reads it, before its images are admitted: its
bytes against the server's budget (``--max-buffered-bytes``), and its announcement to the
batcher, which lasts only while bytes keep arriving."""

from __future__ import annotations

from resnet_serve.service.batcher import Ticket
from resnet_serve.service.errors import OverloadedError

# A body with no bytes for this long stops being waited for by batches forming (it is
# announced again with its next bytes). Never longer than the batch delay itself.
STALL_S = 0.05


class ByteBudget:
    """Bytes of request bodies read or held by requests in progress, all together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise OverloadedError(
                f"the server holds {self.used} bytes of requests in progress; {n} more "
                f"would pass its limit of {self.limit} (--max-buffered-bytes); retry later"
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class Reading:
    """One request's side of both: ``take(n)`` before ``n`` more bytes are held,
    ``stalled()``/``resumed()`` as its body stops and starts arriving; ``close()`` gives
    every byte back."""

    def __init__(self, ticket: Ticket, budget: ByteBudget, stall_s: float) -> None:
        self.ticket = ticket
        self.budget = budget
        self.stall_s = stall_s
        self.taken = 0

    def __enter__(self) -> Reading:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def take(self, n: int) -> None:
        self.budget.take(n)
        self.taken += n

    def stalled(self) -> None:
        self.ticket.pause()

    def resumed(self) -> None:
        self.ticket.resume()

    def close(self) -> None:
        self.budget.give(self.taken)
        self.taken = 0
