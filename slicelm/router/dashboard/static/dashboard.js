// slicelm stack dashboard: polls api/state (relative to this page) every few seconds and draws it.
// Plain DOM and SVG, no build step. The API key (routers started with --api-key) lives in sessionStorage only.
"use strict";

const KEY_STORE = "slicelm.dashboard.apiKey";
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#ff9da7",
                 "#9c755f", "#bab0ac"];
const SVG_NS = "http://www.w3.org/2000/svg";
let timer = null;
let lastState = null;

// ---------------------------------------------------------------- formatting
const nf = new Intl.NumberFormat("en-US");
const isNum = (v) => typeof v === "number" && Number.isFinite(v);
function fmtMiB(v) {
  if (!isNum(v)) return "–";
  return v >= 10240 ? `${(v / 1024).toFixed(1)} GiB` : `${nf.format(Math.round(v))} MiB`;
}
function fmtSec(v) {
  if (!isNum(v)) return "–";
  if (v < 1) return `${(v * 1000).toFixed(v < 0.01 ? 2 : v < 0.1 ? 1 : 0)} ms`;
  return `${v.toFixed(2)} s`;
}
const fmtPct = (v) => (isNum(v) ? `${(v * 100).toFixed(1)}%` : "–");
const fmtCount = (v) => (isNum(v) ? nf.format(Math.round(v)) : "–");
const fmtRate = (v) => (isNum(v) ? (v >= 10 ? v.toFixed(1) : v.toFixed(2)) : "–");
function fmtUptime(s) {
  if (!isNum(s)) return "–";
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(sec).padStart(2, "0")}s`;
}
const fmtPair = (a, b, f) => `${f(a)} / ${f(b)}`;
const smCapped = (cores) => isNum(cores) && cores > 0 && cores < 100; // HAMi: 0 (or 100) is no SM limit

// ---------------------------------------------------------------- DOM helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}
function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}
// A cell that shows `text` and keeps the raw value for tests and tools (data-value is JSON).
function cell(field, value, text, cls) {
  return el("td", {"data-field": field, "data-value": JSON.stringify(value ?? null), class: cls}, text);
}
const colorOf = (state, model) => state.__colors[model] || PALETTE[0];

// ---------------------------------------------------------------- header
function renderHeader(state) {
  const r = state.router || {};
  const replicas = state.replicas || [];
  const ready = replicas.filter((x) => x.status === "ready").length;
  const parts = [
    ["stack", state.stack ? state.stack.phase : null],
    ["discovery", r.discovery],
    ["routing", r.routing_logic],
    ["replicas ready", `${ready} / ${replicas.length}`],
  ];
  const queued = Object.values(r.queued || {}).reduce((a, b) => a + b, 0);
  if (queued) parts.push(["queued at the router", queued]);
  document.getElementById("summary").replaceChildren(
    ...parts.filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => el("span", {}, `${k} `, el("b", {}, v))));
  const when = new Date(state.time * 1000);
  document.getElementById("updated").textContent = `updated ${when.toLocaleTimeString("en-GB")}`;
  document.getElementById("live-dot").className = state.replay ? "dot" : "dot live";
  const replay = document.getElementById("replay");
  replay.hidden = !state.replay;
  if (state.replay) {
    const p = state.replay;
    replay.textContent = `Rendered from recorded state: ${p.device || "a recorded run"}, captured ` +
      `${new Date(p.captured_at * 1000).toISOString().replace("T", " ").slice(0, 19)} UTC` +
      (p.commit ? ` at commit ${p.commit.slice(0, 9)}` : "") + (p.workload ? ` · ${p.workload}` : "") + ".";
  }
  const w = state.windows || {};
  document.getElementById("windows").textContent =
    `req/s over the last ${w.rate_s} s · latency percentiles and prefix hits over the last ${w.latency_s} s · ` +
    "requests and errors: routed by this router since it started";
}

// ---------------------------------------------------------------- devices
function segment(state, s, scale, wholeMiB) {
  const size = isNum(s.memory_mib) ? s.memory_mib : (isNum(wholeMiB) ? wholeMiB : s.memory_used_mib);
  const width = scale > 0 && isNum(size) ? (100 * size) / scale : 0;
  const usedFrac = isNum(s.memory_used_mib) && isNum(size) && size > 0 ? Math.min(1, s.memory_used_mib / size) : 0;
  const color = colorOf(state, s.model);
  const bar = el("div", {class: "seg", "data-slice": s.key, title: `${s.key}: ${fmtMiB(s.memory_used_mib)} used of ` +
      `${isNum(s.memory_mib) ? fmtMiB(s.memory_mib) : "no slice"}`,
    style: {width: `${width}%`, background: `${color}55`}},
  el("div", {class: "used", style: {width: `${usedFrac * 100}%`, background: color}}),
  width > 9 ? el("span", {class: "seg-label"}, s.key) : null);
  return bar;
}

function sliceLine(state, s, isGpu) {
  const figs = [
    el("span", {"data-field": "memory_mib", "data-value": JSON.stringify(s.memory_mib)},
      isNum(s.memory_mib) ? `${fmtMiB(s.memory_mib)} slice` : (isGpu ? "whole GPU" : "no memory slice")),
    el("span", {"data-field": "memory_used_mib", "data-value": JSON.stringify(s.memory_used_mib)},
      `${fmtMiB(s.memory_used_mib)} used`),
  ];
  if (isGpu) {
    figs.push(el("span", {"data-field": "cores", "data-value": JSON.stringify(s.cores)},
      smCapped(s.cores) ? `SM ${s.cores}%` : "SM uncapped"));
    figs.push(el("span", {"data-field": "policy", "data-value": JSON.stringify(s.policy)}, s.policy || "–"));
  }
  const joined = [];
  figs.forEach((f, i) => { if (i) joined.push(el("span", {class: "sep"}, "·")); joined.push(f); });
  return el("li", {"data-slice": s.key},
    el("span", {class: "swatch", style: {background: colorOf(state, s.model)}}),
    el("span", {class: "slice-name", title: s.key}, s.key),
    el("span", {class: "slice-figs"}, joined),
    el("span", {class: `badge ${s.status}`, "data-field": "status", "data-value": JSON.stringify(s.status)}, s.status));
}

function deviceCard(state, d, isGpu) {
  const slices = d.slices || [];
  const sliced = slices.reduce((a, s) => a + (isNum(s.memory_mib) ? s.memory_mib : 0), 0);
  const used = slices.reduce((a, s) => a + (isNum(s.memory_used_mib) ? s.memory_used_mib : 0), 0);
  const total = isNum(d.memory_mib) ? d.memory_mib : null;
  const scale = total || Math.max(sliced, used) || 1;
  const id = isGpu ? (d.uuid || d.label) : "cpu";
  const name = isGpu ? d.label : "CPU";
  const kind = isGpu ? (d.type || d.uuid || "") : (isNum(d.cores) ? `${d.cores} cores · host memory` : "host memory");
  const foot = [];
  if (isGpu) {
    foot.push(`${fmtMiB(sliced)} in slices` + (total && total > sliced ? `, ${fmtMiB(total - sliced)} free` : ""));
    if (isNum(d.memory_used_mib)) foot.push(`NVML: ${fmtMiB(d.memory_used_mib)} used on the GPU` +
      (total ? ` (${((100 * d.memory_used_mib) / total).toFixed(0)}%)` : ""));
  } else {
    foot.push(`${fmtMiB(used)} resident in the replicas` + (total ? ` (${((100 * used) / total).toFixed(1)}% of the host)` : ""));
  }
  foot.push(`${slices.length} replica${slices.length === 1 ? "" : "s"}`);
  return el("div", {class: "device", "data-device": id},
    el("div", {class: "device-head"}, el("span", {class: "device-name"}, name), el("span", {class: "device-type"}, kind),
      el("span", {class: "device-total", "data-field": "memory_mib", "data-value": JSON.stringify(d.memory_mib ?? null)},
        total ? `${fmtMiB(total)} total` : "total unknown")),
    el("div", {class: "membar"}, slices.map((s) => segment(state, s, scale, isGpu ? total : null))),
    el("div", {class: "device-foot"}, foot.join(" · ")),
    el("ul", {class: "slices"}, slices.map((s) => sliceLine(state, s, isGpu))));
}

function renderDevices(state) {
  const cards = (state.gpus || []).map((g) => deviceCard(state, g, true));
  if (state.cpu) cards.push(deviceCard(state, state.cpu, false));
  if (!cards.length) cards.push(el("div", {class: "device"}, "No replica reports its device yet."));
  document.getElementById("devices").replaceChildren(...cards);
}

// ---------------------------------------------------------------- models table
function loadCells(x) {
  const errCls = isNum(x.errors) && x.errors > 0 ? "num errors-nonzero" : "num";
  return [
    cell("requests_per_s", x.requests_per_s, fmtRate(x.requests_per_s), "num"),
    cell("requests", x.requests, fmtCount(x.requests), "num"),
    cell("errors", x.errors, fmtCount(x.errors), errCls),
    cell("ttft", [x.ttft_p50, x.ttft_p99], fmtPair(x.ttft_p50, x.ttft_p99, fmtSec), "num"),
    cell("tpot", [x.tpot_p50, x.tpot_p99], fmtPair(x.tpot_p50, x.tpot_p99, fmtSec), "num"),
    cell("queue", [x.running, x.waiting], fmtPair(x.running, x.waiting, fmtCount), "num"),
    cell("kv_usage", x.kv_usage, fmtPct(x.kv_usage), "num"),
    cell("prefix_hit_rate", x.prefix_hit_rate, fmtPct(x.prefix_hit_rate), "num"),
  ];
}

function deviceText(r) {
  if (r.device === "cuda") {
    const g = (r.gpus || []).map((x) => (x.index ?? x.uuid)).join(",");
    return `GPU ${g}` + (isNum(r.memory_mib) ? ` · ${fmtMiB(r.memory_mib)}` : "") + (smCapped(r.cores) ? ` · SM ${r.cores}%` : "");
  }
  return r.device || "–";
}

function renderModels(state) {
  const rows = [];
  for (const m of state.models || []) {
    const served = (m.served_names || []).filter((n) => n !== m.name).join(", ");
    rows.push(el("tr", {class: "model-row", "data-model": m.name},
      el("td", {}, el("span", {class: "model-name"}, el("span", {class: "swatch", style: {background: colorOf(state, m.name)}}),
        m.name, served ? el("span", {class: "served"}, served) : null)),
      cell("ready", [m.ready, m.replicas], `${m.ready} / ${m.replicas} ready`), el("td", {}), el("td", {}), el("td", {}),
      loadCells(m)));
    for (const r of (state.replicas || []).filter((x) => x.model === m.name)) {
      rows.push(el("tr", {class: "replica-row", "data-replica": r.key},
        cell("key", r.key, r.replica !== null && r.replica !== undefined ? `replica ${r.replica}` : r.url),
        el("td", {"data-field": "status", "data-value": JSON.stringify(r.status), title: `supervisor: ${r.state}` +
            (r.ejected_reason ? ` · router: ${r.ejected_reason}` : "")}, el("span", {class: `badge ${r.status}`}, r.status)),
        cell("restarts", r.restarts, r.restarts ?? "–", isNum(r.restarts) && r.restarts === 0 ? "num zero" : "num"),
        cell("uptime_s", r.uptime_s, fmtUptime(r.uptime_s), "num"),
        cell("device", r.device, deviceText(r)),
        loadCells(r)));
    }
  }
  document.querySelector("#replicas tbody").replaceChildren(...rows);
}

// ---------------------------------------------------------------- charts
function chart(t, series, opts) {
  const W = 240, H = 70, L = 30, B = 12, T = 4;
  const node = svg("svg", {class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
    "data-chart": opts.id, "data-points": String(t.length)});
  const values = series.flatMap((s) => s.values.filter(isNum));
  const top = Math.max(opts.min || 0, ...values) * 1.1 || 1;
  const t0 = t.length ? t[0] : 0, t1 = Math.max(opts.now || 0, t.length ? t[t.length - 1] : 1);
  const x = (v) => L + ((W - L - 2) * (v - t0)) / Math.max(1, t1 - t0);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  for (const g of [0, 0.5, 1]) node.append(svg("line", {class: "grid", x1: L, x2: W, y1: y(top * g), y2: y(top * g)}));
  const label = svg("text", {class: "axis-label", x: 2, y: T + 8});
  label.textContent = opts.fmt(top);
  node.append(label);
  const span = svg("text", {class: "axis-label", x: L, y: H - 1});
  const ago = t1 - t0;
  span.textContent = t.length > 1 ? (ago < 90 ? `-${Math.round(ago)} s` : `-${Math.round(ago / 60)} min`) : "";
  node.append(span);
  const nowLabel = svg("text", {class: "axis-label", x: W - 2, y: H - 1, "text-anchor": "end"});
  nowLabel.textContent = "now";
  node.append(nowLabel);
  series.forEach((s, i) => {
    let d = "";
    let pen = false;
    s.values.forEach((v, k) => {
      if (!isNum(v)) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(t[k]).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    if (d) node.append(svg("path", {class: i ? "line second" : "line", d, stroke: s.color}));
  });
  return node;
}

function lastOf(values) {
  for (let i = values.length - 1; i >= 0; i--) if (isNum(values[i])) return values[i];
  return null;
}

function miniChart(title, t, series, opts) {
  const last = series.map((s) => opts.fmt(lastOf(s.values))).join(" / ");
  return el("div", {}, el("div", {class: "chart-title"}, el("span", {}, title), el("span", {class: "last"}, last)),
    chart(t, series, opts));
}

function renderCharts(state) {
  const h = state.history || {t: [], models: {}, gpus: {}, cpu: []};
  const t = h.t || [];
  const now = state.time;
  const cards = [];
  for (const m of state.models || []) {
    const s = h.models[m.name];
    if (!s) continue;
    const c = colorOf(state, m.name);
    const id = (k) => `${m.name}:${k}`;
    cards.push(el("div", {class: "chart-card", "data-model": m.name},
      el("h3", {}, el("span", {class: "swatch", style: {background: c}}), m.name),
      el("div", {class: "chart-grid"},
        miniChart("requests/s", t, [{values: s.requests_per_s, color: c}], {id: id("requests_per_s"), fmt: fmtRate, now}),
        miniChart("TTFT p50 / p99", t, [{values: s.ttft_p50, color: c}, {values: s.ttft_p99, color: c}],
          {id: id("ttft"), fmt: fmtSec, now}),
        miniChart("running / waiting", t, [{values: s.running, color: c}, {values: s.waiting, color: "#e15759"}],
          {id: id("queue"), fmt: fmtCount, now, min: 1}),
        miniChart("KV cache usage", t, [{values: s.kv_usage, color: c}], {id: id("kv_usage"), fmt: fmtPct, now, min: 0.01}))));
  }
  const mem = [];
  for (const g of state.gpus || []) {
    const gid = g.uuid || g.label;
    if (h.gpus[gid]) mem.push(miniChart(`${g.label} memory used`, t, [{values: h.gpus[gid], color: "#3563d9"}],
      {id: `gpu:${gid}`, fmt: fmtMiB, now, min: 1}));
  }
  if (state.cpu && h.cpu) mem.push(miniChart("CPU replicas' resident memory", t, [{values: h.cpu, color: "#59a14f"}],
    {id: "cpu", fmt: fmtMiB, now, min: 1}));
  if (mem.length) cards.push(el("div", {class: "chart-card"}, el("h3", {}, "Memory"), el("div", {class: "chart-grid"}, mem)));
  document.getElementById("charts").replaceChildren(...cards);
  document.getElementById("span").textContent = t.length > 1
    ? `${Math.round((now - t[0]) / 60 * 10) / 10} min of ${state.history_s / 60} kept · one sample every ${state.interval_s} s`
    : "collecting…";
}

// ---------------------------------------------------------------- polling
function render(state) {
  state.__colors = {};
  (state.models || []).forEach((m, i) => { state.__colors[m.name] = PALETTE[i % PALETTE.length]; });
  renderHeader(state);
  renderDevices(state);
  renderModels(state);
  renderCharts(state);
  document.body.dataset.renderedAt = String(state.time);
}

function showProblem(text) {
  const p = document.getElementById("problem");
  p.hidden = !text;
  p.textContent = text || "";
  if (text) document.getElementById("live-dot").className = "dot stale";
}

async function poll() {
  clearTimeout(timer);
  const key = sessionStorage.getItem(KEY_STORE);
  let delay = 2000;
  try {
    const resp = await fetch("api/state", {headers: key ? {Authorization: `Bearer ${key}`} : {}, cache: "no-store"});
    if (resp.status === 401) {
      document.getElementById("key-form").hidden = false;
      showProblem(key ? "The API key was refused." : "");
      return; // waits for the key form
    }
    document.getElementById("key-form").hidden = true;
    if (!resp.ok) {
      showProblem(`The router answered ${resp.status}; retrying.`);
    } else {
      lastState = await resp.json();
      showProblem("");
      render(lastState);
      delay = Math.max(1000, 1000 * (lastState.interval_s || 2));
    }
  } catch (err) {
    showProblem(`Cannot reach the router (${err.message}); retrying.` + (lastState ? " Showing the last state." : ""));
  }
  timer = setTimeout(poll, delay);
}

document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = document.getElementById("api-key");
  if (input.value) sessionStorage.setItem(KEY_STORE, input.value);
  input.value = "";
  poll();
});
poll();
