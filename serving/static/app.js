// The cbir browser front end: plain JavaScript, no build step, nothing loaded from elsewhere.
// Query by an uploaded image or by any result; mark results relevant / not relevant and re-run
// (the marks travel as like / unlike image ids); toggle the re-ranking the index supports.
"use strict";

const state = {
  info: null,
  token: sessionStorage.getItem("cbir-token") || "",
  query: null, // {kind: "file", file} or {kind: "id", imageId}
  marks: new Map(), // image_id -> "like" | "unlike"
  round: 0,
  version: null,
  blobUrls: [],
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) {
    $("token-panel").hidden = false;
    $("token").focus();
  }
  if (!response.ok) {
    let message = response.statusText;
    try {
      message = (await response.json()).error || message;
    } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

function thumbUrl(imageId, size) {
  return "api/thumb?id=" + encodeURIComponent(imageId) + "&size=" + (size || 160);
}

// With a token, thumbnails need the Authorization header, which an <img src> cannot send.
async function loadImage(img, url) {
  if (!state.token) {
    img.src = url;
    return;
  }
  try {
    const blob = await (await api(url)).blob();
    const objectUrl = URL.createObjectURL(blob);
    state.blobUrls.push(objectUrl);
    img.src = objectUrl;
  } catch (e) {
    img.alt = img.alt + " (thumbnail unavailable)";
  }
}

function releaseBlobs() {
  state.blobUrls.forEach((u) => URL.revokeObjectURL(u));
  state.blobUrls = [];
}

async function loadInfo() {
  try {
    const info = await (await api("api/info")).json();
    state.info = info;
    state.version = info.version;
    $("token-panel").hidden = true;
    const labels = info.labels ? ", labelled" : "";
    $("index-info").textContent = `Index version ${info.version}: ${info.items} items${labels}, model ${info.model}`;
    const method = $("method");
    method.innerHTML = "";
    info.methods.forEach((m) => {
      const opt = document.createElement("option");
      opt.value = m;
      opt.textContent = m;
      method.appendChild(opt);
    });
    $("k").max = String(info.limits.max_k);
    $("verify-row").hidden = !(info.capabilities && info.capabilities.verify);
    $("diffusion-row").hidden = !(info.capabilities && info.capabilities.diffusion);
    $("file").disabled = !info.images;
    if (!info.images) {
      $("query-desc").textContent = "This service was started without image search: click a result to search by it.";
    }
  } catch (e) {
    $("index-info").textContent = "Not connected: " + e.message;
  }
}

function searchOptions(withFeedback) {
  const k = Math.max(1, Math.min(parseInt($("k").value, 10) || 12, state.info ? state.info.limits.max_k : 100));
  const body = {k: k, method: $("method").value, rerank: $("rerank").checked, qe: $("qe").checked ? 3 : 0};
  if (!$("verify-row").hidden && $("verify").checked) body.verify = true;
  if (!$("diffusion-row").hidden && $("diffusion").checked) body.diffusion = true;
  if (withFeedback) {
    body.like = [...state.marks].filter(([, v]) => v === "like").map(([id]) => id);
    body.unlike = [...state.marks].filter(([, v]) => v === "unlike").map(([id]) => id);
  }
  return body;
}

async function runSearch(withFeedback) {
  if (!state.query) {
    setStatus("Choose an image first, or click a result.", true);
    return;
  }
  const body = searchOptions(withFeedback);
  let init;
  if (state.query.kind === "file") {
    const form = new FormData();
    form.append("image", state.query.file, state.query.file.name);
    form.append("options", JSON.stringify(body));
    init = {method: "POST", body: form};
  } else {
    body.image_id = state.query.imageId;
    init = {method: "POST", body: JSON.stringify(body), headers: {"Content-Type": "application/json"}};
  }
  state.round = withFeedback ? state.round + 1 : 1;
  setStatus("Searching…");
  $("search").disabled = true;
  $("rerun").disabled = true;
  try {
    const answer = await (await api("api/search", init)).json();
    const changed = state.version && answer.version !== state.version;
    state.version = answer.version;
    renderResults(answer);
    const fb = answer.feedback;
    const marks = fb.like.length || fb.unlike.length
      ? ` using ${fb.like.length} relevant and ${fb.unlike.length} not relevant`
      : "";
    const note = changed ? ` The index changed to version ${answer.version}.` : "";
    setStatus(`Round ${state.round}: ${answer.results.length} results${marks} ` +
      `(version ${answer.version}, ${answer.timings_ms.total.toFixed(0)} ms).${note}`);
    if (changed) $("index-info").textContent = `Index version ${answer.version}`;
  } catch (e) {
    setStatus("Search failed: " + e.message, true);
  } finally {
    $("search").disabled = false;
    updateFeedbackButtons();
  }
}

function updateFeedbackButtons() {
  const n = state.marks.size;
  $("rerun").disabled = n === 0 || !state.query;
  $("rerun").textContent = n ? `Re-run with feedback (${n} marked)` : "Re-run with feedback";
  $("clear-marks").disabled = n === 0;
}

function setMark(imageId, value, card) {
  if (state.marks.get(imageId) === value) {
    state.marks.delete(imageId);
  } else {
    state.marks.set(imageId, value);
  }
  paintMarks(card, imageId);
  updateFeedbackButtons();
}

function paintMarks(card, imageId) {
  const mark = state.marks.get(imageId);
  card.querySelector(".mark-like").setAttribute("aria-pressed", String(mark === "like"));
  card.querySelector(".mark-unlike").setAttribute("aria-pressed", String(mark === "unlike"));
  card.classList.toggle("liked", mark === "like");
  card.classList.toggle("unliked", mark === "unlike");
}

function describe(r) {
  return (r.label ? r.label + ": " : "") + r.image_id;
}

function renderResults(answer) {
  releaseBlobs();
  const list = $("results");
  list.innerHTML = "";
  answer.results.forEach((r) => {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.imageId = r.image_id;

    const open = document.createElement("button");
    open.type = "button";
    open.className = "thumb";
    open.setAttribute("aria-label", `Search by result ${r.rank}, ${describe(r)}`);
    const img = document.createElement("img");
    img.alt = describe(r);
    img.width = 160;
    img.height = 160;
    img.loading = "lazy";
    loadImage(img, thumbUrl(r.image_id));
    open.appendChild(img);
    open.addEventListener("click", () => queryById(r.image_id, r));
    li.appendChild(open);

    const meta = document.createElement("p");
    meta.className = "meta";
    const inliers = r.inliers !== undefined ? ` · ${r.inliers} inliers` : "";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${r.rank}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = ` score ${r.score.toFixed(3)}${inliers}`;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = r.label || "no label";
    const id = document.createElement("span");
    id.className = "image-id";
    id.textContent = r.image_id;
    meta.append(rank, score, document.createElement("br"), label, document.createElement("br"), id);
    li.appendChild(meta);

    const group = document.createElement("div");
    group.className = "marks";
    group.setAttribute("role", "group");
    group.setAttribute("aria-label", `Feedback on result ${r.rank}`);
    const like = document.createElement("button");
    like.type = "button";
    like.className = "mark-like";
    like.textContent = "Relevant";
    like.addEventListener("click", () => setMark(r.image_id, "like", li));
    const unlike = document.createElement("button");
    unlike.type = "button";
    unlike.className = "mark-unlike";
    unlike.textContent = "Not relevant";
    unlike.addEventListener("click", () => setMark(r.image_id, "unlike", li));
    group.append(like, unlike);
    if (state.info && state.info.explain) {
      const why = document.createElement("button");
      why.type = "button";
      why.className = "why";
      why.textContent = "Why it matched";
      why.addEventListener("click", () => explain(r, why));
      group.appendChild(why);
    }
    li.appendChild(group);
    list.appendChild(li);
    paintMarks(li, r.image_id);
  });
}

function showQueryPreview(src, alt, description) {
  const img = $("query-preview");
  img.hidden = false;
  img.alt = alt;
  if (src) img.src = src;
  $("query-desc").textContent = description;
}

function queryByFile(file) {
  if (!file) return;
  state.query = {kind: "file", file: file};
  state.marks.clear();
  showQueryPreview(URL.createObjectURL(file), "Your query image, " + file.name, `Query: ${file.name}`);
  runSearch(false);
}

function queryById(imageId, result) {
  state.query = {kind: "id", imageId: imageId};
  state.marks.clear();
  const img = $("query-preview");
  showQueryPreview(null, "Query: " + describe(result), "Query: indexed item " + describe(result));
  loadImage(img, thumbUrl(imageId, 256));
  runSearch(false);
}

async function explain(result, opener) {
  const dialog = $("explain-dialog");
  const img = $("explain-image");
  img.removeAttribute("src");
  img.alt = `Regions of the query that made ${describe(result)} match`;
  $("explain-status").textContent = "Computing…";
  dialog.addEventListener("close", () => opener.focus(), {once: true});
  dialog.showModal();
  const form = new FormData();
  form.append("result_id", result.image_id);
  if (state.query.kind === "file") {
    form.append("image", state.query.file, state.query.file.name);
  } else {
    form.append("query_id", state.query.imageId);
  }
  try {
    const blob = await (await api("api/explain", {method: "POST", body: form})).blob();
    const url = URL.createObjectURL(blob);
    state.blobUrls.push(url);
    img.src = url;
    $("explain-status").textContent = "";
  } catch (e) {
    $("explain-status").textContent = "Could not explain this match: " + e.message;
  }
}

function setUp() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const file = $("file").files[0];
    if (file && (!state.query || state.query.kind !== "file" || state.query.file !== file)) {
      queryByFile(file);
    } else {
      runSearch(false);
    }
  });
  $("file").addEventListener("change", () => queryByFile($("file").files[0]));
  $("rerun").addEventListener("click", () => runSearch(true));
  $("clear-marks").addEventListener("click", () => {
    state.marks.clear();
    document.querySelectorAll("#results .card").forEach((card) => paintMarks(card, card.dataset.imageId));
    updateFeedbackButtons();
  });
  const zone = $("dropzone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) queryByFile(file);
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("cbir-token", state.token);
    loadInfo();
  });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
