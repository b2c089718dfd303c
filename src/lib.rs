//! drblk: a vhost-user-blk backend that serves a VM's disk out of shared guest memory and
//! replicates it asynchronously to a secondary site in crash-consistent sets.
//!
//! The data path, outermost first:
//! [`daemon`] (socket and connection lifecycle) → [`backend`] (the vhost-user device of one
//! connection) → [`queue_worker`] (one virtqueue) → [`request`] (parse and validate a
//! descriptor chain) → [`executor`] (run it against guest memory) → [`storage`] (the image).

#![deny(missing_docs)]

pub mod backend;
pub mod bench;
pub mod blkio_client;
pub mod cg;
pub mod cli;
pub mod control;
pub mod cycle;
pub mod daemon;
pub mod demo;
pub mod executor;
pub mod identity;
pub mod link;
pub mod priority;
pub mod queue_worker;
pub mod replication;
pub mod request;
pub mod secondary;
pub mod secondary_site;
pub mod serve;
pub mod storage;
pub mod test_frontend;

pub mod virtio_blk;
