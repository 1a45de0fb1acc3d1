//! Writing a large topic's burst without waking its subscribers' sessions.
//!
//! A publish to a topic of more than `DIRECT_WALK_MAX` subscribers queues the event in every
//! outlet (under the topic lock, so in order) and leaves the writing to a few flush tasks,
//! each with a chunk of the outlets that had nothing waiting. The runtime's threads take the
//! chunks, so one burst uses every core, and a delivery touches an outlet and its socket, not
//! a session's task and state. A socket that would block is handed to its session.

use std::sync::Arc;

use super::Outlet;

/// Outlets per flush task: enough that a task's start is paid for many times over, few enough
/// that a burst of 10,000 spreads evenly over the threads. With 1,024 a burst was sometimes
/// left to one thread (a fifth fewer deliveries a second); 64 and 256 measured alike.
const CHUNK: usize = 256;

/// Flushes `outlets` from tasks of their own (or here, outside a runtime).
pub fn spawn(outlets: Vec<Arc<Outlet>>) {
    if outlets.is_empty() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        outlets.iter().for_each(|o| o.flush());
        return;
    };
    // Shared by the chunks as it is: no copy of the list per publish.
    let outlets = Arc::new(outlets);
    for start in (0..outlets.len()).step_by(CHUNK) {
        let outlets = outlets.clone();
        runtime.spawn(async move {
            let end = (start + CHUNK).min(outlets.len());
            outlets[start..end].iter().for_each(|o| o.flush());
        });
    }
}
