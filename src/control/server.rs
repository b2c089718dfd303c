//! The control socket of a running daemon: a unix socket (mode 0600) served by one thread
//! per connection, one [`Request`] per line, one JSON answer per line.
//!
//! A line that is not a request (not JSON, an unknown command, longer than
//! [`MAX_REQUEST_BYTES`]) is answered with an [`ErrorReply`]; after an oversized line the
//! connection is closed, since the rest of it cannot be told from the next request.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::status::{
    AbandonedCounts, CgStatus, Done, Drained, ErrorReply, FreezeTimes, LinkStatusView,
    MemberStatus, PrimaryStatus, ReplicationStatus, Reply,
};
use crate::blk::device::DeviceShared;
use crate::cg::Engine;
use crate::replicate::cycle::Cycle;
use crate::replicate::shipper::LinkStatus;

/// The longest request line accepted, newline excluded (bytes).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// A request on the control socket: `{"cmd":"status"}`, `{"cmd":"form-cg"}`,
/// `{"cmd":"drain"}` or `{"cmd":"demote","force":false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// The daemon's [`PrimaryStatus`].
    Status,
    /// Form a consistency group now; answers [`Done`].
    FormCg,
    /// Form one last group and wait until it has committed; answers [`Drained`].
    Drain,
    /// Planned switchover: refuse writes, form a final group, wait for its commit, stop
    /// replicating and record "demoted at CG n"; answers [`Drained`]. Refused while a
    /// frontend is connected unless `force` (its writes fail from then on).
    Demote {
        /// Demote although a frontend (the VM) is connected.
        #[serde(default)]
        force: bool,
    },
    /// Compare the primary's disk with the secondary's by checksums at a group boundary
    /// (only checksums cross the link); with `repair`, ship the differing chunks in the
    /// next group. Answers the report.
    Verify {
        /// Ship the differing chunks in the next group.
        #[serde(default)]
        repair: bool,
    },
    /// Failover, on a running secondary: promote its replica (see `drblk promote`);
    /// answers the promotion's report. A replica still syncing needs `force`.
    Promote {
        /// Promote a replica that is still syncing.
        #[serde(default)]
        force: bool,
    },
    /// A secondary: start a drill — a writable clone of the last committed group served on
    /// `sockets` (one per disk of the group, in its order) while replication goes on;
    /// answers its `DrillStatus`.
    DrillStart {
        /// The drill's vhost-user sockets (`socket`, one path, is read as a list of one).
        #[serde(alias = "socket", deserialize_with = "one_or_many")]
        sockets: Vec<PathBuf>,
        /// Limit on the drill's overlay plus preserved bytes (default: the daemon's
        /// `--drill-space`).
        #[serde(default)]
        space: Option<u64>,
    },
    /// A secondary: the drill's `DrillStatus`.
    DrillStatus,
    /// A secondary: stop the drill and drop everything written to it.
    DrillStop,
}

impl FromStr for Request {
    type Err = anyhow::Error;

    /// A request from its command name (`status`, `form-cg`, `drain`).
    fn from_str(name: &str) -> anyhow::Result<Self> {
        serde_json::from_value(serde_json::json!({ "cmd": name }))
            .with_context(|| format!("unknown control command {name:?}"))
    }
}

/// A list of paths, or one path alone (what a one-disk request sent before groups).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

/// The control socket path for a vhost-user socket path.
pub fn control_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// Everything the control socket reports on and acts on.
pub struct ControlState {
    /// The daemon's disks, in the group's order (at least one).
    pub members: Vec<Member>,
    /// The consistency-group cycle, if one runs.
    pub cycle: Mutex<Option<Cycle>>,
    /// The replication link, if the disks are replicated.
    pub link: Mutex<Option<Arc<LinkStatus>>>,
}

/// One disk of the daemon, as the control socket sees it.
pub struct Member {
    /// The device.
    pub shared: Arc<DeviceShared>,
    /// The consistency-group engine, if writes are tracked.
    pub engine: Option<Arc<Engine>>,
    /// The persisted change record, if one is kept.
    pub record: Option<Arc<crate::track::ChangeRecord>>,
    /// Its vhost-user socket.
    pub socket: PathBuf,
}

impl ControlState {
    /// The first disk (the whole daemon's, when it serves one).
    pub fn first(&self) -> &Member {
        &self.members[0]
    }

    /// The daemon's status (what `drblk ctl status` prints).
    pub fn status(&self) -> PrimaryStatus {
        // The engine's figures once (they count bitmap pages), then one lock at a time.
        let first = self.first();
        let engine = first.engine.as_deref().map(|e| (e, e.stats()));
        // Dirty chunks of every disk: what the next group ships.
        let dirty: u64 = self
            .members
            .iter()
            .filter_map(|m| m.engine.as_deref())
            .map(|e| {
                let st = e.stats();
                st.oos_dirty + st.cr_dirty
            })
            .sum();
        let replication = self
            .cycle
            .lock()
            .expect("cycle lock")
            .as_ref()
            .map(replication_status);
        let link = self
            .link
            .lock()
            .expect("link lock")
            .as_deref()
            .map(|l| link_status(l, engine.as_ref().map(|(e, _)| (*e, dirty))));
        let s = &first.shared;
        let disk = s.executor.disk();
        PrimaryStatus {
            disk: disk.path().display().to_string(),
            size: disk.size(),
            readonly: disk.readonly(),
            queues: s.limits.num_queues,
            connections: s.stats.connections.load(Ordering::Relaxed),
            frontends_connected: s.stats.frontends.load(Ordering::SeqCst),
            lineage: crate::lineage::Lineage::load(disk.path()).ok().flatten(),
            requests: s.stats.requests.load(Ordering::Relaxed),
            rejected: s.stats.rejected.load(Ordering::Relaxed),
            ops: s.stats.ops.snapshot(),
            cg: engine.as_ref().map(|(e, st)| cg_status(e, st.clone())),
            replication,
            link,
            track: first.record.as_ref().map(|r| r.status()),
            group: if self.members.len() > 1 {
                self.members.iter().map(member_status).collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Carries out `req`; answers the JSON line to send back.
    fn handle(&self, req: Request) -> anyhow::Result<String> {
        match req {
            Request::Promote { .. } => bail!(
                "this is a primary (`drblk serve`): promote is a secondary's command (`drblk ctl --control PATH promote`)"
            ),
            Request::Status => reply(self.status()),
            Request::FormCg => {
                let g = self.cycle.lock().expect("cycle lock");
                let cycle = g
                    .as_ref()
                    .context("no consistency-group cycle runs (no replication target)")?;
                cycle.trigger();
                reply(Done {})
            }
            Request::Drain => reply(Drained { cg: self.drain()? }),
            Request::Demote { force } => reply(Drained {
                cg: self.demote(force)?,
            }),
            Request::Verify { repair } => reply(self.verify(repair)?),
            Request::DrillStart { .. } | Request::DrillStatus | Request::DrillStop => bail!(
                "this is a primary (`drblk serve`): drills run on a secondary (`drblk ctl --control SECONDARY_CONTROL drill start --socket PATH`)"
            ),
        }
    }

    /// Forms groups until one that was formed after this call has committed: it then holds
    /// every write completed before the call. Returns the last committed group.
    pub(super) fn drain(&self) -> anyhow::Result<u64> {
        let stats = {
            let g = self.cycle.lock().expect("cycle lock");
            let cycle = g
                .as_ref()
                .context("no consistency-group cycle runs (no replication target)")?;
            cycle.trigger();
            cycle.stats().clone()
        };
        let engine = self
            .first()
            .engine
            .as_ref()
            .context("no consistency groups")?;
        // Every disk's engine numbers groups alike (they form them together). CG numbers
        // need not start at 1 (a restarted primary continues above what its replica
        // holds): any group numbered from the engine's next number on was formed after this
        // call began.
        let target = engine.next_cg();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let committed = stats.last_committed.load(Ordering::SeqCst);
            if committed >= target {
                return Ok(committed);
            }
            if Instant::now() > deadline {
                bail!("no consistency group committed within 300 s (last committed: {committed})");
            }
            std::thread::sleep(Duration::from_millis(5));
            if let Some(c) = self.cycle.lock().expect("cycle lock").as_ref() {
                c.trigger();
            }
        }
    }
}

fn cg_status(engine: &Engine, st: crate::cg::CgStats) -> CgStatus {
    let mut c = st.coordination_ns;
    c.sort_unstable();
    let pct = |q: f64| {
        c.get(((c.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    CgStatus {
        phase: st.phase,
        last_committed: st.last_committed,
        formed: st.formed,
        committed: st.committed,
        coordination_aborts: st.coordination_aborts,
        abandoned: AbandonedCounts {
            cache_full: st.abandoned_cache_full,
            drain_timeout: st.abandoned_drain_timeout,
            preserve_failed: st.abandoned_preserve_failed,
            link_lost: st.abandoned_link_lost,
        },
        freeze_us: FreezeTimes {
            p50: pct(0.5) as f64 / 1e3,
            p99: pct(0.99) as f64 / 1e3,
            max: st.coordination_max_ns as f64 / 1e3,
        },
        cow_bytes: st.cow_bytes as u64,
        cow_peak_bytes: st.cow_peak_bytes as u64,
        dirty_chunks: st.oos_dirty + st.cr_dirty,
        dirty_bytes: ((st.oos_dirty + st.cr_dirty) * engine.config().chunk_size)
            .min(engine.config().disk_size),
        freeze_seconds: st.coordination_hist,
    }
}

fn replication_status(cycle: &Cycle) -> ReplicationStatus {
    let cs = cycle.stats();
    let frozen = cs.last_commit_frozen_us.load(Ordering::SeqCst);
    let now = crate::sys::clock::now_unix_micros();
    ReplicationStatus {
        last_committed_cg: cs.last_committed.load(Ordering::SeqCst),
        rpo_ms: (frozen > 0).then(|| now.saturating_sub(frozen) as f64 / 1e3),
        last_committed_frozen_unix_s: (frozen > 0).then(|| frozen as f64 / 1e6),
        chunks_shipped: cs.chunks_shipped.load(Ordering::Relaxed),
        extents_shipped: cs.extents_shipped.load(Ordering::Relaxed),
        bytes_shipped: cs.bytes_shipped.load(Ordering::Relaxed),
    }
}

/// One disk's line in a group's status.
fn member_status(m: &Member) -> MemberStatus {
    let s = &m.shared;
    let disk = s.executor.disk();
    MemberStatus {
        disk: disk.path().display().to_string(),
        socket: m.socket.display().to_string(),
        size: disk.size(),
        frontends_connected: s.stats.frontends.load(Ordering::SeqCst),
        requests: s.stats.requests.load(Ordering::Relaxed),
        dirty_chunks: m.engine.as_ref().map(|e| {
            let st = e.stats();
            st.oos_dirty + st.cr_dirty
        }),
        track: m.record.as_ref().map(|r| r.status()),
    }
}

/// The link's view; `engine` is the first disk's engine and the chunks dirty on every disk.
fn link_status(link: &LinkStatus, engine: Option<(&Engine, u64)>) -> LinkStatusView {
    let remote = *link.remote.lock().expect("status lock");
    let total = link.sync_total_chunks.load(Ordering::Relaxed);
    let chunk = engine.map_or(0, |(e, _)| e.config().chunk_size);
    // While the secondary syncs it reports no progress of its own: what this primary has
    // shipped of what it marked tells it.
    let sync_progress = match remote {
        Some(crate::replica::ReplicaState::Syncing { .. }) => {
            let dirty = engine.map_or(total, |(_, dirty)| dirty);
            Some(if total == 0 {
                0.0
            } else {
                1.0 - dirty.min(total) as f64 / total as f64
            })
        }
        Some(_) => Some(1.0),
        None => None,
    };
    LinkStatusView {
        connected: link.connected.load(Ordering::SeqCst),
        secondary: link.remote_state.lock().expect("status lock").clone(),
        secondary_state: remote,
        sync_progress,
        sync_total_bytes: total * chunk,
        connects: link.connects.load(Ordering::Relaxed),
        full_resyncs: link.full_resyncs.load(Ordering::Relaxed),
        checksum_resyncs: link.checksum_resyncs.load(Ordering::Relaxed),
        resync_compared: link.resync_compared.load(Ordering::Relaxed),
        resync_differing: link.resync_differing.load(Ordering::Relaxed),
        wire_bytes: link.wire_bytes.load(Ordering::Relaxed),
        udp_bytes: link.udp_bytes.load(Ordering::Relaxed),
        secondary_failures: link.secondary_failures.load(Ordering::Relaxed),
        secondary_error: link.secondary_error.lock().expect("status lock").clone(),
    }
}

/// `{"ok":true, ...body}` as one line.
pub fn reply(body: impl Serialize) -> anyhow::Result<String> {
    serde_json::to_string(&Reply::ok(body)).context("encoding the answer")
}

/// `{"ok":false,"error":...}` as one line.
fn error_reply(error: String) -> String {
    serde_json::to_string(&ErrorReply::new(error))
        .unwrap_or_else(|_| r#"{"ok":false,"error":"unprintable error"}"#.to_owned())
}

/// Parses one request line (newline included or not).
fn parse(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => format!("bad request: {e}"),
        _ => format!("not a JSON request: {e}"),
    })
}

/// Answers the requests read from `input` on `out` until end of input, an I/O error or an
/// oversized line.
fn serve_lines(
    mut input: impl BufRead,
    mut out: impl Write,
    handle: impl Fn(Request) -> anyhow::Result<String>,
) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = input
            .by_ref()
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && line.len() > MAX_REQUEST_BYTES {
            writeln!(
                out,
                "{}",
                error_reply(format!(
                    "request longer than {MAX_REQUEST_BYTES} bytes; closing the connection"
                ))
            )?;
            return Ok(());
        }
        let answer = match parse(&line) {
            Ok(req) => handle(req).unwrap_or_else(|e| error_reply(format!("{e:#}"))),
            Err(e) => error_reply(e),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
}

/// What answers the requests of a control socket: a primary's [`ControlState`], or a
/// secondary's (`site::secondary`).
pub trait ControlHandler: Send + Sync + 'static {
    /// Carries out `req`; answers the JSON line to send back.
    fn handle(&self, req: Request) -> anyhow::Result<String>;
}

impl ControlHandler for ControlState {
    fn handle(&self, req: Request) -> anyhow::Result<String> {
        ControlState::handle(self, req)
    }
}

fn serve_conn(conn: UnixStream, state: &dyn ControlHandler) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    let out = conn.try_clone()?;
    serve_lines(BufReader::new(conn), out, |req| state.handle(req))
}

/// A running control socket; removed on drop.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` (replacing a stale file; the caller holds the daemon lock).
    pub fn start(path: &Path, state: Arc<dyn ControlHandler>) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("drblk-control".into())
            .spawn(move || {
                while !st.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let state = state.clone();
                            std::thread::spawn(move || {
                                if let Err(e) = serve_conn(conn, &*state) {
                                    tracing::debug!(error = %e, "control connection ended");
                                }
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control socket accept failed");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` to a server whose `status` answers `{"ok":true,"n":1}`, `form-cg`
    /// fails and `drain` answers `{"ok":true,"cg":7}`; returns the answer lines.
    fn answers(input: &[u8]) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        serve_lines(input, &mut out, |req| match req {
            Request::Status => reply(serde_json::json!({ "n": 1 })),
            Request::FormCg => bail!("no cycle"),
            Request::Drain => reply(Drained { cg: 7 }),
            Request::Demote { force } => reply(Drained {
                cg: if force { 9 } else { 8 },
            }),
            _ => bail!("not here"),
        })
        .unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn error_of(v: &serde_json::Value) -> String {
        let e: ErrorReply = serde_json::from_value(v.clone()).unwrap();
        assert!(!e.ok, "{v}");
        e.error
    }

    #[test]
    fn demote_parses_with_and_without_force() {
        let a = answers(b"{\"cmd\":\"demote\"}\n{\"cmd\":\"demote\",\"force\":true}\n");
        assert_eq!(a[0]["cg"], 8);
        assert_eq!(a[1]["cg"], 9);
        assert_eq!(
            "demote".parse::<Request>().unwrap(),
            Request::Demote { force: false }
        );
    }

    #[test]
    fn requests_are_answered_in_order() {
        let a = answers(b"{\"cmd\":\"status\"}\n{\"cmd\":\"drain\"}\n{\"cmd\":\"form-cg\"}");
        assert_eq!(a.len(), 3);
        assert_eq!(a[0], serde_json::json!({"ok": true, "n": 1}));
        let drained: Reply<Drained> = serde_json::from_value(a[1].clone()).unwrap();
        assert_eq!(drained, Reply::ok(Drained { cg: 7 }));
        assert_eq!(error_of(&a[2]), "no cycle");
    }

    #[test]
    fn garbage_gets_an_error_answer_and_the_connection_goes_on() {
        let input: &[u8] =
            b"hello\n\n\xff\xfe\x00\n[1,2]\n{\"cmd\":42}\n{\"cmd\":\"reboot\"}\n{}\n\
                             {\"cmd\":\"status\"\n\"status\"\n{\"cmd\":\"status\"}\n";
        let a = answers(input);
        assert_eq!(a.len(), 10, "{a:?}");
        for i in [0, 1, 2, 7] {
            assert!(
                error_of(&a[i]).starts_with("not a JSON request"),
                "{}",
                a[i]
            );
        }
        for i in [3, 4, 5, 6, 8] {
            assert!(error_of(&a[i]).starts_with("bad request"), "{}", a[i]);
        }
        assert!(error_of(&a[5]).contains("reboot"), "{}", a[5]);
        assert!(error_of(&a[6]).contains("cmd"), "{}", a[6]);
        assert_eq!(a[9]["ok"], true);
    }

    #[test]
    fn an_oversized_request_gets_an_error_answer_and_closes_the_connection() {
        // Exactly the limit is accepted (and is no request); one byte more is not.
        let mut at_limit = vec![b' '; MAX_REQUEST_BYTES];
        at_limit.extend_from_slice(b"\n{\"cmd\":\"status\"}\n");
        let a = answers(&at_limit);
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(error_of(&a[0]).starts_with("not a JSON request"));
        assert_eq!(a[1]["ok"], true);

        let mut over = b"{\"cmd\":\"status\",\"pad\":\"".to_vec();
        over.resize(4 * MAX_REQUEST_BYTES, b'x');
        over.extend_from_slice(b"\"}\n{\"cmd\":\"status\"}\n");
        let a = answers(&over);
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(error_of(&a[0]).contains("longer than"), "{}", a[0]);

        // Endless input without a newline: one error answer, bounded memory.
        let a = answers(&vec![b'{'; 10 * MAX_REQUEST_BYTES]);
        assert_eq!(a.len(), 1);
        assert!(error_of(&a[0]).contains("longer than"));
    }

    #[test]
    fn request_names_parse_like_the_wire_form() {
        for (name, req) in [
            ("status", Request::Status),
            ("form-cg", Request::FormCg),
            ("drain", Request::Drain),
        ] {
            assert_eq!(name.parse::<Request>().unwrap(), req);
            let wire = serde_json::to_string(&req).unwrap();
            assert_eq!(wire, format!("{{\"cmd\":\"{name}\"}}"));
            assert_eq!(serde_json::from_str::<Request>(&wire).unwrap(), req);
        }
        assert!("reboot".parse::<Request>().is_err());
    }

    #[test]
    fn a_unix_socket_server_answers_garbage_and_keeps_serving() {
        let (server, client) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let out = server.try_clone().unwrap();
            serve_lines(BufReader::new(server), out, |_| reply(Done {}))
        });
        let mut w = client.try_clone().unwrap();
        let mut r = BufReader::new(client);
        let mut line = String::new();
        w.write_all(b"\x00garbage\n").unwrap();
        r.read_line(&mut line).unwrap();
        assert!(error_of(&serde_json::from_str(&line).unwrap()).starts_with("not a JSON"));
        line.clear();
        w.write_all(b"{\"cmd\":\"form-cg\"}\n").unwrap();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), r#"{"ok":true}"#);
        drop(w);
        drop(r);
        t.join().unwrap().unwrap();
    }
}
