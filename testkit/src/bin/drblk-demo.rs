//! `cargo run --release`: the demo (see `drblk_testkit::demo`).

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    let args = drblk_testkit::demo::DemoArgs::parse();
    // The demo's own lines say what happens; the daemons' info log (RUST_LOG=drblk=info)
    // would interleave with them, so only their warnings and errors are shown by default.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = drblk_testkit::demo::run(args) {
        eprintln!("drblk-demo: error: {e:#}");
        std::process::exit(1);
    }
}
