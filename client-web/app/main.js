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
  S.groups ??= {};
  S.parked ??= [];
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
        if (entry) await (isGroup(item.peer) ? encryptGroupText(item.peer, entry) : encryptText(item.peer, entry));
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

/// Encrypts `payload()` to one device of `peer`, after checking its keys against the directory;
/// `wrap` makes the envelope of the Double Ratchet message.
async function encryptTo(peer, device, payload, wrap = wire.ratchetEnvelope) {
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
    return wrap(message);
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
  const entry = item.ref && (S.messages[item.conv ?? item.to] ?? []).find((m) => m.key === item.ref);
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
      const envelope = wire.decodeEnvelope(f.envelope);
      if (envelope.kind === 3) await receiveGroupMessage(f, envelope.groupId, envelope.message);
      else {
        const plaintext = await decrypt(f.fromUser, f.fromDevice, envelope.message);
        if (plaintext && envelope.kind === 4) await receiveDistribution(f.fromUser, f.fromDevice, envelope.groupId, plaintext);
        else if (plaintext) await handlePayload(f, wire.decodePayload(plaintext));
      }
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
  } else if (payload.type === 'group') {
    await receiveControl(f.fromUser, payload);
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

// ---- groups: sender keys (PROTOCOL.md §12, "Groups in the browser app") ----
//
// A group's conversation key is `group:` + its id in hex (usernames cannot contain ':'). Members
// are usernames; inside the sender-key state (chat-core GroupState) each member device is
// `username.deviceId`. Control messages (create, add, remove: id, name, member list, version)
// and sender keys (envelope kind 4) travel over the pairwise Double Ratchet sessions; a group
// message is encrypted once with this device's sender key and sent as envelope kind 3 to every
// member device (one Send each: the server has no group fan-out). Only the creator changes the
// membership; every member rotates its sender key when someone is removed and hands the new one
// to the remaining members only. Group members must be web devices.

const GROUP_PREFIX = 'group:';
const PARKED_CAP = 200;
const isGroup = (conv) => conv.startsWith(GROUP_PREFIX);
const groupOf = (conv) => S.groups[conv.slice(GROUP_PREFIX.length)];
const ownMemberId = () => `${S.username}.${S.deviceId}`;
const userOfMemberId = (id) => id.slice(0, id.lastIndexOf('.'));

/// Runs `fn` on the group's sender-key state; the state is stored again only if `fn` succeeds.
function withGroup(g, fn) {
  const state = core.groupDecode(g.state);
  try {
    const out = fn(state);
    g.state = core.groupEncode(state);
    return out;
  } finally {
    core.free(state);
  }
}

function groupSystem(g, text, alert) {
  addMessage(GROUP_PREFIX + g.id, { key: wire.toHex(random16()), dir: 'system', alert: alert ?? null, info: !alert, text, time: now() });
}

function queueEnvelope(to, device, envelope, ref = null, conv = undefined) {
  S.outbox.push({ mid: wire.toHex(random16()), to, device, envelope, ref, conv });
}

/// The web devices the server lists for `user` (their keys are checked when a session starts).
async function webDevices(user) {
  const bundle = await conn.request((id) => wire.fetchBundle(id, user), (f, id) => f.type === 'Bundle' && f.requestId === id);
  return bundle.devices.filter((d) => d.deviceId >= wire.WEB_DEVICE_MIN);
}

/// Sends `control` (if any) to every web device of `user`, then this device's current sender
/// key where that device does not have it yet (members only). Returns the devices.
async function sendToMember(g, user, control) {
  if (S.warnings[user]) throw new KeyProblem('changed', `Not sent to ${user}: their key changed. Compare the safety number first.`);
  const devices = await webDevices(user);
  const groupId = wire.fromHex(g.id);
  for (const d of devices) {
    if (control) queueEnvelope(user, d.deviceId, await encryptTo(user, d, () => control));
    const key = `${user}.${d.deviceId}`;
    if (!g.removed && g.members.includes(user) && g.sent[key] !== g.keyGen) {
      const dist = withGroup(g, (st) => core.groupOwnDistribution(st));
      queueEnvelope(user, d.deviceId, await encryptTo(user, d, () => dist, (m) => wire.distributionEnvelope(groupId, m)));
      g.sent[key] = g.keyGen;
    }
  }
  return devices;
}

/// `sendToMember` for each of `users`, noting (not throwing) who could not be reached.
async function sendToMembers(g, users, control) {
  for (const user of users) {
    if (user === S.username) continue;
    try {
      await sendToMember(g, user, control);
    } catch (e) {
      if (transient(e)) throw e;
      groupSystem(g, `Could not reach ${user}: ${e.message}`, 'unreachable');
      if (e instanceof KeyProblem) alertBar(e.message, e.kind);
    }
  }
}

/// Forgets `user`'s sender keys and replaces this device's own (GroupState remove).
function rotateWithout(g, user) {
  withGroup(g, (st) => {
    for (const id of g.peers.filter((p) => userOfMemberId(p) === user)) core.groupRemoveMember(st, id);
    // Replace our key even when no key of `user` ever arrived: they may hold ours.
    core.groupAddMember(st, user);
    core.groupRemoveMember(st, user);
  });
  g.peers = g.peers.filter((p) => userOfMemberId(p) !== user);
  g.keyGen += 1;
}

function newGroupRecord(id, name, admin, members, version) {
  const state = core.groupNew(wire.fromHex(id), ownMemberId(), []);
  try {
    return { id, name, admin, members, version, keyGen: 1, sent: {}, peers: [], removed: false, state: core.groupEncode(state) };
  } finally {
    core.free(state);
  }
}

const controlOf = (g, op, subject) => wire.groupControlPayload({
  op, groupId: wire.fromHex(g.id), version: g.version, name: g.name, members: g.members, subject,
});

async function createGroup(name, usernames) {
  const others = [...new Set(usernames)].filter((u) => u && u !== S.username);
  if (!name || !others.length) throw new Error('a group needs a name and at least one other member');
  const g = newGroupRecord(wire.toHex(random16()), name, S.username, [S.username, ...others], 1);
  S.groups[g.id] = g;
  const conv = GROUP_PREFIX + g.id;
  if (!S.contacts.includes(conv)) S.contacts.push(conv);
  groupSystem(g, `You created "${name}" with ${others.join(', ')}.`);
  await sendToMembers(g, others, controlOf(g, wire.GROUP_OPS.create, ''));
  await persist();
  flushOutbox();
  return conv;
}

async function addGroupMember(g, user) {
  if (g.admin !== S.username || g.removed) throw new Error('only the creator changes the members');
  if (g.members.includes(user)) return;
  g.version += 1;
  g.members = [...g.members, user];
  groupSystem(g, `You added ${user}.`);
  await sendToMembers(g, g.members, controlOf(g, wire.GROUP_OPS.add, user));
  await persist();
  flushOutbox();
}

async function removeGroupMember(g, user) {
  if (g.admin !== S.username || g.removed) throw new Error('only the creator changes the members');
  if (!g.members.includes(user) || user === S.username) return;
  g.version += 1;
  g.members = g.members.filter((m) => m !== user);
  rotateWithout(g, user);
  groupSystem(g, `You removed ${user}. Your sender key was replaced.`);
  const control = controlOf(g, wire.GROUP_OPS.remove, user);
  await sendToMembers(g, [user], control); // told, but given no new key
  await sendToMembers(g, g.members, control);
  await persist();
  flushOutbox();
}

/// A control message from `from` (authenticated by the pairwise session).
async function receiveControl(from, c) {
  const id = wire.toHex(c.groupId);
  let g = S.groups[id];
  const me = S.username;
  if (!g || (g.removed && c.members.includes(me) && from === g.admin && c.version > g.version)) {
    if (!c.members.includes(me) || !c.members.includes(from) || c.op === wire.GROUP_OPS.remove) return;
    g = newGroupRecord(id, c.name, g?.admin ?? from, c.members, c.version);
    S.groups[id] = g;
    const conv = GROUP_PREFIX + id;
    if (!S.contacts.includes(conv)) S.contacts.push(conv);
    groupSystem(g, `${from} added you to "${c.name}" (members: ${c.members.join(', ')}).`);
    await sendToMembers(g, g.members, null);
    for (const p of S.parked.filter((x) => x.groupId === id)) {
      if (p.type === 'dist') await receiveDistribution(p.from, p.device, c.groupId, p.dist);
      else await receiveGroupMessage(p.f, c.groupId, p.message);
    }
    S.parked = S.parked.filter((x) => x.groupId !== id);
    flushOutbox();
    return;
  }
  if (from !== g.admin) {
    groupSystem(g, `${from} tried to change the members of "${g.name}" but only ${g.admin} can; ignored.`, 'refused');
    return;
  }
  if (c.version <= g.version || g.removed) return; // old, replayed, or no longer ours
  const before = g.members;
  g.version = c.version;
  g.name = c.name;
  g.members = c.members;
  if (!c.members.includes(me)) {
    g.removed = true;
    groupSystem(g, `${from} removed you from "${g.name}". You no longer receive its messages.`);
    return;
  }
  for (const gone of before.filter((m) => !c.members.includes(m) && m !== me)) {
    rotateWithout(g, gone);
    groupSystem(g, `${from} removed ${gone}. Your sender key was replaced.`);
  }
  for (const added of c.members.filter((m) => !before.includes(m))) groupSystem(g, `${from} added ${added}.`);
  await sendToMembers(g, g.members, null);
  flushOutbox();
}

/// A sender key from `from`'s `device` (its pairwise session already authenticated it).
async function receiveDistribution(from, device, groupId, dist) {
  const id = wire.toHex(groupId);
  const g = S.groups[id];
  if (!g) {
    S.parked.push({ type: 'dist', groupId: id, from, device, dist });
    if (S.parked.length > PARKED_CAP) S.parked.splice(0, S.parked.length - PARKED_CAP);
    return;
  }
  if (!g.members.includes(from) || g.removed) {
    groupSystem(g, `A sender key from ${from}, who is not a member, was ignored.`, 'refused');
    return;
  }
  const memberId = `${from}.${device}`;
  withGroup(g, (st) => {
    if (!g.peers.includes(memberId)) core.groupAddMember(st, memberId);
    core.groupProcessDistribution(st, memberId, dist);
  });
  if (!g.peers.includes(memberId)) g.peers.push(memberId);
}

async function receiveGroupMessage(f, groupId, message) {
  const id = wire.toHex(groupId);
  const g = S.groups[id];
  if (!g) {
    const { fromUser, fromDevice, messageId } = f;
    S.parked.push({ type: 'msg', groupId: id, f: { fromUser, fromDevice, messageId }, message });
    if (S.parked.length > PARKED_CAP) S.parked.splice(0, S.parked.length - PARKED_CAP);
    return;
  }
  let out;
  try {
    out = withGroup(g, (st) => core.groupDecrypt(st, message));
  } catch (e) {
    if (e.code === 'replay') return;
    const why = g.removed ? ' You are no longer a member.' : '';
    groupSystem(g, `A group message relayed by ${f.fromUser} could not be decrypted (${e.code ?? e.message}).${why}`, 'undecryptable');
    return;
  }
  const sender = userOfMemberId(out.sender);
  if (sender !== f.fromUser || !g.members.includes(sender)) {
    groupSystem(g, `A group message signed by ${out.sender} but relayed by ${f.fromUser} was refused.`, 'refused');
    return;
  }
  const payload = wire.decodePayload(out.plaintext);
  if (payload.type !== 'text') return;
  const conv = GROUP_PREFIX + id;
  addMessage(conv, {
    key: wire.toHex(f.messageId), dir: 'in', from: sender, text: payload.text, time: payload.sentAt,
    fromDevice: f.fromDevice, mid: wire.toHex(f.messageId), read: true,
  });
}

/// Encrypts a text once with this device's sender key and queues it for every member device.
async function encryptGroupText(conv, entry) {
  const g = groupOf(conv);
  if (!g || g.removed) throw new Error('you are not a member of this group');
  const targets = [];
  for (const user of g.members) {
    if (user === S.username) continue;
    try {
      for (const d of await sendToMember(g, user, null)) targets.push([user, d.deviceId]);
    } catch (e) {
      if (transient(e)) throw e;
      groupSystem(g, `Not sent to ${user}: ${e.message}`, 'unreachable');
    }
  }
  if (!targets.length) throw new Error('no member device to send to');
  const message = withGroup(g, (st) => core.groupEncrypt(st, wire.groupTextPayload(entry.time, entry.text)));
  const envelope = wire.groupEnvelope(wire.fromHex(g.id), message);
  for (const [user, device] of targets) {
    const mid = wire.toHex(random16());
    entry.ids.push(mid);
    S.outbox.push({ mid, to: user, device, envelope, ref: entry.key, conv });
  }
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
      h('details', { id: 'new-group-box' },
        h('summary', {}, 'New group'),
        h('form', { id: 'new-group', onsubmit: (e) => { e.preventDefault(); submitGroup(e.target); } },
          h('label', { for: 'group-name' }, 'Group name'),
          h('input', { id: 'group-name', name: 'name', required: true, maxlength: 64, autocomplete: 'off' }),
          h('label', { for: 'group-members' }, 'Members (usernames, separated by commas or spaces)'),
          h('input', { id: 'group-members', name: 'members', required: true, autocomplete: 'off' }),
          h('button', { type: 'submit' }, 'Create group'))),
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

function submitGroup(form) {
  const name = form.name.value.trim();
  const members = form.members.value.split(/[\s,]+/).map((m) => m.trim()).filter(Boolean);
  serial(() => createGroup(name, members)).then((conv) => {
    form.reset();
    openConversation(conv);
  }, (e) => alertBar(`Could not create the group: ${e.message}`, 'group'));
}

/// A group's header: name, members, and (for its creator) adding and removing members.
function groupHeader(conv) {
  const g = groupOf(conv);
  const admin = g.admin === S.username && !g.removed;
  const change = (fn, user) => serial(() => fn(g, user)).then(() => openConversation(conv), (e) => alertBar(e.message, 'group'));
  return h('header', { class: 'conv-head group-head' },
    h('div', {},
      h('h2', { id: 'peer', dataset: { group: g.id } }, g.name),
      h('ul', { id: 'group-members', class: 'members', 'aria-label': 'Members' }, ...g.members.map((m) => h('li', { dataset: { member: m } },
        m === g.admin ? `${m} (creator)` : m,
        admin && m !== S.username ? h('button', { type: 'button', class: 'remove', dataset: { remove: m }, 'aria-label': `Remove ${m}`, onclick: () => change(removeGroupMember, m) }, 'Remove') : null)))),
    admin ? h('form', { id: 'group-add', class: 'row', onsubmit: (e) => { e.preventDefault(); const u = e.target.member.value.trim(); if (u) change(addGroupMember, u); } },
      h('label', { for: 'group-add-member', class: 'visually-hidden' }, 'Add a member'),
      h('input', { id: 'group-add-member', name: 'member', placeholder: 'add username', autocomplete: 'off' }),
      h('button', { type: 'submit' }, 'Add')) : null);
}

function openConversation(peer) {
  current = peer;
  const section = $('#conversation');
  const alerts = $('#alerts');
  const group = isGroup(peer) ? groupOf(peer) : null;
  section.replaceChildren(
    alerts,
    group ? groupHeader(peer) : h('header', { class: 'conv-head' },
      h('h2', { id: 'peer' }, peer),
      h('button', { id: 'safety-button', type: 'button', onclick: () => showSafety(peer) }, 'Safety number')),
    h('div', { id: 'key-warning' }),
    h('ol', { id: 'messages', 'aria-live': 'polite' }),
    h('form', { id: 'composer', onsubmit: (e) => { e.preventDefault(); submitMessage(); } },
      h('label', { for: 'message-input', class: 'visually-hidden' }, `Message to ${group ? group.name : peer}`),
      h('textarea', { id: 'message-input', rows: 2, placeholder: `Message ${group ? group.name : peer}`, onkeydown: (e) => {
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
  if (send) send.disabled = !!w || (!!current && isGroup(current) && !!groupOf(current)?.removed);
  box.replaceChildren(w ? h('div', { class: 'alert key-change', role: 'alert', dataset: { alert: 'changed' } },
    h('strong', {}, `${current}'s key has changed. `),
    'Messages stay blocked until you compare the safety number. ',
    h('button', { type: 'button', onclick: () => showSafety(current) }, 'Compare safety number')) : '');
}

function render() {
  const list = $('#contacts');
  if (!list) return;
  list.replaceChildren(...S.contacts.map((c) => {
    const g = isGroup(c) ? groupOf(c) : null;
    return h('li', {}, h('button', {
      type: 'button', class: c === current ? 'active' : '', dataset: { contact: c, group: g?.id ?? null }, 'aria-current': c === current ? 'true' : null,
      onclick: () => openConversation(c),
    }, g ? `# ${g.name}` : c, g?.removed ? ' (left)' : '', S.warnings[c] ? ' ⚠' : ''));
  }));
  const ol = $('#messages');
  if (ol && current) {
    ol.replaceChildren(...(S.messages[current] ?? []).map((m) => h('li', {
      class: `msg ${m.dir}${m.info ? ' info' : ''}`, dataset: { id: m.key, dir: m.dir, state: m.state ?? '', alert: m.alert ?? null },
    }, m.from ? h('span', { class: 'from' }, m.from) : null, h('span', { class: 'text' }, m.text), h('span', { class: 'meta' },
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
