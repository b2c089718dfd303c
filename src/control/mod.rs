//! The control socket of a running daemon (`<socket>.ctl`, mode 0600): one JSON request per
//! line (`{"cmd":"status"}`, `{"cmd":"form-cg"}`, `{"cmd":"drain"}`), one JSON answer per
//! line. `drblk ctl` is its client.
//!
//! - [`server`]: the socket, parsing requests into [`Request`] and carrying them out;
//! - [`client`]: sending a request, as `drblk ctl` does;
//! - [`status`]: the typed answers, [`PrimaryStatus`] first.

pub mod client;
mod demote;
pub mod server;
pub mod status;
pub mod summary;
mod verify;
pub mod watch;

pub use client::request;
pub use server::{
    control_path, reply, ControlHandler, ControlServer, ControlState, Member, Request,
    MAX_REQUEST_BYTES,
};
pub use status::{
    AbandonedCounts, CgStatus, Done, Drained, ErrorReply, FreezeTimes, LinkStatusView,
    MemberStatus, PrimaryStatus, Promoted, ReplicationStatus, Reply, SecondaryStatus, TrackStatus,
};
