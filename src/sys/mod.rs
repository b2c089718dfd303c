//! Small operating-system helpers shared by both sites.

pub mod priority;
