//! Cluster mode under faults, against a real `redis-server` of the test's own: a node's pub/sub
//! connection killed, Redis killed and restarted, clients that move between nodes. The promise
//! under test: a client gets every event or a `resync`, never a silent gap, and a `resync` only
//! where something may really have been missed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{node, wait_ready, Redis};
use crate::common::*;

/// Ids of the pub/sub connections Redis has now.
fn pubsub_clients(redis: &Redis) -> HashSet<String> {
    redis
        .cli(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_string)
        .collect()
}

/// An SSE client on `qso.1` at `t`, resuming after `last` (from the start when empty), past
/// its `position` block.
async fn resume_on(t: &TestWorker, last: &str) -> SseClient {
    let resume = [("Last-Event-ID", last)];
    let headers: &[(&str, &str)] = if last.is_empty() { &[] } else { &resume };
    let mut sse = SseClient::connect(t.public, &sse_path("qso.1", "x"), headers)
        .await
        .unwrap();
    sse.next_block().await.unwrap();
    sse
}

/// Frames until the push with `payload` arrives: the payloads pushed before it, and whether a
/// `resync` came.
async fn until_payload(sse: &mut SseClient, payload: i64) -> (Vec<i64>, bool) {
    let mut seen = Vec::new();
    let mut resync = false;
    loop {
        let v = tokio::time::timeout(Duration::from_secs(10), sse.next_json())
            .await
            .expect("a frame within 10 s");
        match v["type"].as_str() {
            Some("resync") => resync = true,
            Some("push") => {
                let n = v["payload"].as_i64().unwrap();
                if n == payload {
                    return (seen, resync);
                }
                seen.push(n);
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_node_whose_pubsub_connection_drops_fills_the_gap_and_resumes_exactly() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let a = node(&redis, "").await;
    let before = pubsub_clients(&redis);
    let b = node(&redis, "").await;
    let b_pubsub: Vec<String> = pubsub_clients(&redis)
        .difference(&before)
        .cloned()
        .collect();
    assert_eq!(b_pubsub.len(), 1, "one pub/sub connection per node");
    register(&a, "qso.1", false).await;
    let mut sse = resume_on(&a, "").await;
    for i in 1..=3 {
        assert_eq!(publish(&a, "qso.1", &i.to_string()).await, 200);
        assert_eq!(sse.next_json().await["payload"], i);
    }
    let last = sse.last_id.clone().unwrap();
    drop(sse);
    // B's subscription is cut while Redis stays up; A publishes meanwhile.
    redis.cli(&["CLIENT", "KILL", "ID", &b_pubsub[0]]);
    for i in 4..=6 {
        assert_eq!(publish(&a, "qso.1", &i.to_string()).await, 200);
    }
    // The client comes back on B, from e3.
    let mut moved = resume_on(&b, &last).await;
    eventually("B to reconnect", || async {
        b.worker.state.cluster.as_ref().unwrap().reconnects() > 0 && b.worker.state.is_ready()
    })
    .await;
    assert_eq!(publish(&a, "qso.1", "7").await, 200);
    let (seen, resync) = until_payload(&mut moved, 7).await;
    assert!(
        resync || seen == [4, 5, 6],
        "every missed event or a resync, never a silent skip: {seen:?}"
    );
    // And a resume on B from e3 once B has caught up replays exactly e4-e7.
    let mut again = resume_on(&b, &last).await;
    assert_eq!(publish(&a, "qso.1", "8").await, 200);
    let (seen, resync) = until_payload(&mut again, 8).await;
    assert!(!resync, "the log filled B's history");
    assert_eq!(seen, [4, 5, 6, 7]);
}

#[tokio::test]
async fn a_resume_across_a_redis_restart_is_a_resync_never_a_skip() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let a = node(&redis, "").await;
    let b = node(&redis, "").await;
    register(&a, "qso.1", false).await;
    let mut sse = resume_on(&a, "").await;
    assert_eq!(publish(&a, "qso.1", "1").await, 200);
    assert_eq!(sse.next_json().await["payload"], 1);
    let last = sse.last_id.clone().unwrap();
    drop(sse);
    redis.kill();
    redis.launch().await;
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    register(&a, "qso.1", false).await;
    for i in 2..=3 {
        assert_eq!(publish(&a, "qso.1", &i.to_string()).await, 200);
    }
    let mut moved = resume_on(&b, &last).await;
    assert_eq!(publish(&a, "qso.1", "4").await, 200);
    let (seen, resync) = until_payload(&mut moved, 4).await;
    assert!(
        resync,
        "an id from before Redis lost its data resumes nowhere: {seen:?}"
    );
}

/// Counts `resync` frames per topic on a socket until a push with `payload` arrived on every
/// topic in `topics`.
async fn resyncs_until(ws: &mut Ws, topics: &[&str], payload: &str) -> HashMap<String, usize> {
    let mut resyncs: HashMap<String, usize> = topics.iter().map(|t| (t.to_string(), 0)).collect();
    let mut done: HashSet<String> = HashSet::new();
    while done.len() < topics.len() {
        let v = next_json(ws).await;
        let topic = v["topic"].as_str().unwrap_or_default().to_string();
        match v["type"].as_str() {
            Some("resync") => {
                assert!(!done.contains(&topic), "a resync after the next event: {v}");
                *resyncs.entry(topic).or_default() += 1;
            }
            Some("push") if v["payload"] == payload => {
                done.insert(topic);
            }
            _ => {}
        }
    }
    resyncs
}

async fn subscribe_all(t: &TestWorker, topics: &[&str]) -> Ws {
    let mut ws = ws_subscribe(t, topics[0], "x").await;
    for topic in &topics[1..] {
        send_json(
            &mut ws,
            json!({"type":"subscribe","topic":topic,"token":"x"}),
        )
        .await;
        assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    }
    ws
}

#[tokio::test]
async fn one_redis_outage_costs_one_resync_and_only_where_events_were_missed() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let a = node(&redis, "").await;
    let b = node(&redis, "").await;
    let topics = ["busy", "quiet"];
    for topic in topics {
        register(&a, topic, false).await;
    }
    let mut on_a = subscribe_all(&a, &topics).await;
    let mut on_b = subscribe_all(&b, &topics).await;
    redis.kill();
    wait_ready(&a, false).await;
    wait_ready(&b, false).await;
    // Published on A while it is cut off: B's subscribers of "busy" miss these.
    for i in 0..3 {
        assert_eq!(publish(&a, "busy", &i.to_string()).await, 200);
        assert_eq!(next_json(&mut on_a).await["payload"], i);
    }
    redis.launch().await;
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for topic in topics {
        assert_eq!(publish(&a, topic, "\"after\"").await, 200);
    }
    let on_b_resyncs = resyncs_until(&mut on_b, &topics, "after").await;
    assert_eq!(on_b_resyncs["busy"], 1, "once, where events were missed");
    assert_eq!(on_b_resyncs["quiet"], 0, "none where nothing was published");
    let on_a_resyncs = resyncs_until(&mut on_a, &topics, "after").await;
    assert_eq!(on_a_resyncs["busy"], 0, "A's subscribers saw A's events");
    assert_eq!(on_a_resyncs["quiet"], 0);
}

#[tokio::test]
async fn public_readyz_serves_browsers_through_a_redis_outage_internal_readyz_tells_the_operator() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let a = node(&redis, "").await;
    redis.kill();
    wait_ready(&a, false).await;
    let public = http(a.public, "GET", "/readyz", &[], b"").await;
    assert_eq!(public.status, 200, "the node still delivers locally");
    let internal = http(a.internal, "GET", "/readyz", &[], b"").await;
    assert_eq!(internal.status, 503);
    assert_eq!(internal.body, "redis unavailable");
}

/// Publishes `v1` (out at once), `v2` (held back by the 300 ms window), re-registers the topic
/// without coalescing and publishes `v3` (out at once): `v2` must never follow `v3`.
async fn coalescing_never_goes_backwards(publisher: &TestWorker, subscriber: &TestWorker) {
    let a = internal(
        publisher,
        "register",
        r#"{"topic":"radio.1","meta":{"require_token":false,"coalesce_ms":300}}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let mut ws = ws_subscribe(subscriber, "radio.1", "x").await;
    for v in ["\"v1\"", "\"v2\""] {
        assert_eq!(publish(publisher, "radio.1", v).await, 200);
    }
    register(publisher, "radio.1", false).await;
    assert_eq!(publish(publisher, "radio.1", "\"v3\"").await, 200);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(1200);
    while let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout_at(deadline, ws.next()).await {
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "push" {
            seen.push((v["id"].as_str().unwrap().to_string(), v["payload"].clone()));
        }
    }
    let seqs: Vec<u64> = seen
        .iter()
        .map(|(id, _)| {
            id.rsplit('-')
                .next()
                .unwrap()
                .split('.')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "ids only increase: {seen:?}"
    );
    assert_eq!(
        seen.last().map(|(_, p)| p.clone()),
        Some(json!("v3")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn coalescing_never_delivers_an_older_event_after_a_newer_one() {
    let t = start("").await;
    coalescing_never_goes_backwards(&t, &t).await;
}

#[tokio::test]
async fn coalescing_never_goes_backwards_across_two_nodes() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let a = node(&redis, "").await;
    let b = node(&redis, "").await;
    coalescing_never_goes_backwards(&a, &b).await;
}

/// A tiny deterministic generator (xorshift), seeded per run and printed, so a failing run
/// can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// What one hopping client saw of one topic since its last `resync` there.
#[derive(Default)]
struct Seen {
    received: HashSet<i64>,
    /// The first payload number received since the last resync.
    low: Option<i64>,
    duplicates: usize,
    resyncs: usize,
    last_id: Option<String>,
}

/// The figures of a fault run.
#[derive(Debug, Default)]
struct Figures {
    faults: HashMap<&'static str, usize>,
    publishes: usize,
    resyncs: usize,
    silent_skips: usize,
    duplicates: usize,
    hops: usize,
}

const TOPICS: [&str; 3] = ["qso.1", "qso.2", "radio.1"];

/// One client: subscribes to every topic on a node, resuming by id, reads for a while, then
/// moves to the other node; stops when `stop` says so (after its final connection).
async fn hopping_client(
    nodes: [std::net::SocketAddr; 2],
    seed: u64,
    state: Arc<Mutex<HashMap<&'static str, Seen>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    hops: Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut rng = Rng(seed | 1);
    let mut at = (seed % 2) as usize;
    loop {
        let last_stop = stop.load(std::sync::atomic::Ordering::Acquire);
        let url = format!("ws://{}/ws?topic={}", nodes[at], TOPICS[0]);
        if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await {
            let ids: Vec<Option<String>> = {
                let s = state.lock().unwrap();
                TOPICS
                    .iter()
                    .map(|t| s.get(t).and_then(|x| x.last_id.clone()))
                    .collect()
            };
            let mut auth = json!({"type":"auth","token":"x"});
            if let Some(id) = &ids[0] {
                auth["last_event_id"] = json!(id);
            }
            let _ = futures_util::SinkExt::send(&mut ws, Message::text(auth.to_string())).await;
            for (topic, id) in TOPICS.iter().zip(&ids).skip(1) {
                let mut sub = json!({"type":"subscribe","topic":topic,"token":"x"});
                if let Some(id) = id {
                    sub["last_event_id"] = json!(id);
                }
                let _ = futures_util::SinkExt::send(&mut ws, Message::text(sub.to_string())).await;
            }
            let stay = if last_stop {
                Duration::from_secs(3600)
            } else {
                Duration::from_millis(rng.between(1000, 3000))
            };
            let until = Instant::now() + stay;
            while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(until, ws.next()).await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let Some(topic) = TOPICS.iter().find(|t| v["topic"] == **t) else {
                    continue;
                };
                let mut s = state.lock().unwrap();
                let seen = s.entry(topic).or_default();
                match v["type"].as_str() {
                    Some("auth_ok" | "subscribed") => {
                        if let Some(id) = v["last_event_id"].as_str() {
                            seen.last_id = Some(id.to_string());
                        }
                    }
                    Some("resync") => {
                        seen.received.clear();
                        seen.low = None;
                        seen.resyncs += 1;
                    }
                    Some("push") => {
                        let n = v["payload"]["n"].as_i64().unwrap_or(-1);
                        if !seen.received.insert(n) {
                            seen.duplicates += 1;
                        }
                        seen.low.get_or_insert(n);
                        seen.last_id = v["id"].as_str().map(str::to_string);
                    }
                    _ => {}
                }
            }
        }
        if last_stop {
            return;
        }
        hops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        at = 1 - at;
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            // One last connection, kept until the run ends.
            continue;
        }
    }
}

/// Two nodes, one Redis, random faults every 2-5 s (Redis SIGKILL and restart, `CLIENT PAUSE
/// 400`, `CLIENT KILL TYPE pubsub`), 25 publishes/s alternating between the nodes over three
/// topics, 40 WebSocket clients moving between the nodes every 1-3 s and resuming by id.
/// Afterwards every client must hold, per topic, every event published since its last
/// `resync` there (a silent skip otherwise), and none twice.
async fn fault_run(secs: u64) -> Figures {
    let Some(mut redis) = Redis::start().await else {
        return Figures::default();
    };
    let a = node(&redis, "").await;
    let b = node(&redis, "").await;
    for topic in TOPICS {
        register(&a, topic, false).await;
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("fault run: seed {seed}, {secs} s");
    let mut rng = Rng(seed | 1);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    let mut states = Vec::new();
    for i in 0..40u64 {
        let state = Arc::new(Mutex::new(HashMap::new()));
        states.push(state.clone());
        clients.push(tokio::spawn(hopping_client(
            [a.public, b.public],
            seed.wrapping_add(i * 7919),
            state,
            stop.clone(),
            hops.clone(),
        )));
    }
    let a = Arc::new(a);
    let b = Arc::new(b);
    // Published successfully, per topic.
    let published: Arc<Mutex<HashMap<&'static str, HashSet<i64>>>> = Arc::default();
    let publishing = {
        let (a, b, published, stop) = (a.clone(), b.clone(), published.clone(), stop.clone());
        tokio::spawn(async move {
            let mut counters = [0i64; 3];
            let mut tick = tokio::time::interval(Duration::from_millis(40));
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                tick.tick().await;
                let t = i % 3;
                let node = if i.is_multiple_of(2) { &a } else { &b };
                counters[t] += 1;
                let payload = json!({"n": counters[t]}).to_string();
                let mut status = publish(node, TOPICS[t], &payload).await;
                if status == 404 {
                    // Redis lost its data (and the registration): the backend registers again.
                    register(node, TOPICS[t], false).await;
                    status = publish(node, TOPICS[t], &payload).await;
                }
                if status == 200 {
                    published
                        .lock()
                        .unwrap()
                        .entry(TOPICS[t])
                        .or_default()
                        .insert(counters[t]);
                }
                i += 1;
            }
            counters
        })
    };
    let mut figures = Figures::default();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.between(2000, 5000))).await;
        let fault = match rng.between(0, 2) {
            0 => {
                redis.kill();
                tokio::time::sleep(Duration::from_millis(rng.between(100, 800))).await;
                redis.launch().await;
                "redis_restart"
            }
            1 => {
                redis.cli(&["CLIENT", "PAUSE", "400"]);
                "client_pause_400"
            }
            _ => {
                redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
                "client_kill_pubsub"
            }
        };
        *figures.faults.entry(fault).or_default() += 1;
    }
    // Calm: both nodes whole again, clients settle on a last connection, then one final event
    // per topic that everyone must see.
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let counters = publishing.await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut finals = HashMap::new();
    for (t, topic) in TOPICS.iter().enumerate() {
        register(&a, topic, false).await;
        let n = counters[t] + 1;
        assert_eq!(publish(&a, topic, &json!({"n": n}).to_string()).await, 200);
        published
            .lock()
            .unwrap()
            .entry(topic)
            .or_default()
            .insert(n);
        finals.insert(*topic, n);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let all = states.iter().all(|s| {
            let s = s.lock().unwrap();
            TOPICS
                .iter()
                .all(|t| s.get(t).is_some_and(|x| x.received.contains(&finals[t])))
        });
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in clients {
        c.abort();
    }
    let published = published.lock().unwrap();
    for state in &states {
        let s = state.lock().unwrap();
        for topic in TOPICS {
            let Some(seen) = s.get(topic) else {
                figures.silent_skips += 1;
                continue;
            };
            figures.duplicates += seen.duplicates;
            figures.resyncs += seen.resyncs;
            let low = seen.low.unwrap_or(finals[topic]);
            let missing = published[topic]
                .iter()
                .filter(|n| **n >= low && **n <= finals[topic] && !seen.received.contains(n))
                .count();
            if missing > 0 {
                eprintln!("{topic}: {missing} missed since {low} without a resync");
            }
            figures.silent_skips += missing;
        }
    }
    figures.publishes = published.values().map(HashSet::len).sum();
    figures.hops = hops.load(std::sync::atomic::Ordering::Relaxed);
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_cost_no_silent_skip_and_no_duplicate() {
    let secs = std::env::var("FAULT_RUN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let figures = fault_run(secs).await;
    eprintln!("fault run figures: {figures:?}");
    assert_eq!(figures.silent_skips, 0, "{figures:?}");
    assert_eq!(figures.duplicates, 0, "{figures:?}");
}
