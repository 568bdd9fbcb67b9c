"""The payment actor: one per invoice, serialising its STK attempts.

Everything that reaches it is in the inbox first (Pay requests from WhatsApp, SMS, the pay
page and the API; M-PESA callbacks), and every outcome is one transaction:

* a Pay request is decided by ``core.settlement.decide_pay``; a start inserts the INITIATED
  attempt (the partial unique index refuses a second one, whatever the process) and only
  then calls Daraja, outside any transaction; Daraja's answer is recorded in a second one;
* a callback, or the answer to a status query, is applied by ``core.settlement.settle``:
  PAID with receipts to both parties, or a failure told in plain words with a retry button,
  or — for money that cannot settle the invoice — an alert to the merchant;
* attempts without an answer are queried after ``mpesa.query_after_s``, then with backoff,
  and expire after ``mpesa.expire_after_s``. Each query is claimed first (a compare-and-set
  on its due time) so that exactly one process sends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..clock import Clock
from ..core import copy, delivery, settlement
from ..core.model import Channel, Direction, Invoice, InvoiceStatus, PaymentStatus, cents_to_kes
from ..gateways.http import AuthError, GatewayError, TransientError
from ..observability import Metrics, get_logger
from ..store import Conflict, Store, StoreError, Tx, inbox, invoices, messages, outbox, payments
from ..store.payments import Attempt
from . import effects

if TYPE_CHECKING:
    from ..config import Settings
    from ..gateways.mpesa import DarajaClient

log = get_logger(__name__)
ACTOR = "payment"
POISON_AFTER = 3  # crashes of one event before it is set aside (dead-lettered)


@dataclass
class _After:
    queued: int = 0
    paid: list[Invoice] = field(default_factory=list)
    stk_results: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.queued = 0
        self.paid.clear()
        self.stk_results.clear()


@dataclass(frozen=True)
class _Push:
    attempt: Attempt
    invoice: Invoice
    via: str


@dataclass(frozen=True)
class _Query:
    attempt: Attempt


ANSWER_WINDOW_MS = 10_000  # at most one answer of each kind per invoice per window


def answer_dedupe_key(invoice_id: str, verdict: settlement.PayVerdict, now_ms: int) -> str:
    """The outbox dedupe key bounding the answers to Pay requests that start no prompt."""
    return f"pay_answer:{invoice_id}:{verdict.value}:{now_ms // ANSWER_WINDOW_MS}"


class PaymentActor:
    def __init__(self, *, store: Store, settings: Settings, clock: Clock, metrics: Metrics,
                 daraja: DarajaClient | None, wake_outbox: Any, callback_url: str) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.daraja = daraja
        self.wake_outbox = wake_outbox
        self.callback_url = callback_url
        m = settings.mpesa
        self.limits = effects.push_limits(settings)
        self.query_after_ms = m.query_after_s * 1000
        self.expire_after_ms = m.expire_after_s * 1000

    async def handle(self, invoice_id: str, _message: Any) -> None:
        """Registry handler: work through this invoice's inbox, then its due checks."""
        while True:
            after = _After()
            try:
                work = await self.store.write(lambda tx: self._next_event(tx, invoice_id, after))
            except (StoreError, Conflict):
                raise  # the database, not the event: the registry retries with backoff
            except Exception:
                # One event per transaction: the oldest pending one is the culprit. Count it and,
                # after a few crashes, set it aside so later taps and callbacks still get through.
                dead = await self.store.write(lambda tx: inbox.record_failure(
                    tx, ACTOR, invoice_id, self.clock.now_ms(), give_up_after=POISON_AFTER))
                if dead is not None:
                    log.error("event_dead_lettered", alert=True, actor=ACTOR, invoice_id=invoice_id,
                              inbox_seq=dead.seq, kind=dead.kind)
                    continue
                raise
            self._observe(after)
            if work is None:
                break
            if isinstance(work, _Push):
                await self._push(work)
        for attempt in await self.store.read(lambda tx: payments.for_invoice(tx, invoice_id)):
            if attempt.resolved_at_ms is None and attempt.next_check_at_ms is not None \
                    and attempt.next_check_at_ms <= self.clock.now_ms():
                await self._check(attempt)

    def _observe(self, after: _After) -> None:
        if after.queued:
            self.wake_outbox()
        for result in after.stk_results:
            self.metrics.stk_requests.labels(result).inc()
        for invoice in after.paid:
            self.metrics.invoices_paid.inc()
            if invoice.sent_at_ms is not None and invoice.paid_at_ms is not None:
                self.metrics.time_to_pay.observe(max(0, invoice.paid_at_ms - invoice.sent_at_ms) / 1000)
        if after.paid:
            self.metrics.update_conversion()

    # -- inbox events ------------------------------------------------------------------------

    async def _next_event(self, tx: Tx, invoice_id: str, after: _After) -> _Push | bool | None:
        """Process one inbox event; a ``_Push`` when Daraja must be called, True to go on."""
        after.reset()
        events = await inbox.pending(tx, ACTOR, invoice_id, limit=1)
        if not events:
            return None
        event = events[0]
        now = self.clock.now_ms()
        if not await inbox.mark_processed(tx, event.seq, now):
            return True
        invoice = await invoices.get(tx, invoice_id)
        if invoice is None:
            log.warning("payment_event_for_unknown_invoice", invoice_id=invoice_id, kind=event.kind)
            return True
        if event.kind == "pay_request":
            return await self._pay_request(tx, invoice, event.payload, now, after)
        if event.kind == "callback":
            await self._callback(tx, invoice, event.payload, now, after)
        return True

    async def _pay_request(self, tx: Tx, invoice: Invoice, payload: dict[str, Any], now: int,
                           after: _After) -> _Push | bool:
        via = str(payload.get("via") or "api")
        phone = invoice.msisdn  # the prompt always goes to the invoice's own customer
        verdict = await effects.push_verdict(tx, invoice, self.limits, now)
        log.info("pay_requested", invoice_id=invoice.id, via=via, verdict=verdict.value)
        if via in ("whatsapp", "sms"):
            # The customer's request, in the invoice's own history beside the messages it
            # caused (the inbound row was logged at the door, before anyone knew the invoice),
            # with the id of the message that asked: "I tapped Pay five times and nothing
            # came" can be looked up, with each verdict.
            sms = via == "sms"
            await messages.log_message(
                tx, channel=Channel.SMS if sms else Channel.WHATSAPP, direction=Direction.IN,
                event="pay_requested", invoice_id=invoice.id,
                payload={"via": via, "verdict": verdict.value,
                         "sms_id" if sms else "wamid": payload.get("message_id")})
        if verdict is settlement.PayVerdict.START:
            if self.daraja is None:
                log.error("payment_not_configured", invoice_id=invoice.id,
                          hint="set mpesa.consumer_key, consumer_secret, shortcode, passkey")
                return True
            attempt = await payments.start(
                tx, invoice_id=invoice.id, phone=phone, amount_cents=invoice.amount_cents, now_ms=now,
                next_check_at_ms=settlement.next_query_ms(now, 0, first_after_ms=self.query_after_ms),
                expire_at_ms=now + self.expire_after_ms, source=via)
            if attempt is not None:
                log.info("payment_initiated", invoice_id=invoice.id, payment_id=attempt.payment_id, via=via)
                return _Push(attempt, invoice, via)
            verdict = settlement.PayVerdict.IN_FLIGHT  # another process won the race
        reply = settlement.pay_answer(verdict, invoice, phone)
        # Every answer to a Pay request that starts nothing is bounded: one of each kind per
        # invoice per 10 seconds, not one per tap (a thousand taps make a handful of replies).
        # The in-flight answer after a lost race shares its key with the ordinary one.
        after.queued += await self._answer(tx, invoice, reply, via, now,
                                           dedupe_key=answer_dedupe_key(invoice.id, verdict, now))
        return True

    async def _answer(self, tx: Tx, invoice: Invoice, reply: copy.Reply, via: str, now: int,
                      dedupe_key: str | None = None) -> int:
        """Answer a Pay request where it came from (the pay page and the API show state instead)."""
        if via not in ("whatsapp", "sms"):
            return 0
        channel = Channel.SMS if via == "sms" else Channel.WHATSAPP
        queued = await outbox.enqueue(tx, recipient=invoice.msisdn, channel=channel, kind="customer_reply",
                                      content=delivery.reply_content(reply), now_ms=now, invoice_id=invoice.id,
                                      dedupe_key=dedupe_key)
        return 1 if queued is not None else 0

    # -- the push ----------------------------------------------------------------------------

    async def _push(self, work: _Push) -> None:
        assert self.daraja is not None
        attempt, invoice = work.attempt, work.invoice
        try:
            accepted = await self.daraja.stk_push(
                phone=attempt.phone, amount_kes=cents_to_kes(attempt.amount_cents),
                account_reference=invoice.id, description=f"Invoice {invoice.id}",
                callback_url=self.callback_url, transaction_type=self.settings.mpesa.transaction_type,
                party_b=self.settings.mpesa.till_number or None)
        except (GatewayError, ValueError) as exc:
            await self._push_failed(work, exc)
            return
        after = _After()
        after.stk_results.append("accepted")

        async def job(tx: Tx) -> bool:
            await payments.serialize_checkout(tx, accepted.checkout_request_id)
            await payments.accepted(tx, attempt.payment_id, checkout_request_id=accepted.checkout_request_id,
                                    merchant_request_id=accepted.merchant_request_id,
                                    raw_request=dict(accepted.request_for_log))
            after.queued += await self._answer(tx, invoice, copy.prompt_sent(invoice, attempt.phone), work.via,
                                               self.clock.now_ms())
            # Its callback may have come first (Safaricom can be that quick): claim it now.
            return await inbox.claim_unmatched(tx, "mpesa", accepted.checkout_request_id, ACTOR, invoice.id)

        early_callback = await self.store.write(job)
        self._observe(after)
        log.info("payment_accepted", invoice_id=invoice.id, payment_id=attempt.payment_id,
                 callback_already_in=early_callback)

    async def _push_failed(self, work: _Push, exc: Exception) -> None:
        attempt, invoice = work.attempt, work.invoice
        code = getattr(exc, "code", "invalid")
        maybe_processed = isinstance(exc, TransientError) and exc.maybe_processed
        after = _After()
        sent = getattr(exc, "request_for_log", None)
        if maybe_processed:
            # The request may have reached Daraja (the answer was lost): the customer may have
            # a prompt. Keep the attempt in flight; a callback adopts it by phone, or it expires.
            after.stk_results.append("unknown")
            if sent is not None:
                try:  # only a record: the attempt is in flight whatever happens to it
                    await self.store.write(lambda tx: payments.record_request(tx, attempt.payment_id, sent))
                except StoreError:
                    log.warning("payment_request_not_recorded", invoice_id=invoice.id, payment_id=attempt.payment_id)
            log.warning("payment_push_unanswered", invoice_id=invoice.id, payment_id=attempt.payment_id, code=code)
            self._observe(after)
            return
        result = "auth_error" if isinstance(exc, AuthError) else "error"
        after.stk_results.append(result)
        locked = code == "subscriber_locked"
        reply = copy.wait_before_prompt(invoice) if locked else copy.stk_failed(invoice, "other")

        async def job(tx: Tx) -> None:
            now = self.clock.now_ms()
            if sent is not None:
                await payments.record_request(tx, attempt.payment_id, sent)
            if await payments.resolve(tx, attempt.payment_id, status=PaymentStatus.FAILED, result_code=None,
                                      result_desc=f"push refused: {code}", now_ms=now, only_if_initiated=True):
                after.queued += await self._answer(tx, invoice, reply, work.via, now)

        await self.store.write(job)
        self._observe(after)
        log.error("payment_push_failed", invoice_id=invoice.id, payment_id=attempt.payment_id, code=code,
                  alert=isinstance(exc, AuthError))

    # -- results -----------------------------------------------------------------------------

    async def _callback(self, tx: Tx, invoice: Invoice, payload: dict[str, Any], now: int, after: _After) -> None:
        checkout = str(payload.get("checkout_request_id") or "")
        attempt = await payments.for_callback(tx, checkout, payload.get("phone") if isinstance(
            payload.get("phone"), str) else None)
        if attempt is None:
            log.warning("callback_for_unknown_attempt", invoice_id=invoice.id)
            return
        code = payload.get("result_code")
        result = settlement.Result(
            result_code=code if isinstance(code, int) else None,
            result_desc=str(payload.get("result_desc") or ""),
            amount_kes=payload.get("amount_kes") if isinstance(payload.get("amount_kes"), int) else None,
            receipt=payload.get("mpesa_receipt") if isinstance(payload.get("mpesa_receipt"), str) else None,
            via="callback", payer=payload.get("phone") if isinstance(payload.get("phone"), str) else None)
        log.info("payment_callback", invoice_id=invoice.id, payment_id=attempt.payment_id, result_code=code)
        await self._apply(tx, invoice, attempt, result, now, after, raw=payload.get("raw"))

    async def _apply(self, tx: Tx, invoice: Invoice, attempt: Attempt, result: settlement.Result, now: int,
                     after: _After, raw: Any = None) -> None:
        outcome = settlement.settle(invoice, attempt.status, result, prompted_phone=attempt.phone)
        if result.result_code == 0 and result.amount_kes is None and result.via == "callback" \
                and outcome.invoice is settlement.InvoiceEffect.PAY:
            # A success without a readable amount cannot be trusted to settle the invoice.
            outcome = settlement.Settlement(PaymentStatus.SUCCESS, settlement.InvoiceEffect.AMOUNT_MISMATCH)
        receipt = result.receipt
        unreadable_amount = result.result_code == 0 and result.amount_kes is None and result.via == "callback"
        if outcome.attempt_status is PaymentStatus.SUCCESS and receipt is not None:
            if await payments.receipt_used_elsewhere(tx, receipt, attempt.payment_id):
                log.error("receipt_reused", invoice_id=invoice.id, payment_id=attempt.payment_id, alert=True)
                return
        if outcome.attempt_status is PaymentStatus.SUCCESS and attempt.status is PaymentStatus.SUCCESS:
            # Already settled (a query said success first): the callback brings the real receipt.
            if receipt is not None:
                await payments.set_receipt(tx, attempt.payment_id, attempt.invoice_id, receipt,
                                           placeholder=attempt.checkout_request_id)
            return
        changed = await payments.resolve(
            tx, attempt.payment_id, status=outcome.attempt_status, result_code=result.result_code,
            result_desc=result.result_desc, now_ms=now, receipt=receipt,
            raw_callback=raw if isinstance(raw, dict) else None,
            only_if_initiated=outcome.attempt_status is not PaymentStatus.SUCCESS)
        if not changed and outcome.attempt_status is not PaymentStatus.SUCCESS:
            return
        log.info("payment_resolved", invoice_id=invoice.id, payment_id=attempt.payment_id,
                 status=outcome.attempt_status.value, effect=outcome.invoice.value, via=result.via,
                 result_code=result.result_code)
        effect = outcome.invoice
        paid_kes = result.amount_kes if result.amount_kes is not None else invoice.amount_kes
        if effect is settlement.InvoiceEffect.PAY:
            ref = receipt or (attempt.checkout_request_id or attempt.payment_id)
            if await invoices.mark_paid(tx, invoice.id, ref, now):
                paid = await invoices.get(tx, invoice.id)
                assert paid is not None
                after.paid.append(paid)
                after.queued += await self._receipts(tx, paid, ref, now)
        elif effect is settlement.InvoiceEffect.TELL_FAILURE:
            code = result.result_code if result.result_code is not None else "other"
            pay_url = invoice.pay_url(self.settings.server.public_base_url)
            queued = await effects.tell_customer(tx, invoice, now, copy.stk_failed(invoice, code), kind="payment_failed",
                                                 sms=copy.sms_stk_failed(invoice, code, pay_url))
            after.queued += 1 if queued else 0
        elif effect is settlement.InvoiceEffect.AMOUNT_MISMATCH:
            alert = (copy.amount_unreadable(invoice, receipt or "?") if unreadable_amount
                     else copy.amount_mismatch(invoice, paid_kes, receipt or "?"))
            after.queued += await self._alert(tx, invoice, alert, now)
        elif effect is settlement.InvoiceEffect.PAID_AFTER_CANCEL:
            after.queued += await self._alert(tx, invoice, copy.paid_after_cancel(invoice, paid_kes, receipt or "?"), now)
        elif effect is settlement.InvoiceEffect.PAYER_MISMATCH:
            after.queued += await self._alert(
                tx, invoice, copy.payer_mismatch(invoice, paid_kes, receipt or "?", result.payer or "?"), now)
        elif effect is settlement.InvoiceEffect.DOUBLE_PAYMENT:
            after.queued += await self._alert(tx, invoice, copy.double_payment(invoice, paid_kes, receipt or "?"), now)

    async def _receipts(self, tx: Tx, invoice: Invoice, receipt: str, now: int) -> int:
        pay_url = invoice.pay_url(self.settings.server.public_base_url)
        message = copy.receipt(invoice, receipt)
        queued = 0
        if await effects.tell_customer(tx, invoice, now, message, kind="receipt",
                                       dedupe_key=f"receipt:{invoice.id}:customer",
                                       sms=copy.sms_receipt(invoice, receipt, pay_url)):
            queued += 1
        if await effects.tell_merchant(tx, self.settings, now, message, invoice_id=invoice.id,
                                       dedupe_key=f"receipt:{invoice.id}:merchant", kind="receipt"):
            queued += 1
        return queued

    async def _alert(self, tx: Tx, invoice: Invoice, message: copy.Reply, now: int) -> int:
        log.warning("payment_needs_merchant", invoice_id=invoice.id, alert=True)
        queued = await effects.tell_merchant(tx, self.settings, now, message, invoice_id=invoice.id)
        return 1 if queued else 0

    # -- reconciliation ----------------------------------------------------------------------

    async def _check(self, attempt: Attempt) -> None:
        """A due attempt: query Daraja (claimed first), or expire it."""
        now = self.clock.now_ms()
        assert attempt.next_check_at_ms is not None
        expired = settlement.is_expired(attempt.requested_at_ms, now, self.expire_after_ms)
        upcoming = settlement.next_query_ms(attempt.requested_at_ms, attempt.queries + 1,
                                            first_after_ms=self.query_after_ms)
        if not expired:
            upcoming = min(upcoming, attempt.expire_at_ms)
        claimed = await self.store.write(lambda tx: payments.claim_check(
            tx, attempt.payment_id, attempt.next_check_at_ms or 0, max(upcoming, now + 1000)))
        if not claimed:
            return  # another process (or a callback) got there first
        answer = None
        if attempt.checkout_request_id is not None and self.daraja is not None:
            try:
                answer = await self.daraja.stk_query(attempt.checkout_request_id)
                log.info("payment_query", invoice_id=attempt.invoice_id, payment_id=attempt.payment_id,
                         pending=answer.pending, result_code=answer.result_code)
            except GatewayError as exc:
                log.warning("payment_query_failed", invoice_id=attempt.invoice_id, code=exc.code)
        after = _After()

        async def job(tx: Tx) -> None:
            after.reset()
            invoice = await invoices.get(tx, attempt.invoice_id)
            current = await payments.by_checkout_id(tx, attempt.checkout_request_id) \
                if attempt.checkout_request_id else attempt
            if invoice is None or current is None:
                return
            now2 = self.clock.now_ms()
            if answer is not None and not answer.pending:
                result = settlement.Result(answer.result_code, answer.result_desc, via="query")
                await self._apply(tx, invoice, current, result, now2, after)
            elif settlement.is_expired(current.requested_at_ms, now2, self.expire_after_ms):
                if await payments.resolve(tx, current.payment_id, status=PaymentStatus.EXPIRED, result_code=None,
                                          result_desc="no answer from M-PESA", now_ms=now2, only_if_initiated=True):
                    log.info("payment_expired", invoice_id=invoice.id, payment_id=current.payment_id)
                    if invoice.is_open:
                        # Not a silent end: the customer learns the prompt lapsed and can try again.
                        pay_url = invoice.pay_url(self.settings.server.public_base_url)
                        if await effects.tell_customer(
                                tx, invoice, now2, copy.stk_failed(invoice, "1019"), kind="payment_failed",
                                sms=copy.sms_stk_failed(invoice, "1019", pay_url)):
                            after.queued += 1

        await self.store.write(job)
        self._observe(after)

    async def reconcile_now(self, attempt: Attempt) -> str:
        """Check ``attempt`` at once, whatever its schedule (``invoiceiq reconcile``), through
        ``_check`` (claimed, queried, applied exactly as when it falls due), and say in one
        line how it stands afterwards. The line starts with SUCCESS, FAILED, EXPIRED or PENDING,
        or with ERROR when Daraja could not be asked."""

        def find(rows: list[Attempt]) -> Attempt | None:
            return next((a for a in rows if a.payment_id == attempt.payment_id), None)

        async def load() -> tuple[Attempt | None, Invoice | None]:
            async def job(tx: Tx) -> tuple[Attempt | None, Invoice | None]:
                rows = await payments.for_invoice(tx, attempt.invoice_id)
                return find(rows), await invoices.get(tx, attempt.invoice_id)
            return await self.store.read(job)

        before, _ = await load()
        if before is None:
            return "ERROR: no such payment attempt"
        if before.resolved_at_ms is not None:
            return f"{before.status.value}: already resolved ({_result(before)})"
        if self.daraja is None:
            return "ERROR: M-PESA is not configured, so the status cannot be asked"
        if before.next_check_at_ms is None:
            before = replace(before, next_check_at_ms=0)  # never scheduled: claim it as if due
        # A twin of this actor whose Daraja client remembers the answer; this one is untouched.
        asked = _RecordingDaraja(self.daraja)
        twin = PaymentActor(store=self.store, settings=self.settings, clock=self.clock, metrics=self.metrics,
                            daraja=asked, wake_outbox=self.wake_outbox, callback_url=self.callback_url)  # type: ignore[arg-type]
        await twin._check(before)
        current, invoice = await load()
        if current is None or invoice is None:
            return "ERROR: the attempt or its invoice disappeared"
        if current.resolved_at_ms is not None:
            line = f"{current.status.value}: {_result(current)}; invoice #{invoice.id} is {invoice.status.value}"
            if current.status is PaymentStatus.SUCCESS and invoice.status is not InvoiceStatus.PAID:
                line += " (money received for an invoice that was not open: the merchant was alerted)"
            return line
        checkout = current.checkout_request_id
        if checkout is None:
            return ("PENDING: the push was never acknowledged (no CheckoutRequestID), so it cannot be queried;"
                    f" a callback may still come, else it expires at {copy.format_time_eat(current.expire_at_ms)} EAT")
        outcome = asked.outcomes.get(checkout)
        if isinstance(outcome, GatewayError):
            return f"ERROR: the status query failed ({outcome.code}: {outcome.reason}); try again later"
        if outcome is None:
            return "PENDING: another process is checking it right now"
        return ("PENDING: M-PESA says the customer has not answered yet; it expires at"
                f" {copy.format_time_eat(current.expire_at_ms)} EAT")


def _result(attempt: Attempt) -> str:
    code = "no result code" if attempt.result_code is None else f"ResultCode {attempt.result_code}"
    return f"{code}, {attempt.result_desc or 'no description'}"


class _RecordingDaraja:
    """Passes every call to the real client and remembers each STK query's answer (or error),
    by CheckoutRequestID, so that ``reconcile_now`` can tell "still pending" from "not asked"."""

    def __init__(self, inner: DarajaClient) -> None:
        self.inner = inner
        self.outcomes: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def stk_query(self, checkout_request_id: str) -> Any:
        try:
            answer = await self.inner.stk_query(checkout_request_id)
        except GatewayError as exc:
            self.outcomes[checkout_request_id] = exc
            raise
        self.outcomes[checkout_request_id] = answer
        return answer


async def due_payments(store: Store, now_ms: int) -> tuple[list[str], int | None]:
    """For the scheduler: invoices with attempts due now, and the next due time."""
    async def job(tx: Tx) -> tuple[list[str], int | None]:
        return await payments.due_checks(tx, now_ms), await payments.next_check_ms(tx)
    return await store.read(job)

