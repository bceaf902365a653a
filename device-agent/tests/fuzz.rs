//! The outbox's recovery on damaged files, and the ack interpretation,
//! fuzzed. `PROPTEST_CASES` sets the number of cases (default 64).

use std::path::Path;

use device_agent::outbox::{Fsync, Outbox};
use fleet_api::Mid;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64)
}

/// Damage done to one file of the outbox.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Append(Vec<u8>),
    Zero(usize, usize),
}

fn damage() -> impl Strategy<Value = (usize, Damage)> {
    let d = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(p, x)| Damage::Flip(p, x)),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(p, b)| Damage::Insert(p, b)),
        prop::collection::vec(any::<u8>(), 1..60).prop_map(Damage::Append),
        (any::<usize>(), 1..64usize).prop_map(|(p, n)| Damage::Zero(p, n)),
    ];
    (any::<usize>(), d)
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn hurt(path: &Path, d: &Damage) {
    let mut b = std::fs::read(path).unwrap();
    let len = b.len().max(1);
    match d {
        Damage::Flip(p, x) if !b.is_empty() => b[p % len] ^= x,
        Damage::Truncate(p) => b.truncate(p % len),
        Damage::Insert(p, bytes) => {
            let at = p % (b.len() + 1);
            b.splice(at..at, bytes.iter().copied());
        }
        Damage::Append(bytes) => b.extend_from_slice(bytes),
        Damage::Zero(p, n) if !b.is_empty() => {
            let start = p % len;
            let end = (start + n).min(b.len());
            b[start..end].fill(0);
        }
        _ => {}
    }
    std::fs::write(path, b).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever happened to its segment files, a reopened outbox hands out
    /// only messages exactly as they were written, under their own mids.
    #[test]
    fn a_damaged_outbox_never_yields_a_message_that_was_not_written(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..60),
        damages in prop::collection::vec(damage(), 1..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 64 * 1024, Fsync::Always).unwrap();
        for p in &payloads {
            o.append(p).unwrap();
        }
        o.close().unwrap();
        let files = segment_files(dir.path());
        prop_assume!(!files.is_empty());
        for (which, d) in &damages {
            hurt(&files[which % files.len()], d);
        }
        match Outbox::open(dir.path(), 64 * 1024, Fsync::Always) {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(mut o) => {
                let got = o.read_from(Mid(1), 100_000).unwrap();
                for p in &got {
                    let i = usize::try_from(p.mid.0).unwrap();
                    prop_assert!(i >= 1 && i <= payloads.len(), "mid {} was never written", p.mid);
                    prop_assert_eq!(p.payload.as_ref(), &payloads[i - 1][..], "mid {}", p.mid);
                }
                // New messages never reuse a mid it handed out before.
                let next = o.append(b"after").unwrap();
                prop_assert!(got.iter().all(|p| p.mid < next));
            }
        }
    }

    /// An unreadable state file stops the outbox with a message naming it;
    /// a readable one is taken as it is. Never a panic.
    #[test]
    fn a_damaged_state_file_is_refused_by_name_or_read(
        damages in prop::collection::vec(damage(), 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 64 * 1024, Fsync::Always).unwrap();
        for i in 0..5u8 {
            o.append(&[i; 10]).unwrap();
        }
        o.ack(Mid(2)).unwrap();
        o.close().unwrap();
        let state = dir.path().join("state.json");
        for (_, d) in &damages {
            hurt(&state, d);
        }
        if let Err(e) = Outbox::open(dir.path(), 64 * 1024, Fsync::Always) {
            prop_assert!(e.to_string().contains("state.json"), "{}", e);
        }
    }
}

#[test]
fn a_numbering_base_with_no_room_above_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Outbox::open(dir.path(), 64 * 1024, Fsync::Always).unwrap();
    let err = o.set_base(Mid(u64::MAX - 3)).unwrap_err();
    assert!(err.to_string().contains("no room"), "{err}");
    assert_eq!(o.base(), None, "nothing recorded");
    o.set_base(Mid(41)).unwrap();
    assert_eq!(o.base(), Some(41));
}
