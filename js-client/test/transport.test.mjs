// The client's transports against the REAL worker binary (WAVELOG_WORKER_BIN, default
// /var/tmp/ww-bin/wavelog-worker), from Node with the `ws` and `eventsource` packages standing
// in for the browser's WebSocket and EventSource. A TCP proxy cuts connections on demand.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { WebSocket } from "ws";
import { EventSource } from "eventsource";

import { createClient } from "../src/wavelog-worker.mjs";
import {
  WORKER_BIN,
  freePort,
  makeToken,
  sleep,
  startProxy,
  startWorker,
  waitFor,
  workerAvailable,
} from "./helpers/worker.mjs";

let skip = false;
if (!workerAvailable()) {
  const why = `worker binary not found at ${WORKER_BIN} (set WAVELOG_WORKER_BIN)`;
  if (process.env.CI) throw new Error(`CI: ${why}`);
  console.log(`# SKIP transport tests: ${why}`);
  skip = why;
}

const FAST = { minDelay: 100, baseDelay: 200, maxDelay: 1000, connectTimeout: 3000 };
const consoleLines = [];
const spyConsole = {
  debug: (...a) => consoleLines.push(a.join(" ")),
  warn: (...a) => consoleLines.push(a.join(" ")),
};
const tokensUsed = new Set();

function nodeClient() {
  return createClient({ WebSocket, EventSource, fetch: globalThis.fetch, console: spyConsole });
}

function token(topic, opts) {
  const t = makeToken(topic, opts);
  tokensUsed.add(t);
  return t;
}

/** A subscription that records everything. */
function record(client, options) {
  const r = { events: [], ids: [], metas: [], resyncs: 0, states: [] };
  r.handle = client.subscribe({
    ...FAST,
    debug: true,
    onPush: (p, m) => {
      r.events.push(p);
      r.ids.push(m.id);
      r.metas.push(m);
    },
    onResync: () => r.resyncs++,
    onStatus: (s) => r.states.push(s),
    ...options,
  });
  r.state = () => r.handle.state;
  r.waitState = (s, timeout = 10000) => waitFor(() => r.handle.state === s, { timeout, what: `state ${s} (now ${r.handle.state})` });
  r.waitEvents = (n, timeout = 10000) => waitFor(() => r.events.length >= n, { timeout, what: `${n} events (have ${r.events.length})` });
  return r;
}

describe("transports against the real worker", { skip }, () => {
  let w;
  let n = 0;
  const topic = (name) => `${name}.${++n}`;

  before(async () => {
    w = await startWorker();
  });
  after(async () => {
    if (w) await w.stop();
    const out = consoleLines.join("\n");
    for (const t of tokensUsed) assert.ok(!out.includes(t), "a token reached console output");
  });

  test("WebSocket: several topics on one socket, pushes arrive in order with their ids", async () => {
    const [a, b] = [topic("ws.a"), topic("ws.b")];
    await w.register(a);
    await w.register(b);
    const client = nodeClient();
    const ra = record(client, { url: `ws://127.0.0.1:${w.ports.public}`, topic: a, token: token(a), transport: "websocket" });
    const rb = record(client, { url: `ws://127.0.0.1:${w.ports.public}`, topic: b, token: token(b), transport: "websocket" });
    await ra.waitState("open");
    await rb.waitState("open");
    assert.equal((await w.status()).connected_sockets, 1, "one socket for both topics");
    const p1 = await w.publish(a, { n: 1 });
    const p2 = await w.publish(b, { n: 2 });
    const p3 = await w.publish(a, { n: 3, big: 12345678901234567890 });
    await ra.waitEvents(2);
    await rb.waitEvents(1);
    assert.deepEqual(ra.events.map((e) => e.n), [1, 3]);
    assert.deepEqual(ra.ids, [p1.id, p3.id]);
    assert.deepEqual(rb.ids, [p2.id]);
    assert.deepEqual(ra.metas[0], { id: p1.id, transport: "websocket", topic: a });
    ra.handle.close();
    rb.handle.close();
    await waitFor(async () => (await w.status()).connected_sockets === 0, { what: "socket closed" });
  });

  test("SSE: several topics on one stream, pushes arrive", async () => {
    const [a, b] = [topic("sse.a"), topic("sse.b")];
    await w.register(a);
    await w.register(b);
    const client = nodeClient();
    const url = `http://127.0.0.1:${w.ports.public}`;
    const ra = record(client, { url, topic: a, token: token(a), transport: "sse" });
    const rb = record(client, { url, topic: b, token: token(b), transport: "sse" });
    await ra.waitState("open");
    await rb.waitState("open");
    assert.equal((await w.status()).connected_sockets, 1, "one stream for both topics");
    const p1 = await w.publish(a, "one");
    const p2 = await w.publish(b, { text: "line\nbreak" });
    await ra.waitEvents(1);
    await rb.waitEvents(1);
    assert.deepEqual(ra.events, ["one"]);
    assert.deepEqual(rb.events, [{ text: "line\nbreak" }]);
    assert.deepEqual([ra.ids[0], rb.ids[0]], [p1.id, p2.id]);
    assert.equal(ra.metas[0].transport, "sse");
    ra.handle.close();
    rb.handle.close();
  });

  for (const transport of ["websocket", "sse"]) {
    test(`${transport}: connection dropped while events are published -> exactly the missed ones, in order`, async () => {
      const t = topic(`drop.${transport}`);
      await w.register(t);
      const proxy = await startProxy(w.ports.public);
      try {
        const r = record(nodeClient(), { url: `http://127.0.0.1:${proxy.port}`, topic: t, token: token(t), transport });
        await r.waitState("open");
        for (let i = 1; i <= 3; i++) await w.publish(t, i);
        await r.waitEvents(3);
        proxy.down();
        await r.waitState("reconnecting");
        for (let i = 4; i <= 8; i++) await w.publish(t, i);
        await sleep(300);
        proxy.up();
        await r.waitEvents(8, 15000);
        await sleep(300);
        assert.deepEqual(r.events, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert.equal(new Set(r.ids).size, 8);
        assert.equal(r.resyncs, 0);
        r.handle.close();
      } finally {
        await proxy.close();
      }
    });
  }

  test("websocket: dropped before any event -> resumes from the auth_ok position, nothing lost", async () => {
    const t = topic("drop.early");
    await w.register(t);
    const proxy = await startProxy(w.ports.public);
    try {
      const r = record(nodeClient(), { url: `ws://127.0.0.1:${proxy.port}`, topic: t, token: token(t), transport: "websocket" });
      await r.waitState("open");
      proxy.down();
      await r.waitState("reconnecting");
      await w.publish(t, "missed-1");
      await w.publish(t, "missed-2");
      proxy.up();
      await r.waitEvents(2, 15000);
      assert.deepEqual(r.events, ["missed-1", "missed-2"]);
      assert.equal(r.resyncs, 0);
      r.handle.close();
    } finally {
      await proxy.close();
    }
  });

  test("sse: dropped before any event -> resumes from the stream's position event, nothing lost", async () => {
    // The worker's first SSE block is a `position` event, so even a stream that saw no event
    // can resume exactly once the client has to reconnect by itself.
    const t = topic("drop.early.sse");
    await w.register(t);
    const proxy = await startProxy(w.ports.public);
    try {
      const r = record(nodeClient(), { url: `http://127.0.0.1:${proxy.port}`, topic: t, token: token(t), transport: "sse" });
      await r.waitState("open");
      proxy.down();
      await r.waitState("reconnecting");
      await w.publish(t, "missed");
      await sleep(3000); // EventSource's own retry (sse_retry 2 s) fails while the proxy is down
      proxy.up();
      await r.waitState("open");
      await r.waitEvents(1);
      await w.publish(t, "live");
      await r.waitEvents(2);
      assert.deepEqual(r.events, ["missed", "live"]);
      assert.equal(r.resyncs, 0);
      r.handle.close();
    } finally {
      await proxy.close();
    }
  });

  test("auto: a proxy that refuses WebSocket upgrades -> SSE, pushes arrive", async () => {
    const t = topic("auto");
    await w.register(t);
    const proxy = await startProxy(w.ports.public, { refuseUpgrades: true });
    try {
      const r = record(nodeClient(), { url: `ws://127.0.0.1:${proxy.port}`, topic: t, token: token(t) });
      await r.waitState("open");
      await w.publish(t, "via sse");
      await r.waitEvents(1);
      assert.equal(r.metas[0].transport, "sse");
      r.handle.close();
    } finally {
      await proxy.close();
    }
  });

  for (const transport of ["websocket", "sse"]) {
    test(`${transport}: a token for another topic -> one fresh token, then 'refused', bounded attempts`, async () => {
      const t = topic(`refused.${transport}`);
      await w.register(t);
      let calls = 0;
      const before = w.count(new RegExp(`auth refused.*"${t.replace(".", "\\.")}"`));
      const r = record(nodeClient(), {
        url: `http://127.0.0.1:${w.ports.public}`,
        topic: t,
        token: token("some.other.topic"),
        getToken: async () => {
          calls++;
          return token("yet.another.topic");
        },
        transport,
      });
      await r.waitState("refused");
      await sleep(2000);
      assert.equal(calls, 1);
      assert.equal(r.state(), "refused");
      const refusals = w.count(new RegExp(`auth refused.*"${t.replace(".", "\\.")}"`)) - before;
      // websocket: 2 sockets; sse: 2 streams + 2 status probes.
      assert.ok(refusals >= 2 && refusals <= 4, `refusals logged by the worker: ${refusals}`);
      r.handle.close();
    });
  }

  test("topic not registered yet: retried with backoff until the backend registers it", async () => {
    const t = topic("late");
    const r = record(nodeClient(), { url: `ws://127.0.0.1:${w.ports.public}`, topic: t, token: token(t) });
    await sleep(1500);
    assert.equal(r.state(), "connecting");
    await w.register(t);
    await r.waitState("open", 5000);
    await w.publish(t, "hello");
    await r.waitEvents(1);
    assert.equal(r.metas[0].transport, "websocket", "a 404 is no reason to leave WebSocket");
    r.handle.close();
  });
});

describe("worker restart", { skip }, () => {
  for (const transport of ["websocket", "sse"]) {
    test(`${transport}: killed and restarted on the same ports -> reconnect and onResync`, async () => {
      const ports = { public: await freePort(), internal: await freePort() };
      let w = await startWorker({ ports });
      try {
        const t = "restart." + transport;
        await w.register(t);
        const r = record(nodeClient(), { url: `http://127.0.0.1:${ports.public}`, topic: t, token: token(t), transport });
        await r.waitState("open");
        await w.publish(t, "before");
        await r.waitEvents(1);
        await w.kill();
        await r.waitState("reconnecting");
        w = await startWorker({ ports });
        await w.register(t);
        await waitFor(() => r.resyncs === 1, { timeout: 15000, what: "onResync after restart" });
        await r.waitState("open");
        await w.publish(t, "after");
        await r.waitEvents(2);
        assert.deepEqual(r.events, ["before", "after"]);
        r.handle.close();
      } finally {
        await w.stop();
      }
    });
  }
});
