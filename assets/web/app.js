// sd3-wgpu's page: submits a job to POST /jobs, follows its server-sent
// events (progress, then the profile) and draws where the time went.
"use strict";

const $ = (id) => document.getElementById(id);
let source = null;
let jobId = null;
let boxes = [];
let lastProfile = null;
let streamErrors = 0;

fetch("/health").then((r) => r.json()).then((h) => {
  const a = h.adapter || {};
  $("adapter").textContent = `${a.name} · ${a.backend} · ${a.activations} activations · ${h.variant}`;
}).catch(() => { $("adapter").textContent = "server unreachable"; });

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function numberField(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function jsonOf(r) {
  try {
    return await r.json();
  } catch (e) {
    return { error: { message: `HTTP ${r.status}: not JSON` } };
  }
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (source) source.close();
  const seed = numberField("seed");
  if (seed !== undefined && !Number.isSafeInteger(seed)) {
    status("the seed must be a whole number below 2^53 (or -1 for a random one)", true);
    return;
  }
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    width: numberField("width"),
    height: numberField("height"),
    steps: numberField("steps"),
    cfg_scale: numberField("cfg"),
    seed: numberField("seed"),
  };
  $("generate").disabled = true;
  $("progress").value = 0;
  status("queueing…");
  let r;
  try {
    r = await fetch("/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (e) {
    status(`the server did not answer: ${e}`, true);
    $("generate").disabled = false;
    return;
  }
  const j = await jsonOf(r);
  if (!r.ok) {
    status(j.error ? j.error.message : `HTTP ${r.status}`, true);
    $("generate").disabled = false;
    return;
  }
  jobId = j.id;
  $("cancel").disabled = false;
  follow(j.events_url);
});

$("cancel").addEventListener("click", () => {
  if (jobId) fetch(`/jobs/${jobId}`, { method: "DELETE" });
});

function finish() {
  if (source) source.close();
  source = null;
  $("generate").disabled = false;
  $("cancel").disabled = true;
}

function follow(url) {
  streamErrors = 0;
  source = new EventSource(url);
  source.onopen = () => { streamErrors = 0; };
  const on = (name, f) => source.addEventListener(name, (e) => f(JSON.parse(e.data)));
  on("queued", (d) => status(d.position > 0 ? `queued, ${d.position} ahead` : "queued"));
  on("started", () => status("started"));
  on("stage", (d) => status(`${d.stage}…`));
  on("progress", (d) => {
    $("progress").value = d.step / d.steps;
    status(`step ${d.step}/${d.steps} · ${d.it_per_s.toFixed(2)} it/s · ETA ${d.eta_s.toFixed(1)} s`);
  });
  on("profile", (d) => drawProfile(d));
  on("done", (d) => {
    $("progress").value = 1;
    $("image").src = `${d.images[0]}?t=${Date.now()}`;
    status(`done in ${d.wall_s.toFixed(2)} s · ${d.settings.width}×${d.settings.height}, ${d.settings.steps} steps, CFG ${d.settings.cfg_scale}`);
    finish();
  });
  on("failed", (d) => { status(`failed: ${d.error}`, true); finish(); });
  on("cancelled", () => { status("cancelled"); finish(); });
  source.onerror = () => {
    if (!source) return;
    streamErrors += 1;
    if (source.readyState === EventSource.CLOSED || streamErrors > 5) {
      status("lost the event stream; the job goes on on the server", true);
      finish();
    } else {
      status("reconnecting to the server…");
    }
  };
}

// Colours by name, stable across jobs.
function colour(name) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${h % 360}, 55%, 48%)`;
}

function setup(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  // The CSS height is the canvas's own height attribute, kept once.
  if (!canvas.dataset.height) canvas.dataset.height = canvas.getAttribute("height");
  const h = Number(canvas.dataset.height);
  canvas.style.height = `${h}px`;
  canvas.width = Math.round(w * ratio);
  canvas.height = Math.round(h * ratio);
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, w, h);
  g.font = "11px system-ui, sans-serif";
  g.textBaseline = "middle";
  return { g, w, h };
}

function bar(g, x, y, w, h, fill, text) {
  g.fillStyle = fill;
  g.fillRect(x, y, Math.max(w - 1, 0.5), h - 1);
  if (w > 40) {
    g.fillStyle = "#fff";
    g.save();
    g.beginPath();
    g.rect(x, y, w - 2, h);
    g.clip();
    g.fillText(text, x + 3, y + h / 2);
    g.restore();
  }
}

function drawProfile(p) {
  lastProfile = p;
  // Stages: wall-clock seconds of text, encode, load, denoise, decode.
  const st = setup($("stages"));
  const total = p.stages.reduce((s, x) => s + x.s, 0) || 1;
  let x = 0;
  for (const s of p.stages) {
    const w = (s.s / total) * st.w;
    bar(st.g, x, 4, w, 32, colour(s.name), `${s.name} ${s.s.toFixed(2)} s`);
    x += w;
  }
  $("stages").dataset.stages = p.stages.length;

  // One step: a flame chart — the ops in time order on the bottom row, and
  // above them the scopes of their labels (mmdit → block3 → x → attn …).
  const step = p.step;
  const chart = $("chart");
  const c = setup(chart);
  boxes = [];
  if (!step || !step.ops.length) {
    c.g.fillStyle = "#8d96a3";
    c.g.fillText("no per-op profile for this job", 8, 20);
    chart.dataset.ops = 0;
    return;
  }
  // Times: GPU timestamps where the adapter has them, else each op's share
  // of the step's wall clock by its counted FLOPs.
  const timed = step.ops.every((o) => o.ms !== null && o.start_ms !== null);
  let t = 0;
  const flops = step.ops.reduce((s, o) => s + o.flops, 0) || 1;
  const ops = step.ops.map((o) => {
    const dur = timed ? o.ms : (o.flops / flops) * step.wall_ms;
    const start = timed ? o.start_ms : t;
    t = start + dur;
    return { ...o, start, dur, parts: o.label.split(".") };
  });
  const end = Math.max(...ops.map((o) => o.start + o.dur)) || 1;
  const depth = Math.max(...ops.map((o) => o.parts.length));
  const rowH = Math.min(22, (c.h - 4) / depth);
  const sx = (ms) => (ms / end) * c.w;
  for (let d = 0; d < depth; d++) {
    let i = 0;
    while (i < ops.length) {
      const o = ops[i];
      if (o.parts.length <= d) { i++; continue; }
      const key = o.parts.slice(0, d + 1).join(".");
      let j = i;
      let stop = o.start + o.dur;
      while (j + 1 < ops.length && ops[j + 1].parts.length > d && ops[j + 1].parts.slice(0, d + 1).join(".") === key) {
        j++;
        stop = Math.max(stop, ops[j].start + ops[j].dur);
      }
      const leaf = d === o.parts.length - 1 && i === j;
      const name = leaf ? `${o.parts[d]} · ${o.kernel}` : o.parts[d];
      const box = { x: sx(o.start), y: 2 + d * rowH, w: sx(stop) - sx(o.start), h: rowH, label: key, kernel: leaf ? o.kernel : "", ms: stop - o.start };
      bar(c.g, box.x, box.y, box.w, box.h, colour(leaf ? o.kernel : o.parts[d]), name);
      boxes.push(box);
      i = j + 1;
    }
  }
  chart.dataset.ops = ops.length;
  $("chart-title").textContent = `One denoising step, op by op (${timed ? "GPU timestamps" : "no timestamps: shares of the wall clock by FLOPs"}): ${ops.length} ops, ${step.gpu_ms.toFixed(2)} ms`;

  const rows = step.kernels.slice().sort((a, b) => b.ms - a.ms).slice(0, 10);
  $("kernels").innerHTML = "";
  for (const k of rows) {
    const tr = document.createElement("tr");
    for (const [v, cls] of [[k.kernel, ""], [`${k.ms.toFixed(2)} ms`, "num"], [`${k.ops}×`, "num"]]) {
      const td = document.createElement("td");
      td.textContent = v;
      td.className = cls;
      tr.appendChild(td);
    }
    $("kernels").appendChild(tr);
  }
}

$("chart").addEventListener("mousemove", (e) => {
  const r = $("chart").getBoundingClientRect();
  const x = e.clientX - r.left;
  const y = e.clientY - r.top;
  const hit = boxes.find((b) => x >= b.x && x < b.x + b.w && y >= b.y && y < b.y + b.h);
  const tip = $("tip");
  if (!hit) { tip.style.display = "none"; return; }
  tip.textContent = `${hit.label}${hit.kernel ? "\n" + hit.kernel : ""}\n${hit.ms.toFixed(3)} ms`;
  tip.style.left = `${e.clientX + 12}px`;
  tip.style.top = `${e.clientY + 12}px`;
  tip.style.display = "block";
});
$("chart").addEventListener("mouseleave", () => { $("tip").style.display = "none"; });

// Redraw at the new size (and device pixel ratio) when the layout changes.
new ResizeObserver(() => { if (lastProfile) drawProfile(lastProfile); }).observe($("chart"));
