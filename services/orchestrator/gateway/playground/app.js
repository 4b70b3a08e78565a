// The BAGEL playground: a page on the gateway's public job API (POST /v1/jobs, its event stream,
// cancel and result). Every API call sends the token from the field at the top, kept in localStorage.
"use strict";

// The reference's defaults for each image workflow (edit leaves the size to the input image's).
const DEFAULTS = {
  generate: {width: 1024, height: 1024, num_timesteps: 50, seed: "", cfg_text_scale: 4.0, cfg_img_scale: 1.0,
             cfg_interval_lo: 0.4, cfg_interval_hi: 1.0, cfg_renorm_type: "CFG_RENORM_TYPE_GLOBAL",
             cfg_renorm_min: 0.0, timestep_shift: 3.0},
  edit: {width: "", height: "", num_timesteps: 50, seed: "", cfg_text_scale: 4.0, cfg_img_scale: 2.0,
         cfg_interval_lo: 0.0, cfg_interval_hi: 1.0, cfg_renorm_type: "CFG_RENORM_TYPE_TEXT_CHANNEL",
         cfg_renorm_min: 0.0, timestep_shift: 3.0},
};
const PROMPTS = {understand: "What is in this picture?", generate: "A red boat on a calm lake at dawn",
                 edit: "Make it look like a watercolor painting"};
const IMAGE_FIELDS = Object.keys(DEFAULTS.generate);
const INT_FIELDS = new Set(["width", "height", "num_timesteps", "seed"]);
const ENDED = new Set(["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"]);

const $ = (id) => document.getElementById(id);
// API paths relative to the page (served at <base>/playground/), so the page works behind a path prefix.
const apiUrl = (path) => new URL("../v1/" + path, location.href).toString();

let workflow = "understand";
let current = null;  // {id, controller} of the job being followed
const edited = {generate: {}, edit: {}};  // image options typed per tab, kept across tab switches

// ---- token ----------------------------------------------------------------------------------------
$("token").value = localStorage.getItem("bagel-token") || "";
$("token").addEventListener("input", () => localStorage.setItem("bagel-token", $("token").value.trim()));

async function api(path, init = {}) {
  const headers = {...(init.headers || {}), Authorization: "Bearer " + $("token").value.trim()};
  const response = await fetch(apiUrl(path), {...init, headers});
  if (!response.ok) {
    // The job API answers errors as {"code", "message"}; show the message, whatever else went wrong.
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = body.message ? `${body.code}: ${body.message}` : JSON.stringify(body);
    } catch (_) { /* not JSON */ }
    throw new Error(`${response.status} ${detail}`);
  }
  return response;
}

// ---- tabs -----------------------------------------------------------------------------------------
function showTab(name) {
  if (workflow in edited) edited[workflow] = readImageFields();
  const prompt = $("prompt");
  if (!prompt.value || Object.values(PROMPTS).includes(prompt.value)) prompt.value = PROMPTS[name];
  workflow = name;
  for (const b of document.querySelectorAll("#tabs button")) b.setAttribute("aria-selected", b.dataset.tab === name);
  $("image-field").hidden = name === "generate";
  $("text-options").hidden = name !== "understand";
  $("image-options").hidden = name === "understand";
  if (name in DEFAULTS) {
    const values = {...DEFAULTS[name], ...edited[name]};
    for (const f of IMAGE_FIELDS) $(f).value = values[f];
  }
}

function readImageFields() {
  return Object.fromEntries(IMAGE_FIELDS.map((f) => [f, $(f).value]));
}

document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));

// ---- the request ----------------------------------------------------------------------------------
function buildRequest() {
  const request = {workflow, prompt: $("prompt").value, think: $("think").checked};
  if (workflow === "understand") {
    request.text_params = {max_new_tokens: Number($("max_new_tokens").value)};
  } else {
    // Blank fields are left out, so the server takes the workflow's default (a random seed, the input's size).
    const params = {};
    for (const [name, raw] of Object.entries(readImageFields())) {
      if (raw === "") continue;
      params[name] = name === "cfg_renorm_type" ? raw : INT_FIELDS.has(name) ? parseInt(raw, 10) : Number(raw);
    }
    request.image_params = params;
  }
  return request;
}

async function submit(event) {
  event.preventDefault();
  const request = buildRequest();
  const file = $("image").files[0];
  if (workflow !== "generate" && !file) return showError("Choose an image first.");
  resetOutput();
  setRunning(true);
  setStatus("Submitting…");
  try {
    // Multipart carries the image as a file (no base64); generate is plain JSON.
    let init;
    if (workflow === "generate") {
      init = {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(request)};
    } else {
      const form = new FormData();
      form.append("request", JSON.stringify(request));
      form.append("image", file);
      init = {method: "POST", body: form};
    }
    const job = await (await api("jobs", init)).json();
    current = {id: job.id, controller: new AbortController()};
    $("output").dataset.jobId = job.id;
    render(job);
    await follow(job.id, current.controller.signal);
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    setRunning(false);
    current = null;
  }
}

// Server-sent events read with fetch: EventSource cannot send the Authorization header.
async function follow(id, signal) {
  for (;;) {  // the stream closes when the job ends, or after the server's longest wait: then reconnect
    const response = await api(`jobs/${id}/events`, {signal});
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;  // a keep-alive comment
        const job = JSON.parse(data);
        await render(job);
        if (ENDED.has(job.state)) return;
      }
    }
  }
}

async function cancel() {
  if (!current) return;
  $("cancel").disabled = true;
  try {
    await api(`jobs/${current.id}/cancel`, {method: "POST"});  // the event stream then reports the end
  } catch (err) {
    showError(err.message);
  }
}

// ---- output ---------------------------------------------------------------------------------------
async function render(job) {
  const state = (job.state || "").replace("JOB_STATE_", "").toLowerCase();
  const p = job.progress || {};  // zero fields are left out of the JSON
  setStatus(`Job ${job.id}: ${state}${p.stage && !ENDED.has(job.state) ? " — " + p.stage : ""}`);
  if (p.total) {
    $("progress").setAttribute("max", p.total);
    $("progress").setAttribute("value", p.step || 0);
    $("progress-label").textContent = `${p.stage} ${p.step || 0}/${p.total}`;
  }
  if (p.stage === "think") showText("think", p.text);
  if (p.stage === "answer") showText("answer", p.text);
  const r = job.result || {};
  if (job.state === "JOB_STATE_SUCCEEDED") {
    $("progress").setAttribute("value", $("progress").getAttribute("max"));
    $("progress-label").textContent = "done";
    // The final texts are authoritative: text streamed as reasoning that never closed is the answer.
    $("think-box").hidden = !r.think;
    $("think-text").textContent = r.think || "";
    showText("answer", r.text);
    if (r.image_key) await showImage(job);
  } else if (job.state === "JOB_STATE_CANCELLED") {
    const why = (job.error && job.error.message) || "";  // e.g. a deadline; a plain cancel says only "cancelled"
    showError(why && why.toLowerCase() !== "cancelled" ? `Cancelled: ${why}` : "Cancelled.");
  } else if (job.state === "JOB_STATE_FAILED") {
    showError(`${job.error.code}: ${job.error.message}`);
  }
}

function showText(which, text) {
  if (!text) return;
  if (which === "think") {
    $("think-box").hidden = false;
    $("think-text").textContent = text;
  } else {
    $("answer").hidden = false;
    $("answer").textContent = text;
  }
}

async function showImage(job) {
  // The gateway's own result URL, fetched with the token and shown from a blob: URL.
  const blob = await (await api(`jobs/${job.id}/result?format=png`)).blob();
  const url = URL.createObjectURL(blob);
  $("result-image").src = url;
  $("download").href = url;
  $("download").download = `bagel-${job.id}.png`;
  $("image-info").textContent = `${job.result.width}×${job.result.height}, seed ${job.result.seed}`;
  $("figure").hidden = false;
}

function resetOutput() {
  for (const id of ["error", "think-box", "answer", "figure"]) $(id).hidden = true;
  for (const id of ["think-text", "answer", "progress-label", "image-info"]) $(id).textContent = "";
  const old = $("result-image").src;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  $("result-image").removeAttribute("src");
  $("progress").setAttribute("max", 1);
  $("progress").setAttribute("value", 0);
  delete $("output").dataset.jobId;
}

function setStatus(text) { $("status").textContent = text; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function setRunning(running) {
  $("run").disabled = running;
  $("cancel").disabled = !running;
}

$("job-form").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
showTab("understand");
