// Runs the real wavelog-worker binary for tests, makes tokens, and provides a TCP proxy that a
// test can cut (drop every connection) or make refuse WebSocket upgrades.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const WORKER_BIN = process.env.WAVELOG_WORKER_BIN || "/var/tmp/ww-bin/wavelog-worker";
export const SECRET = "js-client-tests-secret-0123456789abcdef";

export function workerAvailable() {
  return existsSync(WORKER_BIN);
}

/** A token exactly as Wavelog's PHP makes it. */
export function makeToken(topic, { userId = 1, ttl = 3600, secret = SECRET } = {}) {
  const claims = JSON.stringify({ user_id: userId, topic, expires: Math.floor(Date.now() / 1000) + ttl });
  const hex = Buffer.from(claims).toString("hex");
  return hex + "." + createHmac("sha256", secret).update(hex).digest("hex");
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls `fn` until it returns a truthy value; fails after `timeout` ms with `what`. */
export async function waitFor(fn, { timeout = 10000, interval = 25, what = "condition" } = {}) {
  const end = Date.now() + timeout;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(interval);
  }
}

/**
 * Starts the worker. `ports` {public, internal} fixes the ports (for a restart on the same ones);
 * default 0 = the worker picks free ones. `tables`: raw TOML appended after the keys. Returns a
 * handle with the ports and helpers.
 */
export async function startWorker({ ports, config = {}, tables = "" } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "ww-worker-"));
  const lines = [
    `worker_secret = "${SECRET}"`,
    `ws_bind = "127.0.0.1"`,
    `ws_port = ${ports ? ports.public : 0}`,
    `internal_bind = "127.0.0.1"`,
    `internal_port = ${ports ? ports.internal : 0}`,
    `shutdown_drain = "200ms"`,
  ];
  for (const [k, v] of Object.entries(config)) lines.push(`${k} = ${JSON.stringify(v)}`);
  // TOML tables ([dxcluster]) come after every top-level key.
  if (tables) lines.push(tables);
  const cfg = join(dir, "worker.toml");
  writeFileSync(cfg, lines.join("\n") + "\n");
  const child = spawn(WORKER_BIN, ["--config", cfg], {
    env: { ...process.env, RUST_LOG: "info" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  const listening = new Promise((resolve, reject) => {
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      const m = /listening .*public=127\.0\.0\.1:(\d+) internal=127\.0\.0\.1:(\d+)/.exec(log);
      if (m) resolve({ public: Number(m[1]), internal: Number(m[2]) });
    });
    exited.then(({ code, signal }) => reject(new Error(`worker exited (${code ?? signal}) before listening:\n${log}`)));
  });
  const timer = setTimeout(() => child.kill("SIGKILL"), 15000);
  let p;
  try {
    p = await listening;
  } finally {
    clearTimeout(timer);
  }
  const internal = `http://127.0.0.1:${p.internal}`;
  async function post(path, body) {
    const res = await fetch(internal + path, {
      method: "POST",
      headers: { "X-Worker-Secret": SECRET, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const text = await res.text();
    if (res.status !== 200) throw new Error(`${path} -> ${res.status} ${text}`);
    return JSON.parse(text);
  }
  const w = {
    ports: p,
    publicUrl: `http://127.0.0.1:${p.public}`,
    internalUrl: internal,
    child,
    get log() {
      return log;
    },
    register: (topic, meta = { require_token: true }) => post("/internal/register", { topic, meta }),
    publish: (topic, payload) => post("/internal/publish", { topic, payload }),
    async status() {
      const res = await fetch(internal + "/internal/status?topics=1", { headers: { "X-Worker-Secret": SECRET } });
      return res.json();
    },
    /** Lines of the worker's log that match `re`. */
    count(re) {
      return log.split("\n").filter((l) => re.test(l)).length;
    },
    async stop(signal = "SIGTERM") {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      const t = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(t);
      rmSync(dir, { recursive: true, force: true });
    },
    kill() {
      return w.stop("SIGKILL");
    },
  };
  return w;
}

/**
 * A TCP proxy in front of `targetPort`. cut() drops every connection; down() also refuses new
 * ones until up(); refuseUpgrades answers WebSocket upgrades with 403 (like a proxy that can't
 * do WebSocket) and passes everything else.
 */
export async function startProxy(targetPort, { refuseUpgrades = false } = {}) {
  const sockets = new Set();
  let isDown = false;
  let accepted = 0;
  const server = net.createServer((client) => {
    if (isDown) {
      client.destroy();
      return;
    }
    accepted++;
    sockets.add(client);
    client.on("close", () => sockets.delete(client));
    client.on("error", () => {});
    client.once("data", (first) => {
      const head = first.toString("latin1");
      if (refuseUpgrades && /^upgrade:\s*websocket/im.test(head)) {
        client.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      const upstream = net.connect(targetPort, "127.0.0.1");
      sockets.add(upstream);
      upstream.on("close", () => {
        sockets.delete(upstream);
        client.destroy();
      });
      upstream.on("error", () => client.destroy());
      client.on("close", () => upstream.destroy());
      upstream.write(first);
      client.pipe(upstream);
      upstream.pipe(client);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: server.address().port,
    get accepted() {
      return accepted;
    },
    cut() {
      for (const s of sockets) s.destroy();
    },
    down() {
      isDown = true;
      this.cut();
    },
    up() {
      isDown = false;
    },
    close() {
      this.down();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}
