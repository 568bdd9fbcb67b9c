"""The outbox actor: every queued send leaves once, in order per recipient, or fails with a reason.

One loop claims due rows (an atomic UPDATE with a lease, see ``store.outbox``) and hands each
to a bounded pool of senders. A sender renders the row for its channel (``core.delivery``
decides session message or template), calls the gateway, and records the outcome in one
transaction with whatever follows from it: the invoice becomes SENT and the merchant gets
the confirmation; a permanent failure queues the SMS fallback; an exhausted message fails
and the merchant is told. Broken credentials pause the channel (and ``/readyz`` says so)
instead of spending every queued message's attempts.

Status webhooks (``sent``/``delivered``/``read``/``failed``) and SMS delivery reports are
applied by ``DeliveryTracker``, keyed by the provider's message id.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio

from ..clock import Clock
from ..core import copy, delivery
from ..core.model import Channel, Direction, Invoice, InvoiceStatus
from ..gateways.http import AuthError, GatewayError, RateLimited, TransientError
from ..observability import Metrics, get_logger
from ..store import Store, Tx, customers, inbox, invoices, messages, outbox
from ..store.inbox import InboxEvent
from ..store.outbox import OutboxRow
from . import effects
from .runtime import Pressure, Waker

if TYPE_CHECKING:
    from ..config import Settings
    from ..gateways.sms import AfricasTalkingClient
    from ..gateways.whatsapp import WhatsAppClient

log = get_logger(__name__)
POLL_MS = 5_000
# How long the outbox trusts the earliest future due time it read (a retry's time, a lease's
# end): that read walks every unfinished row in a reader thread, and ran after every claim
# that left a slot free, several times per send under load (4% of the daemon's CPU in the
# end-to-end bench). Retries this process schedules lower the kept value at once; anything
# else (another process's retries, leases of a crashed one) is found within this delay.
NEXT_DUE_TTL_MS = 1_000
# Sends in flight while the front door is busy (runtime.Pressure): a couple at a time.
BUSY_IN_FLIGHT = 2
# outbox.lease_s (default 60 s): far above the HTTP timeout (10 s), so a live sender never
# loses its claim; a crashed process's claims come back after it.
UNKNOWN_STATUS_GIVE_UP_MS = 10 * 60_000


@dataclass
class _Rendered:
    """A row made ready for its channel; ``skip`` when it should no longer be sent at all."""

    reply: copy.Reply | None = None
    template: delivery.Template | None = None
    sms: str | None = None
    skip: str | None = None
    form: str = "text"


@dataclass
class _After:
    sent_invoices: list[Invoice] = field(default_factory=list)
    queued: int = 0
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (channel, direction, event)


class Outbox:
    """Shared by the sender loop and the status tracker: what follows an outcome."""

    def __init__(self, *, store: Store, settings: Settings, clock: Clock, metrics: Metrics) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.sms_configured = False

    def pay_url(self, invoice: Invoice) -> str:
        return invoice.pay_url(self.settings.server.public_base_url)

    async def accepted(self, tx: Tx, row: OutboxRow, provider_id: str | None, form: str, after: _After) -> None:
        now = self.clock.now_ms()
        if not await outbox.mark_sent(tx, row.id, provider_id, now, form):
            log.warning("outbox_claim_lost", outbox_id=row.id)
            return
        await messages.log_message(
            tx, channel=row.channel, direction=Direction.OUT, event="sent", invoice_id=row.invoice_id,
            payload={"outbox_id": row.id, "provider_message_id": provider_id, "kind": row.kind, "form": form})
        after.events.append((row.channel.value, "OUT", "sent"))
        if row.invoice_id is None or row.kind not in ("invoice", "reminder"):
            return
        if row.kind == "reminder":
            await invoices.set_delivery(tx, row.invoice_id, row.channel, "sent")
            return
        first = await invoices.mark_sent(tx, row.invoice_id, row.channel, now)
        invoice = await invoices.get(tx, row.invoice_id)
        if invoice is None:
            return
        if first:
            after.sent_invoices.append(invoice)
            after.queued += await self.tell_merchant(
                tx, copy.invoice_sent(invoice), invoice.id, f"confirm:{invoice.id}")
        if row.fallback_of is not None:
            reason = str(row.content.get("fallback_reason") or copy.SMS_REASON_WHATSAPP_FAILED)
            after.queued += await self.tell_merchant(
                tx, copy.sent_by_sms(invoice, reason), invoice.id, f"sms-notice:{invoice.id}")

    async def failed(self, tx: Tx, row: OutboxRow, reason: str, code: str | None, after: _After) -> None:
        """The message cannot go this way: the SMS fallback if there is one, else FAILED.
        ``row.sent_form`` is the form that failed (interactive, template, text, sms)."""
        now = self.clock.now_ms()
        if not await outbox.mark_failed(tx, row.id, reason, now):
            return
        await messages.log_message(
            tx, channel=row.channel, direction=Direction.OUT, event="failed", invoice_id=row.invoice_id,
            payload={"outbox_id": row.id, "reason": reason, "code": code})
        after.events.append((row.channel.value, "OUT", "failed"))
        log.warning("message_failed", outbox_id=row.id, channel=row.channel.value, kind=row.kind,
                    invoice_id=row.invoice_id, code=code, reason=reason)
        # A failure reported after `invoiceiq prune` emptied the row's content (weeks after it
        # was sent): there is nothing left to send again another way. Recorded all the same.
        resendable = bool(row.content)
        if not resendable and row.channel is Channel.WHATSAPP:
            log.info("resend_skipped_content_pruned", outbox_id=row.id, invoice_id=row.invoice_id)
        if (resendable and row.channel is Channel.WHATSAPP and code == "131047"
                and row.kind in ("invoice", "reminder")
                and row.sent_form == "interactive"):
            # Outside the 24-hour window (our record of it was wrong): the approved template is
            # allowed there. Try it once before falling back to SMS.
            again = await outbox.enqueue(
                tx, recipient=row.recipient, channel=Channel.WHATSAPP, kind=row.kind,
                content=dict(row.content, template_only=True), now_ms=now, invoice_id=row.invoice_id,
                dedupe_key=f"template:{row.id}", fallback_of=row.fallback_of, order_key=row.order_key)
            if again is not None:
                after.queued += 1
                log.info("retry_as_template", outbox_id=row.id, invoice_id=row.invoice_id)
                return
        if resendable and row.channel is Channel.WHATSAPP and self.sms_configured:
            content = dict(row.content, fallback_reason=delivery.fallback_reason(code))
            new_id = await outbox.enqueue(
                tx, recipient=row.recipient, channel=Channel.SMS, kind=row.kind, content=content,
                now_ms=now, invoice_id=row.invoice_id, dedupe_key=f"fallback:{row.id}", fallback_of=row.id,
                order_key=row.order_key)
            if new_id is not None:
                await messages.log_message(
                    tx, channel=Channel.WHATSAPP, direction=Direction.OUT, event="fallback",
                    invoice_id=row.invoice_id, payload={"outbox_id": row.id, "sms_outbox_id": new_id, "code": code})
                after.events.append(("WHATSAPP", "OUT", "fallback"))
                after.queued += 1
                log.info("fallback_to_sms", outbox_id=row.id, invoice_id=row.invoice_id, code=code)
                return
        if row.invoice_id is not None and row.kind == "invoice":
            await invoices.mark_failed(tx, row.invoice_id)
            invoice = await invoices.get(tx, row.invoice_id)
            if invoice is not None:
                after.queued += await self.tell_merchant(
                    tx, copy.delivery_failed(invoice), invoice.id, f"delivery-failed:{invoice.id}")

    async def tell_merchant(self, tx: Tx, reply: copy.Reply, invoice_id: str | None, dedupe_key: str) -> int:
        queued = await effects.tell_merchant(tx, self.settings, self.clock.now_ms(), reply,
                                             invoice_id=invoice_id, dedupe_key=dedupe_key)
        return 1 if queued is not None else 0

    def observe(self, after: _After) -> None:
        for invoice in after.sent_invoices:
            self.metrics.invoices_sent.inc()
            log.info("invoice_sent", invoice_id=invoice.id, channel=(invoice.channel or Channel.WHATSAPP).value)
        if after.sent_invoices:
            self.metrics.update_conversion()
        for channel, direction, event in after.events:
            self.metrics.messages.labels(channel, direction, event).inc()


class OutboxActor:
    def __init__(self, *, core: Outbox, whatsapp: WhatsAppClient | None, sms: AfricasTalkingClient | None,
                 stopping: anyio.Event, worker_id: str,
                 pressure: Pressure | None = None) -> None:
        self.core = core
        self.store = core.store
        self.clock = core.clock
        self.settings = core.settings
        self.whatsapp = whatsapp
        self.sms = sms
        core.sms_configured = sms is not None
        self.stopping = stopping
        self.worker_id = worker_id
        self.concurrency = core.settings.outbox.max_in_flight
        self.lease_ms = core.settings.outbox.lease_s * 1000
        self.pressure = pressure
        self.waker = Waker()
        self.in_flight = 0
        self._paused_until: dict[Channel, int] = {}
        self.channel_problems: dict[Channel, str] = {}
        # Holds in a row per throttled channel (the provider refused again after the last
        # one ended); back to none with the channel's next accepted send.
        self._holds: dict[Channel, int] = {}
        # The earliest future due time as last read: (value, read at, for which channels), and
        # how many retries this process has scheduled (a read that overlaps one is not kept).
        self._due: tuple[int | None, int, tuple[Channel, ...]] | None = None
        self._retries_scheduled = 0

    # -- health ------------------------------------------------------------------------------

    def readiness_problem(self) -> str | None:
        if not self.channel_problems:
            return None
        return "; ".join(f"{c.value.lower()}: {p}" for c, p in sorted(self.channel_problems.items()))

    def _channels(self, now: int) -> tuple[Channel, ...]:
        usable = []
        if self.whatsapp is not None and self._paused_until.get(Channel.WHATSAPP, 0) <= now:
            usable.append(Channel.WHATSAPP)
        if self.sms is not None and self._paused_until.get(Channel.SMS, 0) <= now:
            usable.append(Channel.SMS)
        return tuple(usable)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        gauge_at = 0.0
        async with anyio.create_task_group() as senders:
            while not self.stopping.is_set():
                if self.pressure is not None and not (self.pressure.busy and self.in_flight >= BUSY_IN_FLIGHT):
                    # Urgent: the outbox carries out what turns already decided (receipts, PIN
                    # prompt notices, replies): during a flood those leave before more is
                    # decided. Not while its burst allowance is in flight (no turn to take).
                    await self.pressure.yield_to_requests(urgent=True)
                now = self.clock.now_ms()
                channels = self._channels(now)
                free = self.concurrency - self.in_flight
                if self.pressure is not None and self.pressure.busy:
                    # A burst at the front door: keep sending, but a couple at a time.
                    free = min(free, BUSY_IN_FLIGHT - min(BUSY_IN_FLIGHT, self.in_flight))
                rows: list[OutboxRow] = []
                if free > 0 and channels:
                    rows = await self.store.write(lambda tx: outbox.claim_due(
                        tx, now_ms=now, limit=free, worker=self.worker_id, lease_ms=self.lease_ms, channels=channels))
                for row in rows:
                    self.in_flight += 1
                    senders.start_soon(self._send, row)
                if rows and len(rows) == free:
                    continue
                deadline = now + POLL_MS
                if free > 0:
                    next_due = await self._next_due(now, channels)
                    if next_due is not None:
                        deadline = min(deadline, max(next_due, now + 1))
                for until in self._paused_until.values():
                    if until > now:
                        deadline = min(deadline, until)
                if anyio.current_time() - gauge_at >= 1.0:  # a COUNT per second is plenty
                    gauge_at = anyio.current_time()
                    self.core.metrics.outbox_pending.set(await self.store.scan(outbox.pending_count))
                await self.waker.wait(self.clock, deadline)

    async def _next_due(self, now: int, channels: tuple[Channel, ...]) -> int | None:
        """The earliest future due time (``outbox.next_due_ms``), read again once it has
        passed, after ``NEXT_DUE_TTL_MS``, or for other channels."""
        if self._due is not None:
            due, read_at, for_channels = self._due
            if for_channels == channels and now - read_at < NEXT_DUE_TTL_MS and (due is None or due > now):
                return due
        scheduled = self._retries_scheduled
        due = await self.store.scan(lambda tx: outbox.next_due_ms(tx, now, channels))
        # A retry scheduled while the read was in flight may be missing from what it saw:
        # keeping that answer would hide the retry until the kept time expires. Not kept then;
        # the retry's wake brings the loop straight back to read again.
        self._due = (due, now, channels) if scheduled == self._retries_scheduled else None
        return due

    def _due_at(self, when: int) -> None:
        """A retry this process scheduled: the kept earliest due time may not be later."""
        self._retries_scheduled += 1
        if self._due is not None:
            due, read_at, channels = self._due
            self._due = (when if due is None else min(due, when), read_at, channels)

    async def drain(self) -> None:
        """Wait for the sends in flight (used at shutdown, within the grace period)."""
        while self.in_flight:
            await anyio.sleep(0.01)

    async def _send(self, row: OutboxRow) -> None:
        try:
            await self._send_one(row)
        except Exception:  # noqa: BLE001 - a bug must not kill the loop; the lease brings it back
            log.exception("outbox_send_crashed", outbox_id=row.id)
        finally:
            self.in_flight -= 1
            self.waker.wake()

    async def _send_one(self, row: OutboxRow) -> None:
        rendered = await self.store.read(lambda tx: self._render(tx, row))
        after = _After()
        if rendered.skip is not None:
            await self.store.write(lambda tx: self._skip(tx, row, rendered.skip or ""))
            return
        try:
            provider_id = await self._call(row, rendered)
        except GatewayError as exc:
            await self._on_error(row, exc, rendered.form)
            return
        except ValueError as exc:
            # Our message broke a provider rule before it left: as permanent as it gets.
            reason = f"invalid message: {exc}"
            await self.store.write(lambda tx: self.core.failed(tx, row, reason, "local", after))
            self.core.observe(after)
            self.waker.wake()
            return
        self.channel_problems.pop(row.channel, None)
        self._holds.pop(row.channel, None)
        await self.store.write(lambda tx: self.core.accepted(tx, row, provider_id, rendered.form, after))
        self.core.observe(after)
        log.info("message_sent", outbox_id=row.id, channel=row.channel.value, kind=row.kind,
                 invoice_id=row.invoice_id, form=rendered.form, attempt=row.attempts)
        if after.queued:
            self.waker.wake()

    async def _call(self, row: OutboxRow, rendered: _Rendered) -> str | None:
        if row.channel is Channel.SMS:
            assert self.sms is not None and rendered.sms is not None
            return (await self.sms.send(row.recipient, rendered.sms)).message_id
        assert self.whatsapp is not None
        if rendered.template is not None:
            t = rendered.template
            sent = await self.whatsapp.send_template(row.recipient, t.name, t.language, t.params, t.payloads)
        else:
            assert rendered.reply is not None
            reply = rendered.reply
            if reply.buttons:
                sent = await self.whatsapp.send_buttons(row.recipient, reply.text, reply.buttons, reply.footer)
            else:
                sent = await self.whatsapp.send_text(row.recipient, delivery.plain_text(reply))
        return sent.message_id

    async def _render(self, tx: Tx, row: OutboxRow) -> _Rendered:
        content = row.content
        if content.get("type") != "invoice":
            if row.channel is Channel.SMS:
                return _Rendered(sms=delivery.sms_from_content(content), form="sms")
            reply = delivery.reply_from_content(content)
            return _Rendered(reply=reply, form="interactive" if reply.buttons else "text")
        invoice = await invoices.get(tx, str(content.get("invoice_id")))
        if invoice is None:
            return _Rendered(skip="invoice not found")
        if invoice.status in (InvoiceStatus.PAID, InvoiceStatus.CANCELLED):
            return _Rendered(skip=f"invoice is {invoice.status.value.lower()}")
        purpose = str(content.get("purpose") or "invoice")
        if row.channel is Channel.SMS:
            return _Rendered(sms=delivery.invoice_sms(invoice, purpose, self.core.pay_url(invoice)), form="sms")
        last_inbound = None if content.get("template_only") else await customers.last_inbound_ms(tx, invoice.msisdn)
        message = delivery.invoice_message(
            invoice, purpose, last_inbound_ms=last_inbound,
            now_ms=self.clock.now_ms(), template=self.settings.whatsapp.invoice_template,
            language=self.settings.whatsapp.template_language, pay_url=self.core.pay_url(invoice))
        if isinstance(message, delivery.Template):
            return _Rendered(template=message, form="template")
        return _Rendered(reply=message, form="interactive")

    async def _skip(self, tx: Tx, row: OutboxRow, reason: str) -> None:
        await outbox.mark_skipped(tx, row.id, reason, self.clock.now_ms())
        log.info("message_skipped", outbox_id=row.id, kind=row.kind, invoice_id=row.invoice_id, reason=reason)

    async def _on_error(self, row: OutboxRow, exc: GatewayError, form: str) -> None:
        # Africa's Talking 405 (InsufficientBalance) is the account's problem, not the number's:
        # like broken credentials it pauses the channel and raises an alert.
        out_of_credit = exc.provider == "africastalking" and exc.code == "405"
        kind = (delivery.ErrorKind.AUTH if isinstance(exc, AuthError) or out_of_credit
                else delivery.ErrorKind.THROTTLED if isinstance(exc, RateLimited)
                else delivery.ErrorKind.TRANSIENT if isinstance(exc, TransientError)
                else delivery.ErrorKind.PERMANENT)
        retry_after = exc.retry_after_s if isinstance(exc, TransientError) else None
        now = self.clock.now_ms()
        # A refusal of a send that left before the channel's hold began belongs to that
        # hold; only a refusal after it ended makes the next one longer.
        held_until = self._paused_until.get(row.channel, 0)
        new_hold = kind is delivery.ErrorKind.THROTTLED and held_until <= now
        holds = self._holds.get(row.channel, 0) + int(new_hold)
        decision = delivery.after_failure(
            kind, channel=row.channel, attempts=row.attempts, max_attempts=self.settings.outbox.max_attempts,
            can_fallback=self.sms is not None, retry_after_s=retry_after,
            base_s=self.settings.outbox.backoff_base_s, max_s=self.settings.outbox.backoff_max_s,
            jitter=random.random(), holds_in_a_row=max(1, holds))
        reason = f"{exc.code}: {exc.reason}"
        after = _After()
        if decision.outcome in (delivery.Outcome.HOLD, delivery.Outcome.PAUSE, delivery.Outcome.RETRY):
            until = now + decision.delay_ms
            if decision.outcome is delivery.Outcome.HOLD:
                # (A later refusal's Retry-After may lengthen the hold it belongs to.)
                until = max(held_until, until)
                if new_hold:
                    self._holds[row.channel] = holds
                    self.core.metrics.messages.labels(row.channel.value, Direction.OUT.value, "throttled").inc()
                    log.warning("channel_throttled", channel=row.channel.value, code=exc.code,
                                hold_ms=until - now, holds_in_a_row=holds)
            elif decision.outcome is delivery.Outcome.PAUSE:
                self.channel_problems[row.channel] = (
                    "account out of credit (405)" if out_of_credit else f"credentials rejected ({exc.code})")
                log.error("channel_auth_failed", alert=True, channel=row.channel.value, code=exc.code,
                          paused_s=decision.delay_ms // 1000)
            else:
                log.info("message_retry", outbox_id=row.id, channel=row.channel.value, code=exc.code,
                         attempt=row.attempts, retry_in_ms=decision.delay_ms)
            # The whole channel waits (a hold, a pause): not this message's fault, so it keeps
            # the attempt; a retry waits alone and has spent one.
            channel_waits = decision.outcome is not delivery.Outcome.RETRY
            if channel_waits:
                self._paused_until[row.channel] = until
            await self.store.write(lambda tx: outbox.mark_retry(
                tx, row.id, reason, until, now, refund_attempt=channel_waits))
            self._due_at(until)
        else:
            # FALLBACK and FAIL: ``failed`` queues the SMS when there is a way, else gives up.
            # The row records its form once a send is accepted; refused in Meta's answer, the
            # form that failed is this attempt's.
            attempted = replace(row, sent_form=form)
            await self.store.write(lambda tx: self.core.failed(tx, attempted, reason, exc.code, after))
            self.core.observe(after)
        self.waker.wake()


class DeliveryTracker:
    """Applies provider statuses (WhatsApp sent/delivered/read/failed, SMS delivery reports)
    to outbox rows, found by the provider's message id.

    Statuses are most of the traffic (each message earns two or three), so they are applied
    in groups: one transaction for every status waiting, whichever kick arrived."""

    BATCH = 500
    BUSY_BATCH = 32  # per admitted turn while webhooks flood the door (runtime.Pressure.turn)

    def __init__(self, core: Outbox, wake_outbox: Any, pressure: Pressure | None = None,
                 kick_again: Any = None) -> None:
        self.core = core
        self.wake_outbox = wake_outbox
        self.pressure = pressure
        self.kick_again = kick_again  # to the back of the line, through the door's admission

    async def handle(self, _key: str, _message: Any) -> None:
        # A status can overtake the send's own commit (the provider answers the send and
        # posts "sent" at once): give such a row a moment to appear, then leave it to the sweep.
        for _ in range(20):
            limit = self.BATCH if self.pressure is None else self.pressure.turn(self.BATCH, self.BUSY_BATCH)
            after = _After()
            more, waiting = await self.core.store.write(lambda tx: self._apply(tx, after, limit))
            self.core.observe(after)
            if after.queued:
                self.wake_outbox()
            if more and limit < self.BATCH and self.kick_again is not None:
                self.kick_again()  # during a flood: one slice per admitted turn, as a session's
                return
            if more:
                continue
            if not waiting:
                return
            await anyio.sleep(0.1)

    async def _apply(self, tx: Tx, after: _After, limit: int) -> tuple[bool, int]:
        """Apply what can be; (more waiting beyond this batch, statuses whose row is not there yet)."""
        after.queued = 0
        after.events.clear()
        events = await inbox.pending_for_actor(tx, "delivery", limit=limit)
        now = self.core.clock.now_ms()
        by_message: dict[str, list[InboxEvent]] = {}
        for event in events:
            by_message.setdefault(event.actor_key, []).append(event)
        waiting = 0
        for provider_id, group in by_message.items():
            row = await outbox.by_provider_id(tx, provider_id)
            if row is None:
                if now - group[0].received_at_ms < UNKNOWN_STATUS_GIVE_UP_MS:
                    waiting += len(group)
                    continue
                for event in group:
                    await inbox.mark_processed(tx, event.seq, now)
                log.warning("status_for_unknown_message", count=len(group))
                continue
            for event in group:
                if await inbox.mark_processed(tx, event.seq, now):
                    row = await self._status(tx, row, provider_id, event, now, after)
        return len(events) == limit and waiting < len(events), waiting

    async def _status(self, tx: Tx, row: OutboxRow, provider_id: str, event: InboxEvent, now: int,
                      after: _After) -> OutboxRow:
        status = str(event.payload.get("status") or "")
        mapped = (delivery.SMS_STATUS if row.channel is Channel.SMS else delivery.WHATSAPP_STATUS).get(status)
        code = event.payload.get("code")
        await messages.log_message(
            tx, channel=row.channel, direction=Direction.OUT, event=status.lower() or "status",
            invoice_id=row.invoice_id,
            payload={"outbox_id": row.id, "provider_message_id": provider_id, "status": status,
                     "code": code, "reason": event.payload.get("reason")})
        if mapped is None:
            return row
        if mapped == "FAILED":
            reason = f"{code}: {event.payload.get('reason') or 'failed'}"
            await self.core.failed(tx, row, reason, None if code is None else str(code), after)
            return row
        moved = await outbox.advance_status(tx, provider_id, mapped, now)
        if moved is None:
            return row
        after.events.append((row.channel.value, "OUT", mapped.lower()))
        if row.invoice_id is not None and row.kind in ("invoice", "reminder"):
            await invoices.set_delivery(tx, row.invoice_id, row.channel, mapped.lower())
        return moved
