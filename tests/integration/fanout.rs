//! A topic larger than a publish writes to by itself (over 4,096 subscribers): its bursts are
//! written by flush tasks, spread over the runtime's threads. Every subscriber still gets every
//! event, in one order, on both transports, and a later subscriber's ack and replay still come
//! before its live events.

use std::sync::Arc;

use futures_util::future::join_all;

use crate::common::*;

/// More than `DIRECT_WALK_MAX` (4,096).
const SUBSCRIBERS: usize = 4_200;

#[tokio::test]
async fn a_topic_of_4200_sockets_gets_every_event_in_one_order() {
    let t = Arc::new(start("max_connections_per_ip = 10000").await);
    register(&t, "contest_session.9", false).await;
    let mut subs = Vec::with_capacity(SUBSCRIBERS);
    while subs.len() < SUBSCRIBERS {
        let batch = (SUBSCRIBERS - subs.len()).min(100);
        subs.extend(join_all((0..batch).map(|_| ws_subscribe(&t, "contest_session.9", "x"))).await);
    }
    let mut sse = SseClient::connect(t.public, &sse_path("contest_session.9", "x"), &[])
        .await
        .unwrap();
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let t = t.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let payload = format!("\"{p}-{i}\"");
                    assert_eq!(publish(&t, "contest_session.9", &payload).await, 200);
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    let order = one_order_everywhere(&mut subs, 40).await;
    for (id, payload) in &order {
        let v = sse.next_json().await;
        assert_eq!(v["id"].as_str(), Some(id.as_str()), "SSE in the same order");
        assert_eq!(v["payload"].as_str(), Some(payload.as_str()));
    }
    // A subscriber that joins the large topic now: its ack, then live events only.
    let mut late = ws_subscribe(&t, "contest_session.9", "x").await;
    assert_eq!(publish(&t, "contest_session.9", "\"last\"").await, 200);
    assert_eq!(next_json(&mut late).await["payload"], "last");
    for ws in subs.iter_mut().step_by(500) {
        assert_eq!(next_json(ws).await["payload"], "last");
    }
}
