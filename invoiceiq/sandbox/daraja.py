"""Simulated Safaricom Daraja: OAuth, M-Pesa Express (STK Push), its status query, and the
callback the customer's choice on the simulated phone produces.

Checks come in the order and with the envelopes Daraja uses (providers/mpesa.md): token
(404.001.03), shortcode, Timestamp (EAT, +/- skew), Password, the fields, then the subscriber
lock. Result codes and descriptions are the documented ones.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .config import SimConfig
from .outbox import Outbox
from .wire import HttpRequest, Ids, Reply, SandboxError, compact_json, nairobi_stamp, parse_nairobi_stamp
from .world import SmsMessage, StkTransaction, World

MSISDN_RE = re.compile(r"254[17]\d{8}")
SHORTCODE_RE = re.compile(r"\d{5,7}")
ACCOUNT_REF_RE = re.compile(r"[A-Za-z0-9]{1,12}")
TRANSACTION_TYPES = ("CustomerPayBillOnline", "CustomerBuyGoodsOnline")
AMOUNT_MAX = 250_000
DESC_MAX = 13

RESULTS: dict[int, str] = {
    0: "The service request is processed successfully.",
    1: "The balance is insufficient for the transaction.",
    1032: "Request cancelled by user",
    1037: "DS timeout user cannot be reached",
    2001: "The initiator information is invalid.",
}
ACTIONS: dict[str, int | None] = {"pay": 0, "cancel": 1032, "wrong_pin": 2001, "insufficient": 1, "ignore": None}
ACCEPTED = "Success. Request accepted for processing"


class DarajaError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad(field: str) -> DarajaError:
    return DarajaError(400, "400.002.02", f"Bad Request - Invalid {field}")


def _whole_number(value: Any) -> int | None:
    """Daraja takes numbers or numeric strings, but only whole ones."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _digits(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.isdigit():
        return value
    return None


def stk_password(shortcode: str, passkey: str, timestamp: str) -> str:
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode("ascii")).decode("ascii")


class DarajaSim:
    def __init__(self, config: SimConfig, world: World, outbox: Outbox, ids: Ids, now: Callable[[], float]) -> None:
        self.config = config
        self.world = world
        self.outbox = outbox
        self.ids = ids
        self.now = now
        self._token: str | None = None
        self._token_expires = 0.0
        self._open: set[str] = set()  # CheckoutRequestIDs still pending or ignored

    def clear(self) -> None:
        # The OAuth token survives a reset: it is the provider's credential state, not the world's.
        self._open.clear()

    def _error(self, exc: DarajaError) -> Reply:
        return Reply.json(
            exc.status, {"requestId": self.ids.daraja_request_id(), "errorCode": exc.code, "errorMessage": exc.message}
        )

    # -- OAuth -----------------------------------------------------------------------------------
    def oauth(self, req: HttpRequest) -> Reply:
        try:
            reply = Reply.json(200, {"access_token": self._issue_token(req), "expires_in": "3599"})
        except DarajaError as exc:
            reply = self._error(exc)
        # The journal keeps the grant type only: the Basic header is a credential.
        self.world.record_call("daraja_oauth", req.method, req.path, dict(req.query), reply.status, reply.parsed())
        return reply

    def _issue_token(self, req: HttpRequest) -> str:
        auth = req.header("authorization")
        if not auth.startswith("Basic "):
            raise DarajaError(400, "400.008.01", "Invalid authentication type passed")
        if req.query.get("grant_type") != "client_credentials":
            raise DarajaError(400, "400.008.02", "Invalid grant type passed")
        try:
            credentials = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            credentials = ""
        if credentials != f"{self.config.daraja_consumer_key}:{self.config.daraja_consumer_secret}":
            raise DarajaError(400, "400.008.01", "Invalid Authentication passed")
        # Each new token invalidates the one before (Daraja's Authorization FAQ).
        self._token = self.ids.access_token()
        self._token_expires = self.now() + self.config.token_ttl_s
        self.world.log("daraja.oauth", "Daraja issued a new access token (the previous one is now invalid)")
        return self._token

    # -- shared checks -----------------------------------------------------------------------------
    def _authorised_body(self, req: HttpRequest) -> dict[str, Any]:
        token = self._token
        if token is None or req.header("authorization") != f"Bearer {token}" or self.now() >= self._token_expires:
            raise DarajaError(404, "404.001.03", "Invalid Access Token")
        try:
            body = req.json() if "application/json" in req.header("content-type") else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # A body Daraja can't read loses its first field: the documented symptom of a
            # missing Content-Type is "Invalid BusinessShortCode".
            raise _bad("BusinessShortCode")
        shortcode = _digits(body.get("BusinessShortCode"))
        if shortcode is None or not SHORTCODE_RE.fullmatch(shortcode):
            raise _bad("BusinessShortCode")
        if shortcode != self.config.daraja_shortcode:
            raise DarajaError(500, "500.001.1001", "Merchant does not exist")
        timestamp = body.get("Timestamp")
        timestamp = str(timestamp) if isinstance(timestamp, (str, int)) and not isinstance(timestamp, bool) else ""
        at = parse_nairobi_stamp(timestamp)
        if at is None or abs(at - self.now()) > self.config.timestamp_skew_s:
            raise _bad("Timestamp")
        if body.get("Password") != stk_password(shortcode, self.config.daraja_passkey, timestamp):
            raise DarajaError(500, "500.001.1001", "Wrong credentials")
        return body

    def _journal(self, service: str, req: HttpRequest, reply: Reply) -> None:
        try:
            body: Any = req.json()
        except ValueError:
            body = req.body.decode("utf-8", "replace")
        self.world.record_call(service, req.method, req.path, body, reply.status, reply.parsed())

    # -- STK push ------------------------------------------------------------------------------------
    def push(self, req: HttpRequest) -> Reply:
        try:
            reply = self._push(self._authorised_body(req))
        except DarajaError as exc:
            reply = self._error(exc)
        self._journal("daraja_push", req, reply)
        return reply

    def _push(self, body: dict[str, Any]) -> Reply:
        kind = body.get("TransactionType")
        if kind not in TRANSACTION_TYPES:
            raise _bad("TransactionType")
        amount = _whole_number(body.get("Amount"))
        if amount is None or not 1 <= amount <= AMOUNT_MAX:
            raise _bad("Amount")
        party_a = _digits(body.get("PartyA"))
        if party_a is None or not MSISDN_RE.fullmatch(party_a):
            raise _bad("PhoneNumber")
        party_b = _digits(body.get("PartyB"))
        if party_b is None or not SHORTCODE_RE.fullmatch(party_b):
            raise _bad("PartyB")
        msisdn = _digits(body.get("PhoneNumber"))
        if msisdn is None or not MSISDN_RE.fullmatch(msisdn):
            raise _bad("PhoneNumber")
        callback_url = body.get("CallBackURL")
        if not isinstance(callback_url, str):
            raise _bad("CallBackURL")
        parts = urlsplit(callback_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _bad("CallBackURL")
        reference = body.get("AccountReference")
        if not isinstance(reference, str) or not ACCOUNT_REF_RE.fullmatch(reference):
            raise _bad("AccountReference")
        description = body.get("TransactionDesc", "")
        if not isinstance(description, str) or len(description) > DESC_MAX:
            raise _bad("TransactionDesc")
        now = self.now()
        self.expire()
        phone = self.world.phone(msisdn)
        in_process = any(self.world.stk[c].msisdn == msisdn for c in self._open)
        if in_process or (phone.last_push_at is not None and now - phone.last_push_at < self.config.stk_lock_s):
            raise DarajaError(
                500,
                "500.001.1001",
                "Unable to lock subscriber, a transaction is already in process for the current subscriber",
            )
        checkout_id = self.ids.checkout_request_id(now, msisdn)
        while checkout_id in self.world.stk:
            checkout_id = self.ids.checkout_request_id(now, msisdn)
        tx = StkTransaction(
            checkout_request_id=checkout_id,
            merchant_request_id=self.ids.merchant_request_id(),
            msisdn=msisdn,
            amount=amount,
            account_reference=reference,
            description=description,
            callback_url=callback_url,
            shortcode=self.config.daraja_shortcode,
            party_b=party_b,
            transaction_type=kind,
            created_at=now,
            expires_at=now + self.config.prompt_timeout_s,
        )
        self.world.stk[checkout_id] = tx
        self._open.add(checkout_id)
        phone.prompt = checkout_id
        phone.last_push_at = now
        self.world.log(
            "stk.prompt",
            f"M-PESA PIN prompt on {msisdn}: KES {amount:,} to {self.config.daraja_business_name}, account {reference}",
            msisdn,
            ref=checkout_id,
        )
        return Reply.json(
            200,
            {
                "MerchantRequestID": tx.merchant_request_id,
                "CheckoutRequestID": checkout_id,
                "ResponseCode": "0",
                "ResponseDescription": ACCEPTED,
                "CustomerMessage": ACCEPTED,
            },
        )

    # -- STK query -----------------------------------------------------------------------------------
    def query(self, req: HttpRequest) -> Reply:
        try:
            reply = self._query(self._authorised_body(req))
        except DarajaError as exc:
            reply = self._error(exc)
        self._journal("daraja_query", req, reply)
        return reply

    def _query(self, body: dict[str, Any]) -> Reply:
        checkout_id = body.get("CheckoutRequestID")
        tx = self.world.stk.get(checkout_id) if isinstance(checkout_id, str) else None
        if tx is None:
            raise _bad("CheckoutRequestID")
        self.expire()
        if tx.state != "done":
            return Reply.json(
                500,
                {
                    "requestId": tx.checkout_request_id,
                    "errorCode": "500.001.1001",
                    "errorMessage": "The transaction is being processed",
                },
            )
        return Reply.json(
            200,
            {
                "ResponseCode": "0",
                "ResponseDescription": "The service request has been accepted successsfully",  # sic, like live
                "MerchantRequestID": tx.merchant_request_id,
                "CheckoutRequestID": tx.checkout_request_id,
                "ResultCode": str(tx.result_code),
                "ResultDesc": tx.result_desc,
            },
        )

    # -- the customer's choice and the clock ----------------------------------------------------------
    def resolve(
        self, checkout_id: str, action: str, pin: str | None = None, drop_callback: bool = False
    ) -> dict[str, Any]:
        """The customer answers the prompt. ``pay`` with a PIN that isn't 4 digits, or is 0000,
        is a wrong PIN (2001); ``pay`` without a PIN is a right one."""
        if action not in ACTIONS:
            raise SandboxError(400, f"action must be one of {', '.join(ACTIONS)}")
        tx = self.world.stk.get(checkout_id)
        if tx is None:
            raise SandboxError(404, f"no STK request {checkout_id!r}")
        self.expire()
        if tx.state != "pending":
            raise SandboxError(409, f"the prompt for {checkout_id} is no longer on the phone ({tx.state})")
        phone = self.world.phone(tx.msisdn)
        phone.prompt = None
        code = ACTIONS[action]
        if code == 0 and pin is not None and (len(pin) != 4 or not pin.isdigit() or pin == "0000"):
            code = 2001
        if code is None:
            tx.state = "ignored"
            self.world.log("stk.ignored", f"{tx.msisdn} does not answer the M-PESA prompt", tx.msisdn)
        else:
            self._finish(tx, code, post_callback=not drop_callback)
        return self.transaction_view(tx)

    def expire(self) -> None:
        """Prompts nobody answered in time end with 1037; an ignored one ends without a callback."""
        now = self.now()
        for checkout_id in [c for c in self._open if self.world.stk[c].expires_at <= now]:
            tx = self.world.stk[checkout_id]
            if tx.state == "pending":
                self.world.phone(tx.msisdn).prompt = None
            self._finish(tx, 1037, post_callback=tx.state == "pending")

    def _finish(self, tx: StkTransaction, code: int, post_callback: bool) -> None:
        now = self.now()
        tx.state = "done"
        tx.result_code = code
        tx.result_desc = RESULTS[code]
        tx.resolved_at = now
        tx.callback_dropped = not post_callback
        self._open.discard(tx.checkout_request_id)
        callback: dict[str, Any] = {
            "MerchantRequestID": tx.merchant_request_id,
            "CheckoutRequestID": tx.checkout_request_id,
            "ResultCode": code,
            "ResultDesc": tx.result_desc,
        }
        if code == 0:
            tx.receipt = self.ids.receipt()
            stamp = nairobi_stamp(now)
            callback["CallbackMetadata"] = {
                "Item": [
                    {"Name": "Amount", "Value": float(tx.amount)},
                    {"Name": "MpesaReceiptNumber", "Value": tx.receipt},
                    {"Name": "Balance"},
                    {"Name": "TransactionDate", "Value": int(stamp)},
                    {"Name": "PhoneNumber", "Value": int(tx.msisdn)},
                ]
            }
            # The customer's M-PESA confirmation SMS: only on the simulated phone, no webhook.
            phone = self.world.phone(tx.msisdn)
            phone.sms.append(
                SmsMessage(
                    id=tx.receipt,
                    from_phone=False,
                    peer="MPESA",
                    text=f"{tx.receipt} Confirmed. Ksh{tx.amount:,}.00 sent to {self.config.daraja_business_name} "
                    f"for account {tx.account_reference} on {stamp[6:8]}/{stamp[4:6]}/{stamp[2:4]} at "
                    f"{stamp[8:10]}:{stamp[10:12]}. (sandbox, no real money)",
                    at=now,
                )
            )
        outcome = f"ResultCode {code} ({tx.result_desc})" + (f", receipt {tx.receipt}" if tx.receipt else "")
        self.world.log("stk.result", f"STK {tx.checkout_request_id} for {tx.msisdn}: {outcome}", tx.msisdn)
        if post_callback:
            self.outbox.post(
                "stk_callback",
                f"stk:{tx.msisdn}",
                tx.callback_url,
                compact_json({"Body": {"stkCallback": callback}}),
                {"Content-Type": "application/json"},
                f"STK callback {code} for {tx.checkout_request_id}",
                self.config.callback_delay_ms / 1000,
            )
        else:
            self.world.log("stk.no_callback", f"No callback will come for {tx.checkout_request_id}", tx.msisdn)

    def transaction_view(self, tx: StkTransaction) -> dict[str, Any]:
        return {
            "checkout_request_id": tx.checkout_request_id,
            "merchant_request_id": tx.merchant_request_id,
            "msisdn": tx.msisdn,
            "amount": tx.amount,
            "account_reference": tx.account_reference,
            "state": tx.state,
            "result_code": tx.result_code,
            "result_desc": tx.result_desc,
            "receipt": tx.receipt,
            "callback_dropped": tx.callback_dropped,
        }
