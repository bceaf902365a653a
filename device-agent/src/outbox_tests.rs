//! Unit tests of the outbox (kept apart: the outbox itself is one file).

use super::*;

fn open(dir: &Path) -> Outbox {
    Outbox::open(dir, 1 << 20, Fsync::Always).unwrap()
}

#[test]
fn append_read_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = open(dir.path());
    for i in 1..=5u64 {
        assert_eq!(o.append(format!("m{i}").as_bytes()).unwrap(), Mid(i));
    }
    let got = o.read_from(Mid(1), 100).unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(got[2].payload.as_ref(), b"m3");
    o.ack(Mid(3)).unwrap();
    let got = o.read_from(Mid(1), 100).unwrap();
    assert_eq!(got.iter().map(|p| p.mid.0).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(o.stats().in_outbox, 2);
}

/// Descriptors this process holds open under `dir`.
fn open_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

#[test]
fn periodic_fsync_keeps_what_a_sealed_segment_held_across_a_power_cut() {
    use fleet_api::storage::SimDisk;
    let disk = SimDisk::new();
    let dir = Path::new("/outbox");
    let mut o = Outbox::open_on(disk.mount(), dir, 64 * 1024, Fsync::Periodic).unwrap();
    // Enough to fill the first segment (8 KiB at this size) and start a
    // second one before the periodic sync.
    let payload = [7u8; 500];
    for _ in 0..40 {
        o.append(&payload).unwrap();
    }
    o.sync().unwrap();
    let synced = o.durable();
    assert_eq!(synced, Mid(40));
    drop(o);
    disk.power_cut(&mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7));
    let mut o = Outbox::open_on(disk.mount(), dir, 64 * 1024, Fsync::Periodic).unwrap();
    let back = o.read_from(Mid(1), 100).unwrap();
    assert_eq!(
        back.iter().map(|r| r.mid.0).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>(),
        "what sync() called durable is all there"
    );
}

#[test]
fn an_idle_outbox_holds_no_file_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = open(dir.path());
    assert_eq!(open_under(dir.path()), 0, "after opening");
    for i in 0..50 {
        o.append(format!("m{i}").as_bytes()).unwrap();
        assert_eq!(open_under(dir.path()), 0, "after an append");
    }
    assert_eq!(o.read_from(Mid(1), 100).unwrap().len(), 50);
    assert_eq!(open_under(dir.path()), 0, "after a read");
    o.ack(Mid(20)).unwrap();
    assert_eq!(open_under(dir.path()), 0, "after an ack");
    o.close().unwrap();
    let mut p = Outbox::open(dir.path(), 1 << 20, Fsync::Periodic).unwrap();
    p.append(b"later").unwrap();
    p.sync().unwrap();
    assert_eq!(open_under(dir.path()), 0, "after a periodic sync");
}

#[test]
fn numbering_state_is_learned_once_and_never_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = open(dir.path());
    assert_eq!(o.base(), None, "a fresh outbox learns its base");
    o.append(b"x").unwrap();
    o.set_base(Mid(41)).unwrap();
    o.set_base(Mid(7)).unwrap();
    assert_eq!(o.stats().base, 41, "set once");
    drop(o);
    assert_eq!(open(dir.path()).base(), Some(41), "persisted");
    // A state file from before the base existed means 0.
    std::fs::write(dir.path().join("state.json"), br#"{"acked":0,"floor":0}"#).unwrap();
    assert_eq!(open(dir.path()).base(), Some(0));
    // An unreadable one is refused, naming the file.
    std::fs::write(dir.path().join("state.json"), b"{\"acked\": 3, \"flo").unwrap();
    let err = Outbox::open(dir.path(), 1 << 20, Fsync::Always).unwrap_err();
    assert!(matches!(err, OutboxError::BadState { .. }), "{err}");
    assert!(err.to_string().contains("state.json"), "{err}");
    reset_state(dir.path()).unwrap();
    assert_eq!(open(dir.path()).base(), None, "reset: learned again");
}

#[test]
fn mids_never_repeat_even_when_everything_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Outbox::open(dir.path(), 64 * 1024, Fsync::Always).unwrap();
    for _ in 0..2000 {
        o.append(&[1; 50]).unwrap();
    }
    o.ack(Mid(2000)).unwrap();
    drop(o); // no clean close: acks were saved lazily at most
    let mut o = Outbox::open(dir.path(), 64 * 1024, Fsync::Always).unwrap();
    assert_eq!(o.append(b"after").unwrap(), Mid(2001));
}

#[test]
fn a_full_outbox_drops_the_oldest_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Outbox::open(dir.path(), 64 * 1024, Fsync::Never).unwrap();
    for _ in 0..2000 {
        o.append(&[7; 100]).unwrap();
    }
    let s = o.stats();
    assert!(s.bytes <= 64 * 1024);
    assert!(s.dropped > 0);
    assert_eq!(
        s.dropped + s.in_outbox,
        2000,
        "every message is either kept or counted"
    );
    let first = o.read_from(Mid(1), 1).unwrap();
    assert_eq!(first[0].mid.0, s.dropped + 1, "the oldest went first");
}

#[test]
fn periodic_fsync_hides_undurable_records_from_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Outbox::open(dir.path(), 1 << 20, Fsync::Periodic).unwrap();
    o.append(b"a").unwrap();
    assert!(o.read_from(Mid(1), 10).unwrap().is_empty());
    o.sync().unwrap();
    assert_eq!(o.read_from(Mid(1), 10).unwrap().len(), 1);
}

#[test]
fn a_torn_tail_is_cut_at_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = open(dir.path());
    o.append(b"first").unwrap();
    o.append(b"second record").unwrap();
    drop(o);
    let seg = segment_path(dir.path(), Mid(1));
    let full = fs::read(&seg).unwrap();
    let one = HEADER + FIXED + 5;
    for cut in one..full.len() {
        fs::write(&seg, &full[..cut]).unwrap();
        let mut o = open(dir.path());
        let got = o.read_from(Mid(1), 10).unwrap();
        assert_eq!(got.len(), 1, "cut at {cut}");
        assert_eq!(got[0].payload.as_ref(), b"first");
        assert_eq!(
            o.append(b"next").unwrap(),
            Mid(2),
            "the torn mid was never durable"
        );
        drop(o);
        fs::write(&seg, &full).unwrap();
        let _ = fs::remove_file(segment_path(dir.path(), Mid(3)));
    }
}
