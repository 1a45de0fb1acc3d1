// A real nginx for the browser tests: its own config, pid, logs and temp paths in a temp dir,
// listening on 127.0.0.1 only, in front of a worker. Two proxy locations:
//   /w/     WebSocket-capable (Upgrade/Connection passed through), as the README recommends
//   /nows/  refuses WebSocket upgrades with 403 (a proxy that can't do WebSocket); SSE passes
//           with nginx's default proxy_buffering (on): the worker's X-Accel-Buffering: no
//           must be what keeps events from being buffered.
// The access log has method, path (no query string: tokens stay out of it) and status.

import { spawn, spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";

export function nginxBinary() {
  for (const p of ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx", "/usr/local/bin/nginx"]) {
    if (existsSync(p)) return p;
  }
  const r = spawnSync("sh", ["-c", "command -v nginx"], { encoding: "utf8" });
  return r.status === 0 && r.stdout.trim() ? r.stdout.trim() : null;
}

function config({ prefix, port, workerPort, dist, www }) {
  const user = typeof process.getuid === "function" && process.getuid() === 0 ? "user root;" : "";
  return `${user}
daemon off;
master_process on;
worker_processes 1;
worker_shutdown_timeout 1s;
pid ${prefix}/nginx.pid;
error_log ${prefix}/error.log warn;
events { worker_connections 1024; }
http {
  default_type application/octet-stream;
  types { text/html html; application/javascript js mjs; }
  log_format ww '$msec $request_method $uri $status "$http_upgrade"';
  access_log ${prefix}/access.log ww;
  client_body_temp_path ${prefix}/tmp/body;
  proxy_temp_path ${prefix}/tmp/proxy;
  fastcgi_temp_path ${prefix}/tmp/fastcgi;
  uwsgi_temp_path ${prefix}/tmp/uwsgi;
  scgi_temp_path ${prefix}/tmp/scgi;
  map $http_upgrade $connection_upgrade { default upgrade; '' close; }
  upstream worker { server 127.0.0.1:${workerPort}; }
  server {
    listen 127.0.0.1:${port};
    location / { root ${www}; add_header Cache-Control no-store; }
    location /lib/ { alias ${dist}/; add_header Cache-Control no-store; }
    location /w/ {
      proxy_pass http://worker/;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_read_timeout 1h;
      proxy_buffering off;
    }
    location /nows/ {
      if ($http_upgrade) { return 403; }
      proxy_pass http://worker/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $remote_addr;
    }
  }
}
`;
}

function portOpen(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

export async function startNginx({ prefix, port, workerPort, dist, www }) {
  const bin = nginxBinary();
  if (!bin) throw new Error("nginx not found");
  mkdirSync(join(prefix, "tmp"), { recursive: true });
  chmodSync(prefix, 0o755);
  const conf = join(prefix, "nginx.conf");
  writeFileSync(conf, config({ prefix, port, workerPort, dist, www }));
  const test = spawnSync(bin, ["-t", "-q", "-c", conf, "-p", prefix, "-e", join(prefix, "error.log")], { encoding: "utf8" });
  if (test.status !== 0) throw new Error(`nginx -t failed:\n${test.stderr}`);

  let child = null;
  let exited = null;
  async function start() {
    child = spawn(bin, ["-c", conf, "-p", prefix, "-e", join(prefix, "error.log")], { stdio: "ignore" });
    exited = new Promise((resolve) => child.once("exit", resolve));
    const end = Date.now() + 10000;
    while (!(await portOpen(port))) {
      if (child.exitCode !== null) throw new Error(`nginx exited:\n${readFileSync(join(prefix, "error.log"), "utf8")}`);
      if (Date.now() > end) throw new Error("nginx did not start listening");
      await new Promise((r) => setTimeout(r, 25));
    }
  }
  async function stop() {
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGTERM"); // fast shutdown: every connection is dropped
    const t = setTimeout(() => child.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(t);
  }
  await start();
  return {
    port,
    origin: `http://127.0.0.1:${port}`,
    prefix,
    start,
    stop,
    /** Graceful reload: new workers take new connections, old ones close theirs within 1 s. */
    reload() {
      child.kill("SIGHUP");
    },
    /** Access-log lines as {msec, method, uri, status, upgrade}. */
    access() {
      let text = "";
      try {
        text = readFileSync(join(prefix, "access.log"), "utf8");
      } catch {
        return [];
      }
      return text
        .split("\n")
        .filter(Boolean)
        .map((l) => {
          const [msec, method, uri, status, upgrade] = l.split(" ");
          return { msec: Number(msec), method, uri, status: Number(status), upgrade: (upgrade || "").replace(/"/g, "") };
        });
    },
    errorLog() {
      try {
        return readFileSync(join(prefix, "error.log"), "utf8");
      } catch {
        return "";
      }
    },
  };
}
