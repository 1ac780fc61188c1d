// The node's dashboard: reads `/v1/status` and `/metrics` of the node that served it, with the
// caller's capability token, and shows them. Everything is written with textContent: names
// of members and collections are data, never markup.
"use strict";

const TOKEN = "agentstore-token";
const REFRESH_MS = 2000;

// The token: from `#token=…` once (then removed from the address bar), else this tab's.
function token() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const given = hash.get("token");
  if (given) {
    sessionStorage.setItem(TOKEN, given);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN);
}

// A failed request, with the node's JSON error body when it sent one.
class Refused extends Error {
  constructor(status, code, message) {
    super(`${status} ${code}: ${message}`);
    this.status = status;
  }
}

async function get(path) {
  const headers = {};
  const held = token();
  if (held) headers.Authorization = `Bearer ${held}`;
  const response = await fetch(path, { headers, cache: "no-store" });
  const text = await response.text();
  if (!response.ok) {
    let code = "error";
    let message = text;
    try {
      const body = JSON.parse(text);
      code = body.error.code;
      message = body.error.message;
    } catch (_) {
      // Not the node's JSON error body: show the text as it came.
    }
    throw new Refused(response.status, code, message);
  }
  return text;
}

// Prometheus text format: one {name, labels, value} per sample line.
function samples(text) {
  const out = [];
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const raw of text.split("\n")) {
    if (raw.startsWith("#")) continue;
    const m = line.exec(raw);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(label)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

function named(all, name) {
  return all.filter((s) => s.name === name);
}

function key(labels, names) {
  return names.map((n) => labels[n] || "").join("\u0000");
}

// A histogram's series by the labels in `names`: count, sum, and its cumulative buckets.
function histograms(all, name, names) {
  const series = new Map();
  const of = (labels) => {
    const k = key(labels, names);
    if (!series.has(k)) series.set(k, { labels, count: 0, sum: 0, buckets: [] });
    return series.get(k);
  };
  for (const s of named(all, `${name}_count`)) of(s.labels).count = s.value;
  for (const s of named(all, `${name}_sum`)) of(s.labels).sum = s.value;
  for (const s of named(all, `${name}_bucket`)) {
    of(s.labels).buckets.push({ le: Number(s.labels.le), count: s.value });
  }
  for (const h of series.values()) h.buckets.sort((a, b) => a.le - b.le);
  return [...series.values()];
}

// The smallest bucket bound under which at least 99% of the observations fall.
function p99(h) {
  const want = h.count * 0.99;
  const bucket = h.buckets.find((b) => b.count >= want);
  return bucket ? bucket.le : Infinity;
}

function seconds(s) {
  if (!Number.isFinite(s)) return "more than the largest bucket";
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`;
  return `${s.toFixed(2)} s`;
}

function percent(ratio) {
  return `${(ratio * 100).toFixed(1)}%`;
}

function row(table, cells, attributes = {}) {
  const tr = document.createElement("tr");
  for (const [name, value] of Object.entries(attributes)) tr.dataset[name] = value;
  for (const cell of cells) {
    const td = document.createElement("td");
    td.textContent = cell;
    tr.appendChild(td);
  }
  table.tBodies[0].appendChild(tr);
}

function fill(id, rows, empty) {
  const table = document.getElementById(id);
  table.tBodies[0].replaceChildren();
  for (const [cells, attributes] of rows) row(table, cells, attributes);
  if (rows.length === 0) row(table, [empty]);
}

let previous = null; // the conflict counters of the last refresh, for a rate
let timer = null; // the next refresh

function render(status, metrics) {
  document.getElementById("node").textContent = status.node;
  document.getElementById("quorum-config").textContent =
    `Eventual keys: N=${status.replicas} replicas, W=${status.write_quorum}, R=${status.read_quorum}; ` +
    `${status.in_flight} requests in flight.`;

  fill(
    "members",
    status.members.map((m) => [
      [m.id, m.liveness, m.peer_addr || "", m.client_addr || "", percent(m.share)],
      { member: m.id, liveness: m.liveness },
    ]),
    "no members known",
  );

  fill(
    "collections",
    status.collections.map((c) => [
      [
        c.name,
        c.backend,
        c.consistency,
        c.conflict,
        `${c.replication.strategy} N=${c.replication.n} W=${c.replication.w} R=${c.replication.r}`,
        `${c.guarantee.level}: ${c.guarantee.summary}`,
        c.guarantee.caveat || "",
      ],
      { collection: c.name, level: c.consistency, delivered: c.guarantee.level },
    ]),
    "no collections",
  );

  const since = new Map(
    named(metrics, "agentstore_quorum_reachable_seconds_total").map((s) => [s.labels.op, s.value]),
  );
  const observed = named(metrics, "agentstore_observed_seconds_total")[0];
  fill(
    "quorum",
    named(metrics, "agentstore_quorum_reachable_ratio").map((s) => {
      const over = observed && observed.value > 0 ? percent(since.get(s.labels.op) / observed.value) : "";
      return [[s.labels.op, percent(s.value), over], { op: s.labels.op, ratio: String(s.value) }];
    }),
    "not measured yet",
  );

  fill(
    "lag",
    histograms(metrics, "agentstore_replication_lag_seconds", ["backend", "level"]).map((h) => [
      [
        h.labels.backend,
        h.labels.level,
        String(h.count),
        h.count > 0 ? seconds(h.sum / h.count) : "",
        h.count > 0 ? seconds(p99(h)) : "",
      ],
      { backend: h.labels.backend, level: h.labels.level, count: String(h.count) },
    ]),
    "no replicated writes yet",
  );

  const now = Date.now();
  const conflicts = named(metrics, "agentstore_node_conflicts_total");
  fill(
    "conflicts",
    conflicts.map((s) => {
      let rate = "";
      if (previous && previous.counts.has(s.labels.strategy)) {
        const elapsed = (now - previous.at) / 1000;
        rate = ((s.value - previous.counts.get(s.labels.strategy)) / elapsed).toFixed(2);
      }
      return [[s.labels.strategy, String(s.value), rate], { strategy: s.labels.strategy, count: String(s.value) }];
    }),
    "none counted",
  );
  previous = { at: now, counts: new Map(conflicts.map((s) => [s.labels.strategy, s.value])) };

  fill(
    "violations",
    named(metrics, "agentstore_consistency_violations_total").map((s) => [
      [s.labels.guarantee, String(s.value)],
      { guarantee: s.labels.guarantee, count: String(s.value) },
    ]),
    "none counted",
  );

  const raft = status.raft;
  fill(
    "raft",
    [
      ["member", raft.id],
      ["state", raft.state],
      ["term", raft.term],
      ["leader", raft.leader || "none known"],
      ["voters", raft.voters.join(", ")],
      ["learners", raft.learners.join(", ") || "none"],
      ["last log / committed / applied", [raft.last_log, raft.committed, raft.applied].map((x) => x ?? "-").join(" / ")],
      ["leader acknowledged by a quorum", raft.quorum_ack_ms == null ? "" : `${raft.quorum_ack_ms} ms ago`],
      ["failure", raft.failure || "none"],
    ].map(([name, value]) => [[name, String(value)], { field: name }]),
    "",
  );
}

function show(error) {
  const banner = document.getElementById("error");
  banner.hidden = !error;
  banner.textContent = error ? error.message : "";
  const needsToken = error instanceof Refused && error.status === 401;
  document.getElementById("login").hidden = !needsToken;
  if (needsToken) document.getElementById("content").hidden = true;
}

async function refresh() {
  clearTimeout(timer);
  try {
    const [status, metrics] = await Promise.all([get("/v1/status"), get("/metrics")]);
    render(JSON.parse(status), samples(metrics));
    document.getElementById("content").hidden = false;
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.state = "ready";
    show(null);
  } catch (error) {
    document.body.dataset.state = "failed";
    show(error);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const given = document.getElementById("token-input").value.trim();
  if (given) sessionStorage.setItem(TOKEN, given);
  refresh();
});

refresh();
