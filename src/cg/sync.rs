//! Synchronisation primitives: `std` normally, `loom` in the library's own test build with
//! the `loom` feature, so the model checker can explore the interleavings of the engine's
//! own atomics, mutexes and condition variables.
//!
//! `Arc` stays `std::sync::Arc` in both builds: reference counting is not what the loom tests
//! check, and the public API hands out `std` `Arc`s.

#[cfg(all(test, feature = "loom"))]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering},
    Condvar, Mutex, MutexGuard,
};
#[cfg(not(all(test, feature = "loom")))]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering},
    Condvar, Mutex, MutexGuard,
};

/// Locks `m`. A poisoned lock means a thread panicked while holding engine state (or inside a
/// publish callback); the state can no longer be trusted, so this panics too.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
        .expect("cg: lock poisoned by a panic in another thread")
}
