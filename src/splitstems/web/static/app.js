// splitstems web page: plain DOM, fetch, XMLHttpRequest (upload progress), EventSource and
// <audio>; no framework, no build step, nothing fetched from other sites. Works in Chromium
// and Firefox (standard APIs only).
"use strict";

const state = { config: null, players: new Set() };

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

function showError(message) {
  const box = document.createElement("div");
  box.setAttribute("role", "alert");
  const text = document.createElement("span");
  text.textContent = message;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "Dismiss";
  close.addEventListener("click", () => box.remove());
  box.append(text, close);
  $("#alerts").append(box);
}

// ------------------------------------------------------------------ set-up

async function loadConfig() {
  const response = await fetch("/api/config");
  if (!response.ok) throw new Error(`the server answered ${response.status}`);
  state.config = await response.json();
  const select = $("#model");
  select.textContent = "";
  for (const model of state.config.models) {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = model.local ? model.name : `${model.name} (downloads its weights)`;
    option.selected = model.name === state.config.default_model;
    select.append(option);
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
  $("#empty").hidden = true;
  return card;
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
  $(".job-remove", card).onclick = () => { request.abort(); card.remove(); };
  request.addEventListener("load", () => {
    const body = request.response || {};
    if (request.status !== 201) {
      card.remove();
      showError(body.error || `${file.name}: the server answered ${request.status}`);
      return;
    }
    follow(body, card);
  });
  request.addEventListener("error", () => {
    card.remove();
    showError(`${file.name}: upload failed (the server could not be reached)`);
  });
  request.send(file);
}

function follow(job, card) {
  card.dataset.job = job.id;
  $(".job-progress", card).value = 0;
  const remove = $(".job-remove", card);
  remove.onclick = async () => {
    events.close();
    card.remove();
    if (!$("#jobs").children.length) $("#empty").hidden = false;
    await fetch(`/api/jobs/${job.id}`, { method: "DELETE" });
  };
  const events = new EventSource(`/api/jobs/${job.id}/events`);
  events.onmessage = (message) => {
    const update = JSON.parse(message.data);
    render(update, card);
    if (["done", "failed", "cancelled"].includes(update.state)) events.close();
  };
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED) {
      showError(`${job.name}: lost contact with the server`);
    }
  };
  render(job, card);
}

function render(job, card) {
  card.className = `job ${job.state}`;
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
    showError(job.error || `${job.name}: failed`);
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
    this.master.addEventListener("timeupdate", () => this.tick());
    this.master.addEventListener("ended", () => this.pause());
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
  } catch (error) {
    showError(`cannot reach the splitstems server (${error.message})`);
  }
});
