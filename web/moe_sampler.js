// MoE Adaptive Sampler frontend: a badge on the sampler node with the expert the router
// picked, the stats table in the MoE Stats node and the training report in MoE Router Trainer.
// Plain ES module; ComfyUI imports every .js file under web/ at startup (docs/FRONTEND.md).
const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const SAMPLER_NODE = "MoEAdaptiveSampler";
const STATS_NODE = "MoEStats";
const TRAINER_NODE = "MoERouterTrainer";
const RUN_EVENT = "moe_sampler.run";
const ALL_ROUTERS = "(all)";

/** The one client for the pack's read-only routes under /moe_sampler/ (nodes/routes.py). */
export const moeClient = {
  async get(path, params = {}) {
    const query = new URLSearchParams(
      Object.entries(params).filter(([, value]) => value !== undefined && value !== null && value !== ""),
    ).toString();
    const response = await api.fetchApi(`/moe_sampler/${path}${query ? `?${query}` : ""}`);
    if (!response.ok) throw new Error(`GET /moe_sampler/${path} answered HTTP ${response.status}`);
    return response.json();
  },
  /** Per-expert aggregates; router omitted or "(all)" for every router. */
  stats(router) {
    return this.get("stats", { router: router === ALL_ROUTERS ? undefined : router });
  },
  routers() {
    return this.get("routers");
  },
  experts() {
    return this.get("experts");
  },
};

// ------------------------------------------------------------------------------------ badge

const formatSeconds = (s) => (s >= 10 ? `${s.toFixed(0)} s` : s >= 1 ? `${s.toFixed(1)} s` : `${(s * 1000).toFixed(0)} ms`);
const formatPercent = (p) => `${Math.round(p * 100)}%`;
const isNumber = (value) => typeof value === "number" && Number.isFinite(value);

/** The text of a badge for the runs of one execution (one entry per latent batch, usually one). */
export function badgeText(runs) {
  if (!runs?.length) return "";
  const run = runs[runs.length - 1];
  const parts = [run.expert ?? "?"];
  if (isNumber(run.confidence)) parts.push(`${formatPercent(run.confidence)} conf.`);
  if (isNumber(run.nfe)) parts.push(`${run.nfe} NFE`);
  if (isNumber(run.seconds)) parts.push(formatSeconds(run.seconds));
  let text = parts.join(" · ");
  if (runs.length > 1) text += ` (+${runs.length - 1})`;
  if (run.fallback) text = `⚠ fallback: ${text}`;
  return text;
}

function badgeColour(run) {
  if (run.fallback) return "#b8860b";
  if (!isNumber(run.confidence)) return "#4a6fa5";
  return run.confidence >= 0.75 ? "#2e7d4f" : run.confidence >= 0.4 ? "#4a6fa5" : "#8a5a9e";
}

function setRuns(node, runs) {
  if (!Array.isArray(runs) || runs.length === 0) return;
  node.moeRuns = runs;
  node.setDirtyCanvas?.(true, true);
}

/** Draws the badge as a pill just under the node (canvas renderer). */
function drawBadge(node, ctx) {
  const runs = node.moeRuns;
  if (!runs?.length || node.flags?.collapsed) return;
  const text = badgeText(runs);
  const router = runs[runs.length - 1].router;
  const label = router ? `${text} · router ${router}` : text;
  ctx.save();
  ctx.font = "bold 12px sans-serif";
  const width = Math.min(Math.max(node.size[0], 600), ctx.measureText(label).width + 20);
  const height = 22;
  const y = node.size[1] + 6;
  ctx.fillStyle = badgeColour(runs[runs.length - 1]);
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(0, y, width, height, 11);
  else ctx.rect(0, y, width, height);
  ctx.fill();
  ctx.fillStyle = "#ffffff";
  ctx.textBaseline = "middle";
  let shown = label;
  while (shown.length > 4 && ctx.measureText(shown).width > width - 20) shown = `${shown.slice(0, -2)}…`;
  ctx.fillText(shown, 10, y + height / 2 + 1);
  ctx.restore();
}

// ------------------------------------------------------------------------------- stats table

const COLUMNS = [
  ["expert", "Expert", (v) => v],
  ["runs", "Runs", (v) => `${v}`],
  ["quality_score", "Quality", (v) => v.toFixed(2)],
  ["speed_score", "Speed", (v) => v.toFixed(2)],
  ["efficiency_score", "Efficiency", (v) => v.toFixed(2)],
  ["success_rate", "Success", formatPercent],
  ["mean_confidence", "Conf.", formatPercent],
  ["mean_nfe", "NFE", (v) => v.toFixed(1)],
  ["mean_seconds", "Time", formatSeconds],
];

const STYLE = `
.moe-stats { font: 12px sans-serif; color: var(--input-text, #ddd); overflow: auto; box-sizing: border-box;
  padding: 4px; background: var(--comfy-input-bg, #222); border-radius: 6px; }
.moe-stats table { border-collapse: collapse; width: 100%; }
.moe-stats th, .moe-stats td { padding: 2px 6px; text-align: right; white-space: nowrap; }
.moe-stats th:first-child, .moe-stats td:first-child { text-align: left; }
.moe-stats th { border-bottom: 1px solid var(--border-color, #555); font-weight: 600; }
.moe-stats tr:nth-child(even) td { background: rgba(127, 127, 127, 0.12); }
.moe-stats .moe-note { opacity: 0.7; padding: 4px 2px; }
.moe-stats pre { margin: 0; font: 11px monospace; white-space: pre; }
`;

function ensureStyle() {
  if (document.getElementById("moe-sampler-style")) return;
  const style = document.createElement("style");
  style.id = "moe-sampler-style";
  style.textContent = STYLE;
  document.head.append(style);
}

/** Renders a /moe_sampler/stats payload (or the node's ui payload) into ``element``. */
export function renderStats(element, payload) {
  element.replaceChildren();
  const experts = payload?.experts ?? [];
  const note = document.createElement("div");
  note.className = "moe-note";
  const scope = payload?.router ? `router ${payload.router}` : "all routers";
  if (payload?.healthy === false) note.textContent = `Stats store unavailable: ${payload.problem ?? "unknown problem"}`;
  else if (experts.length === 0) note.textContent = `No runs recorded yet (${scope}).`;
  else note.textContent = `${payload.runs} run${payload.runs === 1 ? "" : "s"} · ${scope}`;
  if (experts.length > 0) {
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    for (const [, title] of COLUMNS) {
      const cell = document.createElement("th");
      cell.textContent = title;
      head.append(cell);
    }
    const body = table.createTBody();
    for (const entry of experts) {
      const row = body.insertRow();
      for (const [key, , format] of COLUMNS) {
        const value = entry[key];
        row.insertCell().textContent = value === null || value === undefined ? "n/a" : format(value);
      }
    }
    element.append(table);
  }
  element.append(note);
}

function renderText(element, text) {
  const pre = document.createElement("pre");
  pre.textContent = text;
  element.replaceChildren(pre);
}

function addStatsWidget(node) {
  ensureStyle();
  const element = document.createElement("div");
  element.className = "moe-stats";
  renderStats(element, { experts: [] });
  element.firstChild.textContent = "Run the workflow to show the stats table.";
  const widget = node.addDOMWidget("moe_stats_table", "moe_stats", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => 60 + 20 * (node.moeStatsRows ?? 3),
  });
  widget.serialize = false;
  node.moeStatsElement = element;
  node.setSize?.([Math.max(node.size[0], 560), Math.max(node.size[1], 180)]);
  return widget;
}

function showStats(node, payload) {
  if (!node.moeStatsElement) return;
  node.moeStatsRows = Math.max(payload?.experts?.length ?? 0, 1);
  renderStats(node.moeStatsElement, payload);
  node.setDirtyCanvas?.(true, true);
}

/** The trainer's text report, in a read-only box added under its widgets after the first run. */
function showReport(node, text) {
  if (!text) return;
  if (!node.moeReportElement) {
    ensureStyle();
    const element = document.createElement("div");
    element.className = "moe-stats";
    const widget = node.addDOMWidget("moe_training_report", "moe_report", element, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: () => Math.min(40 + 14 * (node.moeReportLines ?? 8), 420),
    });
    widget.serialize = false;
    node.moeReportElement = element;
  }
  node.moeReportLines = text.split("\n").length;
  renderText(node.moeReportElement, text);
  node.setSize?.([node.size[0], Math.max(node.size[1], node.computeSize?.()[1] ?? 0)]);
  node.setDirtyCanvas?.(true, true);
}

async function refreshStats(node) {
  const router = node.widgets?.find((w) => w.name === "router")?.value;
  try {
    showStats(node, await moeClient.stats(router));
  } catch (error) {
    if (node.moeStatsElement) renderText(node.moeStatsElement, `Could not load stats: ${error.message}`);
  }
}

// ------------------------------------------------------------------------------- extension

function chain(prototype, name, after) {
  const original = prototype[name];
  prototype[name] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function nodesOfType(type) {
  return (app.graph?._nodes ?? app.graph?.nodes ?? []).filter((node) => node.type === type || node.comfyClass === type);
}

let refreshTimer = null;
function scheduleStatsRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => nodesOfType(STATS_NODE).forEach((node) => refreshStats(node)), 300);
}

const extension = {
  name: "moe_sampler.ui",

  async setup() {
    // Live update: the sampler announces every finished run, keyed by its node id.
    api.addEventListener(RUN_EVENT, ({ detail }) => {
      if (!detail) return;
      const node = app.graph?.getNodeById?.(detail.node_id) ?? app.graph?.getNodeById?.(Number(detail.node_id));
      const runs = Array.isArray(detail.moe_run) ? detail.moe_run : [detail];
      if (node) setRuns(node, runs);
      scheduleStatsRefresh();
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === SAMPLER_NODE) {
      chain(nodeType.prototype, "onExecuted", function (message) {
        setRuns(this, message?.moe_run);
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) {
        drawBadge(this, ctx);
      });
    } else if (nodeData.name === TRAINER_NODE) {
      chain(nodeType.prototype, "onExecuted", function (message) {
        showReport(this, message?.text?.[0]);
      });
    } else if (nodeData.name === STATS_NODE) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        addStatsWidget(this);
      });
      chain(nodeType.prototype, "onExecuted", function (message) {
        const payload = message?.moe_stats?.[0];
        if (payload) showStats(this, payload);
        else if (message?.text?.[0] && this.moeStatsElement) renderText(this.moeStatsElement, message.text[0]);
      });
    }
  },
};

// Registered once per page even if the pack's web folder is served twice (two install folders,
// or WEB_DIRECTORY plus [tool.comfy] web): a second registration would be a console error.
const LOADED = Symbol.for("moe_sampler.ui.loaded");
if (!window[LOADED]) {
  window[LOADED] = true;
  app.registerExtension(extension);
}
