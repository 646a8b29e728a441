// One websocket per open conversation. Reconnects by itself with backoff and jitter, and on
// every (re)connect the server sends the reply's state, so nothing has to be replayed from memory.
export class ConversationSocket {
  constructor(conversationId, { onFrame, onStatus }) {
    this.url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/conversations/${conversationId}/`;
    this.onFrame = onFrame;
    this.onStatus = onStatus;
    this.attempt = 0;
    this.queue = [];
    this.closed = false;
    this.open();
  }

  open() {
    this.ws = new WebSocket(this.url);
    this.ws.addEventListener("open", () => {
      this.attempt = 0;
      this.onStatus("open");
      for (const frame of this.queue.splice(0)) this.ws.send(frame);
    });
    this.ws.addEventListener("message", (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      this.onFrame(frame);
    });
    this.ws.addEventListener("close", (event) => {
      if (this.closed) return;
      if (event.code === 4401 || event.code === 4403) {
        this.onStatus("refused");
        return;
      }
      this.onStatus("reconnecting");
      const base = Math.min(15000, 500 * 2 ** this.attempt++);
      setTimeout(() => this.open(), base / 2 + Math.random() * base / 2);
    });
  }

  send(frame) {
    const text = JSON.stringify(frame);
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(text);
    else this.queue.push(text);
  }

  close() {
    this.closed = true;
    this.ws.close();
  }
}
