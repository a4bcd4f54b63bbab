// The page: photos and webcam frames go to POST /api/predict; faces come back
// as boxes (photo pixels) and 7 probabilities, drawn here. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
let classes = [];

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- model info

async function loadModelInfo() {
  const box = $("model-info");
  try {
    const info = await (await fetch("/api/model")).json();
    classes = info.classes;
    const acc = info.test_accuracy === null ? "not measured"
        : `${(100 * info.test_accuracy).toFixed(1)}% (${info.accuracy_source})`;
    const rows = [["workdir", info.workdir], ["method", info.method],
                  ["image size", `${info.image_size} px`], ["test accuracy", acc],
                  ["upload limit", `${info.max_upload_bytes / (1024 * 1024)} MB`]];
    box.replaceChildren();
    for (const [k, v] of rows) {
      box.append(el("dt", "", k));
      const dd = el("dd", "", v);
      dd.dataset.field = k;
      box.append(dd);
    }
  } catch (e) {
    box.replaceChildren(el("dt", "", "model"), el("dd", "error", `unavailable: ${e}`));
  }
}

// ---------------------------------------------------------------- prediction

async function predict(blob) {
  const resp = await fetch("/api/predict", {
    method: "POST", body: blob,
    headers: {"Content-Type": blob.type || "application/octet-stream"},
  });
  let body;
  try {
    body = await resp.json();
  } catch (e) {
    throw new Error(`server answered ${resp.status} ${resp.statusText}`);
  }
  if (!resp.ok) throw new Error(body.error || `server answered ${resp.status}`);
  return body;
}

// One card per face: its expression and a bar with a number per class.
function faceCard(face, index) {
  const card = el("div", "face");
  card.append(el("h3", "", `face ${index + 1}: ${face.expression} ` +
                           `(detector ${face.det_score.toFixed(2)})`));
  for (const name of Object.keys(face.probabilities)) {
    const p = face.probabilities[name];
    const row = el("div", name === face.expression ? "bar-row top" : "bar-row");
    row.dataset.class = name;
    const bar = el("div", "bar");
    const fill = el("div", "bar-fill");
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.append(fill);
    row.append(el("span", "label", name), bar, el("span", "value", p.toFixed(3)));
    card.append(row);
  }
  return card;
}

function renderFaces(container, faces) {
  container.replaceChildren(...faces.map(faceCard));
}

// ---------------------------------------------------------------- photos

async function showPhoto(file) {
  const card = el("div", "result");
  card.append(el("div", "name", file.name));
  const photo = el("div", "photo");
  const img = el("img");
  img.alt = file.name;
  const url = URL.createObjectURL(file);
  img.src = url;
  photo.append(img);
  const message = el("div", "message", "finding faces…");
  const faces = el("div", "faces");
  card.append(photo, message, faces);
  $("results").prepend(card);
  try {
    const result = await predict(file);
    // Boxes in percent of the photo: they stay on the face at any display size.
    result.faces.forEach((face, i) => {
      const [x1, y1, x2, y2] = face.box;
      const box = el("div", "face-box");
      box.style.left = `${100 * x1 / result.width}%`;
      box.style.top = `${100 * y1 / result.height}%`;
      box.style.width = `${100 * (x2 - x1) / result.width}%`;
      box.style.height = `${100 * (y2 - y1) / result.height}%`;
      box.append(el("span", "", `${i + 1}: ${face.expression}`));
      photo.append(box);
    });
    if (result.faces.length === 0) {
      message.className = "message empty";
      message.textContent = "no face found";
    } else {
      message.textContent = `${result.faces.length} face(s), ${result.elapsed_ms} ms`;
    }
    renderFaces(faces, result.faces);
  } catch (e) {
    // Not an image (or too large): the browser may not show it either.
    photo.remove();
    URL.revokeObjectURL(url);
    message.className = "message error";
    message.textContent = e.message;
  }
}

function setUpUploads() {
  const input = $("file-input");
  const zone = $("drop-zone");
  input.addEventListener("change", () => {
    for (const file of input.files) showPhoto(file);
    input.value = "";
  });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    for (const file of e.dataTransfer.files) showPhoto(file);
  });
}

// ---------------------------------------------------------------- webcam

const camera = {stream: null, running: false};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function drawOverlay(result) {
  const canvas = $("overlay");
  canvas.width = result.width;
  canvas.height = result.height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.lineWidth = Math.max(2, result.width / 200);
  ctx.font = `${Math.max(12, Math.round(result.width / 30))}px sans-serif`;
  for (const face of result.faces) {
    const [x1, y1, x2, y2] = face.box;
    ctx.strokeStyle = "#ff5252";
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const label = `${face.expression} ${face.probabilities[face.expression].toFixed(2)}`;
    ctx.fillStyle = "#ff5252";
    const h = parseInt(ctx.font, 10) + 4;
    ctx.fillRect(x1, Math.max(0, y1 - h), ctx.measureText(label).width + 8, h);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x1 + 4, Math.max(0, y1 - h) + h - 5);
  }
  canvas.dataset.faces = String(result.faces.length);
}

// One frame in flight at a time: the next is grabbed when the answer is back,
// so the rate shown is the rate the server keeps up with.
async function cameraLoop() {
  const video = $("video");
  const grab = document.createElement("canvas");
  const done = [];
  while (camera.running) {
    if (!video.videoWidth) { await sleep(50); continue; }
    grab.width = video.videoWidth;
    grab.height = video.videoHeight;
    grab.getContext("2d").drawImage(video, 0, 0);
    const blob = await new Promise((r) => grab.toBlob(r, "image/jpeg", 0.85));
    let result;
    try {
      result = await predict(blob);
    } catch (e) {
      $("camera-status").textContent = `error: ${e.message}`;
      await sleep(500);
      continue;
    }
    if (!camera.running) break;
    drawOverlay(result);
    renderFaces($("live-faces"), result.faces);
    $("camera-status").textContent = result.faces.length ? "" : "no face found";
    done.push(performance.now());
    if (done.length > 10) done.shift();
    if (done.length >= 2) {
      const perFrame = (done[done.length - 1] - done[0]) / (done.length - 1);
      $("rate").textContent = `${(1000 / perFrame).toFixed(1)} frames/s`;
    }
  }
}

async function toggleCamera() {
  const button = $("camera-button");
  if (camera.running) {
    camera.running = false;
    camera.stream.getTracks().forEach((t) => t.stop());
    $("video").srcObject = null;
    button.textContent = "Start camera";
    $("camera-status").textContent = "";
    return;
  }
  try {
    camera.stream = await navigator.mediaDevices.getUserMedia({video: true, audio: false});
  } catch (e) {
    $("camera-status").textContent = `no camera: ${e.message}`;
    return;
  }
  $("video").srcObject = camera.stream;
  camera.running = true;
  button.textContent = "Stop camera";
  $("camera-status").textContent = "starting…";
  $("rate").textContent = "";
  cameraLoop();
}

loadModelInfo();
setUpUploads();
$("camera-button").addEventListener("click", toggleCamera);
