//! Registry import of mutated export files: each is either applied whole
//! (the mutation left a valid file) or refused with what is wrong, and
//! then nothing of it is applied. `PROPTEST_CASES` sets the number of
//! files (default 64 here; raise it for long runs).

mod common;

use common::*;
use proptest::prelude::*;
use registry_sync::ops;

/// A mutation of an export's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the byte at this position (modulo the length).
    Byte(usize, u8),
    /// Remove a byte.
    Remove(usize),
    /// Insert a byte.
    Insert(usize, u8),
    /// Cut the file here.
    Truncate(usize),
    /// Remove a whole line.
    DropLine(usize),
    /// Repeat a whole line.
    DupLine(usize),
    /// Swap two lines.
    SwapLines(usize, usize),
    /// Replace a number (a run of digits) with one of these.
    Number(usize, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Byte(p, b)),
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        any::<usize>().prop_map(Mutation::DropLine),
        any::<usize>().prop_map(Mutation::DupLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (
            any::<usize>(),
            prop::sample::select(vec![
                "0",
                "-1",
                "18446744073709551615",
                "9223372036854775807",
                "99999999999999999999999",
                "1e400",
                "\"7\"",
                "null",
            ])
        )
            .prop_map(|(p, n)| Mutation::Number(p, n)),
    ]
}

fn apply(file: &mut Vec<u8>, m: &Mutation) {
    let len = file.len().max(1);
    let mut lines: Vec<Vec<u8>> = file.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    let n = lines.len();
    match *m {
        Mutation::Byte(p, b) if !file.is_empty() => file[p % len] = b,
        Mutation::Remove(p) if !file.is_empty() => {
            file.remove(p % len);
        }
        Mutation::Insert(p, b) => file.insert(p % (file.len() + 1), b),
        Mutation::Truncate(p) => file.truncate(p % len),
        Mutation::DropLine(i) => {
            lines.remove(i % n);
            *file = lines.join(&b'\n');
        }
        Mutation::DupLine(i) => {
            let l = lines[i % n].clone();
            lines.insert(i % n, l);
            *file = lines.join(&b'\n');
        }
        Mutation::SwapLines(a, b) => {
            lines.swap(a % n, b % n);
            *file = lines.join(&b'\n');
        }
        Mutation::Number(p, n) => {
            let text = String::from_utf8_lossy(file).into_owned();
            let digits: Vec<(usize, usize)> = text
                .char_indices()
                .filter(|(i, c)| {
                    c.is_ascii_digit() && (*i == 0 || !text.as_bytes()[i - 1].is_ascii_digit())
                })
                .map(|(i, _)| {
                    let end = text[i..]
                        .find(|c: char| !c.is_ascii_digit())
                        .map_or(text.len(), |e| i + e);
                    (i, end)
                })
                .collect();
            if !digits.is_empty() {
                let (s, e) = digits[p % digits.len()];
                *file = format!("{}{}{}", &text[..s], n, &text[e..]).into_bytes();
            }
        }
        _ => {}
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_mutated_export_is_applied_whole_or_not_at_all(
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let source = fixture(Kind::Sqlite, None).await;
            source.store.claim_region(&region("a")).await.unwrap();
            let devices: Vec<_> = (0..12u8).map(|i| new_device(&format!("dev-{i:02}"), i)).collect();
            source.store.create(devices).await.unwrap();
            let bar = registry_sync::cli::progress(None, "export");
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            let (mut file, _) = ops::export(&*source.store, Vec::new(), &bar).await.unwrap();
            for m in &mutations {
                apply(&mut file, m);
            }
            // The target already holds other devices: a refused import must
            // leave them exactly as they were.
            let target = fixture(Kind::Sqlite, None).await;
            target.store.claim_region(&region("b")).await.unwrap();
            target.store.create(vec![new_device("other", 99)]).await.unwrap();
            let before = all(&*target.store).await;
            let path = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(path.path(), &file).unwrap();
            match ops::import_file(&*target.store, path.path(), false, &bar).await {
                Ok(report) => {
                    let after = all(&*target.store).await;
                    prop_assert_eq!(
                        after.len() as u64,
                        before.len() as u64 + report.summary.inserted,
                        "an import reported {:?}", report
                    );
                }
                Err(e) => {
                    let text = e.to_string();
                    prop_assert!(!text.is_empty());
                    prop_assert_eq!(all(&*target.store).await, before, "refused ({}), yet applied", text);
                }
            }
            Ok(())
        })?;
    }
}
