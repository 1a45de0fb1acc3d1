// Live DX spots the way Wavelog's bandmap consumes them: the worker relays a (fake) DX cluster
// node, enriches spots through a (fake) Wavelog lookup API, and a page in headless Chromium,
// using the bundled client through nginx, subscribes to `dxspots` and renders band, mode and
// DXCC entity.
//
// Needs chromium, nginx and the worker binary, like browser.test.mjs.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { freePort, makeToken, startWorker, waitFor } from "./helpers/worker.mjs";
import { startNginx } from "./helpers/nginx.mjs";
import { CHROMIUM, browserPrerequisites } from "./helpers/browser.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..");
const ARTIFACTS = join(root, "test-artifacts");
const { playwright, skip } = await browserPrerequisites("the live bandmap tests");

/** A DX cluster node: a login prompt, then whatever `send` writes. */
function fakeNode() {
  const conns = new Set();
  let logins = 0;
  const server = net.createServer((c) => {
    c.write("Welcome\r\nlogin: ");
    let buf = "";
    c.on("data", (d) => {
      buf += d.toString();
      if (buf.includes("\n") && !conns.has(c)) {
        logins++;
        conns.add(c);
        c.write("N0CALL de TEST-1 >\r\n");
      }
    });
    c.on("close", () => conns.delete(c));
    c.on("error", () => {});
  });
  return {
    listen: (port) => new Promise((r) => server.listen(port, "127.0.0.1", r)),
    send: (text) => conns.forEach((c) => c.write(text)),
    get logins() {
      return logins;
    },
    close: () => {
      conns.forEach((c) => c.destroy());
      server.close();
    },
  };
}

/** Wavelog's callsign lookup API for two callsigns. */
function fakeLookup() {
  const known = {
    DL1XYZ: { dxcc: "FEDERAL REPUBLIC OF GERMANY", dxcc_id: "230", dxcc_cqz: "14", dxcc_flag: "DE", cont: "EU", lotw_member: 2 },
    JA1ABC: { dxcc: "JAPAN", dxcc_id: 339, dxcc_cqz: "25", dxcc_flag: "JP", cont: "AS", lotw_member: false },
    SP9ABC: { dxcc: "POLAND", dxcc_id: 269, dxcc_cqz: "15", dxcc_flag: "PL", cont: "EU", lotw_member: false },
  };
  return http.createServer((req, res) => {
    let body = "";
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      const q = JSON.parse(body || "{}");
      const a = q.key === "bandmap-key" ? known[q.callsign] || { dxcc: "- NONE -", dxcc_id: 0 } : null;
      res.writeHead(a ? 200 : 401, { "Content-Type": "application/json" });
      res.end(JSON.stringify(a || { status: "failed" }));
    });
  });
}

describe("live bandmap in a browser", { skip, timeout: 120000 }, () => {
  let tmp, worker, nginx, browser, node, lookup;

  before(async () => {
    tmp = mkdtempSync(join(tmpdir(), "ww-bandmap-"));
    const www = join(tmp, "www");
    mkdirSync(www, { recursive: true });
    writeFileSync(join(www, "bandmap.html"), readFileSync(join(here, "browser", "bandmap.html")));
    node = fakeNode();
    const nodePort = await freePort();
    await node.listen(nodePort);
    lookup = fakeLookup();
    const lookupPort = await freePort();
    await new Promise((r) => lookup.listen(lookupPort, "127.0.0.1", r));
    const ports = { public: await freePort(), internal: await freePort() };
    worker = await startWorker({
      ports,
      tables: [
        "[dxcluster]",
        `host = "127.0.0.1"`,
        `port = ${nodePort}`,
        `callsign = "N0CALL"`,
        `lookup_url = "http://127.0.0.1:${lookupPort}/index.php/api/lookup"`,
        `lookup_key = "bandmap-key"`,
      ].join("\n"),
    });
    nginx = await startNginx({ prefix: join(tmp, "nginx"), port: await freePort(), workerPort: ports.public, dist: join(root, "dist"), www });
    browser = await playwright.chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
    });
    mkdirSync(ARTIFACTS, { recursive: true });
  });

  after(async () => {
    if (browser) await browser.close();
    if (nginx) await nginx.stop();
    if (worker) await worker.stop();
    if (node) node.close();
    if (lookup) lookup.close();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  test("pushed spots render with band, mode and DXCC entity (screenshot)", async () => {
    await waitFor(() => node.logins > 0, { what: "the relay's login" });
    // Spots flow: the relay registers "dxspots", which is what Wavelog's has_topic looks for.
    node.send("DX de K1AA:      7010.0  W1AW         warm up                  0000Z\r\n");
    await waitFor(async () => ((await worker.status()).topic_list || []).includes("dxspots"), {
      what: "dxspots in the worker's topic list",
    });
    const page = await browser.newPage();
    await page.goto(nginx.origin + "/bandmap.html");
    await page.evaluate((token) => window.start({ token }), makeToken("dxspots"));
    await page.waitForFunction(() => document.getElementById("status").textContent === "open", null, { timeout: 15000 });
    node.send(
      "DX de SP9ABC:     14025.0  DL1XYZ       CW 599                  1234Z\r\n" +
        "DX de SP9ABC:     14025.0  DL1XYZ       CW 599                  1234Z\r\n" +
        "WWV de W0MU <18>:   SFI=70, A=5, K=1\r\n" +
        "DX de SP9ABC:     21074.0  JA1ABC       FT8 -05 dB <b>hi</b>      1235Z\r\n" +
        "DX de SP9ABC:      7150.0  DL1XYZ       59 in Berlin            1236Z\r\n",
    );
    // (The warm-up spot may or may not arrive after the page subscribed.)
    const live = () => [...document.querySelectorAll("#spots tr")].filter((tr) => tr.children[4].textContent !== "W1AW");
    await page.waitForFunction(`(${live})().length >= 3`, null, { timeout: 15000 });
    const rows = (
      await page.$$eval("#spots tr", (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)))
    ).filter((r) => r[4] !== "W1AW");
    assert.deepEqual(
      rows.map((r) => [r[0], r[1], r[2], r[3], r[4], r[5], r[7]]),
      [
        ["40m", "7.150", "Phone", "LSB", "DL1XYZ", "Federal Republic Of Germany", "EU"],
        ["20m", "14.025", "CW", "CW", "DL1XYZ", "Federal Republic Of Germany", "EU"],
        ["15m", "21.074", "Digi", "FT8", "JA1ABC", "Japan", "EU"],
      ],
    );
    assert.equal(rows[2][8], "FT8 -05 dB bhi/b", "no markup from the cluster reaches the page");
    const shot = join(ARTIFACTS, "bandmap-live-spots.png");
    await page.screenshot({ path: shot, fullPage: true });
    assert.ok(existsSync(shot));
    await page.close();
  });
});
