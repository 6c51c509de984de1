// The page's only script (served from /static, so the Content-Security-Policy forbids inline script).
// Everything that comes from the model (class names, labels) is inserted with textContent, never as HTML.
"use strict";
const COLORS = ["#e6194b", "#3cb44b", "#e6b400", "#0082c8", "#f58231", "#911eb4", "#2ab7b7", "#f032e6"];
let classes = [];  // those of the last answer: the model's, or the names typed in the classes field
let liveLimits = { max_fps: 15, max_side: 1280 };
const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function colorOf(label) {
  const i = classes.indexOf(label);
  return COLORS[(i < 0 ? 0 : i) % COLORS.length];
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function namedClasses() {
  return $("classes").value.split(",").map((name) => name.trim()).filter((name) => name);
}

async function loadInfo() {
  try {
    const info = await (await fetch("/api/info")).json();
    classes = info.classes;
    if (info.live) liveLimits = info.live;
    $("model").textContent = `${info.classes.length} classes: ${info.classes.join(", ")} (stage ${info.stage}, ` +
      `uploads up to ${(info.max_upload_bytes / 1048576).toFixed(0)} MB)`;
    if (info.notice) { $("notice").textContent = info.notice; $("notice").hidden = false; }
    // a second detector is offered where the server has it installed
    if ((info.face_detection || []).includes("centerface")) $("detect").add(new Option("find them (CenterFace)", "centerface"), 1);
  } catch (e) { $("model").textContent = "model information unavailable"; }
}

// Boxes with a label each; a label goes above its box, else below, else inside, moved down past labels already
// placed so that none hides another (a group photo's neighbouring faces).
function drawBoxes(ctx, items, scaleX, scaleY, fontPx) {
  const lw = Math.max(2, Math.round(fontPx / 8));
  ctx.font = `${fontPx}px system-ui, sans-serif`;
  const placed = [], h = fontPx + 6;
  const overlaps = (a) => placed.some((b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h);
  for (const item of items) {
    const [x0, y0, x1, y1] = item.box.map((v, k) => v * (k % 2 ? scaleY : scaleX));
    ctx.strokeStyle = item.color; ctx.lineWidth = lw; ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const w = ctx.measureText(item.text).width + 10;
    const candidates = [y0 - h, y1, y0].filter((y) => y >= 0 && y + h <= ctx.canvas.height);
    let spot = { x: Math.min(x0, Math.max(0, ctx.canvas.width - w)), y: candidates.length ? candidates[0] : 0, w, h };
    for (const y of candidates) { const c = { ...spot, y }; if (!overlaps(c)) { spot = c; break; } }
    while (overlaps(spot) && spot.y + h < ctx.canvas.height) spot.y += h;
    placed.push(spot);
    ctx.fillStyle = item.color; ctx.fillRect(spot.x, spot.y, w, h);
    ctx.fillStyle = "#000"; ctx.fillText(item.text, spot.x + 5, spot.y + h - 6);
  }
}

function drawImage(img, faces) {
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  ctx.drawImage(img, 0, 0);
  const items = faces.map((f, i) => ({ box: f.box, color: colorOf(f.label),
    text: `${i + 1}. ${f.label} ${(100 * f.score).toFixed(0)}%` }));
  drawBoxes(ctx, items, 1, 1, Math.max(14, Math.round(canvas.height / 28)));
}

function faceCard(f, title) {
  const card = el("div", "face");
  const heading = el("h2");
  const swatch = el("span", "swatch");
  swatch.style.background = colorOf(f.label);
  heading.append(swatch, el("span", "face-label", `${title}: ${f.label}`));
  card.appendChild(heading);
  Object.entries(f.probabilities).sort((a, b) => b[1] - a[1]).forEach(([name, p]) => {
    const row = el("div", "row" + (name === f.label ? " top" : ""));
    const track = el("div", "track"), bar = el("div", "bar");
    bar.style.width = `${(100 * p).toFixed(1)}%`;
    track.appendChild(bar);
    row.append(el("span", "", name), track, el("span", "num", `${(100 * p).toFixed(1)}%`));
    card.appendChild(row);
  });
  if (f.explanation_png && f.explanation_png.startsWith("data:image/png;base64,")) {
    const img = el("img", "explanation");
    img.src = f.explanation_png; img.alt = `evidence for ${f.label}`;
    card.appendChild(img);
  }
  return card;
}

function showFaces(faces, titleOf, empty) {
  const result = $("result");
  result.replaceChildren();
  if (!faces.length) { result.appendChild(el("p", "no-face", empty)); return; }
  faces.forEach((f, i) => result.appendChild(faceCard(f, titleOf(f, i))));
}

async function send(file) {
  setStatus(`analysing ${file.name}…`);
  const url = URL.createObjectURL(file), img = new Image();
  img.src = url;
  const form = new FormData();
  form.append("file", file);
  let query = `?detect=${encodeURIComponent($("detect").value)}&explain=${$("explain").checked}`;
  const named = namedClasses();
  if (named.length) query += `&classes=${encodeURIComponent(named.join(","))}`;
  try {
    const response = await fetch("/api/predict" + query, { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) { setStatus(body.detail || `error ${response.status}`, true); return; }
    await img.decode();
    classes = body.classes;
    $("canvas").hidden = false;
    drawImage(img, body.faces);
    showFaces(body.faces, (f, i) => `Face ${i + 1}`, "No face found in this image.");
    const count = body.faces.length, more = body.faces_left_out ? `, ${body.faces_left_out} more not classified` : "";
    const note = body.classes_note ? ` · ${body.classes_note}` : "";
    setStatus(`${count} face${count === 1 ? "" : "s"} in ${file.name} (${body.width}×${body.height})${more}${note}`);
  } catch (e) { setStatus(`request failed: ${e}`, true); }
  finally { URL.revokeObjectURL(url); }
}

// The live camera: frames go to /api/live downscaled, one at a time (the next once the answer is in), at most
// max_fps a second; the answers' boxes, track ids and smoothed labels are drawn over the live picture.
let live = null;

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    setStatus("this browser gives no camera to the page (it needs http://localhost or https)", true); return;
  }
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 } }, audio: false }); }
  catch (e) { setStatus(`no camera: ${e.message || e}`, true); return; }
  const video = $("video");
  video.srcObject = stream;
  await video.play();
  const named = namedClasses();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = named.length ? `?classes=${encodeURIComponent(named.join(","))}` : "";
  const ws = new WebSocket(`${scheme}://${location.host}/api/live${query}`);
  ws.binaryType = "arraybuffer";
  live = { ws, stream, inFlight: false, sentAt: 0, answers: 0, frame: document.createElement("canvas") };
  $("canvas").hidden = true; $("live").hidden = false;
  $("camera").textContent = "Stop the camera"; $("camera").classList.add("on");
  ws.onopen = () => { setStatus("live: sending frames…"); sendFrame(); };
  ws.onmessage = (event) => answered(JSON.parse(event.data));
  ws.onclose = (event) => stopCamera(event.reason ? `live session ended: ${event.reason}` : "live session ended");
}

function sendFrame() {
  if (!live || live.inFlight || live.ws.readyState !== WebSocket.OPEN) return;
  const video = $("video"), side = Math.max(video.videoWidth, video.videoHeight);
  if (!side) { setTimeout(sendFrame, 100); return; }
  const scale = Math.min(1, Math.min(640, liveLimits.max_side) / side), frame = live.frame;
  frame.width = Math.round(video.videoWidth * scale); frame.height = Math.round(video.videoHeight * scale);
  frame.getContext("2d").drawImage(video, 0, 0, frame.width, frame.height);
  live.inFlight = true;
  live.sentAt = performance.now();
  frame.toBlob(async (blob) => {
    if (!live || live.ws.readyState !== WebSocket.OPEN) return;
    const bytes = new Uint8Array(await blob.arrayBuffer()), message = new Uint8Array(8 + bytes.length);
    new DataView(message.buffer).setFloat64(0, live.sentAt, true);
    message.set(bytes, 8);
    live.ws.send(message);
  }, "image/jpeg", 0.85);
}

function answered(body) {
  if (!live) return;
  live.inFlight = false;
  if (body.error) setStatus(`live: ${body.error}`, true);
  else drawLive(body);
  const wait = Math.max(0, 1000 / liveLimits.max_fps - (performance.now() - live.sentAt));
  setTimeout(sendFrame, wait);
}

function drawLive(body) {
  live.answers += 1;
  classes = body.classes || classes;
  const video = $("video"), overlay = $("overlay"), ctx = overlay.getContext("2d");
  overlay.width = video.clientWidth; overlay.height = video.clientHeight;
  ctx.clearRect(0, 0, overlay.width, overlay.height);
  const items = body.faces.map((f) => ({ box: f.box, color: colorOf(f.label),
    text: `#${f.track} ${f.label} ${(100 * f.score).toFixed(0)}%` }));
  drawBoxes(ctx, items, overlay.width / body.width, overlay.height / body.height,
            Math.max(12, Math.round(overlay.height / 24)));
  showFaces(body.faces, (f) => `Track ${f.track}`, "No face in view.");
  const count = body.faces.length;
  $("live-info").textContent = `${count} face${count === 1 ? "" : "s"} · answer ${live.answers}`;
}

function stopCamera(message) {
  if (!live) return;
  const { ws, stream } = live;
  live = null;
  if (ws.readyState <= WebSocket.OPEN) ws.close();
  stream.getTracks().forEach((track) => track.stop());
  $("video").srcObject = null;
  $("live").hidden = true; $("canvas").hidden = false;
  $("camera").textContent = "Start the camera"; $("camera").classList.remove("on");
  $("live-info").textContent = "";
  if (message) setStatus(message);
}

$("camera").addEventListener("click", () => (live ? stopCamera("camera stopped") : startCamera()));
let lastFile = null;
$("file-input").addEventListener("change", (e) => {
  if (e.target.files.length) { stopCamera(); lastFile = e.target.files[0]; send(lastFile); }
  e.target.value = "";  // choosing the same file again must work too
});
for (const id of ["explain", "detect", "classes"]) $(id).addEventListener("change", () => { if (lastFile && !live) send(lastFile); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) { stopCamera(); lastFile = e.dataTransfer.files[0]; send(lastFile); }
});
loadInfo();
