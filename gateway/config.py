"""One TOML file, validated by pydantic, with errors that name the field and the fix.

Secrets are never written in the file: each is a reference (`{ env = "NAME" }`, `{ file = "/run/secrets/x" }` or
`{ credential = "name" }`, a systemd credential) resolved at load time into a SecretStr, so they are never printed or
logged. Environment variables named `INFUSION_<SECTION>__<FIELD>` override the file (docker compose sets hosts and
ports that way).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import socket
import tomllib
import traceback
import types
import typing
from collections import deque
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from devices.base import DeviceKind
from devices.registry import MODELS
from gateway.alarms import EXAMPLE_KETAMINE_PROFILE, AlarmProfile, TechnicalRules, ThresholdRule
from gateway.errors import GatewayError
from gateway.outbox import COMMIT_INTERVAL_S

NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,31}$"
NAME_HINT = "use 1-32 lower-case letters, digits, '-' or '_' (room and device names only: never patient data)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Strict):
    """Where a secret lives. Exactly one of env, file and credential: a systemd credential, which the unit's
    LoadCredential= puts in $CREDENTIALS_DIRECTORY, readable by this service only (deploy/systemd)."""

    env: str | None = None
    file: Path | None = None
    credential: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if [self.env, self.file, self.credential].count(None) != 2:
            raise ValueError(
                'give exactly one of env = "VARIABLE" or file = "/path/to/secret" (or credential = "name", systemd)'
            )
        return self

    def resolve(self) -> SecretStr:
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ValueError(f"environment variable {self.env} is not set: export it or use file = ...")
            return SecretStr(value)
        path = self.file
        if self.credential is not None:
            folder = os.environ.get("CREDENTIALS_DIRECTORY")
            if not folder:
                raise ValueError(
                    f"credential {self.credential}: CREDENTIALS_DIRECTORY is not set (systemd sets it for a unit with "
                    f"LoadCredential={self.credential}:/path) -> outside systemd use file = or env ="
                )
            path = Path(folder) / self.credential
        assert path is not None
        try:
            return SecretStr(path.read_text().strip())
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None


class TlsConfig(_Strict):
    ca_file: Path | None = None  # None: the system trust store
    cert_file: Path | None = None  # client certificate, for brokers that require one
    key_file: Path | None = None
    insecure_skip_verify: bool = False  # only for a lab; never in a clinic

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file for a client certificate, or neither")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} does not exist")
        return self


def host_gateway_id(hostname: str | None = None) -> str:
    """The default gateway id: this host's name (its first label, lower-cased, other characters as '-', at most 32),
    so room PCs given the same shipped config never share an id, an MQTT account or a status topic. Under compose the
    gateway container shares the host's name (`uts: host`)."""
    name = (hostname if hostname is not None else socket.gethostname()).split(".")[0].lower()
    return re.sub(r"[^a-z0-9_-]", "-", name).strip("-_")[:32]


class GatewaySection(_Strict):
    site: Annotated[str, Field(pattern=NAME_RE)] = "clinic"
    # MQTT status topic name and, with no [mqtt] username, the broker account "gateway-<id>" (the client id).
    id: Annotated[str, Field(pattern=NAME_RE)] = Field(default_factory=host_gateway_id)
    data_dir: Path = Path("/var/lib/infusion-telemetry")  # the durable outbox lives here
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    live_window_s: Annotated[float, Field(gt=0, le=3600)] = 10.0  # older than this when sent = historical
    shutdown_timeout_s: Annotated[float, Field(ge=0, le=300)] = 5.0  # time to flush sinks on SIGTERM
    status_interval_s: Annotated[float, Field(gt=0, le=3600)] = 5.0  # retained gateway status refresh
    # The outbox's bounds for long outages: past them the oldest undelivered readings go first (counted, alarmed).
    outbox_max_records: Annotated[int, Field(ge=1000)] = 1_000_000
    outbox_max_age_s: Annotated[float, Field(ge=3600)] = 7 * 86_400
    # The shortest time between the starts of two outbox commits: a busy gateway groups what comes within it into one
    # fsync'd transaction (CPU), at the price of at most this much more latency; 0: every commit as soon as the last.
    outbox_commit_interval_ms: Annotated[float, Field(ge=0, le=1000)] = 1000 * COMMIT_INTERVAL_S
    health_host: str = "127.0.0.1"  # 0.0.0.0 in a container, so compose's healthcheck can reach it
    health_port: Annotated[int, Field(ge=0, le=65535)] | None = 8321  # None: no health endpoint


class MqttSection(_Strict):
    host: str = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    username: str | None = None
    password: SecretRef | None = None
    tls: TlsConfig | None = None
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")] = "infusion"
    keepalive_s: Annotated[int, Field(ge=5, le=600)] = 30
    # Longest wait between reconnect attempts (jittered): short, because the wall is blind until the link is back.
    reconnect_max_s: Annotated[float, Field(gt=0, le=300)] = 5.0

    @model_validator(mode="after")
    def _credentials(self) -> MqttSection:
        if self.password is not None and self.username is None:
            raise ValueError('password given without username: add username = "..."')
        return self


class InfluxSection(_Strict):
    """InfluxDB target. api = "v2" (2.x/3.x, token) or "v1" (1.x /write, optional user/password)."""

    api: Literal["v1", "v2"] = "v2"
    url: Annotated[str, Field(pattern=r"^https?://")] = "http://localhost:8086"
    # v2
    org: str | None = None
    bucket: str | None = None
    token: SecretRef | None = None
    # v1
    database: str | None = None
    retention_policy: str | None = None
    username: str | None = None
    password: SecretRef | None = None
    ca_file: Path | None = None
    batch_size: Annotated[int, Field(ge=1, le=50_000)] = 5000
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    reconnect_max_s: Annotated[float, Field(gt=0, le=300)] = 10.0  # longest wait between retries (jittered)
    flush_interval_s: Annotated[float, Field(ge=0, le=60)] = 1.0  # batch writes: at most one request this often

    @model_validator(mode="after")
    def _api_fields(self) -> InfluxSection:
        if self.api == "v2":
            missing = [f for f in ("org", "bucket", "token") if getattr(self, f) is None]
            if missing:
                raise ValueError(f'api = "v2" needs {", ".join(missing)}: add them, or set api = "v1"')
            extra = [f for f in ("database", "retention_policy", "username", "password") if getattr(self, f)]
        else:
            if self.database is None:
                raise ValueError('api = "v1" needs database = "..."')
            extra = [f for f in ("org", "bucket", "token") if getattr(self, f) is not None]
        if extra:
            raise ValueError(f'{", ".join(extra)} do not apply to api = "{self.api}": remove them')
        return self


RESERVED_NAMES = frozenset({"alarms", "session", "command"})  # topic levels of their own


class AlarmsSection(_Strict):
    """The alarm profile: a site's policy. With no rules, the shipped EXAMPLE profile (labelled as such)."""

    profile: str = EXAMPLE_KETAMINE_PROFILE.name
    rules: tuple[ThresholdRule, ...] | None = None
    technical: TechnicalRules = TechnicalRules()
    tick_s: Annotated[float, Field(gt=0, le=5)] = 0.25  # how often delays and escalations are checked

    @model_validator(mode="after")
    def _profile(self) -> AlarmsSection:
        if self.rules is None and self.profile != EXAMPLE_KETAMINE_PROFILE.name:
            raise ValueError(
                f"profile {self.profile!r} has no [[alarms.rules]]: add rules, or use "
                f"profile = {EXAMPLE_KETAMINE_PROFILE.name!r} (an example, not advice)"
            )
        self.build()  # rule ids must be unique
        return self

    def build(self) -> AlarmProfile:
        if self.rules is None:
            return EXAMPLE_KETAMINE_PROFILE.model_copy(update={"technical": self.technical})
        return AlarmProfile(name=self.profile, example=False, rules=self.rules, technical=self.technical)


class DeviceConfig(_Strict):
    room: Annotated[str, Field(pattern=NAME_RE)]
    name: Annotated[str, Field(pattern=NAME_RE)]
    model: str
    port: str  # a device path (/dev/serial/by-id/...), socket://host:port or rfc2217://host:port
    baudrate: Annotated[int, Field(ge=300, le=4_000_000)] | None = None  # overrides the model's default
    stale_after_s: Annotated[float, Field(gt=0, le=3600)] | None = None  # overrides the model's default
    waveform: bool = False  # publish the pleth waveform on MQTT (batched, at most one message a second)
    # NIBP only: start a measurement this often (the cuff also measures on an MQTT command). None: commands only.
    measure_every_s: Annotated[float, Field(ge=60, le=86_400)] | None = None
    measurement_timeout_s: Annotated[float, Field(ge=30, le=600)] = 180.0

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_NAMES:
            raise ValueError(f"{value!r} is a reserved topic level: choose another device name")
        return value

    @model_validator(mode="after")
    def _kind_options(self) -> DeviceConfig:
        kind = MODELS[self.model].spec.kind
        if self.measure_every_s is not None and kind != DeviceKind.NIBP:
            raise ValueError(f"measure_every_s applies to blood-pressure cuffs only; {self.model} is a {kind}")
        if self.waveform and kind != DeviceKind.PULSE_OXIMETER:
            raise ValueError(f"waveform applies to pulse oximeters only; {self.model} is a {kind}")
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            close = difflib.get_close_matches(value, MODELS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown model {value!r}: {hint}known models: {', '.join(sorted(MODELS))}")
        return value

    @field_validator("port")
    @classmethod
    def _port_form(cls, value: str) -> str:
        if "://" in value and not re.match(r"^(socket|rfc2217|loop)://", value):
            raise ValueError("use a device path, socket://host:port or rfc2217://host:port")
        if "://" not in value and not value.startswith("/"):
            raise ValueError("use an absolute device path such as /dev/serial/by-id/usb-...")
        return value

    @property
    def key(self) -> str:
        return f"{self.room}/{self.name}"


ROLE_RE = r"^[a-z][a-z0-9_-]{0,31}$"
Action = Literal[
    "acknowledge", "silence", "start_session", "stop_session", "standby", "end_standby", "start_measurement"
]
ALL_ACTIONS: tuple[Action, ...] = typing.get_args(Action)


class CommandsSection(_Strict):
    """Who may do what by MQTT command, and for how long a command stays valid. Roles are job roles, never names;
    the broker's ACL decides who may publish a command at all (deploy/mosquitto/acl), this decides what it may do."""

    # A command is acted on only within this many seconds of its `issued_at` (clocks must be synchronised: see
    # docs/deploy.md), and its id is remembered that long, across restarts: a repeat is answered, never re-run.
    window_s: Annotated[float, Field(ge=5, le=300)] = 30.0
    silence_max_s: Annotated[float, Field(gt=0, le=600)] = 120.0
    silence_max_renewals: Annotated[int, Field(ge=0, le=10)] = 2  # silences of one alarm after the first
    roles: dict[Annotated[str, Field(pattern=ROLE_RE)], tuple[Action, ...]] = Field(
        default_factory=lambda: {
            # An example of a site policy: nurses and physicians may do everything, a technician start a cuff.
            "nurse": ALL_ACTIONS,
            "physician": ALL_ACTIONS,
            "technician": ("start_measurement",),
        }
    )

    @model_validator(mode="after")
    def _some_role(self) -> CommandsSection:
        if not self.roles:
            raise ValueError("[commands.roles] is empty: no one could acknowledge an alarm")
        return self


class NotifyTarget(_Strict):
    """Where notifications go: an Apprise URL (ntfy://, mailto://, msteams://, json://...). It carries the service's
    token, so it is a secret reference like every password, never a value in the file."""

    url: SecretRef
    # At most max_messages to this target per per_s seconds: past that, what waits goes out as one summary message.
    max_messages: Annotated[int, Field(ge=1, le=1000)] = 5
    per_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0


class NotifyRoute(_Strict):
    """Which alarms go to which targets at once, and the escalation chain while nobody acknowledges them."""

    priorities: tuple[Literal["low", "medium", "high"], ...] = ("low", "medium", "high")
    kinds: tuple[Literal["physiological", "technical"], ...] = ("physiological", "technical")
    rooms: tuple[str, ...] = ()  # empty: every room, the gateway's own alarms (room "_gateway") included
    targets: tuple[Annotated[str, Field(pattern=NAME_RE)], ...] = ()
    escalate_to: tuple[Annotated[str, Field(pattern=NAME_RE)], ...] = ()  # the chain, one target a step
    escalate_after_s: Annotated[float, Field(gt=0, le=86_400)] | None = None  # unacknowledged this long: next step
    repeat_every_s: Annotated[float, Field(gt=0, le=86_400)] | None = None  # between later steps and reminders

    @model_validator(mode="after")
    def _chain(self) -> NotifyRoute:
        if not self.targets and not self.escalate_to:
            raise ValueError("a route needs targets (or an escalate_to chain)")
        if self.escalate_to and self.escalate_after_s is None:
            raise ValueError("escalate_to needs escalate_after_s: how long an unacknowledged alarm waits for the next")
        if self.escalate_after_s is not None and not self.escalate_to:
            raise ValueError("escalate_after_s without escalate_to: name the targets of the chain")
        return self


class NotifySection(_Strict):
    """Alarm notifications to people away from the wall (docs/notifications.md). Absent: no notifications."""

    targets: dict[Annotated[str, Field(pattern=NAME_RE)], NotifyTarget]
    routes: tuple[NotifyRoute, ...]
    stale_after_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0  # delivered later than this: says how late
    give_up_after_s: Annotated[float, Field(ge=60, le=7 * 86_400)] = 86_400.0  # then to the rejected pile
    retry_max_s: Annotated[float, Field(ge=1, le=3600)] = 60.0  # longest wait between attempts at a failing target
    send_timeout_s: Annotated[float, Field(gt=0, le=300)] = 20.0  # one attempt at one target

    @model_validator(mode="after")
    def _known_targets(self) -> NotifySection:
        if not self.targets:
            raise ValueError("[notify.targets] is empty: add a target, or remove [notify]")
        if not self.routes:
            raise ValueError("[[notify.routes]] is empty: no alarm would be sent anywhere")
        for i, route in enumerate(self.routes):
            unknown = sorted(set(route.targets + route.escalate_to) - set(self.targets))
            if unknown:
                raise ValueError(
                    f"routes[{i}] names unknown target(s) {', '.join(unknown)}: known are {', '.join(self.targets)}"
                )
        return self


ENV_PREFIX = "INFUSION_"
ENV_NESTED = "__"


def _subclass(tp: Any, bases: type | tuple[type, ...]) -> bool:
    try:
        return isinstance(tp, type) and issubclass(tp, bases)
    except TypeError:  # a parametrised generic (list[int]) passes isinstance(type) but not issubclass
        return False


def _is_complex(annotation: Any) -> bool:
    """A value given as JSON: a model, a mapping, a sequence other than str, a set."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _is_complex(typing.get_args(annotation)[0])
    kinds = (BaseModel, Mapping, Sequence, Set, tuple, set, frozenset, deque)
    return any(not _subclass(tp, (str, bytes)) and _subclass(tp, kinds) for tp in (annotation, origin))


def _union_is_complex(annotation: Any) -> bool:
    for arg in typing.get_args(annotation):
        if _is_complex(arg):
            return True
        while typing.get_origin(arg) is Annotated:
            arg = typing.get_args(arg)[0]
        if typing.get_origin(arg) in (typing.Union, types.UnionType) and _union_is_complex(arg):
            return True
    return False


def _json_rule(annotation: Any) -> tuple[bool, bool]:
    """(given as JSON, a value that is not JSON passes through as text): JSON must parse for a field that can only
    be complex; in a union with a simple type (None included), text that is not JSON goes to pydantic as it is."""
    if _is_complex(annotation):
        return True, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and _union_is_complex(annotation):
        return True, True
    return False, False


def _next_field(field: FieldInfo | Any, key: str) -> FieldInfo | Any | None:
    """The field (or, in a dict, the value type) that `key` names inside `field`'s type, case-insensitively."""
    if not field:
        return None
    annotation = field.annotation if isinstance(field, FieldInfo) else field
    if _subclass(typing.get_origin(annotation), dict):
        args = typing.get_args(annotation)
        return args[-1] if args else None
    for arg in typing.get_args(annotation):
        if found := _next_field(arg, key):
            return found
    if _subclass(annotation, BaseModel):
        for name, sub in typing.cast(type[BaseModel], annotation).model_fields.items():
            if name.lower() == key.lower():
                return sub
    return None


def _env_field_error(name: str, exc: ValueError) -> ConfigError:
    fix = "give the field as JSON (e.g. a list of tables), or unset it"
    return ConfigError("environment", [f"{ENV_PREFIX}{name.upper()}: not valid JSON ({exc}) -> {fix}"])


def _nested_env(name: str, field: FieldInfo, env: Mapping[str, str]) -> dict[str, Any]:
    """`INFUSION_<FIELD>__<KEY>__<KEY>...` variables as the nested dict of values they set."""
    prefix = f"{ENV_PREFIX}{name}{ENV_NESTED}".lower()
    result: dict[str, Any] = {}
    for var, value in env.items():
        if not var.startswith(prefix):
            continue
        *keys, last = var[len(prefix) :].split(ENV_NESTED)
        target: Any = result
        sub: FieldInfo | Any | None = field
        for key in keys:
            sub = _next_field(sub, key)
            if isinstance(target, dict):
                target = target.setdefault(key, {})
        sub = _next_field(sub, last)
        decoded: Any = value
        if sub and value:
            as_json, lenient = _json_rule(sub.annotation) if isinstance(sub, FieldInfo) else (_is_complex(sub), True)
            if as_json:
                decoded = _env_json(name, value, lenient)
        if isinstance(target, dict):
            target[last] = decoded
    return result


def _env_json(name: str, value: str, lenient: bool) -> Any:
    """A variable's text as JSON; kept as text when it is not JSON and the field's type takes text (`lenient`)."""
    try:
        return json.loads(value)
    except ValueError as exc:
        if not lenient:
            raise _env_field_error(name, exc) from None
        return value


def _field_names(annotation: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Keys of an override given as JSON matched to the model's field names whatever their case, as variable names
    are."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        annotation = next(arg for arg in args if arg is not type(None))
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if not _subclass(annotation, BaseModel):
        return values
    fields = {name.lower(): (name, sub) for name, sub in annotation.model_fields.items()}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key.lower() not in fields:
            out[key] = value
            continue
        name, sub = fields[key.lower()]
        out[name] = _field_names(sub.annotation, value) if isinstance(value, dict) else value
    return out


def env_overrides(model: type[BaseModel]) -> dict[str, Any]:
    """What the `INFUSION_*` variables set, field by field: `INFUSION_<FIELD>` as JSON, `INFUSION_<FIELD>__<KEY>...`
    as text (JSON where the key's type is a model, list, tuple or dict), both together merged; names in any case.
    These are pydantic-settings' rules (its EnvSettingsSource, which this replaces: importing it cost the running
    gateway a MiB) for the field types a Config has."""
    env = {var.lower(): value for var, value in os.environ.items()}
    data: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        value: Any = env.get(f"{ENV_PREFIX}{name}".lower())
        as_json, lenient = _json_rule(field.annotation)
        if value is None:
            value = _nested_env(name, field, env) or None
        elif as_json:
            value = _env_json(name, value, lenient)
            if isinstance(value, dict):
                value = _deep_update(value, _nested_env(name, field, env))
        if value is not None:
            data[name] = _field_names(field.annotation, value) if isinstance(value, dict) else value
    return data


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = base.copy()
    for key, value in update.items():
        old = merged.get(key)
        merged[key] = _deep_update(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


class Config(_Strict):
    """The whole file. Every construction (load_config's and any other) takes the `INFUSION_*` overrides over the
    values given: docker compose sets hosts and ports that way."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    gateway: GatewaySection = Field(default_factory=GatewaySection)  # at load time: the id is the host name
    mqtt: MqttSection = MqttSection()
    influx: InfluxSection
    alarms: AlarmsSection = AlarmsSection()
    commands: CommandsSection = CommandsSection()
    devices: list[DeviceConfig] = Field(default_factory=list)
    notify: NotifySection | None = None

    @model_validator(mode="before")
    @classmethod
    def _gateway_account(cls, data: Any) -> Any:
        """The environment's overrides first. Then: a gateway with a password and no [mqtt] username logs in as
        "gateway-<id>", its own account (deploy/make-secrets.sh), so the shipped config never makes two room PCs
        share one account."""
        if not isinstance(data, dict):
            return data
        data = _deep_update(data, env_overrides(cls))
        mqtt, gateway = data.get("mqtt"), data.get("gateway")
        if not isinstance(mqtt, dict) or mqtt.get("password") is None or mqtt.get("username") is not None:
            return data
        gateway_id = gateway.get("id") if isinstance(gateway, dict) else getattr(gateway, "id", None)
        return {**data, "mqtt": {**mqtt, "username": f"gateway-{gateway_id or host_gateway_id()}"}}

    @model_validator(mode="after")
    def _unique_devices(self) -> Config:
        seen: dict[str, int] = {}
        for i, dev in enumerate(self.devices):
            if dev.key in seen:
                raise ValueError(
                    f"devices[{i}] repeats room {dev.room!r} name {dev.name!r} of devices[{seen[dev.key]}]"
                )
            seen[dev.key] = i
        ports: dict[str, int] = {}
        for i, dev in enumerate(self.devices):
            if dev.port in ports:
                raise ValueError(f"devices[{i}] uses port {dev.port} already used by devices[{ports[dev.port]}]")
            ports[dev.port] = i
        return self

    def redacted(self) -> dict[str, Any]:
        """The validated config as plain data, secrets shown only as where they come from, URLs without userinfo
        (an InfluxDB URL may carry user:password)."""

        def clean(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return redact(value) if isinstance(value, str) else value

        result: dict[str, Any] = clean(self.model_dump(mode="json"))
        return result


class ConfigError(GatewayError):
    """A config that cannot be used. str() is a list of `field.path: problem -> fix` lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _fields_of(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The allowed keys at `loc`, for "did you mean" hints on unknown keys."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        for candidate in getattr(ann, "__args__", ()) or (ann,):
            inner = getattr(candidate, "__args__", (candidate,))[0] if hasattr(candidate, "__args__") else candidate
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                current = inner
                break
        else:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in ("function-after",))
        where = _loc(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _fields_of(Config, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
            problems.append(f"{where}: unknown key -> remove it ({hint})")
        elif kind == "missing":
            problems.append(f"{where}: required -> add it")
        elif kind == "string_pattern_mismatch" and loc and loc[-1] in ("room", "name", "site", "id"):
            problems.append(f"{where}: {err['input']!r} is not a valid name -> {NAME_HINT}")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {msg}")
    return problems


def load_config(path: Path) -> Config:
    """Read and validate. Raises ConfigError with one line per problem."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc} -> fix the syntax at that line"]) from None
    try:
        return Config(**data)  # an INFUSION_* variable that is not the JSON its field needs: ConfigError
    except ValidationError as exc:
        raise ConfigError(str(path), format_errors(exc)) from None


def resolve_secret(ref: SecretRef | None, field: str) -> SecretStr | None:
    """Resolve at start-up, so a missing secret stops the gateway with the field's name instead of failing later."""
    if ref is None:
        return None
    try:
        value = ref.resolve()
    except ValueError as exc:
        raise ConfigError("secrets", [f"{field}: {exc}"]) from None
    register_secret(value.get_secret_value())
    return value


# --- redaction: no secret in a log line, an exception, check-config or /health --------------------------------

_USERINFO = re.compile(r"(?<=://)[^/\s]*@")  # greedy: a password with an unencoded '@' goes too
MIN_SECRET_LEN = 4  # shorter values would blank ordinary words out of every log line
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret's value (once resolved) so that redact() removes it wherever it turns up."""
    if value and len(value) >= MIN_SECRET_LEN:
        _secrets.add(value)


def redact(text: str) -> str:
    """`text` without URL userinfo (`scheme://user:password@host` -> `scheme://***@host`) and without any
    registered secret's value."""
    text = _USERINFO.sub("***@", text)
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """On a handler: every record it writes, from any logger, message and traceback, goes through redact()."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports those itself, a filter must not raise
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
