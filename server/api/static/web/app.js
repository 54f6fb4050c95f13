// The TTAServe web page: reads /v1/methods and /v1/label-sets, sends one multipart POST /v1/classify
// with the chosen images, and draws each result. Plain DOM, no framework and nothing loaded from
// elsewhere, so the page works on a machine with no internet.
"use strict";

const state = {
  files: [], // the images of the next request, in order
  methods: new Map(), // name -> {summary, options_schema, limits}
  labelSets: new Map(), // name -> labels
  limits: null,
  last: null, // {body, files, requestId} of the last answer, redrawn when the bar scale changes
  thumbs: [], // object URLs of the results' thumbnails, released when they are redrawn
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.includes("-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

const percent = (p) => `${(100 * p).toFixed(1)}%`;
const fixed = (x, digits = 3) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(digits));

// Errors -------------------------------------------------------------------------------------------

function showError(message, detail = "") {
  $("error-message").textContent = message;
  $("error-detail").textContent = detail;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-message").textContent = "";
  $("error-detail").textContent = "";
}

// The server's error shape is {"error": {"code", "message", "request_id"}}; anything else (a proxy's
// HTML page, say) is reported with its status.
async function errorOf(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch (_) {
    error = null;
  }
  if (error && error.message) return error;
  return { code: `http_${response.status}`, message: `the server answered ${response.status} ${response.statusText}` };
}

// The API key, when the server has keys: sent to this server only, kept for this tab.
function authorization() {
  const key = $("api-key").value.trim();
  return key ? { authorization: `Bearer ${key}` } : {};
}

async function getJSON(path) {
  let response;
  try {
    response = await fetch(path, { headers: { accept: "application/json", ...authorization() } });
  } catch (exc) {
    throw new Error(`could not reach the server for ${path}: ${exc.message}`);
  }
  if (!response.ok) throw new Error(`${path}: ${(await errorOf(response)).message}`);
  return response.json();
}

// What the server offers -----------------------------------------------------------------------------

async function loadChoices() {
  const [methods, labelSets, models] = await Promise.allSettled([
    getJSON("/v1/methods"),
    getJSON("/v1/label-sets"),
    getJSON("/v1/models"),
  ]);
  const problems = [];
  if (methods.status === "fulfilled") fillMethods(methods.value);
  else problems.push(methods.reason.message);
  if (labelSets.status === "fulfilled") fillLabelSets(labelSets.value);
  else problems.push(labelSets.reason.message);
  if (models.status === "fulfilled" && models.value.models.length) {
    const model = models.value.models[0];
    $("model").textContent = `Model: ${model.id}${model.ready === false ? " (loading)" : ""}.`;
  }
  if (problems.length) showError("The page could not load what the server offers.", problems.join(" "));
}

function fillMethods(info) {
  const select = $("method");
  select.replaceChildren();
  for (const method of info.methods) {
    state.methods.set(method.name, method);
    select.append(el("option", { value: method.name, text: method.name }));
    state.limits = method.limits;
  }
  select.value = state.methods.has(info.default) ? info.default : "zero_shot";
  if (state.limits) $("max-images").textContent = `, up to ${state.limits.max_images_per_request}`;
  describeMethod();
}

function describeMethod() {
  const method = state.methods.get($("method").value);
  if (!method) return;
  $("method-summary").textContent = method.summary;
  const props = (method.options_schema && method.options_schema.properties) || {};
  const defaults = Object.entries(props).map(([name, schema]) => `${name} ${JSON.stringify(schema.default)}`);
  const options = $("options");
  options.disabled = defaults.length === 0;
  options.placeholder = defaults.length ? '{"views": 16}' : "";
  $("options-hint").textContent = defaults.length
    ? `Defaults: ${defaults.join(", ")}. Fewer views answer faster.`
    : "This method takes no options.";
}

function fillLabelSets(info) {
  const select = $("label-set");
  for (const set of info.label_sets) {
    state.labelSets.set(set.name, set.labels);
    const origin = set.source === "model" ? ", shipped with the model" : "";
    select.append(el("option", { value: set.name, text: `${set.name} (${set.labels.length} labels${origin})` }));
  }
}

// Choosing images ---------------------------------------------------------------------------------------

function setFiles(files) {
  for (const item of $("chosen").querySelectorAll("img")) URL.revokeObjectURL(item.src);
  state.files = Array.from(files);
  const list = $("chosen");
  list.replaceChildren();
  for (const file of state.files) {
    const item = el("li");
    if (file.type.startsWith("image/")) item.append(el("img", { src: URL.createObjectURL(file), alt: "" }));
    item.append(el("span", { text: file.name }));
    list.append(item);
  }
}

function wireDrop() {
  const zone = $("drop");
  const input = $("images");
  input.addEventListener("change", () => setFiles(input.files));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (!event.dataTransfer || !event.dataTransfer.files.length) return;
    input.files = event.dataTransfer.files; // keep the input, and what it announces, in step with the drop
    setFiles(event.dataTransfer.files);
  });
}

// Sending ------------------------------------------------------------------------------------------------

function typedLabels() {
  return $("labels")
    .value.split(",")
    .map((label) => label.trim())
    .filter((label) => label.length > 0);
}

// The request's form, or a message saying what is missing. top_k asks for every label, so each bar row
// has both its zero-shot and its adapted probability.
function buildForm() {
  if (!state.files.length) return "Choose at least one image.";
  const form = new FormData();
  for (const file of state.files) form.append("image", file, file.name);
  const labelSet = $("label-set").value;
  let count;
  if (labelSet) {
    form.append("label_set", labelSet);
    count = state.labelSets.get(labelSet).length;
  } else {
    const labels = typedLabels();
    if (!labels.length) return "Type some labels, separated by commas, or choose a label set.";
    form.append("labels", JSON.stringify(labels));
    count = labels.length;
  }
  const maxTopK = state.limits ? state.limits.max_top_k : count;
  form.append("top_k", String(Math.max(1, Math.min(count, maxTopK))));
  const method = $("method").value;
  form.append("method", method);
  if (method !== "zero_shot") form.append("compare", "true");
  const options = $("options").value.trim();
  if (options && !$("options").disabled) form.append("options", options); // the server checks the JSON
  const seed = $("seed").value.trim();
  if (seed) form.append("seed", seed);
  return form;
}

async function classify(event) {
  event.preventDefault();
  clearError();
  const form = buildForm();
  if (typeof form === "string") {
    showError(form);
    return;
  }
  const files = state.files.slice();
  const button = $("submit");
  button.disabled = true;
  $("status").textContent = `Classifying ${files.length} image${files.length === 1 ? "" : "s"}…`;
  let response;
  try {
    // No X-Request-ID: the server assigns one and sends it back in the response's header.
    response = await fetch("/v1/classify", { method: "POST", body: form, headers: authorization() });
  } catch (exc) {
    $("status").textContent = "";
    $("results").hidden = true; // what is shown must be the answer to this request, or nothing
    showError("Could not reach the server.", exc.message);
    return;
  } finally {
    button.disabled = false;
  }
  const requestId = response.headers.get("x-request-id") || "";
  if (!response.ok) {
    const error = await errorOf(response);
    $("status").textContent = "";
    $("results").hidden = true;
    const which = /\bimage (\d+)\b/.exec(error.message);
    const named = which && files[Number(which[1])] ? ` (image ${which[1]} is “${files[Number(which[1])].name}”)` : "";
    const detail = [`${response.status} ${error.code}`, requestId && `request ${requestId}`].filter(Boolean);
    showError(`${error.message}${named}`, detail.join(" · "));
    return;
  }
  const body = await response.json();
  $("status").textContent = `Done in ${fixed(body.timings.total, 2)} s.`;
  state.last = { body, files, requestId };
  render();
}

// Drawing the answer --------------------------------------------------------------------------------------

function render() {
  const { body, files, requestId } = state.last;
  const scale = document.querySelector('input[name="scale"]:checked').value;
  const compared = body.results.some((result) => result.zero_shot);
  const legend = $("legend");
  legend.replaceChildren();
  if (compared || body.method === "zero_shot") legend.append(el("span", { class: "key zero-shot", text: "zero-shot" }));
  if (body.method !== "zero_shot") legend.append(" ", el("span", { class: "key adapted", text: body.method }));
  for (const url of state.thumbs) URL.revokeObjectURL(url);
  state.thumbs = [];
  const cards = $("cards");
  cards.replaceChildren(...body.results.map((result, i) => card(result, files[i], body.method, scale)));
  $("request-id").textContent = requestId ? `Request id: ${requestId}` : "";
  $("results").hidden = false;
}

function card(result, file, method, scale) {
  const top = result.predictions[0];
  const article = el("article", { class: "card" });
  const head = el("div", { class: "card-head" });
  if (file && file.type.startsWith("image/")) {
    const url = URL.createObjectURL(file);
    state.thumbs.push(url);
    head.append(el("img", { class: "thumb", src: url, alt: file.name }));
  }
  const summary = el("div");
  summary.append(el("p", { class: "file small", text: file ? file.name : "" }));
  summary.append(
    el("p", { class: "prediction" }, result.abstained ? el("em", { text: "no label (abstained)" }) : result.label),
  );
  const rawOfLabel = top ? top.raw_probability : null;
  const facts = el(
    "dl",
    { class: "facts" },
    el("dt", { text: "Confidence (calibrated)" }),
    el("dd", { class: "confidence", text: percent(result.confidence) }),
    el("dt", { text: "Raw probability" }),
    el("dd", { class: "raw", text: rawOfLabel === null ? "n/a" : percent(rawOfLabel) }),
    el("dt", { text: "None of these" }),
    el("dd", { class: "none-of-these", text: percent(result.none_of_these) }),
    el("dt", { text: "Entropy" }),
    el("dd", { text: `${fixed(result.entropy)} nats` }),
  );
  summary.append(facts);
  head.append(summary);
  article.append(head, bars(result, method, scale), report(result.adaptation));
  return article;
}

// One row per label, in the answer's ranking: its zero-shot bar (with compare) above its adapted bar. A
// zero-shot answer has one bar per label, drawn as zero-shot.
function bars(result, method, scale) {
  const zeroShot = new Map();
  if (result.zero_shot) for (const p of result.zero_shot.predictions) zeroShot.set(p.label, p);
  const table = el("div", { class: "bars", role: "list", "aria-label": "Probabilities per label" });
  for (const p of result.predictions) {
    const row = el("div", { class: "bar-row", role: "listitem" });
    row.append(el("span", { class: "bar-label", text: p.label }));
    const series = el("div", { class: "bar-series" });
    if (result.zero_shot) series.append(bar(zeroShot.get(p.label), "zero-shot", "zero-shot", scale));
    series.append(bar(p, method === "zero_shot" ? "zero-shot" : "adapted", method, scale));
    row.append(series);
    table.append(row);
  }
  return table;
}

function bar(prediction, kind, name, scale) {
  const value = prediction ? prediction[scale] : 0;
  const line = el("div", { class: `bar ${kind}`, "data-series": kind });
  const track = el("div", { class: "track" });
  const fill = el("div", { class: "fill" });
  fill.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
  track.append(fill);
  const text = prediction ? percent(value) : "not in top_k";
  line.append(track, el("span", { class: "bar-value", text }));
  line.setAttribute("role", "img");
  line.setAttribute("aria-label", `${name}: ${text}`);
  return line;
}

function report(a) {
  const section = el("details", { class: "report", open: true });
  section.append(el("summary", { text: "Adaptation report" }));
  // [what a person reads, the field's name in the page (tests find it by it), the value]
  const rows = [
    ["Method", "method", a.method],
    ["Views kept", "views", `${a.selected_views} of ${a.views}`],
    ["Steps", "steps", String(a.steps)],
    ["Entropy before → after", "entropy", `${fixed(a.entropy_before)} → ${fixed(a.entropy_after)} nats`],
    ["Seconds", "seconds", fixed(a.seconds)],
    ["Changed", "changed", a.changed ? `yes (zero-shot said “${a.zero_shot_label}”)` : "no"],
    ["Skipped", "skipped", a.skipped ? `yes: ${a.skipped} (answered zero-shot)` : "no"],
  ];
  if (a.agreement !== null && a.agreement !== undefined) rows.push(["Agreement", "agreement", percent(a.agreement)]);
  if (a.seed !== null && a.seed !== undefined) rows.push(["Seed", "seed", String(a.seed)]);
  const list = el("dl", { class: "facts" });
  for (const [name, key, value] of rows) {
    list.append(el("dt", { text: name }), el("dd", { "data-field": key, text: value }));
  }
  section.append(list);
  return section;
}

// Start ---------------------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  wireDrop();
  $("method").addEventListener("change", describeMethod);
  $("label-set").addEventListener("change", () => {
    $("labels").disabled = $("label-set").value !== "";
  });
  for (const radio of document.querySelectorAll('input[name="scale"]')) {
    radio.addEventListener("change", () => state.last && render());
  }
  $("classify").addEventListener("submit", classify);
  $("api-key").value = sessionStorage.getItem("tta-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("tta-api-key", $("api-key").value.trim());
    $("error").hidden = true;
    loadChoices(); // what a key may see: its own label sets
  });
  loadChoices().then(() => document.body.setAttribute("data-ready", "true"));
});
