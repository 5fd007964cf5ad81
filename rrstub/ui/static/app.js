// rrstub ui: the page that browses a recording.
//
// Everything shown comes from the JSON API of rrstub/ui/server.py.  The page
// keeps one "current position" (S.pos, in instructions, mirrored in the URL)
// and shows the state of one position in its panels (S.shown): the current
// one, or, while the timeline is dragged, the previewed one.  Every state
// request bumps a generation number; an answer is shown only if it belongs to
// the newest request, so a late answer never overwrites newer panels.

import { Terminal } from './term.js';

const $ = (id) => document.getElementById(id);
const ui = {};
for (const id of [
  'recordings', 'rec-info', 'error', 'timeline', 'cursor', 'hover', 'hover-label', 'played',
  'scale', 'end-note', 'position', 'guest-time', 'symbol', 'end-text', 'preview-note',
  'play', 'speed', 'step-back', 'step-fwd', 'prev-marker', 'next-marker', 'goto-pos', 'goto',
  'pace', 'progress', 'console', 'console-status', 'registers', 'disasm', 'backtrace',
  'marker-name', 'add-marker', 'marker-status', 'crop-from', 'crop-to', 'crop-output', 'crop',
  'crop-status', 'go-live', 'live-output', 'live-panel', 'live-console', 'live-input',
  'live-stop', 'live-status', 'tree',
]) {
  ui[id.replace(/-(.)/g, (_, c) => c.toUpperCase())] = $(id);
}
const body = document.body;

// One id per page load: the server cancels this client's older state request
// when a newer one arrives.
const client = (crypto.randomUUID && crypto.randomUUID()) || fallbackUuid();

function fallbackUuid() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

const S = {
  recs: [],
  rec: null,            // id of the recording shown
  recGen: 0,            // bumps at every switch: answers about the previous recording are dropped
  info: null,
  resolved: new Map(),  // "mK" -> position found by /resolve (fast recordings)
  pos: null,            // the current position
  shown: null,          // the state the panels show
  range: null,          // {lo, hi, counted}: the instructions the timeline spans
  infoFailed: false,    // the recording's info answered an error (a damaged recording)
};

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
    this.superseded = status === 409 && message === 'superseded';
  }
}

async function api(path, { method = 'GET', body: payload, signal } = {}) {
  const opts = { method, signal };
  if (payload !== undefined) {
    opts.headers = { 'Content-Type': 'application/json' };
    opts.body = JSON.stringify(payload);
  }
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(`cannot reach the rrstub ui server (${e.message})`, 0);
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!res.ok) {
    const msg = data && typeof data.error === 'string' ? data.error
      : `${res.status} ${res.statusText}${text ? ': ' + text.slice(0, 300) : ''}`;
    throw new ApiError(msg, res.status);
  }
  if (data === null || typeof data !== 'object') {
    throw new ApiError(`${method} ${path}: the answer is not JSON`, res.status);
  }
  return data;
}

const recUrl = (rest = '') => `/api/rec/${encodeURIComponent(S.rec)}${rest}`;

// ---------------------------------------------------------------- errors, busy

function showError(err) {
  if (!err || err.name === 'AbortError' || err.superseded) return;
  ui.error.textContent = err instanceof Error ? err.message : String(err);
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = '';
  ui.error.hidden = true;
}

// data-busy goes to "1" at once and back to "0" only after the current task:
// a request that chains the next one never shows a moment of idleness.
let busyCount = 0;
let busyTimer = 0;

function busyInc() {
  busyCount++;
  body.dataset.busy = '1';
}

function busyDec() {
  busyCount = Math.max(0, busyCount - 1);
  if (!busyTimer) {
    busyTimer = setTimeout(() => {
      busyTimer = 0;
      if (busyCount === 0) body.dataset.busy = '0';
    }, 0);
  }
}

async function track(promise) {
  busyInc();
  try { return await promise; } finally { busyDec(); }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// #progress: polled while a slow request runs (a seek, a marker resolve).
const progress = {
  active: new Set(),
  timer: 0,
  polling: false,
  last: null,
  start(label = '') {
    const tok = { label };
    this.active.add(tok);
    if (!this.timer && !this.polling) this.timer = setTimeout(() => this.poll(), 300);
    this.render();
    return () => {
      this.active.delete(tok);
      if (!this.active.size) {
        clearTimeout(this.timer);
        this.timer = 0;
        this.last = null;
      }
      this.render();
    };
  },
  async poll() {
    this.timer = 0;
    if (!this.active.size || !S.rec) return;
    this.polling = true;
    try {
      this.last = await api(recUrl(`/progress?client=${client}`));
    } catch (e) {
      this.last = null;
      showError(e);
    }
    this.polling = false;
    if (this.active.size) {
      this.render();
      this.timer = setTimeout(() => this.poll(), 250);
    }
  },
  render() {
    if (!this.active.size) { ui.progress.textContent = ''; return; }
    const p = this.last;
    if (p && p.busy) {
      ui.progress.textContent = `seeking: at ${p.at} of ${p.target}`;
    } else {
      ui.progress.textContent = [...this.active].map((t) => t.label).filter(Boolean).pop() || '';
    }
  },
};

// ---------------------------------------------------------------- state requests

let stateGen = 0;
let stateAbort = null;      // the newest state request while it is in flight

// Ask for the state at pos; the answer ({st, ms}) or null when it was
// superseded by a newer request, aborted, or failed (the error is shown).
async function fetchState(pos, quick) {
  const gen = ++stateGen;
  if (stateAbort) stateAbort.abort();
  const ac = new AbortController();
  stateAbort = ac;
  const rec = S.rec;
  busyInc();
  const stopProgress = quick ? null : progress.start();
  updatePreviewNote();
  const t0 = performance.now();
  try {
    const st = await api(
      `/api/rec/${encodeURIComponent(rec)}/state?pos=${pos}&client=${client}${quick ? '&quick=1' : ''}`,
      { signal: ac.signal });
    if (gen !== stateGen) return null;
    return { st, ms: performance.now() - t0 };
  } catch (e) {
    if (gen === stateGen) showError(e);
    return null;
  } finally {
    if (stateAbort === ac) stateAbort = null;
    if (stopProgress) stopProgress();
    busyDec();
    if (gen === stateGen) updatePreviewNote();
  }
}

function invalidateState() {
  stateGen++;
  if (stateAbort) { stateAbort.abort(); stateAbort = null; }
}

function clampPos(p) {
  const info = S.info;
  p = Math.round(Number(p));
  if (!Number.isFinite(p)) p = info.first;
  if (p < info.first) p = info.first;
  if (info.last != null && p > info.last) p = info.last;
  return p;
}

// Bumps at every move the user or playback makes: a slow marker resolve
// does not jump there once the user has gone elsewhere.
let navGen = 0;

// Make pos the current position and show its state (quick=0).
async function seek(pos, { fromPlay = false } = {}) {
  if (!S.info) return null;
  navGen++;
  if (!fromPlay) stopPlay();
  cancelSettle();
  settle.tries = 0;
  S.pos = clampPos(pos);
  drawCursor();
  updateUrl();
  const r = await fetchState(S.pos, false);
  if (r) {
    showState(r.st, true);
    if (!fromPlay) scheduleSettle(r.st);
  }
  return r;
}

// A state whose console is not complete yet is asked for again, a little
// later each time, until it is (the page sits still meanwhile).
let settle = { timer: 0, tries: 0 };

function cancelSettle() {
  clearTimeout(settle.timer);
  settle.timer = 0;
}

function scheduleSettle(st) {
  if (!st.console || st.console.complete !== false) { settle.tries = 0; return; }
  if (settle.tries >= 30) return;
  const delay = Math.min(3000, 400 * 1.4 ** settle.tries);
  settle.tries++;
  settle.timer = setTimeout(async () => {
    settle.timer = 0;
    if (S.shown !== st || play.on || drag.active) return;
    const r = await fetchState(S.pos, false);
    if (r) { showState(r.st, true); scheduleSettle(r.st); }
  }, delay);
}

function step(delta) {
  if (!S.info || S.pos == null) return;
  clearError();
  seek(S.pos + delta);
}

// ---------------------------------------------------------------- showing a state

const consoleView = { raw: null, term: null };
let prevRegs = new Map();

function showState(st, committed) {
  const prev = S.shown;
  S.shown = st;
  if (committed && (st.exact || st.at_end) && st.position !== S.pos) {
    S.pos = st.position;
    updateUrl();
  }
  const complete = !st.console || st.console.complete !== false;
  body.dataset.position = String(st.position);
  body.dataset.exact = st.exact && complete && (st.position === st.requested || st.at_end) ? '1' : '0';
  if (S.info) body.dataset.ready = '1';

  const last = S.info && S.info.last != null ? S.info.last : '?';
  ui.position.textContent = `instruction ${st.position} of ${last}`;
  ui.guestTime.textContent = `guest time ${(st.guest_ns / 1e9).toFixed(6)} s`;
  ui.symbol.textContent = st.symbol || '';
  ui.endText.textContent = st.at_end && st.end_text ? st.end_text : '';

  renderConsole(st.console ? st.console.text : '');
  if (!st.console) ui.consoleStatus.textContent = '';
  else if (st.console.complete === false) {
    ui.consoleStatus.textContent = `console read up to instruction ${st.console.known_to} ...`;
  } else {
    ui.consoleStatus.textContent = `console at instruction ${st.position}`;
  }
  ui.consoleStatus.classList.toggle('partial', st.console && st.console.complete === false);

  renderRegisters(st.registers || [], prev);
  renderDisasm(st.disassembly || []);
  renderBacktrace(st.backtrace || []);

  const r = computeRange();
  if (!S.range || r.hi !== S.range.hi || r.lo !== S.range.lo) renderTimeline();
  else drawCursor();
  updatePreviewNote();
}

function updatePreviewNote() {
  const st = S.shown;
  const target = drag.active && drag.pos != null ? drag.pos : S.pos;
  if (st && stateAbort && target != null && (!st.exact || st.position !== target)) {
    ui.previewNote.textContent = `showing marker state at ${st.position}, refining to ${target}…`;
  } else {
    ui.previewNote.textContent = '';
  }
}

function renderConsole(text) {
  const v = consoleView;
  if (v.raw !== null && text === v.raw) return;
  if (v.raw !== null && text.startsWith(v.raw)) v.term.feed(text.slice(v.raw.length));
  else v.term = new Terminal().feed(text);
  v.raw = text;
  ui.console.textContent = v.term.text();
  ui.console.scrollTop = ui.console.scrollHeight;
}

function renderRegisters(regs, prev) {
  const rows = [];
  const now = new Map();
  for (const [name, value] of regs) {
    now.set(name, value);
    const tr = document.createElement('tr');
    const n = document.createElement('td');
    const v = document.createElement('td');
    n.className = 'reg-name';
    v.className = 'reg-value';
    n.textContent = name;
    v.textContent = value;
    if (prev && prevRegs.has(name) && prevRegs.get(name) !== value) tr.className = 'changed';
    tr.append(n, v);
    rows.push(tr);
  }
  prevRegs = now;
  ui.registers.replaceChildren(...rows);
}

function span(cls, text) {
  const s = document.createElement('span');
  s.className = cls;
  s.textContent = text;
  return s;
}

function renderDisasm(lines) {
  let current = null;
  const rows = lines.map((d) => {
    const row = document.createElement('div');
    row.className = d.current ? 'row current' : 'row';
    row.append(span('addr', d.address), span('sym', d.symbol || ''), span('bytes', d.bytes || ''),
      span('insn', d.text));
    row.title = `${d.address}${d.symbol ? ' <' + d.symbol + '>' : ''}  ${d.bytes || ''}  ${d.text}`;
    if (d.current) current = row;
    return row;
  });
  ui.disasm.replaceChildren(...rows);
  if (current) {
    ui.disasm.scrollTop = current.offsetTop - ui.disasm.clientHeight / 2 + current.offsetHeight / 2;
  }
}

function renderBacktrace(frames) {
  const rows = frames.map((f, i) => {
    const row = document.createElement('div');
    row.className = 'row';
    row.append(span('frame', `#${i}`), span('addr', f.address), span('sym', f.symbol || '??'));
    return row;
  });
  ui.backtrace.replaceChildren(...rows);
}

function clearPanels() {
  S.shown = null;
  consoleView.raw = null;
  prevRegs = new Map();
  for (const k of ['console', 'consoleStatus', 'position', 'guestTime', 'symbol', 'endText',
    'previewNote', 'pace', 'recInfo', 'endNote', 'markerStatus']) ui[k].textContent = '';
  ui.registers.replaceChildren();
  ui.disasm.replaceChildren();
  ui.backtrace.replaceChildren();
  ui.scale.replaceChildren();
  for (const t of ui.timeline.querySelectorAll('.tick')) t.remove();
  ui.cursor.hidden = true;
  ui.played.style.width = '0';
  ui.cropFrom.replaceChildren();
  ui.cropTo.replaceChildren();
  delete body.dataset.position;
  body.dataset.exact = '0';
}

// ---------------------------------------------------------------- timeline

// Markers and labels, with the position of each (null: not known yet).
function tickList() {
  const out = [];
  if (!S.info) return out;
  for (const m of S.info.markers || []) {
    const key = `m${m.index}`;
    const pos = m.position != null ? m.position : (S.resolved.has(key) ? S.resolved.get(key) : null);
    out.push({ kind: 'marker', key, name: m.name || key, pos, guest_s: m.guest_s, origin: m.origin });
  }
  for (const l of S.info.labels || []) {
    out.push({ kind: 'label', key: l.name, name: l.name, pos: l.position, guest_s: null });
  }
  return out;
}

function computeRange() {
  const info = S.info;
  const lo = info.first;
  if (info.last != null) return { lo, hi: Math.max(info.last, lo + 1), counted: true };
  // Fast recording whose end is not counted yet: the largest known position + 10%.
  let known = lo;
  for (const t of tickList()) if (t.pos != null && t.pos > known) known = t.pos;
  if (S.pos != null && S.pos > known) known = S.pos;
  let hi = lo + (known - lo) * 1.1;
  if (hi <= lo + 1) {
    const maxGuest = Math.max(0, ...(info.markers || []).map((m) => m.guest_s || 0));
    hi = lo + (info.instructions_per_guest_s && maxGuest ? info.instructions_per_guest_s * maxGuest * 1.1 : 1e6);
  }
  return { lo, hi: Math.ceil(hi), counted: false };
}

const frac = (pos) => {
  const { lo, hi } = S.range;
  return Math.min(1, Math.max(0, (pos - lo) / (hi - lo)));
};
const pct = (pos) => `${(frac(pos) * 100).toFixed(4)}%`;

// Where to draw the ticks of markers whose position is not known: spread by
// guest time over the part of the bar after the last known position.
function placeUnknown(ticks) {
  const unknown = ticks.filter((t) => t.pos == null);
  if (!unknown.length) return new Map();
  const known = ticks.filter((t) => t.pos != null);
  const kpos = Math.max(S.range.lo, ...known.map((t) => t.pos));
  const kg = Math.max(0, ...known.filter((t) => t.guest_s != null).map((t) => t.guest_s));
  const gmax = Math.max(...unknown.map((t) => t.guest_s || 0));
  const out = new Map();
  const from = kpos + (S.range.hi - kpos) * 0.1;
  const to = S.range.hi - (S.range.hi - kpos) * 0.05;
  unknown.forEach((t, i) => {
    const f = gmax > kg ? ((t.guest_s || 0) - kg) / (gmax - kg) : (i + 1) / (unknown.length + 1);
    out.set(t.key, from + (to - from) * Math.min(1, Math.max(0, f)));
  });
  return out;
}

function renderTimeline() {
  if (!S.info) return;
  S.range = computeRange();
  for (const t of ui.timeline.querySelectorAll('.tick')) t.remove();
  const ticks = tickList();
  const guessed = placeUnknown(ticks);
  const width = ui.timeline.clientWidth || 1000;
  const frag = document.createDocumentFragment();
  const lastText = { marker: -1e9, label: -1e9 };
  const sorted = ticks.map((t) => ({ t, at: t.pos != null ? t.pos : guessed.get(t.key) }))
    .sort((a, b) => a.at - b.at);
  for (const { t, at } of sorted) {
    const d = document.createElement('div');
    d.className = `tick ${t.kind}${t.pos == null ? ' unresolved' : ''}`;
    d.dataset.position = t.pos != null ? String(t.pos) : '';
    d.dataset.key = t.key;
    if (t.guest_s != null) d.dataset.guestS = String(t.guest_s);
    d.title = t.name;
    d.textContent = t.name;
    d.style.left = pct(at);
    if (frac(at) > 0.85) d.classList.add('flip');   // name to the left of the line
    // names that would overlap the previous one of their kind are drawn faint
    const x = frac(at) * width;
    if (x - lastText[t.kind] < 6 + 6 * t.name.length) d.classList.add('crowded');
    else lastText[t.kind] = x;
    frag.append(d);
  }
  ui.timeline.append(frag);
  renderScale(ticks, guessed, width);
  ui.endNote.textContent = S.range.counted ? '' : 'end not yet counted';
  drawCursor();
}

function renderScale(ticks, guessed, width) {
  const { lo, hi, counted } = S.range;
  const items = [];
  const a = span('scale-end scale-first', String(lo));
  const b = span('scale-end scale-last', counted ? String(hi) : `~${hi}`);
  items.push(a, b);
  let lastX = 60;       // keep clear of the first number
  const markers = ticks.filter((t) => t.kind === 'marker' && t.guest_s != null)
    .map((t) => ({ t, at: t.pos != null ? t.pos : guessed.get(t.key) }))
    .sort((x, y) => x.at - y.at);
  for (const { t, at } of markers) {
    const x = frac(at) * width;
    if (x - lastX < 56 || x > width - 70) continue;
    lastX = x;
    const s = span('scale-time', `${t.guest_s.toFixed(3)} s`);
    s.style.left = pct(at);
    s.title = `${t.name}: guest time ${t.guest_s} s`;
    items.push(s);
  }
  ui.scale.replaceChildren(...items);
}

function drawCursor() {
  if (!S.info || !S.range || S.pos == null) { ui.cursor.hidden = true; return; }
  ui.cursor.hidden = false;
  ui.cursor.style.left = pct(S.pos);
  ui.played.style.width = pct(S.pos);
  ui.cursor.title = `current position: instruction ${S.pos}`;
}

function posAt(clientX) {
  const r = ui.timeline.getBoundingClientRect();
  const f = Math.min(1, Math.max(0, (clientX - r.left) / r.width));
  return clampPos(S.range.lo + f * (S.range.hi - S.range.lo));
}

function showHover(pos) {
  ui.hover.hidden = false;
  ui.hover.style.left = pct(pos);
  ui.hoverLabel.textContent = String(pos);
}

// Drag: every move previews (quick=1), one request at a time, remembering only
// the latest wanted position; an inexact preview is refined (quick=0) until
// the pointer moves again; pointerup makes the position current.
const drag = {
  active: false, id: null, x0: 0, moved: false, tick: null,
  pos: null, inflight: false, pending: null, refining: null,
};

ui.timeline.addEventListener('pointerdown', (e) => {
  if (e.button !== 0 || !S.info || !S.range) return;
  e.preventDefault();
  navGen++;
  stopPlay();
  cancelSettle();
  clearError();
  Object.assign(drag, {
    active: true, id: e.pointerId, x0: e.clientX, moved: false,
    tick: e.target.closest('.tick'), pos: null, inflight: false, pending: null, refining: null,
  });
  try { ui.timeline.setPointerCapture(e.pointerId); } catch { /* pointer already gone */ }
  showHover(posAt(e.clientX));
});

ui.timeline.addEventListener('pointermove', (e) => {
  if (!drag.active || e.pointerId !== drag.id) return;
  if (!drag.moved && Math.abs(e.clientX - drag.x0) < 3) return;
  drag.moved = true;
  const p = posAt(e.clientX);
  showHover(p);
  if (p === drag.pos) return;
  drag.pos = p;
  if (drag.inflight) drag.pending = p;
  else preview(p);
});

ui.timeline.addEventListener('pointerup', (e) => {
  if (!drag.active || e.pointerId !== drag.id) return;
  const moved = drag.moved;
  const tick = moved ? null : drag.tick;
  const target = posAt(e.clientX);
  const refining = drag.refining;
  endDrag();
  if (tick) seekTick(tick.dataset.key);
  else if (moved && refining && refining.pos === target && refining.gen === stateGen && stateAbort) {
    adopt(target, refining.promise);     // the refine in flight is this very seek
  } else seek(target);
});

// a drag that ends without pointerup goes back to the current position
function dragLost(e) {
  if (!drag.active || e.pointerId !== drag.id) return;
  const moved = drag.moved;
  endDrag();
  if (moved) seek(S.pos);
}
ui.timeline.addEventListener('pointercancel', dragLost);
ui.timeline.addEventListener('lostpointercapture', dragLost);

function endDrag() {
  drag.active = false;
  drag.pending = null;
  ui.hover.hidden = true;
  try { ui.timeline.releasePointerCapture(drag.id); } catch { /* not captured */ }
}

function cancelDrag() {
  if (drag.active) endDrag();
}

async function preview(p) {
  drag.inflight = true;
  const r = await fetchState(p, true);
  drag.inflight = false;
  if (r) showState(r.st, false);
  if (!drag.active) return;
  if (drag.pending != null) {
    const q = drag.pending;
    drag.pending = null;
    preview(q);
  } else if (r && !(r.st.exact && r.st.position === p)) {
    refine(p);
  }
}

async function refine(p) {
  const promise = fetchState(p, false);
  drag.refining = { pos: p, gen: stateGen, promise };
  const r = await promise;
  if (r && drag.active) showState(r.st, false);
}

// Make pos current, its state being the answer of a quick=0 request already in flight.
async function adopt(pos, promise) {
  S.pos = clampPos(pos);
  drawCursor();
  updateUrl();
  updatePreviewNote();
  const r = await promise;
  if (r) {
    showState(r.st, true);
    scheduleSettle(r.st);
  }
}

// ---------------------------------------------------------------- markers and labels

async function resolveMarker(key) {
  const gen = S.recGen;
  busyInc();
  const stop = progress.start(`resolving ${key}…`);
  try {
    const r = await api(recUrl(`/resolve?marker=${encodeURIComponent(key)}&client=${client}`));
    if (gen !== S.recGen) return null;
    S.resolved.set(key, r.position);
    renderTimeline();
    return r.position;
  } catch (e) {
    if (gen === S.recGen) showError(e);
    return null;
  } finally {
    stop();
    busyDec();
  }
}

// Go to a marker or label by key ("mK" or a label's name), resolving it first if needed.
async function seekTick(key) {
  const t = tickList().find((x) => x.key === key);
  if (!t) return;
  stopPlay();
  let pos = t.pos;
  if (pos == null) {
    const nav = ++navGen;
    pos = await resolveMarker(t.key);
    if (pos == null || nav !== navGen) return;
  }
  await seek(pos);
}

function gotoMarker(dir) {
  if (!S.info || S.pos == null) return;
  clearError();
  const cur = S.pos;
  const curG = S.shown ? S.shown.guest_ns / 1e9 : null;
  const ticks = tickList();
  const known = ticks.filter((t) => t.pos != null);
  // markers not counted yet lie after every known position, in guest-time order
  const unknown = ticks.filter((t) => t.pos == null).sort((a, b) => a.guest_s - b.guest_s);
  if (dir > 0) {
    const next = known.filter((t) => t.pos > cur).sort((a, b) => a.pos - b.pos)[0];
    if (next) return seek(next.pos);
    const u = unknown.find((t) => curG == null || t.guest_s > curG + 1e-9);
    if (u) return seekTick(u.key);
  } else {
    const before = unknown.filter((t) => curG != null && t.guest_s < curG - 1e-9);
    if (before.length) return seekTick(before[before.length - 1].key);
    const prev = known.filter((t) => t.pos < cur).sort((a, b) => b.pos - a.pos)[0];
    if (prev) return seek(prev.pos);
  }
  return null;
}

function gotoInput() {
  if (!S.info) return;
  clearError();
  const v = ui.gotoPos.value.trim();
  if (/^\d[\d_,]*$/.test(v)) { seek(Number(v.replace(/[_,]/g, ''))); return; }
  const t = tickList().find((x) => x.key === v || x.name === v);
  if (t) { seekTick(t.key); return; }
  showError(`not a position, marker or label: "${v}"`);
}

async function addMarker() {
  if (!S.info || S.pos == null) return;
  clearError();
  ui.markerStatus.textContent = '';
  const gen = S.recGen;
  try {
    const r = await track(api(recUrl('/markers'), {
      method: 'POST', body: { name: ui.markerName.value.trim(), pos: S.pos },
    }));
    if (gen !== S.recGen) return;
    ui.markerStatus.textContent = r.message || '';
    ui.markerName.value = '';
    await refreshInfo();
  } catch (e) {
    showError(e);
  }
}

// ---------------------------------------------------------------- playback

const play = { on: false, gen: 0 };

function stopPlay() {
  if (!play.on) return;
  play.on = false;
  play.gen++;
  ui.play.textContent = 'Play';
  ui.play.classList.remove('on');
}

function togglePlay() {
  if (play.on) stopPlay();
  else startPlay();
}

// Realtime and x2/x10: the guest clock follows the wall clock times the speed
// (at most 0.25 s, or two answer times, of guest time behind); each step is as many instructions as
// the recent rate (instructions per guest ns) says, never more than 16 times
// the previous step.  Max: each step as large as fits in ~250 ms of server time.
async function startPlay() {
  if (!S.info || S.pos == null || play.on) return;
  clearError();
  cancelSettle();
  cancelDrag();
  play.on = true;
  const gen = ++play.gen;
  ui.play.textContent = 'Pause';
  ui.play.classList.add('on');
  const alive = () => play.on && gen === play.gen;
  let base = null;
  let speedWas = null;
  let maxStep = 20000;
  let lastN = null;
  let lastMs = 0;
  let lastSend = 0;
  const samples = [];       // {wall, guest, pos} of recent steps
  try {
    let cur = S.shown;
    if (!cur || cur.position !== S.pos || !cur.exact) {
      const r = await seek(S.pos, { fromPlay: true });
      if (!r || !alive()) return;
      cur = r.st;
    }
    while (alive()) {
      if (cur.at_end) break;
      const gap = 25 - (performance.now() - lastSend);
      if (gap > 0) { await sleep(gap); if (!alive()) break; }
      const speed = ui.speed.value;
      const now = performance.now();
      if (speed !== speedWas || !base) {
        base = { wall: now, guest: cur.guest_ns };
        speedWas = speed;
        samples.length = 0;
        samples.push({ wall: now, guest: cur.guest_ns, pos: cur.position });
      }
      let next;
      if (speed === 'max') {
        next = cur.position + maxStep;
      } else {
        const sp = speed === 'realtime' ? 1 : Number(speed) || 1;
        let target = base.guest + (now - base.wall) * 1e6 * sp;
        // a slow server gets larger steps: the lag allowed grows with its answer time
        const maxLag = Math.max(0.25, (2 * lastMs) / 1000) * 1e9 * sp;
        if (target - cur.guest_ns > maxLag) {
          base = { wall: now, guest: cur.guest_ns + maxLag };
          target = base.guest;
        }
        const dns = target - cur.guest_ns;
        if (dns <= 0) {
          await sleep(Math.min(200, -dns / (1e6 * sp)) + 1);
          continue;
        }
        let n = Math.max(1, Math.round(dns * rateEstimate(samples)));
        if (lastN != null) n = Math.min(n, Math.max(16, lastN * 16));
        next = cur.position + n;
      }
      if (S.info.last != null) next = Math.min(next, S.info.last);
      if (next <= cur.position) break;
      lastSend = performance.now();
      const r = await seek(next, { fromPlay: true });
      if (!r || !alive()) break;
      const st = r.st;
      lastN = Math.max(1, st.position - cur.position);
      lastMs = r.ms;
      if (speed === 'max') {
        const f = Math.min(2, Math.max(0.5, 250 / Math.max(1, r.ms)));
        maxStep = Math.max(100, Math.round(maxStep * f));
      }
      const t = performance.now();
      samples.push({ wall: t, guest: st.guest_ns, pos: st.position });
      while (samples.length > 2 && samples[0].wall < t - 2000) samples.shift();
      showPace(samples);
      cur = st;
    }
  } finally {
    if (gen === play.gen) stopPlay();
  }
}

// Instructions per guest nanosecond over the recent steps, else the recording's figure.
function rateEstimate(samples) {
  if (samples.length >= 2) {
    const a = samples[0];
    const b = samples[samples.length - 1];
    if (b.guest > a.guest && b.pos > a.pos) return (b.pos - a.pos) / (b.guest - a.guest);
  }
  const ips = S.info && S.info.instructions_per_guest_s;
  return ips ? ips / 1e9 : 0.1;
}

function showPace(samples) {
  const a = samples[0];
  const b = samples[samples.length - 1];
  if (samples.length < 2 || b.wall - a.wall < 200) return;
  const pace = (b.guest - a.guest) / ((b.wall - a.wall) * 1e6);
  ui.pace.textContent = `x${pace.toFixed(2)} of realtime`;
}

// ---------------------------------------------------------------- recordings, info, tree

// The URL follows rec and pos; written at most every 100 ms (the browser
// throttles a page that replaces its URL too often, as playback would).
const urlWrite = { last: -1e9, timer: 0 };

function updateUrl() {
  if (urlWrite.timer) return;
  const wait = urlWrite.last + 100 - performance.now();
  if (wait > 0) {
    urlWrite.timer = setTimeout(() => { urlWrite.timer = 0; updateUrl(); }, wait);
    return;
  }
  urlWrite.last = performance.now();
  if (!S.rec) return;
  const q = new URLSearchParams();
  q.set('rec', S.rec);
  if (S.pos != null) q.set('pos', String(S.pos));
  const url = `${location.pathname}?${q}`;
  if (url !== location.pathname + location.search) history.replaceState(null, '', url);
}

async function loadRecordings() {
  const r = await track(api('/api/recordings'));
  S.recs = r.recordings || [];
  const opts = S.recs.map((x) => {
    const o = document.createElement('option');
    o.value = x.id;
    o.textContent = x.name;
    o.title = x.error ? `${x.path}: ${x.error}` : x.path;
    if (x.error) o.className = 'damaged';
    return o;
  });
  ui.recordings.replaceChildren(...opts);
  if (S.rec) ui.recordings.value = S.rec;
}

async function switchRec(id, pos = null) {
  stopPlay();
  cancelDrag();
  cancelSettle();
  clearError();
  invalidateState();
  const gen = ++S.recGen;
  S.rec = id;
  S.info = null;
  S.pos = null;
  S.range = null;
  S.resolved = new Map();
  S.infoFailed = false;
  settle.tries = 0;
  body.dataset.ready = '0';
  clearPanels();
  if ([...ui.recordings.options].some((o) => o.value === id)) ui.recordings.value = id;
  updateUrl();
  loadTree();
  let info;
  try {
    info = await track(api(recUrl()));
    if (gen === S.recGen && info.error) throw new ApiError(info.error, 200);
  } catch (e) {
    // a recording that cannot be read: the page is ready, showing why
    if (gen === S.recGen) { S.infoFailed = true; showError(e); body.dataset.ready = '1'; }
    return;
  }
  if (gen !== S.recGen) return;
  S.info = info;
  renderInfo();
  watchPrefetch(gen);
  const start = pos != null ? pos : info.first;
  const r = await seek(start);
  // the first state failed: ready all the same, with the error shown
  if (!r && gen === S.recGen && !ui.error.hidden) body.dataset.ready = '1';
}

// While the server is still reading the recording (info.prefetch.done false:
// a fast recording's end or markers not counted yet), ask for the info again now and then.
function watchPrefetch(gen) {
  const p = S.info && S.info.prefetch;
  if (!p || p.done !== false) return;
  setTimeout(async () => {
    if (gen !== S.recGen) return;
    await refreshInfo({ background: true });
    watchPrefetch(gen);
  }, 2000);
}

async function refreshInfo({ background = false } = {}) {
  const gen = S.recGen;
  try {
    const ask = api(recUrl());
    const info = await (background ? ask : track(ask));
    if (gen !== S.recGen) return;
    if (info.error) { showError(info.error); return; }
    S.info = info;
    renderInfo();
  } catch (e) {
    if (gen === S.recGen) showError(e);
  }
}

function renderInfo() {
  const info = S.info;
  const parts = [info.mode, info.kernel ? `kernel ${info.kernel}` : ''];
  if (info.end) {
    const e = info.end;
    parts.push(`end: ${e.reason}${e.status != null ? ` (status ${e.status})` : ''}` +
      `${e.guest_s != null ? ` at ${Number(e.guest_s).toFixed(3)} s` : ''}`);
  }
  ui.recInfo.textContent = parts.filter(Boolean).join(' · ');
  ui.recInfo.title = info.path;
  if (S.shown) {
    ui.position.textContent = `instruction ${S.shown.position} of ${info.last != null ? info.last : '?'}`;
  }
  renderTimeline();
  renderCropChoices();
}

function renderCropChoices() {
  for (const [sel, pick] of [[ui.cropFrom, 'first'], [ui.cropTo, 'last']]) {
    const was = sel.value;
    const opts = tickList().map((t) => {
      const o = document.createElement('option');
      o.value = t.key;
      o.textContent = t.name;
      o.title = t.pos != null ? `${t.kind} at instruction ${t.pos}` : `${t.kind} (position not counted yet)`;
      return o;
    });
    sel.replaceChildren(...opts);
    if (opts.some((o) => o.value === was)) sel.value = was;
    else if (opts.length) sel.value = opts[pick === 'first' ? 0 : opts.length - 1].value;
  }
}

async function loadTree() {
  const gen = S.recGen;
  try {
    const t = await track(api(recUrl('/tree')));
    if (gen !== S.recGen) return;
    ui.tree.replaceChildren(t.root ? buildTree([t.root]) : '');
  } catch (e) {
    // a damaged recording's own message stays the only one in #error
    if (gen === S.recGen && !S.infoFailed) showError(e);
  }
}

function buildTree(nodes) {
  const ul = document.createElement('ul');
  for (const n of nodes) {
    const li = document.createElement('li');
    const a = document.createElement('a');
    a.href = '#';
    a.className = 'tree-node' + (n.current ? ' current' : '') + (n.error ? ' broken' : '');
    a.dataset.path = n.path;
    if (n.open) a.dataset.open = n.open;
    a.textContent = n.position != null ? `${n.name} (at ${n.position})` : n.name;
    a.title = n.error ? `${n.path}: ${n.error}` : n.path;
    li.append(a);
    if (n.children && n.children.length) li.append(buildTree(n.children));
    ul.append(li);
  }
  return ul;
}

ui.tree.addEventListener('click', async (e) => {
  const a = e.target.closest('a.tree-node');
  if (!a) return;
  e.preventDefault();
  clearError();
  if (a.dataset.open) {
    if (a.dataset.open !== S.rec) switchRec(a.dataset.open);
    return;
  }
  try {
    const r = await track(api('/api/open', { method: 'POST', body: { path: a.dataset.path } }));
    await loadRecordings();
    await switchRec(r.id);
  } catch (err) {
    showError(err);
  }
});

// ---------------------------------------------------------------- crop

let cropRunning = false;

async function crop() {
  if (!S.info || cropRunning) return;
  clearError();
  const gen = S.recGen;
  const req = {
    from: ui.cropFrom.value,
    to: ui.cropTo.value,
    output: ui.cropOutput.value.trim() || null,
  };
  cropRunning = true;
  ui.crop.disabled = true;
  ui.cropStatus.className = '';
  try {
    const r = await track(api(recUrl('/crop'), { method: 'POST', body: req }));
    ui.cropStatus.textContent = `cropping to ${r.output}…`;
    for (;;) {
      await sleep(300);
      const j = await api(`/api/jobs/${encodeURIComponent(r.job)}`);
      if (j.state === 'running') {
        const last = j.lines && j.lines.length ? j.lines[j.lines.length - 1] : '';
        if (last) ui.cropStatus.textContent = last;
        continue;
      }
      ui.cropStatus.textContent = j.message || j.state;
      ui.cropStatus.className = j.state === 'failed' ? 'failed' : 'done';
      if (j.state === 'done' && gen === S.recGen) loadTree();
      break;
    }
  } catch (e) {
    showError(e);
  } finally {
    cropRunning = false;
    ui.crop.disabled = false;
  }
}

// ---------------------------------------------------------------- live

let live = null;    // {id, output, seed, ws, raw, term, ended, retries, timer, frame}

async function goLive() {
  if (!S.info || S.pos == null) return;
  clearError();
  stopPlay();
  const pos = S.pos;
  // the console up to the branch point stays on screen above the live output
  const st = S.shown;
  const seed = st && st.position === pos && st.console ? st.console.text : '';
  try {
    const r = await track(api(recUrl('/live'), {
      method: 'POST', body: { pos, output: ui.liveOutput.value.trim() || null },
    }));
    startLive(r.live, r.output, seed, pos);
  } catch (e) {
    showError(e);
  }
}

function startLive(id, output, seed, pos) {
  if (live) closeLive(true);
  live = { id, output, seed, ws: null, raw: '', term: new Terminal().feed(seed), ended: false, retries: 0, timer: 0, frame: 0 };
  ui.livePanel.hidden = false;
  drawLive(live);
  ui.liveInput.disabled = false;
  ui.liveStop.disabled = false;
  ui.liveStatus.textContent = `live from instruction ${pos}, branch ${output}: connecting…`;
  connectLive(live);
  ui.liveInput.focus();
}

function connectLive(l) {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${proto}//${location.host}/api/live/${encodeURIComponent(l.id)}/ws`);
  l.ws = ws;
  let first = true;
  ws.addEventListener('open', () => {
    if (live !== l) return;
    ui.liveStatus.textContent = `live, branch ${l.output}`;
  });
  ws.addEventListener('message', (ev) => {
    if (live !== l) return;
    let m;
    try { m = JSON.parse(ev.data); } catch { return; }
    if (m.type === 'output') {
      // the first output after connecting is the whole output so far
      if (first) { l.raw = ''; l.term = null; first = false; }
      l.raw += m.data;
      if (l.term) l.term.feed(m.data);
      else l.term = liveTerminal(l);
      drawLive(l);
    } else if (m.type === 'status') {
      ui.liveStatus.textContent = m.text;
    } else if (m.type === 'ended') {
      l.ended = true;
      ui.liveStatus.textContent = `ended, status ${m.status}${m.text ? ': ' + m.text : ''}`;
      ui.liveInput.disabled = true;
      ui.liveStop.disabled = true;
      loadTree();
    }
  });
  ws.addEventListener('close', () => {
    if (live !== l || l.ended) return;
    liveLost(l);
  });
}

// The socket closed before "ended": ask how the session is, and reconnect if it still runs.
async function liveLost(l) {
  try {
    const s = await api(`/api/live/${encodeURIComponent(l.id)}`);
    if (live !== l) return;
    if (s.running && l.retries < 5) {
      l.retries++;
      ui.liveStatus.textContent = 'connection lost, reconnecting…';
      l.timer = setTimeout(() => { if (live === l) connectLive(l); }, 500 * l.retries);
      return;
    }
    l.ended = !s.running;
    l.raw = s.output || l.raw;
    l.term = liveTerminal(l);
    drawLive(l);
    ui.liveStatus.textContent = s.running ? `connection lost${s.text ? ': ' + s.text : ''}`
      : `ended, status ${s.status}${s.text ? ': ' + s.text : ''}`;
    ui.liveInput.disabled = true;
    ui.liveStop.disabled = true;
    if (l.ended) loadTree();
  } catch (e) {
    if (live === l) {
      ui.liveStatus.textContent = 'connection lost';
      showError(e);
    }
  }
}

// The branch point's console, then the live guest's bytes (unless the server
// already sends the output from the start of the recording).
function liveTerminal(l) {
  const t = new Terminal();
  if (l.seed && !l.raw.startsWith(l.seed)) t.feed(l.seed);
  return t.feed(l.raw);
}

function drawLive(l) {
  if (l.frame) return;
  l.frame = requestAnimationFrame(() => {
    l.frame = 0;
    if (live !== l) return;
    ui.liveConsole.textContent = l.term.text();
    ui.liveConsole.scrollTop = ui.liveConsole.scrollHeight;
  });
}

function closeLive(stop) {
  const l = live;
  live = null;
  clearTimeout(l.timer);
  if (l.frame) cancelAnimationFrame(l.frame);
  if (l.ws) {
    if (stop && !l.ended && l.ws.readyState === WebSocket.OPEN) l.ws.send(JSON.stringify({ type: 'stop' }));
    l.ws.close();
  }
}

function liveSend(data) {
  if (!live || !live.ws || live.ws.readyState !== WebSocket.OPEN || live.ended) return;
  live.ws.send(JSON.stringify({ type: 'input', data }));
}

const KEY_BYTES = { Enter: '\n', Tab: '\t', Backspace: '\x7f', Escape: '\x1b' };

ui.liveInput.addEventListener('keydown', (e) => {
  if (e.isComposing) return;
  let data = null;
  if (KEY_BYTES[e.key] !== undefined) data = KEY_BYTES[e.key];
  else if (e.key.length === 1 && e.ctrlKey && !e.altKey && /[a-z@\[\\\]^_]/i.test(e.key)) {
    data = String.fromCharCode(e.key.toUpperCase().charCodeAt(0) & 0x1f);
  } else if ([...e.key].length === 1 && !e.ctrlKey && !e.metaKey) data = e.key;
  if (data === null) return;
  e.preventDefault();
  liveSend(data);
  ui.liveInput.value = '';
});

// text that arrives without a keydown (paste, IME, fill): sent as typed
ui.liveInput.addEventListener('input', () => {
  const v = ui.liveInput.value;
  if (!v) return;
  ui.liveInput.value = '';
  liveSend(v);
});

ui.liveStop.addEventListener('click', () => {
  if (!live || !live.ws || live.ended) return;
  if (live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify({ type: 'stop' }));
  ui.liveStatus.textContent = 'stopping…';
});

// ---------------------------------------------------------------- controls

ui.recordings.addEventListener('change', () => switchRec(ui.recordings.value));
ui.play.addEventListener('click', togglePlay);
ui.stepBack.addEventListener('click', () => step(-1));
ui.stepFwd.addEventListener('click', () => step(1));
ui.prevMarker.addEventListener('click', () => gotoMarker(-1));
ui.nextMarker.addEventListener('click', () => gotoMarker(1));
ui.goto.addEventListener('click', gotoInput);
ui.gotoPos.addEventListener('keydown', (e) => { if (e.key === 'Enter') { e.preventDefault(); gotoInput(); } });
ui.addMarker.addEventListener('click', addMarker);
ui.markerName.addEventListener('keydown', (e) => { if (e.key === 'Enter') { e.preventDefault(); addMarker(); } });
ui.crop.addEventListener('click', crop);
ui.goLive.addEventListener('click', goLive);
ui.error.addEventListener('click', clearError);

const typing = (t) => t instanceof Element && t.closest('input, select, textarea, [contenteditable=""], [contenteditable="true"]');

document.addEventListener('keydown', (e) => {
  if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey || typing(e.target)) return;
  if (e.key === 'ArrowLeft') { e.preventDefault(); step(-1); }
  else if (e.key === 'ArrowRight') { e.preventDefault(); step(1); }
  else if (e.key === ' ') { e.preventDefault(); if (!e.repeat) togglePlay(); }
});

// a focused button must not also "click" on Space: Space already toggled play
document.addEventListener('keyup', (e) => {
  if (e.key === ' ' && !typing(e.target)) e.preventDefault();
});

let resizeTimer = 0;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { if (S.info) renderTimeline(); }, 100);
});

// ---------------------------------------------------------------- start

async function boot() {
  body.dataset.ready = '0';
  body.dataset.busy = '0';
  body.dataset.exact = '0';
  const q = new URLSearchParams(location.search);
  try {
    await loadRecordings();
  } catch (e) {
    showError(e);
    return;
  }
  const rec = q.get('rec') || (S.recs[0] && S.recs[0].id);
  if (!rec) {
    ui.recInfo.textContent = 'no recording is open';
    return;
  }
  const p = q.get('pos');
  await switchRec(rec, p != null && /^\d+$/.test(p.trim()) ? Number(p) : null);
}

boot();
