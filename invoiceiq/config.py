"""Settings: one frozen value built once at start-up from config.toml and the environment.

Precedence, lowest to highest: built-in defaults, the TOML file, the short environment names
the spec uses (``WABA_TOKEN``, ``DATABASE_URL``...), then ``INVOICEIQ_<SECTION>_<KEY>``.

:func:`load_settings` collects every problem before raising, one line each, so a sysadmin
fixes a broken config in one pass instead of one restart per mistake. An unknown key is an
error rather than a warning: a typo that silently fell back to a default (a sandbox URL, an
empty allow-list) would only show up when money goes missing.

Nothing here logs or prints; the caller reports. No problem line quotes a secret's value, and
secrets (and URLs that may carry a password) stay out of ``repr``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = [
    "AdminSettings",
    "ChatSettings",
    "ConfigError",
    "DatabaseSettings",
    "ENV_ALIASES",
    "LogSettings",
    "MerchantSettings",
    "MetricsSettings",
    "MpesaSettings",
    "OutboxSettings",
    "SECRET_KEYS",
    "SandboxSettings",
    "ServerSettings",
    "Settings",
    "SmsSettings",
    "WhatsAppSettings",
    "describe_mode",
    "effective_config",
    "env_var_name",
    "load_settings",
    "missing_live_keys",
    "render_effective_config",
    "resolve_config_path",
]

Mode = Literal["sandbox", "live"]
ModeSource = Literal["default", "file", "env"]
TransactionType = Literal["CustomerPayBillOnline", "CustomerBuyGoodsOnline"]
LogLevel = Literal["debug", "info", "warning", "error"]
SmsProvider = Literal["africastalking"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ENV_PREFIX: Final = "INVOICEIQ_"
CONFIG_PATH_ENV: Final = "INVOICEIQ_CONFIG"
# The test harness owns this namespace (e.g. INVOICEIQ_TEST_POSTGRES_URL), so it is not ours to reject.
_TEST_ENV_PREFIX: Final = "INVOICEIQ_TEST_"
DEFAULT_CONFIG_FILE: Final = "config.toml"

# Daraja's per-transaction ceiling (providers/mpesa.md section 7); the minimum is KES 1.
MPESA_MAX_AMOUNT: Final = 250_000
_PAYBILL: Final = "CustomerPayBillOnline"
_BUY_GOODS: Final = "CustomerBuyGoodsOnline"


class ConfigError(Exception):
    """Every problem found, one ``config: <key>: <what is wrong>`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def _secret() -> str:
    # repr=False keeps secrets out of tracebacks and out of any accidental log of a Settings.
    return field(default="", repr=False, metadata={"secret": True})


# --- sections -------------------------------------------------------------------------------
# Field names, types and defaults below ARE the schema: the loader, SECRET_KEYS, the env names
# and the drift test against config.toml.example are all derived from them.


@dataclass(frozen=True, slots=True)
class ServerSettings:
    bind: str = "127.0.0.1:8000"
    public_url: str = ""
    shutdown_grace_s: int = 10
    max_body_bytes: int = 65536
    trusted_proxies: tuple[str, ...] = ()
    # The event loop under anyio: "auto" takes uvloop where it is installed (a dependency on
    # Linux), else asyncio's own. uvloop's C loop costs less per callback, timer and socket
    # event: 38-39 ms against 44-47 ms of the daemon's CPU per end-to-end flow (bench/README).
    event_loop: str = "auto"

    @property
    def host(self) -> str:
        """``127.0.0.1``; for ``[::1]:8000`` the bare ``::1``."""
        return _split_bind(self.bind)[0]

    @property
    def port(self) -> int:
        return _split_bind(self.bind)[1]

    @property
    def public_base_url(self) -> str:
        """The address providers call back on, without a trailing slash."""
        return self.public_url or f"http://{self.bind}"

    @property
    def trusted_proxy_networks(self) -> tuple[IPNetwork, ...]:
        return _to_networks(self.trusted_proxies)


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    # Not a secret key, but a PostgreSQL URL may hold a password: keep it out of repr too.
    url: str = field(default="sqlite:///./data.db", repr=False)

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite:")

    @property
    def sqlite_path(self) -> Path | None:
        """The database file; relative paths are relative to the working directory
        (systemd's WorkingDirectory=). ``None`` for PostgreSQL."""
        if not self.is_sqlite:
            return None
        return Path(self.url.removeprefix("sqlite:///").split("?", 1)[0])


@dataclass(frozen=True, slots=True)
class MerchantSettings:
    msisdn: str = ""
    name: str = "My Business"


@dataclass(frozen=True, slots=True)
class AdminSettings:
    token: str = _secret()


@dataclass(frozen=True, slots=True)
class WhatsAppSettings:
    api_base: str = "https://graph.facebook.com/v25.0"
    token: str = _secret()
    phone_id: str = ""
    verify_token: str = _secret()
    app_secret: str = _secret()
    invoice_template: str = "invoice_notification"
    template_language: str = "en"


@dataclass(frozen=True, slots=True)
class SmsSettings:
    provider: SmsProvider = "africastalking"
    api_base: str = "https://api.africastalking.com"
    username: str = ""
    api_key: str = _secret()
    sender_id: str = ""
    # Africa's Talking signs nothing: when set, its callbacks must carry ?token=<this>.
    callback_token: str = _secret()


@dataclass(frozen=True, slots=True)
class MpesaSettings:
    api_base: str = "https://sandbox.safaricom.co.ke"
    consumer_key: str = _secret()
    consumer_secret: str = _secret()
    shortcode: str = ""
    passkey: str = _secret()
    transaction_type: TransactionType = "CustomerPayBillOnline"
    till_number: str = ""
    # repr=False: integrators often put a shared secret in its query string.
    callback_url: str = field(default="", repr=False)
    # Daraja callbacks are unsigned: a secret in the callback path is what keeps forged "paid"
    # callbacks out (providers/mpesa.md section 6; deploy/systemd/invoiceiq.env.example).
    callback_secret: str = _secret()
    max_amount: int = MPESA_MAX_AMOUNT
    query_after_s: int = 60
    expire_after_s: int = 600
    callback_allow_ips: tuple[str, ...] = ()
    push_min_interval_s: int = 60
    push_limit: int = 3
    push_window_s: int = 600
    # Payment turns at once (an STK Push, a status query or a callback each): a push holds its
    # turn for Daraja's answer, so pushes per second = this / that answer time. 16 at 200 ms
    # capped a campaign near 80 a second with the callbacks and queries sharing them (bench/README).
    max_in_flight: int = 64

    @property
    def callback_allow_networks(self) -> tuple[IPNetwork, ...]:
        return _to_networks(self.callback_allow_ips)


@dataclass(frozen=True, slots=True)
class ChatSettings:
    nudge_after_s: int = 300
    close_after_s: int = 900
    merchant_rate_per_min: int = 30
    customer_hint_interval_s: int = 3600
    remind_interval_s: int = 3600


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    max_attempts: int = 10
    backoff_base_s: int = 2
    backoff_max_s: int = 600
    fallback_after_s: int = 0
    lease_s: int = 60
    # Sends in flight at once. Throughput is this over the provider's answer time: 96 sends
    # at 200 ms each is 480 a second; 32 would cap it near 150, half of what 3,000 flows a
    # minute (six sends each) need.
    max_in_flight: int = 96


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    token: str = _secret()


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: LogLevel = "info"


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    latency_ms: int = 0
    customer_msisdn: str = "254712345678"
    status_delay_ms: int = 250
    callback_delay_ms: int = 1000
    prompt_timeout_s: int = 60
    stk_lock_s: int = 60


@dataclass(frozen=True, slots=True)
class Settings:
    """``Settings()`` is the built-in default: sandbox mode, nothing configured."""

    mode: Mode = "sandbox"
    # Where ``mode`` came from, so the caller can say why it runs live or sandbox.
    mode_source: ModeSource = "default"
    server: ServerSettings = field(default_factory=ServerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    merchant: MerchantSettings = field(default_factory=MerchantSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    whatsapp: WhatsAppSettings = field(default_factory=WhatsAppSettings)
    sms: SmsSettings = field(default_factory=SmsSettings)
    mpesa: MpesaSettings = field(default_factory=MpesaSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)

    @property
    def is_live(self) -> bool:
        return self.mode == "live"

    @property
    def public_base_url(self) -> str:
        return self.server.public_base_url

    @property
    def is_sqlite(self) -> bool:
        return self.database.is_sqlite

    @property
    def sqlite_path(self) -> Path | None:
        return self.database.sqlite_path


# --- schema derived from the dataclasses ------------------------------------------------------

# Annotations are strings under `from __future__ import annotations`; map each one we use.
_KINDS: Final[Mapping[str, str]] = {
    "str": "str",
    "int": "int",
    "tuple[str, ...]": "list",
    "Mode": "str",
    "SmsProvider": "str",
    "TransactionType": "str",
    "LogLevel": "str",
}


@dataclass(frozen=True, slots=True)
class _Key:
    section: str  # "" for the top level
    name: str
    kind: str  # "str" | "int" | "list"
    default: Any
    secret: bool

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


def _build_schema() -> tuple[dict[str, type[Any]], tuple[_Key, ...]]:
    sections: dict[str, type[Any]] = {}
    keys = [_Key("", "mode", "str", "", False)]
    for top in fields(Settings):
        if top.name in ("mode", "mode_source"):
            continue
        cls = top.default_factory
        assert isinstance(cls, type)
        sections[top.name] = cls
        for f in fields(cls):
            keys.append(
                _Key(top.name, f.name, _KINDS[str(f.type)], f.default, bool(f.metadata.get("secret")))
            )
    return sections, tuple(keys)


_SECTIONS, _KEYS = _build_schema()
_BY_DOTTED: Final[Mapping[str, _Key]] = {k.dotted: k for k in _KEYS}

SECRET_KEYS: Final[frozenset[str]] = frozenset(k.dotted for k in _KEYS if k.secret)


def env_var_name(dotted: str) -> str:
    """``mpesa.shortcode`` -> ``INVOICEIQ_MPESA_SHORTCODE``; ``mode`` -> ``INVOICEIQ_MODE``."""
    return ENV_PREFIX + dotted.replace(".", "_").upper()


_ENV_NAMES: Final[Mapping[str, str]] = {env_var_name(k.dotted): k.dotted for k in _KEYS}

# The spec's (section 11) and the systemd env file's names. INVOICEIQ_* wins when both are set.
ENV_ALIASES: Final[Mapping[str, str]] = {
    "DATABASE_URL": "database.url",
    "WABA_TOKEN": "whatsapp.token",
    "WABA_PHONE_ID": "whatsapp.phone_id",
    "WABA_VERIFY_TOKEN": "whatsapp.verify_token",
    "WABA_APP_SECRET": "whatsapp.app_secret",
    "SMS_API_KEY": "sms.api_key",
    "SMS_USERNAME": "sms.username",
    "SMS_CALLBACK_TOKEN": "sms.callback_token",
    "MPESA_CONSUMER_KEY": "mpesa.consumer_key",
    "MPESA_CONSUMER_SECRET": "mpesa.consumer_secret",
    "MPESA_SHORTCODE": "mpesa.shortcode",
    "MPESA_PASSKEY": "mpesa.passkey",
    "MPESA_CALLBACK_URL": "mpesa.callback_url",
    "MPESA_CALLBACK_SECRET": "mpesa.callback_secret",
    "MERCHANT_MSISDN": "merchant.msisdn",
    "ADMIN_TOKEN": "admin.token",
}

# Any one of these set means the operator is wiring real providers, so mode defaults to live.
_CREDENTIAL_KEYS: Final = ("whatsapp.token", "mpesa.consumer_key", "sms.api_key")

_LIVE_REQUIRED: Final = frozenset(
    {
        "whatsapp.token",
        "whatsapp.phone_id",
        "whatsapp.verify_token",
        "whatsapp.app_secret",
        "mpesa.consumer_key",
        "mpesa.consumer_secret",
        "mpesa.shortcode",
        "mpesa.passkey",
        "sms.username",
        "sms.api_key",
        # Africa's Talking signs nothing: without this token anyone could post an inbound SMS
        # (a forged PAY starts a real prompt; any text costs the merchant an SMS reply).
        "sms.callback_token",
        "merchant.msisdn",
        "server.public_url",
    }
)

# URLs can carry credentials (postgresql://user:password@...) or a secret query parameter.
_URL_KEYS: Final = frozenset(
    {
        "server.public_url",
        "database.url",
        "whatsapp.api_base",
        "sms.api_base",
        "mpesa.api_base",
        "mpesa.callback_url",
    }
)


# --- validation -------------------------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, *messages: str) -> None:
        super().__init__(*messages)
        self.messages = messages


_Validator = Callable[[Any, bool], Any]  # (value, live) -> normalised value, or raise _Invalid

_DIGITS = re.compile(r"[0-9]+")
_INT = re.compile(r"[+-]?[0-9]+")
_WHITESPACE = re.compile(r"\s")
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
# Meta: template names are lowercase letters, digits and underscores.
_TEMPLATE_NAME = re.compile(r"[a-z0-9_]{1,512}")
_LANGUAGE = re.compile(r"[a-z]{2,3}(?:_[A-Z]{2})?")
# An alphanumeric sender ID is at most 11 characters; a short code is digits, which also fit.
_SENDER_ID = re.compile(r"[A-Za-z0-9]{1,11}")
_URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")

# Safaricom rejects callback URLs containing these, in any case (providers/mpesa.md section 6).
_BANNED_CALLBACK_WORDS: Final = ("m-pesa", "mpesa", "safaricom", "exe", "exec", "cmd", "sql", "query")
_BANNED_NOTE: Final = (
    "Safaricom rejects callback URLs containing m-pesa, mpesa, safaricom, exe, exec, cmd, sql "
    "or query, in any case"
)
_DB_FORMS: Final = (
    "must be sqlite:///relative/path, sqlite:////absolute/path or postgresql://user@host/db"
)
_BIND_FORM: Final = "must be host:port (e.g. 127.0.0.1:8000 or [::1]:8000)"
_MSISDN_FORM: Final = "must be a Kenyan mobile number (07XXXXXXXX, 01XXXXXXXX or 2547XXXXXXXX)"


def _normalise_msisdn(raw: str) -> str | None:
    """Any way a Kenyan types a mobile number -> ``2547XXXXXXXX``/``2541XXXXXXXX``; else None.

    Kept private here (config sits on floor 1 beside core/): core/validate.py owns the
    normaliser for numbers that arrive in messages.
    """
    s = re.sub(r"[\s-]", "", raw)
    if s.startswith("+"):
        s = s[1:]
        if not s.startswith("254"):
            return None
    if not _DIGITS.fullmatch(s):
        return None
    if len(s) == 12 and s.startswith("254"):
        local = s[3:]
    elif len(s) == 10 and s.startswith("0"):
        local = s[1:]
    elif len(s) == 9:
        local = s
    else:
        return None
    return "254" + local if local[0] in "17" else None


def _split_bind(bind: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); IPv6 hosts come in brackets. ValueError if malformed."""
    bracketed = re.fullmatch(r"\[([^\]]+)\]:([0-9]{1,5})", bind)
    if bracketed:
        host, port_text = bracketed.group(1), bracketed.group(2)
        ipaddress.IPv6Address(host)
    else:
        host, sep, port_text = bind.rpartition(":")
        if not sep or not _DIGITS.fullmatch(port_text) or len(port_text) > 5:
            raise ValueError(_BIND_FORM)
        if ":" in host:
            raise ValueError(_BIND_FORM)  # unbracketed IPv6 is ambiguous
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(_BIND_FORM)
        if all(part.isdigit() for part in host.split(".")):
            ipaddress.IPv4Address(host)  # 999.1.1.1 looks like a hostname but is a typo
    return host, int(port_text)


def _to_networks(items: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(item) for item in items)


def _check_bind(value: str, live: bool) -> str:
    try:
        _, port = _split_bind(value)
    except ValueError:
        raise _Invalid(_BIND_FORM) from None
    # Port 0 asks the kernel for a free port (tests, several instances on one host).
    if not 0 <= port <= 65535:
        raise _Invalid("port must be between 0 and 65535")
    return value


def _http_url(value: str, *, base: bool) -> str:
    """An absolute http(s) URL. A ``base`` has no query/fragment and loses its trailing slash,
    because callers append paths to it."""
    if _WHITESPACE.search(value):
        raise _Invalid("must not contain whitespace")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise _Invalid("must be an absolute http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid("must be an absolute http(s) URL")
    if not base:
        return value
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise _Invalid("must not have a query string or fragment")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _check_base_url(value: str, live: bool) -> str:
    return _http_url(value, base=True)


def _check_public_url(value: str, live: bool) -> str:
    # Empty means http://<bind>; live mode's https requirement is reported by missing_live_keys.
    return _http_url(value, base=True) if value else ""


def _banned_words(text: str) -> list[str]:
    lowered = unquote(text).lower()
    found = [w for w in _BANNED_CALLBACK_WORDS if w in lowered]
    # "exec" already says "exe"; report the longest word only.
    return [w for w in found if not any(w != other and w in other for other in found)]


def _check_callback_url(value: str, live: bool) -> str:
    if not value:
        return ""  # the daemon builds it from server.public_url
    _http_url(value, base=False)
    parts = urlsplit(value)
    problems = []
    if live and parts.scheme != "https":
        problems.append("must be an https URL in live mode")
    # Path and query only, as scoped for InvoiceIQ. The provider doc states the rule for the
    # whole URL, so a host such as mpesa.example.co.ke may still be refused by Safaricom.
    words = _banned_words(f"{parts.path}?{parts.query}")
    if words:
        quoted = _either(words)
        problems.append(f"must not contain {quoted} ({_BANNED_NOTE})")
    # The daemon answers callbacks only at /payments/stk/callback/<secret> (a proxy may add a
    # prefix): a URL of another shape would be sent to Safaricom and every callback lost.
    head, _, secret = parts.path.rstrip("/").rpartition("/")
    if not head.endswith("/payments/stk/callback") or len(secret) < 16 or not _URL_SAFE.fullmatch(secret):
        problems.append("must end with /payments/stk/callback/<secret> (a secret of 16+ letters, "
                        "digits, '-' or '_'); or leave it empty and set public_url")
    if problems:
        raise _Invalid(*problems)
    return value


def _check_callback_secret(value: str, live: bool) -> str:
    if not value:
        return ""
    problems = []
    if len(value) < 16:
        problems.append("must be at least 16 characters")
    if not _URL_SAFE.fullmatch(value):
        problems.append("must be letters, digits, '-' and '_' only (it goes into the callback URL path)")
    if _banned_words(value):
        # Which word is not said: that would leak part of the secret into a log.
        problems.append(f"must not contain a word Safaricom rejects ({_BANNED_NOTE})")
    if problems:
        raise _Invalid(*problems)
    return value


def _check_database_url(value: str, live: bool) -> str:
    if _WHITESPACE.search(value):
        raise _Invalid("must not contain whitespace")
    if value.startswith("sqlite:///"):
        if value.removeprefix("sqlite:///").split("?", 1)[0] in ("", "/"):
            raise _Invalid(_DB_FORMS)
        return value
    for prefix in ("postgresql://", "postgres://"):
        if value.startswith(prefix) and len(value) > len(prefix):
            # asyncpg and SQLAlchemy 2 only know the long scheme name.
            return "postgresql://" + value.removeprefix(prefix)
    raise _Invalid(_DB_FORMS)


def _check_networks(value: tuple[str, ...], live: bool) -> tuple[str, ...]:
    problems = []
    for item in value:
        try:
            ipaddress.ip_network(item)
        except ValueError:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                problems.append(f"{item!r} is not an IP address or CIDR network")
            else:
                problems.append(f"{item!r} has host bits set (did you mean {str(loose)!r}?)")
    if problems:
        raise _Invalid(*problems)
    return value


def _msisdn(*, optional: bool) -> _Validator:
    def check(value: str, live: bool) -> str:
        if not value and optional:
            return ""
        normalised = _normalise_msisdn(value)
        if normalised is None:
            raise _Invalid(_MSISDN_FORM)
        return normalised

    return check


def _token(*, min_length: int = 0) -> _Validator:
    def check(value: str, live: bool) -> str:
        if not value:
            return ""
        problems = []
        if _WHITESPACE.search(value):
            # Tokens never contain whitespace; one that does was wrapped or pasted badly.
            problems.append("must not contain whitespace")
        if len(value) < min_length:
            problems.append(f"must be at least {min_length} characters")
        if problems:
            raise _Invalid(*problems)
        return value

    return check


def _digits(value: str, live: bool) -> str:
    if value and not _DIGITS.fullmatch(value):
        raise _Invalid("must be digits")
    return value


def _matching(pattern: re.Pattern[str], message: str, *, optional: bool = False) -> _Validator:
    def check(value: str, live: bool) -> str:
        if optional and not value:
            return ""
        if not pattern.fullmatch(value):
            raise _Invalid(message)
        return value

    return check


def _either(words: list[str] | tuple[str, ...]) -> str:
    """``["a", "b", "c"]`` -> ``"a", "b" or "c"``."""
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _one_of(*choices: str, fold_case: bool = False) -> _Validator:
    message = "must be " + _either(choices)

    def check(value: str, live: bool) -> str:
        candidate = value.lower() if fold_case else value
        if candidate not in choices:
            raise _Invalid(message)
        return candidate

    return check


def _not_empty(value: str, live: bool) -> str:
    if not value:
        raise _Invalid("must not be empty")
    return value


def _no_whitespace(value: str, live: bool) -> str:
    if _WHITESPACE.search(value):
        raise _Invalid("must not contain whitespace")
    return value


def _at_least(minimum: int) -> _Validator:
    message = "must be a positive integer" if minimum == 1 else f"must be {minimum} or more"

    def check(value: int, live: bool) -> int:
        if value < minimum:
            raise _Invalid(message)
        return value

    return check


def _between(low: int, high: int) -> _Validator:
    def check(value: int, live: bool) -> int:
        if not low <= value <= high:
            raise _Invalid(f"must be between {low} and {high}")
        return value

    return check


_VALIDATORS: Final[Mapping[str, _Validator]] = {
    "server.bind": _check_bind,
    "server.public_url": _check_public_url,
    # 0 is allowed: stop at once, dropping in-flight requests.
    "server.shutdown_grace_s": _at_least(0),
    "server.max_body_bytes": _at_least(1),
    "server.trusted_proxies": _check_networks,
    "server.event_loop": _one_of("auto", "asyncio", "uvloop"),
    "database.url": _check_database_url,
    "merchant.msisdn": _msisdn(optional=True),
    "merchant.name": _not_empty,
    "admin.token": _token(min_length=16),
    "whatsapp.api_base": _check_base_url,
    "whatsapp.token": _token(),
    "whatsapp.phone_id": _digits,
    "whatsapp.verify_token": _token(),
    "whatsapp.app_secret": _token(),
    "whatsapp.invoice_template": _matching(
        _TEMPLATE_NAME, "must be lowercase letters, digits and '_' (a Meta template name)"
    ),
    "whatsapp.template_language": _matching(_LANGUAGE, "must be a language code such as en or en_US"),
    "sms.provider": _one_of("africastalking"),
    "sms.api_base": _check_base_url,
    "sms.username": _no_whitespace,
    "sms.api_key": _token(),
    "sms.callback_token": _token(min_length=16),
    "sms.sender_id": _matching(
        _SENDER_ID,
        "must be at most 11 letters or digits (an alphanumeric sender ID or a short code)",
        optional=True,
    ),
    "mpesa.api_base": _check_base_url,
    "mpesa.consumer_key": _token(),
    "mpesa.consumer_secret": _token(),
    "mpesa.shortcode": _digits,
    "mpesa.passkey": _token(),
    "mpesa.transaction_type": _one_of(_PAYBILL, _BUY_GOODS),
    "mpesa.till_number": _digits,
    "mpesa.callback_url": _check_callback_url,
    "mpesa.callback_secret": _check_callback_secret,
    "mpesa.max_amount": _between(1, MPESA_MAX_AMOUNT),
    "mpesa.query_after_s": _at_least(1),
    "mpesa.expire_after_s": _at_least(1),
    "mpesa.callback_allow_ips": _check_networks,
    # 0 turns the spacing off (tests); Daraja itself wants >= 60 s per subscriber.
    "mpesa.push_min_interval_s": _at_least(0),
    "mpesa.push_limit": _at_least(1),
    "mpesa.push_window_s": _at_least(1),
    "chat.nudge_after_s": _at_least(1),
    "chat.close_after_s": _at_least(1),
    "chat.merchant_rate_per_min": _at_least(1),
    "chat.customer_hint_interval_s": _at_least(1),
    "chat.remind_interval_s": _at_least(1),
    "outbox.max_attempts": _at_least(1),
    "outbox.backoff_base_s": _at_least(1),
    "outbox.backoff_max_s": _at_least(1),
    # 0 = fall back to SMS only when WhatsApp fails.
    "outbox.fallback_after_s": _at_least(0),
    "outbox.lease_s": _at_least(15),
    "outbox.max_in_flight": _between(1, 1000),
    "mpesa.max_in_flight": _between(1, 1000),
    "metrics.token": _token(),
    "log.level": _one_of("debug", "info", "warning", "error", fold_case=True),
    "sandbox.latency_ms": _at_least(0),
    "sandbox.customer_msisdn": _msisdn(optional=False),
    "sandbox.status_delay_ms": _at_least(0),
    "sandbox.callback_delay_ms": _at_least(0),
    "sandbox.prompt_timeout_s": _at_least(1),
    "sandbox.stk_lock_s": _at_least(0),
}


# --- loading ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Given:
    value: Any
    source: Literal["file", "env"]
    env_name: str = ""


def _show(name: str) -> str:
    # A quoted TOML key may hold a newline; problems must stay one line each.
    return name if name.isprintable() else repr(name)


def _problem(dotted: str, message: str, given: _Given | None = None) -> str:
    where = f" (from env {given.env_name})" if given is not None and given.source == "env" else ""
    return f"config: {dotted}: {message}{where}"


def _suggest(dotted: str) -> str:
    leaf = dotted.rpartition(".")[2]
    same_leaf = [k for k in _BY_DOTTED if k.rpartition(".")[2] == leaf and k != dotted]
    if len(same_leaf) == 1:
        return f" (did you mean {same_leaf[0]}?)"
    others = [k for k in _BY_DOTTED if k != dotted]
    close = difflib.get_close_matches(dotted, others, n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


def resolve_config_path(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """``--config`` if given, else ``$INVOICEIQ_CONFIG``, else ``./config.toml`` if it exists,
    else None (built-in defaults). The first two are returned even if missing, so that
    load_settings reports them: a file someone named must exist."""
    if explicit:
        return Path(explicit).expanduser()
    named = env.get(CONFIG_PATH_ENV, "").strip()
    if named:
        return Path(named).expanduser()
    local = Path.cwd() / DEFAULT_CONFIG_FILE
    return local if local.exists() else None


def _read_file(path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh), None
    except FileNotFoundError:
        return {}, f"config: {path}: file not found"
    except IsADirectoryError:
        return {}, f"config: {path}: is a directory, not a file"
    except PermissionError:
        return {}, f"config: {path}: permission denied"
    except UnicodeDecodeError:
        return {}, f"config: {path}: invalid TOML: not UTF-8 text"
    except tomllib.TOMLDecodeError as exc:
        detail = " ".join(str(exc).split())
        return {}, f"config: {path}: invalid TOML: {detail}"
    except OSError as exc:
        return {}, f"config: {path}: cannot read: {exc.strerror or exc}"


def _scan_file(doc: Mapping[str, Any]) -> tuple[dict[str, _Given], list[str]]:
    given: dict[str, _Given] = {}
    problems: list[str] = []
    for name, value in doc.items():
        if name in _BY_DOTTED and "." not in name:  # top-level key (mode)
            given[name] = _Given(value, "file")
        elif name in _SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"config: {name}: must be a table ([{name}])")
                continue
            for key, item in value.items():
                dotted = f"{name}.{key}"
                if dotted in _BY_DOTTED:
                    given[dotted] = _Given(item, "file")
                else:
                    problems.append(f"config: {_show(dotted)}: unknown key{_suggest(dotted)}")
        elif isinstance(value, dict):
            close = difflib.get_close_matches(name, list(_SECTIONS), n=1, cutoff=0.7)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            problems.append(f"config: {_show(name)}: unknown section{hint}")
        else:
            problems.append(f"config: {_show(name)}: unknown key{_suggest(name)}")
    return given, problems


def _scan_env(env: Mapping[str, str]) -> tuple[dict[str, _Given], list[str]]:
    given: dict[str, _Given] = {}
    problems: list[str] = []
    # An empty variable counts as unset: the env file ships blank placeholders (WABA_TOKEN=),
    # and those must not wipe a value set in config.toml.
    for alias, dotted in ENV_ALIASES.items():
        value = env.get(alias)
        if value is not None and value.strip():
            given[dotted] = _Given(value, "env", alias)
    for name in sorted(env):  # after the aliases, so the INVOICEIQ_ form wins
        if not name.startswith(ENV_PREFIX) or name == CONFIG_PATH_ENV:
            continue
        if name.startswith(_TEST_ENV_PREFIX):
            continue
        target = _ENV_NAMES.get(name)
        if target is None:
            # Compare without the shared prefix, which would make every name look close.
            suffixes = [n.removeprefix(ENV_PREFIX) for n in _ENV_NAMES]
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.8)
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            problems.append(f"config: env {_show(name)}: unknown key{hint}")
        elif env[name].strip():
            given[target] = _Given(env[name], "env", name)
    return given, problems


def _coerce(key: _Key, given: _Given) -> Any:
    value = given.value
    from_env = given.source == "env"
    if key.kind == "str":
        if isinstance(value, str):
            return value.strip()
        if isinstance(value, int) and not isinstance(value, bool):
            # shortcode = 174379 is the classic slip; codes and ids are strings.
            raise _Invalid("must be a string (put the value in quotes)")
        raise _Invalid("must be a string")
    if key.kind == "int":
        if from_env:
            text = value.strip()
            if _INT.fullmatch(text):
                return int(text)
            raise _Invalid("must be an integer")
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("must be an integer")
        return value
    if from_env:
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(item.strip() for item in value)
    raise _Invalid("must be a list of strings")


def load_settings(path: Path | None, env: Mapping[str, str]) -> Settings:
    """Defaults, then ``path`` (if any), then ``env``; raise ConfigError listing every problem."""
    env_given, env_problems = _scan_env(env)
    file_given: dict[str, _Given] = {}
    problems: list[str] = []
    if path is not None:
        doc, unreadable = _read_file(Path(path))
        if unreadable is not None:
            # Validating the rest would only report the file's missing values as noise.
            raise ConfigError([unreadable, *env_problems])
        file_given, problems = _scan_file(doc)
    problems.extend(env_problems)
    given = {**file_given, **env_given}

    values: dict[str, Any] = {k.dotted: k.default for k in _KEYS}
    # Per key, so the problems come out in the order of the file's sections, not of the passes.
    by_key: dict[str, list[str]] = {}

    def report(dotted: str, messages: tuple[str, ...]) -> None:
        by_key.setdefault(dotted, []).extend(_problem(dotted, m, given.get(dotted)) for m in messages)
        values[dotted] = _BY_DOTTED[dotted].default

    for dotted, item in given.items():
        try:
            values[dotted] = _coerce(_BY_DOTTED[dotted], item)
        except _Invalid as exc:
            report(dotted, exc.messages)

    mode, mode_source, mode_problem = _resolve_mode(values, given.get("mode"), set(by_key))
    if mode_problem:
        report("mode", (mode_problem,))
    live = mode == "live"

    for key in _KEYS:
        if key.dotted == "mode" or key.dotted in by_key:
            continue
        try:
            values[key.dotted] = _VALIDATORS[key.dotted](values[key.dotted], live)
        except _Invalid as exc:
            report(key.dotted, exc.messages)

    failed = set(by_key)
    problems.extend(line for key in _KEYS for line in by_key.get(key.dotted, ()))
    problems.extend(_cross_checks(values, failed))
    settings = _assemble(values, mode, mode_source)

    if live:
        missing = [k for k in missing_live_keys(settings) if k not in failed]
        for dotted in missing:
            if dotted == "server.public_url" and settings.server.public_url:
                problems.append(_problem(dotted, "must be an https URL in live mode", given.get(dotted)))
            else:
                problems.append(_problem(dotted, "required in live mode"))
        if missing and mode_source == "default":
            # Someone who set one token to try things out learns why they face a dozen more.
            problems.append(
                f"config: mode: {describe_mode(settings)}; set mode = \"sandbox\" "
                f"(or INVOICEIQ_MODE=sandbox) to run against the simulated providers"
            )

    if problems:
        raise ConfigError(problems)
    return settings


def _resolve_mode(
    values: Mapping[str, Any], given: _Given | None, failed: set[str]
) -> tuple[Mode, ModeSource, str | None]:
    """(mode, where it came from, problem or None)."""
    asked = str(values["mode"]).lower() if given is not None and "mode" not in failed else ""
    if given is not None and asked == "sandbox":
        return "sandbox", given.source, None
    if given is not None and asked == "live":
        return "live", given.source, None
    problem = 'must be "sandbox" or "live"' if asked else None
    # "" (or nothing) means: decide from whether real provider credentials are configured.
    has_credentials = any(values[k] for k in _CREDENTIAL_KEYS if k not in failed)
    return ("live" if has_credentials else "sandbox"), "default", problem


def _cross_checks(values: Mapping[str, Any], failed: set[str]) -> list[str]:
    def ok(*keys: str) -> bool:
        return not failed.intersection(keys)

    problems = []
    if ok("chat.nudge_after_s", "chat.close_after_s") and (
        values["chat.close_after_s"] <= values["chat.nudge_after_s"]
    ):
        problems.append(_problem("chat.close_after_s", "must be greater than chat.nudge_after_s"))
    if ok("mpesa.transaction_type", "mpesa.till_number") and (
        values["mpesa.transaction_type"] == _BUY_GOODS and not values["mpesa.till_number"]
    ):
        problems.append(
            _problem("mpesa.till_number", f"required when mpesa.transaction_type is {_BUY_GOODS}")
        )
    if ok("mpesa.query_after_s", "mpesa.expire_after_s") and (
        values["mpesa.expire_after_s"] <= values["mpesa.query_after_s"]
    ):
        # Otherwise an attempt expires before the status query that could have saved it runs.
        problems.append(_problem("mpesa.expire_after_s", "must be greater than mpesa.query_after_s"))
    if ok("outbox.backoff_base_s", "outbox.backoff_max_s") and (
        values["outbox.backoff_max_s"] < values["outbox.backoff_base_s"]
    ):
        problems.append(_problem("outbox.backoff_max_s", "must be at least outbox.backoff_base_s"))
    return problems


def _assemble(values: Mapping[str, Any], mode: Mode, mode_source: ModeSource) -> Settings:
    sections = {
        name: cls(**{f.name: values[f"{name}.{f.name}"] for f in fields(cls)})
        for name, cls in _SECTIONS.items()
    }
    return Settings(mode=mode, mode_source=mode_source, **sections)


def _value(settings: Settings, dotted: str) -> Any:
    section, _, name = dotted.partition(".")
    return getattr(getattr(settings, section), name)


def missing_live_keys(settings: Settings) -> list[str]:
    """Keys live mode needs that are empty (and server.public_url unless it is https),
    whatever mode ``settings`` is in, so check-config can say what going live still takes."""
    missing = []
    for key in _KEYS:
        if key.dotted not in _LIVE_REQUIRED:
            continue
        value = _value(settings, key.dotted)
        if key.dotted == "server.public_url":
            if not value.startswith("https://"):
                missing.append(key.dotted)
        elif not value:
            missing.append(key.dotted)
    return missing


def describe_mode(settings: Settings) -> str:
    """Why the daemon runs in this mode, for the start-up log and check-config."""
    if settings.mode_source == "file":
        return f"{settings.mode} (set in the config file)"
    if settings.mode_source == "env":
        return f"{settings.mode} (set by {env_var_name('mode')})"
    configured = [k for k in _CREDENTIAL_KEYS if _value(settings, k)]
    if settings.mode == "live":
        return f"live (default: provider credentials are set: {', '.join(configured) or 'none'})"
    return "sandbox (default: no provider credentials are set)"


# --- showing the effective configuration ------------------------------------------------------

_SECRETISH_PARAM = re.compile(r"pass|secret|token|key|sig", re.IGNORECASE)


def _mask_url(dotted: str, url: str) -> str:
    """Hide a URL's password and secret-looking query values; the callback URL's whole query,
    since integrators put the shared secret there."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "***"
    netloc, query, changed = parts.netloc, parts.query, False
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
        changed = True
    if query:
        pairs = []
        for pair in query.split("&"):
            name, sep, item = pair.partition("=")
            if sep and item and (dotted == "mpesa.callback_url" or _SECRETISH_PARAM.search(name)):
                pairs.append(f"{name}=***")
                changed = True
            else:
                pairs.append(pair)
        query = "&".join(pairs)
    if not changed:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def effective_config(settings: Settings) -> dict[str, Any]:
    """Every key's effective value, nested by section; secrets "***" when set, "" when not."""
    out: dict[str, Any] = {"mode": settings.mode}
    for section in _SECTIONS:
        values: dict[str, Any] = {}
        for f in fields(getattr(settings, section)):
            dotted = f"{section}.{f.name}"
            value = _value(settings, dotted)
            if dotted in SECRET_KEYS:
                value = "***" if value else ""
            elif dotted in _URL_KEYS:
                value = _mask_url(dotted, value)
            elif isinstance(value, tuple):
                value = list(value)
            values[f.name] = value
        out[section] = values
    return out


_TOML_ESCAPES: Final[Mapping[str, str]] = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_string(item) for item in value) + "]"
    return str(value)


def render_effective_config(settings: Settings) -> str:
    """effective_config as TOML (it parses back), for ``invoiceiq check-config``."""
    data = effective_config(settings)
    lines = [
        '# InvoiceIQ effective configuration. Secrets show "***" when set and "" when empty.',
        f"mode = {_toml_value(data['mode'])}  # {describe_mode(settings)}",
    ]
    for section in _SECTIONS:
        lines += ["", f"[{section}]"]
        for name, value in data[section].items():
            line = f"{name} = {_toml_value(value)}"
            if section == "server" and name == "public_url" and not value:
                line += f"  # empty: {settings.server.public_base_url}"
            lines.append(line)
    return "\n".join(lines) + "\n"
