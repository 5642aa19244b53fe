// scribe-events browser client: one ES module, no build step, no dependencies.
//
//   import { ScribeEvents } from "/static/scribe-events.js";
//   const events = new ScribeEvents({ baseUrl: "", getToken: () => myToken });
//   events.on("task.progress-updated", (e) => bar(e.task_id, e.data.progress));
//   events.on("statuschange", ({ status, previous }) => indicator(status));
//   ...
//   events.close(); // on logout
//
// What it does (see the README of scribe-events for the protocol):
// - connects with a single-use ticket (EventSource cannot send headers), a new one per attempt;
// - hands every envelope to on(type) and on("*") handlers, in id order, each once (duplicates by
//   envelope id are dropped: a system.error that overtook comes again, replays overlap). On the
//   stream "*" sees the built-in types and every type a handler was added for (EventSource has no
//   wildcard); polling sees everything;
// - reconnects with exponential backoff and jitter, resuming after the last id; after
//   reconnect.max_retries failed tries, or without EventSource, it polls GET /api/v1/events and
//   keeps trying the stream in the background, switching back when it works;
// - treats a stream without a heartbeat for two intervals as dead;
// - tries at once when the browser comes back online; keeps the stream in a hidden tab;
// - shares ONE server connection between the tabs of an origin: a leader tab (Web Locks, or a
//   BroadcastChannel election where those are missing) holds it and relays events to the others;
//   when the leader closes another takes over and resumes from the last id;
// - honours the push mode (GET /api/v1/events/config and system.push-mode events);
// - can deliver handler calls in animation-frame or time-window batches;
// - close() ends the stream, every timer and every request.

/** @typedef {{id: string, type: string, time: string, data: Object, task_id?: string, novel_id?: string, session_id?: string}} Envelope */
/** @typedef {"connecting"|"open"|"reconnecting"|"polling"|"closed"} Status */
/**
 * @typedef {Object} Options
 * @property {string} [baseUrl] where the service is ("" for this origin)
 * @property {() => (string|Promise<string>)} getToken the user's bearer token (called for every ticket and poll)
 * @property {string} [sessionId] only this session of the user (default: the token's)
 * @property {string} [types] comma-separated type globs, e.g. "task.*,content.*"
 * @property {string} [lastEventId] resume after this id (default: from now)
 * @property {"frame"|number|null} [batch] deliver handler calls per animation frame, or per window of N ms
 * @property {boolean} [shareTabs] one connection for all tabs of this origin (default true)
 * @property {string} [channel] the name tabs share (default "scribe-events:" + baseUrl)
 */

const DEFAULTS = {
  mode: "sse",
  poll_interval_s: 30,
  heartbeat_interval_s: 30,
  reconnect: { max_retries: 5, initial_delay_ms: 1000, max_delay_ms: 30000 },
};
const SEEN_MAX = 2000; // envelope ids remembered for de-duplication

export class ScribeEvents {
  /** @param {Options} options */
  constructor(options) {
    if (!options || typeof options.getToken !== "function") throw new TypeError("getToken is required");
    this.baseUrl = (options.baseUrl || "").replace(/\/$/, "");
    this.getToken = options.getToken;
    this.sessionId = options.sessionId || null;
    this.types = options.types || null;
    this.batch = options.batch ?? null;
    /** @type {Status} */
    this.status = "connecting";
    /** the newest stored id delivered in order (null: none yet) */
    this.lastEventId = options.lastEventId ?? null;
    this.config = DEFAULTS;
    this.leader = false;
    this._handlers = new Map();
    this._seen = new Set();
    this._seenOrder = [];
    this._timers = new Set();
    this._aborts = new Set();
    this._queue = [];
    this._flushScheduled = false;
    this._es = null;
    this._failures = 0;
    this._closed = false;
    this._pollTimer = null;
    this._stallTimer = null;
    this._retryTimer = null;
    this._tabId = Math.random().toString(36).slice(2) + Date.now().toString(36);
    this._channelName = options.channel || "scribe-events:" + (this.baseUrl || location.origin);
    this._share = options.shareTabs !== false && typeof BroadcastChannel === "function";
    this._onOnline = () => this._online();
    addEventListener("online", this._onOnline);
    if (this._share) this._joinTabs();
    else this._lead();
  }

  /**
   * Handle envelopes of one type, of every type ("*"), a batch of them ("batch", with batching on),
   * status changes ("statuschange": {status, previous}) or the next try being planned ("retry":
   * {attempt, delay_ms, status}). Returns a function that removes the handler.
   * @param {string} type @param {(value: any) => void} handler
   */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    if (this._listenAll && !NOT_EVENTS.has(type)) this._listenAll(type);
    return () => this.off(type, handler);
  }

  off(type, handler) {
    this._handlers.get(type)?.delete(handler);
  }

  /** End everything: the stream, every timer and request, the tab sharing. */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._stopStream();
    this._stopPolling();
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    for (const a of this._aborts) a.abort();
    this._aborts.clear();
    removeEventListener("online", this._onOnline);
    if (this._bc) {
      if (this.leader) this._bc.postMessage({ kind: "bye", from: this._tabId });
      this._bc.close();
      this._bc = null;
    }
    if (this._releaseLock) this._releaseLock();
    else if (this._lockAbort) this._lockAbort.abort(); // a tab still waiting to lead
    this._setStatus("closed");
  }

  // -- tabs: one leader holds the connection -------------------------------------------------------

  _joinTabs() {
    this._bc = new BroadcastChannel(this._channelName);
    this._bc.onmessage = (m) => this._fromTab(m.data);
    if (navigator.locks && navigator.locks.request) {
      this._lockAbort = new AbortController();
      navigator.locks
        .request(this._channelName, { signal: this._lockAbort.signal }, () => {
          if (this._closed) return undefined;
          this._lead();
          return new Promise((resolve) => (this._releaseLock = resolve)); // held until close()
        })
        .catch(() => {});
      this._bc.postMessage({ kind: "hello", from: this._tabId });
    } else {
      this._elect();
    }
  }

  /** Without Web Locks: the leader says it is alive every second; silence for 2.5 s, a tab takes over. */
  _elect() {
    // Give a leader that exists a chance to answer the hello before claiming the connection.
    this._leaderSeen = Date.now() - 1500;
    this._bc.postMessage({ kind: "hello", from: this._tabId });
    const check = () => {
      if (this._closed) return;
      if (!this.leader && Date.now() - this._leaderSeen > 2500) this._lead();
      if (this.leader) this._bc?.postMessage({ kind: "alive", from: this._tabId, status: this.status, last_event_id: this.lastEventId });
      this._later(check, 1000);
    };
    this._later(check, 1000 + Math.random() * 500);
  }

  _fromTab(msg) {
    if (!msg || this._closed || msg.from === this._tabId) return;
    // A tab that has seen no event yet takes over from where the leader's stream is.
    if (!this.leader && this.lastEventId == null && msg.last_event_id != null) this.lastEventId = msg.last_event_id;
    if (msg.kind === "event" && !this.leader) this._accept(msg.envelope, msg.ordered);
    else if (msg.kind === "status" && !this.leader) this._setStatus(msg.status);
    else if (msg.kind === "hello" && this.leader) this._bc.postMessage({ kind: "alive", from: this._tabId, status: this.status, last_event_id: this.lastEventId });
    else if (msg.kind === "alive") {
      if (this.leader && msg.from < this._tabId) this._abdicate(); // two leaders: the smaller id keeps it
      else if (!this.leader) {
        this._leaderSeen = Date.now();
        this._setStatus(msg.status);
      }
    } else if (msg.kind === "bye" && !this.leader) this._leaderSeen = 0;
  }

  _abdicate() {
    this.leader = false;
    this._leaderSeen = Date.now();
    this._stopStream();
    this._stopPolling();
  }

  async _lead() {
    if (this._closed || this.leader) return;
    this.leader = true;
    await this._loadConfig();
    this._start();
  }

  // -- config and push mode ------------------------------------------------------------------------

  async _loadConfig() {
    try {
      const r = await this._fetch("/api/v1/events/config");
      if (r.ok) {
        const c = await r.json();
        this.config = { ...DEFAULTS, ...c, reconnect: { ...DEFAULTS.reconnect, ...(c.reconnect || {}) } };
      }
    } catch (_) {
      /* the defaults will do until the next try */
    }
  }

  _start() {
    if (this._closed || !this.leader) return;
    if (this.config.mode === "polling" || typeof EventSource !== "function") {
      this._stopStream();
      this._startPolling();
    } else {
      this._connect();
    }
  }

  _pushMode(data) {
    if (!data || (data.mode !== "sse" && data.mode !== "polling")) return;
    this.config = { ...this.config, mode: data.mode, poll_interval_s: data.poll_interval_s || this.config.poll_interval_s };
    if (!this.leader) return;
    if (data.mode === "polling") {
      this._stopStream();
      this._startPolling();
    } else {
      this._stopPolling();
      this._failures = 0;
      this._connect();
    }
  }

  // -- the stream ----------------------------------------------------------------------------------

  async _connect() {
    if (this._closed || !this.leader || this._es) return;
    this._clear(this._retryTimer);
    if (this.status !== "polling") this._setStatus(this._failures === 0 && !this._everOpen ? "connecting" : "reconnecting");
    let ticket;
    try {
      const r = await this._fetch("/api/v1/events/tickets", { method: "POST" });
      if (!r.ok) throw new Error("ticket: " + r.status);
      ticket = (await r.json()).ticket;
    } catch (_) {
      return this._failed();
    }
    if (this._closed || !this.leader || this._es || this.config.mode === "polling") return;
    const q = new URLSearchParams({ ticket });
    if (this.lastEventId != null) q.set("last_event_id", this.lastEventId);
    if (this.sessionId) q.set("session_id", this.sessionId);
    if (this.types) q.set("types", this.types);
    const es = new EventSource(this.baseUrl + "/api/v1/events/stream?" + q);
    this._es = es;
    const onMessage = (m) => this._fromStream(m);
    es.addEventListener("connection.established", (m) => {
      this._failures = 0;
      this._comeBackAfter = null; // a restart notice is for the stream it came on only
      this._everOpen = true;
      this._stopPolling();
      try {
        const hello = JSON.parse(m.data);
        this.config = { ...this.config, heartbeat_interval_s: hello.heartbeat_interval_s || this.config.heartbeat_interval_s };
        // A client that has seen nothing yet resumes from where this stream began.
        if (this.lastEventId == null && hello.last_event_id != null) this.lastEventId = hello.last_event_id;
        this._bc?.postMessage({ kind: "status", from: this._tabId, status: this.status, last_event_id: this.lastEventId });
      } catch (_) {}
      this._alive();
      this._setStatus("open");
    });
    es.addEventListener("heartbeat", () => this._alive());
    // The server restarts: it says when to come back (spread, so its clients do not all return at once).
    es.addEventListener("connection.closing", (m) => {
      const after = safeJson(m.data)?.reconnect_after_ms;
      if (Number.isFinite(after) && after >= 0) this._comeBackAfter = Math.min(after, 60 * 1000);
    });
    es.addEventListener("replay.truncated", (m) => {
      this._alive();
      this._emit("replay.truncated", safeJson(m.data));
    });
    es.onmessage = onMessage;
    es.onerror = () => {
      if (this._es !== es) return;
      this._stopStream(); // never the browser's own retry: a new ticket is needed
      this._failed();
    };
    // Named events: EventSource has no catch-all, so listen to the types the page asked for
    // through a generic hook: every frame has an event name, dispatched to listeners by name.
    this._knownTypes = new Set();
    this._listenAll = (type) => {
      if (this._knownTypes.has(type)) return;
      this._knownTypes.add(type);
      es.addEventListener(type, onMessage);
    };
    for (const t of [...BUILTIN_TYPES, ...this._handlers.keys()]) if (!NOT_EVENTS.has(t)) this._listenAll(t);
  }

  _fromStream(m) {
    this._alive();
    const envelope = safeJson(m.data);
    if (!envelope || typeof envelope.id !== "string") return;
    // Ordered events carry an id: line, so the browser's lastEventId is the envelope's id.
    this._accept(envelope, m.lastEventId === envelope.id);
  }

  _alive() {
    this._clear(this._stallTimer);
    const ms = 2 * 1000 * (this.config.heartbeat_interval_s || 30);
    this._stallTimer = this._later(() => {
      if (!this._es) return;
      this._stopStream(); // no heartbeat for two intervals: the stream is dead
      this._failed();
    }, ms);
  }

  _failed() {
    if (this._closed || !this.leader) return;
    if (this._comeBackAfter != null) {
      // A planned restart, not a failure: come back when the server said, once.
      const delay = this._comeBackAfter;
      this._comeBackAfter = null;
      this._setStatus("reconnecting");
      this.lastDelayMs = delay;
      for (const h of this._handlers.get("retry") || []) safeCall(h, { attempt: 0, delay_ms: Math.round(delay), status: this.status });
      this._clear(this._retryTimer);
      this._retryTimer = this._later(() => this._connect(), delay);
      return;
    }
    this._failures += 1;
    const rc = this.config.reconnect;
    if (this._failures > rc.max_retries && this.status !== "polling") this._startPolling();
    else if (this.status !== "polling") this._setStatus("reconnecting");
    const base = Math.min(rc.max_delay_ms, rc.initial_delay_ms * 2 ** Math.min(this._failures - 1, 20));
    const delay = this.status === "polling" ? rc.max_delay_ms : base * (0.5 + Math.random() / 2);
    this.lastDelayMs = delay;
    for (const h of this._handlers.get("retry") || []) safeCall(h, { attempt: this._failures, delay_ms: Math.round(delay), status: this.status });
    this._clear(this._retryTimer);
    this._retryTimer = this._later(() => this._connect(), delay);
  }

  _online() {
    if (this._closed || !this.leader || this._es || this.config.mode === "polling") return;
    this._failures = Math.min(this._failures, 1);
    this._clear(this._retryTimer);
    this._connect();
    if (this.status === "polling") this._poll();
  }

  _stopStream() {
    this._clear(this._stallTimer);
    this._clear(this._retryTimer);
    if (this._es) {
      this._es.onerror = null;
      this._es.close();
      this._es = null;
    }
  }

  // -- polling -------------------------------------------------------------------------------------

  _startPolling() {
    this._setStatus("polling");
    if (this._pollTimer == null) this._poll();
  }

  _stopPolling() {
    this._clear(this._pollTimer);
    this._pollTimer = null;
  }

  async _poll() {
    this._clear(this._pollTimer);
    this._pollTimer = -1; // polling, a request on its way
    try {
      const q = new URLSearchParams({ limit: "500" });
      if (this.lastEventId != null) q.set("after", this.lastEventId);
      if (this.sessionId) q.set("session_id", this.sessionId);
      if (this.types) q.set("types", this.types);
      const r = await this._fetch("/api/v1/events?" + q);
      if (r.ok && this._pollTimer != null) {
        const body = await r.json();
        for (const e of body.events || []) this._accept(e, true);
        if (body.truncated) this._emit("replay.truncated", { last_event_id: this.lastEventId, oldest_available: null });
        if (this.lastEventId == null || body.truncated) this.lastEventId = body.last_id;
        if (body.mode && body.mode !== this.config.mode) this._pushMode({ mode: body.mode, poll_interval_s: body.poll_interval_s });
        if ((body.events || []).length >= 500 && this._pollTimer != null) return this._poll();
      }
    } catch (_) {
      /* the next poll tries again */
    }
    if (this._pollTimer == null || this._closed) return;
    this._pollTimer = this._later(() => this._poll(), 1000 * (this.config.poll_interval_s || 30));
  }

  // -- delivery ------------------------------------------------------------------------------------

  /** One envelope from the stream, a poll or the leader tab: de-duplicated, in id order. */
  _accept(envelope, ordered) {
    const id = envelope.id;
    const stored = /^\d+$/.test(id);
    if (ordered && stored) {
      if (this.lastEventId != null && BigInt(id) <= BigInt(this.lastEventId)) return;
      this.lastEventId = id;
    }
    if (this._seen.has(id)) return;
    this._seen.add(id);
    this._seenOrder.push(id);
    if (this._seenOrder.length > SEEN_MAX) this._seen.delete(this._seenOrder.shift());
    if (this.leader && this._bc) this._bc.postMessage({ kind: "event", from: this._tabId, envelope, ordered });
    if (envelope.type === "system.push-mode") this._pushMode(envelope.data);
    this._emit(envelope.type, envelope);
  }

  _emit(type, envelope) {
    if (this.batch == null) return this._call(type, envelope);
    this._queue.push([type, envelope]);
    if (this._flushScheduled) return;
    this._flushScheduled = true;
    const flush = () => {
      this._flushScheduled = false;
      const queue = this._queue;
      this._queue = [];
      for (const [t, e] of queue) this._call(t, e);
      for (const h of this._handlers.get("batch") || []) safeCall(h, queue.map(([, e]) => e));
    };
    if (this.batch === "frame" && typeof requestAnimationFrame === "function") requestAnimationFrame(flush);
    else this._later(flush, typeof this.batch === "number" ? this.batch : 16);
  }

  _call(type, envelope) {
    for (const h of this._handlers.get(type) || []) safeCall(h, envelope);
    if (type !== "replay.truncated") for (const h of this._handlers.get("*") || []) safeCall(h, envelope);
  }

  _setStatus(status) {
    if (status === this.status) return;
    const previous = this.status;
    this.status = status;
    for (const h of this._handlers.get("statuschange") || []) safeCall(h, { status, previous });
    if (this.leader && this._bc) this._bc.postMessage({ kind: "status", from: this._tabId, status, last_event_id: this.lastEventId });
  }

  // -- plumbing ------------------------------------------------------------------------------------

  async _fetch(path, init = {}) {
    const token = await this.getToken();
    const abort = new AbortController();
    this._aborts.add(abort);
    try {
      return await fetch(this.baseUrl + path, {
        ...init,
        signal: abort.signal,
        headers: { Authorization: "Bearer " + token, ...(init.headers || {}) },
      });
    } finally {
      this._aborts.delete(abort);
    }
  }

  _clear(t) {
    if (t == null || t === -1) return;
    clearTimeout(t);
    this._timers.delete(t);
  }

  _later(fn, ms) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      if (!this._closed) fn();
    }, ms);
    this._timers.add(t);
    return t;
  }
}

// Every type the service sends, so the stream listens to them all (EventSource has no wildcard);
// custom types are listened to as soon as a handler for them is added with on().
// Handler keys that are not event types.
const NOT_EVENTS = new Set(["*", "statuschange", "retry", "batch", "replay.truncated"]);

const BUILTIN_TYPES = [
  "task.progress-started",
  "task.progress-updated",
  "task.progress-heartbeat",
  "task.progress-completed",
  "task.progress-failed",
  "content.novel-created",
  "content.chapter-updated",
  "workflow.status-changed",
  "system.notification",
  "system.error",
  "system.push-mode",
];

function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch (_) {
    return null;
  }
}

function safeCall(handler, value) {
  try {
    handler(value);
  } catch (err) {
    setTimeout(() => {
      throw err;
    }); // reported, but never stops the other handlers
  }
}
