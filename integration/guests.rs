//! Guest integration tests: the real `drblk` binary serving disks to a Linux guest under
//! QEMU (TCG), checked from inside the guest (sysfs, dd, blkdiscard, fio --verify) and from
//! the host (the image file).
//!
//! Each test is one guest boot; the tests run one at a time (a process-wide lock), since two
//! TCG guests on a small machine would only slow each other down and stretch fio timings.
//! `DRBLK_SKIP_VM=1` makes every test return at once. `DRBLK_VM_ECHO=1` shows the guest
//! console live; the kill drill prints a line per kill.
//!
//! Run: `cargo test --release --test guests` (add `-- --nocapture` to see the reports).

#[path = "common/daemons.rs"]
mod daemons;
use drblk_testkit::vm;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use daemons::{
    allocated_bytes, create_image, pattern, read_at, sha256, skip_vm, write_at, Backend,
    FIND_DISK_SH,
};
use vm::{VhostUserBlkDisk, VmBuilder, VmOutput};

const MIB: u64 = 1 << 20;

/// One guest at a time.
static GUEST: Mutex<()> = Mutex::new(());

fn guest_lock() -> std::sync::MutexGuard<'static, ()> {
    GUEST.lock().unwrap_or_else(|e| e.into_inner())
}

fn value<'a>(out: &'a VmOutput, name: &str) -> &'a str {
    out.value(name)
        .unwrap_or_else(|| panic!("guest printed no value {name:?}\n{}", out.diagnostics()))
}

fn rc(out: &VmOutput, name: &str) -> i32 {
    out.section_rc(name).unwrap_or_else(|| {
        panic!(
            "guest printed no status for {name:?}\n{}",
            out.diagnostics()
        )
    })
}

fn assert_rc0(out: &VmOutput, name: &str) {
    let r = rc(out, name);
    assert_eq!(
        r,
        0,
        "guest step {name} failed (status {r}); stderr: {:?}\n{}",
        out.section(&format!("{name}.stderr")),
        out.diagnostics()
    );
}

fn assert_no_guest_io_errors(out: &VmOutput) {
    let dmesg = out
        .section("dmesg")
        .unwrap_or_else(|| panic!("no dmesg section\n{}", out.diagnostics()));
    let bad: Vec<&str> = dmesg
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("i/o error") || l.contains("blk_update_request") || l.contains("buffer i/o")
        })
        .collect();
    assert!(
        bad.is_empty(),
        "I/O errors in the guest kernel log:\n{}",
        bad.join("\n")
    );
}

/// fio report of section `name`: status 0, no job error, and every job wrote and verified
/// (read back) `bytes_per_job`.
fn assert_fio_verified(out: &VmOutput, name: &str, jobs: usize, bytes_per_job: u64) {
    assert_rc0(out, name);
    let fio = out.fio(name);
    assert_eq!(fio.jobs.len(), jobs, "fio {name}: job count");
    for j in &fio.jobs {
        assert_eq!(
            j.error, 0,
            "fio {name}: job {} reported error {}",
            j.name, j.error
        );
        assert_eq!(
            j.write.io_bytes, bytes_per_job,
            "fio {name}: job {} bytes written",
            j.name
        );
        // With --verify the verification reads are reported as reads.
        assert_eq!(
            j.read.io_bytes, bytes_per_job,
            "fio {name}: job {} bytes verified",
            j.name
        );
    }
    // fio also reports per-job verify/IO errors in "total_err" (continue_on_error).
    for j in fio.json["jobs"].as_array().unwrap() {
        let total_err = j.get("total_err").and_then(|v| v.as_i64()).unwrap_or(0);
        assert_eq!(total_err, 0, "fio {name}: total_err");
    }
}

/// Size, read-only flag, queue count, serial; host→guest and guest→host data; discard →
/// holes; fio write+verify over both queues. One boot, two drblk disks (read-write and
/// read-only), found in the guest by serial number.
#[test]
fn device_properties_data_discard_and_fio_verify() {
    if skip_vm("device_properties_data_discard_and_fio_verify") {
        return;
    }
    let _g = guest_lock();
    let dir = tempfile::tempdir().unwrap();
    let (rw_img, ro_img) = (dir.path().join("rw.img"), dir.path().join("ro.img"));
    let rw_size = 256 * MIB;
    // Not a power of two, to catch a size taken from anywhere but the image.
    let ro_size = 48 * MIB + 5 * 4096;

    let host_pat = pattern(1, MIB as usize); // host writes at 0, guest reads
    let discard_pat = pattern(3, 8 * MIB as usize); // host writes 8M..16M, guest discards 9M..13M
    create_image(&rw_img, rw_size);
    write_at(&rw_img, 0, &host_pat);
    write_at(&rw_img, 8 * MIB, &discard_pat);
    assert_eq!(allocated_bytes(&rw_img, 8 * MIB, 16 * MIB), 8 * MIB);
    let ro_pat = pattern(7, ro_size as usize);
    create_image(&ro_img, ro_size);
    write_at(&ro_img, 0, &ro_pat);

    let rw = Backend::drblk(
        "rw",
        &rw_img,
        &dir.path().join("rw.sock"),
        &["--queues", "2", "--serial", "drblk-rw"],
        None,
    );
    let ro = Backend::drblk(
        "ro",
        &ro_img,
        &dir.path().join("ro.sock"),
        &["--queues", "2", "--serial", "drblk-ro", "--readonly"],
        None,
    );

    let job = format!(
        r#"{FIND_DISK_SH}
drblk_wait_dev vda || exit 1
drblk_wait_dev vdb || exit 1
RW=$(find_disk drblk-rw) || exit 1
RO=$(find_disk drblk-ro) || exit 1
for x in rw:$RW ro:$RO; do
    n=${{x%%:*}}; d=${{x#*:}}
    drblk_value ${{n}}_dev $d
    drblk_value ${{n}}_size $(cat /sys/block/$d/size)
    drblk_value ${{n}}_ro $(cat /sys/block/$d/ro)
    drblk_value ${{n}}_nr_mq $(ls /sys/block/$d/mq | wc -l)
    drblk_value ${{n}}_discard_max $(cat /sys/block/$d/queue/discard_max_bytes)
    drblk_section ${{n}}_mq ls /sys/block/$d/mq
done
dd if=/dev/zero of=/tmp/zero bs=64k count=64 2>/dev/null
# 1 MiB the host does not know: the guest writes it and prints its hash.
dd if=/dev/urandom of=/tmp/guestpat bs=64k count=16 2>/dev/null
drblk_value guestpat_sha $(sha256sum < /tmp/guestpat)

# host -> guest (both disks): hashes of the first MiB, compared by the host
drblk_value host_to_guest_sha $(dd if=/dev/$RW bs=64k count=16 iflag=direct 2>/dev/null | sha256sum)
drblk_value ro_read_sha $(dd if=/dev/$RO bs=64k count=16 iflag=direct 2>/dev/null | sha256sum)

# read-only disk: a write must fail
drblk_section ro_write dd if=/tmp/guestpat of=/dev/$RO bs=64k count=1 oflag=direct

# guest -> host: 1 MiB at 4 MiB, flushed
drblk_section guest_write dd if=/tmp/guestpat of=/dev/$RW bs=64k seek=64 oflag=direct conv=fsync

# discard 9M..13M, then it reads as zeroes
drblk_section discard blkdiscard -o $((9 << 20)) -l $((4 << 20)) /dev/$RW
dd if=/dev/$RW of=/tmp/got bs=64k skip=144 count=64 iflag=direct 2>/dev/null
drblk_section discard_reads_zero cmp /tmp/got /tmp/zero

# fio: 2 jobs (one per vCPU, so both queues), 4k random writes QD16, then crc32c verify
drblk_section fio fio --name=verify --filename=/dev/$RW --ioengine=libaio --direct=1 \
    --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --offset=32M --offset_increment=32M \
    --size=32M --verify=crc32c --verify_fatal=1 --output-format=json
exit 0
"#
    );
    let out = VmBuilder::new()
        .disk_with(VhostUserBlkDisk::new(dir.path().join("rw.sock")))
        .disk_with(VhostUserBlkDisk::new(dir.path().join("ro.sock")))
        .job(job)
        .timeout(Duration::from_secs(180))
        .guest_timeout_secs(150)
        .run();
    let diag = || format!("{}\n{}{}", out.diagnostics(), rw.all_logs(), ro.all_logs());
    assert!(out.success(), "guest job failed\n{}", diag());
    eprintln!(
        "guest: booted in {:?} s, run {:?}",
        out.guest_boot_secs(),
        out.elapsed
    );

    // Device properties.
    assert_eq!(
        value(&out, "rw_size"),
        (rw_size / 512).to_string(),
        "rw disk size (sectors)"
    );
    assert_eq!(
        value(&out, "ro_size"),
        (ro_size / 512).to_string(),
        "ro disk size (sectors)"
    );
    assert_eq!(value(&out, "rw_ro"), "0");
    assert_eq!(
        value(&out, "ro_ro"),
        "1",
        "--readonly must make the guest disk read-only"
    );
    assert_eq!(
        value(&out, "rw_nr_mq"),
        "2",
        "queues: {:?}",
        out.section("rw_mq")
    );
    assert_eq!(
        value(&out, "ro_nr_mq"),
        "2",
        "queues: {:?}",
        out.section("ro_mq")
    );
    assert_eq!(
        out.section("rw_mq")
            .map(|s| s.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["0", "1"])
    );
    let discard_max: u64 = value(&out, "rw_discard_max").parse().unwrap();
    assert!(discard_max > 0, "the rw disk does not offer discard");
    assert_eq!(
        value(&out, "ro_discard_max"),
        "0",
        "a read-only disk offers discard"
    );

    // Data paths.
    let first_word = |name: &str| {
        value(&out, name)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(
        first_word("host_to_guest_sha"),
        sha256(&host_pat),
        "guest read other data than the host wrote"
    );
    assert_eq!(
        first_word("ro_read_sha"),
        sha256(&ro_pat[..MIB as usize]),
        "read-only disk: wrong data"
    );
    assert_ne!(
        rc(&out, "ro_write"),
        0,
        "a write to the read-only disk succeeded\n{}",
        diag()
    );
    eprintln!(
        "write to the read-only disk: {:?}",
        out.section("ro_write.stderr")
    );
    assert_rc0(&out, "guest_write");
    assert_eq!(
        sha256(&read_at(&rw_img, 4 * MIB, MIB as usize)),
        first_word("guestpat_sha"),
        "the guest's 1 MiB at 4 MiB is not in the image"
    );
    assert!(
        read_at(&rw_img, 0, MIB as usize) == host_pat,
        "the host's data at 0 changed"
    );
    assert!(
        read_at(&ro_img, 0, ro_size as usize) == ro_pat,
        "the read-only image changed"
    );

    // Discard → holes in the image, the rest of the range intact.
    assert_rc0(&out, "discard");
    assert_rc0(&out, "discard_reads_zero");
    let alloc = allocated_bytes(&rw_img, 8 * MIB, 16 * MIB);
    assert_eq!(
        alloc,
        4 * MIB,
        "allocated bytes in 8M..16M after discarding 9M..13M"
    );
    assert_eq!(
        allocated_bytes(&rw_img, 9 * MIB, 13 * MIB),
        0,
        "9M..13M still allocated"
    );
    assert!(read_at(&rw_img, 9 * MIB, 4 * MIB as usize)
        .iter()
        .all(|&b| b == 0));
    assert!(read_at(&rw_img, 8 * MIB, MIB as usize) == discard_pat[..MIB as usize]);
    assert!(read_at(&rw_img, 13 * MIB, 3 * MIB as usize) == discard_pat[5 * MIB as usize..]);

    // fio write + verify.
    assert_fio_verified(&out, "fio", 2, 32 * MIB);
    assert_no_guest_io_errors(&out);
}

/// Data the guest wrote and flushed survives `kill -9` of drblk: the guest (same boot)
/// reads it back through the restarted daemon after QEMU reconnects, and keeps writing.
#[test]
fn flushed_data_survives_daemon_kill_and_restart() {
    if skip_vm("flushed_data_survives_daemon_kill_and_restart") {
        return;
    }
    let _g = guest_lock();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let sock = dir.path().join("d.sock");
    create_image(&img, 64 * MIB);
    let mut d = Backend::drblk("d", &img, &sock, &["--queues", "2"], None);

    let job = r#"
drblk_wait_dev vda || exit 1
dd if=/dev/urandom of=/tmp/pat bs=64k count=32 2>/dev/null
drblk_value pat_sha $(sha256sum < /tmp/pat)
drblk_section write dd if=/tmp/pat of=/dev/vda bs=64k seek=32 oflag=direct || exit 1
sync
drblk_value phase written
# The host kills and restarts drblk now; QEMU reconnects (reconnect=1).
sleep 4
drblk_value phase reading
dd if=/dev/vda of=/tmp/got bs=64k skip=32 count=32 iflag=direct 2>/dev/null
drblk_section readback cmp /tmp/got /tmp/pat
drblk_section write_after dd if=/tmp/pat of=/dev/vda bs=64k seek=128 oflag=direct conv=fsync
exit 0
"#;
    let mut vm = VmBuilder::new()
        .disk(&sock)
        .job(job)
        .timeout(Duration::from_secs(120))
        .guest_timeout_secs(100)
        .spawn()
        .unwrap();
    assert!(
        vm.wait_for("DRBLK-VALUE phase written", Duration::from_secs(60)),
        "guest never wrote\n{}\n{}",
        vm.serial(),
        d.all_logs()
    );
    d.kill9();
    let serial = vm.serial();
    assert!(
        !serial.contains("phase reading"),
        "the guest read before the daemon was killed"
    );
    let pat_sha = serial
        .lines()
        .find_map(|l| l.split("DRBLK-VALUE pat_sha ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .expect("pat_sha")
        .to_string();
    // Between the kill and the restart the image on the host already holds the data.
    assert_eq!(
        sha256(&read_at(&img, 2 * MIB, 2 * MIB as usize)),
        pat_sha,
        "flushed data not in the image after kill -9"
    );
    d.start();
    assert!(
        d.wait_log("frontend connected", Duration::from_secs(60)),
        "QEMU did not reconnect to the restarted daemon\n{}",
        d.all_logs()
    );
    let out = vm.wait();
    assert!(
        out.success(),
        "guest job failed\n{}\n{}",
        out.diagnostics(),
        d.all_logs()
    );
    assert_rc0(&out, "write");
    assert_rc0(&out, "readback");
    assert_rc0(&out, "write_after");
    assert_eq!(
        sha256(&read_at(&img, 8 * MIB, 2 * MIB as usize)),
        pat_sha,
        "write after the restart not in the image"
    );
    assert_no_guest_io_errors(&out);
    assert!(
        d.stop(),
        "drblk did not exit cleanly on SIGTERM\n{}",
        d.all_logs()
    );
}

/// The restart drill: `kill -9` drblk again and again while the guest runs fio random
/// writes with crc32c verification; each time a new drblk is started on the same socket and
/// image, QEMU reconnects and restarts the rings at their used index. Every fio run must
/// verify, with no I/O error in the guest.
#[test]
fn fio_verify_survives_repeated_kill9_of_drblk() {
    if skip_vm("fio_verify_survives_repeated_kill9_of_drblk") {
        return;
    }
    const MIN_KILLS: usize = 10;
    /// How long (guest uptime seconds) the guest keeps starting fio runs.
    const GUEST_FIO_SECS: u32 = 36;
    let _g = guest_lock();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let sock = dir.path().join("d.sock");
    create_image(&img, 128 * MIB);
    let mut d = Backend::drblk("d", &img, &sock, &["--queues", "2"], None);

    // fio runs back to back until GUEST_FIO_SECS of uptime; each run rewrites the two
    // 32 MiB regions with a new random seed (so a lost write leaves a block of the previous
    // run, which fails the header's seed/offset check) and then verifies them.
    let job = format!(
        r#"
drblk_wait_dev vda || exit 1
end=$(( $(cut -d. -f1 /proc/uptime) + {GUEST_FIO_SECS} ))
drblk_value phase fio-start
i=0
st=0
while :; do
    drblk_value fio-run-start $i
    drblk_section fio.$i fio --name=drill --filename=/dev/vda --ioengine=libaio --direct=1 \
        --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --offset_increment=32M --size=32M \
        --randseed=$((1000 + i)) --verify=crc32c --verify_fatal=1 --output-format=json || st=1
    i=$((i + 1))
    [ $st -eq 0 ] || break
    [ $(cut -d. -f1 /proc/uptime) -lt $end ] || break
done
drblk_value fio_runs $i
drblk_value phase drill-done
exit $st
"#
    );
    let mut vm = VmBuilder::new()
        .disk(&sock)
        .job(job)
        .timeout(Duration::from_secs(240))
        .guest_timeout_secs(200)
        .spawn()
        .unwrap();
    assert!(
        vm.wait_for("DRBLK-VALUE phase fio-start", Duration::from_secs(60)),
        "guest never started fio\n{}",
        vm.serial()
    );
    assert!(d.wait_log("frontend connected", Duration::from_secs(60)));

    let t0 = Instant::now();
    let mut kills_during_fio = 0usize;
    // Dwell after each reconnection before the next kill: cycles through 0.4..1.6 s so the
    // kills land in different phases (writes, verification reads, between runs).
    let dwell_ms = [900u64, 400, 1300, 700, 1600, 1100, 500, 1500, 800, 1200];
    let mut i = 0usize;
    let mut reconnect_ms = Vec::new();
    // A lost request leaves fio waiting forever (the guest's virtio-blk has no timeout), so
    // a guest that starts no new fio run for this long counts as hung.
    const STALL: Duration = Duration::from_secs(60);
    let mut progress = (0usize, Instant::now());
    while i < 40 {
        std::thread::sleep(Duration::from_millis(dwell_ms[i % dwell_ms.len()]));
        if vm.serial().contains("phase drill-done") {
            break;
        }
        let serial = vm.serial();
        let runs_started = serial.matches("DRBLK-VALUE fio-run-start").count();
        let runs_finished = serial.matches("DRBLK-RC fio.").count();
        if runs_started != progress.0 {
            progress = (runs_started, Instant::now());
        }
        assert!(
            progress.1.elapsed() < STALL,
            "guest I/O stalled: no new fio run for {STALL:?} after {i} kills (lost request?)\n...{}\n{}",
            &serial[serial.len().saturating_sub(4000)..],
            d.all_logs()
        );
        d.kill9();
        let killed = Instant::now();
        if runs_started > runs_finished {
            kills_during_fio += 1;
        }
        i += 1;
        d.start();
        // QEMU retries every second; wait for it (or for the guest to finish).
        let ok = daemons::wait_until(Duration::from_secs(60), || {
            d.log_text().contains("frontend connected") || vm.serial().contains("phase drill-done")
        });
        let rc_ms = killed.elapsed().as_millis();
        let reconnected = d.log_text().contains("frontend connected");
        if reconnected {
            reconnect_ms.push(rc_ms);
        }
        eprintln!(
            "kill #{i} at {:.1}s ({}): {}",
            t0.elapsed().as_secs_f64(),
            if runs_started > runs_finished {
                format!("during fio run {}", runs_started - 1)
            } else {
                "between fio runs".to_string()
            },
            if reconnected {
                format!("QEMU back after {rc_ms} ms")
            } else {
                format!("guest finished {rc_ms} ms later, before QEMU reconnected")
            }
        );
        assert!(
            ok,
            "QEMU did not reconnect within 20 s after kill #{i}\n{}\n{}",
            vm.serial(),
            d.all_logs()
        );
    }
    let out = vm.wait();
    let diag = || format!("{}\n{}", out.diagnostics(), d.all_logs());
    assert!(
        out.success(),
        "guest job failed after {kills_during_fio} kills\n{}",
        diag()
    );
    let runs: usize = value(&out, "fio_runs").parse().unwrap();
    eprintln!(
        "drill: {i} kills of drblk ({kills_during_fio} during fio) over {runs} fio runs ({:?} total); reconnect ms: {reconnect_ms:?}",
        t0.elapsed()
    );
    assert!(
        kills_during_fio >= MIN_KILLS,
        "only {kills_during_fio} kills landed while fio ran (want ≥ {MIN_KILLS})"
    );
    for r in 0..runs {
        assert_fio_verified(&out, &format!("fio.{r}"), 2, 32 * MIB);
    }
    assert_no_guest_io_errors(&out);
    assert!(
        d.stop(),
        "drblk did not exit cleanly on SIGTERM\n{}",
        d.all_logs()
    );
}

/// A secondary (`drblk secondary` on `replica`, its log in `dir`) and a primary serving
/// `img` on `sock` with two queues, replicating to it; certificates in `dir/certs`.
fn replicated_pair(
    dir: &std::path::Path,
    img: &std::path::Path,
    replica: &std::path::Path,
    sock: &std::path::Path,
) -> (std::process::Child, Backend) {
    replicated_group(dir, &[img], &[replica], &[sock], &[])
}

/// [`replicated_pair`] for a group: `drblk serve` of every `imgs[i]` on `socks[i]` (one
/// daemon, one group), replicating to one `drblk secondary` of the `replicas` in order;
/// `extra` arguments for the primary.
fn replicated_group(
    dir: &std::path::Path,
    imgs: &[&std::path::Path],
    replicas: &[&std::path::Path],
    socks: &[&std::path::Path],
    extra: &[&str],
) -> (std::process::Child, Backend) {
    let certs = dir.join("certs");
    let st = std::process::Command::new(daemons::DRBLK_BIN)
        .args(["cert", "--dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(st.status.success());
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secondary_log = std::fs::File::create(dir.join("secondary.log")).unwrap();
    let mut c = std::process::Command::new(daemons::DRBLK_BIN);
    c.args(["secondary", "--listen", &format!("127.0.0.1:{port}")]);
    for r in replicas {
        c.arg("--disk").arg(r);
    }
    let secondary = c
        .arg("--certs")
        .arg(&certs)
        .stderr(secondary_log)
        .spawn()
        .unwrap();
    let to = format!("127.0.0.1:{port}");
    let certs_s = certs.display().to_string();
    let pairs: Vec<String> = imgs
        .iter()
        .zip(socks)
        .skip(1)
        .flat_map(|(i, s)| {
            [
                "--disk".into(),
                i.display().to_string(),
                "--socket".into(),
                s.display().to_string(),
            ]
        })
        .collect();
    let mut args: Vec<&str> = pairs.iter().map(String::as_str).collect();
    args.extend(["--queues", "2", "--replicate-to", &to, "--certs", &certs_s]);
    args.extend(extra);
    let primary = Backend::drblk("primary", imgs[0], socks[0], &args, None);
    (secondary, primary)
}

/// Failover with real guests: a guest on the primary writes with fio (crc32c verify
/// headers), the primary drains a group, then the primary site is lost (`kill -9`). The
/// replica is promoted (`drblk promote`), served by `drblk serve`, and a second guest
/// booted on it verifies with fio every block the first guest wrote before that group.
#[test]
fn a_guest_boots_on_the_promoted_replica_and_verifies_the_primarys_data() {
    if skip_vm("a_guest_boots_on_the_promoted_replica_and_verifies_the_primarys_data") {
        return;
    }
    let _g = guest_lock();
    let dir = tempfile::tempdir().unwrap();
    let (img, replica) = (dir.path().join("p.img"), dir.path().join("r.img"));
    let (sock, rsock) = (dir.path().join("p.sock"), dir.path().join("r.sock"));
    create_image(&img, 64 * MIB);
    let (mut secondary, mut primary) = replicated_pair(dir.path(), &img, &replica, &sock);
    let fio = "fio --name=dr --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite \
               --bs=4k --size=16M --iodepth=8 --randseed=4242 --verify=crc32c --verify_fatal=1 \
               --output-format=json";
    let job = format!(
        "drblk_wait_dev vda || exit 1\n\
         drblk_section write {fio} --do_verify=0\n\
         drblk_value phase written\n\
         sleep 60\n"
    );
    let mut vm = VmBuilder::new()
        .disk(&sock)
        .job(job)
        .timeout(Duration::from_secs(180))
        .guest_timeout_secs(170)
        .spawn()
        .unwrap();
    assert!(
        vm.wait_for("DRBLK-VALUE phase written", Duration::from_secs(150)),
        "guest never wrote\n{}\n{}",
        vm.serial(),
        primary.all_logs()
    );
    // Every write the guest completed is in the group this drain waits for.
    let drained = std::process::Command::new(daemons::DRBLK_BIN)
        .args(["ctl", "--socket"])
        .arg(&sock)
        .arg("drain")
        .output()
        .unwrap();
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    // The primary site is lost.
    primary.kill9();
    vm.kill();
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(secondary.id() as i32, libc::SIGTERM) };
    let _ = secondary.wait();

    let promoted = std::process::Command::new(daemons::DRBLK_BIN)
        .args(["promote", "--disk"])
        .arg(&replica)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&promoted.stdout).into_owned();
    assert!(
        promoted.status.success(),
        "promote: {said}{}",
        String::from_utf8_lossy(&promoted.stderr)
    );
    println!("{said}");
    let mut served = Backend::drblk("promoted", &replica, &rsock, &["--queues", "2"], None);
    let out = VmBuilder::new()
        .disk(&rsock)
        .job(format!(
            "drblk_wait_dev vda || exit 1\n\
             drblk_section verify {fio} --verify_only=1\n\
             exit 0\n"
        ))
        .timeout(Duration::from_secs(180))
        .guest_timeout_secs(170)
        .run();
    assert!(
        out.success(),
        "guest on the promoted disk failed\n{}\n{}",
        out.diagnostics(),
        served.all_logs()
    );
    assert_rc0(&out, "verify");
    let report = out.fio("verify");
    assert_eq!(report.jobs.len(), 1);
    assert_eq!(
        report.jobs[0].error, 0,
        "fio verify error on the promoted disk"
    );
    assert_eq!(
        report.jobs[0].read.io_bytes,
        16 * MIB,
        "fio verified less than it wrote"
    );
    assert!(served.stop(), "{}", served.all_logs());
}

/// Runs `drblk ctl ARGS` and returns its JSON answer (the command must succeed).
fn ctl_json(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = std::process::Command::new(daemons::DRBLK_BIN)
        .arg("ctl")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A live DR drill with real guests: a guest on the primary writes a region with fio
/// (crc32c verify headers), the primary drains, and the guest goes on writing elsewhere.
/// A drill is started on the running secondary; a second guest boots on the drill's
/// socket, verifies with fio every block of that region, and runs its own fio write and
/// verify load on the drill — while replication goes on. At the end the drill is stopped
/// and the replica drains to exactly the primary's image: the drill's writes never reached it.
#[test]
fn a_guest_boots_on_a_drill_while_the_primary_keeps_replicating() {
    if skip_vm("a_guest_boots_on_a_drill_while_the_primary_keeps_replicating") {
        return;
    }
    let _g = guest_lock();
    let dir = tempfile::tempdir().unwrap();
    let (img, replica) = (dir.path().join("p.img"), dir.path().join("r.img"));
    let (sock, dsock) = (dir.path().join("p.sock"), dir.path().join("drill.sock"));
    create_image(&img, 64 * MIB);
    let (mut secondary, mut primary) = replicated_pair(dir.path(), &img, &replica, &sock);
    let control = dir.path().join("r.img.state/ctl");
    let fio = "fio --name=dr --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite \
               --bs=4k --size=16M --iodepth=8 --randseed=4242 --verify=crc32c --verify_fatal=1 \
               --output-format=json";
    let mut vm = VmBuilder::new()
        .disk(&sock)
        .job(format!(
            "drblk_wait_dev vda || exit 1\n\
             drblk_section write {fio} --do_verify=0\n\
             drblk_value phase written\n\
             fio --name=more --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite \
             --bs=4k --offset=32M --size=16M --iodepth=4 --time_based --runtime=600 >/dev/null 2>&1\n"
        ))
        .timeout(Duration::from_secs(900))
        .guest_timeout_secs(890)
        .spawn()
        .unwrap();
    assert!(
        vm.wait_for("DRBLK-VALUE phase written", Duration::from_secs(300)),
        "guest never wrote\n{}\n{}",
        vm.serial(),
        primary.all_logs()
    );
    let drained = ctl_json(&["--socket".as_ref(), sock.as_os_str(), "drain".as_ref()]);
    let drained_cg = drained["cg"].as_u64().unwrap();
    let started = ctl_json(&[
        "--control".as_ref(),
        control.as_os_str(),
        "drill".as_ref(),
        "start".as_ref(),
        "--socket".as_ref(),
        dsock.as_os_str(),
    ]);
    let drill_cg = started["cg"].as_u64().unwrap();
    assert!(drill_cg >= drained_cg, "{started}");
    let out = VmBuilder::new()
        .disk(&dsock)
        .job(format!(
            "drblk_wait_dev vda || exit 1\n\
             drblk_section verify {fio} --verify_only=1\n\
             drblk_section own fio --name=drill --filename=/dev/vda --ioengine=libaio --direct=1 \
             --rw=randwrite --bs=4k --offset=16M --size=8M --iodepth=8 --verify=crc32c \
             --verify_fatal=1 --output-format=json\n\
             exit 0\n"
        ))
        .timeout(Duration::from_secs(600))
        .guest_timeout_secs(590)
        .run();
    let status = ctl_json(&[
        "--control".as_ref(),
        control.as_os_str(),
        "drill".as_ref(),
        "status".as_ref(),
    ]);
    let logs = || {
        format!(
            "{}\n--- secondary\n{}",
            primary.all_logs(),
            std::fs::read_to_string(dir.path().join("secondary.log")).unwrap_or_default()
        )
    };
    assert!(
        out.success(),
        "guest on the drill failed\n{}\n{status}\n{}",
        out.diagnostics(),
        logs()
    );
    assert_rc0(&out, "verify");
    let verify = out.fio("verify");
    assert_eq!(verify.jobs[0].error, 0, "fio verify error on the drill");
    assert_eq!(
        verify.jobs[0].read.io_bytes,
        16 * MIB,
        "fio verified less than it wrote"
    );
    assert_rc0(&out, "own");
    let own = out.fio("own");
    assert_eq!(own.jobs[0].error, 0, "the drill's own fio failed");
    assert_eq!(own.jobs[0].write.io_bytes, 8 * MIB);
    assert_eq!(
        own.jobs[0].read.io_bytes,
        8 * MIB,
        "the drill's own writes did not verify"
    );
    assert_no_guest_io_errors(&out);
    // Replication went on during the drill: the primary's guest kept writing and later
    // groups committed; the drill kept its group.
    let acked = ctl_json(&["--socket".as_ref(), sock.as_os_str(), "status".as_ref()])
        ["replication"]["last_committed_cg"]
        .as_u64()
        .unwrap();
    assert!(
        acked > drill_cg,
        "no group committed during the drill ({acked} <= {drill_cg})"
    );
    assert_eq!(status["cg"].as_u64(), Some(drill_cg), "{status}");
    assert!(
        status["overlay_bytes"].as_u64().unwrap() >= 8 * MIB,
        "{status}"
    );
    println!("drill at CG {drill_cg}: the primary committed up to CG {acked} meanwhile; {status}");

    ctl_json(&[
        "--control".as_ref(),
        control.as_os_str(),
        "drill".as_ref(),
        "stop".as_ref(),
    ]);
    vm.kill();
    ctl_json(&["--socket".as_ref(), sock.as_os_str(), "drain".as_ref()]);
    assert!(
        std::fs::read(&img).unwrap() == std::fs::read(&replica).unwrap(),
        "the replica differs from the primary after the drill\n{}",
        logs()
    );
    assert!(primary.stop(), "{}", primary.all_logs());
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(secondary.id() as i32, libc::SIGTERM) };
    let _ = secondary.wait();
}

/// Issue 13: one VM, two disks served by one `drblk serve` as one consistency group. A
/// writer in the guest alternates between them — write `i` goes to vda when `i` is odd and
/// to vdb when it is even, each an O_DIRECT `dd` issued only after the previous one
/// completed — so every write depends on the one before it, on the other disk. Both sites
/// are killed (`kill -9`), the pair of replicas is promoted as one (`drblk promote --disk
/// RA --disk RB`), and the two replicas together must hold exactly writes 1..=M for some M:
/// a write on one disk without the earlier write on the other would be a torn group.
#[test]
fn a_guest_writing_across_two_disks_fails_over_to_one_consistent_pair() {
    if skip_vm("a_guest_writing_across_two_disks_fails_over_to_one_consistent_pair") {
        return;
    }
    let _g = guest_lock();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let (disks, replicas, socks) = (
        [p.join("a.img"), p.join("b.img")],
        [p.join("ra.img"), p.join("rb.img")],
        [p.join("a.sock"), p.join("b.sock")],
    );
    const SIZE: u64 = 16 * MIB;
    for d in &disks {
        create_image(d, SIZE);
    }
    let (mut secondary, mut primary) = replicated_group(
        p,
        &[&disks[0], &disks[1]],
        &[&replicas[0], &replicas[1]],
        &[&socks[0], &socks[1]],
        &["--cg-interval", "50ms"],
    );
    assert!(
        daemons::wait_until(Duration::from_secs(60), || socks[1].exists()),
        "the second socket never appeared\n{}",
        primary.all_logs()
    );
    let blocks = SIZE / 4096;
    let job = format!(
        "drblk_wait_dev vda || exit 1\n\
         drblk_wait_dev vdb || exit 1\n\
         i=1\n\
         while true; do\n\
           if [ $((i % 2)) -eq 1 ]; then dev=/dev/vda; else dev=/dev/vdb; fi\n\
           s=$(printf '%015d|' $i)\n\
           s=$s$s; s=$s$s; s=$s$s; s=$s$s; s=$s$s; s=$s$s; s=$s$s; s=$s$s\n\
           printf '%s' \"$s\" > /tmp/blk\n\
           dd if=/tmp/blk of=$dev bs=4096 seek=$(( (i / 2) % {blocks} )) count=1 oflag=direct conv=notrunc 2>/dev/null || {{ drblk_value failed $i; exit 1; }}\n\
           if [ $i -eq 300 ]; then drblk_value phase written; fi\n\
           i=$((i + 1))\n\
         done\n"
    );
    let mut vm = VmBuilder::new()
        .disk(&socks[0])
        .disk(&socks[1])
        .job(job)
        .timeout(Duration::from_secs(240))
        .guest_timeout_secs(230)
        .spawn()
        .unwrap();
    assert!(
        vm.wait_for("DRBLK-VALUE phase written", Duration::from_secs(200)),
        "the guest never wrote 300 times\n{}\n{}",
        vm.serial(),
        primary.all_logs()
    );
    // More groups with writes in them, then both sites are lost.
    std::thread::sleep(Duration::from_secs(3));
    primary.kill9();
    let _ = secondary.kill();
    let _ = secondary.wait();
    vm.kill();

    let promoted = std::process::Command::new(daemons::DRBLK_BIN)
        .args(["promote", "--disk"])
        .arg(&replicas[0])
        .arg("--disk")
        .arg(&replicas[1])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&promoted.stdout).into_owned();
    assert!(
        promoted.status.success(),
        "promote: {said}{}\n{}",
        String::from_utf8_lossy(&promoted.stderr),
        std::fs::read_to_string(p.join("secondary.log")).unwrap_or_default()
    );
    println!("{said}");
    let images = [
        std::fs::read(&replicas[0]).unwrap(),
        std::fs::read(&replicas[1]).unwrap(),
    ];
    match check_alternating_writes(&images, blocks) {
        Ok(m) => {
            println!("the promoted pair holds writes 1..={m} of the guest, none missing");
            assert!(m >= 300, "only {m} writes reached the promoted pair");
        }
        Err(e) => panic!("the promoted pair is not one consistent state: {e}\n{said}"),
    }
}

/// The two images hold exactly the guest's writes 1..=M for some M (write `i`: disk
/// `(i + 1) % 2`, block `(i / 2) % blocks`, 4 KiB of `"%015d|"` of `i`); returns M.
fn check_alternating_writes(images: &[Vec<u8>; 2], blocks: u64) -> Result<u64, String> {
    let place = |i: u64| (((i + 1) % 2) as usize, (i / 2) % blocks);
    let mut held = [vec![0u64; blocks as usize], vec![0u64; blocks as usize]];
    for d in 0..2 {
        for b in 0..blocks as usize {
            let blk = &images[d][b * 4096..(b + 1) * 4096];
            if blk.iter().all(|&x| x == 0) {
                continue;
            }
            let id: u64 = std::str::from_utf8(&blk[..15])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("disk {d} block {b} holds no write"))?;
            let want = format!("{id:015}|").repeat(256);
            if blk != want.as_bytes() {
                return Err(format!("disk {d} block {b} is torn (write {id})"));
            }
            if place(id) != (d, b as u64) {
                return Err(format!(
                    "disk {d} block {b} holds write {id}, written elsewhere"
                ));
            }
            held[d][b] = id;
        }
    }
    let m = held.iter().flatten().copied().max().unwrap_or(0);
    let mut want = [vec![0u64; blocks as usize], vec![0u64; blocks as usize]];
    for i in 1..=m {
        let (d, b) = place(i);
        want[d][b as usize] = i;
    }
    for d in 0..2 {
        for b in 0..blocks as usize {
            if held[d][b] != want[d][b] {
                return Err(format!(
                    "write {m} is there, but disk {d} block {b} holds {} instead of {} (written before it)",
                    held[d][b], want[d][b]
                ));
            }
        }
    }
    Ok(m)
}

#[test]
fn the_alternating_writes_check_finds_a_missing_earlier_write() {
    let blocks = 4;
    let mut images = [vec![0u8; 4 * 4096], vec![0u8; 4 * 4096]];
    let put = |images: &mut [Vec<u8>; 2], i: u64| {
        let (d, b) = (((i + 1) % 2) as usize, ((i / 2) % blocks) as usize);
        images[d][b * 4096..(b + 1) * 4096]
            .copy_from_slice(format!("{i:015}|").repeat(256).as_bytes());
    };
    for i in 1..=11 {
        put(&mut images, i);
    }
    assert_eq!(check_alternating_writes(&images, blocks), Ok(11));
    // Write 10 (disk 1) lost while 11 (disk 0) is there: not a state the guest was in.
    let mut lost = images.clone();
    let b = (10 / 2) % blocks as usize;
    lost[1][b * 4096..(b + 1) * 4096].copy_from_slice(format!("{:015}|", 2).repeat(256).as_bytes());
    assert!(check_alternating_writes(&lost, blocks).is_err());
    // A torn block.
    let mut torn = images.clone();
    torn[0][100] = b'x';
    assert!(check_alternating_writes(&torn, blocks).is_err());
}

/// The harness's answer to a guest kernel that never reaches its init (seen once under
/// TCG on a loaded machine, with nothing on the console): after the boot-stall limit it
/// reports the vCPUs and every thread of QEMU, and — the monitor saying the guest runs —
/// starts QEMU once more, never twice. Simulated with an init that sleeps instead of
/// printing `DRBLK-INIT`.
#[test]
fn a_guest_that_never_reaches_its_init_is_started_once_more_and_only_once() {
    if skip_vm("a_guest_that_never_reaches_its_init_is_started_once_more_and_only_once") {
        return;
    }
    let _g = guest_lock();
    let mut vm = VmBuilder::new()
        .kernel_arg("rdinit=/bin/busybox")
        .kernel_arg("sleep")
        .kernel_arg("600")
        .boot_stall(Duration::from_secs(8))
        .timeout(Duration::from_secs(120))
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    // The wait starts again with the second QEMU and outlasts two stall periods: one
    // restart, then nothing more.
    assert!(!vm.wait_for("DRBLK-INIT", Duration::from_secs(20)));
    assert!(vm.boot_restarted(), "QEMU was not started again");
    assert!(
        t0.elapsed() >= Duration::from_secs(28),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        vm.serial().contains("Linux version"),
        "the second QEMU's console is read: {}",
        vm.serial()
    );
    vm.kill();
}
