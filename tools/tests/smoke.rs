//! The benchmark tool still works and loses nothing, at a tiny size (numbers from a debug build
//! under a test run mean nothing; docs/benchmarks.md has the real ones).

use std::path::PathBuf;
use std::process::Command;

/// The worker binary of the same build (`cargo test --workspace` builds it beside ours:
/// `target/<profile>/wavelog-worker`, this test being `target/<profile>/deps/smoke-*`).
fn worker_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("wavelog-worker"))
        .unwrap();
    assert!(
        bin.exists(),
        "{} is missing: run the workspace's tests (`cargo test --workspace`), which build it",
        bin.display()
    );
    bin
}

/// Runs `fanout-bench run ...` writing its result to `json`, which it returns, parsed.
fn run_bench(cmd: &mut Command, json: &std::path::Path) -> serde_json::Value {
    let out = cmd.arg("--json").arg(json).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn fanout_bench_smoke_run_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("wavelog-tools-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The last run splits its subscribers over two tool processes, as runs beyond one
    // process's file limit do.
    for (transport, processes) in [("ws", "1"), ("sse", "1"), ("ws", "2")] {
        let json = dir.join(format!("{transport}-{processes}.json"));
        let r = run_bench(
            Command::new(env!("CARGO_BIN_EXE_fanout-bench"))
                .args(["run", "--connections", "200", "--topics", "3"])
                .args(["--transport", transport, "--events", "30", "--rate", "300"])
                .args(["--idle-secs", "0.2", "--require-no-loss"])
                .args(["--processes", processes])
                .arg("--worker-bin")
                .arg(worker_bin()),
            &json,
        );
        assert_eq!(r["connect"]["connected"], 200);
        // 30 events over 3 topics, each subscriber on one topic: 10 events each.
        assert_eq!(r["delivery"]["expected"], 2000);
        assert_eq!(r["delivery"]["received"], 2000);
        assert_eq!(r["delivery"]["lost"], 0);
        assert!(r["publish"]["server_cpu_us_per_delivery"].as_f64().unwrap() > 0.0);
        assert!(r["connect"]["rss_kib_per_connection"].as_f64().is_some());
        assert_eq!(
            r["scenario"]["tool_processes"].as_u64(),
            processes.parse().ok()
        );
        assert!(r["delivery"]["latency_us"]["p50"].as_u64().is_some());
    }
    let md = dir.join("t.md");
    let svg = dir.join("c.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_fanout-bench"))
        .arg("report")
        .arg(dir.join("ws-1.json"))
        .arg(dir.join("sse-1.json"))
        .arg("--markdown")
        .arg(&md)
        .arg("--svg")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&md).unwrap().lines().count(), 4);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The nchan reference runs with the same tool (`--nchan`): the same subscribers on nchan's
/// endpoints lose nothing, and the run is labelled as nchan's.
#[test]
fn fanout_bench_measures_nchan_with_the_same_subscribers() {
    let module = "/usr/lib/nginx/modules/ngx_nchan_module.so";
    if !std::path::Path::new(module).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{module} is required under CI (.ci/run installs libnginx-mod-nchan)"
        );
        eprintln!("skipped: {module} is missing (apt-get install libnginx-mod-nchan)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("wavelog-tools-nchan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for transport in ["ws", "sse"] {
        let json = dir.join(format!("{transport}.json"));
        let r = run_bench(
            Command::new(env!("CARGO_BIN_EXE_fanout-bench"))
                .args(["run", "--nchan", "--connections", "100", "--topics", "2"])
                .args(["--transport", transport, "--events", "20", "--rate", "200"])
                .args(["--idle-secs", "0.2", "--require-no-loss"]),
            &json,
        );
        assert_eq!(r["connect"]["connected"], 100);
        assert_eq!(r["delivery"]["received"], 1000);
        assert_eq!(r["delivery"]["lost"], 0);
        assert_eq!(r["label"], format!("nchan {transport} 100x2t"));
    }
    // Two runs under one label are one row, with the range of their CPU figures.
    let md = dir.join("t.md");
    let out = Command::new(env!("CARGO_BIN_EXE_fanout-bench"))
        .arg("report")
        .arg(dir.join("ws.json"))
        .arg(dir.join("ws.json"))
        .arg(dir.join("sse.json"))
        .arg("--markdown")
        .arg(&md)
        .arg("--svg")
        .arg(dir.join("c.svg"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&md).unwrap().lines().count(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The connect floor (`connect-floor`, the least server of the subscription exchange) answers
/// the bench's WebSocket and SSE subscribers as the worker does, so the bench can measure it
/// the same way; a subscriber it did not answer rightly would count as failed.
#[test]
fn fanout_bench_measures_the_connect_floor() {
    let dir = std::env::temp_dir().join(format!("wavelog-tools-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for transport in ["ws", "sse"] {
        let json = dir.join(format!("{transport}.json"));
        let r = run_bench(
            Command::new(env!("CARGO_BIN_EXE_fanout-bench"))
                .args(["run", "--connections", "100", "--topics", "1"])
                .args(["--transport", transport, "--events", "0"])
                .args(["--idle-secs", "0.1"])
                .arg("--worker-bin")
                .arg(env!("CARGO_BIN_EXE_connect-floor")),
            &json,
        );
        assert_eq!(r["connect"]["connected"], 100, "{transport}");
        assert_eq!(r["connect"]["failed"], 0, "{transport}");
        let kernel = &r["connect"]["server_kernel_us_per_connection"];
        assert!(kernel.as_f64().is_some());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The processes `pid` started that are still its children.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether `pid` still runs (a zombie nobody reaped yet has ended).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// A bench killed by a signal (as `timeout` stops it) takes its worker with it: a worker left
/// running would skew every later measurement on the machine.
#[test]
fn a_killed_bench_leaves_no_worker_running() {
    let mut bench = Command::new(env!("CARGO_BIN_EXE_fanout-bench"))
        .args(["run", "--connections", "20", "--topics", "1"])
        .args(["--events", "0", "--idle-secs", "120"])
        .arg("--worker-bin")
        .arg(worker_bin())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let worker = loop {
        if let Some(&worker) = children_of(bench.id()).first() {
            break worker;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the bench started no worker"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(running(worker));
    bench.kill().unwrap();
    bench.wait().unwrap();
    let killed = std::time::Instant::now();
    while running(worker) {
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(30),
            "worker {worker} still runs 30 s after its bench was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
