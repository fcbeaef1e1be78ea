"""Local stand-ins for Seam, Twilio and SMTP: the vendors' APIs on real sockets, failures too."""

import asyncio
import time
from collections.abc import Callable


async def wait_for(
    condition: Callable[[], object], timeout: float, what: str = "condition"
) -> None:
    """Return as soon as ``condition()`` is truthy; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)
