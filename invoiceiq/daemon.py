"""The wiring: the one module that knows every other.

``Daemon.run`` binds the listening socket, opens the store (its SQLite writer first, then the
migrations), builds the gateways and the actors, supervises them in one anyio task group
beside hypercorn, and stops in order on SIGTERM/SIGINT:

1. stop accepting requests and let in-flight ones finish (hypercorn's graceful shutdown);
2. tell the actors to stop taking new work and let them finish what they hold, within
   ``server.shutdown_grace_s`` (anything not begun stays in the database for the next start);
3. drain the SQLite writer, close the database, exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import httpx
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.utils import wrap_app

from .actors.outbox import DeliveryTracker, Outbox, OutboxActor
from .actors.payment import PaymentActor, due_payments
from .actors.runtime import Pressure, Registry, Supervisor, Waker
from .actors.scheduler import Scheduler
from .actors.session import SessionActor
from .clock import Clock, SystemClock
from . import gc_policy
from .config import Settings
from .eventloop import running_loop_name
from .gateways.mpesa import DarajaClient
from .gateways.sms import AfricasTalkingClient
from .gateways.whatsapp import WhatsAppClient
from .observability import Metrics, get_logger
from .store import Store, Tx, invoices, meta
from .systemd import Notifier, watchdog_interval_s
from .web import paylink as paylink_routes
from .web import payments as payment_routes
from .web import sms as sms_routes
from .web import whatsapp as whatsapp_routes
from .web.app import create_app
from .web.context import Services

log = get_logger(__name__)


class BindError(Exception):
    """The listening address is taken or not ours: told in one line, like a config error."""


@dataclass
class Dispatcher:
    """Routes hints to actors: keyed registries by name, and wakers of singleton actors."""

    registries: dict[str, Registry[Any]] = field(default_factory=dict)
    wakers: dict[str, Waker] = field(default_factory=dict)

    def kick(self, actor: str, key: str, *, urgent: bool = False) -> None:
        """Wake actor ``key`` for work stored in the database (coalesced, never blocks);
        ``urgent``: its next turn goes ahead of the others during a burst (a Pay request)."""
        registry = self.registries.get(actor)
        if registry is None:
            log.warning("no_such_actor", actor=actor)
            return
        registry.kick(key, urgent=urgent)

    def wake(self, actor: str) -> None:
        waker = self.wakers.get(actor)
        if waker is not None:
            waker.wake()


def sandbox_settings(settings: Settings, port: int) -> tuple[Settings, Any]:
    """Point every gateway at the simulators mounted under /sandbox on our own port, with the
    simulators' credentials; the production gateways then talk to them over real HTTP."""
    from .sandbox import SimConfig

    host = settings.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    public = settings.server.public_url or base
    sim = SimConfig(
        whatsapp_webhook_url=f"{base}/whatsapp/webhook",
        sms_inbound_url=f"{base}/sms/inbound", sms_status_url=f"{base}/sms/status",
        merchant_msisdn=settings.merchant.msisdn or SimConfig().merchant_msisdn,
        default_customer_msisdn=settings.sandbox.customer_msisdn,
        merchant_name=f"{settings.merchant.name} (merchant)",
        latency_ms=settings.sandbox.latency_ms,
        status_delay_ms=settings.sandbox.status_delay_ms,
        callback_delay_ms=settings.sandbox.callback_delay_ms,
        prompt_timeout_s=float(settings.sandbox.prompt_timeout_s),
        stk_lock_s=float(settings.sandbox.stk_lock_s),
        wa_template_name=settings.whatsapp.invoice_template,
        wa_template_language=settings.whatsapp.template_language,
        wa_template_buttons=("quick_reply:Pay with M-PESA",),
    )
    sandboxed = replace(
        settings,
        server=replace(settings.server, public_url=public),
        merchant=replace(settings.merchant, msisdn=sim.merchant_msisdn),
        whatsapp=replace(settings.whatsapp, api_base=f"{base}/sandbox/graph/v25.0", token=sim.wa_token,
                         phone_id=sim.wa_phone_id, app_secret=sim.wa_app_secret,
                         verify_token=settings.whatsapp.verify_token or "sandbox-verify-token"),
        sms=replace(settings.sms, api_base=f"{base}/sandbox/at", username=sim.at_username,
                    api_key=sim.at_api_key, callback_token=""),
        mpesa=replace(settings.mpesa, api_base=f"{base}/sandbox/daraja", consumer_key=sim.daraja_consumer_key,
                      consumer_secret=sim.daraja_consumer_secret, shortcode=sim.daraja_shortcode,
                      passkey=sim.daraja_passkey, transaction_type="CustomerPayBillOnline", till_number="",
                      callback_url=""),
    )
    return sandboxed, sim


def mount(app: Any, prefix: str, mounted: Any) -> Any:
    """One ASGI app answering ``prefix...`` with ``mounted`` and everything else with ``app``
    (lifespan events go to ``app`` only: the simulators need none)."""

    async def dispatch(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and (path == prefix or path.startswith(prefix + "/")):
            scope = dict(scope, root_path=scope.get("root_path", "") + prefix, path=path[len(prefix):] or "/")
            await mounted(scope, receive, send)
            return
        await app(scope, receive, send)

    return dispatch


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        http: httpx.AsyncClient | None = None,
        notifier: Notifier | None = None,
        idle_s: float = 30.0,
        tune_gc: bool = False,
    ) -> None:
        self.settings = settings
        # The process-wide collector policy (gc_policy): the CLI's daemon owns its process;
        # a daemon inside a test process leaves that process's collector alone.
        self._tune_gc = tune_gc
        self.clock = clock or SystemClock()
        self.metrics = Metrics()
        self.store = Store(settings.database.url)
        self.metrics.watch_writer(self.store.db.writer_stats)
        self.notifier = notifier or Notifier.from_env()
        self._http = http
        self._idle_s = idle_s
        self.dispatch = Dispatcher()
        self.pressure = Pressure()
        self.stopping = anyio.Event()
        self.ready = anyio.Event()
        self.bound_port: int | None = None
        self.supervisor: Supervisor | None = None
        self.outbox: OutboxActor | None = None
        self.scheduler: Scheduler | None = None
        self.callback_secret: str | None = None
        self.sim_config: Any = None
        self.simulator: Any = None
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._shutdown = anyio.Event()

    # -- readiness ---------------------------------------------------------------------------

    async def readiness(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        db_problem = await self.store.check()
        if db_problem:
            problems["database"] = db_problem
        else:
            try:
                if not await self.store.migrations_current():
                    problems["migrations"] = "migrations not applied"
            except Exception as exc:  # noqa: BLE001
                problems["migrations"] = type(exc).__name__
        if self.supervisor is None:
            problems["actors"] = "not started"
        elif failing := self.supervisor.failing():
            problems["actors"] = "not running: " + ", ".join(sorted(failing))
        if self.outbox is not None and (channel := self.outbox.readiness_problem()):
            problems["channels"] = channel
        return problems

    # -- lifecycle ---------------------------------------------------------------------------

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def run(self) -> None:
        sockets, hypercorn_config = self._bind()
        if self.settings.mode == "sandbox":
            assert self.bound_port is not None
            self.settings, self.sim_config = sandbox_settings(self.settings, self.bound_port)
        settings = self.settings
        log.info("starting", mode=settings.mode, database=self.store.dialect,
                 bind=settings.server.bind, port=self.bound_port, version=_version(),
                 event_loop=running_loop_name(),
                 note="SANDBOX: simulated providers, no real money moves" if settings.mode == "sandbox" else None)
        await self.store.open()
        try:
            async with anyio.create_task_group() as root:
                root.start_soon(self.store.run_writer, name="sqlite-writer")
                applied = await self.store.migrate()
                if applied:
                    log.info("migrations_applied", versions=applied)
                created, sent, paid = await self.store.scan(invoices.totals)
                self.metrics.set_totals(created, sent, paid)
                owns_http = self._http is None
                http = self._http or _make_http(self.settings.outbox.max_in_flight,
                                                self.settings.mpesa.max_in_flight)
                try:
                    await self._run_services(http, sockets, hypercorn_config)
                finally:
                    if owns_http:
                        with anyio.CancelScope(shield=True):
                            await http.aclose()
                root.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.close()
            log.info("stopped")

    async def _callback_secret(self) -> str:
        """The secret path segment of the M-PESA callback URL: configured, taken from a
        configured callback URL, or generated once and kept in the database (so that every
        process, and every restart, answers at the same URL)."""
        m = self.settings.mpesa
        if m.callback_secret:
            return m.callback_secret
        if m.callback_url:
            return m.callback_url.rstrip("/").rsplit("/", 1)[-1]

        async def job(tx: Tx) -> str:
            # Hex: its alphabet cannot spell a word Safaricom refuses in a callback URL (exe, cmd, sql...).
            return await meta.get_or_set(tx, "mpesa_callback_secret", secrets.token_hex(20))

        return await self.store.write(job)

    def _build(self, tg_supervisor: Supervisor, http: httpx.AsyncClient, callback_secret: str) -> list[Any]:
        """Gateways, actors and routes; returns the extra blueprints."""
        s = self.settings
        whatsapp = (WhatsAppClient(http, s.whatsapp.api_base, s.whatsapp.phone_id, s.whatsapp.token)
                    if s.whatsapp.token and s.whatsapp.phone_id else None)
        sms = (AfricasTalkingClient(http, s.sms.api_base, s.sms.username, s.sms.api_key, s.sms.sender_id or None)
               if s.sms.api_key and s.sms.username else None)
        if whatsapp is None:
            log.warning("channel_not_configured", channel="whatsapp",
                        hint="set whatsapp.token and whatsapp.phone_id (WABA_TOKEN, WABA_PHONE_ID)")
        if sms is None:
            log.warning("channel_not_configured", channel="sms",
                        hint="set sms.username and sms.api_key (SMS_USERNAME, SMS_API_KEY)")

        core = Outbox(store=self.store, settings=s, clock=self.clock, metrics=self.metrics)
        self.outbox = outbox = OutboxActor(core=core, whatsapp=whatsapp, sms=sms, stopping=self.stopping,
                                           worker_id=self.worker_id, pressure=self.pressure)
        self.dispatch.wakers["outbox"] = outbox.waker
        tracker = DeliveryTracker(core, outbox.waker.wake, pressure=self.pressure,
                                  kick_again=lambda: self.dispatch.kick("delivery", "statuses"))
        session = SessionActor(store=self.store, settings=s, clock=self.clock, metrics=self.metrics,
                               dispatch=self.dispatch, pressure=self.pressure)
        for name, handler in (("session", session.handle), ("delivery", tracker.handle)):
            registry: Registry[Any] = Registry(name, handler, idle_s=self._idle_s, metrics=self.metrics,
                                               pressure=self.pressure)
            self.dispatch.registries[name] = registry
            tg_supervisor.start(f"registry:{name}", registry.run)
        m = s.mpesa
        daraja = (DarajaClient(http, m.api_base, m.consumer_key, m.consumer_secret, m.shortcode, m.passkey,
                               now=self.clock.now_ms, shared=meta.SharedToken(self.store, "daraja_token", self.clock.now_ms))
                  if m.consumer_key and m.consumer_secret and m.shortcode and m.passkey else None)
        if daraja is None:
            log.warning("channel_not_configured", channel="mpesa",
                        hint="set mpesa.consumer_key, consumer_secret, shortcode and passkey")
        callback_url = m.callback_url or f"{s.server.public_base_url}/payments/stk/callback/{callback_secret}"
        payment = PaymentActor(store=self.store, settings=s, clock=self.clock, metrics=self.metrics, daraja=daraja,
                               wake_outbox=outbox.waker.wake, callback_url=callback_url)
        # Urgent: during a webhook flood the payment's turns (a Pay request from the pay page,
        # the API or the chat, a push's answer, a callback) go before the chat's (a customer is
        # holding the phone for the PIN prompt or the receipt). A WhatsApp tap is the chat's
        # turn first: the session actor hands it over.
        registry = Registry("payment", payment.handle, idle_s=self._idle_s, metrics=self.metrics,
                            pressure=self.pressure, urgent=True, workers=m.max_in_flight)
        self.dispatch.registries["payment"] = registry
        tg_supervisor.start("registry:payment", registry.run)
        self.scheduler = scheduler = Scheduler(store=self.store, clock=self.clock, kick=self.dispatch.kick,
                                               stopping=self.stopping,
                                               due_payments=lambda now: due_payments(self.store, now),
                                               metrics=self.metrics)
        self.dispatch.wakers["scheduler"] = scheduler.waker
        tg_supervisor.start("outbox", outbox.run)
        tg_supervisor.start("scheduler", scheduler.run)
        return [whatsapp_routes.bp, payment_routes.bp, sms_routes.bp, paylink_routes.bp]

    async def _run_services(self, http: httpx.AsyncClient, sockets: Sockets, config: HypercornConfig) -> None:
        settings = self.settings
        async with anyio.create_task_group() as actors_tg:
            self.supervisor = supervisor = Supervisor(actors_tg, self.metrics)
            self.callback_secret = secret = await self._callback_secret()
            blueprints = self._build(supervisor, http, secret)
            services = Services(
                settings=settings, store=self.store, metrics=self.metrics, clock=self.clock,
                dispatch=self.dispatch, readiness=self.readiness,
                extras={"blueprints": blueprints, "callback_secret": secret})
            app: Any = create_app(services)
            if self.sim_config is not None:
                from .sandbox import Simulator

                self.simulator = Simulator(self.sim_config)
                supervisor.start("sandbox", self.simulator.run)
                app = mount(app, "/sandbox", self.simulator.asgi_app)
                console = f"{settings.server.public_base_url}/sandbox/"
                log.info("sandbox_console", url=console,
                         merchant=self.sim_config.merchant_msisdn, customer=self.sim_config.default_customer_msisdn)
                # One plain line for the person who just typed `make run` (the log is JSON).
                print(f"InvoiceIQ sandbox (simulated providers, no real money): open {console}",
                      file=sys.stderr, flush=True)
            app = self.pressure.wrap(app)
            served = anyio.Event()
            if self._tune_gc:
                frozen = gc_policy.freeze_startup()
                log.info("gc_tuned", frozen_objects=frozen, thresholds=list(gc.get_threshold()))

            async def serve() -> None:
                try:
                    await worker_serve(wrap_app(app, config.wsgi_max_body_size, None), config,
                                       sockets=sockets, shutdown_trigger=self._shutdown.wait)
                except asyncio.InvalidStateError:
                    # hypercorn 0.18, cancelled during its graceful wait, asks a cancelled gather
                    # for its exception; only our shutdown deadline cancels it: nothing is wrong.
                    if not self._shutdown.is_set():
                        raise
                finally:
                    served.set()

            actors_tg.start_soon(serve, name="http")
            actors_tg.start_soon(self._watch_signals, name="signals")
            actors_tg.start_soon(self._announce_ready, name="ready")

            await self._shutdown.wait()
            grace = settings.server.shutdown_grace_s
            # One budget for everything: systemd's TimeoutStopSec is a little above it.
            deadline = anyio.current_time() + grace
            log.info("shutting_down", grace_s=grace)
            self.notifier.stopping()
            # Take no new work (the outbox claims nothing more); finish what is in hand.
            # Anything not begun stays in the database for the next start.
            self.stopping.set()
            for waker in self.dispatch.wakers.values():
                waker.wake()
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                await served.wait()
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                if self.outbox is not None:
                    await self.outbox.drain()
            actors_tg.cancel_scope.cancel()

    def _bind(self) -> tuple[Sockets, HypercornConfig]:
        config = HypercornConfig()
        config.bind = [self.settings.server.bind]
        # Requests get most of the grace period; the outbox's last sends share the rest.
        config.graceful_timeout = max(0.5, self.settings.server.shutdown_grace_s * 0.8)
        config.accesslog = None  # URLs carry pay tokens and callback secrets
        config.errorlog = logging.getLogger("hypercorn.error")  # through our JSON formatter
        config.keep_alive_timeout = 75  # above typical load balancers' idle timeouts
        config.include_server_header = False
        try:
            sockets = config.create_sockets()
        except OSError as exc:
            raise BindError(
                f"cannot listen on {self.settings.server.bind}: {exc.strerror or exc}; "
                "set server.bind (or INVOICEIQ_SERVER_BIND, e.g. 127.0.0.1:8080)") from None
        for sock in sockets.insecure_sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self.bound_port = sock.getsockname()[1]
        return sockets, config

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal_received", signal=signal.Signals(signum).name)
                self.request_shutdown()
                return

    async def _announce_ready(self) -> None:
        """READY=1 once /readyz would answer 200; then WATCHDOG=1 while the loop is alive."""
        while not self._shutdown.is_set():
            if not await self.readiness():
                break
            await anyio.sleep(0.05)
        else:
            return
        log.info("ready", url=f"http://{self.settings.server.host}:{self.bound_port}", mode=self.settings.mode)
        self.ready.set()
        self.notifier.ready(status=f"serving on port {self.bound_port}")
        interval = watchdog_interval_s()
        if interval is None:
            return
        while not self._shutdown.is_set():
            # Liveness, not actor health. This task lives in the supervisor's task group, so a
            # ping means the event loop is turning and that group is alive; a wedged loop or a
            # dead group stops the pings and systemd restarts us, which is what a restart cures.
            # Crashing actors are deliberately NOT a reason to skip a ping: the Supervisor
            # restarts them with a backoff of up to 30 s (as long as WatchdogSec=), so a minute
            # of database outage would otherwise get a healthy daemon killed in a loop for
            # nothing. /readyz already answers 503 naming the failing actors; a restart would
            # not bring the database back.
            self.notifier.watchdog()
            await anyio.sleep(interval)


def _make_http(sends_in_flight: int, payments_in_flight: int) -> httpx.AsyncClient:
    from .gateways.http import make_client

    # A connection for every send in flight and every payment turn (each makes one call at a
    # time: an STK Push, a status query, an OAuth token), so that neither waits for the other.
    return make_client(max_connections=sends_in_flight + payments_in_flight)


def _version() -> str:
    from . import __version__

    return __version__
