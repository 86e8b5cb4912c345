// protege review: filters, summary, pair list, pair view and labels over /review/api.
// Untrusted text (prompts, answers, names, routes, versions) reaches the DOM only through
// textContent, createTextNode (Element.append of a string) or input.value; never as HTML.
"use strict";

const API = "/review/api";
const PAGE_SIZE = 25;
const FILTERS = ["route", "version", "label", "feedback", "since", "until", "min", "max", "q"];
const VERDICTS = ["student", "teacher", "both_fine", "both_wrong"];
const VERDICT_NAMES = {
  student: "student better", teacher: "teacher better", both_fine: "both fine",
  both_wrong: "both wrong",
};
const VERDICT_KEYS = { 1: "student", 2: "teacher", 3: "both_fine", 4: "both_wrong" };
const FIELD_OF_PARAM = { reviewer: "reviewer", corrected: "corrected" };  // else "f-" + param
const REVIEWER_KEY = "protege.review.reviewer";
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777",
  "#4b5563"];

// All page state in one place.
const state = {
  filters: {},        // applied filters, non-empty values only
  sort: "disagreement",
  page: 1,
  list: null,         // the last /pairs answer
  selected: -1,       // index of the selected row in list.items
  pair: null,         // the last /pairs/{id} answer: the open pair
  highThreshold: 0.5,
  pending: 0,         // tracked requests running
  listLoaded: false,  // a list load has finished (data-state "ready" needs it)
  saving: false,      // a label is being saved: verdict keys wait
  seq: { list: 0, summary: 0, pair: 0 },  // newer requests win; stale answers are dropped
  summaryTimer: 0,
};

// --- DOM helpers -------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

// An element; props: class, text (as textContent), title, data (dataset); children: nodes or
// strings (strings become text nodes).
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  if (props.class) node.className = props.class;
  if (props.text !== undefined && props.text !== null) node.textContent = String(props.text);
  if (props.title) node.title = props.title;
  if (props.data) Object.assign(node.dataset, props.data);
  node.append(...children);
  return node;
}

function svgEl(parent, tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = String(text);
  parent.append(node);
  return node;
}

const fmt = (v, digits = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const oneLine = (s) => String(s ?? "").replace(/\s+/g, " ").trim();
const shortTime = (iso) => (iso ? String(iso).slice(5, 16).replace("T", " ") : "");
const asText = (v) => (typeof v === "string" ? v : JSON.stringify(v, null, 1));
const verdictClass = (v) => (VERDICTS.includes(v) ? `v-${v}` : "v-other");

function kv(key, value, cls = "") {
  return el("span", { class: `kv ${cls}` }, el("span", { class: "k", text: key }),
    el("span", { class: "v", text: value ?? "–" }));
}

// --- API ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, param = null, status = 0) {
    super(message);
    this.param = param;
    this.status = status;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(API + path, init);
  if (res.status === 401) {  // the session cookie expired: the server shows the login form
    location.reload();
    throw new ApiError("Session expired: log in again.", null, 401);
  }
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    const e = (data && data.error) || {};
    throw new ApiError(e.message || `${res.status} ${res.statusText}`, e.param || null,
      res.status);
  }
  return data;
}

// Runs a user-visible task: counts it in data-state and shows its error, never losing one.
async function run(task) {
  state.pending += 1;
  setBusy();
  try {
    return await task();
  } catch (err) {
    showError(err);
    return undefined;
  } finally {
    state.pending -= 1;
    setBusy();
  }
}

function setBusy() {
  document.body.dataset.state = state.pending > 0 || !state.listLoaded ? "loading" : "ready";
}

function showError(err) {
  $("error-text").textContent = (err && err.message) || String(err);
  $("error").hidden = false;
  const param = err && err.param;
  const field = param && $(FIELD_OF_PARAM[param] || `f-${param}`);
  if (field) field.classList.add("invalid");
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
  for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
}

// --- URL and filter form -----------------------------------------------------------------------

// Reads filters, sort, page from location.hash; returns the pair id it names, if any.
function readUrl() {
  const q = new URLSearchParams(location.hash.slice(1));
  state.filters = {};
  for (const k of FILTERS) {
    const v = (q.get(k) || "").trim();
    if (v && !(k === "label" && v === "any")) state.filters[k] = v;
  }
  state.sort = q.get("sort") || "disagreement";
  state.page = Math.max(1, parseInt(q.get("page"), 10) || 1);
  return q.get("pair");
}

function writeUrl(push = false) {
  const q = new URLSearchParams(state.filters);
  if (state.sort !== "disagreement") q.set("sort", state.sort);
  if (state.page > 1) q.set("page", String(state.page));
  if (state.pair) q.set("pair", state.pair.pair.pair_id);
  const hash = q.toString();
  const url = location.pathname + location.search + (hash ? `#${hash}` : "");
  if (url === location.pathname + location.search + location.hash) return;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

function ensureOption(select, value) {
  if (value && ![...select.options].some((o) => o.value === value)) {
    select.append(new Option(value, value));
  }
}

function fillForm() {
  for (const k of FILTERS) {
    const field = $(`f-${k}`);
    const value = state.filters[k] || (k === "label" ? "any" : "");
    if (field.tagName === "SELECT") ensureOption(field, value);
    field.value = value;
  }
  ensureOption($("f-sort"), state.sort);
  $("f-sort").value = state.sort;
}

function readForm() {
  const filters = {};
  for (const k of FILTERS) {
    const v = $(`f-${k}`).value.trim();
    if (v && !(k === "label" && v === "any")) filters[k] = v;
  }
  return filters;
}

// Keeps the first option ("all") and lists `options` ([value, label] or value) after it.
function fillSelect(select, options) {
  const keep = select.options[0];
  select.replaceChildren(keep, ...options.map((o) => {
    const [value, label] = Array.isArray(o) ? o : [o, o];
    return new Option(label, value);
  }));
}

function renderFacets(f) {
  fillSelect($("f-route"), f.routes || []);
  fillSelect($("f-version"), (f.versions || []).filter((v) => v !== null));
  const verdicts = f.verdicts || VERDICTS;
  fillSelect($("f-label"), [["unlabelled", "unlabelled"], ["labelled", "labelled"],
    ...verdicts.map((v) => [v, VERDICT_NAMES[v] || v])]);
  const choices = ["any", "none", ...(f.metrics || []).flatMap((m) => [`${m}=true`, `${m}=false`])];
  $("feedback-options").replaceChildren(...choices.map((c) => new Option(c, c)));
}

function query(extra = {}) {
  const q = new URLSearchParams(state.filters);
  for (const [k, v] of Object.entries(extra)) q.set(k, String(v));
  return q.toString();
}

// --- loading -----------------------------------------------------------------------------------

// Loads the current page of pairs; `pick` ("first" | "last") selects a row when the open pair
// is not on the page.
async function loadList(pick = null) {
  const seq = ++state.seq.list;
  try {
    const params = query({ sort: state.sort, page: state.page, size: PAGE_SIZE });
    const data = await api(`/pairs?${params}`);
    if (seq !== state.seq.list) return;
    state.list = data;
    const openId = state.pair && state.pair.pair.pair_id;
    const at = data.items.findIndex((item) => item.pair_id === openId);
    if (at >= 0) state.selected = at;
    else if (pick === "first") state.selected = data.items.length ? 0 : -1;
    else if (pick === "last") state.selected = data.items.length - 1;
    else state.selected = -1;
    renderList();
  } finally {
    state.listLoaded = true;
  }
}

async function loadSummary() {
  const seq = ++state.seq.summary;
  const data = await api(`/summary?${query()}`);
  if (seq === state.seq.summary) renderSummary(data);
}

// The summary follows labels without a request per keystroke.
function scheduleSummary() {
  clearTimeout(state.summaryTimer);
  state.summaryTimer = setTimeout(() => run(loadSummary), 700);
}

function refresh(push = false) {
  writeUrl(push);
  return run(() => Promise.all([loadList(), loadSummary()]));
}

function applyFilters() {
  clearError();
  state.filters = readForm();
  state.sort = $("f-sort").value;
  state.page = 1;
  return refresh(true);
}

// Moves `delta` pages; false when there is no such page.
async function turnPage(delta, pick = null) {
  const pages = pageCount();
  const page = state.page + delta;
  if (!state.list || page < 1 || page > pages) return false;
  state.page = page;
  writeUrl(true);
  await loadList(pick);
  return true;
}

function pageCount() {
  if (!state.list) return 1;
  return Math.max(1, Math.ceil(state.list.total / (state.list.size || PAGE_SIZE)));
}

// --- list --------------------------------------------------------------------------------------

function renderList() {
  const { items, total, page } = state.list;
  const pages = pageCount();
  $("pairs").replaceChildren(...items.map(pairRow));
  $("page-info").textContent = `page ${page} of ${pages} · ${total} pairs`;
  $("prev-page").disabled = page <= 1;
  $("next-page").disabled = page >= pages;
  $("empty").hidden = items.length > 0;
  markSelected();
}

function pairRow(item, index) {
  const tr = el("tr", { data: { pairId: item.pair_id, index: String(index),
    disagreement: item.disagreement ?? "", label: item.label ? item.label.verdict : "" } });
  tr.append(
    el("td", { class: "dis" }, disagreementCell(item.disagreement)),
    el("td", { class: "clip", text: item.route, title: `${item.route} · ${item.variant}` }),
    el("td", { class: "clip", text: item.student_version ?? "-" }),
    el("td", { class: "mono", text: shortTime(item.created_at), title: item.created_at }),
    el("td", { class: "clip prompt", text: oneLine(item.prompt), title: item.prompt }),
    el("td", {}, labelBadge(item.label)),
    el("td", { class: "num", text: item.feedback ? item.feedback : "" }),
  );
  return tr;
}

function disagreementCell(value) {
  const wrap = el("span", { class: "dis-cell" });
  const bar = el("span", { class: "meter" });
  const high = value !== null && value >= state.highThreshold;
  const fill = el("span", { class: high ? "fill hi" : "fill" });
  fill.style.width = `${Math.round(100 * Math.min(1, Math.max(0, value ?? 0)))}%`;  // CSSOM
  bar.append(fill);
  wrap.append(el("span", { class: "num", text: fmt(value, 2) }), bar);
  return wrap;
}

function labelBadge(label) {
  if (!label) return el("span", { class: "badge none", text: "–", title: "unlabelled" });
  const title = `${VERDICT_NAMES[label.verdict] || label.verdict}, by ${label.reviewer}` +
    (label.created_at ? `, ${label.created_at}` : "") + (label.corrected ? ", corrected" : "");
  return el("span", { class: `badge ${verdictClass(label.verdict)}`, title,
    text: (VERDICT_NAMES[label.verdict] || label.verdict) + (label.corrected ? " ✎" : "") });
}

function markSelected() {
  for (const tr of $("pairs").rows) {
    const on = Number(tr.dataset.index) === state.selected;
    tr.classList.toggle("selected", on);
    tr.setAttribute("aria-selected", on ? "true" : "false");
    if (on) tr.scrollIntoView({ block: "nearest" });
  }
}

function selectRow(index) {
  state.selected = index;
  markSelected();
}

// Moves the selection by `delta` rows across pages; opens the pair when one is open.
async function step(delta, { open = Boolean(state.pair), keepStatus = false } = {}) {
  const items = (state.list && state.list.items) || [];
  let i = state.selected < 0 ? (delta > 0 ? 0 : items.length - 1) : state.selected + delta;
  if (i >= items.length) {
    if (!(await turnPage(+1, "first"))) return false;
    i = 0;
  } else if (i < 0) {
    if (!(await turnPage(-1, "last"))) return false;
    i = state.list.items.length - 1;
  }
  if (i < 0 || !state.list.items[i]) return false;
  selectRow(i);
  if (open) await openPair(state.list.items[i].pair_id, { keepStatus });
  return true;
}

function openSelected() {
  const item = state.list && state.list.items[state.selected];
  if (item) run(() => openPair(item.pair_id));
}

// --- summary -----------------------------------------------------------------------------------

function renderSummary(s) {
  state.highThreshold = s.high_threshold ?? 0.5;
  $("total").textContent = String(s.total);
  $("scored").textContent = String(s.scored);
  const share = s.total ? (100 * s.labelled) / s.total : 0;
  const pct = s.labelled && share < 1 ? "<1" : String(Math.round(share));
  $("labelled-share").textContent = `${s.labelled} of ${s.total} labelled (${pct}%)`;
  const counts = s.labels || {};
  $("verdict-counts").replaceChildren(...VERDICTS.map((v) => el("li",
    { class: `badge ${verdictClass(v)}`, text: `${VERDICT_NAMES[v]} ${counts[v] ?? 0}` })));
  for (const th of document.querySelectorAll(".high-th")) {
    th.textContent = `≥${state.highThreshold}`;
  }
  drawHistogram($("histogram"), s.histogram || {}, state.highThreshold);
  drawTimeseries($("timeseries"), $("ts-legend"), s.timeseries || {});
  renderTop($("top-routes"), s.top_routes || [], "route");
  renderTop($("top-versions"), s.top_versions || [], "version");
}

function renderTop(tbody, rows, key) {
  tbody.replaceChildren(...rows.map((r) => el("tr", {},
    el("td", { class: "clip", text: r[key] ?? "-", title: r[key] ?? "no version" }),
    el("td", { class: "num", text: r.pairs }),
    el("td", { class: "num", text: fmt(r.mean, 2) }),
    el("td", { class: "num", text: r.high }))));
  if (!rows.length) tbody.append(el("tr", {}, el("td", { class: "muted", text: "none" })));
}

// Bars of the scored pairs' disagreement; bins at or over the threshold in red.
function drawHistogram(svg, { edges = [], counts = [] }, threshold) {
  svg.replaceChildren();
  const W = 260, H = 120, L = 26, R = 6, T = 12, B = 18;
  const max = Math.max(1, ...counts);
  const bw = (W - L - R) / Math.max(1, counts.length);
  const y = (c) => H - B - ((H - T - B) * c) / max;
  svgEl(svg, "line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  svgEl(svg, "text", { x: L - 4, y: T + 3, class: "tick end" }, max);
  svgEl(svg, "text", { x: L - 4, y: H - B, class: "tick end" }, 0);
  counts.forEach((c, i) => {
    const x = L + i * bw;
    const rect = svgEl(svg, "rect", { x: x + 1, y: y(c), width: Math.max(1, bw - 2),
      height: H - B - y(c), class: edges[i] >= threshold ? "bar hi" : "bar" });
    svgEl(rect, "title", {}, `${fmt(edges[i], 1)}–${fmt(edges[i + 1], 1)}: ${c} pairs`);
    if (c) svgEl(svg, "text", { x: x + bw / 2, y: y(c) - 2, class: "tick mid" }, c);
  });
  edges.forEach((e, i) => {
    if (i % 5 === 0 || i === edges.length - 1) {
      svgEl(svg, "text", { x: L + i * bw, y: H - 5, class: "tick mid" }, fmt(e, 1));
    }
  });
}

// One line per student version: mean disagreement per time bucket, y from 0 to 1.
function drawTimeseries(svg, legend, { bucket = "day", series = [] }) {
  svg.replaceChildren();
  legend.replaceChildren();
  const W = 400, H = 120, L = 34, R = 10, T = 8, B = 28;
  const buckets = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort();
  if (!buckets.length) {
    svgEl(svg, "text", { x: W / 2, y: H / 2, class: "tick mid" }, "no scored pairs");
    return;
  }
  const at = new Map(buckets.map((b, i) => [b, i]));
  const x = (b) => (buckets.length === 1 ? (L + W - R) / 2
    : L + (at.get(b) * (W - L - R)) / (buckets.length - 1));
  const y = (v) => T + (1 - v) * (H - T - B);
  for (const v of [0, 0.5, 1]) {
    svgEl(svg, "line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: v ? "grid" : "axis" });
    svgEl(svg, "text", { x: L - 4, y: y(v) + 3, class: "tick end" }, v);
  }
  // First, middle and last bucket, e.g. "11-28 21h" (hours) or "2026-11-28" (days).
  const last = buckets.length - 1;
  const ticks = new Map([[0, "start"], [Math.floor(last / 2), "mid"], [last, "end"]]);
  if (buckets.length === 1) ticks.set(0, "mid");
  for (const [i, anchor] of ticks) {
    const b = buckets[i];
    const name = bucket === "hour" ? `${b.slice(5).replace("T", " ")}h` : b;
    svgEl(svg, "text", { x: x(b), y: H - B + 11, class: `tick ${anchor}` }, name);
  }
  svgEl(svg, "text", { x: (L + W - R) / 2, y: H - 3, class: "axis-label mid" },
    `${bucket} (UTC)`);
  svgEl(svg, "text", { x: 9, y: T + (H - T - B) / 2, class: "axis-label mid",
    transform: `rotate(-90 9 ${T + (H - T - B) / 2})` }, "mean");
  series.forEach((s, k) => {
    const color = COLORS[k % COLORS.length];
    const name = s.version ?? "-";
    const points = s.points.filter((p) => p[1] !== null && p[1] !== undefined);
    if (points.length > 1) {
      svgEl(svg, "polyline", { class: "line", stroke: color,
        points: points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") });
    }
    for (const [b, mean, n] of points) {
      const dot = svgEl(svg, "circle", { cx: x(b), cy: y(mean), r: 2.5, fill: color });
      svgEl(dot, "title", {}, `${name} · ${b}: mean ${fmt(mean, 3)} over ${n} pairs`);
    }
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = color;  // CSSOM
    legend.append(el("span", { class: "key" }, swatch, name));
  });
}

// --- pair view ---------------------------------------------------------------------------------

async function openPair(id, { keepStatus = false } = {}) {
  const seq = ++state.seq.pair;
  const data = await api(`/pairs/${encodeURIComponent(id)}`);
  if (seq !== state.seq.pair) return;
  const other = !state.pair || state.pair.pair.pair_id !== id;
  state.pair = data;
  const at = state.list ? state.list.items.findIndex((item) => item.pair_id === id) : -1;
  if (at >= 0) selectRow(at);
  renderPair(data);
  $("corrected").value = "";
  if (!keepStatus) setLabelStatus("", "");
  $("label-note").textContent = "";
  showPair(true);
  if (other) $("pair").scrollTop = 0;
  writeUrl(false);
}

function closePair() {
  state.seq.pair += 1;  // drop an answer still on its way
  state.pair = null;
  showPair(false);
  writeUrl(false);
}

function showPair(on) {
  $("pair").hidden = !on;
  $("main").classList.toggle("with-pair", on);
  if (!on) delete $("pair").dataset.pairId;
}

function renderPair({ pair, diff, feedback, labels }) {
  $("pair").dataset.pairId = pair.pair_id;
  $("pair-title").textContent = pair.pair_id;
  $("pair-meta").replaceChildren(
    kv("disagreement", fmt(pair.disagreement, 3), "strong"), kv("route", pair.route),
    kv("variant", pair.variant), kv("teacher", pair.target),
    kv("time", pair.created_at), kv("request", pair.request_id));
  renderPrompt(pair);
  const params = Object.entries(pair.params || {});
  $("params").replaceChildren(...params.map(([k, v]) => kv(k, asText(v))));
  renderDiff(diff, pair);
  $("student-model").textContent = sideName(pair.student);
  $("teacher-model").textContent = sideName(pair.teacher);
  renderScores(pair.scores || {});
  renderSides(pair.student || {}, pair.teacher || {});
  renderFeedback(feedback || []);
  renderLabels(labels || []);
}

const sideName = (a) => (a && a.model ? `${a.model}${a.version ? ` · ${a.version}` : ""}` : "");

function renderPrompt(pair) {
  const completion = pair.prompt !== null && pair.prompt !== undefined;
  const messages = pair.messages || (completion ? [{ role: "prompt", content: pair.prompt }] : []);
  $("prompt").replaceChildren(...messages.map((m) => el("div", { class: "msg" },
    el("span", { class: "role", text: m.role }),
    el("div", { class: "text", text: asText(m.content) }))));
}

// Student column: same + student segments; teacher column: same + teacher segments.
function renderDiff(diff, pair) {
  const student = [], teacher = [];
  if (Array.isArray(diff) && diff.length) {
    for (const [kind, text] of diff) {
      const k = ["same", "student", "teacher"].includes(kind) ? kind : "same";
      if (k !== "teacher") student.push(el("span", { class: `diff-${k}`, text }));
      if (k !== "student") teacher.push(el("span", { class: `diff-${k}`, text }));
    }
  } else {
    student.push(el("span", { class: "diff-same", text: (pair.student || {}).text }));
    teacher.push(el("span", { class: "diff-same", text: (pair.teacher || {}).text }));
  }
  $("student-answer").replaceChildren(...student);
  $("teacher-answer").replaceChildren(...teacher);
}

function renderScores(scores) {
  const names = Object.keys(scores).sort((a, b) =>
    (a === "disagreement" ? -1 : b === "disagreement" ? 1 : a.localeCompare(b)));
  $("scores").replaceChildren(...names.map((name) => el("tr", { data: { score: name } },
    el("th", { text: name }), el("td", { class: "num", text: fmt(scores[name], 3) }))));
}

function renderSides(s, t) {
  const ms = (v) => (v === null || v === undefined ? "–" : `${Math.round(v)} ms`);
  const rows = [
    ["model", s.model, t.model], ["version", s.version ?? "–", t.version ?? "–"],
    ["finish", s.finish_reason ?? "–", t.finish_reason ?? "–"],
    ["prompt tokens", s.prompt_tokens ?? "–", t.prompt_tokens ?? "–"],
    ["completion tokens", s.completion_tokens ?? "–", t.completion_tokens ?? "–"],
    ["TTFT", ms(s.ttft_ms), ms(t.ttft_ms)], ["latency", ms(s.latency_ms), ms(t.latency_ms)],
  ];
  $("sides").replaceChildren(...rows.map(([name, a, b]) => el("tr", {},
    el("th", { text: name }), el("td", { class: "clip", text: a, title: String(a) }),
    el("td", { class: "clip", text: b, title: String(b) }))));
}

// Booleans are stored as 1 and 0: whole numbers show as they are.
const feedbackValue = (v) => (Number.isInteger(v) ? String(v) : fmt(v, 2));

function renderFeedback(entries) {
  $("feedback").replaceChildren(...entries.map((f) => el("li", {},
    el("span", { class: "tag", text: f.metric }),
    el("span", { class: f.comment ? "text" : "num", text: f.comment ?? feedbackValue(f.value) }),
    el("span", { class: "muted", text: shortTime(f.created_at), title: f.created_at }))));
  if (!entries.length) $("feedback").append(el("li", { class: "muted", text: "none" }));
}

function renderLabels(labels) {
  $("labels").replaceChildren(...labels.map((l, i) => {
    const badge = labelBadge({ ...l, corrected: Boolean(l.corrected) });
    const li = el("li", { class: i ? "old" : "" }, badge,
      el("span", { text: `by ${l.reviewer}` }),
      el("span", { class: "muted", text: shortTime(l.created_at), title: l.created_at }));
    if (l.corrected) li.append(el("div", { class: "text corrected", text: l.corrected }));
    return li;
  }));
  if (!labels.length) $("labels").append(el("li", { class: "muted", text: "not labelled yet" }));
}

// --- labelling ---------------------------------------------------------------------------------

function setLabelStatus(text, pairId) {
  $("label-status").textContent = text;
  $("label-status").dataset.pairId = pairId || "";
}

// Saves `verdict` (and the corrected answer) for the open pair; `advance` then opens the next.
async function saveLabel(verdict, advance) {
  if (!state.pair || state.saving) return;
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) {
    $("reviewer").focus();
    throw new ApiError("Enter your name as reviewer (top right) before labelling.", "reviewer");
  }
  state.saving = true;
  try {
    const id = state.pair.pair.pair_id;
    const corrected = $("corrected").value;
    const { label } = await api(`/pairs/${encodeURIComponent(id)}/label`, { method: "POST",
      body: { verdict, corrected: corrected.trim() ? corrected : null, reviewer } });
    updateRowLabel(id, label);
    if (state.pair && state.pair.pair.pair_id === id) {
      state.pair.labels = [label, ...(state.pair.labels || [])];
      renderLabels(state.pair.labels);
    }
    setLabelStatus(`Labelled: ${label.verdict}, by ${label.reviewer}`, id);
    scheduleSummary();
    if (advance && !(await step(+1, { open: true, keepStatus: true }))) {
      $("label-note").textContent = "last pair of the list";
    }
  } finally {
    state.saving = false;
  }
}

function updateRowLabel(id, label) {
  const items = (state.list && state.list.items) || [];
  const index = items.findIndex((item) => item.pair_id === id);
  if (index < 0) return;
  items[index].label = { verdict: label.verdict, reviewer: label.reviewer,
    created_at: label.created_at, corrected: Boolean(label.corrected) };
  const old = [...$("pairs").rows].find((tr) => tr.dataset.pairId === id);
  if (old) old.replaceWith(pairRow(items[index], index));
  markSelected();
}

function labelOpenPair(verdict, advance) {
  if (state.pair && !state.saving) run(() => saveLabel(verdict, advance));
}

// --- reviewer, help, keyboard ------------------------------------------------------------------

function initReviewer() {
  const input = $("reviewer");
  try {
    input.value = localStorage.getItem(REVIEWER_KEY) || "";
  } catch {
    input.value = "";  // storage disabled: the name lasts for this page only
  }
  const sync = () => {
    const name = input.value.trim();
    input.classList.toggle("needed", !name);
    try {
      if (name) localStorage.setItem(REVIEWER_KEY, name);
    } catch { /* storage disabled */ }
  };
  input.addEventListener("input", sync);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") input.blur(); });
  sync();
  if (!input.value) input.focus();  // asked once; kept in localStorage afterwards
}

function toggleHelp(show = $("help").hidden) {
  $("help").hidden = !show;
}

const KEYS = {
  j: () => run(() => step(+1)),
  k: () => run(() => step(-1)),
  Enter: openSelected,
  o: openSelected,
  Escape: () => (!$("help").hidden ? toggleHelp(false) : closePair()),
  c: () => state.pair && $("corrected").focus(),
  "/": () => $("f-q").focus(),
  n: () => run(() => turnPage(+1)),
  p: () => run(() => turnPage(-1)),
  "?": () => toggleHelp(),
};

function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
  const target = e.target instanceof Element ? e.target : document.body;
  if (target.closest("input, textarea, select, [contenteditable]")) {
    if (e.key === "Escape") {  // leave the field; a second Escape closes the pair
      e.preventDefault();
      target.blur();
    }
    return;
  }
  if ((e.key === "Enter" || e.key === " ") && target.closest("button, a, summary")) return;
  if (VERDICT_KEYS[e.key]) {
    e.preventDefault();
    labelOpenPair(VERDICT_KEYS[e.key], true);
    return;
  }
  const action = KEYS[e.key];
  if (!action) return;
  e.preventDefault();
  action();
}

// --- wiring ------------------------------------------------------------------------------------

function bindEvents() {
  $("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    applyFilters();
  });
  $("reset").addEventListener("click", () => {
    state.filters = {};
    state.sort = "disagreement";
    fillForm();
    applyFilters();
  });
  $("error-close").addEventListener("click", clearError);
  $("prev-page").addEventListener("click", () => run(() => turnPage(-1)));
  $("next-page").addEventListener("click", () => run(() => turnPage(+1)));
  $("pairs").addEventListener("click", (e) => {
    const tr = e.target instanceof Element && e.target.closest("tr[data-pair-id]");
    if (!tr) return;
    selectRow(Number(tr.dataset.index));
    run(() => openPair(tr.dataset.pairId));
  });
  $("pair-close").addEventListener("click", closePair);
  $("pair-prev").addEventListener("click", () => run(() => step(-1, { open: true })));
  $("pair-next").addEventListener("click", () => run(() => step(+1, { open: true })));
  for (const button of document.querySelectorAll("[data-verdict]")) {
    button.addEventListener("click", () => labelOpenPair(button.dataset.verdict, false));
  }
  $("copy-teacher").addEventListener("click", () => {
    if (!state.pair) return;
    $("corrected").value = (state.pair.pair.teacher || {}).text || "";
    $("corrected").focus();
  });
  $("help-toggle").addEventListener("click", () => toggleHelp());
  document.addEventListener("keydown", onKey);
  window.addEventListener("popstate", () => {
    const id = readUrl();
    fillForm();
    refresh();
    if (id) run(() => openPair(id));
    else closePair();
  });
}

async function init() {
  bindEvents();
  initReviewer();
  const openId = readUrl();
  await run(async () => {
    try {
      renderFacets(await api("/facets"));
    } finally {
      fillForm();  // the filters show even when the facets failed
    }
  });
  await run(() => Promise.all([loadList(), loadSummary(), openId ? openPair(openId) : null]));
}

document.addEventListener("DOMContentLoaded", init);
