// splitstems web page: plain DOM, fetch, XMLHttpRequest (upload progress), EventSource and
// <audio>; no framework, no build step, nothing fetched from other sites. Works in Chromium
// and Firefox (standard APIs only).
"use strict";

const state = { config: null, players: new Set(), serverNoticeDismissed: false };

function $(selector, root = document) { return root.querySelector(selector); }

function clock(seconds) {
  if (!Number.isFinite(seconds)) seconds = 0;
  const m = Math.floor(seconds / 60);
  const s = Math.floor(seconds % 60);
  return `${m}:${String(s).padStart(2, "0")}`;
}

function sizeText(bytes) {
  const units = ["bytes", "KB", "MB", "GB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return i === 0 ? `${bytes} bytes` : `${bytes.toFixed(1)} ${units[i]}`;
}

// ------------------------------------------------------------------ errors

// A failed song's alert, once dismissed, stays dismissed when the page is reloaded.
const DISMISSED = "splitstems-dismissed";

function dismissed() {
  try {
    return new Set(JSON.parse(sessionStorage.getItem(DISMISSED) || "[]"));
  } catch {
    return new Set();
  }
}

function showError(message, jobId = null) {
  if (jobId && dismissed().has(jobId)) return null;
  const box = document.createElement("div");
  box.setAttribute("role", "alert");
  const text = document.createElement("span");
  text.textContent = message;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "Dismiss";
  close.addEventListener("click", () => {
    box.remove();
    if (jobId) {
      const ids = dismissed().add(jobId);
      try { sessionStorage.setItem(DISMISSED, JSON.stringify([...ids])); } catch { /* private mode */ }
    }
  });
  box.append(text, close);
  $("#alerts").append(box);
  return box;
}

// The server stopped (or cannot be reached): one notice, until it answers again.
function serverReachable(reachable) {
  const notice = $("#server-gone");
  if (reachable) {
    if (notice) notice.remove();
    state.serverNoticeDismissed = false;
    return;
  }
  if (notice || state.serverNoticeDismissed) return;  // once, not again every 15 s
  const box = showError("The splitstems server has stopped or cannot be reached: the songs " +
    "below can no longer be played or downloaded. Start it again and reload this page.");
  box.id = "server-gone";
  $("button", box).addEventListener("click", () => { state.serverNoticeDismissed = true; });
  for (const card of document.querySelectorAll(".job[data-job]")) {
    markGone(card, "server stopped");
  }
}

// ------------------------------------------------------------------ set-up

async function loadConfig() {
  const response = await fetch("/api/config");
  if (!response.ok) throw new Error(`the server answered ${response.status}`);
  state.config = await response.json();
  const select = $("#model");
  const chosen = select.value;
  select.textContent = "";
  for (const model of state.config.models) {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = model.failed ? `${model.name} (not available on this server)`
      : model.local ? model.name : `${model.name} (downloads its weights)`;
    option.disabled = Boolean(model.failed);
    select.append(option);
  }
  // keep the user's choice across reloads of the list, else the server's default
  for (const name of [chosen, state.config.default_model]) {
    const option = [...select.options].find((o) => o.value === name && !o.disabled);
    if (option) { option.selected = true; break; }
  }
  $("#limit-hint").textContent =
    `Any audio or video file FFmpeg reads, up to ${state.config.max_upload_text}.`;
}

function setUpDrop() {
  const input = $("#files");
  const drop = $("#drop");
  input.addEventListener("change", () => {
    startAll(Array.from(input.files));
    input.value = "";
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    startAll(Array.from(event.dataTransfer.files));
  });
}

function startAll(files) {
  for (const file of files) upload(file);
}

// ------------------------------------------------------------------ jobs

function newCard(name) {
  const card = $("#job-template").content.firstElementChild.cloneNode(true);
  $(".job-name", card).textContent = name;
  $("#jobs").prepend(card);
  updateEmpty();
  return card;
}

function updateEmpty() {
  $("#empty").hidden = $("#jobs").children.length > 0;
}

// Remove a song's card; if the focus was in it, move it to the next song (or the previous
// one, or the file chooser) instead of letting it fall to the page.
function removeCard(card) {
  const next = card.nextElementSibling || card.previousElementSibling;
  const hadFocus = card.contains(document.activeElement);
  if (card.player) card.player.close();
  card.remove();
  updateEmpty();
  if (hadFocus) (next ? $(".job-name", next) : $("#files")).focus();
}

// A song the server no longer has (expired, removed elsewhere, server stopped).
function markGone(card, why) {
  if (card.dataset.gone) return;
  card.dataset.gone = why;
  card.classList.add("gone");
  if (card.events && why !== "server stopped") card.events.close();  // else it reconnects
  $(".job-state", card).textContent = why;
  $(".job-remove", card).textContent = "Remove";
  if (card.player) card.player.enable(false);
}

// The server answers again and still has this song (a network hiccup, not a stop).
function markBack(card, job) {
  delete card.dataset.gone;
  card.classList.remove("gone");
  render(job, card);
  if (card.player) card.player.enable(true);
}

function upload(file) {
  const limit = state.config ? state.config.max_upload : Infinity;
  if (file.size > limit) {
    showError(`${file.name}: ${sizeText(file.size)} is over this server's upload limit of ` +
      `${state.config.max_upload_text} (splitstems serve --max-upload)`);
    return;
  }
  const card = newCard(file.name);
  const params = new URLSearchParams({
    name: file.name,
    model: $("#model").value,
    mwf: $("#mwf").checked ? "1" : "0",
    fast: $("#fast").checked ? "1" : "0",
  });
  $(".job-model", card).textContent = $("#model").value;
  $(".job-state", card).textContent = "uploading";
  const request = new XMLHttpRequest();
  request.open("POST", `/api/jobs?${params}`);
  request.responseType = "json";
  request.upload.addEventListener("progress", (event) => {
    if (event.lengthComputable) $(".job-progress", card).value = event.loaded / event.total;
  });
  $(".job-remove", card).onclick = () => { request.abort(); removeCard(card); };
  request.addEventListener("load", () => {
    const body = request.response || {};
    if (request.status !== 201) {
      removeCard(card);
      showError(body.error || `${file.name}: the server answered ${request.status}`);
      return;
    }
    follow(body, card);
  });
  request.addEventListener("error", () => {
    removeCard(card);
    showError(`${file.name}: upload failed (the server could not be reached)`);
  });
  request.send(file);
}

function follow(job, card) {
  card.dataset.job = job.id;
  $(".job-name", card).textContent = job.name;  // the name as the server keeps it
  $(".job-progress", card).value = 0;
  const remove = $(".job-remove", card);
  remove.onclick = async () => {
    events.close();
    const gone = card.classList.contains("gone");
    removeCard(card);
    if (!gone) await fetch(`/api/jobs/${job.id}`, { method: "DELETE" });
  };
  const events = new EventSource(`/api/jobs/${job.id}/events`);
  card.events = events;
  events.onmessage = (message) => {
    const update = JSON.parse(message.data);
    render(update, card);
    if (["done", "failed", "cancelled"].includes(update.state)) events.close();
  };
  events.onerror = () => checkServer();  // stopped server, or a song removed elsewhere
  render(job, card);
}

function render(job, card) {
  card.className = `job ${job.state}` + (card.dataset.gone ? " gone" : "");
  const stateText = {
    queued: "waiting",
    running: `separating ${Math.round(job.progress * 100)}%`,
    done: "done",
    failed: "failed",
    cancelled: "cancelled",
  }[job.state] || job.state;
  $(".job-state", card).textContent = stateText;
  $(".job-progress", card).value = job.progress;
  $(".job-remove", card).textContent = job.state === "done" || job.state === "failed"
    ? "Remove" : "Cancel";
  if (job.state === "failed" && !card.dataset.reported) {
    card.dataset.reported = "1";
    $(".job-error", card).textContent = job.error || "";
    showError(job.error || `${job.name}: failed`, job.id);
    if (/ is not available on this server$/.test(job.error || "")) {
      loadConfig().catch(() => {});  // the list marks the model
    }
  }
  if (job.state === "done" && !card.player) card.player = new Player(job, card);
}

// ------------------------------------------------------------------ player

class Player {
  constructor(job, card) {
    this.job = job;
    this.card = card;
    this.root = $(".player", card);
    this.stems = [];
    this.duration = job.n_samples / job.sample_rate;
    const list = $(".stems", this.root);
    for (const stem of job.stems) this.stems.push(this.addStem(stem, list));
    this.master = this.stems[0].audio;
    this.play = $(".play", this.root);
    this.seek = $(".seek", this.root);
    this.seek.max = String(this.duration);
    this.play.addEventListener("click", () => this.toggle());
    this.seek.addEventListener("input", () => this.moveTo(Number(this.seek.value)));
    this.seek.addEventListener("keydown", (event) => this.seekKey(event));
    this.master.addEventListener("timeupdate", () => this.tick());
    this.master.addEventListener("ended", () => this.pause());
    this.master.addEventListener("error", () => checkServer());
    this.setUpDownloads();
    this.apply();
    this.tick();
    this.root.hidden = false;
    state.players.add(this);
  }

  addStem(stem, list) {
    const row = $("#stem-template").content.firstElementChild.cloneNode(true);
    const part = {
      name: stem.name, row, muted: false, solo: false, volume: 1,
      audio: $("audio", row), peaks: stem.peaks, canvas: $("canvas", row),
    };
    row.dataset.stem = stem.name;
    $(".stem-name", row).textContent = stem.name;
    part.audio.dataset.stem = stem.name;
    part.audio.src = stem.url;
    const link = $(".download", row);
    link.dataset.download = stem.name;
    link.textContent = "Download";
    link.setAttribute("aria-label", `Download ${stem.name}`);
    const mute = $(".mute", row);
    const solo = $(".solo", row);
    const volume = $(".volume", row);
    mute.setAttribute("aria-label", `Mute ${stem.name}`);
    solo.setAttribute("aria-label", `Solo ${stem.name}`);
    volume.setAttribute("aria-label", `Volume of ${stem.name}`);
    mute.addEventListener("click", () => { part.muted = !part.muted; this.apply(); });
    solo.addEventListener("click", () => { part.solo = !part.solo; this.apply(); });
    volume.addEventListener("input", () => { part.volume = Number(volume.value); this.apply(); });
    part.canvas.addEventListener("click", (event) => {
      const box = part.canvas.getBoundingClientRect();
      this.moveTo(((event.clientX - box.left) / box.width) * this.duration);
    });
    list.append(row);
    return part;
  }

  // Mute, solo and volume as the <audio> elements' own muted and volume.
  apply() {
    const anySolo = this.stems.some((p) => p.solo);
    for (const part of this.stems) {
      const audible = anySolo ? part.solo : !part.muted;
      part.audio.muted = !audible;
      part.audio.volume = part.volume;
      part.row.classList.toggle("silent", !audible);
      $(".mute", part.row).setAttribute("aria-pressed", String(part.muted));
      $(".solo", part.row).setAttribute("aria-pressed", String(part.solo));
    }
    this.updateLinks();
    this.draw();
  }

  gains() {
    const anySolo = this.stems.some((p) => p.solo);
    const gains = {};
    for (const part of this.stems) {
      const audible = anySolo ? part.solo : !part.muted;
      gains[part.name] = audible ? part.volume : 0;
    }
    return gains;
  }

  setUpDownloads() {
    const select = $(".codec", this.root);
    for (const codec of state.config.codecs) {
      const option = document.createElement("option");
      option.value = codec;
      option.textContent = codec.toUpperCase();
      select.append(option);
    }
    select.addEventListener("change", () => this.updateLinks());
    $(".zip", this.root).href = this.job.zip;
    $(".zip", this.root).setAttribute("download", "");
  }

  updateLinks() {
    if (this.disabled) return;
    const codec = $(".codec", this.root).value || "wav";
    for (const part of this.stems) {
      const link = $(".download", part.row);
      link.href = `/api/jobs/${this.job.id}/stems/${encodeURIComponent(part.name)}?codec=${codec}`;
      link.setAttribute("download", "");
    }
    const mix = $(".mix", this.root);
    mix.href = `${this.job.mix}?${new URLSearchParams({ codec, ...this.gains() })}`;
    mix.setAttribute("download", "");
  }

  async toggle() {
    if (this.master.paused) await this.start(); else this.pause();
  }

  async start() {
    for (const other of state.players) if (other !== this) other.pause();
    const at = this.master.ended ? 0 : this.master.currentTime;  // at the end: from the start
    for (const part of this.stems) part.audio.currentTime = at;
    try {
      await Promise.all(this.stems.map((p) => p.audio.play()));
    } catch (error) {
      this.pause();
      showError(`${this.job.name}: cannot play (${error.message})`);
      return;
    }
    this.play.innerHTML = "&#10074;&#10074; Pause";
    this.play.setAttribute("aria-label", "Pause");
    this.animate();
    checkServer();  // a song that expired while the page sat open is marked at once
  }

  // Arrows move 5 s, Page Up/Down 30 s (the slider's own step is 0.01 s, for dragging);
  // Home and End keep their native meaning.
  seekKey(event) {
    const jumps = { ArrowRight: 5, ArrowUp: 5, ArrowLeft: -5, ArrowDown: -5,
      PageUp: 30, PageDown: -30 };
    if (!(event.key in jumps) || event.altKey || event.ctrlKey || event.metaKey) return;
    event.preventDefault();
    this.moveTo(this.master.currentTime + jumps[event.key]);
  }

  // enable(false): the song's files are gone, nothing to play or download; enable(true):
  // they are back (the server answered again after a network hiccup).
  enable(on) {
    if (!on) this.pause();
    this.disabled = !on;
    for (const control of this.root.querySelectorAll("button, input, select")) {
      control.disabled = !on;
    }
    for (const link of this.root.querySelectorAll("a")) {
      if (on) {
        link.removeAttribute("aria-disabled");
      } else {
        link.removeAttribute("href");
        link.setAttribute("aria-disabled", "true");
      }
    }
    if (on) {
      $(".zip", this.root).href = this.job.zip;
      this.updateLinks();
    }
  }

  close() {
    this.pause();
    state.players.delete(this);
  }

  pause() {
    for (const part of this.stems) part.audio.pause();
    this.play.innerHTML = "&#9654; Play";
    this.play.setAttribute("aria-label", "Play");
  }

  moveTo(seconds) {
    const at = Math.max(0, Math.min(seconds, this.duration));
    for (const part of this.stems) part.audio.currentTime = at;
    this.tick();
  }

  // Keep the other stems within 60 ms of the first one.
  tick() {
    const now = this.master.currentTime;
    if (!this.master.paused) {
      for (const part of this.stems) {
        if (Math.abs(part.audio.currentTime - now) > 0.06) part.audio.currentTime = now;
      }
    }
    this.seek.value = String(now);
    this.seek.setAttribute("aria-valuetext", `${clock(now)} of ${clock(this.duration)}`);
    $(".time", this.root).textContent = `${clock(now)} / ${clock(this.duration)}`;
    this.draw();
  }

  animate() {
    if (this.master.paused) return;
    this.draw();
    requestAnimationFrame(() => this.animate());
  }

  draw() {
    const at = this.duration ? this.master.currentTime / this.duration : 0;
    const color = getComputedStyle(document.documentElement).getPropertyValue("--wave").trim();
    for (const part of this.stems) {
      const canvas = part.canvas;
      const context = canvas.getContext("2d");
      const { width, height } = canvas;
      context.clearRect(0, 0, width, height);
      const peaks = part.peaks;
      const step = width / Math.max(1, peaks.length);
      context.fillStyle = color || "#1d5fbf";
      for (let i = 0; i < peaks.length; i++) {
        const h = Math.max(1, peaks[i] * height);
        context.fillRect(i * step, (height - h) / 2, Math.max(1, step), h);
      }
      context.fillStyle = "#e63946";
      context.fillRect(Math.round(at * width), 0, 2, height);
    }
  }
}

// ------------------------------------------------------------------ server watch

// Ask the server which songs it still has: mark the cards of the others, or say that the
// server is gone. Runs every 15 s while the page is visible, when it comes back into view,
// on Play, and when an event stream or a player fails.
let checking = null;

function checkServer() {
  if (!checking) checking = checkNow().finally(() => { checking = null; });
  return checking;
}

async function checkNow() {
  let jobs;
  try {
    const response = await fetch("/api/jobs", { cache: "no-store" });
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    ({ jobs } = await response.json());
  } catch {
    serverReachable(false);
    return;
  }
  serverReachable(true);
  const known = new Map(jobs.map((job) => [job.id, job]));
  for (const card of document.querySelectorAll(".job[data-job]")) {
    const job = known.get(card.dataset.job);
    if (!job) markGone(card, "expired: no longer on the server");
    else if (card.dataset.gone === "server stopped") markBack(card, job);
  }
}

function watchServer() {
  setInterval(() => { if (document.visibilityState === "visible") checkServer(); }, 15000);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") checkServer();
  });
  window.addEventListener("focus", () => checkServer());
}

// ------------------------------------------------------------------ start

async function resume() {
  // Songs this server still has (after a reload of the page).
  const response = await fetch("/api/jobs");
  if (!response.ok) return;
  const { jobs } = await response.json();
  for (const job of jobs) {
    if (job.state === "cancelled") continue;
    const card = newCard(job.name);
    $(".job-model", card).textContent = job.model;
    follow(job, card);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  setUpDrop();
  try {
    await loadConfig();
    await resume();
    watchServer();
  } catch (error) {
    showError(`cannot reach the splitstems server (${error.message})`);
  }
});
