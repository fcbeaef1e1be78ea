"""Delivery channels: each sends a guest the key's link and implements ``worker.ports.Channel``.

Each channel has its wiring module (``<name>_wiring.py``: settings, factory, template files),
light to import, beside its sender (``<name>.py``); ``CHANNELS`` lists the wirings, in the order
the README and ``ikw run --help`` show them."""

from typing import Any

from worker.channels import email_wiring, sms_wiring
from worker.channels.wiring import Wiring

CHANNELS: tuple[Wiring[Any], ...] = (sms_wiring.WIRING, email_wiring.WIRING)
