// posttrain play: keys -> actions over a WebSocket, binary frames -> three canvases.
// Flow control: one request in flight at a time. Key presses made meanwhile queue (each press is one
// action); a held key repeats only when no press is waiting, so the key-to-frame latency stays one
// frame's work instead of growing with a backlog.
"use strict";

const CAMERA_KEYS = {
  w: 1, ArrowUp: 1, s: 2, ArrowDown: 2, a: 3, d: 4,
  q: 7, ArrowLeft: 7, e: 8, ArrowRight: 8,
  r: 5, PageUp: 5, f: 6, PageDown: 6, t: 9, g: 10,
  " ": 0, "0": 0,
};
const REPEAT_DELAY_MS = 250;  // a tap is one action; holding longer than this repeats it
const LATENCY_WINDOW = 30;

// State, exposed for automation (tests, benchmarks/bench_play.py): window.play.
const play = {
  frames: 0,             // shots drawn since the page opened
  header: null,          // the last shot's header (names, metrics, timings)
  latencies: [],         // key-to-frame ms of the last 1000 answered requests
  frameTimes: [],        // performance.now() of step frames in the last second
  drawTimes: [],         // performance.now() after drawing each of the last 1000 step frames
  waiters: [],
  waitFrames(n, timeoutMs = 120000) {  // resolves once `n` shots have been drawn
    return new Promise((resolve, reject) => {
      const check = () => { if (play.frames >= n) { resolve(play.frames); return true; } return false; };
      if (check()) return;
      play.waiters.push(check);
      setTimeout(() => reject(new Error(`waited ${timeoutMs} ms for frame ${n}; have ${play.frames}`)), timeoutMs);
    });
  },
};
window.play = play;

const $ = (id) => document.getElementById(id);
const decoder = new TextDecoder();
let ws = null;
let seq = 0;
let inflight = null;   // {seq, t0}
const queue = [];      // requests waiting for the one in flight
let held = null;       // {code, message, since}
let repeatTimer = null;

function connect() {
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { $("status").textContent = "connected: building the scene…"; };
  ws.onclose = (event) => {
    $("status").textContent = `disconnected (${event.reason || "server stopped?"}) — reload to reconnect`;
    inflight = null;
  };
  ws.onmessage = onMessage;
}

function request(message, t0 = performance.now()) {
  queue.push({ message, t0 });
  pump();
}

function pump() {
  if (inflight || !ws || ws.readyState !== WebSocket.OPEN) return;
  let next = queue.shift();
  if (!next && held) {
    const waited = performance.now() - held.since;
    if (waited < REPEAT_DELAY_MS) {
      clearTimeout(repeatTimer);
      repeatTimer = setTimeout(pump, REPEAT_DELAY_MS - waited);
      return;
    }
    next = { message: { ...held.message }, t0: performance.now() };
  }
  if (!next) return;
  seq += 1;
  inflight = { seq, t0: next.t0 };
  ws.send(JSON.stringify({ ...next.message, seq }));
}

function answered(replySeq) {
  if (!inflight || replySeq !== inflight.seq) return;
  const latency = performance.now() - inflight.t0;
  play.latencies.push(latency);
  if (play.latencies.length > 1000) play.latencies.shift();
  $("latency").textContent = latency.toFixed(0);
  const recent = play.latencies.slice(-LATENCY_WINDOW);
  const mean = recent.reduce((a, b) => a + b, 0) / recent.length;
  $("latency-mean").textContent = mean.toFixed(0);
  inflight = null;
  pump();
}

function onMessage(event) {
  if (typeof event.data === "string") {
    const message = JSON.parse(event.data);
    if (message.type === "error") $("message").textContent = message.message;
    if (message.type === "temperature") $("temperature-value").textContent = temperatureText(message.value);
    answered(message.seq);
    return;
  }
  const buffer = event.data;
  const length = new DataView(buffer).getUint32(0, true);
  const header = JSON.parse(decoder.decode(new Uint8Array(buffer, 4, length)));
  const payload = new Uint8Array(buffer, 4 + length);
  if (header.kind === "recording") {
    download(payload, header);
  } else {
    draw(header, payload);
  }
  answered(header.seq);
}

function draw(header, payload) {
  const size = header.size, bytes = size * size * 3;
  for (let i = 0; i < 3; i++) {
    const canvas = $(`canvas-${i}`);
    if (canvas.width !== size) { canvas.width = size; canvas.height = size; }
    const context = canvas.getContext("2d");
    const image = context.createImageData(size, size);
    const rgb = payload.subarray(i * bytes, (i + 1) * bytes);
    for (let p = 0, q = 0; p < bytes; p += 3, q += 4) {
      image.data[q] = rgb[p]; image.data[q + 1] = rgb[p + 1]; image.data[q + 2] = rgb[p + 2]; image.data[q + 3] = 255;
    }
    context.putImageData(image, 0, 0);
    $(`name-${i}`).textContent = i === 0 ? "simulator (truth)" : header.names[i];
  }
  for (let i = 1; i < 3; i++) {
    $(`psnr-${i}`).textContent = header.psnr[i - 1].toFixed(2);
    $(`ssim-${i}`).textContent = header.ssim[i - 1].toFixed(3);
    $(`mean-psnr-${i}`).textContent = header.mean_psnr[i - 1] === null ? "–" : header.mean_psnr[i - 1].toFixed(2);
    $(`mean-ssim-${i}`).textContent = header.mean_ssim[i - 1] === null ? "–" : header.mean_ssim[i - 1].toFixed(3);
  }
  $("step").textContent = header.step;
  $("since-sync").textContent = header.steps_since_sync;
  $("scene-seed").textContent = header.scene_seed;
  $("num-objects").textContent = header.num_objects;
  $("last-action").textContent = header.kind === "step"
    ? header.action_name + (header.blocked ? " (blocked: models got noop)" : "")
    : header.kind === "scene" ? "(new scene)" : "(re-sync)";
  if (header.server_ms !== undefined) $("server-ms").textContent = header.server_ms.toFixed(0);
  $("status").textContent = `connected · temperature ${temperatureText(header.temperature)}`;
  if (header.kind === "step") { play.frameTimes.push(performance.now()); $("message").textContent = ""; }
  updateFps();
  if (header.kind === "step") { play.drawTimes.push(performance.now()); if (play.drawTimes.length > 1000) play.drawTimes.shift(); }
  play.header = header;
  play.frames += 1;
  play.waiters = play.waiters.filter((check) => !check());
}

function updateFps() {
  const now = performance.now();
  while (play.frameTimes.length && now - play.frameTimes[0] > 1000) play.frameTimes.shift();
  $("fps").textContent = play.frameTimes.length.toFixed(1);
}
setInterval(updateFps, 250);

function download(payload, header) {
  const url = URL.createObjectURL(new Blob([payload], { type: header.mime }));
  const link = document.createElement("a");
  link.href = url; link.download = header.filename;
  document.body.appendChild(link); link.click(); link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  $("message").textContent = `recorded ${header.frames} frames: ${header.filename}`;
}

function temperatureText(value) { return Number(value) === 0 ? "0 (greedy)" : Number(value).toFixed(2); }

function keyMessage(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return null;
  const digit = /^Digit([1-6])$/.exec(event.code);
  if (digit) return { type: "push", object: Number(digit[1]) - 1, toward: event.shiftKey };
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (key in CAMERA_KEYS) return { type: "action", action: CAMERA_KEYS[key] };
  if (key === "Enter") return { type: "resync" };
  if (key === "n") return { type: "new_scene" };
  return null;
}

window.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLSelectElement) return;
  const message = keyMessage(event);
  if (!message) return;
  event.preventDefault();
  if (event.repeat) return;  // repeats come from `held`, paced by the frames
  request(message);
  held = message.type === "action" ? { code: event.code, message, since: performance.now() } : null;
});
window.addEventListener("keyup", (event) => { if (held && held.code === event.code) held = null; });
window.addEventListener("blur", () => { held = null; });

$("resync").onclick = () => request({ type: "resync" });
$("new-scene").onclick = () => request({ type: "new_scene" });
$("record").onclick = () => {
  $("message").textContent = "encoding the recording…";
  request({ type: "record", format: $("record-format").value });
};
$("temperature").oninput = (event) => { $("temperature-value").textContent = temperatureText(event.target.value); };
$("temperature").onchange = (event) => {
  request({ type: "temperature", value: Number(event.target.value) });
  event.target.blur();  // give the arrow keys back to steering
};
for (const button of document.querySelectorAll("button")) button.addEventListener("focus", () => button.blur());

connect();
