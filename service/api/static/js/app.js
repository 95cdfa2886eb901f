// The felis console: datasets, uploads, labeling, trainings with live curves, versions, evaluation, try-it.
// Plain ES modules; every request goes through api.js (same API and errors as any other client).

import * as api from "./api.js";
import * as charts from "./charts.js";
import { bytes, clear, fill, fmt, h, pct, when } from "./dom.js";
import { labelingCard } from "./labeling.js";

const FINAL = ["succeeded", "failed", "cancelled"];
const ARCHITECTURES = ["efficientnet_lite0", "simple_cnn"];
const THUMBS_PER_PAGE = 48;
const FILES_PER_REQUEST = 200; // loose files per upload request (the server allows more)
const IMAGE_RE = /\.(jpe?g|png|webp|gif|bmp|tiff?)$/i;
const UNLABELED = "unlabeled"; // a folder of that name holds images without a label (the server's reserved name)
const ONLY_UNLABELED = ":unlabeled"; // the images filter's value for them (no label contains ':')

const $ = (sel) => document.querySelector(sel);
const page = { name: null, abort: new AbortController(), objectUrls: [] };

// --- shell: API key, health, dataset list, routing ---------------------------------------------

function showBanner(message, kind = "error") {
  const banner = $("#banner");
  banner.textContent = message;
  banner.className = `banner ${kind === "info" ? "info" : ""}`;
  banner.hidden = !message;
}

function report(error) {
  if (error?.name === "AbortError") return;
  console.error(error);
  const hint = error?.status === 401 ? " Enter an API key at the top right." :
    error?.status === 403 ? " This API key may not do that." : "";
  showBanner(`${error?.message || error}${error?.code ? ` (${error.code})` : ""}.${hint}`);
}

async function checkHealth() {
  const pill = $("#server-status");
  try {
    const body = await api.request("GET", "readyz", { okStatuses: [503] });
    const ok = body.status === "ready";
    pill.textContent = ok ? "ready" : "not ready";
    pill.title = Object.entries(body.checks || {}).map(([k, v]) => `${k}: ${v}`).join("\n");
    pill.className = `pill ${ok ? "ok" : "bad"}`;
  } catch {
    pill.textContent = "offline";
    pill.className = "pill bad";
  }
}

async function refreshDatasets() {
  const list = $("#dataset-list");
  let body;
  try {
    body = await api.request("GET", "v1/datasets", { params: { limit: 1000 } });
  } catch (e) {
    report(e);
    return;
  }
  clear(list);
  if (!body.data.length) list.append(h("li", { class: "empty" }, "no datasets yet"));
  for (const d of body.data) {
    list.append(h("li", {},
      h("a", { href: `#/d/${encodeURIComponent(d.name)}`, class: d.name === page.name ? "active" : null,
        "data-testid": `dataset-link-${d.name}` },
      h("span", {}, d.name), h("span", { class: "count" }, d.image_count ?? 0))));
  }
}

function route() {
  const match = window.location.hash.match(/^#\/d\/([^/]+)/);
  page.abort.abort();
  page.abort = new AbortController();
  for (const u of page.objectUrls.splice(0)) URL.revokeObjectURL(u);
  page.name = match ? decodeURIComponent(match[1]) : null;
  showBanner("");
  refreshDatasets();
  if (page.name) showDataset(page.name);
  else showHome();
}

function showHome() {
  clear($("#main")).append(h("section", { class: "card intro" },
    h("h1", {}, "felis console"),
    h("p", {}, "Create a dataset on the left, drop labeled images on it, train a model and try it here. " +
      "Images dropped without a label wait in its Label card, with the model's suggestions."),
    h("p", { class: "muted" }, "Everything here uses the public HTTP API (",
      h("a", { href: "docs" }, "/docs"), "); Prometheus metrics are at ", h("a", { href: "metrics" }, "/metrics"), ".")));
}

function init() {
  const keyInput = $("#api-key");
  keyInput.value = api.apiKey();
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    api.setApiKey(keyInput.value.trim());
    showBanner(keyInput.value.trim() ? "API key saved in this browser." : "API key removed.", "info");
    route();
  });
  $("#create-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = $("#create-name");
    try {
      const d = await api.request("POST", "v1/datasets", { json: { name: input.value.trim() } });
      input.value = "";
      window.location.hash = `#/d/${encodeURIComponent(d.name)}`;
      await refreshDatasets();
    } catch (err) {
      report(err);
    }
  });
  window.addEventListener("hashchange", route);
  checkHealth();
  setInterval(checkHealth, 15000);
  route();
}

// --- one dataset --------------------------------------------------------------------------------

function card(title, testid, ...body) {
  const head = h("div", { class: "card-head" }, h("h2", {}, title));
  return { el: h("section", { class: "card", "data-testid": testid }, head, ...body), head };
}

async function showDataset(name) {
  const main = clear($("#main"));
  const ctx = { name, signal: page.abort.signal, versions: [] };
  const overview = overviewCard(ctx);
  const images = imagesCard(ctx);
  const upload = uploadCard(ctx);
  const train = trainCard(ctx);
  const models = modelsCard(ctx);
  const issues = labelIssuesCard(ctx);
  const tryIt = tryCard(ctx);
  const labeling = labelingCard(ctx, { card, report, withLimit, keepUrl: (u) => page.objectUrls.push(u) });
  main.append(overview.el, upload.el, images.el, labeling.el, train.el, models.el, issues.el, tryIt.el);
  ctx.refresh = async () => {
    await overview.load(); // first: the images filter lists the dataset's labels as it now is
    await images.load();
    refreshDatasets();
  };
  ctx.uploaded = async () => {
    await ctx.refresh();
    await labeling.load(); // new unlabeled images: a fresh queue
  };
  let countsTimer = null;
  ctx.countsChanged = () => { // labels set from the labeling view: the counts and the grid follow, once keys pause
    clearTimeout(countsTimer);
    countsTimer = setTimeout(() => ctx.refresh().catch(report), 400);
  };
  ctx.refreshModels = async () => {
    ctx.versions = await models.load();
    tryIt.setVersions(ctx.versions);
    await overview.load();
    await Promise.all([issues.setVersions(ctx.versions), labeling.load()]);
  };
  try {
    await overview.load();
  } catch (e) {
    report(e);
    return;
  }
  images.load().catch(report);
  ctx.refreshModels().catch(report);
  train.load().catch(report);
}

function overviewCard(ctx) {
  const stats = h("div", { class: "stats" });
  const bars = h("div", { class: "bars", "data-testid": "label-counts" });
  const del = h("button", { class: "danger", type: "button" }, "Delete dataset");
  const c = card(ctx.name, "dataset-overview", stats, bars);
  c.head.append(h("span", { class: "spacer" }), del);
  del.addEventListener("click", async () => {
    if (!window.confirm(`Delete dataset ${ctx.name} with all its images and models?`)) return;
    try {
      await api.request("DELETE", `v1/datasets/${encodeURIComponent(ctx.name)}`);
      window.location.hash = "#/";
    } catch (e) { report(e); }
  });
  c.load = async () => {
    const d = await api.request("GET", `v1/datasets/${encodeURIComponent(ctx.name)}`);
    ctx.dataset = d;
    fill(stats, 
      stat(d.image_count ?? 0, "images", "image-count"),
      stat(d.unlabeled_count ?? 0, "unlabeled", "unlabeled-count"),
      stat((d.labels || []).length, "labels"),
      stat(d.default_version ? `v${d.default_version}` : "–", "default model", "default-version"),
      stat(when(d.created_at), "created"));
    const counts = Object.entries(d.label_counts || {});
    const most = Math.max(1, ...counts.map(([, n]) => n));
    clear(bars);
    if (!counts.length) bars.append(h("span", { class: "empty" }, d.unlabeled_count ? "no labeled images yet" : "no images yet: drop some below"));
    for (const [label, n] of counts) {
      const fill = h("div");
      fill.style.width = `${(100 * n) / most}%`;
      bars.append(h("span", {}, label), h("div", { class: "bar" }, fill), h("span", { class: "muted" }, n));
    }
  };
  return c;
}

function stat(value, label, testid) {
  return h("div", { class: "stat" }, h("b", { "data-testid": testid }, value), h("span", {}, label));
}

function imagesCard(ctx) {
  const filter = h("select", { "aria-label": "label filter" }, h("option", { value: "" }, "all labels"));
  const grid = h("div", { class: "thumbs", "data-testid": "thumbnails" });
  const more = h("button", { class: "secondary", type: "button", hidden: true }, "Show more");
  const total = h("span", { class: "muted" });
  const c = card("Images", "images-card", grid, h("div", { class: "row" }, more));
  c.head.append(total, h("span", { class: "spacer" }), filter);
  let offset = 0;
  let generation = 0; // a reload (the filter, an upload, a relabel) makes the answers of older loads stale
  let shownUrls = []; // the grid's thumbnails: let go at each reload (labeling reloads it often)

  async function loadPage(reset) {
    const mine = reset ? ++generation : generation;
    const unlabeled = filter.value === ONLY_UNLABELED;
    const body = await api.request("GET", `v1/datasets/${encodeURIComponent(ctx.name)}/images`,
      { params: { label: unlabeled ? null : filter.value, labeled: unlabeled ? "false" : null,
        limit: THUMBS_PER_PAGE, offset: reset ? 0 : offset } });
    if (mine !== generation) return;
    if (reset) {
      offset = 0;
      clear(grid);
      for (const u of shownUrls.splice(0)) URL.revokeObjectURL(u);
    }
    offset += body.data.length;
    total.textContent = `${body.count} image${body.count === 1 ? "" : "s"}`;
    more.hidden = offset >= body.count;
    const figures = body.data.map((img) => {
      const label = img.label ?? UNLABELED;
      const pic = h("img", { alt: `${label} ${img.filename || img.id}`, loading: "lazy" });
      grid.append(h("figure", { class: "thumb", title: `${img.filename || ""} (${label})` }, pic,
        h("figcaption", { class: img.label == null ? "unlabeled" : null }, label)));
      return [pic, img];
    });
    await withLimit(figures, 6, async ([pic, img]) => {
      if (ctx.signal.aborted || mine !== generation) return;
      const u = await api.thumbnailUrl(ctx.name, img.id);
      if (mine !== generation) { URL.revokeObjectURL(u); return; }
      shownUrls.push(u);
      page.objectUrls.push(u); // and at the next route
      pic.src = u;
    });
  }
  filter.addEventListener("change", () => loadPage(true).catch(report));
  more.addEventListener("click", () => loadPage(false).catch(report));
  c.load = async () => {
    const labels = ctx.dataset?.labels || [];
    const chosen = filter.value;
    fill(filter, h("option", { value: "" }, "all labels"),
      ...labels.map((l) => h("option", { value: l, selected: l === chosen }, l)),
      ctx.dataset?.unlabeled_count || chosen === ONLY_UNLABELED ?
        h("option", { value: ONLY_UNLABELED, selected: chosen === ONLY_UNLABELED }, "unlabeled") : null);
    await loadPage(true);
  };
  return c;
}

async function withLimit(items, limit, fn) {
  const queue = [...items];
  const workers = Array.from({ length: Math.min(limit, queue.length) }, async () => {
    while (queue.length) {
      try { await fn(queue.shift()); } catch (e) { console.warn(e); }
    }
  });
  await Promise.all(workers);
}

// --- upload -------------------------------------------------------------------------------------

function uploadCard(ctx) {
  const label = h("input", { placeholder: "label (none: unlabeled)", "aria-label": "label for loose images",
    "data-testid": "upload-label",
    pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}" });
  const pickFiles = h("input", { type: "file", multiple: true, accept: "image/*,.zip", "data-testid": "upload-files" });
  const pickFolder = h("input", { type: "file", webkitdirectory: true, "data-testid": "upload-folder" });
  const drop = h("div", { class: "drop", "data-testid": "drop-zone" },
    h("div", {}, "Drop images, a zip, or a folder with a folder per label (images without one are stored unlabeled)"),
    h("div", { class: "row" }, label,
      h("span", { class: "file-button" }, h("button", { type: "button", class: "secondary", tabindex: -1 }, "Choose files…"), pickFiles),
      h("span", { class: "file-button" }, h("button", { type: "button", class: "secondary", tabindex: -1 }, "Choose folder…"), pickFolder)));
  const progress = h("progress", { max: 1, value: 0, hidden: true, "data-testid": "upload-progress" });
  const summary = h("div", { class: "summary", "data-testid": "upload-summary" });
  const tbody = h("tbody");
  const table = h("div", { class: "table-wrap", hidden: true },
    h("table", { "data-testid": "upload-results" },
      h("thead", {}, h("tr", {}, h("th", {}, "file"), h("th", {}, "label"), h("th", {}, "status"), h("th", {}, "reason"))),
      tbody));
  const c = card("Upload", "upload-card", drop, progress, summary, table);

  async function run(batches) {
    if (!batches.length) return;
    const totalBytes = batches.reduce((a, b) => a + b.size, 0);
    let sentBefore = 0;
    progress.hidden = false;
    progress.value = 0;
    fill(summary, h("span", { class: "muted" }, `uploading ${bytes(totalBytes)}…`));
    clear(tbody);
    table.hidden = true;
    const results = [];
    try {
      for (const batch of batches) {
        const body = await api.upload(`v1/datasets/${encodeURIComponent(ctx.name)}/images`, batch.form,
          (loaded, total) => { progress.value = (sentBefore + Math.min(loaded, total)) / (totalBytes || 1); });
        sentBefore += batch.size;
        results.push(...(body.results || []));
      }
    } catch (e) {
      report(e);
    }
    progress.value = 1;
    showResults(results);
    await ctx.uploaded();
  }

  function showResults(results) {
    const count = (s) => results.filter((r) => r.status === s).length;
    const reasons = {};
    for (const r of results) if (r.status === "rejected") reasons[r.reason] = (reasons[r.reason] || 0) + 1;
    fill(summary, 
      h("b", { class: "status-created" }, `${count("created")} created`), " · ",
      h("b", { class: "status-duplicate" }, `${count("duplicate")} duplicates`), " · ",
      h("b", { class: "status-rejected" }, `${count("rejected")} rejected`),
      Object.keys(reasons).length ? h("span", { class: "muted" },
        ` (${Object.entries(reasons).map(([k, n]) => `${k}: ${n}`).join(", ")})`) : null);
    for (const r of results.slice(0, 1000)) {
      tbody.append(h("tr", {}, h("td", {}, r.filename), h("td", {}, r.label ?? "–"),
        h("td", { class: `status-${r.status}` }, r.status), h("td", { class: "muted" }, r.reason ?? "")));
    }
    table.hidden = !results.length;
  }

  async function fromFiles(entries) {
    // entries: [{file, path}] where path is relative ("set/cat/1.jpg") for folders, or just the name
    const zips = entries.filter((e) => /\.zip$/i.test(e.file.name));
    const rest = entries.filter((e) => !/\.zip$/i.test(e.file.name) && !e.file.name.startsWith("."));
    const batches = zips.map((e) => {
      const form = new FormData();
      form.append("archive", e.file, e.file.name);
      return { form, size: e.file.size };
    });
    const byLabel = new Map();
    const loose = [];
    for (const e of rest) {
      const parts = e.path.split("/").filter(Boolean);
      // a dropped folder: set/cat/x.jpg -> cat; cat/x.jpg -> cat; a loose file -> the label field;
      // a folder named unlabeled -> no label
      const folderLabel = parts.length >= 3 ? parts[parts.length - 2] : parts.length === 2 ? parts[0] : null;
      if (folderLabel?.toLowerCase() === UNLABELED) {
        if (!byLabel.has(null)) byLabel.set(null, []);
        byLabel.get(null).push(e.file);
      } else if (folderLabel) {
        if (!byLabel.has(folderLabel)) byLabel.set(folderLabel, []);
        byLabel.get(folderLabel).push(e.file);
      } else {
        loose.push(e.file);
      }
    }
    if (loose.length) {
      const l = label.value.trim() || null; // no label: stored unlabeled, to label in the Label card
      byLabel.set(l, [...(byLabel.get(l) || []), ...loose]);
    }
    for (const [l, files] of byLabel) {
      for (let i = 0; i < files.length; i += FILES_PER_REQUEST) {
        const form = new FormData();
        if (l) form.append("label", l);
        let size = 0;
        for (const f of files.slice(i, i + FILES_PER_REQUEST)) { form.append("files", f, f.name); size += f.size; }
        batches.push({ form, size });
      }
    }
    showBanner("");
    await run(batches);
  }

  pickFiles.addEventListener("change", () => {
    fromFiles([...pickFiles.files].map((file) => ({ file, path: file.name }))).catch(report);
    pickFiles.value = "";
  });
  pickFolder.addEventListener("change", () => {
    fromFiles([...pickFolder.files].filter((f) => IMAGE_RE.test(f.name))
      .map((file) => ({ file, path: file.webkitRelativePath || file.name }))).catch(report);
    pickFolder.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    try {
      await fromFiles(await droppedFiles(e.dataTransfer));
    } catch (err) { report(err); }
  });
  return c;
}

/** Files from a drop, walking dropped folders (path keeps the folder names, which become labels). */
async function droppedFiles(dataTransfer) {
  const entries = [...(dataTransfer.items || [])].map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...dataTransfer.files].map((file) => ({ file, path: file.name }));
  const out = [];
  async function walk(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      if (prefix === "" || IMAGE_RE.test(file.name)) out.push({ file, path: prefix + file.name });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  }
  for (const entry of entries) await walk(entry, "");
  return out;
}

// --- training -----------------------------------------------------------------------------------

/** Curves from progress snapshots: step-level loss, and per-epoch validation accuracy. An epoch
 * closes at the first look at the next one (whose merged state still carries its val_accuracy). */
class Curves {
  constructor() {
    this.loss = []; this.valLoss = []; this.val = []; this.current = null; this.closed = null; this.history = null;
  }

  add(p) {
    if (Array.isArray(p.history) && p.history.length) this.history = p.history;
    const e = p.epoch;
    if (p.epochs) this.epochs = p.epochs;
    if (e == null) return;
    if (p.loss != null && Number.isFinite(p.loss)) {
      const x = p.steps ? e - 1 + (p.step || 0) / p.steps : e;
      const last = this.loss[this.loss.length - 1];
      if (!last || x > last[0]) this.loss.push([x, p.loss]);
    }
    if (this.current && e !== this.current.epoch) {
      const done = { ...this.current };
      const midNext = e === done.epoch + 1 && p.phase === done.phase && p.steps && (p.step || 0) < p.steps;
      if (midNext && p.val_accuracy != null) done.val_accuracy = p.val_accuracy;
      if (midNext && p.val_loss != null) done.val_loss = p.val_loss;
      this.close(done);
    }
    if (this.closed == null || e > this.closed) this.current = { ...p };
  }

  close(done) {
    this.current = null;
    this.closed = done.epoch;
    if (done.val_accuracy != null) this.val.push([done.epoch, done.val_accuracy]);
    if (done.val_loss != null) this.valLoss.push([done.epoch, done.val_loss]);
  }

  finish() { if (this.current) this.close(this.current); }

  charts() {
    if (this.history) return historyCharts(this.history);
    return [
      charts.lineChart({ series: [{ name: "train loss", points: this.loss, markers: this.loss.length <= 40 },
        ...(this.valLoss.length ? [{ name: "val loss", points: this.valLoss, color: charts.PALETTE[1], dashed: true }] : [])],
      title: "Loss", xLabel: "epoch", xDomain: this.epochs ? [0, this.epochs] : undefined, testid: "loss-chart" }),
      charts.lineChart({ series: [{ name: "val accuracy", points: this.val, color: charts.PALETTE[2] }],
        title: "Validation accuracy", xLabel: "epoch", xDomain: this.epochs ? [0, this.epochs] : undefined,
        yDomain: [0, 1], testid: "accuracy-chart" }),
    ];
  }
}

function historyCharts(history) {
  // per-epoch records: {epoch, loss | train_loss, accuracy | train_accuracy, val_loss, val_accuracy}
  const pts = (...keys) => history.map((r) => [r.epoch, keys.map((k) => r[k]).find((v) => v != null)])
    .filter(([x, y]) => x != null && y != null);
  const present = (series) => series.filter((sr) => sr.points.length);
  return [
    charts.lineChart({ series: present([{ name: "train loss", points: pts("loss", "train_loss") },
      { name: "val loss", points: pts("val_loss"), color: charts.PALETTE[1], dashed: true }]),
    title: "Loss", xLabel: "epoch", testid: "loss-chart" }),
    charts.lineChart({ series: present([{ name: "train accuracy", points: pts("accuracy", "train_accuracy"), color: charts.PALETTE[3] },
      { name: "val accuracy", points: pts("val_accuracy"), color: charts.PALETTE[2], dashed: true }]),
    title: "Accuracy", xLabel: "epoch", yDomain: [0, 1], testid: "accuracy-chart" }),
  ];
}

function trainCard(ctx) {
  const arch = h("select", { name: "architecture", "data-testid": "train-architecture" },
    ...ARCHITECTURES.map((a) => h("option", { value: a }, a)));
  const epochs = h("input", { type: "number", min: 1, max: 1000, placeholder: "default", name: "epochs",
    "data-testid": "train-epochs" });
  const seed = h("input", { type: "number", min: 0, placeholder: "default", name: "seed", "data-testid": "train-seed" });
  const extra = h("textarea", { rows: 2, placeholder: '{"batch_size": 32}   (any other training option, as JSON)',
    "data-testid": "train-options" });
  const start = h("button", { type: "submit", "data-testid": "train-start" }, "Start training");
  const form = h("form", { class: "train-form", "data-testid": "train-form" },
    field("architecture", arch), field("epochs", epochs), field("seed", seed), h("div", { class: "field" }, start),
    h("div", { class: "field wide" }, h("label", {}, "more options"), extra));
  const live = h("div", { class: "live", hidden: true, "data-testid": "training-live" });
  const tbody = h("tbody");
  const history = h("div", { class: "table-wrap" }, h("table", { "data-testid": "training-list" },
    h("thead", {}, h("tr", {}, ...["training", "status", "options", "created", "model", ""].map((t) => h("th", {}, t)))),
    tbody));
  const c = card("Train", "train-card", form, live, h("h3", {}, "Recent trainings"), history);
  let watching = null;

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    let options = {};
    try {
      options = extra.value.trim() ? JSON.parse(extra.value) : {};
      if (typeof options !== "object" || Array.isArray(options)) throw new Error("options must be a JSON object");
    } catch (err) {
      showBanner(`More options: ${err.message}`);
      return;
    }
    options.architecture = arch.value;
    if (epochs.value) options.epochs = Number(epochs.value);
    if (seed.value) options.seed = Number(seed.value);
    start.disabled = true;
    try {
      const t = await api.request("POST", `v1/datasets/${encodeURIComponent(ctx.name)}/trainings`, { json: options });
      showBanner("");
      watch(t);
      c.load().catch(report);
    } catch (err) {
      report(err);
    } finally {
      start.disabled = false;
    }
  });

  function watch(training) {
    watching?.abort();
    const controller = new AbortController();
    watching = controller;
    ctx.signal.addEventListener("abort", () => controller.abort(), { once: true });
    const curves = new Curves();
    live.hidden = false;
    const render = (t) => {
      const p = t.progress || {};
      curves.add(p);
      if (FINAL.includes(t.status)) curves.finish();
      renderLive(live, t, curves, controller);
    };
    render(training);
    api.followTraining(training.id, render, controller.signal).then(async (t) => {
      if (!t || controller.signal.aborted) return;
      c.load().catch(report);
      if (t.status === "succeeded") await ctx.refreshModels();
    }).catch(report);
  }

  c.load = async () => {
    const body = await api.request("GET", `v1/datasets/${encodeURIComponent(ctx.name)}/trainings`);
    clear(tbody);
    if (!body.data.length) tbody.append(h("tr", {}, h("td", { class: "empty", colspan: 6 }, "no trainings yet")));
    for (const t of body.data) {
      const follow = h("button", { class: "secondary", type: "button" }, "watch");
      follow.addEventListener("click", () => watch(t));
      tbody.append(h("tr", {},
        h("td", { class: "mono", title: t.id }, t.id.slice(0, 8)),
        h("td", { class: `status-${t.status}`, title: t.error ? `${t.error.code}: ${t.error.message}` : "" }, t.status),
        h("td", { class: "mono" }, Object.entries(t.options || {}).filter(([k]) => ["architecture", "epochs", "seed"].includes(k))
          .map(([k, v]) => `${k}=${v}`).join(" ")),
        h("td", {}, when(t.created_at)),
        h("td", {}, t.model_version ? `v${t.model_version}` : "–"),
        h("td", {}, follow)));
    }
    const active = body.data.find((t) => !FINAL.includes(t.status));
    if (active && !watching) watch(active);
  };
  return c;
}

function field(name, input) {
  return h("div", { class: "field" }, h("label", {}, name), input);
}

function renderLive(live, t, curves, controller) {
  const p = t.progress || {};
  const stepFrac = p.steps ? (p.step || 0) / p.steps : p.total ? (p.done || 0) / p.total : null;
  const cancel = h("button", { class: "danger", type: "button", hidden: FINAL.includes(t.status) }, "Cancel");
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try { await api.request("POST", `v1/trainings/${encodeURIComponent(t.id)}/cancel`); } catch (e) { report(e); }
  });
  const bar = h("progress", { max: 1, value: stepFrac ?? 0, "data-testid": "training-progress" });
  if (stepFrac == null && !FINAL.includes(t.status)) bar.removeAttribute("value");
  fill(live, 
    h("div", { class: "live-head" },
      h("span", { class: `status-${t.status}`, "data-testid": "training-status" }, t.status),
      h("span", { class: "phase", "data-testid": "training-phase" }, p.phase || "waiting for a worker"),
      p.epoch != null ? h("span", { "data-testid": "training-epoch" }, `epoch ${p.epoch}/${p.epochs ?? "?"}`) : null,
      p.steps ? h("span", { class: "muted" }, `step ${p.step ?? 0}/${p.steps}`) : null,
      p.total && !p.steps ? h("span", { class: "muted" }, `${p.done ?? 0}/${p.total}`) : null,
      p.loss != null ? h("span", { "data-testid": "training-loss" }, `loss ${fmt(p.loss, 4)}`) : null,
      p.val_accuracy != null ? h("span", { "data-testid": "training-val-accuracy" }, `val acc ${pct(p.val_accuracy)}`) : null,
      t.model_version ? h("span", { class: "badge" }, `→ v${t.model_version}`) : null,
      h("span", { class: "mono muted", title: t.id }, t.id.slice(0, 8)),
      cancel),
    bar,
    t.error ? h("p", { class: "status-failed" }, `${t.error.code}: ${t.error.message}`) : null,
    h("div", { class: "grid2" }, ...curves.charts().map((svg) => h("div", { class: "plot" }, svg))));
  if (controller.signal.aborted) cancel.hidden = true;
}

// --- model versions and evaluation --------------------------------------------------------------

const METRIC_KEYS = ["accuracy", "macro_f1", "roc_auc", "ece", "loss"];

function modelsCard(ctx) {
  const thead = h("thead");
  const tbody = h("tbody");
  const table = h("div", { class: "table-wrap" }, h("table", { "data-testid": "versions-table" }, thead, tbody));
  const evaluation = h("div", { "data-testid": "evaluation" });
  const c = card("Models", "models-card", table, evaluation);
  let shown = null;

  async function showEvaluation(version) {
    shown = version;
    fill(evaluation, h("p", { class: "muted" }, `loading the evaluation of v${version}…`));
    const ev = await api.request("GET", `v1/datasets/${encodeURIComponent(ctx.name)}/models/${version}/evaluation`);
    renderEvaluation(evaluation, ev, version);
  }

  c.load = async () => {
    const body = await api.request("GET", `v1/datasets/${encodeURIComponent(ctx.name)}/models`);
    const rows = body.data;
    const keys = METRIC_KEYS.filter((k) => rows.some((m) => typeof m.metrics?.[k] === "number"));
    fill(thead, h("tr", {}, h("th", {}, "version"), h("th", {}, "architecture"),
      ...keys.map((k) => h("th", { class: "num" }, k)), h("th", {}, "labels"), h("th", {}, "created"), h("th", {}, "")));
    clear(tbody);
    if (!rows.length) tbody.append(h("tr", {}, h("td", { class: "empty", colspan: keys.length + 5 }, "no models yet: train one above")));
    for (const m of [...rows].reverse()) {
      const evalButton = h("button", { class: "secondary", type: "button", "data-testid": `evaluate-v${m.version}` }, "Evaluation");
      evalButton.addEventListener("click", () => showEvaluation(m.version).catch(report));
      const promote = h("button", { type: "button", hidden: m.default, "data-testid": `promote-v${m.version}` }, "Promote");
      promote.addEventListener("click", async () => {
        promote.disabled = true;
        try {
          await api.request("POST", `v1/datasets/${encodeURIComponent(ctx.name)}/models/${m.version}/promote`);
          await ctx.refreshModels();
        } catch (e) { report(e); promote.disabled = false; }
      });
      tbody.append(h("tr", { "data-testid": `version-row-${m.version}` },
        h("td", {}, `v${m.version} `, m.default ? h("span", { class: "badge", "data-testid": "default-badge" }, "default") : null),
        h("td", {}, m.architecture),
        ...keys.map((k) => h("td", { class: "num" }, fmt(m.metrics?.[k]))),
        h("td", {}, (m.labels || []).join(", ")),
        h("td", {}, when(m.created_at)),
        h("td", { class: "row" }, evalButton, promote)));
    }
    const target = shown && rows.some((m) => m.version === shown) ? shown : rows.length ? rows[rows.length - 1].version : null;
    if (target && target !== shown) await showEvaluation(target);
    return rows;
  };
  return c;
}

function renderEvaluation(el, ev, version) {
  const perLabel = Array.isArray(ev.per_label) ? ev.per_label :
    Object.entries(ev.per_label || {}).map(([label, v]) => ({ label, ...v }));
  const cal = ev.calibration || {};
  const plots = [];
  if (ev.confusion_matrix?.labels) plots.push(charts.confusionMatrix(ev.confusion_matrix));
  if (ev.threshold_curve) plots.push(charts.precisionRecall(ev.threshold_curve));
  if (cal.bins) plots.push(charts.reliabilityDiagram(cal));
  if (Array.isArray(ev.history) && ev.history.length) plots.push(...historyCharts(ev.history));
  const rocAuc = typeof ev.roc_auc === "number" ? ev.roc_auc : ev.roc_auc?.macro ?? null;
  fill(el, 
    h("h3", {}, `Evaluation of v${version}`, h("span", { class: "muted" }, " (validation split)")),
    h("div", { class: "stats" },
      stat(pct(ev.accuracy), "accuracy", "eval-accuracy"),
      rocAuc != null ? stat(fmt(rocAuc), "ROC AUC") : null,
      cal.ece != null ? stat(fmt(cal.ece), "ECE") : null,
      cal.brier != null ? stat(fmt(cal.brier), "Brier") : null),
    perLabel.length ? h("div", { class: "table-wrap" }, h("table", { "data-testid": "per-label" },
      h("thead", {}, h("tr", {}, ...["label", "precision", "recall", "F1", "support"].map((t, i) => h("th", { class: i ? "num" : null }, t)))),
      h("tbody", {}, ...perLabel.map((r) => h("tr", {}, h("td", {}, r.label),
        ...["precision", "recall", "f1", "support"].map((k) => h("td", { class: "num" }, fmt(r[k])))))))) : null,
    h("div", { class: "grid2" }, ...plots.map((svg) => h("div", { class: "plot" }, svg))));
}

// --- label issues: the images a version's training says are probably mislabelled -------------------

const ISSUES_PER_PAGE = 50;

function labelIssuesCard(ctx) {
  const version = h("select", { "aria-label": "model version", "data-testid": "label-issues-version" },
    h("option", { value: "" }, "default version"));
  const total = h("span", { class: "muted", "data-testid": "label-issues-count" });
  const note = h("p", { class: "muted", "data-testid": "label-issues-note" },
    "Train a model to see which images its held-out predictions say are probably mislabelled.");
  const tbody = h("tbody");
  const table = h("div", { class: "table-wrap issues", hidden: true }, h("table", { "data-testid": "label-issues" },
    h("thead", {}, h("tr", {}, ...["", "file", "label → suggested", "score", ""].map((t, i) => h("th", { class: i === 3 ? "num" : null }, t)))),
    tbody));
  const more = h("button", { class: "secondary", type: "button", hidden: true }, "Show more");
  const c = card("Label issues", "label-issues-card", note, table, h("div", { class: "row" }, more));
  c.head.append(total, h("span", { class: "spacer" }), version);
  let offset = 0;
  let generation = 0; // a reload (another version, new models) makes the answers of older loads stale

  async function loadPage(reset) {
    const mine = reset ? ++generation : generation;
    let body;
    try {
      body = await api.request("GET", `v1/datasets/${encodeURIComponent(ctx.name)}/label-issues`,
        { params: { version: version.value, limit: ISSUES_PER_PAGE, offset: reset ? 0 : offset } });
    } catch (e) {
      if (mine !== generation) return;
      if (!["label_issues_unavailable", "no_model", "version_not_found"].includes(e.code)) throw e;
      clear(tbody);
      table.hidden = true;
      more.hidden = true;
      total.textContent = "";
      note.textContent = e.code === "label_issues_unavailable" ? e.message :
        "Train a model to see which images its held-out predictions say are probably mislabelled.";
      note.hidden = false;
      return;
    }
    if (mine !== generation) return;
    if (reset) { offset = 0; clear(tbody); }
    offset += body.data.length;
    total.textContent = `v${body.version}: ${body.count} flagged image${body.count === 1 ? "" : "s"}`;
    note.textContent = body.count ? "" : `v${body.version}'s training found no image that looks mislabelled.`;
    note.hidden = Boolean(body.count);
    table.hidden = !body.count;
    more.hidden = offset >= body.count;
    const pics = body.data.map((item) => {
      const pic = h("img", { alt: `${item.label} ${item.filename || item.image_id}`, loading: "lazy" });
      tbody.append(issueRow(item, pic));
      return [pic, item];
    });
    await withLimit(pics, 6, async ([pic, item]) => {
      if (ctx.signal.aborted) return;
      const u = await api.thumbnailUrl(ctx.name, item.image_id, 96);
      page.objectUrls.push(u);
      pic.src = u;
    });
  }

  function issueRow(item, pic) {
    const id = item.image_id;
    const path = `v1/datasets/${encodeURIComponent(ctx.name)}/images/${encodeURIComponent(id)}`;
    const labels = h("td", { "data-testid": `issue-labels-${id}` });
    const actions = h("td", { class: "row" });
    const row = h("tr", { "data-testid": `label-issue-${id}` },
      h("td", { class: "issue-thumb" }, pic),
      h("td", { class: "mono", title: id }, item.filename || id.slice(0, 8)),
      labels,
      h("td", { class: "num mono", "data-testid": `issue-score-${id}` }, fmt(item.score)),
      actions);

    function show(current, deleted) {
      const fixed = current === item.suggested_label;
      row.classList.toggle("done", fixed || deleted);
      fill(labels,
        h("span", { class: deleted || current !== item.label ? "struck" : null }, item.label), " → ",
        h("b", { class: fixed ? "status-succeeded" : null }, item.suggested_label),
        deleted ? h("span", { class: "status-rejected", "data-testid": `issue-state-${id}` }, " deleted") :
          current !== item.label ? h("span", { class: "muted", "data-testid": `issue-state-${id}` }, ` now ${current}`) : null);
      const relabel = h("button", { type: "button", hidden: deleted || fixed, "data-testid": `issue-relabel-${id}`,
        title: `PATCH the label to ${item.suggested_label}` }, `Relabel ${item.suggested_label}`);
      const del = h("button", { class: "danger", type: "button", hidden: deleted, "data-testid": `issue-delete-${id}` }, "Delete");
      relabel.addEventListener("click", () => act(relabel, async () => {
        const image = await api.request("PATCH", path, { json: { label: item.suggested_label } });
        show(image.label, false);
      }));
      del.addEventListener("click", () => act(del, async () => {
        await api.request("DELETE", path, { okStatuses: [404] });
        show(current, true);
      }));
      fill(actions, relabel, del);
    }

    async function act(button, fn) {
      for (const b of actions.querySelectorAll("button")) b.disabled = true;
      try {
        await fn();
        ctx.refresh().catch(report); // counts and the image grid
      } catch (e) {
        report(e);
        for (const b of actions.querySelectorAll("button")) b.disabled = false;
      }
    }

    show(item.current_label, false);
    return row;
  }

  const load = (reset) => loadPage(reset).catch(report);
  version.addEventListener("change", () => load(true));
  more.addEventListener("click", () => load(false));
  c.setVersions = (versions) => {
    const chosen = version.value;
    fill(version, h("option", { value: "" }, "default version"),
      ...[...versions].reverse().map((m) => h("option", { value: m.version, selected: String(m.version) === chosen },
        `v${m.version}${m.default ? " (default)" : ""}`)));
    return versions.length ? load(true) : Promise.resolve();
  };
  return c;
}

// --- try it -------------------------------------------------------------------------------------

function tryCard(ctx) {
  const version = h("select", { "aria-label": "model version", "data-testid": "try-version" },
    h("option", { value: "" }, "default version"));
  const input = h("input", { type: "file", accept: "image/*", "data-testid": "try-file" });
  const drop = h("div", { class: "drop", "data-testid": "try-drop" }, h("div", {}, "Drop an image to classify it"),
    h("div", { class: "row" }, version,
      h("span", { class: "file-button" }, h("button", { type: "button", class: "secondary", tabindex: -1 }, "Choose image…"), input)));
  const result = h("div", { class: "try", hidden: true, "data-testid": "try-result" });
  const c = card("Try it", "try-card", drop, result);

  async function classify(file) {
    const form = new FormData();
    form.append("files", file, file.name);
    const params = version.value ? `?version=${version.value}` : "";
    const body = await api.request("POST", `v1/datasets/${encodeURIComponent(ctx.name)}/predict${params}`, { body: form });
    const p = body.predictions[0];
    const preview = URL.createObjectURL(file);
    page.objectUrls.push(preview);
    const bars = h("div", { class: "bars", "data-testid": "probabilities" });
    if (p.error) {
      bars.append(h("span", { class: "status-rejected" }, `${p.error.code}: ${p.error.message}`));
    }
    const probs = Object.entries(p.probabilities || {}).sort((a, b) => b[1] - a[1]);
    for (const [label, prob] of probs) {
      const fill = h("div");
      fill.style.width = `${(100 * prob).toFixed(1)}%`;
      bars.append(h("span", {}, label), h("div", { class: `bar ${label === p.label ? "top" : ""}` }, fill),
        h("span", { class: "mono", "data-testid": `probability-${label}` }, prob.toFixed(3)));
    }
    fill(result, h("img", { src: preview, alt: file.name }), h("div", {},
      h("div", { class: "label", "data-testid": "try-label" }, p.label ?? "–"),
      h("p", { class: "muted" }, `${file.name} · model v${body.model_version}` +
        (p.decision !== undefined ? ` · decision: ${p.decision ?? (p.ood ? "none (unlike the training images)" : "none (below every threshold)")}` : "") +
        (p.ood_score != null ? ` · ood score ${p.ood_score.toFixed(3)}${p.ood ? " (out of distribution)" : ""}` : "")),
      bars));
    result.hidden = false;
  }

  input.addEventListener("change", () => {
    if (input.files[0]) classify(input.files[0]).catch(report);
    input.value = "";
  });
  for (const type of ["dragenter", "dragover"]) drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) classify(file).catch(report);
  });
  c.setVersions = (versions) => {
    const chosen = version.value;
    fill(version, h("option", { value: "" }, "default version"),
      ...[...versions].reverse().map((m) => h("option", { value: m.version, selected: String(m.version) === chosen },
        `v${m.version}${m.default ? " (default)" : ""}`)));
  };
  return c;
}

init();
