//! drblk: a vhost-user-blk backend that serves a VM's disk out of shared guest memory and
//! replicates it asynchronously to a secondary site in crash-consistent sets.
//!
//! The data path, outermost first:
//! [`daemon`] (socket and connection lifecycle) → [`backend`] (the vhost-user device of one
//! connection) → [`queue_worker`] (one virtqueue) → [`request`] (parse and validate a
//! descriptor chain) → [`executor`] (run it against guest memory) → [`storage`] (the image).

#![deny(missing_docs)]

pub mod blk;
pub mod cg;
pub mod cli;
pub mod config;
pub mod control;
pub mod geometry;
pub mod link;
pub mod replica;
pub mod replicate;
pub mod site;
pub mod sys;
