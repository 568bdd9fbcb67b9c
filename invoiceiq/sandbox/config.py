"""Settings of the simulated providers.

Every credential here is a sandbox value: the daemon is configured with the same strings, so
its production gateways authenticate against the simulators exactly as they would against
Meta, Safaricom and Africa's Talking.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Safaricom's public test passkey for shortcode 174379 (providers/mpesa.md section 7).
SANDBOX_PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"


@dataclass(frozen=True, slots=True)
class SimConfig:
    # WhatsApp Cloud API (Graph)
    wa_token: str = "sandbox-wa-token"
    wa_phone_id: str = "106540352242922"
    wa_app_secret: str = "sandbox-wa-app-secret"
    wa_business_number: str = "254700100200"
    wa_waba_id: str = "102290129340398"
    wa_template_name: str = "invoice_notification"
    wa_template_language: str = "en"
    wa_template_params: int = 4
    # The approved template as Meta stores it: the body with positional {{n}} slots, and its
    # buttons ("quick_reply:<label>" or "url:<label>:<url with {{1}}>"). The send request only
    # carries parameters, so the phone needs these to render the message and its buttons.
    wa_template_body: str = "Hi {{1}}, you have a new invoice.\nAmount: KES {{2}}\nInvoice: #{{3}}\nPay here: {{4}}"
    wa_template_buttons: tuple[str, ...] = ("quick_reply:Pay with M-PESA", "quick_reply:View details")
    # M-PESA Daraja
    daraja_consumer_key: str = "sandbox-consumer-key"
    daraja_consumer_secret: str = "sandbox-consumer-secret"
    daraja_shortcode: str = "174379"
    daraja_passkey: str = SANDBOX_PASSKEY
    daraja_business_name: str = "InvoiceIQ Sandbox Shop"
    # Africa's Talking
    at_username: str = "sandbox"
    at_api_key: str = "sandbox-at-api-key"
    at_short_code: str = "21345"
    # The daemon's endpoints the simulators POST to ("" = nobody listens; nothing is posted).
    whatsapp_webhook_url: str = ""
    sms_inbound_url: str = ""
    sms_status_url: str = ""
    # The simulated people
    merchant_msisdn: str = "254711000111"
    default_customer_msisdn: str = "254712345678"
    merchant_name: str = "Njeri (merchant)"
    # Timing: latency is added to every provider API answer; delays are real seconds between
    # an event and its webhook; timeouts are measured on the simulator's injectable clock.
    latency_ms: int = 0
    status_delay_ms: int = 250
    callback_delay_ms: int = 1000
    prompt_timeout_s: float = 60.0
    stk_lock_s: float = 60.0
    timestamp_skew_s: float = 600.0
    token_ttl_s: float = 3600.0
    # Outbound deliveries (webhooks, callbacks, DLRs): bounded retries with exponential backoff.
    delivery_max_attempts: int = 6
    delivery_backoff_ms: int = 500
    delivery_timeout_s: float = 10.0
    delivery_concurrency: int = 16
    # How long the "timeout" fault holds a request: longer than any sane client timeout.
    fault_hold_s: float = 30.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SimConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown sandbox setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            default = fields[name].default
            if isinstance(default, tuple):
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a list of strings")
                value = tuple(value)
            elif isinstance(default, bool) or not isinstance(value, type(default)):
                # ints are welcome where floats are expected; nothing else is coerced.
                if not (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
                    raise ValueError(f"{name} must be a {type(default).__name__}")
                value = float(value)
            values[name] = value
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | Path) -> SimConfig:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_mapping(data)

    def validate(self) -> None:
        if self.wa_template_params < 0:
            raise ValueError("wa_template_params must be >= 0")
        for spec in self.wa_template_buttons:
            kind = spec.split(":", 1)[0]
            if kind not in ("quick_reply", "url") or ":" not in spec:
                raise ValueError(f"wa_template_buttons: bad button {spec!r}")
        if self.delivery_max_attempts < 1 or self.delivery_concurrency < 1:
            raise ValueError("delivery_max_attempts and delivery_concurrency must be >= 1")
