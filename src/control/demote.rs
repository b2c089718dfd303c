//! `drblk ctl demote`: the primary's half of a planned switchover.
//!
//! # Steps, and why nothing is lost
//! 1. Raise the write fence and wait for the writes already past it (see
//!    [`crate::blk::fence`]): from here no write reaches the disk, so the next group holds
//!    every write there will ever be.
//! 2. Drain: form a group and wait until the secondary has committed it (CG n).
//! 3. Stop the cycle (and with it the link). Groups formed between 2 and 3 are empty (the
//!    fence holds) but move the secondary on: n becomes the cycle's last committed group
//!    once it has stopped, and no later group follows.
//! 4. Make the change record exact (it is empty now) and acknowledged at n.
//! 5. Write the lineage: demoted at n. `drblk serve` refuses the disk from now on; the
//!    promoted secondary holds n, and this disk can rejoin as its secondary with nothing
//!    to resync. A crash before 5 leaves a primary that restarts as one (its record says
//!    what it holds); a crash after it, a demoted disk.
//!
//! A failure before step 3 lowers the fence again: the primary carries on as before.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};

use super::ControlState;
use crate::lineage::{Lineage, Role};

impl ControlState {
    /// Demotes this primary (see the module docs); returns the CG it was demoted at.
    pub(super) fn demote(&self, force: bool) -> anyhow::Result<u64> {
        if self.members.len() > 1 {
            // doc/design/multi-disk-groups.md step 9: every disk's fence, one drain, every
            // lineage.
            bail!(
                "this daemon serves a group of {} disks: demoting a group is not supported yet; \
                 for a switchover stop the VM, `drblk ctl drain`, stop this daemon, then promote \
                 the secondary",
                self.members.len()
            );
        }
        let me = self.first();
        let disk = me.shared.executor.disk().path().to_path_buf();
        if self.cycle.lock().expect("cycle lock").is_none() {
            bail!(
                "{} is not replicated: there is no secondary to hand over to",
                disk.display()
            );
        }
        let lineage = Lineage::load(&disk)?
            .with_context(|| format!("{} has no lineage file", disk.display()))?;
        if !lineage.role.writes() {
            bail!(
                "{} is {}: only a primary can be demoted",
                disk.display(),
                lineage.describe()
            );
        }
        let attached = || {
            let n = me.shared.stats.frontends.load(Ordering::SeqCst);
            (n > 0 && !force).then(|| anyhow::anyhow!(
                "a frontend (the VM) is connected to {}: shut the VM down first, or pass --force (its writes then fail)",
                disk.display()
            ))
        };
        // Checked before the fence goes up, so a refusal fails no guest write.
        if let Some(e) = attached() {
            return Err(e);
        }
        let fence = me.shared.executor.fence();
        match fence.raise(Duration::from_secs(60)) {
            Err(_) => bail!(
                "a demotion is already running (or done) on {}",
                disk.display()
            ),
            Ok(false) => {
                fence.lower();
                bail!("writes did not finish within 60 s; the disk takes writes again (some may have failed meanwhile)");
            }
            Ok(true) => {}
        }
        // A VM that connected in between.
        if let Some(e) = attached() {
            fence.lower();
            return Err(e);
        }
        let frontends = me.shared.stats.frontends.load(Ordering::SeqCst);
        tracing::info!(disk = %disk.display(), frontends, "demoting: writes are refused from now on; forming the final group");
        let cg = match self.drain() {
            Ok(cg) => cg,
            Err(e) => {
                fence.lower();
                return Err(e.context("the final group did not commit; the primary carries on"));
            }
        };
        // Groups formed between the drain and the stop (empty: writes are fenced) move the
        // secondary on: the CG it holds is the cycle's last committed one once it stopped.
        let cg = match self.cycle.lock().expect("cycle lock").take() {
            Some(c) => {
                let stats = c.stats().clone();
                c.stop()
                    .context("stopping replication after the final group")?;
                stats.last_committed.load(Ordering::SeqCst).max(cg)
            }
            None => cg,
        };
        if let Some(r) = &me.record {
            r.refresh(true).context("closing the change record")?;
        }
        let demoted = Lineage {
            role: Role::Demoted,
            since_cg: cg,
            changed_at_unix_us: crate::sys::clock::now_unix_micros(),
            ..lineage
        };
        demoted.store(&disk)?;
        tracing::info!(disk = %disk.display(), cg, "demoted at CG {cg}: the secondary holds every write; promote it, then run this disk as its secondary (`drblk secondary --disk {}`); stop this daemon", disk.display());
        Ok(cg)
    }
}
