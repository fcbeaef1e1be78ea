"""Delivery channels: each sends a guest the key's link and implements ``worker.ports.Channel``.

Each channel's module brings its wiring (settings, factory, template files); ``CHANNELS`` lists
them, in the order the README and ``ikw run --help`` show them."""

from typing import Any

from worker.channels import email, sms
from worker.channels.email import EmailChannel
from worker.channels.sms import SmsChannel
from worker.channels.wiring import Wiring

CHANNELS: tuple[Wiring[Any], ...] = (sms.WIRING, email.WIRING)

__all__ = ["CHANNELS", "EmailChannel", "SmsChannel"]
