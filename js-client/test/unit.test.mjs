// The client's state machine against in-memory fakes (no network): backoff, states, transport
// choice and its memory, cursor tracking, resume, the refusal flow, tab sharing, and that no
// token ever reaches the console.

import { test, describe } from "node:test";
import assert from "node:assert/strict";

import {
  backoffDelay,
  createClient,
  deriveUrls,
  isNewer,
  parseEventId,
  tokenExpiry,
} from "../src/wavelog-worker.mjs";
import { Bus, Clock, MemoryStorage, fakeEnv, fakeToken, flush } from "./helpers/fakes.mjs";

const URL_WS = "ws://worker.test:9000";

function setup(opts = {}) {
  const f = fakeEnv(opts);
  const client = createClient(f.env);
  return { ...f, client };
}

/** Subscribes with recording callbacks. */
function sub(client, options) {
  const rec = { pushes: [], metas: [], resyncs: 0, states: [] };
  const handle = client.subscribe({
    url: URL_WS,
    onPush: (p, m) => {
      rec.pushes.push(p);
      rec.metas.push(m);
    },
    onResync: () => rec.resyncs++,
    onStatus: (s) => rec.states.push(s),
    ...options,
  });
  return { handle, rec };
}

/** Brings the last WebSocket to auth_ok for `topic` at position `pos`. */
async function authOk(f, topic, pos) {
  const ws = f.lastSocket();
  ws._open();
  await flush();
  ws._frame({ type: "auth_ok", topic, last_event_id: pos });
  await flush();
  return ws;
}

describe("helpers", () => {
  test("backoff: full jitter within 0.5 s .. 30 s, ceiling doubles", () => {
    for (let attempt = 0; attempt < 40; attempt++) {
      for (const r of [0, 0.25, 0.5, 0.999999]) {
        const d = backoffDelay(attempt, () => r);
        assert.ok(d >= 500 && d <= 30000, `attempt ${attempt} r ${r}: ${d}`);
      }
    }
    assert.equal(backoffDelay(0, () => 0), 500);
    assert.ok(backoffDelay(0, () => 0.999999) <= 1000);
    assert.ok(backoffDelay(1, () => 0.999999) <= 2000 && backoffDelay(1, () => 0.999999) > 1900);
    assert.ok(backoffDelay(4, () => 0.999999) > 15000 && backoffDelay(4, () => 0.999999) <= 16000);
    assert.equal(backoffDelay(5, () => 0.999999), 30000);
    assert.equal(backoffDelay(1000, () => 0.999999), 30000);
    // Jitter: different random draws give different delays at the same attempt.
    const seen = new Set();
    for (let i = 0; i < 50; i++) seen.add(backoffDelay(6, Math.random));
    assert.ok(seen.size > 40);
    // Garbage from random() stays in bounds.
    assert.equal(backoffDelay(3, () => NaN), 500);
    assert.ok(backoffDelay(3, () => 7) <= 8000);
  });

  test("event ids: parse and compare within an epoch, anything else counts as newer", () => {
    assert.deepEqual(parseEventId("9f2c01ab-42"), { epoch: "9f2c01ab", seq: 42 });
    assert.equal(parseEventId("nope"), null);
    assert.equal(parseEventId("-4"), null);
    assert.equal(parseEventId("ab-"), null);
    assert.equal(parseEventId(null), null);
    assert.ok(isNewer("e-10", "e-9"));
    assert.ok(!isNewer("e-9", "e-10"));
    assert.ok(!isNewer("e-9", "e-9"));
    assert.ok(isNewer("f-1", "e-100"), "another epoch (worker restarted)");
    assert.ok(isNewer("e-1", null));
  });

  test("url: either scheme, the other derived; /ws or /sse suffix and slashes dropped", () => {
    assert.deepEqual(deriveUrls("wss://log.example.org:9000"), {
      ws: "wss://log.example.org:9000",
      http: "https://log.example.org:9000",
      key: "https://log.example.org:9000",
    });
    assert.equal(deriveUrls("http://h/worker/").ws, "ws://h/worker");
    assert.equal(deriveUrls("ws://h:1/ws").http, "http://h:1");
    assert.equal(deriveUrls("https://h/x/sse").ws, "wss://h/x");
    assert.equal(deriveUrls("/w", "http://page.example/view").ws, "ws://page.example/w");
    assert.throws(() => deriveUrls("ftp://h"), TypeError);
    assert.throws(() => deriveUrls(""), TypeError);
  });

  test("token expiry: hex (as PHP makes it) and base64url", () => {
    const hex = fakeToken("qso.1", 1234567890);
    assert.equal(tokenExpiry(hex), 1234567890);
    const b64 = Buffer.from(JSON.stringify({ topic: "a", expires: 42 })).toString("base64url") + ".sig";
    assert.equal(tokenExpiry(b64), 42);
    assert.equal(tokenExpiry("garbage"), null);
    assert.equal(tokenExpiry(undefined), null);
  });
});

describe("WebSocket transport", () => {
  test("connects, authenticates in the first frame (token never in the URL), delivers pushes", async () => {
    const f = setup();
    const token = fakeToken("qso.1");
    const { handle, rec } = sub(f.client, { topic: "qso.1", token });
    await f.clock.advance(0);
    assert.equal(f.sockets.length, 1);
    const ws = f.lastSocket();
    assert.equal(ws.url, "ws://worker.test:9000/ws?topic=qso.1");
    assert.ok(!ws.url.includes(token));
    ws._open();
    assert.deepEqual(ws.sent, [{ type: "auth", token }]);
    ws._frame({ type: "auth_ok", topic: "qso.1", last_event_id: "e-3" });
    await flush();
    assert.deepEqual(rec.states, ["connecting", "open"]);
    assert.equal(handle.state, "open");
    ws._frame({ type: "push", topic: "qso.1", id: "e-4", payload: { n: 1 } });
    ws._frame({ type: "push", topic: "qso.1", id: "e-4", payload: { n: 1 } }); // duplicate
    ws._frame({ type: "push", topic: "qso.1", id: "e-5", payload: null });
    assert.deepEqual(rec.pushes, [{ n: 1 }, null]);
    assert.deepEqual(rec.metas[0], { id: "e-4", transport: "websocket", topic: "qso.1" });
    handle.close();
    await flush();
    assert.equal(rec.states.at(-1), "closed");
    assert.equal(ws.closedByClient, 1000);
  });

  test("reconnects with backoff and resumes from the last id; the auth_ok position counts too", async () => {
    const f = setup({ random: () => 0.999 });
    const { rec } = sub(f.client, { topic: "t", token: "tok" });
    await f.clock.advance(0);
    let ws = await authOk(f, "t", "e-7");
    // No event yet: the position from auth_ok is what we resume from.
    ws._close(1006);
    await flush();
    assert.equal(rec.states.at(-1), "reconnecting");
    const wait = f.clock.pending()[0];
    assert.ok(wait >= 500 && wait <= 1000, `first delay ${wait}`);
    await f.clock.advance(wait);
    assert.equal(f.sockets.length, 2);
    ws = f.lastSocket();
    ws._open();
    assert.deepEqual(ws.sent[0], { type: "auth", token: "tok", last_event_id: "e-7" });
    ws._frame({ type: "auth_ok", topic: "t", last_event_id: "e-7" });
    ws._frame({ type: "push", topic: "t", id: "e-9", payload: 9 });
    await flush();
    ws._close(1006);
    await f.clock.advance(2000);
    ws = f.lastSocket();
    ws._open();
    assert.equal(ws.sent[0].last_event_id, "e-9");
    assert.deepEqual(rec.states, ["connecting", "open", "reconnecting", "open", "reconnecting"]);
    assert.equal(rec.resyncs, 0);
  });

  test("backoff grows while failing, and starts over after a stable connection", async () => {
    const f = setup({ random: () => 0.999, fetchStatus: 0 /* worker unreachable */ });
    sub(f.client, { topic: "t", token: "tok" });
    await f.clock.advance(0);
    await authOk(f, "t", "e-1");
    f.lastSocket()._close(1006); // lost right away: not stable
    const delays = [];
    for (let i = 0; i < 7; i++) {
      await flush();
      const d = f.clock.pending()[0];
      delays.push(d);
      await f.clock.advance(d);
      f.lastSocket()._close(1006); // fails before open
    }
    assert.deepEqual(
      delays.map((d) => Math.round(d / 100) * 100),
      [1000, 2000, 4000, 8000, 16000, 30000, 30000],
    );
    await flush();
    await f.clock.advance(f.clock.pending()[0]);
    await authOk(f, "t", "e-1");
    await f.clock.advance(15000); // open longer than stableAfter
    f.lastSocket()._close(1006);
    await flush();
    assert.ok(f.clock.pending()[0] <= 1000, "backoff starts over after a stable connection");
  });

  test("server resync reaches onResync; a restarted worker's ids are accepted", async () => {
    const f = setup();
    const { rec } = sub(f.client, { topic: "t", token: "tok" });
    await f.clock.advance(0);
    const ws = await authOk(f, "t", "old-50");
    ws._frame({ type: "resync", topic: "t" });
    ws._frame({ type: "push", topic: "t", id: "new-1", payload: "a" });
    assert.equal(rec.resyncs, 1);
    assert.deepEqual(rec.pushes, ["a"]);
  });

  test("several subscribe() calls share one socket: subscribe/unsubscribe frames", async () => {
    const f = setup();
    const a = sub(f.client, { topic: "a", token: "ta" });
    const b = sub(f.client, { topic: "b", token: "tb" });
    const b2 = sub(f.client, { topic: "b", token: "tb2" });
    const c = sub(f.client, { topic: "c", getToken: async () => "tc" });
    await f.clock.advance(0);
    assert.equal(f.sockets.length, 1);
    const ws = await authOk(f, "a", "e-1");
    await flush();
    assert.deepEqual(
      ws.sent.slice(1).map((m) => [m.type, m.topic, m.token]).sort(),
      [["subscribe", "b", "tb2"], ["subscribe", "c", "tc"]],
    );
    ws._frame({ type: "subscribed", topic: "b", last_event_id: "e-1" });
    ws._frame({ type: "subscribed", topic: "c", last_event_id: "e-1" });
    await flush();
    for (const s of [a, b, b2, c]) assert.equal(s.handle.state, "open");
    ws._frame({ type: "push", topic: "b", id: "e-2", payload: "B" });
    ws._frame({ type: "push", topic: "c", id: "e-3", payload: "C" });
    assert.deepEqual(a.rec.pushes, []);
    assert.deepEqual(b.rec.pushes, ["B"]);
    assert.deepEqual(b2.rec.pushes, ["B"]);
    assert.deepEqual(c.rec.pushes, ["C"]);
    b.handle.close();
    await flush();
    assert.equal(ws.sent.filter((m) => m.type === "unsubscribe").length, 0, "b2 still listens");
    b2.handle.close();
    await flush();
    assert.deepEqual(ws.sent.at(-1), { type: "unsubscribe", topic: "b" });
    // A topic added later on the open socket, with its own subscribe frame.
    const d = sub(f.client, { topic: "d", token: "td" });
    await flush();
    assert.deepEqual(ws.sent.at(-1), { type: "subscribe", topic: "d", token: "td" });
    a.handle.close();
    c.handle.close();
    d.handle.close();
    await flush();
    assert.equal(ws.closedByClient, 1000);
    assert.equal(f.sockets.length, 1);
  });

  for (const [code, what] of [
    ["not_found", "a topic not registered yet"],
    ["rate_limited", "a throttled subscribe"],
  ]) {
    test(`${what} (subscribe error ${code}) is retried with backoff, not given up`, async () => {
      const f = setup({ random: () => 0 });
      sub(f.client, { topic: "a", token: "ta" });
      const b = sub(f.client, { topic: "b", token: "tb" });
      await f.clock.advance(0);
      const ws = await authOk(f, "a", "e-1");
      ws._frame({ type: "error", code, topic: "b", message: what });
      await flush();
      assert.equal(b.handle.state, "connecting");
      const before = ws.sent.filter((m) => m.type === "subscribe").length;
      await f.clock.advance(500);
      assert.equal(ws.sent.filter((m) => m.type === "subscribe").length, before + 1);
      ws._frame({ type: "subscribed", topic: "b", last_event_id: "e-1" });
      await flush();
      assert.equal(b.handle.state, "open");
    });
  }

  test("refused: getToken once for a fresh token, refused again -> 'refused', no more attempts", async () => {
    const f = setup();
    const token = fakeToken("other.topic");
    let calls = 0;
    const fresh = fakeToken("other.topic.2");
    const { rec } = sub(f.client, { topic: "t", token, getToken: async () => (calls++, fresh), debug: true });
    await f.clock.advance(0);
    let ws = f.lastSocket();
    ws._open();
    ws._frame({ type: "error", code: "unauthorized", message: "token for another topic" });
    ws._close(1008);
    await flush();
    assert.equal(calls, 1);
    await f.clock.advance(1000);
    assert.equal(f.sockets.length, 2);
    ws = f.lastSocket();
    ws._open();
    assert.equal(ws.sent[0].token, fresh);
    ws._frame({ type: "error", code: "unauthorized", message: "token for another topic" });
    ws._close(1008);
    await f.clock.advance(10 * 60 * 1000);
    assert.equal(f.sockets.length, 2, "no retry after the second refusal");
    assert.equal(calls, 1);
    assert.equal(rec.states.at(-1), "refused");
    assert.deepEqual(f.clock.pending(), [], "no timer left running");
    const out = f.console.text();
    assert.match(out, /refused/);
    assert.ok(!out.includes(token) && !out.includes(fresh), "no token in console output");
  });

  test("refused without getToken: refused at once", async () => {
    const f = setup();
    const { rec } = sub(f.client, { topic: "t", token: "bad" });
    await f.clock.advance(0);
    const ws = f.lastSocket();
    ws._open();
    ws._frame({ type: "error", code: "unauthorized", message: "bad signature" });
    ws._close(1008);
    await f.clock.advance(60000);
    assert.equal(f.sockets.length, 1);
    assert.equal(rec.states.at(-1), "refused");
  });

  test("a refused subscribe frame on a shared socket gets one fresh token; others unaffected", async () => {
    const f = setup();
    let calls = 0;
    const a = sub(f.client, { topic: "a", token: "ta" });
    const b = sub(f.client, { topic: "b", token: "bad", getToken: async () => (calls++, "bad2") });
    await f.clock.advance(0);
    const ws = await authOk(f, "a", "e-1");
    ws._frame({ type: "error", code: "unauthorized", topic: "b", message: "x" });
    await flush();
    assert.equal(calls, 1);
    assert.deepEqual(ws.sent.at(-1), { type: "subscribe", topic: "b", token: "bad2" });
    ws._frame({ type: "error", code: "unauthorized", topic: "b", message: "x" });
    await flush();
    assert.equal(b.handle.state, "refused");
    assert.equal(a.handle.state, "open");
    assert.equal(calls, 1);
  });

  test("an expired token is renewed with getToken before it is used", async () => {
    const f = setup();
    const nowS = Math.floor(f.clock.now() / 1000);
    const old = fakeToken("t", nowS - 5);
    const fresh = fakeToken("t", nowS + 3600);
    let calls = 0;
    sub(f.client, { topic: "t", token: old, getToken: () => (calls++, fresh) });
    await f.clock.advance(0);
    f.lastSocket()._open();
    assert.equal(f.lastSocket().sent[0].token, fresh);
    assert.equal(calls, 1);
  });

  test("online and visibilitychange reconnect at once instead of waiting out the backoff", async () => {
    const f = setup({ random: () => 0.999, fetchStatus: 0 });
    sub(f.client, { topic: "t", token: "tok" });
    await f.clock.advance(0);
    await authOk(f, "t", "e-1");
    f.lastSocket()._close(1006);
    await flush();
    assert.equal(f.sockets.length, 1);
    f.win.dispatch("online");
    await flush();
    assert.equal(f.sockets.length, 2);
    f.lastSocket()._close(1006);
    await flush();
    f.doc.visibilityState = "hidden";
    f.doc.dispatch("visibilitychange");
    await flush();
    assert.equal(f.sockets.length, 2, "hidden: keep waiting");
    f.doc.visibilityState = "visible";
    f.doc.dispatch("visibilitychange");
    await flush();
    assert.equal(f.sockets.length, 3);
  });

  test("auth_expired: a fresh token from getToken and a reconnect, not a refusal", async () => {
    const f = setup({ random: () => 0 });
    let calls = 0;
    const { rec } = sub(f.client, { topic: "t", token: "old", getToken: async () => `new-${++calls}` });
    await f.clock.advance(0);
    const ws = await authOk(f, "t", "e-1");
    ws._frame({ type: "error", code: "auth_expired", message: "token expired" });
    ws._close(1008);
    await f.clock.advance(500);
    assert.equal(calls, 1);
    f.lastSocket()._open();
    assert.deepEqual(f.lastSocket().sent[0], { type: "auth", token: "new-1", last_event_id: "e-1" });
    assert.notEqual(rec.states.at(-1), "refused");
  });

  test("closed before it connected: nothing opened, no timer left", async () => {
    const f = setup();
    const { handle, rec } = sub(f.client, { topic: "t", token: "x" });
    handle.close();
    await f.clock.advance(60000);
    assert.equal(f.sockets.length, 0);
    assert.deepEqual(f.clock.pending(), []);
    assert.deepEqual(rec.states, []);
    assert.equal(f.win.count("online"), 0, "listeners removed");
    assert.equal(f.doc.count("visibilitychange"), 0);
  });

  test("callbacks that throw do not break delivery", async () => {
    const f = setup();
    const errors = [];
    f.env.reportError = (e) => errors.push(e);
    const client = createClient(f.env);
    const got = [];
    client.subscribe({ url: URL_WS, topic: "t", token: "x", onPush: () => { throw new Error("app bug"); } });
    client.subscribe({ url: URL_WS, topic: "t", token: "x", onPush: (p) => got.push(p) });
    await f.clock.advance(0);
    const ws = await authOk(f, "t", "e-1");
    ws._frame({ type: "push", topic: "t", id: "e-2", payload: 1 });
    assert.deepEqual(got, [1]);
    assert.equal(errors.length, 1);
  });

  test("options are checked", () => {
    const f = setup();
    assert.throws(() => f.client.subscribe({ url: URL_WS, topic: "t" }), /token/);
    assert.throws(() => f.client.subscribe({ url: URL_WS, token: "x" }), /topic/);
    assert.throws(() => f.client.subscribe({ topic: "t", token: "x" }), /url/);
    assert.throws(() => f.client.subscribe({ url: URL_WS, topic: "t", token: "x", transport: "carrier-pigeon" }), /transport/);
    f.env.defaultUrl = () => URL_WS;
    const c2 = createClient(f.env);
    c2.subscribe({ topic: "t", token: "x" }).close();
  });
});

describe("auto transport: fallback to SSE and its memory", () => {
  test("upgrade fails, the SSE probe answers 200: SSE, remembered in sessionStorage", async () => {
    const storage = new MemoryStorage();
    const f = setup({ sessionStorage: storage });
    const { rec } = sub(f.client, { topic: "t", token: "tok" });
    await f.clock.advance(0);
    f.lastSocket()._close(1006); // the proxy refused the upgrade
    await flush();
    assert.equal(f.fetches.length, 1);
    assert.match(f.fetches[0], /^http:\/\/worker\.test:9000\/sse\?topic=t&token=tok$/);
    assert.equal(f.sources.length, 1, "fell back at once, no backoff wait");
    assert.equal(storage.getItem("wavelog-worker:transport:http://worker.test:9000"), "sse");
    const es = f.lastSource();
    es._open();
    es._message({ type: "push", topic: "t", id: "e-2", payload: "x" }, "e-2");
    assert.deepEqual(rec.pushes, ["x"]);
    assert.equal(rec.metas[0].transport, "sse");
    assert.equal(rec.states.at(-1), "open");

    // Later page loads in this tab (same sessionStorage) skip the WebSocket attempt.
    const g = setup({ sessionStorage: storage });
    sub(g.client, { topic: "t", token: "tok" });
    await g.clock.advance(0);
    assert.equal(g.sockets.length, 0);
    assert.equal(g.sources.length, 1);
  });

  test("socket opens but no auth_ok within the timeout: fall back", async () => {
    const f = setup();
    sub(f.client, { topic: "t", token: "tok" });
    await f.clock.advance(0);
    f.lastSocket()._open();
    await f.clock.advance(6000);
    assert.equal(f.sources.length, 1);
  });

  test("socket closed right after open by a proxy: fall back", async () => {
    const f = setup();
    sub(f.client, { topic: "t", token: "tok" });
    await f.clock.advance(0);
    const ws = f.lastSocket();
    ws._open();
    ws._close(1006);
    await flush();
    assert.equal(f.sources.length, 1);
  });

  test("upgrade fails because the topic isn't registered (probe 404): stay on WebSocket, back off", async () => {
    const f = setup({ fetchStatus: 404, random: () => 0 });
    const { rec } = sub(f.client, { topic: "t", token: "tok" });
    await f.clock.advance(0);
    f.lastSocket()._close(1006);
    await flush();
    assert.equal(f.sources.length, 0);
    assert.equal(rec.states.at(-1), "connecting");
    f.setFetchStatus(200);
    await f.clock.advance(500);
    assert.equal(f.sockets.length, 2);
    await authOk(f, "t", "e-1");
    assert.equal(rec.states.at(-1), "open");
    assert.equal(f.sources.length, 0);
  });

  test("worker down (probe fails): no fallback, back off", async () => {
    const f = setup({ fetchStatus: 0 });
    sub(f.client, { topic: "t", token: "tok" });
    await f.clock.advance(0);
    f.lastSocket()._close(1006);
    await flush();
    assert.equal(f.sources.length, 0);
    assert.equal(f.clock.pending().length, 1);
  });

  test("once WebSocket worked, a later failure does not switch to SSE", async () => {
    const f = setup({ fetchStatus: 200 });
    sub(f.client, { topic: "t", token: "tok" });
    await f.clock.advance(0);
    await authOk(f, "t", "e-1");
    f.lastSocket()._close(1001);
    await f.clock.advance(1000);
    f.lastSocket()._close(1006);
    await f.clock.advance(2000);
    assert.equal(f.sources.length, 0);
    assert.equal(f.sockets.length, 3);
  });

  test('transport: "websocket" never falls back', async () => {
    const f = setup({ fetchStatus: 200 });
    sub(f.client, { topic: "t", token: "tok", transport: "websocket" });
    await f.clock.advance(0);
    f.lastSocket()._close(1006);
    await f.clock.advance(1000);
    assert.equal(f.sources.length, 0);
    assert.equal(f.sockets.length, 2);
  });
});

describe("SSE transport", () => {
  test("multi-topic: one EventSource with topic/token pairs; the cursor tracks every topic", async () => {
    const f = setup({ random: () => 0 });
    const a = sub(f.client, { topic: "a", token: "ta", transport: "sse" });
    const b = sub(f.client, { topic: "b", token: "tb", transport: "sse" });
    await f.clock.advance(0);
    assert.equal(f.sources.length, 1);
    let es = f.lastSource();
    assert.equal(es.url, "http://worker.test:9000/sse?topic=a&token=ta&topic=b&token=tb");
    es._open();
    assert.equal(a.handle.state, "open");
    es._message({ type: "push", topic: "a", id: "e-5", payload: 1 }, "e-5,e-3");
    assert.deepEqual(a.rec.pushes, [1]);
    // Dropped for good (e.g. proxy 502): the client takes over and resumes with the cursor.
    es._error(2);
    await flush();
    await f.clock.advance(500);
    es = f.lastSource();
    assert.equal(f.sources.length, 2);
    assert.equal(es.query.get("last_event_id"), "e-5,e-3");
    es._open();
    es._message({ type: "push", topic: "a", id: "e-5", payload: 1 }, "e-5,e-3"); // overlap
    es._message({ type: "push", topic: "b", id: "e-6", payload: 2 }, "e-5,e-6");
    assert.deepEqual(a.rec.pushes, [1]);
    assert.deepEqual(b.rec.pushes, [2]);
    assert.equal(a.rec.resyncs + b.rec.resyncs, 0);
    // The set changes: reopened at once with the current cursor.
    const c = sub(f.client, { topic: "c", token: "tc", transport: "sse" });
    await f.clock.advance(0);
    es = f.lastSource();
    assert.equal(f.sources.length, 3);
    assert.equal(es.url.split("&last_event_id=")[0], "http://worker.test:9000/sse?topic=a&token=ta&topic=b&token=tb&topic=c&token=tc");
    assert.equal(es.query.get("last_event_id"), "e-5,e-6,");
    es._open();
    // Our empty slot for the new topic makes the server send resync: not the app's business.
    es._message({ type: "resync", topic: "c" }, "e-5,e-6,e-6");
    assert.equal(c.rec.resyncs, 0);
    es._message({ type: "resync", topic: "c" }, "e-5,e-6,e-6"); // a real one later
    assert.equal(c.rec.resyncs, 1);
  });

  test("single topic: last_event_id from the last event, or from a resync's id line", async () => {
    const f = setup({ random: () => 0 });
    sub(f.client, { topic: "a", token: "ta", transport: "sse" });
    await f.clock.advance(0);
    let es = f.lastSource();
    es._open();
    es._message({ type: "resync", topic: "a" }, "e-40"); // browsers expose the first id line here
    es._error(2);
    await f.clock.advance(500);
    es = f.lastSource();
    assert.equal(es.query.get("last_event_id"), "e-40");
    es._open();
    es._event("position", "e-41"); // a dispatched position, should a worker send one
    es._error(2);
    await f.clock.advance(1000);
    assert.equal(f.lastSource().query.get("last_event_id"), "e-41");
  });

  test("a dropped stream is first retried by EventSource itself (exact Last-Event-ID)", async () => {
    const f = setup();
    const a = sub(f.client, { topic: "a", token: "ta", transport: "sse" });
    await f.clock.advance(0);
    const es = f.lastSource();
    es._open();
    es._error(0); // CONNECTING: the browser retries
    await flush();
    assert.equal(a.handle.state, "reconnecting");
    assert.equal(f.sources.length, 1);
    es._open();
    assert.equal(a.handle.state, "open");
    assert.equal(a.rec.resyncs, 0);
    // If the browser's retry doesn't open within the timeout, the client takes over.
    es._error(0);
    await f.clock.advance(9000);
    assert.ok(es.closed);
    await f.clock.advance(1000);
    assert.equal(f.sources.length, 2);
  });

  test("no position known after a stream that saw nothing: the client calls onResync itself", async () => {
    const f = setup({ random: () => 0 });
    const a = sub(f.client, { topic: "a", token: "ta", transport: "sse" });
    await f.clock.advance(0);
    f.lastSource()._open();
    f.lastSource()._error(2);
    await f.clock.advance(500);
    const es = f.lastSource();
    assert.equal(es.query.get("last_event_id"), null);
    es._open();
    assert.equal(a.rec.resyncs, 1);
  });

  test("refused (probe reads 401): one fresh token, then 'refused' and silence", async () => {
    const f = setup({ fetchStatus: 401 });
    let calls = 0;
    const { rec } = sub(f.client, {
      topic: "a",
      token: "secret-token-1",
      getToken: async () => (calls++, "secret-token-2"),
      transport: "sse",
      debug: true,
    });
    await f.clock.advance(0);
    f.lastSource()._error(2);
    await f.clock.advance(1000);
    assert.equal(calls, 1);
    assert.equal(f.sources.length, 2);
    assert.equal(f.lastSource().query.get("token"), "secret-token-2");
    f.lastSource()._error(2);
    await f.clock.advance(10 * 60 * 1000);
    assert.equal(f.sources.length, 2);
    assert.equal(f.fetches.length, 2);
    assert.equal(rec.states.at(-1), "refused");
    assert.ok(!f.console.text().includes("secret-token"), "no token in console output");
  });

  test("multi-topic failure: per-topic probes find the bad topic, the others go on", async () => {
    const f = setup({ random: () => 0, fetchStatus: (url) => (url.includes("topic=b") ? 404 : 200) });
    const a = sub(f.client, { topic: "a", token: "ta", transport: "sse" });
    const b = sub(f.client, { topic: "b", token: "tb", transport: "sse" });
    await f.clock.advance(0);
    f.lastSource()._error(2);
    await f.clock.advance(500);
    assert.equal(f.lastSource().url, "http://worker.test:9000/sse?topic=a&token=ta");
    f.lastSource()._open();
    assert.equal(a.handle.state, "open");
    assert.equal(b.handle.state, "connecting");
    // b registered meanwhile: probed alone first, then the stream is reopened with it.
    f.setFetchStatus(200);
    await f.clock.advance(1000);
    assert.equal(f.lastSource().url, "http://worker.test:9000/sse?topic=a&token=ta&topic=b&token=tb");
  });
});

describe("tab sharing (shareAcrossTabs)", () => {
  async function twoTabs(opts = {}) {
    const clock = new Clock();
    const bus = new Bus();
    const localStorage = new MemoryStorage();
    const t1 = setup({ clock, bus, localStorage, ...opts });
    const t2 = setup({ clock, bus, localStorage, ...opts });
    return { clock, bus, t1, t2 };
  }

  test("one leader holds the connection and relays; the follower takes over without loss", async () => {
    const { clock, bus, t1, t2 } = await twoTabs();
    const s1 = sub(t1.client, { topic: "q", token: "t1", shareAcrossTabs: true });
    await clock.advance(200);
    const s2 = sub(t2.client, { topic: "q", token: "t2", shareAcrossTabs: true });
    const s3 = sub(t2.client, { topic: "r", token: "t3", shareAcrossTabs: true });
    await clock.advance(200);
    assert.equal(t1.sockets.length, 1);
    assert.equal(t2.sockets.length, 0, "the follower opens no connection");
    const ws = await authOk(t1, "q", "e-1");
    await flush();
    assert.deepEqual(ws.sent.at(-1), { type: "subscribe", topic: "r", token: "t3" });
    ws._frame({ type: "subscribed", topic: "r", last_event_id: "e-1" });
    for (let i = 2; i <= 4; i++) ws._frame({ type: "push", topic: "q", id: `e-${i}`, payload: i });
    ws._frame({ type: "push", topic: "r", id: "e-5", payload: "r5" });
    await flush();
    assert.deepEqual(s1.rec.pushes, [2, 3, 4]);
    assert.deepEqual(s2.rec.pushes, [2, 3, 4]);
    assert.deepEqual(s3.rec.pushes, ["r5"]);
    assert.equal(s2.handle.state, "open");
    assert.equal(s3.handle.state, "open");

    // The leader tab dies; its socket with it.
    bus.kill(t1.tab);
    await clock.advance(200);
    assert.equal(t2.sockets.length, 1, "the follower is the leader now");
    const ws2 = t2.lastSocket();
    ws2._open();
    const auth = ws2.sent[0];
    assert.equal(auth.type, "auth");
    assert.equal(auth.last_event_id, auth.token === "t2" ? "e-4" : "e-5");
    ws2._frame({ type: "auth_ok", topic: ws2.url.endsWith("q") ? "q" : "r", last_event_id: auth.last_event_id });
    await flush();
    const sub2 = ws2.sent.find((m) => m.type === "subscribe");
    assert.ok(sub2 && sub2.last_event_id, "every topic resumes by id");
    // Replay of what the dead leader never relayed, with an overlap that must be dropped.
    ws2._frame({ type: "push", topic: "q", id: "e-4", payload: 4 });
    ws2._frame({ type: "push", topic: "q", id: "e-6", payload: 6 });
    assert.deepEqual(s2.rec.pushes, [2, 3, 4, 6]);
    assert.equal(s2.rec.resyncs, 0);
  });

  test("a follower with getToken only: the leader asks it for the token", async () => {
    const { clock, t1, t2 } = await twoTabs();
    sub(t1.client, { topic: "a", token: "ta", shareAcrossTabs: true });
    await clock.advance(200);
    sub(t2.client, { topic: "b", getToken: async () => "from-tab-2", shareAcrossTabs: true });
    await clock.advance(200);
    const ws = await authOk(t1, "a", "e-1");
    await flush();
    assert.deepEqual(ws.sent.at(-1), { type: "subscribe", topic: "b", token: "from-tab-2" });
  });

  test("without Web Locks a localStorage lease elects the leader; a dead leader is replaced", async () => {
    const { clock, bus, t1, t2 } = await twoTabs({ noLocks: true });
    const s1 = sub(t1.client, { topic: "q", token: "t1", shareAcrossTabs: true });
    await clock.advance(300);
    const s2 = sub(t2.client, { topic: "q", token: "t2", shareAcrossTabs: true });
    await clock.advance(1500);
    assert.equal(t1.sockets.length + t2.sockets.length, 1);
    const [leader, follower, fs] = t1.sockets.length ? [t1, t2, s2] : [t2, t1, s1];
    const ws = await authOk(leader, "q", "e-1");
    ws._frame({ type: "push", topic: "q", id: "e-2", payload: 2 });
    await flush();
    assert.deepEqual(fs.rec.pushes, [2]);
    bus.kill(leader.tab); // no more lease renewals
    await clock.advance(6000);
    assert.equal(follower.sockets.length, 1);
    follower.lastSocket()._open();
    assert.equal(follower.lastSocket().sent[0].last_event_id, "e-2");
  });

  test("closing the leader's last subscription hands the connection over", async () => {
    const { clock, t1, t2 } = await twoTabs();
    const s1 = sub(t1.client, { topic: "q", token: "t1", shareAcrossTabs: true });
    await clock.advance(200);
    sub(t2.client, { topic: "q", token: "t2", shareAcrossTabs: true });
    await clock.advance(200);
    await authOk(t1, "q", "e-9");
    await flush();
    s1.handle.close();
    await clock.advance(500);
    assert.equal(t1.lastSocket().closedByClient, 1000);
    assert.equal(t2.sockets.length, 1);
    t2.lastSocket()._open();
    assert.equal(t2.lastSocket().sent[0].last_event_id, "e-9");
  });
});

describe("console hygiene", () => {
  test("no token in any console output across refusal, fallback and debug logging", async () => {
    const f = setup({ fetchStatus: (u) => (u.includes("token=tok-B") ? 401 : 200) });
    const tokens = ["tok-A-0123456789", "tok-B-0123456789", "tok-C-0123456789"];
    sub(f.client, { topic: "a", token: tokens[0], debug: true });
    sub(f.client, { topic: "b", token: tokens[1], getToken: async () => tokens[2], debug: true });
    await f.clock.advance(0);
    f.lastSocket()._close(1006); // -> probe -> fallback to SSE
    await flush();
    for (let i = 0; i < 5; i++) {
      const es = f.lastSource();
      if (es) es._error(2);
      await f.clock.advance(31000);
    }
    const out = f.console.text();
    assert.ok(out.length > 0, "debug logging produced output");
    for (const t of tokens) assert.ok(!out.includes(t), `token leaked: ${t}`);
  });
});
