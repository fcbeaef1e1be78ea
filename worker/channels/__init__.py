"""Delivery channels: each sends a guest the key's link and implements ``worker.ports.Channel``."""

from worker.channels.email import EmailChannel
from worker.channels.sms import SmsChannel

__all__ = ["EmailChannel", "SmsChannel"]
