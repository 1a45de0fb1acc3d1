// In-memory stand-ins for what the client touches in a page: a manual clock, WebSocket,
// EventSource, fetch, storage, window/document events, BroadcastChannel and Web Locks.
// Every "tab" gets its own env; tabs of one test share a clock and a Bus.

export async function flush(rounds = 8) {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}

export class Clock {
  constructor() {
    this.t = 1_000_000;
    this.seq = 0;
    this.timers = new Map();
    this.delays = []; // every setTimeout delay asked for, for backoff assertions
  }
  now() {
    return this.t;
  }
  setTimeout(fn, ms) {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + Math.max(0, ms || 0), fn, ms: ms || 0 });
    this.delays.push(ms || 0);
    return id;
  }
  clearTimeout(id) {
    this.timers.delete(id);
  }
  pending() {
    return [...this.timers.values()].map((t) => t.at - this.t).sort((a, b) => a - b);
  }
  /** Runs every timer due within `ms`, in time order, letting promises settle in between. */
  async advance(ms) {
    const target = this.t + ms;
    for (;;) {
      await flush();
      let next = null;
      let nextId = null;
      for (const [id, t] of this.timers) {
        if (t.at <= target && (!next || t.at < next.at || (t.at === next.at && id < nextId))) {
          next = t;
          nextId = id;
        }
      }
      if (!next) break;
      this.timers.delete(nextId);
      this.t = next.at;
      next.fn();
    }
    this.t = target;
    await flush();
  }
}

export class MemoryStorage {
  constructor() {
    this.map = new Map();
  }
  getItem(k) {
    return this.map.has(k) ? this.map.get(k) : null;
  }
  setItem(k, v) {
    this.map.set(k, String(v));
  }
  removeItem(k) {
    this.map.delete(k);
  }
}

export class Events {
  constructor() {
    this.listeners = new Map();
    this.visibilityState = "visible";
  }
  addEventListener(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
  }
  removeEventListener(type, fn) {
    const s = this.listeners.get(type);
    if (s) s.delete(fn);
  }
  dispatch(type, ev = {}) {
    for (const fn of [...(this.listeners.get(type) || [])]) fn({ type, ...ev });
  }
  count(type) {
    return (this.listeners.get(type) || new Set()).size;
  }
}

export function makeWebSocket(log) {
  return class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedByClient = null;
      this.onopen = this.onmessage = this.onerror = this.onclose = null;
      log.push(this);
    }
    send(data) {
      if (this.readyState !== 1) throw new Error("InvalidStateError");
      this.sent.push(JSON.parse(data));
    }
    close(code) {
      this.closedByClient = code || 1000;
      if (this.readyState === 3) return;
      this.readyState = 3;
      const h = this.onclose;
      if (h) setImmediate(() => h({ code: 1000 }));
    }
    // test controls
    _open() {
      this.readyState = 1;
      if (this.onopen) this.onopen({});
    }
    _frame(obj) {
      if (this.onmessage) this.onmessage({ data: JSON.stringify(obj) });
    }
    _close(code = 1006) {
      this.readyState = 3;
      if (this.onerror && code === 1006) this.onerror({});
      if (this.onclose) this.onclose({ code });
    }
  };
}

export function makeEventSource(log) {
  return class FakeEventSource {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.onopen = this.onmessage = this.onerror = null;
      this.listeners = new Map();
      this.closed = false;
      log.push(this);
    }
    addEventListener(type, fn) {
      this.listeners.set(type, fn);
    }
    close() {
      this.closed = true;
      this.readyState = 2;
    }
    get query() {
      return new URL(this.url).searchParams;
    }
    // test controls
    _open() {
      this.readyState = 1;
      if (this.onopen) this.onopen({});
    }
    _message(obj, lastEventId = "") {
      if (this.onmessage) this.onmessage({ data: JSON.stringify(obj), lastEventId });
    }
    _event(type, lastEventId) {
      const fn = this.listeners.get(type);
      if (fn) fn({ type, data: "", lastEventId });
    }
    /** readyState 0: the browser retries by itself; 2: it gave up (non-200). */
    _error(readyState = 2) {
      this.readyState = readyState;
      if (this.onerror) this.onerror({});
    }
  };
}

/** fetch whose answer is `status(url)`; 0 means a network error. */
export function makeFetch(status, log) {
  return async (url) => {
    log.push(url);
    const s = typeof status === "function" ? status(url) : status;
    if (!s) throw new TypeError("network error");
    return { status: s, body: { cancel: async () => {} } };
  };
}

export class ConsoleSpy {
  constructor() {
    this.lines = [];
    for (const k of ["log", "info", "debug", "warn", "error"]) {
      this[k] = (...args) => this.lines.push(k + ": " + args.map((a) => (typeof a === "string" ? a : JSON.stringify(a))).join(" "));
    }
  }
  text() {
    return this.lines.join("\n");
  }
}

/** What the tabs of one test share: BroadcastChannel delivery and Web Locks. */
export class Bus {
  constructor() {
    this.channels = new Set();
    this.locks = new Map(); // name -> {holder, queue: [{tab, grant, reject}]}
  }
  channelClass(tab) {
    const bus = this;
    return class FakeBroadcastChannel {
      constructor(name) {
        this.name = name;
        this.tab = tab;
        this.onmessage = null;
        this.closed = false;
        bus.channels.add(this);
      }
      postMessage(data) {
        if (this.closed || tab.dead) return;
        const copy = structuredClone(data);
        for (const ch of bus.channels) {
          if (ch !== this && ch.name === this.name && !ch.closed && !ch.tab.dead) {
            setImmediate(() => {
              if (!ch.closed && !ch.tab.dead && ch.onmessage) ch.onmessage({ data: copy });
            });
          }
        }
      }
      close() {
        this.closed = true;
        bus.channels.delete(this);
      }
    };
  }
  locksFor(tab) {
    const bus = this;
    return {
      request(name, opts, cb) {
        return new Promise((resolve, reject) => {
          let entry = bus.locks.get(name);
          if (!entry) bus.locks.set(name, (entry = { holder: null, queue: [] }));
          const req = { tab, cb, resolve, reject };
          if (opts && opts.signal) {
            opts.signal.addEventListener("abort", () => {
              const i = entry.queue.indexOf(req);
              if (i >= 0) {
                entry.queue.splice(i, 1);
                reject(new Error("AbortError"));
              }
            });
          }
          entry.queue.push(req);
          bus.grant(name);
        });
      },
    };
  }
  grant(name) {
    const entry = this.locks.get(name);
    if (!entry || entry.holder || !entry.queue.length) return;
    const req = entry.queue.shift();
    if (req.tab.dead) return this.grant(name);
    entry.holder = req;
    Promise.resolve()
      .then(() => req.cb({ name }))
      .then(
        (v) => this.release(name, req, v),
        (e) => this.release(name, req, e),
      );
  }
  release(name, req, v) {
    const entry = this.locks.get(name);
    if (!entry || entry.holder !== req) return;
    entry.holder = null;
    req.resolve(v);
    this.grant(name);
  }
  /** A tab goes away: its channels go quiet, its locks are released. */
  kill(tab) {
    tab.dead = true;
    for (const [name, entry] of this.locks) {
      entry.queue = entry.queue.filter((r) => r.tab !== tab);
      if (entry.holder && entry.holder.tab === tab) {
        entry.holder = null;
        this.grant(name);
      }
    }
  }
}

/**
 * A fake page environment for createClient(env). Options: clock, bus, fetchStatus,
 * sessionStorage, localStorage, shared (BroadcastChannel + locks from bus), noLocks.
 */
export function fakeEnv(opts = {}) {
  const clock = opts.clock || new Clock();
  const tab = { dead: false };
  const sockets = [];
  const sources = [];
  const fetches = [];
  const win = new Events();
  const doc = new Events();
  const consoleSpy = new ConsoleSpy();
  let fetchStatus = opts.fetchStatus ?? 200;
  const env = {
    WebSocket: makeWebSocket(sockets),
    EventSource: makeEventSource(sources),
    fetch: makeFetch((url) => (typeof fetchStatus === "function" ? fetchStatus(url) : fetchStatus), fetches),
    AbortController,
    BroadcastChannel: opts.bus && !opts.noBroadcast ? opts.bus.channelClass(tab) : undefined,
    locks: opts.bus && !opts.noLocks ? opts.bus.locksFor(tab) : undefined,
    sessionStorage: opts.sessionStorage || new MemoryStorage(),
    localStorage: opts.localStorage || new MemoryStorage(),
    window: win,
    document: doc,
    location: undefined,
    console: consoleSpy,
    setTimeout: (fn, ms) => clock.setTimeout(() => !tab.dead && fn(), ms),
    clearTimeout: (id) => clock.clearTimeout(id),
    now: () => clock.now(),
    random: opts.random || (() => 0.5),
    reportError: (e) => {
      throw e;
    },
    defaultUrl: () => undefined,
  };
  if (opts.noWebSocket) env.WebSocket = undefined;
  return {
    env,
    clock,
    tab,
    sockets,
    sources,
    fetches,
    win,
    doc,
    console: consoleSpy,
    setFetchStatus(s) {
      fetchStatus = s;
    },
    lastSocket() {
      return sockets[sockets.length - 1];
    },
    lastSource() {
      return sources[sources.length - 1];
    },
  };
}

/** A syntactically real token (hex JSON . hex signature) with the given claims; the signature is fake. */
export function fakeToken(topic, expires = Math.floor(Date.now() / 1000) + 3600, userId = 1) {
  const json = JSON.stringify({ user_id: userId, topic, expires });
  return Buffer.from(json).toString("hex") + "." + "ab".repeat(32);
}
