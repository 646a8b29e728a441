// One websocket per open conversation. Reconnects by itself with backoff and jitter, and on
// every (re)connect the server sends the reply's state, so nothing has to be replayed from memory.
// A ping every 25 s finds connections that died silently (a closed laptop lid, a proxy that
// dropped the socket): no frame at all for 60 s means the socket is dead and is replaced at once.
const PING_EVERY_MS = 25000;
const DEAD_AFTER_MS = 60000;

export class ConversationSocket {
  // `path` picks another socket of the same protocol (the read-only shared view's).
  constructor(conversationId, { onFrame, onStatus, path = null }) {
    this.url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path || `/ws/conversations/${conversationId}/`}`;
    this.onFrame = onFrame;
    this.onStatus = onStatus;
    this.attempt = 0;
    this.queue = [];
    this.closed = false;
    this.retryTimer = null;
    this.lastFrameAt = Date.now();
    this.pinger = setInterval(() => this.checkAlive(), PING_EVERY_MS);
    // Back from sleep or offline: check now instead of waiting for the backoff or the next ping.
    this.wake = () => {
      if (document.visibilityState === "visible") this.checkAlive(true);
    };
    document.addEventListener("visibilitychange", this.wake);
    window.addEventListener("online", this.wake);
    this.open();
  }

  open() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    const ws = new WebSocket(this.url);
    this.ws = ws;
    this.lastFrameAt = Date.now();
    // Events of a socket already replaced are ignored, so one drop never opens two sockets.
    ws.addEventListener("open", () => {
      if (ws !== this.ws) return;
      this.attempt = 0;
      this.onStatus("open");
      for (const frame of this.queue.splice(0)) ws.send(frame);
    });
    ws.addEventListener("message", (event) => {
      if (ws !== this.ws) return;
      this.lastFrameAt = Date.now();
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      if (frame.type !== "pong") this.onFrame(frame);
    });
    ws.addEventListener("close", (event) => {
      if (ws !== this.ws || this.closed) return;
      if (event.code === 4401 || event.code === 4403) {
        this.onStatus("refused");
        return;
      }
      if (event.code === 4404) { // a shared view whose share ended: nothing to come back to
        this.onStatus("gone");
        return;
      }
      this.scheduleReconnect();
    });
  }

  scheduleReconnect() {
    if (this.retryTimer) return;
    this.onStatus("reconnecting");
    // Exponential backoff with jitter (half fixed, half random), capped at 15 s.
    const base = Math.min(15000, 500 * 2 ** this.attempt++);
    this.retryTimer = setTimeout(() => this.open(), base / 2 + Math.random() * base / 2);
  }

  replace() {
    // Drop a socket that looks alive to the browser but is not, and dial again right away.
    const old = this.ws;
    this.ws = null;
    try { old.close(); } catch { /* already closing */ }
    this.attempt = 0;
    this.onStatus("reconnecting");
    this.open();
  }

  checkAlive(now = false) {
    if (this.closed) return;
    const ws = this.ws;
    if (!ws || ws.readyState === WebSocket.CLOSED || ws.readyState === WebSocket.CLOSING) {
      if (now) this.replace();
      return;
    }
    if (ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - this.lastFrameAt > DEAD_AFTER_MS) {
      this.replace();
      return;
    }
    ws.send(JSON.stringify({ type: "ping" }));
  }

  send(frame) {
    const text = JSON.stringify(frame);
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(text);
    else this.queue.push(text);
  }

  close() {
    this.closed = true;
    clearInterval(this.pinger);
    clearTimeout(this.retryTimer);
    document.removeEventListener("visibilitychange", this.wake);
    window.removeEventListener("online", this.wake);
    if (this.ws) this.ws.close();
  }
}
