// The labeling view (issue 15): the dataset's unlabeled images with the default version's suggested
// label, one focused at a time, labelled from the keyboard. Every action is one
// POST v1/datasets/{name}/images/labels; the queue changes in place (done images stay, dimmed,
// so that ← and u can reach them) and the overview's counts follow.
//
//   Enter / a  accept the suggestion      1..9   the dataset's labels, in order (the legend)
//   s / →      skip                       ←      back
//   u          undo the last action (a label, a skip, or an "accept all")

import * as api from "./api.js";
import { clear, fill, h, pct } from "./dom.js";

const PER_PAGE = 30;
const POLL_MS = [2000, 30000]; // while the worker is still suggesting: first look again after, and at most
const KEYED_LABELS = 9;

/**
 * The "Label" card. ui: the console's shared pieces, {card, report, withLimit, keepUrl}.
 * Returns the card with load() (a fresh queue: after an upload, a training or a promotion).
 */
export function labelingCard(ctx, ui) {
  const order = h("select", { "aria-label": "order", "data-testid": "labeling-order" },
    h("option", { value: "uncertain" }, "uncertain first: label these by hand"),
    h("option", { value: "certain" }, "certain first: safest to accept"));
  const total = h("span", { class: "muted", "data-testid": "labeling-count" });
  const note = h("p", { class: "muted", "data-testid": "labeling-note" });
  const pending = h("p", { class: "muted", hidden: true, "data-testid": "labeling-pending" });
  const error = h("p", { class: "status-failed", role: "alert", hidden: true, "data-testid": "labeling-error" });
  const legend = h("div", { class: "label-legend row", role: "group", "aria-label": "label the focused image",
    "data-testid": "labeling-legend" });
  const acceptAll = h("button", { type: "button", hidden: true, "data-testid": "labeling-accept-all" }, "Accept all");
  const next = h("button", { type: "button", class: "secondary", hidden: true, "data-testid": "labeling-next" });
  const status = h("span", { class: "muted", role: "status", "data-testid": "labeling-status" });
  const queue = h("ul", { class: "label-queue", role: "listbox", "aria-label": "unlabeled images",
    "data-testid": "labeling-queue" });
  const body = h("div", { hidden: true }, legend,
    h("p", { class: "muted keys" }, h("kbd", {}, "Enter"), "/", h("kbd", {}, "a"), " accept · ",
      h("kbd", {}, "1"), "–", h("kbd", {}, "9"), " label · ", h("kbd", {}, "s"), "/", h("kbd", {}, "→"), " skip · ",
      h("kbd", {}, "←"), " back · ", h("kbd", {}, "u"), " undo"),
    queue, h("div", { class: "row" }, acceptAll, next, status));
  const c = ui.card("Label", "labeling-card", note, pending, error, body);
  c.head.append(total, h("span", { class: "spacer" }), order);

  let items = []; // {image_id, filename, suggested_label, probability, ood, label, state, el, outcome}
  let cursor = 0; // items.length: past the last one
  let history = []; // for u: [{items: [{item, label, state}], cursor}]
  let chain = Promise.resolve(); // actions run one after the other, in the order of the keys
  let busy = 0;
  let generation = 0; // a reload makes the answers of older loads (and their polls) stale
  let poll = null;
  let pollMs = POLL_MS[0]; // doubles while pending does not change
  let lastPending = null;
  let version = null;
  let remaining = 0; // the server's count of unlabeled images with a suggestion, as of the last load
  let urls = []; // the queue's thumbnails, let go at each reload

  const path = () => `v1/datasets/${encodeURIComponent(ctx.name)}`;
  const labels = () => ctx.dataset?.labels || [];
  const isDone = (item) => item.state === "labeled";

  function showError(message) {
    error.textContent = message || "";
    error.hidden = !message;
  }

  // --- loading ------------------------------------------------------------------------------------

  async function load() {
    const mine = ++generation;
    clearTimeout(poll);
    let page;
    try {
      page = await api.request("GET", `${path()}/suggestions`, { params: { order: order.value, limit: PER_PAGE } });
    } catch (e) {
      if (mine !== generation) return;
      if (e.code !== "no_model") throw e;
      items = [];
      version = null;
      const n = ctx.dataset?.unlabeled_count ?? 0;
      setNote(n ? `Train a model: its suggestions for the ${n} unlabeled image${n === 1 ? "" : "s"} show here.` :
        "No unlabeled images. Upload images without a label to label them here with the model's suggestions.");
      total.textContent = "";
      pending.hidden = true;
      body.hidden = true;
      return;
    }
    if (mine !== generation) return;
    history = [];
    showError("");
    items = page.data.map((d) => ({ ...d, label: null, state: "pending" }));
    cursor = 0;
    version = page.version;
    remaining = page.count;
    showPending(page.pending, mine);
    setNote(page.count ? "" : page.pending ? "" : "No unlabeled images left: every image has a label.");
    body.hidden = !items.length;
    renderLegend();
    clear(queue);
    for (const u of urls.splice(0)) URL.revokeObjectURL(u);
    for (const item of items) queue.append(itemElement(item));
    render();
    ui.withLimit(items, 6, async (item) => { // not awaited: keys need not wait for the pictures
      if (ctx.signal.aborted || mine !== generation) return;
      const u = await api.thumbnailUrl(ctx.name, item.image_id, 160);
      if (mine !== generation) { URL.revokeObjectURL(u); return; }
      urls.push(u);
      ui.keepUrl(u); // and at the next route
      item.pic.src = u;
    });
  }

  /** A fresh queue, after the actions already asked for (their answers belong to the old one). */
  function reload() {
    const run = chain.then(load);
    chain = run.catch(() => {});
    return run;
  }

  function setNote(text) {
    note.textContent = text;
    note.hidden = !text;
  }

  function showPending(n, mine) {
    pollMs = n === lastPending ? Math.min(POLL_MS[1], pollMs * 2) : POLL_MS[0];
    lastPending = n;
    pending.textContent = n > 0 ? `The worker is still suggesting ${n}${items.length ? " more (reload the queue to see them)" : ""}.` : "";
    pending.hidden = !(n > 0);
    if (n > 0) poll = setTimeout(() => lookAgain(mine).catch(ui.report), pollMs);
  }

  /** While the worker suggests: the counts, and the queue once nothing is shown (never under the user's hands). */
  async function lookAgain(mine) {
    if (ctx.signal.aborted || mine !== generation) return;
    if (!items.length) return reload();
    const page = await api.request("GET", `${path()}/suggestions`, { params: { order: order.value, limit: 1 } });
    if (mine !== generation) return;
    remaining = page.count + items.filter(isDone).length; // the server no longer counts those
    render();
    showPending(page.pending, mine);
  }

  // --- rendering ----------------------------------------------------------------------------------

  function itemElement(item) {
    const name = item.filename || item.image_id.slice(0, 8);
    item.pic = h("img", { alt: name, width: 160, height: 160 });
    item.outcome = h("span", { class: "outcome", "data-testid": `labeling-outcome-${item.image_id}` });
    item.el = h("li", { class: "label-item", role: "option", tabindex: -1, "aria-selected": "false",
      "data-testid": `labeling-item-${item.image_id}`, title: name },
    item.pic,
    h("div", { class: "suggestion" },
      h("b", { "data-testid": `labeling-suggested-${item.image_id}` }, item.suggested_label), " ",
      h("span", { class: "mono muted" }, pct(item.probability))),
    item.ood ? h("span", { class: "badge ood", title: `open-set score ${item.ood_score ?? "–"}` }, "unlike the training images") : null,
    item.outcome);
    item.el.addEventListener("click", () => { cursor = items.indexOf(item); render(true); });
    return item.el;
  }

  function describe(item) {
    const name = item.filename || item.image_id;
    const said = `${name}: suggested ${item.suggested_label}, ${pct(item.probability)}${item.ood ? ", unlike the training images" : ""}`;
    return item.state === "labeled" ? `${said}; labeled ${item.label}` : item.state === "skipped" ? `${said}; skipped` : said;
  }

  function render(focus = false) {
    const hadFocus = focus || c.el.contains(document.activeElement);
    items.forEach((item, i) => {
      const current = i === cursor;
      item.el.className = `label-item ${item.state}${current ? " current" : ""}`;
      item.el.dataset.state = item.state;
      item.el.setAttribute("aria-selected", String(current));
      item.el.tabIndex = current || (cursor >= items.length && i === items.length - 1) ? 0 : -1;
      item.el.setAttribute("aria-label", describe(item));
      item.outcome.textContent = item.error ? item.error : item.state === "labeled" ? `→ ${item.label}` :
        item.state === "skipped" ? "skipped" : "";
      item.outcome.className = `outcome ${item.error ? "status-failed" : item.state === "labeled" ? "status-succeeded" : "muted"}`;
    });
    const open = items.filter((item) => !isDone(item));
    total.textContent = version ? `v${version}: ${remaining - (items.length - open.length)} to label` : "";
    acceptAll.hidden = order.value !== "certain" || !items.length;
    acceptAll.disabled = !open.length;
    acceptAll.textContent = `Accept all ${open.length} shown`;
    const skipped = open.filter((item) => item.state === "skipped").length;
    next.hidden = !items.length;
    next.textContent = open.length > skipped ? "Reload the queue" : "Load the next ones";
    next.className = open.length > skipped ? "secondary" : "";
    status.textContent = busy ? "saving…" : !items.length ? "" :
      `${items.length - open.length} of ${items.length} labeled${skipped ? `, ${skipped} skipped` : ""}`;
    c.el.dataset.busy = String(busy);
    for (const b of legend.querySelectorAll("button")) b.disabled = cursor >= items.length;
    if (hadFocus && items.length && !c.el.querySelector(".label-legend :focus, .row :focus, select:focus")) {
      const target = items[Math.min(cursor, items.length - 1)].el;
      target.focus();
      if (cursor < items.length) target.scrollIntoView({ block: "nearest" });
    }
  }

  function renderLegend() {
    const keyed = labels().slice(0, KEYED_LABELS);
    const rest = labels().slice(KEYED_LABELS);
    const button = (text, title, testid, fn) => {
      const b = h("button", { type: "button", class: "secondary", title, "aria-label": title, "data-testid": testid }, ...text);
      b.addEventListener("click", () => { act(fn); afterClick(); });
      return b;
    };
    const more = rest.length ? h("select", { "aria-label": "another label", "data-testid": "labeling-more" },
      h("option", { value: "" }, "other label…"), ...rest.map((l) => h("option", { value: l }, l))) : null;
    more?.addEventListener("change", () => {
      const l = more.value;
      more.value = "";
      if (l) { act(() => labelCurrent(l)); afterClick(); }
    });
    fill(legend,
      button([h("kbd", {}, "Enter"), " accept"], "accept the suggestion (Enter or a)", "labeling-accept", acceptCurrent),
      ...keyed.map((l, i) => button([h("kbd", {}, String(i + 1)), ` ${l}`], `label ${l} (key ${i + 1})`,
        `labeling-key-${i + 1}`, () => labelCurrent(l))),
      more,
      button([h("kbd", {}, "s"), " skip"], "skip (s or →)", "labeling-skip", skip),
      button([h("kbd", {}, "←"), " back"], "back (←)", "labeling-back", back),
      button([h("kbd", {}, "u"), " undo"], "undo the last action (u)", "labeling-undo", undo));
  }

  function afterClick() {
    if (items.length) items[Math.min(cursor, items.length - 1)].el.focus();
  }

  // --- actions --------------------------------------------------------------------------------------

  /** Run fn after the actions before it (each waits for its POST), keeping the console's errors. */
  function act(fn) {
    busy += 1;
    render();
    chain = chain.then(fn).catch((e) => { showError(`${e.message || e}${e.code ? ` (${e.code})` : ""}`); })
      .finally(() => { busy -= 1; render(); });
    return chain;
  }

  /** POST the labels; apply what the server applied; returns the history entries of those. */
  async function send(changes) {
    // changes: [{item, label}]
    const body = await api.request("POST", `${path()}/images/labels`,
      { json: changes.map(({ item, label }) => ({ image_id: item.image_id, label })) });
    const applied = [];
    const failures = [];
    body.results.forEach((r, i) => {
      const { item, label } = changes[i];
      if (r.status !== "labeled" && r.status !== "unlabeled") { // "rejected", with its error
        item.error = r.error?.message || r.error?.code || "failed";
        failures.push(`${item.filename || item.image_id}: ${item.error}`);
        return;
      }
      applied.push({ item, label: item.label, state: item.state });
      item.error = null;
      item.label = label;
      item.state = label == null ? (changes[i].state || "pending") : "labeled";
    });
    showError(failures.length ? `${failures.length} not labeled: ${failures.slice(0, 3).join("; ")}` : "");
    ctx.countsChanged?.();
    return applied;
  }

  function nextOpen(from) {
    for (let i = from + 1; i < items.length; i += 1) if (!isDone(items[i])) return i;
    return items.length;
  }

  async function labelCurrent(label) {
    const item = items[cursor];
    if (!item) return;
    const at = cursor;
    const applied = await send([{ item, label }]);
    if (!applied.length) return;
    history.push({ items: applied, cursor: at });
    if (cursor === at) cursor = nextOpen(at);
  }

  const acceptCurrent = () => (items[cursor] ? labelCurrent(items[cursor].suggested_label) : null);

  function skip() {
    const item = items[cursor];
    if (!item) return;
    history.push({ items: [{ item, label: item.label, state: item.state }], cursor });
    if (!isDone(item)) item.state = "skipped";
    cursor += 1;
  }

  function back() {
    cursor = Math.max(0, cursor - 1);
  }

  async function undo() {
    const last = history.pop();
    if (!last) return;
    const posted = last.items.filter(({ item, label }) => item.label !== label);
    if (posted.length) {
      const restored = await send(posted.map(({ item, label, state }) => ({ item, label, state })));
      if (restored.length < posted.length) {
        history.push(last); // some are still labeled: u tries again
        return;
      }
    }
    for (const { item, state } of last.items) item.state = state;
    cursor = last.cursor;
  }

  async function acceptShown() {
    const open = items.filter((item) => !isDone(item));
    if (!open.length) return;
    const at = cursor;
    const applied = await send(open.map((item) => ({ item, label: item.suggested_label })));
    if (applied.length) history.push({ items: applied, cursor: at });
    cursor = nextOpen(-1);
  }

  // --- keyboard -------------------------------------------------------------------------------------

  c.el.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || !items.length) return;
    const t = e.target;
    if (t.closest("input, select, textarea")) return;
    if (t.closest("button") && (e.key === "Enter" || e.key === " ")) return; // the button's own action
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    let fn = null;
    if (key === "Enter" || key === "a") fn = acceptCurrent;
    else if (key === "s" || key === "ArrowRight") fn = skip;
    else if (key === "ArrowLeft") fn = back;
    else if (key === "u") fn = undo;
    else if (/^[1-9]$/.test(key) && labels()[Number(key) - 1] && Number(key) <= KEYED_LABELS) {
      const l = labels()[Number(key) - 1];
      fn = () => labelCurrent(l);
    }
    if (!fn) return;
    e.preventDefault();
    act(fn);
  });

  acceptAll.addEventListener("click", () => { act(acceptShown); afterClick(); });
  next.addEventListener("click", () => { reload().catch(ui.report); });
  order.addEventListener("change", () => { reload().catch(ui.report); });
  ctx.signal.addEventListener("abort", () => clearTimeout(poll), { once: true });

  c.load = reload;
  return c;
}
