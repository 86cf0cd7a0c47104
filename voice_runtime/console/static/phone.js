// The browser phone: speaks the Twilio Media Streams protocol to the server's own /voice
// websocket, as Twilio does for a phone call (connected, start, media every 20 ms, marks
// echoed after playback, clear, dtmf, stop).
"use strict";

const $ = (id) => document.getElementById(id);
const stats = {
  state: "idle", callSid: null, streamSid: null, mediaSent: 0, dtmfSent: 0,
  mediaReceived: 0, bytesReceived: 0, marksReceived: 0, marksEchoed: 0, clears: 0,
  playedMs: 0, speechBursts: 0, errors: [],
};
window.phone = { stats, timeline: [] };

let ws = null, ctx = null, node = null, mic = null, seq = 0, chunk = 0, t0 = 0;
let call = null, markRun = null, events = null;

function hex(n) {
  const bytes = crypto.getRandomValues(new Uint8Array(n));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function log(kind, detail = "", cls = "") {
  const t = t0 ? ((performance.now() - t0) / 1000).toFixed(2) + "s" : "";
  window.phone.timeline.push({ t, kind, detail });
  const ul = $("timeline");
  const li = document.createElement("li");
  li.innerHTML = '<span class="t"></span><span class="k"></span><span class="d"></span>';
  li.children[0].textContent = t;
  li.children[1].textContent = kind;
  li.children[1].className = "k " + cls;
  li.children[2].textContent = detail;
  ul.appendChild(li);
  ul.scrollTop = ul.scrollHeight;
  return li;
}

// Consecutive mark echoes share one timeline line (a reply may carry many position marks).
function logMark(name, cleared) {
  if (markRun && markRun.li === $("timeline").lastElementChild && markRun.cleared === cleared) {
    markRun.count += 1;
    markRun.li.children[2].textContent = `${markRun.count} marks, last ${name}`;
    return;
  }
  const li = log(cleared ? "mark echoed (cleared)" : "mark echoed", name, "agent");
  markRun = { li, count: 1, cleared };
}

function setStatus(html) { $("status").innerHTML = html; }

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

function b64encode(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
  return btoa(s);
}

function b64decode(text) {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function parseParams(text) {
  const out = {};
  for (const part of text.split(",")) {
    const [k, ...v] = part.split("=");
    if (k.trim()) out[k.trim()] = v.join("=").trim();
  }
  return out;
}

async function startAudio() {
  if (!window.isSecureContext || !navigator.mediaDevices || !window.AudioWorkletNode) {
    throw new Error("the browser allows the microphone only on https:// or http://localhost pages");
  }
  ctx = new AudioContext();
  await ctx.audioWorklet.addModule("console/static/phone-worklet.js");
  mic = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
  });
  node = new AudioWorkletNode(ctx, "phone-io", { numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1] });
  ctx.createMediaStreamSource(mic).connect(node);
  node.connect(ctx.destination);
  node.port.onmessage = (e) => fromAudio(e.data);
  await ctx.resume();
}

function fromAudio(msg) {
  if (msg.frame) {
    if (stats.state !== "in call") return;
    chunk += 1;
    stats.mediaSent += 1;
    send({
      event: "media", sequenceNumber: String(++seq), streamSid: stats.streamSid,
      media: { track: "inbound", chunk: String(chunk), timestamp: String(Math.round(performance.now() - t0)),
        payload: b64encode(new Uint8Array(msg.frame)) },
    });
  } else if (msg.mark !== undefined) {
    // Twilio echoes a mark once the audio before it has played (or was cleared).
    stats.marksEchoed += 1;
    send({ event: "mark", sequenceNumber: String(++seq), streamSid: stats.streamSid, mark: { name: msg.mark } });
    logMark(msg.mark, !!msg.cleared);
  } else if (msg.playing !== undefined) {
    if (msg.playing) { stats.speechBursts += 1; log("agent speaking", "", "agent"); }
    else log("agent quiet", `${(msg.played / 8).toFixed(0)} ms played in total`, "agent");
    stats.playedMs = msg.played ? msg.played / 8 : stats.playedMs;
  } else if (msg.levels) {
    stats.playedMs = msg.played / 8;
    $("mic-level").style.width = Math.min(100, msg.levels.mic * 400) + "%";
    $("agent-level").style.width = Math.min(100, msg.levels.agent * 400) + "%";
  }
}

function fromServer(text) {
  let msg;
  try { msg = JSON.parse(text); } catch { log("bad message", "not JSON", "bad"); return; }
  if (msg.streamSid !== stats.streamSid) {
    log("bad message", `${msg.event} for another streamSid`, "bad");
    return;
  }
  if (msg.event === "media") {
    const bytes = b64decode(msg.media.payload);
    stats.mediaReceived += 1;
    stats.bytesReceived += bytes.length;
    node.port.postMessage({ play: bytes.buffer }, [bytes.buffer]);
  } else if (msg.event === "mark") {
    stats.marksReceived += 1;
    node.port.postMessage({ mark: msg.mark.name });
  } else if (msg.event === "clear") {
    stats.clears += 1;
    log("clear", "agent audio dropped (barge-in)", "bad");
    node.port.postMessage({ clear: true });
  } else {
    log("unknown message", String(msg.event), "bad");
  }
}

async function placeCall() {
  $("call").disabled = true;
  $("timeline").innerHTML = "";
  window.phone.timeline = [];
  markRun = null;
  t0 = 0;
  try {
    setStatus("Starting the microphone…");
    await startAudio();
    const params = parseParams($("params").value);
    const res = await fetch("phone/api/call", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ parameters: params }),
    });
    if (!res.ok) throw new Error(`the server refused the call (HTTP ${res.status})`);
    call = await res.json();
  } catch (err) {
    fail(err);
    return;
  }
  stats.callSid = call.call_sid;
  stats.streamSid = "MZ" + hex(16);
  seq = 0; chunk = 0; t0 = performance.now();
  $("sid").textContent = stats.callSid;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${scheme}//${location.host}${call.stream_path}`);
  stats.state = "connecting";
  setStatus("Connecting…");
  ws.onopen = () => {
    send({ event: "connected", protocol: "Call", version: "1.0.0" });
    send({
      event: "start", sequenceNumber: String(++seq), streamSid: stats.streamSid,
      start: {
        accountSid: call.account_sid, streamSid: stats.streamSid, callSid: stats.callSid,
        tracks: ["inbound"], customParameters: call.parameters,
        mediaFormat: { encoding: "audio/x-mulaw", sampleRate: 8000, channels: 1 },
      },
    });
    stats.state = "in call";
    log("start", `call ${stats.callSid}`);
    setStatus("<b>In call.</b> Speak; keys send DTMF.");
    $("hangup").disabled = false;
    node.port.postMessage({ capture: true });
    watchEvents(stats.callSid, 5);
  };
  ws.onmessage = (e) => fromServer(e.data);
  ws.onclose = (e) => ended(e.code === 1000 || stats.state === "hanging up" ? "" : `code ${e.code}`);
  ws.onerror = () => stats.errors.push("websocket error");
}

// What the server made of the call (its event stream, as the console shows it): the words it
// understood and each turn's latency appear in the timeline.
function watchEvents(sid, tries) {
  if (stats.state !== "in call" || tries <= 0) return;
  events = new EventSource(`console/api/calls/${encodeURIComponent(sid)}/events?content=1`);
  let opened = false;
  events.onopen = () => { opened = true; };
  events.onmessage = (e) => {
    const ev = JSON.parse(e.data);
    const d = ev.data || {};
    if (ev.kind === "transcript_committed") log("server heard", `“${d.text}”`, "caller");
    else if (ev.kind === "turn_latency") log("turn latency", `${Math.round(d.total_ms)} ms (speech end → reply heard)`, "agent");
    else if (ev.kind === "barge_in") log("barge-in", "", "bad");
  };
  events.addEventListener("end", () => events.close());
  events.onerror = () => {
    events.close();
    // The call may not be on the server's board yet: try again shortly.
    if (!opened) setTimeout(() => watchEvents(sid, tries - 1), 700);
  };
}

function pressKey(digit) {
  if (stats.state !== "in call") return;
  stats.dtmfSent += 1;
  send({ event: "dtmf", streamSid: stats.streamSid, sequenceNumber: String(++seq),
    dtmf: { track: "inbound_track", digit } });
  log("dtmf", digit, "caller");
}

function hangUp() {
  if (stats.state !== "in call") return;
  stats.state = "hanging up";
  send({ event: "stop", sequenceNumber: String(++seq), streamSid: stats.streamSid,
    stop: { accountSid: call.account_sid, callSid: stats.callSid } });
  log("stop", "you hung up", "caller");
  ws.close(1000);
}

function stopAudio() {
  if (events) events.close();
  events = null;
  if (node) node.port.postMessage({ capture: false });
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  ctx = node = mic = null;
}

function ended(why) {
  if (stats.state === "ended") return;
  const byUs = stats.state === "hanging up";
  stats.state = "ended";
  log("call ended", byUs ? "" : `the server ended the call ${why}`.trim());
  setStatus("Call ended. Press <b>Call</b> to call again.");
  stopAudio();
  $("call").disabled = false;
  $("hangup").disabled = true;
}

function fail(err) {
  stats.errors.push(String(err.message || err));
  stats.state = "ended";
  log("error", String(err.message || err), "bad");
  setStatus(`<span style="color:var(--bad)">${String(err.message || err).replace(/</g, "&lt;")}</span>`);
  stopAudio();
  $("call").disabled = false;
}

$("call").onclick = placeCall;
$("hangup").onclick = hangUp;
for (const b of document.querySelectorAll("#keypad button")) b.onclick = () => pressKey(b.dataset.digit);
document.addEventListener("keydown", (e) => {
  if (e.target.tagName !== "INPUT" && /^[0-9*#]$/.test(e.key)) pressKey(e.key);
});
