//! A loopback UDP impairment proxy for tests: delay, jitter, loss, reordering, blackhole.
//!
//! The proxy listens on a local port for one client (the QUIC endpoint of the primary; the
//! most recent sender address is the client) and relays datagrams to and from an upstream
//! address (the secondary) through a second socket. Every datagram in either direction is
//! subjected to the current [`Impairment`], which tests change at run time through an
//! [`ImpairHandle`]. Queues are bounded (packets beyond [`QUEUE_PACKETS`] per direction are
//! dropped like a full router queue), so the proxy's memory is bounded too.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Most datagrams queued per direction.
pub const QUEUE_PACKETS: usize = 16384;

/// The impairment applied to every datagram.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// One-way delay added to every datagram.
    pub delay: Duration,
    /// Extra uniformly random delay in `[0, jitter)` (reorders packets when large).
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a datagram is dropped.
    pub loss: f64,
    /// Probability in `[0, 1]` that a datagram is held back by `reorder_delay` extra.
    pub reorder: f64,
    /// Extra delay of a reordered datagram.
    pub reorder_delay: Duration,
    /// Drop every datagram in both directions.
    pub blackhole: bool,
}

/// Counters of a proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImpairStats {
    /// Datagrams relayed.
    pub forwarded: u64,
    /// Datagrams dropped by random loss.
    pub lost: u64,
    /// Datagrams dropped by the blackhole.
    pub blackholed: u64,
    /// Datagrams held back for reordering.
    pub reordered: u64,
    /// Datagrams dropped because a queue was full.
    pub overflowed: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    lost: AtomicU64,
    blackholed: AtomicU64,
    reordered: AtomicU64,
    overflowed: AtomicU64,
}

struct Shared {
    imp: Mutex<Impairment>,
    counters: Counters,
    client: Mutex<Option<SocketAddr>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Controls a running [`ImpairProxy`]; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ImpairHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ImpairHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImpairHandle")
            .field("impairment", &self.get())
            .finish()
    }
}

impl ImpairHandle {
    /// Replaces the whole impairment.
    pub fn set(&self, imp: Impairment) {
        *lock(&self.shared.imp) = imp;
    }

    /// The current impairment.
    pub fn get(&self) -> Impairment {
        *lock(&self.shared.imp)
    }

    /// Sets the one-way delay and jitter.
    pub fn set_delay(&self, delay: Duration, jitter: Duration) {
        let mut i = lock(&self.shared.imp);
        i.delay = delay;
        i.jitter = jitter;
    }

    /// Sets the loss probability (clamped to `[0, 1]`).
    pub fn set_loss(&self, p: f64) {
        lock(&self.shared.imp).loss = p.clamp(0.0, 1.0);
    }

    /// Sets the reordering probability and the extra delay of a reordered datagram.
    pub fn set_reorder(&self, p: f64, extra: Duration) {
        let mut i = lock(&self.shared.imp);
        i.reorder = p.clamp(0.0, 1.0);
        i.reorder_delay = extra;
    }

    /// Starts or ends a blackhole (drop everything, both directions).
    pub fn set_blackhole(&self, on: bool) {
        lock(&self.shared.imp).blackhole = on;
    }

    /// Counters.
    pub fn stats(&self) -> ImpairStats {
        let c = &self.shared.counters;
        ImpairStats {
            forwarded: c.forwarded.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            blackholed: c.blackholed.load(Ordering::Relaxed),
            reordered: c.reordered.load(Ordering::Relaxed),
            overflowed: c.overflowed.load(Ordering::Relaxed),
        }
    }
}

/// A running impairment proxy (owns a one-thread runtime; stops when dropped).
pub struct ImpairProxy {
    rt: Option<tokio::runtime::Runtime>,
    local: SocketAddr,
    handle: ImpairHandle,
}

impl std::fmt::Debug for ImpairProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImpairProxy")
            .field("local", &self.local)
            .finish()
    }
}

struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Rng(t | 1)
    }

    /// Uniform in `[0, 1)` (xorshift64*).
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn udp_socket(bind: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let e = |e: std::io::Error| std::io::Error::other(format!("impair proxy socket: {e}"));
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP)).map_err(e)?;
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.set_nonblocking(true).map_err(e)?;
    s.bind(&bind.into()).map_err(e)?;
    UdpSocket::from_std(s.into()).map_err(e)
}

/// Decides the fate of one datagram: `None` to drop it, else its delay.
fn judge(shared: &Shared, rng: &mut Rng) -> Option<Duration> {
    let imp = *lock(&shared.imp);
    let c = &shared.counters;
    if imp.blackhole {
        c.blackholed.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    if imp.loss > 0.0 && rng.next_f64() < imp.loss {
        c.lost.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let mut d = imp.delay;
    if !imp.jitter.is_zero() {
        d += imp.jitter.mul_f64(rng.next_f64());
    }
    if imp.reorder > 0.0 && rng.next_f64() < imp.reorder {
        c.reordered.fetch_add(1, Ordering::Relaxed);
        d += imp.reorder_delay;
    }
    Some(d)
}

type Packet = (Instant, Vec<u8>);

/// Sends queued datagrams at their due time. `to` is `None` for the connected upstream
/// socket, else the client address is looked up per datagram.
async fn sender(
    shared: Arc<Shared>,
    sock: Arc<UdpSocket>,
    to_client: bool,
    mut rx: mpsc::Receiver<Packet>,
) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let next = heap.peek().map(|Reverse((t, _, _))| *t);
        tokio::select! {
            p = rx.recv() => match p {
                Some((due, data)) => { seq += 1; heap.push(Reverse((due, seq, data))); }
                None => return,
            },
            _ = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending::<()>().await,
                }
            } => {
                let now = Instant::now();
                while heap.peek().is_some_and(|Reverse((t, _, _))| *t <= now) {
                    let Some(Reverse((_, _, data))) = heap.pop() else { break };
                    if lock(&shared.imp).blackhole {
                        shared.counters.blackholed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let r = if to_client {
                        let addr = *lock(&shared.client);
                        match addr {
                            Some(a) => sock.send_to(&data, a).await,
                            None => continue,
                        }
                    } else {
                        sock.send(&data).await
                    };
                    if r.is_ok() {
                        shared.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// Receives datagrams on `sock` and queues them for the other direction.
async fn receiver(
    shared: Arc<Shared>,
    sock: Arc<UdpSocket>,
    from_client: bool,
    tx: mpsc::Sender<Packet>,
) {
    let mut rng = Rng::seeded();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => {
                // ICMP errors (port unreachable) surface here on Linux; keep going.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        if from_client {
            *lock(&shared.client) = Some(from);
        }
        let Some(delay) = judge(&shared, &mut rng) else {
            continue;
        };
        if tx
            .try_send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            shared.counters.overflowed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl ImpairProxy {
    /// Starts a proxy on `127.0.0.1:0` relaying to `upstream`.
    pub fn start(upstream: SocketAddr) -> std::io::Result<ImpairProxy> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("drblk-impair")
            .enable_all()
            .build()
            .map_err(|e| std::io::Error::other(format!("tokio runtime: {e}")))?;
        let shared = Arc::new(Shared {
            imp: Mutex::new(Impairment::default()),
            counters: Counters::default(),
            client: Mutex::new(None),
        });
        let local_ip: SocketAddr = if upstream.is_ipv6() {
            SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], 0))
        } else {
            SocketAddr::from(([127, 0, 0, 1], 0))
        };
        let (front, back, local) = {
            let _g = rt.enter();
            let front = Arc::new(udp_socket(local_ip)?);
            let back = udp_socket(local_ip)?;
            rt.block_on(back.connect(upstream))
                .map_err(|e| std::io::Error::other(format!("impair proxy connect: {e}")))?;
            let local = front
                .local_addr()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            (front, Arc::new(back), local)
        };
        let (up_tx, up_rx) = mpsc::channel(QUEUE_PACKETS);
        let (down_tx, down_rx) = mpsc::channel(QUEUE_PACKETS);
        rt.spawn(receiver(shared.clone(), front.clone(), true, up_tx));
        rt.spawn(sender(shared.clone(), back.clone(), false, up_rx));
        rt.spawn(receiver(shared.clone(), back, false, down_tx));
        rt.spawn(sender(shared.clone(), front, true, down_rx));
        Ok(ImpairProxy {
            rt: Some(rt),
            local,
            handle: ImpairHandle { shared },
        })
    }

    /// The address clients connect to instead of the upstream.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A handle to change the impairment at run time.
    pub fn handle(&self) -> ImpairHandle {
        self.handle.clone()
    }
}

impl Drop for ImpairProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
