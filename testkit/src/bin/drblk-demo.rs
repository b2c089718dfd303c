//! `cargo run --release`: the demo (see `drblk_testkit::demo`).

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    let args = drblk_testkit::demo::DemoArgs::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = drblk_testkit::demo::run(args) {
        eprintln!("drblk-demo: error: {e:#}");
        std::process::exit(1);
    }
}
