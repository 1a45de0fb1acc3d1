// The client in a real browser (Debian's headless Chromium driven by playwright-core) loading a
// page through a real nginx reverse proxy in front of the real worker binary.
//
// Needs /usr/bin/chromium (CHROMIUM_BIN), nginx and the worker (WAVELOG_WORKER_BIN). Missing
// ones skip this file with the reason printed, unless CI is set: then it fails.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { freePort, makeToken, sleep, startWorker, waitFor } from "./helpers/worker.mjs";
import { startNginx } from "./helpers/nginx.mjs";
import { CHROMIUM, browserPrerequisites } from "./helpers/browser.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..");
const ARTIFACTS = join(root, "test-artifacts");
const { playwright, skip } = await browserPrerequisites("browser tests");

const tokens = new Set();
function token(topic) {
  const t = makeToken(topic);
  tokens.add(t);
  return t;
}

describe("browser behind nginx", { skip, timeout: 170000 }, () => {
  let tmp;
  let worker;
  let workerPorts;
  let nginx;
  let browser;
  const consoleMessages = [];
  let n = 0;
  const topic = (name) => `${name}.${++n}`;

  before(async () => {
    tmp = mkdtempSync(join(tmpdir(), "ww-browser-"));
    const www = join(tmp, "www");
    mkdirSync(www, { recursive: true });
    writeFileSync(join(www, "index.html"), readFileSync(join(here, "browser", "index.html")));
    workerPorts = { public: await freePort(), internal: await freePort() };
    worker = await startWorker({ ports: workerPorts });
    nginx = await startNginx({ prefix: join(tmp, "nginx"), port: await freePort(), workerPort: workerPorts.public, dist: join(root, "dist"), www });
    browser = await playwright.chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      // Playwright gives every launch a fresh temporary --user-data-dir of its own.
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    mkdirSync(ARTIFACTS, { recursive: true });
  });

  after(async () => {
    if (browser) await browser.close();
    if (nginx) await nginx.stop();
    if (worker) await worker.stop();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
    const text = consoleMessages.join("\n");
    for (const t of tokens) assert.ok(!text.includes(t), "a token reached the browser console");
  });

  async function openPage(context) {
    const page = await (context || browser).newPage();
    page.on("console", (m) => consoleMessages.push(m.text()));
    page.on("pageerror", (e) => consoleMessages.push("pageerror: " + e.message));
    await page.goto(nginx.origin + "/index.html");
    return page;
  }
  const start = (page, o) => page.evaluate((o) => window.start(o), o);
  const state = (page) => page.evaluate(() => t.states.at(-1));
  const waitState = (page, s, timeout = 15000) =>
    page.waitForFunction((s) => t.states.at(-1) === s, s, { timeout, polling: 25 });
  const waitEvents = (page, count, timeout = 15000) =>
    page.waitForFunction((c) => t.events.length >= c, count, { timeout, polling: 25 });
  const events = (page) => page.evaluate(() => t.events);
  const requests = (prefix, since) => nginx.access().filter((l) => l.uri.startsWith(prefix) && l.msec * 1000 >= since);

  test("1. WebSocket through nginx: pushes arrive and show on the page (screenshot)", async () => {
    const q = topic("qso");
    await worker.register(q);
    const page = await openPage();
    // No url: the footer's window.WavelogWorker.url (location.origin + "/w") is the default.
    assert.equal(await page.evaluate(() => window.WavelogWorker.footerConfig), true, "config object kept");
    await start(page, { topic: q, token: token(q) });
    await waitState(page, "open");
    const calls = [["DL1ABC", "20m"], ["G4XYZ", "40m"], ["JA1QRP", "15m"]];
    const ids = [];
    for (const [call, band] of calls) ids.push((await worker.publish(q, { call, band })).id);
    await waitEvents(page, 3);
    const got = await events(page);
    assert.deepEqual(got.map((e) => e.payload.call), calls.map((c) => c[0]));
    assert.deepEqual(got.map((e) => e.id), ids);
    assert.ok(got.every((e) => e.transport === "websocket"));
    assert.equal(await page.locator("#events tr").count(), 3);
    assert.equal(await page.locator("#status").textContent(), "open");
    const shot = join(ARTIFACTS, "1-websocket-through-nginx.png");
    await page.screenshot({ path: shot, fullPage: true });
    assert.ok(existsSync(shot));
    await page.close();
    // nginx logs a WebSocket request when it ends.
    await waitFor(() => nginx.access().some((l) => l.uri === "/w/ws" && l.status === 101), {
      what: "the upgrade (101) in nginx's access log",
    });
  });

  test("2. a location that refuses upgrades: falls back to SSE, unbuffered", async () => {
    const q = topic("fallback");
    await worker.register(q);
    const page = await openPage();
    const since = Date.now();
    await start(page, { url: nginx.origin + "/nows", topic: q, token: token(q) });
    await waitState(page, "open");
    const t0 = Date.now();
    await worker.publish(q, { call: "SSE1", band: "2m" });
    await waitEvents(page, 1, 5000);
    const [first] = await events(page);
    assert.equal(first.transport, "sse");
    const latency = first.at - t0;
    assert.ok(latency < 2000, `first event took ${latency} ms through nginx: buffered?`);
    const remembered = await page.evaluate(() => Object.entries(sessionStorage));
    assert.deepEqual(remembered, [["wavelog-worker:transport:" + nginx.origin + "/nows", "sse"]]);
    const log = requests("/nows/", since);
    assert.ok(log.some((l) => l.uri === "/nows/ws" && l.status === 403), "upgrade refused by nginx");
    assert.ok(log.some((l) => l.uri === "/nows/sse" && l.status === 200), "SSE through nginx");
    // Later pushes arrive at once too.
    for (let i = 0; i < 3; i++) {
      const t1 = Date.now();
      await worker.publish(q, { call: "SSE" + (i + 2), band: "2m" });
      await waitEvents(page, i + 2, 5000);
      const e = (await events(page)).at(-1);
      assert.ok(e.at - t1 < 2000, `event ${i + 2} took ${e.at - t1} ms`);
    }
    await page.screenshot({ path: join(ARTIFACTS, "2-sse-fallback.png"), fullPage: true });
    await page.close();
  });

  test("3. worker killed and restarted on the same ports: reconnect and onResync", async () => {
    const q = topic("restart");
    await worker.register(q);
    const wsPage = await openPage();
    const ssePage = await openPage();
    await start(wsPage, { topic: q, token: token(q) });
    await start(ssePage, { url: nginx.origin + "/nows", topic: q, token: token(q) });
    await waitState(wsPage, "open");
    await waitState(ssePage, "open");
    await worker.publish(q, { call: "BEFORE" });
    await waitEvents(wsPage, 1);
    await waitEvents(ssePage, 1);
    await worker.kill();
    await waitState(wsPage, "reconnecting");
    await waitState(ssePage, "reconnecting");
    worker = await startWorker({ ports: workerPorts });
    await worker.register(q); // the backend registers again on its next publish
    for (const page of [wsPage, ssePage]) {
      await page.waitForFunction(() => t.resyncs === 1, null, { timeout: 20000, polling: 50 });
      await waitState(page, "open", 20000);
    }
    await worker.publish(q, { call: "AFTER" });
    for (const page of [wsPage, ssePage]) {
      await waitEvents(page, 2);
      assert.deepEqual((await events(page)).map((e) => e.payload.call), ["BEFORE", "AFTER"]);
    }
    assert.equal((await events(wsPage))[1].transport, "websocket");
    assert.equal((await events(ssePage))[1].transport, "sse");
    await wsPage.close();
    await ssePage.close();
  });

  async function publishDuring(q, total, every, disrupt) {
    for (let i = 1; i <= total; i++) {
      await worker.publish(q, { call: `N${i}`, n: i });
      await disrupt(i);
      await sleep(every);
    }
  }

  for (const [name, how] of [
    ["nginx stopped and started again", "restart"],
    ["nginx reloaded (old workers drop their connections)", "reload"],
  ]) {
    test(`4. ${name} while events are published: exactly the missed ones, in order`, async () => {
      const q = topic("drop-" + how);
      await worker.register(q);
      const wsPage = await openPage();
      const ssePage = await openPage();
      await start(wsPage, { topic: q, token: token(q) });
      await start(ssePage, { url: nginx.origin + "/nows", topic: q, token: token(q) });
      await waitState(wsPage, "open");
      await waitState(ssePage, "open");
      const total = 30;
      await publishDuring(q, total, 40, async (i) => {
        if (how === "restart") {
          if (i === 8) await nginx.stop();
          if (i === 20) await nginx.start();
        } else if (i === 8) {
          nginx.reload();
        }
      });
      for (const page of [wsPage, ssePage]) {
        await waitEvents(page, total, 20000);
        await sleep(500); // anything extra (a duplicate) would arrive now
        const got = await events(page);
        assert.deepEqual(got.map((e) => e.payload.n), Array.from({ length: total }, (_, k) => k + 1));
        assert.equal(new Set(got.map((e) => e.id)).size, total, "no duplicate ids");
        assert.equal(await page.evaluate(() => t.resyncs), 0);
        assert.ok((await page.evaluate(() => t.states)).includes("reconnecting"), "the connection really dropped");
      }
      await wsPage.close();
      await ssePage.close();
    });
  }

  test("5. a token for another topic: 'refused', getToken once, no retry storm", async () => {
    for (const path of ["/w", "/nows"]) {
      const q = topic("refused");
      await worker.register(q);
      const page = await openPage();
      const since = Date.now();
      await start(page, { url: nginx.origin + path, topic: q, token: token("qso.someone.else"), freshToken: token("qso.another") });
      await waitState(page, "refused", 20000);
      await sleep(3000);
      assert.equal(await state(page), "refused");
      assert.equal(await page.evaluate(() => t.tokenCalls), 1);
      const hits = requests(path + "/", since).filter((l) => l.uri.endsWith("/ws") || l.uri.endsWith("/sse"));
      // /w: two sockets (first token, fresh token). /nows: per try an upgrade (403) and a probe (401).
      assert.ok(hits.length >= 2 && hits.length <= 4, `${path}: ${hits.length} requests: ${JSON.stringify(hits)}`);
      await page.close();
    }
  });

  test("shareAcrossTabs: one connection for two tabs; the leader closes, the other takes over without loss", async () => {
    const q = topic("shared");
    await worker.register(q);
    const context = await browser.newContext();
    const pages = [await openPage(context), await openPage(context)];
    const sockets = new Map(pages.map((p) => [p, 0]));
    for (const p of pages) p.on("websocket", () => sockets.set(p, sockets.get(p) + 1));
    await start(pages[0], { topic: q, token: token(q), shared: true });
    await waitState(pages[0], "open");
    await start(pages[1], { topic: q, token: token(q), shared: true });
    await waitState(pages[1], "open");
    assert.equal((await worker.status()).connected_sockets, 1, "one connection for both tabs");
    const leader = pages.find((p) => sockets.get(p) === 1);
    const follower = pages.find((p) => p !== leader);
    assert.ok(leader && follower && sockets.get(follower) === 0);
    for (let i = 1; i <= 5; i++) await worker.publish(q, { n: i });
    for (const p of pages) await waitEvents(p, 5);
    await leader.close(); // the tab goes away: its lock is released, its socket closed
    for (let i = 6; i <= 15; i++) {
      await worker.publish(q, { n: i });
      await sleep(30);
    }
    await waitEvents(follower, 15, 20000);
    await sleep(500);
    const got = await events(follower);
    assert.deepEqual(got.map((e) => e.payload.n), Array.from({ length: 15 }, (_, k) => k + 1));
    assert.equal(await follower.evaluate(() => t.resyncs), 0);
    assert.equal(sockets.get(follower), 1, "the follower holds the connection now");
    assert.equal(await state(follower), "open");
    await context.close();
  });

  test("shareAcrossTabs without Web Locks and BroadcastChannel: the localStorage fallback", async () => {
    const q = topic("shared-ls");
    await worker.register(q);
    const context = await browser.newContext();
    await context.addInitScript(() => {
      Object.defineProperty(Navigator.prototype, "locks", { get: () => undefined, configurable: true });
      delete window.BroadcastChannel;
    });
    const pages = [await openPage(context), await openPage(context)];
    assert.equal(await pages[0].evaluate(() => typeof BroadcastChannel + " " + typeof navigator.locks), "undefined undefined");
    const sockets = new Map(pages.map((p) => [p, 0]));
    for (const p of pages) p.on("websocket", () => sockets.set(p, sockets.get(p) + 1));
    await start(pages[0], { topic: q, token: token(q), shared: true });
    await waitState(pages[0], "open");
    await start(pages[1], { topic: q, token: token(q), shared: true });
    await waitState(pages[1], "open");
    assert.equal((await worker.status()).connected_sockets, 1, "one connection for both tabs");
    const leader = pages.find((p) => sockets.get(p) === 1);
    const follower = pages.find((p) => p !== leader);
    for (let i = 1; i <= 3; i++) await worker.publish(q, { n: i });
    for (const p of pages) await waitEvents(p, 3);
    await leader.close({ runBeforeUnload: true });
    for (let i = 4; i <= 10; i++) {
      await worker.publish(q, { n: i });
      await sleep(30);
    }
    await waitEvents(follower, 10, 20000);
    await sleep(500);
    assert.deepEqual((await events(follower)).map((e) => e.payload.n), Array.from({ length: 10 }, (_, k) => k + 1));
    assert.equal(await follower.evaluate(() => t.resyncs), 0);
    assert.equal(sockets.get(follower), 1);
    await context.close();
  });
});
