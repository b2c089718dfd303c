//! Fuzzes a secondary's recovery from its own files after a crash: a real replica's state
//! file and journal (a sync and three committed groups, made once per process) are
//! corrupted, truncated or replaced by the input, then opened as `drblk secondary` does.
//! Opening must answer a state or an error — never panic, never allocate what a record's
//! length claims before checking it, never write outside the image.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use drblk::replica::{ChunkData, GroupSpec, ReplicaStore};
use libfuzzer_sys::fuzz_target;

const SIZE: u64 = 1 << 20;
const CHUNK: u64 = 4096;
const UUID: [u8; 16] = [7; 16];

struct Template {
    dir: PathBuf,
    state: Vec<u8>,
    journal: Vec<u8>,
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("drblk-fuzz-recovery-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (image, state) = (dir.join("t.img"), dir.join("t.state"));
        {
            let spec = GroupSpec::single(&image, SIZE, CHUNK, UUID);
            let (mut s, _) = ReplicaStore::open(&spec, &state).unwrap();
            s.sync_extent(0, 0, 1, ChunkData::Bytes(&[1; CHUNK as usize]))
                .unwrap();
            s.finish_sync(1, 1).unwrap();
            for cg in 2..5u64 {
                let data = vec![cg as u8; 2 * CHUNK as usize];
                s.stage_extent(0, cg, cg * 3, 2, ChunkData::Bytes(&data))
                    .unwrap();
                s.stage_extent(0, cg, 200, 1, ChunkData::Zero).unwrap();
                s.commit_durable(cg, cg * 10).unwrap();
                if cg < 4 {
                    s.apply_committed().unwrap();
                }
            }
        }
        Template {
            state: std::fs::read(state.join("state.json")).unwrap(),
            journal: std::fs::read(state.join("journal")).unwrap(),
            dir,
        }
    })
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let t = template();
    let (mut state, mut journal) = (t.state.clone(), t.journal.clone());
    match mode % 4 {
        0 => state = rest.to_vec(),
        1 => journal = rest.to_vec(),
        _ => {
            // Patches: (u32 offset, byte) each, then a truncation when the input says so.
            let target = if mode % 4 == 2 {
                &mut journal
            } else {
                &mut state
            };
            for p in rest.chunks_exact(5) {
                if target.is_empty() {
                    break;
                }
                let off = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize % target.len();
                target[off] = p[4];
            }
            if rest.len() % 5 == 1 {
                let cut = rest[rest.len() - 1] as usize * target.len() / 256;
                target.truncate(cut);
            }
        }
    }
    let run = t.dir.join("run");
    let _ = std::fs::remove_dir_all(&run);
    let sdir = run.join("r.state");
    std::fs::create_dir_all(&sdir).unwrap();
    write(&sdir, "state.json", &state);
    write(&sdir, "journal", &journal);
    let image = run.join("r.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    if let Ok((s, _)) = ReplicaStore::open(&GroupSpec::single(&image, SIZE, CHUNK, UUID), &sdir) {
        let _ = s.state();
        let _ = s.last_committed_cg();
    }
    // Recovery never grows the image past the disk.
    assert!(std::fs::metadata(&image).unwrap().len() <= SIZE);
});
