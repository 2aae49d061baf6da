// net.js: one logical connection to the server over WebSockets: requests matched to answers by
// request id, pushed frames to a handler, application pings, and reconnecting with full-jitter
// exponential backoff (docs/PROTOCOL.md §8): before attempt n sleep uniform [0, min(30 s,
// 0.5 s × 2^n)], n reset once a connection stayed up 60 s. Close codes 4000 (normal), 4002
// (protocol error) and 4003 (auth failed) stop reconnecting.

import * as wire from './wire.js';

const NO_RECONNECT = new Set([4000, 4002, 4003]);

export class Connection {
  /// onOpen(conn) runs hello + login after every (re)connect; onFrame(frame) gets pushed frames;
  /// onStatus(text) is told 'online', 'connecting', 'offline (retry in Ns)'.
  constructor(url, { onOpen, onFrame, onStatus }) {
    Object.assign(this, { url, onOpen, onFrame, onStatus });
    this.ws = null;
    this.waiters = [];
    this.nextId = 1;
    this.attempt = 0;
    this.stopped = false;
    this.ready = false;
  }

  start() { this.#connect(); }

  stop() {
    this.stopped = true;
    this.ws?.close(4000);
  }

  #connect() {
    if (this.stopped) return;
    this.onStatus('connecting');
    const ws = new WebSocket(this.url);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    let upSince = 0;
    let pinger = null;
    ws.onopen = async () => {
      upSince = Date.now();
      pinger = setInterval(() => this.#raw(wire.ping(Date.now())), 30000);
      try {
        await this.onOpen(this);
        this.ready = true;
        this.onStatus('online');
      } catch (e) {
        this.onStatus(`error: ${e.message}`);
        if (!e.fatal) ws.close(4001); else this.stop();
      }
    };
    ws.onmessage = (event) => {
      let frame;
      try {
        frame = wire.decodeServer(new Uint8Array(event.data));
      } catch (e) {
        console.warn('undecodable frame from the server', e);
        return;
      }
      const i = this.waiters.findIndex((w) => w.match(frame));
      if (i >= 0) {
        const [w] = this.waiters.splice(i, 1);
        if (frame.type === 'Error') w.reject(Object.assign(new Error(`${frame.message} (error ${frame.code})`), { frame }));
        else w.resolve(frame);
        return;
      }
      this.onFrame(frame);
    };
    ws.onclose = (event) => {
      clearInterval(pinger);
      this.ready = false;
      for (const w of this.waiters.splice(0)) w.reject(new Error('disconnected'));
      if (this.stopped || NO_RECONNECT.has(event.code)) {
        this.onStatus(`offline (closed ${event.code})`);
        return;
      }
      if (upSince && Date.now() - upSince > 60000) this.attempt = 0;
      const delay = Math.random() * Math.min(30000, 500 * 2 ** this.attempt);
      this.attempt = Math.min(this.attempt + 1, 16);
      this.onStatus(`offline (retry in ${Math.ceil(delay / 1000)} s)`);
      setTimeout(() => this.#connect(), delay);
    };
  }

  #raw(bytes) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(bytes);
  }

  /// Sends a frame (dropped when offline: the outbox resends after reconnecting).
  send(bytes) { this.#raw(bytes); }

  /// Sends `build(requestId)` and waits for the frame `match` accepts (or a scoped Error).
  request(build, match, timeoutMs = 15000) {
    const id = this.nextId++;
    return this.#wait((f) => (f.type === 'Error' ? f.scope === 1 && f.requestId === id : match(f, id)), () => this.#raw(build(id)), timeoutMs);
  }

  /// Sends a connection-level step (hello, register, login) and waits for its answer.
  step(bytes, type, timeoutMs = 15000) {
    return this.#wait((f) => f.type === type || (f.type === 'Error' && f.scope === 0), () => this.#raw(bytes), timeoutMs);
  }

  #wait(match, sendIt, timeoutMs) {
    return new Promise((resolve, reject) => {
      const w = { match, resolve, reject };
      this.waiters.push(w);
      setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) { this.waiters.splice(i, 1); reject(new Error('no answer from the server')); }
      }, timeoutMs);
      sendIt();
    });
  }
}
