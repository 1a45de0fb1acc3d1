//! Who is connected: authenticated sockets and distinct users, for status answers.
//!
//! Counting rules follow the Go worker: sockets still authenticating (or refused) are not
//! counted; a user with several sockets is one client; `user_id` 0 (or a socket on an open
//! topic) is anonymous, and every anonymous socket is a client of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::sync::lock;

#[derive(Default)]
struct Counts {
    users: HashMap<i64, usize>,
    anonymous: usize,
    sockets: usize,
}

#[derive(Default)]
pub struct Presence {
    counts: Mutex<Counts>,
}

/// A counted socket; dropping it un-counts it.
pub struct Member {
    presence: Arc<Presence>,
    user: Option<i64>,
}

impl Presence {
    pub fn new() -> Arc<Self> {
        Arc::new(Presence::default())
    }

    /// Counts a socket of `user_id` (0 = anonymous).
    pub fn join(self: &Arc<Self>, user_id: i64) -> Member {
        let user = (user_id != 0).then_some(user_id);
        let mut c = lock(&self.counts);
        c.sockets += 1;
        match user {
            Some(id) => *c.users.entry(id).or_insert(0) += 1,
            None => c.anonymous += 1,
        }
        Member {
            presence: self.clone(),
            user,
        }
    }

    /// `(connected_clients, connected_sockets)`.
    pub fn counts(&self) -> (usize, usize) {
        let c = lock(&self.counts);
        (c.users.len() + c.anonymous, c.sockets)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut c = lock(&self.presence.counts);
        c.sockets -= 1;
        match self.user {
            Some(id) => {
                if let Some(n) = c.users.get_mut(&id) {
                    *n -= 1;
                    if *n == 0 {
                        c.users.remove(&id);
                    }
                }
            }
            None => c.anonymous -= 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_users_and_anonymous_sockets() {
        let p = Presence::new();
        let a1 = p.join(5);
        let a2 = p.join(5);
        let anon1 = p.join(0);
        let _anon2 = p.join(0);
        assert_eq!(p.counts(), (3, 4));
        drop((a1, anon1));
        assert_eq!(p.counts(), (2, 2));
        drop(a2);
        assert_eq!(p.counts(), (1, 1));
    }
}
