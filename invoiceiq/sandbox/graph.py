"""Simulated WhatsApp Cloud API: ``POST /{version}/{phone-number-id}/messages`` and the signed
webhooks Meta sends back (statuses, inbound texts, button taps).

Validation follows Meta's documented limits and error codes (providers/whatsapp.md, Meta's
OpenAPI schema). What Meta rejects synchronously is rejected here with the Graph error envelope;
what Meta accepts and then fails (131047 outside the 24 h window, 131026 not on WhatsApp) is
accepted here and then fails on the status webhook, because that is where the daemon must catch it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import SimConfig
from .outbox import Outbox
from .wire import HttpRequest, Ids, Reply, SandboxError, hub_signature, meta_json
from .world import ChatButton, ChatMessage, Phone, World, normalise_msisdn

VERSION_RE = re.compile(r"v\d+\.\d+")
TO_RE = re.compile(r"\+?\d{7,15}")
TEXT_BODY_MAX = 4096
INTERACTIVE_BODY_MAX = 1024
HEADER_FOOTER_MAX = 60
BUTTON_TITLE_MAX = 20
BUTTON_ID_MAX = 256
TEMPLATE_PARAM_BAD = re.compile(r"[\n\t]| {5,}")
ERROR_HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"

TITLES = {
    100: "Invalid parameter",
    131008: "Required parameter is missing",
    131009: "Parameter value is not valid",
    132000: "Number of parameters does not match the expected number of params",
    132001: "Template name does not exist in the translation",
    132012: "Parameter format does not match format in the created template",
}

# Asynchronous failures, as the status webhook carries them (whatsapp_status_failed_*.json).
UNDELIVERABLE = (131026, "Message undeliverable", "Message Undeliverable.")
REENGAGEMENT = (
    131047,
    "Re-engagement message",
    "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
)


class GraphError(Exception):
    def __init__(self, code: int, details: str, status: int = 400) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.status = status

    def reply(self, fbtrace_id: str) -> Reply:
        error = {
            "message": f"(#{self.code}) {TITLES[self.code]}",
            "type": "OAuthException",
            "code": self.code,
            "error_data": {"messaging_product": "whatsapp", "details": self.details},
            "fbtrace_id": fbtrace_id,
        }
        return Reply.json(self.status, {"error": error})


@dataclass(frozen=True, slots=True)
class TemplateButton:
    kind: str  # quick_reply | url
    label: str
    url: str | None = None


def template_buttons(config: SimConfig) -> tuple[TemplateButton, ...]:
    out = []
    for spec in config.wa_template_buttons:
        kind, rest = spec.split(":", 1)
        if kind == "url":
            label, _, url = rest.partition(":")
            out.append(TemplateButton("url", label, url))
        else:
            out.append(TemplateButton("quick_reply", rest))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Outbound:
    """A send request that passed validation, reduced to what the phone shows."""

    to_input: str
    to: str
    type: str
    text: str
    header: str | None = None
    footer: str | None = None
    buttons: tuple[ChatButton, ...] = ()
    template: str | None = None
    context_id: str | None = None
    biz_opaque: str | None = None

    @property
    def free_form(self) -> bool:
        return self.type != "template"


# -- validation ---------------------------------------------------------------------------------


def _obj(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        raise GraphError(131008, f"Parameter '{name}' is required.")
    if not isinstance(value, dict):
        raise GraphError(100, f"Param {name} must be a JSON object.")
    return value


def _required_str(container: dict[str, Any], key: str, name: str) -> str:
    value = container.get(key)
    if value is None or value == "":
        raise GraphError(131008, f"Parameter '{name}' is required.")
    if not isinstance(value, str):
        raise GraphError(100, f"Param {name} must be a string.")
    return value


def _max_len(value: str, limit: int, name: str) -> str:
    if len(value) > limit:
        raise GraphError(100, f"Param {name} must be at most {limit} characters long.")
    return value


def parse_send(body: Any, config: SimConfig, buttons: tuple[TemplateButton, ...]) -> Outbound:
    if not isinstance(body, dict):
        raise GraphError(100, "Request body must be a JSON object.")
    product = body.get("messaging_product")
    if product is None:
        raise GraphError(100, "The parameter messaging_product is required.")
    if product != "whatsapp":
        raise GraphError(100, "Param messaging_product must be one of {WHATSAPP}.")
    if body.get("recipient_type", "individual") != "individual":
        raise GraphError(100, "Param recipient_type must be 'individual'.")
    to = body.get("to")
    if to is None or to == "":
        raise GraphError(100, "The parameter to is required.")
    if not isinstance(to, str) or not TO_RE.fullmatch(to):
        raise GraphError(100, "Param to must be a valid WhatsApp phone number (digits, optional leading +).")
    context = body.get("context")
    context_id = None
    if context is not None:
        context_id = _required_str(_obj(context, "context"), "message_id", "context['message_id']")
    opaque = body.get("biz_opaque_callback_data")
    if opaque is not None and (not isinstance(opaque, str) or len(opaque) > 512):
        raise GraphError(100, "Param biz_opaque_callback_data must be a string of at most 512 characters.")
    common: dict[str, Any] = {
        "to_input": to,
        "to": normalise_msisdn(to),
        "context_id": context_id,
        "biz_opaque": opaque,
    }
    kind = body.get("type", "text")  # Meta's default when type is omitted
    if kind == "text":
        return Outbound(type="text", text=_parse_text(body.get("text")), **common)
    if kind == "interactive":
        return _parse_interactive(_obj(body.get("interactive"), "interactive"), common)
    if kind == "template":
        return _parse_template(_obj(body.get("template"), "template"), config, buttons, common)
    raise GraphError(100, f"Param type must be one of {{TEXT, INTERACTIVE, TEMPLATE}} in the sandbox; got {kind!r}.")


def _parse_text(value: Any) -> str:
    text = _obj(value, "text")
    unknown = set(text) - {"body", "preview_url"}
    if unknown:
        raise GraphError(100, f"Param text['{sorted(unknown)[0]}'] is not a valid parameter.")
    if "preview_url" in text and not isinstance(text["preview_url"], bool):
        raise GraphError(100, "Param text['preview_url'] must be a boolean.")
    return _max_len(_required_str(text, "body", "text['body']"), TEXT_BODY_MAX, "text['body']")


def _parse_interactive(it: dict[str, Any], common: dict[str, Any]) -> Outbound:
    kind = it.get("type")
    if kind is None:
        raise GraphError(131008, "Parameter 'interactive['type']' is required.")
    if kind != "button":
        raise GraphError(131009, f"Interactive type {kind!r} is not supported by the sandbox (reply buttons only).")
    body = _obj(it.get("body"), "interactive['body']")
    text = _max_len(
        _required_str(body, "text", "interactive['body']['text']"), INTERACTIVE_BODY_MAX, "interactive['body']['text']"
    )
    header = None
    if it.get("header") is not None:
        h = _obj(it["header"], "interactive['header']")
        if h.get("type") != "text":
            raise GraphError(131009, "The sandbox supports text headers only (header['type'] = 'text').")
        header = _max_len(
            _required_str(h, "text", "interactive['header']['text']"),
            HEADER_FOOTER_MAX,
            "interactive['header']['text']",
        )
    footer = None
    if it.get("footer") is not None:
        f = _obj(it["footer"], "interactive['footer']")
        footer = _max_len(
            _required_str(f, "text", "interactive['footer']['text']"),
            HEADER_FOOTER_MAX,
            "interactive['footer']['text']",
        )
    action = _obj(it.get("action"), "interactive['action']")
    raw_buttons = action.get("buttons")
    if raw_buttons is None:
        raise GraphError(131008, "Parameter 'interactive['action']['buttons']' is required.")
    if not isinstance(raw_buttons, list) or not 1 <= len(raw_buttons) <= 3:
        raise GraphError(131009, "Invalid buttons count. Min allowed buttons: 1, Max allowed buttons: 3")
    parsed: list[ChatButton] = []
    for i, raw in enumerate(raw_buttons):
        name = f"interactive['action']['buttons'][{i}]"
        button = _obj(raw, name)
        if button.get("type") != "reply":
            raise GraphError(131009, f"Param {name}['type'] must be 'reply'.")
        reply = _obj(button.get("reply"), f"{name}['reply']")
        bid = _max_len(_required_str(reply, "id", f"{name}['reply']['id']"), BUTTON_ID_MAX, f"{name}['reply']['id']")
        if bid != bid.strip():
            raise GraphError(131009, "Button id cannot have leading or trailing spaces.")
        title = reply.get("title")
        if title is None:
            raise GraphError(131008, f"Parameter '{name}['reply']['title']' is required.")
        if not isinstance(title, str) or not title.strip():
            raise GraphError(131009, f"Button title length invalid. Min length: 1, Max length: {BUTTON_TITLE_MAX}")
        _max_len(title, BUTTON_TITLE_MAX, f"{name}['reply']['title']")
        parsed.append(ChatButton(id=bid, title=title, kind="reply"))
    if len({b.id for b in parsed}) != len(parsed):
        raise GraphError(131009, "Button IDs must be unique.")
    if len({b.title for b in parsed}) != len(parsed):
        raise GraphError(131009, "Button titles must be unique.")
    return Outbound(type="interactive", text=text, header=header, footer=footer, buttons=tuple(parsed), **common)


def _template_param(raw: Any, where: str) -> str:
    """A body parameter, validated; returns what the phone shows in its slot."""
    param = _obj(raw, where)
    kind = param.get("type")
    if kind == "text":
        text = _required_str(param, "text", f"{where}['text']")
        if TEMPLATE_PARAM_BAD.search(text):
            raise GraphError(100, "Param text cannot have new-line/tab characters or more than 4 consecutive spaces.")
        return text
    if kind == "currency":
        currency = _obj(param.get("currency"), f"{where}['currency']")
        fallback = _required_str(currency, "fallback_value", f"{where}['currency']['fallback_value']")
        _required_str(currency, "code", f"{where}['currency']['code']")
        amount = currency.get("amount_1000")
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise GraphError(131008, f"Parameter '{where}['currency']['amount_1000']' is required (an integer).")
        return fallback
    if kind == "date_time":
        date_time = _obj(param.get("date_time"), f"{where}['date_time']")
        return _required_str(date_time, "fallback_value", f"{where}['date_time']['fallback_value']")
    raise GraphError(131009, f"Parameter type {kind!r} is not valid in {where}.")


def _button_index(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and value.isdigit():
        index = int(value)
    else:
        raise GraphError(131008 if value is None else 100, "Param index is required for button components (0-9).")
    if not 0 <= index <= 9:
        raise GraphError(100, "Param index must be between 0 and 9.")
    return index


def _parse_template(
    tpl: dict[str, Any], config: SimConfig, specs: tuple[TemplateButton, ...], common: dict[str, Any]
) -> Outbound:
    name = _required_str(tpl, "name", "template['name']")
    language = _obj(tpl.get("language"), "template['language']")
    code = _required_str(language, "code", "template['language']['code']")
    if name != config.wa_template_name or code != config.wa_template_language:
        raise GraphError(132001, f"template name ({name}) does not exist in {code}", status=404)
    components = tpl.get("components", [])
    if not isinstance(components, list):
        raise GraphError(100, "Param template['components'] must be an array.")
    body_params: list[str] | None = None
    button_params: dict[int, str] = {}
    for i, raw in enumerate(components):
        where = f"template['components'][{i}]"
        component = _obj(raw, where)
        kind = component.get("type")
        params = component.get("parameters", [])
        if not isinstance(params, list):
            raise GraphError(100, f"Param {where}['parameters'] must be an array.")
        if kind == "header":
            if params:
                raise GraphError(
                    132000,
                    f"header: number of localizable_params ({len(params)}) does not match "
                    "the expected number of params (0)",
                )
        elif kind == "body":
            if body_params is not None:
                raise GraphError(131009, "Only one body component is allowed.")
            body_params = [_template_param(p, f"{where}['parameters'][{j}]") for j, p in enumerate(params)]
        elif kind == "button":
            index = _button_index(component.get("index"))
            if index in button_params:
                raise GraphError(131009, f"Duplicate button component for index {index}.")
            button_params[index] = _template_button(component, index, params, specs, name)
        else:
            raise GraphError(131009, f"Param {where}['type'] must be one of header, body, button.")
    count = len(body_params or [])
    if count != config.wa_template_params:
        raise GraphError(
            132000,
            f"body: number of localizable_params ({count}) does not match the expected number of params "
            f"({config.wa_template_params})",
        )
    buttons = []
    for index, spec in enumerate(specs):
        if spec.kind == "url":
            url = spec.url or ""
            if "{{1}}" in url:
                if index not in button_params:
                    raise GraphError(131008, f"buttons: Button at index {index} of type Url requires a parameter.")
                url = url.replace("{{1}}", button_params[index])
            buttons.append(ChatButton(id=url, title=spec.label, kind="url", url=url))
        else:
            # Without a payload Meta echoes the button's label back as the payload.
            buttons.append(ChatButton(id=button_params.get(index, spec.label), title=spec.label, kind="quick_reply"))
    values = body_params or []
    text = re.sub(
        r"\{\{(\d+)\}\}",
        lambda m: values[int(m.group(1)) - 1] if 0 < int(m.group(1)) <= len(values) else m.group(0),
        config.wa_template_body,
    )
    return Outbound(type="template", text=text, buttons=tuple(buttons), template=name, **common)


def _template_button(
    component: dict[str, Any], index: int, params: list[Any], specs: tuple[TemplateButton, ...], name: str
) -> str:
    if index >= len(specs):
        raise GraphError(131009, f"Button at index {index} does not exist in template {name}.")
    spec = specs[index]
    sub_type = component.get("sub_type")
    if sub_type != spec.kind:
        raise GraphError(132012, f"Button at index {index} of template {name} is of type {spec.kind}, not {sub_type}.")
    where = f"button[{index}]"
    if spec.kind == "quick_reply":
        if len(params) != 1:
            raise GraphError(131009, f"{where}: a quick_reply button takes exactly one payload parameter.")
        param = _obj(params[0], f"{where}['parameters'][0]")
        if param.get("type") != "payload":
            raise GraphError(131009, f"{where}: quick_reply parameter type must be 'payload'.")
        return _max_len(_required_str(param, "payload", f"{where}['payload']"), BUTTON_ID_MAX, f"{where}['payload']")
    if "{{1}}" not in (spec.url or ""):
        raise GraphError(131009, f"{where}: this URL button is static and takes no parameters.")
    if len(params) != 1:
        raise GraphError(131008, f"buttons: Button at index {index} of type Url requires a parameter.")
    param = _obj(params[0], f"{where}['parameters'][0]")
    if param.get("type") != "text":
        raise GraphError(131009, f"{where}: url parameter type must be 'text'.")
    return _required_str(param, "text", f"{where}['text']")


# -- webhook payloads ----------------------------------------------------------------------------


def envelope(config: SimConfig, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": config.wa_waba_id,
                "changes": [
                    {
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": config.wa_business_number,
                                "phone_number_id": config.wa_phone_id,
                            },
                            **value,
                        },
                        "field": "messages",
                    }
                ],
            }
        ],
    }


def _pricing(category: str, free: bool) -> dict[str, Any]:
    # Per-message pricing (PMP): inside an open window service and utility messages are free.
    return {
        "billable": not free,
        "pricing_model": "PMP",
        "category": category,
        "type": "free_customer_service" if free else "regular",
    }


class WhatsAppSim:
    def __init__(self, config: SimConfig, world: World, outbox: Outbox, ids: Ids, now: Callable[[], float]) -> None:
        self.config = config
        self.world = world
        self.outbox = outbox
        self.ids = ids
        self.now = now
        self.template_buttons = template_buttons(config)
        self._step_s = config.status_delay_ms / 1000

    # -- the Graph endpoint --------------------------------------------------------------------
    def send(self, req: HttpRequest, version: str, phone_id: str) -> Reply:
        body: Any = None
        try:
            body = req.json()
        except ValueError:
            body = req.body.decode("utf-8", "replace")
        reply = self._send(req, version, phone_id, body)
        self.world.record_call("whatsapp", req.method, req.path, body, reply.status, reply.parsed())
        return reply

    def _send(self, req: HttpRequest, version: str, phone_id: str, body: Any) -> Reply:
        if not VERSION_RE.fullmatch(version):
            error = {
                "message": f"Unknown path components: /{version}/{phone_id}/messages",
                "type": "OAuthException",
                "code": 2500,
                "fbtrace_id": self.ids.fbtrace_id(),
            }
            return Reply.json(400, {"error": error})
        if req.header("authorization") != f"Bearer {self.config.wa_token}":
            error = {
                "message": "Invalid OAuth access token.",
                "type": "OAuthException",
                "code": 190,
                "fbtrace_id": self.ids.fbtrace_id(),
            }
            return Reply.json(401, {"error": error})
        if phone_id != self.config.wa_phone_id:
            error = {
                "message": f"Unsupported post request. Object with ID '{phone_id}' does not exist, cannot be "
                "loaded due to missing permissions, or does not support this operation. Please read the Graph API "
                "documentation at https://developers.facebook.com/docs/graph-api",
                "type": "GraphMethodException",
                "code": 100,
                "error_subcode": 33,
                "fbtrace_id": self.ids.fbtrace_id(),
            }
            return Reply.json(400, {"error": error})
        if isinstance(body, str):
            return GraphError(100, "Request body is not valid JSON.").reply(self.ids.fbtrace_id())
        try:
            out = parse_send(body, self.config, self.template_buttons)
        except GraphError as exc:
            return exc.reply(self.ids.fbtrace_id())
        wamid = self._accept(out)
        message: dict[str, Any] = {"id": wamid}
        if out.type == "template":
            message["message_status"] = "accepted"
        return Reply.json(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": out.to_input, "wa_id": out.to}],
                "messages": [message],
            },
        )

    def _accept(self, out: Outbound) -> str:
        now = self.now()
        phone = self.world.phone(out.to)
        wamid = self.ids.wamid(phone.msisdn)
        category = "utility" if out.type == "template" else "service"
        message = ChatMessage(
            id=wamid,
            from_phone=False,
            type=out.type,
            text=out.text,
            at=now,
            header=out.header,
            footer=out.footer,
            buttons=list(out.buttons),
            context_id=out.context_id,
            template=out.template,
            biz_opaque=out.biz_opaque,
            category=category,
        )
        self.world.wa_messages[wamid] = message
        self.world.wa_recipient[wamid] = phone.msisdn
        if not phone.on_whatsapp:
            self._fail(phone, message, UNDELIVERABLE)
        elif out.free_form and not phone.window_open(now):
            self._fail(phone, message, REENGAGEMENT)
        else:
            in_window = phone.window_open(now)
            conversation = self._conversation(phone, category, now)
            pricing = _pricing(category, free=in_window)
            message.status = "delivered"  # on the handset now; the webhooks trail behind
            phone.thread.append(message)
            self._post_status(phone, message, "sent", 1, conversation=conversation, pricing=pricing)
            delivered_conversation = {k: v for k, v in conversation.items() if k != "expiration_timestamp"}
            self._post_status(phone, message, "delivered", 2, conversation=delivered_conversation, pricing=pricing)
            label = f"template {out.template}" if out.template else out.type
            self.world.log("wa.out", f"WhatsApp {label} to {phone.msisdn}: {_preview(out.text)}", phone.msisdn,
                           ref=wamid)
        return wamid

    def _fail(self, phone: Phone, message: ChatMessage, error: tuple[int, str, str]) -> None:
        code, title, details = error
        message.status = "failed"
        message.error_code = code
        errors = [
            {"code": code, "title": title, "message": title, "error_data": {"details": details}, "href": ERROR_HREF}
        ]
        self._post_status(phone, message, "failed", 1, errors=errors)
        self.world.log(
            "wa.failed",
            f"WhatsApp {message.type} to {phone.msisdn} accepted, then failed {code} ({title})",
            phone.msisdn,
        )

    def _conversation(self, phone: Phone, category: str, now: float) -> dict[str, Any]:
        current = phone.conversations.get(category)
        if current is None or current[1] <= now:
            current = (self.ids.conversation_id(), now + 24 * 3600)
            phone.conversations[category] = current
        return {"id": current[0], "expiration_timestamp": str(int(current[1])), "origin": {"type": category}}

    def _post_status(self, phone: Phone, message: ChatMessage, status: str, steps: int, **extra: Any) -> None:
        entry: dict[str, Any] = {
            "id": message.id,
            "status": status,
            "timestamp": str(int(self.now())),
            "recipient_id": phone.msisdn,
        }
        entry.update({k: v for k, v in extra.items() if v is not None})
        if message.biz_opaque is not None:
            entry["biz_opaque_callback_data"] = message.biz_opaque
        # One lane per message: its statuses go out in order (sent, delivered, read), and none of
        # them, due later, holds up what the phone writes meanwhile. Meta orders neither
        # (providers/whatsapp.md 2.5); one lane per phone put a tap behind its template's "read",
        # about 200 ms of every bench flow, and a merchant's messages behind the statuses of
        # hundreds of confirmations.
        self._post(f"wa:{phone.msisdn}:{message.id}", {"statuses": [entry]}, f"status {status} for {message.id}",
                   self._step_s * steps)

    def _post(self, lane: str, value: dict[str, Any], summary: str, delay_s: float) -> None:
        url = self.config.whatsapp_webhook_url
        if not url:
            return
        body = meta_json(envelope(self.config, value))
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": hub_signature(self.config.wa_app_secret, body),
            "User-Agent": "facebookexternalua",
        }
        self.outbox.post("wa_webhook", lane, url, body, headers, summary, delay_s)

    # -- what the simulated phones do ------------------------------------------------------------
    def _whatsapp_phone(self, msisdn: str) -> Phone:
        phone = self.world.phone(msisdn)
        if not phone.on_whatsapp:
            raise SandboxError(409, f"{phone.msisdn} is not on WhatsApp")
        return phone

    def _inbound(self, phone: Phone, bubble: ChatMessage, wire: dict[str, Any], summary: str) -> str:
        """The phone sends the business a message: show it, open the window, post the webhook."""
        phone.thread.append(bubble)
        phone.last_inbound_at = bubble.at
        self.world.wa_messages[bubble.id] = bubble
        message: dict[str, Any] = {}
        if bubble.context_id:
            message["context"] = {"from": self.config.wa_business_number, "id": bubble.context_id}
        message.update({"from": phone.msisdn, "id": bubble.id, "timestamp": str(int(bubble.at)), **wire})
        value = {"contacts": [{"profile": {"name": phone.name}, "wa_id": phone.msisdn}], "messages": [message]}
        self._post(f"wa:{phone.msisdn}", value, summary, 0.0)  # what one phone writes, in order
        self.world.log("wa.in", summary, phone.msisdn)
        return bubble.id

    def phone_text(self, msisdn: str, text: str) -> str:
        phone = self._whatsapp_phone(msisdn)
        if not isinstance(text, str) or not text.strip() or len(text) > TEXT_BODY_MAX:
            raise SandboxError(400, f"text must be 1..{TEXT_BODY_MAX} characters")
        bubble = ChatMessage(
            id=self.ids.wamid(phone.msisdn, inbound=True), from_phone=True, type="text", text=text, at=self.now()
        )
        return self._inbound(
            phone,
            bubble,
            {"type": "text", "text": {"body": text}},
            f"{phone.msisdn} says on WhatsApp: {_preview(text)}",
        )

    def tap(self, msisdn: str, message_id: str, button_id: str) -> str:
        phone = self._whatsapp_phone(msisdn)
        message = self.world.wa_messages.get(message_id)
        if (
            message is None
            or message.from_phone
            or self.world.wa_recipient.get(message_id) != phone.msisdn
            or message.status == "failed"
        ):
            raise SandboxError(404, f"no business message {message_id!r} on {phone.msisdn}'s phone")
        button = next((b for b in message.buttons if b.id == button_id), None) or next(
            (b for b in message.buttons if b.title == button_id), None
        )
        if button is None:
            raise SandboxError(404, f"message {message_id} has no button {button_id!r}")
        if button.kind == "url":
            raise SandboxError(400, "a URL button opens its link and sends no webhook")
        if message.type == "interactive":
            wire: dict[str, Any] = {
                "type": "interactive",
                "interactive": {"type": "button_reply", "button_reply": {"id": button.id, "title": button.title}},
            }
        else:
            wire = {"type": "button", "button": {"payload": button.id, "text": button.title}}
        bubble = ChatMessage(
            id=self.ids.wamid(phone.msisdn, inbound=True),
            from_phone=True,
            type=wire["type"],
            text=button.title,
            at=self.now(),
            context_id=message_id,
        )
        return self._inbound(phone, bubble, wire, f"{phone.msisdn} taps \u201c{button.title}\u201d")

    def mark_read(self, msisdn: str, message_ids: list[str] | None = None) -> list[str]:
        phone = self.world.phone(msisdn)
        read = []
        for message in phone.thread:
            if message.from_phone or message.status != "delivered":
                continue
            if message_ids is not None and message.id not in message_ids:
                continue
            message.status = "read"
            read.append(message.id)
            self._post_status(phone, message, "read", 1)
        if read:
            self.world.log("wa.read", f"{phone.msisdn} read {len(read)} message(s)", phone.msisdn)
        return read


def _preview(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "\u2026"
