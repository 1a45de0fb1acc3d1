//! The hub: one `tokio::sync::broadcast` channel per topic with subscribers.
//!
//! A publish serializes its push frame once; every subscriber gets a clone of the same bytes.
//! Each topic has its own small lock under which the event id is assigned and the frame is handed
//! to the channel, so every subscriber sees a topic's events in the same order, the order the
//! hub accepted them. The global map lock is held only to find or create a channel, never while
//! sending, and `broadcast::Sender::send` never waits for a receiver: a slow subscriber cannot
//! slow the publisher or anyone else. It lags, and is told to resync.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// An event id: `<epoch>-<seq>`. The epoch names this worker run (a restart changes it); the
/// sequence is one counter for all topics, so ids are unique and increase within every topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventId(pub u64);

/// A pushed event as it goes out: the frame text, built once per publish.
#[derive(Debug)]
pub struct FrameInner {
    pub id: EventId,
    /// `{"type":"push","topic":...,"id":...,"payload":...}`
    pub text: Utf8Bytes,
}

pub type Frame = Arc<FrameInner>;

/// What a subscriber receives next.
#[derive(Debug)]
pub enum Delivery {
    Event(Frame),
    /// The subscriber fell behind and events were skipped: it must fetch state anew.
    Resync,
}

struct Channel {
    topic: Arc<str>,
    sender: Mutex<broadcast::Sender<Frame>>,
}

pub struct Hub {
    epoch: String,
    next_seq: AtomicU64,
    capacity: usize,
    channels: Mutex<HashMap<Arc<str>, Arc<Channel>>>,
}

/// Result of a publish.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: String,
    /// Subscribers the event was handed to.
    pub receivers: usize,
}

impl Hub {
    /// `capacity` is how many events a subscriber may fall behind before it must resync.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Hub {
            epoch: new_epoch(),
            next_seq: AtomicU64::new(1),
            capacity: capacity.max(1),
            channels: Mutex::new(HashMap::new()),
        })
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn format_id(&self, id: EventId) -> String {
        format!("{}-{}", self.epoch, id.0)
    }

    /// Publishes `payload` (raw JSON text, forwarded byte for byte) to `topic`.
    pub fn publish(&self, topic: &str, payload: &str) -> Published {
        let channel = lock(&self.channels).get(topic).cloned();
        let sender = channel.as_ref().map(|c| lock(&c.sender));
        // The id is taken under the topic lock, so ids and send order agree.
        let id = EventId(self.next_seq.fetch_add(1, Ordering::Relaxed));
        let id_text = self.format_id(id);
        let receivers = match sender {
            Some(sender) => {
                let frame = Arc::new(FrameInner {
                    id,
                    text: push_frame(topic, &id_text, payload),
                });
                sender.send(frame).unwrap_or(0)
            }
            None => 0,
        };
        Published {
            id: id_text,
            receivers,
        }
    }

    /// Subscribes to `topic`; the subscription receives every event published after this call.
    pub fn subscribe(self: &Arc<Self>, topic: &str) -> Subscription {
        let mut channels = lock(&self.channels);
        let channel = match channels.get(topic) {
            Some(c) => c.clone(),
            None => {
                let topic: Arc<str> = Arc::from(topic);
                let (sender, _) = broadcast::channel(self.capacity);
                let c = Arc::new(Channel {
                    topic: topic.clone(),
                    sender: Mutex::new(sender),
                });
                channels.insert(topic, c.clone());
                c
            }
        };
        let rx = lock(&channel.sender).subscribe();
        Subscription {
            hub: self.clone(),
            channel,
            rx: Some(rx),
        }
    }

    /// Topics with at least one subscriber, sorted.
    pub fn active_topics(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.channels).keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }

    pub fn active_topic_count(&self) -> usize {
        lock(&self.channels).len()
    }

    /// Called when a subscription ends: drops the channel once nobody listens.
    fn release(&self, channel: &Arc<Channel>) {
        let mut channels = lock(&self.channels);
        let idle = lock(&channel.sender).receiver_count() == 0;
        if idle
            && channels
                .get(&channel.topic)
                .is_some_and(|c| Arc::ptr_eq(c, channel))
        {
            channels.remove(&channel.topic);
        }
    }
}

/// One subscriber's view of a topic.
pub struct Subscription {
    hub: Arc<Hub>,
    channel: Arc<Channel>,
    rx: Option<broadcast::Receiver<Frame>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.channel.topic)
            .finish()
    }
}

impl Subscription {
    pub fn topic(&self) -> &Arc<str> {
        &self.channel.topic
    }

    /// Waits for the next delivery.
    pub async fn recv(&mut self) -> Delivery {
        let rx = self.rx.as_mut().expect("receiver lives until drop");
        loop {
            match rx.recv().await {
                Ok(frame) => return Delivery::Event(frame),
                Err(broadcast::error::RecvError::Lagged(_)) => return Delivery::Resync,
                // Unreachable while we hold the channel (and so its sender); wait forever
                // rather than spin if it ever happens.
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }

    /// The next delivery if one is already queued.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        let rx = self.rx.as_mut()?;
        match rx.try_recv() {
            Ok(frame) => Some(Delivery::Event(frame)),
            Err(broadcast::error::TryRecvError::Lagged(_)) => Some(Delivery::Resync),
            Err(_) => None,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.hub.release(&self.channel);
    }
}

/// Builds the one frame every subscriber of a publish receives.
fn push_frame(topic: &str, id: &str, payload: &str) -> Utf8Bytes {
    let topic_json = serde_json::to_string(topic).unwrap_or_else(|_| "\"\"".into());
    let mut text = String::with_capacity(48 + topic_json.len() + id.len() + payload.len());
    text.push_str("{\"type\":\"push\",\"topic\":");
    text.push_str(&topic_json);
    text.push_str(",\"id\":\"");
    text.push_str(id);
    text.push_str("\",\"payload\":");
    text.push_str(payload);
    text.push('}');
    Utf8Bytes::from(text)
}

/// A short random name for this run, so ids from an earlier run are recognised as foreign.
fn new_epoch() -> String {
    let mut bytes = [0u8; 4];
    if getrandom::getrandom(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        bytes = nanos.to_le_bytes();
    }
    crate::token::hex_encode(&bytes)
}

/// Locks a mutex, recovering from poisoning: our critical sections leave data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_are_shared_and_ordered() {
        let hub = Hub::new(8);
        let mut a = hub.subscribe("t");
        let mut b = hub.subscribe("t");
        let mut other = hub.subscribe("u");
        assert_eq!(hub.publish("t", r#"{"n":1e400}"#).receivers, 2);
        hub.publish("t", "null");
        for sub in [&mut a, &mut b] {
            let Delivery::Event(first) = sub.recv().await else {
                panic!("resync")
            };
            assert!(
                first.text.as_str().ends_with(r#""payload":{"n":1e400}}"#),
                "{}",
                first.text.as_str()
            );
            let Delivery::Event(second) = sub.recv().await else {
                panic!("resync")
            };
            assert!(second.id > first.id);
        }
        assert!(other.try_recv().is_none());
        drop((a, b));
        assert_eq!(hub.active_topics(), vec!["u".to_string()]);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_gets_resync_and_blocks_nobody() {
        let hub = Hub::new(4);
        let mut slow = hub.subscribe("t");
        for i in 0..100 {
            hub.publish("t", &i.to_string());
        }
        assert!(matches!(slow.recv().await, Delivery::Resync));
        let Delivery::Event(next) = slow.recv().await else {
            panic!("expected an event")
        };
        assert!(
            next.text.as_str().ends_with(r#""payload":96}"#),
            "{}",
            next.text.as_str()
        );
    }
}
