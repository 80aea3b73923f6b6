// kservice dashboard: renders /events (server-sent events) into the page. No library, no network
// access beyond this server: tables are DOM, charts are SVG polylines drawn here.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const CHART_SECONDS = 300;
const history = new Map(); // service -> [[t, calls/s, p50, p99], ...]

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  return Number(value).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function styleOf(field, value) {
  if (field === "state") return { running: "ok", failed: "bad", unreachable: "bad", stopping: "warn", starting: "warn" }[value] || "";
  if (field === "health") return value === "ok" ? "ok" : "bad";
  if (field === "breaker") return { closed: "ok", open: "bad", half_open: "warn", "half-open": "warn" }[value] || "";
  return "";
}

const COLUMNS = [
  ["service", "text"], ["kind", "text"], ["transport", "text"], ["state", "text"], ["health", "text"],
  ["replicas", "text"], ["in_flight", 0], ["queue_depth", 0], ["requests_total", 0], ["errors_total", 0],
  ["calls_per_second", 1], ["p50_ms", 3], ["p99_ms", 3], ["breaker", "text"],
];

function renderServices(rows) {
  const body = document.querySelector("#services tbody");
  body.replaceChildren();
  for (const row of rows) {
    const tr = el("tr", { "data-service": row.service });
    for (const [field, digits] of COLUMNS) {
      let value = row[field];
      if (value === undefined) value = null;
      const text = digits === "text" ? (value === null ? "-" : String(value)) : fmt(value, digits);
      const td = el("td", { "data-field": field, "data-value": value === null ? "" : String(value) }, text);
      if (digits !== "text") td.className = "num";
      const style = styleOf(field, value);
      if (style) td.classList.add(style);
      if (field === "health" && text.length > 60) { td.title = text; td.textContent = text.slice(0, 57) + "..."; }
      tr.append(td);
    }
    body.append(tr);
  }
  document.getElementById("no-services").hidden = rows.length > 0;
  document.getElementById("service-count").textContent = `(${rows.length})`;
}

function spanLabel(seconds) {
  return seconds < 120 ? `-${Math.round(seconds)} s` : `-${Math.round(seconds / 60)} min`;
}

function drawChart(svg, series, now, unit, span) {
  const width = 400, height = 110, left = 44, bottom = 16, top = 6;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.replaceChildren();
  const start = now - span;
  let max = 0;
  for (const s of series) for (const [, v] of s.points) if (v !== null && v > max) max = v;
  max = max > 0 ? max * 1.1 : 1;
  const x = (t) => left + ((t - start) / span) * (width - left - 4);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);
  svg.append(svgEl("line", { class: "axis", x1: left, y1: y(0), x2: width - 4, y2: y(0) }));
  svg.append(svgEl("line", { class: "axis", x1: left, y1: top, x2: left, y2: y(0) }));
  const label = (text, attrs) => { const t = svgEl("text", attrs); t.textContent = text; svg.append(t); };
  label(`${fmt(max, max < 10 ? 2 : 0)} ${unit}`, { x: 2, y: top + 8 });
  label("0", { x: left - 10, y: y(0) });
  label(spanLabel(span), { x: left, y: height - 3 });
  label("now", { x: width - 24, y: height - 3 });
  for (const s of series) {
    const points = s.points.filter(([t, v]) => v !== null && t >= start).map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`);
    if (points.length === 1) points.push(points[0]);
    if (points.length) svg.append(svgEl("polyline", { class: s.cls, points: points.join(" ") }));
  }
}

function legend(entries) {
  const box = el("div", { class: "legend" });
  for (const [cls, text] of entries) box.append(el("span", { class: cls }, `\u25A0 ${text} `));
  return box;
}

function renderCharts(rows, now) {
  const box = document.getElementById("charts");
  const wanted = new Set(rows.map((r) => r.service));
  for (const card of [...box.children]) if (!wanted.has(card.dataset.service)) card.remove();
  for (const row of rows) {
    let card = box.querySelector(`[data-service="${CSS.escape(row.service)}"]`);
    if (!card) {
      card = el("div", { class: "chart-card", "data-service": row.service });
      card.append(el("h3", {}, row.service));
      card.append(svgEl("svg", { class: "rate-chart" }));
      card.append(legend([["rate", "calls/s"]]));
      card.append(svgEl("svg", { class: "latency-chart" }));
      card.append(legend([["p50", "p50 ms"], ["p99", "p99 ms"]]));
      box.append(card);
    }
    const points = history.get(row.service) || [];
    // The time axis spans what is known, from 20 s up to CHART_SECONDS.
    const span = Math.min(CHART_SECONDS, Math.max(20, points.length ? now - points[0][0] : 0));
    drawChart(card.querySelector(".rate-chart"), [{ cls: "rate", points: points.map((p) => [p[0], p[1]]) }], now, "/s", span);
    drawChart(card.querySelector(".latency-chart"), [
      { cls: "p50", points: points.map((p) => [p[0], p[2]]) },
      { cls: "p99", points: points.map((p) => [p[0], p[3]]) },
    ], now, "ms", span);
  }
}

let shownErrors = "";

function renderErrors(errors) {
  // Rebuilt only when the errors change, so a traceback the reader opened stays open.
  const key = JSON.stringify(errors.map((e) => [e.service, e.method, e.time]));
  if (key === shownErrors) return;
  shownErrors = key;
  const list = document.getElementById("errors");
  const opened = new Set([...list.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  list.replaceChildren();
  for (const error of errors) {
    const item = el("li", { "data-service": error.service });
    const when = new Date(error.time * 1000).toLocaleTimeString();
    const summary = el("summary");
    summary.append(el("strong", {}, `${error.service}.${error.method}`), ` ${error.error_type}: ${error.error} `, el("span", { class: "muted" }, when));
    const details = el("details", { "data-key": `${error.service}.${error.method}@${error.time}` });
    details.open = opened.has(details.dataset.key);
    details.append(summary, el("pre", { class: "traceback" }, error.traceback || "(no traceback: the error was raised by kservice, not by the service)"));
    item.append(details);
    list.append(item);
  }
  document.getElementById("no-errors").hidden = errors.length > 0;
}

function renderPlugins(plugins) {
  const body = document.querySelector("#plugins tbody");
  body.replaceChildren();
  for (const plugin of plugins) {
    const tr = el("tr", { "data-plugin": plugin.name });
    tr.append(el("td", {}, plugin.name), el("td", {}, plugin.origin), el("td", { class: "hooks" }, plugin.hooks.join(", ")));
    body.append(tr);
  }
}

function apply(snapshot) {
  if (snapshot.history) {
    history.clear();
    for (const [name, points] of Object.entries(snapshot.history)) history.set(name, points.slice());
  }
  const now = snapshot.time;
  for (const row of snapshot.services) {
    if (row.state === "unreachable") continue;
    const points = history.get(row.service) || [];
    const last = points[points.length - 1];
    if (!last || last[0] < now) points.push([now, row.calls_per_second, row.p50_ms, row.p99_ms]);
    while (points.length && points[0][0] < now - CHART_SECONDS) points.shift();
    history.set(row.service, points);
  }
  for (const name of [...history.keys()]) if (!snapshot.services.some((r) => r.service === name)) history.delete(name);
  renderServices(snapshot.services);
  renderCharts(snapshot.services, now);
  renderErrors(snapshot.errors);
  renderPlugins(snapshot.plugins);
  const banner = document.getElementById("collector-error");
  banner.hidden = !snapshot.collector_error;
  banner.textContent = snapshot.collector_error ? `Could not list services: ${snapshot.collector_error}` : "";
  document.getElementById("updated").textContent = `updated ${new Date(now * 1000).toLocaleTimeString()}`;
  document.body.dataset.version = String(snapshot.version);
}

function connect() {
  const status = document.getElementById("connection");
  const source = new EventSource("/events");
  source.addEventListener("open", () => { status.textContent = "live"; status.className = "pill live"; });
  source.addEventListener("error", () => { status.textContent = "reconnecting"; status.className = "pill lost"; });
  source.addEventListener("snapshot", (event) => apply(JSON.parse(event.data)));
}

connect();
