"""Safaricom Daraja: OAuth, STK Push (M-Pesa Express), STK query and the STK callback.

Wire formats: /work/shared/providers/mpesa.md. This module speaks Daraja and nothing
else: which invoice a payment settles, and whether to push again, is the caller's call.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol
from urllib.parse import urlsplit

import anyio
import httpx

from invoiceiq.gateways.http import (
    AuthError,
    GatewayError,
    PermanentError,
    TransientError,
    as_mapping,
    json_body,
    request,
    retry_after_of,
    wall_clock_ms,
)

PROVIDER = "mpesa"

# Daraja wants Kenyan wall-clock time in Timestamp. Kenya has had no DST since 1942 and is
# fixed at UTC+3, so a fixed offset is exact and needs no tzdata on the host.
EAT = timezone(timedelta(hours=3), "EAT")

PAYBILL = "CustomerPayBillOnline"
BUY_GOODS = "CustomerBuyGoodsOnline"
AMOUNT_MIN_KES = 1
AMOUNT_MAX_KES = 250_000
ACCOUNT_REFERENCE_MAX = 12
TRANSACTION_DESC_MAX = 13

# Tokens live 3600 s; refresh 5 minutes early so a call never leaves with a token that
# expires in flight.
TOKEN_REFRESH_MARGIN_MS = 5 * 60 * 1000
_DEFAULT_TOKEN_LIFETIME_S = 3599  # what Daraja sends; used when expires_in is unreadable

_INVALID_TOKEN = "404.001.03"
_ON_HOLD = "500.001.1001"  # one code for "processing", "locked", "wrong credentials"...
_TRANSIENT_CODES = frozenset({"500.003.02", "500.003.03", "500.003.1001"})
_PERMANENT_CODES = frozenset({"400.002.02", "404.001.01", "405.001"})
# Community-documented: query ResultCode 4999 means "still processing", not a failure
# (felixmuhoro/laravel-mpesa README, via notes/anchors.md).
_QUERY_PENDING_RESULT_CODES = frozenset({4999})

_PHONE = re.compile(r"254[17][0-9]{8}")
_ACCOUNT_REFERENCE = re.compile(r"[A-Za-z0-9]{1,12}")
_NOT_DESC_CHARS = re.compile(r"[^A-Za-z0-9 ]+")


def timestamp(now_ms: int) -> str:
    """``YYYYMMDDHHmmss`` in Nairobi time, as Daraja's ``Timestamp`` wants it."""
    return datetime.fromtimestamp(now_ms // 1000, tz=EAT).strftime("%Y%m%d%H%M%S")


def password(shortcode: str, passkey: str, timestamp: str) -> str:
    """``base64(shortcode + passkey + timestamp)``: plain concatenation, then base64."""
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode("ascii")


def sanitise_description(text: str) -> str:
    """TransactionDesc: at most 13 chars of ``[A-Za-z0-9 ]`` (other characters become spaces)."""
    cleaned = " ".join(_NOT_DESC_CHARS.sub(" ", text).split())
    return cleaned[:TRANSACTION_DESC_MAX].rstrip()


@dataclass(frozen=True, slots=True)
class StkPushAccepted:
    """Daraja accepted the push; the customer has a prompt. Not a payment yet.

    ``request_for_log`` is the body we sent minus ``Password``, with the callback URL cut
    to its origin (its path carries the callback's secret token).
    """

    merchant_request_id: str
    checkout_request_id: str
    customer_message: str
    request_for_log: Mapping[str, object] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class StkQueryResult:
    """``pending`` while the customer has not answered; else ``result_code`` as in callbacks
    (0 = paid). ``result_code`` is None when Daraja sent a non-numeric code (``SFC_IC0003``),
    which ``result_code_raw`` keeps."""

    pending: bool
    result_code: int | None
    result_desc: str
    result_code_raw: str | None = None


@dataclass(frozen=True, slots=True)
class StkCallback:
    """One STK result. Metadata fields are None when absent (every failure has none).

    ``amount_invalid`` is True when an Amount item was present but not a whole, non-negative
    number of shillings; ``amount_kes`` is then None. Floats never leave this module.
    """

    merchant_request_id: str | None
    checkout_request_id: str
    result_code: int | None
    result_code_raw: str
    result_desc: str
    amount_kes: int | None = None
    amount_invalid: bool = False
    mpesa_receipt: str | None = None
    transaction_date: str | None = None
    phone: str | None = None


@dataclass(frozen=True, slots=True)
class _Token:
    value: str = field(repr=False)
    refresh_at_ms: int


class TokenStore(Protocol):
    """Where several processes share one Daraja token: minting a new token revokes the
    previous one, so instances that each kept their own would keep revoking each other's."""

    async def exchange(self, refused: str | None,
                       mint: Callable[[], Awaitable[tuple[str, int]]]) -> tuple[str, int]:
        """The shared token (and when to refresh it, epoch ms) unless it is ``refused`` or
        stale; else ``mint()`` one and share it. One process mints at a time."""
        ...


class DarajaClient:
    """One shortcode's Daraja credentials and the OAuth token they share."""

    __slots__ = (
        "_http",
        "_base",
        "_auth",
        "_shortcode",
        "_passkey",
        "_now",
        "_lock",
        "_token",
        "_shared",
        "_revoked",
    )

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_base: str,
        consumer_key: str,
        consumer_secret: str,
        shortcode: str,
        passkey: str,
        *,
        now: Callable[[], int] = wall_clock_ms,
        shared: TokenStore | None = None,
    ) -> None:
        if not (shortcode.isascii() and shortcode.isdigit()):
            raise ValueError("shortcode must be digits")
        self._shared = shared
        self._revoked: str | None = None
        self._http = http
        self._base = api_base.rstrip("/")
        self._auth = httpx.BasicAuth(consumer_key, consumer_secret)
        self._shortcode = shortcode
        self._passkey = passkey
        self._now = now
        # Daraja invalidates the previous token whenever a new one is minted, so concurrent
        # callers must share one fetch rather than race and revoke each other's tokens.
        self._lock = anyio.Lock()
        self._token: _Token | None = None

    def __repr__(self) -> str:
        return f"DarajaClient(shortcode={self._shortcode!r})"

    # --- STK push -------------------------------------------------------------------

    async def stk_push(
        self,
        *,
        phone: str,
        amount_kes: int,
        account_reference: str,
        description: str,
        callback_url: str,
        transaction_type: str = PAYBILL,
        party_b: str | None = None,
    ) -> StkPushAccepted:
        """Prompt ``phone`` to pay. Inputs Daraja would refuse raise ValueError before any call.

        ``party_b`` is the till for ``CustomerBuyGoodsOnline`` (the shortcode is then the
        store number); for paybill it defaults to the shortcode.
        """
        if type(amount_kes) is not int or not AMOUNT_MIN_KES <= amount_kes <= AMOUNT_MAX_KES:
            raise ValueError(f"amount_kes: whole shillings {AMOUNT_MIN_KES}..{AMOUNT_MAX_KES}")
        if not isinstance(phone, str) or not _PHONE.fullmatch(phone):
            raise ValueError("phone: 2547XXXXXXXX or 2541XXXXXXXX")
        if not isinstance(account_reference, str) or not _ACCOUNT_REFERENCE.fullmatch(account_reference):
            raise ValueError(f"account_reference: 1..{ACCOUNT_REFERENCE_MAX} letters or digits")
        if transaction_type not in (PAYBILL, BUY_GOODS):
            raise ValueError(f"transaction_type: {PAYBILL} or {BUY_GOODS}")
        if transaction_type == BUY_GOODS and party_b is None:
            raise ValueError("party_b (the till number) is required for CustomerBuyGoodsOnline")
        party_b = party_b if party_b is not None else self._shortcode
        if not (party_b.isascii() and party_b.isdigit()):
            raise ValueError("party_b must be digits")
        if urlsplit(callback_url).scheme not in ("https", "http") or not urlsplit(callback_url).netloc:
            raise ValueError("callback_url must be an absolute http(s) URL")
        # Daraja treats TransactionDesc as optional but some environments reject it empty.
        desc = sanitise_description(description) or account_reference

        ts = timestamp(self._now())
        # Numbers as JSON numbers, as in Daraja's own sample (mpesa_stkpush_request.json).
        body: dict[str, Any] = {
            "BusinessShortCode": int(self._shortcode),
            "Password": password(self._shortcode, self._passkey, ts),
            "Timestamp": ts,
            "TransactionType": transaction_type,
            "Amount": amount_kes,
            "PartyA": int(phone),
            "PartyB": int(party_b),
            "PhoneNumber": int(phone),
            "CallBackURL": callback_url,
            "AccountReference": account_reference,
            "TransactionDesc": desc,
        }
        for_log = {k: v for k, v in body.items() if k != "Password"}
        for_log["CallBackURL"] = _origin(callback_url)
        try:
            response = await self._post("/mpesa/stkpush/v1/processrequest", body)
            if not response.is_success:
                raise self._classify(response)
            data = as_mapping(json_body(response))
            code = _code_str(data.get("ResponseCode"))
            desc_text = _str(data.get("ResponseDescription")) or ""
            if code is not None and code != "0":
                raise PermanentError(
                    PROVIDER, code, desc_text or "request not accepted", http_status=response.status_code
                )
            checkout_id = _str(data.get("CheckoutRequestID"))
            if checkout_id is None or code is None:
                # A 2xx we can't read: the prompt may be on the phone already, so resending
                # blindly could charge twice. Say so.
                raise TransientError(
                    PROVIDER,
                    "bad_response",
                    "accepted without a CheckoutRequestID",
                    http_status=response.status_code,
                    maybe_processed=True,
                )
        except GatewayError as exc:
            exc.request_for_log = for_log  # a refused or unanswered push is recorded with its body too
            raise
        return StkPushAccepted(
            merchant_request_id=_str(data.get("MerchantRequestID")) or "",
            checkout_request_id=checkout_id,
            customer_message=_str(data.get("CustomerMessage")) or desc_text,
            request_for_log=for_log,
        )

    async def stk_query(self, checkout_request_id: str) -> StkQueryResult:
        """Ask Daraja how a push ended: the fallback for callbacks that never come."""
        if not isinstance(checkout_request_id, str) or not checkout_request_id:
            raise ValueError("checkout_request_id is required")
        ts = timestamp(self._now())
        body = {
            "BusinessShortCode": int(self._shortcode),
            "Password": password(self._shortcode, self._passkey, ts),
            "Timestamp": ts,
            "CheckoutRequestID": checkout_request_id,
        }
        response = await self._post("/mpesa/stkpushquery/v1/query", body)
        data = as_mapping(json_body(response))
        message = _str(data.get("errorMessage")) or ""
        # Before the customer answers, Daraja replies with an *error* (HTTP 500):
        # "the standard response ... the transaction ... is being processed".
        if data.get("errorCode") == _ON_HOLD and "being processed" in message.lower():
            return StkQueryResult(pending=True, result_code=None, result_desc=message)
        if not response.is_success:
            raise self._classify(response)
        raw = _code_str(data.get("ResultCode"))  # a *string* here, a number in callbacks
        if raw is None:
            raise TransientError(
                PROVIDER, "bad_response", "query answer without ResultCode", http_status=response.status_code
            )
        code = _code_int(raw)
        return StkQueryResult(
            pending=code in _QUERY_PENDING_RESULT_CODES,
            result_code=code,
            result_desc=_str(data.get("ResultDesc")) or "",
            result_code_raw=raw,
        )

    # --- plumbing ---------------------------------------------------------------------

    async def _post(self, path: str, body: Mapping[str, Any]) -> httpx.Response:
        """POST with the shared token; on 404.001.03 refresh the token and retry.

        Alone, one retry is enough. With several processes sharing one token, two may mint at
        once and the later revokes the earlier: the loser's retry then finds the winner's token
        in the shared store, hence a third attempt (and no more: a fresh token refused twice
        means the credentials are wrong)."""
        url = self._base + path
        for _ in range(3 if self._shared is not None else 2):
            token = await self._access_token()
            response = await request(
                self._http,
                PROVIDER,
                "POST",
                url,
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            )
            if _error_code(response) != _INVALID_TOKEN:
                return response
            # Daraja revoked it (someone minted another, or it expired early): drop it
            # unless a concurrent caller already replaced it.
            if self._token is not None and self._token.value == token:
                self._token = None
            self._revoked = token
        # A token minted a moment ago refused too: the credentials or the app are at fault.
        reason = _str(as_mapping(json_body(response)).get("errorMessage")) or "Invalid Access Token"
        raise AuthError(PROVIDER, _INVALID_TOKEN, reason, http_status=response.status_code)

    async def _access_token(self) -> str:
        token = self._token
        if token is None or self._now() >= token.refresh_at_ms:
            async with self._lock:
                # Whoever held the lock before us may have fetched it already.
                token = self._token
                if token is None or self._now() >= token.refresh_at_ms:
                    token = self._token = await self._shared_or_new_token()
        return token.value

    async def _shared_or_new_token(self) -> _Token:
        """Another process may have minted a token (revoking ours): use it if it is fresh and
        not the one just refused; else mint one and share it (one process at a time)."""
        if self._shared is None:
            return await self._fetch_token()

        async def mint() -> tuple[str, int]:
            token = await self._fetch_token()
            return token.value, token.refresh_at_ms

        value, refresh_at = await self._shared.exchange(self._revoked, mint)
        return _Token(value=value, refresh_at_ms=refresh_at)

    async def _fetch_token(self) -> _Token:
        response = await request(
            self._http,
            PROVIDER,
            "GET",
            f"{self._base}/oauth/v1/generate",
            params={"grant_type": "client_credentials"},
            auth=self._auth,
        )
        if not response.is_success:
            error = self._classify(response)
            if isinstance(error, TransientError):
                raise error
            # Any other refusal of the token endpoint means our credentials are at fault.
            raise AuthError(PROVIDER, error.code, error.reason, http_status=response.status_code)
        data = as_mapping(json_body(response))
        value = _str(data.get("access_token"))
        if value is None:
            raise TransientError(
                PROVIDER,
                "bad_response",
                "token response without access_token",
                http_status=response.status_code,
            )
        lifetime_ms = (_seconds(data.get("expires_in")) or _DEFAULT_TOKEN_LIFETIME_S) * 1000
        # Short-lived tokens (never seen, but cheap to handle) are refreshed at half-life.
        usable_ms = max(lifetime_ms - TOKEN_REFRESH_MARGIN_MS, lifetime_ms // 2)
        return _Token(value=value, refresh_at_ms=self._now() + usable_ms)

    def _classify(self, response: httpx.Response) -> GatewayError:
        status = response.status_code
        data = as_mapping(json_body(response))
        code = _str(data.get("errorCode"))
        reason = _str(data.get("errorMessage")) or f"HTTP {status}"
        retry_after = retry_after_of(response, self._now())

        def transient(c: str | int) -> TransientError:
            return TransientError(PROVIDER, c, reason, http_status=status, retry_after_s=retry_after)

        if code == _ON_HOLD:
            text = reason.lower()
            if "unable to lock subscriber" in text:
                # Another prompt is open on that phone; Daraja asks to wait about a minute.
                return transient("subscriber_locked")
            if "wrong credentials" in text or "merchant does not exist" in text:
                return AuthError(PROVIDER, code, reason, http_status=status)
            return transient(code)
        if code in _TRANSIENT_CODES:
            return transient(code)
        if code in _PERMANENT_CODES:
            return PermanentError(PROVIDER, code, reason, http_status=status)
        if code is not None and code.startswith("400.008."):  # OAuth: grant/auth type
            return AuthError(PROVIDER, code, reason, http_status=status)
        label = code or status
        if status in (401, 403):
            return AuthError(PROVIDER, label, reason, http_status=status)
        if status == 429 or status >= 500:
            return transient(label)
        return PermanentError(PROVIDER, label, reason, http_status=status)


# --- callback -------------------------------------------------------------------------


def parse_callback(obj: object) -> StkCallback | None:
    """Read a decoded STK callback body; None when it isn't one. Never raises.

    Callbacks are unsigned: the caller must still check that the CheckoutRequestID is one
    it created and that the amount matches before believing it.
    """
    if not isinstance(obj, Mapping):
        return None
    cb = as_mapping(as_mapping(obj.get("Body")).get("stkCallback"))
    checkout_id = _str(cb.get("CheckoutRequestID"))
    raw_code = _code_str(cb.get("ResultCode"))
    if checkout_id is None or raw_code is None:
        return None

    # Items are Name/Value pairs: look up by name, never by position, and expect any of
    # them (Balance especially) to come without a Value.
    items: dict[str, object] = {}
    meta_items = as_mapping(cb.get("CallbackMetadata")).get("Item")
    for item in meta_items if isinstance(meta_items, list) else ():
        item = as_mapping(item)
        name = item.get("Name")
        if isinstance(name, str) and "Value" in item and name not in items:
            items[name] = item["Value"]

    amount: int | None = None
    amount_invalid = False
    if "Amount" in items:
        amount = _whole_number(items["Amount"])
        amount_invalid = amount is None or amount < 0
        if amount_invalid:
            amount = None

    receipt = items.get("MpesaReceiptNumber")
    return StkCallback(
        merchant_request_id=_str(cb.get("MerchantRequestID")),
        checkout_request_id=checkout_id,
        result_code=_code_int(raw_code),
        result_code_raw=raw_code,
        result_desc=_str(cb.get("ResultDesc")) or "",
        amount_kes=amount,
        amount_invalid=amount_invalid,
        mpesa_receipt=receipt if isinstance(receipt, str) and receipt else None,
        transaction_date=_digits(items.get("TransactionDate")),
        phone=_digits(items.get("PhoneNumber")),
    )


def _whole_number(value: object) -> int | None:
    """An exact int from a JSON number or numeric string, or None if it has a fraction.

    ``1.00`` arrives as the float 1.0; ``float.is_integer`` is exact, so no rounding can
    turn 1499.9999 into 1500.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        # Beyond 15 digits nothing M-PESA sends is meaningful, and it would not fit a BIGINT.
        return value if abs(value) < 10**15 else None
    if isinstance(value, float):
        ok = math.isfinite(value) and value.is_integer() and abs(value) < 1e15
        return int(value) if ok else None
    if isinstance(value, str) and len(value) <= 32:
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            return None
        # is_finite/adjusted first: "1e999999999" is short but would build a huge int.
        if not d.is_finite() or d.adjusted() > 15 or d != d.to_integral_value():
            return None
        return int(d)
    return None


def _digits(value: object) -> str | None:
    """Phone numbers and dates arrive as JSON numbers; keep them as digit strings."""
    n = _whole_number(value) if not isinstance(value, str) else None
    if n is not None and n >= 0:
        return str(n)
    if isinstance(value, str):
        s = value.strip()
        bare = s.removeprefix("+")
        if bare.isascii() and bare.isdigit():
            return bare
    return None


def _code_str(value: object) -> str | None:
    """ResultCode/ResponseCode as text: a number in callbacks, a string in query answers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _code_int(raw: str) -> int | None:
    bare = raw.removeprefix("-")
    return int(raw) if bare.isascii() and bare.isdigit() and len(bare) <= 18 else None


def _seconds(value: object) -> int | None:
    """``expires_in``: documented as a number, often sent as a string ("3599")."""
    n = _whole_number(value)
    return n if n is not None and n > 0 else None


def _error_code(response: httpx.Response) -> str | None:
    if response.is_success:
        return None
    return _str(as_mapping(json_body(response)).get("errorCode"))


def _str(value: object) -> str | None:
    """A non-empty string with control characters (a NUL, say) removed: callbacks are
    unauthenticated input and some databases refuse such characters outright."""
    if not isinstance(value, str) or not value:
        return None
    cleaned = _CONTROL.sub("", value)
    return cleaned or None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…"
