"""The simulator: one world, three simulated providers, the outbound delivery queue, faults.

The host runs :meth:`Simulator.run` in its own task group (it delivers webhooks and times out
prompts) and mounts :attr:`Simulator.asgi_app` wherever it likes. The in-process ``phone_*``,
``stk_answer`` and ``set_*`` methods are the same actions the control API and the console offer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import anyio
import httpx

from .africastalking import AfricasTalkingSim
from .config import SimConfig
from .daraja import DarajaSim
from .faults import HOLDING_MODES, Faults, fault_reply
from .graph import WhatsAppSim
from .outbox import Attempt, Delivery, Outbox
from .wire import HttpRequest, Ids, Reply, SandboxError
from .world import World, normalise_msisdn, phone_view

T = TypeVar("T")
HOUSEKEEPING_S = 0.25  # how often run() times out unanswered prompts
WAIT_FOR_POLL_S = 0.05  # wait_for() also re-checks on this beat, for conditions nobody announces


class Simulator:
    def __init__(
        self, config: SimConfig, http: httpx.AsyncClient | None = None, now: Callable[[], float] = time.time
    ) -> None:
        config.validate()
        self.config = config
        self.now = now
        self.latency_ms = config.latency_ms
        self._http = http
        self._waiters: list[anyio.Event] = []
        self.ids = Ids()
        self.world = World(config.merchant_msisdn, config.merchant_name, now, self._changed)
        self.outbox = Outbox(
            max_attempts=config.delivery_max_attempts,
            backoff_s=config.delivery_backoff_ms / 1000,
            timeout_s=config.delivery_timeout_s,
            concurrency=config.delivery_concurrency,
            now=now,
            on_attempt=self._on_attempt,
        )
        self.faults = Faults(config.fault_hold_s)
        self.whatsapp = WhatsAppSim(config, self.world, self.outbox, self.ids, now)
        self.daraja = DarajaSim(config, self.world, self.outbox, self.ids, now)
        self.sms = AfricasTalkingSim(config, self.world, self.outbox, self.ids, now)
        self._app: Any = None
        self._seed()

    def _seed(self) -> None:
        self.world.phone(self.config.merchant_msisdn)
        self.world.phone(self.config.default_customer_msisdn)

    @property
    def asgi_app(self) -> Any:
        if self._app is None:
            from .app import create_app  # Quart loads only when the sandbox is served

            self._app = create_app(self)
        return self._app

    # -- running -------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Deliver queued webhooks/callbacks and time out prompts, until cancelled."""
        # Keep alive every connection the deliveries open (httpx keeps 20 by default): with more
        # deliveries at once than that, each one over the limit would reconnect, which costs
        # the daemon a new connection per webhook too.
        slots = max(20, self.config.delivery_concurrency)
        limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
        client = self._http or httpx.AsyncClient(timeout=self.config.delivery_timeout_s, limits=limits)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.outbox.run, client)
                while True:
                    self.daraja.expire()
                    await anyio.sleep(HOUSEKEEPING_S)
        finally:
            if self._http is None:
                with anyio.CancelScope(shield=True):
                    await client.aclose()

    async def provider(self, service: str, req: HttpRequest, handle: Callable[[], Reply]) -> Reply:
        """Answer one provider API call: latency, then an armed fault or the real handler."""
        if self.latency_ms > 0:
            await anyio.sleep(self.latency_ms / 1000)
        fault = self.faults.take(service)
        if fault is None:
            return handle()
        if fault.mode == "lost_response":
            handle()  # the provider did the work; only the answer gets lost (journaled by handle)
        reply = fault_reply(fault, self.ids)
        if fault.mode != "lost_response":
            self.world.record_call(
                service, req.method, req.path, _journal_body(service, req), reply.status, reply.parsed()
            )
        self.world.log("fault", f"{service}: injected {fault.mode} (HTTP {reply.status})")
        if fault.mode in HOLDING_MODES:
            await anyio.sleep(fault.hold_s)
        return reply

    # -- what the people holding the phones do ------------------------------------------------------
    def phone_whatsapp(self, msisdn: str, text: str) -> str:
        """The phone sends the business a WhatsApp text; returns its wamid."""
        return self.whatsapp.phone_text(msisdn, text)

    def phone_tap(self, msisdn: str, message_id: str, button_id: str) -> str:
        """The phone taps a button (by id/payload, or by title) on a business message."""
        return self.whatsapp.tap(msisdn, message_id, button_id)

    def phone_read(self, msisdn: str, message_ids: list[str] | None = None) -> list[str]:
        """The phone shows these (default: all delivered) business messages: read statuses follow."""
        return self.whatsapp.mark_read(msisdn, message_ids)

    def phone_sms(self, msisdn: str, text: str) -> str:
        """The phone texts the short code; returns the inbound SMS id."""
        return self.sms.phone_sms(msisdn, text)

    def phone_settings(
        self, msisdn: str, *, on_whatsapp: bool | None = None, blacklisted: bool | None = None, name: str | None = None
    ) -> dict[str, Any]:
        phone = self.world.phone(msisdn)
        changes = []
        if on_whatsapp is not None:
            phone.on_whatsapp = on_whatsapp
            changes.append("on WhatsApp" if on_whatsapp else "not on WhatsApp")
        if blacklisted is not None:
            phone.blacklisted = blacklisted
            changes.append("SMS blacklisted" if blacklisted else "SMS allowed")
        if name is not None:
            if not name.strip() or len(name) > 60:
                raise SandboxError(400, "name must be 1..60 characters")
            phone.name = name
            changes.append(f"named {name}")
        self.world.log("phone.settings", f"{phone.msisdn}: {', '.join(changes) or 'no change'}", phone.msisdn)
        return phone_view(phone, self.world.stk, self.config.daraja_business_name, self.now())

    def stk_answer(
        self, checkout_request_id: str, action: str, pin: str | None = None, drop_callback: bool = False
    ) -> dict[str, Any]:
        """The customer answers the PIN prompt: pay | cancel | wrong_pin | insufficient | ignore."""
        return self.daraja.resolve(checkout_request_id, action, pin, drop_callback)

    def pending_prompt(self, msisdn: str) -> str | None:
        """CheckoutRequestID of the PIN prompt on this phone's screen, if any."""
        return self.world.phone(msisdn).prompt

    # -- the operator's knobs --------------------------------------------------------------------------
    def set_fault(
        self,
        service: str,
        mode: str,
        count: int | None = None,
        retry_after_s: int | None = None,
        hold_s: float | None = None,
    ) -> dict[str, Any] | None:
        fault = self.faults.arm(service, mode, count, retry_after_s, hold_s)
        if fault is None:
            self.world.log("fault", f"{service}: faults cleared")
            return None
        times = f"next {fault.remaining} call(s)" if fault.remaining else "until cleared"
        self.world.log("fault", f"{service}: {mode} armed for the {times}")
        return fault.to_json()

    def set_latency(self, ms: int) -> None:
        if ms < 0:
            raise SandboxError(400, "latency must be >= 0 ms")
        self.latency_ms = ms
        self.world.log("latency", f"Provider APIs now answer after {ms} ms")

    def reset(self) -> None:
        """Forget phones, chats, prompts, the journal, queued deliveries and faults."""
        self.outbox.clear()
        self.faults.clear()
        self.daraja.clear()
        self.world.clear()
        self.latency_ms = self.config.latency_ms
        self._seed()

    def tick(self) -> None:
        """Apply the clock now (prompt timeouts); run() does this every quarter second."""
        self.daraja.expire()

    # -- observing ------------------------------------------------------------------------------------
    def deliveries(self, kind: str | None = None) -> list[Delivery]:
        return [d for d in self.outbox.history if kind is None or d.kind == kind]

    def state(self, since: int = 0, phones: list[str] | None = None, numbers: bool = True) -> dict[str, Any]:
        """The console's snapshot: settings, ``phones`` (all, or those asked for), the events
        after ``since``, and every known number (``msisdns``, in the order the console lists
        them) unless ``numbers`` is False: a driver long-polling for events with thousands of
        phones does not need the list again with every change."""
        now = self.now()
        first = [self.config.merchant_msisdn, self.config.default_customer_msisdn]
        every = first + [m for m in self.world.phones if m not in first] if numbers or not phones else []
        if phones:
            # Those asked for, without walking every phone: the merchant and the default
            # customer first, as in the full list, then in the order asked.
            asked = list(dict.fromkeys(map(normalise_msisdn, phones)))
            shown = [m for m in first if m in asked] + [m for m in asked if m not in first]
        else:
            shown = every
        return {
            "seq": self.world.seq,
            "now": now,
            "sandbox": {
                "business_number": self.config.wa_business_number,
                "business_name": self.config.daraja_business_name,
                "merchant_msisdn": self.config.merchant_msisdn,
                "default_customer_msisdn": self.config.default_customer_msisdn,
                "paybill": self.config.daraja_shortcode,
                "sms_short_code": self.config.at_short_code,
                "latency_ms": self.latency_ms,
                "faults": self.faults.active(),
                "pending_deliveries": self.outbox.pending(),
            },
            "msisdns": every if numbers else [],
            "phones": [
                phone_view(self.world.phones[m], self.world.stk, self.config.daraja_business_name, now)
                for m in shown
                if m in self.world.phones
            ],
            "events": [asdict(e) for e in self.world.events_since(since)],
        }

    async def wait_change(self, since: int, timeout: float) -> None:
        """Long-poll helper: return once the event log has moved past ``since`` (or on timeout)."""
        with anyio.move_on_after(timeout):
            while self.world.seq <= since:
                await self._next_change()

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        """Wait until ``predicate()`` is truthy and return it; TimeoutError after ``timeout`` s."""
        with anyio.fail_after(timeout):
            while True:
                result = predicate()
                if result:
                    return result
                with anyio.move_on_after(WAIT_FOR_POLL_S):
                    await self._next_change()

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every queued delivery was delivered or given up."""
        await self.wait_for(lambda: self.outbox.pending() == 0, timeout)

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

    async def _next_change(self) -> None:
        event = anyio.Event()
        self._waiters.append(event)
        await event.wait()

    def _on_attempt(self, delivery: Delivery, attempt: Attempt) -> None:
        if delivery.state == "delivered":
            self._changed()
            return
        outcome = f"HTTP {attempt.status}" if attempt.status is not None else (attempt.error or "no answer")
        if delivery.state == "failed":
            self.world.log(
                "delivery.failed", f"Gave up on {delivery.summary} after {len(delivery.attempts)} attempts ({outcome})"
            )
        else:
            wait = delivery.due - time.monotonic()
            self.world.log("delivery.retry", f"{delivery.summary}: {outcome}; retrying in {max(wait, 0):.1f} s")


def _journal_body(service: str, req: HttpRequest) -> Any:
    """Best-effort parse of a call the handler never saw (an injected fault answered it)."""
    if service == "daraja_oauth":
        return dict(req.query)
    if service == "sms":
        return dict(parse_qsl(req.body.decode("utf-8", "replace"), keep_blank_values=True))
    try:
        return json.loads(req.body)
    except ValueError:
        return req.body.decode("utf-8", "replace")
