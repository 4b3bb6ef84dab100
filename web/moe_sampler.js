// MoE Adaptive Sampler frontend: a "why this expert" panel on the sampler node, the stats table in
// MoE Stats, the training report in MoE Router Trainer, pool-aware `mode` choices and router lists
// that follow new routers. Everything shown is a DOM widget (rendered by the classic canvas and
// by the Nodes 2.0 renderer) fed from the node's `ui` output, and the last result is kept in the
// node's properties, so it survives workflow tab switches and page reloads; the server also sends
// a chart as the node's image output (core's image preview). Plain ES module; ComfyUI imports
// every .js file under web/ at startup (docs/FRONTEND.md).
const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const SAMPLER_NODE = "MoEAdaptiveSampler";
const AB_NODE = "MoEABCompare";
const STATS_NODE = "MoEStats";
const TRAINER_NODE = "MoERouterTrainer";
const POOL_NODE = "MoEExpertPool";
const EXPERT_NODE = "MoEExpert";
const BUILTIN_EXPERT_NODE = "MoEBuiltinExpert";
const RUN_EVENT = "moe_sampler.run";
const ALL_ROUTERS = "(all)";
const BUILTIN_ROUTER = "(built-in default)";
const MANUAL_ROUTER = "manual";
const CUSTOM_SLOTS = 4;
const PANEL_WIDTH = 540;

// Node properties (saved with the workflow, so they survive tab switches and reloads).
const RUN_PROPERTY = "moe_last_run";
const STATS_PROPERTY = "moe_last_stats";
const REPORT_PROPERTY = "moe_last_report";

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
  /** Per-expert aggregates; router omitted or "(all)" for every router; ``filters``: source, size. */
  stats(router, filters = {}) {
    return this.get("stats", { router: router === ALL_ROUTERS ? undefined : router, ...filters });
  },
  routers() {
    return this.get("routers");
  },
  experts() {
    return this.get("experts");
  },
};

// ------------------------------------------------------------------------------- formatting

const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
const formatSeconds = (s) => (s >= 10 ? `${s.toFixed(0)} s` : s >= 1 ? `${s.toFixed(1)} s` : `${(s * 1000).toFixed(0)} ms`);
const formatPercent = (p) => `${Math.round(p * 100)}%`;

/** One line for one run: expert, model calls, time, and how it was chosen. */
export function runLine(run) {
  if (!run) return "";
  const parts = [run.expert ?? "?"];
  if (isNumber(run.nfe)) parts.push(`${run.nfe} model calls`);
  if (isNumber(run.seconds)) parts.push(formatSeconds(run.seconds));
  if (run.forced) parts.push("forced with mode");
  else if (isNumber(run.confidence)) parts.push(`router ${run.router} (${formatPercent(run.confidence)} sure)`);
  let text = parts.join(" · ");
  if (run.fallback) text = `⚠ fallback: ${run.requested} failed, ${text}`;
  return text;
}

/** The text of the badge line for the runs of one execution (kept for other extensions). */
export function badgeText(runs) {
  if (!runs?.length) return "";
  return runs.length === 1 ? runLine(runs[0]) : runs.map((run, i) => `${i + 1}: ${runLine(run)}`).join("\n");
}

// ------------------------------------------------------------------------------------ style

const STYLE = `
.moe-panel { font: 12px sans-serif; color: var(--input-text, #ddd); overflow: auto; box-sizing: border-box;
  padding: 4px 6px; background: var(--comfy-input-bg, #222); border-radius: 6px; width: 100%; height: 100%; }
.moe-panel table { border-collapse: collapse; width: 100%; }
.moe-panel th, .moe-panel td { padding: 1px 6px; text-align: right; white-space: nowrap; }
.moe-panel th:first-child, .moe-panel td:first-child { text-align: left; }
.moe-panel th { border-bottom: 1px solid var(--border-color, #555); font-weight: 600; }
.moe-panel tr:nth-child(even) td { background: rgba(127, 127, 127, 0.12); }
.moe-panel tr.moe-picked td { font-weight: 700; color: #7fc8ff; }
.moe-panel .moe-note { opacity: 0.75; padding: 3px 1px; white-space: normal; }
.moe-panel .moe-pill { display: inline-block; padding: 2px 8px; border-radius: 10px; color: #fff;
  font-weight: 600; margin: 2px 0; white-space: normal; }
.moe-panel .moe-stale { background: #7a5b12; color: #fff; padding: 2px 6px; border-radius: 4px; margin-bottom: 3px; }
.moe-panel.moe-is-stale .moe-body { opacity: 0.45; }
.moe-panel pre { margin: 0; font: 11px monospace; white-space: pre; }
`;

function ensureStyle() {
  if (document.getElementById("moe-sampler-style")) return;
  const style = document.createElement("style");
  style.id = "moe-sampler-style";
  style.textContent = STYLE;
  document.head.append(style);
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function pillColour(run) {
  if (run.fallback) return "#9a6b00";
  if (run.forced || !isNumber(run.confidence)) return "#4a6fa5";
  return run.confidence >= 0.75 ? "#2e7d4f" : run.confidence >= 0.4 ? "#4a6fa5" : "#7d4f8e";
}

// ----------------------------------------------------------------------- why-this-expert panel

/** Renders the runs of one execution (all entries of a batch/list) into ``root``. */
export function renderRuns(root, saved) {
  root.replaceChildren();
  const runs = saved?.runs ?? [];
  root.classList.toggle("moe-is-stale", saved?.status === "stale");
  if (saved?.status === "stale") {
    root.append(element("div", "moe-stale", `⚠ Stale: ${saved.reason ?? "the last run did not finish"}. Showing the previous result.`));
  }
  if (!runs.length) {
    root.append(element("div", "moe-note", "Run the workflow to see which expert the router picks and why."));
    return;
  }
  const body = element("div", "moe-body");
  root.append(body);
  if (runs.length > 1) body.append(element("div", "moe-note", `${runs.length} runs in this execution (one per latent list entry):`));
  runs.forEach((run, index) => {
    const pill = element("div", "moe-pill", (runs.length > 1 ? `${index + 1}. ` : "") + runLine(run));
    pill.style.background = pillColour(run);
    body.append(pill);
    const why = run.why;
    if (!why) return;
    if (why.summary) body.append(element("div", "moe-note", `Why: ${why.summary}.`));
    if (why.experts?.length) {
      const table = element("table");
      const head = table.createTHead().insertRow();
      for (const title of ["Expert", "Expected quality", "Model calls", "Est. time", "Score"]) head.append(element("th", "", title));
      const tbody = table.createTBody();
      for (const entry of why.experts) {
        const row = tbody.insertRow();
        if (entry.picked) row.className = "moe-picked";
        row.insertCell().textContent = `${entry.picked ? "▶ " : ""}${entry.expert}`;
        row.insertCell().textContent = isNumber(entry.expected_quality) ? entry.expected_quality.toFixed(2) : "n/a";
        row.insertCell().textContent = `${entry.expected_calls ?? "n/a"}`;
        row.insertCell().textContent = isNumber(entry.expected_seconds) ? `~${formatSeconds(entry.expected_seconds)}` : "n/a";
        row.insertCell().textContent = isNumber(entry.score) ? entry.score.toFixed(3) : "n/a";
      }
      body.append(table);
    }
    const router = why.router;
    if (run.learning?.text) body.append(element("div", "moe-note", `Learning: ${run.learning.text}`));
    else if (router?.learning) body.append(element("div", "moe-note", `Router ${router.label}: ${router.learning}.`));
    if (run.estimate && isNumber(run.estimate.quality)) {
      const how = run.estimate.calibrated ? "calibrated on this model's audited and swept runs"
        : "raw estimate: not yet calibrated on this model";
      body.append(element("div", "moe-note", `Estimated quality of this run: ${run.estimate.quality.toFixed(2)} (${how}).`));
    }
    if (run.audited && run.audit) {
      const quality = isNumber(run.audit.quality) ? `measured quality ${run.audit.quality.toFixed(2)}` : "audit failed";
      body.append(element("div", "moe-note", `Audited: ${quality} (+${formatSeconds(run.audit_seconds ?? 0)} for the reference run).`));
    }
    if (run.warning) body.append(element("div", "moe-stale", `⚠ ${run.warning}`));
    if (run.ab) body.append(element("pre", "", abText(run.ab)));
  });
  if (saved?.at) body.append(element("div", "moe-note", `Run at ${new Date(saved.at).toLocaleString()}.`));
}

function change(value, fewer) {
  if (!isNumber(value)) return "n/a";
  if (Math.abs(value) < 0.005) return "the same";
  return `${Math.round(Math.abs(value) * 100)}% ${value < 0 ? fewer : "more"}`;
}

/** The A/B node's comparison: model calls and time of each run, and how they differ. */
export function abText(ab) {
  const lines = [
    `MoE pick  ${ab.moe.expert}: ${ab.moe.model_calls} model calls, ${formatSeconds(ab.moe.seconds)}`,
    `Baseline  ${ab.baseline.expert}: ${ab.baseline.model_calls} model calls, ${formatSeconds(ab.baseline.seconds)}`,
    `MoE vs baseline: ${change(ab.calls_change, "fewer")} model calls, ${change(ab.time_change, "less")} time`,
  ];
  if (isNumber(ab.latent_difference)) lines.push(`Latent difference (relative): ${ab.latent_difference.toFixed(4)}`);
  return lines.join("\n");
}

function panelLines(saved) {
  const runs = saved?.runs ?? [];
  let lines = 2 + (saved?.status === "stale" ? 1 : 0);
  for (const run of runs) lines += 6 + (run.why?.experts?.length ?? 0) + (run.why?.experts?.length ? 1 : 0) + (run.ab ? 4 : 0);
  return Math.max(lines, 2);
}

function addPanel(node, name, minWidth, lines) {
  ensureStyle();
  const root = element("div", "moe-panel");
  const widget = node.addDOMWidget(name, "moe_panel", root, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => Math.min(24 + 17 * lines(), 520),
  });
  widget.serialize = false;
  node.setSize?.([Math.max(node.size[0], minWidth), node.size[1]]);
  return root;
}

/** Re-fit the node to its widgets (the panel grew) without shrinking what the user set. */
function refit(node, minWidth = 0) {
  const wanted = node.computeSize?.();
  if (wanted) node.setSize?.([Math.max(node.size[0], wanted[0], minWidth), Math.max(node.size[1], wanted[1])]);
  node.setDirtyCanvas?.(true, true);
}

/** Tell the workflow's change tracker that node properties changed, so that tab switches and the
 *  page's workflow persistence keep them. */
function persist() {
  try {
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
  } catch {
    // An older or newer frontend without the change tracker: properties still save with the workflow.
  }
}

function showRuns(node) {
  if (!node.moeRunElement) return;
  const saved = node.properties?.[RUN_PROPERTY];
  renderRuns(node.moeRunElement, saved);
  refit(node, saved?.runs?.length ? PANEL_WIDTH : 0); // wide enough for the table's five columns
}

/** Store the runs of a finished execution in the node's properties and show them. */
export function setRuns(node, runs) {
  if (!Array.isArray(runs) || runs.length === 0) return;
  node.properties ??= {};
  node.properties[RUN_PROPERTY] = { runs, status: "fresh", at: Date.now() };
  node.moeRuns = runs;
  showRuns(node);
  persist();
}

function markStale(node, reason) {
  const saved = node.properties?.[RUN_PROPERTY];
  if (!saved?.runs?.length) return;
  saved.status = "stale";
  saved.reason = reason;
  showRuns(node);
  persist();
}

// ------------------------------------------------------------------------------- stats table

const COLUMNS = [
  ["expert", "Expert", (v) => v],
  ["runs", "Runs", (v) => `${v}`],
  ["quality_score", "Quality", (v) => v.toFixed(2)],
  ["speed_score", "Speed", (v) => v.toFixed(2)],
  ["efficiency_score", "Efficiency", (v) => v.toFixed(2)],
  ["success_rate", "Success", formatPercent],
  ["mean_confidence", "Router sure", formatPercent],
  ["mean_nfe", "Model calls", (v) => v.toFixed(1)],
  ["mean_seconds", "Time", formatSeconds],
];

/** Renders a /moe_sampler/stats payload (or the node's ui payload) into ``root``. */
export function renderStats(root, payload) {
  root.replaceChildren();
  const experts = payload?.experts ?? [];
  const note = element("div", "moe-note");
  const scope = payload?.router ? `router ${payload.router}` : "all routers";
  if (payload?.healthy === false) note.textContent = `Stats store unavailable: ${payload.problem ?? "unknown problem"}`;
  else if (experts.length === 0) note.textContent = payload ? `No runs recorded yet (${scope}).` : "Run the workflow to show the stats table.";
  else note.textContent = `${payload.runs} run${payload.runs === 1 ? "" : "s"} · ${scope}`;
  if (payload?.averaged) note.textContent += ` · averaged: ${payload.averaged}`;
  if (experts.length > 0) {
    const table = element("table");
    const head = table.createTHead().insertRow();
    for (const [, title] of COLUMNS) head.append(element("th", "", title));
    const body = table.createTBody();
    for (const entry of experts) {
      const row = body.insertRow();
      for (const [key, , format] of COLUMNS) {
        const value = entry[key];
        row.insertCell().textContent = value === null || value === undefined ? "n/a" : format(value);
      }
    }
    root.append(table);
  }
  root.append(note);
}

function renderText(root, text) {
  root.replaceChildren(element("pre", "", text));
}

function showStats(node, payload, keep = true) {
  if (!node.moeStatsElement) return;
  if (keep && payload) {
    node.properties ??= {};
    node.properties[STATS_PROPERTY] = payload;
    persist();
  }
  renderStats(node.moeStatsElement, payload);
  refit(node);
}

async function refreshStats(node) {
  // A node whose model input is connected filters by that model, which only the server can
  // fingerprint: it updates when it runs, not from here.
  if (node.inputs?.some((slot) => slot.name === "model" && slot.link != null)) return;
  const router = widgetValue(node, "router");
  try {
    showStats(node, await moeClient.stats(router, { source: widgetValue(node, "source"), size: widgetValue(node, "size") }));
  } catch (error) {
    if (node.moeStatsElement) renderText(node.moeStatsElement, `Could not load stats: ${error.message}`);
  }
}

/** The trainer's text report, in a read-only box (kept in the node's properties). */
function showReport(node, text, keep = true) {
  if (!text || !node.moeReportElement) return;
  if (keep) {
    node.properties ??= {};
    node.properties[REPORT_PROPERTY] = text;
    persist();
  }
  renderText(node.moeReportElement, text);
  refit(node);
}

// ------------------------------------------------------------------- pool-aware mode choices

let expertCatalog = null; // from /moe_sampler/experts: [{name, compat, in_default_pool}]

async function loadExperts() {
  if (expertCatalog) return expertCatalog;
  try {
    expertCatalog = await moeClient.experts();
  } catch {
    expertCatalog = null;
  }
  return expertCatalog;
}

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

function originOf(node, inputName) {
  const input = node?.inputs?.find((slot) => slot.name === inputName);
  if (input?.link == null) return null;
  const link = app.graph?.links?.get?.(input.link) ?? app.graph?.links?.[input.link];
  return link ? app.graph.getNodeById(link.origin_id) : null;
}

/** Name of the expert an MoE Expert / MoE Built-in Expert node makes (as nodes/comfy_experts.py). */
function expertNodeName(node) {
  const type = node?.comfyClass ?? node?.type;
  if (type === BUILTIN_EXPERT_NODE) return widgetValue(node, "expert") ?? null;
  if (type !== EXPERT_NODE) return null;
  const parts = [widgetValue(node, "sampler_name"), widgetValue(node, "scheduler"), widgetValue(node, "steps")];
  const stop = widgetValue(node, "stop_rule");
  if (stop && stop !== "none") parts.push(stop);
  return parts.every((p) => p !== undefined && p !== null && p !== "") ? parts.join("/") : null;
}

/**
 * The expert names a sampler's pool holds, in pool order, or null when the graph does not say
 * (a reroute, subgraph or another pack's node in between): then every built-in is offered and the
 * server checks the choice when the prompt runs.
 */
export function poolNames(sampler, catalog, seen = new Set()) {
  const origin = originOf(sampler, "expert_pool");
  if (!origin) return (catalog ?? []).filter((e) => e.in_default_pool).map((e) => e.name);
  return poolNodeNames(origin, catalog, seen);
}

function poolNodeNames(pool, catalog, seen) {
  if ((pool.comfyClass ?? pool.type) !== POOL_NODE || seen.has(pool.id)) return null;
  seen.add(pool.id);
  const names = [];
  const base = originOf(pool, "pool");
  if (base) {
    const inner = poolNodeNames(base, catalog, seen);
    if (inner === null) return null;
    names.push(...inner);
  }
  for (const entry of catalog ?? []) if (widgetValue(pool, entry.name) === true) names.push(entry.name);
  for (let i = 1; i <= CUSTOM_SLOTS; i++) {
    const origin = originOf(pool, `expert_${i}`);
    if (!origin) continue;
    const name = expertNodeName(origin);
    if (name === null) return null;
    names.push(name);
  }
  return [...new Set(names)];
}

function setComboValues(widget, values) {
  if (!widget?.options) return;
  const current = widget.value;
  const next = [...values];
  // A value that is no longer offered stays selected (and listed) so nothing changes silently;
  // the server names the problem when the prompt runs.
  if (current !== undefined && !next.includes(current)) next.push(current);
  const old = widget.options.values;
  if (Array.isArray(old) && old.length === next.length && old.every((v, i) => v === next[i])) return;
  widget.options.values = next;
}

async function refreshModes() {
  const catalog = await loadExperts();
  for (const node of nodesOfType(SAMPLER_NODE, AB_NODE)) {
    const widget = node.widgets?.find((w) => w.name === "mode");
    if (!widget) continue;
    const names = poolNames(node, catalog);
    const offered = names ?? (catalog ?? []).map((e) => e.name);
    setComboValues(widget, ["auto", ...offered]);
    node.moePoolNames = names;
  }
}

let modeTimer = null;
function scheduleModeRefresh() {
  clearTimeout(modeTimer);
  modeTimer = setTimeout(() => refreshModes(), 150);
}

// ------------------------------------------------------------------------- router dropdowns

/**
 * The values of a router dropdown with ``files`` as the router files: the entries that are not
 * files ("(built-in default)", "(all)", "manual", and whatever the server offers besides) keep
 * their places, files come after the leading ones.
 */
export function routerValues(current, files) {
  const special = (current ?? []).filter((v) => typeof v === "string" && !v.endsWith(".safetensors"));
  const leading = special.filter((v) => v.startsWith("("));
  const trailing = special.filter((v) => !v.startsWith("("));
  return [...leading, ...files.filter((f) => !special.includes(f)), ...trailing];
}

/** Re-read the routers folder and update every router dropdown (sampler, A/B, stats). */
export async function refreshRouters() {
  let routers;
  try {
    routers = await moeClient.routers();
  } catch {
    return;
  }
  const files = routers.filter((r) => !r.error).map((r) => r.name);
  for (const node of nodesOfType(SAMPLER_NODE, AB_NODE, STATS_NODE)) {
    const widget = node.widgets?.find((w) => w.name === "router");
    if (!widget?.options) continue;
    const current = Array.isArray(widget.options.values) ? widget.options.values : [];
    const fallback = (node.comfyClass ?? node.type) === STATS_NODE ? [ALL_ROUTERS, BUILTIN_ROUTER, MANUAL_ROUTER] : [BUILTIN_ROUTER];
    setComboValues(widget, routerValues(current.length ? current : fallback, files));
  }
  app.graph?.setDirtyCanvas?.(true, true);
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

function nodesOfType(...types) {
  return (app.graph?._nodes ?? app.graph?.nodes ?? []).filter((node) => types.includes(node.comfyClass ?? node.type));
}

function nodeById(id) {
  if (id === null || id === undefined) return null;
  return app.graph?.getNodeById?.(id) ?? app.graph?.getNodeById?.(Number(id)) ?? null;
}

let statsTimer = null;
function scheduleStatsRefresh() {
  clearTimeout(statsTimer);
  statsTimer = setTimeout(() => nodesOfType(STATS_NODE).forEach((node) => refreshStats(node)), 300);
}

const running = new Set(); // ids of sampler nodes that started executing and have not finished

function onRunEnded(detail, reason) {
  const failed = detail?.node_id !== undefined && detail?.node_id !== null ? String(detail.node_id) : null;
  for (const node of nodesOfType(SAMPLER_NODE, AB_NODE)) {
    const id = String(node.id);
    if (running.has(id) || id === failed) markStale(node, reason);
  }
  running.clear();
}

const extension = {
  name: "moe_sampler.ui",

  async setup() {
    // Live update: the sampler announces every finished run, keyed by its node id.
    api.addEventListener(RUN_EVENT, ({ detail }) => {
      if (!detail) return;
      running.delete(String(detail.node_id));
      scheduleStatsRefresh();
    });
    api.addEventListener("executing", ({ detail }) => {
      const id = detail && typeof detail === "object" ? detail.node : detail;
      const node = nodeById(id);
      if (node && [SAMPLER_NODE, AB_NODE].includes(node.comfyClass ?? node.type)) running.add(String(id));
    });
    api.addEventListener("executed", ({ detail }) => running.delete(String(detail?.display_node ?? detail?.node)));
    api.addEventListener("execution_success", () => running.clear());
    api.addEventListener("execution_interrupted", ({ detail }) => onRunEnded(detail, "the last run was cancelled"));
    api.addEventListener("execution_error", ({ detail }) =>
      onRunEnded(detail, `the last run failed${detail?.exception_message ? `: ${String(detail.exception_message).split("\n")[0]}` : ""}`));
    refreshRouters();
  },

  async afterConfigureGraph() {
    scheduleModeRefresh();
    refreshRouters();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData.name;
    if (name === SAMPLER_NODE || name === AB_NODE) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        this.moeRunElement = addPanel(this, "moe_why", PANEL_WIDTH, () => panelLines(this.properties?.[RUN_PROPERTY]));
        showRuns(this);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        showRuns(this); // properties restored from the saved workflow (tab switch, reload)
      });
      chain(nodeType.prototype, "onExecuted", function (message) {
        setRuns(this, message?.moe_run);
      });
      chain(nodeType.prototype, "onConnectionsChange", () => scheduleModeRefresh());
    } else if (name === POOL_NODE || name === EXPERT_NODE || name === BUILTIN_EXPERT_NODE) {
      chain(nodeType.prototype, "onConnectionsChange", () => scheduleModeRefresh());
      chain(nodeType.prototype, "onWidgetChanged", () => scheduleModeRefresh());
      chain(nodeType.prototype, "onNodeCreated", function () {
        for (const widget of this.widgets ?? []) {
          const callback = widget.callback;
          widget.callback = function (...args) {
            const result = callback?.apply(this, args);
            scheduleModeRefresh();
            return result;
          };
        }
      });
    } else if (name === TRAINER_NODE) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        this.moeReportElement = addPanel(this, "moe_training_report", 420,
          () => (this.properties?.[REPORT_PROPERTY] ?? "").split("\n").length || 1);
        renderText(this.moeReportElement, "The training report appears here once the trainer has run.");
      });
      chain(nodeType.prototype, "onConfigure", function () {
        showReport(this, this.properties?.[REPORT_PROPERTY], false);
      });
      chain(nodeType.prototype, "onExecuted", function (message) {
        showReport(this, message?.text?.[0]);
        refreshRouters(); // the trainer saved a router: offer it in every router dropdown now
      });
    } else if (name === STATS_NODE) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        this.moeStatsElement = addPanel(this, "moe_stats_table", 560,
          () => 3 + Math.max(this.properties?.[STATS_PROPERTY]?.experts?.length ?? 0, 1));
        renderStats(this.moeStatsElement, null);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        const saved = this.properties?.[STATS_PROPERTY];
        if (saved) showStats(this, saved, false);
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
