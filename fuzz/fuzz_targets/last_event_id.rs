//! SSE `Last-Event-ID` / cursor parsing and resume: any id either resumes with events strictly
//! after it or says resync; never a panic.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use wavelog_worker::hub::{HistoryLimits, Hub, Outlet, Replay, Wire};
use wavelog_worker::metrics::Metrics;
use wavelog_worker::admission::cursor_ids;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = HistoryLimits { size: 8, ttl: Duration::from_secs(60), max_bytes: 1 << 16 };
    for scale in [1, wavelog_worker::hub::CLUSTER_SCALE] {
        let hub = Hub::new(limits, Arc::new(Metrics::default()), scale);
        let outlet = Outlet::new(Wire::SseBody, None, 4);
        for i in 0..12 {
            hub.publish("a", &i.to_string(), None);
        }
        for id in cursor_ids(Some(text), 2).into_iter().flatten() {
            let subscribed = hub.subscribe("a", Some(&id), &outlet, 0);
            if let Replay::Events(events) = subscribed.replay {
                assert!(events.len() <= 8);
                assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
            }
        }
    }
});
