"""Apprise: the only module that imports it. It sends one message to one target and says how that went; what to
send, when, and to whom is decided elsewhere (gateway/notify/policy.py).

One Apprise object per target, loaded from its URL (a secret: it carries the service's token) when the sink is
entered. Apprise reports whether a service took a message, not why it did not: a refused connection, a 500 and a
401 look alike. So every failure is retried (the caller backs off), and only a URL that Apprise cannot use at all is
refused for good (the rejected pile, with the reason). Apprise's own debug lines (and urllib3's, below it) name
URLs: they are kept at WARNING whatever the gateway's log level, and every resolved URL is redacted from what is
logged (gateway.config.register_secret).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Self

import apprise
from pydantic import SecretStr

from gateway.sinks import ACCEPTED, Outcome, WriteResult

log = logging.getLogger(__name__)
_TYPES = {
    "info": apprise.NotifyType.INFO,
    "success": apprise.NotifyType.SUCCESS,
    "warning": apprise.NotifyType.WARNING,
    "failure": apprise.NotifyType.FAILURE,
}


class NotifySink:
    name = "notify"

    def __init__(
        self, urls: Mapping[str, SecretStr], timeout_s: float = 20.0, min_interval_s: float | None = None
    ) -> None:
        """`min_interval_s` replaces Apprise's own throttle (the least time between two sends to one target, 5.5 s
        for most services, inside the send); None keeps each service's, as a site should. Tests set it low so that
        a story of six e-mails takes seconds, not half a minute."""
        self._urls = dict(urls)
        self.timeout_s = timeout_s
        self.min_interval_s = min_interval_s
        self._targets: dict[str, Any] = {}
        self.unusable: dict[str, str] = {}  # target -> why Apprise cannot use it

    async def __aenter__(self) -> Self:
        for noisy in ("apprise", "urllib3"):
            logger = logging.getLogger(noisy)
            if logger.getEffectiveLevel() < logging.WARNING:
                logger.setLevel(logging.WARNING)
        asset = apprise.AppriseAsset(storage_mode="memory")  # no cache files written anywhere
        for name, url in self._urls.items():
            target = apprise.Apprise(asset=asset)
            if target.add(url.get_secret_value()):
                if self.min_interval_s is not None:
                    for service in target:  # the throttle is each service object's request_rate_per_sec
                        service.request_rate_per_sec = self.min_interval_s
                self._targets[name] = target
            else:
                self.unusable[name] = (
                    f"Apprise cannot use target {name}'s URL (an unknown service or a malformed URL): fix the secret "
                    "it comes from"
                )
                log.error("notify: %s", self.unusable[name])
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._targets.clear()

    async def send(self, target: str, title: str, body: str, severity: str) -> WriteResult:
        """ACCEPTED, RETRY (the service did not take it, or did not answer in time) or REJECTED (never usable)."""
        if target in self.unusable:
            return WriteResult(Outcome.REJECTED, self.unusable[target])
        service = self._targets[target]
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await service.async_notify(
                    body=body,
                    title=title,
                    notify_type=_TYPES.get(severity, apprise.NotifyType.INFO),
                    body_format=apprise.NotifyFormat.TEXT,
                )
        except TimeoutError:
            return WriteResult(Outcome.RETRY, f"no answer from {target} within {self.timeout_s:g} s")
        except Exception as exc:  # Apprise catches its services' errors; anything else is retried, never raised
            return WriteResult(Outcome.RETRY, f"sending to {target} failed: {type(exc).__name__}")
        if bool(result):
            return ACCEPTED
        return WriteResult(Outcome.RETRY, "the service did not take it (Apprise's warning before this says why)")
