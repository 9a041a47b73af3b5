"""The gateway's clock against the database's: the wall compares the two, so skew is a technical alarm.

Every record is stamped with the gateway's UTC time; the wall decides "live" or "NO DATA" by comparing those stamps
with the database server's clock. A gateway ahead keeps a silent device's last value on screen as live; one behind
makes every tile NO DATA. So the gateway measures its clock against the HTTP `Date` header of InfluxDB's `/ping`
(1.x and 2.x both answer it) and the alarm engine raises `clock_skew` above a limit (docs/deploy.md).

`Date` has one-second resolution, so one answer only bounds the skew to a 1 s window (plus the round trip). Further
requests are timed so that the server's second boundary, as far as it is known, falls on the request's midpoint:
each answer then says on which side of the boundary the server was, halving the window. A few samples inside a
bounded time give tens of milliseconds on a LAN, and the uncertainty reported is the window actually proven.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import math
import time
import urllib.parse
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from gateway.config import InfluxSection, resolve_secret
from gateway.sinks.influx import ConnectError, HttpClient

log = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 2.5  # the whole measurement, every request included: the brief bounds it below 3 s
DEFAULT_MAX_SAMPLES = 6
DEFAULT_GOOD_ENOUGH_S = 0.05  # stop sampling at this uncertainty: the alarm limit is seconds
_MARGIN_S = 0.005  # scheduling slack: a target closer than this to "now" waits for the next second


@dataclass(frozen=True)
class ClockReading:
    """skew_s = gateway clock minus server clock (positive: the gateway is ahead), within ± uncertainty_s."""

    skew_s: float
    uncertainty_s: float
    server: str  # scheme://host:port of the server, never credentials

    def describe(self) -> str:
        side = "ahead of" if self.skew_s >= 0 else "behind"
        return f"gateway clock {abs(self.skew_s):.2f} s ± {self.uncertainty_s:.2f} s {side} {self.server}"


def exceeds(reading: ClockReading, limit_s: float) -> bool:
    """True only if the skew is over the limit even at the favourable end of its uncertainty: Date's 1 s resolution
    alone never raises the alarm."""
    return abs(reading.skew_s) - reading.uncertainty_s > limit_s


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL: userinfo (which may hold a password) and paths are dropped."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _date_seconds(value: str | None) -> int | None:
    """The POSIX second of an HTTP Date (IMF-fixdate, or the obsolete forms RFC 9110 still accepts); None if absent
    or invalid."""
    if not value:
        return None
    try:
        stamp = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if stamp.tzinfo is None:  # "-0000": RFC 5322's unknown zone; HTTP dates are always GMT
        return None
    return math.floor(stamp.timestamp())


def _describe(exc: BaseException, timeout_s: float) -> str:
    """Why a request failed, in words that carry no payload, URL or credential."""
    if isinstance(exc, TimeoutError):  # the request's and the socket's timeouts alike
        return f"no answer within {timeout_s:.1f} s"
    if isinstance(exc, ConnectError):
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    return type(exc).__name__


class _NoDate(Exception):
    """The server answered without a usable Date header."""


class ClockCheck:
    """Measures the gateway's clock against the InfluxDB server's `Date`. One measure() call every minute or so.

    The server is assumed to stamp Date with its clock truncated to the second (Go's net/http, which InfluxDB uses,
    and aiohttp's do) at some moment between our request and its answer. A server that rounds instead would bias the
    result by up to 0.5 s: negligible against a limit of seconds.
    """

    def __init__(
        self,
        cfg: InfluxSection,
        *,
        budget_s: float = DEFAULT_BUDGET_S,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        good_enough_s: float = DEFAULT_GOOD_ENOUGH_S,
    ) -> None:
        if not 0 < budget_s < 3 or max_samples < 1:
            raise ValueError("budget_s must be in (0, 3) s and max_samples at least 1")
        self.server = _origin(cfg.url)
        self._base_url = cfg.url.rstrip("/")  # GET <base>/ping
        self._timeout_s = cfg.timeout_s
        self._budget_s = budget_s
        self._max_samples = max_samples
        self._good_enough_s = good_enough_s
        self._ca_file = cfg.ca_file
        # The same credentials as the sink, resolved now so that a missing secret is found at start-up. /ping needs
        # none on InfluxDB itself; a proxy in front of it may. They are sent, never logged.
        self._headers: dict[str, str] = {}
        self._basic: tuple[str, str] | None = None
        if cfg.api == "v2":
            token = resolve_secret(cfg.token, "influx.token")
            if token is not None:
                self._headers["Authorization"] = f"Token {token.get_secret_value()}"
        elif cfg.username:
            password = resolve_secret(cfg.password, "influx.password")
            self._basic = (cfg.username, password.get_secret_value() if password else "")
        self._unknown_logged = False

    async def measure(self) -> ClockReading | None:
        """The skew and its proven uncertainty, or None if the server cannot be reached or gives no valid Date.

        Takes at most budget_s (default 2.5 s), whatever the server does."""
        deadline = time.monotonic() + self._budget_s
        # One kept-alive connection for all the samples, so each one's round trip is a request's alone.
        client: HttpClient | None = None
        try:
            try:
                client = HttpClient(
                    self._base_url,
                    timeout_s=self._timeout_s,
                    headers=self._headers,
                    basic=self._basic,
                    ca_file=self._ca_file,
                )
                lo, hi, rtt = await self._sample(client, deadline)
            except (_NoDate, http.client.HTTPException, OSError, TimeoutError, ValueError) as exc:
                # Once per outage, not every minute: the sink already reports an unreachable database.
                level = logging.DEBUG if self._unknown_logged else logging.WARNING
                why = (
                    "answered /ping without a valid Date header"
                    if isinstance(exc, _NoDate)
                    else _describe(exc, min(self._timeout_s, self._budget_s))
                )
                log.log(level, "clock check: %s: %s; skew unknown", self.server, why)
                self._unknown_logged = True
                return None
            if self._unknown_logged:
                log.info("clock check: %s answers again", self.server)
            self._unknown_logged = False
            samples = 1
            while samples < self._max_samples:
                # Aim the next request's midpoint at a gateway time where the server's second turns, were the skew
                # the middle of the window: the answer's Date then tells which half the skew is in.
                middle = (lo + hi) / 2
                now = time.time()
                target = middle + math.ceil(now + rtt / 2 + _MARGIN_S - middle)
                if (target - now) + rtt / 2 + max(rtt, 0.05) > self._remaining(deadline):
                    break
                if (hi - lo) / 2 <= self._good_enough_s or hi - lo <= 2 * rtt + 0.002:
                    break  # precise enough, or the round trip (not Date's resolution) now limits the window
                await asyncio.sleep(max(0.0, target - rtt / 2 - time.time()))
                try:
                    s_lo, s_hi, rtt = await self._sample(client, deadline)
                except (_NoDate, http.client.HTTPException, OSError, TimeoutError, ValueError) as exc:
                    log.debug("clock check: %s: a later sample failed (%s)", self.server, type(exc).__name__)
                    break
                samples += 1
                if s_lo > hi or s_hi < lo:
                    # Disjoint windows: the server's (or our) clock was stepped meanwhile. Trust the newest answer.
                    log.debug("clock check: %s: inconsistent samples (clock stepped?); restarting", self.server)
                    lo, hi = s_lo, s_hi
                else:
                    lo, hi = max(lo, s_lo), min(hi, s_hi)
        finally:
            if client is not None:
                client.close()
        reading = ClockReading(skew_s=(lo + hi) / 2, uncertainty_s=(hi - lo) / 2, server=self.server)
        log.debug("clock check: %s from %d samples", reading.describe(), samples)
        return reading

    @staticmethod
    def _remaining(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    async def _sample(self, client: HttpClient, deadline: float) -> tuple[float, float, float]:
        """One GET /ping: the window [lo, hi] that must hold the skew, and the round trip.

        The server stamped Date = D at gateway time t in [t0, t1], with its clock then in [D, D + 1): so
        skew = t - server time lies in (t0 - D - 1, t1 - D]."""
        timeout = min(self._timeout_s, self._remaining(deadline))
        if timeout <= 0:
            raise TimeoutError
        t0 = time.time()
        answer = await client.request("GET", "/ping", timeout_s=timeout)
        t1 = time.time()
        date = _date_seconds(answer.headers.get("Date"))
        if date is None:
            raise _NoDate
        return t0 - date - 1, t1 - date, max(0.0, t1 - t0)
