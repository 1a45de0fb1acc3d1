//! Connection limits that protect the machine: in total and per client IP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::bounded::BoundedMap;
use crate::cidr::client_key;
use crate::sync::lock;

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Total,
    PerIp,
}

impl LimitHit {
    pub fn metric_label(self) -> &'static str {
        match self {
            LimitHit::Total => "max_connections",
            LimitHit::PerIp => "max_connections_per_ip",
        }
    }
}

#[derive(Clone)]
pub struct ConnectionLimits {
    inner: Arc<Inner>,
}

struct Inner {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// A counted connection; dropping it frees its slot.
pub struct Permit {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        ConnectionLimits {
            inner: Arc::new(Inner {
                max_total,
                max_per_ip,
                total: AtomicUsize::new(0),
                per_ip: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Takes a slot for a connection from `ip` (an IPv6 client counts by its /64), or says
    /// which limit is reached.
    pub fn acquire(&self, ip: IpAddr) -> Result<Permit, LimitHit> {
        let ip = client_key(ip);
        let inner = &self.inner;
        let mut per_ip = lock(&inner.per_ip);
        if inner.total.load(Ordering::Acquire) >= inner.max_total {
            return Err(LimitHit::Total);
        }
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= inner.max_per_ip {
            return Err(LimitHit::PerIp);
        }
        *n += 1;
        inner.total.fetch_add(1, Ordering::AcqRel);
        Ok(Permit {
            inner: inner.clone(),
            ip,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut per_ip = lock(&self.inner.per_ip);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.inner.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_release() {
        let l = ConnectionLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.acquire(a).unwrap();
        let _p2 = l.acquire(a).unwrap();
        assert_eq!(l.acquire(a).err(), Some(LimitHit::PerIp));
        let _p3 = l.acquire(b).unwrap();
        assert_eq!(l.acquire(b).err(), Some(LimitHit::Total));
        drop(p1);
        assert!(l.acquire(a).is_ok());
    }
}

/// A leaky bucket per client (an IPv6 client by its /64): each may fail `burst` times, then
/// once per `1 / rate` seconds; beyond that its attempts are refused (429) before anything is
/// looked at. Used twice: for token guesses (a signature oracle at line rate is what it
/// prevents) and, more generously, for probes of unregistered topics (enumeration).
pub struct AuthThrottle {
    burst: f64,
    per_second: f64,
    buckets: Mutex<BoundedMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    /// Failures still allowed right now.
    allowance: f64,
    updated: std::time::Instant,
}

/// Clients tracked at most; past that the bucket written longest ago is forgotten (a client
/// that was failing then starts afresh, which costs an attacker 100,000 other addresses).
const MAX_TRACKED_CLIENTS: usize = 100_000;

impl AuthThrottle {
    pub fn new(burst: u32, per_minute: u32) -> Self {
        AuthThrottle {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_minute) / 60.0,
            buckets: Mutex::new(BoundedMap::new(MAX_TRACKED_CLIENTS)),
        }
    }

    fn refill(&self, b: &mut Bucket, now: std::time::Instant) {
        let elapsed = now.duration_since(b.updated).as_secs_f64();
        b.allowance = (b.allowance + elapsed * self.per_second).min(self.burst);
        b.updated = now;
    }

    /// Whether `ip` may try now.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let now = std::time::Instant::now();
        let mut buckets = lock(&self.buckets);
        match buckets.get_mut(&client_key(ip)) {
            Some(b) => {
                self.refill(b, now);
                b.allowance >= 1.0
            }
            None => true,
        }
    }

    /// Counts one failure of `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let now = std::time::Instant::now();
        let key = client_key(ip);
        let mut buckets = lock(&self.buckets);
        let mut b = buckets.get(&key).copied().unwrap_or(Bucket {
            allowance: self.burst,
            updated: now,
        });
        self.refill(&mut b, now);
        b.allowance = (b.allowance - 1.0).max(0.0);
        buckets.insert(key, b);
    }

    /// Forgets the clients whose bucket has refilled: they are as if never seen.
    pub fn sweep(&self) {
        let now = std::time::Instant::now();
        let (burst, per_second) = (self.burst, self.per_second);
        lock(&self.buckets).retain(|_, b| {
            let elapsed = now.duration_since(b.updated).as_secs_f64();
            b.allowance + elapsed * per_second < burst
        });
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        lock(&self.buckets).len()
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t = AuthThrottle::new(3, 60);
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let other: IpAddr = "198.51.100.2".parse().unwrap();
        for _ in 0..3 {
            assert!(t.allows(ip));
            t.failed(ip);
        }
        assert!(!t.allows(ip), "burst used up");
        assert!(t.allows(other), "per IP");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(t.allows(ip), "one more per second");
    }

    #[test]
    fn an_ipv6_client_counts_by_its_64_and_full_buckets_are_swept() {
        let t = AuthThrottle::new(2, 600);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        t.failed(a);
        t.failed(b);
        assert!(!t.allows("2001:db8:1:2::42".parse().unwrap()), "one /64");
        assert!(t.allows("2001:db8:1:3::1".parse().unwrap()));
        assert_eq!(t.tracked(), 1);
        std::thread::sleep(std::time::Duration::from_millis(250));
        t.sweep();
        assert_eq!(t.tracked(), 0, "refilled buckets are forgotten");
    }
}
