"""The session actor: one conversation's steps, one at a time.

A conversation is a database row until someone writes. When a message for it has been stored
(the webhook put it in the inbox) the actor is kicked; it then, in ONE transaction:

1. loads the conversation (locking it on PostgreSQL) and its unprocessed inbox events;
2. runs the pure state machine over them (``core.conversation.step`` for the merchant,
   ``core.customer.customer_step`` for anyone else), plus a due timer;
3. carries out the effects: replies and invoices become outbox rows, lookups are queries;
4. marks the events processed and saves the new state with its next due timer, as a
   compare-and-set on the row's version.

A crash anywhere before the commit leaves everything as it was: the events are still
unprocessed and the next kick (or the scheduler's sweep after a restart) runs them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..clock import Clock
from ..core import copy, delivery, invoicing
from ..core.delivery import window_start_ms
from ..core.conversation import (
    ChatSettings,
    ConversationState,
    CreateInvoice,
    CustomersFound,
    FindCustomers,
    InvoiceAction,
    ListUnpaid,
    Message,
    TimerDue,
    step,
)
from ..core.customer import (
    CustomerState,
    DetailsRequested,
    ListOpenInvoices,
    OpenInvoices,
    PayRequested,
    customer_step,
)
from ..core.model import Channel, Invoice, InvoiceStatus, kes_to_cents
from ..observability import Metrics, get_logger
from ..store import (
    Conflict, Store, StoreError, Tx, conversations, customers, inbox, invoices, messages, outbox, payments,
)
from ..store.inbox import InboxEvent
from . import effects

if TYPE_CHECKING:
    from ..config import Settings
    from ..daemon import Dispatcher
    from .runtime import Pressure

log = get_logger(__name__)
ACTOR = "session"
BATCH = 16  # events applied per transaction; a flood is worked off in slices, taking turns
POISON_AFTER = 3  # crashes of one event's step before it is set aside (dead-lettered)
# Answers to taps that name no invoice of the sender's (a stranger's Pay / View details, "pay"
# with several open invoices, someone else's number) are hints too: at most this many per
# sender per customer hint interval, however many taps arrive. Details of one's own invoice:
# one per invoice per DETAILS_WINDOW_MS.
TAP_HINTS_PER_INTERVAL = 3
DETAILS_WINDOW_MS = 10_000


@dataclass
class _AfterCommit:
    """What to do once the transaction is durable (metrics, kicks): never before."""

    created: list[str] = field(default_factory=list)
    payments: list[str] = field(default_factory=list)
    queued: int = 0
    timer_changed: bool = False
    more: bool = False

    def reset(self) -> None:
        self.created.clear()
        self.payments.clear()
        self.queued = 0
        self.timer_changed = self.more = False


class SessionActor:
    def __init__(self, *, store: Store, settings: Settings, clock: Clock, metrics: Metrics,
                 dispatch: Dispatcher, pressure: Pressure | None = None) -> None:
        self.store = store
        self.pressure = pressure
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.dispatch = dispatch
        self._careful: set[str] = set()  # conversations retried one event at a time after a crash
        chat = settings.chat
        self.chat = ChatSettings(
            nudge_after_ms=chat.nudge_after_s * 1000, close_after_ms=chat.close_after_s * 1000,
            max_amount_kes=settings.mpesa.max_amount, rate_limit_per_minute=chat.merchant_rate_per_min)

    def _slice(self, careful: bool) -> int:
        """Events to apply in this turn: one after a crash (to find the poisoned one), one
        while webhooks flood the front door (``Pressure.turn``), else ``BATCH``."""
        if careful:
            return 1
        return BATCH if self.pressure is None else self.pressure.turn(BATCH)

    def role_of(self, key: str) -> str:
        return "merchant" if key == self.settings.merchant.msisdn else "customer"

    async def handle(self, key: str, _message: Any) -> None:
        """Registry handler: apply a slice of what is waiting for conversation ``key``."""
        after = _AfterCommit()
        careful = key in self._careful
        try:
            await self.store.write(lambda tx: self._process(tx, key, after, self._slice(careful)))
        except (StoreError, Conflict):
            raise  # the database, not the event: the registry retries with backoff
        except Exception:
            await self._poisoned(key, careful)
            raise
        self._careful.discard(key)
        for invoice_id in after.created:
            self.metrics.invoices_created.inc()
            log.info("invoice_created", invoice_id=invoice_id, source="chat")
        if after.queued:
            self.dispatch.wake("outbox")
        for invoice_id in after.payments:
            self.dispatch.kick("payment", invoice_id)
        if after.timer_changed:
            self.dispatch.wake("scheduler")
        if after.more:
            # More is waiting: to the back of the line, through the front door's admission
            # again (runtime.Pressure), rather than on and on in one go; other conversations
            # take their turns in between.
            self.dispatch.kick(ACTOR, key)

    async def _poisoned(self, key: str, careful: bool) -> None:
        """A step crashed. Retry one event at a time; once a single event has crashed its step
        ``POISON_AFTER`` times, set it aside so that the conversation goes on without it."""
        if not careful:
            self._careful.add(key)
            return

        async def job(tx: Tx) -> InboxEvent | None:
            dead = await inbox.record_failure(tx, ACTOR, key, self.clock.now_ms(), give_up_after=POISON_AFTER)
            if dead is not None and dead.source == "whatsapp":
                # Never applied, but received: its message_log row all the same.
                await messages.log_whatsapp_in(tx, dead.event_id, dead.payload)
            return dead

        dead = await self.store.write(job)
        if dead is not None:
            log.error("event_dead_lettered", alert=True, actor=ACTOR, msisdn=key, inbox_seq=dead.seq,
                      kind=dead.kind)

    async def _process(self, tx: Tx, key: str, after: _AfterCommit, batch: int = BATCH) -> None:
        # The job may be re-run after a Conflict: start from a clean slate each time.
        after.reset()
        now = self.clock.now_ms()
        role = self.role_of(key)
        row = await conversations.load(tx, key, role)
        events = await inbox.pending(tx, ACTOR, key, limit=batch)
        after.more = len(events) == batch
        if role == "merchant":
            merchant = ConversationState.from_dict(row.state)
            due_before = merchant.due_ms
            changed = False
            for event in events:
                if not await inbox.mark_processed(tx, event.seq, now):
                    continue
                await self._received(tx, key, event)
                text = str(event.payload.get("text") or "")
                merchant = await self._merchant_step(tx, key, merchant, Message(text), now, after)
                changed = True
            if merchant.due_ms is not None and merchant.due_ms <= now:
                merchant = await self._merchant_step(tx, key, merchant, TimerDue(), now, after)
                changed = True
            if not changed:
                return
            after.timer_changed = merchant.due_ms != due_before
            await conversations.save(tx, row, merchant.to_dict(), merchant.due_ms, now)
            return

        customer = CustomerState.from_dict(row.state)
        if not events:
            return
        for event in events:
            if not await inbox.mark_processed(tx, event.seq, now):
                continue
            await self._received(tx, key, event)
            text = str(event.payload.get("text") or "")
            channel = Channel.SMS if event.payload.get("channel") == Channel.SMS.value else Channel.WHATSAPP
            customer = await self._customer_step(tx, key, customer, text, event.event_id, channel, now, after)
        await conversations.save(tx, row, customer.to_dict(), None, now)

    async def _received(self, tx: Tx, key: str, event: InboxEvent) -> None:
        """A message taken: logged; a WhatsApp one gets its message_log row now that it is
        applied (web/whatsapp.py; an SMS has its row from the webhook) and opens that
        person's 24-hour window (templates are needed after)."""
        log.info("message_received", channel=event.source, kind=event.kind, msisdn=key,
                 role=self.role_of(key), inbox_seq=event.seq)
        if event.source == "whatsapp":
            await messages.log_whatsapp_in(tx, event.event_id, event.payload)
            stamp = event.payload.get("timestamp_s")
            await customers.touch_inbound(tx, key, window_start_ms(stamp if isinstance(stamp, int) else None,
                                                                   event.received_at_ms))

    # -- the merchant ------------------------------------------------------------------------

    async def _merchant_step(self, tx: Tx, merchant: str, state: ConversationState, event: Any,
                             now: int, after: _AfterCommit) -> ConversationState:
        pending: list[Any] = [event]
        while pending:
            state, outs = step(state, pending.pop(0), now, self.chat)
            for effect in outs:
                if isinstance(effect, copy.Reply):
                    await self._reply(tx, merchant, effect, now, after)
                elif isinstance(effect, FindCustomers):
                    found = await customers.find_by_name(tx, effect.query, limit=copy.MAX_PICK_CANDIDATES + 1)
                    pending.append(CustomersFound(effect.query, tuple(found)))
                elif isinstance(effect, CreateInvoice):
                    invoice = await effects.create_invoice(
                        tx, self.settings, now, msisdn=effect.msisdn, customer_name=effect.customer_name,
                        amount_cents=kes_to_cents(effect.amount_kes), description=effect.description,
                        source="chat")
                    after.created.append(invoice.id)
                    after.queued += 1
                elif isinstance(effect, InvoiceAction):
                    await self._invoice_action(tx, merchant, effect, now, after)
                elif isinstance(effect, ListUnpaid):
                    # The first rows are listed (one message shows fewer anyway); the count and
                    # the total are those of every open invoice.
                    open_ones = await invoices.open_invoices(tx, None, limit=100)
                    count, total_cents = await invoices.open_totals(tx)
                    await self._reply(tx, merchant, copy.unpaid_list(open_ones, count=count, total_cents=total_cents),
                                      now, after)
        return state

    async def _invoice_action(self, tx: Tx, merchant: str, action: InvoiceAction, now: int,
                              after: _AfterCommit) -> None:
        invoice = await invoices.get(tx, action.invoice_id)
        if invoice is None:
            await self._reply(tx, merchant, copy.invoice_not_found(action.invoice_id), now, after)
            return
        if action.kind == "status":
            attempts = await payments.count_attempts(tx, invoice.id)
            await self._reply(tx, merchant, copy.status_summary(invoice, attempts), now, after)
        elif action.kind == "remind":
            await self._remind(tx, merchant, invoice, now, after)
        else:
            await self._cancel(tx, merchant, invoice, now, after)

    async def _remind(self, tx: Tx, merchant: str, invoice: Invoice, now: int, after: _AfterCommit) -> None:
        interval = self.settings.chat.remind_interval_s * 1000
        verdict = invoicing.can_remind(invoice, now, interval)
        if verdict.verdict is invoicing.Verdict.PAID:
            reply = copy.remind_paid(invoice)
        elif verdict.verdict is invoicing.Verdict.CANCELLED:
            reply = copy.remind_cancelled(invoice)
        elif verdict.verdict is invoicing.Verdict.TOO_SOON or not await invoices.claim_reminder(
                tx, invoice.id, now, interval):
            allowed = verdict.allowed_at_ms or now + interval
            reply = copy.remind_too_soon(invoice, allowed)
        else:
            # Again by the channel that reached the customer the first time.
            channel = invoice.channel or Channel.WHATSAPP
            await outbox.enqueue(
                tx, recipient=invoice.msisdn, channel=channel, kind="reminder", invoice_id=invoice.id,
                content={"type": "invoice", "invoice_id": invoice.id, "purpose": "reminder"}, now_ms=now)
            after.queued += 1
            reply = copy.reminded(invoice)
        await self._reply(tx, merchant, reply, now, after)

    async def _cancel(self, tx: Tx, merchant: str, invoice: Invoice, now: int, after: _AfterCommit) -> None:
        verdict = invoicing.can_cancel(invoice)
        if verdict is invoicing.Verdict.OK and await invoices.cancel(tx, invoice.id, now):
            await outbox.cancel_pending_for_invoice(tx, invoice.id, ("invoice", "reminder"), now)
            await effects.tell_customer(tx, invoice, now, copy.customer_cancelled_notice(invoice),
                                        kind="notice", dedupe_key=f"cancelled:{invoice.id}")
            log.info("invoice_cancelled", invoice_id=invoice.id)
            await self._reply(tx, merchant, copy.invoice_cancelled(invoice), now, after)
            return
        # Not cancellable (or it changed under us): say what it is now.
        current = await invoices.get(tx, invoice.id) or invoice
        if current.status is InvoiceStatus.PAID:
            reply = copy.cancel_paid(current)
        else:
            reply = copy.cancel_already_cancelled(current)
        await self._reply(tx, merchant, reply, now, after)

    # -- customers ---------------------------------------------------------------------------

    async def _customer_step(self, tx: Tx, msisdn: str, state: CustomerState, text: str, event_id: str,
                             channel: Channel, now: int, after: _AfterCommit) -> CustomerState:
        """A customer's message, answered on the channel it came by."""
        hint_ms = self.settings.chat.customer_hint_interval_s * 1000
        sms = channel is Channel.SMS
        pending: list[Any] = [Message(text)]
        while pending:
            state, outs = customer_step(state, pending.pop(0), now, hint_ms)
            for effect in outs:
                if isinstance(effect, copy.Reply):
                    await self._reply(tx, msisdn, effect, now, after, kind="customer_reply", channel=channel)
                elif isinstance(effect, ListOpenInvoices):
                    open_ones = await invoices.open_invoices(tx, msisdn)
                    pending.append(OpenInvoices(tuple(open_ones), sms=sms))
                elif isinstance(effect, DetailsRequested):
                    invoice = await invoices.get(tx, effect.invoice_id)
                    if invoice is None or invoice.msisdn != msisdn:
                        await self._tap_hint(tx, msisdn, channel, now, after)
                    else:
                        await self._reply(tx, msisdn, copy.invoice_details(invoice), now, after,
                                          kind="customer_reply", channel=channel,
                                          dedupe_key=f"details:{invoice.id}:{now // DETAILS_WINDOW_MS}")
                elif isinstance(effect, PayRequested):
                    await self._pay_request(tx, msisdn, effect.invoice_id, event_id, channel, now, after)
        return state

    async def _hint(self, tx: Tx, msisdn: str, sms: bool) -> copy.Reply:
        open_ones = await invoices.open_invoices(tx, msisdn)
        return copy.sms_customer_hint(open_ones) if sms else copy.customer_hint(open_ones)

    async def _tap_hint(self, tx: Tx, msisdn: str, channel: Channel, now: int, after: _AfterCommit) -> None:
        """The hint answering a tap (or ``pay <id>``) that names no invoice of the sender's.

        Bounded like the free-text hint: at most ``TAP_HINTS_PER_INTERVAL`` per sender per
        customer hint interval (outbox dedupe keys, one per slot of the interval), so that a
        flood of taps from a stranger makes a handful of replies, not one per tap."""
        window = max(self.settings.chat.customer_hint_interval_s * 1000, DETAILS_WINDOW_MS)
        reply = await self._hint(tx, msisdn, channel is Channel.SMS)
        for slot in range(TAP_HINTS_PER_INTERVAL):
            if await self._reply(tx, msisdn, reply, now, after, kind="customer_reply", channel=channel,
                                 dedupe_key=f"tap_hint:{msisdn}:{now // window}:{slot}"):
                return
        log.info("tap_hint_suppressed", msisdn=msisdn)

    async def _pay_request(self, tx: Tx, msisdn: str, invoice_id: str | None, event_id: str, channel: Channel,
                           now: int, after: _AfterCommit) -> None:
        """Hand a Pay request to the invoice's payment actor, through the inbox (durably)."""
        sms = channel is Channel.SMS
        if invoice_id is None:
            open_ones = await invoices.open_invoices(tx, msisdn)
            if len(open_ones) != 1:
                await self._tap_hint(tx, msisdn, channel, now, after)
                return
            invoice_id = open_ones[0].id
        invoice = await invoices.get(tx, invoice_id)
        # Only the invoice's own customer may start its payment: a prompt goes to their phone.
        if invoice is None or invoice.msisdn != msisdn:
            await self._tap_hint(tx, msisdn, channel, now, after)
            return
        await inbox.put(tx, source="internal", event_id=f"pay:{event_id}", actor="payment",
                        actor_key=invoice.id, kind="pay_request",
                        payload={"phone": msisdn, "via": "sms" if sms else "whatsapp", "message_id": event_id},
                        now_ms=now)
        after.payments.append(invoice.id)

    async def _reply(self, tx: Tx, to: str, reply: copy.Reply, now: int, after: _AfterCommit,
                     kind: str = "reply", channel: Channel = Channel.WHATSAPP,
                     dedupe_key: str | None = None) -> bool:
        """Queue ``reply``; False when ``dedupe_key`` was queued before (nothing is sent)."""
        if channel is Channel.SMS:
            queued = await outbox.enqueue(tx, recipient=to, channel=Channel.SMS, kind=kind, now_ms=now,
                                          content=delivery.reply_content(reply), dedupe_key=dedupe_key)
        else:
            queued = await effects.reply(tx, to, now, reply, kind=kind, dedupe_key=dedupe_key)
        if queued is None:
            return False
        after.queued += 1
        return True
