// chat_core.js: the JS glue of chat_core.wasm (chat-core compiled from Rust). No build step.
// Release verification (the loader's job) is in chat_verify.wasm / chat_verify.js.
//
//   import { instantiate } from './chat_core.js';
//   const core = await instantiate(wasmBytes);           // ArrayBuffer, Uint8Array or Module
//   const alice = core.keysGenerate();                     // handles are small integers
//
// Byte arguments and results are Uint8Array. Failures throw ChatCoreError with a stable `code`
// (see client-web/wasm/README.md). Objects behind handles hold secrets: call core.free(handle)
// when done; serialise them with the *Encode methods to store them.

export class ChatCoreError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = 'ChatCoreError';
    this.code = code;
    this.detail = message;
  }
}

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder('utf-8', { fatal: true });
const asBytes = (v) => (typeof v === 'string' ? utf8.encode(v) : v);
const u32 = (b, off = 0) => ((b[off] << 24) | (b[off + 1] << 16) | (b[off + 2] << 8) | b[off + 3]) >>> 0;
const u16 = (b, off = 0) => (b[off] << 8) | b[off + 1];

/// Fills `len` bytes at `ptr` from the platform CSPRNG (64 KiB per getRandomValues call at most).
function randomFill(memory, ptr, len) {
  const view = new Uint8Array(memory.buffer, ptr, len);
  for (let i = 0; i < len; i += 65536) {
    crypto.getRandomValues(view.subarray(i, Math.min(len, i + 65536)));
  }
}

/// Compiles (if needed) and instantiates chat_core.wasm; resolves to a ChatCore.
export async function instantiate(source) {
  const module = source instanceof WebAssembly.Module ? source : await WebAssembly.compile(source);
  let memory = null;
  const imports = { env: { random_fill: (ptr, len) => randomFill(memory, ptr, len) } };
  // chat_core.wasm imports only env.random_fill; should a dependency ever add an import,
  // it gets a stub that fails loudly if it runs.
  for (const imp of WebAssembly.Module.imports(module)) {
    if (imp.kind !== 'function' || (imp.module === 'env' && imp.name === 'random_fill')) continue;
    imports[imp.module] ??= {};
    imports[imp.module][imp.name] = () => {
      throw new Error(`chat_core.wasm called the unexpected import ${imp.module}.${imp.name}`);
    };
  }
  const instance = await WebAssembly.instantiate(module, imports);
  memory = instance.exports.memory;
  return new ChatCore(instance.exports);
}

export class ChatCore {
  #x;

  constructor(exports) {
    this.#x = exports;
  }

  /// Calls export `name`; Uint8Array/string arguments become (ptr, len), numbers and bigints
  /// pass through. Returns the payload or throws ChatCoreError.
  #call(name, ...args) {
    const x = this.#x;
    const buffers = [];
    const flat = [];
    try {
      for (const arg of args) {
        if (typeof arg === 'number' || typeof arg === 'bigint') {
          flat.push(arg);
          continue;
        }
        const bytes = asBytes(arg);
        const ptr = bytes.length ? x.alloc(bytes.length) : 0;
        if (bytes.length) new Uint8Array(x.memory.buffer, ptr, bytes.length).set(bytes);
        buffers.push([ptr, bytes.length]);
        flat.push(ptr, bytes.length);
      }
      const out = x[name](...flat);
      const mem = new Uint8Array(x.memory.buffer);
      const n = u32(mem, out);
      const status = mem[out + 4];
      const payload = mem.slice(out + 5, out + 4 + n);
      x.dealloc(out, 4 + n);
      if (status === 0) return payload;
      const codeLen = payload[0];
      const code = fromUtf8.decode(payload.subarray(1, 1 + codeLen));
      throw new ChatCoreError(code, fromUtf8.decode(payload.subarray(1 + codeLen)));
    } finally {
      for (const [ptr, len] of buffers) if (len) x.dealloc(ptr, len);
    }
  }

  #handle(name, ...args) {
    return u32(this.#call(name, ...args));
  }

  /// Drops the object behind a handle (its secrets are wiped).
  free(handle) {
    this.#x.free_handle(handle);
  }

  // ---- device keys ----
  keysGenerate() { return this.#handle('keys_generate'); }
  keysDecode(bytes) { return this.#handle('keys_decode', bytes); }
  keysEncode(keys) { return this.#call('keys_encode', keys); }
  /// 128 bytes: Ed25519 key || X25519 key || signature binding them.
  keysIdentity(keys) { return this.#call('keys_identity', keys); }
  /// 100 bytes: id (u32 BE) || X25519 key || signature.
  keysSignedPrekey(keys) { return this.#call('keys_signed_prekey', keys); }
  keysRotateSignedPrekey(keys) { return this.#call('keys_rotate_signed_prekey', keys); }
  /// count × 36 bytes: id (u32 BE) || X25519 key.
  keysGenerateOneTimePrekeys(keys, count) {
    return this.#call('keys_generate_one_time_prekeys', keys, count);
  }
  /// 64-byte Ed25519 answer to the server's 32-byte login nonce.
  keysSignLogin(keys, nonce, username, deviceId) {
    return this.#call('keys_sign_login', keys, nonce, username, deviceId);
  }
  /// This device's raw bundle (identity || signed prekey || one-time prekey if id != 0).
  keysBundle(keys, oneTimePrekeyId = 0) { return this.#call('keys_bundle', keys, oneTimePrekeyId); }

  // ---- pairwise sessions ----
  /// bundle: identity (128) || signed prekey (100) [|| one-time prekey (36)].
  sessionInitiate(keys, bundle) { return this.#handle('session_initiate', keys, bundle); }
  /// Returns { session, plaintext }; the keys lose the one-time prekey used (store them again).
  sessionAccept(keys, message) {
    const out = this.#call('session_accept', keys, message);
    return { session: u32(out), plaintext: out.slice(4) };
  }
  sessionEncrypt(session, plaintext) { return this.#call('session_encrypt', session, plaintext); }
  sessionDecrypt(session, message) { return this.#call('session_decrypt', session, message); }
  sessionEncode(session) { return this.#call('session_encode', session); }
  sessionDecode(bytes) { return this.#handle('session_decode', bytes); }
  sessionRemoteIdentity(session) { return this.#call('session_remote_identity', session); }
  /// null for an ordinary message, else the (not yet verified) X3DH header of an initial one.
  initialHeader(message) {
    const b = this.#call('initial_header', message);
    if (b[0] === 0) return null;
    return {
      identity: b.slice(1, 129),
      ephemeralKey: b.slice(129, 161),
      signedPrekeyId: u32(b, 161),
      oneTimePrekeyId: b[165] ? u32(b, 166) : null,
    };
  }
  /// { digits: '60 digits', qr: Uint8Array }; ids are the accounts' stable ids.
  safetyNumber(localIdentity, localId, remoteIdentity, remoteId) {
    const b = this.#call('safety_number', localIdentity, localId, remoteIdentity, remoteId);
    return { digits: fromUtf8.decode(b.subarray(0, 60)), qr: b.slice(60) };
  }

  // ---- key directory ----
  directoryNew(publicKey) { return this.#handle('directory_new', publicKey); }
  directoryFromBytes(bytes) { return this.#handle('directory_from_bytes', bytes); }
  directoryToBytes(dir) { return this.#call('directory_to_bytes', dir); }
  /// head: signed tree head bytes; proof: concatenated 32-byte hashes; now: Unix seconds.
  directoryAcceptHead(dir, head, proof, now) {
    this.#call('directory_accept_head', dir, head, proof, BigInt(now));
  }
  directoryVerifyKeyEntry(dir, leaf, index, proof, head, now) {
    this.#call('directory_verify_key_entry', dir, leaf, BigInt(index), proof, head, BigInt(now));
  }

  // ---- groups (sender keys) ----
  groupNew(groupId, ownId, members) {
    return this.#handle('group_new', groupId, ownId, members.join('\n'));
  }
  groupOwnDistribution(group) { return this.#call('group_own_distribution', group); }
  groupProcessDistribution(group, from, distribution) {
    this.#call('group_process_distribution', group, from, distribution);
  }
  groupAddMember(group, member) { return this.#call('group_add_member', group, member); }
  /// Returns [{ member, distribution }] to send to the remaining members.
  groupRemoveMember(group, member) {
    const b = this.#call('group_remove_member', group, member);
    const out = [];
    for (let i = 0, off = 4; i < u32(b); i++) {
      const nameLen = u16(b, off);
      const name = fromUtf8.decode(b.subarray(off + 2, off + 2 + nameLen));
      off += 2 + nameLen;
      const len = u32(b, off);
      out.push({ member: name, distribution: b.slice(off + 4, off + 4 + len) });
      off += 4 + len;
    }
    return out;
  }
  groupEncrypt(group, plaintext) { return this.#call('group_encrypt', group, plaintext); }
  /// Returns { sender, plaintext }.
  groupDecrypt(group, message) {
    const b = this.#call('group_decrypt', group, message);
    const len = u16(b);
    return { sender: fromUtf8.decode(b.subarray(2, 2 + len)), plaintext: b.slice(2 + len) };
  }
  groupEncode(group) { return this.#call('group_encode', group); }
  groupDecode(bytes) { return this.#handle('group_decode', bytes); }

  /// Benchmark hook: `iterations` of op 0 (X25519), 1 (X3DH both sides) or 2 (ratchet
  /// encrypt + decrypt of 256 bytes) inside wasm.
  bench(op, iterations) { this.#call('bench', op, iterations); }
}
