// The page of `prn serve`: upload images, show each with its defect regions boxed, its heat map
// and verdict, re-judge them with a threshold slider (no new model run), keep the session's
// results as a CSV. Corrections (a verdict marked wrong, a missed defect painted) are correct.js.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere.
"use strict";

const state = {
  model: null,        // GET model
  calibrated: null,   // the threshold the server decides with (null: none)
  threshold: null,    // the slider's threshold, kept exact (the range input rounds to its step)
  results: [],        // this session's results, in upload order (unreadable images too, with .error)
};
const $ = (id) => document.getElementById(id);

async function api(path, options) {
  // Relative paths, so the page also works behind a proxy under a path prefix; the token
  // cookie (set by opening /?token=...) goes along with every same-origin request.
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

const fmt = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toPrecision(digits));
const scored = () => state.results.filter((r) => !r.error);   // an unreadable image has no score
// no threshold (an uncalibrated model, slider untouched): nothing is judged, rather than all PASS
const judged = (r) => !r.error && state.threshold !== null;
const defective = (r) => judged(r) && r.score >= state.threshold;
// the calibration's review band: a part that passes the threshold but scores at or above the band's
// lower edge goes to a person (prn calibrate RUN --review-fpr R); the slider moves its upper edge
const reviewEdge = () => (state.model && state.model.calibration && state.model.calibration.review_threshold != null
  ? state.model.calibration.review_threshold : null);
const inReview = (r) => judged(r) && !defective(r) && reviewEdge() !== null && r.score >= reviewEdge();

function say(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// ----------------------------------------------------------------------------- threshold

function updateRange() {
  const slider = $("threshold");
  const values = scored().map((r) => r.score);
  if (state.calibrated !== null) values.push(state.calibrated);
  if (state.model && state.model.score_range) values.push(...state.model.score_range);
  if (!values.length) values.push(0, 1);
  let lo = Math.min(...values), hi = Math.max(...values);
  const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 0.05;  // every score strictly inside
  lo -= pad; hi += pad;
  slider.min = lo; slider.max = hi; slider.step = (hi - lo) / 1000;
  if (state.threshold === null && state.calibrated !== null) state.threshold = state.calibrated;
  slider.value = state.threshold !== null ? state.threshold : (lo + hi) / 2;
}

function setThreshold(value) {
  state.threshold = value;
  $("threshold-value").textContent = fmt(value);
  rejudge();
}

// ----------------------------------------------------------------------------- results

function verdictText(r) {
  return r.error ? "NOT READ" : !judged(r) ? "NO THRESHOLD" : defective(r) ? "FAIL" : inReview(r) ? "REVIEW" : "PASS";
}
function verdictWord(r) { return r.error ? "not read" : !judged(r) ? "not judged" : defective(r) ? "defective" : "good"; }

const SVG = "http://www.w3.org/2000/svg";

function boxes(r) {
  // The regions' boxes over the image, in its own pixels: the SVG's viewBox is the image's size
  // and it is fitted to the frame as the picture is (object-fit: contain), so they line up.
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "boxes");
  svg.setAttribute("viewBox", `0 0 ${r.width} ${r.height}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
  for (const g of r.regions || []) {
    const rect = document.createElementNS(SVG, "rect");
    for (const key of ["x", "y", "width", "height"]) rect.setAttribute(key, g[key]);
    rect.setAttribute("class", "box");
    rect.setAttribute("vector-effect", "non-scaling-stroke");
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${g.width}×${g.height} px at (${g.x}, ${g.y}), area ${g.area} px, peak ${fmt(g.peak, 3)}`;
    rect.append(title);
    svg.append(rect);
  }
  return svg;
}

function regionText(r) {
  if (r.regions === null || r.regions === undefined) return "regions: none without a pixel threshold";
  return r.regions.length === 1 ? "1 region" : `${r.regions.length} regions`;
}

function card(r) {
  const article = document.createElement("article");
  article.className = r.error ? "card unread" : "card";
  if (!r.error) article.dataset.score = r.score;
  const pics = document.createElement("div");
  pics.className = "pics";
  const shown = r.error ? [] : [[r.imageUrl, "image, defect regions"], [r.overlayUrl, "heat map, defect contour"]];
  for (const [src, caption] of shown) {
    const figure = document.createElement("figure");
    const frame = document.createElement("div");
    frame.className = "frame";
    const img = document.createElement("img");
    img.src = src;
    img.alt = `${r.name}: ${caption}`;
    frame.append(img);
    if (src === r.imageUrl) frame.append(boxes(r));
    const figcaption = document.createElement("figcaption");
    figcaption.textContent = caption;
    figure.append(frame, figcaption);
    pics.append(figure);
  }
  const facts = document.createElement("div");
  facts.className = "facts";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = r.name;           // textContent: a file name is never markup
  name.title = r.name;
  const score = document.createElement("span");
  score.className = r.error ? "message" : "score";   // the server's reason, as text, never markup
  score.textContent = r.error ? r.error : `score ${fmt(r.score)}` +
    (r.normalized_score === null ? "" : ` · normalised ${fmt(r.normalized_score, 3)}`);
  const verdict = document.createElement("span");
  verdict.className = "verdict";
  facts.append(name, score, verdict);
  if (!r.error) {
    const regions = document.createElement("span");
    regions.className = "regions";
    regions.textContent = regionText(r);
    facts.append(regions);
  }
  if (r.error) article.append(facts);
  else article.append(pics, facts);
  r.card = article;
  if (!r.error && r.id && window.prnCorrections) window.prnCorrections.attach(r);
  return article;
}

function row(r) {
  const tr = document.createElement("tr");
  const cells = r.error ? [r.index, r.name, "–", "–", "", r.milliseconds.toFixed(0)]
    : [r.index, r.name, fmt(r.score), fmt(r.normalized_score, 3), "", r.milliseconds.toFixed(0)];
  for (const value of cells) {
    const td = document.createElement("td");
    td.textContent = value;
    tr.append(td);
  }
  tr.children[4].className = "verdict";
  r.row = tr;
  return tr;
}

function rejudge() {
  for (const r of state.results) {
    const bad = defective(r);
    for (const el of [r.card, r.row]) {
      el.classList.toggle("fail", bad);
      el.classList.toggle("pass", !bad && judged(r) && !inReview(r));
      el.classList.toggle("review", inReview(r));
      el.querySelector(".verdict").textContent = verdictText(r);
      el.dataset.verdict = verdictWord(r);
    }
  }
  const failed = state.results.filter(defective).length;
  const reviewed = state.results.filter(inReview).length;
  const unread = state.results.length - scored().length;
  $("download").disabled = !state.results.length;
  if (state.results.length) {
    $("results").caption?.remove();
    const caption = $("results").createCaption();
    caption.textContent = (state.threshold === null
      ? `${scored().length} images, none judged: the model has no threshold (move the slider to set one)`
      : `${scored().length} images, ${failed} fail at threshold ${fmt(state.threshold)}` +
        (reviewEdge() === null ? "" : `, ${reviewed} to review (from ${fmt(reviewEdge())})`)) +
      (unread ? `; ${unread} could not be read` : "");
  }
}

function addResults(files, response) {
  const cards = document.createDocumentFragment();  // newest request first, each in upload order
  response.results.forEach((res, i) => {
    const r = Object.assign({}, res, {
      index: state.results.length + 1,
      time: new Date().toISOString(),
    });
    if (!res.error) {                  // an unreadable image: its card shows the server's reason
      r.imageUrl = URL.createObjectURL(files[i]);
      r.overlayUrl = `data:image/png;base64,${res.overlay}`;
    }
    delete r.overlay;                  // the picture lives in the card; keep the record small
    state.results.push(r);
    cards.append(card(r));
    $("results").tBodies[0].append(row(r));
  });
  $("cards").prepend(cards);
  updateRange();
  rejudge();
}

// ----------------------------------------------------------------------------- uploading

function batches(files) {
  // Requests the server accepts: at most max_images files and about max_request_bytes each.
  const limits = state.model.limits;
  const out = [];
  let current = [], bytes = 0;
  for (const f of files) {
    if (current.length && (current.length >= limits.max_images || bytes + f.size > limits.max_request_bytes * 0.95)) {
      out.push(current);
      current = []; bytes = 0;
    }
    current.push(f);
    bytes += f.size;
  }
  if (current.length) out.push(current);
  return out;
}

// whether the last images the server scored look like the good parts its threshold was set on
// (prn.deploy.drift): a warning stays up while they do not, since the verdicts alone do not show it
function showDrift(look) {
  const box = $("drift");
  box.hidden = !(look && look.drifted);
  box.textContent = box.hidden ? "" : `The photos changed: ${look.message}.`;
}

// what fit and prn calibrate said of the held-out good images (a suspect one, the one whose score is
// the threshold), and a button per named image that scores it here like an upload, to look at it
function showCalibrationNotes(m) {
  const box = $("calibration-notes");
  box.replaceChildren();
  const images = m.held_out_images || [];
  for (const note of m.calibration_notes || []) {
    const p = document.createElement("p");
    p.className = note.level;
    p.textContent = `${note.level === "warning" ? "Calibration warning" : "Calibration note"}: ${note.text}`;
    // the warning names the suspects, the note the image whose score is the threshold
    const mine = images.filter((image) => (image.why === "suspect") === (note.level === "warning"));
    if (mine.length) p.append(document.createElement("br"));
    for (const image of mine) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "held-out";
      button.textContent = `Look at ${image.name}`;
      button.title = `${image.path}: a held-out good image scoring ${fmt(image.score)}; scored here like an upload`;
      button.addEventListener("click", () => lookAtHeldOut(image));
      p.append(button);
    }
    box.append(p);
  }
  box.hidden = !box.childElementCount;
}

async function lookAtHeldOut(image) {
  let blob;
  try {
    const response = await fetch(`model/held-out/${image.index}`);
    if (!response.ok) throw new Error((await response.json().catch(() => ({}))).error || response.statusText);
    blob = await response.blob();
  } catch (e) {
    say(`${image.name} could not be fetched: ${e.message}`, true);
    return;
  }
  await upload([new File([blob], image.name, { type: blob.type })]);
}

async function upload(fileList) {
  const files = Array.from(fileList);
  if (!files.length || !state.model) return;
  let done = 0, unread = 0;
  for (const batch of batches(files)) {
    say(`Scoring ${batch.length} image${batch.length > 1 ? "s" : ""}…`);
    const form = new FormData();
    for (const f of batch) form.append("files", f, f.name);
    try {
      const response = await api("predict?overlay=1", { method: "POST", body: form });
      if (response.model_generation !== state.model.generation) await followModel(state.results.length);
      addResults(batch, response);
      showDrift(response.appearance);
      const failed = response.results.filter((r) => r.error).length;
      done += batch.length - failed;
      unread += failed;
      say(`${done} of ${files.length} scored` + (unread ? `, ${unread} could not be read (see ${unread > 1 ? "their cards" : "its card"})` : "") +
          ` (${response.milliseconds.toFixed(0)} ms for the last request).`, unread > 0);
    } catch (e) {
      say(`Not scored: ${e.message}`, true);
      return;
    }
  }
}

// ----------------------------------------------------------------------------- CSV

function csvCell(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number") return String(value);
  let text = String(value);
  if (/^[=+\-@\t\r]/.test(text)) text = "'" + text;   // a file name must not become a formula
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function csvText() {
  const header = ["index", "file", "score", "normalized_score", "verdict", "review", "threshold",
                  "server_label", "regions", "milliseconds", "time", "error", "correction"];
  const lines = [header.join(",")];
  for (const r of state.results) {
    // review: 1 for a part that passes the page's threshold inside the review band, empty without a band
    const review = reviewEdge() === null || !judged(r) ? null : Number(inReview(r));
    lines.push([r.index, r.name, r.score, r.normalized_score, verdictWord(r), review,
                judged(r) ? state.threshold : null,
                r.label, r.regions ? r.regions.length : null, Math.round(r.milliseconds * 10) / 10, r.time,
                r.error, r.correction ? `${r.correction.label} (${r.correction.id})` : null].map(csvCell).join(","));
  }
  return lines.join("\r\n") + "\r\n";
}
window.prnCsv = csvText;

function download() {
  const url = URL.createObjectURL(new Blob([csvText()], { type: "text/csv" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = "prn-results.csv";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ----------------------------------------------------------------------------- start

function describe(m) {
  const parts = [`${m.kind} model`, m.backbone, `input ${m.input_size[0]}×${m.input_size[1]}`, m.device];
  parts.push(m.image_threshold === null
    ? "no threshold: not calibrated, nothing is judged until a threshold is set with the slider (or prn calibrate RUN)"
    : `threshold ${fmt(m.image_threshold)} (${m.threshold_source})` +
      (reviewEdge() === null ? "" : `, review band from ${fmt(reviewEdge())}`));
  return parts.join(" · ");
}

// the model's description, threshold, review band and notes on the page, the results judged again;
// follow: the slider goes to the model's calibrated threshold (else it stays where it is)
function showModel(m, follow) {
  state.model = m;
  state.calibrated = m.image_threshold;
  if (follow) state.threshold = state.calibrated;
  $("model-info").textContent = describe(m);
  showCalibrationNotes(m);
  $("reset").disabled = state.calibrated === null;
  updateRange();                       // an unset slider starts at the calibrated threshold
  $("threshold-value").textContent = fmt(state.threshold);
  rejudge();
}

// the server swapped its model (POST /model/reload) while the page was open: its threshold, band and
// notes are the new model's from here on; a slider left at the old calibrated threshold follows
async function modelChanged(shown) {
  const before = state.calibrated;
  const followed = state.threshold === before;
  const notice = $("model-changed");
  notice.hidden = false;
  let m;
  try {
    m = await api("model");
  } catch (e) {  // the scores just returned still show; only the new model's details are missing
    notice.textContent = `The server loaded another model, whose threshold could not be read (${e.message}): ` +
      "reload the page before judging by the verdicts shown.";
    return;
  }
  showModel(m, followed);
  notice.textContent = `The server loaded another model (calibrated threshold ${fmt(before)} → ${fmt(state.calibrated)}` +
    `${followed ? ", the slider moved with it" : ", the slider kept where you set it"}); ` +
    `the ${shown} result${shown === 1 ? "" : "s"} shown before ${shown === 1 ? "was" : "were"} scored by the previous one.`;
}

// one modelChanged at a time: an upload and the watch below can see the same reload together
let following = null;
function followModel(shown) {
  if (!following) following = modelChanged(shown).finally(() => { following = null; });
  return following;
}

// a page left open on a line's screen learns of a reload before the next part is scored: it asks
// /health for the model's generation every MODEL_CHECK_MS while it is visible, and when it becomes
// visible again; an unreachable server is left for the next upload to report
const MODEL_CHECK_MS = 20000;
async function checkModel() {
  if (!state.model || following || document.visibilityState !== "visible") return;
  let h;
  try {
    h = await api("health");
  } catch (e) {
    return;
  }
  if (h.model_generation !== state.model.generation) await followModel(state.results.length);
}

async function start() {
  let m;
  try {
    m = await api("model");
  } catch (e) {
    $("model-info").textContent = `The model is not reachable: ${e.message}`;
    return;
  }
  showModel(m, false);
  showDrift(m.appearance ? m.appearance.recent : null);
  const l = m.limits;
  $("limits").textContent = `up to ${l.max_images} images and ${(l.max_request_bytes / 1048576).toFixed(0)} MB ` +
    `a request, ${(l.max_pixels / 1e6).toFixed(1)} megapixels an image`;
  if (window.prnCorrections) window.prnCorrections.start(m);
}

$("files").addEventListener("change", async (e) => {
  await upload(e.target.files);
  e.target.value = "";                 // the same file can be picked again
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  upload(e.dataTransfer.files);
});
$("threshold").addEventListener("input", (e) => setThreshold(Number(e.target.value)));
$("reset").addEventListener("click", () => {
  $("threshold").value = state.calibrated;
  setThreshold(state.calibrated);
});
$("download").addEventListener("click", download);
// what correct.js needs of the page: the results and how they are judged now
window.prnPage = { state, say, verdictWord, fmt, api };
document.addEventListener("visibilitychange", checkModel);
setInterval(checkModel, MODEL_CHECK_MS);
start();
