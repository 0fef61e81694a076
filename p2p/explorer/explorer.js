// The potchain explorer: reads this node's RPC and follows its event stream.
//
// No framework and no build step. Every value from the node reaches the page
// as text (textContent), never as markup. The page never polls: it loads
// everything once, then reloads what changed when the event stream
// (/v1/events) announces a new head.

"use strict";

const BLOCKS_SHOWN = 20;
const LOSS_PAGE = 1000;
const LOSS_TABLE_ROWS = 50;
const RECONNECT_SECONDS = [1, 2, 5, 10];
const SVG = "http://www.w3.org/2000/svg";

const explorer = {
  chainId: null, // from /v1/status, read until it answers
  head: null, // {height, hash} of the newest head seen
  headEvents: 0, // heads that arrived through the event stream
  lossHeights: [], // /v1/history/loss entries, oldest first
  lossByHeight: new Map(), // the same by height
  lossFrom: 1, // the next height to ask /v1/history/loss for
  newestBlockShown: -1,
  finalityText: "",
  pending: { height: 0, blocks: new Set() }, // training blocks kept for the height being decided
  signers: new Set(), // validators whose precommits certify the head
  refreshing: null, // the refresh in progress (a Promise), if any
  refreshAgain: false,
  reconnects: 0,
};

// --- Reading the RPC ---------------------------------------------------------------

class RpcError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function rpc(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Accept: "application/json", ...(options.headers || {}) },
  });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body && typeof body.error === "string" ? body.error : `${response.status} ${response.statusText}`;
    throw new RpcError(response.status, message, response.headers.get("Retry-After"));
  }
  return body;
}

// --- Small DOM helpers ---------------------------------------------------------------

function byId(id) {
  return document.getElementById(id);
}

function element(tag, options = {}, ...children) {
  const node = document.createElement(tag);
  if (options.className) node.className = options.className;
  if (options.title) node.title = options.title;
  if (options.href) node.href = options.href;
  for (const [name, value] of Object.entries(options.data || {})) node.dataset[name] = String(value);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function cell(content, className) {
  return element("td", { className }, content);
}

function shortHex(hex) {
  return hex ? `${hex.slice(0, 8)}…` : "";
}

function hashLink(hash) {
  const code = element("code", { title: hash }, shortHex(hash));
  return element("a", { href: `/v1/blocks/${hash}`, title: `${hash} (JSON)` }, code);
}

function key(hex) {
  return element("code", { title: hex }, shortHex(hex));
}

function loss(value) {
  return value === null || value === undefined ? "–" : value.toFixed(3);
}

function gain(value) {
  if (value === null || value === undefined) return "–";
  return `${value >= 0 ? "+" : "−"}${Math.abs(value).toFixed(4)}`;
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function integer(value) {
  return Number(value).toLocaleString("en-US");
}

function replaceRows(tbody, rows, emptyText, columns) {
  if (rows.length === 0) {
    const empty = element("td", { className: "note" }, emptyText);
    empty.colSpan = columns;
    rows = [element("tr", {}, empty)];
  }
  tbody.replaceChildren(...rows);
}

function showError(tbody, columns, what, error) {
  const message = element("td", { className: "error" }, `${what}: ${error.message}`);
  message.colSpan = columns;
  tbody.replaceChildren(element("tr", {}, message));
}

// --- The header: head, finality, voting ------------------------------------------------

function setHead(height, hash) {
  if (explorer.head && explorer.head.height >= height) return;
  explorer.head = { height, hash };
  byId("head-height").textContent = integer(height);
  const code = byId("head-hash");
  code.textContent = shortHex(hash);
  code.title = hash;
  document.body.dataset.headHeight = String(height);
}

// /v1/status is read once (it evaluates the model's report losses); the rest comes from cheap reads.
function renderStatus(status) {
  explorer.chainId = status.chain_id;
  byId("chain-id").textContent = status.chain_id;
  setHead(status.head_height, status.head_hash);
}

function renderFinality(finality) {
  setHead(finality.finalized_height, finality.finalized_hash);
  const voting = finality.voting;
  byId("voting").textContent = `height ${integer(voting.height)}, round ${voting.round} (${voting.step})`;
  const commit = finality.commit;
  let text = `Height ${integer(finality.finalized_height)} is final`;
  if (commit) {
    const share = (100 * commit.signing_stake) / commit.total_stake;
    text += ` (round ${commit.round}: ${commit.signatures.length} signatures, ${share.toFixed(0)}% of the stake)`;
  }
  explorer.finalityText = `${text}.`;
  explorer.pending = { height: finality.voting.height, blocks: new Set(finality.pending.map((block) => block.hash)) };
  explorer.signers = new Set(commit ? commit.signatures.map((signature) => signature.validator) : []);
  renderPending();
}

// The training blocks kept for the height being decided: from /v1/finality, then each `block` event.
function renderPending() {
  const { height, blocks } = explorer.pending;
  const count = `${blocks.size} training block${blocks.size === 1 ? "" : "s"}`;
  byId("finality").textContent = `${explorer.finalityText} ${count} waiting for height ${integer(height)}.`;
}

// --- Validators and peers -----------------------------------------------------------------

function renderValidators(answer) {
  const signers = explorer.signers;
  const rows = answer.validators.map((validator) => {
    const meter = element("meter");
    meter.min = 0;
    meter.max = answer.total_stake;
    meter.value = validator.stake;
    const share = (100 * validator.stake) / answer.total_stake;
    meter.title = `${share.toFixed(1)}% of ${integer(answer.total_stake)}`;
    meter.textContent = `${share.toFixed(1)}%`;
    const signed = signers.has(validator.address);
    return element(
      "tr",
      { data: { stake: validator.stake, signed } },
      cell(key(validator.address)),
      cell(integer(validator.stake), "number"),
      cell(meter),
      cell(signed ? "yes" : "no", signed ? "verdict-applied" : "verdict-none"),
    );
  });
  replaceRows(byId("validators").tBodies[0], rows, "No validators.", 4);
}

function renderPeers(answer) {
  const rows = answer.peers.map((peer) =>
    element(
      "tr",
      {},
      cell(element("code", { title: peer.peer_id }, peer.peer_id ? `${peer.peer_id.slice(0, 14)}…` : "?")),
      cell(peer.connected === false ? "no" : "yes"),
      cell(peer.head_height === null || peer.head_height === undefined ? "–" : integer(peer.head_height), "number"),
      cell(peer.score === undefined ? "–" : String(peer.score), "number"),
    ),
  );
  replaceRows(byId("peers").tBodies[0], rows, "No peers (a node without a network).", 4);
  byId("peer-count").textContent = integer(answer.peers.filter((peer) => peer.connected !== false).length);
}

// --- Recent blocks ---------------------------------------------------------------------------

// The gains of a tested training block in nats per byte, from the loss history of its height
// (/v1/blocks gives them as Q.16 loss totals, which depend on how many bytes were tested).
function gainsOf(height, hash) {
  const entry = explorer.lossByHeight.get(height);
  const update = entry && [...entry.confirmed, ...entry.rejected].find((candidate) => candidate.hash === hash);
  if (!update) return null;
  return {
    test: entry.test_loss_before - update.test_loss_after,
    validation: update.validation_loss_before - update.validation_loss_after,
  };
}

function verdictOf(height, training) {
  const who = `miner ${training.miner}${training.committed ? "" : " (uncommitted)"}`;
  const gains = gainsOf(height, training.hash);
  const shown = gains
    ? `test ${gain(gains.test)} · validation ${gain(gains.validation)}`
    : `test ${training.test_gain ?? "–"} · validation ${training.validation_gain} (Q.16 totals)`;
  const kind = training.applied ? "applied" : "rejected";
  return element(
    "div",
    { className: `verdict verdict-${kind}`, title: `training block ${training.hash}, ${who}` },
    element("strong", {}, training.applied ? "Applied" : "Rejected"),
    " ",
    element("code", {}, shortHex(training.hash)),
    " ",
    element("span", { className: "gains" }, shown),
  );
}

function renderBlocks(answer) {
  const previousNewest = explorer.newestBlockShown;
  const rows = answer.blocks.map((block) => {
    const verdicts =
      block.training.length === 0
        ? element("span", { className: "verdict verdict-none" }, "none named")
        : block.training.map((training) => verdictOf(block.height, training));
    const row = element(
      "tr",
      { data: { height: block.height }, className: previousNewest >= 0 && block.height > previousNewest ? "new" : "" },
      cell(integer(block.height), "number"),
      cell(hashLink(block.hash)),
      cell(clock(block.timestamp)),
      cell(String(block.round), "number"),
      cell(key(block.proposer)),
      element("td", {}, ...[verdicts].flat()),
    );
    return row;
  });
  if (answer.blocks.length > 0) explorer.newestBlockShown = answer.blocks[0].height;
  replaceRows(byId("blocks").tBodies[0], rows, "No decided blocks yet.", 6);
}

// --- The loss chart ------------------------------------------------------------------------------

async function loadLossHistory() {
  for (let page = 0; page < 100; page += 1) {
    const answer = await rpc(`/v1/history/loss?from=${explorer.lossFrom}&limit=${LOSS_PAGE}`);
    for (const entry of answer.heights) {
      explorer.lossHeights.push(entry);
      explorer.lossByHeight.set(entry.height, entry);
      explorer.lossFrom = entry.height + 1;
    }
    if (answer.next === null || answer.next === undefined) return;
    explorer.lossFrom = answer.next;
  }
}

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(low, high, count) {
  const span = high - low || 1;
  const rough = span / count;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= rough) || rough;
  const ticks = [];
  for (let value = Math.ceil(low / step) * step; value <= high + step * 1e-9; value += step) ticks.push(value);
  return { ticks, step };
}

function renderLossChart() {
  const chart = byId("loss-chart");
  const tested = explorer.lossHeights.filter((entry) => entry.test_loss_before !== null);
  const width = 640;
  const height = 260;
  const margin = { left: 52, right: 14, top: 12, bottom: 34 };
  const title = chart.querySelector("title");
  const desc = chart.querySelector("desc");
  chart.replaceChildren(title, desc);
  chart.dataset.points = String(tested.length);
  if (tested.length === 0) {
    desc.textContent = "No height has tested a training block yet.";
    chart.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, desc.textContent));
    renderLossTable(tested);
    return;
  }
  const heights = tested.map((entry) => entry.height);
  const values = tested.flatMap((entry) => [
    entry.test_loss_before,
    entry.test_loss_after,
    ...entry.rejected.map((update) => update.test_loss_after),
  ]);
  let [x0, x1] = [Math.min(...heights), Math.max(...heights)];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  let [y0, y1] = [Math.min(...values), Math.max(...values)];
  const pad = (y1 - y0) * 0.08 || 0.05;
  [y0, y1] = [y0 - pad, y1 + pad];
  const x = (value) => margin.left + ((value - x0) / (x1 - x0)) * (width - margin.left - margin.right);
  const y = (value) => height - margin.bottom - ((value - y0) / (y1 - y0)) * (height - margin.top - margin.bottom);
  const bottom = height - margin.bottom;

  const axes = svg("g", { class: "axis", "aria-hidden": "true" });
  const yTicks = niceTicks(y0, y1, 5);
  const digits = yTicks.step < 0.01 ? 3 : 2;
  for (const value of yTicks.ticks) {
    axes.append(svg("line", { class: "grid", x1: margin.left, x2: width - margin.right, y1: y(value), y2: y(value) }));
    axes.append(svg("text", { x: margin.left - 6, y: y(value) + 4, "text-anchor": "end" }, value.toFixed(digits)));
  }
  const xStep = Math.max(1, Math.round(niceTicks(x0, x1, 8).step));
  for (let value = Math.ceil(x0 / xStep) * xStep; value <= x1; value += xStep) {
    axes.append(svg("line", { x1: x(value), x2: x(value), y1: bottom, y2: bottom + 4 }));
    axes.append(svg("text", { x: x(value), y: bottom + 16, "text-anchor": "middle" }, String(value)));
  }
  axes.append(svg("line", { x1: margin.left, x2: width - margin.right, y1: bottom, y2: bottom }));
  axes.append(svg("text", { x: (width + margin.left) / 2, y: height - 3, "text-anchor": "middle" }, "decided height"));
  const middle = bottom / 2;
  axes.append(svg("text", { x: 12, y: middle, "text-anchor": "middle", transform: `rotate(-90 12 ${middle})` }, "nats / byte"));
  chart.append(axes);

  // Lines: the parent's model before each height, and the model after it (unchanged when no update applied).
  // `entry.applied` lists the training blocks a height applied (combined), empty when none.
  const path = (key) => tested.map((e, i) => `${i ? "L" : "M"}${x(e.height).toFixed(1)},${y(e[key]).toFixed(1)}`).join("");
  chart.append(svg("path", { class: "series-before", d: path("test_loss_before") }));
  chart.append(svg("path", { class: "series-after", d: path("test_loss_after") }));

  const points = svg("g", { class: "points" });
  const point = (kind, entry, value, radius, label) => {
    const circle = svg("circle", { class: `point point-${kind}`, cx: x(entry.height), cy: y(value), r: radius });
    circle.dataset.height = String(entry.height);
    circle.append(svg("title", {}, label));
    points.append(circle);
  };
  for (const entry of tested) {
    point("before", entry, entry.test_loss_before, 3, `Height ${entry.height}: before ${loss(entry.test_loss_before)}`);
    if (entry.applied.length) {
      const what = entry.applied.length === 1 ? "applied" : `${entry.applied.length} updates applied combined`;
      point("applied", entry, entry.test_loss_after, 4.5, `Height ${entry.height}: ${what}, ${loss(entry.test_loss_after)}`);
    }
    for (const update of entry.rejected) {
      const label = `Height ${entry.height}: rejected ${shortHex(update.hash)}, ${loss(update.test_loss_after)}`;
      point("rejected", entry, update.test_loss_after, 4, label);
    }
  }
  chart.append(points);
  const applied = tested.filter((entry) => entry.applied.length).length;
  const first = tested[0];
  const last = tested[tested.length - 1];
  byId("test-loss").textContent = `${loss(last.test_loss_after)} nats/byte`;
  byId("test-loss").title = `The model after height ${last.height}, on that height's held-out sequences`;
  desc.textContent =
    `${tested.length} tested heights from ${first.height} to ${last.height}, ${applied} with an update applied. ` +
    `Height ${last.height}: ${loss(last.test_loss_before)} before, ${loss(last.test_loss_after)} after.`;
  renderLossTable(tested);
}

// A loss table row's verdict for a height that applied updates: "applied", or "3 applied" (combined).
function appliedText(entry) {
  return entry.applied.length === 1 ? "applied" : `${entry.applied.length} applied`;
}

function renderLossTable(tested) {
  const rows = tested
    .slice(-LOSS_TABLE_ROWS)
    .reverse()
    .map((entry) =>
      element(
        "tr",
        {},
        cell(integer(entry.height), "number"),
        cell(loss(entry.test_loss_before), "number"),
        cell(loss(entry.test_loss_after), "number"),
        cell(
          entry.applied.length ? appliedText(entry) : `${entry.rejected.length} rejected`,
          entry.applied.length ? "verdict-applied" : "verdict-rejected",
        ),
      ),
    );
  replaceRows(byId("loss-table").tBodies[0], rows, "No tested heights yet.", 4);
}

// --- Loading ------------------------------------------------------------------------------------

async function refreshOnce() {
  // Finality before validators: the validators table marks who signed the head.
  const finality = rpc("/v1/finality").then(renderFinality);
  const losses = loadLossHistory();
  const jobs = [
    explorer.chainId ? Promise.resolve() : rpc("/v1/status").then(renderStatus),
    finality.then(() => rpc("/v1/validators")).then(renderValidators),
    Promise.all([rpc(`/v1/blocks?limit=${BLOCKS_SHOWN}`), losses.catch(() => null)]).then(([blocks]) => renderBlocks(blocks)),
    losses.then(renderLossChart),
    rpc("/v1/peers").then(renderPeers),
  ];
  const failures = {
    1: [byId("validators").tBodies[0], 4, "Validators"],
    2: [byId("blocks").tBodies[0], 6, "Blocks"],
    3: [byId("loss-table").tBodies[0], 4, "Loss history"],
    4: [byId("peers").tBodies[0], 4, "Peers"],
  };
  const results = await Promise.allSettled(jobs);
  results.forEach((result, index) => {
    if (result.status === "fulfilled") return;
    if (failures[index]) showError(...failures[index], result.reason);
    else if (!(result.reason instanceof RpcError && result.reason.status === 503)) console.warn(result.reason);
  });
  document.body.dataset.loaded = "true";
}

// One refresh at a time; heads that arrive meanwhile ask for one more.
// body[data-refreshing] says whether one is under way (tests/test_explorer.py waits on it).
function refresh() {
  if (explorer.refreshing) {
    explorer.refreshAgain = true;
    return explorer.refreshing;
  }
  document.body.dataset.refreshing = "true";
  explorer.refreshing = refreshOnce().finally(() => {
    explorer.refreshing = null;
    if (explorer.refreshAgain) {
      explorer.refreshAgain = false;
      refresh();
    } else {
      document.body.dataset.refreshing = "false";
    }
  });
  return explorer.refreshing;
}

// --- The event stream ----------------------------------------------------------------------

function setLive(state, text) {
  const live = byId("live");
  live.dataset.state = state;
  live.textContent = text;
}

function connectEvents() {
  const source = new EventSource("/v1/events?topics=head,block");
  source.addEventListener("open", () => {
    explorer.reconnects = 0;
  });
  // The stream's first event: the head when it started.
  source.addEventListener("subscribed", (event) => {
    const opening = JSON.parse(event.data);
    if (explorer.head && opening.height > explorer.head.height) refresh();
    if (explorer.headEvents === 0) setLive("live", `Live: waiting for height ${integer(opening.height + 1)}`);
  });
  // The stream dropped events this page was too slow to take: read everything again.
  source.addEventListener("gap", () => refresh());
  source.addEventListener("head", (event) => {
    const head = JSON.parse(event.data);
    explorer.headEvents += 1;
    document.body.dataset.headEvents = String(explorer.headEvents);
    document.body.dataset.lastHeadEvent = String(head.height);
    setHead(head.height, head.hash);
    setLive("live", `Live: height ${integer(head.height)} at ${clock(Date.now() / 1000)}`);
    byId("live").title = head.applied.length ? "It applied an update to the model" : "It applied no update";
    refresh();
  });
  source.addEventListener("block", (event) => {
    const block = JSON.parse(event.data);
    if (block.kind !== "training" || block.height !== explorer.pending.height) return;
    explorer.pending.blocks.add(block.hash);
    renderPending();
  });
  source.addEventListener("error", () => {
    if (source.readyState !== EventSource.CLOSED) {
      setLive("connecting", "Reconnecting to the event stream…");
      return;
    }
    // The browser gave up (the node refused the stream): try again later, a little slower each time.
    source.close();
    const wait = RECONNECT_SECONDS[Math.min(explorer.reconnects, RECONNECT_SECONDS.length - 1)];
    explorer.reconnects += 1;
    setLive("down", `Event stream unavailable; retrying in ${wait} s`);
    setTimeout(() => {
      connectEvents();
      refresh();
    }, wait * 1000);
  });
}

// --- Sampling ------------------------------------------------------------------------------

// Seeds go up to 2^63 - 1, past what a JavaScript number holds exactly: they travel as digits.
async function postSample(body) {
  const response = await fetch("/v1/model/sample", {
    method: "POST",
    headers: { Accept: "application/json", "Content-Type": "application/json" },
    body,
  });
  const raw = await response.text();
  let answer = null;
  try {
    answer = JSON.parse(raw);
  } catch {
    answer = null;
  }
  if (!response.ok || answer === null) {
    const message = answer && typeof answer.error === "string" ? answer.error : `${response.status} ${response.statusText}`;
    throw new RpcError(response.status, message, response.headers.get("Retry-After"));
  }
  const seeds = [...raw.matchAll(/"seed":\s*([0-9]+)/g)];
  return { answer, seedDigits: seeds.length > 0 ? seeds[seeds.length - 1][1] : String(answer.seed) };
}

async function sample(event) {
  event.preventDefault();
  const button = byId("sample-button");
  const info = byId("sample-info");
  const output = byId("sample-output");
  const request = JSON.stringify({
    prompt: byId("prompt").value,
    tokens: Number(byId("sample-tokens").value),
    temperature: Number(byId("sample-temperature").value),
  });
  const seed = byId("sample-seed").value.trim();
  if (seed !== "" && !/^[0-9]+$/.test(seed)) {
    info.className = "note error";
    info.textContent = "The seed is a whole number (0 or more), or empty for a random one.";
    return;
  }
  const body = seed === "" ? request : `${request.slice(0, -1)},"seed":${seed.replace(/^0+(?=[0-9])/, "")}}`;
  button.disabled = true;
  info.className = "note";
  info.textContent = "Sampling…";
  try {
    const { answer, seedDigits } = await postSample(body);
    output.replaceChildren(element("span", { className: "prompt" }, answer.prompt), answer.text);
    output.dataset.height = String(answer.height);
    info.textContent =
      `The model at height ${integer(answer.height)} (block ${shortHex(answer.hash)}): ` +
      `${answer.tokens} bytes, seed ${seedDigits}.`;
    // The genesis model, same prompt and seed: what the chain's training changed.
    const genesis = await postSample(`${request.slice(0, -1)},"seed":${seedDigits},"height":0}`);
    const genesisOutput = byId("sample-genesis-output");
    genesisOutput.replaceChildren(element("span", { className: "prompt" }, genesis.answer.prompt), genesis.answer.text);
    genesisOutput.dataset.height = String(genesis.answer.height);
  } catch (error) {
    info.className = "note error";
    const retry = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : "";
    info.textContent = `Sampling failed: ${error.message}.${retry}`;
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  byId("sample-form").addEventListener("submit", sample);
  connectEvents();
  refresh();
});
