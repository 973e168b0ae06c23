// Harken live transcript page: microphone → /v4/web/listen → segments upserted by id.
// Plain browser JavaScript, no build step. Wire contract: PROTOCOL.md §1-§5, §7.
"use strict";

const TARGET_RATE = 16000;
const CHUNK_SAMPLES = TARGET_RATE / 10;          // 100 ms per message
const TAIL_SILENCE_CHUNKS = 10;                  // 1 s of silence on stop lets the last utterance end
const SETTLE_MS = 1500;                          // stop waits this long after the last update…
const SETTLE_MAX_MS = 5000;                      // …but never longer than this
const PRE_AUTH_MESSAGES = 250;                   // audio kept while the socket authenticates (≥ 5 s)
const TOKEN_KEY = "harken.token";
const SPEAKER_COLOURS = ["#2563eb", "#c2410c", "#15803d", "#9333ea", "#be123c", "#0e7490", "#a16207", "#4d7c0f"];

const $ = (id) => document.getElementById(id);
const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;   // never innerHTML: transcripts are untrusted
  return node;
};

// --- tokens ---------------------------------------------------------------------------------
// A pasted token lives in sessionStorage (this tab only). A token minted by the server for a
// loopback visitor lives only in memory and is minted afresh when needed (it lasts 10 minutes).

const auth = { token: null, local: false, expiresAt: 0 };

// The server mints tokens only for a page that knows its pairing secret, which it prints as
// http://127.0.0.1:PORT/#pair=SECRET. The fragment never leaves the browser; it is kept for this
// tab and taken out of the address bar.
const PAIRING_KEY = "harken.pairing";
{
  const pairing = new URLSearchParams(location.hash.slice(1)).get("pair");
  if (pairing) {
    sessionStorage.setItem(PAIRING_KEY, pairing);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

async function ensureToken() {
  const pasted = sessionStorage.getItem(TOKEN_KEY);
  if (pasted) {
    Object.assign(auth, { token: pasted, local: false, expiresAt: Infinity });
    return pasted;
  }
  if (auth.local && Date.now() < auth.expiresAt - 60_000) return auth.token;
  let response;
  try {
    const pairing = sessionStorage.getItem(PAIRING_KEY);
    if (!pairing) {
      askForToken("Open the page with the address the server printed (…/#pair=…), or paste a token.");
      return null;
    }
    response = await fetch("/v1/local/token", {
      method: "POST", headers: { "Content-Type": "application/json", "X-Harken-Pairing": pairing }, body: "{}",
    });
  } catch (error) {
    askForToken("The server could not be reached.");
    return null;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok || !body.token) {
    askForToken(body.error || body.detail || `The server gives no token to this page (HTTP ${response.status}).`);
    return null;
  }
  Object.assign(auth, { token: body.token, local: true, expiresAt: Date.now() + body.expires_in * 1000 });
  $("identity").textContent = `Signed in on this machine as ${body.uid}.`;
  $("token-panel").hidden = true;
  return body.token;
}

function askForToken(reason) {
  auth.token = null;
  $("token-reason").textContent = reason ? reason.charAt(0).toUpperCase() + reason.slice(1) : "";
  $("token-panel").hidden = false;
  $("identity").textContent = "Not signed in.";
}

function forgetPastedToken(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  askForToken(reason);
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token-input").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token-input").value = "";
  $("token-panel").hidden = true;
  $("identity").textContent = "Using the pasted token.";
  loadConversations();
});

// --- transcript -----------------------------------------------------------------------------

const segments = new Map();   // id → {data, node}
let lastUpdateAt = 0;

function upsertSegments(list) {
  lastUpdateAt = performance.now();
  $("placeholder").hidden = true;
  let reorder = false;
  for (const data of list) {
    if (!data || typeof data.id !== "string") continue;
    let entry = segments.get(data.id);
    if (!entry) {
      entry = { node: buildSegmentNode() };
      segments.set(data.id, entry);
      reorder = true;
    } else if (entry.data.start !== data.start) {
      reorder = true;
    }
    entry.data = data;
    fillSegmentNode(entry.node, data);
  }
  if (reorder) {
    const ordered = [...segments.values()].sort((a, b) => a.data.start - b.data.start || a.data.end - b.data.end);
    $("transcript").append(...ordered.map((entry) => entry.node));   // append moves existing nodes
  }
}

function deleteSegments(ids) {
  for (const id of ids || []) {
    const entry = segments.get(id);
    if (entry) entry.node.remove();
    segments.delete(id);
  }
}

function clearTranscript() {
  for (const entry of segments.values()) entry.node.remove();
  segments.clear();
  $("placeholder").hidden = false;
}

function buildSegmentNode() {
  const node = el("div", "segment");
  const meta = el("div", "meta");
  meta.append(el("span", "speaker"), el("span", "you-badge", "you"), el("span", "time"));
  node.append(meta, el("p", "text"));
  return node;
}

function fillSegmentNode(node, data) {
  const speakerId = Number.isInteger(data.speaker_id) ? data.speaker_id : 0;
  node.dataset.id = data.id;
  node.style.setProperty("--speaker-colour", SPEAKER_COLOURS[speakerId % SPEAKER_COLOURS.length]);
  node.querySelector(".speaker").textContent = `Speaker ${speakerId + 1}`;
  node.querySelector(".you-badge").hidden = !data.is_user;
  node.querySelector(".time").textContent = formatTime(data.start);
  node.querySelector(".text").textContent = data.text || "";
}

function formatTime(seconds) {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.dataset.kind = kind;
}

// --- audio capture --------------------------------------------------------------------------
// An AudioWorklet delivers 100 ms Float32 chunks at 16 kHz; an encoder turns them into
// messages: PCM16 little-endian, or Opus packets where the browser has WebCodecs' AudioEncoder.

async function openMicrophone(onChunk) {
  if (!navigator.mediaDevices || !window.AudioWorkletNode) {
    throw new Error("This page needs a browser with microphone access over https or on localhost.");
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  let context;
  let source;
  try {                             // let the browser resample when it can (best quality)…
    context = new AudioContext({ sampleRate: TARGET_RATE });
    source = context.createMediaStreamSource(stream);
  } catch (error) {                 // …otherwise the worklet does it
    if (context) context.close();
    context = new AudioContext();
    source = context.createMediaStreamSource(stream);
  }
  await context.audioWorklet.addModule("/static/worklet.js");
  const node = new AudioWorkletNode(context, "pcm-capture", {
    numberOfInputs: 1, numberOfOutputs: 0,     // no output: pulled by the graph on its own
    processorOptions: { targetRate: TARGET_RATE, chunkSamples: CHUNK_SAMPLES },
  });
  node.port.onmessage = (event) => onChunk(event.data);
  source.connect(node);
  await context.resume();
  return {
    async stop() {                  // the worklet posts its partial chunk, then everything closes
      node.port.postMessage("stop");
      await new Promise((resolve) => setTimeout(resolve, 50));
      source.disconnect();
      stream.getTracks().forEach((track) => track.stop());
      await context.close();
    },
  };
}

function pcm16(samples) {
  const view = new DataView(new ArrayBuffer(samples.length * 2));
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);   // little-endian on any CPU
  }
  return view.buffer;
}

const OPUS_CONFIG = { codec: "opus", sampleRate: TARGET_RATE, numberOfChannels: 1, bitrate: 32000,
                      opus: { frameDuration: 20000, complexity: 5 } };

async function chooseCodec() {
  const wanted = new URLSearchParams(location.search).get("codec");
  if (wanted === "pcm16") return "pcm16";
  if (typeof AudioEncoder === "undefined") return "pcm16";
  try {
    return (await AudioEncoder.isConfigSupported(OPUS_CONFIG)).supported ? "opus" : "pcm16";
  } catch (error) {
    return "pcm16";
  }
}

// Returns {encode(Float32Array), flush()}; send(ArrayBuffer) receives one message at a time.
function makeEncoder(codec, send, onError) {
  if (codec === "pcm16") {
    return { encode: (samples) => send(pcm16(samples)), flush: async () => {} };
  }
  // One Opus packet per message, as the gateway expects (PROTOCOL.md §2).
  const encoder = new AudioEncoder({
    output: (chunk) => {
      const packet = new ArrayBuffer(chunk.byteLength);
      chunk.copyTo(packet);
      send(packet);
    },
    error: onError,
  });
  encoder.configure(OPUS_CONFIG);
  let timestamp = 0;   // microseconds
  return {
    encode(samples) {
      const data = new AudioData({ format: "f32", sampleRate: TARGET_RATE, numberOfFrames: samples.length,
                                   numberOfChannels: 1, timestamp, data: samples });
      timestamp += (samples.length * 1e6) / TARGET_RATE;
      encoder.encode(data);
      data.close();
    },
    async flush() {
      if (encoder.state === "configured") await encoder.flush();
      if (encoder.state !== "closed") encoder.close();
    },
  };
}

// --- one live session -----------------------------------------------------------------------

let live = null;    // {ws, mic, encoder, authenticated, pending, stopping}

async function start() {
  $("start").disabled = true;
  setStatus("Getting a token…");
  const token = await ensureToken();
  if (!token) {
    setStatus("A token is needed before transcribing.", "error");
    $("start").disabled = false;
    return;
  }
  const codec = await chooseCodec();
  const session = { ws: null, mic: null, encoder: null, authenticated: false, pending: [], stopping: false, codec };
  live = session;
  clearTranscript();
  $("summary").hidden = true;

  const send = (buffer) => {
    if (session.authenticated && session.ws.readyState === WebSocket.OPEN) session.ws.send(buffer);
    else if (session.pending.length < PRE_AUTH_MESSAGES) session.pending.push(buffer);
  };
  session.encoder = makeEncoder(codec, send, (error) => fail(session, `Audio encoder failed: ${error.message}`));

  try {
    setStatus("Opening the microphone…");
    session.mic = await openMicrophone((samples) => {
      $("level").value = Math.min(1, rms(samples) * 4);
      if (!session.stopping) session.encoder.encode(samples);
    });
  } catch (error) {
    live = null;
    session.encoder.flush().catch(() => {});
    setStatus(`Microphone unavailable: ${error.message}`, "error");
    $("start").disabled = false;
    return;
  }

  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = new URLSearchParams({ codec, sample_rate: String(TARGET_RATE), language: "en", source: "web" });
  const ws = new WebSocket(`${scheme}://${location.host}/v4/web/listen?${query}`);
  session.ws = ws;
  ws.binaryType = "arraybuffer";
  ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token }));   // the token never goes in the URL
  ws.onmessage = (event) => onMessage(session, event.data);
  ws.onclose = (event) => onClose(session, event);
  $("stop").disabled = false;
  setStatus(`Connecting (${codecLabel(codec)})…`);
}

function codecLabel(codec) {
  return `${codec === "opus" ? "Opus" : "PCM16"}, 16 kHz`;
}

function rms(samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  return Math.sqrt(sum / Math.max(1, samples.length));
}

function onMessage(session, raw) {
  if (typeof raw !== "string" || raw === "ping") return;
  let message;
  try {
    message = JSON.parse(raw);
  } catch (error) {
    return;
  }
  if (!message || typeof message !== "object") return;
  if (Array.isArray(message)) {
    upsertSegments(message);
    return;
  }
  switch (message.type) {
    case "auth_response":
      if (message.success) {
        session.authenticated = true;
        for (const buffer of session.pending.splice(0)) session.ws.send(buffer);
      }
      break;
    case "service_status":
      if (!session.stopping) {
        const text = message.status === "ready" ? `Listening (${codecLabel(session.codec)}).`
                                                : message.status_text || message.status;
        setStatus(text, message.status === "stt_failed" || message.status === "decode_errors" ? "error" : "");
      }
      break;
    case "segments_deleted":
      deleteSegments(message.segment_ids);
      break;
    case "memory_processing_started":
      setStatus("Conversation finished: summarising…");
      break;
    case "memory_created":
      showSummary(message.memory);
      loadConversations();
      break;
    case "error":
      setStatus(message.message || "The server reported an error.", "error");
      break;
    default:
      break;   // unknown events are ignored, as the protocol asks
  }
}

const CLOSE_MESSAGES = {
  1001: "The server ended the session (idle or shutting down).",
  1008: "The server refused the connection",
  1011: "Transcription is unavailable right now.",
  1012: "The server is restarting: press Start again.",
  1013: "Sign-in is unavailable right now: try again shortly.",
  4001: "The token expired.",
  4004: "The token was revoked: sign in again.",
};

async function onClose(session, event) {
  if (live === session) live = null;
  await releaseAudio(session);
  $("stop").disabled = true;
  $("start").disabled = false;
  $("level").value = 0;
  if (session.stopping) {
    setStatus("Stopped.");
  } else {
    const known = CLOSE_MESSAGES[event.code] || `Connection closed (${event.code}).`;
    setStatus(event.reason ? `${known}: ${event.reason}` : known, "error");
    const tokenProblem = event.code === 4001 || event.code === 4004 ||
                         (event.code === 1008 && !session.authenticated);
    if (tokenProblem) {
      if (auth.local) auth.expiresAt = 0;           // mint a fresh one on the next start
      else forgetPastedToken(`The server refused the pasted token: ${event.reason || event.code}.`);
    }
  }
  setTimeout(loadConversations, 500);
}

async function releaseAudio(session) {
  const mic = session.mic;
  session.mic = null;
  if (mic) await mic.stop().catch(() => {});
}

function fail(session, text) {
  setStatus(text, "error");
  if (session.ws && session.ws.readyState <= WebSocket.OPEN) session.ws.close(1000, "client error");
}

async function stop() {
  const session = live;
  if (!session || session.stopping) return;
  $("stop").disabled = true;
  setStatus("Finishing the last words…");
  await releaseAudio(session);       // the worklet's partial chunk is encoded before this returns
  session.stopping = true;
  // Silence after the speech lets the gateway's voice detector end the last utterance, so its
  // words come back before the socket closes (after a close the server cannot send them).
  for (let i = 0; i < TAIL_SILENCE_CHUNKS; i++) session.encoder.encode(new Float32Array(CHUNK_SAMPLES));
  await session.encoder.flush().catch(() => {});
  const began = performance.now();
  lastUpdateAt = Math.max(lastUpdateAt, began);
  await new Promise((resolve) => {
    const timer = setInterval(() => {
      const now = performance.now();
      if (session.ws.readyState !== WebSocket.OPEN || now - lastUpdateAt > SETTLE_MS || now - began > SETTLE_MAX_MS) {
        clearInterval(timer);
        resolve();
      }
    }, 100);
  });
  if (session.ws.readyState <= WebSocket.OPEN) session.ws.close(1000, "stopped");
}

// --- conversations (REST API; the panel stays hidden where the server has none) --------------

async function api(path) {
  const token = await ensureToken();      // a minted token may have expired since the last call
  if (!token) return { ok: false, status: 401 };
  const response = await fetch(path, { headers: { Authorization: `Bearer ${token}` } });
  return { ok: response.ok, status: response.status, body: response.ok ? await response.json() : null };
}

async function loadConversations() {
  let result;
  try {
    result = await api("/v1/conversations?limit=20");
  } catch (error) {
    result = { ok: false };
  }
  const panel = $("conversations");
  if (!result.ok) {            // 404: no API on this server; 401: no usable token yet
    panel.hidden = true;
    return;
  }
  const body = result.body;
  const list = Array.isArray(body) ? body : body.conversations || body.items || [];
  const ul = $("conversation-list");
  ul.replaceChildren();
  if (list.length === 0) ul.append(el("li", "muted", "No conversations yet."));
  for (const conversation of list) {
    const item = el("li");
    const button = el("button", "conversation", `${conversationEmoji(conversation)} ${conversationTitle(conversation)}`);
    button.type = "button";
    button.append(el("span", "muted small", ` ${formatDate(conversation.started_at)} · ${conversation.status || ""}`));
    button.addEventListener("click", () => openConversation(conversation.id));
    item.append(button);
    ul.append(item);
  }
  panel.hidden = false;
}

async function openConversation(id) {
  let result;
  try {
    result = await api(`/v1/conversations/${encodeURIComponent(id)}`);
  } catch (error) {
    result = { ok: false };
  }
  if (result.ok) showSummary(result.body);
  else setStatus(`That conversation could not be opened (${result.status || "network error"}).`, "error");
}

function conversationTitle(conversation) {
  const title = conversation.structured && conversation.structured.title;
  if (title) return title;
  const words = (conversation.transcript_segments || []).map((s) => s.text).join(" ").split(/\s+/).filter(Boolean);
  return words.length ? `${words.slice(0, 8).join(" ")}${words.length > 8 ? "…" : ""}` : "Untitled conversation";
}

function conversationEmoji(conversation) {
  return (conversation.structured && conversation.structured.emoji) || "🗒️";
}

function formatDate(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleString();
}

function showSummary(conversation) {
  if (!conversation) return;
  const structured = conversation.structured || {};
  const body = $("summary-body");
  body.replaceChildren();
  body.append(el("h3", "", `${conversationEmoji(conversation)} ${conversationTitle(conversation)}`));
  const details = [formatDate(conversation.started_at), structured.category, conversation.discarded ? "discarded" : ""];
  body.append(el("p", "muted small", details.filter(Boolean).join(" · ")));
  if (structured.overview) body.append(el("p", "", structured.overview));
  const items = structured.action_items || [];
  if (items.length) {
    body.append(el("h4", "", "Action items"));
    const ul = el("ul");
    for (const item of items) ul.append(el("li", item.completed ? "done" : "", item.description || ""));
    body.append(ul);
  }
  const transcript = conversation.transcript_segments || [];
  if (transcript.length) {
    const more = el("details");
    more.append(el("summary", "", `Transcript (${transcript.length} segment${transcript.length === 1 ? "" : "s"})`));
    for (const segment of transcript) {
      const line = el("p", "small");
      line.append(el("strong", "", segment.is_user ? "You: " : `Speaker ${(segment.speaker_id ?? 0) + 1}: `),
                  document.createTextNode(segment.text || ""));
      more.append(line);
    }
    body.append(more);
  }
  $("summary").hidden = false;
}

// --- wiring ---------------------------------------------------------------------------------

$("start").addEventListener("click", () => start().catch((error) => {
  setStatus(`Could not start: ${error.message}`, "error");
  $("start").disabled = false;
}));
$("stop").addEventListener("click", () => stop());
$("refresh").addEventListener("click", () => loadConversations());

(async () => {
  if (await ensureToken()) await loadConversations();
})();
