"""The notify sink's worker: the outbox's `notify` cursor into the Notifier (gateway/notify/policy.py), and sends what
it decides through the Apprise adapter (gateway/sinks/notify.py), one sending task per target.

Why not a SinkWorker like mqtt and influx: a notification is not a record. One alarm record becomes messages for
several targets, escalation steps come from time rather than from records, and a storm is folded into one summary.
So the cursor is drained into the Notifier's durable state (never failing: it is memory), and each target is sent
to on its own, with its own backoff, so a dead pager gateway does not hold back the station's chat.

Order of durability: the Notifier's state is put before the cursor is acknowledged, and the outbox writes cursors
with (or after) the state queued before them, so after SIGKILL the state is never behind the cursor: a record is
never skipped; one taken in twice is recognised by its sequence number. A message is removed from the state only
after its target took it: a crash in between sends it again, with the same ref (at least once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict

from pydantic import SecretStr

from gateway.config import NotifySection, register_secret, resolve_secret
from gateway.notify.policy import Notifier, Pending
from gateway.outbox import Item, Outbox, retryable
from gateway.sinks import Outcome
from gateway.sinks.notify import NotifySink

log = logging.getLogger(__name__)
SINK = "notify"
READ_BATCH = 500
TICK_S = 0.25  # escalation steps are checked this often
IDLE_CHECK_S = 5.0  # a target task looks at its queue at least this often (expiry)


def register_url(url: str) -> None:
    """Redact a target URL wherever it would be logged: whole, and its token-like parts (userinfo, long path
    segments and query values), which a library may log on their own."""
    register_secret(url)
    parts = urllib.parse.urlsplit(url)
    pieces = [parts.username, parts.password, *parts.path.split("/")]
    pieces += [v for _, v in urllib.parse.parse_qsl(parts.query)]
    for piece in pieces:
        if piece and len(piece) >= 8:
            register_secret(piece)


class NotifyWorker:
    def __init__(
        self,
        outbox: Outbox,
        cfg: NotifySection,
        silence_s: float,
        sink_factory: Callable[[dict[str, SecretStr], float], NotifySink] = NotifySink,
    ) -> None:
        """Resolves every target's URL now (a ConfigError names the field): at construction, before any port."""
        self.outbox = outbox
        self.cfg = cfg
        self.urls: dict[str, SecretStr] = {}
        for name, target in cfg.targets.items():
            url = resolve_secret(target.url, f"notify.targets.{name}.url")
            assert url is not None
            register_url(url.get_secret_value())
            self.urls[name] = url
        self.notifier = Notifier(cfg, silence_s)
        self._factory = sink_factory
        self._wake: dict[str, asyncio.Event] = {}
        self.delivered = 0  # messages a target took (a summary counts each message it carries)
        self.rejected = 0

    def _save(self) -> None:
        self.outbox.put_state(SINK, self.notifier.snapshot())

    def _wake_all(self) -> None:
        for event in self._wake.values():
            event.set()

    async def restore(self) -> None:
        snapshot = await self.outbox.load_state(SINK)
        if snapshot is None:
            return
        try:
            for problem in self.notifier.restore(snapshot, time.time()):
                log.warning("notify state: %s", problem)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("notify state of the last run is unreadable (%s): starting without it", exc)
            return
        log.info("notify state restored: %d message(s) waiting", len(self.notifier.queue))

    async def run(self) -> None:
        """Until cancelled. The outbox must be open."""
        await self.restore()
        self._wake = {name: asyncio.Event() for name in self.cfg.targets}
        async with self._factory(self.urls, self.cfg.send_timeout_s) as sink, asyncio.TaskGroup() as tasks:
            tasks.create_task(self._intake(), name="notify-intake")
            tasks.create_task(self._ticker(), name="notify-escalation")
            for name in self.cfg.targets:
                tasks.create_task(self._sender(sink, name), name=f"notify-{name}")

    async def _intake(self) -> None:
        while True:
            items = await self.outbox.read(self.outbox.cursor(SINK), limit=READ_BATCH)
            if not items:
                await self.outbox.wait_new(SINK, max_wait_s=5.0)
                continue
            now = time.time()
            changed = False
            for item in items:
                if item.record is None:  # the mqtt and influx sinks put it on the rejected pile; nothing to tell
                    log.warning("notify: record %d skipped: %s", item.id, item.error)
                    continue
                try:
                    changed |= self.notifier.on_record(item.id, item.record, now)
                except (KeyError, TypeError, ValueError) as exc:  # a record of a shape it cannot read: never fatal
                    log.error("notify: record %d not understood (%r): no notification from it", item.id, exc)
            if changed:
                self._save()  # before the cursor moves past the records that changed it
                self._wake_all()
            await self.outbox.ack(SINK, items[-1].id)

    async def _ticker(self) -> None:
        while True:
            if self.notifier.tick(time.time()):
                self._save()
                self._wake_all()
            await asyncio.sleep(TICK_S)

    async def _sender(self, sink: NotifySink, target: str) -> None:
        wake = self._wake[target]
        while True:
            now = time.time()
            plan = self.notifier.due(target, now)
            if plan.expired:
                await self._reject(plan.expired, plan.reason)
            for out in plan.send:
                text = self.notifier.render(out, time.time())
                if text is None:
                    continue  # acknowledged or ended while the one before it was being sent
                result = await sink.send(target, text.title, text.body, text.severity)
                now = time.time()
                if result.outcome is Outcome.ACCEPTED:
                    self.notifier.sent(out, now)
                    self.delivered += len(out.covers)
                elif result.outcome is Outcome.REJECTED:
                    await self._reject(self.notifier.refused(out), result.reason)
                else:
                    wait = self.notifier.failed(target, result.reason, now)
                    log.warning(
                        "notify %s: %s; %d message(s) wait, retrying in %.1f s",
                        target,
                        result.reason,
                        sum(1 for p in self.notifier.queue if p.target == target),
                        wait,
                    )
                    self._save()
                    break
                self._save()
            if plan.send or plan.expired:
                continue  # the rest may be due at once (or held: then the next pass waits)
            wake_at = self.notifier.wake_at(target, now)
            delay = IDLE_CHECK_S if wake_at is None else min(max(wake_at - now, 0.01), IDLE_CHECK_S)
            try:
                async with asyncio.timeout(delay):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()

    async def _reject(self, pending: list[Pending], reason: str) -> None:
        """A message refused for good, or undelivered for give_up_after_s: the rejected pile, with the reason."""
        if not pending:
            return
        log.error("notify: %d message(s) to the rejected pile: %s", len(pending), reason)
        items = [Item(p.source, None, _as_body(p)) for p in pending]
        try:
            await self.outbox.reject(SINK, items, reason[:500], advance=False)
        except Exception as exc:
            if not retryable(exc):
                raise
            log.error("notify: the rejected pile cannot be written (%s): %d message(s) lost", exc, len(pending))
        self.rejected += len(pending)
        self._save()


def _as_body(p: Pending) -> bytes:
    """What the rejected pile keeps of a message that was never delivered (it is not a record)."""
    body = {"type": "notification", "ref": p.ref, "target": p.target, "step": p.step, "alarm": asdict(p.alarm)}
    return json.dumps(body, separators=(",", ":")).encode()
