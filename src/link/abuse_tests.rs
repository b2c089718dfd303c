//! Abusive peers against a real link server (issue: untrusted input): a peer with valid
//! credentials that handshakes and then stalls, a flood of connection attempts, a peer
//! that opens group after group without committing, and replayed or reordered commits.
//! A legitimate primary must still get through, the secondary's memory stays bounded (at
//! most `MAX_OPEN_CGS` open groups per session), and the sink never commits anything that
//! was not a valid commit.

use std::sync::Arc;
use std::time::Duration;

use super::proto::{self, encode_frame, Message, WirePayload};
use super::tests::{
    client_cfg, client_tls, fast_tuning, make_certs, pattern, raw_connect, raw_session,
    raw_session_as, start_server_with, wait_for, MemSink, Raw, CHUNK, DISK,
};
use super::*;

/// How `raw`'s connection ended (bounded wait).
fn closed(raw: &Raw) -> Option<quinn::ConnectionError> {
    let conn = raw.conn.clone().expect("connected");
    raw.rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(120), conn.closed())
            .await
            .ok()
    })
}

fn protocol_error(e: &Option<quinn::ConnectionError>) -> bool {
    matches!(e, Some(quinn::ConnectionError::ApplicationClosed(c))
        if c.error_code == proto::close_code::PROTOCOL_ERROR.into())
}

/// A link server on a memory sink, in a directory with both sites' certificates.
struct Setup {
    dir: tempfile::TempDir,
    sink: Arc<MemSink>,
    srv: LinkServer,
    addr: std::net::SocketAddr,
    id: SiteIdentity,
}

fn setup(tweak: impl FnOnce(&mut server::ServerConfig)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let sink = MemSink::new(DISK);
    let srv = start_server_with(dir.path(), sink.clone(), tweak);
    let addr = srv.local_addr().unwrap();
    let id = SiteIdentity::load(dir.path(), "primary").unwrap();
    Setup {
        dir,
        sink,
        srv,
        addr,
        id,
    }
}

/// Reads the secondary's next answer on the control stream: it must be `want`.
async fn expect_answer(answers: &mut quinn::RecvStream, want: Message<'_>) {
    let mut buf = Vec::new();
    assert!(proto::read_frame(answers, &mut buf, 1 << 20).await.unwrap());
    assert_eq!(proto::decode_payload(&buf).unwrap(), want);
}

fn commit_frame(cg: u64, extent_count: u64) -> Vec<u8> {
    encode_frame(&Message::Commit {
        cg,
        frozen_at_unix_us: 0,
        extent_count,
    })
    .unwrap()
}

#[test]
fn a_peer_that_handshakes_then_stalls_is_closed_and_a_primary_gets_through() {
    // Heartbeats every 200 ms (fast_tuning) against 3 s of allowed silence: 15x margin.
    // The server takes any site, so that the stalled peer can be of another site than the
    // primary (a primary's own new connection replaces its old session at once: below).
    let t = setup(|c| {
        c.silence_timeout = Duration::from_secs(3);
        c.expected_peer = None;
    });
    let other = SiteIdentity::load(t.dir.path(), "other").unwrap();
    let raw = raw_connect(&other, t.addr, true);
    let (mut ctrl, _answers) = raw_session_as(&raw, "other");
    // The peer sends heartbeats until the primary below was refused, then stalls (its
    // control stream held open, its QUIC keep-alives going on): the refusal cannot race
    // the silence limit however slow the machine.
    let (stall, mut stalled) = tokio::sync::watch::channel(false);
    raw.rt.spawn(async move {
        let beat = encode_frame(&Message::Heartbeat {
            seq: 1,
            sent_at_unix_us: 0,
        })
        .unwrap();
        while !*stalled.borrow() {
            if ctrl.write_all(&beat).await.is_err() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), stalled.changed()).await;
        }
        std::future::pending::<()>().await;
        drop(ctrl);
    });
    // While it holds the secondary (one primary at a time), another site is refused...
    let e = LinkClient::connect(client_cfg(t.dir.path(), t.addr, DISK)).unwrap_err();
    assert!(
        matches!(&e, LinkError::Rejected(r) if r.contains("already serves")),
        "{e}"
    );
    stall.send(true).unwrap();
    // ...until the silent session is closed: the stalled peer's QUIC keep-alives do not
    // count as being alive.
    let end = closed(&raw);
    assert!(
        matches!(&end, Some(quinn::ConnectionError::ApplicationClosed(c)) if &c.reason[..] == b"silent for too long"),
        "{end:?}"
    );
    let mut client = None;
    wait_for("a primary to get through", Duration::from_secs(120), || {
        client = LinkClient::connect(client_cfg(t.dir.path(), t.addr, DISK)).ok();
        client.is_some()
    });
    let c = client.unwrap();
    // An idle primary is not silent: its heartbeats keep it connected past the limit.
    std::thread::sleep(Duration::from_secs(4));
    c.send_chunk(1, 0, &pattern(0, 1, CHUNK as usize)).unwrap();
    c.commit(1, 0).unwrap();
    assert_eq!(t.sink.st().last, Some(1));
    t.srv.shutdown();
}

/// A primary that restarted (or lost its link without the secondary noticing) connects
/// again while its old session still holds the secondary: the new connection replaces the
/// old session at once, instead of being refused as busy until the old one times out. What
/// the old session staged is not part of the new one's groups.
#[test]
fn a_new_connection_of_the_same_site_replaces_its_stale_session_at_once() {
    // No silence limit and no idle timeout can end the stale session during the test.
    let t = setup(|c| c.silence_timeout = Duration::from_secs(3600));
    let raw = raw_connect(&t.id, t.addr, true);
    let (_ctrl, _answers) = raw_session(&raw);
    let conn = raw.conn.clone().unwrap();
    raw.rt.block_on(async {
        let mut data = conn.open_uni().await.unwrap();
        let frame = encode_frame(&Message::Extent {
            disk: 0,
            cg: 1,
            first: 5,
            count: 1,
            payload: WirePayload::Raw(&pattern(5, 1, CHUNK as usize)),
        })
        .unwrap();
        data.write_all(&frame).await.unwrap();
        std::mem::forget(data); // held open: the stale peer just stops
    });
    wait_for(
        "the stale session's extent",
        Duration::from_secs(120),
        || t.sink.st().staged.contains_key(&5),
    );
    let c = LinkClient::connect(client_cfg(t.dir.path(), t.addr, DISK)).unwrap();
    let end = closed(&raw);
    assert!(
        matches!(&end, Some(quinn::ConnectionError::ApplicationClosed(c)) if &c.reason[..] == b"replaced by a new connection from the same site"),
        "{end:?}"
    );
    c.send_chunk(1, 0, &pattern(0, 1, CHUNK as usize)).unwrap();
    c.commit(1, 0).unwrap();
    let st = t.sink.st();
    assert_eq!(st.last, Some(1));
    assert!(
        st.image.contains_key(&0) && !st.image.contains_key(&5),
        "only the new session's chunk"
    );
    drop(st);
    t.srv.shutdown();
}

/// One site runs a primary per disk, all with the site's certificate: a primary pointed at
/// another disk's secondary must be refused as busy, never cut that disk's session.
#[test]
fn a_primary_of_the_same_site_for_another_disk_does_not_replace_the_session() {
    let t = setup(|_| {});
    let c = LinkClient::connect(client_cfg(t.dir.path(), t.addr, DISK)).unwrap();
    let other = DiskInfo {
        uuid: [9; 16],
        ..DISK
    };
    let e = LinkClient::connect(client_cfg(t.dir.path(), t.addr, other)).unwrap_err();
    assert!(
        matches!(&e, LinkError::Rejected(r) if r.contains("already serves")),
        "{e}"
    );
    c.send_chunk(1, 0, &pattern(0, 1, CHUNK as usize)).unwrap();
    c.commit(1, 0).unwrap();
    assert_eq!(t.sink.st().last, Some(1));
    assert_eq!(t.sink.st().disconnects, 0, "the served session went on");
    t.srv.shutdown();
}

#[test]
fn a_flood_of_connection_attempts_does_not_keep_a_primary_out() {
    let t = setup(|_| {});
    // Attempts without a client certificate, 64 in flight at a time (the server handshakes
    // at most 16 at once and refuses the rest), until the primary got through: it gets
    // through during the flood by construction.
    let (id, addr) = (t.id.clone(), t.addr);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = done.clone();
    let flood = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let cc = client_tls(&id, false);
            let ep = tls::endpoint("127.0.0.1:0".parse().unwrap(), None, &fast_tuning()).unwrap();
            let mut set = tokio::task::JoinSet::new();
            let mut attempts = 0u64;
            while !flooding.load(std::sync::atomic::Ordering::SeqCst) || attempts < 100 {
                attempts += 1;
                while set.len() >= 64 {
                    set.join_next().await;
                }
                let connecting = ep.connect_with(cc.clone(), addr, "secondary").unwrap();
                set.spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(30), connecting).await;
                });
            }
            while set.join_next().await.is_some() {}
            attempts
        })
    });
    let mut client = None;
    wait_for(
        "a primary to get through the flood",
        Duration::from_secs(120),
        || {
            client = LinkClient::connect(client_cfg(t.dir.path(), t.addr, DISK)).ok();
            client.is_some()
        },
    );
    let c = client.unwrap();
    c.send_chunk(1, 0, &pattern(0, 1, CHUNK as usize)).unwrap();
    c.commit(1, 0).unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let attempts = flood.join().unwrap();
    assert!(attempts >= 100, "{attempts} attempts");
    assert!(t.srv.stats().tls_failures >= 1, "the flood was refused");
    assert_eq!(t.sink.st().last, Some(1), "the primary's group committed");
    t.srv.shutdown();
}

#[test]
fn replayed_and_reordered_commits_are_refused_and_commit_nothing() {
    let t = setup(|_| {});
    let data = pattern(3, 1, CHUNK as usize);

    // CG 1 commits, then the same commit again: refused, the session closed.
    let raw = raw_connect(&t.id, t.addr, true);
    let (mut ctrl, mut answers) = raw_session(&raw);
    let conn = raw.conn.clone().unwrap();
    let d = data.clone();
    // The control stream stays open (returned): its end would close the session normally.
    let _held = raw.rt.block_on(async move {
        let mut u = conn.open_uni().await.unwrap();
        let ext = Message::Extent {
            disk: 0,
            cg: 1,
            first: 0,
            count: 1,
            payload: WirePayload::Raw(&d),
        };
        u.write_all(&encode_frame(&ext).unwrap()).await.unwrap();
        ctrl.write_all(&commit_frame(1, 1)).await.unwrap();
        expect_answer(&mut answers, Message::CommitAck { cg: 1 }).await;
        ctrl.write_all(&commit_frame(1, 0)).await.unwrap();
        (ctrl, answers)
    });
    assert!(protocol_error(&closed(&raw)), "a replayed commit closes");
    wait_for("the session to end", Duration::from_secs(60), || {
        t.sink.st().disconnects >= 1
    });

    // A later group, then an earlier one: the earlier is refused.
    let raw = raw_connect(&t.id, t.addr, true);
    let (mut ctrl, mut answers) = raw_session(&raw);
    let _held = raw.rt.block_on(async move {
        ctrl.write_all(&commit_frame(3, 0)).await.unwrap();
        expect_answer(&mut answers, Message::CommitAck { cg: 3 }).await;
        ctrl.write_all(&commit_frame(2, 0)).await.unwrap();
        (ctrl, answers)
    });
    assert!(protocol_error(&closed(&raw)), "a reordered commit closes");
    let commits: Vec<u64> = t.sink.st().commit_done.iter().map(|c| c.0).collect();
    assert_eq!(commits, [1, 3], "only the valid commits reached the sink");
    assert_eq!(t.sink.st().image.get(&0), Some(&data));
    t.srv.shutdown();
}

#[test]
fn a_peer_that_never_commits_is_bounded_and_changes_nothing() {
    let t = setup(|_| {});
    let raw = raw_connect(&t.id, t.addr, true);
    let _ctrl = raw_session(&raw);
    let conn = raw.conn.clone().unwrap();
    // Valid-looking extents, each for a new group, never committed: past 4096 open
    // groups the session is closed.
    raw.rt.block_on(async move {
        let mut u = conn.open_uni().await.unwrap();
        for cg in 1..=5000u64 {
            let ext = Message::Extent {
                disk: 0,
                cg,
                first: cg % 256,
                count: 1,
                payload: WirePayload::Zero,
            };
            if u.write_all(&encode_frame(&ext).unwrap()).await.is_err() {
                break;
            }
        }
    });
    assert!(
        protocol_error(&closed(&raw)),
        "an endless open group closes"
    );
    wait_for("the session to end", Duration::from_secs(60), || {
        t.sink.st().disconnects >= 1
    });
    let st = t.sink.st();
    assert!(st.commit_done.is_empty(), "nothing committed");
    assert!(st.image.is_empty(), "the replica unchanged");
    drop(st);
    // And the server still serves a primary.
    let c = LinkClient::connect(client_cfg(t.dir.path(), t.addr, DISK)).unwrap();
    c.send_chunk(1, 0, &pattern(0, 1, CHUNK as usize)).unwrap();
    c.commit(1, 0).unwrap();
    t.srv.shutdown();
}
