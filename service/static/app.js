// The lipsync web page: plain JavaScript, no build step. It talks to this server's /v1 API only.
//
// - Every API call carries `Authorization: Bearer <token>` when a token was typed; the token is kept
//   in this tab's sessionStorage. The server's 401 is what asks for it.
// - Errors are shown as the API's own message ({"error": {"code", "message", "field"}}). An answer without it (a
//   404 in plain text: Ray Serve's while the service starts; a 502/503/504) is the service away (`error.away`):
//   what follows a job, a session or the jobs list asks again; only the API's own 404 says a thing is gone.
// - A job is followed over its Server-Sent Events (read with fetch: EventSource cannot send a header),
//   with GET /v1/jobs/{id} as the fallback, and played while it renders from its `watch_url` (HLS:
//   hls.js where Media Source Extensions exist, the browser's own HLS in Safari).
// - Tabs: a `<button data-tab="x">` in the tab bar shows `<section data-panel="x">`. A later tab adds
//   one of each and may use `window.lipsync` (api, apiJson, upload, showError, onTabShown).
"use strict";

const TOKEN_KEY = "lipsync.token";
// set once the service answered 401 to a call without a token: until a token is typed, calls are not sent (each
// 401 is an error in the browser's console, two on every load before; a reload now asks for the token at once)
const NEEDS_TOKEN_KEY = "lipsync.needs-token";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// the token the service refused last, still in the token form to be corrected (null once another is typed)
let refusedToken = null;
const $ = (id) => document.getElementById(id);

// --- API ------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// The 401 a call without a token would get, once the service is known to need one (`NEEDS_TOKEN_KEY`): the
// page asks for the token, the caller sees the 401 it would have had; null when the call is to be sent.
function unsentWithoutToken(sent) {
  if (sent || !sessionStorage.getItem(NEEDS_TOKEN_KEY)) return null;
  const error = tokenNeeded();
  refused(error, sent);
  error.tokenSent = refusedToken !== null; // a token typed and refused is not a token never typed
  return error;
}

// The error a call gets while the page waits for its token: "needs its API token", or, once a token typed was
// refused (and none typed since), "did not accept this token" (Render said "needs its API token: type it above"
// after the form had said the token typed was not accepted).
function tokenNeeded() {
  const error = new ApiError(401, "auth.invalid_token", "This service needs its API token", null);
  error.tokenSent = refusedToken !== null;
  return error;
}

function authHeaders(extra, value) {
  const headers = Object.assign({}, extra || {});
  if (value) headers.Authorization = "Bearer " + value;
  return headers;
}

function errorFromBody(status, statusText, text) {
  let body = null;
  try {
    body = JSON.parse(text);
  } catch (_) {
    body = null;
  }
  const detail = body && body.error;
  if (detail && typeof detail.message === "string") {
    return new ApiError(status, detail.code, detail.message, detail.field);
  }
  const error = new ApiError(status, "http." + status, ("The server answered " + status + " " + (statusText || "")).trim(),
    null);
  // Not the API's own answer: a 404 in plain text is Ray Serve's while the service (re)starts and its routes do not
  // exist yet ("Path '/v1/jobs/ID' not found. Ping http://...": about a second), a 502/503/504 a proxy's or Serve's
  // while the service is away. Such an error says nothing of the job or session asked for: the caller asks again
  // (the job card and the Live tab took that 404 for "gone" and stopped following for good).
  error.away = [404, 502, 503, 504].includes(status);
  return error;
}

// How long a call waits for the server's answer to begin (its body, e.g. a download, is not bounded):
// above the server's own 30 s deadline on the actors it asks; `options.timeoutMs` for slower calls.
const API_TIMEOUT_MS = 45000;

async function api(path, options) {
  options = options || {};
  const limit = options.timeoutMs || API_TIMEOUT_MS;
  const deadline = new AbortController();
  const timer = setTimeout(() => deadline.abort(), limit);
  const caller = options.signal;
  if (caller) caller.addEventListener("abort", () => deadline.abort(), { once: true });
  let response;
  const sent = token(); // the token this call carries (a 401 speaks of it, not of one typed since)
  const unsent = unsentWithoutToken(sent);
  if (unsent) {
    clearTimeout(timer);
    throw unsent;
  }
  try {
    response = await fetch(path, Object.assign({}, options, { signal: deadline.signal, headers: authHeaders(options.headers, sent) }));
  } catch (err) {
    if (caller && caller.aborted) throw err; // the caller's own abort (an AbortError)
    if (deadline.signal.aborted) {
      throw new ApiError(0, "network", "The server did not answer within " + Math.round(limit / 1000) + " s", null);
    }
    throw new ApiError(0, "network", "Could not reach the server (" + err.message + ")", null);
  } finally {
    clearTimeout(timer);
  }
  if (!response.ok) {
    const error = errorFromBody(response.status, response.statusText, await response.text());
    if (response.status === 401) refused(error, sent);
    throw error;
  }
  return response;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

// An upload that sends no byte for this long is given up (a network that stalled: the browser would
// wait for ever); a large file on a slow link still goes through, however long it takes.
const UPLOAD_STALL_MS = 60000;

// A multipart POST with upload progress (fetch reports none): resolves to the JSON answer, which must
// come within `answerMs` of the upload's end (the SDK's bounds: 600 s for a job's inputs to be checked
// and staged, 900 s for an avatar to be prepared).
function upload(path, formData, onProgress, answerMs) {
  return new Promise((resolve, reject) => {
    const unsent = unsentWithoutToken(token());
    if (unsent) return reject(unsent);
    const xhr = new XMLHttpRequest();
    let timer = null;
    let givenUp = null;
    const giveUpAfter = (ms, message) => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        givenUp = message;
        xhr.abort();
      }, ms);
    };
    xhr.open("POST", path);
    const sent = token();
    const headers = authHeaders(null, sent);
    for (const name of Object.keys(headers)) xhr.setRequestHeader(name, headers[name]);
    const stalled = "The upload made no progress for " + UPLOAD_STALL_MS / 1000 + " s (the connection stalled); try again";
    giveUpAfter(UPLOAD_STALL_MS, stalled);
    xhr.upload.onprogress = (e) => {
      giveUpAfter(UPLOAD_STALL_MS, stalled);
      if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total);
    };
    xhr.upload.onload = () =>
      giveUpAfter(answerMs, "The server did not answer within " + Math.round(answerMs / 1000) + " s of the upload's end");
    xhr.onload = () => {
      clearTimeout(timer);
      if (xhr.status >= 200 && xhr.status < 300) {
        try {
          resolve(JSON.parse(xhr.responseText));
        } catch (_) {
          reject(new ApiError(xhr.status, "http.body", "The server's answer could not be read", null));
        }
        return;
      }
      const error = errorFromBody(xhr.status, xhr.statusText, xhr.responseText);
      if (xhr.status === 401) refused(error, sent);
      reject(error);
    };
    xhr.onerror = () => {
      clearTimeout(timer);
      reject(new ApiError(0, "network", "Could not reach the server (the upload was interrupted)", null));
    };
    xhr.onabort = () => {
      clearTimeout(timer);
      reject(new ApiError(0, "network", givenUp || "The upload was stopped", null));
    };
    xhr.send(formData);
  });
}

// --- messages -------------------------------------------------------------------------------
function showError(element, error) {
  if (!error) {
    element.hidden = true;
    element.textContent = "";
    return;
  }
  element.textContent = "";
  let message = error.message || String(error);
  if (error.status === 401 && error.code === "auth.invalid_token") { // the API's words name a header a page hides
    // said of the token its call carried (`refused`): the token is gone from storage by the time this is shown
    message = error.tokenSent ? "The service did not accept this token: correct it above."
      : "This service needs its API token: type it above.";
  }
  // the server's message may name the field already ("model: ...", "model 'x': ...", "sync_mode cut_off ...")
  const named = error.field && !new RegExp("^" + error.field.replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + "[: ]")
    .test(message);
  element.append(named ? error.field + ": " + message : message);
  if (error.code && error.code !== "network") {
    const code = document.createElement("span");
    code.className = "code";
    code.textContent = error.code;
    element.append(" ", code);
  }
  element.hidden = false;
}

// "3.0 s of video, 320x240 at 25 fps": what the finished file holds (its picture size may differ from
// the template's by a pixel: H.264's 4:2:0 needs even sizes)
function outputSummary(output) {
  let text = seconds(output.duration) + " of video";
  if (output.width && output.height) text += ", " + output.width + "x" + output.height;
  if (output.fps) text += " at " + (Math.round(output.fps * 100) / 100) + " fps";
  return text;
}

function seconds(value) {
  if (value === null || value === undefined || !isFinite(value)) return "";
  if (value < 60) return value.toFixed(1) + " s";
  const m = Math.floor(value / 60);
  return m + " min " + Math.round(value - 60 * m) + " s";
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// --- token ----------------------------------------------------------------------------------
// A call answered 401: the error remembers whether its call carried a token (a wrong token is not a
// missing one), then the page asks for the token.
function refused(error, sent) {
  error.tokenSent = !!sent;
  if (!sent) sessionStorage.setItem(NEEDS_TOKEN_KEY, "1");
  askForToken(error, sent);
}

function askForToken(error, sent) {
  // a call sent before the token was typed (or changed) answers 401 late: it says nothing of the token
  // now, which it would wipe (a slow page load's 401 took the token just typed, and Speak then had none)
  if ((sent || null) !== token()) return;
  const hadToken = !!token();
  sessionStorage.removeItem(TOKEN_KEY);
  $("token-state").hidden = true;
  $("token-form").hidden = false;
  // several calls may answer 401 for one wrong token: only the first still had it. What was refused is in
  // the field, to be corrected rather than typed again (a token kept from before a reload too)
  if (hadToken) {
    showError($("token-error"), new ApiError(0, error.code, "The service did not accept this token: correct it and " +
      "press Use token.", null));
    $("token-input").value = sent;
    refusedToken = sent;
  }
  $("token-input").focus();
}

function tokenChanged() {
  $("token-state").hidden = !token();
  // a 401 left on any tab (Render, Avatars, Live: "type it above") asked for the token, whose form is gone now
  for (const element of document.querySelectorAll(".error[role=alert]:not(#token-error)")) {
    const code = element.querySelector(".code");
    if (code && /^auth\./.test(code.textContent)) showError(element, null);
  }
  loadAvatars();
  loadJobs(false);
  if (current) followJob(current);
  // the tab on screen reads again what its 401 left empty (the Live tab's avatars: "Prepare an avatar first")
  const shown = document.querySelector("[data-panel]:not([hidden])");
  if (shown && shown.dataset.panel !== "avatars" && shown.dataset.panel !== "jobs") {
    for (const listener of tabListeners[shown.dataset.panel] || []) listener();
  }
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("token-input").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  refusedToken = null;
  showError($("token-error"), null);
  // the field keeps it (hidden with its form): if the service refuses it, the form comes back with it to correct
  const typing = $("token-form").contains(document.activeElement);
  $("token-form").hidden = true;
  // the focus was in the form now hidden (it fell to BODY): on the shown tab's first control instead
  if (typing) focusFirstControl();
  tokenChanged();
});

// The first control of the tab shown that takes the focus (Render: its speech audio), else the tab itself.
function focusFirstControl() {
  const panel = document.querySelector("[data-panel]:not([hidden])");
  const controls = panel ? panel.querySelectorAll("input, select, textarea, button, summary, [tabindex]") : [];
  const first = Array.from(controls).find((el) => !el.disabled && el.tabIndex >= 0 && el.getClientRects().length);
  const tab = document.querySelector("[role=tab][aria-selected=true]");
  if (first || tab) (first || tab).focus();
}

// The token goes as the page does, after what leaving sends with it: a live session's end (the Live tab's own
// `pagehide`) went out without a token, refused, and the session ran on until its idle timeout. So the listener that
// removes it is added at the first click, after the Live tab's (live.js loads after this file). A reload the page's
// question stops ("Leave site?") keeps the page and its token: the wish lapses once the page is seen to stay
// (timers do not run while the question is asked, nor once the page has gone).
let forgetting = false;
let forgetOnLeaving = null;

$("token-forget").addEventListener("click", () => {
  forgetting = true;
  setTimeout(() => { forgetting = false; }, 3000);
  if (!forgetOnLeaving) {
    forgetOnLeaving = () => { if (forgetting) sessionStorage.removeItem(TOKEN_KEY); };
    window.addEventListener("pagehide", forgetOnLeaving);
  }
  // what was read with the token (jobs, avatars, the open job and its player) leaves the screen with it
  history.replaceState(null, "", location.pathname + location.search);
  location.reload();
});

// --- tabs -----------------------------------------------------------------------------------
const tabListeners = {};

function onTabShown(name, listener) {
  (tabListeners[name] = tabListeners[name] || []).push(listener);
}

const TAB_KEY = "lipsync.tab"; // the tab shown last in this browser tab: a reload comes back on it

function showTab(name) {
  for (const button of document.querySelectorAll("[data-tab]")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
    button.tabIndex = button.dataset.tab === name ? 0 : -1; // Tab reaches the chosen tab; the arrows the others
  }
  for (const panel of document.querySelectorAll("[data-panel]")) {
    panel.hidden = panel.dataset.panel !== name;
  }
  sessionStorage.setItem(TAB_KEY, name);
  showAddress();
  for (const listener of tabListeners[name] || []) listener();
}

// The address names the job shown (#job=ID) only while Render shows it: a job link left in it on another
// tab overrode the remembered tab, and a reload on Jobs or Live came back on Render.
function showAddress() {
  const render = !document.querySelector("[data-panel=render]").hidden;
  const hash = render && current ? "#job=" + encodeURIComponent(current.id) : "";
  if (location.hash !== hash) history.replaceState(null, "", location.pathname + location.search + hash);
}

document.querySelector(".tabs").addEventListener("click", (e) => {
  const button = e.target.closest("[data-tab]");
  if (button) showTab(button.dataset.tab);
});

// The tab bar as WAI-ARIA's tabs pattern has it: Left and Right move to the tab before or after (around the
// ends), Home and End to the first or last, and the tab moved to is shown.
document.querySelector(".tabs").addEventListener("keydown", (e) => {
  const tabs = Array.from(document.querySelectorAll("[data-tab]"));
  const at = tabs.indexOf(e.target);
  const to = { ArrowLeft: at - 1, ArrowRight: at + 1, Home: 0, End: tabs.length - 1 }[e.key];
  if (at < 0 || to === undefined) return;
  e.preventDefault();
  const tab = tabs[(to + tabs.length) % tabs.length];
  tab.focus();
  showTab(tab.dataset.tab);
});

// after every script has added its tab listeners (deferred scripts run before DOMContentLoaded); a job link
// (#job=ID) opens on Render, where its job is shown
window.addEventListener("DOMContentLoaded", () => {
  const tab = sessionStorage.getItem(TAB_KEY);
  if (["jobs", "avatars", "live"].includes(tab) && !/^#job=/.test(location.hash)) showTab(tab);
});

// --- submit ---------------------------------------------------------------------------------
function templateChoice() {
  return document.querySelector("input[name=template]:checked").value;
}

function showTemplateChoice() {
  const avatar = templateChoice() === "avatar";
  $("template-video").hidden = avatar;
  $("template-avatar").hidden = !avatar;
}

for (const radio of document.querySelectorAll("input[name=template]")) {
  radio.addEventListener("change", showTemplateChoice);
}

// The form's inputs by the API's field names, and the words of their labels (as the Live tab has its own).
const RENDER_FIELDS = {
  audio: ["audio", "Speech audio"], video: ["video", "Template video"], avatar_id: ["avatar-select", "Avatar"],
  sync_mode: ["sync-mode", "When audio and video differ in length"], model: ["model", "Model"],
};

function markInvalid(field) {
  for (const el of document.querySelectorAll("#submit-form .invalid")) {
    el.classList.remove("invalid");
    el.removeAttribute("aria-invalid");
  }
  if (field === "model") $("model").closest("details").open = true;
  if (field && RENDER_FIELDS[field]) {
    const input = $(RENDER_FIELDS[field][0]);
    input.classList.add("invalid");
    input.setAttribute("aria-invalid", "true"); // (a screen reader says so; the red border is for the eye)
  }
}

// An error about a field, said with its label's words ("avatar_id: ..." named a word the page does not show); a
// message that names the field itself ("sync_mode cut_off ends the video ...": the option's own words) is kept.
function inLabelWords(err, fields) {
  if (!(err instanceof ApiError) || !fields[err.field]) return err;
  const field = err.field.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  if (new RegExp("^" + field + " ").test(err.message)) return err;
  const said = new ApiError(err.status, err.code, fields[err.field][1] + ": " +
    err.message.replace(new RegExp("^" + field + ":\\s*"), ""), null);
  said.tokenSent = err.tokenSent;
  return said;
}

$("submit-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const error = $("submit-error");
  showError(error, null);
  markInvalid(null);
  dismissJob(); // what comes next (this job, or why it was refused) is not the last job's: its card goes
  const form = new FormData();
  const audio = $("audio").files[0];
  // (the page's own words: what to choose, by its label's words, with no field name before them)
  if (!audio) {
    markInvalid("audio");
    return showError(error, new ApiError(0, null, "Choose a speech audio file.", null));
  }
  form.append("audio", audio, audio.name);
  if (templateChoice() === "video") {
    const video = $("video").files[0];
    if (!video) {
      markInvalid("video");
      return showError(error, new ApiError(0, null, "Choose a template video (or a prepared avatar).", null));
    }
    form.append("video", video, video.name);
  } else {
    const avatar = $("avatar-select").value;
    if (!avatar) {
      markInvalid("avatar_id");
      // none could be listed while the page waits for its token: that is what is missing (as on the Live tab)
      if (!$("token-form").hidden) return showError(error, tokenNeeded());
      return showError(error, new ApiError(0, null, $("avatar-empty").hidden
        ? "Choose a prepared avatar (or a template video)."
        : "There is no prepared avatar yet: prepare one in the Avatars tab, or choose a template video.", null));
    }
    form.append("avatar_id", avatar);
  }
  form.append("sync_mode", $("sync-mode").value);
  const model = $("model").value.trim();
  if (model) form.append("model", model);

  const button = $("submit-button");
  const bar = $("upload-progress");
  button.disabled = true;
  button.textContent = "Uploading…";
  bar.value = 0;
  bar.hidden = false;
  let focusOn = button;
  try {
    const accepted = await upload("/v1/jobs", form, (fraction) => {
      bar.value = fraction;
      if (fraction >= 1) button.textContent = "Checking the files…";
    }, 600000);
    openJob(accepted.id);
    loadJobs(false);
    focusOn = $("job-title");
  } catch (err) {
    markInvalid(err.field);
    showError(error, inLabelWords(err, RENDER_FIELDS));
    if (err.field && RENDER_FIELDS[err.field]) focusOn = $(RENDER_FIELDS[err.field][0]);
  } finally {
    button.disabled = false;
    button.textContent = "Render";
    bar.hidden = true;
  }
  // the button, disabled while it sent, let the focus fall to BODY (a screen reader lost its place): on the new
  // job's card, else on the field refused, else on the button again; not where the user has gone meanwhile
  if (document.activeElement === document.body || document.activeElement === button) focusOn.focus();
});

// --- one job: progress, player, download ---------------------------------------------------
let current = null; // {id, view, controller, hls, playerStarted}

function openJob(id) {
  closeJob();
  current = { id: id, view: null, controller: null, hls: null, playerStarted: false };
  $("job-card").hidden = false;
  $("job-id").textContent = id;
  $("job-state").textContent = "";
  $("job-state").className = "state";
  $("job-state").hidden = true; // until its view comes (an empty pill was a grey blob)
  $("job-progress").value = 0;
  $("job-detail").textContent = "";
  showError($("job-error"), null);
  $("download-button").disabled = true;
  $("download-button").hidden = false;
  $("cancel-button").hidden = true;
  $("player-note").hidden = true;
  showTab("render");
  $("job-card").scrollIntoView({ block: "nearest" });
  followJob(current);
}

// The job card leaves the screen, and the job the address (a new submission: the last job's card under its
// error read as that error's job, "failed - no face found" under "unknown model").
function dismissJob() {
  closeJob();
  $("job-card").hidden = true;
  showAddress();
}

function closeJob() {
  if (!current) return;
  current.closed = true;
  if (current.controller) current.controller.abort();
  if (current.hls) current.hls.destroy();
  emptyPlayer($("player"));
  current = null;
}

// Stops a <video> and lets go of its source (the Watch and Live players).
function emptyPlayer(video) {
  video.pause();
  video.removeAttribute("src");
  video.load();
  video.hidden = true;
}

// Reads a text/event-stream body and calls onView for each `status` event (a job view).
async function readEvents(response, onView) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (data.length && (event === "status" || event === "message")) onView(JSON.parse(data.join("\n")));
    }
  }
}

async function followJob(job) {
  if (job.controller) job.controller.abort();
  const controller = new AbortController();
  job.controller = controller;
  const path = "/v1/jobs/" + encodeURIComponent(job.id);
  let failures = 0;
  while (!job.closed && job.controller === controller) {
    try {
      const response = await api(path + "/events", { signal: controller.signal, headers: { Accept: "text/event-stream" } });
      await readEvents(response, (view) => showJob(job, view));
      // the stream ended: at a terminal state, or a proxy cut it; read the view to know which
      showJob(job, await apiJson(path, { signal: controller.signal }));
      failures = 0;
    } catch (err) {
      if (err.name === "AbortError" || job.closed) return;
      // only the API's own 404 (job.not_found) says the job is gone; a plain one is a service (re)starting
      if (err.status === 401 || (err.status === 404 && !err.away)) {
        showError($("job-error"), err);
        if (err.status === 404 && !job.view) $("download-button").hidden = true; // no such job: nothing to download
        return;
      }
      if (err.status === 429) {
        // every event stream of this server is taken (LIPSYNC_MAX_EVENT_STREAMS): poll the job meanwhile
        try {
          showJob(job, await apiJson(path, { signal: controller.signal }));
          $("job-detail").textContent += " · polled: the server's event streams are all taken";
        } catch (pollErr) {
          if (pollErr.name === "AbortError" || job.closed) return;
          $("job-detail").textContent = "Lost contact with the server, retrying… (" + pollErr.message + ")";
        }
        if (job.view && TERMINAL.has(job.view.state)) return;
        await sleep(Math.min(5000, 2000 * 2 ** Math.min(failures, 2)));
        failures += 1;
        continue;
      }
      failures += 1;
      $("job-detail").textContent = "Lost contact with the server, retrying… (" +
        (err.away && err.status === 404 ? "the service is starting" : err.message) + ")";
    }
    if (job.view && TERMINAL.has(job.view.state)) return;
    await sleep(Math.min(5000, 500 * 2 ** Math.min(failures, 4)));
  }
}

function showJob(job, view) {
  if (job.closed) return;
  job.view = view;
  const state = $("job-state");
  state.hidden = false;
  state.textContent = view.state;
  state.className = "state s-" + view.state;
  $("job-progress").value = view.progress;
  const parts = [];
  if (!TERMINAL.has(view.state)) parts.push(waitingWords(view) || view.stage);
  if (view.frames_total) parts.push(view.frames_done + " / " + view.frames_total + " frames");
  if (view.output && view.output.duration) parts.push(outputSummary(view.output));
  if (TERMINAL.has(view.state)) parts.push("took " + seconds(tookSeconds(view)));
  $("job-detail").textContent = parts.join(" · ");
  // a cancel the user asked for is not an error: the state says it
  showError($("job-error"), view.state === "cancelled" ? null : view.error || null);
  $("cancel-button").hidden = TERMINAL.has(view.state);
  $("download-button").disabled = view.state !== "succeeded";
  // none will come; an expired output is gone (the card says so below)
  $("download-button").hidden = view.state === "failed" || view.state === "cancelled" || view.expired === true;
  if (view.watch_url && !job.playerStarted && view.frames_done > 0) {
    job.playerStarted = true;
    whenStreamStarts(job, view.watch_url);
  }
  if (!view.watch_url && view.state === "succeeded" && !job.playerStarted) {
    const note = $("player-note");
    note.textContent = view.expired
      ? "This job's video was removed (after the service's retention time, or on request): submit it again for a new one."
      : "This job has no stream to watch; download the mp4.";
    note.hidden = false;
  }
}

// A rendering job none of whose chunks has reached a worker yet: how many jobs go first (null otherwise)
function waitingWords(view) {
  if (view.waiting_for) return "waiting: " + view.waiting_for; // (the pool has no live worker of a kind now)
  if (view.jobs_ahead === null || view.jobs_ahead === undefined) return null;
  const n = view.jobs_ahead;
  return "waiting for a worker" + (n ? " · " + n + (n === 1 ? " job" : " jobs") + " ahead" : "");
}

function tookSeconds(view) {
  return (Date.parse(view.updated_at) - Date.parse(view.created_at)) / 1000;
}

function play(video) {
  if (video.dataset.autoMuted) { // muted by this page for an earlier job, not by the user: sound again if allowed
    delete video.dataset.autoMuted;
    video.muted = false;
  }
  video.play().catch((err) => {
    if (err.name !== "NotAllowedError") return;
    // autoplay with sound refused (no click on this page yet): play muted, say so
    video.muted = true;
    video.dataset.autoMuted = "1";
    video.play().catch(() => {});
    const note = $("player-note");
    note.textContent = "Playing muted (the browser blocks sound until you interact): unmute in the player.";
    note.hidden = false;
  });
}

// The player starts once the playlist lists a segment (an empty live playlist is an error to hls.js).
// The watch URL is signed when the server has a token: no header is needed, nor sent.
async function whenStreamStarts(job, url) {
  let failures = 0;
  while (!job.closed) {
    try {
      const response = await fetch(url, { cache: "no-store", signal: AbortSignal.timeout(15000) });
      const playlist = response.ok ? await response.text() : "";
      if (playlist.includes("#EXTINF")) return startPlayer(job, url);
      if (playlist.includes("#EXT-X-ENDLIST")) break; // ended with nothing published (or none kept)
      // expired: the newest view's URL (a 401 counts too: a view that no longer changes, e.g. after the
      // API token changed, would be asked again and again)
      if (response.status === 401 && job.view) url = job.view.watch_url;
      if (response.ok) failures = 0;
      else if (++failures > 20) break;
    } catch (_) {
      if (++failures > 20) break;
    }
    if (job.view && TERMINAL.has(job.view.state) && job.view.state !== "succeeded") return; // nothing to watch
    await sleep(500);
  }
  if (!job.closed) {
    const note = $("player-note");
    note.textContent = job.view && job.view.state === "succeeded"
      ? "This job has no stream to watch; download the mp4."
      : "The stream could not be loaded; download the mp4 when the job is done.";
    note.hidden = false;
  }
}

// Once the player has its size, a player not wholly on screen is scrolled into view (after Render the job card
// starts low on the page, its player below the fold), smoothly unless the user asks for reduced motion; not
// when its tab is not shown. The card's top goes to the top: a line more above the player (the job's figures
// wrap on a phone) leaves it on screen, as aligning the player's own bottom did not.
function bringIntoView(job, video) {
  video.addEventListener("loadedmetadata", () => {
    if (job.closed || document.querySelector("[data-panel=render]").hidden) return;
    const shown = video.getBoundingClientRect();
    if (shown.top >= 0 && shown.bottom <= window.innerHeight) return;
    const reduce = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    $("job-card").scrollIntoView({ block: "start", behavior: reduce ? "auto" : "smooth" });
  }, { once: true });
}

function startPlayer(job, url) {
  const video = $("player");
  video.hidden = false;
  bringIntoView(job, video);
  if (window.Hls && window.Hls.isSupported()) {
    // Start at the beginning even while the playlist is live (an EVENT playlist that grows).
    const hls = new window.Hls({ startPosition: 0, liveDurationInfinity: false, backBufferLength: 30 });
    job.hls = hls;
    // a server that is away (a restart takes about a minute) is asked again for about 3 minutes; a fragment
    // that loads resets the count (it gave up after 15 s: the player stayed stuck once the job came back)
    let retries = 0;
    job.playing = url;
    // The stream's signed URL refused (401: it expired, or the service's API token changed under the page): the
    // newest view's URL, else the job read again for one (the player asked the refused URL again and again, frozen,
    // while the job's views carried a fresh one). A read that fails leaves the URL as it is: the next refusal asks
    // again, and the retries below go on.
    let refreshing = false;
    async function freshUrl() {
      if (refreshing) return;
      refreshing = true;
      try {
        let fresh = job.view && job.view.watch_url;
        if (!fresh || fresh === job.playing) {
          fresh = (await apiJson("/v1/jobs/" + encodeURIComponent(job.id))).watch_url;
        }
        if (!job.closed && fresh && fresh !== job.playing) {
          job.playing = fresh;
          hls.config.startPosition = video.currentTime; // (a new source starts at startPosition: not back at 0:00)
          hls.loadSource(fresh);
        }
      } catch (err) {
        console.warn("reading job " + job.id + " for a fresh stream URL:", err);
      } finally {
        refreshing = false;
      }
    }
    hls.on(window.Hls.Events.MANIFEST_PARSED, () => play(video));
    hls.on(window.Hls.Events.FRAG_LOADED, () => { retries = 0; });
    hls.on(window.Hls.Events.ERROR, (_event, data) => {
      if (job.closed) return;
      if (data.response && data.response.code === 401) freshUrl();
      if (!data.fatal) return;
      if (data.type === window.Hls.ErrorTypes.MEDIA_ERROR) {
        hls.recoverMediaError();
      } else if (retries < 40) {
        retries += 1;
        const playing = job.playing; // (a fresh URL loaded meanwhile has started loading itself)
        setTimeout(() => job.closed || job.playing !== playing || hls.startLoad(), Math.min(1000 * retries, 5000));
      } else {
        const note = $("player-note");
        note.textContent = "The stream could not be played (" + data.details + "); download the mp4 when the job is done.";
        note.hidden = false;
      }
    });
    hls.loadSource(url);
    hls.attachMedia(video);
  } else if (video.canPlayType("application/vnd.apple.mpegurl")) {
    video.src = url; // Safari plays HLS itself
    play(video);
  } else {
    video.hidden = true;
    const note = $("player-note");
    note.textContent = "This browser cannot play the stream while it renders; download the mp4 when the job is done.";
    note.hidden = false;
  }
}

$("download-button").addEventListener("click", async () => {
  if (!current) return;
  const job = current;
  const button = $("download-button");
  const path = "/v1/jobs/" + encodeURIComponent(job.id) + "/result";
  const link = document.createElement("a");
  link.download = job.id + ".mp4";
  let objectUrl = null;
  if (token()) {
    // a link cannot carry the Authorization header: fetch the file, hand the browser a blob
    button.disabled = true;
    button.textContent = "Downloading…";
    try {
      objectUrl = URL.createObjectURL(await (await api(path)).blob());
    } catch (err) {
      showError($("job-error"), err);
      return;
    } finally {
      button.disabled = false;
      button.textContent = "Download mp4";
    }
    link.href = objectUrl;
  } else {
    link.href = path; // the browser's own download (Content-Disposition: attachment)
  }
  document.body.append(link);
  link.click();
  link.remove();
  if (objectUrl) setTimeout(() => URL.revokeObjectURL(objectUrl), 60000);
});

$("cancel-button").addEventListener("click", async () => {
  if (!current) return;
  if (!window.confirm("Cancel job " + current.id + "? It stops rendering and makes no mp4 (what it streamed so far " +
                      "stays playable until the server's retention removes it).")) return;
  try {
    showJob(current, await apiJson("/v1/jobs/" + encodeURIComponent(current.id), { method: "DELETE" }));
  } catch (err) {
    showError($("job-error"), err);
  }
});

// --- recent jobs ----------------------------------------------------------------------------
// While the tab is shown (and the browser tab is visible), the list is read again: every 2 s while a listed job is
// unfinished, else every 5 s (jobs submitted elsewhere show up); after a failed read, again after 2, 4, 8 then
// every 15 s until one succeeds (a read that failed was the list's last: after a service restart it said "Could
// not reach the server" above a stale "rendering 56 %" for good). A read whose answer is what the list shows
// already leaves the list as it is (and the focus on its rows).
let jobsBefore = null; // the next page: the jobs older than this one (new jobs do not shift it, as an offset)
let jobsRefresh = null;
let jobsUnfinished = false; // a listed job (on any page shown) has not ended: the list is read again sooner
let jobsFailures = 0; // reads failed in a row
let jobsReads = 0; // reads started: an answer to one older than the last started is dropped (the last one counts)
let jobsInFlight = 0;
let jobsShownText = null; // the answer the list shows (one page read whole), to leave it be when unchanged

function jobsVisible() {
  return !document.querySelector("[data-panel=jobs]").hidden && document.visibilityState === "visible";
}

function readJobsAfter(ms) {
  clearTimeout(jobsRefresh);
  // a read still on its way when the time comes schedules the next itself
  jobsRefresh = setTimeout(() => jobsVisible() && !jobsInFlight && loadJobs(false), ms);
}

async function loadJobs(append) {
  const list = $("jobs-list");
  const before = append && jobsBefore ? "&before=" + encodeURIComponent(jobsBefore) : "";
  // reading the list again reads as many jobs as it shows (the older pages added below the first with them),
  // in one page: their states change too (they stayed "rendering" for ever once an older page was added)
  const limit = append ? 20 : Math.min(Math.max(20, list.querySelectorAll(".job-row").length), 500);
  const read = ++jobsReads;
  clearTimeout(jobsRefresh);
  let text, page;
  jobsInFlight += 1;
  try {
    text = await (await api("/v1/jobs?limit=" + limit + before)).text();
    page = JSON.parse(text);
  } catch (err) {
    if (read !== jobsReads) return; // a read made since answers (and schedules the next)
    showError($("jobs-error"), err.status === 401 ? null : err); // a 401 asks for the token above
    // (after a 401 the list is read again once the token is typed)
    if (err.status !== 401) readJobsAfter(Math.min(15000, 1000 * 2 ** Math.min(++jobsFailures, 4)));
    return;
  } finally {
    jobsInFlight -= 1;
  }
  if (read !== jobsReads) return;
  jobsFailures = 0;
  showError($("jobs-error"), null);
  if (append || text !== jobsShownText) {
    // the row focused (a job's button) keeps the focus across the list read again
    const focused = list.contains(document.activeElement) ? document.activeElement.textContent : null;
    if (!append) list.textContent = "";
    for (const view of page.jobs) list.append(jobRow(view));
    if (!list.children.length) {
      const empty = document.createElement("li");
      empty.className = "hint";
      empty.textContent = "No jobs yet.";
      list.append(empty);
    }
    if (focused !== null && !list.contains(document.activeElement)) {
      const again = Array.from(list.querySelectorAll(".job-row button")).find((b) => b.textContent === focused);
      if (again) again.focus();
    }
    jobsShownText = append ? null : text;
    jobsBefore = page.next_before || null;
    $("jobs-more").hidden = !page.next_before;
  }
  jobsUnfinished = (append && jobsUnfinished) || page.jobs.some((view) => !TERMINAL.has(view.state));
  readJobsAfter(jobsUnfinished ? 2000 : 5000);
}

// the browser tab shown again: the list as it is now (its reads paused while it was hidden)
document.addEventListener("visibilitychange", () => jobsVisible() && loadJobs(false));

// an input as a row shows it: a stored upload's ref (`upload:` and 64 hex digits, given through the API) shortened
function inputName(given) {
  const ref = /^upload:([0-9a-f]{12})[0-9a-f]{52}(\.\w+)?$/.exec(given);
  return ref ? "upload " + ref[1] + "…" + (ref[2] || "") : given;
}

function avatarInput(inputs) { // the avatar's name (the file it was prepared from) where the job has it, else its id
  return inputs.avatar ? "avatar " + inputs.avatar : "avatar " + (inputs.avatar_id || "?");
}

function jobRow(view) {
  const row = document.createElement("li");
  row.className = "job-row";
  const open = document.createElement("button");
  open.type = "button";
  open.className = "link";
  open.textContent = view.id;
  open.addEventListener("click", () => {
    openJob(view.id);
    $("job-title").focus(); // on the job opened: the button pressed is on a tab now hidden (focus fell to BODY)
  });
  const state = document.createElement("span");
  state.className = "state s-" + view.state;
  state.textContent = view.state;
  const meta = document.createElement("span");
  meta.className = "meta";
  const parts = [new Date(view.created_at).toLocaleString()];
  if (view.inputs) { // what it was given, by name: tells jobs apart where their ids do not
    parts.push(inputName(view.inputs.audio) + " + " +
               (view.inputs.video ? inputName(view.inputs.video) : avatarInput(view.inputs)));
  }
  if (view.output && view.output.duration) parts.push(outputSummary(view.output));
  if (view.expired) parts.push("video removed");
  if (TERMINAL.has(view.state)) parts.push("took " + seconds(tookSeconds(view)));
  else parts.push(waitingWords(view) || Math.round(view.progress * 100) + " %");
  meta.textContent = parts.join(" · ");
  row.append(open, state, meta);
  if (view.error && view.state !== "cancelled") { // a cancel the user asked for is not an error (as the card)
    const error = document.createElement("p");
    error.className = "error";
    showError(error, view.error);
    row.append(error);
  }
  return row;
}

$("jobs-refresh").addEventListener("click", () => loadJobs(false));
$("jobs-more").addEventListener("click", () => loadJobs(true));
onTabShown("jobs", () => loadJobs(false));

// --- avatars --------------------------------------------------------------------------------
async function loadAvatars() {
  let avatars;
  try {
    avatars = await apiJson("/v1/avatars");
  } catch (err) {
    showError($("avatars-error"), err.status === 401 ? null : err);
    return;
  }
  showError($("avatars-error"), null);
  const select = $("avatar-select");
  const chosen = select.value;
  select.textContent = "";
  const list = $("avatars-list");
  list.textContent = "";
  for (const avatar of avatars) {
    const option = document.createElement("option");
    option.value = avatar.id;
    option.textContent = avatarTitle(avatar) + " (" +
      (avatar.frames > 1 ? seconds(avatar.duration) : framesLabel(avatar)) + ")";
    select.append(option);
    list.append(avatarRow(avatar));
  }
  if (chosen) select.value = chosen;
  $("avatar-empty").hidden = avatars.length > 0;
  select.hidden = avatars.length === 0;
  if (!avatars.length) {
    const empty = document.createElement("li");
    empty.className = "hint";
    empty.textContent = "No prepared avatars yet.";
    list.append(empty);
  }
}

// an avatar as a select lists it: the name of its file, where known, then its id
function avatarTitle(avatar) {
  return (avatar.name ? avatar.name + " · " : "") + avatar.id;
}

// an avatar's frames as a user counts them: a photo is one
function framesLabel(avatar) {
  return avatar.frames === 1 ? "a photo" : avatar.frames + " frames";
}

function avatarRow(avatar) {
  const row = document.createElement("li");
  row.className = "job-row";
  const id = document.createElement("code");
  id.textContent = avatar.id;
  const meta = document.createElement("span");
  meta.className = "meta";
  const parts = avatar.name ? [avatar.name, framesLabel(avatar)] : [framesLabel(avatar)];
  if (avatar.width && avatar.height) parts.push(avatar.width + "×" + avatar.height);
  if (avatar.fps && avatar.frames > 1) parts.push(avatar.fps + " fps");
  if (avatar.duration && avatar.frames > 1) parts.push(seconds(avatar.duration));
  meta.textContent = parts.join(" · ");
  const use = document.createElement("button");
  use.type = "button";
  use.textContent = "Use";
  use.addEventListener("click", () => {
    document.querySelector("input[name=template][value=avatar]").checked = true;
    showTemplateChoice();
    $("avatar-select").value = avatar.id;
    showTab("render");
  });
  row.append(id, meta, use);
  return row;
}

// The avatar form's input by the API's field name, and its label's words (as RENDER_FIELDS)
const AVATAR_FIELDS = { video: ["avatar-video", "Template video (or a photo)"] };

$("avatar-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const file = $("avatar-video").files[0];
  const error = $("avatar-error");
  const status = $("avatar-status");
  showError(error, null);
  if (!file) return showError(error, new ApiError(0, null, "Choose a template video.", null));
  const form = new FormData();
  form.append("video", file, file.name);
  const button = $("avatar-button");
  const bar = $("avatar-progress");
  button.disabled = true;
  bar.value = 0;
  bar.hidden = false;
  status.textContent = "Uploading…";
  status.hidden = false;
  try {
    const avatar = await upload("/v1/avatars", form, (fraction) => {
      bar.value = fraction;
      if (fraction >= 1) status.textContent = "Preparing: finding and tracking the face in every frame…";
    }, 900000);
    status.textContent = "Avatar " + avatar.id + " is ready (" + framesLabel(avatar) + "): chosen under the Render tab's prepared avatars.";
    $("avatar-video").value = "";
    await loadAvatars();
    $("avatar-select").value = avatar.id; // the one just prepared, not the list's first (sorted by id)
  } catch (err) {
    status.hidden = true;
    showError(error, inLabelWords(err, AVATAR_FIELDS)); // (it named the API's field, "video: ...")
  } finally {
    button.disabled = false;
    bar.hidden = true;
  }
});

onTabShown("avatars", loadAvatars);

// --- start ----------------------------------------------------------------------------------
window.lipsync = { api, apiJson, upload, showError, onTabShown, showTab, emptyPlayer, ApiError, framesLabel,
  avatarTitle, tokenNeeded };

$("token-state").hidden = !token();
showTemplateChoice();
loadAvatars(); // (the jobs list is read when its tab is shown: one call fewer before the token is asked for)
function openLinkedJob() {
  const opened = /^#job=(.+)$/.exec(location.hash);
  if (!opened) return;
  try {
    const id = decodeURIComponent(opened[1]);
    if (!current || current.id !== id) openJob(id);
  } catch (e) { // a malformed link (#job=%E0): nothing to open
    if (!(e instanceof URIError)) throw e;
  }
}
openLinkedJob();
window.addEventListener("hashchange", openLinkedJob); // a job link edited or followed in this tab
