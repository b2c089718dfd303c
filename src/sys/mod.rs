//! Small operating-system helpers shared by both sites: wall-clock times, lock files and
//! `fallocate`, thread priority.

pub mod clock;
pub mod file;
pub mod priority;
