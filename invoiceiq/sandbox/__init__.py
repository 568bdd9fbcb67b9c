"""Simulated WhatsApp Cloud API, Daraja and Africa's Talking, plus a console to play both phones.

Imports nothing from the rest of ``invoiceiq``: the daemon reaches these simulators through its
production gateways and cannot tell them from the real services.
"""

from __future__ import annotations

from .config import SimConfig
from .simulator import Simulator

__all__ = ["SimConfig", "Simulator"]
