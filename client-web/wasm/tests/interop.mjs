// Wasm side of the wasm <-> native interop test. The Rust test (tests/node.rs) writes native
// keys and messages to DIR, runs phase 1, checks and answers, then runs phase 2.
// Usage: node interop.mjs PKG_DIR DIR 1|2. Prints one JSON object.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { load, hex, unhex, text } from './common.mjs';

const [pkg, dir, phase] = process.argv.slice(2);
const core = await load(pkg);
const read = (name) => JSON.parse(readFileSync(join(dir, name), 'utf8'));
const write = (name, value) => writeFileSync(join(dir, name), JSON.stringify(value));

if (phase === '1') {
  // Native Alice -> wasm Bob: Bob's keys were generated natively and handed over encoded.
  const input = read('native_to_wasm.json');
  const bob = core.keysDecode(unhex(input.bob_keys));
  const { session, plaintext } = core.sessionAccept(bob, unhex(input.messages[0]));
  const received = [text(plaintext)];
  for (const m of input.messages.slice(1)) received.push(text(core.sessionDecrypt(session, unhex(m))));
  const replies = received.map((_, i) => hex(core.sessionEncrypt(session, `wasm Bob reply ${i}`)));

  // Wasm Dave -> native Carol: from Carol's raw bundle, made natively.
  const carol = read('carol.json');
  const dave = core.keysGenerate();
  const toCarol = core.sessionInitiate(dave, unhex(carol.bundle));
  const messages = [0, 1, 2, 3].map((i) => hex(core.sessionEncrypt(toCarol, `wasm Dave says ${i}`)));
  const safety = core.safetyNumber(core.keysIdentity(dave), 'dave', unhex(carol.bundle).subarray(0, 128), 'carol');
  write('wasm_state.json', { dave_session: hex(core.sessionEncode(toCarol)) });
  console.log(JSON.stringify({
    received, replies, messages,
    dave_identity: hex(core.keysIdentity(dave)),
    safety: safety.digits,
    login: hex(core.keysSignLogin(dave, new Uint8Array(32).fill(7), 'dave', 3)),
  }));
} else {
  const state = read('wasm_state.json');
  const session = core.sessionDecode(unhex(state.dave_session));
  const replies = read('carol_replies.json').map((m) => text(core.sessionDecrypt(session, unhex(m))));
  console.log(JSON.stringify({ replies }));
}
