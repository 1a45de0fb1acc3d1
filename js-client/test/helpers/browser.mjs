// What the browser tests need (Chromium, nginx, the worker binary, playwright-core), checked
// once: a missing piece skips the file with the reason printed, unless CI is set: then it fails.

import { existsSync } from "node:fs";

import { WORKER_BIN, workerAvailable } from "./worker.mjs";
import { nginxBinary } from "./nginx.mjs";

export const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";

/** `{ playwright, skip }`: the playwright-core module, and `false` or why the tests skip. */
export async function browserPrerequisites(what) {
  const missing = [];
  if (!existsSync(CHROMIUM)) missing.push(`chromium (${CHROMIUM}; Debian package "chromium")`);
  if (!nginxBinary()) missing.push('nginx (Debian package "nginx")');
  if (!workerAvailable()) missing.push(`the worker binary (${WORKER_BIN}; set WAVELOG_WORKER_BIN)`);
  let playwright = null;
  try {
    playwright = await import("playwright-core");
  } catch {
    missing.push("playwright-core (npm ci)");
  }
  if (!missing.length) return { playwright, skip: false };
  const why = `${what} need ${missing.join(", ")}`;
  if (process.env.CI) throw new Error(`CI: ${why}: install it, these tests must run in CI`);
  console.log(`# SKIP ${what}: ${why} is missing`);
  return { playwright, skip: why + " (missing)" };
}
