// loupe serve's page: search, image, review and job views over the JSON API.
// Every piece of catalog data (captions, URIs, metadata, file names) goes into the page through
// textContent or a property, never parsed as markup, so it is shown as text and runs nothing.
"use strict";

const PAGE = 24;
const REVIEW_PAGE = 48;
const view = document.getElementById("view");
let categories = null; // [{key, definition, threshold}], fetched once

// ---- helpers --------------------------------------------------------------------------------

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "data") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  for (const child of [].concat(children)) if (child != null) node.append(child);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text != null) node.textContent = text;
  return node;
}

function say(text) {
  const box = document.getElementById("message");
  box.textContent = text || "";
  box.hidden = !text;
}

async function api(path, options = {}) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("log in first");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function thumbUrl(id, size = 256) {
  return `/api/images/${encodeURIComponent(id)}/thumbnail?size=${size}`;
}

function firstLine(caption) {
  return caption == null ? "(no caption)" : caption.split("\n")[0];
}

async function loadCategories() {
  if (categories === null) categories = (await api("/api/categories")).categories;
  return categories;
}

function markNav(name) {
  for (const link of document.querySelectorAll(".top nav a")) link.classList.toggle("current", link.id === `nav-${name}`);
}

// ---- search ---------------------------------------------------------------------------------

const search = { query: null, offset: 0, busy: false };

function searchTile(hit) {
  const flags = hit.flagged_categories.length ? `flagged: ${hit.flagged_categories.length}` : "";
  return el("a", { class: "tile result", href: `#/image/${encodeURIComponent(hit.image_id)}`, data: { id: hit.image_id } }, [
    el("img", { class: "thumb", src: thumbUrl(hit.image_id), alt: "", loading: "lazy" }),
    el("div", { class: "caption", text: firstLine(hit.caption), title: firstLine(hit.caption) }),
    el("div", { class: "meta" }, [el("span", { class: "score", text: hit.score.toFixed(3) }), el("span", { class: "flags", text: flags })]),
  ]);
}

function filterParams() {
  const params = new URLSearchParams();
  if (document.getElementById("exclude-flagged").checked) params.set("exclude_flagged", "true");
  const only = document.getElementById("only-category").value;
  if (only) params.set("flagged", only);
  for (const input of document.querySelectorAll(".minimums input")) {
    if (input.value !== "") params.append("min", `${input.dataset.key}:${input.value}`);
  }
  return params;
}

async function runSearch(reset) {
  const query = search.query;
  if (!query || (search.busy && !reset)) return;
  search.busy = true;
  if (reset) {
    search.offset = 0;
    document.getElementById("results").replaceChildren();
  }
  const params = filterParams();
  params.set("k", PAGE);
  params.set("offset", search.offset);
  params.set("kind", query.file ? "image" : document.getElementById("kind").value);
  const more = document.getElementById("more");
  more.hidden = true;
  say("");
  try {
    let answer;
    if (query.file) {
      const form = new FormData();
      form.append("image", query.file, query.file.name);
      answer = await api(`/api/search?${params}`, { method: "POST", body: form });
    } else {
      params.set("q", query.text);
      answer = await api(`/api/search?${params}`);
    }
    if (query !== search.query) return; // a newer query started meanwhile
    const grid = document.getElementById("results");
    for (const hit of answer.hits) grid.append(searchTile(hit));
    search.offset += answer.hits.length;
    more.hidden = !answer.more;
    document.getElementById("count").textContent = search.offset ? `${search.offset} shown` : "nothing found";
  } catch (error) {
    say(error.message);
  } finally {
    if (query === search.query) search.busy = false;
  }
}

function searchByImage(file) {
  if (!file) return;
  search.query = { file };
  document.getElementById("query-note").textContent = `Images like ${file.name} (${Math.round(file.size / 1024)} KiB)`;
  runSearch(true);
}

async function showSearch(params) {
  markNav("search");
  const cats = await loadCategories();
  const q = el("input", { type: "search", id: "q", placeholder: "Describe what you are looking for", value: params.get("q") || "" });
  const kind = el("select", { id: "kind" }, [
    el("option", { value: "image", text: "image index (CLIP)" }),
    el("option", { value: "caption", text: "caption index" }),
  ]);
  kind.value = params.get("kind") || "image";
  const file = el("input", { type: "file", id: "file", accept: "image/*", onchange: () => searchByImage(file.files[0]) });
  const drop = el("div", { class: "drop", id: "drop", tabIndex: 0, text: "Drop an image here to find similar ones, or " }, [
    el("label", {}, [el("span", { class: "secondary", text: "choose a file " }), file]),
  ]);
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchByImage(event.dataTransfer.files[0]);
  });
  const only = el("select", { id: "only-category" }, [el("option", { value: "", text: "any" })].concat(
    cats.map((c) => el("option", { value: c.key, text: c.key }))));
  only.value = params.get("flagged") || "";
  const exclude = el("input", { type: "checkbox", id: "exclude-flagged", checked: params.get("exclude_flagged") === "true" });
  const wanted = new Map(params.getAll("min").map((item) => item.split(":")));
  const minimums = el("div", { class: "minimums" }, cats.map((c) => el("label", {}, [
    el("span", { text: c.key }),
    el("input", { type: "number", min: 0, max: 1, step: 0.01, placeholder: "0–1", value: wanted.get(c.key) || "", data: { key: c.key } }),
  ])));
  const filters = el("div", { class: "filters" }, cats.length ? [
    el("label", {}, [exclude, " exclude flagged images"]),
    el("label", {}, ["only flagged for ", only]),
    el("details", {}, [el("summary", { text: "minimum score per category" }), minimums]),
  ] : [el("span", { class: "muted", text: "This job did not moderate: no filters." })]);
  const remember = () => { // a text search and its filters live in the URL, to reload or share
    if (!search.query || search.query.file) return;
    const next = filterParams();
    next.set("q", search.query.text);
    next.set("kind", kind.value);
    history.replaceState(null, "", `#/?${next}`);
  };
  filters.addEventListener("change", () => { remember(); runSearch(true); });
  const form = el("form", { class: "search-bar", id: "search-form" }, [q, kind, el("button", { type: "submit", id: "go", text: "Search" })]);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    search.query = { text: q.value };
    document.getElementById("query-note").textContent = "";
    remember();
    runSearch(true);
  });
  const more = el("button", { class: "more secondary", id: "more", text: "More results", hidden: true, onclick: () => runSearch(false) });
  view.replaceChildren(
    form, drop, filters,
    el("p", { class: "query-note", id: "query-note" }),
    el("p", { class: "muted", id: "count" }),
    el("div", { class: "grid", id: "results" }), more,
  );
  // More on scroll: the "next" control loads itself when it comes into view.
  new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting) && !more.hidden) more.click();
  }).observe(more);
  if (params.get("q")) {
    search.query = { text: params.get("q") };
    runSearch(true);
  } else {
    q.focus();
  }
}

// ---- one image ------------------------------------------------------------------------------

function fact(list, name, value) {
  list.append(el("dt", { text: name }), el("dd", { class: "mono", text: value == null ? "" : String(value) }));
}

function scoreRows(row, cats) {
  const scores = row.moderation || {};
  return cats.map((c) => {
    const score = scores[c.key];
    const flagged = score != null && score >= c.threshold;
    const fill = el("div", { class: "fill" });
    fill.style.width = `${Math.round((score || 0) * 1000) / 10}%`;
    const mark = el("div", { class: "threshold", title: `threshold ${c.threshold}` });
    mark.style.left = `${c.threshold * 100}%`;
    return el("div", { class: `score-row${flagged ? " flagged" : ""}`, data: { key: c.key } }, [
      el("span", { class: "label", text: c.key, title: c.definition }),
      el("div", { class: "bar" }, [fill, mark]),
      el("span", { class: "value", text: score == null ? "—" : `${score.toFixed(3)}${flagged ? " ⚑" : ""}` }),
    ]);
  });
}

async function showImage(id) {
  markNav("");
  const [row, cats] = await Promise.all([api(`/api/images/${encodeURIComponent(id)}`), loadCategories()]);
  const facts = el("dl", { class: "facts" });
  fact(facts, "image id", row.image_id);
  fact(facts, "source", row.source_uri);
  fact(facts, "status", row.status === "ok" ? "ok" : `${row.status}: ${row.error_code || ""} ${row.error_message || ""}`);
  fact(facts, "size", row.width ? `${row.width} × ${row.height} px, ${row.size_bytes} bytes` : `${row.size_bytes ?? "?"} bytes`);
  fact(facts, "sha256", row.sha256);
  fact(facts, "model", row.model);
  const metadata = Object.entries(row.source_metadata || {});
  const neighbours = el("div", { class: "grid", id: "neighbours" });
  view.replaceChildren(el("h2", { text: "Image" }), el("div", { class: "image-view" }, [
    row.status === "ok"
      ? el("img", { class: "picture", id: "picture", src: thumbUrl(row.image_id, 1024), alt: "" })
      : el("p", { class: "muted", text: "This row has no picture: the image could not be read." }),
    el("div", {}, [
      el("h3", { text: "Caption" }),
      el("p", { class: "caption-full", id: "caption", text: row.caption == null ? "(no caption)" : row.caption }),
      el("h3", { text: "Moderation" }),
      cats.length ? el("div", { id: "scores" }, scoreRows(row, cats)) : el("p", { class: "muted", text: "not moderated" }),
      el("h3", { text: "Details" }), facts,
      el("h3", { text: "Source metadata" }),
      metadata.length
        ? el("table", { class: "kv", id: "metadata" }, metadata.map(([k, v]) => el("tr", {}, [el("th", { text: k }), el("td", { text: v })])))
        : el("p", { class: "muted", text: "none" }),
    ]),
  ]), el("h3", { text: "Nearest neighbours" }), neighbours);
  if (row.status === "ok") {
    try {
      const answer = await api(`/api/search?like=${encodeURIComponent(row.image_id)}&k=12`);
      neighbours.append(...answer.hits.map(searchTile));
    } catch (error) {
      neighbours.append(el("p", { class: "muted", text: error.message }));
    }
  }
}

// ---- review ---------------------------------------------------------------------------------

function reviewTile(item) {
  const img = el("img", { class: "thumb blurred", src: thumbUrl(item.image_id), alt: "" });
  const open = el("a", { href: `#/image/${encodeURIComponent(item.image_id)}`, text: "open", tabIndex: -1 });
  const tile = el("div", { class: "tile review-tile", tabIndex: 0, role: "button", data: { id: item.image_id } }, [
    img,
    el("div", { class: "reveal-hint", text: "click to reveal" }),
    el("div", { class: "caption", text: firstLine(item.caption) }),
    el("div", { class: "meta" }, [el("span", { class: "score", text: item.score.toFixed(3) }), el("span", { class: "flags", text: item.flagged ? "flagged" : "" }), open]),
  ]);
  tile.setAttribute("aria-pressed", "false");
  tile.addEventListener("click", (event) => {
    if (event.target === open) return;
    reveal(tile, !tile.classList.contains("revealed"));
  });
  return tile;
}

function reveal(tile, shown) {
  tile.classList.toggle("revealed", shown);
  tile.querySelector(".thumb").classList.toggle("blurred", !shown);
  tile.setAttribute("aria-pressed", String(shown));
}

function reviewKeys(event) {
  const tiles = [...document.querySelectorAll(".review-tile")];
  const at = tiles.indexOf(document.activeElement);
  if (at < 0) return;
  const columns = Math.max(1, tiles.filter((t) => t.offsetTop === tiles[0].offsetTop).length);
  const moves = { ArrowRight: 1, j: 1, ArrowLeft: -1, k: -1, ArrowDown: columns, ArrowUp: -columns };
  const tile = tiles[at];
  if (event.key in moves) {
    const next = tiles[Math.min(tiles.length - 1, Math.max(0, at + moves[event.key]))];
    next.focus();
    next.scrollIntoView({ block: "nearest" });
  } else if (event.key === " ") {
    reveal(tile, !tile.classList.contains("revealed"));
  } else if (event.key === "Enter" || event.key === "o") {
    if (tile.classList.contains("revealed")) window.location.hash = `#/image/${encodeURIComponent(tile.dataset.id)}`;
    else reveal(tile, true);
  } else {
    return;
  }
  event.preventDefault();
}

async function showReview(category) {
  markNav("review");
  const cats = await loadCategories();
  if (!cats.length) {
    view.replaceChildren(el("p", { class: "muted", text: "This job did not moderate: nothing to review." }));
    return;
  }
  const chosen = cats.find((c) => c.key === category) || cats[0];
  const grid = el("div", { class: "grid", id: "review" });
  grid.addEventListener("keydown", reviewKeys);
  let offset = 0;
  const more = el("button", { class: "more secondary", id: "more", text: "More", hidden: true });
  const heading = el("p", { class: "muted" });
  async function page() {
    const answer = await api(`/api/review/${encodeURIComponent(chosen.key)}?offset=${offset}&limit=${REVIEW_PAGE}`);
    grid.append(...answer.items.map(reviewTile));
    offset += answer.items.length;
    more.hidden = offset >= answer.total;
    heading.textContent = `${answer.total} images by ${chosen.key} score, highest first (threshold ${answer.threshold}). ` +
      "Click or press Space to reveal; arrows or j/k to move; Enter opens a revealed image.";
  }
  more.addEventListener("click", page);
  view.replaceChildren(
    el("h2", { text: `Review: ${chosen.key}` }),
    el("nav", { class: "categories" }, cats.map((c) => el("a", {
      href: `#/review/${encodeURIComponent(c.key)}`, text: c.key, title: c.definition, class: c.key === chosen.key ? "current" : "",
    }))),
    heading, grid, more,
  );
  await page();
  const first = grid.querySelector(".review-tile");
  if (first) first.focus();
}

// ---- job ------------------------------------------------------------------------------------

function barChart(id, rows, title) {
  // rows: [{label, value, cls}] drawn as horizontal bars against the largest value.
  const width = 640, left = 190, right = 60, bar = 18, gap = 6, top = 28;
  const height = top + rows.length * (bar + gap) + 8;
  const max = Math.max(1, ...rows.map((r) => r.value));
  const chart = svg("svg", { class: "chart", id, viewBox: `0 0 ${width} ${height}`, width, height, role: "img" });
  chart.append(svg("title", {}, title), svg("text", { x: 8, y: 18, "font-weight": 600 }, title));
  rows.forEach((r, i) => {
    const y = top + i * (bar + gap);
    const w = ((width - left - right) * r.value) / max;
    chart.append(
      svg("text", { x: left - 8, y: y + bar - 5, "text-anchor": "end" }, r.label),
      svg("rect", { class: "track", x: left, y, width: width - left - right, height: bar }),
      svg("rect", { class: r.cls, x: left, y, width: Math.max(w, r.value ? 1 : 0), height: bar }),
      svg("text", { x: left + w + 6, y: y + bar - 5 }, String(r.value)),
    );
  });
  return chart;
}

async function showJob() {
  markNav("job");
  const s = await api("/api/status");
  const rows = [
    ["output", s.output], ["model", s.model], ["shards", `${s.shards_done} of ${s.shards_total} done`],
    ["rows", `${s.rows_ok} ok, ${s.rows_error} error`], ["flagged", `${s.rows_flagged} rows`],
    ["throughput", `${s.images_per_second.toFixed(2)} images/s`],
    ["serving", `${s.serving.rows} rows from ${s.serving.parts} parts; indexes: ${Object.entries(s.serving.indexes).map(([k, n]) => `${k} (${n})`).join(", ") || "none"}`],
    ["failed shards", s.failed_shards.map((f) => `${f.shard_id}: ${f.error}`).join("; ") || "none"],
  ];
  view.replaceChildren(
    el("h2", {}, ["Job ", el("span", { class: `badge ${s.complete ? "ok" : "warn"}`, id: "job-state", text: s.complete ? "complete" : "partial" })]),
    el("table", { class: "stats", id: "job-stats" }, rows.map(([k, v]) => el("tr", {}, [el("td", { text: k }), el("td", { text: v })]))),
    el("h3", { text: "Progress" }),
    barChart("chart-shards", [
      { label: "shards done", value: s.shards_done, cls: "done" },
      { label: "shards left", value: s.shards_total - s.shards_done, cls: "track" },
    ], `Shards: ${s.shards_done} of ${s.shards_total}`),
    el("h3", { text: "Rows" }),
    barChart("chart-rows", [{ label: "ok", value: s.rows_ok, cls: "ok" }].concat(
      Object.entries(s.error_codes).map(([code, n]) => ({ label: `error: ${code}`, value: n, cls: "error" }))), "Rows by outcome"),
    el("h3", { text: "Flagged per category" }),
    barChart("chart-flagged", Object.entries(s.flagged).sort((a, b) => b[1] - a[1])
      .map(([key, n]) => ({ label: key, value: n, cls: "flag" })), "Rows at or over each threshold"),
  );
}

// ---- routing --------------------------------------------------------------------------------

async function route() {
  const [path, query] = window.location.hash.replace(/^#/, "").split("?");
  const parts = (path || "/").split("/").filter(Boolean).map(decodeURIComponent);
  say("");
  try {
    if (parts[0] === "image" && parts[1]) await showImage(parts[1]);
    else if (parts[0] === "review") await showReview(parts[1]);
    else if (parts[0] === "job") await showJob();
    else await showSearch(new URLSearchParams(query || ""));
  } catch (error) {
    say(error.message);
  }
}

async function start() {
  window.addEventListener("hashchange", route);
  await route();
  try {
    const s = await api("/api/status");
    const badge = document.getElementById("partial");
    badge.hidden = s.complete;
    badge.textContent = `partial job: ${s.shards_done} of ${s.shards_total} shards`;
  } catch (error) {
    say(error.message);
  }
}

start();
