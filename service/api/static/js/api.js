// The felis HTTP API from the browser: relative URLs (the console may sit under a path prefix),
// the API key from localStorage as a Bearer token, errors as ApiError(status, code, message).

const KEY_STORAGE = "felis.apiKey";
const BASE = new URL("./", window.location.href);

export class ApiError extends Error {
  constructor(status, code, message, body) {
    super(message || code);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

export function apiKey() {
  try { return window.localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function setApiKey(key) {
  if (key) window.localStorage.setItem(KEY_STORAGE, key);
  else window.localStorage.removeItem(KEY_STORAGE);
}

export function url(path, params) {
  const u = new URL(path.replace(/^\//, ""), BASE);
  for (const [k, v] of Object.entries(params || {})) if (v != null && v !== "") u.searchParams.set(k, v);
  return u;
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const err = body && body.error;
  return new ApiError(response.status, err?.code || "http_error", err?.message || response.statusText, body);
}

/** fetch + JSON: request("GET", "v1/datasets"), request("POST", "v1/datasets", {json: {...}}). */
export async function request(method, path, { json, body, params, okStatuses = [] } = {}) {
  const headers = authHeaders(json !== undefined ? { "Content-Type": "application/json" } : {});
  let response;
  try {
    response = await fetch(url(path, params), {
      method, headers, body: json !== undefined ? JSON.stringify(json) : body,
    });
  } catch (e) {
    throw new ApiError(0, "connection_error", `cannot reach the API: ${e.message}`);
  }
  if (!response.ok && !okStatuses.includes(response.status)) throw await errorFrom(response);
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response;
}

/** A multipart upload with progress (fetch cannot report upload progress; XHR can). */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url(path));
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded, e.total); };
    xhr.onerror = () => reject(new ApiError(0, "connection_error", "the upload failed: the API did not answer"));
    xhr.onload = () => {
      const body = xhr.response;
      if (xhr.status < 300 || (xhr.status === 422 && body && body.results)) resolve(body);
      else reject(new ApiError(xhr.status, body?.error?.code || "http_error", body?.error?.message || xhr.statusText, body));
    };
    xhr.send(form);
  });
}

/** An object URL for an image that needs the API key (an <img src> cannot send headers). */
export async function blobUrl(path, params) {
  const response = await fetch(url(path, params), { headers: authHeaders() });
  if (!response.ok) throw await errorFrom(response);
  return URL.createObjectURL(await response.blob());
}

/** An object URL for a stored image's thumbnail: a small cached JPEG (size: 96, 160 or 320; default 160). */
export function thumbnailUrl(dataset, imageId, size) {
  return blobUrl(`v1/datasets/${encodeURIComponent(dataset)}/images/${encodeURIComponent(imageId)}/thumbnail`, { size });
}

/**
 * Follow GET v1/trainings/{id}/events (server-sent events over fetch, so the API key goes in a
 * header). Calls onUpdate(training) for each event; resolves with the final training. Reconnects
 * when the stream breaks, and polls if the server has no event stream.
 */
export async function followTraining(id, onUpdate, signal) {
  let last = null;
  const final = (t) => ["succeeded", "failed", "cancelled"].includes(t?.status);
  for (let attempt = 0; !signal?.aborted; attempt += 1) {
    try {
      const response = await fetch(url(`v1/trainings/${encodeURIComponent(id)}/events`), {
        headers: authHeaders({ Accept: "text/event-stream" }), signal,
      });
      if (response.status === 404 || response.status === 405) {
        const err = await errorFrom(response);
        if (err.code === "training_not_found") throw err;
        return await pollTraining(id, onUpdate, signal);
      }
      if (!response.ok) throw await errorFrom(response);
      for await (const data of sseData(response.body)) {
        last = JSON.parse(data);
        attempt = 0;
        onUpdate(last);
        if (final(last)) return last;
      }
    } catch (e) {
      if (signal?.aborted) break;
      if (e instanceof ApiError && e.status >= 400 && e.status < 500) throw e;
    }
    await sleep(Math.min(10000, 1000 * 2 ** attempt), signal);
  }
  return last;
}

async function pollTraining(id, onUpdate, signal) {
  let previous = "";
  while (!signal?.aborted) {
    const t = await request("GET", `v1/trainings/${encodeURIComponent(id)}`);
    const text = JSON.stringify(t);
    if (text !== previous) { previous = text; onUpdate(t); }
    if (["succeeded", "failed", "cancelled"].includes(t.status)) return t;
    await sleep(1000, signal);
  }
  return null;
}

async function* sseData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let nl;
    while ((nl = buffer.search(/\r?\n/)) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(buffer[nl] === "\r" ? nl + 2 : nl + 1);
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}
