//! QEMU guest harness for drblk integration tests (`drblk_testkit::vm`).
//!
//! ```ignore
//! let out = vm::VmBuilder::new()
//!     .disk(&socket_path)                       // vhost-user-blk, 2 queues, reconnect=1
//!     .job(r#"
//!         drblk_wait_dev vda || exit 1
//!         drblk_value size $(cat /sys/block/vda/size)
//!         drblk_section fio fio --name=w --filename=/dev/vda --ioengine=libaio --direct=1 \
//!             --rw=randwrite --bs=4k --iodepth=16 --size=16M --output-format=json
//!     "#)
//!     .timeout(Duration::from_secs(120))
//!     .run();
//! out.assert_success();
//! let fio = out.fio("fio");
//! println!("{} IOPS", fio.jobs[0].write.iops);
//! ```
//!
//! The guest kernel and initramfs come from `vm-images/build.sh` (see vm-images/README.md).
//! The job is a busybox `sh` script handed to the guest through QEMU fw_cfg; the helpers
//! of `vm-images/functions.sh` (`drblk_section`, `drblk_value`, `drblk_wait_dev`, ...) are
//! available in it. The guest prints results on its serial console between
//! `DRBLK-BEGIN <name>` / `DRBLK-END <name>` lines and finishes with `DRBLK-EXIT <status>`.
//!
//! Environment:
//! - `DRBLK_QEMU`: QEMU binary (default `qemu-system-x86_64`).
//! - `DRBLK_VM_IMAGE_DIR`: use this prebuilt directory (vmlinuz, initramfs.img) instead of
//!   running build.sh.
//! - `DRBLK_VM_ECHO=1`: copy the guest's serial console to stderr as it arrives.
//! - `DRBLK_VM_KEEP=1`: keep the per-VM work directory (job script, command line).

#![allow(missing_docs)] // a test harness; its items are documented where it helps

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long `guest_image()` lets build.sh run (first build downloads ~120 MB of packages).
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// After the guest printed `DRBLK-EXIT`, how long QEMU gets to power off before it is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Guest image
// ---------------------------------------------------------------------------------------

/// Kernel and initramfs built by `vm-images/build.sh`.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub dir: PathBuf,
    /// What `-kernel` gets: the uncompressed `vmlinux` (QEMU boots it through its PVH entry
    /// point, ~5 s faster under TCG than the bzImage) if build.sh produced it, else `vmlinuz`.
    pub kernel: PathBuf,
    /// The Debian bzImage.
    pub bzimage: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    /// Uses an already built image directory (containing `vmlinuz` and `initramfs.img`).
    pub fn from_dir(dir: impl Into<PathBuf>) -> Result<GuestImage, String> {
        let dir = dir.into();
        let bzimage = dir.join("vmlinuz");
        let vmlinux = dir.join("vmlinux");
        let img = GuestImage {
            kernel: if vmlinux.is_file() {
                vmlinux
            } else {
                bzimage.clone()
            },
            bzimage,
            initrd: dir.join("initramfs.img"),
            dir,
        };
        for f in [&img.bzimage, &img.kernel, &img.initrd] {
            if !f.is_file() {
                return Err(format!("guest image file {} is missing", f.display()));
            }
        }
        Ok(img)
    }
}

/// Builds (or finds in the cache) the guest image, once per process. Panics if that fails.
pub fn guest_image() -> GuestImage {
    static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_guest_image) {
        Ok(img) => img.clone(),
        Err(e) => panic!("guest image unavailable: {e}"),
    }
}

fn build_guest_image() -> Result<GuestImage, String> {
    if let Some(dir) = std::env::var_os("DRBLK_VM_IMAGE_DIR") {
        return GuestImage::from_dir(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vm-images/build.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status = wait_with_timeout(&mut child, BUILD_TIMEOUT);
    let out = reader.join().unwrap_or_default();
    match status {
        Some(st) if st.success() => {}
        Some(st) => return Err(format!("{} failed: {st}", script.display())),
        None => {
            return Err(format!(
                "{} timed out after {BUILD_TIMEOUT:?}",
                script.display()
            ))
        }
    }
    let dir = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| format!("{} printed no output directory", script.display()))?;
    GuestImage::from_dir(dir.trim())
}

/// Waits for `child` at most `timeout`; kills it (and reaps it) on timeout and returns None.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => break,
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

// ---------------------------------------------------------------------------------------
// QEMU
// ---------------------------------------------------------------------------------------

/// The QEMU binary (`DRBLK_QEMU` or `qemu-system-x86_64`).
pub fn qemu_binary() -> String {
    std::env::var("DRBLK_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// (major, minor) of the QEMU binary, cached. None if it cannot be determined.
pub fn qemu_version() -> Option<(u32, u32)> {
    static VERSION: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = Command::new(qemu_binary())
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "QEMU emulator version 7.2.22 (Debian ...)"
        let v = text.split("version ").nth(1)?.split_whitespace().next()?;
        let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
        Some((it.next()??, it.next()??))
    })
}

/// One vhost-user-blk disk: the unix socket the backend listens on, plus device options.
#[derive(Clone, Debug)]
pub struct VhostUserBlkDisk {
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: Option<u16>,
    /// Chardev reconnect delay in seconds (QEMU retries the socket after the backend
    /// goes away); None = no reconnect.
    pub reconnect_secs: Option<u32>,
    /// Extra `-device vhost-user-blk-pci` properties, each "key=value".
    pub device_args: Vec<String>,
}

impl VhostUserBlkDisk {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        VhostUserBlkDisk {
            socket: socket.into(),
            num_queues: 2,
            queue_size: None,
            reconnect_secs: Some(1),
            device_args: Vec::new(),
        }
    }
    pub fn num_queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = Some(n);
        self
    }
    pub fn reconnect_secs(mut self, secs: Option<u32>) -> Self {
        self.reconnect_secs = secs;
        self
    }
    /// Adds a device property, e.g. `"serial=disk1"`, `"config-wce=off"`, `"event_idx=off"`.
    pub fn device_arg(mut self, arg: impl Into<String>) -> Self {
        self.device_args.push(arg.into());
        self
    }

    fn chardev_arg(&self, id: &str) -> String {
        let mut s = format!("socket,id={id},path={}", self.socket.display());
        if let Some(secs) = self.reconnect_secs {
            // QEMU 9.2 deprecated `reconnect` (seconds) in favour of `reconnect-ms`.
            match qemu_version() {
                Some(v) if v >= (9, 2) => write!(s, ",reconnect-ms={}", u64::from(secs) * 1000),
                _ => write!(s, ",reconnect={secs}"),
            }
            .unwrap();
        }
        s
    }

    fn device_arg_string(&self, chardev: &str) -> String {
        let mut s = format!(
            "vhost-user-blk-pci,chardev={chardev},num-queues={}",
            self.num_queues
        );
        if let Some(q) = self.queue_size {
            write!(s, ",queue-size={q}").unwrap();
        }
        for a in &self.device_args {
            s.push(',');
            s.push_str(a);
        }
        s
    }
}

/// Builder for one guest run.
#[derive(Clone, Debug)]
pub struct VmBuilder {
    image: Option<GuestImage>,
    qemu: String,
    memory_mb: u32,
    smp: u32,
    disks: Vec<VhostUserBlkDisk>,
    job: String,
    timeout: Duration,
    guest_timeout_secs: Option<u64>,
    kernel_args: Vec<String>,
    qemu_args: Vec<String>,
    fw_cfg: Vec<(String, Vec<u8>)>,
    echo: bool,
    boot_stall: Duration,
}

impl Default for VmBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl VmBuilder {
    pub fn new() -> Self {
        VmBuilder {
            image: None,
            qemu: qemu_binary(),
            memory_mb: 512,
            smp: 2,
            disks: Vec::new(),
            job: String::new(),
            timeout: Duration::from_secs(180),
            guest_timeout_secs: None,
            kernel_args: Vec::new(),
            qemu_args: Vec::new(),
            fw_cfg: Vec::new(),
            echo: std::env::var_os("DRBLK_VM_ECHO").is_some_and(|v| v != "0"),
            boot_stall: BOOT_STALL,
        }
    }
    /// Uses this image instead of `guest_image()`.
    pub fn image(mut self, image: GuestImage) -> Self {
        self.image = Some(image);
        self
    }
    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.memory_mb = mb;
        self
    }
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }
    /// Adds a vhost-user-blk disk with default options (2 queues, reconnect=1).
    /// Disks appear in the guest as vda, vdb, ... in the order they are added.
    pub fn disk(self, socket: impl Into<PathBuf>) -> Self {
        self.disk_with(VhostUserBlkDisk::new(socket))
    }
    pub fn disk_with(mut self, disk: VhostUserBlkDisk) -> Self {
        self.disks.push(disk);
        self
    }
    /// The job: a busybox sh script run by the guest's init.
    pub fn job(mut self, script: impl Into<String>) -> Self {
        self.job = script.into();
        self
    }
    /// Host-side limit: QEMU is killed when it runs longer than this (default 180 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// Guest-side limit: init kills the job after `secs` (reported as DRBLK-EXIT 137).
    pub fn guest_timeout_secs(mut self, secs: u64) -> Self {
        self.guest_timeout_secs = Some(secs);
        self
    }
    /// Appends to the kernel command line (e.g. "drblk.printk=7", "drblk.debug").
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> Self {
        self.kernel_args.push(arg.into());
        self
    }
    /// Appends a raw QEMU argument.
    pub fn qemu_arg(mut self, arg: impl Into<String>) -> Self {
        self.qemu_args.push(arg.into());
        self
    }
    /// Passes a file to the guest as fw_cfg blob `opt/drblk/<name>`; the job reads it from
    /// `$(drblk_fwcfg <name>)`. (`job` is taken by the job script itself.)
    pub fn fw_cfg_file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        assert!(
            name != "job" && !name.contains(',') && !name.contains('/'),
            "bad fw_cfg name {name}"
        );
        self.fw_cfg.push((name.to_string(), contents.into()));
        self
    }
    /// Copies the serial console to stderr while the guest runs.
    pub fn echo(mut self, on: bool) -> Self {
        self.echo = on;
        self
    }
    /// How long the guest may take to reach its init before the harness looks at why
    /// (default [`BOOT_STALL`]; see `Vm::restart_if_boot_stalled`).
    pub fn boot_stall(mut self, d: Duration) -> Self {
        self.boot_stall = d;
        self
    }

    /// The QEMU argument list (without the binary) for a work directory.
    pub fn qemu_argv(&self, image: &GuestImage, workdir: &Path) -> Vec<String> {
        let m = self.memory_mb;
        // Not `quiet`: the boot messages cost ~0.5 s under TCG, but a guest that stops
        // during boot then shows where (the init lowers the console level once it runs).
        let mut cmdline: Vec<String> = ["console=ttyS0", "panic=-1"].map(String::from).to_vec();
        if let Some(s) = self.guest_timeout_secs {
            cmdline.push(format!("drblk.timeout={s}"));
        }
        cmdline.extend(self.kernel_args.iter().cloned());
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-machine",
            "q35",
            "-accel",
            "tcg",
        ]);
        push(&["-m", &format!("{m}M"), "-smp", &self.smp.to_string()]);
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={m}M,share=on"),
        ]);
        push(&["-numa", "node,memdev=mem"]);
        push(&["-display", "none", "-serial", "stdio", "-no-reboot"]);
        // The human monitor, asked where the vCPUs are when a guest never prints what a
        // test waits for.
        push(&[
            "-monitor",
            &format!(
                "unix:{},server=on,wait=off",
                workdir.join(MONITOR).display()
            ),
        ]);
        push(&[
            "-kernel",
            &image.kernel.to_string_lossy(),
            "-initrd",
            &image.initrd.to_string_lossy(),
        ]);
        push(&["-append", &cmdline.join(" ")]);
        push(&[
            "-fw_cfg",
            &format!(
                "name=opt/drblk/job,file={}",
                workdir.join("job.sh").display()
            ),
        ]);
        for (name, _) in &self.fw_cfg {
            push(&[
                "-fw_cfg",
                &format!(
                    "name=opt/drblk/{name},file={}",
                    workdir.join(format!("fw-{name}")).display()
                ),
            ]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            let id = format!("vub{i}");
            push(&[
                "-chardev",
                &d.chardev_arg(&id),
                "-device",
                &d.device_arg_string(&id),
            ]);
        }
        a.extend(self.qemu_args.iter().cloned());
        a
    }

    /// Starts QEMU. The returned `Vm` kills QEMU when dropped.
    pub fn spawn(self) -> io::Result<Vm> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let image = match &self.image {
            Some(i) => i.clone(),
            None => guest_image(),
        };
        let workdir = std::env::temp_dir().join(format!(
            "drblk-vm-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(&workdir)?;
        fs::write(workdir.join("job.sh"), &self.job)?;
        for (name, data) in &self.fw_cfg {
            fs::write(workdir.join(format!("fw-{name}")), data)?;
        }
        let argv = self.qemu_argv(&image, &workdir);
        let command_line = std::iter::once(self.qemu.clone())
            .chain(argv.iter().map(|a| shell_quote(a)))
            .collect::<Vec<_>>()
            .join(" ");
        fs::write(workdir.join("qemu-cmdline.sh"), format!("{command_line}\n"))?;
        let qemu = QemuProcess::start(&self.qemu, &argv, self.echo)?;
        let started = Instant::now();
        Ok(Vm {
            qemu,
            start: (self.qemu.clone(), argv, self.echo),
            boot_restarted: false,
            boot_stall: self.boot_stall,
            timeout: self.timeout,
            started,
            deadline: started + self.timeout,
            workdir,
            command_line,
        })
    }

    /// Starts QEMU and waits for it to finish (or kills it at the timeout).
    pub fn run(self) -> VmOutput {
        match self.spawn() {
            Ok(vm) => vm.wait(),
            Err(e) => panic!("{e}"),
        }
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Text collected from one of QEMU's output pipes.
#[derive(Default)]
struct Stream {
    state: Mutex<(String, bool)>, // (text, eof)
    cond: Condvar,
}

impl Stream {
    fn pump(
        this: Arc<Stream>,
        mut pipe: impl Read + Send + 'static,
        echo: Option<&'static str>,
    ) -> JoinHandle<()> {
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            let mut pending = String::new();
            loop {
                let n = match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    // A signal is not the end of QEMU's output.
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let mut st = this.state.lock().unwrap();
                        st.0.push_str(&format!("\n[testkit: reading QEMU's output failed: {e}]\n"));
                        drop(st);
                        break;
                    }
                };
                let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                if let Some(tag) = echo {
                    pending.push_str(&chunk);
                    while let Some(pos) = pending.find('\n') {
                        eprintln!("[{tag}] {}", &pending[..pos]);
                        pending.drain(..=pos);
                    }
                }
                let mut st = this.state.lock().unwrap();
                st.0.push_str(&chunk);
                this.cond.notify_all();
            }
            if let Some(tag) = echo {
                if !pending.is_empty() {
                    eprintln!("[{tag}] {pending}");
                }
            }
            this.state.lock().unwrap().1 = true;
            this.cond.notify_all();
        })
    }

    fn text(&self) -> String {
        self.state.lock().unwrap().0.clone()
    }
}

/// Each thread of process `pid`: name, state, kernel wait channel, the system call it is
/// in (number and arguments, from `/proc/PID/task/TID/syscall`) and its kernel stack.
pub fn process_threads(pid: u32, what: &str) -> String {
    let mut out = format!("{what} pid {pid}:\n");
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out + "  (gone)\n";
    };
    let mut tids: Vec<String> = tasks
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    tids.sort();
    let read = |tid: &str, f: &str| {
        fs::read_to_string(format!("/proc/{pid}/task/{tid}/{f}"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    for tid in tids {
        let state = read(&tid, "stat")
            .rsplit_once(") ")
            .map(|(_, r)| r.chars().next().unwrap_or('?'))
            .unwrap_or('?');
        out += &format!(
            "  {tid} {:<16} {state} wchan={} syscall=[{}]\n",
            read(&tid, "comm"),
            read(&tid, "wchan"),
            read(&tid, "syscall"),
        );
        for l in read(&tid, "stack").lines().take(8) {
            out += &format!("      {l}\n");
        }
    }
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        let mut fds: Vec<(u32, String)> = fds
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().parse().ok()?;
                let target = fs::read_link(e.path()).ok()?;
                Some((n, target.display().to_string()))
            })
            .collect();
        fds.sort();
        out += "  fds:";
        for (n, t) in fds {
            out += &format!(" {n}={t}");
        }
        out += "\n";
    }
    out
}

/// File name of QEMU's human-monitor socket in a VM's work directory.
const MONITOR: &str = "monitor.sock";

/// Sends one command to the human monitor at `path` and returns its answer (the text up to
/// the next prompt, at most 5 s).
fn monitor_command(path: &Path, cmd: &str) -> io::Result<String> {
    use std::io::Write as _;
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let until = Instant::now() + Duration::from_secs(5);
    let read_to_prompt = |s: &mut std::os::unix::net::UnixStream| {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < until && !text.ends_with(b"(qemu) ") {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    };
    read_to_prompt(&mut s)?; // the banner
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let answer = read_to_prompt(&mut s)?;
    // The monitor echoes the command with terminal escapes; keep the printable lines.
    Ok(answer
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.contains('\x1b') && !l.starts_with("(qemu)"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The threads of QEMU (`qemu_pid`) and of every drblk process: where each side waits.
pub fn where_blocked(qemu_pid: u32) -> String {
    process_threads(qemu_pid, "qemu")
        + &processes_named("drblk")
            .into_iter()
            .map(|p| process_threads(p, "drblk"))
            .collect::<String>()
}

/// Pids of the processes whose name (`comm`) is `name`.
pub fn processes_named(name: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .filter(|p: &u32| {
                    fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == name)
                })
                .collect()
        })
        .unwrap_or_default();
    pids.sort();
    pids
}

/// One QEMU process and the readers of its output.
struct QemuProcess {
    child: Option<Child>,
    serial: Arc<Stream>,
    stderr: Arc<Stream>,
    threads: Vec<JoinHandle<()>>,
}

impl QemuProcess {
    fn start(qemu: &str, argv: &[String], echo: bool) -> io::Result<QemuProcess> {
        let mut child = Command::new(qemu)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {qemu}: {e}")))?;
        let serial = Arc::new(Stream::default());
        let stderr = Arc::new(Stream::default());
        let threads = vec![
            Stream::pump(
                serial.clone(),
                child.stdout.take().unwrap(),
                echo.then_some("guest"),
            ),
            Stream::pump(
                stderr.clone(),
                child.stderr.take().unwrap(),
                echo.then_some("qemu"),
            ),
        ];
        Ok(QemuProcess {
            child: Some(child),
            serial,
            stderr,
            threads,
        })
    }

    /// Kills QEMU (if it runs) and waits for its output to end.
    fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How long a guest may take to reach its init (`DRBLK-INIT`) before the harness looks at
/// why: far beyond any boot seen here (~5 s under TCG, ~20 s on a loaded machine).
pub const BOOT_STALL: Duration = Duration::from_secs(120);

/// A running guest. Dropping it kills QEMU.
pub struct Vm {
    qemu: QemuProcess,
    /// What starts QEMU again: binary, arguments, echo.
    start: (String, Vec<String>, bool),
    /// QEMU was started a second time after a stalled boot (once at most).
    boot_restarted: bool,
    boot_stall: Duration,
    timeout: Duration,
    started: Instant,
    deadline: Instant,
    workdir: PathBuf,
    command_line: String,
}

impl Vm {
    pub fn pid(&self) -> Option<u32> {
        self.qemu.child.as_ref().map(|c| c.id())
    }

    /// Whether QEMU was started a second time after a stalled boot.
    pub fn boot_restarted(&self) -> bool {
        self.boot_restarted
    }

    /// A guest whose kernel has not reached its init `BOOT_STALL` after QEMU started —
    /// before the guest could send a request to any disk (its virtio drivers load in the
    /// init) — is reported, and started once more if QEMU's monitor says the vCPUs run
    /// (a kernel stuck in its own boot under TCG, seen about once in a hundred boots on
    /// a loaded 2-core machine). A QEMU whose monitor does not answer is stuck in its own
    /// setup, e.g. waiting for a vhost-user reply: that is never retried, the test fails
    /// with the report. Returns whether QEMU was started again.
    fn restart_if_boot_stalled(&mut self) -> bool {
        if self.boot_restarted
            || self.started.elapsed() < self.boot_stall
            || self.qemu.child.is_none()
            || self
                .qemu
                .serial
                .state
                .lock()
                .unwrap()
                .0
                .contains("DRBLK-INIT")
        {
            return false;
        }
        self.boot_restarted = true;
        let status = monitor_command(&self.workdir.join(MONITOR), "info status");
        eprintln!(
            "--- the guest did not reach its init within {:?}; serial so far ---\n{}\n--- QEMU's monitor ---\n{}\n--- threads of QEMU and drblk ---\n{}",
            self.boot_stall,
            self.qemu.serial.text(),
            self.monitor_report(),
            self.pid().map(where_blocked).unwrap_or_default()
        );
        if !status.is_ok_and(|s| s.contains("VM status: running")) {
            eprintln!("--- QEMU's monitor does not say the guest runs: not restarting it ---");
            return false;
        }
        eprintln!(
            "--- the vCPUs run but the kernel never reached its init: starting QEMU once more ---"
        );
        self.qemu.kill();
        let (qemu, argv, echo) = &self.start;
        match QemuProcess::start(qemu, argv, *echo) {
            Ok(p) => self.qemu = p,
            Err(e) => {
                eprintln!("--- starting QEMU again failed: {e} ---");
                return false;
            }
        }
        self.started = Instant::now();
        self.deadline = self.started + self.timeout;
        true
    }
    /// The QEMU command line, shell-quoted (also written to `<workdir>/qemu-cmdline.sh`).
    pub fn command_line(&self) -> &str {
        &self.command_line
    }
    /// Serial console output so far (`\r` removed).
    pub fn serial(&self) -> String {
        self.qemu.serial.text()
    }
    /// Waits until the serial output contains `needle`, at most `timeout` (and never past
    /// the VM's own deadline). Returns false on timeout or if QEMU exited without it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let mut deadline = (Instant::now() + timeout).min(self.deadline);
        loop {
            if self.restart_if_boot_stalled() {
                deadline = (Instant::now() + timeout).min(self.deadline);
            }
            let serial = self.qemu.serial.clone();
            let st = serial.state.lock().unwrap();
            if st.0.contains(needle) {
                return true;
            }
            let now = Instant::now();
            if st.1 || now >= deadline {
                drop(st);
                // A guest that never printed what was awaited: say where QEMU and every
                // drblk process are blocked (a vhost-user message nobody answers shows as
                // a thread of one side reading its socket).
                eprintln!(
                    "--- waiting for {needle:?} timed out after {:?}; QEMU's monitor ---\n{}\n--- threads of QEMU and drblk ---\n{}",
                    self.started.elapsed(),
                    self.monitor_report(),
                    self.pid().map(where_blocked).unwrap_or_default()
                );
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            let _ = serial.cond.wait_timeout(st, wait).unwrap();
        }
    }
    /// Runs `info status` and `info registers -a` on QEMU's human monitor (each answer
    /// bounded by a few seconds): whether the guest runs, and where each vCPU is.
    pub fn monitor_report(&self) -> String {
        let path = self.workdir.join(MONITOR);
        let mut out = String::new();
        for cmd in ["info status", "info registers -a"] {
            match monitor_command(&path, cmd) {
                Ok(answer) => out += &format!("(qemu) {cmd}\n{answer}\n"),
                Err(e) => out += &format!("(qemu) {cmd}: no answer: {e}\n"),
            }
        }
        out
    }
    /// Kills QEMU now.
    pub fn kill(&mut self) {
        self.qemu.kill();
    }

    /// Waits until QEMU exits; kills it at the builder's timeout, or when the guest printed
    /// `DRBLK-EXIT` but did not power off within a grace period.
    pub fn wait(mut self) -> VmOutput {
        let mut timed_out = false;
        let mut exit_seen: Option<Instant> = None;
        let status = loop {
            self.restart_if_boot_stalled();
            let child = self.qemu.child.as_mut().expect("VM already waited for");
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) => {}
                Err(_) => break None,
            }
            let now = Instant::now();
            if exit_seen.is_none()
                && self
                    .qemu
                    .serial
                    .state
                    .lock()
                    .unwrap()
                    .0
                    .contains("DRBLK-EXIT ")
            {
                exit_seen = Some(now);
            }
            let grace_over = exit_seen.is_some_and(|t| now.duration_since(t) > POWEROFF_GRACE);
            if now >= self.deadline || grace_over {
                timed_out = !grace_over;
                if timed_out {
                    eprintln!(
                        "--- the guest ran past its deadline; QEMU's monitor ---\n{}\n--- threads of QEMU and drblk ---\n{}",
                        self.monitor_report(),
                        self.pid().map(where_blocked).unwrap_or_default()
                    );
                }
                let child = self.qemu.child.as_mut().expect("checked above");
                let _ = child.kill();
                break child.wait().ok();
            }
            thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        // QEMU has exited, so the pipes are closed and the readers finish.
        self.qemu.kill();
        self.qemu.child = None;
        let serial = self.qemu.serial.text();
        VmOutput {
            exit: parse_exit(&serial),
            sections: parse_sections(&serial),
            serial,
            qemu_stderr: self.qemu.stderr.text(),
            qemu_status: status,
            timed_out,
            elapsed,
            command_line: self.command_line.clone(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("DRBLK_VM_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.workdir);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

/// Everything a finished guest run produced.
#[derive(Clone, Debug)]
pub struct VmOutput {
    /// Serial console (kernel log, init and job output), `\r` removed.
    pub serial: String,
    pub qemu_stderr: String,
    /// QEMU's own exit status (None if it could not be collected).
    pub qemu_status: Option<ExitStatus>,
    /// The status in the guest's `DRBLK-EXIT <status>` line (None: the guest never got there).
    pub exit: Option<i32>,
    /// True if QEMU was killed at the timeout.
    pub timed_out: bool,
    /// Wall time from spawning QEMU to its exit.
    pub elapsed: Duration,
    /// (name, body) of every DRBLK-BEGIN/END section, in order.
    pub sections: Vec<(String, String)>,
    pub command_line: String,
}

impl VmOutput {
    pub fn success(&self) -> bool {
        !self.timed_out && self.exit == Some(0)
    }

    /// Panics with the end of the serial log and QEMU's stderr unless the job exited 0.
    pub fn assert_success(&self) -> &Self {
        if !self.success() {
            panic!(
                "guest job failed: exit={:?} timed_out={} qemu={:?} after {:?}\n{}",
                self.exit,
                self.timed_out,
                self.qemu_status,
                self.elapsed,
                self.diagnostics()
            );
        }
        self
    }

    /// Command line, end of the serial log (the guest's "dmesg" section shortened) and
    /// QEMU's stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut lines: Vec<&str> = Vec::new();
        let mut dmesg: Vec<&str> = Vec::new();
        let mut in_dmesg = false;
        for l in self.serial.lines() {
            if l.ends_with("DRBLK-BEGIN dmesg") {
                in_dmesg = true;
            } else if in_dmesg && l.ends_with("DRBLK-END dmesg") {
                in_dmesg = false;
                let skip = dmesg.len().saturating_sub(25);
                lines.push("DRBLK-BEGIN dmesg (last 25 lines)");
                lines.extend(dmesg.drain(..).skip(skip));
                lines.push(l);
            } else if in_dmesg {
                dmesg.push(l);
            } else {
                lines.push(l);
            }
        }
        lines.extend(dmesg); // unterminated dmesg section
        let tail = lines[lines.len().saturating_sub(100)..].join("\n");
        format!(
            "--- command ---\n{}\n--- serial (last 100 lines) ---\n{tail}\n--- qemu stderr ---\n{}",
            self.command_line, self.qemu_stderr
        )
    }

    /// Body of the first section called `name`.
    pub fn section(&self, name: &str) -> Option<&str> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_str())
    }

    /// Bodies of all sections called `name`, in order.
    pub fn sections_named(&self, name: &str) -> Vec<&str> {
        self.sections
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, b)| b.as_str())
            .collect()
    }

    /// Status of the command run by `drblk_section <name> ...` (its `DRBLK-RC` line).
    pub fn section_rc(&self, name: &str) -> Option<i32> {
        self.marker_lines("DRBLK-RC ").find_map(|rest| {
            let (n, rc) = rest.rsplit_once(' ')?;
            (n == name).then(|| rc.trim().parse().ok()).flatten()
        })
    }

    /// Value printed by `drblk_value <name> <value...>`.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.marker_lines("DRBLK-VALUE ").find_map(|rest| {
            let (n, v) = rest.split_once(' ').unwrap_or((rest, ""));
            (n == name).then_some(v)
        })
    }

    /// `DRBLK-ERROR` messages printed by init or the helpers.
    pub fn errors(&self) -> Vec<&str> {
        self.marker_lines("DRBLK-ERROR ").collect()
    }

    /// Guest uptime (s) when init was about to start the job, i.e. the guest boot time.
    pub fn guest_boot_secs(&self) -> Option<f64> {
        self.marker_lines("DRBLK-BOOTED ")
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Parses section `name` as fio `--output-format=json` output; panics if it cannot.
    pub fn fio(&self, name: &str) -> FioReport {
        match self.try_fio(name) {
            Ok(r) => r,
            Err(e) => panic!("fio section {name:?}: {e}\n{}", self.diagnostics()),
        }
    }

    pub fn try_fio(&self, name: &str) -> Result<FioReport, String> {
        let body = self
            .section(name)
            .ok_or_else(|| format!("no section {name:?} in the serial log"))?;
        parse_fio_json(body)
    }

    fn marker_lines<'a>(&'a self, marker: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.serial
            .lines()
            .filter_map(move |l| l.find(marker).map(|p| l[p + marker.len()..].trim_end()))
    }
}

/// Status of the last `DRBLK-EXIT <status>` line.
pub fn parse_exit(serial: &str) -> Option<i32> {
    serial
        .lines()
        .filter_map(|l| l.find("DRBLK-EXIT ").map(|p| &l[p + "DRBLK-EXIT ".len()..]))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .next_back()
}

/// All `DRBLK-BEGIN <name>` ... `DRBLK-END <name>` sections of a serial log, in order.
/// Markers are recognised anywhere in a line (kernel messages may precede them);
/// an unterminated section is dropped.
pub fn parse_sections(serial: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, String)> = None;
    for line in serial.lines() {
        let line = line.trim_end_matches('\r');
        if let Some((name, body)) = cur.as_mut() {
            if let Some(p) = line.find("DRBLK-END ") {
                if line[p + "DRBLK-END ".len()..].trim() == name.as_str() {
                    out.push((std::mem::take(name), std::mem::take(body)));
                    cur = None;
                    continue;
                }
            }
            body.push_str(line);
            body.push('\n');
        } else if let Some(p) = line.find("DRBLK-BEGIN ") {
            cur = Some((
                line[p + "DRBLK-BEGIN ".len()..].trim().to_string(),
                String::new(),
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// fio JSON
// ---------------------------------------------------------------------------------------

/// fio `--output-format=json` result.
#[derive(Clone, Debug)]
pub struct FioReport {
    pub jobs: Vec<FioJob>,
    /// The whole document, for anything not extracted below.
    pub json: serde_json::Value,
}

#[derive(Clone, Debug)]
pub struct FioJob {
    pub name: String,
    /// fio's per-job error (0 = ok).
    pub error: i64,
    /// Note: with `--verify`, the verification reads of a write job count as `read`.
    pub read: FioStats,
    pub write: FioStats,
    pub trim: FioStats,
}

#[derive(Clone, Debug, Default)]
pub struct FioStats {
    pub io_bytes: u64,
    pub total_ios: u64,
    pub iops: f64,
    pub bw_bytes: u64,
    pub runtime_ms: u64,
    pub clat_min_ns: u64,
    pub clat_max_ns: u64,
    pub clat_mean_ns: f64,
    /// Completion-latency percentiles: key is fio's percentile string ("99.000000").
    pub clat_percentiles_ns: BTreeMap<String, u64>,
}

impl FioStats {
    /// Completion latency at percentile `p` (e.g. 99.0), if fio reported it.
    pub fn clat_percentile_ns(&self, p: f64) -> Option<u64> {
        self.clat_percentiles_ns
            .iter()
            .find(|(k, _)| k.parse::<f64>().is_ok_and(|kp| (kp - p).abs() < 1e-6))
            .map(|(_, v)| *v)
    }
}

impl FioReport {
    pub fn job(&self, name: &str) -> Option<&FioJob> {
        self.jobs.iter().find(|j| j.name == name)
    }
    pub fn read_iops(&self) -> f64 {
        self.jobs.iter().map(|j| j.read.iops).sum()
    }
    pub fn write_iops(&self) -> f64 {
        self.jobs.iter().map(|j| j.write.iops).sum()
    }
    /// Sum of per-job errors (0 if every job succeeded).
    pub fn errors(&self) -> i64 {
        self.jobs.iter().map(|j| j.error.abs()).sum()
    }
}

/// Parses fio JSON output. Text before the first `{` (fio warnings) and after the
/// document is ignored.
pub fn parse_fio_json(text: &str) -> Result<FioReport, String> {
    let start = text.find('{').ok_or("no JSON object in fio output")?;
    let json: serde_json::Value = serde_json::Deserializer::from_str(&text[start..])
        .into_iter::<serde_json::Value>()
        .next()
        .ok_or("empty fio output")?
        .map_err(|e| format!("invalid fio JSON: {e}"))?;
    let jobs = json
        .get("jobs")
        .and_then(|j| j.as_array())
        .ok_or("fio JSON has no \"jobs\" array")?
        .iter()
        .map(|j| FioJob {
            name: j
                .get("jobname")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string(),
            error: j.get("error").and_then(|v| v.as_i64()).unwrap_or(0),
            read: fio_stats(j.get("read")),
            write: fio_stats(j.get("write")),
            trim: fio_stats(j.get("trim")),
        })
        .collect();
    Ok(FioReport { jobs, json })
}

fn fio_stats(v: Option<&serde_json::Value>) -> FioStats {
    let Some(v) = v else {
        return FioStats::default();
    };
    let num = |v: Option<&serde_json::Value>| -> f64 { v.and_then(|x| x.as_f64()).unwrap_or(0.0) };
    let clat = v.get("clat_ns");
    let clat_percentiles_ns = clat
        .and_then(|c| c.get("percentile"))
        .and_then(|p| p.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, x)| (k.clone(), x.as_f64().unwrap_or(0.0) as u64))
                .collect()
        })
        .unwrap_or_default();
    FioStats {
        io_bytes: num(v.get("io_bytes")) as u64,
        total_ios: num(v.get("total_ios")) as u64,
        iops: num(v.get("iops")),
        bw_bytes: num(v.get("bw_bytes")) as u64,
        runtime_ms: num(v.get("runtime")) as u64,
        clat_min_ns: num(clat.and_then(|c| c.get("min"))) as u64,
        clat_max_ns: num(clat.and_then(|c| c.get("max"))) as u64,
        clat_mean_ns: num(clat.and_then(|c| c.get("mean"))),
        clat_percentiles_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_report_names_each_thread_and_its_open_files() {
        let me = std::process::id();
        let report = process_threads(me, "self");
        assert!(report.starts_with(&format!("self pid {me}:\n")), "{report}");
        assert!(report.contains(&format!("  {me} ")), "{report}");
        assert!(report.contains("syscall=["), "{report}");
        assert!(report.contains("  fds: 0="), "{report}");
        assert!(process_threads(u32::MAX, "none").contains("(gone)"));
    }

    #[test]
    fn sections_and_markers() {
        let log = "boot\r\nDRBLK-BEGIN a\r\nx\r\n\r\ny\r\nDRBLK-END a\r\nDRBLK-RC a 3\r\n\
                   [  1.0] DRBLK-BEGIN b\nz\nDRBLK-END b\nDRBLK-VALUE size 42 1\nDRBLK-BEGIN c\nq\nDRBLK-EXIT 7\n";
        let s = parse_sections(log);
        assert_eq!(
            s,
            vec![("a".into(), "x\n\ny\n".into()), ("b".into(), "z\n".into())]
        );
        assert_eq!(parse_exit(log), Some(7));
    }
}
