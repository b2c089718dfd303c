//! CPU priority of shipping. Draining consistency groups and the QUIC link compete with the
//! queue workers for CPU; with `--ship-nice N` those threads run at niceness N, so that when
//! the CPUs are saturated the guest's I/O goes first and the RPO grows instead. Raising a
//! thread's niceness needs no privilege; Linux keeps niceness per thread.

use std::io;

/// Sets the niceness of the calling thread to `nice` (0 leaves it alone).
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    if nice == 0 {
        return Ok(());
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority(PRIO_PROCESS, tid) only changes the priority of this thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's niceness.
pub fn current_thread_nice() -> i32 {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: getpriority only reads the priority of this thread.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_can_lower_its_own_priority() {
        std::thread::spawn(|| {
            let before = current_thread_nice();
            set_current_thread_nice(before + 5).unwrap();
            assert_eq!(current_thread_nice(), before + 5);
        })
        .join()
        .unwrap();
    }
}
