// wire.js: the frames of docs/PROTOCOL.md (v1) in JS: big-endian integers, u32-length-prefixed
// bytes, and the client/server frames, envelope, directory leaf and message payloads the app
// uses. Every key, signature and ciphertext in a frame comes from chat_core.wasm; this codec
// only places bytes. Decoding throws WireError on anything malformed (never trusts a length).

export class WireError extends Error {}

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder('utf-8', { fatal: true });

export class Writer {
  #parts = [];
  #len = 0;
  #push(bytes) { this.#parts.push(bytes); this.#len += bytes.length; return this; }
  u8(v) { return this.#push(Uint8Array.of(v)); }
  u16(v) { return this.#push(Uint8Array.of(v >> 8, v & 255)); }
  u32(v) { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, v >>> 0); return this.#push(b); }
  u64(v) { const b = new Uint8Array(8); new DataView(b.buffer).setBigUint64(0, BigInt(v)); return this.#push(b); }
  fixed(bytes, n) {
    if (bytes.length !== n) throw new WireError(`expected ${n} bytes, got ${bytes.length}`);
    return this.#push(bytes);
  }
  raw(bytes) { return this.#push(bytes); }
  bytes(bytes) { return this.u32(bytes.length).#push(bytes); }
  str(s) { return this.bytes(utf8.encode(s)); }
  done() {
    const out = new Uint8Array(this.#len);
    let off = 0;
    for (const p of this.#parts) { out.set(p, off); off += p.length; }
    return out;
  }
}

export class Reader {
  #b; #off = 0; #view;
  constructor(bytes) { this.#b = bytes; this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength); }
  #need(n) { if (this.#off + n > this.#b.length) throw new WireError('truncated'); const o = this.#off; this.#off += n; return o; }
  u8() { return this.#b[this.#need(1)]; }
  u16() { return this.#view.getUint16(this.#need(2)); }
  u32() { return this.#view.getUint32(this.#need(4)); }
  u64() { return Number(this.#view.getBigUint64(this.#need(8))); }
  fixed(n) { const o = this.#need(n); return this.#b.slice(o, o + n); }
  bytes(max) { const n = this.u32(); if (n > max) throw new WireError('too long'); return this.fixed(n); }
  str(max) { try { return fromUtf8.decode(this.bytes(max)); } catch (e) { throw e instanceof WireError ? e : new WireError('bad UTF-8'); } }
  bool() { const v = this.u8(); if (v > 1) throw new WireError('bad bool'); return v === 1; }
  opt(f) { return this.bool() ? f() : null; }
  list(max, f) { const n = this.u32(); if (n > max) throw new WireError('list too long'); return Array.from({ length: n }, f); }
  finish() { if (this.#off !== this.#b.length) throw new WireError('trailing bytes'); }
}

const VERSION = 1;
const head = (tag) => new Writer().u8(VERSION).u8(tag);

// ---- client frames ----

export const hello = (name) => head(0x01).u8(VERSION).str(name).done();
/// identity: 128 raw bytes (ed || x || sig); signedPrekey: 100; oneTimePrekeys: n × 36.
export const register = (username, deviceId, identity, signedPrekey, oneTimePrekeys) =>
  head(0x02).str(username).u32(deviceId).fixed(identity, 128).fixed(signedPrekey, 100)
    .u32(oneTimePrekeys.length / 36).raw(oneTimePrekeys).done();
export const login = (username, deviceId) => head(0x03).str(username).u32(deviceId).done();
export const loginProof = (signature) => head(0x04).fixed(signature, 64).done();
export const send = (messageId, toUser, toDevice, envelope) =>
  head(0x10).fixed(messageId, 16).str(toUser).u32(toDevice).bytes(envelope).done();
export const ack = (upToSeq) => head(0x11).u64(upToSeq).done();
export const fetchBundle = (requestId, username) => head(0x20).u32(requestId).str(username).done();
export const getTreeHead = (requestId, knownSize) => {
  const w = head(0x21).u32(requestId);
  return (knownSize ? w.u8(1).u64(knownSize) : w.u8(0)).done();
};
export const getInclusion = (requestId, username, deviceId) =>
  head(0x22).u32(requestId).str(username).u32(deviceId).done();
export const ping = (nonce) => head(0x30).u64(nonce).done();

// ---- server frames ----

const hashes = (r, max) => {
  const list = r.list(max, () => r.fixed(32));
  const out = new Uint8Array(list.length * 32);
  list.forEach((h, i) => out.set(h, i * 32));
  return out;
};

function deviceBundle(r) {
  const deviceId = r.u32();
  const identity = r.fixed(128);
  const signedPrekey = r.fixed(100);
  const oneTimePrekey = r.opt(() => r.fixed(36));
  const leafIndex = r.u64();
  return { deviceId, identity, signedPrekey, oneTimePrekey, leafIndex };
}

const SERVER = {
  0x81: (r) => ({ type: 'ServerHello', version: r.u8(), name: r.str(64), maxEnvelope: r.u32() }),
  0x82: (r) => ({ type: 'Registered', username: r.str(64), deviceId: r.u32(), leafIndex: r.u64() }),
  0x83: (r) => ({ type: 'Challenge', nonce: r.fixed(32) }),
  0x84: (r) => ({ type: 'Welcome', username: r.str(64), deviceId: r.u32(), nextSeq: r.u64() }),
  0x85: (r) => ({ type: 'PrekeyStatus', available: r.u32() }),
  0x90: (r) => ({ type: 'SendAck', messageId: r.fixed(16), duplicate: r.bool() }),
  0x91: (r) => ({
    type: 'Deliver', seq: r.u64(), messageId: r.fixed(16), fromUser: r.str(64), fromDevice: r.u32(),
    serverTime: r.u64(), envelope: r.bytes(262144),
  }),
  0xa0: (r) => ({ type: 'Bundle', requestId: r.u32(), username: r.str(64), devices: r.list(16, () => deviceBundle(r)) }),
  0xa1: (r) => ({ type: 'TreeHead', requestId: r.u32(), head: r.bytes(512), proof: hashes(r, 128) }),
  0xa2: (r) => ({
    type: 'Inclusion', requestId: r.u32(), leaf: r.bytes(512), leafIndex: r.u64(), treeSize: r.u64(),
    proof: hashes(r, 64),
  }),
  0xb0: (r) => ({ type: 'Pong', nonce: r.u64() }),
  0xf0: (r) => {
    const scope = r.u8();
    const out = { type: 'Error', scope };
    if (scope === 1) out.requestId = r.u32();
    else if (scope === 2) out.messageId = r.fixed(16);
    else if (scope !== 0) throw new WireError('error scope');
    out.code = r.u16();
    out.message = r.str(512);
    return out;
  },
};

export function decodeServer(bytes) {
  const r = new Reader(bytes);
  if (r.u8() !== VERSION) throw new WireError('unsupported version');
  const decode = SERVER[r.u8()];
  if (!decode) throw new WireError('unknown tag');
  const frame = decode(r);
  r.finish();
  return frame;
}

/// Size of the tree a signed head (docs/PROTOCOL.md §13) is for.
export const headSize = (head) => new Reader(head.subarray(1, 9)).u64();
/// Signing time (Unix seconds) of a signed head.
export const headTime = (head) => new Reader(head.subarray(9, 17)).u64();
/// Size and root of a signed head as one hex string (what identifies the tree it commits to).
export const headId = (head) => toHex(head.subarray(1, 9)) + toHex(head.subarray(17, 49));
export const HEAD_BYTES = 121;

// ---- directory leaf (§10) ----

export function decodeLeaf(bytes) {
  const r = new Reader(bytes);
  if (r.u8() !== 1) throw new WireError('leaf version');
  const leaf = {
    username: r.str(64), deviceId: r.u32(), identity: r.fixed(128),
    signedPrekeyId: r.u32(), signedPrekeyPublic: r.fixed(32), signedPrekeySignature: r.fixed(64),
    version: r.u64(), timestamp: r.u64(),
  };
  r.finish();
  return leaf;
}

// ---- envelope (§9): the app sends kind 2 (RatchetMessage) like the native client, and for
// groups kind 3 (GroupMessage: a sender-key message) and kind 4 (SenderKeyDistribution: a
// Double Ratchet message whose plaintext is the sender key) ----

export const ratchetEnvelope = (message) => new Writer().u8(1).u8(2).bytes(message).done();
export const groupEnvelope = (groupId, message) => new Writer().u8(1).u8(3).fixed(groupId, 16).bytes(message).done();
export const distributionEnvelope = (groupId, message) => new Writer().u8(1).u8(4).fixed(groupId, 16).bytes(message).done();

/// { kind: 2, message } or { kind: 3 | 4, groupId, message }.
export function decodeEnvelope(bytes) {
  const r = new Reader(bytes);
  if (r.u8() !== 1) throw new WireError('envelope version');
  const kind = r.u8();
  if (kind !== 2 && kind !== 3 && kind !== 4) throw new WireError(`unsupported envelope kind ${kind}`);
  const groupId = kind === 2 ? null : r.fixed(16);
  const message = r.bytes(262144);
  r.finish();
  return { kind, groupId, message };
}

// ---- payloads inside the encryption ----
// 1: text  [1][sent_at u64][text str]   (the native client's TextMessage, version 1: read only)
// 2: text  [2][counter u64][sent_at u64][opt<bytes<=512> head][text str]  (PROTOCOL.md §12,
//    "Message content": written here, like the native client)
// 0x80: receipt [0x80][kind u8: 1 delivered, 2 read][count u32][count × message id (16)]
//    sent only to web devices (device id >= 2^31), which understand it.
// 0x81: group control [0x81][control version u8 = 1][op u8: 1 create, 2 add, 3 remove]
//    [group id (16)][group version u64][name str<=256][members list<=256 of str<=64]
//    [subject str<=64 (the member added or removed; empty for create)]  (PROTOCOL.md §12,
//    "Groups in the browser app"), web devices only.
// Inside a group message (kind 3) the plaintext is a version 1 text (no counter, no head).

export const WEB_DEVICE_MIN = 0x80000000;
/// Version 2: `counter` from 1 per (sender device, recipient device); `head` the sender's latest
/// accepted signed tree head (or null).
export function textPayload(counter, sentAt, head, text) {
  const w = new Writer().u8(2).u64(counter).u64(sentAt);
  if (head) w.u8(1).bytes(head); else w.u8(0);
  return w.str(text).done();
}
export function receiptPayload(kind, ids) {
  const w = new Writer().u8(0x80).u8(kind).u32(ids.length);
  for (const id of ids) w.fixed(id, 16);
  return w.done();
}

export const GROUP_CONTROL_VERSION = 1;
export const GROUP_OPS = { create: 1, add: 2, remove: 3 };
export function groupControlPayload({ op, groupId, version, name, members, subject }) {
  const w = new Writer().u8(0x81).u8(GROUP_CONTROL_VERSION).u8(op).fixed(groupId, 16).u64(version).str(name).u32(members.length);
  for (const m of members) w.str(m);
  return w.str(subject ?? '').done();
}
/// Version 1 text, the plaintext of a group message.
export const groupTextPayload = (sentAt, text) => new Writer().u8(1).u64(sentAt).str(text).done();

export function decodePayload(bytes) {
  const r = new Reader(bytes);
  const version = r.u8();
  let out;
  if (version === 1) out = { type: 'text', sentAt: r.u64(), text: r.str(1 << 20) };
  else if (version === 2) {
    const counter = r.u64();
    const sentAt = r.u64();
    const head = r.opt(() => r.bytes(512));
    out = { type: 'text', counter, sentAt, head, text: r.str(1 << 20) };
  } else if (version === 0x80) out = { type: 'receipt', kind: r.u8(), ids: r.list(1000, () => r.fixed(16)) };
  else if (version === 0x81) {
    if (r.u8() !== GROUP_CONTROL_VERSION) throw new WireError('group control version');
    const op = r.u8();
    if (op < 1 || op > 3) throw new WireError('group control op');
    out = {
      type: 'group', op, groupId: r.fixed(16), version: r.u64(), name: r.str(256),
      members: r.list(256, () => r.str(64)), subject: r.str(64),
    };
  }
  else throw new WireError('payload version');
  r.finish();
  return out;
}

export const toHex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
export const fromHex = (hex) => Uint8Array.from(hex.match(/../g) ?? [], (h) => parseInt(h, 16));
export const equalBytes = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);
