//! The secondary's side of drills (`crate::drill`): start, status, stop and reaping, under
//! the sink's locks. Lock order: the drill's lock, then the store's.

use std::path::PathBuf;

use anyhow::Context;

use super::StoreSink;
use crate::drill::{Drill, DrillStatus};

impl StoreSink {
    /// `drill start`: a writable clone of the last committed group, each disk on its
    /// socket in `sockets` (in the group's order).
    pub fn drill_start(
        &self,
        sockets: &[PathBuf],
        space: Option<u64>,
    ) -> anyhow::Result<DrillStatus> {
        self.reap_drill();
        let mut d = self.drill.lock().expect("drill lock");
        if let Some(running) = d.as_ref() {
            anyhow::bail!(
                "a drill is running (CG {}, socket {}): stop it first with `drblk ctl --control {} drill stop`",
                running.cg(),
                running.status(None).socket.unwrap_or_default(),
                self.control_hint()
            );
        }
        if self.promoted_here.load(std::sync::atomic::Ordering::SeqCst) {
            anyhow::bail!("this replica was promoted: it is a primary's disk now; serve it with `drblk serve`");
        }
        let space =
            space.unwrap_or_else(|| self.drill_space.load(std::sync::atomic::Ordering::Relaxed));
        let drill = {
            let mut g = self.store.lock().expect("store lock");
            let store = g
                .as_mut()
                .context("no replica here yet: no primary ever connected")?;
            Drill::start(store, &self.drill_dir(), sockets, space)?
        };
        let status = drill.status(None);
        *d = Some(drill);
        Ok(status)
    }

    /// `drill stop`: drops the clone and everything written to it.
    pub fn drill_stop(&self) -> anyhow::Result<DrillStatus> {
        let mut d = self.drill.lock().expect("drill lock");
        let drill = d.take().with_context(|| {
            match self.last_drill_end.lock().expect("drill end").clone() {
                Some(why) => format!("no drill is running (the last one ended by itself: {why})"),
                None => "no drill is running".to_owned(),
            }
        })?;
        let status = drill.status(None);
        self.end_drill(drill, "stopped by the operator")?;
        Ok(status)
    }

    /// `drill status`.
    pub fn drill_status(&self) -> DrillStatus {
        self.reap_drill();
        let last = self.last_drill_end.lock().expect("drill end").clone();
        match self.drill.lock().expect("drill lock").as_ref() {
            Some(d) => d.status(last),
            None => DrillStatus::none(last),
        }
    }

    /// Stops a drill that ended by itself (space, a closed store), keeping why.
    pub fn reap_drill(&self) {
        let mut d = self.drill.lock().expect("drill lock");
        let Some(why) = d.as_ref().and_then(Drill::ended) else {
            return;
        };
        let drill = d.take().expect("checked above");
        tracing::warn!(cg = drill.cg(), reason = %why, "the drill ended by itself; its device is gone");
        *self.last_drill_end.lock().expect("drill end") = Some(why.clone());
        if let Err(e) = self.end_drill(drill, &why) {
            tracing::warn!(error = %format!("{e:#}"), "cleaning up the ended drill");
        }
    }

    /// Stops a running drill before a promotion: the promoted disk is the replica's image,
    /// which drill writes never reach; the drill's device must not outlive the replica.
    /// The caller holds the drill's lock (`d`) through the promotion. A drill whose files
    /// cannot be removed does not stop the failover (the next start removes them).
    pub(super) fn stop_drill_for_promotion(&self, d: &mut Option<Drill>) {
        if let Some(drill) = d.take() {
            tracing::info!(cg = drill.cg(), "stopping the drill before the promotion");
            if let Err(e) = self.end_drill(drill, "the replica is being promoted") {
                tracing::warn!(error = %format!("{e:#}"), "the drill's files stay until the next start; promoting anyway");
            }
        }
    }

    /// Removes the drill's view from the store (if it is still the store's observer) and
    /// stops it. Called with the drill's lock held.
    pub(super) fn end_drill(&self, drill: Drill, reason: &str) -> anyhow::Result<()> {
        // Ended first: from here no read uses the images, so clearing the observers
        // cannot let a read see a later group.
        drill.end_views(reason);
        if let Some(s) = self.store.lock().expect("store lock").as_mut() {
            for k in 0..s.disks() {
                let _ = s.set_image_observer(k, None);
            }
        }
        drill.stop(reason)
    }

    /// Where drills keep their files (`--drill-dir`, default STATE_DIR/drill).
    pub(super) fn drill_dir(&self) -> std::path::PathBuf {
        self.drill_dir
            .lock()
            .expect("drill dir")
            .clone()
            .unwrap_or_else(|| crate::drill::drill_dir(&self.paths.state_dir))
    }

    fn control_hint(&self) -> String {
        self.control
            .lock()
            .expect("control path")
            .as_ref()
            .map_or_else(|| "CONTROL".into(), |p| p.display().to_string())
    }
}
