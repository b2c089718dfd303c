//! Loopback tests of the link: TLS, handshake, malformed input, impairment, blackhole,
//! throughput.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use super::certs::{self, SiteIdentity};
use super::proto::{self, encode_frame, Hello, HelloAck, Message, ReplicaState};
use super::server::PeerInfo;
use super::*;
use drblk_testkit::impair::ImpairProxy;

pub(super) const CHUNK: u32 = 64 << 10;
pub(super) const DISK: DiskInfo = DiskInfo {
    uuid: [7; 16],
    size: 256 * CHUNK as u64,
    chunk_size: CHUNK,
};

pub(super) fn init_log() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "link=info".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// In-memory secondary: staging per chunk, image updated on commit.
#[derive(Default)]
pub(super) struct MemState {
    pub(super) hellos: u64,
    pub(super) staged: HashMap<u64, Vec<u8>>,
    pub(super) image: HashMap<u64, Vec<u8>>,
    pub(super) last: Option<u64>,
    pub(super) commit_done: Vec<(u64, Instant)>,
    pub(super) disconnects: u64,
    pub(super) progress: Option<(u64, u64)>,
}

/// A secondary in memory. Chunks are keyed by `disk << 56 | chunk` (disk 0: the chunk).
pub(super) struct MemSink {
    disks: Vec<DiskInfo>,
    commit_delay: Duration,
    discard: bool,
    st: Mutex<MemState>,
}

impl MemSink {
    pub(super) fn new(disk: DiskInfo) -> Arc<MemSink> {
        Self::group(vec![disk])
    }
    pub(super) fn group(disks: Vec<DiskInfo>) -> Arc<MemSink> {
        Arc::new(MemSink {
            disks,
            commit_delay: Duration::ZERO,
            discard: false,
            st: Mutex::new(MemState::default()),
        })
    }
    pub(super) fn st(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.st.lock().unwrap()
    }
}

impl ReplicaSink for MemSink {
    fn hello(&self, hello: &Hello, _peer: &PeerInfo) -> Result<HelloAck, RejectReason> {
        self.st().hellos += 1;
        if let [one] = &self.disks[..] {
            one.check(hello)?;
        } else {
            let theirs: Vec<_> = hello.disks.iter().map(|d| (d.uuid, d.size)).collect();
            let ours: Vec<_> = self.disks.iter().map(|d| (d.uuid, d.size)).collect();
            if theirs != ours {
                return Err(RejectReason::Other("another group".into()));
            }
        }
        let last = self.st().last;
        Ok(HelloAck {
            disks: self
                .disks
                .iter()
                .map(|_| DiskAck {
                    state: DiskState::Member,
                    resync_also: Vec::new(),
                    compare_first: false,
                })
                .collect(),
            protocol_version: PROTOCOL_VERSION,
            last_committed_cg: last,
            state: match last {
                Some(cg) => ReplicaState::Consistent {
                    cg,
                    frozen_at_unix_us: 0,
                },
                None => ReplicaState::Syncing {
                    done_chunks: 0,
                    total_chunks: 1,
                },
            },
            site: "secondary".into(),
        })
    }
    fn extent(
        &self,
        disk: u16,
        _cg: u64,
        first: u64,
        count: u64,
        data: ChunkData<'_>,
    ) -> anyhow::Result<()> {
        if self.discard {
            return Ok(());
        }
        let v = match data {
            ChunkData::Data(d) => d.to_vec(),
            ChunkData::Zero { len } => vec![0; len],
        };
        // Kept per chunk, as the replica store does.
        let _ = count;
        let cs = self.disks[0].chunk_size as usize;
        for (k, part) in v.chunks(cs).enumerate() {
            let key = u64::from(disk) << 56 | (first + k as u64);
            self.st().staged.insert(key, part.to_vec());
        }
        Ok(())
    }
    fn commit(&self, cg: u64, _frozen: u64, _count: u64) -> anyhow::Result<()> {
        std::thread::sleep(self.commit_delay);
        let mut st = self.st();
        let staged = std::mem::take(&mut st.staged);
        st.image.extend(staged);
        st.last = Some(cg);
        st.commit_done.push((cg, Instant::now()));
        Ok(())
    }
    fn status(&self) -> (ReplicaState, Option<u64>) {
        let last = self.st().last;
        match last {
            Some(cg) => (
                ReplicaState::Consistent {
                    cg,
                    frozen_at_unix_us: 0,
                },
                last,
            ),
            None => (
                ReplicaState::Syncing {
                    done_chunks: 0,
                    total_chunks: 1,
                },
                None,
            ),
        }
    }
    fn progress(&self, done: u64, total: u64) {
        self.st().progress = Some((done, total));
    }
    fn disconnected(&self, _reason: &str) {
        let mut st = self.st();
        st.staged.clear();
        st.disconnects += 1;
    }
}

pub(super) fn make_certs(dir: &Path) {
    // "other": a second primary site, for what one site may do to another's session.
    certs::generate(dir, &["primary", "secondary", "other"], false).unwrap();
}

pub(super) fn fast_tuning() -> Tuning {
    Tuning {
        keep_alive: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(3),
        heartbeat: Duration::from_millis(200),
        ..Tuning::default()
    }
}

pub(super) fn start_server(dir: &Path, sink: Arc<MemSink>) -> LinkServer {
    start_server_with(dir, sink, |_| {})
}

/// [`start_server`] with `tweak` applied to its configuration.
pub(super) fn start_server_with(
    dir: &Path,
    sink: Arc<MemSink>,
    tweak: impl FnOnce(&mut ServerConfig),
) -> LinkServer {
    init_log();
    let id = SiteIdentity::load(dir, "secondary").unwrap();
    let mut cfg = ServerConfig::new(id, "127.0.0.1:0".parse().unwrap());
    cfg.expected_peer = Some("primary".into());
    cfg.tuning = fast_tuning();
    cfg.handshake_timeout = Duration::from_secs(30);
    tweak(&mut cfg);
    LinkServer::start(cfg, sink).unwrap()
}

pub(super) fn client_cfg(dir: &Path, addr: SocketAddr, disk: DiskInfo) -> ClientConfig {
    let id = SiteIdentity::load(dir, "primary").unwrap();
    let mut cfg = ClientConfig::new(id, addr, "secondary", disk);
    cfg.bind = "127.0.0.1:0".parse().unwrap();
    cfg.tuning = fast_tuning();
    cfg.connect_timeout = Duration::from_secs(30);
    cfg.commit_timeout = Duration::from_secs(60);
    cfg
}

pub(super) fn pattern(index: u64, cg: u64, len: usize) -> Vec<u8> {
    drblk_testkit::rng::pattern(index << 20 ^ cg, len)
}

/// Waits (bounded) until `f` holds.
pub(super) fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn handshake_status_commit() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let sink = MemSink::new(DISK);
    let srv = start_server(dir.path(), sink.clone());
    let c = LinkClient::connect(client_cfg(dir.path(), srv.local_addr().unwrap(), DISK)).unwrap();
    assert_eq!(c.hello_ack().last_committed_cg, None);
    assert!(matches!(c.hello_ack().state, ReplicaState::Syncing { .. }));
    // A hang guard: a round trip on loopback, even under ptrace on a loaded machine.
    assert!(c.ping().unwrap() < Duration::from_secs(60));
    c.report_progress(3, 10).unwrap();
    for i in 0..8 {
        c.send_chunk(1, i, &pattern(i, 1, CHUNK as usize)).unwrap();
    }
    c.send_zero(1, 8).unwrap();
    c.commit(1, proto::now_unix_us()).unwrap();
    let st = c.status().unwrap();
    assert_eq!(st.last_committed_cg, Some(1));
    assert_eq!(
        st.state,
        ReplicaState::Consistent {
            cg: 1,
            frozen_at_unix_us: 0,
        }
    );
    assert_eq!(sink.st().image.len(), 9);
    assert_eq!(sink.st().progress, Some((3, 10)));
    assert_eq!(sink.st().image[&8], vec![0; CHUNK as usize]);
    // Argument checks.
    assert!(matches!(
        c.send_chunk(2, 256, &[0; 10]),
        Err(LinkError::InvalidArgument(_))
    ));
    assert!(matches!(
        c.send_chunk(2, 1, &[0; 10]),
        Err(LinkError::InvalidArgument(_))
    ));
    assert!(matches!(
        c.send_chunk(1, 1, &pattern(1, 1, CHUNK as usize)),
        Err(LinkError::InvalidArgument(_))
    ));
    assert!(matches!(c.commit(1, 0), Err(LinkError::InvalidArgument(_))));
    c.close();
    wait_for("disconnect", Duration::from_secs(60), || {
        sink.st().disconnects == 1
    });
    let s = srv.stats();
    assert_eq!((s.connections, s.commits, s.chunks), (1, 1, 9));
    // A second primary connects after the first left; it sees CG 1.
    let c2 = LinkClient::connect(client_cfg(dir.path(), srv.local_addr().unwrap(), DISK)).unwrap();
    assert_eq!(c2.hello_ack().last_committed_cg, Some(1));
    // While it is connected, a new connection of the same site (a restarted primary)
    // replaces it; what c2 staged is dropped, c3 goes on from CG 1.
    c2.send_chunk(2, 10, &pattern(10, 2, CHUNK as usize))
        .unwrap();
    let c3 = LinkClient::connect(client_cfg(dir.path(), srv.local_addr().unwrap(), DISK)).unwrap();
    assert_eq!(c3.hello_ack().last_committed_cg, Some(1));
    assert!(
        c2.commit(2, 0).is_err(),
        "the replaced session commits nothing"
    );
    c3.send_chunk(2, 11, &pattern(11, 2, CHUNK as usize))
        .unwrap();
    c3.commit(2, 0).unwrap();
    let st = sink.st();
    assert_eq!(st.last, Some(2));
    assert!(
        st.image.contains_key(&11) && !st.image.contains_key(&10),
        "only c3's chunk"
    );
    drop(st);
    srv.shutdown();
}

#[test]
fn a_group_of_two_disks_travels_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let second = DiskInfo {
        uuid: [9; 16],
        size: 8 * CHUNK as u64 + 512,
        chunk_size: CHUNK,
    };
    let sink = MemSink::group(vec![DISK, second]);
    let srv = start_server(dir.path(), sink.clone());
    let mut cfg = client_cfg(dir.path(), srv.local_addr().unwrap(), DISK);
    cfg.disks = vec![DISK, second];
    let c = LinkClient::connect(cfg.clone()).unwrap();
    assert_eq!(c.hello_ack().disks.len(), 2);
    // Chunk 3 of each disk, with different contents; disk 1's last chunk is short.
    c.send_extent(0, 1, 3, 1, &pattern(3, 1, CHUNK as usize))
        .unwrap();
    c.send_extent(1, 1, 3, 1, &pattern(3, 2, CHUNK as usize))
        .unwrap();
    c.send_extent(1, 1, 8, 1, &pattern(8, 2, 512)).unwrap();
    c.send_zero_extent(1, 1, 4, 2).unwrap();
    // Checked against the disk's own geometry: disk 1 has 9 chunks, there is no disk 2.
    for (disk, first) in [(1, 9), (2, 0)] {
        let r = c.send_extent(disk, 1, first, 1, &pattern(0, 0, CHUNK as usize));
        assert!(matches!(r, Err(LinkError::InvalidArgument(_))), "{r:?}");
    }
    c.commit(1, 0).unwrap();
    {
        let st = sink.st();
        let key = |disk: u64, chunk: u64| disk << 56 | chunk;
        assert_eq!(st.image[&key(0, 3)], pattern(3, 1, CHUNK as usize));
        assert_eq!(st.image[&key(1, 3)], pattern(3, 2, CHUNK as usize));
        assert_eq!(st.image[&key(1, 8)], pattern(8, 2, 512));
        assert_eq!(st.image[&key(1, 5)], vec![0; CHUNK as usize]);
        assert_eq!(st.image.len(), 5);
    }
    c.close();
    // The group must be the same: a primary of disk 0 alone is refused by this sink.
    let one = client_cfg(dir.path(), srv.local_addr().unwrap(), DISK);
    wait_for("the first session to end", Duration::from_secs(60), || {
        sink.st().disconnects == 1
    });
    assert!(matches!(
        LinkClient::connect(one),
        Err(LinkError::Rejected(_))
    ));
    // A group whose disks disagree on the chunk size is refused before any connection.
    cfg.disks[1].chunk_size = 2 * CHUNK;
    assert!(matches!(
        LinkClient::connect(cfg),
        Err(LinkError::InvalidArgument(_))
    ));
    srv.shutdown();
}

#[test]
fn wrong_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    make_certs(other.path());
    let sink = MemSink::new(DISK);
    let srv = start_server(dir.path(), sink.clone());
    let addr = srv.local_addr().unwrap();
    // Client certificate from another CA: the server refuses it.
    let mut cfg = client_cfg(dir.path(), addr, DISK);
    let foreign = SiteIdentity::load(other.path(), "primary").unwrap();
    cfg.identity.chain = foreign.chain;
    cfg.identity.key = foreign.key;
    let e = LinkClient::connect(cfg).unwrap_err();
    assert!(
        matches!(e, LinkError::Connect(_) | LinkError::LinkLost(_)),
        "{e}"
    );
    // Server certificate from another CA: the client refuses it.
    let mut cfg = client_cfg(dir.path(), addr, DISK);
    cfg.identity.ca = SiteIdentity::load(other.path(), "primary").unwrap().ca;
    let e = LinkClient::connect(cfg).unwrap_err();
    assert!(
        matches!(e, LinkError::Connect(ref m) if m.contains("UnknownIssuer")),
        "{e}"
    );
    // A certificate of the right CA but for the wrong site.
    let mut cfg = client_cfg(dir.path(), addr, DISK);
    cfg.identity = SiteIdentity::load(dir.path(), "secondary").unwrap();
    assert!(LinkClient::connect(cfg).is_err());
    wait_for("tls failures", Duration::from_secs(60), || {
        srv.stats().tls_failures >= 2
    });
    assert_eq!(sink.st().hellos, 0, "nothing may reach the sink");
    srv.shutdown();
}

/// A raw QUIC connection with real credentials (or none), for hand-made frames.
pub(super) struct Raw {
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) conn: Option<quinn::Connection>,
    pub(super) _ep: quinn::Endpoint,
}

/// A client TLS configuration with this site's certificate, or without any (a peer that
/// cannot authenticate).
pub(super) fn client_tls(id: &SiteIdentity, with_cert: bool) -> quinn::ClientConfig {
    let t = fast_tuning();
    if with_cert {
        return tls::client_config(id, &t).unwrap();
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.ca[0].clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(q))
}

pub(super) fn raw_connect(id: &SiteIdentity, addr: SocketAddr, with_cert: bool) -> Raw {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let t = fast_tuning();
    let cc = client_tls(id, with_cert);
    let (ep, conn) = rt.block_on(async {
        let ep = tls::endpoint("127.0.0.1:0".parse().unwrap(), None, &t).unwrap();
        let conn = tokio::time::timeout(
            Duration::from_secs(60),
            ep.connect_with(cc, addr, "secondary").unwrap(),
        )
        .await
        .unwrap()
        .ok();
        (ep, conn)
    });
    Raw { rt, conn, _ep: ep }
}

impl Raw {
    /// Opens the control stream, sends `bytes`, returns the first answer frame (if any)
    /// and whether the connection then got closed.
    pub(super) fn exchange(
        &self,
        bytes: Vec<u8>,
    ) -> (Option<Vec<u8>>, Option<quinn::ConnectionError>) {
        let Some(conn) = self.conn.clone() else {
            return (None, None);
        };
        self.rt.block_on(async move {
            let ans = async {
                let (mut s, mut r) = conn.open_bi().await.ok()?;
                s.write_all(&bytes).await.ok()?;
                let mut buf = Vec::new();
                match proto::read_frame(&mut r, &mut buf, 1 << 20).await {
                    Ok(true) => Some(buf),
                    _ => None,
                }
            };
            let ans = tokio::time::timeout(Duration::from_secs(60), ans)
                .await
                .ok()
                .flatten();
            let closed = tokio::time::timeout(Duration::from_secs(60), conn.closed())
                .await
                .ok();
            (ans, closed)
        })
    }
}

/// Handshakes on `raw` (Hello, HelloAck) and returns its control stream.
pub(super) fn raw_session(raw: &Raw) -> (quinn::SendStream, quinn::RecvStream) {
    raw_session_as(raw, "primary")
}

/// [`raw_session`] with a `Hello` from `site` (the certificate of `raw` must be for it).
pub(super) fn raw_session_as(raw: &Raw, site: &str) -> (quinn::SendStream, quinn::RecvStream) {
    let conn = raw.conn.clone().expect("connected");
    let hello = hello_frame_as(PROTOCOL_VERSION, DISK, site);
    raw.rt.block_on(async move {
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        s.write_all(&hello).await.unwrap();
        let mut buf = Vec::new();
        assert!(proto::read_frame(&mut r, &mut buf, 1 << 20).await.unwrap());
        assert!(matches!(
            proto::decode_payload(&buf).unwrap(),
            Message::HelloAck(_)
        ));
        (s, r)
    })
}

pub(super) fn hello_frame(version: u16, disk: DiskInfo) -> Vec<u8> {
    hello_frame_as(version, disk, "primary")
}

fn hello_frame_as(version: u16, disk: DiskInfo, site: &str) -> Vec<u8> {
    encode_frame(&Message::Hello(hello_of(version, disk, site))).unwrap()
}

/// The `Hello` a primary of `site` sends for `disk`.
fn hello_of(version: u16, disk: DiskInfo, site: &str) -> Hello {
    Hello {
        magic: proto::HELLO_MAGIC,
        protocol_version: version,
        disks: vec![proto::DiskDesc {
            uuid: disk.uuid,
            size: disk.size,
        }],
        chunk_size: disk.chunk_size,
        last_committed_cg: None,
        site: site.into(),
        lineage: None,
        unshipped: false,
    }
}

#[test]
fn client_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let sink = MemSink::new(DISK);
    let srv = start_server(dir.path(), sink.clone());
    let id = SiteIdentity::load(dir.path(), "primary").unwrap();
    let raw = raw_connect(&id, srv.local_addr().unwrap(), false);
    let (ans, _closed) = raw.exchange(hello_frame(PROTOCOL_VERSION, DISK));
    assert!(ans.is_none());
    wait_for("tls failure", Duration::from_secs(60), || {
        srv.stats().tls_failures >= 1
    });
    assert_eq!(sink.st().hellos, 0);
    srv.shutdown();
}

#[test]
fn mismatches_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let sink = MemSink::new(DISK);
    let srv = start_server(dir.path(), sink.clone());
    let addr = srv.local_addr().unwrap();
    // Version mismatch, via hand-made Hellos of the previous version (a peer not yet
    // upgraded: chunk-granular, v2) and of a future one.
    let id = SiteIdentity::load(dir.path(), "primary").unwrap();
    for theirs in [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
        let raw = raw_connect(&id, addr, true);
        let (ans, closed) = raw.exchange(hello_frame(theirs, DISK));
        let ans = ans.expect("a Reject frame");
        match proto::decode_payload(&ans).unwrap() {
            Message::Reject(r @ RejectReason::VersionMismatch { .. }) => {
                assert_eq!(
                    r,
                    RejectReason::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs
                    }
                );
                assert!(r.to_string().contains(&format!("primary v{theirs}")), "{r}");
            }
            m => panic!("unexpected {m:?}"),
        }
        assert!(matches!(
            closed,
            Some(quinn::ConnectionError::ApplicationClosed(_))
        ));
        assert_eq!(sink.st().hellos, 0, "version is checked before the sink");
        drop(raw);
    }
    // UUID, size and chunk size mismatches through the real client.
    for (disk, needle) in [
        (
            DiskInfo {
                uuid: [8; 16],
                ..DISK
            },
            "uuid mismatch",
        ),
        (
            DiskInfo {
                size: DISK.size * 2,
                ..DISK
            },
            "size mismatch",
        ),
        (
            DiskInfo {
                chunk_size: CHUNK * 2,
                ..DISK
            },
            "chunk size mismatch",
        ),
    ] {
        let e = LinkClient::connect(client_cfg(dir.path(), addr, disk)).unwrap_err();
        assert!(
            matches!(&e, LinkError::Rejected(r) if r.contains(needle)),
            "{e}"
        );
    }
    // A group of two disks, to a secondary that serves one: refused with what to do.
    let raw = raw_connect(&id, addr, true);
    let one = hello_of(PROTOCOL_VERSION, DISK, "primary");
    let two = Hello {
        disks: vec![one.disks[0], one.disks[0]],
        ..one
    };
    let (ans, _) = raw.exchange(encode_frame(&Message::Hello(two)).unwrap());
    match proto::decode_payload(&ans.expect("a Reject frame")).unwrap() {
        Message::Reject(RejectReason::Other(r)) => {
            assert!(
                r.contains("group of 2 disks") && r.contains("one secondary per disk"),
                "{r}"
            )
        }
        m => panic!("unexpected {m:?}"),
    }
    assert_eq!(
        srv.stats().rejected,
        6,
        "two versions, uuid, size, chunk size, two disks"
    );
    // The server still serves a correct primary.
    assert!(LinkClient::connect(client_cfg(dir.path(), addr, DISK)).is_ok());
    srv.shutdown();
}

#[test]
fn malformed_input_closes_the_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let sink = MemSink::new(DISK);
    let srv = start_server(dir.path(), sink.clone());
    let addr = srv.local_addr().unwrap();
    let id = SiteIdentity::load(dir.path(), "primary").unwrap();
    // Raw UDP garbage at the QUIC port.
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..50u8 {
        let _ = u.send_to(&[i; 1300], addr);
    }
    let good = hello_frame(PROTOCOL_VERSION, DISK);
    let mut bad_crc = good.clone();
    let n = bad_crc.len();
    bad_crc[n - 1] ^= 0xff;
    let mut oversize = vec![0xff, 0xff, 0xff, 0xff];
    oversize.extend_from_slice(&[0; 64]);
    let mut undecodable = 40u32.to_le_bytes().to_vec();
    let junk = vec![0xee; 40];
    undecodable.extend_from_slice(&junk);
    undecodable.extend_from_slice(&crc32c::crc32c(&junk).to_le_bytes());
    let not_hello = encode_frame(&Message::CommitAck { cg: 1 }).unwrap();
    for (name, bytes) in [
        ("bad crc", bad_crc),
        ("oversize", oversize),
        ("undecodable", undecodable),
        ("not a hello", not_hello),
    ] {
        let raw = raw_connect(&id, addr, true);
        let (ans, closed) = raw.exchange(bytes);
        assert!(ans.is_none(), "{name}");
        assert!(
            matches!(closed, Some(quinn::ConnectionError::ApplicationClosed(ref c)) if c.error_code == proto::close_code::PROTOCOL_ERROR.into()),
            "{name}: {closed:?}"
        );
    }
    // A bad frame on a data stream after a good handshake.
    let raw = raw_connect(&id, addr, true);
    let _ctrl = raw_session(&raw);
    let conn = raw.conn.clone().unwrap();
    let closed = raw.rt.block_on(async move {
        let mut u = conn.open_uni().await.unwrap();
        // An extent beyond the disk.
        let d = vec![1u8; CHUNK as usize];
        let f = encode_frame(&Message::Extent {
            disk: 0,
            cg: 1,
            first: 10_000,
            count: 1,
            payload: proto::WirePayload::Raw(&d),
        })
        .unwrap();
        u.write_all(&f).await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), conn.closed())
            .await
            .ok()
    });
    assert!(
        matches!(closed, Some(quinn::ConnectionError::ApplicationClosed(_))),
        "{closed:?}"
    );
    wait_for("session end", Duration::from_secs(60), || {
        sink.st().disconnects >= 1
    });
    // An extent or a checksum request for a disk the group does not have.
    for bad in [
        Message::Extent {
            disk: 1,
            cg: 1,
            first: 0,
            count: 1,
            payload: proto::WirePayload::Zero,
        },
        Message::ChecksumRequest {
            seq: 1,
            disk: 1,
            first: 0,
            count: 1,
        },
    ] {
        let raw = raw_connect(&id, addr, true);
        let (mut ctrl, _answers) = raw_session(&raw);
        let conn = raw.conn.clone().unwrap();
        let f = encode_frame(&bad).unwrap();
        let on_data = matches!(bad, Message::Extent { .. });
        let closed = raw.rt.block_on(async move {
            if on_data {
                let mut u = conn.open_uni().await.unwrap();
                u.write_all(&f).await.unwrap();
            } else {
                ctrl.write_all(&f).await.unwrap();
            }
            tokio::time::timeout(Duration::from_secs(60), conn.closed())
                .await
                .ok()
        });
        assert!(
            matches!(closed, Some(quinn::ConnectionError::ApplicationClosed(ref c)) if c.error_code == proto::close_code::PROTOCOL_ERROR.into()),
            "{}: {closed:?}",
            bad.kind()
        );
    }
    wait_for("sessions end", Duration::from_secs(60), || {
        sink.st().disconnects >= 3
    });
    assert!(sink.st().staged.is_empty() && sink.st().last.is_none());
    assert!(srv.stats().protocol_errors >= 6);
    // The server keeps serving.
    let c = LinkClient::connect(client_cfg(dir.path(), addr, DISK)).unwrap();
    c.send_chunk(1, 0, &pattern(0, 1, CHUNK as usize)).unwrap();
    c.commit(1, 0).unwrap();
    srv.shutdown();
}

#[test]
fn impaired_link_delivers_complete_cgs() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let sink = Arc::new(MemSink {
        disks: vec![DISK],
        commit_delay: Duration::from_millis(300),
        discard: false,
        st: Mutex::default(),
    });
    let srv = start_server(dir.path(), sink.clone());
    let proxy = ImpairProxy::start(srv.local_addr().unwrap()).unwrap();
    let h = proxy.handle();
    h.set_delay(Duration::from_millis(20), Duration::ZERO);
    h.set_loss(0.05);
    h.set_reorder(0.02, Duration::from_millis(5));
    let mut cfg = client_cfg(dir.path(), proxy.local_addr(), DISK);
    cfg.compress = true;
    cfg.tuning.idle_timeout = Duration::from_secs(10);
    // CUBIC collapses to ~150 kB/s at 5 % random loss (Mathis); BBR does not.
    cfg.tuning.congestion = Congestion::Bbr;
    let c = LinkClient::connect(cfg).unwrap();
    let mut expect: HashMap<u64, Vec<u8>> = HashMap::new();
    let t = Instant::now();
    for cg in 1..=3u64 {
        for i in (cg - 1) * 20..(cg - 1) * 20 + 40 {
            let mut d = pattern(i, cg, CHUNK as usize);
            if i % 5 == 0 {
                d[CHUNK as usize / 2..].fill(0); // compressible
            }
            c.send_chunk(cg, i, &d).unwrap();
            expect.insert(i, d);
        }
        c.commit(cg, proto::now_unix_us()).unwrap();
        let acked = Instant::now();
        let st = sink.st();
        let &(done_cg, done_at) = st.commit_done.last().unwrap();
        assert_eq!(done_cg, cg);
        assert!(done_at <= acked, "ack before the sink's commit returned");
        assert_eq!(st.image.len(), expect.len());
        for (i, d) in &expect {
            assert!(st.image[i] == *d, "chunk {i} differs after CG {cg}");
        }
    }
    let cs = c.stats();
    let ps = h.stats();
    eprintln!(
        "impaired: 100 chunks / 3 CGs in {:?}, rtt {:?}, quic lost {}, proxy {:?}, lz4 {}",
        t.elapsed(),
        cs.rtt,
        cs.lost_packets,
        ps,
        cs.compressed_chunks
    );
    assert!(ps.lost > 0 && ps.reordered > 0);
    assert!(cs.compressed_chunks >= 20);
    srv.shutdown();
}

/// A secondary that restarts (its endpoint gone without a word, as after `kill -9`, and a
/// new one on the same address with the same identity) ends the primary's old connection
/// with a stateless reset at the next packet, not after the idle timeout: the primary can
/// reconnect at once.
#[test]
fn a_restarted_secondary_resets_the_old_connection() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    // Both ends: only a reset can end the connection within the test.
    let long = Duration::from_secs(600);
    let srv = start_server_with(dir.path(), MemSink::new(DISK), |c| {
        c.tuning.idle_timeout = long
    });
    let addr = srv.local_addr().unwrap();
    let proxy = ImpairProxy::start(addr).unwrap();
    let h = proxy.handle();
    let mut cfg = client_cfg(dir.path(), proxy.local_addr(), DISK);
    cfg.tuning.idle_timeout = long;
    let c = LinkClient::connect(cfg.clone()).unwrap();
    c.send_chunk(1, 0, &pattern(0, 1, CHUNK as usize)).unwrap();
    c.commit(1, 0).unwrap();
    // The old secondary goes away: its close never reaches the primary.
    h.set_blackhole(true);
    srv.shutdown();
    // Its runtime lets go of the port in the background.
    wait_for(
        "the old endpoint's port to be free",
        Duration::from_secs(60),
        || std::net::UdpSocket::bind(addr).is_ok(),
    );
    let srv2 = start_server_with(dir.path(), MemSink::new(DISK), |c| {
        c.tuning.idle_timeout = long;
        c.listen = addr;
    });
    h.set_blackhole(false);
    // The primary's keep-alives and heartbeats reach the new endpoint, which answers each
    // with a reset. (The bound is a hang guard: without a valid reset nothing ends the
    // connection for 600 s.)
    wait_for(
        "the old connection to end",
        Duration::from_secs(120),
        || c.lost().is_some(),
    );
    let reason = c.lost().unwrap();
    assert!(reason.contains("restarted"), "{reason}");
    let c2 = LinkClient::connect(cfg).unwrap();
    c2.send_chunk(1, 0, &pattern(0, 1, CHUNK as usize)).unwrap();
    c2.commit(1, 0).unwrap();
    srv2.shutdown();
}

#[test]
fn blackhole_is_detected_then_link_recovers() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let sink = MemSink::new(DISK);
    let srv = start_server(dir.path(), sink.clone());
    let proxy = ImpairProxy::start(srv.local_addr().unwrap()).unwrap();
    let h = proxy.handle();
    let cfg = client_cfg(dir.path(), proxy.local_addr(), DISK);
    let idle = cfg.tuning.idle_timeout;
    let c = Arc::new(LinkClient::connect(cfg.clone()).unwrap());
    c.send_chunk(1, 0, &pattern(0, 1, CHUNK as usize)).unwrap();
    c.commit(1, 0).unwrap();
    // Load: a thread sending chunks until the link breaks.
    let c2 = c.clone();
    let loader = std::thread::spawn(move || {
        let d = pattern(1, 2, CHUNK as usize);
        let mut i = 0u64;
        loop {
            if let Err(e) = c2.send_chunk(2, i % 256, &d) {
                return (Instant::now(), e);
            }
            i += 1;
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    h.set_blackhole(true);
    let (t_err, err) = loader.join().unwrap();
    let detected = t_err.duration_since(t0);
    eprintln!("blackhole detected after {detected:?} (idle timeout {idle:?}): {err}");
    assert!(matches!(err, LinkError::LinkLost(_)), "{err}");
    // Detection is by the idle timeout; the margin is a hang guard, not a speed target.
    assert!(detected <= idle + Duration::from_secs(30), "{detected:?}");
    assert!(matches!(c.commit(2, 0), Err(LinkError::LinkLost(_))));
    assert!(matches!(c.status(), Err(LinkError::LinkLost(_))));
    // The secondary abandons the partial CG when it notices.
    wait_for("server-side loss", idle + Duration::from_secs(60), || {
        sink.st().disconnects == 1
    });
    assert_eq!(sink.st().last, Some(1));
    // Restore: a new connection works and starts from CG 1.
    h.set_blackhole(false);
    let c3 = LinkClient::connect(cfg).unwrap();
    assert_eq!(c3.hello_ack().last_committed_cg, Some(1));
    c3.send_chunk(2, 5, &pattern(5, 2, CHUNK as usize)).unwrap();
    c3.commit(2, 0).unwrap();
    srv.shutdown();
}

#[test]
fn rate_limit_bounds_throughput() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let sink = MemSink::new(DISK);
    let srv = start_server(dir.path(), sink.clone());
    let mut cfg = client_cfg(dir.path(), srv.local_addr().unwrap(), DISK);
    cfg.max_rate = Some(4 << 20);
    let c = LinkClient::connect(cfg).unwrap();
    let d = pattern(1, 1, CHUNK as usize);
    let t = Instant::now();
    for i in 0..128 {
        c.send_chunk(1, i, &d).unwrap(); // 8 MiB at 4 MiB/s, 0.4 MiB burst
    }
    c.commit(1, 0).unwrap();
    let s = t.elapsed().as_secs_f64();
    // At least (8 MiB - one burst of about 1 MiB) / 4 MiB/s; the upper bound is a hang guard.
    assert!(s > 1.6 && s < 60.0, "{s}");
    srv.shutdown();
}

/// `cargo test --release -- --ignored throughput --nocapture`
#[test]
#[ignore]
fn throughput_loopback() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let disk = DiskInfo {
        uuid: [1; 16],
        size: 16 << 30,
        chunk_size: CHUNK,
    };
    let sink = Arc::new(MemSink {
        disks: vec![disk],
        commit_delay: Duration::ZERO,
        discard: true,
        st: Mutex::default(),
    });
    let srv = start_server(dir.path(), sink);
    for (round, (streams, mtu)) in [(4usize, 1452u16), (1, 1452), (4, 9000)]
        .into_iter()
        .enumerate()
    {
        let cg = round as u64 + 1;
        let mut cfg = client_cfg(dir.path(), srv.local_addr().unwrap(), disk);
        cfg.data_streams = streams;
        cfg.detect_zero = false;
        cfg.tuning.mtu_upper_bound = mtu;
        let c = LinkClient::connect(cfg).unwrap();
        let d = pattern(3, 3, CHUNK as usize);
        let total: u64 = 2 << 30;
        let n = total / CHUNK as u64;
        let t = Instant::now();
        for i in 0..n {
            c.send_chunk(cg, i, &d).unwrap();
        }
        c.commit(cg, 0).unwrap();
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "QUIC loopback ceiling: {streams} streams, MTU bound {mtu}: {:.0} MB/s ({:.0} MiB/s), {n} x 64 KiB in {s:.2} s",
            total as f64 / s / 1e6,
            total as f64 / s / (1 << 20) as f64
        );
        c.close();
        std::thread::sleep(Duration::from_millis(300));
    }
    srv.shutdown();
}
