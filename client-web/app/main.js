// main.js: the ChatApp browser app. Started by the loader (only after the release verified) with
// the compiled chat_core.wasm and the directory public key; runs X3DH and the Double Ratchet in
// wasm, checks every key against the transparency log before use, keeps its state encrypted in
// IndexedDB, and talks to the server over one WebSocket (net.js). Text messages are payload
// version 2 (a per-conversation counter and the sender's latest signed tree head, as the native
// client writes them); gaps, replays and split views are shown as alerts.

import { instantiate } from '../chat_core.js';
import * as wire from './wire.js';
import * as store from './store.js';
import { Connection } from './net.js';
import { qrSvg } from './qr.js';

const CLIENT_NAME = 'web/0.1.0';
const PREKEY_BATCH = 50;
const RETRYABLE = new Set([501, 600, 900, 901]);
const STATES = ['failed', 'sending', 'sent', 'delivered', 'read'];
const MISSING_CAP = 1000; // missing counters remembered per conversation (PROTOCOL.md §12)
const CHECKED_HEADS_CAP = 256;
const ALERTS_SHOWN = 5;
const root = document.documentElement;

let core;
let directoryKey;
let mount;
let S = null; // the persisted state (see newState)
let stateKey = null;
let keysH = 0;
let dirH = 0;
let conn = null;
let current = null; // the open conversation
let queue = Promise.resolve();
const inflight = new Set();

/// Runs state-changing work one at a time (sends, deliveries, logins interleave otherwise).
const serial = (fn) => (queue = queue.then(fn, fn));
const now = () => Math.floor(Date.now() / 1000);
const random16 = () => crypto.getRandomValues(new Uint8Array(16));

class KeyProblem extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind; // 'directory' | 'mismatch' | 'changed'
  }
}

// ---- DOM helpers ----

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') {
      for (const [dk, dv] of Object.entries(v)) if (dv !== null && dv !== undefined) el.dataset[dk] = dv;
    }
    else if (v !== false && v !== null && v !== undefined) el.setAttribute(k, v === true ? '' : v);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}
const $ = (sel) => document.querySelector(sel);

// ---- start ----

export async function start(ctx) {
  mount = ctx.mount;
  directoryKey = ctx.directoryKey;
  core = await instantiate(ctx.wasm);
  root.dataset.app = 'running';
  window.chatappStartedAt = performance.now();
  const lock = await store.lockInfo();
  if (!lock) showRegister();
  else if (lock.passphrase) showUnlock();
  else await open(null);
}

function showRegister(error) {
  const form = h('form', { id: 'register', class: 'card', onsubmit: (e) => { e.preventDefault(); register(form); } },
    h('h1', {}, 'Create your account'),
    h('p', {}, 'Your keys are made in this browser and never leave it.'),
    h('label', { for: 'username' }, 'Username'),
    h('input', { id: 'username', name: 'username', required: true, autocomplete: 'username', pattern: '[a-z][a-z0-9_.\\-]{2,31}', title: '3-32 characters: a-z, 0-9, _ - . starting with a letter' }),
    h('label', { for: 'passphrase' }, 'Passphrase to protect the keys on this device (optional)'),
    h('input', { id: 'passphrase', name: 'passphrase', type: 'password', autocomplete: 'new-password' }),
    error ? h('p', { class: 'alert', role: 'alert' }, error) : null,
    h('button', { type: 'submit' }, 'Create account'));
  mount.replaceChildren(form);
  $('#username').focus();
}

function showUnlock(error) {
  const form = h('form', { id: 'unlock', class: 'card', onsubmit: (e) => { e.preventDefault(); open(form.passphrase.value); } },
    h('h1', {}, 'Unlock ChatApp'),
    h('label', { for: 'passphrase' }, 'Passphrase'),
    h('input', { id: 'passphrase', name: 'passphrase', type: 'password', autocomplete: 'current-password', required: true }),
    error ? h('p', { class: 'alert', role: 'alert' }, error) : null,
    h('button', { type: 'submit' }, 'Unlock'));
  mount.replaceChildren(form);
  $('#passphrase').focus();
}

async function register(form) {
  const username = form.username.value.trim();
  keysH = core.keysGenerate();
  const oneTime = core.keysGenerateOneTimePrekeys(keysH, PREKEY_BATCH);
  const deviceId = (wire.WEB_DEVICE_MIN | crypto.getRandomValues(new Uint32Array(1))[0]) >>> 0;
  S = {
    username, deviceId, registered: false, pendingPrekeys: oneTime, keys: core.keysEncode(keysH),
    directory: null, headSize: 0, sessions: {}, pins: {}, contacts: [], messages: {}, outbox: [],
    lastSeq: 0, seen: [], warnings: {},
  };
  upgradeState();
  stateKey = await store.createKey(form.passphrase.value || null);
  dirH = core.directoryNew(directoryKey);
  await persist();
  connect();
}

async function open(passphrase) {
  try {
    stateKey = await store.unlockKey(passphrase);
    S = await store.load(stateKey);
  } catch (e) {
    showUnlock(e.message);
    return;
  }
  if (!S) { showRegister(); return; }
  upgradeState();
  keysH = core.keysDecode(S.keys);
  dirH = S.directory ? core.directoryFromBytes(S.directory) : core.directoryNew(directoryKey);
  connect();
}

/// Fields added after the first release of the app (older stored states lack them).
function upgradeState() {
  S.counters ??= { out: {}, in: {} };
  S.pending ??= [];
  S.latestHead ??= null;
  S.checkedHeads ??= [];
}

async function persist() {
  S.directory = core.directoryToBytes(dirH);
  await store.save(stateKey, S);
}

// ---- connection and login ----

function connect() {
  showMain();
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/ws`;
  conn = new Connection(url, {
    onOpen: login,
    onFrame: (f) => onFrame(f),
    onStatus: (text) => {
      root.dataset.conn = text.split(' ')[0];
      const el = $('#conn');
      if (el) el.textContent = text;
      // Logged in again: encrypt what was written offline, resend what was not acknowledged.
      if (text === 'online') drainPending().then(flushOutbox);
    },
  });
  conn.start();
}

async function login(c) {
  inflight.clear(); // a new connection: everything unacknowledged is sent again
  await c.step(wire.hello(CLIENT_NAME), 'ServerHello');
  if (!S.registered) {
    const identity = core.keysIdentity(keysH);
    try {
      await c.step(wire.register(S.username, S.deviceId, identity, core.keysSignedPrekey(keysH), S.pendingPrekeys), 'Registered');
    } catch (e) {
      await clearAccount();
      showRegister(`Cannot register ${S.username}: ${e.message}`);
      throw Object.assign(e, { fatal: true });
    }
    S.registered = true;
    delete S.pendingPrekeys;
    await persist();
  }
  const challenge = await c.step(wire.login(S.username, S.deviceId), 'Challenge');
  const proof = core.keysSignLogin(keysH, challenge.nonce, S.username, S.deviceId);
  await c.step(wire.loginProof(proof), 'Welcome');
  await serial(async () => {
    try {
      const leaf = await verifiedLeaf(S.username, S.deviceId);
      if (!wire.equalBytes(leaf.identity, core.keysIdentity(keysH))) {
        throw new KeyProblem('changed', `The key directory lists keys for ${S.username} that are not this device's: someone replaced them.`);
      }
    } catch (e) {
      alertBar(e.message, 'own-key');
      throw Object.assign(e, { fatal: e instanceof KeyProblem });
    }
    await persist();
  });
  root.dataset.login = 'ok';
}

async function clearAccount() {
  await new Promise((resolve) => {
    const req = indexedDB.deleteDatabase('chatapp-app');
    req.onsuccess = req.onerror = req.onblocked = resolve;
  });
}

// ---- the key directory: every key is checked before use ----

async function refreshHead() {
  const f = await conn.request((id) => wire.getTreeHead(id, S.headSize || 0), (f, id) => f.type === 'TreeHead' && f.requestId === id);
  try {
    core.directoryAcceptHead(dirH, f.head, f.proof, now());
  } catch (e) {
    throw new KeyProblem('directory', `Key directory check failed (${e.code ?? e.message}): the server's key log is not trustworthy.`);
  }
  if (wire.headSize(f.head) >= S.headSize) S.latestHead = f.head;
  S.headSize = Math.max(S.headSize, wire.headSize(f.head));
  return f.head;
}

async function verifiedLeaf(user, device) {
  for (let i = 0; i < 3; i++) {
    const head = await refreshHead();
    const inc = await conn.request((id) => wire.getInclusion(id, user, device), (f, id) => f.type === 'Inclusion' && f.requestId === id);
    if (inc.treeSize !== wire.headSize(head)) continue;
    try {
      core.directoryVerifyKeyEntry(dirH, inc.leaf, inc.leafIndex, inc.proof, head, now());
    } catch (e) {
      throw new KeyProblem('directory', `The key directory does not prove the keys of ${user} (${e.code ?? e.message}).`);
    }
    const leaf = wire.decodeLeaf(inc.leaf);
    if (leaf.username !== user || leaf.deviceId !== device) {
      throw new KeyProblem('directory', `The directory proved a leaf of ${leaf.username}.${leaf.deviceId} when asked for ${user}.${device}.`);
    }
    return leaf;
  }
  throw new KeyProblem('directory', `The key directory kept changing while checking ${user}.`);
}

/// A peer identity must equal the one pinned before; a change is shown, never used silently.
function pin(user, device, identity) {
  const key = `${user}.${device}`;
  const seen = S.pins[key];
  const hex = wire.toHex(identity);
  if (seen && seen !== hex) {
    S.warnings[user] = { device, identity: hex };
    renderWarning();
    throw new KeyProblem('changed', `The identity key of ${user} CHANGED since you last talked. Compare safety numbers before continuing.`);
  }
  S.pins[key] = hex;
}

// ---- sending ----

/// Shows the message at once; it is encrypted when online (now, or after the next login).
async function sendText(peer, text) {
  const entry = { key: wire.toHex(random16()), dir: 'out', text, time: now(), state: 'sending', ids: [], acked: [] };
  addMessage(peer, entry);
  S.pending.push({ peer, ref: entry.key });
  await serial(persist);
  await drainPending();
  flushOutbox();
}

const transient = (e) => !conn?.ready || ['disconnected', 'no answer from the server'].includes(e.message);

/// Encrypts the pending texts (one at a time, in order) while the connection is up; a lost
/// connection leaves the rest pending for the next login.
async function drainPending() {
  await serial(async () => {
    while (S.pending.length && conn?.ready) {
      const item = S.pending[0];
      const entry = (S.messages[item.peer] ?? []).find((m) => m.key === item.ref);
      try {
        if (entry) await encryptText(item.peer, entry);
      } catch (e) {
        if (transient(e)) break;
        if (entry) { entry.state = 'failed'; entry.error = e.message; }
        if (e instanceof KeyProblem) alertBar(e.message, e.kind);
      }
      S.pending.shift();
      await persist();
    }
  });
  render();
}

/// Encrypts a text to every device of `peer` (payload version 2) and queues the envelopes.
async function encryptText(peer, entry) {
  if (S.warnings[peer]) {
    throw new KeyProblem('changed', `Not sent: ${peer}'s key changed. Compare the safety number and accept the new key first.`);
  }
  const bundle = await conn.request((id) => wire.fetchBundle(id, peer), (f, id) => f.type === 'Bundle' && f.requestId === id);
  if (!bundle.devices.length) throw new Error(`${peer} has no devices`);
  const envelopes = [];
  for (const d of bundle.devices) {
    const key = `${peer}.${d.deviceId}`;
    const counter = S.counters.out[key] ?? 1;
    const payload = () => wire.textPayload(counter, entry.time, S.latestHead, entry.text);
    envelopes.push([d.deviceId, await encryptTo(peer, d, payload)]);
    S.counters.out[key] = counter + 1;
  }
  for (const [device, envelope] of envelopes) {
    const mid = wire.toHex(random16());
    entry.ids.push(mid);
    S.outbox.push({ mid, to: peer, device, envelope, ref: entry.key });
  }
}

/// Encrypts `payload()` to one device of `peer`, after checking its keys against the directory.
async function encryptTo(peer, device, payload) {
  const key = `${peer}.${device.deviceId}`;
  const leaf = await verifiedLeaf(peer, device.deviceId);
  pin(peer, device.deviceId, leaf.identity);
  let session;
  if (S.sessions[key]) {
    session = core.sessionDecode(S.sessions[key]);
    if (!wire.equalBytes(core.sessionRemoteIdentity(session), leaf.identity)) {
      core.free(session);
      throw new KeyProblem('changed', `${peer} has a new identity in the key directory; see the safety number.`);
    }
  } else {
    const spk = new wire.Writer().u32(leaf.signedPrekeyId).raw(leaf.signedPrekeyPublic).raw(leaf.signedPrekeySignature).done();
    if (!wire.equalBytes(device.identity, leaf.identity) || !wire.equalBytes(device.signedPrekey, spk)) {
      throw new KeyProblem('mismatch', `The server handed out keys for ${peer} (device ${device.deviceId}) that differ from the key directory: refusing to use them. Nothing was encrypted to them.`);
    }
    const bundle = new wire.Writer().raw(device.identity).raw(device.signedPrekey).raw(device.oneTimePrekey ?? new Uint8Array()).done();
    session = core.sessionInitiate(keysH, bundle);
  }
  try {
    // Built after the directory checks, so it carries the head those checks accepted.
    const message = core.sessionEncrypt(session, payload());
    S.sessions[key] = core.sessionEncode(session);
    return wire.ratchetEnvelope(message);
  } finally {
    core.free(session);
  }
}

function flushOutbox() {
  if (!conn?.ready) return;
  for (const item of S.outbox) {
    if (inflight.has(item.mid)) continue;
    inflight.add(item.mid);
    conn.send(wire.send(wire.fromHex(item.mid), item.to, item.device, item.envelope));
  }
}

// ---- receiving ----

function onFrame(f) {
  if (f.type === 'Deliver') serial(() => deliver(f));
  else if (f.type === 'SendAck') serial(() => sendAcked(wire.toHex(f.messageId), null));
  else if (f.type === 'Error' && f.scope === 2) serial(() => sendAcked(wire.toHex(f.messageId), f));
}

async function sendAcked(mid, error) {
  inflight.delete(mid);
  const i = S.outbox.findIndex((o) => o.mid === mid);
  if (i < 0) return;
  if (error && RETRYABLE.has(error.code)) return; // resent after the next reconnect
  const [item] = S.outbox.splice(i, 1);
  const entry = item.ref && (S.messages[item.to] ?? []).find((m) => m.key === item.ref);
  if (entry) {
    if (error) { entry.state = 'failed'; entry.error = error.message; }
    else {
      entry.acked.push(mid);
      if (entry.acked.length >= entry.ids.length) raise(entry, 'sent');
    }
  }
  await persist();
  render();
}

function raise(entry, state) {
  if (STATES.indexOf(state) > STATES.indexOf(entry.state)) entry.state = state;
}

async function deliver(f) {
  const origin = `${f.fromUser}.${f.fromDevice}.${wire.toHex(f.messageId)}`;
  if (f.seq > S.lastSeq && !S.seen.includes(origin)) {
    try {
      const plaintext = await decrypt(f.fromUser, f.fromDevice, wire.decodeEnvelope(f.envelope));
      if (plaintext) await handlePayload(f, wire.decodePayload(plaintext));
    } catch (e) {
      addMessage(f.fromUser, { key: origin, dir: 'system', text: `A message from ${f.fromUser} was refused: ${e.message}`, time: now() });
      if (e instanceof KeyProblem) alertBar(e.message, e.kind);
    }
    S.seen.push(origin);
    if (S.seen.length > 5000) S.seen.splice(0, S.seen.length - 5000);
  }
  S.lastSeq = Math.max(S.lastSeq, f.seq);
  await persist();
  conn.send(wire.ack(f.seq));
  render();
}

async function decrypt(from, device, message) {
  const key = `${from}.${device}`;
  const header = core.initialHeader(message);
  if (header) {
    const leaf = await verifiedLeaf(from, device);
    if (!wire.equalBytes(header.identity, leaf.identity)) {
      throw new KeyProblem('mismatch', `${from} started a session under an identity that is not in the key directory.`);
    }
    pin(from, device, leaf.identity);
  }
  if (S.sessions[key]) {
    const session = core.sessionDecode(S.sessions[key]);
    try {
      const plaintext = core.sessionDecrypt(session, message);
      S.sessions[key] = core.sessionEncode(session);
      return plaintext;
    } catch (e) {
      if (e.code === 'replay') {
        raiseAlert('replay', from, device, `A message from ${from} (device ${device}) arrived again (replayed or duplicated); it is not shown twice.`);
        return null;
      }
      if (!header) throw new Error(`cannot decrypt (${e.code ?? e.message})`);
    } finally {
      core.free(session);
    }
  }
  if (!header) throw new Error('no session with the sender');
  const { session, plaintext } = core.sessionAccept(keysH, message);
  S.keys = core.keysEncode(keysH);
  S.sessions[key] = core.sessionEncode(session);
  core.free(session);
  return plaintext;
}

async function handlePayload(f, payload) {
  if (payload.type === 'text') {
    if (!checkCounter(f.fromUser, f.fromDevice, payload.counter ?? 0)) return;
    addMessage(f.fromUser, {
      key: wire.toHex(f.messageId), dir: 'in', text: payload.text, time: payload.sentAt, fromDevice: f.fromDevice,
      mid: wire.toHex(f.messageId), read: false, counter: payload.counter ?? 0,
    });
    if (f.fromDevice >= wire.WEB_DEVICE_MIN) {
      queueReceipt(f.fromUser, f.fromDevice, 1, [f.messageId]);
      if (current === f.fromUser && document.visibilityState === 'visible') markRead(f.fromUser);
    }
    if (payload.head) await checkGossipedHead(f.fromUser, f.fromDevice, payload.head);
  } else {
    const ids = new Set(payload.ids.map(wire.toHex));
    for (const entry of S.messages[f.fromUser] ?? []) {
      if (entry.dir === 'out' && entry.ids?.some((id) => ids.has(id))) raise(entry, payload.kind === 2 ? 'read' : 'delivered');
    }
  }
}

// ---- what the server cannot hide: counters and tree-head gossip (PROTOCOL.md §12) ----

/// Checks the counter of a text from `from`'s `device`; false for a replay (not shown).
function checkCounter(from, device, counter) {
  if (!counter) return true; // payload version 1: no counter
  const key = `${from}.${device}`;
  const seen = (S.counters.in[key] ??= { highest: 0, missing: [] });
  if (counter > seen.highest) {
    if (counter > seen.highest + 1) {
      const first = seen.highest + 1;
      const last = counter - 1;
      for (let c = Math.max(first, last - MISSING_CAP + 1); c <= last; c++) seen.missing.push(c);
      if (seen.missing.length > MISSING_CAP) seen.missing.splice(0, seen.missing.length - MISSING_CAP);
      raiseAlert('gap', from, device, `Messages ${first}..=${last} from ${from} (device ${device}) are missing: dropped by the server, or late.`);
    }
    seen.highest = counter;
    return true;
  }
  const i = seen.missing.indexOf(counter);
  if (i >= 0) {
    seen.missing.splice(i, 1);
    raiseAlert('reordered', from, device, `Message ${counter} from ${from} (device ${device}) arrived late, out of order.`);
    return true;
  }
  raiseAlert('replay', from, device, `Message ${counter} from ${from} (device ${device}) arrived again (replayed); it is not shown twice.`);
  return false;
}

/// Checks a tree head `from` put inside a message against this browser's own view of the key
/// directory: it must be consistent with every head accepted here. A contradiction, or a head
/// larger than the latest the server shows this browser, is a split view.
async function checkGossipedHead(from, device, head) {
  const split = (why) => raiseAlert('split-view', from, device,
    `SPLIT VIEW: ${why}. The server shows different key directories to different users; do not trust new keys until this is resolved.`);
  if (head.length !== wire.HEAD_BYTES) { split(`${from} sent an unreadable tree head`); return; }
  const id = wire.headId(head);
  if (S.checkedHeads.includes(id)) return;
  S.checkedHeads.push(id);
  if (S.checkedHeads.length > CHECKED_HEADS_CAP) S.checkedHeads.splice(0, S.checkedHeads.length - CHECKED_HEADS_CAP);
  // The signature first, in a verifier of its own (trust on first use checks only that).
  const alone = core.directoryNew(directoryKey);
  try {
    core.directoryAcceptHead(alone, head, new Uint8Array(), now());
  } catch (e) {
    if (e.code === 'stale' || e.code === 'from-the-future') return; // too old (or new) to compare
    split(`the key directory head ${from} saw is not signed by the directory key (${e.code ?? e.message})`);
    return;
  } finally {
    core.free(alone);
  }
  const size = wire.headSize(head);
  for (let i = 0; i < 3; i++) {
    const latest = await refreshHead();
    if (size > wire.headSize(latest)) {
      split(`${from} saw a key directory of ${size} entries, but the server shows this browser only ${wire.headSize(latest)}`);
      return;
    }
    const f = await conn.request((rid) => wire.getTreeHead(rid, size), (g, rid) => g.type === 'TreeHead' && g.requestId === rid);
    if (wire.headId(f.head) !== wire.headId(latest)) continue; // the log grew in between
    const copy = core.directoryFromBytes(core.directoryToBytes(dirH));
    try {
      core.directoryAcceptHead(copy, head, f.proof, now());
    } catch (e) {
      core.free(copy);
      split(`the key directory ${from} saw (size ${size}) contradicts the one this browser sees (size ${wire.headSize(latest)}): ${e.code ?? e.message}`);
      return;
    }
    core.free(dirH);
    dirH = copy;
    return;
  }
}

/// Records an alert about what a peer's messages revealed, in the conversation and on top.
function raiseAlert(kind, from, device, text) {
  addMessage(from, { key: wire.toHex(random16()), dir: 'system', alert: kind, text, time: now() });
  alertBar(text, kind);
}

/// Encrypts a receipt over the existing session (web devices only) and queues it.
function queueReceipt(peer, device, kind, ids) {
  const key = `${peer}.${device}`;
  if (!S.sessions[key]) return;
  const session = core.sessionDecode(S.sessions[key]);
  try {
    const message = core.sessionEncrypt(session, wire.receiptPayload(kind, ids));
    S.sessions[key] = core.sessionEncode(session);
    S.outbox.push({ mid: wire.toHex(random16()), to: peer, device, envelope: wire.ratchetEnvelope(message), ref: null });
  } finally {
    core.free(session);
  }
  flushOutbox();
}

function markRead(peer) {
  const byDevice = new Map();
  for (const m of S.messages[peer] ?? []) {
    if (m.dir !== 'in' || m.read) continue;
    m.read = true;
    if (m.fromDevice >= wire.WEB_DEVICE_MIN) {
      if (!byDevice.has(m.fromDevice)) byDevice.set(m.fromDevice, []);
      byDevice.get(m.fromDevice).push(wire.fromHex(m.mid));
    }
  }
  for (const [device, ids] of byDevice) queueReceipt(peer, device, 2, ids);
}

function addMessage(peer, entry) {
  if (!S.contacts.includes(peer)) S.contacts.push(peer);
  (S.messages[peer] ??= []).push(entry);
  render();
}

// ---- safety numbers ----

async function showSafety(peer) {
  const dialog = $('#safety');
  const body = $('#safety-body');
  body.replaceChildren(h('p', {}, 'Checking the key directory…'));
  dialog.showModal();
  try {
    const leaf = await serial(async () => verifiedLeaf(peer, deviceOf(peer) ?? await firstDevice(peer)));
    const { digits, qr } = core.safetyNumber(core.keysIdentity(keysH), S.username, leaf.identity, peer);
    const groups = digits.match(/.{5}/g).join(' ');
    const warning = S.warnings[peer];
    body.replaceChildren(
      h('p', {}, `Compare these numbers with ${peer} in person or over a call you trust. If they match, nobody is in the middle.`),
      h('p', { class: 'digits', id: 'safety-digits' }, groups),
      qrSvg(qr),
      warning ? h('button', { id: 'accept-key', type: 'button', onclick: () => acceptKeyChange(peer) }, `The numbers match: trust ${peer}'s new key`) : null,
    );
  } catch (e) {
    body.replaceChildren(h('p', { class: 'alert', role: 'alert' }, e.message));
  }
}

/// The device of `peer` whose key was seen (or changed); null before any was.
function deviceOf(peer) {
  const pinned = Object.keys(S.pins).find((k) => k.startsWith(`${peer}.`));
  if (S.warnings[peer]) return S.warnings[peer].device;
  return pinned ? Number(pinned.slice(peer.length + 1)) : null;
}

/// The first device the server lists for `peer` (its keys are then checked like any other).
async function firstDevice(peer) {
  const bundle = await conn.request((id) => wire.fetchBundle(id, peer), (f, id) => f.type === 'Bundle' && f.requestId === id);
  if (!bundle.devices.length) throw new Error(`${peer} has no devices`);
  return bundle.devices[0].deviceId;
}

async function acceptKeyChange(peer) {
  const w = S.warnings[peer];
  if (!w) return;
  S.pins[`${peer}.${w.device}`] = w.identity;
  delete S.sessions[`${peer}.${w.device}`];
  delete S.warnings[peer];
  await persist();
  $('#safety').close();
  renderWarning();
}

// ---- rendering ----

/// Shows an alert above the conversation (the newest few stay until dismissed).
function alertBar(text, kind) {
  root.dataset.keyAlert = kind;
  const bar = $('#alerts');
  if (!bar) return;
  const item = h('div', { class: 'alert', role: 'alert', dataset: { alert: kind } },
    h('span', {}, text),
    h('button', { type: 'button', class: 'dismiss', 'aria-label': 'Dismiss this alert', onclick: () => item.remove() }, 'Dismiss'));
  bar.append(item);
  while (bar.children.length > ALERTS_SHOWN) bar.firstElementChild.remove();
}

function showMain() {
  const shell = h('div', { class: 'shell' },
    h('aside', { class: 'sidebar' },
      h('p', { class: 'me' }, 'Signed in as ', h('strong', { id: 'me' }, S.username)),
      h('p', { id: 'conn', class: 'conn', 'aria-live': 'polite' }, 'connecting'),
      h('form', { id: 'add-contact', onsubmit: (e) => {
        e.preventDefault();
        const name = e.target.contact.value.trim();
        if (!name) return;
        if (!S.contacts.includes(name)) S.contacts.push(name);
        e.target.reset();
        openConversation(name);
        persist();
      } },
      h('label', { for: 'contact' }, 'New conversation'),
      h('div', { class: 'row' }, h('input', { id: 'contact', name: 'contact', placeholder: 'username', autocomplete: 'off' }), h('button', { type: 'submit' }, 'Open'))),
      h('nav', { 'aria-label': 'Conversations' }, h('ul', { id: 'contacts' }))),
    h('section', { id: 'conversation', class: 'conversation', 'aria-label': 'Conversation' },
      h('div', { id: 'alerts' }),
      h('p', { class: 'empty' }, 'Open a conversation: type a username on the left.')),
    h('dialog', { id: 'safety', 'aria-labelledby': 'safety-title' },
      h('h2', { id: 'safety-title' }, 'Safety number'),
      h('div', { id: 'safety-body' }),
      h('form', { method: 'dialog' }, h('button', {}, 'Close'))));
  mount.replaceChildren(shell);
  render();
}

function openConversation(peer) {
  current = peer;
  const section = $('#conversation');
  const alerts = $('#alerts');
  section.replaceChildren(
    alerts,
    h('header', { class: 'conv-head' },
      h('h2', { id: 'peer' }, peer),
      h('button', { id: 'safety-button', type: 'button', onclick: () => showSafety(peer) }, 'Safety number')),
    h('div', { id: 'key-warning' }),
    h('ol', { id: 'messages', 'aria-live': 'polite' }),
    h('form', { id: 'composer', onsubmit: (e) => { e.preventDefault(); submitMessage(); } },
      h('label', { for: 'message-input', class: 'visually-hidden' }, `Message to ${peer}`),
      h('textarea', { id: 'message-input', rows: 2, placeholder: `Message ${peer}`, onkeydown: (e) => {
        if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); submitMessage(); }
      } }),
      h('button', { id: 'send', type: 'submit' }, 'Send')));
  serial(async () => { markRead(peer); await persist(); });
  render();
  $('#message-input').focus();
}

function submitMessage() {
  const input = $('#message-input');
  const text = input.value.trim();
  if (!text || !current) return;
  input.value = '';
  sendText(current, text);
}

function renderWarning() {
  const box = $('#key-warning');
  if (!box) return;
  const w = current && S.warnings[current];
  const send = $('#send');
  if (send) send.disabled = !!w;
  box.replaceChildren(w ? h('div', { class: 'alert key-change', role: 'alert', dataset: { alert: 'changed' } },
    h('strong', {}, `${current}'s key has changed. `),
    'Messages stay blocked until you compare the safety number. ',
    h('button', { type: 'button', onclick: () => showSafety(current) }, 'Compare safety number')) : '');
}

function render() {
  const list = $('#contacts');
  if (!list) return;
  list.replaceChildren(...S.contacts.map((c) => h('li', {}, h('button', {
    type: 'button', class: c === current ? 'active' : '', dataset: { contact: c }, 'aria-current': c === current ? 'true' : null,
    onclick: () => openConversation(c),
  }, c, S.warnings[c] ? ' ⚠' : ''))));
  const ol = $('#messages');
  if (ol && current) {
    ol.replaceChildren(...(S.messages[current] ?? []).map((m) => h('li', {
      class: `msg ${m.dir}`, dataset: { id: m.key, dir: m.dir, state: m.state ?? '', alert: m.alert ?? null },
    }, h('span', { class: 'text' }, m.text), h('span', { class: 'meta' },
      new Date(m.time * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }),
      m.dir === 'out' ? ` · ${m.state}${m.error ? `: ${m.error}` : ''}` : ''))));
    ol.lastElementChild?.scrollIntoView({ block: 'end' });
  }
  renderWarning();
}

// Tests and the benchmark reach the wasm through this (nothing secret is exposed).
window.chatapp = { bench: (n) => benchRatchet(n) };

function benchRatchet(n) {
  const a = core.keysGenerate();
  const b = core.keysGenerate();
  const sa = core.sessionInitiate(a, core.keysBundle(b));
  const first = core.sessionEncrypt(sa, 'hello');
  const { session: sb } = core.sessionAccept(b, first);
  core.sessionDecrypt(sa, core.sessionEncrypt(sb, 'reply'));
  const text = 'x'.repeat(100);
  const t0 = performance.now();
  for (let i = 0; i < n; i++) core.sessionDecrypt(sb, core.sessionEncrypt(sa, text));
  const ms = performance.now() - t0;
  for (const hnd of [a, b, sa, sb]) core.free(hnd);
  return { messages: n, ms, perSecond: (n / ms) * 1000 };
}
