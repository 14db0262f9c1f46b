// The search page of `bayesretrieval serve`: plain JavaScript over the JSON API, no build step.
"use strict";

const AXIS = { low: 0, high: 1, ticks: [0, 0.25, 0.5, 0.75, 1] };  // every bar: expected cosine on one fixed axis
const INTERVAL_STDS = 2;
const TOKEN_KEY = "bayesretrieval-token";

const page = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  info: null,        // /api/version
  thumbnails: [],    // object URLs of the grid on screen, released when it is replaced
};

const $ = (id) => document.getElementById(id);

class TokenNeeded extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (page.token) headers.set("Authorization", `Bearer ${page.token}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new TokenNeeded("this server needs an API token: enter it above");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : body.detail.map((d) => d.msg).join("; ");
    } catch (_) { /* not JSON: keep the status text */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// An answer's version: one index version, or one per shard when several index directories are served.
const versions = (version) => [].concat(version).join(" + ");

async function loadInfo() {
  page.info = await (await api("api/version")).json();
  const info = page.info;
  $("served").textContent = `index ${versions(info.index_version)} · ${info.item_count} items · ` +
    `${info.model.model_name} · posterior ${info.form}`;
  $("score").querySelector('option[value="probability"]').disabled = !info.calibrated.text;
  const mark = info.high_uncertainty;
  $("legend").textContent = `Bars: expected cosine on a fixed 0–1 axis, shaded ±${INTERVAL_STDS} std. ` +
    `"uncertain": the item is less certain than at least ${mark.percentile}% of the collection (by ${mark.by}).`;
  $("legend").hidden = false;
}

function position(value) {
  const clipped = Math.min(Math.max(value, AXIS.low), AXIS.high);
  return (100 * (clipped - AXIS.low)) / (AXIS.high - AXIS.low);
}

function bar(mean, std) {
  const track = element("div", "bar");
  track.title = `expected cosine ${mean.toFixed(3)} ± ${INTERVAL_STDS} × ${std.toFixed(3)}`;
  const low = position(mean - INTERVAL_STDS * std);
  const interval = element("div", "interval");
  interval.style.left = `${low}%`;
  interval.style.width = `${position(mean + INTERVAL_STDS * std) - low}%`;
  const tick = element("div", "mean");
  tick.style.left = `calc(${position(mean)}% - 1px)`;
  track.append(interval, tick);
  if (mean < AXIS.low || mean > AXIS.high) {
    const note = element("span", "clipped", mean < AXIS.low ? "◂ below axis" : "above axis ▸");
    note.style[mean < AXIS.low ? "left" : "right"] = "0";
    track.append(note);
  }
  const ticks = element("div", "ticks");
  for (const value of AXIS.ticks) {
    const label = element("span", "", String(value));
    label.style.left = `${position(value)}%`;
    ticks.append(label);
  }
  return [track, ticks];
}

// A result or audit row names its item by id, and by shard when several index directories are served.
function thumbnailUrl(row) {
  const shard = row.shard ?? null;
  return `api/items/${row.item_id}/thumbnail?size=256` + (shard === null ? "" : `&shard=${shard}`);
}

async function showThumbnail(img, row) {
  try {
    const blob = await (await api(thumbnailUrl(row))).blob();
    const url = URL.createObjectURL(blob);
    page.thumbnails.push(url);
    img.src = url;
  } catch (error) {
    img.alt = `no thumbnail (${error.message})`;
  }
}

function card(row) {
  const node = element("article", "card");
  node.dataset.itemId = row.item_id;
  if ((row.shard ?? null) !== null) node.dataset.shard = row.shard;
  const img = element("img", "thumb");
  img.alt = row.path;
  node.append(img, element("div", "path", row.path));
  showThumbnail(img, row);
  return node;
}

function clearGrid() {
  page.thumbnails.forEach((url) => URL.revokeObjectURL(url));
  page.thumbnails = [];
  $("grid").replaceChildren();
  $("warnings").replaceChildren();
}

function resultCard(row, score) {
  const node = card(row);
  node.classList.add("result");
  const lines = [`#${row.rank} · ${score} ${row.score.toFixed(3)}`,
    `cosine ${row.cosine_mean.toFixed(3)} ± ${row.cosine_std.toFixed(3)}`];
  if (row.probability !== null) lines.push(`P(match) ${row.probability.toFixed(2)}`);
  lines.push(`P(best of these) ${row.best_match_probability.toFixed(2)}`);
  node.append(...bar(row.cosine_mean, row.cosine_std), element("div", "numbers", lines.join("\n")));
  if (row.high_uncertainty) {
    node.classList.add("high-uncertainty");
    const mark = element("span", "mark-uncertain", "uncertain");
    mark.title = `less certain than ${row.item_percentile.toFixed(0)}% of the collection`;
    node.append(mark);
  }
  return node;
}

function showResults(answer) {
  clearGrid();
  for (const query of answer.queries) {
    if (query.query_warning) $("warnings").append(element("div", "warning", query.query_warning));
    $("grid").append(...query.results.map((row) => resultCard(row, answer.score)));
  }
  const count = answer.queries.reduce((total, q) => total + q.results.length, 0);
  setStatus(`${count} results from index ${versions(answer.version)} in ${(1000 * answer.seconds).toFixed(0)} ms` +
    (answer.exact ? " · exact" : ""));
}

function searchOptions() {
  const options = { k: Number($("k").value) || 10, score: $("score").value, kappa: Number($("kappa").value) };
  const prefix = $("path-prefix").value.trim();
  if (prefix) options.path_prefix = prefix;
  return options;
}

async function run(label, work) {
  setStatus(`${label}…`);
  try {
    await work();
    return true;
  } catch (error) {
    setStatus(error.message, true);
    return false;
  }
}

const connect = () => run("connecting", loadInfo).then((ok) => { if (ok) setStatus(""); });

function searchText(event) {
  event.preventDefault();
  run("searching", async () => {
    const body = JSON.stringify({ queries: $("query").value, ...searchOptions() });
    const response = await api("api/search", { method: "POST", body, headers: { "Content-Type": "application/json" } });
    showResults(await response.json());
  });
}

function searchImage(file) {
  run(`searching by ${file.name}`, async () => {
    const form = new FormData();
    form.append("image", file);
    for (const [key, value] of Object.entries(searchOptions())) form.append(key, String(value));
    showResults(await (await api("api/search/image", { method: "POST", body: form })).json());
  });
}

function showAudit() {
  run("auditing", async () => {
    const k = Number($("k").value) || 20;
    const audit = await (await api(`api/audit?k=${k}`)).json();
    clearGrid();
    for (const row of audit.items) {
      const node = card(row);
      node.classList.add("audit-item");
      node.append(element("div", "numbers",
        `#${row.rank} · less certain than ${row.percentile.toFixed(1)}% of the collection · ` +
        `cosine std ≈ ${row.cosine_std.toFixed(3)}`));
      $("grid").append(node);
    }
    setStatus(`the ${audit.items.length} least certain of ${audit.item_count} items (by ${audit.by}), ` +
      `index ${versions(audit.version)}`);
  });
}

function wireDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length) searchImage(event.dataTransfer.files[0]);
  });
  $("image").addEventListener("change", () => { if ($("image").files.length) searchImage($("image").files[0]); });
}

function wireControls() {
  $("search-form").addEventListener("submit", searchText);
  $("audit").addEventListener("click", showAudit);
  const showKappa = () => { $("kappa-control").hidden = !["lcb", "ucb", "lcb_item"].includes($("score").value); };
  $("score").addEventListener("change", showKappa);
  $("kappa").addEventListener("input", () => { $("kappa-value").textContent = Number($("kappa").value).toFixed(1); });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    page.token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, page.token);
    $("token-form").hidden = true;
    connect();
  });
  showKappa();
  wireDropZone();
}

wireControls();
connect();
