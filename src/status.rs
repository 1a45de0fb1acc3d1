//! The status answer shared by `GET /internal/status` and the `worker.status` topic.

use serde::Serialize;

use crate::duration::format_go;
use crate::AppState;

#[derive(Serialize)]
pub struct Status {
    pub status: &'static str,
    pub version: &'static str,
    pub uptime: String,
    pub uptime_seconds: u64,
    pub registered_topics: usize,
    pub active_topics: usize,
    pub connected_clients: usize,
    pub connected_sockets: usize,
    pub cluster_nodes: i64,
    /// Cluster mode only: "connected" or "disconnected".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<&'static str>,
    /// Memory held by event history across topics.
    pub history_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_list: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_topic_list: Option<Vec<String>>,
}

impl Status {
    /// Collects the figures; `with_lists` adds the topic lists (omitted when empty, as Go does).
    pub async fn collect(state: &AppState, with_lists: bool) -> Status {
        let uptime = state.started.elapsed();
        let (connected_clients, connected_sockets) = state.presence.counts();
        let non_empty = |v: Vec<String>| (!v.is_empty()).then_some(v);
        let active = state.hub.active_topics();
        let names = state.topic_names().await;
        Status {
            status: "ok",
            version: crate::VERSION,
            uptime: format_go(uptime),
            uptime_seconds: uptime.as_secs(),
            registered_topics: names.len(),
            active_topics: active.len(),
            connected_clients,
            connected_sockets,
            cluster_nodes: state.cluster_nodes().await,
            redis: state.cluster.as_ref().map(|c| {
                if c.is_up() {
                    "connected"
                } else {
                    "disconnected"
                }
            }),
            history_bytes: state.hub.history_bytes(),
            topic_list: if with_lists { non_empty(names) } else { None },
            active_topic_list: if with_lists {
                non_empty(state.hub.active_topics())
            } else {
                None
            },
        }
    }
}
