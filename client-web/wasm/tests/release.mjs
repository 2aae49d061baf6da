// Release verification in chat_verify.wasm (the loader's verifier) of manifests signed natively
// by chat-signing (see tests/node.rs). Usage: node release.mjs PKG_DIR DIR. Prints one JSON
// object: the verified summary and, per refusal case, the ChatVerifyError code.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadVerifier, errorCode } from './common.mjs';

const [pkg, dir] = process.argv.slice(2);
const core = await loadVerifier(pkg);
const file = (name) => new Uint8Array(readFileSync(join(dir, name)));
const str = (name) => readFileSync(join(dir, name), 'utf8');
const { now, expires_unix } = JSON.parse(str('times.json'));

const key = str('release.pub');
const manifest = file('manifest.json');
const sig = str('manifest.json.minisig');
const verified = core.releaseVerify(key, manifest, sig, now, '1.0.0');
const checks = {
  good_file: errorCode(() => core.releaseCheckFile(verified.handle, 'app.js', file('app.js'))),
  changed_file: errorCode(() => core.releaseCheckFile(verified.handle, 'app.js', file('app.js.changed'))),
  unlisted_file: errorCode(() => core.releaseCheckFile(verified.handle, 'evil.js', file('app.js'))),
  tampered_manifest: errorCode(() => core.releaseVerify(key, file('manifest.json.tampered'), sig, now)),
  other_key: errorCode(() => core.releaseVerify(str('other.pub'), manifest, sig, now)),
  expired: errorCode(() => core.releaseVerify(key, manifest, sig, expires_unix + 1)),
  rollback: errorCode(() => core.releaseVerify(key, manifest, sig, now, '2.0.0')),
  garbage_signature: errorCode(() => core.releaseVerify(key, manifest, 'not a signature', now)),
};
console.log(JSON.stringify({ verified, checks }));
