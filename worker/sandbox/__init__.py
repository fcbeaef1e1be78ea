"""Local stand-ins for Seam, Twilio and SMTP: the vendors' APIs on real sockets, failures too."""

import asyncio
from collections.abc import Callable

# A condition nothing signals (a worker in another process writing its log) is looked at again
# this often; everything the stand-ins do, and every log line of this process, wakes at once.
FALLBACK_TICK = 0.25

_waiting: set[asyncio.Future[None]] = set()


def changed() -> None:
    """Something happened that a waiter may be waiting for: a stand-in answered or accepted a
    message, the worker logged. Wakes every ``wait_for`` to look at its condition again."""
    for waiter in list(_waiting):
        if not waiter.done() and not waiter.get_loop().is_closed():
            waiter.set_result(None)


async def wait_for(
    condition: Callable[[], object], timeout: float, what: str = "condition"
) -> None:
    """Return as soon as ``condition()`` is truthy; raise TimeoutError after ``timeout`` seconds.
    Woken by ``changed()``, not by polling."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        waiter = loop.create_future()
        _waiting.add(waiter)
        try:
            await asyncio.wait({waiter}, timeout=min(left, FALLBACK_TICK))
        finally:
            _waiting.discard(waiter)
            waiter.cancel()
