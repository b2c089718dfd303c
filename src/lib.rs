//! drblk: a vhost-user-blk backend that serves a VM's disk out of shared guest memory and
//! replicates it asynchronously to a secondary site in crash-consistent sets.
//!
//! # The map
//!
//! One folder per path and per role; each file has one job.
//!
//! **The data path** ([`blk`]), a guest request from socket to image and back:
//! [`blk::daemon`] (socket, one connection after another, signals) → [`blk::device`] (the
//! vhost-user device of one connection) → [`blk::queue`] (one virtqueue) → [`blk::request`]
//! (parse and validate a descriptor chain) → [`blk::execute`] (run it against guest memory)
//! → [`blk::disk`] (the image). The data path sees replication only through
//! [`blk::tracking`]: a write is announced before it touches the disk, and completions pass
//! a gate that holds them while a consistency group is frozen.
//!
//! **The replication path**, primary to secondary:
//! [`cg`] (the consistency-group engine behind [`blk::tracking`]: recording, formation by
//! freeze/swap/run, copy-on-write, drain, commit) → [`replicate::cycle`] (form a group on a
//! timer, drain it into a sink, commit it) → [`replicate::shipper`] (the sink that ships over
//! the link and decides what a (re)connection must resync) → [`link`] (QUIC transport: TLS,
//! handshake, frames, client and server) → [`site::secondary`] (the link's server in front
//! of the store) → [`replica`] (stage in a checksummed journal, commit durably, apply,
//! recover). [`replicate::local`] is a sink that keeps a replica on the primary's host.
//! [`track`] is the primary's persisted change record (activity log and bitmap in a file
//! next to the image), which a restarted primary resyncs from instead of the whole disk.
//!
//! **The roles** ([`site`]): [`site::primary`] (`drblk serve`) and [`site::secondary`]
//! (`drblk secondary`) assemble the parts above into processes; [`control`] is their control
//! socket and the typed status that `drblk ctl`, the tests and the metrics read.
//! [`lineage`] is who may write a disk (role, generation ids, the handshake's decision);
//! the role changes are [`site::promote`] (failover), [`control`]'s `demote` (planned
//! switchover, behind [`blk::fence`]) and [`site::rejoin`] (an old primary coming back as a
//! secondary); [`site::role`] is what `drblk serve` checks before it writes.
//! [`drill`] is a DR drill on the secondary: a copy-on-write view of the last committed
//! group that the data path serves (through [`blk::backing`]) while groups keep applying.
//!
//! **Shared**: [`cli`] (clap definitions) and [`config`] (arguments → validated
//! configuration, one set of defaults), [`geometry`] (how a disk is cut into chunks),
//! [`sys`] (clock, lock files, `fallocate`, thread priority).
//!
//! Test frontends, the link impairment proxy, workloads, benchmarks and the demo live in the
//! `drblk-testkit` workspace member, not in this library.

#![deny(missing_docs)]

pub mod blk;
pub mod cg;
pub mod cli;
pub mod config;
pub mod control;
pub mod drill;
pub mod geometry;
pub mod lineage;
pub mod link;
pub mod metrics;
pub mod replica;
pub mod replicate;
pub mod site;
pub mod sys;
pub mod track;
