//! A real vhost-user-blk frontend for the demo, the tests and the benchmark: libblkio's Rust
//! core (`blkio` crate, driver `virtio-blk-vhost-user`), which implements the virtio driver
//! side in user space against the same socket a hypervisor would use.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A connected frontend with a shared-memory buffer region.
pub struct BlkioClient {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    capacity: u64,
}

/// One request for [`BlkioClient::submit`].
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Read `len` bytes at disk `offset` into the buffer region at `buf`.
    Read {
        /// Disk offset.
        offset: u64,
        /// Offset in the buffer region.
        buf: usize,
        /// Length.
        len: usize,
    },
    /// Write `len` bytes from the buffer region at `buf` to disk `offset`.
    Write {
        /// Disk offset.
        offset: u64,
        /// Offset in the buffer region.
        buf: usize,
        /// Length.
        len: usize,
    },
    /// Flush.
    Flush,
    /// Discard a range.
    Discard {
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Write zeroes to a range (`unmap`: allow deallocation).
    WriteZeroes {
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Allow deallocation.
        unmap: bool,
    },
}

fn berr(e: blkio::Error) -> anyhow::Error {
    anyhow!("blkio: {} ({:?})", e.message(), e.errno())
}

impl BlkioClient {
    /// Connects to the vhost-user-blk socket with `num_queues` queues and a `buf_len`-byte
    /// buffer region in shared memory.
    pub fn connect(
        socket: &Path,
        num_queues: usize,
        buf_len: usize,
        readonly: bool,
    ) -> anyhow::Result<Self> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(berr)?;
        blkio
            .set_str("path", &socket.to_string_lossy())
            .map_err(berr)?;
        blkio.set_bool("read-only", readonly).map_err(berr)?;
        blkio
            .connect()
            .map_err(berr)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        blkio
            .set_i32("num-queues", num_queues as i32)
            .map_err(berr)?;
        let started = blkio.start().map_err(berr)?;
        let capacity = blkio.get_u64("capacity").map_err(berr)?;
        let align = blkio.get_u64("mem-region-alignment").map_err(berr)? as usize;
        let len = buf_len.div_ceil(align.max(4096)) * align.max(4096);
        let region = blkio.alloc_mem_region(len).map_err(berr)?;
        blkio.map_mem_region(&region).map_err(berr)?;
        Ok(BlkioClient {
            blkio,
            queues: started.queues,
            region,
            capacity,
        })
    }

    /// Disk capacity in bytes as the device reports it.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// A property of the device (e.g. "max-discard-len").
    pub fn get_u64(&self, name: &str) -> anyhow::Result<u64> {
        self.blkio.get_u64(name).map_err(berr)
    }

    /// The buffer region.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region was allocated by blkio for `len` bytes and lives as long as self;
        // &mut self guarantees no other slice of it is alive.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Queues `op` on queue `q` with `user_data`; it is executed by the next `wait`.
    pub fn submit(&mut self, q: usize, op: Op, user_data: usize) {
        let base = self.region.addr as *mut u8;
        assert!(
            match op {
                Op::Read { buf, len, .. } | Op::Write { buf, len, .. } =>
                    buf + len <= self.region.len,
                _ => true,
            },
            "buffer outside the region"
        );
        let queue = &mut self.queues[q];
        match op {
            Op::Read { offset, buf, len } => {
                // SAFETY: buf + len was checked against the region's length just above.
                let p = unsafe { base.add(buf) };
                queue.read(offset, p, len, user_data, ReqFlags::empty())
            }
            Op::Write { offset, buf, len } => {
                // SAFETY: buf + len was checked against the region's length just above.
                let p = unsafe { base.add(buf) };
                queue.write(offset, p, len, user_data, ReqFlags::empty())
            }
            Op::Flush => queue.flush(user_data, ReqFlags::empty()),
            Op::Discard { offset, len } => queue.discard(offset, len, user_data, ReqFlags::empty()),
            Op::WriteZeroes { offset, len, unmap } => {
                let flags = if unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                queue.write_zeroes(offset, len, user_data, flags)
            }
        }
    }

    /// Submits queued requests on `q` and waits for at least `min` completions; returns
    /// (user_data, ret) pairs where ret is 0 or a negative errno. The 120 s limit is a hang
    /// guard: a buffered write on a machine busy with writeback can take seconds.
    pub fn wait(&mut self, q: usize, min: usize) -> anyhow::Result<Vec<(usize, i32)>> {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..256.max(min)).map(|_| MaybeUninit::uninit()).collect();
        let mut out = Vec::new();
        let mut timeout = Duration::from_secs(120);
        while out.len() < min.max(1) || out.is_empty() {
            let want = min.saturating_sub(out.len());
            let n = self.queues[q]
                .do_io(&mut comps, want, Some(&mut timeout), None)
                .map_err(berr)?;
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c.assume_init_ref() };
                out.push((c.user_data, c.ret));
            }
            if out.len() >= min {
                break;
            }
            if timeout.is_zero() {
                bail!("timed out waiting for {min} completions on queue {q}");
            }
        }
        Ok(out)
    }

    /// Submits queued requests on `q` and collects whatever completed, without waiting.
    pub fn poll(
        &mut self,
        q: usize,
        comps: &mut [MaybeUninit<Completion>],
        min: usize,
    ) -> anyhow::Result<usize> {
        self.queues[q].do_io(comps, min, None, None).map_err(berr)
    }

    /// Submits queued requests on `q` and waits asleep, at most `timeout`, until at least
    /// one has completed; returns how many did (0 if none in time).
    pub fn poll_sleeping(
        &mut self,
        q: usize,
        comps: &mut [MaybeUninit<Completion>],
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let mut left = timeout;
        match self.queues[q].do_io(comps, 1, Some(&mut left), None) {
            Ok(n) => Ok(n),
            Err(e) if e.errno() == blkio::Errno::TIME => Ok(0),
            Err(e) => Err(berr(e)),
        }
    }

    /// Runs one request synchronously; errors on a non-zero completion status.
    pub fn run(&mut self, q: usize, op: Op) -> anyhow::Result<()> {
        self.submit(q, op, 0);
        let r = self.wait(q, 1)?;
        match r.first() {
            Some((_, 0)) => Ok(()),
            Some((_, ret)) => bail!("{op:?} failed: errno {}", -ret),
            None => bail!("{op:?}: no completion"),
        }
    }
}

impl Drop for BlkioClient {
    fn drop(&mut self) {
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}
