/* The Kiln console: polls api/state and redraws in place (no reload). Plain DOM, no framework;
   every text goes through textContent. Charts: uPlot (vendored under static/vendor/uplot). */
"use strict";

const POLL_MS = Number(new URLSearchParams(location.search).get("poll")) || 1000;
const COLORS = ["#1f4e9e", "#c2410c", "#15803d", "#7e22ce", "#0e7490", "#a16207"];
const DASHES = [[], [6, 3], [2, 2], [8, 3, 2, 3]];
const sections = new Map();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

const fmt = {
  num: (v, d = 3) => (v === null || v === undefined ? "-" : Number(v).toPrecision(d)),
  pct: (v) => (v === null || v === undefined ? "-" : (100 * v).toFixed(2) + "%"),
  ms: (v) => (v === null || v === undefined ? "-" : Number(v).toFixed(1) + " ms"),
  kb: (v) => (v === null || v === undefined ? "-" : (v / 1024).toFixed(1) + " KB"),
  time: (t) => new Date(t * 1000).toLocaleTimeString(),
  weight: (w) => Number(w).toFixed(w % 1 ? 1 : 0) + "%",
};

function result(ok) {
  const text = ok === true ? "PASS" : ok === false ? "FAIL" : "NO DATA";
  const cls = ok === true ? "pass" : ok === false ? "fail" : "nodata";
  return el("span", { class: cls, "data-result": text, text });
}

function table(headers, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows));
}

/* --- charts ------------------------------------------------------------------------------ */

function align(seriesList) {
  // [[t, v], ...] per series -> uPlot's [xs, ys1, ys2, ...] on the union of the times
  const times = [...new Set(seriesList.flatMap((s) => s.map((p) => p[0])))].sort((a, b) => a - b);
  const index = new Map(times.map((t, i) => [t, i]));
  const ys = seriesList.map((s) => {
    const y = new Array(times.length).fill(null);
    for (const [t, v] of s) y[index.get(t)] = v;
    return y;
  });
  return [times, ...ys];
}

function chart(box, title, labels, seriesList, options = {}) {
  const data = align(seriesList);
  const key = title + "|" + labels.join(",");
  const plotBox = box.querySelector(".plot");
  const width = Math.max(280, box.clientWidth || 400);
  if (!box._plot || box._key !== key) {
    if (box._plot) box._plot.destroy();
    const series = [{}].concat(labels.map((label, i) => ({
      label,
      stroke: COLORS[i % COLORS.length],
      dash: options.dashes ? options.dashes[i] : DASHES[Math.floor(i / 2) % DASHES.length],
      width: 2,
      spanGaps: true,
      paths: options.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined,
    })));
    box._plot = new uPlot({
      width, height: 170, series,
      scales: {
        // one point alone would get a range of years: show it within the last minute instead
        x: { time: true, range: (u, min, max) => (min === max ? [min - 60, max + 1] : [min, max]) },
        ...(options.range ? { y: { range: options.range } } : {}),
      },
      axes: [{}, { size: 50 }],
      legend: { live: false },
    }, data, plotBox);
    box._key = key;
  } else {
    box._plot.setData(data);
    if (box._plot.width !== width) box._plot.setSize({ width, height: 170 });
  }
  const last = data.slice(1).map((ys) => {
    for (let i = ys.length - 1; i >= 0; i--) if (ys[i] !== null) return ys[i];
    return null;
  });
  box.dataset.points = String(data[0].length);
  box.dataset.last = JSON.stringify(last);
  box.querySelector(".summary").textContent = labels
    .map((l, i) => `${l}: ${last[i] === null ? "no data" : fmt.num(last[i])}`).join("; ");
}

function chartBox(id, title) {
  return el("div", { class: "chart", "data-testid": id },
    el("h3", { text: title }), el("div", { class: "plot", "aria-hidden": "true" }),
    el("p", { class: "summary meta" }));
}

/* --- one model --------------------------------------------------------------------------- */

function modelSection(name) {
  const s = el("section", { class: "model", "data-model": name, "aria-labelledby": `m-${name}` },
    el("h2", { id: `m-${name}` }, "Model ", el("span", { "data-testid": "model-name", text: name })),
    el("p", { class: "meta", "data-testid": "replicas" }),
    el("div", { class: "scroll", "data-testid": "versions" }),
    el("div", { class: "grid" },
      chartBox("chart-rate", "Requests per second"),
      chartBox("chart-latency", "Latency p50 / p99 (ms)"),
      chartBox("chart-errors", "Error rate"),
      chartBox("chart-batch", "Median batch size (rows per model call)")),
    el("div", { "data-testid": "rollout" }),
    el("div", { "data-testid": "monitoring" }),
    el("div", { "data-testid": "card-box" }));
  s._rollout = {
    weights: chartBox("chart-weights", "Traffic weight of the candidate (%): now and planned"),
  };
  s._drift = chartBox("chart-drift", "Drift score (share of drifting features)");
  s._ood = chartBox("chart-ood", "Out-of-distribution rate");
  return s;
}

function versionRows(model, state) {
  return model.versions.map((v) => {
    const f = v.facts || {};
    const l = v.latest || {};
    const mon = v.monitor || {};
    const drift = mon.monitored ? mon.drift : null;
    return el("tr", { "data-version": v.version },
      el("th", { scope: "row", text: "v" + v.version }),
      el("td", { "data-field": "roles" },
        [...v.roles, ...(f.aliases || []).map((a) => "@" + a)].map((r) =>
          el("span", { class: "badge", text: r }))),
      el("td", { text: f.format || "-" }),
      el("td", { text: f.variant || "-" }),
      el("td", { class: "num", text: fmt.kb(f.size_bytes) }),
      el("td", { class: "num", text: f.test_accuracy == null ? "-" : f.test_accuracy.toFixed(4) }),
      el("td", { class: "num", "data-field": "requests", text: l.requests == null ? "0" : String(l.requests) }),
      el("td", { class: "num", "data-field": "rate", text: fmt.num(l.rate) }),
      el("td", { class: "num", text: fmt.pct(l.error_rate) }),
      el("td", { class: "num", text: fmt.ms(l.p50_ms) }),
      el("td", { class: "num", text: fmt.ms(l.p99_ms) }),
      el("td", { class: "num", text: fmt.num(l.batch) }),
      el("td", { "data-field": "drift" }, drift ? [fmt.num(drift.score),
        drift.alerting ? el("span", { class: "badge alert", text: "DRIFT ALERT" }) : null] : "-"),
      el("td", {}, el("button", { type: "button", "data-card": v.version,
        onclick: () => showCard(model.name, v.version), text: "card" })));
  });
}

function renderVersions(section, model) {
  const box = section.querySelector('[data-testid="versions"]');
  box.replaceChildren(table(
    ["version", "roles", "format", "variant", "size", "test acc", "requests", "req/s",
     "errors", "p50", "p99", "batch p50", "drift", "model card"],
    versionRows(model), { "aria-label": `versions of ${model.name}` }));
  const app = model.app || {};
  const replicas = Object.entries(app.replicas || {}).map(([s, n]) => `${n} ${s.toLowerCase()}`);
  section.querySelector('[data-testid="replicas"]').textContent =
    `app ${app.status || "unknown"}; replicas: ${replicas.join(", ") || "none"}` +
    (model.monitor_scope ? `; monitoring window of replica ${model.monitor_scope}` : "") +
    (model.rollout && model.rollout.active ? "; versions ready per replica: " +
      (Object.entries(model.rollout.replicas).map(([rid, ready]) =>
        `${rid.slice(0, 8)}: ` + Object.entries(ready || {}).map(([v, st]) => `v${v} ${st}`)
          .join(", ")).join("; ") || "none reported") : "");
  const pick = (field) => model.versions.map((v) => v.series.map((p) => [p.t, p[field]]));
  const names = model.versions.map((v) => "v" + v.version);
  const grid = section.querySelector(".grid");
  chart(grid.querySelector('[data-testid="chart-rate"]'), "rate", names, pick("rate"));
  chart(grid.querySelector('[data-testid="chart-latency"]'), "latency",
    model.versions.flatMap((v) => ["v" + v.version + " p50", "v" + v.version + " p99"]),
    model.versions.flatMap((v) => [v.series.map((p) => [p.t, p.p50_ms]),
      v.series.map((p) => [p.t, p.p99_ms])]));
  chart(grid.querySelector('[data-testid="chart-errors"]'), "errors", names, pick("error_rate"));
  chart(grid.querySelector('[data-testid="chart-batch"]'), "batch", names, pick("batch"));
}

function renderRollout(section, model, state) {
  const box = section.querySelector('[data-testid="rollout"]');
  const ro = model.rollout;
  if (!ro) {
    box.replaceChildren(el("h3", { text: "Rollout" }), el("p", { text: "No rollout recorded." }));
    return;
  }
  const r = ro.record;
  const parts = [el("h3", { text: "Rollout" })];
  parts.push(el("p", { "data-testid": "rollout-summary" },
    el("strong", { "data-testid": "phase", text: r.phase }),
    ` ${r.strategy || ""}: stable v${r.stable}` +
    (r.candidate ? `, candidate v${r.candidate}` : "") +
    (ro.active ? `; step ${r.step + 1}/${r.steps.length}; baked ${Number(r.baked_s).toFixed(1)}/${r.bake_s}s` : "") +
    (r.reason ? `; ${r.reason}` : "") + (ro.live ? "" : " [controller not answering]")));
  if (ro.active) {
    const stable = 100 - r.weight;
    parts.push(el("p", { "data-testid": "weights-now" },
      "Weights now: ",
      el("span", { "data-weight": r.stable, text: `v${r.stable} ${fmt.weight(stable)}` }), " / ",
      el("span", { "data-weight": r.candidate, text: `v${r.candidate} ${fmt.weight(r.weight)}` }),
      r.shadow ? ` (mirrored ${fmt.weight(r.shadow)})` : ""));
    parts.push(el("p", { class: "planned", "data-testid": "planned" }, "Planned steps: ",
      ro.planned.map((w, i) => el("span", { class: i === r.step ? "current" : "",
        "aria-current": i === r.step ? "step" : null, text: fmt.weight(w) }))));
    if (ro.agreement !== null && ro.agreement !== undefined) {
      parts.push(el("p", { "data-testid": "agreement", text: `Shadow agreement: ${fmt.pct(ro.agreement)}` }));
    }
  }
  const last = ro.audit.length ? ro.audit[ro.audit.length - 1] : null;
  if (last) {
    parts.push(el("p", { "data-testid": "decision" }, "Decision so far: ",
      el("strong", { text: last.decision }), ` [${last.trigger}] at ${fmt.time(last.time)}` +
      (last.reason ? `: ${last.reason}` : "")));
  }
  parts.push(ro.weights.length ? section._rollout.weights : el("p", { text: "" }));
  if (state.actions && ro.active) {
    parts.push(el("div", { class: "actions", "data-testid": "actions" },
      ["promote", "rollback", "pause", "resume"].map((a) => el("button", {
        type: "button", "data-action": a, onclick: () => act(model.name, a, box), text: a }))));
  } else if (ro.active) {
    parts.push(el("p", { class: "meta", "data-testid": "read-only",
      text: "Read-only: rollout actions need the server's API key." }));
  }
  parts.push(el("p", { "data-testid": "action-result", role: "status" }));
  parts.push(el("h3", { text: "Gates (last interval)" }));
  parts.push(ro.gates.length ? table(["gate", "value", "threshold", "result"],
    ro.gates.map((g) => el("tr", { "data-testid": "gate-row", "data-gate": g.gate },
      el("th", { scope: "row", text: g.gate }), el("td", { class: "num", text: fmt.num(g.value, 4) }),
      el("td", { text: `${g.op} ${g.threshold}` }), el("td", {}, result(g.ok)))),
    { "data-testid": "gates" }) : el("p", { text: "No gate evaluated yet." }));
  if (ro.intervals.length) {
    const names = ro.intervals[ro.intervals.length - 1].gates.map((g) => g.gate);
    parts.push(el("h3", { text: "Gates per interval" }), el("div", { class: "scroll" },
      table(["time", "decision", ...names], ro.intervals.slice(-12).reverse().map((iv) =>
        el("tr", { "data-testid": "interval-row" }, el("td", { text: fmt.time(iv.t) }),
          el("td", { text: iv.decision }),
          names.map((n) => {
            const g = iv.gates.find((x) => x.gate === n) || {};
            return el("td", {}, fmt.num(g.value, 4), " ", result(g.ok));
          }))))));
  }
  parts.push(el("h3", { text: "Audit log" }), el("div", { class: "scroll" },
    table(["time", "step", "decision", "trigger", "weights", "reason"],
      ro.audit.slice().reverse().map((e) => el("tr", { "data-testid": "audit-row" },
        el("td", { text: fmt.time(e.time) }), el("td", { text: String(e.step) }),
        el("td", { text: e.decision }), el("td", { text: e.trigger }),
        el("td", { text: Object.entries(e.weights || {}).map(([v, w]) => `v${v} ${fmt.weight(w)}`).join(" ") }),
        el("td", { text: e.reason || "" }))))));
  parts.push(el("h3", { text: "Finished rollouts" }), ro.finished.length ?
    el("ul", { "data-testid": "finished" }, ro.finished.slice().reverse().map((f) =>
      el("li", { text: `${fmt.time(f.t)} ${f.decision} [${f.trigger}] ` +
        Object.entries(f.weights).map(([v, w]) => `v${v} ${fmt.weight(w)}`).join(" ") +
        (f.reason ? ` - ${f.reason}` : "") }))) : el("p", { text: "None yet." }));
  box.replaceChildren(...parts);
  if (ro.weights.length) {
    const pts = ro.weights.map((p) => [p.t, p.weight]);
    if (ro.active) pts.push([state.time, r.weight]);
    // the plan from the current step on (dashed): each later step at the earliest time it can
    // come, then 100% at the promotion
    const plan = (ro.schedule || []).map((p) => [p.t, p.weight]);
    const box = section._rollout.weights;
    chart(box, "weights", ["v" + r.candidate + " now", "v" + r.candidate + " planned"], [pts, plan],
      { stepped: true, range: [0, 100], dashes: [[], [6, 4]] });
    box.dataset.planned = JSON.stringify(plan.map((p) => p[1]));
    box.querySelector(".summary").textContent += plan.length ? "; planned: " +
      plan.map((p) => `${fmt.weight(p[1])} from ${fmt.time(p[0])}`).join(", ") : "";
  }
}

function renderMonitoring(section, model) {
  const box = section.querySelector('[data-testid="monitoring"]');
  const parts = [el("h3", { text: "Monitoring" })];
  const monitored = model.versions.filter((v) => v.monitor && v.monitor.monitored);
  for (const v of model.versions) {
    const m = v.monitor;
    if (!m) continue;
    if (!m.monitored) {
      parts.push(el("p", { text: `v${v.version}: not monitored (${m.reason})` }));
      continue;
    }
    const d = m.drift, o = m.ood;
    parts.push(el("div", { "data-testid": `monitor-${v.version}` },
      el("p", {}, el("strong", { text: `v${v.version}` }),
        `: window ${m.window.rows}/${m.window.capacity} rows; drift ${fmt.num(d.score)} (alert above ${d.threshold}) `,
        d.alerting ? el("span", { class: "badge alert", "data-testid": "drift-alert", text: "DRIFT ALERT" }) :
          el("span", { class: "badge", text: "drift ok" }),
        `; OOD rate ${fmt.pct(o.window_rate)} (alert above ${fmt.pct(o.alert_threshold)}) `,
        o.alerting ? el("span", { class: "badge alert", text: "OOD ALERT" }) : el("span", { class: "badge", text: "OOD ok" })),
      d.top && d.top.length ? table(["feature", "PSI", "KS / chi2", "p-value", "drifting"],
        d.top.map((f) => el("tr", {}, el("td", { text: f.name }), el("td", { class: "num", text: fmt.num(f.psi) }),
          el("td", { class: "num", text: fmt.num(f.statistic) }), el("td", { class: "num", text: fmt.num(f.p_value) }),
          el("td", {}, f.drifted ? el("span", { class: "fail", text: "DRIFT" }) : el("span", { text: "no" })))),
        { "data-testid": `features-${v.version}` }) : null,
      (m.alerts || []).length ? el("ul", { "data-testid": "alerts" }, m.alerts.slice(-6).reverse().map((a) =>
        el("li", { text: `${fmt.time(a.at)} ${a.signal} ${a.state}: ${fmt.num(a.value)} (threshold ${a.threshold})` }))) : null,
      m.retrain && m.retrain.events.length ? el("ul", { "data-testid": "retrain" }, m.retrain.events.slice(-6).reverse().map((e) =>
        el("li", { text: `${fmt.time(e.at)} retrain ${e.step}` + (e.submission_id ? ` job ${e.submission_id}` : "") +
          " " + Object.entries(e.detail || {}).map(([k, x]) => `${k}=${x}`).join(" ") }))) : null));
  }
  if (monitored.length) {
    parts.push(el("div", { class: "grid" }, section._drift, section._ood));
  }
  box.replaceChildren(...parts);
  if (monitored.length) {
    const names = monitored.map((v) => "v" + v.version);
    chart(section._drift, "drift", names, monitored.map((v) => v.monitor.points.map((p) => [p.t, p.drift])), { range: [0, 1] });
    chart(section._ood, "ood", names, monitored.map((v) => v.monitor.points.map((p) => [p.t, p.ood_rate])));
  }
}

/* --- actions and the model card ---------------------------------------------------------- */

async function act(model, action, box) {
  const out = box.querySelector('[data-testid="action-result"]');
  box.querySelectorAll("button[data-action]").forEach((b) => { b.disabled = true; });
  try {
    const resp = await fetch("api/action", {
      method: "POST", credentials: "same-origin", cache: "no-store",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, action }),
    });
    const body = await resp.json();
    out.textContent = resp.ok ? `${action}: ${body.phase}, stable v${body.stable}` +
      (body.reason ? ` (${body.reason})` : "") : `${action} refused: ${body.error}`;
  } catch (err) {
    out.textContent = `${action} failed: ${err}`;
  }
  poll(true);
}

async function showCard(model, version) {
  const section = sections.get(model);
  const box = section.querySelector('[data-testid="card-box"]');
  const resp = await fetch(`api/card?model=${encodeURIComponent(model)}&version=${encodeURIComponent(version)}`,
    { credentials: "same-origin", cache: "no-store" });
  const text = resp.ok ? await resp.text() : (await resp.json()).error;
  box.replaceChildren(el("h3", { text: `Model card: ${model} v${version}` }),
    el("pre", { class: "card", "data-testid": "card", text }));
}

/* --- the loop ---------------------------------------------------------------------------- */

let timer = null;

async function poll(once) {
  clearTimeout(timer);
  try {
    const resp = await fetch("api/state", { credentials: "same-origin", cache: "no-store" });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error || resp.statusText);
    render(body);
  } catch (err) {
    const box = document.getElementById("errors");
    box.hidden = false;
    box.textContent = `could not read the state: ${err.message}`;
  }
  if (!once) timer = setTimeout(poll, POLL_MS);
  else timer = setTimeout(poll, POLL_MS);
}

function render(state) {
  document.getElementById("server").textContent = state.url;
  document.getElementById("updated").textContent = "updated " + fmt.time(state.time) +
    (state.gathered_ms === undefined ? "" : ` (gathered in ${Math.round(state.gathered_ms)} ms)`);
  document.getElementById("updated").dataset.gatheredMs = String(state.gathered_ms);
  document.getElementById("updated").dataset.time = String(state.time);
  document.getElementById("mode").textContent = state.actions ? "actions enabled (API key)" : "read-only";
  const errors = document.getElementById("errors");
  errors.hidden = !state.errors.length;
  errors.textContent = state.errors.map((e) => "could not read the " + e).join("; ");
  const main = document.getElementById("models");
  for (const model of state.models) {
    if (!sections.has(model.name)) {
      sections.set(model.name, modelSection(model.name));
      main.append(sections.get(model.name));
    }
    const section = sections.get(model.name);
    renderVersions(section, model);
    renderRollout(section, model, state);
    renderMonitoring(section, model);
  }
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  // when the page first showed data, in ms since its navigation started (recorded by the tests)
  if (!document.body.dataset.firstData) document.body.dataset.firstData = String(performance.now());
}

poll();
