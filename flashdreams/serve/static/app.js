// fd-serve's page: one WebSocket = one session. Controls are built from the model's input specs
// (their "units"), never from a model's name. Frames are decoded in order, shown at the model's
// frame rate, and acknowledged when shown (the server steps a session only while its viewer keeps
// up). Every input carries a sequence number; every frame says which input its block saw, so the
// time from sending an input to showing the first frame that reflects it is the latency in the HUD.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const fixedSeed = params.has("seed") ? parseInt(params.get("seed"), 10) : null; // ?seed=N: a repeatable world
const $ = (id) => document.getElementById(id);
const canvas = $("video");
const ctx = canvas.getContext("2d");

const state = {
  ws: null, hello: null, started: false, running: false, seq: 0,
  queue: [],            // [{header, bitmap|null}] in arrival order
  sentAt: new Map(),    // seq -> performance.now() when sent
  latencies: [],        // input-to-present ms, in order measured
  presented: 0, presentTimes: [], lastBlockMs: null, nextDue: 0, lastIndex: -1,
  ended: null, busy: null, errors: [], captures: [], lastResetSeq: null, onBlockStart: [],
  saved: null, loaded: null, lastSaveSeq: null, lastLoadSeq: null,  // the server's saved/loaded answers
};
window.fdStats = state; // read by tests and curious people

function setStatus(text) { $("status").textContent = text; }
function logError(text) {
  state.errors.push(text);
  const el = $("log");
  el.textContent = (text + "\n" + el.textContent).slice(0, 4000);
}

function send(obj) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(obj));
}
function sendInput(name, value) {
  const seq = ++state.seq;
  state.sentAt.set(seq, performance.now());
  send({ t: "input", seq, name, value });
  return seq;
}
function sendSeq(msg) {
  const seq = ++state.seq;
  state.sentAt.set(seq, performance.now());
  send({ ...msg, seq });
  return seq;
}

// A nested array of `shape` whose last dimension is `row` in every position (keys held for every
// frame of the block, a slider's value on every frame).
function tile(shape, row) {
  if (shape.length === 1) return row.slice(0, shape[0]);
  return Array.from({ length: shape[0] }, () => tile(shape.slice(1), row));
}

// ---- controls from the specs ------------------------------------------------------------------
const builders = {
  keys(spec, box) {
    const K = spec.shape[spec.shape.length - 1];
    const labels = spec.labels.length === K ? spec.labels : Array.from({ length: K }, (_, i) => String(i + 1));
    const down = new Array(K).fill(0);
    const chips = labels.map((l) => {
      const c = document.createElement("span");
      c.className = "key"; c.textContent = l; box.appendChild(c); return c;
    });
    const keyIndex = (ev) => labels.findIndex((l) => l.toLowerCase() === ev.key.toLowerCase()
      || ("key" + l).toLowerCase() === ev.code.toLowerCase()
      || ({ up: "arrowup", down: "arrowdown", left: "arrowleft", right: "arrowright" })[l.toLowerCase()] === ev.key.toLowerCase());
    const update = (i, v, ev) => {
      if (i < 0 || !state.started) return;
      ev.preventDefault();
      if (down[i] === v) return;
      down[i] = v; chips[i].classList.toggle("down", v === 1);
      sendInput(spec.name, tile(spec.shape, down));
    };
    document.addEventListener("keydown", (ev) => update(keyIndex(ev), 1, ev));
    document.addEventListener("keyup", (ev) => update(keyIndex(ev), 0, ev));
    window.addEventListener("blur", () => down.forEach((v, i) => v && update(i, 0, { preventDefault() {} })));
    note(box, "hold the keys while the video plays");
  },
  mouse(spec, box) {
    // Pointer-lock deltas, summed while a block plays and sent as per-frame deltas when the next block
    // starts on screen (the server zeroes them after the block that used them).
    const K = spec.shape[spec.shape.length - 1];
    let dx = 0, dy = 0;
    const lab = spec.labels.map((l) => l.toLowerCase());
    const xi = lab.indexOf("yaw") >= 0 ? lab.indexOf("yaw") : (lab.indexOf("x") >= 0 ? lab.indexOf("x") : 0);
    const yi = lab.indexOf("pitch") >= 0 ? lab.indexOf("pitch") : (lab.indexOf("y") >= 0 ? lab.indexOf("y") : 1);
    const ySign = lab.indexOf("pitch") >= 0 ? -1 : 1; // pitch > 0 looks up: the pointer moving up
    const lo = spec.low ?? -Infinity, hi = spec.high ?? Infinity;
    const gain = Number.isFinite(hi) ? hi / 50 : 1; // 50 px of motion per frame reaches the spec's bound
    canvas.addEventListener("click", () => state.started && canvas.requestPointerLock && canvas.requestPointerLock());
    document.addEventListener("mousemove", (ev) => {
      if (document.pointerLockElement === canvas) { dx += ev.movementX; dy += ev.movementY; }
    });
    state.onBlockStart.push(() => {
      if (!state.started || (dx === 0 && dy === 0)) return;
      const F = spec.shape.length >= 3 ? spec.shape[1] : 1;
      const row = new Array(K).fill(0);
      row[xi] = Math.max(lo, Math.min(hi, (gain * dx) / F));
      row[yi] = Math.max(lo, Math.min(hi, (ySign * gain * dy) / F));
      dx = 0; dy = 0;
      sendInput(spec.name, tile(spec.shape, row));
    });
    note(box, "click the video to lock the pointer, move the mouse, Esc to release");
  },
  embedding(spec, box) {
    const text = document.createElement("input");
    text.type = "text"; text.placeholder = "a prompt";
    box.appendChild(text);
    if (state.hello.text_encoder) {
      text.addEventListener("change", () => state.started && sendSeq({ t: "prompt", text: text.value }));
    } else {
      text.disabled = true;
      note(box, "this server has no text encoder (fd-serve --text-encoder DIR enables the box)");
    }
    if (state.hello.stand_ins.includes(spec.name)) {
      const b = document.createElement("button");
      b.className = "secondary"; b.textContent = "new random prompt"; b.id = "standin-" + spec.name;
      b.addEventListener("click", () => state.started && sendSeq({ t: "stand_in", name: spec.name, seed: 1 + Math.floor(Math.random() * 1e9) }));
      box.appendChild(b);
      note(box, "a seeded stand-in embedding, as the built-in models use");
    }
  },
  camera(spec, box) {
    // 4x4 camera-to-world poses per frame (OpenCV axes: x right, y down, z forward): W/S move along
    // the view, A/D strafe, arrow keys turn. The page integrates a pose at the model's frame rate and
    // sends the next block's poses each time a block starts on screen, and whenever the keys change.
    const s = spec.shape;
    if (!(s.length >= 3 && s[s.length - 1] === 4 && s[s.length - 2] === 4)) return builders.sliders(spec, box);
    const F = s.length >= 4 ? s[s.length - 3] : 1;
    const held = new Set();
    const cam = { x: 0, y: 0, z: 0, yaw: 0, pitch: 0 };
    const speed = 1.0, turn = Math.PI / 4; // units and radians per second
    const keyMap = { w: "w", s: "s", a: "a", d: "d", arrowleft: "left", arrowright: "right", arrowup: "up", arrowdown: "down" };
    const step = (c, dt) => {
      const fwd = (held.has("w") - held.has("s")) * speed * dt, side = (held.has("d") - held.has("a")) * speed * dt;
      const yaw = c.yaw + (held.has("right") - held.has("left")) * turn * dt;
      const pitch = Math.max(-1.2, Math.min(1.2, c.pitch + (held.has("down") - held.has("up")) * turn * dt));
      return { x: c.x + fwd * Math.sin(yaw) + side * Math.cos(yaw), y: c.y, z: c.z + fwd * Math.cos(yaw) - side * Math.sin(yaw), yaw, pitch };
    };
    const matrix = (c) => {
      const cy = Math.cos(c.yaw), sy = Math.sin(c.yaw), cp = Math.cos(c.pitch), sp = Math.sin(c.pitch);
      // R = Ry(yaw) * Rx(pitch)
      return [[cy, sy * sp, sy * cp, c.x], [0, cp, -sp, c.y], [-sy, cy * sp, cy * cp, c.z], [0, 0, 0, 1]];
    };
    const sendPoses = () => {
      if (!state.started) return;
      const dt = 1 / state.hello.fps;
      const poses = [];
      let c = cam;
      for (let f = 0; f < F; f++) { poses.push(matrix(c)); c = step(c, dt); }
      Object.assign(cam, c);
      const value = s.length >= 4 ? Array.from({ length: s[0] }, () => poses) : Array.from({ length: s[0] }, () => poses[0]);
      sendInput(spec.name, value);
    };
    const onKey = (ev, down) => {
      const k = keyMap[ev.key.toLowerCase()];
      if (!k || !state.started) return;
      ev.preventDefault();
      if (down === held.has(k)) return;
      if (down) held.add(k); else held.delete(k);
      sendPoses();
    };
    document.addEventListener("keydown", (ev) => onKey(ev, true));
    document.addEventListener("keyup", (ev) => onKey(ev, false));
    state.onBlockStart.push(sendPoses);
    note(box, "W/S move, A/D strafe, arrow keys turn; the pose is sent for each block");
  },
  sliders(spec, box) {
    // camera, steering, throttle, ...: one slider per named column, held for every frame
    const K = spec.shape[spec.shape.length - 1];
    const labels = spec.labels.length === K ? spec.labels : Array.from({ length: K }, (_, i) => spec.name + "[" + i + "]");
    const lo = spec.low ?? -1, hi = spec.high ?? 1;
    const row = new Array(K).fill(Math.min(hi, Math.max(lo, 0)));
    labels.forEach((l, i) => {
      const lab = document.createElement("label"); lab.className = "slider"; lab.textContent = l + " ";
      const s = document.createElement("input");
      s.type = "range"; s.min = lo; s.max = hi; s.step = (hi - lo) / 200; s.value = row[i];
      s.addEventListener("input", () => { row[i] = parseFloat(s.value); if (state.started) sendInput(spec.name, tile(spec.shape, row)); });
      lab.appendChild(s); box.appendChild(lab);
    });
  },
};

function note(box, text) {
  const p = document.createElement("div"); p.className = "meaning"; p.textContent = text; box.appendChild(p);
}

function buildControls(specs) {
  const root = $("controls");
  root.textContent = "";
  for (const spec of specs) {
    const box = document.createElement("div");
    box.className = "control"; box.dataset.input = spec.name; box.dataset.units = spec.units;
    const h = document.createElement("h3");
    h.textContent = `${spec.name} (${spec.units || "no units"}) [${spec.shape.join(", ")}]`;
    box.appendChild(h);
    note(box, spec.meaning);
    const numel = spec.shape.reduce((a, b) => a * b, 1);
    const K = spec.shape[spec.shape.length - 1];
    if (builders[spec.units]) builders[spec.units](spec, box);
    else if (spec.when === "block" && numel <= 4096 && K <= 16 && spec.dtype.startsWith("float")) builders.sliders(spec, box);
    else note(box, "not settable from this page (use the Python client: flashdreams.client)");
    root.appendChild(box);
  }
}

// ---- the socket ------------------------------------------------------------------------------
function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/ws` + (token ? `?token=${encodeURIComponent(token)}` : ""));
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onText(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = (ev) => {
    state.started = false; state.running = false; buttons();
    if (!state.ended && !state.busy) setStatus(`disconnected (${ev.code})`);
  };
}

function onText(msg) {
  if (msg.t === "hello") {
    state.hello = msg;
    canvas.width = msg.width; canvas.height = msg.height;
    $("model").textContent = `${msg.model} · ${msg.width}×${msg.height} @ ${msg.fps} fps · ${msg.sessions}/${msg.max_sessions} sessions`;
    buildControls(msg.specs);
    setStatus("press Start");
  } else if (msg.t === "started") {
    state.started = true; state.running = true; state.session = msg.session;
    $("session").textContent = "session " + msg.session;
    setStatus("running"); buttons();
  } else if (msg.t === "busy") {
    state.busy = msg.message; setStatus("busy, try later: " + msg.message); state.ws.close();
  } else if (msg.t === "ended") {
    state.ended = msg.reason; setStatus("ended: " + msg.reason); state.ws.close();
  } else if (msg.t === "saved") {
    state.saved = msg; setStatus(`saved at block ${msg.block}`); buttons();
  } else if (msg.t === "loaded") {
    state.loaded = msg; setStatus(`back to block ${msg.block}`);
  } else if (msg.t === "error") {
    logError(`input ${msg.seq ?? "-"}: ${msg.message}`);
  }
}

function onFrame(buf) {
  const n = new DataView(buf).getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  const payload = new Uint8Array(buf, 4 + n);
  const entry = { header, bitmap: null };
  state.queue.push(entry);
  const enc = state.hello.encoding;
  if (enc === "raw") {
    const rgba = new Uint8ClampedArray(state.hello.width * state.hello.height * 4);
    for (let i = 0, j = 0; i < payload.length; i += 3, j += 4) {
      rgba[j] = payload[i]; rgba[j + 1] = payload[i + 1]; rgba[j + 2] = payload[i + 2]; rgba[j + 3] = 255;
    }
    entry.bitmap = new ImageData(rgba, state.hello.width, state.hello.height);
  } else {
    createImageBitmap(new Blob([payload], { type: "image/" + enc })).then((b) => { entry.bitmap = b; });
  }
}

// ---- playback: in order, at the model's frame rate; catch up when the queue grows --------------
function present(now) {
  const hello = state.hello;
  while (hello && state.queue.length && state.queue[0].bitmap && now >= state.nextDue) {
    const { header, bitmap } = state.queue.shift();
    if (bitmap instanceof ImageData) ctx.putImageData(bitmap, 0, 0); else { ctx.drawImage(bitmap, 0, 0); bitmap.close(); }
    const period = 1000 / hello.fps;
    // The server runs at most `window` frames ahead of what is shown, so more than that plus two blocks
    // waiting means playback fell behind (a hidden tab, a stall): show them without pacing to catch up.
    const behind = state.queue.length > hello.window + 2 * hello.frames_per_block;
    state.nextDue = behind ? now : Math.max(state.nextDue + period, now - period);
    state.presented++; state.lastIndex = header.index; state.lastBlockMs = header.block_ms;
    state.presentTimes.push(now);
    for (const [seq, t0] of state.sentAt) {
      if (seq > header.seq) break;
      state.latencies.push(now - t0); state.sentAt.delete(seq);
    }
    send({ t: "ack", index: header.index + 1 });
    capture(header);
    if (header.frame === 0) state.onBlockStart.forEach((f) => f());
    if (!behind) break;
  }
  hud(now);
  requestAnimationFrame(present);
}

function pct(arr, p) {
  if (!arr.length) return null;
  const s = [...arr].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))];
}

function hud(now) {
  while (state.presentTimes.length && state.presentTimes[0] < now - 1000) state.presentTimes.shift();
  state.fps = state.presentTimes.length;
  $("hud-fps").textContent = state.fps;
  $("hud-block").textContent = state.lastBlockMs == null ? "-" : state.lastBlockMs.toFixed(0);
  const recent = state.latencies.slice(-50);
  $("hud-latency").textContent = recent.length
    ? `${recent[recent.length - 1].toFixed(0)} (p50 ${pct(recent, 0.5).toFixed(0)})` : "-";
}

function buttons() {
  $("start").disabled = state.started && state.running;
  $("stop").disabled = !(state.started && state.running);
  $("reset").disabled = !state.started;
  $("save").disabled = !state.started || !(state.hello && state.hello.save_limit_bytes > 0);
  $("load").disabled = !(state.started && state.saved);
}

$("start").addEventListener("click", () => {
  if (!state.started) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) { state.ended = null; state.busy = null; connect(); }
    const go = () => send({ t: "start", seed: fixedSeed ?? Math.floor(Math.random() * 1e9) });
    if (state.ws.readyState === WebSocket.OPEN) go(); else state.ws.addEventListener("open", go, { once: true });
  } else { send({ t: "resume" }); state.running = true; setStatus("running"); buttons(); }
  canvas.focus();
});
$("stop").addEventListener("click", () => { send({ t: "pause" }); state.running = false; setStatus("stopped"); buttons(); });
$("reset").addEventListener("click", () => { state.lastResetSeq = sendSeq({ t: "reset" }); canvas.focus(); });
$("save").addEventListener("click", () => { state.lastSaveSeq = sendSeq({ t: "save" }); canvas.focus(); });
$("load").addEventListener("click", () => { state.lastLoadSeq = sendSeq({ t: "load" }); canvas.focus(); });

// Tests: resolve with the n-th presented frame whose block saw input `minSeq` or a later one.
window.fdCapture = (minSeq, n) => new Promise((resolve) => state.captures.push({ minSeq, n, resolve }));
function capture(header) {
  state.captures = state.captures.filter((c) => {
    if (header.seq < c.minSeq || --c.n > 0) return true;
    const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    c.resolve({ index: header.index, block: header.block, seq: header.seq, pixels: Array.from(d) });
    return false;
  });
}

// A checksum of what the canvas shows now (tests compare frames with it).
window.fdChecksum = () => {
  const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let h = 0;
  for (let i = 0; i < d.length; i += 7) h = (h * 31 + d[i]) >>> 0;
  return h;
};

connect();
requestAnimationFrame(present);
