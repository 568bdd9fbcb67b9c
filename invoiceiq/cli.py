"""``invoiceiq serve | migrate | check-config | reconcile | prune``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import anyio

from .config import ConfigError, Settings, load_settings, render_effective_config, resolve_config_path
from .observability import configure_logging, get_logger

if TYPE_CHECKING:
    from .store import Store

log = get_logger("invoiceiq")
T = TypeVar("T")

# Rows changed per transaction by `prune`: short transactions, so that a running daemon's
# writes wait milliseconds (SQLite has one writer) rather than the whole prune.
PRUNE_BATCH = 5000


def _settings(args: argparse.Namespace) -> Settings:
    path = resolve_config_path(args.config, os.environ)
    return load_settings(path, os.environ)


def _serve(settings: Settings) -> int:
    from . import gc_policy
    from .daemon import BindError, Daemon
    from .eventloop import LoopUnavailable, backend_options
    from .store import StoreError

    try:
        options = backend_options(settings.server.event_loop)
    except LoopUnavailable as exc:
        print(f"invoiceiq: {exc}", file=sys.stderr)
        return 2
    gc_policy.tune()
    try:
        anyio.run(Daemon(settings, tune_gc=True).run, backend_options=options)
    except BindError as exc:
        print(f"invoiceiq: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"invoiceiq: {exc}; check database.url (or DATABASE_URL)", file=sys.stderr)
        return 1
    return 0


def _migrate(settings: Settings) -> int:
    from .store import Store

    async def main() -> list[int]:
        store = Store(settings.database.url)
        await store.open()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.run_writer)
                applied = await store.migrate()
                tg.cancel_scope.cancel()
            return applied
        finally:
            await store.close()

    applied = anyio.run(main)
    print(f"applied migrations: {applied}" if applied else "database schema is up to date")
    return 0


# -- operations on the database beside a running daemon ---------------------------------------


class _Refused(Exception):
    """A reason not to go on, for the operator (stderr, exit status 1)."""


def _with_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    """Open the daemon's database (its schema must be current), run ``work``, close it.

    Safe while the daemon runs: SQLite takes one writer at a time (the other waits on its busy
    timeout) and every change here is as small a transaction as the daemon's own."""
    from .store import Store, StoreError

    path = settings.sqlite_path
    if path is not None and not path.exists():
        # Opening would create an empty database there: a wrong path or working directory.
        raise _Refused(f"no database at {path.resolve()} (database.url = {settings.database.url})")

    async def main() -> T:
        store = Store(settings.database.url)
        try:
            await store.open()
        except StoreError as exc:
            raise _Refused(str(exc)) from None
        outcome: list[T] = []
        failure: list[Exception] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.run_writer)
                try:
                    if not await store.migrations_current():
                        raise _Refused("the database schema is not current: run `invoiceiq migrate` first")
                    outcome.append(await work(store))
                except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group
                    failure.append(exc)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
        if failure:
            # Not wrapped in the task group's ExceptionGroup: the caller reports it plainly.
            if isinstance(failure[0], StoreError):
                raise _Refused(f"database: {failure[0]}") from failure[0]
            raise failure[0]
        return outcome[0]

    return anyio.run(main)


def _prune(settings: Settings, days: int) -> int:
    """Personal data kept no longer than ``days`` (brief section 13): message bodies in
    message_log (rows and events stay), payloads of inbox events already applied (rows stay:
    their ids still deduplicate provider retries), the text of sends that left the outbox
    (rows stay), and idempotency keys with their stored responses (which repeat the invoice's
    phone, name and description)."""
    from .store import Tx, idempotency, inbox, messages, outbox

    cutoff = datetime.now(UTC) - timedelta(days=days)
    before = cutoff.replace(tzinfo=None)  # message_log.created_at is naive UTC
    before_ms = int(cutoff.timestamp() * 1000)

    async def drain(store: Store, batch: Callable[[Tx], Awaitable[int]]) -> int:
        total = 0
        while done := await store.write(batch):
            total += done
        return total

    async def work(store: Store) -> tuple[int, int, int, int]:
        print(f"pruning personal data older than {days} day{'s' if days != 1 else ''}"
              f" (before {cutoff:%Y-%m-%d %H:%M:%S} UTC)")
        logged = await drain(store, lambda tx: messages.prune_payloads_batch(tx, before, PRUNE_BATCH))
        events = await drain(store, lambda tx: inbox.prune_payloads(tx, before_ms, PRUNE_BATCH))
        sends = await drain(store, lambda tx: outbox.prune_content(tx, before_ms, PRUNE_BATCH))
        keys = await drain(store, lambda tx: idempotency.prune_batch(tx, before_ms, PRUNE_BATCH))
        return logged, events, sends, keys

    logged, events, sends, keys = _with_store(settings, work)
    print(f"message_log: cleared {logged} message payload{'s' if logged != 1 else ''} (rows and events kept)")
    print(f"inbox: cleared {events} payload{'s' if events != 1 else ''} of processed events"
          " (rows kept to deduplicate provider retries)")
    print(f"outbox: cleared the text of {sends} finished send{'s' if sends != 1 else ''} (rows kept)")
    print(f"idempotency_keys: deleted {keys} key{'s' if keys != 1 else ''}")
    return 0


def _reconcile(settings: Settings, invoice_ref: str | None) -> int:
    """Ask Daraja now about every unresolved STK attempt (or one invoice's), through the
    payment actor's own check, and print what became of each."""
    from .actors.payment import PaymentActor
    from .clock import SystemClock
    from .core.model import format_kes
    from .core.validate import normalize_invoice_ref
    from .gateways.http import make_client
    from .gateways.mpesa import DarajaClient
    from .observability import Metrics, mask_phone
    from .store import meta, payments

    invoice_id: str | None = None
    if invoice_ref is not None:
        invoice_id = normalize_invoice_ref(invoice_ref)
        if invoice_id is None:
            print(f"--invoice: not an invoice number: {invoice_ref!r} (e.g. 1042)", file=sys.stderr)
            return 2
    if settings.mode == "sandbox":
        # The simulated Daraja lives inside the running sandbox daemon, under /sandbox on its port.
        from .daemon import sandbox_settings

        if settings.server.port == 0:
            print("sandbox mode: set server.bind to the running daemon's port to reconcile against"
                  " its simulated M-PESA", file=sys.stderr)
            return 2
        settings, _ = sandbox_settings(settings, settings.server.port)
    m = settings.mpesa
    if not (m.consumer_key and m.consumer_secret and m.shortcode and m.passkey):
        print("M-PESA is not configured: set mpesa.consumer_key, consumer_secret, shortcode and passkey"
              " (MPESA_CONSUMER_KEY, MPESA_CONSUMER_SECRET, MPESA_SHORTCODE, MPESA_PASSKEY)", file=sys.stderr)
        return 2

    async def work(store: Store) -> tuple[int, dict[str, int]]:
        attempts = await store.scan(payments.unresolved)
        if invoice_id is not None:
            attempts = [a for a in attempts if a.invoice_id == invoice_id]
        if not attempts:
            print("no unresolved STK attempts" + (f" for invoice #{invoice_id}" if invoice_id else ""))
            return 0, {}
        clock = SystemClock()
        # The callback URL as the daemon builds it (read-only here; reconcile never pushes).
        secret = m.callback_secret or await store.read(lambda tx: meta.get(tx, "mpesa_callback_secret")) or ""
        callback_url = m.callback_url or f"{settings.server.public_base_url}/payments/stk/callback/{secret}"
        counts: dict[str, int] = {}
        async with make_client() as http:
            # The daemon's token, shared through the database: minting our own would revoke it.
            daraja = DarajaClient(http, m.api_base, m.consumer_key, m.consumer_secret, m.shortcode, m.passkey,
                                  now=clock.now_ms, shared=meta.SharedToken(store, "daraja_token", clock.now_ms))
            actor = PaymentActor(store=store, settings=settings, clock=clock, metrics=Metrics(), daraja=daraja,
                                 wake_outbox=lambda: None, callback_url=callback_url)
            print(f"checking {len(attempts)} unresolved STK attempt{'s' if len(attempts) != 1 else ''}")
            for attempt in attempts:
                outcome = await actor.reconcile_now(attempt)
                word = outcome.split(":", 1)[0]
                counts[word] = counts.get(word, 0) + 1
                print(f"invoice #{attempt.invoice_id} payment {attempt.payment_id}"
                      f" ({mask_phone(attempt.phone)}, KES {format_kes(attempt.amount_cents // 100)}): {outcome}")
        return len(attempts), counts

    checked, counts = _with_store(settings, work)
    if checked:
        summary = ", ".join(f"{n} {word}" for word, n in sorted(counts.items()))
        print(f"done: {summary}")
        if any(word in counts for word in ("SUCCESS", "FAILED")):
            print("receipts, failure notices and merchant alerts are queued in the outbox;"
                  " the running daemon sends them within a few seconds")
    return 1 if counts.get("ERROR") else 0


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError("must be at least 1 day")
    return days


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="invoiceiq", description=__doc__)
    parser.add_argument("--config", help="TOML file (default ./config.toml if present)")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, text in (("serve", "run the daemon"), ("migrate", "apply database migrations and exit"),
                       ("check-config", "print the effective configuration, secrets masked"),
                       ("reconcile", "ask M-PESA now about every unresolved STK attempt and print each outcome"),
                       ("prune", "remove personal data older than --older-than DAYS (message bodies, "
                                 "processed event payloads, texts of finished sends, idempotency keys)")):
        command = commands[name] = sub.add_parser(name, help=text, description=text)
        command.add_argument("--config", dest="config_sub", metavar="CONFIG", help="TOML file")
    commands["reconcile"].add_argument("--invoice", help="only this invoice's attempts (e.g. 1042)")
    commands["prune"].add_argument("--older-than", dest="older_than", type=_days, required=True, metavar="DAYS",
                                   help="keep the last DAYS days (at least 1)")
    args = parser.parse_args(argv)
    args.config = getattr(args, "config_sub", None) or args.config

    try:
        settings = _settings(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.command in ("reconcile", "prune"):
        # stdout carries the report; the JSON log lines go to stderr.
        configure_logging(settings.log.level, stream=sys.stderr)
    else:
        configure_logging(settings.log.level)

    if args.command == "check-config":
        print(render_effective_config(settings))
        return 0
    if args.command == "migrate":
        return _migrate(settings)
    if args.command in ("reconcile", "prune"):
        try:
            if args.command == "prune":
                return _prune(settings, args.older_than)
            return _reconcile(settings, args.invoice)
        except _Refused as exc:
            print(f"invoiceiq {args.command}: {exc}", file=sys.stderr)
            return 1
    return _serve(settings)


if __name__ == "__main__":
    sys.exit(main())
