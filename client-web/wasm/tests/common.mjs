// Shared helpers of the Node.js test scripts: load the built package, hex, assertions.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

/// A fresh, separate instantiation of chat_core.wasm from the package directory `pkg`.
export async function load(pkg) {
  const { instantiate } = await import(join(pkg, 'chat_core.js'));
  return instantiate(await readFile(join(pkg, 'chat_core.wasm')));
}

/// A fresh instantiation of the loader's verifier, chat_verify.wasm, from `pkg`.
export async function loadVerifier(pkg) {
  const { instantiate } = await import(join(pkg, 'chat_verify.js'));
  return instantiate(await readFile(join(pkg, 'chat_verify.wasm')));
}

export const hex = (bytes) => Buffer.from(bytes).toString('hex');
export const unhex = (text) => new Uint8Array(Buffer.from(text, 'hex'));
export const text = (bytes) => new TextDecoder().decode(bytes);

export function check(condition, message) {
  if (!condition) throw new Error(`assertion failed: ${message}`);
}

/// Runs `f` and returns the ChatCoreError / ChatVerifyError code it throws (or 'no-error').
export function errorCode(f) {
  try {
    f();
    return 'no-error';
  } catch (e) {
    if (e.name !== 'ChatCoreError' && e.name !== 'ChatVerifyError') throw e;
    return e.code;
  }
}
