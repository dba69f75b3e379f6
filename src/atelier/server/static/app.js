// atelier live: draws the chosen source into a canvas at the model's size, sends it to /ws as JPEG
// at a steady rate, and draws the frames that come back. The server keeps only the latest frame
// of each session, so sending faster than it can serve costs nothing but dropped frames.
// A server started with --auth-token is opened as /?token=...; the page passes the token on.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN = new URLSearchParams(location.search).get("token");

// A same-origin URL for `path`, carrying the server's token when the page was given one.
function withToken(path) {
  const url = new URL(path, location.href);
  if (TOKEN) url.searchParams.set("token", TOKEN);
  return url;
}

const state = {
  config: null,          // GET /api/settings
  ws: null,
  session: null,
  running: false,
  source: "toy",
  framesSent: 0,
  framesReceived: 0,
  receivedTimes: [],
  lastSettings: null,
  dirty: new Set(),      // settings the user changed before connecting
  lastError: null,
  reference: null,       // the reference image (a Blob) to send when the session opens
};
window.atelier = state;  // for the console and the browser test

// ---------------------------------------------------------------------------------- toy world

// The toy world's palette and shapes (shared/toyworld.md): 64x64 units, white (245) background.
const PALETTE = [[220, 50, 50], [50, 170, 70], [50, 90, 220], [235, 200, 40], [150, 70, 190], [245, 130, 40]];
const SHAPES = ["circle", "square", "triangle", "diamond"];
const toy = { time: 0, last: performance.now(), paused: false, objects: [] };

function makeToyObjects() {
  const specs = [
    { shape: "circle", size: 16, x: 11, y: 11, vx: 7, vy: 3, colour: 0 },
    { shape: "square", size: 9, x: 32, y: 32, vx: -4, vy: 6, colour: 2 },
    { shape: "triangle", size: 16, x: 53, y: 50, vx: -5, vy: -4, colour: 3 },
  ];
  toy.objects = specs.map((o, i) => ({ ...o, phase: i * 1.3 }));
}

function stepToy(dt) {
  for (const o of toy.objects) {
    const r = o.size / 2 + 1;
    o.x += o.vx * dt;
    o.y += o.vy * dt;
    if (o.x < r || o.x > 64 - r) { o.vx = -o.vx; o.x = Math.min(Math.max(o.x, r), 64 - r); }
    if (o.y < r || o.y > 64 - r) { o.vy = -o.vy; o.y = Math.min(Math.max(o.y, r), 64 - r); }
    o.phase += dt;
    if (o.phase > 3) {  // every 3 s: a new colour, and now and then a new shape or size
      o.phase = 0;
      o.colour = (o.colour + 1) % PALETTE.length;
      if (Math.random() < 0.3) o.shape = SHAPES[(SHAPES.indexOf(o.shape) + 1) % SHAPES.length];
      if (Math.random() < 0.2) o.size = o.size === 16 ? 9 : 16;
    }
  }
}

function drawToy(ctx, width, height) {
  const now = performance.now();
  const dt = Math.min((now - toy.last) / 1000, 0.2);
  toy.last = now;
  if (!toy.paused) stepToy(dt);
  ctx.save();
  ctx.scale(width / 64, height / 64);
  ctx.fillStyle = "rgb(245,245,245)";
  ctx.fillRect(0, 0, 64, 64);
  for (const o of toy.objects) {
    const [x, y, r] = [o.x, o.y, o.size / 2];
    ctx.fillStyle = `rgb(${PALETTE[o.colour].join(",")})`;
    ctx.beginPath();
    if (o.shape === "circle") ctx.arc(x, y, r, 0, 2 * Math.PI);
    else if (o.shape === "square") ctx.rect(x - r, y - r, 2 * r, 2 * r);
    else if (o.shape === "triangle") { ctx.moveTo(x, y - r); ctx.lineTo(x + r, y + r); ctx.lineTo(x - r, y + r); }
    else { ctx.moveTo(x, y - r); ctx.lineTo(x + r, y); ctx.lineTo(x, y + r); ctx.lineTo(x - r, y); }
    ctx.closePath();
    ctx.fill();
  }
  ctx.restore();
}

// ---------------------------------------------------------------------------------- sources

let fileImage = null;

function stopMedia() {
  const video = $("video");
  if (video.srcObject) video.srcObject.getTracks().forEach((t) => t.stop());
  video.srcObject = null;
  video.removeAttribute("src");
  fileImage = null;
}

async function chooseSource(kind) {
  stopMedia();
  state.source = kind;
  $("toy-options").hidden = kind !== "toy";
  const video = $("video");
  try {
    if (kind === "webcam") {
      video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
      await video.play();
    } else if (kind === "screen") {
      video.srcObject = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
      await video.play();
    } else if (kind === "file") {
      $("file").click();
    }
  } catch (err) {
    note(`cannot use the ${kind}: ${err.message || err}; back to the toy animation`, true);
    $("source").value = "toy";
    state.source = "toy";
    $("toy-options").hidden = false;
  }
}

function loadFile(file) {
  stopMedia();
  const url = URL.createObjectURL(file);
  if (file.type.startsWith("video/")) {
    const video = $("video");
    video.src = url;
    video.loop = true;
    video.play().catch((err) => note(`cannot play ${file.name}: ${err.message}`, true));
  } else {
    const image = new Image();
    image.onload = () => { fileImage = image; };
    image.onerror = () => note(`${file.name} is not an image the browser can read`, true);
    image.src = url;
  }
}

function drawCover(ctx, media, mw, mh, width, height) {
  if (!mw || !mh) return;
  const scale = Math.max(width / mw, height / mh);
  const w = mw * scale, h = mh * scale;
  ctx.drawImage(media, (width - w) / 2, (height - h) / 2, w, h);
}

function drawSource() {
  const canvas = $("input");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  if (state.source === "toy") return drawToy(ctx, width, height);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, width, height);
  const video = $("video");
  if (fileImage) drawCover(ctx, fileImage, fileImage.naturalWidth, fileImage.naturalHeight, width, height);
  else if (video.readyState >= 2) drawCover(ctx, video, video.videoWidth, video.videoHeight, width, height);
}

// ---------------------------------------------------------------------------------- the stream

function connect() {
  const url = withToken("/ws?format=jpeg");
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  ws.binaryType = "blob";
  state.ws = ws;
  setConnection("connecting", "");
  ws.onmessage = (event) => (typeof event.data === "string" ? onMessage(JSON.parse(event.data)) : onFrame(event.data));
  ws.onclose = (event) => {
    state.ws = null;
    state.session = null;
    state.running = false;
    $("mjpeg").classList.add("disabled");
    $("snapshot").classList.add("disabled");  // the session and its last frame are gone
    $("start").textContent = "Start";
    const why = event.reason || (event.code === 1006 ? "connection lost" : `code ${event.code}`);
    setConnection(`closed: ${why}`, "closed");
    if (event.reason) note(`stream closed: ${event.reason}`, event.code !== 1000);
  };
  ws.onopen = () => setConnection("live", "live");
}

function onMessage(message) {
  if (message.type === "hello") {
    state.session = message.session;
    for (const id of ["snapshot", "mjpeg"]) {  // private to this session: the URLs carry its key
      const url = withToken(message[id]);
      $(id).href = url.pathname + url.search;
    }
    $("mjpeg").classList.remove("disabled");
    const initial = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value };
    for (const key of state.dirty) initial[key] = controlValue(key);
    if ($("reference-frame").checked) initial.reference = "frame";
    send({ type: "settings", ...initial });
    if (state.reference && !$("reference-frame").checked) sendReference(state.reference);
  } else if (message.type === "settings") {
    state.lastSettings = message.settings;
    showSettings(message.settings);
    showReference(message.settings.reference);
  } else if (message.type === "status") {
    $("latency").textContent = message.latency_ms == null ? "–" : Math.round(message.latency_ms);
    $("dropped").textContent = message.frames_dropped + message.outputs_dropped;
  } else if (message.type === "edit") {
    const on = message.edit != null;
    $("edit-stop").disabled = !on;
    $("edit-note").textContent = on ? `editing: “${message.edit.source}” → “${message.edit.target}”` : "";
  } else if (message.type === "error") {
    state.lastError = message;
    note(`${message.code}: ${message.message}`, true);
  }
}

let drawnSeq = 0, frameSeq = 0;
async function onFrame(blob) {
  const seq = ++frameSeq;
  const bitmap = await createImageBitmap(blob);
  if (seq < drawnSeq) return;  // decoded out of order: an older frame
  drawnSeq = seq;
  const canvas = $("output");
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  state.framesReceived += 1;
  const now = performance.now();
  state.receivedTimes.push(now);
  while (state.receivedTimes.length && now - state.receivedTimes[0] > 2000) state.receivedTimes.shift();
  $("received").textContent = state.framesReceived;
  $("snapshot").classList.remove("disabled");
}

function send(message) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
}

function tick() {
  drawSource();
  const ws = state.ws;
  if (state.running && ws && ws.readyState === WebSocket.OPEN && state.session && ws.bufferedAmount < 1 << 20) {
    $("input").toBlob((blob) => {
      if (blob && ws.readyState === WebSocket.OPEN) { ws.send(blob); state.framesSent += 1; }
    }, "image/jpeg", 0.92);
  }
  const times = state.receivedTimes;
  const span = times.length > 1 ? (times[times.length - 1] - times[0]) / 1000 : 0;
  $("fps").textContent = span > 0 ? ((times.length - 1) / span).toFixed(1) : "0";
  setTimeout(tick, 1000 / Number($("send-fps").value));
}

function startStop() {
  if (state.running) {
    state.running = false;
    if (state.ws) state.ws.close(1000, "stopped by the user");
    $("start").textContent = "Start";
    return;
  }
  state.running = true;
  $("start").textContent = "Stop";
  if (!state.ws) connect();
}

// ---------------------------------------------------------------------------------- controls

const PROMPT_KEYS = new Set(["prompt", "negative_prompt"]);
const REFERENCE_KEYS = new Set(["reference", "ip_scale"]);  // the reference slot's own controls

function buildControls(schema) {
  const box = $("controls");
  for (const [key, spec] of Object.entries(schema)) {
    if (spec.readOnly || PROMPT_KEYS.has(key) || REFERENCE_KEYS.has(key)) continue;
    const row = document.createElement("label");
    row.className = "control";
    row.title = spec.description || "";
    const name = document.createElement("span");
    name.textContent = key.replaceAll("_", " ");
    row.append(name);
    let input;
    if (spec.enum) {
      input = document.createElement("select");
      for (const option of spec.enum) input.append(new Option(option, option));
    } else if (spec.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
    } else if (spec.type === "number") {
      input = document.createElement("input");
      input.type = "range";
      input.min = spec.minimum;
      input.max = spec.maximum;
      input.step = (spec.maximum - spec.minimum) / 200;
    } else if (spec.type === "integer") {
      input = document.createElement("input");
      input.type = "number";
      input.min = spec.minimum;
      input.max = spec.maximum;
      input.step = 1;
    } else {  // text, and arrays written as "3, 12, 25"
      input = document.createElement("input");
      input.type = "text";
    }
    input.id = `setting-${key}`;
    input.dataset.key = key;
    input.dataset.type = spec.type;
    row.append(input);
    if (spec.type === "number") {
      const value = document.createElement("span");
      value.className = "value";
      value.id = `value-${key}`;
      row.append(value);
    }
    box.append(row);
    setControl(key, spec.default);
    input.addEventListener(spec.type === "number" || spec.type === "string" ? "input" : "change",
      debounce(() => changed(key), 150));
  }
}

function controlValue(key) {
  const input = PROMPT_KEYS.has(key) ? $(key) : $(`setting-${key}`);
  const type = input.dataset.type;
  if (type === "boolean") return input.checked;
  if (type === "number") return Number(input.value);
  if (type === "integer") return Math.round(Number(input.value));
  if (type === "array") return input.value.split(/[\s,]+/).filter(Boolean).map(Number);
  return input.value;
}

function setControl(key, value) {
  const input = PROMPT_KEYS.has(key) ? $(key) : $(`setting-${key}`);
  if (!input || input === document.activeElement) return;
  if (input.type === "checkbox") input.checked = Boolean(value);
  else if (Array.isArray(value)) input.value = value.join(", ");
  else input.value = value ?? "";
  const shown = $(`value-${key}`);
  if (shown) shown.textContent = Number(value).toFixed(2);
}

function showSettings(settings) {
  for (const [key, value] of Object.entries(settings)) setControl(key, value);
}

function changed(key) {
  const value = controlValue(key);
  const shown = $(`value-${key}`);
  if (shown) shown.textContent = Number(value).toFixed(2);
  state.dirty.add(key);
  send({ type: "settings", [key]: value });
}

// ---------------------------------------------------------------------------------- reference image

const REFERENCE_TYPES = new Set(["image/jpeg", "image/png", "image/webp"]);

// The file as the server takes it: as it is when it is a JPEG, PNG or WebP within the frame limit
// (so the recorded SHA-256 is the file's), else redrawn as a PNG at most 512 px a side.
async function referenceBlob(file) {
  if (REFERENCE_TYPES.has(file.type) && file.size <= state.config.limits.max_frame_bytes) return file;
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, 512 / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// The announcement and the image go out in one task, so no frame can come between them.
function sendReference(blob) {
  blob.arrayBuffer().then((data) => {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return;
    state.ws.send(JSON.stringify({ type: "reference" }));
    state.ws.send(data);
  });
}

async function chooseReference(file) {
  try {
    state.reference = await referenceBlob(file);
  } catch (err) {
    note(`${file.name} is not an image the browser can read`, true);
    return;
  }
  $("reference-preview").src = URL.createObjectURL(state.reference);
  $("reference-preview").hidden = false;
  $("reference-frame").checked = false;
  sendReference(state.reference);
}

function clearReference() {
  state.reference = null;
  $("reference").value = "";
  $("reference-preview").hidden = true;
  $("reference-frame").checked = false;
  send({ type: "settings", reference: null });
}

function showReference(reference) {
  $("reference-state").textContent = reference == null ? "no reference: the text-only stream"
    : reference === "frame" ? "reference: each input frame" : `reference: ${reference.slice(0, 19)}…`;
}

function setUpReference(config) {
  const spec = config.settings.ip_scale;
  if (!config.ip_adapter || !spec) {
    $("reference-slot").disabled = true;
    $("reference-note").textContent = config.ip_adapter_note || "this model has no IP-Adapter";
    return;
  }
  const slider = $("setting-ip_scale");
  slider.min = spec.minimum;
  slider.max = spec.maximum;
  slider.step = (spec.maximum - spec.minimum) / 200;
  setControl("ip_scale", spec.default);
  slider.addEventListener("input", debounce(() => changed("ip_scale"), 150));
  $("reference").addEventListener("change", (e) => e.target.files[0] && chooseReference(e.target.files[0]));
  $("reference-clear").addEventListener("click", clearReference);
  $("reference-frame").addEventListener("change", (e) => {
    if (e.target.checked) send({ type: "settings", reference: "frame" });
    else if (state.reference) sendReference(state.reference);
    else send({ type: "settings", reference: null });
  });
  showReference(null);
}

function debounce(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

// ---------------------------------------------------------------------------------- page

function setConnection(text, cls) {
  const badge = $("connection");
  badge.textContent = text;
  badge.className = `badge ${cls}`;
}

function note(text, isError = false) {
  const item = document.createElement("li");
  item.textContent = text;
  if (isError) item.className = "error";
  const list = $("messages");
  list.prepend(item);
  while (list.children.length > 20) list.lastChild.remove();
}

async function init() {
  makeToyObjects();
  const response = await fetch(withToken("/api/settings"));
  if (!response.ok) throw new Error(response.status === 401 ? "this server needs its token: open the page as /?token=..." : `GET /api/settings: ${response.status}`);
  state.config = await response.json();
  const { width, height, model } = state.config;
  for (const id of ["input", "output"]) { $(id).width = width; $(id).height = height; }
  $("model").textContent = `${model} · ${width}×${height}`;
  buildControls(state.config.settings);
  setUpReference(state.config);
  for (const key of PROMPT_KEYS) {
    $(key).dataset.type = "string";
    $(key).addEventListener("input", debounce(() => changed(key), 250));
  }
  $("source").addEventListener("change", (e) => chooseSource(e.target.value));
  $("file").addEventListener("change", (e) => e.target.files[0] && loadFile(e.target.files[0]));
  $("toy-pause").addEventListener("change", (e) => { toy.paused = e.target.checked; });
  $("start").addEventListener("click", startStop);
  if (state.config.one_step_edit) {
    const sendEdit = () => send({ type: "edit", source: $("edit-source").value, target: $("edit-target").value,
                                  show_mask: $("edit-mask").checked });
    $("edit-start").addEventListener("click", sendEdit);
    $("edit-mask").addEventListener("change", () => { if (!$("edit-stop").disabled) sendEdit(); });
    $("edit-stop").addEventListener("click", () => send({ type: "edit" }));
  } else {
    $("edit-slot").disabled = true;
    $("edit-note").textContent = "this model has no one-step inverter (train one with `atelier train inverter`)";
  }
  tick();
}

init().catch((err) => note(`cannot start: ${err.message || err}`, true));
