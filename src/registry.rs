//! Registered topics: which topics exist, whether they need a token, and when they expire.
//!
//! Wavelog registers a topic before publishing to it and often never unregisters, so entries
//! expire `topic_ttl` after their last registration: lazily on lookup, and by a periodic sweep so
//! memory stays bounded.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The reserved topic Wavelog's debug page uses to ask for worker status.
pub const STATUS_TOPIC: &str = "worker.status";

/// What `register` says about a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicMeta {
    pub require_token: bool,
    /// Deliver at most one event per this many milliseconds (the newest); 0 = every event.
    pub coalesce_ms: u32,
}

impl TopicMeta {
    pub fn coalesce(&self) -> Option<Duration> {
        (self.coalesce_ms > 0).then(|| Duration::from_millis(self.coalesce_ms.into()))
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    meta: TopicMeta,
    /// `None` for the reserved status topic, which never expires.
    expires_at: Option<Instant>,
}

impl Entry {
    fn alive(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

/// `register` refused: `max_topics` reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryFull;

pub struct Registry {
    ttl: Duration,
    max_topics: usize,
    topics: RwLock<HashMap<Arc<str>, Entry>>,
}

impl Registry {
    /// A registry holding only the reserved status topic.
    pub fn new(ttl: Duration, max_topics: usize) -> Self {
        let mut topics = HashMap::new();
        topics.insert(
            Arc::from(STATUS_TOPIC),
            Entry {
                meta: TopicMeta {
                    require_token: true,
                    coalesce_ms: 0,
                },
                expires_at: None,
            },
        );
        Registry {
            ttl,
            max_topics,
            topics: RwLock::new(topics),
        }
    }

    /// Registers or refreshes `topic`. The status topic keeps its fixed meta (token required):
    /// re-registering it is accepted but changes nothing.
    pub fn register(&self, topic: &str, meta: TopicMeta) -> Result<(), RegistryFull> {
        if topic == STATUS_TOPIC {
            return Ok(());
        }
        let entry = Entry {
            meta,
            expires_at: Some(Instant::now() + self.ttl),
        };
        let mut topics = self.write();
        match topics.get_mut(topic) {
            Some(existing) => *existing = entry,
            None => {
                if topics.len() > self.max_topics {
                    // Full: make room from expired entries before refusing.
                    let now = Instant::now();
                    topics.retain(|_, e| e.alive(now));
                    if topics.len() > self.max_topics {
                        return Err(RegistryFull);
                    }
                }
                topics.insert(Arc::from(topic), entry);
            }
        }
        Ok(())
    }

    /// Removes `topic`. Sockets already subscribed stay connected (as with the Go worker); new
    /// connections and publishes get 404. The status topic cannot be removed.
    pub fn unregister(&self, topic: &str) {
        if topic != STATUS_TOPIC {
            self.write().remove(topic);
        }
    }

    /// The meta of a live topic; expired entries are removed on the way.
    pub fn lookup(&self, topic: &str) -> Option<TopicMeta> {
        let now = Instant::now();
        let found = self.read().get(topic).copied();
        match found {
            Some(entry) if entry.alive(now) => Some(entry.meta),
            Some(_) => {
                let mut topics = self.write();
                if topics.get(topic).is_some_and(|e| !e.alive(now)) {
                    topics.remove(topic);
                }
                None
            }
            None => None,
        }
    }

    /// Drops every expired topic; returns how many were dropped.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut topics = self.write();
        let before = topics.len();
        topics.retain(|_, e| e.alive(now));
        before - topics.len()
    }

    /// Live topic names, sorted.
    pub fn names(&self) -> Vec<String> {
        let now = Instant::now();
        let mut names: Vec<String> = self
            .read()
            .iter()
            .filter(|(_, e)| e.alive(now))
            .map(|(k, _)| k.to_string())
            .collect();
        names.sort();
        names
    }

    pub fn count(&self) -> usize {
        let now = Instant::now();
        self.read().values().filter(|e| e.alive(now)).count()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Entry>> {
        self.topics.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Arc<str>, Entry>> {
        self.topics.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_expire_and_refresh() {
        let r = Registry::new(Duration::from_millis(50), 10);
        let open = TopicMeta {
            require_token: false,
            coalesce_ms: 0,
        };
        r.register("a", open).unwrap();
        assert_eq!(r.lookup("a"), Some(open));
        std::thread::sleep(Duration::from_millis(30));
        r.register("a", open).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            r.lookup("a"),
            Some(open),
            "re-registering refreshes the TTL"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.lookup("a"), None);
        r.register("b", open).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.sweep(), 1);
        assert_eq!(
            r.names(),
            vec![STATUS_TOPIC.to_string()],
            "status topic never expires"
        );
    }
}
