//! The man pages in `doc/man` are generated from the command line's definition
//! (`clap_mangen`): `drblk.1` and one page per command (`drblk-serve.1`, ...). This test
//! fails when they no longer match it; `DRBLK_BLESS=1 cargo test -p drblk --test man_page`
//! writes them anew.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

fn pages() -> Vec<(String, Vec<u8>)> {
    let cmd = drblk::cli::Cli::command();
    let mut out = Vec::new();
    let mut render = |name: String, cmd: clap::Command| {
        let mut buf = Vec::new();
        let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
        clap_mangen::Man::new(cmd.name(static_name))
            .render(&mut buf)
            .unwrap();
        out.push((format!("{name}.1"), buf));
    };
    render("drblk".into(), cmd.clone());
    for sub in cmd.get_subcommands() {
        render(format!("drblk-{}", sub.get_name()), sub.clone());
    }
    out
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("doc/man")
}

#[test]
fn the_man_pages_match_the_command_line() {
    let pages = pages();
    assert!(pages.len() >= 7, "drblk and its commands");
    if std::env::var_os("DRBLK_BLESS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        for (name, text) in &pages {
            std::fs::write(dir().join(name), text).unwrap();
        }
    }
    for (name, text) in &pages {
        let on_disk = std::fs::read(dir().join(name)).unwrap_or_default();
        assert!(
            on_disk == *text,
            "doc/man/{name} is out of date with the command line: run \
             `DRBLK_BLESS=1 cargo test -p drblk --test man_page` and commit doc/man"
        );
    }
    // Every page is roff that names its command and documents its options.
    let serve = &pages.iter().find(|p| p.0 == "drblk-serve.1").unwrap().1;
    let serve = String::from_utf8_lossy(serve);
    assert!(
        serve.starts_with(".ie \\n(.g .ds Aq") || serve.contains(".TH drblk-serve"),
        "{serve}"
    );
    assert!(
        serve.contains("replicate\\-to") && serve.contains("metrics"),
        "{serve}"
    );
}
