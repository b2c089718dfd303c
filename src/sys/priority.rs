//! CPU priority of shipping. Draining consistency groups and the QUIC link compete with the
//! queue workers for CPU; with `--ship-nice N` those threads run at niceness N, so that when
//! the CPUs are saturated the guest's I/O goes first and the RPO grows instead. Raising a
//! thread's niceness needs no privilege; Linux keeps niceness per thread. With `--ship-cpus`
//! they also run only on the CPUs given, so that shipping cannot take the queue workers'
//! CPUs at all (the queue workers keep the process's affinity).

use std::io;

use super::cpus::CpuList;

/// Where and at what priority the threads that form, drain and ship groups run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShipThreads {
    /// Niceness of the drain and link threads (formation stays at 0: a freeze must not wait).
    pub nice: i32,
    /// The CPUs every shipping thread, formation included, is pinned to (`None`: the
    /// process's affinity).
    pub cpus: Option<CpuList>,
}

impl ShipThreads {
    /// Gives the calling thread this niceness and these CPUs; a failure is logged (the thread
    /// still works, only where or how urgently it runs differs).
    pub fn apply(&self, what: &str) {
        if let Err(e) = set_current_thread_nice(self.nice) {
            tracing::warn!(error = %e, nice = self.nice, "cannot lower the priority of the {what}");
        }
        self.apply_cpus(what);
    }

    /// Pins the calling thread to these CPUs only (for a thread that keeps priority 0).
    pub fn apply_cpus(&self, what: &str) {
        if let Some(cpus) = &self.cpus {
            if let Err(e) = cpus.pin_current_thread() {
                tracing::warn!(error = %e, cpus = %cpus, "cannot pin the {what} to its CPUs");
            }
        }
    }
}

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
