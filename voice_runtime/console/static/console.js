// The live call console: polls the calls table, streams the selected call's events (SSE).
"use strict";

const $ = (id) => document.getElementById(id);
let selected = null, source = null, rows = [];
window.consoleState = { rows, events: [], levels: null, peak: { caller: 0, agent: 0 } };

function ms(v) { return v === null || v === undefined ? "–" : `${Math.round(v)} ms`; }
function dur(s) {
  s = Math.floor(s);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}
function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

async function refresh() {
  try {
    const res = await fetch("console/api/calls", { credentials: "same-origin" });
    if (!res.ok) { $("summary").textContent = `the server answered HTTP ${res.status}`; return; }
    const body = await res.json();
    rows = body.calls;
    window.consoleState.rows = rows;
    const live = rows.filter((r) => r.live).length;
    $("summary").textContent = `${live} live · ${rows.length - live} recently ended` +
      (body.draining ? " · draining" : "");
    render();
  } catch (err) {
    $("summary").textContent = "server unreachable";
  }
}

function render() {
  const tbody = $("calls");
  if (!rows.length) {
    tbody.innerHTML = '<tr><td colspan="8" class="empty">No calls yet.</td></tr>';
    return;
  }
  tbody.innerHTML = rows.map((r) => {
    const state = r.live ? r.state : `ended${r.end_reason ? " · " + r.end_reason.replace("_", " ") : ""}`;
    const cls = r.live ? (r.state.includes("agent") ? "speaking" : r.state.includes("caller") ? "listening" : "live") : "ended";
    return `<tr class="call${r.call_sid === selected ? " selected" : ""}" data-sid="${esc(r.call_sid)}">
      <td class="mono">${esc(r.call_sid)}</td><td>${esc(r.source)}${r.direction ? " · " + esc(r.direction) : ""}</td>
      <td><span class="pill ${cls}">${esc(state)}</span></td><td>${dur(r.duration_s)}</td>
      <td>${r.turns}</td><td class="latency">${ms(r.last_turn_ms)}</td><td>${ms(r.mean_turn_ms)}</td>
      <td>${r.barge_ins}</td></tr>`;
  }).join("");
  for (const tr of tbody.querySelectorAll("tr.call")) tr.onclick = () => select(tr.dataset.sid);
}

const LABELS = {
  call_started: ["call started", ""], caller_speech_started: ["caller speaking", "caller"],
  caller_speech_ended: ["caller stopped", "caller"], transcript_committed: ["transcript", "caller"],
  agent_audio_queued: ["agent audio queued", "agent"], agent_audio_heard: ["agent heard", "agent"],
  clear: ["clear", "bad"], barge_in: ["barge-in", "bad"], dtmf: ["dtmf", "caller"],
  tool_call: ["tool call", "agent"], provider_connect: ["provider connect", ""], error: ["error", "bad"],
  usage: ["usage", ""], turn_latency: ["turn latency", "agent"], call_ended: ["call ended", ""],
};

function describe(ev) {
  const d = ev.data || {};
  switch (ev.kind) {
    case "transcript_committed": return d.text !== undefined ? `“${d.text}”` : "(hidden)";
    case "dtmf": return d.digit !== undefined ? d.digit : "(hidden)";
    case "turn_latency":
      return `${ms(d.total_ms)} total · commit ${ms(d.to_commit_ms)} · queued ${ms(d.to_queued_ms)} · heard +${ms(d.queued_to_heard_ms)}`;
    case "agent_audio_heard": return `response ${d.response} heard ${ms(d.queued_to_heard_ms)} after queueing`;
    case "agent_audio_queued": return `response ${d.response}`;
    case "caller_speech_ended": return d.speech_ms !== undefined ? `after ${ms(d.speech_ms)} of speech` : "";
    case "call_ended": return `${d.reason || ""} · ${(d.duration_s || 0).toFixed(1)} s · ${d.frames_in} frames in, ${d.frames_out} out`;
    default: {
      const keep = Object.entries(d).filter(([k]) => k !== "text" && k !== "digit");
      return keep.map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
    }
  }
}

function addEvent(ev) {
  window.consoleState.events.push(ev);
  const [label, cls] = LABELS[ev.kind] || [ev.kind, ""];
  const li = document.createElement("li");
  li.innerHTML = `<span class="t">${ev.rel.toFixed(2)}s</span><span class="k ${cls}">${esc(label)}</span><span class="d">${esc(describe(ev))}</span>`;
  const ul = $("timeline");
  const atBottom = ul.scrollTop + ul.clientHeight >= ul.scrollHeight - 8;
  ul.appendChild(li);
  if (atBottom) ul.scrollTop = ul.scrollHeight;
}

function select(sid) {
  selected = sid;
  render();
  if (source) source.close();
  window.consoleState.events = [];
  $("detail").hidden = false;
  $("detail-sid").textContent = sid;
  $("timeline").innerHTML = "";
  const content = $("content").checked ? "1" : "0";
  source = new EventSource(`console/api/calls/${encodeURIComponent(sid)}/events?content=${content}`);
  source.onmessage = (e) => addEvent(JSON.parse(e.data));
  source.addEventListener("levels", (e) => {
    const l = JSON.parse(e.data);
    const st = window.consoleState;
    st.levels = l;
    st.peak = { caller: Math.max(st.peak.caller, l.caller), agent: Math.max(st.peak.agent, l.agent) };
    $("caller-level").style.width = Math.min(100, l.caller * 400) + "%";
    $("agent-level").style.width = Math.min(100, l.agent * 400) + "%";
  });
  source.addEventListener("end", () => {
    source.close();
    $("caller-level").style.width = "0%";
    $("agent-level").style.width = "0%";
  });
}

$("content").onchange = () => { if (selected) select(selected); };
refresh();
setInterval(refresh, 1000);
