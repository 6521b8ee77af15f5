// gleaner view: the page over a run's store. Example text is untrusted: every value is put
// in the page with textContent (el() below); nothing here parses data as HTML.
"use strict";

const state = { run: null, token: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "href") node.setAttribute("href", safeHref(value));
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function safeHref(value) {
  const text = String(value);
  return text.startsWith("#") || /^https?:\/\//i.test(text) ? text : "#";
}

function fmt(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") {
    return Number.isInteger(value) ? value.toLocaleString("en-US") : value.toFixed(3);
  }
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes.flat(Infinity).filter((node) => node !== null && node !== undefined));
}

// ---- the API ---------------------------------------------------------------------------------
function tokenFromUrl() {
  const given = new URLSearchParams(location.search).get("token");
  if (given) {
    sessionStorage.setItem("gleaner-token", given);
    history.replaceState(null, "", location.pathname + location.hash);
  }
  state.token = sessionStorage.getItem("gleaner-token");
}

async function api(path, options) {
  const headers = { "X-Gleaner": "1" };
  if (state.token) headers["X-Gleaner-Token"] = state.token;
  const init = Object.assign({ headers }, options || {});
  if (init.body) headers["Content-Type"] = "application/json";
  const answer = await fetch(path, init);
  const body = await answer.json().catch(() => ({}));
  if (answer.status === 401 && body.token_required) {
    askToken();
    throw new Error("token required");
  }
  if (!answer.ok) throw new Error(body.error || `HTTP ${answer.status}`);
  return body;
}

function askToken() {
  const input = el("input", { id: "token", size: "40", autocomplete: "off" });
  const form = el("form", {
    onsubmit: (event) => {
      event.preventDefault();
      sessionStorage.setItem("gleaner-token", input.value.trim());
      state.token = input.value.trim();
      start();
    },
  }, el("p", {}, "This viewer asks for the token that `gleaner view` printed."),
    el("label", {}, "token ", input), " ", el("button", { type: "submit" }, "Open"));
  show(form);
}

function failure(error) {
  if (String(error.message) === "token required") return;
  show(el("p", { class: "error", id: "error" }, String(error.message || error)));
}

// ---- routing ---------------------------------------------------------------------------------
function route() {
  const hash = location.hash || "#/pool";
  const [path, query] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  const views = {
    pool: () => poolView(params),
    example: () => exampleView(parts[1]),
    counts: () => countsView(),
    eval: () => (parts.length >= 3 ? pairsView(parts[1], parts[2], params) : evalView()),
    flows: () => flowsView(),
    review: () => reviewView(),
  };
  (views[parts[0]] || views.pool)().catch(failure);
}

async function start() {
  tokenFromUrl();
  try {
    state.run = await api("/api/run");
  } catch (error) {
    failure(error);
    return;
  }
  document.getElementById("run-title").textContent =
    `run ${state.run.run_id} · ${fmt(state.run.examples)} examples · ${state.run.store}`;
  const who = document.getElementById("who");
  who.value = localStorage.getItem("gleaner-who") || state.run.reviewer || "";
  who.addEventListener("change", () => localStorage.setItem("gleaner-who", who.value.trim()));
  document.getElementById("nav").replaceChildren(
    el("a", { href: "#/pool" }, "Pool"), el("a", { href: "#/counts" }, "Counts"),
    el("a", { href: "#/eval" }, "Evaluation"), el("a", { href: "#/flows" }, "Flow runs"),
    el("a", { href: "#/review" }, "Review log"));
  route();
}

window.addEventListener("hashchange", () => { if (state.run) route(); });
document.addEventListener("DOMContentLoaded", start);

// ---- the pool --------------------------------------------------------------------------------
function fieldsOf(kind) {
  return state.run.fields.filter((f) => f.kind === kind);
}

function poolForm(params) {
  const ranges = {};
  for (const value of params.getAll("range")) {
    const [name, low, high] = value.split(",");
    ranges[name] = [low, high];
  }
  const equals = {};
  for (const value of params.getAll("is")) {
    const at = value.indexOf(",");
    equals[value.slice(0, at)] = value.slice(at + 1);
  }
  const inputs = [];
  const q = el("input", { name: "q", value: params.get("q") || "", size: "24" });
  inputs.push(el("label", {}, "search text", q));
  const choices = {};
  for (const f of [...fieldsOf("category"), ...fieldsOf("bool")]) {
    const select = el("select", { name: f.name, "data-field": f.name }, el("option", { value: "" }, "any"));
    const values = f.kind === "bool" ? ["true", "false"]
      : Object.keys(state.run.categories[f.name] || {}).sort();
    for (const value of values) {
      const count = f.kind === "bool" ? "" : ` (${fmt(state.run.categories[f.name][value])})`;
      const option = el("option", { value }, value + count);
      if (equals[f.name] === value) option.selected = true;
      select.append(option);
    }
    choices[f.name] = select;
    inputs.push(el("label", {}, f.title, select));
  }
  const bounds = {};
  for (const f of fieldsOf("number")) {
    const known = state.run.numbers[f.name] || {};
    const [low, high] = ranges[f.name] || ["", ""];
    const min = el("input", { type: "number", step: "any", value: low, placeholder: fmt(known.min) });
    const max = el("input", { type: "number", step: "any", value: high, placeholder: fmt(known.max) });
    bounds[f.name] = [min, max];
    inputs.push(el("label", {}, `${f.name} from / to`, el("span", {}, min, max)));
  }
  const sort = el("select", { name: "sort" }, el("option", { value: "" }, "pool order"));
  for (const f of state.run.fields) {
    const option = el("option", { value: f.name }, f.name);
    if (params.get("sort") === f.name) option.selected = true;
    sort.append(option);
  }
  const desc = el("input", { type: "checkbox", name: "desc" });
  desc.checked = params.get("desc") === "1";
  const limit = el("select", { name: "limit" });
  for (const n of ["25", "50", "100", "200"]) {
    const option = el("option", { value: n }, n);
    if ((params.get("limit") || "50") === n) option.selected = true;
    limit.append(option);
  }
  inputs.push(el("label", {}, "sort by", sort), el("label", {}, "descending", desc),
    el("label", {}, "per page", limit));
  const form = el("form", {
    class: "filters", id: "filters",
    onsubmit: (event) => {
      event.preventDefault();
      const out = new URLSearchParams();
      if (q.value.trim()) out.set("q", q.value.trim());
      for (const [name, select] of Object.entries(choices)) {
        if (select.value) out.append("is", `${name},${select.value}`);
      }
      for (const [name, [min, max]] of Object.entries(bounds)) {
        if (min.value !== "" || max.value !== "") out.append("range", `${name},${min.value},${max.value}`);
      }
      if (sort.value) out.set("sort", sort.value);
      if (desc.checked) out.set("desc", "1");
      if (limit.value !== "50") out.set("limit", limit.value);
      location.hash = `#/pool?${out.toString()}`;
    },
  }, inputs, el("button", { type: "submit", id: "apply" }, "Apply"),
    el("a", { href: "#/pool" }, "clear"));
  return form;
}

async function poolView(params) {
  const query = new URLSearchParams(params);
  const page = await api(`/api/pool?${query.toString()}`);
  const numbers = fieldsOf("number").map((f) => f.name);
  const statuses = fieldsOf("category").filter((f) => f.name.startsWith("status:"));
  const marks = fieldsOf("bool").filter((f) => !["selected", "excluded", "flagged"].includes(f.name));
  const head = el("tr", {}, el("th", {}, ""), el("th", {}, "id"), el("th", {}, "instruction"),
    el("th", {}, "input"), el("th", {}, "response"),
    numbers.map((n) => el("th", { class: "num" }, n)),
    statuses.map((f) => el("th", {}, f.name)), marks.map((f) => el("th", {}, f.name)),
    el("th", {}, "selected / reason"), el("th", {}, "review"));
  const boxes = [];
  const body = page.rows.map((row) => {
    const box = el("input", { type: "checkbox", value: row.id });
    boxes.push(box);
    const classes = [row.excluded ? "excluded" : "", row.flagged ? "flagged" : ""].join(" ").trim();
    const select = row.stages.select || {};
    const reason = select.reason !== undefined ? select.reason : row.fields.reason;
    const statusCells = statuses.map((f) => {
      const stage = f.name.slice("status:".length);
      const got = row.stages[stage] || {};
      const status = row.fields[f.name];
      return el("td", { class: status === "failed" ? "failed" : "" }, fmt(status),
        got.error ? el("div", { class: "error-text" }, got.error) : null);
    });
    return el("tr", { "data-id": row.id, class: classes || null },
      el("td", {}, box),
      el("td", {}, el("a", { href: `#/example/${encodeURIComponent(row.id)}` }, row.id.slice(0, 12))),
      el("td", { class: "text instruction" }, row.instruction),
      el("td", { class: "text" }, row.input),
      el("td", { class: "text" }, row.output),
      numbers.map((n) => el("td", { class: "num" }, fmt(row.fields[n]))),
      statusCells,
      marks.map((f) => el("td", {}, row.fields[f.name] ? "yes" : "")),
      el("td", { class: "reason" }, row.fields.selected ? "selected" : fmt(reason)),
      el("td", {}, [row.excluded ? "excluded" : "", row.flagged ? " flagged" : ""].join("").trim()));
  });
  const offset = page.offset;
  const pager = el("p", { id: "pager" },
    el("span", { id: "total" }, `${fmt(page.total)} matching examples`),
    `, showing ${fmt(page.total ? offset + 1 : 0)}–${fmt(offset + page.rows.length)} `,
    offset > 0 ? el("a", { href: pageHash(params, Math.max(0, offset - page.limit)) }, "← previous") : null,
    " ",
    offset + page.rows.length < page.total
      ? el("a", { href: pageHash(params, offset + page.limit), id: "next" }, "next →") : null);
  const why = el("input", { size: "30", placeholder: "why (recorded with your name)", id: "why" });
  const act = (action) => async () => {
    const ids = boxes.filter((b) => b.checked).map((b) => b.value);
    if (!ids.length) return;
    await review(ids, action, why.value).catch(failure);
    route();
  };
  const actions = el("p", {}, "checked rows: ", why, " ",
    el("button", { onclick: act("exclude") }, "Exclude"), el("button", { onclick: act("include") }, "Include again"),
    el("button", { onclick: act("flag") }, "Flag"), el("button", { onclick: act("unflag") }, "Unflag"));
  show(poolForm(params), pager, actions,
    el("table", { id: "pool" }, el("thead", {}, head), el("tbody", {}, body)), pager.cloneNode(true));
}

function pageHash(params, offset) {
  const next = new URLSearchParams(params);
  next.set("offset", String(offset));
  return `#/pool?${next.toString()}`;
}

async function review(ids, action, why) {
  const who = document.getElementById("who").value.trim();
  return api("/api/review", { method: "POST", body: JSON.stringify({ ids, action, why, who }) });
}

// ---- one example -------------------------------------------------------------------------------
function keyValues(record, id) {
  return el("table", { id }, Object.entries(record).map(([key, value]) => el("tr", {},
    el("th", {}, key),
    el("td", { class: "text" }, typeof value === "string" && value.length > 80
      ? el("div", { class: "pre" }, value) : fmt(value)))));
}

async function exampleView(id) {
  const example = await api(`/api/example/${encodeURIComponent(id)}`);
  const turns = (example.conversation || []).map((turn) =>
    el("div", { class: "turn" }, el("strong", {}, turn.role), el("div", { class: "pre" }, turn.content)));
  const stages = Object.entries(example.stages).map(([stage, values]) =>
    el("section", { "data-stage": stage }, el("h3", {}, stage), keyValues(values, `stage-${stage}`)));
  const why = el("input", { size: "40", placeholder: "why", id: "why" });
  const act = (action) => async () => {
    await review([example.id], action, why.value).catch(failure);
    route();
  };
  const history = el("table", { id: "review-history" }, el("tr", {}, ["when", "who", "action", "why"].map((h) => el("th", {}, h))),
    example.review.map((r) => el("tr", {}, el("td", {}, r.at), el("td", {}, r.who), el("td", {}, r.action), el("td", {}, r.why))));
  show(
    el("p", {}, el("a", { href: "#/pool" }, "← pool")),
    el("h2", {}, "example ", el("code", { id: "example-id" }, example.id)),
    el("p", {}, `source ${example.source} row ${example.source_row}`,
      example.excluded ? el("strong", { class: "failed" }, " · excluded") : null,
      example.flagged ? el("strong", {}, " · flagged") : null),
    el("h3", {}, "instruction"), el("div", { class: "pre", id: "instruction" }, example.instruction),
    el("h3", {}, "input"), el("div", { class: "pre" }, example.input),
    el("h3", {}, "response"), el("div", { class: "pre", id: "response" }, example.output),
    el("details", {}, el("summary", {}, "the whole conversation"), turns),
    el("h3", {}, "review"),
    el("p", {}, why, " ", el("button", { onclick: act("exclude"), id: "exclude" }, "Exclude"),
      el("button", { onclick: act("include") }, "Include again"),
      el("button", { onclick: act("flag"), id: "flag" }, "Flag"), el("button", { onclick: act("unflag") }, "Unflag")),
    history,
    el("h3", {}, "signals"), keyValues(example.fields, "fields"),
    stages);
}

// ---- counts ----------------------------------------------------------------------------------
function countRow(label, value, id) {
  return el("tr", {}, el("th", {}, label), el("td", { class: "num", id }, fmt(value)));
}

function histogram(name, entry) {
  const most = Math.max(1, ...entry.pool);
  const rows = entry.pool.map((n, i) => {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${(300 * n) / most}px`;
    const selected = entry.selected ? entry.selected[i] : null;
    const chosen = el("span", { class: "bar sel" });
    chosen.style.width = `${(300 * (selected || 0)) / most}px`;
    return el("tr", {}, el("td", { class: "num" }, `${fmt(entry.edges[i])} – ${fmt(entry.edges[i + 1])}`),
      el("td", { class: "num" }, fmt(n)), el("td", {}, bar),
      el("td", { class: "num" }, fmt(selected)), el("td", {}, chosen));
  });
  return el("section", { "data-histogram": name }, el("h3", {}, `${entry.title} (${fmt(entry.n)} examples)`),
    el("table", {}, el("tr", {}, ["bin", "pool", "", "selected", ""].map((h) => el("th", {}, h))), rows));
}

async function countsView() {
  const counts = await api("/api/counts");
  const sections = [];
  const s = counts.summaries;
  if (s.ingest) {
    const i = s.ingest;
    sections.push(el("h3", {}, "ingest: read = kept + quarantined + duplicates"),
      el("table", { id: "counts-ingest" }, countRow("read", i.read, "ingest-read"),
        countRow("kept", i.kept, "ingest-kept"), countRow("quarantined", i.quarantined, "ingest-quarantined"),
        countRow("duplicates", i.duplicates, "ingest-duplicates")),
      i.reasons && Object.keys(i.reasons).length
        ? el("table", {}, Object.entries(i.reasons).map(([k, v]) => countRow(`quarantined: ${k}`, v))) : null);
  }
  if (s.rate) {
    const r = s.rate;
    sections.push(el("h3", {}, `rating: rated = kept + below + failed (threshold ${fmt(r.threshold)})`),
      el("table", { id: "counts-rate" }, countRow("rated", r.examples ?? r.read, "rate-examples"),
        countRow("kept (score ≥ threshold)", r.kept, "rate-kept"), countRow("below", r.below, "rate-below"),
        countRow("failed", r.failed, "rate-failed")));
    if (r.histogram) {
      const most = Math.max(1, ...Object.values(r.histogram));
      sections.push(el("h3", {}, "rating histogram"), el("table", { id: "rate-histogram" },
        Object.entries(r.histogram).map(([bucket, n]) => {
          const bar = el("span", { class: "bar" });
          bar.style.width = `${(300 * n) / most}px`;
          return el("tr", {}, el("td", { class: "num" }, bucket), el("td", { class: "num" }, fmt(n)), el("td", {}, bar));
        })));
    }
  }
  if (s.select) {
    const reasons = s.select.reasons || {};
    sections.push(el("h3", {}, `selection (${s.select.selector}): every example and why`),
      el("table", { id: "counts-select" }, countRow("examples", s.select.examples, "select-examples"),
        countRow("selected", s.select.selected, "select-selected"),
        Object.entries(reasons).map(([k, v]) => countRow(k, v, `select-${k}`))));
  }
  sections.push(el("p", {}, `excluded by a person: ${fmt(counts.excluded)} · flagged: ${fmt(counts.flagged)}`));
  for (const [name, entry] of Object.entries(counts.histograms)) sections.push(histogram(name, entry));
  const others = Object.entries(s).filter(([stage]) => !["ingest", "rate", "select"].includes(stage));
  if (others.length) {
    sections.push(el("h3", {}, "every stage"), el("table", { id: "counts-stages" },
      el("tr", {}, ["stage", "examples", "ok", "failed", "cached"].map((h) => el("th", {}, h))),
      others.map(([stage, x]) => el("tr", {}, el("td", {}, stage), el("td", { class: "num" }, fmt(x.examples)),
        el("td", { class: "num" }, fmt(x.ok)), el("td", { class: "num" }, fmt(x.failed)),
        el("td", { class: "num" }, fmt(x.cached))))));
  }
  show(el("h2", {}, "counts"), sections);
}

// ---- evaluation ------------------------------------------------------------------------------
function wtlTable(comparison, testSets, overall) {
  const head = el("tr", {}, ["test set", "win", "tie", "lose", "judge failures", "winning score",
    "win rate", "LC win rate"].map((h) => el("th", {}, h)));
  const row = (name, t, link) => el("tr", { "data-test-set": name },
    el("td", {}, link ? el("a", { href: `#/eval/${encodeURIComponent(comparison)}/${encodeURIComponent(name)}` }, name) : name),
    ["win", "tie", "lose", "failed", "winning_score", "win_rate", "lc_win_rate"].map((k) =>
      el("td", { class: "num" }, fmt(t[k]))));
  return el("table", { "data-comparison": comparison }, head,
    Object.entries(testSets || {}).map(([name, t]) => row(name, t, true)),
    overall ? row("overall", overall, false) : null);
}

async function evalView() {
  const data = await api("/api/evaluation");
  const parts = [el("h2", {}, "evaluation")];
  if (!data.comparisons.length) parts.push(el("p", { class: "muted" }, "This run has no pairwise evaluation yet."));
  for (const c of data.comparisons) {
    parts.push(el("h3", {}, `${c.model_a} vs ${c.model_b} (rule ${c.rule}, judge ${c.judge_model})`),
      wtlTable(c.comparison, c.test_sets, c.overall));
  }
  if (data.arms.length) {
    parts.push(el("h3", {}, "grid arms"), el("table", { id: "arms" },
      el("tr", {}, ["experiment", "arm", "status", "examples", "comparison", "win", "tie", "lose", "winning score"].map((h) => el("th", {}, h))),
      data.arms.map((a) => el("tr", {}, el("td", {}, a.experiment), el("td", {}, a.arm), el("td", {}, fmt(a.status)),
        el("td", { class: "num" }, fmt(a.examples)),
        el("td", {}, a.comparison ? el("a", { href: `#/eval?c=${encodeURIComponent(a.comparison)}` }, a.comparison) : "—"),
        ["win", "tie", "lose", "winning_score"].map((k) => el("td", { class: "num" }, fmt((a.overall || {})[k])))))));
  }
  show(parts);
}

async function pairsView(comparison, testSet, params) {
  const offset = Number(params.get("offset") || 0);
  const verdict = params.get("verdict") || "";
  const query = new URLSearchParams({ offset: String(offset), limit: "20" });
  if (verdict) query.set("verdict", verdict);
  const data = await api(`/api/evaluation/${encodeURIComponent(comparison)}/${encodeURIComponent(testSet)}?${query}`);
  const base = `#/eval/${encodeURIComponent(comparison)}/${encodeURIComponent(testSet)}`;
  const filters = el("p", {}, "verdict: ", el("a", { href: base }, "all"),
    ["win", "tie", "lose", "failed"].map((v) => [" · ", el("a", { href: `${base}?verdict=${v}` }, `${v} (${fmt(data.counts[v] || 0)})`)]));
  const pairs = data.rows.map((p) => el("div", { class: "pair", "data-pair": p.id },
    el("p", {}, el("strong", {}, p.key || p.id), " · verdict for A: ", el("span", { class: "verdict" }, p.verdict)),
    el("div", { class: "pre question" }, p.question),
    el("div", { class: "pairs" },
      el("div", {}, el("h4", {}, `A: ${data.model_a}`), el("div", { class: "pre answer-a" }, p.answer_a)),
      el("div", {}, el("h4", {}, `B: ${data.model_b}`), el("div", { class: "pre answer-b" }, p.answer_b))),
    el("div", { class: "pairs" },
      el("div", {}, el("h4", {}, `review, A shown first: A ${fmt(p.a_first_score_1)}, B ${fmt(p.a_first_score_2)} → ${fmt(p.outcome_a_first)}`),
        el("div", { class: "pre review-a-first" }, p.review_a_first)),
      el("div", {}, el("h4", {}, `review, B shown first: B ${fmt(p.b_first_score_1)}, A ${fmt(p.b_first_score_2)} → ${fmt(p.outcome_b_first)}`),
        el("div", { class: "pre review-b-first" }, p.review_b_first))),
    p.error ? el("p", { class: "failed" }, p.error) : null));
  const more = (at) => `${base}?${new URLSearchParams(Object.assign({ offset: String(at) }, verdict ? { verdict } : {}))}`;
  show(el("p", {}, el("a", { href: "#/eval" }, "← evaluation")),
    el("h2", {}, `${comparison} · ${testSet} (rule ${data.rule})`), filters,
    el("p", {}, `${fmt(data.total)} pairs `,
      offset > 0 ? el("a", { href: more(Math.max(0, offset - 20)) }, "← previous") : null, " ",
      offset + data.rows.length < data.total ? el("a", { href: more(offset + 20) }, "next →") : null),
    pairs);
}

// ---- Prefect and the review log -----------------------------------------------------------------
async function flowsView() {
  const data = await api("/api/flow-runs");
  show(el("h2", {}, "Prefect flow runs of this run"),
    data.error ? el("p", { class: "muted" }, data.error) : null,
    el("table", { id: "flow-runs" }, el("tr", {}, ["flow run", "state", "started"].map((h) => el("th", {}, h))),
      data.runs.map((r) => el("tr", {}, el("td", {}, el("a", { href: r.url, target: "_blank", rel: "noopener" }, r.name)),
        el("td", {}, fmt(r.state)), el("td", {}, fmt(r.start_time))))));
}

async function reviewView() {
  const data = await api("/api/review");
  show(el("h2", {}, `review log (${fmt(data.total)} actions, newest first)`),
    el("table", { id: "review-log" }, el("tr", {}, ["when", "who", "action", "example", "why"].map((h) => el("th", {}, h))),
      data.rows.map((r) => el("tr", {}, el("td", {}, r.at), el("td", {}, r.who), el("td", {}, r.action),
        el("td", {}, el("a", { href: `#/example/${encodeURIComponent(r.id)}` }, r.id.slice(0, 12))), el("td", {}, r.why)))));
}
