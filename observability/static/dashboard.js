// tokenfleet built-in dashboard: Prometheus query_range history, then SSE snapshots (instant
// queries against the same Prometheus) -> rolling series -> canvas line charts.
// The project's own code, no dependencies (works offline, nothing to build).
"use strict";
(function () {
  const PREFIX = window.TOKENFLEET_PREFIX || "/dashboard";
  const KEEP = 180; // points per series (3 minutes at one snapshot per second)
  const COLORS = ["#539bf5", "#57ab5a", "#e5534b", "#d29922", "#b083f0", "#39c5cf", "#f69d50", "#adbac7"];
  const history = {}; // chart id -> {title, unit, times: [], series: {legend: [values]}}
  const canvases = {};
  let snapshots = 0;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function ensureCard(id, title) {
    if (canvases[id]) return canvases[id];
    const card = el("div", { class: "card", "data-chart": id });
    card.appendChild(el("h2", {}, title));
    const canvas = el("canvas", { id: "chart-" + id });
    card.appendChild(canvas);
    const legend = el("div", { class: "legend" });
    card.appendChild(legend);
    document.getElementById("charts").appendChild(card);
    canvases[id] = { canvas, legend };
    return canvases[id];
  }

  function fmt(v, unit) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    if (unit === "ratio") return (v * 100).toFixed(v < 0.1 ? 1 : 0) + "%";
    if (unit === "s") return v < 1 ? (v * 1000).toFixed(v < 0.01 ? 1 : 0) + " ms" : v.toFixed(2) + " s";
    const a = Math.abs(v);
    const s = a >= 1e6 ? (v / 1e6).toFixed(1) + "M" : a >= 1e3 ? (v / 1e3).toFixed(1) + "k" : a >= 10 ? v.toFixed(0) : v.toFixed(2);
    return s + (unit && unit !== "ratio" ? unit : "");
  }

  function record(t, charts) {
    for (const [id, chart] of Object.entries(charts)) {
      const h = history[id] || (history[id] = { title: chart.title, unit: chart.unit, times: [], series: {} });
      h.times.push(t);
      const n = h.times.length;
      for (const name of Object.keys(chart.points)) {
        if (!h.series[name]) h.series[name] = new Array(n - 1).fill(null);
      }
      for (const [name, values] of Object.entries(h.series)) {
        values.push(name in chart.points ? chart.points[name] : null);
      }
      if (n > KEEP) {
        h.times.shift();
        for (const values of Object.values(h.series)) values.shift();
      }
    }
  }

  function draw(id) {
    const h = history[id];
    const { canvas, legend } = ensureCard(id, h.title);
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, hgt = canvas.clientHeight;
    if (canvas.width !== w * dpr) { canvas.width = w * dpr; canvas.height = hgt * dpr; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, hgt);
    const left = 58, right = 8, top = 6, bottom = 18;
    const pw = w - left - right, ph = hgt - top - bottom;
    let max = 0;
    for (const values of Object.values(h.series)) for (const v of values) if (v !== null && v > max) max = v;
    max = h.unit === "ratio" ? 1 : max > 0 ? max * 1.1 : 1;
    ctx.font = "10px system-ui, sans-serif";
    ctx.strokeStyle = "#26323d"; ctx.fillStyle = "#8796a5"; ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = top + ph - (ph * i) / 4;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + pw, y); ctx.stroke();
      ctx.fillText(fmt((max * i) / 4, h.unit), 4, y + 3);
    }
    const n = h.times.length;
    if (n > 1) {
      const span = Math.round(h.times[n - 1] - h.times[0]);
      ctx.fillText("last " + span + " s", left, hgt - 4);
    }
    legend.textContent = "";
    Object.entries(h.series).forEach(([name, values], i) => {
      const color = COLORS[i % COLORS.length];
      ctx.strokeStyle = color; ctx.lineWidth = 1.6; ctx.beginPath();
      let pen = false;
      values.forEach((v, j) => {
        if (v === null) { pen = false; return; }
        // Until the window is full the points spread over the whole width.
        const x = left + (n > 1 ? (pw * j) / (n - 1) : pw);
        const y = top + ph - (ph * v) / max;
        if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        pen = true;
      });
      ctx.stroke();
      const item = el("span", { "data-series": name });
      const swatch = el("i"); swatch.style.background = color;
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(name + " " + fmt(values[values.length - 1], h.unit)));
      legend.appendChild(item);
    });
  }

  function renderAlerts(target, alerts, emptyText) {
    const ul = document.getElementById(target);
    ul.textContent = "";
    if (!alerts.length) { ul.appendChild(el("li", { class: "none" }, emptyText)); return; }
    for (const a of alerts) {
      const li = el("li", { class: "alert " + a.state, "data-alertname": a.name });
      li.appendChild(el("b", {}, a.name + " — " + a.state));
      li.appendChild(el("span", {}, a.annotations.summary || ""));
      const labels = Object.entries(a.labels).filter(([k]) => k !== "alertname").map(([k, v]) => k + "=" + v).join(" ");
      li.appendChild(el("small", { style: "display:block" }, labels));
      ul.appendChild(li);
    }
  }

  function renderTraces(traces) {
    const body = document.getElementById("traces");
    body.textContent = "";
    if (!traces.length) {
      const row = el("tr"); row.appendChild(el("td", { colspan: "4", class: "none" }, "no traces yet"));
      body.appendChild(row); return;
    }
    for (const t of traces.slice(0, 12)) {
      const row = el("tr", { class: t.error ? "err" : "", "data-trace": t.trace_id });
      row.appendChild(el("td", { title: t.trace_id }, t.trace_id.slice(0, 8)));
      row.appendChild(el("td", {}, t.name + (t.attributes["tokenfleet.class"] ? " [" + t.attributes["tokenfleet.class"] + "]" : "")));
      row.appendChild(el("td", {}, t.duration_ms.toFixed(1)));
      row.appendChild(el("td", {}, String(t.spans)));
      body.appendChild(row);
    }
  }

  // A page opening shows the last minutes at once, from Prometheus's query_range.
  function seed(past) {
    past.times.forEach((t, i) => {
      const charts = {};
      for (const [id, chart] of Object.entries(past.charts)) {
        const points = {};
        for (const [name, values] of Object.entries(chart.series)) if (values[i] !== null) points[name] = values[i];
        charts[id] = { title: chart.title, unit: chart.unit, points };
      }
      record(t, charts);
    });
  }

  function apply(snap) {
    snapshots += 1;
    const notice = document.getElementById("notice");
    notice.textContent = snap.notice || "";
    notice.hidden = !snap.notice;
    record(snap.t, snap.charts);
    for (const id of Object.keys(history)) draw(id);
    renderAlerts("alerts", snap.alerts, "none firing");
    renderAlerts("resolved", snap.resolved.slice().reverse(), "none");
    renderTraces(snap.traces);
    const status = document.getElementById("status");
    status.textContent = "live · " + new Date(snap.t * 1000).toLocaleTimeString() + " · tick " + snap.tick;
    status.className = "live";
    const down = Object.entries(snap.targets).filter(([, ok]) => !ok).map(([k]) => k);
    document.getElementById("targets").textContent =
      Object.keys(snap.targets).length + " targets" + (down.length ? " · down: " + down.join(", ") : "");
  }

  function connect() {
    fetch(PREFIX + "/api/history").then((r) => (r.ok ? r.json() : null)).catch(() => null).then((past) => {
      if (past && snapshots === 0) seed(past);
      listen();
    });
  }

  function listen() {
    const source = new EventSource(PREFIX + "/events");
    source.onmessage = (e) => apply(JSON.parse(e.data));
    source.onerror = () => {
      const status = document.getElementById("status");
      status.textContent = "reconnecting…"; status.className = "";
    };
  }

  // For tests and the curious: read what the page holds.
  window.tokenfleetDashboard = {
    snapshots: () => snapshots,
    latest: (id, name) => { const s = history[id] && history[id].series[name]; return s ? s[s.length - 1] : null; },
    series: (id) => (history[id] ? Object.keys(history[id].series) : []),
  };
  window.addEventListener("resize", () => Object.keys(history).forEach(draw));
  connect();
})();
