// dist/ is committed (the worker embeds dist/wavelog-worker.js): it must be exactly what
// build.mjs makes from src/. Also checks the classic script's adoption of a config object.

import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import vm from "node:vm";

import { build } from "../build.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "dist");
const FILES = ["wavelog-worker.mjs", "wavelog-worker.js", "wavelog-worker.d.ts"];

test("committed dist/ is what build.mjs makes from src/ (run `npm run build` if this fails)", () => {
  const out = mkdtempSync(join(tmpdir(), "ww-build-"));
  try {
    build(out);
    for (const f of FILES) {
      const fresh = readFileSync(join(out, f), "utf8");
      let committed;
      try {
        committed = readFileSync(join(dist, f), "utf8");
      } catch {
        assert.fail(`dist/${f} is missing: run npm run build`);
      }
      assert.ok(committed === fresh, `dist/${f} is stale: run npm run build and commit dist/`);
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test("dist ES module exports the same API as src", async () => {
  const m = await import("../dist/wavelog-worker.mjs");
  const s = await import("../src/wavelog-worker.mjs");
  assert.deepEqual(Object.keys(m).sort(), Object.keys(s).sort());
  assert.equal(typeof m.default.subscribe, "function");
  assert.equal(m.VERSION, JSON.parse(readFileSync(join(root, "package.json"), "utf8")).version);
});

function runClassic(window) {
  const code = readFileSync(join(dist, "wavelog-worker.js"), "utf8");
  assert.ok(!/^\s*export\s/m.test(code), "classic script has no export statements");
  const ctx = vm.createContext({ window, WebSocket: class {}, URL, TextDecoder, atob, AbortController, setTimeout, clearTimeout, console });
  vm.runInContext(code, ctx);
  return ctx;
}

test("classic script adopts window.WavelogWorker = { url } and never clobbers it", () => {
  const config = { url: "wss://log.example.org:9000", sessionId: 42 };
  const window = { WavelogWorker: config };
  runClassic(window);
  assert.equal(window.WavelogWorker, config, "same object");
  assert.equal(config.url, "wss://log.example.org:9000");
  assert.equal(config.sessionId, 42);
  assert.equal(typeof config.subscribe, "function");
  assert.equal(config.version, "0.1.0");
  // The config's url is the default url (a wrong default would throw here).
  const sub = config.subscribe({ topic: "t", token: "x" });
  assert.equal(typeof sub.close, "function");
  sub.close();
  // Loaded a second time: the first instance stays.
  const first = config.subscribe;
  runClassic(window);
  assert.equal(window.WavelogWorker.subscribe, first);
});

test("classic script without a config object defines window.WavelogWorker", () => {
  const window = {};
  runClassic(window);
  assert.equal(typeof window.WavelogWorker.subscribe, "function");
  assert.throws(() => window.WavelogWorker.subscribe({ topic: "t", token: "x" }), /url/);
});
