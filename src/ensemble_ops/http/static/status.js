// The ensemble-ops status page: /status.json for the picture, /events for what changes.
// No framework and no chart library: a few cards and two SVG sparklines each are less code
// than any library's setup, and the page must work offline (no CDN). All data goes into
// the DOM as text (never as HTML), so nothing a member or a request says can run here.
"use strict";

const ROLLING = ["shadowing", "canary", "awaiting_promotion"];
const RUNNING = ["warming_up", "ready", "switching", ...ROLLING];
const page = {
  snapshot: null,
  lastEventId: 0,
  requests: [],
  renderLatenciesMs: [], // event time -> on the page, per reload state change (benchmarks)
  streaming: false,
};
window.statusPage = page;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "onclick" || name === "onsubmit") node[name] = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function chip(text, kind) {
  return el("span", { class: `chip ${kind || ""}` }, text);
}

function credentialHeaders() {
  const headers = {};
  const secret = sessionStorage.getItem("ensemble-ops-credential");
  if (secret) headers.Authorization = `Bearer ${secret}`;
  return headers;
}

function askForCredential(label) {
  const form = document.getElementById("credentials");
  document.getElementById("credential-label").textContent = label;
  form.hidden = false;
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(
      "ensemble-ops-credential", document.getElementById("credential").value.trim());
    form.hidden = true;
    refresh();
    follow();
  };
}

async function refresh() {
  let answer;
  try {
    answer = await fetch("/status.json", { headers: credentialHeaders(), cache: "no-store" });
  } catch (err) {
    setConnection("server unreachable", "bad");
    return;
  }
  if (answer.status === 401) {
    askForCredential("API key");
    return;
  }
  if (!answer.ok) return;
  const snapshot = await answer.json();
  page.snapshot = snapshot;
  if (!page.streaming) {
    page.lastEventId = snapshot.last_event_id;
    page.requests = snapshot.recent_requests.slice().reverse();
  }
  renderAll();
}

function setConnection(text, kind) {
  const node = document.getElementById("connection");
  node.textContent = text;
  node.className = `chip ${kind || ""}`;
}

// Server-sent events over fetch (EventSource cannot send an API key).
async function follow() {
  if (page.streaming) return;
  page.streaming = true;
  while (page.streaming) {
    try {
      const headers = credentialHeaders();
      if (page.lastEventId) headers["Last-Event-ID"] = String(page.lastEventId);
      const answer = await fetch("/events", { headers, cache: "no-store" });
      if (answer.status === 401) {
        page.streaming = false;
        askForCredential("API key");
        return;
      }
      if (!answer.ok || !answer.body) throw new Error(`events: ${answer.status}`);
      setConnection("live", "ok");
      await readFrames(answer.body.getReader());
    } catch (err) {
      // Reconnect below; the stream resumes after the last event seen.
    }
    setConnection("reconnecting", "hold");
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function readFrames(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((line) => line.startsWith("data: "))
        .map((line) => line.slice(6)).join("\n");
      if (data) handle(JSON.parse(data));
    }
  }
}

function member(name) {
  return page.snapshot ? page.snapshot.members.find((m) => m.name === name) : undefined;
}

function handle(event) {
  if (event.id) page.lastEventId = event.id;
  const m = event.model ? member(event.model) : undefined;
  switch (event.type) {
    case "request":
      page.requests.unshift(event);
      page.requests.length = Math.min(page.requests.length, 50);
      renderRequests();
      return;
    case "health.changed":
      if (m) {
        m.health = event.new;
        m.reason = event.reason;
        renderMember(m);
      }
      return;
    case "reload.state_changed":
      if (m) {
        m.reload.state = event.to;
        m.reload.progress_percent = event.progress;
        m.reload.message = event.message;
        if (event.from === "idle" || ["completed", "failed", "rolled_back"].includes(event.from)) {
          m.reload.rollout = null;
          m.reload.quality = null;
          m.reload.error = null;
        }
        renderMember(m);
        page.renderLatenciesMs.push(Date.now() - event.ts * 1000);
      }
      return;
    case "reload.progress":
      if (m) {
        m.reload.progress_percent = event.progress;
        m.reload.message = event.message;
        renderMember(m);
      }
      return;
    case "reload.finished":
      if (m) {
        m.reload.error = event.error;
        renderMember(m);
      }
      refresh(); // the new copy's generation, file and figures
      return;
    case "rollout.stepped":
      if (m) {
        m.reload.rollout = m.reload.rollout || { kind: event.rollout, gates: {} };
        m.reload.rollout.weight_percent = event.weight_percent;
        renderMember(m);
      }
      return;
    case "rollout.gate":
      if (m) {
        if (event.gate === "quality") {
          m.reload.quality = Object.assign(m.reload.quality || {}, {
            verdict: event.verdict, reason: event.reason });
        } else {
          m.reload.rollout = m.reload.rollout || { gates: {} };
          m.reload.rollout.gates = m.reload.rollout.gates || {};
          m.reload.rollout.gates[event.gate] = { verdict: event.verdict, reason: event.reason };
        }
        renderMember(m);
      }
      return;
    default:
      if (event.type.startsWith("model.") || event.type === "cache.backend_changed") refresh();
  }
}

function renderAll() {
  const snapshot = page.snapshot;
  document.getElementById("listener").textContent = snapshot.admin ? "admin" : "read-only";
  renderEnsemble();
  const cards = document.getElementById("members");
  const names = snapshot.members.map((m) => m.name);
  for (const card of [...cards.children]) {
    if (!names.includes(card.dataset.member)) card.remove();
  }
  snapshot.members.forEach(renderMember);
  renderRequests();
}

function renderEnsemble() {
  const e = page.snapshot.ensemble;
  const hit = e.hit_share === null ? "-" : `${Math.round(e.hit_share * 100)}%`;
  const cache = e.cache === null ? chip("cache off")
    : chip(`cache ${e.cache.backend} ${e.cache.up ? "up" : "down"}`, e.cache.up ? "ok" : "bad");
  document.getElementById("ensemble").replaceChildren(
    chip(e.ready ? "ready" : `not ready: ${e.ready_reason}`, e.ready ? "ok" : "bad"),
    chip(e.live ? "live" : `not live: ${e.live_reason}`, e.live ? "ok" : "bad"),
    cache,
    chip(`${e.requests_per_s.toFixed(2)} req/s`),
    chip(`cache hits ${hit}`),
  );
}

function sparkline(values, caption, format) {
  const known = values.filter((v) => v !== null);
  const top = Math.max(...known, 1e-9);
  const step = 100 / Math.max(values.length - 1, 1);
  const points = values.map((v, i) => (v === null ? null : `${(i * step).toFixed(1)},${
    (34 - (v / top) * 32).toFixed(1)}`)).filter((p) => p !== null).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 100 36");
  svg.setAttribute("preserveAspectRatio", "none");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  svg.append(line);
  const last = known.length ? format(known[known.length - 1]) : "-";
  return el("figure", {}, el("figcaption", {}, `${caption}: ${last}`), svg);
}

function renderMember(m) {
  const cards = document.getElementById("members");
  let card = cards.querySelector(`[data-member="${CSS.escape(m.name)}"]`);
  if (!card) {
    card = el("article", { class: "card", "data-member": m.name });
    cards.append(card);
  }
  const kv = m.kv_usage === null ? "-" : `${Math.round(m.kv_usage * 100)}%`;
  const memory = m.memory_mb === null ? "-" : `${Math.round(m.memory_mb)} MB`;
  card.replaceChildren(...[
    el("h3", {}, m.name, chip(m.health, m.health), chip(m.state)),
    m.reason ? el("p", { class: "reason" }, m.reason) : null,
    el("dl", {},
      el("dt", {}, "file"), el("dd", {}, m.file),
      el("dt", {}, "model"), el("dd", {}, `${m.architecture || "-"} (${m.capabilities.join(", ") || "-"})`),
      el("dt", {}, "generation"), el("dd", {}, m.generation === null ? "-" : m.generation),
      el("dt", {}, "memory"), el("dd", {}, `${memory}, KV cache ${kv}`),
      el("dt", {}, "slots"), el("dd", {}, `${Math.min(m.in_flight, m.parallel)} of ${m.parallel} busy, ${m.queue_depth} queued`)),
    el("div", { class: "spark" },
      sparkline(m.recent.tokens_per_s, "tokens/s", (v) => v.toFixed(1)),
      sparkline(m.recent.p95_latency_s, "p95 latency", (v) => `${v.toFixed(2)} s`)),
    renderReload(m),
  ].filter((node) => node !== null));
}

function renderReload(m) {
  const r = m.reload;
  const running = RUNNING.includes(r.state);
  const parts = [el("div", {}, "reload ", chip(r.state.replace("_", " "), r.state),
    r.rollout && r.rollout.weight_percent !== undefined && running
      ? chip(`new copy ${r.rollout.weight_percent}%`) : null)];
  if (running || r.state !== "idle") {
    parts.push(el("div", { class: "bar", role: "progressbar", "aria-valuenow": r.progress_percent },
      el("div", { style: `width: ${Math.max(0, Math.min(100, r.progress_percent))}%` })));
    parts.push(el("div", { class: "message" }, r.error || r.message));
  }
  const gates = [];
  if (r.rollout && r.rollout.gates) {
    for (const [gate, result] of Object.entries(r.rollout.gates)) {
      gates.push(chip(`${gate}: ${result.verdict}`, result.verdict));
    }
  }
  if (r.quality && r.quality.verdict) {
    const rate = r.quality.pass_rate === undefined ? "" : ` ${Math.round(r.quality.pass_rate * 100)}%`;
    gates.push(chip(`quality: ${r.quality.verdict}${rate}`, r.quality.verdict));
  }
  if (gates.length) parts.push(el("div", { class: "gates" }, gates));
  if (page.snapshot.admin) parts.push(renderActions(m, running));
  return el("div", { class: "reload" }, parts);
}

function renderActions(m, running) {
  const path = el("input", { placeholder: "new file (default: its own)", "aria-label": `${m.name} file` });
  const act = (action, body) => admin(`/admin/models/${encodeURIComponent(m.name)}/${action}`, body);
  return el("div", { class: "actions" },
    running ? null : [path, el("button", { type: "button", onclick: () => act("reload",
      path.value.trim() ? { path: path.value.trim() } : {}) }, "Reload")],
    ROLLING.includes(m.reload.state) ? [
      el("button", { type: "button", onclick: () => act("promote", null) }, "Promote"),
      el("button", { type: "button", onclick: () => act("abort", null) }, "Abort")] : null);
}

async function admin(path, body) {
  const headers = { "Content-Type": "application/json", "X-CSRF-Token": page.snapshot.csrf_token || "" };
  Object.assign(headers, credentialHeaders());
  const answer = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}) });
  if (answer.status === 401) {
    askForCredential("admin token");
    return;
  }
  if (!answer.ok) {
    const detail = await answer.json().catch(() => ({}));
    const message = (detail.error && detail.error.message) || detail.detail || answer.statusText;
    window.alert(`${answer.status}: ${message}`);
  }
}

function renderRequests() {
  const rows = page.requests.map((r) => el("tr", {},
    el("td", {}, new Date(r.ts * 1000).toLocaleTimeString()),
    el("td", {}, r.model), el("td", {}, r.mode), el("td", {}, r.copy),
    el("td", {}, chip(r.status, r.status === "success" ? "ok" : "bad")),
    el("td", {}, r.latency_ms === null ? "-" : `${Math.round(r.latency_ms)} ms`),
    el("td", {}, `${r.prompt_tokens} + ${r.completion_tokens}`),
    el("td", {}, r.cached ? "hit" : "")));
  document.querySelector("#requests tbody").replaceChildren(...rows);
}

document.addEventListener("DOMContentLoaded", () => {
  refresh().then(follow);
  setInterval(refresh, 5000);
});
