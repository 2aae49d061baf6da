// store.js: the app's state in IndexedDB, encrypted (AES-GCM) under a key that never leaves the
// browser: a non-extractable CryptoKey kept in IndexedDB, or one derived from the user's
// passphrase (PBKDF2-SHA256, 600 000 rounds) when they set one. Secrets (device keys, ratchet
// sessions) are only ever stored inside the encrypted record.

const DB = 'chatapp-app';

function open() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore('kv');
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function kv(mode, op) {
  const db = await open();
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

const get = (key) => kv('readonly', (s) => s.get(key));
const put = (key, value) => kv('readwrite', (s) => s.put(value, key));

async function derive(passphrase, salt) {
  const base = await crypto.subtle.importKey('raw', new TextEncoder().encode(passphrase), 'PBKDF2', false, ['deriveKey']);
  return crypto.subtle.deriveKey(
    { name: 'PBKDF2', hash: 'SHA-256', salt, iterations: 600000 },
    base, { name: 'AES-GCM', length: 256 }, false, ['encrypt', 'decrypt'],
  );
}

/// The stored account's lock: null (none yet), { passphrase: bool }.
export async function lockInfo() {
  const meta = await get('meta');
  return meta ? { passphrase: !!meta.salt } : null;
}

/// Creates the state key for a new account (passphrase optional).
export async function createKey(passphrase) {
  if (passphrase) {
    const salt = crypto.getRandomValues(new Uint8Array(16));
    await put('meta', { salt });
    return derive(passphrase, salt);
  }
  const key = await crypto.subtle.generateKey({ name: 'AES-GCM', length: 256 }, false, ['encrypt', 'decrypt']);
  await put('meta', { key });
  return key;
}

/// The state key of the stored account.
export async function unlockKey(passphrase) {
  const meta = await get('meta');
  if (!meta) throw new Error('no account in this browser');
  return meta.salt ? derive(passphrase ?? '', meta.salt) : meta.key;
}

export async function save(key, state) {
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const plain = new TextEncoder().encode(JSON.stringify(state, (_, v) => (v instanceof Uint8Array ? { $b: b64(v) } : v)));
  const sealed = new Uint8Array(await crypto.subtle.encrypt({ name: 'AES-GCM', iv }, key, plain));
  await put('state', { iv, sealed });
}

/// The stored state; throws on a wrong passphrase.
export async function load(key) {
  const record = await get('state');
  if (!record) return null;
  let plain;
  try {
    plain = await crypto.subtle.decrypt({ name: 'AES-GCM', iv: record.iv }, key, record.sealed);
  } catch {
    throw new Error('wrong passphrase');
  }
  return JSON.parse(new TextDecoder().decode(plain), (_, v) => (v && typeof v === 'object' && '$b' in v ? unb64(v.$b) : v));
}

function b64(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 8192) s += String.fromCharCode(...bytes.subarray(i, i + 8192));
  return btoa(s);
}
const unb64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
