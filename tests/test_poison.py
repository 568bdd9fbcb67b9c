"""One event whose processing always crashes must not block the events behind it."""

from __future__ import annotations

import json

import pytest

from harness import MERCHANT, make_settings, running_daemon
from invoiceiq.actors import session as session_module
from invoiceiq.core import conversation
from invoiceiq.store import Tx

pytestmark = pytest.mark.anyio


async def test_a_poisoned_message_is_set_aside_and_the_chat_goes_on(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = conversation.step

    def crashing_step(state, event, now_ms, settings):  # type: ignore[no-untyped-def]
        if isinstance(event, conversation.Message) and event.text == "boom":
            raise RuntimeError("a bug that this message triggers")
        return real_step(state, event, now_ms, settings)

    monkeypatch.setattr(session_module, "step", crashing_step)
    async with running_daemon(make_settings(database_url)) as h:
        await h.say(MERCHANT, "boom")
        await h.say(MERCHANT, "unpaid")
        texts = await h.wait_for_texts(MERCHANT, 1, timeout=10)
        assert texts == ["No unpaid invoices. Send 'invoice' to create one."]

        async def dead(tx: Tx) -> list[tuple[str, int, int]]:
            rows = await tx.all("SELECT payload, failures, dead FROM inbox WHERE actor = 'session' ORDER BY seq")
            return [(str(r["payload"]), int(r["failures"]), int(r["dead"])) for r in rows]

        rows = await h.store.read(dead)
        assert '"boom"' in rows[0][0] and rows[0][1:] == (session_module.POISON_AFTER, 1)
        assert rows[1][1:] == (0, 0)
        # Both messages have their message_log row, once: the applied one from its turn, the
        # dead-lettered one from being set aside (no crashed attempt left one behind).
        logged = await h.store.read(lambda tx: tx.all(
            "SELECT payload FROM message_log WHERE direction = 'IN' AND event = 'inbound' ORDER BY created_at, id"))
        texts = sorted(json.loads(r["payload"])["text"] if isinstance(r["payload"], str) else r["payload"]["text"]
                       for r in logged)
        assert texts == ["boom", "unpaid"]
        # Every crash was counted as an actor restart.
        assert h.daemon.metrics.actor_restarts.labels("session")._value.get() >= session_module.POISON_AFTER
