//! The data path: a guest's request from the vhost-user socket to the image and back, in
//! reading order.
//!
//! [`daemon`] (socket, one connection after another, signals) → [`device`] (the vhost-user
//! device of one connection) → [`queue`] (one virtqueue: pop, execute, complete) →
//! [`request`] (parse and validate a descriptor chain) → [`execute`] (run it against guest
//! memory) → [`disk`] (the image file). [`virtio`] holds what virtio-blk defines.
//!
//! Replication is seen here only through [`tracking`]: writes are announced before they touch
//! the disk, and completions pass through a gate that may hold them during a freeze.

pub mod backing;
pub mod daemon;
pub mod device;
pub mod disk;
pub mod execute;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod fence;
pub mod op_stats;
pub mod queue;
pub mod request;
#[cfg(test)]
pub(crate) mod testing;
pub mod tracking;
pub mod virtio;
