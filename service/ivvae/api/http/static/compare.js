// The compare page: a client of the public HTTP API (POST /encode, /decode, /frames).
// Metrics follow ivvae.train.evaluate / ivvae.train.metrics exactly: PSNR of the mean MSE
// over 8-bit RGB, SSIM with an 11x11 Gaussian window (sigma 1.5), 'valid' filtering, mean
// over channels; group position 0 for frame 0, else 1 + (i - 1) % 4.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { original: null, reconstruction: null, frame: 0, timer: null, latentUrl: null };

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function headers(extra = {}) {
  const key = $("apikey").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function call(path, body, extraHeaders = {}) {
  const response = await fetch(path, { method: "POST", body, headers: headers(extraHeaders) });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const err = await response.json();
      detail = `${err.error}: ${err.detail}`;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new Error(`${path}: ${detail}`);
  }
  return response;
}

// A safetensors file holding `frames` (T, H, W, 3) uint8, as /frames and /decode return.
function parseFrames(buffer) {
  const view = new DataView(buffer);
  const headerLength = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, headerLength)));
  const entry = header.frames;
  if (!entry || entry.dtype !== "U8" || entry.shape.length !== 4 || entry.shape[3] !== 3) {
    throw new Error("the response has no (T, H, W, 3) uint8 frames");
  }
  const [t, h, w] = entry.shape;
  const [begin, end] = entry.data_offsets;
  const data = new Uint8Array(buffer, 8 + headerLength + begin, end - begin);
  const [num, den] = (header.__metadata__?.fps || "25/1").split("/").map(Number);
  return { t, h, w, data, fps: num / (den || 1) };
}

function frameOf(video, i) {
  const size = video.h * video.w * 3;
  return video.data.subarray(i * size, (i + 1) * size);
}

function mseOf(a, b) {
  let sum = 0;
  for (let k = 0; k < a.length; k++) {
    const d = a[k] - b[k];
    sum += d * d;
  }
  return sum / a.length / (255 * 255);
}

const psnrOfMse = (mse) => 10 * Math.log10(1 / Math.max(mse, 1e-12));
const mean = (xs) => xs.reduce((s, x) => s + x, 0) / xs.length;

function gaussian(size, sigma) {
  const g = [];
  for (let i = 0; i < size; i++) {
    const x = i - (size - 1) / 2;
    g.push(Math.exp(-(x * x) / (2 * sigma * sigma)));
  }
  const total = g.reduce((s, v) => s + v, 0);
  return g.map((v) => v / total);
}

// 'valid' separable filtering of a (h, w) plane with a 1-D kernel in both directions.
function filter(plane, h, w, g) {
  const n = g.length, ow = w - n + 1, oh = h - n + 1;
  const rows = new Float64Array(h * ow);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < ow; x++) {
      let s = 0;
      for (let k = 0; k < n; k++) s += g[k] * plane[y * w + x + k];
      rows[y * ow + x] = s;
    }
  }
  const out = new Float64Array(oh * ow);
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      let s = 0;
      for (let k = 0; k < n; k++) s += g[k] * rows[(y + k) * ow + x];
      out[y * ow + x] = s;
    }
  }
  return out;
}

function ssimOf(a, b, h, w) {
  const size = Math.min(11, h, w);
  const g = gaussian(size, (1.5 * size) / 11);
  const c1 = 0.01 ** 2, c2 = 0.03 ** 2;
  let total = 0;
  for (let c = 0; c < 3; c++) {
    const pa = new Float64Array(h * w), pb = new Float64Array(h * w);
    for (let i = 0; i < h * w; i++) {
      pa[i] = a[i * 3 + c] / 255;
      pb[i] = b[i * 3 + c] / 255;
    }
    const sq = (p, q) => p.map((v, i) => v * q[i]);
    const muA = filter(pa, h, w, g), muB = filter(pb, h, w, g);
    const aa = filter(sq(pa, pa), h, w, g), bb = filter(sq(pb, pb), h, w, g);
    const ab = filter(sq(pa, pb), h, w, g);
    let s = 0;
    for (let i = 0; i < muA.length; i++) {
      const varA = aa[i] - muA[i] ** 2, varB = bb[i] - muB[i] ** 2, cov = ab[i] - muA[i] * muB[i];
      s += ((2 * muA[i] * muB[i] + c1) * (2 * cov + c2)) /
           ((muA[i] ** 2 + muB[i] ** 2 + c1) * (varA + varB + c2));
    }
    total += s / muA.length;
  }
  return total / 3;
}

const groupPosition = (i) => (i === 0 ? 0 : ((i - 1) % 4) + 1);

function metrics(original, reconstruction) {
  const mse = [], psnr = [], ssim = [];
  for (let i = 0; i < original.t; i++) {
    const a = frameOf(reconstruction, i), b = frameOf(original, i);
    const m = mseOf(a, b);
    mse.push(m);
    psnr.push(psnrOfMse(m));
    ssim.push(ssimOf(a, b, original.h, original.w));
  }
  const positions = [];
  for (let p = 0; p < 5; p++) {
    const idx = mse.map((_, i) => i).filter((i) => groupPosition(i) === p);
    if (idx.length) positions.push({ position: p, psnr: psnrOfMse(mean(idx.map((i) => mse[i]))) });
  }
  return { psnr, ssim, meanPsnr: psnrOfMse(mean(mse)), meanSsim: mean(ssim), positions };
}

// -- drawing ---------------------------------------------------------------------------------

function drawFrame(canvas, video, i) {
  canvas.width = video.w;
  canvas.height = video.h;
  const image = new ImageData(video.w, video.h);
  const src = frameOf(video, i);
  for (let p = 0, q = 0; p < src.length; p += 3, q += 4) {
    image.data[q] = src[p];
    image.data[q + 1] = src[p + 1];
    image.data[q + 2] = src[p + 2];
    image.data[q + 3] = 255;
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

function show(i) {
  state.frame = i;
  drawFrame($("original"), state.original, i);
  drawFrame($("reconstruction"), state.reconstruction, i);
  $("seek").value = String(i);
  $("frame-label").textContent = `frame ${i + 1} / ${state.original.t}`;
  drawChart();
}

function axes(ctx, box, yMin, yMax, label) {
  ctx.strokeStyle = "#8a949e";
  ctx.fillStyle = "#5f6b76";
  ctx.font = "11px system-ui, sans-serif";
  ctx.beginPath();
  ctx.moveTo(box.x, box.y);
  ctx.lineTo(box.x, box.y + box.h);
  ctx.lineTo(box.x + box.w, box.y + box.h);
  ctx.stroke();
  for (let k = 0; k <= 4; k++) {
    const v = yMin + ((yMax - yMin) * k) / 4;
    const y = box.y + box.h - (box.h * k) / 4;
    ctx.fillText(v.toFixed(1), 4, y + 4);
  }
  ctx.fillText(label, box.x + 4, box.y - 6);
}

function drawChart() {
  const m = state.metrics;
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const box = { x: 44, y: 24, w: canvas.width - 100, h: canvas.height - 52 };
  const lo = Math.floor(Math.min(...m.psnr) - 1), hi = Math.ceil(Math.max(...m.psnr) + 1);
  axes(ctx, box, lo, hi, "PSNR (dB)");
  const n = m.psnr.length;
  const xOf = (i) => box.x + (n > 1 ? (box.w * i) / (n - 1) : box.w / 2);
  ctx.strokeStyle = "#e3e6e9";
  for (let i = 1; i < n; i += 4) {
    ctx.beginPath();
    ctx.moveTo(xOf(i), box.y);
    ctx.lineTo(xOf(i), box.y + box.h);
    ctx.stroke();
  }
  const line = (values, yOf, color) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(xOf(i), yOf(v)) : ctx.moveTo(xOf(i), yOf(v))));
    ctx.stroke();
    ctx.lineWidth = 1;
  };
  line(m.psnr, (v) => box.y + box.h - ((v - lo) / (hi - lo)) * box.h, "#1f6feb");
  line(m.ssim, (v) => box.y + box.h - v * box.h, "#d9480f");
  ctx.fillStyle = "#d9480f";
  for (let k = 0; k <= 4; k++) {
    ctx.fillText((k / 4).toFixed(2), box.x + box.w + 8, box.y + box.h - (box.h * k) / 4 + 4);
  }
  ctx.fillText("SSIM", box.x + box.w + 8, box.y - 6);
  ctx.fillStyle = "#1f6feb";
  ctx.fillText("— PSNR", box.x + box.w - 130, box.y - 6);
  ctx.fillStyle = "#d9480f";
  ctx.fillText("— SSIM", box.x + box.w - 70, box.y - 6);
  ctx.strokeStyle = "#1d232a";
  ctx.setLineDash([3, 3]);
  ctx.beginPath();
  ctx.moveTo(xOf(state.frame), box.y);
  ctx.lineTo(xOf(state.frame), box.y + box.h);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = "#5f6b76";
  ctx.fillText("frame", box.x + box.w / 2, canvas.height - 8);
}

function drawBars() {
  const m = state.metrics;
  const canvas = $("bars");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const box = { x: 44, y: 24, w: canvas.width - 60, h: canvas.height - 60 };
  const hi = Math.ceil(Math.max(...m.positions.map((p) => p.psnr)) / 5) * 5;
  axes(ctx, box, 0, hi, "PSNR (dB)");
  const names = ["frame 0", "pos 1 (key)", "pos 2", "pos 3", "pos 4"];
  const slot = box.w / 5;
  for (const p of m.positions) {
    const h = (p.psnr / hi) * box.h;
    const x = box.x + p.position * slot + slot * 0.15;
    ctx.fillStyle = p.position === 1 ? "#0b4fb3" : "#1f6feb";
    ctx.fillRect(x, box.y + box.h - h, slot * 0.7, h);
    ctx.fillStyle = "#1d232a";
    ctx.fillText(p.psnr.toFixed(2), x, box.y + box.h - h - 4);
    ctx.fillStyle = "#5f6b76";
    ctx.fillText(names[p.position], x - 2, box.y + box.h + 14);
  }
}

function play() {
  if (state.timer) {
    clearInterval(state.timer);
    state.timer = null;
    $("play").textContent = "play";
    return;
  }
  $("play").textContent = "pause";
  // One clock for both canvases: they cannot drift apart.
  state.timer = setInterval(() => show((state.frame + 1) % state.original.t),
                            1000 / state.original.fps);
}

const bytes = (n) => (n < 1 << 20 ? `${(n / 1024).toFixed(1)} kB` : `${(n / (1 << 20)).toFixed(2)} MB`);

async function run() {
  const file = $("file").files[0];
  if (!file) return;
  $("run").disabled = true;
  if (state.timer) play();
  try {
    const upload = () => {
      const form = new FormData();
      form.append("file", file, file.name);
      return form;
    };
    const model = $("model").value;
    setStatus(`encoding ${file.name} (${bytes(file.size)})…`);
    let start = performance.now();
    const encoded = await call(`encode${model ? `?model=${encodeURIComponent(model)}` : ""}`, upload());
    const latent = await encoded.arrayBuffer();
    const encodeMs = performance.now() - start;
    setStatus("decoding the latent…");
    start = performance.now();
    const decoded = await call("decode?format=frames", latent,
                               { "Content-Type": "application/octet-stream" });
    const reconstruction = parseFrames(await decoded.arrayBuffer());
    const decodeMs = performance.now() - start;
    setStatus("reading the original as the service decodes it…");
    const original = parseFrames(await (await call("frames", upload())).arrayBuffer());
    if (original.t !== reconstruction.t || original.h !== reconstruction.h ||
        original.w !== reconstruction.w) {
      throw new Error("the reconstruction and the original differ in size");
    }
    setStatus("computing PSNR and SSIM…");
    await new Promise((r) => setTimeout(r, 0));
    Object.assign(state, { original, reconstruction, metrics: metrics(original, reconstruction) });

    const m = state.metrics;
    $("psnr").textContent = m.meanPsnr.toFixed(2);
    $("ssim").textContent = m.meanSsim.toFixed(4);
    // The unrounded values, for whoever compares them with `ivvae eval` (the text is rounded).
    $("psnr").dataset.value = m.meanPsnr;
    $("ssim").dataset.value = m.meanSsim;
    $("latent-shape").textContent = (encoded.headers.get("X-Latent-Shape") || "").split(",").join(" × ");
    $("latent-size").textContent = `${bytes(latent.byteLength)} (input ${bytes(file.size)})`;
    $("video-size").textContent = `${original.t} frames ${original.w}×${original.h} at ${original.fps.toFixed(2)} fps`;
    $("model-name").textContent = encoded.headers.get("X-Model") || "";
    const cache = encoded.headers.get("X-Cache");
    $("encode-time").textContent = `${(encodeMs / 1000).toFixed(2)} s${cache === "hit" ? " (cached)" : ""}`;
    $("decode-time").textContent = `${(decodeMs / 1000).toFixed(2)} s`;
    if (state.latentUrl) URL.revokeObjectURL(state.latentUrl);
    state.latentUrl = URL.createObjectURL(new Blob([latent], { type: "application/octet-stream" }));
    const link = $("download");
    link.href = state.latentUrl;
    link.download = file.name.replace(/\.[^.]*$/, "") + ".latent.safetensors";
    $("seek").max = String(original.t - 1);
    $("result").hidden = false;
    drawBars();
    show(0);
    setStatus(`done: ${file.name}`);
    document.body.dataset.state = "done";
  } catch (err) {
    setStatus(String(err.message || err), true);
    document.body.dataset.state = "error";
  } finally {
    $("run").disabled = false;
  }
}

async function loadModels() {
  try {
    const response = await fetch("models", { headers: headers() });
    if (!response.ok) return;
    const body = await response.json();
    for (const m of body.models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name + (m.name === body.default ? " (default)" : "");
      $("model").append(option);
    }
  } catch (_) { /* the default model still works */ }
}

$("file").addEventListener("change", () => { $("run").disabled = !$("file").files.length; });
$("run").addEventListener("click", run);
$("play").addEventListener("click", play);
$("seek").addEventListener("input", () => show(Number($("seek").value)));
loadModels();
