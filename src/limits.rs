//! Connection limits that protect the machine: in total and per client IP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::hub::lock;

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

    /// Takes a slot for a connection from `ip`, or says which limit is reached.
    pub fn acquire(&self, ip: IpAddr) -> Result<Permit, LimitHit> {
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

    pub fn total(&self) -> usize {
        self.inner.total.load(Ordering::Acquire)
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
