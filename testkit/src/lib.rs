//! drblk's test and benchmark kit: everything the tests, the benchmarks and the demo need
//! that a user of the `drblk` library does not. Not published.
//!
//! - [`test_frontend`]: a minimal vhost-user frontend (vhost's `Frontend` over memfd guest
//!   memory) that drives virtqueues by hand, for protocol-level and malformed-input tests.
//! - [`blkio_client`]: libblkio's virtio-blk driver as a real frontend (demo, benchmarks).
//! - [`impair`]: a loopback UDP proxy adding delay, loss, reordering or a blackhole to the
//!   replication link.
//! - [`vm`]: QEMU guests booted from `vm-images/` with a job script, results read from the
//!   serial console.
//! - [`workload`]: the dependent-write workload and its consistency checker.
//! - [`rng`]: seeded pseudo-random numbers and byte patterns.
//! - [`bench`](mod@bench): figures of a benchmark cell (IOPS, latency, CPU).
//! - [`demo`]: what `cargo run --release` shows.

#![deny(missing_docs)]

pub mod bench;
pub mod blkio_client;
pub mod demo;
pub mod impair;
pub mod rng;
pub mod test_frontend;
pub mod vm;
pub mod workload;
