//! Committing a CG (the durable commit record), and dropping uncommitted data (link loss,
//! promotion).

use super::fault::CrashPoint;
use super::format::{Header, RecordType};
use super::journal;
use super::state::Mode;
use super::{Error, ReplicaStore, Result};

impl ReplicaStore {
    /// Commit CG `cg`: [`commit_durable`](Self::commit_durable) then
    /// [`apply_committed`](Self::apply_committed).
    pub fn commit(&mut self, cg: u64, frozen_at_unix_us: u64) -> Result<()> {
        self.commit_durable(cg, frozen_at_unix_us)?;
        self.apply_committed()
    }

    /// Make CG `cg` durable: verify the staged records, fdatasync, write the commit
    /// record, fdatasync. When this returns Ok the CG survives any crash: acknowledge the
    /// primary. The commit record counts the staged chunks (not records). All staged
    /// chunks must belong to CGs `<= cg`. Committing the last committed CG again with
    /// nothing staged is a no-op (a repeated "complete" after a reconnect).
    pub fn commit_durable(&mut self, cg: u64, frozen_at_unix_us: u64) -> Result<()> {
        self.check_cycles("commit")?;
        if cg == self.st.last_committed_cg && self.staged.is_empty() {
            return Ok(());
        }
        if cg <= self.st.last_committed_cg {
            return Err(Error::InvalidArgument(format!(
                "commit of CG {cg}, but CG {} is already committed",
                self.st.last_committed_cg
            )));
        }
        if let Some((i, e)) = self.staged.iter().find(|(_, e)| e.cg > cg) {
            return Err(Error::InvalidArgument(format!(
                "commit of CG {cg} while {i} of CG {} is staged",
                e.cg
            )));
        }
        self.guard(|s| {
            // Every distinct record once (an extent record is shared by its chunks), in
            // journal order. A bad one fails here, before anything is committed. What is
            // read is kept (up to a bound) for the apply, which then reads no record twice.
            let t0 = std::time::Instant::now();
            let mut buf = Vec::new();
            s.copies.clear();
            for group in journal::by_record(&s.staged) {
                let (i, e) = group[0];
                let kept = match s.copies.slot(e.offset, e.len as usize) {
                    Some(slot) => s.journal.read_record_into(i, &e, slot),
                    None => s.journal.read_record(i, &e, &mut buf),
                };
                if let Err(err) = kept {
                    s.copies.clear();
                    return Err(err);
                }
            }
            let verified = t0.elapsed();
            s.journal.sync()?;
            let synced = t0.elapsed();
            s.fault.hit(CrashPoint::BeforeCommitRecord)?;
            let h = Header::new(
                RecordType::Commit,
                s.journal.gen,
                cg,
                s.staged.len() as u64,
                frozen_at_unix_us,
                0,
            );
            if s.fault.is_armed(CrashPoint::TornCommitRecord) {
                s.journal.append_torn(h)?;
                s.fault.hit(CrashPoint::TornCommitRecord)?;
            }
            s.journal.append(h, &[])?;
            s.fault.hit(CrashPoint::AfterCommitRecordWrite)?;
            s.journal.sync()?;
            s.pending_apply = Some((cg, frozen_at_unix_us));
            tracing::debug!(cg, chunks = s.staged.len(), ?verified, ?synced, total = ?t0.elapsed(), "CG durable");
            s.fault.hit(CrashPoint::AfterCommitDurable)
        })
    }

    /// Link loss: drop everything staged and not committed.
    pub fn discard_uncommitted(&mut self) -> Result<()> {
        self.check_cycles("discard_uncommitted")?;
        self.guard(|s| {
            s.clear_staged();
            s.checkpoint()
        })
    }

    /// Failover: drop uncommitted data and mark the replica promoted (the image, at the
    /// last committed CG, becomes a writable primary disk). Refused while syncing.
    pub fn promote(&mut self) -> Result<()> {
        self.check_cycles("promote")?;
        self.guard(|s| {
            s.clear_staged();
            s.checkpoint()?;
            s.st.mode = Mode::Promoted;
            s.write_state()
        })
    }

    /// Failover of a replica that is still syncing (the operator forced it): the images are
    /// a mix of old and new chunks, promoted as they are. The images are fsynced first, so
    /// the promoted disks hold at least what the state claims was written.
    pub fn promote_inconsistent(&mut self) -> Result<()> {
        self.check_usable()?;
        if !matches!(self.st.mode, Mode::Syncing { .. }) {
            return self.promote();
        }
        self.guard(|s| {
            s.sync_images()?;
            s.st.mode = Mode::Promoted;
            s.write_state()
        })
    }
}
