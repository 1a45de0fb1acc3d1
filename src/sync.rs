//! Locking helpers.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, recovering from poisoning: our critical sections leave data consistent, and
/// one panicking task must not take every later caller down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
