"""Africa's Talking SMS: send one message, read delivery reports and inbound messages.

Wire formats: /work/shared/providers/sms.md §A. Callbacks are form-encoded and unsigned
(the route protects itself with a secret in the URL); the parsers take the decoded form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from invoiceiq.gateways.http import (
    AuthError,
    GatewayError,
    PermanentError,
    RateLimited,
    TransientError,
    as_mapping,
    json_body,
    request,
    retry_after_of,
    wall_clock_ms,
)

PROVIDER = "africastalking"

# Recipients[].statusCode (sms_at_status_codes.json). The HTTP call is 201 even when the
# one recipient failed: this per-recipient code is what decides.
STATUS_NAMES = {
    100: "Processed",
    101: "Sent",
    102: "Queued",
    401: "RiskHold",
    402: "InvalidSenderId",
    403: "InvalidPhoneNumber",
    404: "UnsupportedNumberType",
    405: "InsufficientBalance",
    406: "UserInBlacklist",
    407: "CouldNotRoute",
    409: "DoNotDisturbRejection",
    500: "InternalServerError",
    501: "GatewayError",
    502: "RejectedByGateway",
}
_ACCEPTED = frozenset({100, 101, 102})
# 401-407 and 409 are permanent for the message (issue 4): Africa's Talking has decided about
# this number or this text (RiskHold and CouldNotRoute included: resending the same text to the
# same number is not what clears them), so the row fails with the provider's reason.
_TRANSIENT = frozenset({500, 501, 502})
# 405 InsufficientBalance is permanent for this message too, but it is an account problem:
# the caller tells it apart by code "405" (and alerts) rather than blaming the number.
_PERMANENT = frozenset({401, 402, 403, 404, 405, 406, 407, 409})
INSUFFICIENT_BALANCE = "405"

FINAL_STATUSES = frozenset({"Success", "Failed", "Rejected"})


@dataclass(frozen=True, slots=True)
class SmsSent:
    """Africa's Talking took the message (100 Processed, 101 Sent, 102 Queued)."""

    message_id: str | None
    status_code: int
    status: str


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    id: str
    status: str | None
    phone: str | None  # digits, no "+"
    network_code: str | None
    failure_reason: str | None
    retry_count: int | None


@dataclass(frozen=True, slots=True)
class InboundSms:
    id: str
    from_msisdn: str  # digits, no "+"
    to: str | None
    text: str
    date: str | None  # format not pinned by AT: kept as sent
    link_id: str | None = None
    network_code: str | None = None


def is_final(status: str | None) -> bool:
    """Success, Failed and Rejected end a message's story; Sent/Submitted/Buffered don't."""
    return status in FINAL_STATUSES


class AfricasTalkingClient:
    __slots__ = ("_http", "_url", "_headers", "_username", "_sender_id", "_now")

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_base: str,
        username: str,
        api_key: str,
        sender_id: str | None,
        *,
        now: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._http = http
        self._url = f"{api_base.rstrip('/')}/version1/messaging"
        self._headers = {"apiKey": api_key, "Accept": "application/json"}
        self._username = username
        self._sender_id = sender_id or None
        self._now = now  # only for Retry-After given as an HTTP-date

    def __repr__(self) -> str:
        return f"AfricasTalkingClient(username={self._username!r})"

    async def send(self, to_msisdn: str, message: str) -> SmsSent:
        """Send ``message`` to one number (``2547...`` or ``+2547...``)."""
        digits = to_msisdn.removeprefix("+") if isinstance(to_msisdn, str) else ""
        if not (digits.isascii() and digits.isdigit() and 7 <= len(digits) <= 15):
            raise ValueError("to_msisdn: an international number, digits only")
        if not isinstance(message, str) or not message:
            raise ValueError("message must be a non-empty string")
        form = {"username": self._username, "to": f"+{digits}", "message": message}
        if self._sender_id is not None:
            form["from"] = self._sender_id
        # What AT's own SDKs always send: bulk (not premium) billing, and queue instead of
        # holding the HTTP call until the telco answers (the DLR tells us the rest).
        form["bulkSMSMode"] = "1"
        form["enqueue"] = "1"
        response = await request(self._http, PROVIDER, "POST", self._url, data=form, headers=self._headers)
        if response.is_success:
            return self._read_sent(response)
        raise self._classify(response)

    def _read_sent(self, response: httpx.Response) -> SmsSent:
        data = as_mapping(as_mapping(json_body(response)).get("SMSMessageData"))
        recipients = data.get("Recipients")
        if not isinstance(recipients, list) or not recipients:
            # Seen for a refused sender id or number: {"Message":"InvalidSenderId","Recipients":[]}.
            summary = data.get("Message")
            if isinstance(summary, str) and summary:
                code = next((str(c) for c, n in STATUS_NAMES.items() if n == summary), "no_recipients")
                raise self._refused(code, summary, response)
            raise TransientError(
                PROVIDER,
                "bad_response",
                "success without recipients",
                http_status=response.status_code,
                maybe_processed=True,
            )
        first = as_mapping(recipients[0])
        status_code = first.get("statusCode")
        if isinstance(status_code, str) and status_code.isdigit():
            status_code = int(status_code)
        if not isinstance(status_code, int) or isinstance(status_code, bool):
            raise TransientError(
                PROVIDER,
                "bad_response",
                "recipient without statusCode",
                http_status=response.status_code,
                maybe_processed=True,
            )
        name = first.get("status")
        status = name if isinstance(name, str) and name else STATUS_NAMES.get(status_code, str(status_code))
        if status_code in _ACCEPTED:
            message_id = first.get("messageId")
            # Failed recipients carry the literal string "None"; never store that as an id.
            usable = isinstance(message_id, str) and message_id not in ("", "None")
            return SmsSent(message_id=message_id if usable else None, status_code=status_code, status=status)
        raise self._refused(str(status_code), status, response)

    def _refused(self, code: str, status: str, response: httpx.Response) -> GatewayError:
        n = int(code) if code.isdigit() else None
        if n in _TRANSIENT or (n is not None and n >= 500):
            return TransientError(
                PROVIDER,
                code,
                status,
                http_status=response.status_code,
                retry_after_s=retry_after_of(response, self._now()),
            )
        return PermanentError(PROVIDER, code, status, http_status=response.status_code)

    def _classify(self, response: httpx.Response) -> GatewayError:
        status = response.status_code
        # Errors come back as plain text ("The supplied authentication is invalid").
        text = response.text.strip() if "json" not in response.headers.get("content-type", "") else ""
        reason = text.splitlines()[0] if text else f"HTTP {status}"
        if status == 401:
            return AuthError(PROVIDER, status, reason, http_status=status)
        if status == 429 or status >= 500:
            return (RateLimited if status == 429 else TransientError)(
                PROVIDER,
                status,
                reason,
                http_status=status,
                retry_after_s=retry_after_of(response, self._now()),
            )
        return PermanentError(PROVIDER, status, reason, http_status=status)


# --- callbacks (form-encoded) ----------------------------------------------------------


def parse_delivery_report(form: Mapping[str, Any]) -> DeliveryReport | None:
    """A delivery-report POST; None without an ``id``. Unknown fields are ignored."""
    message_id = _field(form, "id")
    if message_id is None:
        return None
    retry = _field(form, "retryCount")
    return DeliveryReport(
        id=message_id,
        status=_field(form, "status"),
        phone=_msisdn(_field(form, "phoneNumber")),
        network_code=_field(form, "networkCode"),
        failure_reason=_field(form, "failureReason"),
        retry_count=int(retry)
        if retry is not None and retry.isascii() and retry.isdigit() and len(retry) < 10
        else None,
    )


def parse_inbound(form: Mapping[str, Any]) -> InboundSms | None:
    """An incoming-message POST; None without an ``id`` or a usable ``from``."""
    message_id = _field(form, "id")
    sender = _msisdn(_field(form, "from"))
    if message_id is None or sender is None:
        return None
    return InboundSms(
        id=message_id,
        from_msisdn=sender,
        to=_field(form, "to"),
        text=_raw(form, "text") or "",
        date=_field(form, "date"),
        link_id=_field(form, "linkId"),
        network_code=_field(form, "networkCode"),
    )


def _raw(form: Mapping[str, Any], key: str) -> str | None:
    value = form.get(key)
    if isinstance(value, (list, tuple)):  # parse_qs-style dicts hold lists
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def _field(form: Mapping[str, Any], key: str) -> str | None:
    value = _raw(form, key)
    value = value.strip() if value is not None else None
    return value or None


def _msisdn(value: str | None) -> str | None:
    if value is None:
        return None
    digits = value.removeprefix("+")
    return digits if digits.isascii() and digits.isdigit() else None
