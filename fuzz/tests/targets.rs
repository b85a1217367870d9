//! Every fuzz target on its saved inputs (`fuzz/seeds/TARGET/`, the starting corpus, and
//! `fuzz/regressions/TARGET/`, inputs that once broke a property), and a bounded run of
//! random and mutated inputs (`PROPTEST_CASES`, 256 by default).

use std::path::{Path, PathBuf};

use molt_fuzz::TARGETS;
use proptest::prelude::*;

fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_target_has_seeds_and_keeps_its_properties_on_them() {
    for (name, target) in TARGETS {
        let seeds = inputs("seeds", name);
        assert!(!seeds.is_empty(), "no seeds for {name}");
        for (path, bytes) in seeds {
            eprintln!("{name}: {}", path.display());
            target(&bytes);
        }
    }
}

#[test]
fn regressions_stay_fixed() {
    let mut n = 0;
    for (name, target) in TARGETS {
        for (path, bytes) in inputs("regressions", name) {
            eprintln!("{name}: {}", path.display());
            target(&bytes);
            n += 1;
        }
    }
    assert!(n > 0, "the regression inputs are missing");
}

fn seed() -> impl Strategy<Value = (usize, Vec<u8>)> {
    let all: Vec<(usize, Vec<u8>)> = TARGETS
        .iter()
        .enumerate()
        .flat_map(|(i, (name, _))| inputs("seeds", name).into_iter().map(move |(_, b)| (i, b)))
        .collect();
    proptest::sample::select(all)
}

proptest! {
    #[test]
    fn random_bytes_keep_every_property(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for (_, target) in TARGETS {
            target(&bytes);
        }
    }

    #[test]
    fn mutated_seeds_keep_every_property(
        (index, seed) in seed(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = seed;
        if bytes.is_empty() {
            return Ok(());
        }
        for (at, byte) in edits {
            let at = at.index(bytes.len());
            bytes[at] = byte;
        }
        TARGETS[index].1(&bytes);
        let cut = cut.index(bytes.len());
        TARGETS[index].1(&bytes[..cut]);
    }
}
