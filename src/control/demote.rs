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
//!
//! A daemon serving a group of disks demotes them as one: every disk's fence (all of them
//! lowered again on a failure), one drain, every disk's record, every disk's lineage.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};

use super::ControlState;
use crate::lineage::{Lineage, Role};

impl ControlState {
    /// Demotes this primary (see the module docs); returns the CG it was demoted at. A
    /// group of several disks is demoted as one: every disk's fence goes up, one final
    /// group holds every disk's last writes, and every disk's lineage says demoted at it.
    pub(super) fn demote(&self, force: bool) -> anyhow::Result<u64> {
        let disks: Vec<_> = self
            .members
            .iter()
            .map(|m| m.shared.executor.disk().path().to_path_buf())
            .collect();
        let names = disks
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ");
        if self.cycle.lock().expect("cycle lock").is_none() {
            bail!("{names} is not replicated: there is no secondary to hand over to");
        }
        // The anchor's lineage speaks for the group (every disk holds the same).
        let lineage = Lineage::load(&disks[0])?
            .with_context(|| format!("{} has no lineage file", disks[0].display()))?;
        if !lineage.role.writes() {
            bail!(
                "{} is {}: only a primary can be demoted",
                disks[0].display(),
                lineage.describe()
            );
        }
        let attached = || {
            let on: Vec<String> = self
                .members
                .iter()
                .zip(&disks)
                .filter(|(m, _)| m.shared.stats.frontends.load(Ordering::SeqCst) > 0)
                .map(|(_, d)| d.display().to_string())
                .collect();
            (!on.is_empty() && !force).then(|| anyhow::anyhow!(
                "a frontend (the VM) is connected to {}: shut the VM down first, or pass --force (its writes then fail)",
                on.join(" and ")
            ))
        };
        // Checked before the fences go up, so a refusal fails no guest write.
        if let Some(e) = attached() {
            return Err(e);
        }
        let fences: Vec<_> = self
            .members
            .iter()
            .map(|m| m.shared.executor.fence())
            .collect();
        let lower = |n: usize| fences[..n].iter().for_each(|f| f.lower());
        for (i, fence) in fences.iter().enumerate() {
            match fence.raise(Duration::from_secs(60)) {
                Err(_) => {
                    lower(i);
                    bail!("a demotion is already running (or done) on {names}");
                }
                Ok(false) => {
                    lower(i + 1);
                    bail!("writes did not finish within 60 s; the disks take writes again (some may have failed meanwhile)");
                }
                Ok(true) => {}
            }
        }
        // A VM that connected in between.
        if let Some(e) = attached() {
            lower(fences.len());
            return Err(e);
        }
        tracing::info!(disks = %names, "demoting: writes are refused from now on; forming the final group");
        let cg = match self.drain() {
            Ok(cg) => cg,
            Err(e) => {
                lower(fences.len());
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
        for r in self.members.iter().filter_map(|m| m.record.as_ref()) {
            r.refresh(true).context("closing the change record")?;
        }
        let demoted = Lineage {
            role: Role::Demoted,
            since_cg: cg,
            changed_at_unix_us: crate::sys::clock::now_unix_micros(),
            ..lineage
        };
        // Every disk's, the anchor's last. A crash between two of these writes leaves a
        // group `drblk serve` refuses (a disk says demoted), but the final group is already
        // committed on the secondary and every record is exact: the switchover is finished
        // as when this returns — promote the secondary, run this site as its secondary.
        for d in disks.iter().skip(1).chain(&disks[..1]) {
            demoted.store(d)?;
        }
        let again = disks
            .iter()
            .map(|d| format!("--disk {}", d.display()))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(disks = %names, cg, "demoted at CG {cg}: the secondary holds every write; promote it, then run this site as its secondary (`drblk secondary {again}`); stop this daemon");
        Ok(cg)
    }
}
