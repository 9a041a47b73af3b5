"""E-mail notifications to a real SMTP server: aiosmtpd on a free loopback port, reached through Apprise's
`mailto://USER:PASSWORD@HOST:PORT?to=...&from=...` (plain SMTP on loopback; a site uses `mailtos://` with STARTTLS),
with a real outbox and the NotifyWorker in between (the gateway's own path from an alarm record to a target).

- Every notified transition of a routed alarm (raised, escalated, acknowledged, cleared) arrives as exactly one
  e-mail, logged in with the URL's account; readings, silences and unrouted alarms send none; the text keeps its lines.
- An outage of the mail server (connections refused, then 451 "try again later" to every message, then back) loses
  nothing: every transition arrives at least once, with the same Ref line when repeated.

Apprise sends at most one e-mail every 5.5 s to one target (its services' `request_rate_per_sec`, a throttle inside
the send): six e-mails would take half a minute. The sink here sets it to 0.1 s (NotifySink's `min_interval_s`), so
the throttle still runs between two sends, only shorter; a site keeps Apprise's, which the last test checks.
Waits are bounded and fail naming what is missing; nothing asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from pydantic import SecretStr

from devices.base import Reading
from devtools.localservices import find_free_port
from gateway.alarms import AlarmEvent
from gateway.config import NotifySection
from gateway.envelope import AlarmMessage, Origin, ReadingMessage, alarm_record, reading_record
from gateway.notify.worker import NotifyWorker
from gateway.outbox import Outbox
from gateway.sinks.notify import NotifySink
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

USER, PASSWORD = "infusion-gateway", "s3cr3t-smtp-pass-0042"
TO = "charge-nurse@clinic.invalid"
MIN_INTERVAL_S = 0.1  # between two e-mails to one target; Apprise's own is 5.5 s
ORIGIN: Origin = {
    "site": "clinic-a",
    "room": "7",
    "device": "oximeter",
    "model": "masimo-ascii1",
    "kind": "pulse_oximeter",
}


@dataclass(frozen=True)
class Mail:
    authenticated: bool
    mail_from: str
    rcpt_tos: tuple[str, ...]
    subject: str
    text: str  # the text/plain part

    @property
    def ref(self) -> str:
        line = next((x for x in self.text.splitlines() if x.startswith("Ref: ")), "Ref: ?")
        return line.removeprefix("Ref: ").split(" ")[0]


class MailServer:
    """A real SMTP server (aiosmtpd) in the test's event loop. `reply` is what it answers to a message's DATA:
    "250 OK" takes it; a 4xx refuses it for now. stop() closes the port: connections are refused until start()."""

    def __init__(self) -> None:
        self.port = find_free_port()
        self.reply = "250 OK"
        self.mails: list[Mail] = []
        self.refused = 0  # messages answered with something other than 250
        self._server: asyncio.Server | None = None

    def url(self) -> str:
        # Apprise's e-mail URL: the account in the user part, the server in host:port, plain SMTP (mailto, not
        # mailtos) because this is loopback without TLS; from= because the account is not an address.
        return f"mailto://{USER}:{PASSWORD}@127.0.0.1:{self.port}?to={TO}&from=gateway@clinic.invalid"

    @staticmethod
    def _authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.login == USER.encode() and data.password == PASSWORD.encode()
        return AuthResult(success=ok, auth_data=data if ok else None)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not self.reply.startswith("250"):
            self.refused += 1
            return self.reply
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        plain = message.get_body(preferencelist=("plain",))
        self.mails.append(
            Mail(
                bool(session.authenticated),
                str(envelope.mail_from),
                tuple(envelope.rcpt_tos),
                str(message["Subject"]),
                plain.get_content() if plain is not None else "",
            )
        )
        return "250 OK"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            # AUTH without TLS: loopback only, a test server (aiosmtpd refuses it by default, as it should).
            lambda: SMTP(self, hostname="mail.test", authenticator=self._authenticate, auth_require_tls=False),
            "127.0.0.1",
            self.port,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def _reading(seq: int) -> ReadingMessage:
    return reading_record(ORIGIN, seq, time.time(), Reading({"spo2": 97.0}))


def _alarm(seq: int, rule: str, transition: str, priority: str, since: float, role: str | None = None) -> AlarmMessage:
    kind = "technical" if rule == "probe-off" else "physiological"
    event = AlarmEvent(
        f"7/oximeter/{rule}", "7", "oximeter", rule, kind, priority, transition,  # type: ignore[arg-type]
        transition != "cleared", time.time(), "spo2", 85.0, 90.0, rule, role=role, since=since,
    )  # fmt: skip
    return alarm_record(ORIGIN, seq, event, "test", False)


def _config() -> NotifySection:
    return NotifySection.model_validate(
        {
            "retry_max_s": 1,
            "targets": {"mail": {"url": {"env": "NOTIFY_MAIL_URL"}, "max_messages": 100}},
            "routes": [{"priorities": ["medium", "high"], "targets": ["mail"]}],
        }
    )


def sink(urls: dict[str, SecretStr], timeout_s: float) -> NotifySink:
    return NotifySink(urls, timeout_s, min_interval_s=MIN_INTERVAL_S)


@contextlib.asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[tuple[Outbox, NotifyWorker]]:
    box = Outbox(tmp_path / "outbox.sqlite3", sinks=("notify",))
    await box.open()
    worker = NotifyWorker(box, _config(), silence_s=120, sink_factory=sink)
    tasks = [asyncio.create_task(box.run_committer()), asyncio.create_task(worker.run())]
    try:
        yield box, worker
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await box.close()


def put_story(box: Outbox) -> dict[str, str]:
    """A day's alarms in one room; returns {ref expected at the mail target: the transition it tells}."""
    t0 = time.time()
    story: list[dict[str, Any] | None] = [
        None,  # a reading
        {"rule": "spo2-low", "transition": "raised", "priority": "medium"},
        None,
        {"rule": "spo2-low", "transition": "escalated", "priority": "high"},
        {"rule": "spo2-low", "transition": "silenced", "priority": "high", "role": "nurse"},  # nobody
        {"rule": "spo2-low", "transition": "acknowledged", "priority": "high", "role": "nurse"},
        {"rule": "pr-high", "transition": "raised", "priority": "low"},  # no route for low: nobody
        {"rule": "probe-off", "transition": "raised", "priority": "medium"},
        None,
        {"rule": "spo2-low", "transition": "cleared", "priority": "high"},
        {"rule": "pr-high", "transition": "cleared", "priority": "low"},  # nobody was told of it
        {"rule": "probe-off", "transition": "cleared", "priority": "medium"},
    ]
    expected: dict[str, str] = {}
    for step in story:
        seq = box.next_seq("7/oximeter")
        if step is None:
            box.put("7/oximeter", seq, _reading(seq))
            continue
        record = _alarm(seq, step["rule"], step["transition"], step["priority"], t0, step.get("role"))
        box.put("7/oximeter", seq, record)
        notified = step["transition"] in {"raised", "escalated", "acknowledged", "cleared"}
        if notified and step["rule"] != "pr-high":
            expected[f"7/oximeter/{seq}>mail"] = f"{step['rule']} {step['transition']}"
    return expected


async def test_every_notified_alarm_transition_arrives_as_one_email_at_a_real_smtp_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = MailServer()
    monkeypatch.setenv("NOTIFY_MAIL_URL", server.url())
    await server.start()
    try:
        async with running(tmp_path) as (box, worker):
            expected = put_story(box)
            assert len(expected) == 6  # spo2-low: raised, escalated, acknowledged, cleared; probe-off: raised, cleared
            await wait_for(lambda: len(server.mails) >= len(expected), 30)
            await asyncio.sleep(0.5)  # anything more would arrive now: nothing must
            assert worker.rejected == 0
    finally:
        await server.stop()
    refs = [m.ref for m in server.mails]
    assert sorted(refs) == sorted(expected), (refs, expected)  # one e-mail per transition, no more, no less
    by_ref = {m.ref: m for m in server.mails}
    for ref, what in expected.items():
        mail = by_ref[ref]
        rule, transition = what.split(" ")
        assert mail.authenticated, "the URL's account logged in"
        assert mail.mail_from == "gateway@clinic.invalid" and mail.rcpt_tos == (TO,)
        assert f"room 7 oximeter: {rule}" in mail.subject, (what, mail.subject)
        assert "room 7 oximeter" in mail.text and "Priority:" in mail.text, mail.text
        assert len(mail.text.splitlines()) >= 5, f"the message's lines were joined: {mail.text!r}"
        if transition == "raised":
            assert mail.subject.endswith("- ALARM"), mail.subject
            assert "infusion-telemetry ack --room 7 --alarm 7/oximeter/" in mail.text, mail.text
        else:
            assert transition in mail.subject.lower() or "escalat" in mail.text.lower(), (what, mail.subject)
    assert PASSWORD not in "".join(m.text + m.subject for m in server.mails)


async def test_a_mail_server_outage_refused_then_451_then_back_loses_no_transition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = MailServer()  # not listening yet: connections are refused
    monkeypatch.setenv("NOTIFY_MAIL_URL", server.url())
    try:
        async with running(tmp_path) as (box, worker):
            expected = put_story(box)
            await box.flush()
            await wait_for(lambda: any(p.target == "mail" for p in worker.notifier.queue), 10)
            await wait_for(lambda: worker.notifier.targets["mail"].failures >= 1, 20)  # refused at the TCP level
            server.reply = "451 4.3.0 mail system busy, try again later"
            await server.start()
            await wait_for(lambda: server.refused >= 2, 20)  # and at least two answered 451
            assert server.mails == []
            server.reply = "250 OK"
            await wait_for(lambda: set(expected) <= {m.ref for m in server.mails}, 30)
            await wait_for(lambda: not any(p.target == "mail" for p in worker.notifier.queue), 10)
            assert worker.rejected == 0
    finally:
        await server.stop()
    refs = [m.ref for m in server.mails]
    assert set(refs) == set(expected), (refs, expected)  # at least once, and nothing about anything else
    assert all(m.authenticated for m in server.mails)


async def test_a_site_keeps_apprises_throttle_and_the_tests_shorter_one_is_the_only_change() -> None:
    """The e-mail tests above send with a 0.1 s throttle; without `min_interval_s` every service keeps its own."""
    urls = {"mail": SecretStr(MailServer().url())}
    for interval, expected in ((None, 5.5), (MIN_INTERVAL_S, MIN_INTERVAL_S)):
        async with NotifySink(urls, 20.0, min_interval_s=interval) as notify:
            services = list(notify._targets["mail"])  # the Apprise object's services: one per URL
        assert len(services) == 1 and type(services[0]).__name__ == "NotifyEmail", services
        assert services[0].request_rate_per_sec == expected, (interval, services[0].request_rate_per_sec)
