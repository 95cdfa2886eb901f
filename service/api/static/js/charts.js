// Small SVG charts drawn from the API's JSON: line charts (training curves, precision-recall),
// the confusion matrix and the reliability diagram. No library; every chart is an <svg> element.

import { s } from "./dom.js";

export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const M = { left: 46, right: 14, top: 24, bottom: 38 };

function niceTicks(min, max, count = 5) {
  if (!(max > min)) return [min];
  const raw = (max - min) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(+v.toFixed(10));
  return ticks;
}

function tickText(v) {
  if (Math.abs(v) >= 1000) return v.toFixed(0);
  return String(+v.toFixed(3));
}

function extent(values, fallback) {
  const finite = values.filter((v) => Number.isFinite(v));
  if (!finite.length) return fallback;
  let lo = Math.min(...finite), hi = Math.max(...finite);
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  return [lo, hi];
}

/**
 * A line chart. series: [{name, points: [[x, y], ...], color?, dashed?}].
 * Options: title, xLabel, yLabel, xDomain, yDomain ([lo, hi]), diagonal (y = x), markers.
 */
export function lineChart({ series, title = "", xLabel = "", yLabel = "", xDomain, yDomain, diagonal = false,
  markers, width = 400, height = 240, testid } = {}) {
  const all = series.flatMap((sr) => sr.points);
  const [x0, x1] = xDomain || extent(all.map((p) => p[0]), [0, 1]);
  let [y0, y1] = yDomain || extent(all.map((p) => p[1]), [0, 1]);
  if (!yDomain) { const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad; }
  const iw = width - M.left - M.right, ih = height - M.top - M.bottom;
  const X = (x) => M.left + ((x - x0) / (x1 - x0 || 1)) * iw;
  const Y = (y) => M.top + ih - ((y - y0) / (y1 - y0 || 1)) * ih;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, class: "chart", role: "img",
    "aria-label": title, "data-testid": testid });
  svg.append(s("text", { x: M.left, y: 14, class: "title" }, title));
  for (const t of niceTicks(y0, y1)) {
    svg.append(s("line", { x1: M.left, x2: M.left + iw, y1: Y(t), y2: Y(t), class: "gridline" }));
    svg.append(s("text", { x: M.left - 6, y: Y(t) + 4, "text-anchor": "end" }, tickText(t)));
  }
  for (const t of niceTicks(x0, x1, 6)) {
    svg.append(s("line", { x1: X(t), x2: X(t), y1: M.top + ih, y2: M.top + ih + 4, class: "axis" }));
    svg.append(s("text", { x: X(t), y: M.top + ih + 16, "text-anchor": "middle" }, tickText(t)));
  }
  svg.append(s("line", { x1: M.left, x2: M.left + iw, y1: M.top + ih, y2: M.top + ih, class: "axis" }));
  svg.append(s("line", { x1: M.left, x2: M.left, y1: M.top, y2: M.top + ih, class: "axis" }));
  if (xLabel) svg.append(s("text", { x: M.left + iw / 2, y: height - 4, "text-anchor": "middle" }, xLabel));
  if (yLabel) {
    svg.append(s("text", { x: 12, y: M.top + ih / 2, "text-anchor": "middle",
      transform: `rotate(-90 12 ${M.top + ih / 2})` }, yLabel));
  }
  if (diagonal) svg.append(s("line", { x1: X(x0), y1: Y(y0), x2: X(x1), y2: Y(y1), class: "diag" }));
  series.forEach((sr, i) => {
    const color = sr.color || PALETTE[i % PALETTE.length];
    const pts = sr.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    if (pts.length > 1) {
      svg.append(s("polyline", { points: pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" "),
        fill: "none", stroke: color, "stroke-width": 2, "stroke-dasharray": sr.dashed ? "5 4" : null,
        "stroke-linejoin": "round" }));
    }
    if (sr.markers ?? markers ?? pts.length <= 40) {
      for (const p of pts) svg.append(s("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.6, fill: color }));
    }
  });
  // legend: one row in the top margin, right-aligned, so it never covers the data
  let lx = width - M.right;
  for (const [i, sr] of [...series.entries()].reverse()) {
    if (!sr.name) continue;
    const color = sr.color || PALETTE[i % PALETTE.length];
    lx -= 24 + 6 * sr.name.length;
    svg.append(s("line", { x1: lx, x2: lx + 14, y1: 10, y2: 10, stroke: color, "stroke-width": 2,
      "stroke-dasharray": sr.dashed ? "5 4" : null }));
    svg.append(s("text", { x: lx + 18, y: 14 }, sr.name));
  }
  return svg;
}

function blend(t) {
  const a = [255, 255, 255], b = [37, 99, 235];
  const c = a.map((v, i) => Math.round(v + (b[i] - v) * Math.max(0, Math.min(1, t))));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function short(label, n = 10) {
  return label.length > n ? `${label.slice(0, n - 1)}…` : label;
}

/** The confusion matrix: rows are the true labels, columns the predicted; colour by row share. */
export function confusionMatrix(cm, { testid = "confusion-matrix" } = {}) {
  const labels = cm?.labels || [];
  const matrix = cm?.matrix || [];
  const n = labels.length;
  const cell = Math.max(22, Math.min(56, 300 / Math.max(1, n)));
  const left = 86, top = 40;
  const width = left + n * cell + 10, height = top + n * cell + 34;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, class: "chart", role: "img",
    "aria-label": "confusion matrix", "data-testid": testid });
  svg.append(s("text", { x: 4, y: 14, class: "title" }, "Confusion matrix"));
  svg.append(s("text", { x: left + (n * cell) / 2, y: 30, "text-anchor": "middle" }, "predicted"));
  svg.append(s("text", { x: 10, y: top + (n * cell) / 2, "text-anchor": "middle",
    transform: `rotate(-90 10 ${top + (n * cell) / 2})` }, "true"));
  matrix.forEach((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    row.forEach((v, j) => {
      const share = v / total;
      svg.append(s("rect", { x: left + j * cell, y: top + i * cell, width: cell - 1, height: cell - 1, rx: 2,
        fill: blend(share) }, s("title", {}, `true ${labels[i]}, predicted ${labels[j]}: ${v} (${(100 * share).toFixed(1)}%)`)));
      svg.append(s("text", { x: left + j * cell + cell / 2, y: top + i * cell + cell / 2,
        class: `cell-text ${share > 0.55 ? "on-dark" : ""}` }, String(v)));
    });
  });
  labels.forEach((label, i) => {
    svg.append(s("text", { x: left - 6, y: top + i * cell + cell / 2 + 4, "text-anchor": "end" },
      s("title", {}, label), short(label)));
    svg.append(s("text", { x: left + i * cell + cell / 2, y: top + n * cell + 14, "text-anchor": "middle" },
      s("title", {}, label), short(label, Math.max(4, Math.floor(cell / 7)))));
  });
  return svg;
}

/**
 * threshold_curve in whichever shape the evaluation uses, as {label: [{threshold, precision, recall}]}:
 * {label: [{...}]}, {label: {thresholds|threshold: [], precision|precisions: [], recall|recalls: []}},
 * or [{label, threshold, precision, recall}].
 */
export function normalizeCurves(curve) {
  const out = {};
  if (Array.isArray(curve)) {
    for (const p of curve) (out[p.label ?? "all"] ||= []).push(p);
    return out;
  }
  for (const [label, value] of Object.entries(curve || {})) {
    if (Array.isArray(value)) {
      out[label] = value.filter((p) => p && typeof p === "object");
    } else if (value && typeof value === "object") {
      const th = value.thresholds || value.threshold || [];
      const pr = value.precision || value.precisions || [];
      const rc = value.recall || value.recalls || [];
      out[label] = th.map((t, i) => ({ threshold: t, precision: pr[i], recall: rc[i] }));
    }
  }
  return out;
}

/** Precision against recall per label, from the threshold curve. */
export function precisionRecall(thresholdCurve, { testid = "pr-curve" } = {}) {
  const curves = normalizeCurves(thresholdCurve);
  const series = Object.entries(curves).map(([label, pts]) => ({
    name: label,
    points: pts.filter((p) => p.precision != null && p.recall != null)
      .map((p) => [p.recall, p.precision]).sort((a, b) => a[0] - b[0] || b[1] - a[1]),
  }));
  return lineChart({ series, title: "Precision–recall", xLabel: "recall", yLabel: "precision",
    xDomain: [0, 1], yDomain: [0, 1.02], markers: false, testid });
}

/** Accuracy per confidence bin against the diagonal of perfect calibration. */
export function reliabilityDiagram(calibration, { testid = "reliability" } = {}) {
  const bins = (calibration?.bins || []).filter((b) => b.count > 0);
  const width = 400, height = 240;
  const iw = width - M.left - M.right, ih = height - M.top - M.bottom;
  const X = (x) => M.left + x * iw, Y = (y) => M.top + ih - y * ih;
  const title = `Reliability (ECE ${calibration?.ece != null ? calibration.ece.toFixed(3) : "–"}` +
    `${calibration?.brier != null ? `, Brier ${calibration.brier.toFixed(3)}` : ""})`;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, class: "chart", role: "img", "aria-label": title,
    "data-testid": testid });
  svg.append(s("text", { x: M.left, y: 14, class: "title" }, title));
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    svg.append(s("line", { x1: M.left, x2: M.left + iw, y1: Y(t), y2: Y(t), class: "gridline" }));
    svg.append(s("text", { x: M.left - 6, y: Y(t) + 4, "text-anchor": "end" }, String(t)));
    svg.append(s("text", { x: X(t), y: M.top + ih + 16, "text-anchor": "middle" }, String(t)));
  }
  const most = Math.max(1, ...bins.map((b) => b.count));
  for (const b of bins) {
    const x = X(b.lower), w = Math.max(1, X(b.upper) - X(b.lower) - 2);
    svg.append(s("rect", { x: x + 1, y: Y(b.accuracy), width: w, height: Math.max(0, ih - (Y(b.accuracy) - M.top)),
      fill: PALETTE[0], "fill-opacity": 0.35 + 0.6 * (b.count / most) },
    s("title", {}, `${b.lower.toFixed(2)}–${b.upper.toFixed(2)}: accuracy ${b.accuracy.toFixed(3)}, ` +
      `confidence ${b.confidence.toFixed(3)}, ${b.count} images`)));
    svg.append(s("circle", { cx: x + 1 + w / 2, cy: Y(b.confidence), r: 3, fill: PALETTE[1] }));
  }
  svg.append(s("line", { x1: X(0), y1: Y(0), x2: X(1), y2: Y(1), class: "diag" }));
  svg.append(s("line", { x1: M.left, x2: M.left + iw, y1: M.top + ih, y2: M.top + ih, class: "axis" }));
  svg.append(s("line", { x1: M.left, x2: M.left, y1: M.top, y2: M.top + ih, class: "axis" }));
  svg.append(s("text", { x: M.left + iw / 2, y: height - 4, "text-anchor": "middle" }, "confidence"));
  svg.append(s("text", { x: 12, y: M.top + ih / 2, "text-anchor": "middle",
    transform: `rotate(-90 12 ${M.top + ih / 2})` }, "accuracy"));
  const lx = M.left + 8;
  svg.append(s("rect", { x: lx, y: M.top + 2, width: 12, height: 8, fill: PALETTE[0], "fill-opacity": 0.7 }));
  svg.append(s("text", { x: lx + 16, y: M.top + 10 }, "accuracy (shade: images)"));
  svg.append(s("circle", { cx: lx + 6, cy: M.top + 20, r: 3, fill: PALETTE[1] }));
  svg.append(s("text", { x: lx + 16, y: M.top + 24 }, "mean confidence"));
  return svg;
}
