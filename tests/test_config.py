"""invoiceiq.config: defaults, file, environment, every validation message, masking, mode."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from pathlib import Path

import pytest

from invoiceiq import config as cfg
from invoiceiq.config import (
    ENV_ALIASES,
    SECRET_KEYS,
    ConfigError,
    Settings,
    describe_mode,
    effective_config,
    env_var_name,
    load_settings,
    missing_live_keys,
    render_effective_config,
    resolve_config_path,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config.toml.example"
SYSTEMD_ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "invoiceiq.env.example"

# Shaped like the real things, none of them real (the passkey is Daraja's public sandbox one).
SECRETS = {
    "WABA_TOKEN": "EAAGm0PX4ZCpsBAPdT1qZB7Xn0ZAvTq9ZCkLrE8sQyWZBu3hF5ZAx",
    "WABA_VERIFY_TOKEN": "vT-8kq2Lx0pZr7mN4wY6aBcD",
    "WABA_APP_SECRET": "3f9a1c7e5b2d4f608a1b9c3d7e5f2a4b",
    "SMS_API_KEY": "atsk_5f1e0c2b9a8d7e6f5c4b3a29180706f5e4d3c2b1",
    "SMS_CALLBACK_TOKEN": "smscb_4Rt8Yu2Io6Pa0Sd3Fg",
    "MPESA_CONSUMER_KEY": "GvzjNnYgNJtwgwfLBkZh65VPwfuKvs0V",
    "MPESA_CONSUMER_SECRET": "oOpJICRVlyrGSAkMq8ZbTw2x",
    "MPESA_PASSKEY": "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919",
    "MPESA_CALLBACK_SECRET": "9c2e7b41d0a35f86e1b47c09d2f3a6b8",
    "ADMIN_TOKEN": "adm_Zq3Xv8Lr2Nw5Yt7Pk9Jm",
    "INVOICEIQ_METRICS_TOKEN": "met_7Hc2Vn9Qx4Rb6Ts1Wd",
}
LIVE_ENV = {
    **SECRETS,
    "WABA_PHONE_ID": "106540352242922",
    "SMS_USERNAME": "invoiceiq",
    "MPESA_SHORTCODE": "174379",
    "MERCHANT_MSISDN": "0712 345-678",
    "INVOICEIQ_SERVER_PUBLIC_URL": "https://invoices.example.co.ke/",
}
BANNED_NOTE = (
    "Safaricom rejects callback URLs containing m-pesa, mpesa, safaricom, exe, exec, cmd, sql "
    "or query, in any case"
)
BIND_FORM = "must be host:port (e.g. 127.0.0.1:8000 or [::1]:8000)"
DB_FORMS = "must be sqlite:///relative/path, sqlite:////absolute/path or postgresql://user@host/db"
MSISDN_FORM = "must be a Kenyan mobile number (07XXXXXXXX, 01XXXXXXXX or 2547XXXXXXXX)"


@pytest.fixture
def write(tmp_path: Path):
    def _write(text: str) -> Path:
        path = tmp_path / "config.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def problems(path: Path | None, env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- defaults and file values ---------------------------------------------------------------


def test_defaults_without_file_or_env() -> None:
    s = load_settings(None, {})
    assert s == Settings()
    assert (s.mode, s.mode_source) == ("sandbox", "default")
    assert s.server.bind == "127.0.0.1:8000"
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8000)
    assert s.server.public_url == ""
    assert s.public_base_url == s.server.public_base_url == "http://127.0.0.1:8000"
    assert s.server.shutdown_grace_s == 10
    assert s.server.max_body_bytes == 65536
    assert s.server.trusted_proxies == ()
    assert s.server.event_loop == "auto"
    assert s.database.url == "sqlite:///./data.db"
    assert s.is_sqlite and s.sqlite_path == Path("data.db")
    assert (s.merchant.msisdn, s.merchant.name) == ("", "My Business")
    assert s.admin.token == ""
    assert s.whatsapp.api_base == "https://graph.facebook.com/v25.0"
    assert (s.whatsapp.invoice_template, s.whatsapp.template_language) == ("invoice_notification", "en")
    assert (s.sms.provider, s.sms.api_base) == ("africastalking", "https://api.africastalking.com")
    assert s.mpesa.api_base == "https://sandbox.safaricom.co.ke"
    assert s.mpesa.transaction_type == "CustomerPayBillOnline"
    assert (s.mpesa.max_amount, s.mpesa.query_after_s, s.mpesa.expire_after_s) == (250000, 60, 600)
    assert (s.mpesa.push_min_interval_s, s.mpesa.push_limit, s.mpesa.push_window_s) == (60, 3, 600)
    assert s.mpesa.callback_allow_ips == ()
    assert dataclasses.astuple(s.chat) == (300, 900, 30, 3600, 3600)
    assert dataclasses.astuple(s.outbox) == (10, 2, 600, 0, 60, 96)
    assert s.metrics.token == ""
    assert s.log.level == "info"
    assert (s.sandbox.latency_ms, s.sandbox.customer_msisdn) == (0, "254712345678")
    assert missing_live_keys(s) == [
        "server.public_url",
        "merchant.msisdn",
        "whatsapp.token",
        "whatsapp.phone_id",
        "whatsapp.verify_token",
        "whatsapp.app_secret",
        "sms.username",
        "sms.api_key",
        "sms.callback_token",
        "mpesa.consumer_key",
        "mpesa.consumer_secret",
        "mpesa.shortcode",
        "mpesa.passkey",
    ]


def test_file_values_are_read_and_normalised(write) -> None:
    path = write(
        """
mode = "sandbox"
[server]
bind = "[::1]:9000"
public_url = "HTTPS://invoices.example.co.ke/iq/"
shutdown_grace_s = 0
max_body_bytes = 1024
trusted_proxies = [" 127.0.0.1 ", "10.0.0.0/8", "::1"]
event_loop = "asyncio"
[database]
url = "postgres://iq@db.internal:5432/iq"
[merchant]
msisdn = "+254 712-345-678"
name = "Mama Mboga Ltd"
[whatsapp]
api_base = "https://graph.facebook.com/v24.0/"
phone_id = "106540352242922"
invoice_template = "invoice_notice_v1"
template_language = "en_US"
[sms]
username = "sandbox"
api_base = "https://api.sandbox.africastalking.com"
sender_id = "MAMAMBOGA"
[mpesa]
shortcode = "174379"
transaction_type = "CustomerBuyGoodsOnline"
till_number = "5432100"
callback_url = "http://203.0.113.7:8000/payments/stk/callback/Cb7sec-0123456789abcd"
max_amount = 70000
callback_allow_ips = ["196.201.214.200", "196.201.212.0/24"]
push_min_interval_s = 0
[chat]
nudge_after_s = 60
close_after_s = 61
[outbox]
backoff_base_s = 5
backoff_max_s = 5
[log]
level = "DEBUG"
[sandbox]
latency_ms = 250
customer_msisdn = "0110123456"
"""
    )
    s = load_settings(path, {})
    assert (s.mode, s.mode_source) == ("sandbox", "file")
    assert (s.server.host, s.server.port) == ("::1", 9000)
    assert s.server.public_url == "https://invoices.example.co.ke/iq"
    assert s.public_base_url == "https://invoices.example.co.ke/iq"
    assert s.server.shutdown_grace_s == 0
    assert s.server.trusted_proxies == ("127.0.0.1", "10.0.0.0/8", "::1")
    assert s.server.event_loop == "asyncio"
    assert s.server.trusted_proxy_networks[1] == ipaddress.ip_network("10.0.0.0/8")
    assert s.database.url == "postgresql://iq@db.internal:5432/iq"
    assert not s.is_sqlite and s.sqlite_path is None
    assert s.merchant.msisdn == "254712345678"
    assert s.merchant.name == "Mama Mboga Ltd"
    assert s.whatsapp.api_base == "https://graph.facebook.com/v24.0"
    assert s.whatsapp.template_language == "en_US"
    assert s.sms.sender_id == "MAMAMBOGA"
    assert s.mpesa.transaction_type == "CustomerBuyGoodsOnline"
    assert s.mpesa.till_number == "5432100"
    assert s.mpesa.callback_url == "http://203.0.113.7:8000/payments/stk/callback/Cb7sec-0123456789abcd"  # http: sandbox
    assert ipaddress.ip_address("196.201.212.9") in s.mpesa.callback_allow_networks[1]
    assert s.mpesa.push_min_interval_s == 0
    assert (s.chat.nudge_after_s, s.chat.close_after_s) == (60, 61)
    assert s.log.level == "debug"
    assert (s.sandbox.latency_ms, s.sandbox.customer_msisdn) == (250, "254110123456")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///./data.db", Path("data.db")),
        ("sqlite:///var/data.db", Path("var/data.db")),
        ("sqlite:////var/lib/invoiceiq/data.db", Path("/var/lib/invoiceiq/data.db")),
        ("sqlite:////var/lib/invoiceiq/data.db?timeout=5", Path("/var/lib/invoiceiq/data.db")),
    ],
)
def test_sqlite_path(url: str, path: Path) -> None:
    s = load_settings(None, {"DATABASE_URL": url})
    assert s.is_sqlite and s.sqlite_path == path


@pytest.mark.parametrize(
    "typed",
    ["0712345678", "712345678", "254712345678", "+254712345678", "+254 712 345 678", "0712-345-678"],
)
def test_merchant_msisdn_forms(typed: str) -> None:
    assert load_settings(None, {"MERCHANT_MSISDN": typed}).merchant.msisdn == "254712345678"


@pytest.mark.parametrize("typed", ["0110123456", "110123456", "254110123456", "+254110123456"])
def test_merchant_msisdn_01_numbers(typed: str) -> None:
    assert load_settings(None, {"MERCHANT_MSISDN": typed}).merchant.msisdn == "254110123456"


def test_settings_are_frozen() -> None:
    s = load_settings(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mode = "live"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mpesa.shortcode = "1"  # type: ignore[misc]


# --- environment ----------------------------------------------------------------------------


def test_env_overrides_file(write) -> None:
    path = write(
        '[mpesa]\nshortcode = "111111"\npush_limit = 5\ncallback_allow_ips = ["10.0.0.1"]\n'
        '[log]\nlevel = "warning"\n'
    )
    s = load_settings(
        path,
        {
            "INVOICEIQ_MPESA_SHORTCODE": "174379",
            "INVOICEIQ_MPESA_PUSH_LIMIT": " 7 ",
            "INVOICEIQ_MPESA_CALLBACK_ALLOW_IPS": "196.201.214.200, 196.201.212.0/24,",
            "INVOICEIQ_SERVER_BIND": "0.0.0.0:8080",
            "INVOICEIQ_MODE": "sandbox",
        },
    )
    assert s.mpesa.shortcode == "174379"
    assert s.mpesa.push_limit == 7
    assert s.mpesa.callback_allow_ips == ("196.201.214.200", "196.201.212.0/24")
    assert s.server.port == 8080
    assert s.log.level == "warning"  # untouched file value
    assert s.mode_source == "env"


ALIAS_SAMPLES = {
    "DATABASE_URL": ("postgresql://iq:pw@db:5432/iq", "postgresql://iq:pw@db:5432/iq"),
    "WABA_TOKEN": (SECRETS["WABA_TOKEN"], SECRETS["WABA_TOKEN"]),
    "WABA_PHONE_ID": ("106540352242922", "106540352242922"),
    "WABA_VERIFY_TOKEN": (SECRETS["WABA_VERIFY_TOKEN"], SECRETS["WABA_VERIFY_TOKEN"]),
    "WABA_APP_SECRET": (SECRETS["WABA_APP_SECRET"], SECRETS["WABA_APP_SECRET"]),
    "SMS_API_KEY": (SECRETS["SMS_API_KEY"], SECRETS["SMS_API_KEY"]),
    "SMS_USERNAME": ("invoiceiq", "invoiceiq"),
    "SMS_CALLBACK_TOKEN": ("sms-callback-token-0123456789", "sms-callback-token-0123456789"),
    "MPESA_CONSUMER_KEY": (SECRETS["MPESA_CONSUMER_KEY"], SECRETS["MPESA_CONSUMER_KEY"]),
    "MPESA_CONSUMER_SECRET": (SECRETS["MPESA_CONSUMER_SECRET"], SECRETS["MPESA_CONSUMER_SECRET"]),
    "MPESA_SHORTCODE": ("174379", "174379"),
    "MPESA_PASSKEY": (SECRETS["MPESA_PASSKEY"], SECRETS["MPESA_PASSKEY"]),
    "MPESA_CALLBACK_URL": ("https://iq.example.co.ke/payments/stk/callback/Cb7sec-0123456789abcd",) * 2,
    "MPESA_CALLBACK_SECRET": (SECRETS["MPESA_CALLBACK_SECRET"], SECRETS["MPESA_CALLBACK_SECRET"]),
    "MERCHANT_MSISDN": ("0712345678", "254712345678"),
    "ADMIN_TOKEN": (SECRETS["ADMIN_TOKEN"], SECRETS["ADMIN_TOKEN"]),
}


def test_alias_samples_cover_every_alias() -> None:
    assert set(ALIAS_SAMPLES) == set(ENV_ALIASES)


@pytest.mark.parametrize("alias", sorted(ENV_ALIASES))
def test_every_alias_overrides_the_file(alias: str, write) -> None:
    dotted = ENV_ALIASES[alias]
    section, _, key = dotted.partition(".")
    given, expected = ALIAS_SAMPLES[alias]
    kind = cfg._BY_DOTTED[dotted].kind
    assert kind == "str"
    file_value = "" if dotted in SECRET_KEYS else cfg._BY_DOTTED[dotted].default
    path = write(f'mode = "sandbox"\n[{section}]\n{key} = "{file_value}"\n')
    s = load_settings(path, {alias: given})
    assert getattr(getattr(s, section), key) == expected


@pytest.mark.parametrize("alias", sorted(ENV_ALIASES))
def test_invoiceiq_form_beats_alias(alias: str) -> None:
    dotted = ENV_ALIASES[alias]
    section, _, key = dotted.partition(".")
    loser, _ = ALIAS_SAMPLES[alias]
    winners = {
        "database.url": "sqlite:////srv/iq.db",
        "whatsapp.phone_id": "999",
        "mpesa.shortcode": "600000",
        "merchant.msisdn": "254110000001",
        "mpesa.callback_url": "https://other.example.co.ke/payments/stk/callback/Cb7sec-0123456789abcd",
        "sms.username": "sandbox",
    }
    winner = winners.get(dotted, "Winner-0123456789abcdef")
    env = {alias: loser, env_var_name(dotted): winner, "INVOICEIQ_MODE": "sandbox"}
    s = load_settings(None, env)
    assert getattr(getattr(s, section), key) == winner


def test_empty_env_variable_counts_as_unset(write) -> None:
    # The systemd env file ships blank placeholders; they must not wipe file values.
    path = write('[mpesa]\nshortcode = "174379"\n[chat]\nnudge_after_s = 120\n')
    s = load_settings(
        path, {"MPESA_SHORTCODE": "", "INVOICEIQ_CHAT_NUDGE_AFTER_S": "  ", "WABA_TOKEN": ""}
    )
    assert s.mpesa.shortcode == "174379"
    assert s.chat.nudge_after_s == 120
    assert s.mode == "sandbox"


def test_harness_and_config_path_variables_are_not_keys() -> None:
    env = {
        "INVOICEIQ_TEST_POSTGRES_URL": "postgresql://x@y/z",
        "INVOICEIQ_TEST_ANYTHING": "1",
        "INVOICEIQ_CONFIG": "/etc/invoiceiq/config.toml",
        "PATH": "/usr/bin",
        "invoiceiq_mode": "nonsense",
    }
    assert load_settings(None, env) == Settings()


def test_env_names_follow_section_and_key() -> None:
    assert env_var_name("mode") == "INVOICEIQ_MODE"
    assert env_var_name("mpesa.callback_allow_ips") == "INVOICEIQ_MPESA_CALLBACK_ALLOW_IPS"
    assert load_settings(None, {"INVOICEIQ_SANDBOX_LATENCY_MS": "40"}).sandbox.latency_ms == 40


# --- every validation message ---------------------------------------------------------------

FILE_CASES = [
    ('[mpesa]\nshortcode = "12a"', "config: mpesa.shortcode: must be digits"),
    ("[mpesa]\nshortcode = 174379", "config: mpesa.shortcode: must be a string (put the value in quotes)"),
    ('[mpesa]\ntill_number = "T123"\n', "config: mpesa.till_number: must be digits"),
    ('[whatsapp]\nphone_id = "1065-4035"', "config: whatsapp.phone_id: must be digits"),
    ('[mpesa]\npush_limit = "3"', "config: mpesa.push_limit: must be an integer"),
    ("[mpesa]\npush_limit = true", "config: mpesa.push_limit: must be an integer"),
    ("[mpesa]\npush_limit = 2.5", "config: mpesa.push_limit: must be an integer"),
    ("[mpesa]\npush_limit = 0", "config: mpesa.push_limit: must be a positive integer"),
    ("[server]\nshutdown_grace_s = -1", "config: server.shutdown_grace_s: must be 0 or more"),
    ("[mpesa]\nmax_amount = 250001", "config: mpesa.max_amount: must be between 1 and 250000"),
    ("[mpesa]\nmax_amount = 0", "config: mpesa.max_amount: must be between 1 and 250000"),
    ('[server]\ntrusted_proxies = "127.0.0.1"', "config: server.trusted_proxies: must be a list of strings"),
    ("[server]\ntrusted_proxies = [1]", "config: server.trusted_proxies: must be a list of strings"),
    (
        '[server]\ntrusted_proxies = ["10.0.0.300"]',
        "config: server.trusted_proxies: '10.0.0.300' is not an IP address or CIDR network",
    ),
    (
        '[mpesa]\ncallback_allow_ips = ["196.201.214.1/24"]',
        "config: mpesa.callback_allow_ips: '196.201.214.1/24' has host bits set "
        "(did you mean '196.201.214.0/24'?)",
    ),
    ('[server]\nbind = "localhost"', f"config: server.bind: {BIND_FORM}"),
    ('[server]\nbind = ":8000"', f"config: server.bind: {BIND_FORM}"),
    ('[server]\nbind = "::1:8000"', f"config: server.bind: {BIND_FORM}"),
    ('[server]\nbind = "[::g]:8000"', f"config: server.bind: {BIND_FORM}"),
    ('[server]\nbind = "127.0.0.1:http"', f"config: server.bind: {BIND_FORM}"),
    ('[server]\nbind = "999.0.0.1:8000"', f"config: server.bind: {BIND_FORM}"),
    ('[server]\nbind = "bad_host:8000"', f"config: server.bind: {BIND_FORM}"),
    ('[server]\nbind = "127.0.0.1:65536"', "config: server.bind: port must be between 0 and 65535"),
    (
        '[server]\npublic_url = "invoices.example.co.ke"',
        "config: server.public_url: must be an absolute http(s) URL",
    ),
    (
        '[server]\npublic_url = "ftp://example.co.ke"',
        "config: server.public_url: must be an absolute http(s) URL",
    ),
    ('[server]\npublic_url = "https://"', "config: server.public_url: must be an absolute http(s) URL"),
    (
        '[server]\npublic_url = "https://x.co.ke:99999"',
        "config: server.public_url: must be an absolute http(s) URL",
    ),
    (
        '[server]\npublic_url = "https://x.co.ke/?a=1"',
        "config: server.public_url: must not have a query string or fragment",
    ),
    (
        '[server]\npublic_url = "https://x.co.ke/#top"',
        "config: server.public_url: must not have a query string or fragment",
    ),
    ('[server]\npublic_url = "https://x .co.ke"', "config: server.public_url: must not contain whitespace"),
    (
        '[mpesa]\napi_base = "sandbox.safaricom.co.ke"',
        "config: mpesa.api_base: must be an absolute http(s) URL",
    ),
    ('[whatsapp]\napi_base = ""', "config: whatsapp.api_base: must be an absolute http(s) URL"),
    ('[database]\nurl = "mysql://iq@db/iq"', f"config: database.url: {DB_FORMS}"),
    ('[database]\nurl = "sqlite://data.db"', f"config: database.url: {DB_FORMS}"),
    ('[database]\nurl = "sqlite:///"', f"config: database.url: {DB_FORMS}"),
    ('[database]\nurl = "postgresql://"', f"config: database.url: {DB_FORMS}"),
    ('[database]\nurl = ""', f"config: database.url: {DB_FORMS}"),
    ('[database]\nurl = "sqlite:///my data.db"', "config: database.url: must not contain whitespace"),
    ('[merchant]\nmsisdn = "0812345678"', f"config: merchant.msisdn: {MSISDN_FORM}"),
    ('[merchant]\nmsisdn = "+1 712 345 678"', f"config: merchant.msisdn: {MSISDN_FORM}"),
    ('[merchant]\nmsisdn = "07123456789"', f"config: merchant.msisdn: {MSISDN_FORM}"),
    ('[merchant]\nname = "  "', "config: merchant.name: must not be empty"),
    ('[sandbox]\ncustomer_msisdn = ""', f"config: sandbox.customer_msisdn: {MSISDN_FORM}"),
    ('[admin]\ntoken = "short-token"', "config: admin.token: must be at least 16 characters"),
    ('[metrics]\ntoken = "met abc"', "config: metrics.token: must not contain whitespace"),
    (
        '[whatsapp]\ninvoice_template = "Invoice-Notice"',
        "config: whatsapp.invoice_template: must be lowercase letters, digits and '_' (a Meta template name)",
    ),
    (
        '[whatsapp]\ntemplate_language = "english"',
        "config: whatsapp.template_language: must be a language code such as en or en_US",
    ),
    ('[sms]\nprovider = "twilio"', 'config: sms.provider: must be "africastalking"'),
    ('[server]\nevent_loop = "trio"', 'config: server.event_loop: must be "auto", "asyncio" or "uvloop"'),
    ('[sms]\nusername = "my app"', "config: sms.username: must not contain whitespace"),
    (
        '[sms]\nsender_id = "MamaMbogaLtd"',
        "config: sms.sender_id: must be at most 11 letters or digits (an alphanumeric sender ID or a short code)",
    ),
    (
        '[sms]\nsender_id = "Mama Mboga"',
        "config: sms.sender_id: must be at most 11 letters or digits (an alphanumeric sender ID or a short code)",
    ),
    (
        '[mpesa]\ntransaction_type = "PayBill"',
        'config: mpesa.transaction_type: must be "CustomerPayBillOnline" or "CustomerBuyGoodsOnline"',
    ),
    (
        '[mpesa]\ntransaction_type = "CustomerBuyGoodsOnline"',
        "config: mpesa.till_number: required when mpesa.transaction_type is CustomerBuyGoodsOnline",
    ),
    (
        '[mpesa]\ncallback_url = "/payments/stk/callback"',
        "config: mpesa.callback_url: must be an absolute http(s) URL",
    ),
    (
        '[mpesa]\ncallback_url = "https://x.co.ke/cb /x"',
        "config: mpesa.callback_url: must not contain whitespace",
    ),
    ('[mpesa]\ncallback_secret = "abc123"', "config: mpesa.callback_secret: must be at least 16 characters"),
    (
        '[mpesa]\ncallback_secret = "abcdefgh/1234567890"',
        "config: mpesa.callback_secret: must be letters, digits, '-' and '_' only (it goes into the callback URL path)",
    ),
    (
        '[mpesa]\ncallback_secret = "abcdefSQL1234567890"',
        f"config: mpesa.callback_secret: must not contain a word Safaricom rejects ({BANNED_NOTE})",
    ),
    (
        "[chat]\nnudge_after_s = 300\nclose_after_s = 300",
        "config: chat.close_after_s: must be greater than chat.nudge_after_s",
    ),
    ("[chat]\nclose_after_s = 200", "config: chat.close_after_s: must be greater than chat.nudge_after_s"),
    (
        "[mpesa]\nquery_after_s = 600",
        "config: mpesa.expire_after_s: must be greater than mpesa.query_after_s",
    ),
    (
        "[outbox]\nbackoff_base_s = 700",
        "config: outbox.backoff_max_s: must be at least outbox.backoff_base_s",
    ),
    ("[outbox]\nmax_attempts = 0", "config: outbox.max_attempts: must be a positive integer"),
    ("[outbox]\nmax_in_flight = 0", "config: outbox.max_in_flight: must be between 1 and 1000"),
    ("[mpesa]\nmax_in_flight = 1001", "config: mpesa.max_in_flight: must be between 1 and 1000"),
    ('[log]\nlevel = "verbose"', 'config: log.level: must be "debug", "info", "warning" or "error"'),
    ('mode = "production"', 'config: mode: must be "sandbox" or "live"'),
    ("mode = true", "config: mode: must be a string"),
    ('[mpesa]\nshortcod = "174379"', "config: mpesa.shortcod: unknown key (did you mean mpesa.shortcode?)"),
    ('[mpesa]\nbind = "x"', "config: mpesa.bind: unknown key (did you mean server.bind?)"),
    ('[mpesa]\nsecret = "x"', "config: mpesa.secret: unknown key"),
    ('[mpsea]\nshortcode = "174379"', "config: mpsea: unknown section (did you mean [mpesa]?)"),
    ('[twilio]\nsid = "x"', "config: twilio: unknown section"),
    ('bind = "0.0.0.0:80"', "config: bind: unknown key (did you mean server.bind?)"),
    ('server = "0.0.0.0:80"', "config: server: must be a table ([server])"),
    ('[mpesa.extra]\nx = 1', "config: mpesa.extra: unknown key"),
    (
        '[mpesa]\n"short\\ncode" = "1"',
        "config: 'mpesa.short\\ncode': unknown key (did you mean mpesa.shortcode?)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), FILE_CASES, ids=[e for _, e in FILE_CASES])
def test_file_problem_message(text: str, expected: str, write) -> None:
    assert problems(write(text + "\n"), {}) == [expected]


ENV_CASES = [
    (
        {"INVOICEIQ_MPESA_SHORTCOD": "174379"},
        "config: env INVOICEIQ_MPESA_SHORTCOD: unknown key (did you mean INVOICEIQ_MPESA_SHORTCODE?)",
    ),
    ({"INVOICEIQ_FOO": "1"}, "config: env INVOICEIQ_FOO: unknown key"),
    ({"INVOICEIQ_CONFIG_PATH": "/x"}, "config: env INVOICEIQ_CONFIG_PATH: unknown key"),
    (
        {"INVOICEIQ_CHAT_NUDGE_AFTER_S": "5m"},
        "config: chat.nudge_after_s: must be an integer (from env INVOICEIQ_CHAT_NUDGE_AFTER_S)",
    ),
    (
        {"INVOICEIQ_CHAT_NUDGE_AFTER_S": "1_000"},
        "config: chat.nudge_after_s: must be an integer (from env INVOICEIQ_CHAT_NUDGE_AFTER_S)",
    ),
    ({"MPESA_SHORTCODE": "17437 9"}, "config: mpesa.shortcode: must be digits (from env MPESA_SHORTCODE)"),
    ({"DATABASE_URL": "mysql://x@y/z"}, f"config: database.url: {DB_FORMS} (from env DATABASE_URL)"),
    (
        {"INVOICEIQ_SERVER_TRUSTED_PROXIES": "127.0.0.1,localhost"},
        "config: server.trusted_proxies: 'localhost' is not an IP address or CIDR network "
        "(from env INVOICEIQ_SERVER_TRUSTED_PROXIES)",
    ),
    ({"INVOICEIQ_MODE": "prod"}, 'config: mode: must be "sandbox" or "live" (from env INVOICEIQ_MODE)'),
]


@pytest.mark.parametrize(("env", "expected"), ENV_CASES, ids=[e for _, e in ENV_CASES])
def test_env_problem_message(env: dict[str, str], expected: str) -> None:
    assert problems(None, env) == [expected]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://pay.example.co.ke/mpesa/callback", '"mpesa"'),
        ("https://pay.example.co.ke/MPesa/callback", '"mpesa"'),
        ("https://pay.example.co.ke/M-PESA/callback", '"m-pesa"'),
        ("https://pay.example.co.ke/cb/Safaricom", '"safaricom"'),
        ("https://pay.example.co.ke/run.EXE", '"exe"'),
        ("https://pay.example.co.ke/exec/cb", '"exec"'),
        ("https://pay.example.co.ke/cb?mode=cmd", '"cmd"'),
        ("https://pay.example.co.ke/mySQL/cb", '"sql"'),
        ("https://pay.example.co.ke/cb?Query=1", '"query"'),
        ("https://pay.example.co.ke/%6Dpesa/cb", '"mpesa"'),
        ("https://pay.example.co.ke/mpesa/query", '"mpesa" or "query"'),
        ("https://pay.example.co.ke/safaricom/exec?sql=1", '"safaricom", "exec" or "sql"'),
    ],
)
def test_callback_url_banned_words(url: str, words: str) -> None:
    assert (f"config: mpesa.callback_url: must not contain {words} ({BANNED_NOTE}) (from env MPESA_CALLBACK_URL)"
            in problems(None, {"MPESA_CALLBACK_URL": url}))


def test_callback_url_must_name_the_route_and_its_secret() -> None:
    # The daemon answers at /payments/stk/callback/<secret> only: any other shape would lose
    # every callback (Safaricom would post where nobody listens).
    for url in ("https://iq.example.co.ke/payments/stk/callback", "https://iq.example.co.ke/cb/0123456789abcdefgh",
                "https://iq.example.co.ke/payments/stk/callback/short"):
        found = problems(None, {"MPESA_CALLBACK_URL": url})
        assert len(found) == 1 and "must end with /payments/stk/callback/<secret>" in found[0], url
    behind_a_prefix = "https://iq.example.co.ke/shop/payments/stk/callback/0123456789abcdefgh"
    assert load_settings(None, {"MPESA_CALLBACK_URL": behind_a_prefix}).mpesa.callback_url == behind_a_prefix


def test_callback_url_rule_is_about_the_path_and_query_only() -> None:
    # The default Daraja api_base host contains "safaricom": that is not a callback URL.
    s = load_settings(None, {"MPESA_CALLBACK_URL": "https://cb.example.co.ke/payments/stk/callback/Cb7sec-0123456789abcd"})
    assert s.mpesa.api_base == "https://sandbox.safaricom.co.ke"
    assert s.mpesa.callback_url == "https://cb.example.co.ke/payments/stk/callback/Cb7sec-0123456789abcd"


def test_callback_url_must_be_https_in_live_mode() -> None:
    env = {**LIVE_ENV, "MPESA_CALLBACK_URL": "http://iq.example.co.ke/payments/stk/callback/Cb7sec-0123456789abcd"}
    assert problems(None, env) == [
        "config: mpesa.callback_url: must be an https URL in live mode (from env MPESA_CALLBACK_URL)"
    ]
    sandbox = load_settings(None, {**env, "INVOICEIQ_MODE": "sandbox"})
    assert sandbox.mpesa.callback_url.startswith("http://")


def test_callback_url_reports_scheme_and_words_together() -> None:
    env = {**LIVE_ENV, "MPESA_CALLBACK_URL": "http://iq.example.co.ke/mpesa"}
    assert problems(None, env) == [
        "config: mpesa.callback_url: must be an https URL in live mode (from env MPESA_CALLBACK_URL)",
        f'config: mpesa.callback_url: must not contain "mpesa" ({BANNED_NOTE}) (from env MPESA_CALLBACK_URL)',
        "config: mpesa.callback_url: must end with /payments/stk/callback/<secret> (a secret of 16+ letters, "
        "digits, '-' or '_'); or leave it empty and set public_url (from env MPESA_CALLBACK_URL)",
    ]


def test_buy_goods_with_till_is_accepted() -> None:
    s = load_settings(
        None,
        {"INVOICEIQ_MPESA_TRANSACTION_TYPE": "CustomerBuyGoodsOnline", "INVOICEIQ_MPESA_TILL_NUMBER": "5432100"},
    )
    assert s.mpesa.till_number == "5432100"


def test_several_problems_reported_together(write) -> None:
    path = write(
        """
[server]
bind = "localhost"
[mpesa]
shortcod = "174379"
shortcode = "abc"
push_limit = "3"
transaction_type = "CustomerBuyGoodsOnline"
[chat]
close_after_s = 100
[extra]
x = 1
"""
    )
    env = {"INVOICEIQ_MPESA_MAX_AMOUNT": "999999", "INVOICEIQ_WHATSAP_TOKEN": "x"}
    assert problems(path, env) == [
        "config: mpesa.shortcod: unknown key (did you mean mpesa.shortcode?)",
        "config: extra: unknown section",
        "config: env INVOICEIQ_WHATSAP_TOKEN: unknown key (did you mean INVOICEIQ_WHATSAPP_TOKEN?)",
        # then per key, in the order of the sections and keys (as in config.toml.example)
        f"config: server.bind: {BIND_FORM}",
        "config: mpesa.shortcode: must be digits",
        "config: mpesa.max_amount: must be between 1 and 250000 (from env INVOICEIQ_MPESA_MAX_AMOUNT)",
        "config: mpesa.push_limit: must be an integer",
        # then rules between keys
        "config: chat.close_after_s: must be greater than chat.nudge_after_s",
        "config: mpesa.till_number: required when mpesa.transaction_type is CustomerBuyGoodsOnline",
    ]


def test_a_key_with_a_bad_value_is_not_also_called_missing_in_live_mode() -> None:
    env = {**LIVE_ENV, "MPESA_SHORTCODE": "abc"}
    assert problems(None, env) == ["config: mpesa.shortcode: must be digits (from env MPESA_SHORTCODE)"]


# --- the file itself ------------------------------------------------------------------------


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert problems(path, {}) == [f"config: {path}: file not found"]


def test_directory_is_an_error(tmp_path: Path) -> None:
    assert problems(tmp_path, {}) == [f"config: {tmp_path}: is a directory, not a file"]


def test_toml_syntax_error_is_one_clear_line(write) -> None:
    path = write('[mpesa]\nshortcode = "174379\npasskey = "x"\n')
    found = problems(path, {"INVOICEIQ_BOGUS": "1"})
    assert len(found) == 2
    assert re.fullmatch(rf"config: {re.escape(str(path))}: invalid TOML: .*\(at line 2, column \d+\)", found[0])
    assert found[1] == "config: env INVOICEIQ_BOGUS: unknown key"


def test_non_utf8_file_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[merchant]\nname = "Caf\xe9"\n')
    assert problems(path, {}) == [f"config: {path}: invalid TOML: not UTF-8 text"]


def test_resolve_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(None, {}) is None
    assert resolve_config_path(None, {"INVOICEIQ_CONFIG": " "}) is None
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    assert resolve_config_path(None, {}) == tmp_path / "config.toml"
    assert resolve_config_path(None, {"INVOICEIQ_CONFIG": "/etc/iq.toml"}) == Path("/etc/iq.toml")
    assert resolve_config_path("/srv/x.toml", {"INVOICEIQ_CONFIG": "/etc/iq.toml"}) == Path("/srv/x.toml")
    # A named file is returned even when missing, so that loading it reports it.
    named = resolve_config_path(None, {"INVOICEIQ_CONFIG": str(tmp_path / "missing.toml")})
    assert named is not None and problems(named, {}) == [f"config: {named}: file not found"]


# --- mode -----------------------------------------------------------------------------------


def test_mode_defaults_to_sandbox_without_credentials() -> None:
    s = load_settings(None, {"MPESA_SHORTCODE": "174379", "WABA_PHONE_ID": "1"})
    assert (s.mode, s.mode_source, s.is_live) == ("sandbox", "default", False)
    assert describe_mode(s) == "sandbox (default: no provider credentials are set)"


def test_complete_live_config_loads() -> None:
    s = load_settings(None, LIVE_ENV)
    assert (s.mode, s.mode_source, s.is_live) == ("live", "default", True)
    assert missing_live_keys(s) == []
    assert s.merchant.msisdn == "254712345678"
    assert s.public_base_url == "https://invoices.example.co.ke"
    assert describe_mode(s) == (
        "live (default: provider credentials are set: whatsapp.token, mpesa.consumer_key, sms.api_key)"
    )


LIVE_MISSING = [
    "config: server.public_url: required in live mode",
    "config: merchant.msisdn: required in live mode",
    "config: whatsapp.token: required in live mode",
    "config: whatsapp.phone_id: required in live mode",
    "config: whatsapp.verify_token: required in live mode",
    "config: whatsapp.app_secret: required in live mode",
    "config: sms.username: required in live mode",
    "config: sms.api_key: required in live mode",
    "config: sms.callback_token: required in live mode",
    "config: mpesa.consumer_key: required in live mode",
    "config: mpesa.consumer_secret: required in live mode",
    "config: mpesa.shortcode: required in live mode",
    "config: mpesa.passkey: required in live mode",
]


@pytest.mark.parametrize(
    ("variable", "dotted"),
    [("WABA_TOKEN", "whatsapp.token"), ("MPESA_CONSUMER_KEY", "mpesa.consumer_key"), ("SMS_API_KEY", "sms.api_key")],
)
def test_any_credential_makes_live_and_names_every_missing_key(variable: str, dotted: str) -> None:
    found = problems(None, {variable: SECRETS[variable]})
    assert found == [
        *(line for line in LIVE_MISSING if f" {dotted}:" not in line),
        f"config: mode: live (default: provider credentials are set: {dotted}); "
        'set mode = "sandbox" (or INVOICEIQ_MODE=sandbox) to run against the simulated providers',
    ]


def test_explicit_live_without_anything_names_every_key(write) -> None:
    assert problems(write('mode = "live"\n'), {}) == LIVE_MISSING
    assert problems(None, {"INVOICEIQ_MODE": "LIVE"}) == LIVE_MISSING


def test_live_public_url_must_be_https() -> None:
    env = {**LIVE_ENV, "INVOICEIQ_SERVER_PUBLIC_URL": "http://invoices.example.co.ke"}
    assert problems(None, env)[0] == (
        "config: server.public_url: must be an https URL in live mode (from env INVOICEIQ_SERVER_PUBLIC_URL)"
    )
    assert problems(None, {**env, "INVOICEIQ_MODE": "live"}) == [
        "config: server.public_url: must be an https URL in live mode (from env INVOICEIQ_SERVER_PUBLIC_URL)"
    ]


def test_explicit_sandbox_wins_over_credentials(write) -> None:
    s = load_settings(write('mode = "sandbox"\n'), LIVE_ENV)
    assert (s.mode, s.mode_source) == ("sandbox", "file")
    assert describe_mode(s) == "sandbox (set in the config file)"
    s = load_settings(None, {**LIVE_ENV, "INVOICEIQ_MODE": "sandbox"})
    assert (s.mode, s.mode_source) == ("sandbox", "env")
    assert describe_mode(s) == "sandbox (set by INVOICEIQ_MODE)"


def test_empty_mode_in_file_means_decide_from_credentials(write) -> None:
    path = write('mode = ""\n')
    assert load_settings(path, {}).mode_source == "default"
    assert load_settings(path, LIVE_ENV).mode == "live"


def test_env_mode_beats_file_mode(write) -> None:
    s = load_settings(write('mode = "live"\n'), {"INVOICEIQ_MODE": "sandbox"})
    assert (s.mode, s.mode_source) == ("sandbox", "env")


# --- secrets never shown --------------------------------------------------------------------


def live_settings_with_everything() -> Settings:
    return load_settings(
        None,
        {
            **LIVE_ENV,
            "DATABASE_URL": "postgresql://iq:Pg-Pa55word-x9@db.internal:5432/iq?sslpassword=Ssl-Pa55-q1",
            "MPESA_CALLBACK_URL": "https://iq.example.co.ke/payments/stk/callback/Cb7sec-0123456789abcd?key=Kq7-Callback-Token-77",
        },
    )


def test_effective_config_masks_every_secret() -> None:
    s = live_settings_with_everything()
    data = effective_config(s)
    for dotted in SECRET_KEYS:
        section, _, key = dotted.partition(".")
        assert data[section][key] == "***", dotted
    assert data["database"]["url"] == "postgresql://iq:***@db.internal:5432/iq?sslpassword=***"
    assert data["mpesa"]["callback_url"] == "https://iq.example.co.ke/payments/stk/callback/Cb7sec-0123456789abcd?key=***"
    assert data["mpesa"]["shortcode"] == "174379"  # not a secret
    assert data["mode"] == "live"


def test_effective_config_shows_empty_secrets_as_empty() -> None:
    data = effective_config(load_settings(None, {}))
    for dotted in SECRET_KEYS:
        section, _, key = dotted.partition(".")
        assert data[section][key] == "", dotted


def test_no_secret_value_appears_in_rendered_text_or_repr() -> None:
    s = live_settings_with_everything()
    shown = render_effective_config(s) + repr(s) + str(effective_config(s))
    for value in [*SECRETS.values(), "Pg-Pa55word-x9", "Ssl-Pa55-q1", "Kq7-Callback-Token-77"]:
        assert value not in shown
    assert "***" in shown


def test_no_secret_value_appears_in_problems() -> None:
    bad = {
        "ADMIN_TOKEN": "Adm1n-2short",
        "WABA_TOKEN": "EAAGm0PX4ZC psBAPdT1q",
        "MPESA_CALLBACK_SECRET": "Zz9-ExecZz9-0123456789",
    }
    text = "\n".join(problems(None, {**LIVE_ENV, **bad}))
    for value in bad.values():
        assert value not in text
    assert "Zz9" not in text


def test_rendered_config_is_toml_with_every_key() -> None:
    s = load_settings(None, {**LIVE_ENV, "INVOICEIQ_MERCHANT_NAME": 'Duka "Bora"\\ Ltd'})
    rendered = render_effective_config(s)
    assert tomllib.loads(rendered) == effective_config(s)
    assert "mode = \"live\"  # live (default: provider credentials are set:" in rendered
    assert "\n[mpesa]\n" in rendered


def test_rendered_config_explains_empty_public_url() -> None:
    rendered = render_effective_config(load_settings(None, {}))
    assert 'public_url = ""  # empty: http://127.0.0.1:8000' in rendered


# --- drift guards ---------------------------------------------------------------------------


def schema_keys() -> set[str]:
    keys = {"mode"}
    for top in dataclasses.fields(Settings):
        if top.name in ("mode", "mode_source"):
            continue
        section = getattr(Settings(), top.name)
        keys |= {f"{top.name}.{f.name}" for f in dataclasses.fields(section)}
    return keys


def test_every_key_has_a_validator() -> None:
    assert set(cfg._VALIDATORS) == schema_keys() - {"mode"}


def test_secret_keys() -> None:
    expected = {
        "admin.token",
        "whatsapp.token",
        "whatsapp.verify_token",
        "whatsapp.app_secret",
        "sms.api_key",
        "sms.callback_token",
        "mpesa.consumer_key",
        "mpesa.consumer_secret",
        "mpesa.passkey",
        "mpesa.callback_secret",
        "metrics.token",
    }
    assert expected == SECRET_KEYS


def test_example_loads_to_the_defaults() -> None:
    assert load_settings(EXAMPLE, {}) == Settings()


def test_example_documents_every_key_with_its_default() -> None:
    doc = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    documented = {"mode"} | {f"{s}.{k}" for s, table in doc.items() if isinstance(table, dict) for k in table}
    assert documented == schema_keys()
    defaults = effective_config(Settings())
    for section, table in doc.items():
        if isinstance(table, dict):
            for key, value in table.items():
                assert value == defaults[section][key], f"{section}.{key}"
    for dotted in SECRET_KEYS:
        section, _, key = dotted.partition(".")
        assert doc[section][key] == ""


def test_example_has_a_comment_line_above_every_key() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if re.match(r"[a-z_]+ = ", line):
            assert lines[number - 1].startswith("# "), f"line {number + 1}: {line}"
    for dotted in SECRET_KEYS:
        key = dotted.partition(".")[2]
        section_start = lines.index(f"[{dotted.partition('.')[0]}]")
        line_no = next(i for i in range(section_start, len(lines)) if lines[i].startswith(f"{key} = "))
        assert lines[line_no - 1].startswith("# Secret:"), dotted


def test_systemd_env_file_names_are_all_understood() -> None:
    # deploy/systemd/invoiceiq.env.example must not set a variable this module would ignore.
    if not SYSTEMD_ENV_EXAMPLE.exists():
        pytest.skip("no systemd env example in this checkout")
    names = re.findall(r"^#?([A-Z][A-Z0-9_]*)=", SYSTEMD_ENV_EXAMPLE.read_text(encoding="utf-8"), re.M)
    assert names
    known = set(ENV_ALIASES) | {env_var_name(k) for k in schema_keys()}
    assert [n for n in names if n not in known] == []
