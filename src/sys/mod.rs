//! Small operating-system helpers shared by both sites: wall-clock times, lock files and
//! `fallocate`, thread priority and CPU affinity.

pub mod clock;
pub mod cpus;
pub mod direct_batch;
#[cfg(feature = "fault-injection")]
pub mod fault_plan;
pub mod file;
pub mod log_limit;
pub mod priority;
pub mod read_ahead;
