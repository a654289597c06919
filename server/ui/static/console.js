// prefixserve console: plain JavaScript against the server's own API (served from /ui/, so the API is "..").
"use strict";
const API = new URL("..", location.href);
const KEY_ITEM = "prefixserve.key";  // sessionStorage: this tab only, gone when it closes
const $ = (id) => document.getElementById(id);
let tasks = [];  // [{task, version, manifest}]
let controllers = [];  // the playground's running streams

function key() { return sessionStorage.getItem(KEY_ITEM) || ""; }
function headers(extra = {}) { return key() ? {...extra, Authorization: `Bearer ${key()}`} : extra; }
function status(text, bad = false) { const s = $("status"); s.textContent = text; s.className = bad ? "bad" : ""; }
function el(tag, props = {}, ...children) {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children.filter((c) => c !== null && c !== undefined));
  return e;
}
function size(n) { return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`; }

// The server's error message from either error shape (TGI's {error, error_type}, OpenAI's {error: {message}}).
async function errorOf(r) {
  const text = await r.text();
  try {
    const body = JSON.parse(text);
    const e = body.error;
    return typeof e === "object" && e ? `${r.status}: ${e.message}` : `${r.status} ${body.error_type || ""}: ${e}`;
  } catch { return `${r.status}: ${text.slice(0, 300)}`; }
}

async function api(path, options = {}) {
  const r = await fetch(new URL(path, API), {...options, headers: headers(options.headers)});
  if (!r.ok) {
    const message = await errorOf(r);
    if (r.status === 401) status(`${message} (enter an API key above)`, true);
    throw new Error(message);
  }
  return r;
}

// ---------------------------------------------------------------- tasks and replicas
async function loadTasks() {
  try {
    const [prefixes, replicas] = await Promise.all([
      api("prefixes").then((r) => r.json()), api("replicas").then((r) => r.json())]);
    tasks = prefixes.prefixes;
    renderTasks(replicas.replicas);
    renderTargets();
    if (!$("status").classList.contains("bad")) status(`${tasks.length} task(s), ${replicas.replicas.length} replica(s)`);
  } catch (e) { status(`cannot list tasks: ${e.message}`, true); }
}

function renderTasks(replicas) {
  const body = $("tasks").tBodies[0];
  body.replaceChildren();
  for (const t of tasks) {
    const m = t.manifest;
    const held = el("td");
    for (const r of replicas) {
      for (const tier of ["device", "host"]) {
        if (r[tier].includes(t.task)) held.append(el("span", {className: `tier ${tier}`, title: `${tier} of ${r.name}`,
                                                             textContent: `${r.name} (${tier})`}));
      }
    }
    if (!held.childNodes.length) held.append(el("span", {className: "muted small", textContent: "store only"}));
    body.append(el("tr", {}, el("td", {textContent: t.task}), el("td", {className: "mono", textContent: t.version.slice(0, 12), title: t.version}),
      el("td", {textContent: m.source || m.kind}), el("td", {textContent: m.prefix_length}),
      el("td", {textContent: size(m.nbytes || 0)}), el("td", {className: "desc", textContent: m.description || ""}),
      el("td", {className: "format", textContent: m.input_format || ""}), held));
  }
  if (!tasks.length) body.append(el("tr", {}, el("td", {colSpan: 8, className: "muted", textContent: "no tasks yet: upload one below"})));
  $("replicas").textContent = "replicas: " + replicas.map((r) => `${r.name}${r.self ? " (this one)" : ""}`).join(", ");
}

// ---------------------------------------------------------------- upload
let chosen = [];
function choose(files) {
  chosen = [...files];
  $("up-list").replaceChildren(...chosen.map((f) => el("li", {textContent: `${f.name} (${size(f.size)})`})));
}

async function upload(event) {
  event.preventDefault();
  const out = $("up-result");
  out.className = ""; out.replaceChildren();
  if (!chosen.length) { out.className = "bad"; out.textContent = "choose or drop the adapter's files first"; return; }
  const form = new FormData();
  for (const f of chosen) form.append("files", f, f.name);
  if ($("up-description").value) form.append("description", $("up-description").value);
  const name = $("up-name").value.trim();
  try {
    const r = await api(`prefixes/${encodeURIComponent(name)}`, {method: "PUT", body: form});
    const body = await r.json();
    out.textContent = `stored ${body.task} version ${body.version.slice(0, 12)} (${body.manifest.source}, ${body.manifest.prefix_length} tokens)`;
    await loadTasks();
  } catch (e) {
    out.className = "bad";
    out.append(el("strong", {textContent: "refused: "}), el("pre", {textContent: e.message}));
  }
}

// ---------------------------------------------------------------- playground
function renderTargets() {
  const box = $("targets");
  const was = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  const first = !box.querySelector("input");
  box.replaceChildren(el("legend", {textContent: "send to"}));
  const options = [["", "bare model"], ...tasks.map((t) => [t.task, t.task])];
  options.forEach(([value, label], i) => {
    const input = el("input", {type: "checkbox", value, checked: first ? i < 3 : was.has(value), id: `target-${i}`});
    input.addEventListener("change", renderFormats);
    box.append(el("label", {htmlFor: input.id}, input, ` ${label}`));
  });
  renderFormats();
}

function renderFormats() {
  const picked = selected().filter((t) => t);
  const formats = picked.map((t) => tasks.find((x) => x.task === t)).filter((t) => t && t.manifest.input_format)
    .map((t) => `${t.task}: ${t.manifest.input_format}`);
  $("formats").textContent = formats.join(" | ");
}

function selected() { return [...$("targets").querySelectorAll("input:checked")].map((i) => i.value); }

// One streamed /generate_stream into its column: TGI's server-sent events, one per token.
async function stream(target, inputs, maxTokens, column, signal) {
  const text = column.querySelector(".text"), info = column.querySelector(".info");
  const t0 = performance.now();
  let first = null, n = 0;
  const query = target ? `?task=${encodeURIComponent(target)}` : "";
  try {
    const r = await api(`generate_stream${query}`, {method: "POST", signal, headers: {"Content-Type": "application/json"},
      body: JSON.stringify({inputs, parameters: {max_new_tokens: maxTokens}})});
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end); buffer = buffer.slice(end + 2);
        if (!event.startsWith("data:")) continue;
        const data = JSON.parse(event.slice(5));
        if (data.error) throw new Error(`${data.error_type}: ${data.error}`);
        if (first === null) first = performance.now() - t0;
        n += 1;
        if (!data.token.special) text.textContent += data.token.text;
        if (data.generated_text !== null && data.generated_text !== undefined) text.textContent = data.generated_text;
        info.textContent = `${n} tokens, first after ${first.toFixed(0)} ms`;
        if (data.details) info.textContent += `, ${data.details.finish_reason}`;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") { info.textContent += " (stopped)"; return; }
    column.classList.add("error");
    text.textContent = e.message;
  }
}

async function run(event) {
  if (event) event.preventDefault();
  stop();
  const targets = selected();
  if (!targets.length) { status("choose at least one task (or the bare model) to send to", true); return; }
  const inputs = $("prompt").value + ($("newline").checked ? "\n" : "");
  const maxTokens = Number($("max-tokens").value) || 40;
  const outputs = $("outputs");
  outputs.replaceChildren();
  $("run").disabled = true; $("stop").disabled = false;
  const jobs = targets.map((target) => {
    const column = el("div", {className: "output", role: "region", ariaLabel: `output of ${target || "the bare model"}`},
      el("h3", {}, el("span", {textContent: target || "bare model"}), el("span", {className: "info small muted"})),
      el("div", {className: "text", ariaLive: "polite"}));
    column.dataset.target = target;
    outputs.append(column);
    const controller = new AbortController();
    controllers.push(controller);
    return stream(target, inputs, maxTokens, column, controller.signal);
  });
  await Promise.all(jobs);  // all at once: one batch on the server, streamed side by side here
  $("run").disabled = false; $("stop").disabled = true;
  controllers = [];
}

function stop() { controllers.forEach((c) => c.abort()); controllers = []; $("stop").disabled = true; $("run").disabled = false; }

// ---------------------------------------------------------------- gauges from /metrics
let last = null;
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    out.push({name: m[1], labels, value: Number(m[3])});
  }
  return out;
}
const sum = (samples, name) => samples.filter((s) => s.name === name).reduce((a, s) => a + s.value, 0);

async function pollMetrics() {
  try {
    const r = await fetch(new URL("metrics", API), {headers: headers()});
    if (!r.ok) { $("gauges-note").textContent = r.status === 401 ? "(/metrics needs the metrics key or an admin key)" : `(/metrics: ${r.status})`; return; }
    const samples = parseMetrics(await r.text());
    const now = performance.now();
    const rows = sum(samples, "prefixserve_batch_size"), cap = sum(samples, "prefixserve_max_batch_size");
    $("g-rows").textContent = cap ? `${rows} / ${cap}` : `${rows}`;
    $("g-rows-meter").max = cap || 1; $("g-rows-meter").value = rows;
    $("g-queue").textContent = sum(samples, "prefixserve_queue_depth");
    $("g-tenants").replaceChildren(...samples.filter((s) => s.name === "prefixserve_tenant_queue_depth")
      .map((s) => el("li", {textContent: `${s.labels.tenant}: ${s.value}`})));
    const tokens = sum(samples, "prefixserve_engine_generated_tokens_total");
    if (last) $("g-tps").textContent = (Math.max(0, tokens - last.tokens) / ((now - last.at) / 1000)).toFixed(1);
    last = {tokens, at: now};
    const hits = sum(samples, "prefixserve_prefix_cache_hits_total"), misses = sum(samples, "prefixserve_prefix_cache_misses_total");
    $("g-hits").textContent = hits + misses ? `${(100 * hits / (hits + misses)).toFixed(1)} %` : "-";
    $("g-hits-detail").textContent = `${hits} hits, ${misses} misses`;
    $("gauges-note").textContent = "";
  } catch (e) { $("gauges-note").textContent = `(/metrics: ${e.message})`; }
}

// ---------------------------------------------------------------- wiring
function wire() {
  $("key").value = key();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("key").value.trim());
    status("key set for this tab"); loadTasks();
  });
  $("forget").addEventListener("click", () => { sessionStorage.removeItem(KEY_ITEM); $("key").value = ""; status("key forgotten"); });
  $("refresh").addEventListener("click", loadTasks);
  $("upload").addEventListener("submit", upload);
  $("up-files").addEventListener("change", (e) => choose(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over"); $("up-files").value = ""; choose(e.dataTransfer.files);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("up-files").click(); } });
  $("play").addEventListener("submit", run);
  $("stop").addEventListener("click", stop);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(e);
    if (e.key === "Escape") stop();
  });
  fetch(new URL("ready", API)).then((r) => r.json()).then((r) => { $("model").textContent = r.model ? `on ${r.model}` : ""; }).catch(() => {});
  loadTasks();
  pollMetrics();
  setInterval(pollMetrics, 2000);
}
wire();
