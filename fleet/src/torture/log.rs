//! Power cuts under the hub's event log: appends in group commits, segment
//! rolls, retention, cutting back with an archive, skipping forward, and
//! the epoch history; a cut lands at a random disk operation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use fleet_api::storage::SimDisk;
use fleet_api::{DeviceId, Epoch, Mid, Offset, PartitionId, Region, UnixMillis};
use hub::log::file::{FileLog, FileLogConfig};
use hub::log::frame::Frames;
use hub::log::{EventLog, LogError, NewRecord, ReadLimits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Outcome, fail, maybe_arm, settle};

const P: PartitionId = PartitionId(0);

fn config(disk: &SimDisk, rng: &mut StdRng) -> FileLogConfig {
    let mut c = FileLogConfig::new("/hub/log", 1);
    c.storage = disk.mount();
    c.segment_bytes = rng.random_range(1024..16 * 1024);
    c.max_batch_bytes = rng.random_range(256..8 * 1024);
    c.retention_interval = std::time::Duration::from_secs(3600);
    c
}

fn record(rng: &mut StdRng, n: u64, epoch: Epoch) -> NewRecord {
    let len = if rng.random_bool(0.05) {
        rng.random_range(1000..5000)
    } else {
        rng.random_range(0..300)
    };
    let mut payload = vec![0u8; len];
    rng.fill(&mut payload[..]);
    NewRecord {
        device_id: DeviceId::new(format!("d{}", n % 7)).expect("a valid id"),
        mid: Some(Mid(n)),
        enqueued_at: UnixMillis(n),
        region: Region::new("a").expect("a valid region"),
        epoch,
        payload: Bytes::from(payload),
    }
}

/// What the log must hold: every acknowledged record still retained.
#[derive(Default)]
struct Model {
    /// Acknowledged (or recovered) records by offset, from the log start.
    records: BTreeMap<u64, NewRecord>,
    /// Archives written (their writes were acknowledged): path → records.
    archives: Vec<(PathBuf, BTreeMap<u64, NewRecord>)>,
    next_mid: u64,
    epoch: Epoch,
    /// A cut back that a power cut interrupted: from, archive, tail. Once
    /// the archive is durable the cut may finish at recovery's leisure: the
    /// log may end anywhere from `from` on, the archive holding the rest.
    cutting: Option<(u64, PathBuf, BTreeMap<u64, NewRecord>)>,
    /// A skip forward that a power cut interrupted: the log may come back
    /// empty at this offset (the skip is decided once its marker is durable).
    skipping: Option<u64>,
}

fn everything() -> ReadLimits {
    ReadLimits {
        max_records: usize::MAX,
        max_bytes: usize::MAX,
    }
}

/// Opens the log after a cut and checks it against the model; the model
/// then becomes what the log holds.
async fn recover(disk: &SimDisk, rng: &mut StdRng, model: &mut Model) -> Outcome<Arc<FileLog>> {
    let log = FileLog::open(config(disk, rng)).map_err(|e| format!("recovery failed: {e}"))?;
    if let Some(reason) = log.partition_failure(P) {
        return fail(format!(
            "the partition refuses writes after a power cut: {reason}"
        ));
    }
    let start = log.log_start(P);
    let hw = log.high_watermark(P);
    let read = log
        .read(P, start, everything())
        .await
        .map_err(|e| format!("reading {start}..{hw} after recovery: {e}"))?;
    for (i, r) in read.iter().enumerate() {
        if r.offset.0 != start.0 + i as u64 {
            return fail(format!(
                "offsets not dense: {} at position {i} from {start}",
                r.offset
            ));
        }
    }
    if read.len() as u64 != hw.0 - start.0 {
        return fail(format!(
            "read {} records from {start}, the high watermark is {hw}",
            read.len()
        ));
    }
    if let Some(base) = model.skipping
        && start.0 == base
        && hw == start
    {
        model.records.clear();
    }
    if let Some((from, path, tail)) = model.cutting.clone()
        && hw.0 >= from
        && let Ok(bytes) = disk.mount().read(&path)
    {
        let archived: BTreeMap<u64, NewRecord> = Frames::new(&bytes)
            .map(|f| (f.offset.0, f.record))
            .collect();
        // Only a whole archive lets the cut go on; a partial one means the
        // cut never started, and the log must be whole.
        if archived == tail {
            model.records.retain(|o, _| *o < hw.0);
        }
    }
    for (offset, want) in &model.records {
        if *offset < start.0 {
            return fail(format!(
                "acknowledged offset {offset} is gone: the log now starts at {start} (retention was not allowed to delete it)"
            ));
        }
        match read.get((offset - start.0) as usize) {
            Some(r) if &r.record == want => {}
            Some(r) => {
                return fail(format!(
                    "offset {offset} holds another record than was acknowledged (payload {} vs {} bytes)",
                    r.record.payload.len(),
                    want.payload.len()
                ));
            }
            None => {
                return fail(format!(
                    "acknowledged offset {offset} lost (the log ends at {hw})"
                ));
            }
        }
    }
    // Every retained record's epoch is the one its epoch history names.
    let history = log.epoch_history(P);
    for r in &read {
        let named = history
            .iter()
            .rev()
            .find(|(_, at)| *at <= r.offset)
            .map(|(e, _)| *e);
        if named != Some(r.record.epoch) {
            return fail(format!(
                "epoch history {history:?} names {named:?} for offset {}, which holds epoch {}",
                r.offset, r.record.epoch
            ));
        }
    }
    for (path, want) in &model.archives {
        let bytes = disk
            .mount()
            .read(path)
            .map_err(|e| format!("archive {} lost: {e}", path.display()))?;
        let got: BTreeMap<u64, NewRecord> = Frames::new(&bytes)
            .map(|f| (f.offset.0, f.record))
            .collect();
        if &got != want {
            return fail(format!(
                "archive {} holds {} records, {} were archived",
                path.display(),
                got.len(),
                want.len()
            ));
        }
    }
    model.records = read.into_iter().map(|r| (r.offset.0, r.record)).collect();
    model.cutting = None;
    model.skipping = None;
    model.epoch = model
        .epoch
        .max(history.last().map_or(Epoch(1), |(e, _)| *e));
    Ok(log)
}

/// Recovery, itself cut short by power cuts now and then (a cut while a
/// torn tail is cut off, a reset finished, the mark written...), until it
/// gets through; then the checks.
async fn recover_cut(
    disk: &SimDisk,
    rng: &mut StdRng,
    model: &mut Model,
    cuts: &mut u32,
) -> Outcome<Arc<FileLog>> {
    loop {
        maybe_arm(disk, rng, 30);
        let attempt = recover(disk, rng, model).await;
        if let Some(done) = settle(disk, attempt, cuts) {
            return done;
        }
    }
}

fn gone_by_cut(disk: &SimDisk, e: &LogError) -> bool {
    disk.fired().is_some() || matches!(e, LogError::Closed)
}

/// One life of the process: random operations until the armed cut fires
/// (or the life ends and the power is cut anyway).
async fn life(
    disk: &SimDisk,
    rng: &mut StdRng,
    log: &FileLog,
    model: &mut Model,
    life_no: u32,
) -> Outcome<()> {
    let trace = std::env::var_os("FLEET_TORTURE_TRACE").is_some();
    for step in 0..rng.random_range(5..60) {
        if disk.fired().is_some() {
            return Ok(());
        }
        let start = log.log_start(P);
        let hw = log.high_watermark(P);
        let op = rng.random_range(0..100);
        if trace {
            eprintln!(
                "life {life_no} step {step}: op {op}, log {start}..{hw}, disk op {}",
                disk.ops()
            );
        }
        match op {
            0..70 => {
                if rng.random_bool(0.1) {
                    model.epoch = Epoch(model.epoch.0 + 1);
                }
                let n = rng.random_range(1..10);
                let hold = log.hold(P).map_err(|e| e.to_string())?;
                let mut pending = Vec::new();
                for _ in 0..n {
                    model.next_mid += 1;
                    let rec = record(rng, model.next_mid, model.epoch);
                    pending.push((rec.clone(), log.append(P, rec)));
                }
                drop(hold);
                let mut expect = hw;
                for (rec, done) in pending {
                    match done.await {
                        Ok(offset) => {
                            if offset != expect {
                                return fail(format!(
                                    "append acknowledged at {offset} where {expect} was next"
                                ));
                            }
                            expect = expect.next();
                            model.records.insert(offset.0, rec);
                        }
                        Err(e) if gone_by_cut(disk, &e) => return Ok(()),
                        Err(e) => return fail(format!("append failed without a cut: {e}")),
                    }
                }
                // The writer may still move its durable mark after the
                // acknowledgements: wait for it, so that the disk sees the
                // same operations in the same order on every replay.
                if let Err(e) = log.flush(P).await
                    && !gone_by_cut(disk, &e)
                {
                    return fail(format!("flush failed without a cut: {e}"));
                }
            }
            70..80 if hw > start => {
                let from = Offset(rng.random_range(start.0..=hw.0));
                let path = PathBuf::from(format!("/hub/archive/{life_no}-{step}.log"));
                let tail: BTreeMap<u64, NewRecord> = model
                    .records
                    .range(from.0..)
                    .map(|(o, r)| (*o, r.clone()))
                    .collect();
                match log.cut_and_archive(P, from, path.clone()).await {
                    Ok(moved) => {
                        if moved != tail.len() as u64 {
                            return fail(format!(
                                "cut from {from} moved {moved} records, {} were there",
                                tail.len()
                            ));
                        }
                        model.records.retain(|o, _| *o < from.0);
                        if from < hw {
                            model.archives.push((path, tail));
                        }
                    }
                    Err(e) if gone_by_cut(disk, &e) => {
                        model.cutting = Some((from.0, path, tail));
                        return Ok(());
                    }
                    Err(e) => return fail(format!("cut at {from} failed without a cut: {e}")),
                }
            }
            80..92 => {
                let floor = Offset(rng.random_range(start.0..=hw.0));
                log.set_retention_floor(P, floor);
                let mut c = config(disk, rng);
                c.retention_bytes = Some(rng.random_range(0..8 * 1024));
                log.enforce_retention(&c);
                let now = log.log_start(P);
                if now > floor {
                    return fail(format!(
                        "retention deleted up to {now}, above its floor {floor}"
                    ));
                }
                model.records.retain(|o, _| *o >= now.0);
            }
            92..95 => {
                let base = Offset(hw.0 + rng.random_range(1..50));
                // The primary's history agrees with the records both hold.
                let history = log.epoch_history(P);
                match log.skip_to(P, base, history).await {
                    Ok(_) => model.records.clear(),
                    Err(e) if gone_by_cut(disk, &e) => {
                        model.skipping = Some(base.0);
                        return Ok(());
                    }
                    Err(e) => return fail(format!("skip to {base} failed without a cut: {e}")),
                }
            }
            _ => match log.flush(P).await {
                Ok(()) => {}
                Err(e) if gone_by_cut(disk, &e) => return Ok(()),
                Err(e) => return fail(format!("flush failed without a cut: {e}")),
            },
        }
    }
    Ok(())
}

/// One seed: a few lives, each ended by a power cut (sometimes a kill),
/// each followed by recovery and the checks.
pub(super) fn run(seed: u64) -> Outcome<u32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut rng = StdRng::seed_from_u64(seed);
        let disk = SimDisk::new();
        let mut model = Model {
            epoch: Epoch(1),
            ..Model::default()
        };
        let mut cuts = 0;
        let mut log = recover_cut(&disk, &mut rng, &mut model, &mut cuts).await?;
        for life_no in 0..rng.random_range(2..6) {
            disk.arm_cut(rng.random_range(1..400), rng.random());
            life(&disk, &mut rng, &log, &mut model, life_no).await?;
            if disk.fired().is_none() {
                if rng.random_bool(0.2) {
                    disk.kill();
                } else {
                    disk.power_cut(&mut rng);
                }
            }
            cuts += 1;
            drop(log);
            log = recover_cut(&disk, &mut rng, &mut model, &mut cuts).await?;
        }
        Ok(cuts)
    })
}
