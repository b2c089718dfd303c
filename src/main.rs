//! The `drblk` command.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use drblk::cli::{Cli, Command, CtlArgs};
use drblk::control::{client, Done, Drained, Reply, Request};

fn main() {
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
        Command::Promote(args) => {
            drblk::site::promote::promote_offline(&args.disk, &args.state_dir(), args.force)
                .map(|p| println!("{}", p.report()))
        }
    };
    if let Err(e) = result {
        tracing::error!("{e:#}");
        eprintln!("drblk: error: {e:#}");
        std::process::exit(1);
    }
}

/// The disk a daemon serves, for hints.
fn status_disk(socket: &std::path::Path) -> Option<String> {
    client::status(socket).ok().map(|s| s.disk)
}

/// `drblk ctl`: sends the command and prints the daemon's answer as JSON.
fn ctl(args: &CtlArgs) -> anyhow::Result<()> {
    let socket = &args.socket;
    let mut req = args.command.parse::<Request>()?;
    if let Request::Demote { force } = &mut req {
        *force = args.force;
    }
    let answer = match req {
        Request::Status => serde_json::to_string_pretty(&Reply::ok(client::status(socket)?)),
        Request::FormCg => {
            client::form_cg(socket)?;
            serde_json::to_string_pretty(&Reply::ok(Done {}))
        }
        Request::Drain => {
            let cg = client::drain(socket)?;
            serde_json::to_string_pretty(&Reply::ok(Drained { cg }))
        }
        Request::Demote { .. } => {
            let d: Drained = client::request_as(socket, req)?;
            eprintln!(
                "demoted at CG {}: the secondary holds every write. Next: stop this daemon, \
                 promote the secondary (`drblk promote --disk REPLICA`), then run this disk as \
                 its secondary (`drblk secondary --disk {} ...`)",
                d.cg,
                status_disk(socket).unwrap_or_else(|| "IMAGE".into())
            );
            serde_json::to_string_pretty(&Reply::ok(d))
        }
    }?;
    println!("{answer}");
    Ok(())
}
