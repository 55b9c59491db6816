// The nnserve console page: plain JavaScript, no build step, no third-party code.
"use strict";

// Fashion-MNIST class ids, as the models' manifests list them.
const CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
const STATUS_EVERY_MS = 5000;

const $ = (id) => document.getElementById(id);

// ---- errors and requests -------------------------------------------------------------------

function showError(panel, message) {
  const box = $(`${panel}-error`);
  box.textContent = message;
  box.hidden = !message;
  $(panel).dataset.state = message ? "error" : $(panel).dataset.state;
}

// The gateway answers errors as {"error": "..."}; anything else still becomes a sentence.
async function errorOf(response) {
  let text = "";
  try {
    const body = await response.clone().json();
    text = body.error || JSON.stringify(body);
  } catch {
    text = (await response.text()).slice(0, 300) || response.statusText;
  }
  return `HTTP ${response.status}: ${text}`;
}

async function request(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`cannot reach the console gateway (${err.message})`);
  }
  if (!response.ok) throw new Error(await errorOf(response));
  return response;
}

async function run(panel, work) {
  const card = $(panel);
  showError(panel, "");
  card.dataset.state = "busy";
  try {
    await work();
    card.dataset.state = "done";
  } catch (err) {
    showError(panel, err.message);
  }
}

function pct(p) {
  return `${(100 * p).toFixed(1)}%`;
}

// ---- status strip ------------------------------------------------------------------------

async function refreshStatus() {
  const strip = $("status");
  let body;
  try {
    body = await (await request("/api/status")).json();
  } catch (err) {
    strip.innerHTML = "";
    const pill = document.createElement("span");
    pill.className = "pill";
    pill.innerHTML = '<span class="dot"></span>';
    pill.append(err.message);
    strip.append(pill);
    return;
  }
  strip.innerHTML = "";
  for (const s of body.services) {
    const pill = document.createElement("span");
    pill.className = `pill ${s.health === "SERVING" ? "up" : "down"}`;
    pill.dataset.service = s.name;
    pill.dataset.health = s.health;
    pill.title = `${s.target}${s.error ? "\n" + s.error : ""}`;
    pill.innerHTML = '<span class="dot"></span>';
    pill.append(`${s.name} ${s.health}`);
    const models = document.createElement("span");
    models.className = "models";
    models.textContent = s.models.map((m) => `${m.name}/${m.version}${m.ready ? "" : " (not ready)"}`).join(", ");
    pill.append(models);
    if (s.error) {
      const why = document.createElement("span");
      why.className = "why";
      why.textContent = s.error.length > 80 ? s.error.slice(0, 80) + "…" : s.error;
      pill.append(why);
    }
    strip.append(pill);
  }
  const checked = document.createElement("span");
  checked.className = "checked muted";
  checked.textContent = `checked ${new Date(body.time * 1000).toLocaleTimeString()}`;
  strip.append(checked);
}

// ---- shared image helpers ------------------------------------------------------------------

async function exampleList() {
  try {
    return (await (await request("/api/examples")).json()).examples;
  } catch {
    return [];
  }
}

function fillExamples(panel, container, examples, onPick) {
  for (const ex of examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = ex.name;
    button.dataset.example = ex.name;
    const img = document.createElement("img");
    img.src = ex.url;
    img.alt = ex.name;
    button.append(img);
    button.addEventListener("click", async () => {
      container.querySelectorAll("button").forEach((b) => b.classList.toggle("chosen", b === button));
      let blob;
      try {
        blob = await (await request(ex.url)).blob();
      } catch (err) {
        showError(panel, `example ${ex.name}: ${err.message}`);
        return;
      }
      onPick(blob, ex.name);
    });
    container.append(button);
  }
}

function wireDrop(label, input, onFile) {
  input.addEventListener("change", () => input.files[0] && onFile(input.files[0], input.files[0].name));
  label.addEventListener("dragover", (e) => { e.preventDefault(); label.classList.add("over"); });
  label.addEventListener("dragleave", () => label.classList.remove("over"));
  label.addEventListener("drop", (e) => {
    e.preventDefault();
    label.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) onFile(file, file.name);
  });
}

// Freehand strokes on a canvas (mouse, pen or touch), drawn on every context in `contexts`.
function wirePainter(canvas, contexts, width) {
  let last = null;
  const point = (e) => {
    const r = canvas.getBoundingClientRect();
    return [((e.clientX - r.left) * canvas.width) / r.width, ((e.clientY - r.top) * canvas.height) / r.height];
  };
  const segment = (from, to) => {
    for (const ctx of contexts) {
      ctx.lineWidth = width;
      ctx.lineCap = "round";
      ctx.beginPath();
      ctx.moveTo(...from);
      ctx.lineTo(...to);
      ctx.stroke();
    }
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    segment(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = point(e);
    segment(last, p);
    last = p;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

const toBlob = (canvas) => new Promise((resolve) => canvas.toBlob(resolve, "image/png"));

// ---- classify ------------------------------------------------------------------------------

function classifyImage(blob) {
  return run("classify", async () => {
    const form = new FormData();
    form.append("image", blob, "image.png");
    form.append("top_k", "5");
    const body = await (await request("/api/classify", { method: "POST", body: form })).json();
    $("classify-input").src = URL.createObjectURL(blob);
    const bars = $("classify-bars");
    bars.innerHTML = "";
    for (const p of body.predictions) {
      const li = document.createElement("li");
      li.dataset.label = p.label;
      li.innerHTML = '<span class="label"></span><span class="track"><span class="fill"></span></span><span class="value"></span>';
      li.querySelector(".label").textContent = p.label;
      li.querySelector(".fill").style.width = pct(p.probability);
      li.querySelector(".value").textContent = pct(p.probability);
      bars.append(li);
    }
    const flag = body.out_of_distribution
      ? '<span class="flag alert">out of distribution</span>'
      : '<span class="flag ok">in distribution</span>';
    $("classify-ood").innerHTML = `OOD score <b>${body.ood_score.toFixed(2)}</b> ${flag}`;
    $("classify-model").textContent = `${body.model}/${body.version}`;
    $("classify-result").hidden = false;
    $("classify-empty").hidden = true;
  });
}

function setupClassify(examples) {
  const canvas = $("classify-canvas");
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  ctx.strokeStyle = "#fff";
  wirePainter(canvas, [ctx], 22);
  $("classify-clear").addEventListener("click", clear);
  $("classify-draw").addEventListener("click", async () => classifyImage(await toBlob(canvas)));
  wireDrop($("classify-drop"), $("classify-file"), (blob) => classifyImage(blob));
  fillExamples("classify", $("classify-examples"), examples, (blob) => classifyImage(blob));
}

// ---- restore -------------------------------------------------------------------------------

const restoreState = { image: null, painted: false };

function setupRestore(examples) {
  const imageCanvas = $("restore-image");
  const maskCanvas = $("restore-mask");
  const overlay = maskCanvas.getContext("2d");
  // What is sent: white strokes on black, the same square the service pads the image into.
  const mask = document.createElement("canvas");
  mask.width = maskCanvas.width;
  mask.height = maskCanvas.height;
  const maskCtx = mask.getContext("2d");
  const clearMask = () => {
    overlay.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
    maskCtx.fillStyle = "#000";
    maskCtx.fillRect(0, 0, mask.width, mask.height);
    restoreState.painted = false;
  };
  clearMask();
  overlay.strokeStyle = "rgba(255, 70, 70, 0.75)";
  maskCtx.strokeStyle = "#fff";
  wirePainter(maskCanvas, [overlay, maskCtx], 28);
  maskCanvas.addEventListener("pointerdown", () => { restoreState.painted = true; });
  $("restore-clear").addEventListener("click", clearMask);

  const noise = $("restore-noise");
  noise.addEventListener("input", () => { $("restore-noise-value").textContent = Number(noise.value).toFixed(2); });

  const choose = async (blob, name) => {
    let bitmap;
    try {
      bitmap = await createImageBitmap(blob);
    } catch {
      showError("restore", `${name}: the browser cannot read this file as an image`);
      return;
    }
    showError("restore", "");
    restoreState.image = blob;
    const ctx = imageCanvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, imageCanvas.width, imageCanvas.height);
    // Letterboxed like the service's pad-to-square, so the painted mask lands where it is drawn.
    const scale = Math.min(imageCanvas.width / bitmap.width, imageCanvas.height / bitmap.height);
    const w = bitmap.width * scale, h = bitmap.height * scale;
    ctx.drawImage(bitmap, (imageCanvas.width - w) / 2, (imageCanvas.height - h) / 2, w, h);
    clearMask();
  };
  wireDrop($("restore-drop"), $("restore-file"), choose);
  fillExamples("restore", $("restore-examples"), examples, choose);

  $("restore-run").addEventListener("click", () => run("restore", async () => {
    if (!restoreState.image) throw new Error("pick an image first (a file or one of the examples)");
    const form = new FormData();
    form.append("image", restoreState.image, "image.png");
    if (restoreState.painted) form.append("mask", await toBlob(mask), "mask.png");
    form.append("noise", noise.value);
    form.append("seed", $("restore-seed").value);
    const body = await (await request("/api/restore", { method: "POST", body: form })).json();
    $("restore-input").src = body.input;
    $("restore-damaged").src = body.damaged;
    $("restore-restored").src = body.restored;
    const flag = body.anomalous ? '<span class="flag alert">anomalous</span>' : '<span class="flag ok">typical</span>';
    $("restore-score").innerHTML = `anomaly score <b>${body.anomaly_score.toFixed(4)}</b> ${flag}`;
    const masked = body.masked_pixels ? `, ${body.masked_pixels} masked pixels` : "";
    $("restore-model").textContent = `${body.model}/${body.version} · noise σ ${body.noise.toFixed(2)}, seed ${body.seed}${masked}`;
    $("restore-result").hidden = false;
    $("restore-empty").hidden = true;
  }));
}

// ---- generate ------------------------------------------------------------------------------

const generateState = { id: null, controller: null };

function generateBody() {
  const value = (id) => $(id).value.trim();
  const body = { model: value("generate-model"), count: Number(value("generate-count")) };
  if (value("generate-label") !== "") body.label = Number(value("generate-label"));
  if (value("generate-seed") !== "") body.seed = Number(value("generate-seed"));
  if (body.model === "diffusion") {
    body.steps = Number(value("generate-steps"));
    body.guidance_scale = Number(value("generate-guidance"));
    body.preview_every = Number(value("generate-preview-every"));
  }
  return body;
}

function showGrid(result) {
  $("generate-grid").src = result.grid;
  const counts = {};
  for (const l of result.labels) counts[l] = (counts[l] || 0) + 1;
  const classes = Object.entries(counts).map(([l, n]) => `${n} × ${CLASSES[l] ?? l}`).join(", ");
  $("generate-summary").textContent = `${result.model}/${result.version}, seed ${result.seed}: ${classes}`;
  $("generate-result").hidden = false;
  $("generate-empty").hidden = true;
}

function showProgress(step, total) {
  const line = $("generate-progress");
  line.dataset.step = step;
  line.dataset.total = total;
  line.textContent = `step ${step} / ${total}`;
  $("generate-bar").max = total;
  $("generate-bar").value = step;
}

// Server-Sent Events over fetch (EventSource cannot POST, nor show an error's status and message).
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(event, JSON.parse(data));
    }
  }
}

async function generateStream(body) {
  const live = $("generate-live");
  const figure = $("generate-preview");
  live.hidden = false;
  figure.hidden = true;
  figure.dataset.previews = 0;
  $("generate-result").hidden = true;
  $("generate-progress").textContent = "starting…";
  $("generate-progress").dataset.step = 0;
  $("generate-bar").value = 0;
  generateState.controller = new AbortController();
  $("generate-stop").disabled = false;
  try {
    const response = await request("/api/generate/stream", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: generateState.controller.signal,
    });
    let failure = null;
    await readEvents(response, (event, data) => {
      if (event === "started") generateState.id = data.id;
      else if (event === "progress") {
        showProgress(data.step, data.total);
        if (data.preview) {
          $("generate-preview-img").src = data.preview;
          $("generate-preview-caption").textContent = `predicted x0 at step ${data.step}`;
          figure.dataset.previews = Number(figure.dataset.previews) + 1;
          figure.hidden = false;
        }
      } else if (event === "result") {
        figure.hidden = true; // the last preview is the result
        showGrid(data);
      }
      else if (event === "stopped") $("generate-progress").textContent += " · stopped";
      else if (event === "error") failure = data.error;
    });
    if (failure) throw new Error(failure);
  } catch (err) {
    if (err.name === "AbortError") $("generate-progress").textContent += " · stopped";
    else throw err;
  } finally {
    generateState.id = null;
    generateState.controller = null;
    $("generate-stop").disabled = true;
  }
}

function setupGenerate() {
  const select = $("generate-label");
  CLASSES.forEach((name, id) => select.add(new Option(`${id} ${name}`, String(id))));
  const model = $("generate-model");
  const toggle = () => document.querySelectorAll(".diffusion-only").forEach((el) => { el.hidden = model.value !== "diffusion"; });
  model.addEventListener("change", toggle);
  toggle();
  $("generate-run").addEventListener("click", () => run("generate", async () => {
    $("generate-run").disabled = true;
    $("generate-empty").hidden = true;
    try {
      const body = generateBody();
      if (body.model === "diffusion") await generateStream(body);
      else {
        $("generate-live").hidden = true;
        $("generate-preview").hidden = true;
        const result = await (await request("/api/generate", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body),
        })).json();
        showGrid(result);
      }
    } finally {
      $("generate-run").disabled = false;
    }
  }));
  // Stop cancels the call on the generate service: through the stop route once the stream has
  // its id, and by closing the connection in any case (the gateway cancels on disconnect too).
  $("generate-stop").addEventListener("click", async () => {
    $("generate-stop").disabled = true;
    const { id, controller } = generateState;
    if (id) {
      try {
        await request(`/api/generate/stop/${id}`, { method: "POST" });
        return;
      } catch {
        // finished meanwhile, or the gateway is gone: fall through and close the connection
      }
    }
    if (controller) controller.abort();
  });
}

// ---- start ---------------------------------------------------------------------------------

(async () => {
  setupGenerate();
  refreshStatus();
  setInterval(refreshStatus, STATUS_EVERY_MS);
  const examples = await exampleList();
  setupClassify(examples);
  setupRestore(examples);
})();
