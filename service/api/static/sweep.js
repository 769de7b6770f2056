// Sweeps: the list on the home view, and a sweep's page — every trial's loss curve overlaid,
// each trial's test accuracy per epoch, the trials ranked by accuracy, and a parallel-coordinates
// plot of the swept parameters against accuracy, all live while the sweep runs.
//
// Live by polling, not by the job page's event stream. A sweep has up to MNIST_MAX_SWEEP_TRIALS
// (256) trials, and an EventSource per trial would hold an HTTP/1.1 connection each: a browser
// opens six per host, so a seventh stream, and every other request of the page, would wait (and
// the server answers 503 past its own cap on open streams). Instead, each round reads
// GET /sweeps/{id} once (every trial's status and latest accuracy), then the new steps of the
// unfinished trials from GET /jobs/{id}/metrics?after_step= — the polls' fast lane, made for
// live charts — with each trial's after_step moving forward, so a step is read once. A round
// reads at most METRICS_PER_ROUND trials, those read least recently first, METRICS_AT_ONCE at a
// time: with many trials running each is read less often, and the server never more.

import { $, TERMINAL, age, api, badge, el, idCode, percent, shortId } from "./common.js";

const SWEEP_REFRESH_MS = 2000;
const METRICS_PER_ROUND = 24;
const METRICS_AT_ONCE = 4; // of the browser's six connections to this host: two stay free
const STEPS_PAGE = 5000;
const LEGEND_MAX_TRIALS = 16; // past this, the legend would hide the chart: hover names a trace
const LOG_AXIS_SPAN = 10; // parameters spanning this factor or more get a log axis
const MAX_TICKS = 8;

// --- the sweeps list (home view) ------------------------------------------------------------

let sweepsMissing = false; // an API without sweeps: the card stays hidden, nobody asks again

// The swept parameters: the grid's keys, or the random search's space.
function sweptNames(sweep) {
  if (sweep.grid) return Object.keys(sweep.grid);
  if (sweep.random && sweep.random.space) return Object.keys(sweep.random.space);
  return [];
}

function searchText(sweep) {
  const names = sweptNames(sweep).map(paramLabel).join(" × ");
  if (sweep.grid) return `grid: ${names}`;
  if (sweep.random) return `random, ${sweep.random.trials} trials: ${names}`;
  return names;
}

function finishedCount(trials) {
  return trials.filter((t) => TERMINAL.has(t.status)).length;
}

// A listed sweep counts its trials by status (the list does not carry the trials themselves).
function trialsDone(sweep) {
  const counts = Object.entries(sweep.trials_by_status || {});
  const done = counts.filter(([status]) => TERMINAL.has(status)).reduce((sum, [, n]) => sum + n, 0);
  return `${done}/${counts.reduce((sum, [, n]) => sum + n, 0)}`;
}

function sweepRow(sweep) {
  return el(
    "tr",
    { dataset: { sweep: sweep.id, status: sweep.status } },
    el("td", {}, el("a", { href: `#/sweeps/${sweep.id}` }, idCode(sweep.id))),
    el("td", {}, badge(sweep.status)),
    el("td", { class: "num", textContent: trialsDone(sweep) }),
    el("td", { class: "num", textContent: percent(sweep.best ? sweep.best.accuracy : null, 2) }),
    el("td", { class: "muted", textContent: searchText(sweep) }),
    el("td", { class: "muted", textContent: age(sweep.created_at) }),
  );
}

export async function refreshSweeps() {
  if (sweepsMissing) return;
  try {
    const page = await api("/sweeps?limit=10");
    $("sweeps-body").replaceChildren(...page.sweeps.map(sweepRow));
    $("sweeps-empty").hidden = page.sweeps.length > 0;
    $("sweeps-card").hidden = false;
  } catch (err) {
    if (err.status === 404 || err.status === 405) sweepsMissing = true;
  }
}

// --- a sweep's page --------------------------------------------------------------------------

let view = null; // the sweep shown: its id, its trials' state by job id, the round's timer

export function leaveSweep() {
  if (view && view.timer !== null) clearTimeout(view.timer);
  view = null;
}

export function showSweep(sweepId) {
  leaveSweep();
  view = { id: sweepId, sweep: null, trials: new Map(), round: 0, timer: null, plotted: "", stopped: false };
  $("sweep-id").textContent = sweepId;
  $("sweep-error").textContent = "";
  $("sweep-meta").replaceChildren();
  $("sweep-body").replaceChildren();
  $("sweep-live").textContent = "loading…";
  $("sweep-progress-bar").style.width = "0%";
  for (const chart of ["sweep-loss", "sweep-accuracy", "sweep-parcoords"]) Plotly.purge(chart);
  newCharts();
  poll(view);
}

function newCharts() {
  const common = {
    margin: { l: 60, r: 20, t: 20, b: 50 }, uirevision: "keep", hovermode: "closest",
    legend: { orientation: "h", x: 0, y: -0.3, yanchor: "top" },
  };
  const config = { responsive: true, displaylogo: false };
  Plotly.newPlot("sweep-loss", [], {
    ...common,
    xaxis: { title: { text: "training images seen" }, rangemode: "tozero" },
    yaxis: { title: { text: "cross-entropy loss" }, rangemode: "tozero" },
  }, config);
  Plotly.newPlot("sweep-accuracy", [], {
    ...common,
    xaxis: { title: { text: "epoch" }, dtick: 1, autorangeoptions: { minallowed: 0 } },
    yaxis: { title: { text: "test accuracy" }, tickformat: ".0%", autorangeoptions: { minallowed: 0, maxallowed: 1 } },
  }, config);
}

async function poll(current) {
  if (view !== current) return;
  if (!document.hidden) await pollOnce(current);
  if (view !== current) return;
  const ended = current.sweep && TERMINAL.has(current.sweep.status);
  if (current.stopped || (ended && [...current.trials.values()].every((t) => t.done))) {
    $("sweep-live").textContent = "";
    return;
  }
  current.timer = setTimeout(() => poll(current), SWEEP_REFRESH_MS);
}

async function pollOnce(current) {
  let sweep;
  try {
    sweep = await api(`/sweeps/${current.id}`);
  } catch (err) {
    if (view !== current) return;
    if (err.status === 404) {
      $("sweep-error").textContent = err.message;
      current.stopped = true; // nothing to follow
    } else {
      $("sweep-live").textContent = `not updated: ${err.message}`;
    }
    return;
  }
  if (view !== current) return;
  current.sweep = sweep;
  current.round += 1;
  addTrials(current, sweep);
  renderHeader(sweep);
  await readMetrics(current);
  if (view !== current) return;
  renderAccuracy(current);
  renderTable(current);
  renderParcoords(current);
  $("sweep-live").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
}

// New trials get a trace in both charts, in the sweep's order: a trial has the same colour in both.
function addTrials(current, sweep) {
  const swept = sweptNames(sweep);
  const added = [];
  for (const trial of sweep.trials) {
    const known = current.trials.get(trial.job_id);
    if (known) {
      Object.assign(known, { status: trial.status, epoch: trial.epoch, accuracy: trial.accuracy });
      continue;
    }
    const name = [shortId(trial.job_id), swept.map((n) => `${paramLabel(n)} ${paramValue(trial.params[n])}`).join(", ")].join(" ");
    const state = {
      ...trial, index: current.trials.size, name, afterStep: 0, epochs: [], done: false, readIn: 0,
    };
    current.trials.set(trial.job_id, state);
    added.push(state);
  }
  if (!added.length) return;
  const showlegend = current.trials.size <= LEGEND_MAX_TRIALS;
  const line = (t, extra) => ({ x: [], y: [], name: t.name, legendgroup: t.job_id, ...extra });
  Plotly.addTraces("sweep-loss", added.map((t) => line(t, { mode: "lines", line: { width: 1 } })));
  Plotly.addTraces("sweep-accuracy", added.map((t) => line(t, { mode: "lines+markers" })));
  Plotly.relayout("sweep-loss", { showlegend });
  Plotly.relayout("sweep-accuracy", { showlegend });
}

// The new steps of the unfinished trials that have started, least recently read first.
async function readMetrics(current) {
  const due = [...current.trials.values()]
    .filter((t) => !t.done && t.status !== "queued")
    .sort((a, b) => a.readIn - b.readIn || a.index - b.index)
    .slice(0, METRICS_PER_ROUND);
  const fresh = new Map(); // trace index → new steps
  const restarted = []; // trace indices of trials retried since drawn: their curves start over
  let next = 0;
  const reader = async () => {
    while (next < due.length) {
      const trial = due[next++];
      const { steps, restart } = await readTrial(trial);
      if (restart) restarted.push(trial.index);
      if (steps.length) fresh.set(trial.index, steps);
      trial.readIn = current.round;
    }
  };
  await Promise.all(Array.from({ length: Math.min(METRICS_AT_ONCE, due.length) }, reader));
  if (view !== current) return;
  if (restarted.length) {
    const empty = restarted.map(() => []);
    Plotly.restyle("sweep-loss", { x: empty, y: empty }, restarted);
  }
  if (!fresh.size) return;
  const indices = [...fresh.keys()];
  const series = indices.map((i) => fresh.get(i));
  Plotly.extendTraces("sweep-loss", {
    x: series.map((steps) => steps.map((s) => s.examples_seen)),
    y: series.map((steps) => steps.map((s) => s.loss)),
  }, indices);
}

// One trial's steps after those already drawn (pages until a short one), and all its epochs.
// The metrics read the job's status before its steps: a terminal status with a short page
// means every step is in hand, and the trial is not read again. A failed read ends the trial's
// turn with the steps read so far: after_step has moved past those only. A page of another
// attempt than the one drawn is a retry's new run: its curve is read again from the start
// (`restart`), or two runs were drawn as one.
async function readTrial(trial) {
  let steps = [];
  let restart = false;
  try {
    for (;;) {
      const page = await api(`/jobs/${trial.job_id}/metrics?after_step=${trial.afterStep}&limit=${STEPS_PAGE}`);
      if (trial.attempt !== undefined && page.attempt !== trial.attempt) {
        trial.attempt = undefined;
        trial.afterStep = 0;
        steps = [];
        restart = true;
        continue;
      }
      trial.attempt = page.attempt;
      steps.push(...page.steps);
      trial.afterStep = page.next_after_step;
      trial.epochs = page.epochs;
      if (page.steps.length < STEPS_PAGE) {
        trial.done = TERMINAL.has(page.status);
        break;
      }
    }
  } catch {
    // Read again in a later round, from where this one stopped.
  }
  return { steps, restart };
}

function renderAccuracy(current) {
  const trials = [...current.trials.values()];
  Plotly.restyle("sweep-accuracy", {
    x: trials.map((t) => t.epochs.map((e) => e.epoch)),
    y: trials.map((t) => t.epochs.map((e) => e.accuracy)),
  }, trials.map((t) => t.index));
}

function renderHeader(sweep) {
  $("sweep-status").replaceWith(Object.assign(badge(sweep.status), { id: "sweep-status" }));
  $("cancel-sweep").disabled = TERMINAL.has(sweep.status);
  const done = finishedCount(sweep.trials);
  const best = sweep.best
    ? el("span", {}, el("a", { id: "sweep-best", href: `#/jobs/${sweep.best.job_id}` }, idCode(sweep.best.job_id)),
      ` · ${percent(sweep.best.accuracy, 2)}`)
    : "–";
  const swept = new Set(sweptNames(sweep));
  const base = Object.entries(sweep.params || {})
    .filter(([name, value]) => !swept.has(name) && value !== null)
    .map(([name, value]) => `${paramLabel(name)} ${paramValue(value)}`)
    .join(", ");
  const items = [
    ["trials finished", `${done} / ${sweep.trials.length}`],
    ["best trial", best],
    ["search", searchText(sweep)],
    ["every trial", base || "the defaults"],
    ["promotes", sweep.promote || "–"],
    ["created", new Date(sweep.created_at).toLocaleString()],
    ["finished", sweep.finished_at ? new Date(sweep.finished_at).toLocaleString() : "–"],
  ];
  $("sweep-meta").replaceChildren(
    ...items.map(([k, v]) => el("div", {}, el("dt", { textContent: k }), el("dd", {}, v))),
  );
  $("sweep-progress-bar").style.width = `${sweep.trials.length ? (100 * done) / sweep.trials.length : 0}%`;
}

// Best first; trials without an accuracy yet last; ties in the sweep's order (as `best` breaks them).
function ranked(current) {
  const score = (t) => (t.accuracy === null || t.accuracy === undefined ? -Infinity : t.accuracy);
  return [...current.trials.values()].sort((a, b) => score(b) - score(a) || a.index - b.index);
}

function renderTable(current) {
  const swept = sweptNames(current.sweep);
  $("sweep-head").replaceChildren(
    el("tr", {}, ...["rank", "trial", "status", "epoch", "accuracy", ...swept.map(paramLabel)]
      .map((text) => el("th", { scope: "col", textContent: text }))),
  );
  const bestId = current.sweep.best ? current.sweep.best.job_id : null;
  const rows = ranked(current).map((t, rank) =>
    el(
      "tr",
      { class: t.job_id === bestId ? "best" : "", dataset: { job: t.job_id, status: t.status, accuracy: String(t.accuracy ?? "") } },
      el("td", { class: "num", textContent: String(rank + 1) }),
      el("td", {}, el("a", { href: `#/jobs/${t.job_id}` }, idCode(t.job_id))),
      el("td", {}, badge(t.status)),
      el("td", { class: "num", textContent: `${t.epoch}/${t.params.epochs}` }),
      el("td", { class: "num", textContent: percent(t.accuracy, 2) }),
      ...swept.map((n) => el("td", { class: "num", textContent: paramValue(t.params[n]) })),
    ),
  );
  $("sweep-body").replaceChildren(...rows);
}

// --- parameters against accuracy --------------------------------------------------------------

// "learning_rate" → "learning rate", as the form labels the fields.
function paramLabel(name) {
  return name.replaceAll("_", " ");
}

// A random search draws values such as 0.0015848931924611: four significant digits tell them apart.
function paramValue(value) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" && !Number.isInteger(value) ? String(Number(value.toPrecision(4))) : String(value);
}

// One axis per swept parameter whose values are all numbers: a log axis (ticks at the values
// tried) where they span LOG_AXIS_SPAN or more, as learning rates do.
function dimension(name, values, logSearched) {
  const low = Math.min(...values), high = Math.max(...values);
  const distinct = [...new Set(values)].sort((a, b) => a - b);
  if (low > 0 && (logSearched || high / low >= LOG_AXIS_SPAN)) {
    const ticks = distinct.length <= MAX_TICKS ? distinct
      : Array.from({ length: Math.floor(Math.log10(high)) - Math.ceil(Math.log10(low)) + 1 },
        (_, i) => 10 ** (Math.ceil(Math.log10(low)) + i));
    return {
      label: `${paramLabel(name)} (log)`, values: values.map(Math.log10),
      tickvals: ticks.map(Math.log10), ticktext: ticks.map(paramValue),
    };
  }
  const dim = { label: paramLabel(name), values };
  if (distinct.length <= MAX_TICKS) Object.assign(dim, { tickvals: distinct, ticktext: distinct.map(paramValue) });
  return dim;
}

function renderParcoords(current) {
  const scored = [...current.trials.values()].filter((t) => typeof t.accuracy === "number");
  $("sweep-parcoords-empty").hidden = scored.length > 0;
  $("sweep-parcoords").hidden = !scored.length;
  if (!scored.length) return;
  const space = (current.sweep.random && current.sweep.random.space) || {};
  const dims = [];
  for (const name of sweptNames(current.sweep)) {
    const values = scored.map((t) => t.params[name]);
    if (values.every((v) => typeof v === "number")) dims.push(dimension(name, values, "log_uniform" in (space[name] || {})));
  }
  const accuracy = scored.map((t) => t.accuracy);
  const spread = Math.max(...accuracy) - Math.min(...accuracy);
  const range = [Math.min(...accuracy) - (spread ? 0 : 0.005), Math.max(...accuracy) + (spread ? 0 : 0.005)];
  dims.push({ label: "accuracy", values: accuracy, range, tickformat: ".1%" });
  const key = JSON.stringify(dims);
  if (key === current.plotted) return; // unchanged: keep the ranges the user brushed
  current.plotted = key;
  const chart = $("sweep-parcoords");
  const brushed = new Map(((chart.data && chart.data[0] && chart.data[0].dimensions) || [])
    .filter((d) => d.constraintrange).map((d) => [d.label, d.constraintrange]));
  for (const dim of dims) if (brushed.has(dim.label)) dim.constraintrange = brushed.get(dim.label);
  const trace = {
    type: "parcoords", dimensions: dims,
    line: { color: accuracy, cmin: range[0], cmax: range[1], colorscale: "Viridis", showscale: true, colorbar: { title: { text: "accuracy" }, tickformat: ".1%" } },
  };
  Plotly.react(chart, [trace], { margin: { l: 80, r: 80, t: 50, b: 30 } }, { responsive: true, displaylogo: false });
}

// --- cancel -----------------------------------------------------------------------------------

export async function cancelSweep() {
  const current = view;
  if (!current) return;
  $("cancel-sweep").disabled = true;
  try {
    const sweep = await api(`/sweeps/${current.id}/cancel`, { method: "POST" });
    if (view === current && sweep && sweep.trials) renderHeader(sweep); // the rest next round
  } catch (err) {
    $("sweep-error").textContent = err.message;
    $("cancel-sweep").disabled = false;
  }
}
