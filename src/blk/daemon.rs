//! Socket and daemon lifecycle: bind the socket safely, serve one frontend connection after
//! another with a fresh per-connection backend, and shut down cleanly on request.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::blk::device::{BlkBackend, DeviceShared};

/// Errors of the socket/daemon layer.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// Another process is serving on the socket.
    #[error(
        "{0} is in use by a running daemon (lock {1} is held); stop it or pick another --socket"
    )]
    InUse(PathBuf, PathBuf),
    /// Something answers on the socket path, though no drblk lock is held.
    #[error("something is listening on {0}; refusing to replace a live socket")]
    LiveSocket(PathBuf),
    /// Socket setup failed.
    #[error("cannot set up socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// vhost-user-backend reported an error.
    #[error("vhost-user daemon error: {0}")]
    Vhost(String),
}

/// A cloneable flag that stops the daemon: set it, and the accept loop and the current
/// connection end; the workers finish the requests they hold first.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

#[derive(Default)]
struct ShutdownInner {
    requested: AtomicBool,
    current: Mutex<Option<ShutdownHandle>>,
}

impl Shutdown {
    /// Asks the daemon to stop.
    pub fn request(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        if let Some(h) = self.inner.current.lock().expect("shutdown lock").as_ref() {
            h.shutdown();
        }
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    fn set_current(&self, h: Option<ShutdownHandle>) {
        let mut cur = self.inner.current.lock().expect("shutdown lock");
        *cur = h;
        // A request that came between accept and here must still end this connection.
        if self.requested() {
            if let Some(h) = cur.as_ref() {
                h.shutdown();
            }
        }
    }
}

/// The lock file that makes a socket path ours, taken before anything else of the daemon is
/// set up (its control socket, SOCKET.ctl, belongs to whoever holds it), and before the
/// socket listens: a frontend that can connect finds the daemon fully started.
pub struct SocketLock {
    path: PathBuf,
    lock_path: PathBuf,
    lock: File,
}

impl SocketLock {
    /// Takes `path`'s lock file. Refuses when another daemon holds it or something answers
    /// on the socket; a stale socket file is replaced later, by [`SocketLock::bind`].
    pub fn acquire(path: &Path) -> Result<Self, DaemonError> {
        let sock_err = |source| DaemonError::Socket {
            path: path.to_owned(),
            source,
        };
        let lock_path = lock_path_for(path);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(sock_err)?;
        if !crate::sys::file::try_lock_exclusive(&lock).map_err(sock_err)? {
            return Err(DaemonError::InUse(path.to_owned(), lock_path));
        }
        lock.set_len(0).map_err(sock_err)?;
        writeln!(&lock, "{}", std::process::id()).map_err(sock_err)?;
        if path.exists() && UnixStream::connect(path).is_ok() {
            return Err(DaemonError::LiveSocket(path.to_owned()));
        }
        Ok(SocketLock {
            path: path.to_owned(),
            lock_path,
            lock,
        })
    }

    /// Binds and listens on the locked path with permissions `mode`, replacing a stale
    /// socket file.
    pub fn bind(self, mode: u32) -> Result<BoundSocket, DaemonError> {
        let path = self.path.as_path();
        let sock_err = |source| DaemonError::Socket {
            path: path.to_owned(),
            source,
        };
        if path.exists() {
            tracing::info!(socket = %path.display(), "replacing stale socket file");
            std::fs::remove_file(path).map_err(sock_err)?;
        }
        // Bind under a restrictive umask so the socket is never reachable with wider
        // permissions, then set the requested mode.
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let ul = bound.map_err(sock_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(sock_err)?;
        let raw_fd = ul.as_raw_fd();
        Ok(BoundSocket {
            listener: Listener::from(ul),
            raw_fd,
            path: self.path,
            lock_path: self.lock_path,
            _lock: self.lock,
        })
    }
}

/// A bound vhost-user socket plus the lock file that makes it ours.
pub struct BoundSocket {
    listener: Listener,
    raw_fd: i32,
    path: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl BoundSocket {
    /// Locks, binds and listens on `path` with permissions `mode` (see [`SocketLock`]).
    pub fn bind(path: &Path, mode: u32) -> Result<Self, DaemonError> {
        SocketLock::acquire(path)?.bind(mode)
    }

    /// Waits up to `timeout` for a connection to be pending.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.raw_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(r > 0)
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

fn lock_path_for(sock: &Path) -> PathBuf {
    let mut p = sock.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Serves frontends on `socket` one connection after another until `shutdown` is requested.
pub fn serve(
    shared: Arc<DeviceShared>,
    mut socket: BoundSocket,
    shutdown: Shutdown,
) -> Result<(), DaemonError> {
    tracing::info!(socket = %socket.path.display(), "waiting for a vhost-user frontend");
    while !shutdown.requested() {
        match socket.wait_readable(Duration::from_millis(200)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(source) => {
                return Err(DaemonError::Socket {
                    path: socket.path.clone(),
                    source,
                })
            }
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
        let backend = Arc::new(
            BlkBackend::new(shared.clone(), mem.clone())
                .map_err(|e| DaemonError::Vhost(e.to_string()))?,
        );
        let mut daemon = VhostUserDaemon::new("drblk".into(), backend, mem)
            .map_err(|e| DaemonError::Vhost(e.to_string()))?;
        if let Err(e) = daemon.start(&mut socket.listener) {
            tracing::warn!(error = %e, "failed to accept a frontend; waiting for the next one");
            continue;
        }
        let n = shared.stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(connection = n, "frontend connected");
        shared.stats.frontends.fetch_add(1, Ordering::SeqCst);
        shutdown.set_current(daemon.shutdown_handle());
        let result = daemon.wait();
        shutdown.set_current(None);
        // Dropping the daemon stops the queue workers after the requests they hold.
        drop(daemon);
        shared.stats.frontends.fetch_sub(1, Ordering::SeqCst);
        if let Some(engine) = shared.executor.tracking() {
            // Completions held for the gone connection are dropped: the frontend restarts
            // each ring at its used index and resubmits those requests.
            for q in 0..usize::from(shared.limits.num_queues) {
                engine.set_publisher(q, None);
                let n = engine.discard_held(q);
                if n > 0 {
                    tracing::info!(
                        queue = q,
                        requests = n,
                        "dropped completions held for the disconnected frontend"
                    );
                }
            }
        }
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!(connection = n, "frontend disconnected"),
            Err(e) => {
                tracing::warn!(connection = n, error = %e, "frontend connection ended with an error")
            }
        }
        if let Err(e) = shared.executor.disk().flush() {
            tracing::error!(error = %e, "flushing the image after disconnect failed");
        }
    }
    tracing::info!("shutting down");
    shared
        .executor
        .disk()
        .flush()
        .map_err(|source| DaemonError::Socket {
            path: socket.path.clone(),
            source,
        })?;
    Ok(())
}

/// Blocks SIGINT/SIGTERM in the calling thread (call before spawning any thread, so all
/// inherit the mask) and starts a thread that turns them into `shutdown.request()`.
pub fn install_signal_handler(shutdown: Shutdown) -> io::Result<()> {
    // SAFETY: plain sigset manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    };
    // SAFETY: blocking signals for this thread; threads spawned later inherit the mask.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    std::thread::Builder::new()
        .name("drblk-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid signal set and `sig` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                tracing::info!(
                    signal = sig,
                    "signal received, stopping after in-flight requests"
                );
                shutdown.request();
            }
        })?;
    Ok(())
}
