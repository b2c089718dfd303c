//! The `drblk` command.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use drblk::cli::{Cli, Command, CtlArgs};
use drblk::control::{client, Request};

fn main() {
    // Before parsing: it needs none of `serve`'s required options.
    if drblk::cli::asks_for_capabilities(std::env::args_os()) {
        println!("{}", drblk::cli::VHOST_USER_CAPABILITIES);
        return;
    }
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(args) => drblk::site::primary::run(*args),
        Command::Secondary(args) => drblk::site::secondary::run(args),
        Command::Cert(args) => {
            let sites: Vec<&str> = args.sites.iter().map(String::as_str).collect();
            drblk::link::certs::generate(&args.dir, &sites, args.overwrite)
                .map(|g| {
                    println!(
                        "{} CA in {}; wrote {}",
                        if g.new_ca { "created a" } else { "reused the" },
                        args.dir.display(),
                        g.files
                            .iter()
                            .map(|f| f.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                })
                .map_err(anyhow::Error::from)
        }
        Command::Ctl(args) => ctl(&args),
        Command::Status(args) => drblk::control::watch::run(&args.request()),
        Command::Promote(args) => {
            drblk::site::promote::promote_offline(&args.disk, &args.state_dir(), args.force)
                .map(|p| println!("{}", p.report()))
        }
    };
    if let Err(e) = result {
        // One line on stderr (not also through the log, which goes there too).
        eprintln!("drblk: error: {}", drblk::cli::error_line(&e));
        std::process::exit(1);
    }
}

/// `drblk ctl`: sends the command and prints the daemon's answer as JSON (and, for the
/// role changes, what to do next on stderr).
fn ctl(args: &CtlArgs) -> anyhow::Result<()> {
    let path = match (&args.control, &args.socket) {
        (Some(c), _) => c.clone(),
        (None, Some(s)) => drblk::control::control_path(s),
        (None, None) => anyhow::bail!("give --socket (a primary) or --control (a control socket)"),
    };
    let req = args.command.request();
    let answer = match &args.socket {
        // Says which `drblk serve` it expected if nothing answers.
        Some(s) if args.control.is_none() => client::request(s, req.clone())?,
        _ => client::request_at(&path, req.clone())?,
    };
    match req {
        Request::Demote { .. } => {
            let cg = answer["cg"].as_u64().unwrap_or_default();
            let disk = client::request_at(&path, Request::Status)
                .ok()
                .and_then(|v| v["disk"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "IMAGE".into());
            eprintln!(
                "demoted at CG {cg}: the secondary holds every write. Next: stop this daemon, \
                 promote the secondary (`drblk promote --disk REPLICA`), then run this disk as \
                 its secondary (`drblk secondary --disk {disk} ...`)"
            );
        }
        Request::Verify { .. } => {
            let r: drblk::replicate::shipper::VerifyReport =
                serde_json::from_value(answer.clone())?;
            eprintln!(
                "verified {} chunks ({:.1} MB, {:.2} GB/s) at CG {}: {} differ{}{}",
                r.found.compared,
                r.found.bytes as f64 / 1e6,
                r.found.bytes as f64 / 1e9 / r.found.seconds.max(1e-9),
                r.cg,
                r.found.differing,
                if r.found.first_differing.is_empty() {
                    String::new()
                } else {
                    format!(" (first: {:?})", r.found.first_differing)
                },
                match (r.found.differing, r.repaired) {
                    (0, _) => String::new(),
                    (_, true) => "; they are shipped in the next group".into(),
                    (_, false) => "; `drblk ctl verify --repair` ships them".into(),
                }
            );
        }
        Request::Promote { .. } => {
            if let Some(r) = answer["report"].as_str() {
                eprintln!("{r}");
            }
        }
        _ => {}
    }
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}
