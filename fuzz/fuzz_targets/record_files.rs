//! Fuzzes the small files a primary and a secondary read at start: the primary's change
//! record (`IMAGE.drblk-track`: superblock, activity log, bitmap pages, each checked), the
//! disk's lineage (`IMAGE.drblk-lineage`) and a control-socket request line. Each must
//! load or be refused, never panic nor allocate what a field claims before checking it.
#![no_main]

use std::sync::OnceLock;

use drblk::control::Request;
use drblk::lineage::Lineage;
use drblk::track::file::RecordFile;
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static std::path::Path {
    static D: OnceLock<std::path::PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("drblk-fuzz-files-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let p = dir().join("d.img.drblk-track");
            std::fs::write(&p, rest).unwrap();
            let _ = RecordFile::load(&p);
        }
        1 => {
            let image = dir().join("d.img");
            std::fs::write(drblk::lineage::lineage_path(&image), rest).unwrap();
            if let Ok(Some(l)) = Lineage::load(&image) {
                let _ = l.describe();
            }
        }
        _ => {
            if let Ok(req) = serde_json::from_slice::<Request>(rest) {
                let text = serde_json::to_string(&req).unwrap();
                assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
            }
            if let Ok(s) = std::str::from_utf8(rest) {
                let _ = s.parse::<Request>();
            }
        }
    }
});
