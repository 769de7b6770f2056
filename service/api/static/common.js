// What every view of the dashboard shares: the one way to call the API (and the API key it
// adds), the banner, and the small helpers that build and format the page. Plain ES module.

export const KEY_STORAGE = "mnist.apiKey";
export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export const $ = (id) => document.getElementById(id);

// --- talking to the API ---------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.code = error.code;
    this.details = error.details || [];
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

// fetch() with the API key as a bearer token; JSON in and out (or, with raw, the response
// itself, for a download); errors as ApiError.
export async function api(path, { method = "GET", json, body, raw = false } = {}) {
  const headers = new Headers({ Accept: "application/json" });
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = typeof json === "string" ? json : JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (err) {
    throw new ApiError(0, { code: "network", message: `the API did not answer (${err.message})` });
  }
  if (raw && response.ok) return response;
  const isJson = (response.headers.get("content-type") || "").includes("json");
  const data = isJson ? await response.json() : null;
  if (!response.ok) {
    const error = (data && data.error) || { code: `http_${response.status}`, message: response.statusText };
    if (response.status === 401 || response.status === 403) {
      showBanner(`${error.message} — enter an API key (top right).`);
    }
    throw new ApiError(response.status, error);
  }
  return data;
}

// EventSource cannot send headers: the key travels as ?access_token= instead.
export function eventsUrl(path) {
  const key = apiKey();
  if (!key) return path;
  return `${path}${path.includes("?") ? "&" : "?"}access_token=${encodeURIComponent(key)}`;
}

export function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

// --- small helpers ----------------------------------------------------------------------

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style") node.style.cssText = value;
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

export function percent(value, digits = 1) {
  return value === null || value === undefined ? "–" : `${(100 * value).toFixed(digits)} %`;
}

export function age(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.floor(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h`;
  return `${Math.floor(seconds / 86400)} d`;
}

// Ids start with their creation time, so jobs submitted together share a prefix; their last
// digits are random. Everywhere an id is shortened (jobs table, model menu, prediction), it is
// to these, the full id on hover and in the link.
const SHORT_ID_DIGITS = 8;
export function shortId(id) {
  return `…${id.slice(-SHORT_ID_DIGITS)}`;
}

export function idCode(id) {
  return el("code", { textContent: shortId(id), title: id });
}

export function badge(status) {
  return el("span", { class: `badge ${status}`, textContent: status });
}

