"""Simulated Africa's Talking SMS: ``POST /version1/messaging``, delivery reports and inbound SMS.

Quirks kept on purpose because a client must cope with them live (providers/sms.md): bad
credentials give HTTP 401 with a plain-text body; success is 201 with a Content-Type of exactly
``application/json``, and only when the client asks for JSON (``Accept: application/json``),
otherwise the answer is XML; per-recipient failures hide inside a 201.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode
from xml.sax.saxutils import escape

from .config import SimConfig
from .outbox import Outbox
from .wire import NAIROBI, HttpRequest, Ids, Reply, SandboxError
from .world import SmsMessage, World, normalise_msisdn

RECIPIENT_RE = re.compile(r"\+254[17]\d{8}")
SAFARICOM = "63902"
COST_PER_SEGMENT = 8000  # KES 0.8000, counted in ten-thousandths of a shilling
DEFAULT_SENDER = "AFRICASTKNG"
AUTH_ERROR = "The supplied authentication is invalid"
SMS_MAX = 1600


def _segments(text: str) -> int:
    # GSM-7 fits 160 characters (153 per part when split); anything else is UCS-2: 70 (67).
    single, part = (160, 153) if text.isascii() else (70, 67)
    return 1 if len(text) <= single else math.ceil(len(text) / part)


def _kes(units: int) -> str:
    return f"KES {units // 10000}.{units % 10000:04d}"


class AfricasTalkingSim:
    def __init__(self, config: SimConfig, world: World, outbox: Outbox, ids: Ids, now: Callable[[], float]) -> None:
        self.config = config
        self.world = world
        self.outbox = outbox
        self.ids = ids
        self.now = now

    def send(self, req: HttpRequest) -> Reply:
        form = dict(parse_qsl(req.body.decode("utf-8", "replace"), keep_blank_values=True))
        reply, data = self._send(req, form)
        # The journal keeps the recipients' results as data whether the client got JSON or XML.
        response = {"SMSMessageData": data} if data is not None else reply.parsed()
        self.world.record_call("sms", req.method, req.path, form, reply.status, response)
        return reply

    def _send(self, req: HttpRequest, form: dict[str, str]) -> tuple[Reply, dict[str, Any] | None]:
        if req.header("apikey") != self.config.at_api_key or form.get("username") != self.config.at_username:
            return Reply.text(401, AUTH_ERROR), None
        for field in ("to", "message"):
            if not form.get(field):
                return Reply.text(400, f"Request is missing required form field '{field}'"), None
        message = form["message"]
        sender = form.get("from") or DEFAULT_SENDER
        cost = _segments(message) * COST_PER_SEGMENT
        recipients: list[dict[str, Any]] = []
        accepted: list[tuple[str, str]] = []
        for number in (n.strip() for n in form["to"].split(",")):
            if not number:
                continue
            if not RECIPIENT_RE.fullmatch(number):
                recipients.append(
                    {
                        "statusCode": 403,
                        "number": number,
                        "status": "InvalidPhoneNumber",
                        "cost": "0",
                        "messageId": "None",
                    }
                )
            elif self.world.phone(number).blacklisted:
                recipients.append(
                    {"statusCode": 406, "number": number, "status": "UserInBlacklist", "cost": "0", "messageId": "None"}
                )
            else:
                message_id = self.ids.at_message_id()
                recipients.append(
                    {
                        "statusCode": 101,
                        "number": number,
                        "status": "Success",
                        "cost": _kes(cost),
                        "messageId": message_id,
                    }
                )
                accepted.append((number, message_id))
        total = _kes(cost * len(accepted)) if accepted else "0"
        data: dict[str, Any] = {
            "Message": f"Sent to {len(accepted)}/{len(recipients)} Total Cost: {total}",
            "Recipients": recipients,
        }
        for number, message_id in accepted:
            self._deliver(number, message_id, sender, message)
        if "application/json" in req.header("accept"):
            return Reply.json(201, {"SMSMessageData": data}), data
        return Reply(201, _xml(data).encode("utf-8"), "application/xml"), data

    def _deliver(self, number: str, message_id: str, sender: str, message: str) -> None:
        phone = self.world.phone(number)
        phone.sms.append(SmsMessage(id=message_id, from_phone=False, peer=sender, text=message, at=self.now()))
        self.world.log("sms.out", f"SMS from {sender} to {phone.msisdn}: {message[:80]}", phone.msisdn)
        url = self.config.sms_status_url
        if url:
            report = urlencode(
                [
                    ("id", message_id),
                    ("status", "Success"),
                    ("phoneNumber", number),
                    ("networkCode", SAFARICOM),
                    ("retryCount", "0"),
                ]
            )
            self.outbox.post(  # its own lane, as WhatsApp's statuses: never ahead of the phone's texts
                "sms_dlr",
                f"sms:{phone.msisdn}:{message_id}",
                url,
                report.encode("ascii"),
                {"Content-Type": "application/x-www-form-urlencoded"},
                f"delivery report Success for {message_id}",
                self.config.status_delay_ms / 1000,
            )

    def phone_sms(self, msisdn: str, text: str) -> str:
        """The phone texts the short code: AT posts the inbound form to the daemon."""
        if not isinstance(text, str) or not text.strip() or len(text) > SMS_MAX:
            raise SandboxError(400, f"text must be 1..{SMS_MAX} characters")
        phone = self.world.phone(msisdn)
        now = self.now()
        message_id = self.ids.uuid()
        phone.sms.append(SmsMessage(id=message_id, from_phone=True, peer=self.config.at_short_code, text=text, at=now))
        self.world.log("sms.in", f"{phone.msisdn} texts {self.config.at_short_code}: {text[:80]}", phone.msisdn)
        url = self.config.sms_inbound_url
        if url:
            form = urlencode(
                [
                    ("date", datetime.fromtimestamp(now, NAIROBI).strftime("%Y-%m-%d %H:%M:%S")),
                    ("from", "+" + normalise_msisdn(phone.msisdn)),
                    ("id", message_id),
                    ("linkId", ""),
                    ("text", text),
                    ("to", self.config.at_short_code),
                    ("networkCode", SAFARICOM),
                ]
            )
            self.outbox.post(
                "sms_inbound",
                f"sms:{phone.msisdn}",
                url,
                form.encode("ascii"),
                {"Content-Type": "application/x-www-form-urlencoded"},
                f"inbound SMS {message_id}",
            )
        return message_id


def _xml(data: dict[str, Any]) -> str:
    rows = "".join(
        "<Recipient>" + "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in r.items()) + "</Recipient>"
        for r in data["Recipients"]
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><AfricasTalkingResponse><SMSMessageData>'
        f"<Message>{escape(str(data['Message']))}</Message><Recipients>{rows}</Recipients>"
        "</SMSMessageData></AfricasTalkingResponse>"
    )
