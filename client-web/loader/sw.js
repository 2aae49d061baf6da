// sw.js: pins the loader. After the first verified load the loader hands this worker the
// verified bytes of its own files (index.html, loader.js, loader.css, chat_verify.js and .wasm,
// sw.js);
// from then on they are served from this cache, so a server that changes the loader is not
// believed. The loader's own verification fetches (header x-chatapp-verify) go to the network:
// a new loader is only pinned after it verified under the release key. Limits (first visit,
// hard reload, a replaced worker) are in docs/THREAT_MODEL.md.

const PIN = 'chatapp-loader-pin-v1';
const PINNED = new Set(['index.html', 'loader.js', 'loader.css', 'chat_verify.js', 'chat_verify.wasm', 'sw.js']);
// The server's policy (server/src/bundle.rs), repeated for responses served from the pin.
const CSP = "default-src 'none'; script-src 'self' blob: 'wasm-unsafe-eval'; style-src 'self' blob:; " +
  "img-src 'self' data: blob:; connect-src 'self'; worker-src 'self'; manifest-src 'self'; " +
  "base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const TYPES = { html: 'text/html; charset=utf-8', js: 'text/javascript; charset=utf-8', css: 'text/css; charset=utf-8', wasm: 'application/wasm' };

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('message', (event) => {
  if (event.data?.type !== 'pin') return;
  event.waitUntil((async () => {
    const cache = await caches.open(PIN);
    for (const [path, bytes] of event.data.files) {
      if (!PINNED.has(path)) continue;
      const type = TYPES[path.split('.').pop()] ?? 'application/octet-stream';
      await cache.put(new Request(new URL(path, self.registration.scope)), new Response(bytes, {
        headers: { 'content-type': type, 'content-security-policy': CSP, 'x-chatapp-pinned': '1' },
      }));
    }
  })());
});

self.addEventListener('fetch', (event) => {
  const request = event.request;
  if (request.method !== 'GET' || request.headers.get('x-chatapp-verify')) return;
  const url = new URL(request.url);
  const scope = new URL(self.registration.scope);
  if (url.origin !== scope.origin || !url.pathname.startsWith(scope.pathname)) return;
  let path = url.pathname.slice(scope.pathname.length);
  if (request.mode === 'navigate' && (path === '' || path === 'index.html')) path = 'index.html';
  if (!PINNED.has(path)) return;
  event.respondWith((async () => {
    const cache = await caches.open(PIN);
    return (await cache.match(new URL(path, scope))) ?? fetch(request);
  })());
});
