// The page's only script (served from /static, so the Content-Security-Policy forbids inline script).
// Everything that comes from the model (class names, labels) is inserted with textContent, never as HTML.
"use strict";
const COLORS = ["#e6194b", "#3cb44b", "#e6b400", "#0082c8", "#f58231", "#911eb4", "#2ab7b7", "#f032e6"];
let classes = [];  // those of the last answer: the model's, or the names typed in the classes field
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

async function loadInfo() {
  try {
    const info = await (await fetch("/api/info")).json();
    classes = info.classes;
    $("model").textContent = `${info.classes.length} classes: ${info.classes.join(", ")} (stage ${info.stage}, ` +
      `uploads up to ${(info.max_upload_bytes / 1048576).toFixed(0)} MB)`;
    if (info.notice) { $("notice").textContent = info.notice; $("notice").hidden = false; }
  } catch (e) { $("model").textContent = "model information unavailable"; }
}

function drawImage(img, faces) {
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  ctx.drawImage(img, 0, 0);
  const lw = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 200));
  ctx.font = `${Math.max(14, Math.round(canvas.height / 28))}px system-ui, sans-serif`;
  faces.forEach((f, i) => {
    const [x0, y0, x1, y1] = f.box, color = colorOf(f.label);
    ctx.strokeStyle = color; ctx.lineWidth = lw; ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const text = `${i + 1}. ${f.label} ${(100 * f.score).toFixed(0)}%`;
    const h = parseInt(ctx.font, 10) + 6, w = ctx.measureText(text).width + 10;
    const ty = y0 - h > 0 ? y0 - h : y1;
    ctx.fillStyle = color; ctx.fillRect(x0, ty, w, h);
    ctx.fillStyle = "#000"; ctx.fillText(text, x0 + 5, ty + h - 6);
  });
}

function faceCard(f, i) {
  const card = el("div", "face");
  const title = el("h2");
  const swatch = el("span", "swatch");
  swatch.style.background = colorOf(f.label);
  title.append(swatch, el("span", "face-label", `Face ${i + 1}: ${f.label}`));
  card.appendChild(title);
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

function showFaces(faces) {
  const result = $("result");
  result.replaceChildren();
  if (!faces.length) { result.appendChild(el("p", "no-face", "No face found in this image.")); return; }
  faces.forEach((f, i) => result.appendChild(faceCard(f, i)));
}

async function send(file) {
  setStatus(`analysing ${file.name}…`);
  const url = URL.createObjectURL(file), img = new Image();
  img.src = url;
  const form = new FormData();
  form.append("file", file);
  let query = `?detect=${encodeURIComponent($("detect").value)}&explain=${$("explain").checked}`;
  const named = $("classes").value.split(",").map((name) => name.trim()).filter((name) => name);
  if (named.length) query += `&classes=${encodeURIComponent(named.join(","))}`;
  try {
    const response = await fetch("/api/predict" + query, { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) { setStatus(body.detail || `error ${response.status}`, true); return; }
    await img.decode();
    classes = body.classes;
    drawImage(img, body.faces);
    showFaces(body.faces);
    const note = body.classes_note ? ` · ${body.classes_note}` : "";
    setStatus(`${body.faces.length} face${body.faces.length === 1 ? "" : "s"} in ${file.name} (${body.width}×${body.height})${note}`);
  } catch (e) { setStatus(`request failed: ${e}`, true); }
  finally { URL.revokeObjectURL(url); }
}

let lastFile = null;
$("file-input").addEventListener("change", (e) => {
  if (e.target.files.length) { lastFile = e.target.files[0]; send(lastFile); }
  e.target.value = "";  // choosing the same file again must work too
});
for (const id of ["explain", "detect", "classes"]) $(id).addEventListener("change", () => { if (lastFile) send(lastFile); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) { lastFile = e.dataTransfer.files[0]; send(lastFile); }
});
loadInfo();
