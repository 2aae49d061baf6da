// chat_verify.js: the JS glue of chat_verify.wasm, the loader's release verifier (chat-signing
// compiled from Rust: minisign signature of manifest.json, file sizes and SHA-256). No build step.
//
//   import { instantiate } from './chat_verify.js';
//   const verifier = await instantiate(wasmBytes);      // ArrayBuffer, Uint8Array or Module
//   const release = verifier.releaseVerify(pubKeyText, manifestBytes, minisigText, now, seen);
//   verifier.releaseCheckFile(release.handle, 'app.js', appBytes);   // throws unless listed
//
// Self-contained on purpose: the loader runs it before anything is verified, so it shares no
// file with the app. The module imports nothing (no randomness, no host calls). Failures throw
// ChatVerifyError with a stable `code` (`ReleaseError::code()`: bad-signature, unknown-key,
// expired, rollback, file-mismatch, missing-file, unlisted-file, malformed; plus bad-argument
// and bad-handle). The byte ABI is the one of chat_core.wasm (client-web/wasm/README.md).

export class ChatVerifyError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = 'ChatVerifyError';
    this.code = code;
    this.detail = message;
  }
}

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder('utf-8', { fatal: true });
const u32 = (b, off = 0) => ((b[off] << 24) | (b[off + 1] << 16) | (b[off + 2] << 8) | b[off + 3]) >>> 0;

/// Compiles (if needed) and instantiates chat_verify.wasm; resolves to a ChatVerify.
export async function instantiate(source) {
  const module = source instanceof WebAssembly.Module ? source : await WebAssembly.compile(source);
  const instance = await WebAssembly.instantiate(module, {});
  return new ChatVerify(instance.exports);
}

export class ChatVerify {
  #x;

  constructor(exports) {
    this.#x = exports;
  }

  /// Calls export `name`; Uint8Array/string arguments become (ptr, len), numbers and bigints
  /// pass through. Returns the payload or throws ChatVerifyError.
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
        const bytes = typeof arg === 'string' ? utf8.encode(arg) : arg;
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
      throw new ChatVerifyError(code, fromUtf8.decode(payload.subarray(1 + codeLen)));
    } finally {
      for (const [ptr, len] of buffers) if (len) x.dealloc(ptr, len);
    }
  }

  /// Drops a verified release.
  free(handle) {
    this.#x.free_handle(handle);
  }

  /// Verifies manifest.json bytes and the .minisig text under the release public key (minisign
  /// .pub text or base64 line) at `now` (Unix seconds), refusing versions below minVersion
  /// (the highest version seen before; '' for none).
  /// Returns { handle, name, version, created, expires, key_id, manifest_sha256, files }.
  releaseVerify(publicKey, manifest, signature, now, minVersion = '') {
    const b = this.#call('release_verify', publicKey, manifest, signature, BigInt(now), minVersion);
    return { handle: u32(b), ...JSON.parse(fromUtf8.decode(b.subarray(4))) };
  }

  /// Throws ChatVerifyError (code 'file-mismatch' or 'unlisted-file') unless `contents` is the
  /// listed file `path` byte for byte.
  releaseCheckFile(release, path, contents) {
    this.#call('release_check_file', release, path, contents);
  }
}
