use std::collections::HashSet;
use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

fn seeds() -> impl Iterator<Item = StdRng> {
    (0..200u64).map(StdRng::seed_from_u64)
}

#[test]
fn synced_contents_and_entries_survive_every_cut() {
    for mut rng in seeds() {
        let disk = SimDisk::new();
        let fs = disk.mount();
        create_dir_durable(&*fs, Path::new("/a/b")).unwrap();
        let f = fs.open(Path::new("/a/b/f"), Open::CreateNew).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(Path::new("/a/b")).unwrap();
        f.write_all_at(&[7u8; 2000], 5).unwrap(); // unsynced
        disk.power_cut(&mut rng);
        let after = disk.mount().read(Path::new("/a/b/f")).unwrap();
        assert_eq!(&after[..5], b"hello");
        assert!(after.len() <= 2005);
    }
}

#[test]
fn unsynced_names_and_writes_may_vanish_or_tear() {
    let mut outcomes = HashSet::new();
    let mut torn = false;
    for mut rng in seeds() {
        let disk = SimDisk::new();
        let fs = disk.mount();
        fs.create_dir(Path::new("/d")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        let f = fs.open(Path::new("/d/f"), Open::CreateNew).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        disk.power_cut(&mut rng);
        match disk.mount().read(Path::new("/d/f")) {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
                outcomes.insert("vanished");
            }
            Ok(bytes) if bytes.is_empty() => {
                outcomes.insert("empty");
            }
            Ok(bytes) if bytes == [1u8; 4096] => {
                outcomes.insert("whole");
            }
            Ok(bytes) => {
                // Some sectors landed, others did not: possibly not a prefix.
                let first_zero = bytes.iter().position(|b| *b == 0);
                let later_one = first_zero.is_some_and(|z| bytes[z..].contains(&1));
                torn |= later_one;
                outcomes.insert("partial");
            }
        }
    }
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    assert!(torn, "no torn write that is not a prefix in 200 seeds");
}

#[test]
fn replace_durable_keeps_the_old_or_the_new_never_a_mix() {
    let mut seen = HashSet::new();
    for mut rng in seeds() {
        let disk = SimDisk::new();
        let fs = disk.mount();
        replace_durable(&*fs, Path::new("/state"), b"old-contents").unwrap();
        // Cut in the middle of a replacement: the temporary file is written
        // and synced, the rename not yet synced.
        let tmp = fs.open(Path::new("/state.tmp"), Open::Truncate).unwrap();
        tmp.write_all_at(b"new", 0).unwrap();
        tmp.sync_data().unwrap();
        fs.rename(Path::new("/state.tmp"), Path::new("/state"))
            .unwrap();
        disk.power_cut(&mut rng);
        let got = disk.mount().read(Path::new("/state")).unwrap();
        assert!(got == b"old-contents" || got == b"new", "{got:?}");
        seen.insert(got);
    }
    assert_eq!(seen.len(), 2);
}

#[test]
fn a_dead_process_changes_nothing() {
    let disk = SimDisk::new();
    let old = disk.mount();
    let f = old.open(Path::new("/f"), Open::CreateNew).unwrap();
    disk.kill();
    assert!(f.write_all_at(b"x", 0).is_err());
    assert!(old.create_dir(Path::new("/g")).is_err());
    let new = disk.mount();
    assert_eq!(new.read(Path::new("/f")).unwrap(), b"");
    assert!(!new.exists(Path::new("/g")));
}

#[test]
fn the_real_disk_does_the_same_operations() {
    let dir = tempfile::tempdir().unwrap();
    let fs = real();
    let sub = dir.path().join("x/y");
    create_dir_durable(&*fs, &sub).unwrap();
    let path = sub.join("f");
    let f = fs.open(&path, Open::CreateNew).unwrap();
    f.write_all_at(b"abcdef", 0).unwrap();
    f.set_len(4).unwrap();
    f.sync_data().unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(f.read_at(&mut buf, 1).unwrap(), 3);
    assert_eq!(&buf[..3], b"bcd");
    assert!(fs.open(&path, Open::CreateNew).is_err());
    replace_durable(&*fs, &path, b"new").unwrap();
    assert_eq!(fs.read(&path).unwrap(), b"new");
    assert_eq!(fs.list(&sub).unwrap(), vec!["f".to_string()]);
    remove_if_present(&*fs, &path).unwrap();
    remove_if_present(&*fs, &path).unwrap();
    assert!(!fs.exists(&path));
}
