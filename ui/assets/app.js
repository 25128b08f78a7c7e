// mpvpn's dashboard: the page arrives whole from the server; this keeps
// it live from /events (server-sent events, the token in a cookie).
"use strict";

const WINDOW_MS = 5 * 60 * 1000; // the graphs' span
const COLORS = ["#0969da", "#bf3989", "#1a7f37", "#9a6700", "#8250df", "#cf222e", "#1b7c83", "#57606a"];
const STATE_COLORS = { up: "#2da44e", backup: "#54aeff", withdrawn: "#cf222e", down: "#aaaaaa" };

let samples = [];
const colorOf = new Map();

function fmtRate(bps) {
  if (bps >= 1e9) return (bps / 1e9).toFixed(2) + " Gbit/s";
  if (bps >= 1e6) return (bps / 1e6).toFixed(1) + " Mbit/s";
  if (bps >= 1e3) return (bps / 1e3).toFixed(0) + " kbit/s";
  return Math.max(bps || 0, 0).toFixed(0) + " bit/s";
}

function fmtBytes(n) {
  if (n >= 2 ** 30) return (n / 2 ** 30).toFixed(2) + " GiB";
  if (n >= 2 ** 20) return (n / 2 ** 20).toFixed(1) + " MiB";
  if (n >= 2 ** 10) return (n / 2 ** 10).toFixed(0) + " KiB";
  return (n || 0) + " B";
}

function fmtMs(v) { return v > 0 ? v.toFixed(1) + " ms" : "-"; }

function fmtAge(since) {
  const t = Date.parse(since);
  if (!t || t < 0) return "-";
  const s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60) + "s";
  return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
}

function color(name) {
  if (!colorOf.has(name)) colorOf.set(name, COLORS[colorOf.size % COLORS.length]);
  return colorOf.get(name);
}

// row builds a table row of text cells (never HTML: destinations and
// reasons are data).
function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  for (const c of cells) {
    const td = document.createElement("td");
    if (typeof c === "object") {
      td.textContent = c.text;
      if (c.cls) td.className = c.cls;
    } else td.textContent = c;
    tr.appendChild(td);
  }
  return tr;
}

function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  if (body) body.replaceChildren(...rows);
}

function render(st) {
  fill("uplinks", (st.uplinks || []).map(u => row([
    { text: u.name + (u.backup ? " (backup)" : ""), cls: "name" },
    { text: u.state + (u.reason ? ": " + u.reason : ""), cls: "state" },
    u.addr || "",
    { text: fmtRate(u.rx_bps), cls: "rx" },
    { text: fmtRate(u.tx_bps), cls: "tx" },
    fmtMs(u.rtt_ms),
    { text: u.probe_alive ? fmtMs(u.probe_rtt_ms) : "no answer", cls: "probe" },
    String(u.subflows),
    String(u.fallbacks),
  ], { "data-uplink": u.name, "data-state": u.state })));
  const f = st.flows || {};
  const sum = document.getElementById("flowsum");
  if (sum) sum.textContent = `open ${f.active || 0}, opened ${f.total || 0}, failed ${f.failed || 0}, refused ${f.rejected || 0}, on plain TCP ${f.fallbacks || 0}`;
  const flows = st.open_flows || [];
  const paths = o => {
    const total = (o.rx_bytes || 0) + (o.tx_bytes || 0);
    return (o.paths || []).map(p => `${p.uplink} ${total ? Math.round(100 * (p.rx_bytes + p.tx_bytes) / total) + "%" : "-"} (${p.subflows})`).join("  ");
  };
  if (st.role === "client") {
    fill("flows", flows.map(o => row([o.dst, fmtAge(o.since), fmtRate(o.rx_bps || 0), fmtRate(o.tx_bps || 0), fmtBytes(o.rx_bytes), fmtBytes(o.tx_bytes), paths(o)])));
  } else {
    fill("flows", flows.map(o => row([{ text: o.peer, cls: "key" }, o.client, o.dst, fmtAge(o.since), fmtBytes(o.rx_bytes), fmtBytes(o.tx_bytes), paths(o)])));
    fill("peers", (st.peers || []).map(p => row([{ text: p.key, cls: "key" }, String(p.active_flows), String(p.total_flows), String(p.limited), fmtAge(p.last_seen)])));
  }
}

// spanMs is the graphs' time span: what has been sampled, from one
// minute up to WINDOW_MS.
function spanMs(now) {
  const first = samples.length ? samples[0].t : now;
  return Math.min(WINDOW_MS, Math.max(60 * 1000, now - first));
}

function fmtSpan(ms) {
  const s = Math.round(ms / 1000);
  return s < 120 ? s + " s" : Math.round(s / 60) + " min";
}

// frame clears canvas id and draws its grid for values from 0 to peak,
// labelled with fmt, over the graphs' span; it returns the context and
// the scales, or null when the page has no such canvas.
function frame(id, peak, fmt) {
  const cv = document.getElementById(id);
  if (!cv) return null;
  const g = cv.getContext("2d");
  const W = cv.width, H = cv.height, L = 70, B = 20;
  g.clearRect(0, 0, W, H);
  const now = samples.length ? samples[samples.length - 1].t : Date.now();
  const span = spanMs(now);
  const x = t => L + (W - L - 5) * (1 - (now - t) / span);
  const y = v => H - B - (H - B - 5) * v / peak;
  g.strokeStyle = "#ddd"; g.fillStyle = "#555"; g.font = "11px sans-serif"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = peak * i / 4;
    g.beginPath(); g.moveTo(L, y(v)); g.lineTo(W - 5, y(v)); g.stroke();
    g.fillText(fmt(v), 2, y(v) + 4);
  }
  g.fillText("-" + fmtSpan(span), L, H - 5); g.fillText("now", W - 30, H - 5);
  return { g, x, y, W };
}

// line strokes points [t, v] in a colour, dashed if asked, leaving a gap
// where v is not positive when gaps is set (no subflow, no answer).
function line(f, pts, col, dash, gaps) {
  const { g, x, y } = f;
  g.strokeStyle = col; g.lineWidth = 2; g.setLineDash(dash || []); g.beginPath();
  let on = false;
  for (const [t, v] of pts) {
    if (gaps && !(v > 0)) { on = false; continue; }
    on ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v));
    on = true;
  }
  g.stroke();
  g.setLineDash([]); g.lineWidth = 1;
}

// graph draws one line per uplink of field ("rx" or "tx"), or the open
// flows ("flows"), over the window.
function graph(id, field) {
  const series = new Map();
  let peak = 0;
  for (const s of samples) {
    if (field === "flows") {
      if (!series.has("open flows")) series.set("open flows", []);
      series.get("open flows").push([s.t, s.flows]);
      peak = Math.max(peak, s.flows);
      continue;
    }
    for (const u of s.uplinks || []) {
      if (!series.has(u.name)) series.set(u.name, []);
      series.get(u.name).push([s.t, u[field]]);
      peak = Math.max(peak, u[field]);
    }
  }
  const f = frame(id, Math.max(peak * 1.1, field === "flows" ? 4 : 1000), v => field === "flows" ? String(Math.round(v)) : fmtRate(v));
  if (!f) return;
  let ly = 14;
  for (const [name, pts] of series) {
    line(f, pts, color(name));
    f.g.fillStyle = color(name); f.g.fillText(name, f.W - 90, ly); ly += 14;
  }
}

// timeline draws each uplink's state (up, backup, withdrawn, down) over the window.
function timeline() {
  const cv = document.getElementById("timeline");
  if (!cv) return;
  const names = [];
  for (const s of samples) for (const u of s.uplinks || []) if (!names.includes(u.name)) names.push(u.name);
  const lane = 18, L = 70;
  cv.height = Math.max(lane * names.length + 4, 24);
  const g = cv.getContext("2d"), W = cv.width;
  g.clearRect(0, 0, W, cv.height);
  const now = samples.length ? samples[samples.length - 1].t : Date.now();
  const span = spanMs(now);
  const x = t => L + (W - L - 5) * (1 - (now - t) / span);
  g.font = "11px sans-serif";
  names.forEach((name, i) => {
    g.fillStyle = "#555"; g.fillText(name, 2, i * lane + 13);
    for (let k = 0; k < samples.length; k++) {
      const u = (samples[k].uplinks || []).find(v => v.name === name);
      if (!u) continue;
      const end = k + 1 < samples.length ? samples[k + 1].t : now + 1000;
      const state = u.state === "up" && u.backup ? "backup" : u.state;
      g.fillStyle = STATE_COLORS[state] || "#ddd";
      g.fillRect(x(samples[k].t), i * lane + 2, Math.max(1, x(end) - x(samples[k].t)), lane - 4);
    }
  });
}

// transitions lists each uplink's changes of state over the window, the
// newest first, with why it was withdrawn.
function transitions() {
  const ul = document.getElementById("transitions");
  if (!ul) return;
  const last = new Map(), items = [];
  for (const s of samples) {
    for (const u of s.uplinks || []) {
      const state = u.state === "up" && u.backup ? "backup" : u.state;
      const prev = last.get(u.name);
      if (prev !== undefined && prev !== state) {
        const li = document.createElement("li");
        li.className = "tr-" + state;
        li.dataset.uplink = u.name;
        li.textContent = `${new Date(s.t).toLocaleTimeString()} ${u.name}: ${prev} → ${state}` + (u.reason ? ` (${u.reason})` : "");
        items.push(li);
      }
      last.set(u.name, state);
    }
  }
  ul.replaceChildren(...items.reverse().slice(0, 20));
}

// rttGraph draws each uplink's subflow RTT (solid) and probe RTT (dashed)
// over the window, in ms.
function rttGraph() {
  const series = new Map();
  let peak = 10;
  for (const s of samples) {
    for (const u of s.uplinks || []) {
      if (!series.has(u.name)) series.set(u.name, { rtt: [], probe: [] });
      const e = series.get(u.name);
      e.rtt.push([s.t, u.rtt]);
      e.probe.push([s.t, u.probe_rtt]);
      peak = Math.max(peak, u.rtt || 0, u.probe_rtt || 0);
    }
  }
  const f = frame("graph-rtt", peak * 1.1, v => v.toFixed(0) + " ms");
  if (!f) return;
  let ly = 14;
  for (const [name, e] of series) {
    line(f, e.rtt, color(name), [], true);
    line(f, e.probe, color(name), [5, 4], true);
    f.g.fillStyle = color(name); f.g.fillText(name + " (dashed: probe)", f.W - 150, ly); ly += 14;
  }
}

function draw() {
  const cut = (samples.length ? samples[samples.length - 1].t : Date.now()) - WINDOW_MS;
  samples = samples.filter(s => s.t >= cut);
  graph("graph-rx", "rx");
  graph("graph-tx", "tx");
  graph("graph-flows", "flows");
  rttGraph();
  timeline();
  transitions();
}

function connect() {
  const live = document.getElementById("live");
  const es = new EventSource("/events");
  es.onmessage = ev => {
    const e = JSON.parse(ev.data);
    samples.push(...(e.samples || []));
    render(e.status);
    draw();
    live.textContent = "live, " + new Date().toLocaleTimeString();
    live.className = "ok";
    document.body.dataset.live = "1";
  };
  es.onerror = () => { live.textContent = "not live (reconnecting)"; live.className = "stale"; };
}

// The token came in the URL once; the cookie carries it from here on, so
// it leaves the address bar (and the history).
if (location.search.includes("token=")) history.replaceState(null, "", "/");
connect();
