//! `drblk ctl verify [--repair]`: the control socket's side. The comparison itself runs in
//! the cycle thread between groups (`replicate::shipper`, `replicate::compare`); this posts
//! the run and waits for its report.

use std::time::Duration;

use anyhow::{bail, Context};

use super::ControlState;
use crate::replicate::shipper::{VerifyReport, VerifyRun};

impl ControlState {
    /// Runs a verify (see the module docs) and returns its report.
    pub(super) fn verify(&self, repair: bool) -> anyhow::Result<VerifyReport> {
        let link = self
            .link
            .lock()
            .expect("link lock")
            .clone()
            .context("this disk is not replicated: there is no secondary to compare with")?;
        let id = {
            let mut g = link.verify.state.lock().expect("verify lock");
            if g.running.is_some() {
                bail!("a verify is already running; wait for its report");
            }
            let id = g.next_id;
            g.next_id += 1;
            g.running = Some(VerifyRun {
                id,
                repair,
                cursor: 0,
                cg: None,
                found: Default::default(),
            });
            id
        };
        tracing::info!(id, repair, "verify started");
        let mut g = link.verify.state.lock().expect("verify lock");
        loop {
            if let Some(r) = g.last.as_ref().filter(|r| r.id == id) {
                let r = r.clone();
                return match &r.error {
                    Some(e) => Err(anyhow::anyhow!("verify stopped: {e}")),
                    None => Ok(r),
                };
            }
            if self.cycle.lock().expect("cycle lock").is_none() {
                g.running = None;
                bail!("replication stopped (demoted?) before the verify finished");
            }
            // Slices run between groups; a trigger forms the next group at once.
            drop(g);
            if let Some(c) = self.cycle.lock().expect("cycle lock").as_ref() {
                c.trigger();
            }
            g = link.verify.state.lock().expect("verify lock");
            g = link
                .verify
                .done
                .wait_timeout(g, Duration::from_millis(50))
                .expect("verify lock")
                .0;
        }
    }
}
