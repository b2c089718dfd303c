//! `drblk status`: fetches a daemon's status once or every `--interval`, and prints it as
//! the summary of `summary.rs`, as JSON, or (on a terminal, with `--watch`) redrawn in
//! place with an indicatif progress bar while the replica syncs.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::client;
use super::summary::{render, AnyStatus, Rates};
use super::Request;

/// What `drblk status` was asked.
#[derive(Debug, Clone)]
pub struct StatusRequest {
    /// The control socket.
    pub control: PathBuf,
    /// Print JSON (one object per refresh).
    pub json: bool,
    /// Refresh until interrupted (or `count`).
    pub watch: bool,
    /// Between refreshes; also what rates are measured over.
    pub interval: Duration,
    /// Stop after this many refreshes.
    pub count: Option<u64>,
}

fn fetch(req: &StatusRequest) -> anyhow::Result<(serde_json::Value, Instant)> {
    let v = client::request_at(&req.control, Request::Status)?;
    Ok((v, Instant::now()))
}

/// Runs `drblk status`.
pub fn run(req: &StatusRequest) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    if !req.watch {
        let (v, at) = fetch(req)?;
        if req.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let first = AnyStatus::from_json(v)?;
        // Throughput needs two looks: a short second one (none with --interval 0).
        let gap = req.interval.min(Duration::from_millis(500));
        let (now, rates) = if gap.is_zero() {
            (first, None)
        } else {
            std::thread::sleep(gap);
            let (v, at2) = fetch(req)?;
            let now = AnyStatus::from_json(v)?;
            let rates = Rates::between(&first, &now, at2 - at);
            (now, Some(rates))
        };
        print!("{}", render(&now, rates));
        return Ok(());
    }
    // In place only when both the summary and the bar reach a terminal (not `| tee`).
    let bar = (std::io::stdout().is_terminal() && std::io::stderr().is_terminal())
        .then(|| ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()));
    let mut before: Option<(AnyStatus, Instant)> = None;
    let mut n = 0u64;
    loop {
        let (v, at) = fetch(req)?;
        if req.json {
            let mut out = stdout.lock();
            writeln!(out, "{}", serde_json::to_string(&v)?)?;
            out.flush()?;
        } else {
            let now = AnyStatus::from_json(v)?;
            let rates = before
                .as_ref()
                .map(|(b, t)| Rates::between(b, &now, at - *t));
            let text = render(&now, rates);
            match &bar {
                Some(bar) => draw(bar, &now, &text),
                None => {
                    let mut out = stdout.lock();
                    writeln!(out, "{text}")?;
                    out.flush()?;
                }
            }
            before = Some((now, at));
        }
        n += 1;
        if req.count.is_some_and(|c| n >= c) {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            return Ok(());
        }
        std::thread::sleep(req.interval.max(Duration::from_millis(10)));
    }
}

/// Redraws the summary in place, with a bar (rate, time left) while a sync runs.
fn draw(bar: &ProgressBar, status: &AnyStatus, text: &str) {
    let text = text.trim_end().to_string();
    match status.sync() {
        Some(p) => {
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg}\n[{wide_bar}] {percent:>3}% {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_length(p.total);
            bar.set_position(p.done);
        }
        None => bar.set_style(ProgressStyle::with_template("{msg}").expect("a valid template")),
    }
    bar.set_message(text);
}
