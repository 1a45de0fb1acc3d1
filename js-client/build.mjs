// Builds dist/ from src/ with nothing but Node: no bundler, no npm dependencies.
//
//   dist/wavelog-worker.mjs   the ES module (src with a banner)
//   dist/wavelog-worker.js    a classic script defining window.WavelogWorker (served by the worker
//                             at GET /client.js; the Rust binary embeds it with include_str!)
//   dist/wavelog-worker.d.ts  the type declarations
//
// `node build.mjs [outDir]` (default: dist). test/build.test.mjs rebuilds into a temp dir and
// fails when the committed dist differs from what src produces.

import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

const BEGIN = "// @build:exports-begin";
const END = "// @build:exports-end";

/** The classic-script footer: adopt a config object in window.WavelogWorker, never clobber it. */
const INSTALL = `  var existing = root.WavelogWorker;
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
  root.WavelogWorker = target;`;

export function build(outDir = join(here, "dist")) {
  const pkg = JSON.parse(readFileSync(join(here, "package.json"), "utf8"));
  const src = readFileSync(join(here, "src", "wavelog-worker.mjs"), "utf8");
  const dts = readFileSync(join(here, "src", "wavelog-worker.d.ts"), "utf8");

  const version = /const VERSION = "([^"]+)";/.exec(src);
  if (!version || version[1] !== pkg.version) {
    throw new Error(`src VERSION (${version && version[1]}) differs from package.json (${pkg.version})`);
  }
  const b = src.indexOf(BEGIN);
  const e = src.indexOf(END);
  if (b < 0 || e < b) throw new Error("src/wavelog-worker.mjs: export block markers missing");
  const body = src.slice(0, b);
  if (/^\s*export\s/m.test(body)) {
    throw new Error("src/wavelog-worker.mjs: every export belongs in the export block at the end");
  }

  const banner = `/*! wavelog-worker client ${pkg.version} | built from js-client/src by build.mjs: do not edit */\n`;
  const esm = banner + src;
  const indented = body
    .trimEnd()
    .split("\n")
    .map((l) => (l ? "  " + l : l))
    .join("\n");
  const classic =
    banner +
    "(function (root) {\n" +
    '  "use strict";\n' +
    indented +
    "\n\n" +
    INSTALL +
    "\n})(typeof window !== \"undefined\" ? window : typeof self !== \"undefined\" ? self : globalThis);\n";

  mkdirSync(outDir, { recursive: true });
  const files = {
    "wavelog-worker.mjs": esm,
    "wavelog-worker.js": classic,
    "wavelog-worker.d.ts": banner + dts,
  };
  for (const [name, text] of Object.entries(files)) writeFileSync(join(outDir, name), text);
  return Object.keys(files).map((n) => join(outDir, n));
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const out = build(process.argv[2] ? resolve(process.argv[2]) : undefined);
  for (const f of out) console.log("wrote", f);
}
