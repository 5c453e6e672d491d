// The Live tab: the browser's microphone drives a prepared avatar, whose live stream plays here.
//
// Speak: getUserMedia (needs a secure origin: https:// or localhost) -> an AudioWorklet
// (pcm-worklet.js) that hands PCM s16le mono at a rate the session takes (16, 24 or 48 kHz) ->
// POST /v1/sessions {avatar_id, sample_rate} -> binary messages on the session's `audio_ws` (its
// short-lived token in the query string). The live HLS (`hls_url`, token in its query) plays in the
// <video> through hls.js with low-latency settings. Stop sends {"type": "end"}: the avatar finishes
// what it heard and idles. End session ends it once what it heard is said (POST .../end; leaving the
// page ends it at once, DELETE); its recording can then be downloaded.
// The figures come from GET /v1/sessions/{id} once a second. A socket the server closes with a code
// (4401 token, 4409 a second socket, 4410 ended, ...) shows that code and the server's reason; a
// dropped connection is reopened (the server keeps the session; the speech captured meanwhile is lost).
// The tab's last session id is kept in sessionStorage: a reload (which ends it) shows it again, as the server has
// it now, its recording offered.
"use strict";

(() => {
  const { api, apiJson, showError, onTabShown, emptyPlayer, ApiError, framesLabel, avatarTitle, tokenNeeded } =
    window.lipsync;
  const $ = (id) => document.getElementById(id);
  const RATES = [16000, 24000, 48000];
  const CHUNK_SECONDS = 0.04; // one WebSocket message per 40 ms of speech
  const ENDED = new Set(["ended", "failed"]);
  const RETRYABLE_CLOSE = new Set([1001, 1006, 1011, 1012, 1013]); // going away, lost, server error, restart

  let live = null; // {id, view, rate, ws, mic, hls, poll, speaking, closed, reconnects}
  let starting = false; // Speak is opening the microphone or asking for a session (none in `live` yet)
  // this browser tab's last session: a reload (which ends it) shows it again, ended, its recording offered
  const SESSION_KEY = "lipsync.live-session";
  let restoring = false;

  // Why a session ended, in words (the pill keeps the API's reason).
  const ENDED_BECAUSE = {
    finished: "The session has ended: what it heard was said.",
    deleted: "The session has ended: it was ended at once (its page was left or reloaded, or it was deleted).",
    idle_timeout: "The session ended after a while without speech.",
    max_seconds: "The session has ended: it reached its longest allowed duration.",
    service_stopped: "The session has ended: the service was restarted.",
  };

  function secs(value) {
    return value === null || value === undefined || !isFinite(value) ? "–" : value.toFixed(2) + " s";
  }

  function note(text) {
    $("live-note").textContent = text || "";
    $("live-note").hidden = !text;
  }

  function buttons() {
    const speaking = !!(live && live.speaking);
    const open = !!(live && live.view && !ENDED.has(live.view.state) && !live.serviceStopped);
    $("live-speak").disabled = speaking;
    $("live-avatar").disabled = $("live-rtmp").disabled = speaking || open;
    $("live-stop").disabled = !speaking;
    $("live-end").hidden = !open;
    $("live-recording").hidden = !(live && live.view && live.view.recording_url);
    keepFocus();
  }

  // The button pressed last (Speak, Stop, End session) is disabled or hidden by what it did, and the focus fell to
  // BODY (a keyboard or screen reader user lost their place, a probe): it goes to the button that comes next (Speak
  // -> Stop, Stop -> Speak, End session -> Download recording or Speak), once that one can be pressed; not where
  // the user has gone meanwhile.
  let pressed = null;
  const NEXT = { "live-speak": ["live-stop"], "live-stop": ["live-speak"],
                 "live-end": ["live-recording", "live-speak"] };

  function keepFocus() {
    if (!pressed) return;
    const at = document.activeElement;
    if (at !== document.body && at !== pressed) { pressed = null; return; } // the user has moved on
    if (at === pressed && !pressed.disabled && !pressed.hidden) return; // (still to be pressed again)
    const next = NEXT[pressed.id].map((id) => $(id)).find((el) => !el.disabled && !el.hidden);
    if (next) {
      pressed = null;
      next.focus();
    } else if (at === document.body && !pressed.disabled && !pressed.hidden) {
      pressed.focus(); // pressable again meanwhile (a Speak that failed, or one whose session is still starting)
    }
  }

  for (const id of Object.keys(NEXT)) {
    $(id).addEventListener("click", () => { pressed = $(id); });
  }

  // --- the form's fields ---------------------------------------------------------------------
  // The tab's inputs by the API's field names, and the words of their labels: an error names the field as its
  // label says it ("rtmp_url: ..." named a word the tab does not show), and the field is marked, as Render's are.
  const FIELDS = { avatar_id: ["live-avatar", "Avatar"], rtmp_url: ["live-rtmp", "RTMP server"] };

  function markInvalid(field) {
    for (const [id] of Object.values(FIELDS)) {
      $(id).classList.remove("invalid");
      $(id).removeAttribute("aria-invalid");
    }
    if (!FIELDS[field]) return;
    const input = $(FIELDS[field][0]);
    input.classList.add("invalid");
    input.setAttribute("aria-invalid", "true"); // (a screen reader says so; the red border is for the eye)
    const more = input.closest("details");
    if (more) more.open = true;
  }

  function inLabelWords(err) {
    if (!(err instanceof ApiError) || !FIELDS[err.field]) return err;
    const said = new ApiError(err.status, err.code, FIELDS[err.field][1] + ": " +
      err.message.replace(new RegExp("^" + err.field + ":\\s*"), ""), null);
    said.tokenSent = err.tokenSent;
    return said;
  }

  // --- avatars ------------------------------------------------------------------------------
  async function loadAvatars() {
    let avatars;
    try {
      avatars = await apiJson("/v1/avatars");
    } catch (err) {
      if (err.status !== 401) showError($("live-error"), err);
      return;
    }
    const select = $("live-avatar");
    const chosen = select.value;
    select.textContent = "";
    for (const avatar of avatars) {
      const option = document.createElement("option");
      option.value = avatar.id;
      const size = avatar.width && avatar.height ? ", " + avatar.width + "×" + avatar.height : "";
      option.textContent = avatarTitle(avatar) + " (" + framesLabel(avatar) + size + ")";
      select.append(option);
    }
    if (chosen) select.value = chosen;
    select.hidden = !avatars.length;
    $("live-avatar-empty").hidden = avatars.length > 0;
  }

  // --- microphone -----------------------------------------------------------------------------
  async function openMicrophone(onChunk) {
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new ApiError(0, "microphone.insecure", "The browser offers the microphone only to a secure page: open " +
        "this page over https:// (or on localhost).", null);
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (err) {
      const why = err.name === "NotAllowedError" ? "access was refused" : err.name === "NotFoundError"
        ? "no microphone was found" : err.message || err.name;
      throw new ApiError(0, "microphone." + err.name, "The microphone could not be opened: " + why + ".", null);
    }
    const context = new AudioContext();
    try {
      if (!context.audioWorklet) throw new Error("this browser has no AudioWorklet");
      await context.audioWorklet.addModule("/static/pcm-worklet.js");
      const rate = RATES.includes(context.sampleRate) ? context.sampleRate : 48000; // else resampled up
      const source = context.createMediaStreamSource(stream);
      const capture = new AudioWorkletNode(context, "pcm-capture", {
        numberOfOutputs: 1,
        processorOptions: { targetRate: rate, chunkSamples: Math.round(rate * CHUNK_SECONDS) },
      });
      capture.port.onmessage = (e) => onChunk(e.data);
      const silent = context.createGain(); // the graph is pulled from the destination; nothing is heard
      silent.gain.value = 0;
      source.connect(capture).connect(silent).connect(context.destination);
      await context.resume();
      const mic = { stream, context, capture, rate, inputRate: context.sampleRate };
      mic.label = (stream.getAudioTracks()[0] || {}).label || "microphone";
      return mic;
    } catch (err) {
      for (const track of stream.getTracks()) track.stop();
      context.close();
      throw new ApiError(0, "microphone.capture", "The microphone could not be captured: " + err.message, null);
    }
  }

  function closeMicrophone(mic, flush) {
    if (!mic) return;
    if (flush) mic.capture.port.postMessage("flush");
    for (const track of mic.stream.getTracks()) track.stop();
    setTimeout(() => mic.context.close().catch(() => {}), flush ? 100 : 0); // the flushed chunk comes first
  }

  // --- the audio socket -------------------------------------------------------------------------
  // The session's URLs on this page's own origin: behind a TLS reverse proxy the server may name itself
  // by its inner http:// address, which an https:// page may not open (mixed content).
  function onThisOrigin(url, socket) {
    const u = new URL(url, location.href);
    const origin = socket ? (location.protocol === "https:" ? "wss://" : "ws://") + location.host : location.origin;
    return origin + u.pathname + u.search;
  }

  function socketUrl(session) {
    const url = onThisOrigin(session.view.audio_ws, true);
    return url + (url.includes("?") ? "&" : "?") + "sample_rate=" + session.rate;
  }

  function openSocket(session) {
    const ws = new WebSocket(socketUrl(session));
    ws.binaryType = "arraybuffer";
    session.ws = ws;
    session.pending = session.pending || [];
    ws.onmessage = (e) => {
      if (typeof e.data !== "string") return;
      let message = null;
      try {
        message = JSON.parse(e.data);
      } catch (_) {
        return;
      }
      if (message.type === "ready") {
        if (session.reconnects > 0) note("Reconnected: the avatar goes on from where the audio stopped.");
        session.reconnects = 0;
        for (const chunk of session.pending.splice(0)) ws.send(chunk); // what was held (`hold`)
        if (!session.speaking) endUtterance(session, ws); // Stop came while connecting
      } else if (message.type === "ended" && session.onEnded) {
        session.onEnded(); // End session waits for this: every byte sent is in the session
      } else if (message.type === "ended" && !session.speaking) {
        ws.close(1000, "speech ended");
        note("Speech ended: the server received " + secs(message.offset / 2 / session.rate) + "; the avatar says " +
          "the rest of it, then idles. Speak again, or End session.");
      }
    };
    ws.onclose = (e) => {
      if (session.ws !== ws) return;
      session.ws = null;
      if (session.closed || e.code === 1000) return;
      // 4409 on a reconnect: the server still counts the lost socket as holding the session (it lets
      // go 10 s after that socket's last audio), so it is asked again, for about 13 s in all
      const retryable = RETRYABLE_CLOSE.has(e.code) || (e.code === 4409 && session.reconnects > 0);
      if (retryable && session.speaking && session.reconnects < 8) {
        session.reconnects += 1;
        note("The audio connection dropped (" + e.code + "); reconnecting…");
        setTimeout(() => !session.closed && session.speaking && openSocket(session),
          Math.min(500 * session.reconnects, 2000));
        return;
      }
      if (e.code === 4410 && /the service stopped/.test(e.reason || "")) {
        // a service ends its sessions as it stops: said now, not once it is back (a probe: the pill read `live`,
        // "still trying", for as long as the service was away); its recording is offered once it is back
        session.serviceStopped = true;
        stopSpeaking(session, false);
        showState("ended", "service_stopped");
        showError($("live-error"), null);
        note("The session has ended: the service stopped. Its recording is offered here once the service is " +
          "back; Speak to start a new session then.");
        buttons();
        return;
      }
      // a refusal: the server's code and reason (a browser cannot read a refused handshake's status)
      const reason = e.reason || (e.code === 1006 ? "the connection was lost" : "no reason given");
      showError($("live-error"), new ApiError(0, "websocket." + e.code,
        "The audio socket was closed with code " + e.code + ": " + reason, null));
      stopSpeaking(session, false);
    };
  }

  // ends the utterance on the server; its microphone's late chunks are not sent after this
  function endUtterance(session, ws) {
    ws.send(JSON.stringify({ type: "end" }));
    if (session.utterance) session.utterance.ended = true;
  }

  // whether a PCM s16le chunk is quiet (RMS at or below about -45 dBFS: a room's noise is below)
  function isQuiet(buffer) {
    const pcm = new Int16Array(buffer);
    let sum = 0;
    for (let i = 0; i < pcm.length; i++) sum += pcm[i] * pcm[i];
    return !pcm.length || Math.sqrt(sum / pcm.length) <= 180;
  }

  // Audio held until a socket is ready, sent in one go once it is: the session renders it at the pace of
  // speech, so all of it delays the rest of the utterance. Held: the newest 2 s (a late start rather than a
  // hole in the middle of words), and not the quiet before an utterance's first words (a reconnect's is
  // held whole: a pause in it is the speaker's).
  function hold(list, buffer, dropLeadingQuiet) {
    if (dropLeadingQuiet && !list.length && isQuiet(buffer)) return;
    list.push(buffer);
    if (list.length > 2 / CHUNK_SECONDS) list.shift();
  }

  function sendChunk(session, buffer) {
    const ws = session.ws;
    if (ws && ws.readyState === WebSocket.OPEN && !session.pending.length) {
      ws.send(buffer);
      // the server stops reading while its buffer of unrendered speech is full (backpressure)
      const behind = ws.bufferedAmount / (2 * session.rate);
      if (behind > 1) note("The server is " + behind.toFixed(1) + " s behind the microphone.");
    } else {
      hold(session.pending, buffer, session.reconnects === 0); // until the socket is ready
    }
  }

  // --- the stream -------------------------------------------------------------------------------
  async function whenStreamStarts(session) {
    while (!session.closed) {
      try {
        const response = await fetch(onThisOrigin(session.view.hls_url, false),
          { cache: "no-store", signal: AbortSignal.timeout(15000) }); // a stalled probe is tried again
        if (response.ok && (await response.text()).includes("#EXTINF")) return startPlayer(session);
      } catch (_) {
        // not published yet, or a moment without the server: try again
      }
      await new Promise((resolve) => setTimeout(resolve, 300));
    }
  }

  function startPlayer(session) {
    if (session.closed) return;
    const video = $("live-player");
    video.hidden = false;
    video.muted = true; // your own voice a second late would be picked up by the microphone again
    if (window.Hls && window.Hls.isSupported()) {
      // Low-latency HLS: this page's sessions have 0.25-s segments, each also a part (EXT-X-PART), and
      // the service holds a playlist request until the part asked for is published (blocking reload).
      // Play 0.5 s behind the live edge, jump back to it when more than 1 s behind (after a stall).
      // On an idle 2-core machine: 1.05-1.15 s glass to glass, no waiting; 0.3 or 0.4 s behind
      // stalled twice in 40 s (python -m bench live --only player; docs/PERFORMANCE.md).
      const hls = new window.Hls({
        lowLatencyMode: true, liveSyncDuration: 0.5, liveMaxLatencyDuration: 1.0,
        maxLiveSyncPlaybackRate: 1.25, maxBufferLength: 4, backBufferLength: 4,
        manifestLoadingMaxRetry: 6, levelLoadingMaxRetry: 6, fragLoadingMaxRetry: 6,
      });
      session.hls = hls;
      let failures = 0;
      hls.on(window.Hls.Events.MANIFEST_PARSED, () => video.play().catch(() => {}));
      hls.on(window.Hls.Events.FRAG_BUFFERED, () => { failures = 0; });
      hls.on(window.Hls.Events.ERROR, (_event, data) => {
        if (session.closed) return;
        if (data.response && data.response.code === 401 && session.view.hls_url !== session.playing) {
          // the stream's token expired (LIPSYNC_LIVE_TOKEN_TTL_S shorter than the session): the session's
          // view, polled each second, carries a fresh one; at once, not after hls.js's own retries (31 s)
          session.playing = session.view.hls_url;
          hls.loadSource(onThisOrigin(session.playing, false));
          return;
        }
        if (!data.fatal) return;
        if (data.type === window.Hls.ErrorTypes.MEDIA_ERROR) {
          hls.recoverMediaError();
        } else if (++failures <= 5) {
          setTimeout(() => {
            if (session.closed) return;
            // the stream's token may have expired (LIPSYNC_LIVE_TOKEN_TTL_S shorter than the session: 401s):
            // the session's view, polled each second, carries fresh ones
            if (session.view.hls_url !== session.playing) {
              session.playing = session.view.hls_url;
              hls.loadSource(onThisOrigin(session.playing, false));
            } else {
              hls.startLoad();
            }
          }, 1000 * failures);
        } else {
          note("The stream could not be played (" + data.details + ").");
        }
      });
      session.playing = session.view.hls_url;
      hls.loadSource(onThisOrigin(session.playing, false));
      hls.attachMedia(video);
    } else if (video.canPlayType("application/vnd.apple.mpegurl")) {
      video.src = onThisOrigin(session.view.hls_url, false); // Safari plays HLS itself
      video.play().catch(() => {});
    } else {
      video.hidden = true;
      note("This browser cannot play the live stream (no Media Source Extensions, no native HLS).");
    }
    note("Playing muted, so the microphone does not hear the avatar: unmute in the player (use headphones).");
  }

  // --- figures ------------------------------------------------------------------------------------
  // the pill: the session's state, and why it ended (not "failed (failed)")
  function showState(state, reason) {
    const pill = $("live-state");
    pill.hidden = false;
    pill.textContent = state + (reason && reason !== state ? " (" + reason + ")" : "");
    pill.className = "state s-" + state;
  }

  function showView(session, view) {
    session.view = view;
    showState(view.state, view.reason);
    $("live-stats").hidden = false;
    $("live-id").textContent = view.id;
    $("live-received").textContent = secs(view.seconds_received);
    // (speech an ended session still held was never rendered: "waiting" said it was yet to come, a probe)
    $("live-rendered").textContent = secs(view.seconds_rendered) + (view.buffered_seconds > 0.05
      ? " (" + secs(view.buffered_seconds) + (ENDED.has(view.state) ? " never rendered)" : " waiting)") : "") +
      (view.seconds_skipped > 0
      ? "; pauses shortened by " + secs(view.seconds_skipped) + " to catch up" : "");
    $("live-latency").textContent = view.latency_samples
      ? secs(view.latency_p50_s) + " / " + secs(view.latency_p95_s) + " (" + view.latency_samples + (view.latency_samples === 1 ? " sample)" : " samples)") : "–";
    $("live-stalls").textContent = view.stalls + (view.longest_gap_s ? " (longest gap " + secs(view.longest_gap_s) + ")" : "") +
      (view.speech_underruns ? "; the speech ran out " + view.speech_underruns + " time(s): it comes slower than real time" : "");
    const hls = session.hls;
    const rtmp = $("live-rtmp-state");
    rtmp.hidden = rtmp.previousElementSibling.hidden = !view.rtmp_url;
    rtmp.textContent = view.rtmp_url ? (view.rtmp_state || "starting") + " to " + view.rtmp_url +
      (view.rtmp_error ? ": " + view.rtmp_error : "") : "";
    const behind = $("live-player-latency"); // how far behind a live edge: none once the session has ended
    behind.hidden = behind.previousElementSibling.hidden = ENDED.has(view.state);
    behind.textContent = hls && isFinite(hls.latency) && hls.latency > 0 ? secs(hls.latency) : "–";
    if (view.error) showError($("live-error"), view.error);
    if (ENDED.has(view.state)) {
      stopSpeaking(session, false);
      session.closed = true;
      finishPlayer(session);
      // the note said what to do while it ran ("Speak again, or End session"): now what is left to do
      note((ENDED_BECAUSE[view.reason] && view.state === "ended" ? ENDED_BECAUSE[view.reason]
        : "The session has " + view.state + (view.reason && view.reason !== view.state ? " (" + view.reason + ")"
          : "") + ".") + (view.recording_url ? " Its recording can be downloaded." : "") +
        " Speak to start a new session.");
    }
    buttons();
  }

  // The stream of a session that has ended plays what it holds, then stops: its player is not left asking for more
  // (after a service restart hls.js asked the old stream for ever, its spinner on). Its last segments may still be
  // on their way when the view says ended: they have a few seconds.
  function finishPlayer(session) {
    const video = $("live-player");
    if (session.finishing || video.hidden) return;
    session.finishing = true;
    const stop = () => {
      if (live !== session) return; // (a later session plays in this <video> now)
      if (session.hls) session.hls.stopLoad();
      video.pause();
    };
    setTimeout(() => {
      if (live !== session) return;
      if (session.hls) session.hls.stopLoad();
      // what is buffered plays out; the player stops where it runs out (or now, when it has nothing to play)
      if (video.paused || video.ended || video.readyState < HTMLMediaElement.HAVE_FUTURE_DATA) stop();
      else for (const event of ["waiting", "ended"]) video.addEventListener(event, stop, { once: true });
    }, 3000);
  }

  async function poll(session) {
    let failures = 0;
    while (live === session && !(session.view && ENDED.has(session.view.state))) {
      try {
        const view = await apiJson("/v1/sessions/" + encodeURIComponent(session.id));
        if (live !== session) return;
        failures = 0;
        if (session.waitingFor) { // the token was given again, or the server is back (before the view's own error)
          session.waitingFor = null;
          showError($("live-error"), null);
        }
        showView(session, view);
      } catch (err) {
        if (live !== session) return;
        // a 401 (the token was forgotten or changed) waits for the token above; a server that is away (a
        // restart) is asked again for 2 minutes, its startup's plain-text 404 too (Ray Serve's, before the
        // service's routes exist: it stopped the tab following a session the service had ended and recorded);
        // a session that is gone (the API's 404) is not followed any more
        // (a 401 is not counted: the tab waits for the token as long as it takes)
        // (a session its stopping service ended waits longer for the service: its recording is offered then)
        const patience = session.serviceStopped ? 1800 : 120;
        if ((err.status === 404 && !err.away) || (err.status !== 401 && ++failures > patience)) {
          showError($("live-error"), err);
          session.closed = true;
          stopSpeaking(session, false);
          buttons();
          return;
        }
        if (err.status === 401 || (failures === 3 && !session.serviceStopped)) { // (a stop is said already)
          session.waitingFor = err.status === 401 ? "token" : "server";
          showError($("live-error"), err.status === 401 ? err : new ApiError(0, null, "The server does not answer; " +
            "still trying (the session goes on on the server if it is only this connection).", null));
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  // --- buttons ------------------------------------------------------------------------------------
  // the microphone stops (`flush`: its last part is sent first); its socket is left as it is
  function stopMicrophone(session, flush) {
    session.speaking = false;
    closeMicrophone(session.mic, flush);
    session.mic = null;
  }

  function stopSpeaking(session, sendEnd) {
    if (!session.speaking) return;
    stopMicrophone(session, sendEnd);
    if (sendEnd) {
      // after the flushed last chunk; `ready` sends it for a socket still connecting
      setTimeout(() => {
        const ws = session.ws;
        // not when Speak was pressed again meanwhile: that utterance is not ended
        if (ws && ws.readyState === WebSocket.OPEN && !session.pending.length && !session.mic) {
          endUtterance(session, ws);
        }
      }, 150);
    } else if (session.ws) {
      session.ws.close(1000, "stopped");
    }
    buttons();
  }

  async function speak() {
    showError($("live-error"), null);
    markInvalid(null);
    const avatar = $("live-avatar").value;
    if (!avatar) { // none listed: none prepared, or none could be read while the page waits for its token
      // (the page's 401: said as "needs its API token: type it above", and cleared once the token is given)
      return showError($("live-error"), $("token-form").hidden
        ? new ApiError(0, null, "Prepare an avatar first (Avatars tab).", null)
        : tokenNeeded());
    }
    $("live-speak").disabled = true;
    starting = true;
    // a session the page stopped following (its figures gave up, e.g. after a 401) is not reused
    let session = live && live.view && !live.closed && !ENDED.has(live.view.state) ? live : null;
    let mic;
    try {
      const chunks = [];
      // once this utterance's end is sent, a late chunk of its microphone (a slow machine's flush) is not
      // sent after it: the server would take it as the start of the next utterance
      const utterance = { ended: false };
      mic = await openMicrophone((buffer) => {
        if (utterance.ended) return;
        if (session) sendChunk(session, buffer);
        else hold(chunks, buffer, true); // until the session is there
      });
      if (session && session.rate !== mic.rate) { // the open session takes another rate: a new session
        await endSession();
        session = null;
      }
      if (session) {
        // a fresh view: its token for the socket (the one in hand may have expired, or been refused)
        showView(session, await apiJson("/v1/sessions/" + encodeURIComponent(session.id)));
        if (ENDED.has(session.view.state)) session = null;
      }
      if (session) note(""); // speaking again: not what was said when the last utterance ended
      if (!session) {
        closeLive();
        note("Starting a live session (the first one after the service starts loads the model: up to a minute). " +
          "Start speaking once the stream shows.");
        const view = await apiJson("/v1/sessions", {
          method: "POST",
          timeoutMs: 420000, // the model may load first (LIPSYNC_MODEL_LOAD_TIMEOUT_S, 300 s)
          headers: { "Content-Type": "application/json" },
          // 0.25-s segments: about 0.2 s closer to live in hls.js than the default 0.5 (docs/PERFORMANCE.md)
          body: JSON.stringify(Object.assign({ avatar_id: avatar, sample_rate: mic.rate, segment_seconds: 0.25 },
            $("live-rtmp").value.trim() ? { rtmp_url: $("live-rtmp").value.trim() } : {})),
        });
        session = { id: view.id, view: view, rate: mic.rate, pending: chunks.splice(0), reconnects: 0, closed: false };
        live = session;
        sessionStorage.setItem(SESSION_KEY, view.id);
        showView(session, view);
        poll(session);
        whenStreamStarts(session);
      }
      session.mic = mic;
      session.utterance = utterance;
      session.speaking = true;
      $("live-mic").textContent = mic.label + ": " + mic.inputRate / 1000 + " kHz, sent as PCM s16le at " +
        mic.rate / 1000 + " kHz" + (mic.rate !== mic.inputRate ? " (resampled)" : "");
      if (!session.ws || session.ws.readyState > WebSocket.OPEN) openSocket(session);
    } catch (err) {
      closeMicrophone(mic, false);
      note(""); // not "Starting a live session…" above the reason it did not start
      markInvalid(err.field);
      showError($("live-error"), inLabelWords(err));
    } finally {
      starting = false;
      buttons();
    }
  }

  // Ends the session once what it heard is said: the speech it holds still renders (DELETE would drop it).
  async function endSession() {
    const session = live;
    if (!session) return;
    if (session.speaking) { // its socket stays open for the end below
      if (session.utterance) session.utterance.ended = true;
      stopMicrophone(session, false);
      buttons();
    }
    const ws = session.ws;
    if (ws && ws.readyState === WebSocket.OPEN) {
      // the speech still on its way (in the socket, in the server's read-ahead) reaches the session before it
      // is asked to end: {"type": "end"}, then the server's "ended" (at most 5 s)
      await new Promise((resolve) => {
        session.onEnded = resolve;
        setTimeout(resolve, 5000);
        ws.send(JSON.stringify({ type: "end" }));
      });
      session.onEnded = null;
    }
    session.ws = null; // closed by the page, not by the server's 4410 (which would read as a refusal)
    if (ws) ws.close(1000, "ending");
    try {
      const view = await apiJson("/v1/sessions/" + encodeURIComponent(session.id) + "/end",
        { method: "POST", timeoutMs: 60000 });
      // ended as asked: an error left from before (the server away a moment, a socket dropped) is over
      session.waitingFor = null;
      showError($("live-error"), null);
      showView(session, view);
      if (!ENDED.has(view.state)) {
        note("Ending: the avatar says the rest of what it heard" + (view.buffered_seconds > 0.05
          ? " (" + secs(view.buffered_seconds) + ")" : "") + ", then the session ends and its recording is offered.");
      }
    } catch (err) {
      showError($("live-error"), err);
    }
    buttons();
  }

  function closeLive() {
    if (!live) return;
    live.closed = true;
    stopSpeaking(live, false);
    if (live.ws) live.ws.close(1000, "closed");
    if (live.hls) live.hls.destroy();
    emptyPlayer($("live-player"));
    live = null;
  }

  async function downloadRecording() {
    if (!live || !live.view.recording_url) return;
    const button = $("live-recording");
    button.disabled = true;
    button.textContent = "Downloading…";
    try {
      const blob = await (await api("/v1/sessions/" + encodeURIComponent(live.id) + "/recording")).blob();
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = live.id + ".mp4";
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    } catch (err) {
      showError($("live-error"), err);
    } finally {
      button.disabled = false;
      button.textContent = "Download recording";
    }
  }

  $("live-speak").addEventListener("click", speak);
  $("live-stop").addEventListener("click", () => live && stopSpeaking(live, true));
  $("live-end").addEventListener("click", endSession);
  $("live-recording").addEventListener("click", downloadRecording);
  // a reload or a closed tab ends a running session (the tab says so under Speak): the browser asks first,
  // also while Speak is starting one (the model may load for a minute: a session left then is never ended)
  window.addEventListener("beforeunload", (event) => {
    if (starting || (live && live.view && !ENDED.has(live.view.state))) {
      event.preventDefault();
      event.returnValue = ""; // (older browsers ask only when it is set)
    }
  });
  // leaving the page ends its session (keepalive: the request outlives the page)
  window.addEventListener("pagehide", () => {
    if (live && live.view && !ENDED.has(live.view.state)) {
      api("/v1/sessions/" + encodeURIComponent(live.id), { method: "DELETE", keepalive: true }).catch(() => {});
    }
  });
  // The tab's last session, after a reload (which ended it, or is ending it: followed until it has ended) or the
  // token given: shown as it is now, its recording offered. A session the service no longer knows is forgotten.
  async function restoreSession() {
    const id = sessionStorage.getItem(SESSION_KEY);
    if (!id || live || starting || restoring) return;
    restoring = true;
    let view;
    try {
      view = await apiJson("/v1/sessions/" + encodeURIComponent(id));
    } catch (err) {
      // (a 401: read again once the token is given; a server away: when the tab is shown again)
      if (err.status === 404 && !err.away && sessionStorage.getItem(SESSION_KEY) === id) {
        sessionStorage.removeItem(SESSION_KEY);
      }
      return;
    } finally {
      restoring = false;
    }
    if (live || starting || sessionStorage.getItem(SESSION_KEY) !== id) return; // Speak started one meanwhile
    const session = { id: id, view: view, rate: view.sample_rate, pending: [], reconnects: 0, closed: false };
    live = session;
    showView(session, view);
    if (!ENDED.has(view.state)) {
      poll(session);
      whenStreamStarts(session);
    }
  }

  onTabShown("live", () => {
    loadAvatars();
    restoreSession();
  });
  buttons();
})();
