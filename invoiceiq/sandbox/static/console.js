// InvoiceIQ sandbox console: draws the merchant's and the customer's simulated phones from
// GET api/state (long-polled) and turns clicks into control API calls. Plain DOM, no build step.
// All URLs are relative to the page, so the console works under any mount prefix.
"use strict";

(function () {
  const BASE = window.SANDBOX_BASE || "./";
  const LONG_POLL_S = 20;
  const MAX_LOG = 500;

  const st = {
    seq: 0,
    sandbox: null,
    merchant: null,
    customer: null,
    phones: {},
    drawn: {},            // element id -> signature of what is drawn there
    readSent: new Set(),  // wamids already reported as read
    controller: null,
    immediate: true,
  };

  const $ = (id) => document.getElementById(id);

  async function api(path, body) {
    const init = body === undefined
      ? { cache: "no-store" }
      : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    const res = await fetch(BASE + path, init);
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(data.error || ("HTTP " + res.status));
    return data;
  }

  async function act(path, body) {
    try {
      return await api(path, body);
    } catch (err) {
      logLocal("console.error", String(err.message || err));
      return null;
    }
  }

  // ---- polling ------------------------------------------------------------------------------
  async function refresh() {
    const wait = st.immediate ? 0 : LONG_POLL_S;
    st.immediate = false;
    const phones = [st.merchant, st.customer].filter(Boolean).join(",");
    st.controller = new AbortController();
    const url = "api/state?since=" + st.seq + "&wait=" + wait + "&phones=" + encodeURIComponent(phones);
    const res = await fetch(BASE + url, { signal: st.controller.signal, cache: "no-store" });
    if (!res.ok) throw new Error("HTTP " + res.status);
    apply(await res.json());
  }

  async function loop() {
    for (;;) {
      try {
        await refresh();
      } catch (err) {
        if (err.name !== "AbortError") await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }

  function kick() {
    st.immediate = true;
    if (st.controller) st.controller.abort();
  }

  // ---- applying a state snapshot -----------------------------------------------------------
  function apply(s) {
    const first = st.sandbox === null;
    st.sandbox = s.sandbox;
    if (first) {
      st.merchant = s.sandbox.merchant_msisdn;
      st.customer = st.customer || s.sandbox.default_customer_msisdn;
      $("customer-number").value = st.customer;
      $("merchant-number").textContent = "+" + st.merchant;
      document.querySelectorAll(".business-number").forEach((el) => {
        el.textContent = "business +" + s.sandbox.business_number;
      });
      $("latency-ms").value = s.sandbox.latency_ms;
      st.immediate = true; // the first call did not know which customer to ask for
    }
    st.phones = {};
    for (const p of s.phones) st.phones[p.msisdn] = p;
    drawNumbers(s.msisdns);
    drawEvents(s.events);
    st.seq = s.seq;
    drawFaults(s.sandbox);
    drawPhone("merchant", st.phones[st.merchant]);
    drawPhone("customer", st.phones[st.customer]);
    drawPrompt(st.phones[st.customer]);
  }

  function changed(id, signature) {
    if (st.drawn[id] === signature) return false;
    st.drawn[id] = signature;
    return true;
  }

  function drawNumbers(numbers) {
    if (!changed("known-numbers", numbers.join(","))) return;
    const list = $("known-numbers");
    list.replaceChildren(...numbers.map((n) => {
      const o = document.createElement("option");
      o.value = n;
      return o;
    }));
  }

  // Text with clickable links, built from DOM nodes (never innerHTML: the daemon writes this text).
  function linkified(text) {
    const frag = document.createDocumentFragment();
    const re = /https?:\/\/[^\s<>"]+/g;
    let last = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      frag.append(text.slice(last, m.index));
      const a = document.createElement("a");
      a.href = m[0];
      a.textContent = m[0];
      a.target = "_blank";
      a.rel = "noopener";
      frag.append(a);
      last = m.index + m[0].length;
    }
    frag.append(text.slice(last));
    return frag;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function clock(at) {
    return new Date(at * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  const TICKS = { sent: "\u2713", delivered: "\u2713\u2713", read: "\u2713\u2713", failed: "!" };

  function drawPhone(role, phone) {
    const chat = $(role + "-chat");
    if (role === "customer") {
      $("customer-name").textContent = phone ? phone.name : "Customer";
      $("customer-not-on-whatsapp").checked = phone ? !phone.on_whatsapp : false;
      $("customer-blacklisted").checked = phone ? phone.blacklisted : false;
      const w = $("customer-window");
      w.textContent = phone && phone.window_open ? "\u00b7 24 h window open" : "\u00b7 24 h window closed";
      w.className = "window " + (phone && phone.window_open ? "open" : "closed");
      drawSms(phone);
    } else if (phone) {
      $("merchant-name").textContent = phone.name;
    }
    const thread = phone ? phone.thread : [];
    const signature = JSON.stringify([phone && phone.msisdn, phone && phone.on_whatsapp, thread.map((m) => [m.id, m.status])]);
    if (!changed(role + "-chat", signature)) return;
    const input = $(role + "-input");
    const send = $(role + "-send");
    input.disabled = send.disabled = !!phone && !phone.on_whatsapp;
    if (phone && !phone.on_whatsapp) {
      chat.replaceChildren(el("div", "not-on-wa", "This number is not on WhatsApp. Messages to it fail (131026); invoices should arrive by SMS below."));
      return;
    }
    if (!thread.length) {
      chat.replaceChildren(el("div", "empty", role === "merchant"
        ? "Say hi to the bot, or try: invoice 254712345678 1500 10 bags cement"
        : "No WhatsApp messages yet."));
      return;
    }
    const byId = {};
    for (const m of thread) byId[m.id] = m;
    const nodes = [];
    for (const m of thread) {
      const bubble = el("div", "msg" + (m.from_phone ? " mine" : ""));
      bubble.dataset.messageId = m.id;
      bubble.dataset.from = m.from_phone ? "phone" : "business";
      bubble.dataset.type = m.type;
      bubble.dataset.status = m.status;
      if (m.context_id && byId[m.context_id]) {
        bubble.append(el("div", "quote", byId[m.context_id].text.split("\n")[0].slice(0, 80)));
      }
      if (m.header) bubble.append(el("div", "header", m.header));
      const body = el("div", "body");
      body.append(linkified(m.text));
      bubble.append(body);
      if (m.footer) bubble.append(el("div", "footer", m.footer));
      const meta = el("div", "meta");
      meta.append(el("span", "tag", "sandbox"));
      if (m.template) meta.append(el("span", "kind", "template"));
      meta.append(el("span", "time", clock(m.at)));
      if (!m.from_phone) {
        const t = el("span", "ticks " + m.status, TICKS[m.status] || "");
        t.title = m.status;
        meta.append(t);
      }
      bubble.append(meta);
      nodes.push(bubble);
      if (m.buttons && m.buttons.length) {
        const row = el("div", "buttons");
        for (const b of m.buttons) {
          let btn;
          if (b.kind === "url") {
            btn = el("a", "wa-button", "\u2197 " + b.title);
            btn.href = b.url;
            btn.target = "_blank";
            btn.rel = "noopener";
          } else {
            btn = el("button", "wa-button", b.title);
            btn.type = "button";
          }
          btn.dataset.messageId = m.id;
          btn.dataset.buttonId = b.id;
          btn.dataset.buttonTitle = b.title;
          btn.dataset.role = role;
          row.append(btn);
        }
        nodes.push(row);
      }
    }
    chat.replaceChildren(...nodes);
    chat.scrollTop = chat.scrollHeight;
    markRead(phone);
  }

  // The chat is on screen, so the phone reads what was delivered: Meta then posts "read".
  function markRead(phone) {
    if (document.visibilityState !== "visible") return;
    const ids = phone.thread
      .filter((m) => !m.from_phone && m.status === "delivered" && !st.readSent.has(m.id))
      .map((m) => m.id);
    if (!ids.length) return;
    ids.forEach((id) => st.readSent.add(id));
    act("api/phones/" + phone.msisdn + "/read", { message_ids: ids });
  }

  function drawSms(phone) {
    const list = $("customer-sms");
    const sms = phone ? phone.sms : [];
    if (!changed("customer-sms", JSON.stringify([phone && phone.msisdn, sms.length]))) return;
    if (!sms.length) {
      list.replaceChildren(el("li", "empty", "No SMS yet."));
      return;
    }
    list.replaceChildren(...sms.map((s) => {
      const li = el("li", s.from_phone ? "mine" : "");
      li.dataset.smsId = s.id;
      li.append(el("span", "tag", "sandbox"), " ");
      li.append(el("span", "peer", s.from_phone ? "To " + s.peer + ":" : s.peer + ":"));
      li.append(linkified(s.text));
      return li;
    }));
    list.scrollTop = list.scrollHeight;
  }

  function drawPrompt(phone) {
    const dialog = $("stk-dialog");
    const prompt = phone && phone.prompt;
    if (!prompt) {
      dialog.hidden = true;
      dialog.dataset.checkoutRequestId = "";
      return;
    }
    if (dialog.dataset.checkoutRequestId !== prompt.checkout_request_id) {
      dialog.dataset.checkoutRequestId = prompt.checkout_request_id;
      $("stk-amount").textContent = prompt.amount.toLocaleString("en-KE");
      $("stk-merchant").textContent = prompt.business_name;
      $("stk-paybill").textContent = prompt.party_b;
      $("stk-account").textContent = prompt.account_reference;
      $("stk-pin").value = "";
      $("stk-drop-callback").checked = false;
      dialog.hidden = false;
      $("stk-pin").focus();
    }
    $("stk-expiry").textContent = "The prompt times out in about " + prompt.expires_in_s + " s.";
  }

  async function answer(action) {
    const dialog = $("stk-dialog");
    const id = dialog.dataset.checkoutRequestId;
    if (!id) return;
    const body = { action: action, drop_callback: $("stk-drop-callback").checked };
    const pin = $("stk-pin").value;
    if (action === "pay" && pin) body.pin = pin;
    dialog.hidden = true;
    await act("api/stk/" + encodeURIComponent(id), body);
  }

  // ---- event log and operator ---------------------------------------------------------------
  function logRow(kind, summary, at, seq) {
    const li = el("li", "event");
    li.dataset.kind = kind;
    if (seq !== undefined) li.dataset.seq = seq;
    li.append(el("span", "time", clock(at)), el("span", "kind", kind), document.createTextNode(summary));
    return li;
  }

  function trimLog(log) {
    while (log.children.length > MAX_LOG) log.lastChild.remove();
  }

  function drawEvents(events) {
    const log = $("event-log");
    for (const e of events) {
      if (e.kind === "sandbox.reset") {
        log.replaceChildren();
        st.readSent.clear();
        st.drawn = {};
      }
      log.prepend(logRow(e.kind, e.summary, e.at, e.seq));
    }
    trimLog(log);
  }

  function logLocal(kind, summary) {
    const log = $("event-log");
    log.prepend(logRow(kind, summary, Date.now() / 1000));
    trimLog(log);
  }

  function drawFaults(sandbox) {
    const text = sandbox.faults.map((f) => f.service + ": " + f.mode + (f.remaining ? " (" + f.remaining + " left)" : "")).join(" \u00b7 ");
    if (changed("fault-list", text)) $("fault-list").textContent = text ? "Armed: " + text : "";
  }

  // ---- wiring -------------------------------------------------------------------------------
  function submitter(formId, inputId, path) {
    $(formId).addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const input = $(inputId);
      const text = input.value.trim();
      if (!text) return;
      input.value = "";
      await act(path(), { text: text });
    });
  }

  function init() {
    submitter("merchant-form", "merchant-input", () => "api/phones/" + st.merchant + "/whatsapp");
    submitter("customer-form", "customer-input", () => "api/phones/" + st.customer + "/whatsapp");
    submitter("customer-sms-form", "customer-sms-input", () => "api/phones/" + st.customer + "/sms");

    for (const role of ["merchant", "customer"]) {
      $(role + "-chat").addEventListener("click", async (ev) => {
        const btn = ev.target.closest("button.wa-button");
        if (!btn) return;
        const phone = role === "merchant" ? st.merchant : st.customer;
        btn.disabled = true;
        await act("api/phones/" + phone + "/tap", { message_id: btn.dataset.messageId, button_id: btn.dataset.buttonId });
        btn.disabled = false;
      });
    }

    $("customer-number").addEventListener("change", (ev) => {
      const value = ev.target.value.replace(/[^\d]/g, "");
      if (!value) return;
      st.customer = value;
      ev.target.value = value;
      kick();
    });
    $("customer-not-on-whatsapp").addEventListener("change", (ev) => {
      act("api/phones/" + st.customer + "/settings", { on_whatsapp: !ev.target.checked });
    });
    $("customer-blacklisted").addEventListener("change", (ev) => {
      act("api/phones/" + st.customer + "/settings", { blacklisted: ev.target.checked });
    });

    $("stk-pay").addEventListener("click", () => answer("pay"));
    $("stk-cancel").addEventListener("click", () => answer("cancel"));
    for (const [id, action] of [["stk-wrong-pin", "wrong_pin"], ["stk-insufficient", "insufficient"], ["stk-ignore", "ignore"]]) {
      $(id).addEventListener("click", (ev) => {
        ev.preventDefault();
        answer(action);
      });
    }
    $("stk-pin").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") answer("pay");
    });

    $("latency-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      act("api/latency", { ms: parseInt($("latency-ms").value || "0", 10) });
    });
    $("fault-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const body = { service: $("fault-service").value, mode: $("fault-mode").value };
      const count = parseInt($("fault-count").value, 10);
      if (count > 0) body.count = count;
      act("api/faults", body);
    });
    $("reset").addEventListener("click", () => act("api/reset", {}));
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") st.drawn = {};
      kick();
    });

    loop();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
