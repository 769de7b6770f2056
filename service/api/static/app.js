// The dashboard: jobs table, new-job form, a job's live chart, a drawing pad for predictions.
// Plain ES module, no build step. Every request to the API goes through api(); the event
// stream through eventsUrl(): the one place each adds the API key kept for this tab (both in
// common.js, shared with a sweep's page, sweep.js).

import {
  $, ApiError, KEY_STORAGE, TERMINAL, age, api, apiKey, badge, el, eventsUrl, idCode, percent,
  shortId, showBanner,
} from "./common.js";
import { cancelSweep, leaveSweep, refreshSweeps, showSweep } from "./sweep.js";

const JOBS_REFRESH_MS = 2000;
const PAD_LINE_PX = 20; // stroke width on the 280 px pad: about MNIST's pen at 28 px
const MNIST_BOX_PX = 20; // MNIST centres each digit's 20×20 box by mass in 28×28
const JSON_NUMBER = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?$/;

// --- small helpers ----------------------------------------------------------------------

function progressOf(job) {
  return job.total_steps ? job.step / job.total_steps : 0;
}

// --- the new-job form, built from the API's own schema ------------------------------------

let formFields = [];

function bounds(schema) {
  const parts = [];
  const low = schema.minimum ?? schema.exclusiveMinimum;
  if (low !== undefined) parts.push(`${schema.exclusiveMinimum !== undefined ? ">" : "≥"} ${low}`);
  if (schema.maximum !== undefined && schema.maximum < 1e15) parts.push(`≤ ${schema.maximum}`);
  return parts.join(", ");
}

// "max_runtime_s" → "max runtime (s)": the API's own field names, readable.
function fieldLabel(name) {
  return name.replace(/_s$/, " (s)").replaceAll("_", " ");
}

async function buildForm() {
  const spec = await api("/openapi.json");
  const schema = spec.components.schemas.JobCreate;
  const container = $("job-fields");
  container.replaceChildren();
  formFields = [];
  for (const [name, prop] of Object.entries(schema.properties)) {
    const variant = (prop.anyOf || [prop]).find((s) => s.type && s.type !== "null") || prop;
    const nullable = Boolean(prop.anyOf);
    const input = el("input", {
      id: `field-${name}`,
      name,
      type: "text",
      inputMode: variant.type === "integer" ? "numeric" : "decimal",
      placeholder: prop.default !== undefined && prop.default !== null ? String(prop.default) : "none",
      autocomplete: "off",
    });
    const error = el("div", { class: "field-error", id: `error-${name}` });
    const hint = [variant.type === "integer" ? "integer" : "number", bounds(variant)]
      .filter(Boolean)
      .join(" ");
    container.append(
      el(
        "div",
        { class: "field", dataset: { field: name } },
        el("label", { htmlFor: input.id, textContent: fieldLabel(name) }),
        input,
        el("div", { class: "hint", textContent: `${hint}${nullable ? " or empty" : ""} · ${prop.description || ""}` }),
        error,
      ),
    );
    formFields.push(name);
  }
}

// The JSON body exactly as typed: numbers as numbers, anything else as a string, so the
// API's validation (not the browser's) decides and its message names the problem.
function formBody() {
  const members = [];
  for (const name of formFields) {
    const raw = $(`field-${name}`).value.trim();
    if (raw === "") continue;
    const token = JSON_NUMBER.test(raw) ? raw : JSON.stringify(raw);
    members.push(`${JSON.stringify(name)}:${token}`);
  }
  return `{${members.join(",")}}`;
}

function clearFormErrors() {
  $("form-error").textContent = "";
  for (const name of formFields) {
    $(`error-${name}`).textContent = "";
    $(`field-${name}`).closest(".field").classList.remove("invalid");
  }
}

function showFormErrors(err) {
  const unplaced = [];
  for (const detail of err.details) {
    const name = detail.loc && detail.loc[0] === "body" ? detail.loc[1] : null;
    if (name && formFields.includes(name)) {
      $(`error-${name}`).textContent = detail.msg;
      $(`field-${name}`).closest(".field").classList.add("invalid");
    } else {
      unplaced.push(detail.msg);
    }
  }
  $("form-error").textContent = err.details.length && !unplaced.length ? "" : err.message;
}

async function submitJob(event) {
  event.preventDefault();
  clearFormErrors();
  const button = $("submit-job");
  button.disabled = true;
  try {
    const job = await api("/jobs", { method: "POST", json: formBody() });
    location.hash = `#/jobs/${job.id}`;
  } catch (err) {
    if (err instanceof ApiError) showFormErrors(err);
    else throw err;
  } finally {
    button.disabled = false;
  }
}

// --- the jobs table -----------------------------------------------------------------------

let jobsTimer = null;

function jobRow(job) {
  const fraction = progressOf(job);
  const p = job.params;
  return el(
    "tr",
    { dataset: { job: job.id, status: job.status } },
    el("td", {}, el("a", { href: `#/jobs/${job.id}` }, idCode(job.id))),
    el("td", {}, badge(job.status)),
    el(
      "td",
      { class: "num" },
      el("span", { class: "mini" }, el("div", { style: `width:${(100 * fraction).toFixed(1)}%` })),
      `epoch ${job.epoch}/${p.epochs}`,
    ),
    el("td", { class: "num", textContent: percent(job.accuracy, 2) }),
    el("td", { textContent: job.device || "–" }),
    el("td", { class: "muted", textContent: `${p.trainset_size} imgs, batch ${p.batch_size}, lr ${p.learning_rate}` }),
    el("td", { class: "muted", textContent: age(job.created_at) }),
  );
}

async function refreshJobs() {
  refreshSweeps();
  try {
    const page = await api("/jobs?limit=20");
    $("jobs-body").replaceChildren(...page.jobs.map(jobRow));
    $("jobs-empty").hidden = page.jobs.length > 0;
    $("jobs-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    const succeeded = page.jobs.filter((j) => j.status === "succeeded").map((j) => j.id);
    if (succeeded.some((id) => !knownModels.has(id))) refreshModels();
  } catch (err) {
    $("jobs-updated").textContent = `not updated: ${err.message}`;
  }
}

function startJobsPolling() {
  stopJobsPolling();
  refreshJobs();
  jobsTimer = setInterval(() => {
    if (!document.hidden) refreshJobs();
  }, JOBS_REFRESH_MS);
}

function stopJobsPolling() {
  if (jobsTimer !== null) clearInterval(jobsTimer);
  jobsTimer = null;
}

// --- a job's page: header, live chart, cancel -----------------------------------------------

let stream = null;
let currentJob = null;

function chartLayout() {
  return {
    margin: { l: 60, r: 60, t: 20, b: 50 },
    xaxis: { title: { text: "training images seen" }, rangemode: "tozero" },
    yaxis: { title: { text: "cross-entropy loss" }, rangemode: "tozero" },
    yaxis2: {
      title: { text: "test accuracy" }, overlaying: "y", side: "right", range: [0.1, 1.0],
      tick0: 0.1, dtick: 0.1, tickformat: ".0%", showgrid: false,
    },
    legend: { orientation: "h", x: 0, y: 1.08 },
    showlegend: true,
    uirevision: "keep", // keep the user's zoom while points stream in
  };
}

function newChart() {
  const traces = [
    { x: [], y: [], name: "loss per step", mode: "lines", line: { width: 1, color: "#2563eb" } },
    {
      x: [], y: [], name: "test accuracy", yaxis: "y2", mode: "lines+markers",
      line: { color: "#ea580c" }, marker: { size: 8 },
    },
  ];
  Plotly.newPlot("chart", traces, chartLayout(), { responsive: true, displaylogo: false });
}

function renderJob(job) {
  currentJob = job;
  $("job-id").textContent = job.id;
  $("job-status").replaceWith(Object.assign(badge(job.status), { id: "job-status" }));
  $("cancel-job").disabled = TERMINAL.has(job.status);
  $("job-error").textContent = job.error ? `error: ${job.error}` : "";
  const p = job.params;
  const items = [
    ["epoch", `${job.epoch} / ${p.epochs}`],
    ["step", `${job.step} / ${job.total_steps}`],
    ["test accuracy", percent(job.accuracy, 2)],
    ["device", job.device || "–"],
    ["attempt", `${job.attempt} of ${job.max_attempts}`],
    ["images", `${p.trainset_size} train, ${p.testset_size} test`],
    ["batch size", p.batch_size],
    ["learning rate", p.learning_rate],
    ["seed", p.seed ?? "random"],
    ["created", new Date(job.created_at).toLocaleString()],
  ];
  if (job.sweep_id) {
    items.push(["sweep", el("a", { id: "job-sweep", href: `#/sweeps/${job.sweep_id}` }, idCode(job.sweep_id))]);
  }
  $("job-meta").replaceChildren(
    ...items.map(([k, v]) => el("div", {}, el("dt", { textContent: k }), el("dd", {}, v instanceof Node ? v : String(v)))),
  );
  setProgress(job.step, job.total_steps);
  renderDownloads(job);
}

// The job's metrics as CSV, and once it has succeeded its weights (a PyTorch state_dict).
function renderDownloads(job) {
  const links = [el("a", { id: "job-csv", href: `/jobs/${job.id}/metrics.csv`, textContent: "metrics (CSV)" })];
  if (job.status === "succeeded") {
    links.push(el("a", { id: "job-checkpoint", href: `/models/${job.id}/checkpoint`, textContent: "checkpoint (.pt)" }));
  }
  for (const link of links) link.addEventListener("click", download);
  $("job-downloads").replaceChildren(...links);
}

// A link downloads by itself, but cannot send the API key: with a key, fetch it with the
// header and hand the browser the bytes.
async function download(event) {
  const key = apiKey();
  if (!key) return;
  event.preventDefault();
  const link = event.currentTarget;
  try {
    const response = await api(link.pathname, { raw: true });
    const name = (response.headers.get("content-disposition") || "").match(/filename="?([^";]+)/);
    const url = URL.createObjectURL(await response.blob());
    el("a", { href: url, download: name ? name[1] : "" }).click();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (err) {
    $("job-error").textContent = `download failed: ${err.message}`;
  }
}

function setProgress(step, total) {
  $("job-progress-bar").style.width = `${total ? (100 * step) / total : 0}%`;
}

function closeStream() {
  if (stream) stream.close();
  stream = null;
}

function followJob(jobId) {
  closeStream();
  let attempt = null;
  const source = new EventSource(eventsUrl(`/jobs/${jobId}/events`));
  stream = source;
  $("job-live").textContent = "connecting…";
  source.addEventListener("open", () => { $("job-live").textContent = "live"; });
  source.addEventListener("status", (event) => {
    const job = JSON.parse(event.data);
    if (attempt !== null && job.attempt !== attempt) newChart(); // a retry starts over
    attempt = job.attempt;
    renderJob(job);
    if (job.final) {
      source.close();
      $("job-live").textContent = "";
    }
  });
  source.addEventListener("step", (event) => {
    const { steps } = JSON.parse(event.data);
    Plotly.extendTraces("chart", { x: [steps.map((s) => s.examples_seen)], y: [steps.map((s) => s.loss)] }, [0]);
    if (currentJob) renderJob({ ...currentJob, step: steps[steps.length - 1].step });
  });
  source.addEventListener("epoch", (event) => {
    const epoch = JSON.parse(event.data);
    Plotly.extendTraces("chart", { x: [[epoch.examples_seen]], y: [[epoch.accuracy]] }, [1]);
    if (currentJob) renderJob({ ...currentJob, epoch: epoch.epoch, accuracy: epoch.accuracy });
  });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself, sending Last-Event-ID: nothing is lost or repeated.
    // A refusal (503 while the server has as many streams open as it serves) closes it for good.
    $("job-live").textContent =
      source.readyState === EventSource.CLOSED ? "not live: open the job again to retry" : "reconnecting…";
  });
}

async function showJob(jobId) {
  $("job-error").textContent = "";
  $("job-id").textContent = jobId;
  $("job-meta").replaceChildren();
  $("job-downloads").replaceChildren();
  newChart();
  try {
    renderJob(await api(`/jobs/${jobId}`));
  } catch (err) {
    $("job-error").textContent = err.message;
    return;
  }
  followJob(jobId);
}

async function cancelJob() {
  if (!currentJob) return;
  $("cancel-job").disabled = true;
  try {
    renderJob(await api(`/jobs/${currentJob.id}/cancel`, { method: "POST" }));
  } catch (err) {
    $("job-error").textContent = err.message;
  }
}

// --- drawing and predicting ---------------------------------------------------------------

const knownModels = new Set();

// What answers a request that names no model: the API's rule (README, Predict) is the
// "production" alias when it is set, else the most recently finished succeeded job.
const DEFAULT_ALIAS = "production";

function defaultModelOption(aliases) {
  const production = aliases.find((a) => a.name === DEFAULT_ALIAS);
  if (!production) return el("option", { value: "", textContent: "latest succeeded job" });
  const label = `${DEFAULT_ALIAS} → ${shortId(production.job_id)}`;
  return el("option", { value: "", textContent: label, title: production.job_id });
}

async function refreshModels() {
  try {
    const [page, aliases] = await Promise.all([
      api("/jobs?status=succeeded&limit=50"),
      api("/models/aliases"),
    ]);
    const select = $("model-select");
    const chosen = select.value;
    const options = [defaultModelOption(aliases.aliases)];
    for (const job of page.jobs) {
      knownModels.add(job.id);
      const label = `${shortId(job.id)} · ${percent(job.accuracy, 1)} · ${job.params.epochs} epochs`;
      options.push(el("option", { value: job.id, textContent: label, title: job.id }));
    }
    select.replaceChildren(...options);
    select.value = page.jobs.some((j) => j.id === chosen) ? chosen : "";
  } catch {
    // The select keeps its "latest" entry; predict still works.
  }
}

function setupPad() {
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  const clear = () => {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
  };
  clear();
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineWidth = PAD_LINE_PX;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  let drawing = false;
  let last = null;
  const point = (event) => {
    const rect = pad.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * pad.width) / rect.width,
      y: ((event.clientY - rect.top) * pad.height) / rect.height,
    };
  };
  pad.addEventListener("pointerdown", (event) => {
    drawing = true;
    pad.setPointerCapture(event.pointerId);
    last = point(event);
    ctx.beginPath();
    ctx.arc(last.x, last.y, PAD_LINE_PX / 2, 0, 2 * Math.PI);
    ctx.fill();
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const p = point(event);
    ctx.beginPath();
    ctx.moveTo(last.x, last.y);
    ctx.lineTo(p.x, p.y);
    ctx.stroke();
    last = p;
  });
  const end = () => {
    if (!drawing) return;
    drawing = false;
    predict();
  };
  pad.addEventListener("pointerup", end);
  pad.addEventListener("pointercancel", end);
  $("clear-pad").addEventListener("click", () => {
    clear();
    ctx.fillStyle = "#fff";
    $("digit").textContent = "–";
    $("bars").replaceChildren();
    $("predict-error").textContent = "";
    $("predict-model").textContent = "";
    const preview = $("preview").getContext("2d");
    preview.fillStyle = "#000";
    preview.fillRect(0, 0, 28, 28);
  });
  $("predict").addEventListener("click", predict);
}

// What MNIST's images look like: the ink's bounding box scaled into 20×20, placed in 28×28
// so that its centre of mass sits in the middle.
function mnistImage(pad) {
  const { width, height } = pad;
  const pixels = pad.getContext("2d").getImageData(0, 0, width, height).data;
  let minX = width, minY = height, maxX = -1, maxY = -1, mass = 0, sumX = 0, sumY = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const v = pixels[(y * width + x) * 4];
      if (v < 16) continue;
      minX = Math.min(minX, x); maxX = Math.max(maxX, x);
      minY = Math.min(minY, y); maxY = Math.max(maxY, y);
      mass += v; sumX += v * x; sumY += v * y;
    }
  }
  if (maxX < 0) return null;
  const boxW = maxX - minX + 1, boxH = maxY - minY + 1;
  const scale = MNIST_BOX_PX / Math.max(boxW, boxH);
  const cx = (sumX / mass - minX) * scale, cy = (sumY / mass - minY) * scale;
  const out = $("preview");
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, 28, 28);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(pad, minX, minY, boxW, boxH, 14 - cx, 14 - cy, boxW * scale, boxH * scale);
  return out;
}

function showPrediction(answer) {
  $("digit").textContent = String(answer.digit);
  const bars = answer.probabilities.map((p, digit) =>
    el(
      "li",
      { class: digit === answer.digit ? "top" : "", dataset: { digit: String(digit), p: String(p) } },
      el("span", { textContent: String(digit) }),
      el("span", { class: "track" }, el("span", { class: "fill", style: `display:block;width:${(100 * p).toFixed(1)}%` })),
      el("span", { class: "value", textContent: percent(p, 1) }),
    ),
  );
  $("bars").replaceChildren(...bars);
  $("predict-model").replaceChildren("model: job ", idCode(answer.job_id));
}

let predicting = null;

async function predict() {
  $("predict-error").textContent = "";
  const image = mnistImage($("pad"));
  if (!image) {
    $("predict-error").textContent = "Draw a digit first.";
    return;
  }
  const blob = await new Promise((resolve) => image.toBlob(resolve, "image/png"));
  const form = new FormData();
  form.append("file", blob, "digit.png");
  const model = $("model-select").value;
  const path = model ? `/predict?job_id=${encodeURIComponent(model)}` : "/predict";
  const request = api(path, { method: "POST", body: form });
  predicting = request;
  try {
    const answer = await request;
    if (predicting === request) showPrediction(answer);
  } catch (err) {
    if (predicting === request) $("predict-error").textContent = err.message;
  }
}

// --- the API key ----------------------------------------------------------------------------

function setupKey() {
  const summary = $("key-summary");
  const show = () => { summary.textContent = apiKey() ? "API key ✓" : "API key"; };
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    $("key-input").value = "";
    showBanner("");
    show();
    route();
  });
  $("key-clear").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    show();
  });
  show();
}

// --- views ----------------------------------------------------------------------------------

function route() {
  const job = location.hash.match(/^#\/jobs\/([0-9a-f]{32})$/);
  const sweep = location.hash.match(/^#\/sweeps\/([0-9a-f]{32})$/);
  closeStream();
  leaveSweep();
  $("view-job").hidden = !job;
  $("view-sweep").hidden = !sweep;
  $("view-home").hidden = Boolean(job || sweep);
  if (job || sweep) stopJobsPolling();
  if (job) {
    showJob(job[1]);
  } else if (sweep) {
    currentJob = null;
    showSweep(sweep[1]);
  } else {
    currentJob = null;
    if (!formFields.length) buildForm().catch((err) => { $("form-error").textContent = err.message; });
    refreshModels();
    startJobsPolling();
  }
}

function start() {
  setupKey();
  setupPad();
  $("job-form").addEventListener("submit", submitJob);
  $("cancel-job").addEventListener("click", cancelJob);
  $("cancel-sweep").addEventListener("click", cancelSweep);
  window.addEventListener("hashchange", route);
  route();
}

// plotly.js is a classic deferred script: it has run before this module (also deferred).
start();
