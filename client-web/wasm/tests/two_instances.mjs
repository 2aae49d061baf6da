// X3DH and 100 Double Ratchet messages each way between two separately instantiated wasm
// modules (Alice and Bob do not share memory), including a session encode/decode round trip.
// Usage: node two_instances.mjs PKG_DIR. Prints "ok <messages>" on success.
import { load, text, check, errorCode } from './common.mjs';

const pkg = process.argv[2];
const alice = await load(pkg);
const bob = await load(pkg);

const aliceKeys = alice.keysGenerate();
const bobKeys = bob.keysGenerate();
const otks = bob.keysGenerateOneTimePrekeys(bobKeys, 5);
check(otks.length === 5 * 36, 'five one-time prekeys of 36 bytes');
// The bundle as the server would assemble it from Bob's Register frame.
const bundle = new Uint8Array([...bob.keysIdentity(bobKeys), ...bob.keysSignedPrekey(bobKeys), ...otks.subarray(0, 36)]);

let a = alice.sessionInitiate(aliceKeys, bundle);
const first = alice.sessionEncrypt(a, 'hello Bob');
const header = bob.initialHeader(first);
check(header !== null && header.oneTimePrekeyId !== null, 'the first message carries the X3DH header');
const accepted = bob.sessionAccept(bobKeys, first);
let b = accepted.session;
check(text(accepted.plaintext) === 'hello Bob', 'Bob reads the initial message');
check(errorCode(() => bob.sessionAccept(bobKeys, first)) === 'unknown-prekey', 'the one-time prekey is used once');

let count = 1;
for (let i = 0; i < 100; i++) {
  const toAlice = bob.sessionEncrypt(b, `b->a ${i}`);
  check(bob.initialHeader(toAlice) === null, 'replies are ordinary messages');
  check(text(alice.sessionDecrypt(a, toAlice)) === `b->a ${i}`, `Alice reads ${i}`);
  const toBob = alice.sessionEncrypt(a, `a->b ${i} ` + 'x'.repeat(i));
  check(text(bob.sessionDecrypt(b, toBob)) === `a->b ${i} ` + 'x'.repeat(i), `Bob reads ${i}`);
  check(errorCode(() => bob.sessionDecrypt(b, toBob)) === 'replay', 'a replay is refused');
  count += 2;
  if (i === 50) {
    // Store and restore both sessions mid-conversation, as the app does with IndexedDB.
    const sa = alice.sessionEncode(a);
    alice.free(a);
    a = alice.sessionDecode(sa);
    const sb = bob.sessionEncode(b);
    bob.free(b);
    b = bob.sessionDecode(sb);
  }
}
const tampered = alice.sessionEncrypt(a, 'tamper');
tampered[tampered.length - 1] ^= 1;
check(errorCode(() => bob.sessionDecrypt(b, tampered)) === 'authentication-failed', 'tampering is refused');

const sa = alice.safetyNumber(alice.keysIdentity(aliceKeys), 'alice', alice.sessionRemoteIdentity(a), 'bob');
const sb = bob.safetyNumber(bob.keysIdentity(bobKeys), 'bob', bob.sessionRemoteIdentity(b), 'alice');
check(sa.digits === sb.digits && /^\d{60}$/.test(sa.digits), 'both see the same 60-digit safety number');
console.log(`ok ${count}`);
