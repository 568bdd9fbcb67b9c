"""Fault injection: make a provider API misbehave the way the real one does on a bad day.

A fault is armed per service, for the next ``count`` calls or until cleared. Each provider fails
with its own wire format, so the daemon's error classification meets what it will meet live.
``timeout`` holds the request past any client timeout and handles nothing; ``lost_response``
handles the request (the message is sent, the prompt shown) and then holds it, the ambiguous
case that idempotency keys exist for.
"""

from __future__ import annotations

from dataclasses import dataclass

from .wire import Ids, Reply

SERVICES = ("whatsapp", "daraja_oauth", "daraja_push", "daraja_query", "sms")
HOLDING_MODES = ("timeout", "lost_response")
_COMMON = ("http500", "http429", "down", "expired_token", *HOLDING_MODES)
MODES: dict[str, tuple[str, ...]] = {
    "whatsapp": (*_COMMON, "throttle"),
    "daraja_oauth": (*_COMMON, "spike_arrest"),
    "daraja_push": (*_COMMON, "spike_arrest"),
    "daraja_query": (*_COMMON, "spike_arrest"),
    "sms": (*_COMMON, "throttle"),
}


class FaultError(ValueError):
    pass


@dataclass(slots=True)
class Fault:
    service: str
    mode: str
    remaining: int | None  # None: until cleared
    retry_after_s: int
    hold_s: float

    def to_json(self) -> dict[str, object]:
        return {
            "service": self.service,
            "mode": self.mode,
            "remaining": self.remaining,
            "retry_after_s": self.retry_after_s,
            "hold_s": self.hold_s,
        }


class Faults:
    def __init__(self, default_hold_s: float) -> None:
        self._default_hold_s = default_hold_s
        self._armed: dict[str, Fault] = {}

    def arm(
        self,
        service: str,
        mode: str,
        count: int | None = None,
        retry_after_s: int | None = None,
        hold_s: float | None = None,
    ) -> Fault | None:
        if service not in SERVICES:
            raise FaultError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
        if mode == "none":
            self._armed.pop(service, None)
            return None
        if mode not in MODES[service]:
            raise FaultError(f"mode {mode!r} does not apply to {service}; one of none, {', '.join(MODES[service])}")
        if count is not None and count < 1:
            raise FaultError("count must be >= 1 (or omitted: until cleared)")
        fault = Fault(
            service=service,
            mode=mode,
            remaining=count,
            retry_after_s=1 if retry_after_s is None else retry_after_s,
            hold_s=self._default_hold_s if hold_s is None else hold_s,
        )
        self._armed[service] = fault
        return fault

    def take(self, service: str) -> Fault | None:
        """The fault for this call, if any; counts the call against it."""
        fault = self._armed.get(service)
        if fault is None:
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                del self._armed[service]
        return fault

    def active(self) -> list[dict[str, object]]:
        return [f.to_json() for f in self._armed.values()]

    def clear(self) -> None:
        self._armed.clear()


def fault_reply(fault: Fault, ids: Ids) -> Reply:
    """What the provider answers while this fault is armed (held modes end in a gateway 504)."""
    retry_after = {"Retry-After": str(fault.retry_after_s)}
    if fault.mode in HOLDING_MODES:
        return Reply.text(504, "Gateway Timeout")
    if fault.mode == "down":
        return Reply.text(503, "Service Unavailable")
    if fault.service == "whatsapp":
        return _graph_fault(fault.mode, ids.fbtrace_id(), retry_after)
    if fault.service == "sms":
        if fault.mode == "http500":
            return Reply.text(500, "Internal Server Error")
        if fault.mode == "expired_token":
            return Reply.text(401, "The supplied authentication is invalid")
        return Reply.text(429, "Too Many Requests", retry_after)  # http429, throttle
    return _daraja_fault(fault, ids.daraja_request_id(), retry_after)


def _graph_fault(mode: str, fbtrace_id: str, retry_after: dict[str, str]) -> Reply:
    if mode == "expired_token":
        return Reply.json(
            401,
            {
                "error": {
                    "message": "Error validating access token: Session has expired on Friday, 26-Apr-24 06:00:00 PDT. "
                    "The current time is Sunday, 28-Apr-24 03:40:10 PDT.",
                    "type": "OAuthException",
                    "code": 190,
                    "error_subcode": 463,
                    "fbtrace_id": fbtrace_id,
                }
            },
        )
    if mode == "http429":
        error = {
            "message": "(#4) Application request limit reached",
            "type": "OAuthException",
            "is_transient": True,
            "code": 4,
            "fbtrace_id": fbtrace_id,
        }
        return Reply.json(429, {"error": error}, retry_after)
    if mode == "throttle":  # Meta throttles with HTTP 400 and code 130429, not with 429
        code, title, details, status = (
            130429,
            "Rate limit hit",
            "Message failed to send because there were too many messages sent from this phone number "
            "in a short period of time",
            400,
        )
    else:  # http500
        code, title, details, status = (
            131000,
            "Something went wrong",
            "Message failed to send due to an unknown error.",
            500,
        )
    error = {
        "message": f"(#{code}) {title}",
        "type": "OAuthException",
        "code": code,
        "error_data": {"messaging_product": "whatsapp", "details": details},
        "fbtrace_id": fbtrace_id,
    }
    return Reply.json(status, {"error": error})


def _daraja_fault(fault: Fault, request_id: str, retry_after: dict[str, str]) -> Reply:
    status, code, message = {
        "http500": (500, "500.003.1001", "Internal Server Error"),
        "http429": (429, "500.003.03", "Quota Violation"),
        "spike_arrest": (500, "500.003.02", "Error Occurred: Spike Arrest Violation"),
        "expired_token": (404, "404.001.03", "Invalid Access Token"),
    }[fault.mode]
    if fault.mode == "expired_token" and fault.service == "daraja_oauth":
        status, code, message = 400, "400.008.01", "Invalid Authentication passed"
    headers = retry_after if status == 429 else {}
    return Reply.json(status, {"requestId": request_id, "errorCode": code, "errorMessage": message}, headers)
