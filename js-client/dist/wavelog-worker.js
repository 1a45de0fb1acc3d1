/*! wavelog-worker client 0.1.0 | built from js-client/src by build.mjs: do not edit */
(function (root) {
  "use strict";
  // wavelog-worker browser client: one subscribe() that picks WebSocket or SSE, reconnects with
  // backoff, resumes by event id, and can share one connection across the tabs of an origin.
  // Plain modern JavaScript, no dependencies. The wire protocol is docs/protocol.md.
  //
  // This file is the ES module; build.mjs derives the classic script (window.WavelogWorker) from it.
  // Keep every `export` in the block at the end of the file.

  const VERSION = "0.1.0";

  const DEFAULTS = {
    /** A WebSocket must see auth_ok, an EventSource its open, within this many ms. */
    connectTimeout: 6000,
    /** Reconnect delays: full jitter between minDelay and min(maxDelay, baseDelay * 2^attempt). */
    minDelay: 500,
    baseDelay: 1000,
    maxDelay: 30000,
    /** A connection open this long counts as stable: the next reconnect starts the backoff anew. */
    stableAfter: 10000,
    /** A new leader of shared tabs waits this long for the other tabs' subscriptions. */
    gatherDelay: 150,
    debug: false,
  };
  const TUNABLES = ["connectTimeout", "minDelay", "baseDelay", "maxDelay", "stableAfter", "gatherDelay", "debug"];
  /** A token this close to its `expires` is renewed with getToken before it is used. */
  const TOKEN_MARGIN_MS = 10000;
  /** How long a leader waits for another tab to hand over a token. */
  const TOKEN_REQUEST_TIMEOUT = 10000;
  const WS_OPEN = 1;
  const ES_CONNECTING = 0;

  // ---------------------------------------------------------------------------------------------
  // Small pure helpers (exported for tests and for Node users).

  /** The reconnect delay for `attempt` (0-based): full jitter, bounded by minDelay..maxDelay. */
  function backoffDelay(attempt, random = Math.random, opts = DEFAULTS) {
    const o = { ...DEFAULTS, ...opts };
    const ceiling = Math.min(o.maxDelay, o.baseDelay * 2 ** Math.min(Math.max(attempt, 0), 30));
    const floor = Math.min(o.minDelay, ceiling);
    let r = Number(random());
    if (!(r >= 0)) r = 0;
    if (r >= 1) r = 0.999999;
    return Math.round(floor + r * (ceiling - floor));
  }

  class Backoff {
    constructor(opts, random) {
      this.opts = opts;
      this.random = random;
      this.attempt = 0;
    }
    next() {
      return backoffDelay(this.attempt++, this.random, this.opts);
    }
    reset() {
      this.attempt = 0;
    }
  }

  /** `"<epoch>-<seq>"` -> {epoch, seq}, or null for anything else. */
  function parseEventId(id) {
    if (typeof id !== "string") return null;
    const s = id.trim();
    const i = s.lastIndexOf("-");
    if (i <= 0 || i === s.length - 1) return null;
    const digits = s.slice(i + 1);
    if (!/^\d+$/.test(digits)) return null;
    const seq = Number(digits);
    if (!Number.isSafeInteger(seq)) return null;
    return { epoch: s.slice(0, i), seq };
  }

  /** Whether event `id` comes after `last` (true when they can't be compared: another epoch). */
  function isNewer(id, last) {
    if (!last) return true;
    if (!id) return false;
    const a = parseEventId(id);
    const b = parseEventId(last);
    if (!a || !b || a.epoch !== b.epoch) return true;
    return a.seq > b.seq;
  }

  /** The WebSocket and HTTP bases of a worker URL given as ws(s):// or http(s)://. */
  function deriveUrls(url, base) {
    if (typeof url !== "string" || !url.trim()) {
      throw new TypeError("WavelogWorker.subscribe: `url` is required (or set window.WavelogWorker.url)");
    }
    let u;
    try {
      u = base ? new URL(url.trim(), base) : new URL(url.trim());
    } catch {
      throw new TypeError("WavelogWorker.subscribe: `url` is not a valid URL");
    }
    const scheme = u.protocol;
    if (!["ws:", "wss:", "http:", "https:"].includes(scheme)) {
      throw new TypeError("WavelogWorker.subscribe: `url` must be ws://, wss://, http:// or https://");
    }
    const secure = scheme === "wss:" || scheme === "https:";
    // "wss://host:9000", "https://host/worker/", "wss://host/worker/ws" all name the same worker.
    const path = u.pathname.replace(/\/+$/, "").replace(/\/(ws|sse)$/, "");
    const http = (secure ? "https://" : "http://") + u.host + path;
    const ws = (secure ? "wss://" : "ws://") + u.host + path;
    return { ws, http, key: http };
  }

  function decodeHex(hex) {
    const bytes = new Uint8Array(hex.length / 2);
    for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(hex.substr(i * 2, 2), 16);
    return new TextDecoder().decode(bytes);
  }

  function decodeBase64Url(s) {
    const b64 = s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4);
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new TextDecoder().decode(bytes);
  }

  /** The `expires` (unix seconds) of a worker token, or null. The signature is not checked here. */
  function tokenExpiry(token) {
    if (typeof token !== "string") return null;
    const part = token.split(".")[0];
    const tries = [];
    if (/^(?:[0-9a-fA-F]{2})+$/.test(part)) tries.push(decodeHex);
    if (/^[A-Za-z0-9_-]+$/.test(part)) tries.push(decodeBase64Url);
    for (const decode of tries) {
      try {
        const claims = JSON.parse(decode(part));
        const e = Number(claims && claims.expires);
        if (Number.isFinite(e)) return e;
      } catch {
        // not this encoding
      }
    }
    return null;
  }

  function expiresSoon(token, now) {
    const e = tokenExpiry(token);
    return e !== null && e * 1000 - now < TOKEN_MARGIN_MS;
  }

  /** A random id for tabs and requests (crypto where available: env.random may be a test's constant). */
  function randomId(random) {
    const c = globalThis.crypto;
    if (c && typeof c.getRandomValues === "function") {
      const a = c.getRandomValues(new Uint32Array(3));
      return Array.from(a, (n) => n.toString(36)).join("");
    }
    return Math.floor(random() * 2 ** 52).toString(36) + Date.now().toString(36);
  }

  // ---------------------------------------------------------------------------------------------
  // Environment: everything the client touches in the page, injectable for tests and Node.

  function storageOf(getter) {
    try {
      const s = getter();
      if (!s) return null;
      const probe = "__wavelog_worker_probe__";
      s.setItem(probe, "1");
      s.removeItem(probe);
      return s;
    } catch {
      return null;
    }
  }

  function defaultEnv() {
    const g = globalThis;
    return {
      WebSocket: g.WebSocket,
      EventSource: g.EventSource,
      fetch: typeof g.fetch === "function" ? (...a) => g.fetch(...a) : undefined,
      AbortController: g.AbortController,
      BroadcastChannel: g.BroadcastChannel,
      locks: g.navigator && g.navigator.locks ? g.navigator.locks : undefined,
      sessionStorage: storageOf(() => g.sessionStorage),
      localStorage: storageOf(() => g.localStorage),
      window: typeof g.addEventListener === "function" ? g : undefined,
      document: g.document,
      location: g.location,
      console: g.console,
      setTimeout: (f, ms) => g.setTimeout(f, ms),
      clearTimeout: (t) => g.clearTimeout(t),
      now: () => Date.now(),
      random: () => Math.random(),
      reportError: typeof g.reportError === "function" ? (e) => g.reportError(e) : undefined,
      defaultUrl: () => {
        const w = g.WavelogWorker;
        return w && typeof w.url === "string" ? w.url : undefined;
      },
    };
  }

  function makeEnv(overrides) {
    const env = { ...defaultEnv(), ...(overrides || {}) };
    if (!env.reportError) {
      env.reportError = (e) => env.setTimeout(() => { throw e; }, 0);
    }
    return env;
  }

  /** Calls a user callback; an exception in it must not break the client. */
  function call(env, fn, ...args) {
    if (typeof fn !== "function") return;
    try {
      fn(...args);
    } catch (e) {
      env.reportError(e);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Connection: one transport (WebSocket or SSE) carrying a set of topics, with reconnect, resume,
  // fallback and the refusal flow. It knows topics, not subscribers: hooks report per topic.
  //
  // hooks: push(topic, payload, meta), resync(topic), state(topic, state), position(topic, id)
  // Topic sources: source(fresh) -> Promise<token|null>; fresh asks getToken for a new one.

  class Connection {
    constructor(env, urls, mode, opts, hooks) {
      this.env = env;
      this.urls = urls;
      this.mode = mode;
      this.o = opts;
      this.hooks = hooks;
      this.topics = new Map();
      this.cur = null; // the current transport attempt
      this.timer = null; // reconnect (backoff) timer
      this.kickTimer = null;
      this.busy = false; // fetching tokens, probing or asking for a fresh token
      this.backoff = new Backoff(opts, env.random);
      this.openedAt = 0;
      this.wsWorked = false;
      this.closed = false;
      this.storageKey = "wavelog-worker:transport:" + urls.key;
      this.transport = this.initialTransport();
      this.onOnline = () => this.wake("online");
      this.onVisible = () => {
        if (!env.document || env.document.visibilityState === "visible") this.wake("visible");
      };
      if (env.window) env.window.addEventListener("online", this.onOnline);
      if (env.document && typeof env.document.addEventListener === "function") {
        env.document.addEventListener("visibilitychange", this.onVisible);
      }
    }

    log(...args) {
      if (this.o.debug && this.env.console) this.env.console.debug("[wavelog-worker]", ...args);
    }

    initialTransport() {
      const { WebSocket, EventSource } = this.env;
      if (this.mode === "sse") return "sse";
      if (this.mode === "websocket") return "websocket";
      let remembered = null;
      try {
        remembered = this.env.sessionStorage && this.env.sessionStorage.getItem(this.storageKey);
      } catch {
        remembered = null;
      }
      if ((remembered === "sse" || !WebSocket) && EventSource) return "sse";
      return "websocket";
    }

    /** auto mode: WebSocket doesn't get through; use SSE for the rest of the page's life. */
    fallBackToSse() {
      this.log("WebSocket blocked on the way to the worker; falling back to SSE");
      this.transport = "sse";
      try {
        if (this.env.sessionStorage) this.env.sessionStorage.setItem(this.storageKey, "sse");
      } catch {
        // private mode etc.: remembered for this Connection only
      }
    }

    // ----- topic set

    setTopic(name, { source, lastId = null, started = false }) {
      if (this.closed) return;
      let T = this.topics.get(name);
      if (!T) {
        T = {
          name,
          source,
          token: null,
          lastId: lastId || null,
          started: !!started,
          state: null,
          refused: false,
          triedFresh: false,
          notFound: false,
          nfTimer: null,
          nfBackoff: new Backoff(this.o, this.env.random),
          suppressResync: false,
        };
        this.topics.set(name, T);
        this.setState(T, T.started ? "reconnecting" : "connecting");
        this.attach(T);
        return;
      }
      T.source = source;
      T.started = T.started || !!started;
      // Another tab may know an older position (it missed more): resume from the oldest.
      if (lastId && !this.cur && (!T.lastId || isNewer(T.lastId, lastId))) T.lastId = lastId;
      if (T.refused) {
        // A new subscriber brings a new token: try again.
        T.refused = false;
        T.triedFresh = false;
        T.token = null;
        this.setState(T, T.started ? "reconnecting" : "connecting");
        this.attach(T);
      }
    }

    removeTopic(name) {
      const T = this.topics.get(name);
      if (!T) return;
      this.topics.delete(name);
      if (T.nfTimer) this.env.clearTimeout(T.nfTimer);
      const c = this.cur;
      if (!this.live().length && ![...this.topics.values()].some((t) => t.notFound)) {
        this.stop();
        return;
      }
      if (!c) return;
      if (c.kind === "websocket") {
        if (c.authed && c.subs.has(name)) {
          c.subs.delete(name);
          this.send(c, { type: "unsubscribe", topic: name });
        }
      } else if (c.order.includes(name)) {
        this.reopenSseSoon();
      }
    }

    stateOf(name) {
      const T = this.topics.get(name);
      return T ? T.state : null;
    }

    lastIdOf(name) {
      const T = this.topics.get(name);
      return T ? T.lastId : null;
    }

    /** Topics that should be on the connection now. */
    live() {
      return [...this.topics.values()].filter((T) => !T.refused && !T.notFound);
    }

    isLive(T) {
      return this.topics.get(T.name) === T && !T.refused && !T.notFound;
    }

    setState(T, state) {
      if (T.state === state) return;
      T.state = state;
      this.log("topic", T.name, "->", state);
      this.hooks.state(T.name, state);
    }

    /** Open topics become reconnecting, others stay (re)connecting. */
    markLost() {
      for (const T of this.live()) this.setState(T, T.started ? "reconnecting" : "connecting");
    }

    /** Puts a (new or returning) topic on the connection. */
    attach(T) {
      if (this.closed || !this.isLive(T)) return;
      const c = this.cur;
      if (!c) {
        this.kick();
        return;
      }
      if (c.kind === "websocket") {
        if (c.authed) this.wsSubscribe(c, T);
      } else if (!c.order.includes(T.name)) {
        this.reopenSseSoon();
      }
    }

    // ----- lifecycle

    kick() {
      if (this.closed || this.cur || this.timer || this.kickTimer || this.busy) return;
      this.kickTimer = this.env.setTimeout(() => {
        this.kickTimer = null;
        this.connect();
      }, this.o.startDelay || 0);
    }

    /** Reconnect now if we are waiting out a backoff (online, tab visible again). */
    wake(why) {
      if (this.closed || !this.timer) return;
      this.log("reconnecting now:", why);
      this.env.clearTimeout(this.timer);
      this.timer = null;
      this.connect();
    }

    scheduleReconnect() {
      if (this.closed || this.cur || this.timer || this.busy) return;
      if (this.openedAt && this.env.now() - this.openedAt >= this.o.stableAfter) this.backoff.reset();
      this.openedAt = 0;
      this.markLost();
      if (!this.live().length) return;
      const delay = this.backoff.next();
      this.log("reconnect in", delay, "ms");
      this.timer = this.env.setTimeout(() => {
        this.timer = null;
        this.connect();
      }, delay);
    }

    /** Stops the transport and every timer; topics stay (used when nothing is left to carry). */
    stop() {
      if (this.timer) this.env.clearTimeout(this.timer);
      if (this.kickTimer) this.env.clearTimeout(this.kickTimer);
      this.timer = this.kickTimer = null;
      if (this.cur) {
        this.detach(this.cur);
        this.cur = null;
      }
    }

    close() {
      if (this.closed) return;
      this.closed = true;
      this.stop();
      for (const T of this.topics.values()) if (T.nfTimer) this.env.clearTimeout(T.nfTimer);
      if (this.env.window) this.env.window.removeEventListener("online", this.onOnline);
      if (this.env.document && typeof this.env.document.removeEventListener === "function") {
        this.env.document.removeEventListener("visibilitychange", this.onVisible);
      }
    }

    async connect() {
      if (this.closed || this.cur || this.busy) return;
      if (this.timer) {
        this.env.clearTimeout(this.timer);
        this.timer = null;
      }
      let ready;
      this.busy = true;
      try {
        ready = await this.prepareTokens();
      } finally {
        this.busy = false;
      }
      if (this.closed || this.cur || this.timer) return;
      if (ready === null) {
        this.scheduleReconnect();
        return;
      }
      if (!ready.length) return; // nothing to carry (all refused or not registered yet)
      if (this.transport === "sse") this.openSse(ready);
      else this.openWs(ready);
    }

    /** Asks every live topic's source for its token. null: a getToken failed (retry later). */
    async prepareTokens() {
      const asked = new Set();
      // Topics added while we wait get their token in another round.
      for (let round = 0; round < 3; round++) {
        const need = this.live().filter((T) => !asked.has(T));
        if (!need.length) break;
        for (const T of need) asked.add(T);
        const results = await Promise.all(
          need.map(async (T) => {
            try {
              return [T, await T.source(false)];
            } catch {
              return [T, undefined];
            }
          }),
        );
        if (this.closed) return [];
        let failed = false;
        for (const [T, tok] of results) {
          if (!this.isLive(T)) continue;
          if (tok === undefined) failed = true;
          else if (!tok) this.markRefused(T, "no token");
          else T.token = tok;
        }
        if (failed) return null;
      }
      return this.live().filter((T) => T.token);
    }

    opened(kind) {
      this.openedAt = this.env.now();
      if (kind === "websocket") this.wsWorked = true;
    }

    /** The server confirmed a topic (auth_ok, subscribed, SSE open). */
    acked(T, position, resumedByBrowser) {
      if (!this.isLive(T)) return;
      // Opened before, but no position was ever known (an SSE stream that saw no event): events
      // may have been missed in between, and the client knows it.
      const unknownGap = T.started && !T.lastId && !resumedByBrowser;
      if (position && isNewer(position, T.lastId)) {
        T.lastId = position;
        this.hooks.position(T.name, position);
      }
      T.triedFresh = false;
      T.nfBackoff.reset();
      T.started = true;
      this.setState(T, "open");
      if (unknownGap) this.hooks.resync(T.name);
    }

    deliverPush(topic, id, payload, transport) {
      const T = this.topics.get(topic);
      if (!T) return;
      if (id) {
        if (T.lastId && !isNewer(id, T.lastId)) return; // already seen (replay overlap)
        T.lastId = id;
      }
      T.suppressResync = false;
      this.hooks.push(topic, payload, { id: id || null, transport, topic });
    }

    deliverResync(topic) {
      const T = this.topics.get(topic);
      if (!T) return;
      if (T.suppressResync) {
        // Our own empty cursor slot asked for it; the client already decided.
        T.suppressResync = false;
        return;
      }
      this.hooks.resync(topic);
    }

    markRefused(T, why) {
      if (T.refused) return;
      T.refused = true;
      T.token = null;
      if (this.env.console) {
        this.env.console.warn(`[wavelog-worker] subscription to "${T.name}" refused (${why}); not retrying`);
      }
      this.setState(T, "refused");
    }

    notFound(T) {
      if (!this.isLive(T)) return;
      T.notFound = true;
      if (T.nfTimer) this.env.clearTimeout(T.nfTimer);
      const delay = T.nfBackoff.next();
      this.log("topic", T.name, "not registered; retry in", delay, "ms");
      this.setState(T, T.started ? "reconnecting" : "connecting");
      T.nfTimer = this.env.setTimeout(() => {
        T.nfTimer = null;
        if (this.closed || this.topics.get(T.name) !== T || !T.notFound) return;
        T.notFound = false;
        const c = this.cur;
        if (c && c.kind === "websocket") {
          this.attach(T); // a subscribe frame is the cheapest check
        } else {
          // Don't reopen a stream (or start one) for a topic that may still be missing.
          this.probe([T]).then((status) => {
            if (this.closed || this.topics.get(T.name) !== T) return;
            if (status === 404) this.notFound(T);
            else this.attach(T);
          });
        }
      }, delay);
    }

    /** Refused tokens: one fresh token from getToken each, then give up. */
    async refuse(list) {
      this.busy = true;
      try {
        for (const T of list) {
          if (!this.isLive(T)) continue;
          if (T.triedFresh) {
            this.markRefused(T, "token refused again after a fresh one");
            continue;
          }
          T.triedFresh = true;
          let tok;
          try {
            tok = await T.source(true);
          } catch {
            // getToken failed (backend unreachable?): not a verdict on the token; the next
            // attempt, after the backoff, tries again.
            T.triedFresh = false;
            continue;
          }
          if (this.closed) return;
          if (!tok) this.markRefused(T, "token refused, and no getToken for a fresh one");
          else T.token = tok;
        }
      } finally {
        this.busy = false;
      }
    }

    /** GET of the SSE URL: its status says what EventSource and a failed upgrade hide. */
    async probe(list) {
      const { fetch, AbortController: AC } = this.env;
      if (!fetch) return 0;
      const ctrl = AC ? new AC() : null;
      const timer = this.env.setTimeout(() => ctrl && ctrl.abort(), this.o.connectTimeout);
      try {
        const res = await fetch(this.sseUrl(list, ""), {
          cache: "no-store",
          credentials: "omit",
          signal: ctrl ? ctrl.signal : undefined,
        });
        const status = res.status;
        // A 200 is a live stream: end it.
        try {
          if (res.body && typeof res.body.cancel === "function") res.body.cancel().catch(() => {});
        } catch {
          // already closed
        }
        if (ctrl) ctrl.abort();
        return status;
      } catch {
        return 0;
      } finally {
        this.env.clearTimeout(timer);
      }
    }

    /** After a failed attempt that never opened: find out why, then act. */
    async diagnose(c) {
      const names = c.kind === "sse" ? c.order : [c.first];
      const list = names.map((n) => this.topics.get(n)).filter((T) => T && this.isLive(T));
      this.markLost();
      if (!list.length) {
        this.scheduleReconnect();
        return;
      }
      let status;
      let verdicts = null;
      this.busy = true;
      try {
        status = await this.probe(list);
        if ([400, 401, 403, 404].includes(status)) {
          verdicts = list.length === 1
            ? [[list[0], status]]
            : await Promise.all(list.map(async (T) => [T, await this.probe([T])]));
        }
      } finally {
        this.busy = false;
      }
      if (this.closed || this.cur || this.timer) return;
      this.log("probe:", status);
      if (status === 200) {
        if (c.kind === "websocket" && this.mode === "auto" && !this.wsWorked && this.env.EventSource) {
          this.fallBackToSse();
          this.connect();
          return;
        }
        this.scheduleReconnect();
        return;
      }
      if (verdicts) {
        const refused = [];
        for (const [T, s] of verdicts) {
          if (!this.isLive(T)) continue;
          if (s === 404) this.notFound(T);
          else if (s === 401) refused.push(T);
          else if (s === 403) this.markRefused(T, "origin not allowed by the worker");
          else if (s === 400) this.markRefused(T, "bad request");
        }
        if (refused.length) await this.refuse(refused);
        if (this.closed || this.cur || this.timer) return;
      }
      // Network error, proxy error, worker down, or the topics sorted out above: try again.
      this.scheduleReconnect();
    }

    detach(c) {
      this.env.clearTimeout(c.timer);
      if (c.kind === "websocket") {
        const ws = c.ws;
        ws.onopen = ws.onmessage = ws.onclose = null;
        ws.onerror = () => {};
        try {
          ws.close(1000);
        } catch {
          // already closed
        }
      } else {
        const es = c.es;
        es.onopen = es.onmessage = es.onerror = null;
        try {
          es.close();
        } catch {
          // already closed
        }
      }
    }

    // ----- WebSocket

    openWs(ready) {
      const first = ready[0];
      const c = {
        kind: "websocket",
        ws: null,
        first: first.name,
        authed: false,
        subs: new Map([[first.name, "pending"]]),
        refusal: null,
        expired: false,
        timer: null,
      };
      this.log("websocket connecting");
      let ws;
      try {
        ws = new this.env.WebSocket(this.urls.ws + "/ws?topic=" + encodeURIComponent(first.name));
      } catch {
        this.cur = null;
        this.diagnose(c);
        return;
      }
      c.ws = ws;
      this.cur = c;
      c.timer = this.env.setTimeout(() => this.wsTimeout(c), this.o.connectTimeout);
      ws.onopen = () => {
        if (this.cur !== c) return;
        const T = this.topics.get(c.first);
        const frame = { type: "auth", token: T && T.token ? T.token : first.token };
        if (T && T.lastId) frame.last_event_id = T.lastId;
        this.send(c, frame);
      };
      ws.onmessage = (ev) => this.wsFrame(c, ev.data);
      ws.onerror = () => {};
      ws.onclose = (ev) => this.wsClosed(c, ev);
    }

    send(c, frame) {
      if (c.ws && c.ws.readyState === WS_OPEN) {
        try {
          c.ws.send(JSON.stringify(frame));
        } catch {
          // closing; onclose follows
        }
      }
    }

    wsTimeout(c) {
      if (this.cur !== c || c.authed) return;
      this.log("websocket: no auth_ok within", this.o.connectTimeout, "ms");
      this.cur = null;
      this.detach(c);
      this.diagnose(c);
    }

    wsFrame(c, data) {
      if (this.cur !== c) return;
      let f;
      try {
        f = JSON.parse(typeof data === "string" ? data : String(data));
      } catch {
        return;
      }
      if (!f || typeof f !== "object") return;
      const topic = typeof f.topic === "string" ? f.topic : c.first;
      switch (f.type) {
        case "auth_ok": {
          if (c.authed) return; // answer to a token refresh
          c.authed = true;
          this.env.clearTimeout(c.timer);
          this.opened("websocket");
          c.subs.set(c.first, "acked");
          const T = this.topics.get(c.first);
          if (T) this.acked(T, f.last_event_id, false);
          this.syncWsSubs(c);
          return;
        }
        case "subscribed": {
          const T = this.topics.get(topic);
          if (!T || !this.isLive(T)) {
            c.subs.delete(topic);
            this.send(c, { type: "unsubscribe", topic });
            return;
          }
          c.subs.set(topic, "acked");
          this.acked(T, f.last_event_id, false);
          return;
        }
        case "push":
          this.deliverPush(topic, f.id, f.payload, "websocket");
          return;
        case "resync":
          this.deliverResync(topic);
          return;
        case "error":
          this.wsError(c, f);
          return;
        default:
          return;
      }
    }

    wsError(c, f) {
      const code = f.code;
      if (!c.authed || typeof f.topic !== "string") {
        // About the socket itself; the server closes it next.
        if (code === "unauthorized" || code === "auth_required") c.refusal = c.first;
        else if (code === "auth_expired") c.expired = true;
        return;
      }
      const T = this.topics.get(f.topic);
      c.subs.delete(f.topic);
      if (!T || !this.isLive(T)) return;
      // Not registered yet, or this address is throttled for now: both pass, so retry with backoff.
      if (code === "not_found" || code === "rate_limited") this.notFound(T);
      else if (code === "unauthorized" || code === "auth_required") this.wsTopicRefused(c, T);
      else if (code === "already_subscribed") {
        c.subs.set(f.topic, "acked");
        this.setState(T, "open");
      } else if (code === "too_many_topics") this.markRefused(T, "too many topics on one connection");
    }

    async wsTopicRefused(c, T) {
      await this.refuse([T]);
      if (this.cur === c && c.authed && this.isLive(T)) this.wsSubscribe(c, T);
    }

    syncWsSubs(c) {
      for (const T of this.live()) if (!c.subs.has(T.name)) this.wsSubscribe(c, T);
      for (const name of [...c.subs.keys()]) {
        const T = this.topics.get(name);
        if (!T || !this.isLive(T)) {
          c.subs.delete(name);
          this.send(c, { type: "unsubscribe", topic: name });
        }
      }
    }

    async wsSubscribe(c, T) {
      if (c.subs.has(T.name)) return;
      c.subs.set(T.name, "pending");
      if (!T.token) {
        let tok;
        try {
          tok = await T.source(false);
        } catch {
          tok = undefined;
        }
        if (this.cur !== c || !this.isLive(T)) {
          if (this.cur === c) c.subs.delete(T.name);
          return;
        }
        if (!tok) {
          c.subs.delete(T.name);
          if (tok === undefined) this.notFound(T); // getToken failed: retry later, with backoff
          else this.markRefused(T, "no token");
          return;
        }
        T.token = tok;
      }
      const frame = { type: "subscribe", topic: T.name, token: T.token };
      if (T.lastId) frame.last_event_id = T.lastId;
      this.send(c, frame);
    }

    async wsClosed(c, ev) {
      if (this.cur !== c) return;
      this.cur = null;
      this.env.clearTimeout(c.timer);
      this.log("websocket closed", ev && ev.code);
      if (this.closed) return;
      if (c.refusal) {
        const T = this.topics.get(c.refusal);
        this.markLost();
        if (T) await this.refuse([T]);
        this.scheduleReconnect();
        return;
      }
      if (c.expired) {
        this.markLost();
        this.busy = true;
        try {
          for (const T of this.live()) {
            try {
              const tok = await T.source(true);
              if (tok) T.token = tok;
            } catch {
              // the next connect asks again
            }
          }
        } finally {
          this.busy = false;
        }
        this.scheduleReconnect();
        return;
      }
      if (!c.authed) {
        this.diagnose(c);
        return;
      }
      this.scheduleReconnect();
    }

    // ----- Server-Sent Events

    sseUrl(list, cursor) {
      const q = list
        .map((T) => "topic=" + encodeURIComponent(T.name) + "&token=" + encodeURIComponent(T.token || ""))
        .join("&");
      return this.urls.http + "/sse?" + q + (cursor ? "&last_event_id=" + encodeURIComponent(cursor) : "");
    }

    openSse(ready) {
      const order = ready.map((T) => T.name);
      const parts = ready.map((T) => T.lastId || "");
      let cursor = "";
      if (ready.length === 1) cursor = parts[0];
      else if (parts.some(Boolean)) {
        // One slot per topic; an empty slot makes the server answer resync for that topic,
        // which the client has already accounted for (fresh topic, or its own resync).
        cursor = parts.join(",");
        ready.forEach((T, i) => {
          T.suppressResync = !parts[i];
        });
      }
      const c = { kind: "sse", es: null, order, opened: false, browserRetry: false, timer: null };
      this.log("sse connecting,", order.length, "topic(s)");
      let es;
      try {
        es = new this.env.EventSource(this.sseUrl(ready, cursor));
      } catch {
        this.diagnose(c);
        return;
      }
      c.es = es;
      this.cur = c;
      c.timer = this.env.setTimeout(() => this.sseTakeOver(c), this.o.connectTimeout);
      es.onopen = () => this.sseOpen(c);
      es.onmessage = (e) => this.sseMessage(c, e);
      es.onerror = () => this.sseError(c);
      // The worker's first block: the stream's starting position (a named event).
      es.addEventListener("position", (e) => {
        if (this.cur === c) this.sseCursor(c, e.lastEventId, null);
      });
    }

    reopenSseSoon() {
      const c = this.cur;
      if (!c || c.kind !== "sse" || c.reopen) return;
      c.reopen = this.env.setTimeout(() => {
        if (this.cur !== c || this.closed) return;
        this.detach(c);
        this.env.clearTimeout(c.reopen);
        this.cur = null;
        this.connect();
      }, 0);
    }

    sseOpen(c) {
      if (this.cur !== c) return;
      this.env.clearTimeout(c.timer);
      const resumed = c.browserRetry;
      c.opened = true;
      c.browserRetry = false;
      this.opened("sse");
      for (const name of c.order) {
        const T = this.topics.get(name);
        if (T) this.acked(T, null, resumed);
      }
      // A topic added while this stream was being set up joins with a reopen.
      if (this.live().some((T) => !c.order.includes(T.name))) this.reopenSseSoon();
    }

    sseMessage(c, e) {
      if (this.cur !== c) return;
      let f;
      try {
        f = JSON.parse(e.data);
      } catch {
        return;
      }
      if (!f || typeof f !== "object") return;
      const topic = typeof f.topic === "string" ? f.topic : c.order[0];
      if (f.type === "push") this.deliverPush(topic, f.id, f.payload, "sse");
      else if (f.type === "resync") this.deliverResync(topic);
      this.sseCursor(c, e.lastEventId, f.type === "push" ? topic : null);
    }

    /** The stream's cursor: one id per topic in URL order (or one id for a single topic). */
    sseCursor(c, cursor, skip) {
      if (typeof cursor !== "string" || !cursor) return;
      const parts = cursor.split(",").map((s) => s.trim());
      if (parts.length !== c.order.length) return;
      parts.forEach((id, i) => {
        const name = c.order[i];
        const T = this.topics.get(name);
        if (!T || name === skip || !parseEventId(id)) return;
        if (isNewer(id, T.lastId)) {
          T.lastId = id;
          this.hooks.position(name, id);
        }
      });
    }

    sseError(c) {
      if (this.cur !== c) return;
      if (c.opened && c.es.readyState === ES_CONNECTING) {
        // The stream dropped and EventSource retries by itself, with Last-Event-ID (it knows the
        // starting position even when no event came). If that retry fails too, we take over.
        this.log("sse dropped; EventSource retries");
        c.opened = false;
        c.browserRetry = true;
        this.markLost();
        this.env.clearTimeout(c.timer);
        c.timer = this.env.setTimeout(() => this.sseTakeOver(c), this.o.connectTimeout + 3000);
        return;
      }
      this.sseTakeOver(c);
    }

    sseTakeOver(c) {
      if (this.cur !== c) return;
      this.cur = null;
      this.detach(c);
      if (c.reopen) this.env.clearTimeout(c.reopen);
      if (this.closed) return;
      this.diagnose(c);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Subscriptions and the per-tab topic rooms.

  class Sub {
    constructor(env, options) {
      this.env = env;
      this.topic = options.topic;
      this.tok = typeof options.token === "string" && options.token ? options.token : null;
      this.getToken = typeof options.getToken === "function" ? options.getToken : null;
      this.onPush = options.onPush;
      this.onResync = options.onResync;
      this.onStatus = options.onStatus;
      this.state = null;
      this.emitted = null;
      this.live = false;
      this.closed = false;
      this.hub = null;
      // The caller gets the handle before any callback runs.
      Promise.resolve().then(() => {
        this.live = true;
        if (!this.closed && this.state && this.state !== this.emitted) this.emitState(this.state);
      });
    }

    /** This subscription's token; `fresh` asks getToken for a new one (null if it can't). */
    async token(fresh) {
      if (!fresh && this.tok && !expiresSoon(this.tok, this.env.now())) return this.tok;
      if (this.getToken) {
        const t = await this.getToken();
        if (typeof t === "string" && t) {
          this.tok = t;
          return t;
        }
        if (fresh) return null;
        throw new Error("getToken returned no token");
      }
      return fresh ? null : this.tok;
    }

    setState(state) {
      if (this.closed || this.state === state) return;
      this.state = state;
      if (this.live) this.emitState(state);
    }

    emitState(state) {
      this.emitted = state;
      call(this.env, this.onStatus, state);
    }

    push(payload, meta) {
      if (!this.closed) call(this.env, this.onPush, payload, meta);
    }

    resync() {
      if (!this.closed) call(this.env, this.onResync);
    }

    close() {
      if (this.closed) return;
      if (this.hub) this.hub.remove(this);
      this.state = "closed";
      if (this.live) this.emitState("closed");
      this.closed = true;
    }
  }

  /** The topics of one tab: who listens, the last id seen (for de-duplication), the state. */
  class Rooms {
    constructor() {
      this.map = new Map();
    }
    get size() {
      return this.map.size;
    }
    get(topic) {
      return this.map.get(topic);
    }
    add(sub) {
      let r = this.map.get(sub.topic);
      const fresh = !r;
      if (!r) {
        r = { topic: sub.topic, subs: new Set(), lastId: null, started: false, state: null };
        this.map.set(sub.topic, r);
      }
      r.subs.add(sub);
      if (r.state) sub.setState(r.state);
      return fresh;
    }
    /** True when the topic has no subscriber left here. */
    remove(sub) {
      const r = this.map.get(sub.topic);
      if (!r || !r.subs.delete(sub)) return false;
      if (r.subs.size) return false;
      this.map.delete(sub.topic);
      return true;
    }
    /** The token source of a topic: the newest subscriber's token; getToken for a fresh one. */
    source(topic) {
      return async (fresh) => {
        const r = this.map.get(topic);
        if (!r || !r.subs.size) return null;
        const subs = [...r.subs].reverse();
        const pick = fresh ? subs.find((s) => s.getToken) : subs[0];
        return pick ? pick.token(fresh) : null;
      };
    }
    push(topic, payload, meta) {
      const r = this.map.get(topic);
      if (!r) return;
      if (meta && meta.id) {
        if (r.lastId && !isNewer(meta.id, r.lastId)) return;
        r.lastId = meta.id;
      }
      for (const s of [...r.subs]) s.push(payload, meta);
    }
    resync(topic) {
      const r = this.map.get(topic);
      if (r) for (const s of [...r.subs]) s.resync();
    }
    state(topic, state) {
      const r = this.map.get(topic);
      if (!r) return;
      r.state = state;
      if (state === "open") r.started = true;
      for (const s of [...r.subs]) s.setState(state);
    }
    position(topic, id) {
      const r = this.map.get(topic);
      if (r && isNewer(id, r.lastId)) r.lastId = id;
    }
  }

  /** All subscriptions of this tab to one worker, on one connection. */
  class LocalHub {
    constructor(client, key, urls, mode, opts) {
      this.client = client;
      this.key = key;
      this.rooms = new Rooms();
      this.conn = new Connection(client.env, urls, mode, opts, {
        push: (t, p, m) => this.rooms.push(t, p, m),
        resync: (t) => this.rooms.resync(t),
        state: (t, s) => this.rooms.state(t, s),
        position: (t, id) => this.rooms.position(t, id),
      });
    }
    add(sub) {
      sub.hub = this;
      this.rooms.add(sub);
      const r = this.rooms.get(sub.topic);
      this.conn.setTopic(sub.topic, { source: this.rooms.source(sub.topic), lastId: r.lastId, started: r.started });
    }
    remove(sub) {
      if (this.rooms.remove(sub)) this.conn.removeTopic(sub.topic);
      if (!this.rooms.size) {
        this.conn.close();
        this.client.hubs.delete(this.key);
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Sharing one connection across the tabs of an origin.

  /** Leader election with a Web Lock: held until the tab goes away or resigns. */
  class LockElector {
    constructor(locks, name, AC) {
      this.locks = locks;
      this.name = name;
      this.AC = AC;
      this.release = null;
      this.stopped = false;
    }
    start(onLeader) {
      this.ctrl = this.AC ? new this.AC() : null;
      const opts = this.ctrl ? { signal: this.ctrl.signal } : {};
      this.locks
        .request(this.name, opts, () => {
          if (this.stopped) return undefined;
          onLeader();
          return new Promise((resolve) => {
            this.release = resolve;
          });
        })
        .catch(() => {});
    }
    stop() {
      this.stopped = true;
      if (this.ctrl) this.ctrl.abort();
      if (this.release) this.release();
    }
  }

  /** Leader election by a lease in localStorage, for browsers without Web Locks. */
  class LeaseElector {
    constructor(env, name, id, { period = 1000, ttl = 3500 } = {}) {
      this.env = env;
      this.key = name;
      this.id = id;
      this.period = period;
      this.ttl = ttl;
      this.leader = false;
      this.timer = null;
      this.stopped = false;
      this.onStorage = (e) => {
        if (e.key === this.key && !e.newValue && !this.leader) this.tick();
      };
    }
    read() {
      try {
        return JSON.parse(this.env.localStorage.getItem(this.key) || "null");
      } catch {
        return null;
      }
    }
    write() {
      try {
        this.env.localStorage.setItem(this.key, JSON.stringify({ id: this.id, ts: this.env.now() }));
      } catch {
        // storage full or gone: we simply don't lead
      }
    }
    start(onLeader) {
      this.onLeader = onLeader;
      if (this.env.window) this.env.window.addEventListener("storage", this.onStorage);
      this.tick();
    }
    schedule(ms) {
      if (this.stopped) return;
      this.env.clearTimeout(this.timer);
      this.timer = this.env.setTimeout(() => this.tick(), ms);
    }
    tick() {
      if (this.stopped) return;
      const v = this.read();
      const now = this.env.now();
      if (this.leader) {
        // Renew. (Two leaders after a lease race both keep their connection: every tab drops
        // ids it has seen, so the duplicates are harmless.)
        this.write();
        this.schedule(this.period);
        return;
      }
      if (!v || v.id === this.id || now - v.ts > this.ttl) {
        this.write();
        // Claimed; confirm after a short while that nobody else claimed at the same moment.
        this.env.clearTimeout(this.timer);
        this.timer = this.env.setTimeout(() => {
          if (this.stopped) return;
          const w = this.read();
          if (w && w.id === this.id) {
            this.leader = true;
            this.write();
            this.schedule(this.period);
            this.onLeader();
          } else {
            this.schedule(this.period);
          }
        }, 50 + Math.floor(this.env.random() * 50));
        return;
      }
      this.schedule(this.period);
    }
    stop() {
      this.stopped = true;
      this.env.clearTimeout(this.timer);
      if (this.env.window) this.env.window.removeEventListener("storage", this.onStorage);
      if (this.leader) {
        const v = this.read();
        try {
          if (v && v.id === this.id) this.env.localStorage.removeItem(this.key);
        } catch {
          // gone
        }
      }
      this.leader = false;
    }
  }

  /** A BroadcastChannel look-alike over localStorage `storage` events. */
  class StorageChannel {
    constructor(env, name) {
      this.env = env;
      this.key = name + ":msg";
      this.onmessage = null;
      this.handler = (e) => {
        if (e.key !== this.key || !e.newValue || !this.onmessage) return;
        try {
          this.onmessage({ data: JSON.parse(e.newValue).d });
        } catch {
          // not ours
        }
      };
      env.window.addEventListener("storage", this.handler);
    }
    postMessage(d) {
      try {
        this.env.localStorage.setItem(this.key, JSON.stringify({ d, n: this.env.random() }));
      } catch {
        // storage unavailable
      }
    }
    close() {
      this.env.window.removeEventListener("storage", this.handler);
    }
  }

  function canShare(env) {
    if (env.BroadcastChannel) return true;
    return !!(env.localStorage && env.window);
  }

  /**
   * Subscriptions with shareAcrossTabs: the tabs of an origin elect one leader that holds the
   * connection (a Connection with every tab's topics) and relays what arrives; the others
   * announce their topics and tokens. A new leader resumes from the oldest position any tab
   * knows, and every tab drops ids it has already seen, so a takeover loses and repeats nothing.
   */
  class SharedHub {
    constructor(client, key, urls, mode, opts) {
      const env = client.env;
      this.client = client;
      this.env = env;
      this.key = key;
      this.urls = urls;
      this.mode = mode;
      this.opts = opts;
      this.rooms = new Rooms();
      this.tabId = randomId(env.random);
      this.leader = false;
      this.conn = null;
      this.remote = new Map(); // topic -> Map(tabId -> {token})
      this.requests = new Map(); // req id -> resolve
      this.closed = false;
      const name = "wavelog-worker:" + mode + ":" + urls.key;
      this.channel = env.BroadcastChannel ? new env.BroadcastChannel(name) : new StorageChannel(env, name);
      this.channel.onmessage = (e) => this.onMessage(e.data);
      this.elector = env.locks && env.BroadcastChannel
        ? new LockElector(env.locks, name, env.AbortController)
        : new LeaseElector(env, name + ":leader", this.tabId);
      this.onPageHide = (e) => {
        this.post({ t: "bye", leader: this.leader });
        // Unloading for good (not into the back/forward cache): give up the leadership now, so
        // another tab takes over at once instead of when the lock or lease lapses.
        if (!e || !e.persisted) this.elector.stop();
      };
      if (env.window) env.window.addEventListener("pagehide", this.onPageHide);
      this.elector.start(() => this.becomeLeader());
    }

    post(msg) {
      if (this.closed) return;
      try {
        this.channel.postMessage({ ...msg, from: this.tabId });
      } catch {
        // channel closed
      }
    }

    add(sub) {
      sub.hub = this;
      const fresh = this.rooms.add(sub);
      const r = this.rooms.get(sub.topic);
      if (this.leader) {
        this.conn.setTopic(sub.topic, { source: this.sourceFor(sub.topic), lastId: r.lastId, started: r.started });
        if (fresh) this.rooms.state(sub.topic, this.conn.stateOf(sub.topic));
      } else {
        if (fresh) this.rooms.state(sub.topic, "connecting");
        this.announce(r, sub.tok);
      }
    }

    announce(r, token) {
      this.post({ t: "sub", topic: r.topic, token: token || null, lastId: r.lastId, started: r.started });
    }

    remove(sub) {
      if (this.rooms.remove(sub)) {
        if (this.leader) {
          if (!this.holders(sub.topic).size) this.conn.removeTopic(sub.topic);
        } else {
          this.post({ t: "unsub", topic: sub.topic });
        }
      }
      if (!this.rooms.size) this.dispose();
    }

    dispose() {
      if (this.closed) return;
      this.post({ t: "bye", leader: this.leader });
      this.closed = true;
      this.elector.stop();
      if (this.conn) this.conn.close();
      this.conn = null;
      this.leader = false;
      for (const resolve of this.requests.values()) resolve(null);
      this.requests.clear();
      if (this.env.window) this.env.window.removeEventListener("pagehide", this.onPageHide);
      try {
        this.channel.close();
      } catch {
        // closed
      }
      this.client.hubs.delete(this.key);
    }

    holders(topic) {
      let m = this.remote.get(topic);
      if (!m) {
        m = new Map();
        this.remote.set(topic, m);
      }
      return m;
    }

    /** Leader: the token source of a topic, from this tab's subscribers or another tab's. */
    sourceFor(topic) {
      return async (fresh) => {
        const r = this.rooms.get(topic);
        if (r && r.subs.size) return this.rooms.source(topic)(fresh);
        for (const [tabId, h] of this.holders(topic)) {
          if (!fresh && h.token && !expiresSoon(h.token, this.env.now())) return h.token;
          const tok = await this.requestToken(tabId, topic, fresh);
          if (tok === undefined) {
            // That tab is gone (closed without a word): forget it.
            this.dropTab(tabId);
            continue;
          }
          if (tok) h.token = tok;
          return tok;
        }
        return null;
      };
    }

    requestToken(tabId, topic, fresh) {
      const req = randomId(this.env.random);
      return new Promise((resolve) => {
        const timer = this.env.setTimeout(() => {
          this.requests.delete(req);
          resolve(undefined);
        }, TOKEN_REQUEST_TIMEOUT);
        this.requests.set(req, (tok) => {
          this.env.clearTimeout(timer);
          this.requests.delete(req);
          resolve(tok);
        });
        this.post({ t: "tokreq", to: tabId, topic, req, fresh: !!fresh });
      });
    }

    dropTab(tabId) {
      for (const [topic, m] of this.remote) {
        if (!m.delete(tabId) || m.size) continue;
        this.remote.delete(topic);
        if (this.leader && !this.rooms.get(topic)) this.conn.removeTopic(topic);
      }
    }

    becomeLeader() {
      if (this.closed || this.leader) return;
      this.leader = true;
      this.remote.clear();
      const opts = { ...this.opts, startDelay: this.opts.gatherDelay };
      this.conn = new Connection(this.env, this.urls, this.mode, opts, {
        push: (topic, payload, meta) => {
          this.rooms.push(topic, payload, meta);
          this.post({ t: "push", topic, payload, meta });
        },
        resync: (topic) => {
          this.rooms.resync(topic);
          this.post({ t: "resync", topic });
        },
        state: (topic, state) => {
          this.rooms.state(topic, state);
          this.post({ t: "state", topic, state });
        },
        position: (topic, id) => {
          this.rooms.position(topic, id);
          this.post({ t: "pos", topic, id });
        },
      });
      for (const r of this.rooms.map.values()) {
        this.conn.setTopic(r.topic, { source: this.sourceFor(r.topic), lastId: r.lastId, started: r.started });
      }
      this.post({ t: "leader" });
    }

    onMessage(m) {
      if (this.closed || !m || typeof m !== "object" || m.from === this.tabId) return;
      switch (m.t) {
        // to the leader
        case "sub":
          if (!this.leader) return;
          this.holders(m.topic).set(m.from, { token: m.token });
          this.conn.setTopic(m.topic, { source: this.sourceFor(m.topic), lastId: m.lastId, started: m.started });
          this.post({ t: "state", topic: m.topic, state: this.conn.stateOf(m.topic) });
          if (this.conn.lastIdOf(m.topic)) this.post({ t: "pos", topic: m.topic, id: this.conn.lastIdOf(m.topic) });
          return;
        case "unsub":
          if (!this.leader) return;
          this.holders(m.topic).delete(m.from);
          if (!this.holders(m.topic).size && !this.rooms.get(m.topic)) this.conn.removeTopic(m.topic);
          return;
        case "tok": {
          const resolve = this.requests.get(m.req);
          if (resolve) resolve(typeof m.token === "string" && m.token ? m.token : null);
          return;
        }
        case "bye":
          if (this.leader) this.dropTab(m.from);
          else if (m.leader) for (const r of this.rooms.map.values()) if (r.state === "open") this.rooms.state(r.topic, "reconnecting");
          return;
        // from the leader
        case "leader":
          if (this.leader) return; // a lease split: dedup by id keeps it harmless
          for (const r of this.rooms.map.values()) this.announce(r, this.firstToken(r));
          return;
        case "push":
          this.rooms.push(m.topic, m.payload, m.meta);
          return;
        case "resync":
          this.rooms.resync(m.topic);
          return;
        case "state":
          if (m.state) this.rooms.state(m.topic, m.state);
          return;
        case "pos":
          this.rooms.position(m.topic, m.id);
          return;
        case "tokreq":
          if (m.to === this.tabId) this.answerToken(m);
          return;
        default:
          return;
      }
    }

    firstToken(r) {
      for (const s of r.subs) if (s.tok) return s.tok;
      return null;
    }

    async answerToken(m) {
      let token = null;
      try {
        token = await this.rooms.source(m.topic)(!!m.fresh);
      } catch {
        token = null;
      }
      this.post({ t: "tok", req: m.req, token });
    }
  }

  // ---------------------------------------------------------------------------------------------
  // The public API.

  function createClient(envOverrides) {
    const env = makeEnv(envOverrides);
    const client = { env, hubs: new Map() };

    function subscribe(options) {
      if (!options || typeof options !== "object") {
        throw new TypeError("WavelogWorker.subscribe: options object required");
      }
      const topic = options.topic;
      if (typeof topic !== "string" || !topic) throw new TypeError("WavelogWorker.subscribe: `topic` is required");
      const hasToken = typeof options.token === "string" && options.token;
      if (!hasToken && typeof options.getToken !== "function") {
        throw new TypeError("WavelogWorker.subscribe: `token` or `getToken` is required");
      }
      const mode = options.transport || "auto";
      if (!["auto", "websocket", "sse"].includes(mode)) {
        throw new TypeError('WavelogWorker.subscribe: `transport` must be "auto", "websocket" or "sse"');
      }
      if (mode === "websocket" && !env.WebSocket) throw new TypeError("WavelogWorker.subscribe: no WebSocket here");
      if (mode === "sse" && !env.EventSource) throw new TypeError("WavelogWorker.subscribe: no EventSource here");
      if (mode === "auto" && !env.WebSocket && !env.EventSource) {
        throw new TypeError("WavelogWorker.subscribe: neither WebSocket nor EventSource is available");
      }
      const url = options.url || (env.defaultUrl && env.defaultUrl());
      const urls = deriveUrls(url, env.location && env.location.href);
      const shared = !!options.shareAcrossTabs && canShare(env);
      const key = [urls.key, mode, shared ? "shared" : "local"].join("|");
      let hub = client.hubs.get(key);
      if (!hub) {
        const opts = { ...DEFAULTS };
        for (const k of TUNABLES) if (options[k] !== undefined) opts[k] = options[k];
        hub = shared ? new SharedHub(client, key, urls, mode, opts) : new LocalHub(client, key, urls, mode, opts);
        client.hubs.set(key, hub);
      }
      const sub = new Sub(env, options);
      hub.add(sub);
      return {
        topic,
        get state() {
          return sub.state;
        },
        close() {
          sub.close();
        },
      };
    }

    const api = { subscribe, version: VERSION, createClient };
    // For tests and debugging: the live connections of this client.
    Object.defineProperty(api, "_hubs", { value: client.hubs });
    return api;
  }

  var existing = root.WavelogWorker;
  if (existing && existing.__wavelogWorker) return; // this library, loaded twice: keep the first
  var api = createClient({
    defaultUrl: function () {
      var w = root.WavelogWorker;
      return w && typeof w.url === "string" ? w.url : undefined;
    },
  });
  // Wavelog's footer may have set window.WavelogWorker = { url: "wss://..." } already: keep that
  // object and its properties, use its url as the default, add the API to it.
  var target = existing && (typeof existing === "object" || typeof existing === "function") ? existing : {};
  target.subscribe = api.subscribe;
  if (!("version" in target)) target.version = VERSION;
  if (!("createClient" in target)) target.createClient = createClient;
  try {
    Object.defineProperty(target, "__wavelogWorker", { value: true });
  } catch (e) {
    // a frozen config object: use a fresh one that inherits its properties
    target = Object.create(existing);
    target.subscribe = api.subscribe;
    target.version = VERSION;
    target.createClient = createClient;
    Object.defineProperty(target, "__wavelogWorker", { value: true });
  }
  root.WavelogWorker = target;
})(typeof window !== "undefined" ? window : typeof self !== "undefined" ? self : globalThis);
