// The chat-core criterion benchmarks (client-web/core/benches/crypto.rs), through
// chat_core.wasm under Node.js. Usage: node bench.mjs PKG_DIR [RUNS].
// Each operation is warmed up, then timed in RUNS runs of N iterations; prints one JSON object
// of per-operation medians in microseconds. X25519, X3DH and the ratchet loop inside wasm (bench
// hook), like criterion loops natively, and the same again for the ratchet and the group message
// through the public JS API, glue included, as the app calls them (`*_js_api_256B`).
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

const pkg = process.argv[2];
const runs = Number(process.argv[3] ?? 7);
const { instantiate } = await import(join(pkg, 'chat_core.js'));
const core = await instantiate(await readFile(join(pkg, 'chat_core.wasm')));

function measure(iterations, body) {
  body(Math.max(1, iterations >> 2)); // warm-up: JIT tiers up, memory grows
  const samples = [];
  for (let r = 0; r < runs; r++) {
    const start = process.hrtime.bigint();
    body(iterations);
    samples.push(Number(process.hrtime.bigint() - start) / 1000 / iterations);
  }
  samples.sort((a, b) => a - b);
  return samples[samples.length >> 1];
}

const results = {};
results.x25519_dh = measure(2000, (n) => core.bench(0, n));
results.x3dh_initiator_and_responder = measure(300, (n) => core.bench(1, n));

results.ratchet_encrypt_decrypt_256B = measure(20000, (n) => core.bench(2, n));

const aliceKeys = core.keysGenerate();
const bobKeys = core.keysGenerate();
const a = core.sessionInitiate(aliceKeys, core.keysBundle(bobKeys));
const { session: b } = core.sessionAccept(bobKeys, core.sessionEncrypt(a, 'hi'));
core.sessionDecrypt(a, core.sessionEncrypt(b, 'hello'));
const plaintext = new Uint8Array(256).fill(0x5a);
results.ratchet_js_api_256B = measure(20000, (n) => {
  for (let i = 0; i < n; i++) core.sessionDecrypt(b, core.sessionEncrypt(a, plaintext));
});

const ga = core.groupNew('bench', 'alice', ['bob']);
const gb = core.groupNew('bench', 'bob', ['alice']);
core.groupProcessDistribution(gb, 'alice', core.groupOwnDistribution(ga));
results.group_encrypt_decrypt_256B = measure(5000, (n) => core.bench(3, n));
results.group_js_api_256B = measure(5000, (n) => {
  for (let i = 0; i < n; i++) core.groupDecrypt(gb, core.groupEncrypt(ga, plaintext));
});
results.node = process.version;
console.log(JSON.stringify(results));
