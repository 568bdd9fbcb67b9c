"""WhatsApp Cloud API (Meta Graph API): sends, error mapping, webhook signature and parsing.

Wire formats: /work/shared/providers/whatsapp.md. This module knows Meta's shapes and
nothing about invoices: the caller decides what to send and what a tap means.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from invoiceiq.core.model import Button
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

PROVIDER = "whatsapp"

# Meta's documented limits (whatsapp.md §3.1-3.2). Checked here so a bad message fails
# at once with a clear ValueError instead of a round trip and a (#100) error.
TEXT_BODY_MAX = 4096
BUTTONS_MAX = 3
BUTTON_TITLE_MAX = 20
BUTTON_ID_MAX = 256
INTERACTIVE_BODY_MAX = 1024
HEADER_FOOTER_MAX = 60

# Graph error codes by what the caller should do (whatsapp.md §3.5). Meta says to key on
# `error.code`, not on the HTTP status: throttling, for one, arrives as HTTP 400.
_AUTH_CODES = frozenset({0, 3, 10, 190, *range(200, 300)})
_TRANSIENT_CODES = frozenset({1, 2, 131000, 131048, 131056})
# The app's or the business number's call and throughput limits (4, 80007, 130429): the whole
# account is refused, whoever the message is for (131056, one recipient too fast, is not).
_RATE_LIMIT_CODES = frozenset({4, 80007, 130429})
_PERMANENT_CODES = frozenset({100, 131008, 131009, 131026, 131030, 131047, 131049, 132000, 132001, 132012})


@dataclass(frozen=True, slots=True)
class SentMessage:
    """Meta accepted the message. ``status`` is ``message_status`` when sent (templates:
    ``accepted``, ``held_for_quality_assessment``, ``paused``). Delivery comes later, by webhook."""

    message_id: str
    status: str | None


class WhatsAppClient:
    """Sends messages from one business phone number."""

    __slots__ = ("_http", "_url", "_headers", "_now", "phone_id")

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_base: str,
        phone_id: str,
        token: str,
        *,
        now: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._http = http
        self.phone_id = phone_id
        self._url = f"{api_base.rstrip('/')}/{phone_id}/messages"
        self._headers = {"Authorization": f"Bearer {token}"}
        self._now = now  # only for Retry-After given as an HTTP-date

    def __repr__(self) -> str:  # the token stays out of reprs and tracebacks
        return f"WhatsAppClient(phone_id={self.phone_id!r})"

    async def send_text(self, to: str, body: str, *, preview_url: bool = False) -> SentMessage:
        _check_len("text body", body, TEXT_BODY_MAX)
        return await self._send(to, "text", {"text": {"preview_url": preview_url, "body": body}})

    async def send_buttons(
        self,
        to: str,
        body: str,
        buttons: Sequence[Button],
        footer: str | None = None,
        header: str | None = None,
    ) -> SentMessage:
        """Interactive reply buttons. A tap comes back as ``kind == 'button_reply'`` with the id."""
        _check_len("body", body, INTERACTIVE_BODY_MAX)
        if not 1 <= len(buttons) <= BUTTONS_MAX:
            raise ValueError(f"reply buttons: need 1..{BUTTONS_MAX}, got {len(buttons)}")
        for b in buttons:
            _check_len("button title", b.title, BUTTON_TITLE_MAX)
            _check_len("button id", b.id, BUTTON_ID_MAX)
            if b.id != b.id.strip():
                raise ValueError("button id: no leading/trailing spaces")
        # Meta rejects duplicates of either; ids must also be unique for us to tell taps apart.
        if len({b.id for b in buttons}) != len(buttons):
            raise ValueError("button ids must be unique")
        if len({b.title for b in buttons}) != len(buttons):
            raise ValueError("button titles must be unique")
        interactive: dict[str, Any] = {"type": "button"}
        if header is not None:
            _check_len("header", header, HEADER_FOOTER_MAX)
            interactive["header"] = {"type": "text", "text": header}
        interactive["body"] = {"text": body}
        if footer is not None:
            _check_len("footer", footer, HEADER_FOOTER_MAX)
            interactive["footer"] = {"text": footer}
        interactive["action"] = {
            "buttons": [{"type": "reply", "reply": {"id": b.id, "title": b.title}} for b in buttons]
        }
        return await self._send(to, "interactive", {"interactive": interactive})

    async def send_template(
        self,
        to: str,
        name: str,
        language: str,
        body_params: Sequence[str],
        quick_reply_payloads: Sequence[str] = (),
    ) -> SentMessage:
        """An approved template: the only kind allowed outside the 24-hour window.

        ``body_params`` fill ``{{1}}``, ``{{2}}``... in order; their count must match the
        approved template (else Meta answers 132000). ``quick_reply_payloads[i]`` is what a
        tap on button ``i`` returns (``kind == 'quick_reply'``).
        """
        if not name or not language:
            raise ValueError("template name and language are required")
        for p in body_params:
            _check_template_param(p)
        for p in quick_reply_payloads:
            if not isinstance(p, str) or not p:
                raise ValueError("quick-reply payload must be a non-empty string")
        components: list[dict[str, Any]] = []
        if body_params:
            components.append(
                {"type": "body", "parameters": [{"type": "text", "text": p} for p in body_params]}
            )
        components.extend(
            {
                "type": "button",
                "sub_type": "quick_reply",
                "index": str(i),
                "parameters": [{"type": "payload", "payload": p}],
            }
            for i, p in enumerate(quick_reply_payloads)
        )
        template: dict[str, Any] = {"name": name, "language": {"code": language}}
        if components:
            template["components"] = components
        return await self._send(to, "template", {"template": template})

    async def _send(self, to: str, kind: str, payload: Mapping[str, Any]) -> SentMessage:
        if not isinstance(to, str) or not to:
            raise ValueError("recipient is required")
        body: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": kind,
        }
        body.update(payload)
        response = await request(self._http, PROVIDER, "POST", self._url, json=body, headers=self._headers)
        if response.is_success:
            return _parse_sent(response)
        raise classify_error(response, now=self._now())


def _check_len(what: str, value: object, limit: int) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what}: must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"{what}: at most {limit} characters, got {len(value)}")


def _check_template_param(value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("template parameter: must be a non-empty string")
    # Meta refuses these in text parameters ("Param text cannot have new-line/tab characters
    # or more than 4 consecutive spaces"), and only after the call; refuse them first.
    if "\n" in value or "\t" in value or "     " in value:
        raise ValueError("template parameter: no newlines, tabs or more than 4 consecutive spaces")


def _parse_sent(response: httpx.Response) -> SentMessage:
    messages = as_mapping(json_body(response)).get("messages")
    first = as_mapping(messages[0]) if isinstance(messages, list) and messages else {}
    message_id = first.get("id")
    if not isinstance(message_id, str) or not message_id:
        # A 2xx without a wamid: Meta may well have queued the message, so a blind resend
        # could duplicate it; flag that to the caller.
        raise TransientError(
            PROVIDER,
            "bad_response",
            "success without a message id",
            http_status=response.status_code,
            maybe_processed=True,
        )
    status = first.get("message_status")
    return SentMessage(message_id=message_id, status=status if isinstance(status, str) else None)


def classify_error(response: httpx.Response, *, now: int) -> GatewayError:
    """Map a non-2xx Graph response; keyed on ``error.code``, the HTTP status only as fallback."""
    status = response.status_code
    error = as_mapping(as_mapping(json_body(response)).get("error"))
    code = _int(error.get("code"))
    message = error.get("message")
    reason = message if isinstance(message, str) and message else f"HTTP {status}"
    retry_after = retry_after_of(response, now)

    def transient(c: str | int) -> TransientError:
        return TransientError(PROVIDER, c, reason, http_status=status, retry_after_s=retry_after)

    if code is not None:
        if code in _AUTH_CODES:
            return AuthError(PROVIDER, code, reason, http_status=status)
        if code in _RATE_LIMIT_CODES:
            return RateLimited(PROVIDER, code, reason, http_status=status, retry_after_s=retry_after)
        if code in _TRANSIENT_CODES:
            return transient(code)
        if code in _PERMANENT_CODES:
            return PermanentError(PROVIDER, code, reason, http_status=status)
    label = code if code is not None else status
    if status == 401:
        return AuthError(PROVIDER, label, reason, http_status=status)
    if status == 429:
        return RateLimited(PROVIDER, label, reason, http_status=status, retry_after_s=retry_after)
    if status >= 500 or error.get("is_transient") is True:
        return transient(label)
    return PermanentError(PROVIDER, label, reason, http_status=status)


# --- webhooks -------------------------------------------------------------------------


def verify_signature(app_secret: str, body: bytes, header: str | None) -> bool:
    """Check ``X-Hub-Signature-256: sha256=<hex>`` against the RAW request bytes.

    Meta signs the bytes it sends (ASCII with ``\\uXXXX`` escapes); re-serialised JSON
    would not match, so this must run before any parsing.
    """
    if not app_secret or not isinstance(body, (bytes, bytearray)) or not isinstance(header, str):
        # An empty secret would let anyone compute a valid signature.
        return False
    prefix, sep, given = header.strip().partition("=")
    if not sep or prefix.lower() != "sha256":
        return False
    expected = hmac.new(app_secret.encode(), bytes(body), hashlib.sha256).hexdigest()
    # Compare bytes: compare_digest refuses non-ASCII str, and a header is attacker input.
    return hmac.compare_digest(expected.encode(), given.lower().encode("utf-8", "replace"))


@dataclass(frozen=True, slots=True)
class ProviderErrorInfo:
    code: int | None
    title: str | None
    details: str | None


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One customer message.

    ``kind`` is ``text``, ``button_reply`` (interactive reply button), ``quick_reply``
    (template button), ``list_reply`` or ``other:<type>``. For the first four ``text`` is
    always a string: the text body, the reply id, or the template payload — the thing the
    bot reacts to; ``title`` is the label the customer saw. ``from_msisdn`` is None when the
    sender is known only by a business-scoped ``user_id`` (2026 usernames).
    """

    id: str
    from_msisdn: str | None
    user_id: str | None
    timestamp_s: int | None
    kind: str
    text: str | None
    title: str | None
    context_id: str | None
    profile_name: str | None
    phone_number_id: str | None
    errors: tuple[ProviderErrorInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """What happened to a message we sent. May arrive duplicated and out of order."""

    message_id: str
    status: str
    recipient: str | None
    timestamp_s: int | None
    errors: tuple[ProviderErrorInfo, ...]
    phone_number_id: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookBatch:
    messages: tuple[InboundMessage, ...] = ()
    statuses: tuple[StatusUpdate, ...] = ()
    errors: tuple[ProviderErrorInfo, ...] = ()
    ignored: tuple[str, ...] = ()


_KNOWN_VALUE_KEYS = frozenset({"messaging_product", "metadata", "contacts", "messages", "statuses", "errors"})


def parse_webhook(obj: object) -> WebhookBatch:
    """Read a decoded webhook body. Never raises: what it can't use goes to ``ignored``.

    Meta adds fields and event kinds over time (BSUIDs, groups...), and one odd part must
    not cost us the rest of the batch, so every level is type-checked and skipped alone.
    """
    messages: list[InboundMessage] = []
    statuses: list[StatusUpdate] = []
    errors: list[ProviderErrorInfo] = []
    ignored: list[str] = []

    if not isinstance(obj, Mapping):
        return WebhookBatch(ignored=(f"body is {_type_name(obj)}, not an object",))
    kind = obj.get("object")
    if kind is not None and kind != "whatsapp_business_account":
        return WebhookBatch(ignored=(f"object {_describe(kind)}",))
    entries = obj.get("entry")
    if not isinstance(entries, list):
        return WebhookBatch(ignored=("no entry list",))

    for i, entry in enumerate(entries):
        changes = as_mapping(entry).get("changes")
        if not isinstance(changes, list):
            ignored.append(f"entry[{i}]: no changes list")
            continue
        for j, change in enumerate(changes):
            where = f"entry[{i}].changes[{j}]"
            change = as_mapping(change)
            field = change.get("field")
            if field is not None and field != "messages":
                # Group, template-status and account events: not ours to act on (yet).
                ignored.append(f"{where}: field {_describe(field)}")
                continue
            value = change.get("value")
            if not isinstance(value, Mapping):
                ignored.append(f"{where}: no value object")
                continue
            _parse_value(value, where, messages, statuses, errors, ignored)

    return WebhookBatch(tuple(messages), tuple(statuses), tuple(errors), tuple(ignored))


def _parse_value(
    value: Mapping[str, Any],
    where: str,
    messages: list[InboundMessage],
    statuses: list[StatusUpdate],
    errors: list[ProviderErrorInfo],
    ignored: list[str],
) -> None:
    phone_number_id = _str(as_mapping(value.get("metadata")).get("phone_number_id"))
    contacts = [as_mapping(c) for c in _list(value.get("contacts"))]

    for k, raw in enumerate(_list(value.get("messages"))):
        msg = as_mapping(raw)
        message_id = _str(msg.get("id"))
        if message_id is None:
            ignored.append(f"{where}.messages[{k}]: no id")
            continue
        messages.append(_parse_message(message_id, msg, contacts, phone_number_id, ignored))

    for k, raw in enumerate(_list(value.get("statuses"))):
        st = as_mapping(raw)
        message_id = _str(st.get("id"))
        status = _str(st.get("status"))
        if message_id is None or status is None:
            ignored.append(f"{where}.statuses[{k}]: no id or status")
            continue
        statuses.append(
            StatusUpdate(
                message_id=message_id,
                status=status,
                recipient=_str(st.get("recipient_id")),
                timestamp_s=_int(st.get("timestamp")),
                errors=_errors(st.get("errors")),
                phone_number_id=phone_number_id,
            )
        )

    errors.extend(_errors(value.get("errors")))
    for key in value:
        if key not in _KNOWN_VALUE_KEYS:
            ignored.append(f"{where}: value.{str(key)[:40]}")


def _parse_message(
    message_id: str,
    msg: Mapping[str, Any],
    contacts: list[Mapping[str, Any]],
    phone_number_id: str | None,
    ignored: list[str],
) -> InboundMessage:
    sender = _str(msg.get("from"))
    user_id = _str(msg.get("from_user_id"))
    msisdn = sender.removeprefix("+") if sender else None
    if msisdn is not None and not (msisdn.isascii() and msisdn.isdigit()):
        # Not a phone number: with usernames Meta may put a BSUID where the number was.
        user_id = user_id or sender
        msisdn = None

    contact = _contact_for(contacts, msisdn, user_id)
    if user_id is None:
        user_id = _str(contact.get("user_id"))
    profile_name = _str(as_mapping(contact.get("profile")).get("name"))

    mtype = _str(msg.get("type")) or "unknown"
    kind, text, title = f"other:{mtype}", None, None
    if mtype == "text":
        text = _str(as_mapping(msg.get("text")).get("body"))
        kind = "text"
    elif mtype == "button":  # template quick-reply tap: a different shape from interactive
        button = as_mapping(msg.get("button"))
        text, title, kind = _str(button.get("payload")), _str(button.get("text")), "quick_reply"
    elif mtype == "interactive":
        interactive = as_mapping(msg.get("interactive"))
        sub = _str(interactive.get("type"))
        if sub in ("button_reply", "list_reply"):
            reply = as_mapping(interactive.get(sub))
            text, title, kind = _str(reply.get("id")), _str(reply.get("title")), sub
    if text is None and not kind.startswith("other:"):
        # Promise callers a string for the kinds the bot reacts to; anything else is "other".
        ignored.append(f"message {message_id[:40]}: {kind} without its text/id")
        kind = f"other:{mtype}"

    return InboundMessage(
        id=message_id,
        from_msisdn=msisdn,
        user_id=user_id,
        timestamp_s=_int(msg.get("timestamp")),
        kind=kind,
        text=text,
        title=title,
        context_id=_str(as_mapping(msg.get("context")).get("id")),
        profile_name=profile_name,
        phone_number_id=phone_number_id,
        errors=_errors(msg.get("errors")),
    )


def _contact_for(
    contacts: list[Mapping[str, Any]], msisdn: str | None, user_id: str | None
) -> Mapping[str, Any]:
    for c in contacts:
        if (msisdn is not None and _str(c.get("wa_id")) == msisdn) or (
            user_id is not None and _str(c.get("user_id")) == user_id
        ):
            return c
    # One message, one contact is the usual shape even when the ids are spelled differently.
    return contacts[0] if len(contacts) == 1 else {}


def _errors(raw: object) -> tuple[ProviderErrorInfo, ...]:
    out = []
    for item in _list(raw):
        e = as_mapping(item)
        if not e:
            continue
        out.append(
            ProviderErrorInfo(
                code=_int(e.get("code")),
                title=_str(e.get("title")) or _str(e.get("message")),
                details=_str(as_mapping(e.get("error_data")).get("details")),
            )
        )
    return tuple(out)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    """Meta sends timestamps as strings of digits and codes as numbers; accept both."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        return int(value)
    return None


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _describe(value: object) -> str:
    return repr(value)[:40] if isinstance(value, str) else _type_name(value)
