// loader.js: verifies the signed release before any application code runs, then runs the app
// from the verified bytes only. Read this file end to end: it is what you trust.
//
// 1. fetch manifest.json and manifest.json.minisig; verify the signature with the release key
//    baked in below, refusing an unknown key, an expired manifest, and a version lower than the
//    highest this browser has seen for this key (IndexedDB);
// 2. every file the page references must be listed in the manifest;
// 3. fetch every listed file and check its size and SHA-256;
// 4. load the app from those bytes (blob URLs; relative imports in app/ are relinked to the blob
//    URLs of the verified modules, which is what an import map would do, since CSP forbids an inline one).
// On any failure: a full-page refusal naming the reason, <html data-bundle="rejected"
// data-bundle-error="CODE">, and none of the app runs.

import { instantiate } from './chat_verify.js';

// Baked in by `chatctl bundle` from the operator's key directory.
const RELEASE_PUBLIC_KEY = "@RELEASE_PUBLIC_KEY@";
const DIRECTORY_PUBLIC_KEY = "@DIRECTORY_PUBLIC_KEY@";

const ENTRY = 'app/main.js';
const WASM = 'chat_core.wasm';
const VERIFIER = 'chat_verify.wasm';
/// The loader's own files: pinned by the service worker after the first verified load.
const LOADER_FILES = ['index.html', 'loader.js', 'loader.css', 'chat_verify.js', 'chat_verify.wasm', 'sw.js'];
const VERIFY_HEADER = { 'x-chatapp-verify': '1' };
const CODES = ['bad-signature', 'unknown-key', 'rollback', 'expired', 'file-mismatch', 'missing-file', 'malformed'];

const REASONS = {
  'bad-signature': 'The release signature does not verify: the code was changed after it was signed.',
  'unknown-key': 'The release is signed by a key this loader does not trust.',
  rollback: 'This is an older release than one this browser already ran: a downgrade was attempted.',
  expired: 'The release has expired: the server may be replaying an old, frozen version.',
  'file-mismatch': 'A file of the release differs from the signed manifest.',
  'missing-file': 'A file the page needs is missing, or is not part of the signed release.',
  malformed: 'The release manifest or its signature is malformed.',
};

class Refusal extends Error {
  constructor(code, detail) {
    super(detail);
    this.code = CODES.includes(code) ? code : code === 'unlisted-file' ? 'missing-file' : 'malformed';
  }
}

const root = document.documentElement;

function refuse(code, detail) {
  root.dataset.bundle = 'rejected';
  root.dataset.bundleError = code;
  const page = document.createElement('section');
  page.className = 'refusal';
  page.setAttribute('role', 'alert');
  const h1 = document.createElement('h1');
  h1.textContent = 'This version of ChatApp was refused';
  const why = document.createElement('p');
  why.textContent = REASONS[code] ?? REASONS.malformed;
  const what = document.createElement('p');
  what.append('Reason: ');
  const c = document.createElement('code');
  c.textContent = code;
  what.append(c, ` — ${detail}`);
  const next = document.createElement('p');
  next.textContent = 'None of its code was run. Do not enter anything here; tell the operator of this server.';
  page.append(h1, why, what, next);
  document.body.replaceChildren(page);
}

// ---- IndexedDB: the highest version seen per release key, and the pin flag ----

function idb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open('chatapp-loader', 1);
    req.onupgradeneeded = () => req.result.createObjectStore('kv');
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function kv(mode, op) {
  const db = await idb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction('kv', mode);
      const req = op(tx.objectStore('kv'));
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}
const kvGet = (key) => kv('readonly', (s) => s.get(key));
const kvPut = (key, value) => kv('readwrite', (s) => s.put(value, key));

// ---- fetching ----

// A fetch that fails before any response arrives (a dropped connection) is tried again, up to
// FETCH_ATTEMPTS in all: a network blip is not a refused release. An HTTP error is refused at
// once, and every byte fetched is still checked against the signed manifest.
const FETCH_ATTEMPTS = 3;

async function fetchBytes(path) {
  let response;
  for (let attempt = 1; !response; attempt++) {
    try {
      response = await fetch(path, { cache: 'no-store', headers: VERIFY_HEADER, credentials: 'omit', redirect: 'error' });
    } catch (e) {
      if (attempt >= FETCH_ATTEMPTS) {
        throw new Refusal('missing-file', `${path}: ${e.message} (${attempt} attempts)`);
      }
      await new Promise((resolve) => setTimeout(resolve, 100 * attempt));
    }
  }
  if (!response.ok) throw new Refusal('missing-file', `${path}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

function asRefusal(e) {
  if (e instanceof Refusal) return e;
  return new Refusal(e.code ?? 'malformed', e.detail ?? e.message ?? String(e));
}

/// Every same-origin file the document references (scripts, styles, images, frames…).
function referencedPaths() {
  const out = new Set();
  for (const el of document.querySelectorAll('[src], link[href], object[data]')) {
    const ref = el.getAttribute('src') ?? el.getAttribute('href') ?? el.getAttribute('data');
    const url = new URL(ref, location.href);
    if (url.origin !== location.origin) {
      throw new Refusal('missing-file', `the page references ${url.href}, outside the signed release`);
    }
    out.add(decodeURIComponent(url.pathname.replace(/^\//, '')) || 'index.html');
  }
  return out;
}

// ---- relinking verified modules to blob URLs ----

const IMPORT = /(\bimport\s*(?:[\w$*{}\s,]+?\s*from\s*)?|\bexport\s*[\w$*{}\s,]*?\s*from\s*|\bimport\s*\(\s*)(['"])(\.\.?\/[^'"\s]+)\2/g;

function resolvePath(from, spec) {
  const url = new URL(spec, `https://bundle.invalid/${from}`);
  return url.pathname.slice(1);
}

function linker(files) {
  const urls = new Map();
  const visiting = new Set();
  const text = new TextDecoder('utf-8', { fatal: true });
  const link = (path) => {
    if (urls.has(path)) return urls.get(path);
    if (!files.has(path)) throw new Refusal('missing-file', `${path} is not in the signed manifest`);
    if (visiting.has(path)) throw new Refusal('malformed', `${path} is part of an import cycle`);
    visiting.add(path);
    let source;
    try {
      source = text.decode(files.get(path));
    } catch {
      throw new Refusal('malformed', `${path} is not UTF-8`);
    }
    // Only the app's own modules import each other; the wasm glue imports nothing (its usage
    // comment would otherwise look like an import of itself).
    const linked = !path.startsWith('app/') ? source : source.replace(IMPORT, (_, head, quote, spec) => {
      const target = resolvePath(path, spec);
      if (!files.has(target)) {
        throw new Refusal('missing-file', `${path} imports ${spec}, which the signed manifest does not list`);
      }
      return `${head}${quote}${link(target)}${quote}`;
    });
    const url = URL.createObjectURL(new Blob([linked], { type: 'text/javascript' }));
    visiting.delete(path);
    urls.set(path, url);
    return url;
  };
  return link;
}

// ---- the service worker pin ----

async function pinLoader(files, release) {
  if (!('serviceWorker' in navigator)) return 'no service worker support: the loader is not pinned';
  const pinned = await kvGet('pinned');
  let note = null;
  if (pinned && !navigator.serviceWorker.controller) {
    note = 'Warning: this page was not served by the pinned loader (hard reload, or the service worker was removed or replaced).';
  }
  const registration = await navigator.serviceWorker.register('sw.js', { scope: './' });
  const worker = registration.active ?? registration.installing ?? registration.waiting;
  const sha = async (path) => hex(new Uint8Array(await crypto.subtle.digest('SHA-256', files.get(path))));
  const hashes = {};
  for (const path of LOADER_FILES) if (files.has(path)) hashes[path] = await sha(path);
  if (pinned && pinned.hashes && Object.keys(hashes).some((p) => pinned.hashes[p] !== hashes[p])) {
    note = `The loader was updated by signed release ${release.version}; the new loader is pinned from the next visit.`;
  }
  const payload = LOADER_FILES.filter((p) => files.has(p)).map((p) => [p, files.get(p)]);
  worker?.postMessage({ type: 'pin', files: payload });
  await kvPut('pinned', { version: release.version, hashes });
  return note;
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');

function fromBase64(text) {
  const bin = atob(text);
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

// ---- main ----

async function verify() {
  const now = Math.floor(Date.now() / 1000);
  const [manifest, signature] = await Promise.all([fetchBytes('manifest.json'), fetchBytes('manifest.json.minisig')]);
  // The verifier runs from the pinned copy when the service worker holds one (checked against
  // the manifest below like every file, from the network copy).
  let core;
  try {
    const pinned = await fetch(VERIFIER, { credentials: 'omit', redirect: 'error' });
    core = await instantiate(new Uint8Array(await pinned.arrayBuffer()));
  } catch (e) {
    throw new Refusal('missing-file', `${VERIFIER} cannot be loaded: ${e.message}`);
  }
  const keyLine = RELEASE_PUBLIC_KEY.trim().split('\n').pop();
  const highest = (await kvGet(`highest:${keyLine}`)) ?? '';
  let release;
  try {
    release = core.releaseVerify(RELEASE_PUBLIC_KEY, manifest, new TextDecoder().decode(signature), now, highest);
  } catch (e) {
    throw asRefusal(e);
  }
  const listed = new Set(release.files);
  for (const path of referencedPaths()) {
    if (!listed.has(path)) {
      throw new Refusal('missing-file', `the page references ${path}, which the signed manifest does not list`);
    }
  }
  const files = new Map();
  await Promise.all(
    release.files.map(async (path) => {
      const bytes = await fetchBytes(path);
      try {
        core.releaseCheckFile(release.handle, path, bytes);
      } catch (e) {
        throw asRefusal(e);
      }
      files.set(path, bytes);
    }),
  );
  if (!files.has(ENTRY) || !files.has(WASM)) throw new Refusal('missing-file', `the release has no ${ENTRY} or ${WASM}`);
  let module;
  try {
    module = await WebAssembly.compile(files.get(WASM));
  } catch (e) {
    throw new Refusal('file-mismatch', `${WASM} is not a valid module: ${e.message}`);
  }
  await kvPut(`highest:${keyLine}`, release.version);
  core.free?.(release.handle);
  return { release, files, module };
}

async function main() {
  let verified;
  try {
    verified = await verify();
  } catch (e) {
    const r = asRefusal(e);
    refuse(r.code, r.message);
    return;
  }
  const { release, files, module } = verified;
  let note = null;
  try {
    note = await pinLoader(files, release);
  } catch (e) {
    note = `Warning: the loader could not be pinned (${e.message}).`;
  }
  let entry;
  try {
    entry = linker(files)(ENTRY);
  } catch (e) {
    const r = asRefusal(e);
    refuse(r.code, r.message);
    return;
  }
  const expires = new Date(Number(release.expires) * 1000 || Date.parse(release.expires));
  const line = document.getElementById('release');
  line.textContent = `Verified release ${release.version}, signed by key ${release.key_id.slice(0, 8)}…, expires ${expires.toISOString().slice(0, 10)}`;
  line.title = `key ${release.key_id}, manifest sha256 ${release.manifest_sha256}`;
  if (note) {
    line.classList.add('warning');
    line.textContent += ` — ${note}`;
  }
  root.dataset.bundle = 'verified';
  root.dataset.release = release.version;
  const styles = [...files.keys()].filter((p) => p.startsWith('app/') && p.endsWith('.css'));
  for (const path of styles) {
    const link = document.createElement('link');
    link.rel = 'stylesheet';
    link.href = URL.createObjectURL(new Blob([files.get(path)], { type: 'text/css' }));
    document.head.append(link);
  }
  const app = await import(entry);
  await app.start({
    mount: document.getElementById('app'),
    wasm: module,
    release,
    directoryKey: fromBase64(DIRECTORY_PUBLIC_KEY),
  });
}

main();
