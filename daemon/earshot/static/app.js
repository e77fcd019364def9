// earshot web page: live view per source (SSE /live), recent events with clips, run-time control.
// Plain JavaScript, no build step and no external resources, so it works offline on a LAN.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const LEVEL_MIN = -100;  // dBFS at the left end of the level meter

let state = null;        // /api/state
const cards = new Map(); // source -> {root, ...parts}
const events = new Map(); // event id -> record
const items = new Map();  // event id -> <li>

// ------------------------------------------------------------------ views

function show(view) {
  for (const b of document.querySelectorAll("nav .tab")) b.classList.toggle("selected", b.dataset.view === view);
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== "view-" + view;
  if (view === "events") loadEvents();
  if (view === "control") drawControls();
}

async function getJSON(url, options) {
  const r = await fetch(url, Object.assign({credentials: "same-origin", cache: "no-store"}, options || {}));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
  return body;
}

// ------------------------------------------------------------------ live

function sourceCard(src) {
  let c = cards.get(src.name);
  if (c) return c;
  const root = $("#source-card").content.firstElementChild.cloneNode(true);
  root.dataset.source = src.name;
  root.dataset.hops = "0";
  $(".name", root).textContent = src.name;
  const scores = $(".scores", root);
  const rows = {};
  for (const label of state.model_labels) {
    if (!state.labels.includes(label)) continue;
    const row = el("div", "score");
    row.dataset.label = label;
    row.dataset.score = "0";
    const bar = el("div", "bar");
    bar.append(el("div", "fill"), el("div", "thr"));
    row.append(el("span", "name", label), bar, el("span", "val", "0.00"));
    scores.append(row);
    rows[label] = row;
  }
  const canvas = $(".spec", root);
  c = {root, rows, canvas, ctx: canvas.getContext("2d"), lo: -10, hi: 0, hops: 0};
  cards.set(src.name, c);
  $("#sources").append(root);
  return c;
}

function drawSources() {
  for (const src of state.sources) {
    const c = sourceCard(src);
    const badge = $(".badge", c.root);
    badge.textContent = src.enabled ? "listening" : "off";
    badge.classList.toggle("off", !src.enabled);
    setGate(c, src.gate_dbfs);
    for (const [label, t] of Object.entries(src.thresholds)) setThreshold(c, label, t);
  }
}

const pct = (db) => Math.max(0, Math.min(100, (db - LEVEL_MIN) / -LEVEL_MIN * 100));
function setGate(c, gate) { $(".gate", c.root).style.left = pct(gate) + "%"; c.gate = gate; }
function setThreshold(c, label, t) {
  const row = c.rows[label];
  if (row && t !== null && t !== undefined) { $(".thr", row).style.left = (t * 100) + "%"; row.dataset.threshold = t; }
}

function onHop(msg) {
  const c = cards.get(msg.source);
  if (!c) return;
  c.hops += 1;
  c.root.dataset.hops = String(c.hops);
  $(".meter .fill", c.root).style.width = pct(msg.level_dbfs) + "%";
  setGate(c, msg.gate_dbfs);
  $(".level-text", c.root).textContent =
    `level ${msg.level_dbfs.toFixed(1)} dBFS, gate ${msg.gate_dbfs.toFixed(0)} dBFS` +
    (msg.level_dbfs < msg.gate_dbfs ? " (below the gate: not scored)" : "");
  msg.labels.forEach((label, i) => {
    const row = c.rows[label];
    if (!row) return;
    const s = msg.scores[i], t = msg.thresholds[i];
    setThreshold(c, label, t);
    row.dataset.score = String(s);
    $(".bar .fill", row).style.width = (s * 100) + "%";
    $(".val", row).textContent = s.toFixed(2);
    row.classList.toggle("over", t !== null && s >= t);
    row.classList.toggle("active", msg.active.includes(label));
  });
  $(".active-list", c.root).textContent = "Active: " + (msg.active.length ? msg.active.join(", ") : "none");
  drawColumn(c, msg.mel);
}

// One spectrogram column per hop, scrolling left; the colour range follows the signal slowly.
function drawColumn(c, mel) {
  const {canvas, ctx} = c;
  const w = canvas.width, h = canvas.height, n = mel.length;
  let mn = Infinity, mx = -Infinity;
  for (const v of mel) { mn = Math.min(mn, v); mx = Math.max(mx, v); }
  c.lo = Math.min(mn, c.lo * 0.995 + mn * 0.005);
  c.hi = Math.max(mx, c.hi * 0.995 + mx * 0.005);
  ctx.drawImage(canvas, 1, 0, w - 1, h, 0, 0, w - 1, h);
  const col = ctx.createImageData(1, h);
  for (let y = 0; y < h; y++) {
    const band = Math.min(n - 1, Math.floor((h - 1 - y) * n / h));  // low bands at the bottom
    const x = Math.max(0, Math.min(1, (mel[band] - c.lo) / Math.max(1e-3, c.hi - c.lo)));
    const [r, g, b] = ramp(x);
    col.data.set([r, g, b, 255], y * 4);
  }
  ctx.putImageData(col, w - 1, 0);
}

const ANCHORS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function ramp(x) {
  const p = x * (ANCHORS.length - 1), i = Math.min(ANCHORS.length - 2, Math.floor(p)), f = p - i;
  return ANCHORS[i].map((a, k) => Math.round(a * (1 - f) + ANCHORS[i + 1][k] * f));
}

// ------------------------------------------------------------------ events

const localDay = (iso) => {
  const d = new Date(iso);
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`;
};

async function loadEvents() {
  try {
    const body = await getJSON("/api/events");
    for (const rec of body.events) upsert(rec);
    render();
  } catch (e) {
    console.warn("events:", e.message);
  }
}

function upsert(rec) {
  const old = events.get(rec.id) || {};
  const merged = Object.assign({}, old, rec);
  if (old.clip_ready && rec.clip_ready === undefined) merged.clip_ready = true;
  events.set(rec.id, merged);
}

function item(rec) {
  let li = items.get(rec.id);
  if (!li) {
    li = el("li", "event");
    li.dataset.eventId = rec.id;
    const head = el("div", "head");
    head.append(el("span", "label"), el("span", "score"), el("span", "meta"));
    li.append(head);
    items.set(rec.id, li);
  }
  li.classList.toggle("active", !!rec.active);
  li.dataset.source = rec.source;
  li.dataset.label = rec.label;
  li.dataset.day = rec.onset_time ? localDay(rec.onset_time) : "";
  $(".label", li).textContent = rec.label;
  $(".score", li).textContent = "score " + Number(rec.score).toFixed(2);
  const when = rec.onset_time ? new Date(rec.onset_time).toLocaleString() : "?";
  const dur = rec.duration_s === null || rec.duration_s === undefined ? "" : `, ${rec.duration_s.toFixed(1)} s`;
  const onset = rec.onset === null || rec.onset === undefined ? "" : ` (t ${Number(rec.onset).toFixed(1)} s)`;
  $(".meta", li).textContent = `${rec.source} · ${when}${onset}${dur}`;
  if (rec.clip_ready && state.clips && !$("audio", li)) {
    const img = el("img");
    img.alt = `spectrogram of the clip of ${rec.label}, detection marked in red`;
    img.loading = "lazy";
    img.src = `/clips/${encodeURIComponent(rec.clip)}.png`;
    const audio = el("audio");
    audio.controls = true;
    audio.preload = "none";
    audio.src = `/clips/${encodeURIComponent(rec.clip)}.flac`;
    audio.addEventListener("playing", () => { audio.dataset.state = "playing"; });
    audio.addEventListener("error", () => { audio.dataset.state = "error"; });
    li.append(img, audio);
  }
  return li;
}

function render() {
  const list = $("#events");
  const fs = $("#f-source").value, fl = $("#f-label").value, fd = $("#f-day").value;
  const recs = [...events.values()].sort((a, b) => (b.onset_time || "").localeCompare(a.onset_time || ""));
  let shown = 0, prev = null;
  for (const rec of recs) {
    const li = item(rec);
    li.hidden = (fs && rec.source !== fs) || (fl && rec.label !== fl) || (fd && li.dataset.day !== fd);
    if (!li.hidden) shown++;
    // keep newest first without rebuilding (a playing clip keeps playing)
    if (prev === null ? list.firstElementChild !== li : prev.nextElementSibling !== li) {
      if (prev === null) list.prepend(li); else prev.after(li);
    }
    prev = li;
  }
  $("#f-count").textContent = `${shown} of ${recs.length} detection(s)`;
}

function onDetection(rec) {
  upsert(rec);
  render();
  if (rec.type === "start" && rec.clip && state.clips) {
    setTimeout(loadEvents, (state.clip_post_s + 1.5) * 1000);  // the clip is written after its post-roll
  }
}

// ------------------------------------------------------------------ control

function drawControls() {
  const box = $("#controls");
  box.textContent = "";
  for (const src of state.sources) {
    const card = el("article", "card");
    card.dataset.source = src.name;
    card.append(el("h2", "", src.name));
    const toggle = el("label", "ctl-enabled");
    const box2 = el("input");
    box2.type = "checkbox";
    box2.checked = src.enabled;
    box2.dataset.source = src.name;
    box2.addEventListener("change", () => control({source: src.name, enabled: box2.checked}));
    toggle.append(box2, document.createTextNode(" listening"));
    card.append(toggle);
    for (const label of state.labels) {
      const row = el("div", "ctl-row");
      const input = el("input");
      input.type = "number"; input.min = "0.01"; input.max = "0.99"; input.step = "0.01";
      input.value = src.thresholds[label];
      input.dataset.source = src.name;
      input.dataset.label = label;
      const set = el("button", "set", "Set");
      set.type = "button";
      set.addEventListener("click", () => control({source: src.name, label, threshold: input.value}));
      const reset = el("button", "reset", "Default");
      reset.type = "button";
      reset.addEventListener("click", () => control({source: src.name, label, threshold: "default"}));
      row.append(el("span", "", label), input, set, reset);
      card.append(row);
    }
    box.append(card);
  }
}

async function control(cmd) {
  const msg = $("#control-msg");
  try {
    const body = await getJSON("/api/control", {method: "POST", headers: {"Content-Type": "application/json"},
                                                body: JSON.stringify(cmd)});
    state = body.state;
    drawSources();
    drawControls();
    msg.textContent = "Saved: " + JSON.stringify(cmd);
  } catch (e) {
    msg.textContent = "Refused: " + e.message;
  }
}

// ------------------------------------------------------------------ start

function fillFilters() {
  const fs = $("#f-source"), fl = $("#f-label");
  for (const s of state.sources) fs.append(new Option(s.name, s.name));
  for (const l of state.labels) fl.append(new Option(l, l));
  for (const f of [fs, fl, $("#f-day")]) f.addEventListener("change", render);
  $("#f-clear").addEventListener("click", () => { fs.value = ""; fl.value = ""; $("#f-day").value = ""; render(); });
}

function connect() {
  const link = $("#link");
  const feed = new EventSource("/live");
  feed.addEventListener("open", () => { link.textContent = "live"; link.className = "link up"; });
  feed.addEventListener("error", () => { link.textContent = "reconnecting"; link.className = "link down"; });
  feed.addEventListener("hello", (e) => { state = JSON.parse(e.data); drawSources(); });
  feed.addEventListener("hop", (e) => onHop(JSON.parse(e.data)));
  feed.addEventListener("detection", (e) => onDetection(JSON.parse(e.data)));
}

async function start() {
  state = await getJSON("/api/state");
  $("#node").textContent = state.node;
  document.title = `earshot ${state.node}`;
  $("nav [data-view=control]").hidden = !state.can_control;
  $("#logout").hidden = !state.auth;
  $("#no-clips").hidden = state.clips;
  for (const b of document.querySelectorAll("nav .tab")) b.addEventListener("click", () => show(b.dataset.view));
  fillFilters();
  drawSources();
  await loadEvents();
  connect();
  setInterval(() => { if (!$("#view-events").hidden) loadEvents(); }, 10000);
  // Changes made elsewhere (MQTT, Home Assistant, another page): badges and thresholds follow.
  setInterval(async () => {
    try {
      state = await getJSON("/api/state");
      drawSources();
    } catch (e) {
      console.warn("state:", e.message);
    }
  }, 5000);
}

start().catch((e) => { document.body.prepend(el("p", "note", "Cannot load the page: " + e.message)); });
