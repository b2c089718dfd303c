//! `drblk ctl verify [--repair]`: the control socket's side. The comparison itself runs in
//! the cycle thread between groups (`replicate::shipper`, `replicate::compare`); this posts
//! the run and waits for its report.

use std::time::Duration;

use anyhow::{bail, Context};

use super::ControlState;

/// How long a verify waits for a lost link to come back before it gives up.
const LINK_DOWN_LIMIT: Duration = Duration::from_secs(60);
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
                disk: 0,
                cursor: 0,
                cg: None,
                found: Default::default(),
            });
            id
        };
        tracing::info!(id, repair, "verify started");
        // Never hold the verify lock while taking the cycle's: the cycle thread takes the
        // verify lock between groups, and stopping the cycle waits for that thread.
        let mut down_since: Option<std::time::Instant> = None;
        loop {
            {
                let g = link.verify.state.lock().expect("verify lock");
                if let Some(r) = g.last.as_ref().filter(|r| r.id == id) {
                    let r = r.clone();
                    return match &r.error {
                        Some(e) => Err(anyhow::anyhow!("verify stopped: {e}")),
                        None => Ok(r),
                    };
                }
            }
            let abandon = |why: &str| -> anyhow::Result<VerifyReport> {
                let mut g = link.verify.state.lock().expect("verify lock");
                if g.running.as_ref().is_some_and(|r| r.id == id) {
                    g.running = None;
                }
                bail!("{why}")
            };
            let cycle_runs = match self.cycle.lock().expect("cycle lock").as_ref() {
                Some(c) => {
                    // Slices run between groups; a trigger forms the next group at once.
                    c.trigger();
                    true
                }
                None => false,
            };
            if !cycle_runs {
                return abandon("replication stopped (demoted?) before the verify finished");
            }
            if link.connected.load(std::sync::atomic::Ordering::SeqCst) {
                down_since = None;
            } else if down_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                > LINK_DOWN_LIMIT
            {
                return abandon("the link to the secondary is down; verify abandoned (run it again once it is back)");
            }
            let g = link.verify.state.lock().expect("verify lock");
            let _ = link
                .verify
                .done
                .wait_timeout(g, Duration::from_millis(50))
                .expect("verify lock");
        }
    }
}
