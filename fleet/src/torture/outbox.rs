//! Power cuts under the device agent's outbox: appends (each `ok MID`
//! fsynced), acknowledgements, segment deletion, a full outbox dropping its
//! oldest, and the numbering base.

use std::collections::BTreeMap;
use std::path::Path;

use device_agent::outbox::{Fsync, Outbox};
use fleet_api::Mid;
use fleet_api::storage::SimDisk;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Outcome, fail, maybe_arm, settle};

const DIR: &str = "/agent/outbox";

#[derive(Default)]
struct Model {
    /// Mids handed out (`ok MID`) and not yet acknowledged, with payloads.
    records: BTreeMap<u64, Vec<u8>>,
    /// The highest mid ever handed out.
    last: u64,
    /// The highest mid acknowledged to the outbox.
    acked: u64,
    base: Option<u64>,
    /// The payload of an append the cut interrupted (it may survive, under
    /// the next mid, without ever having been acknowledged).
    appending: Option<Vec<u8>>,
    /// An acknowledgement the cut interrupted (it may have been saved).
    acking: Option<u64>,
}

fn open(disk: &SimDisk, max_bytes: u64) -> Outcome<Outbox> {
    Outbox::open_on(disk.mount(), Path::new(DIR), max_bytes, Fsync::Always)
        .map_err(|e| format!("outbox recovery failed: {e}"))
}

fn recover(disk: &SimDisk, max_bytes: u64, model: &mut Model) -> Outcome<Outbox> {
    let mut o = open(disk, max_bytes)?;
    if o.base() != model.base && !(model.base.is_none() && o.base().is_some()) {
        return fail(format!(
            "numbering base {:?} after recovery, {:?} was set",
            o.base(),
            model.base
        ));
    }
    model.base = o.base();
    let acked = o.acked().0;
    if acked > model.acked.max(model.acking.unwrap_or(0)) {
        return fail(format!(
            "recovered as acknowledged up to {acked}, only {} was",
            model.acked
        ));
    }
    let want: Vec<(u64, Vec<u8>)> = model
        .records
        .range(acked + 1..)
        .map(|(m, p)| (*m, p.clone()))
        .collect();
    let got = o
        .read_from(Mid(acked + 1), usize::MAX)
        .map_err(|e| format!("reading the outbox after recovery: {e}"))?;
    let got: BTreeMap<u64, Vec<u8>> = got
        .into_iter()
        .map(|p| (p.mid.0, p.payload.to_vec()))
        .collect();
    for (mid, payload) in &want {
        match got.get(mid) {
            Some(p) if p == payload => {}
            Some(_) => return fail(format!("mid {mid} holds another payload after recovery")),
            None => return fail(format!("mid {mid} was handed out (ok) and is lost")),
        }
    }
    for (mid, payload) in got.range(model.last + 1..) {
        if *mid != model.last + 1 || model.appending.as_ref() != Some(payload) {
            return fail(format!(
                "mid {mid} is in the outbox but was never handed out (the last was {})",
                model.last
            ));
        }
        // The interrupted append survived: it is sent like any other.
        model.last = *mid;
        model.records.insert(*mid, payload.clone());
    }
    model.appending = None;
    model.acking = None;
    model.acked = model.acked.max(acked);
    model.records.retain(|m, _| *m > acked);
    Ok(o)
}

/// Recovery, itself cut short by power cuts now and then, until it gets
/// through; then the checks.
fn recover_cut(
    disk: &SimDisk,
    rng: &mut StdRng,
    max_bytes: u64,
    model: &mut Model,
    cuts: &mut u32,
) -> Outcome<Outbox> {
    loop {
        maybe_arm(disk, rng, 10);
        if let Some(done) = settle(disk, recover(disk, max_bytes, model), cuts) {
            return done;
        }
    }
}

fn life(disk: &SimDisk, rng: &mut StdRng, o: &mut Outbox, model: &mut Model) -> Outcome<()> {
    for _ in 0..rng.random_range(5..80) {
        if disk.fired().is_some() {
            return Ok(());
        }
        match rng.random_range(0..100) {
            0..65 => {
                let mut payload = vec![0u8; rng.random_range(0..600)];
                rng.fill(&mut payload[..]);
                let dropped_before = o.stats().dropped;
                model.appending = Some(payload.clone());
                match o.append(&payload) {
                    Ok(mid) => {
                        if mid.0 <= model.last {
                            return fail(format!(
                                "mid {mid} handed out again (the last was {})",
                                model.last
                            ));
                        }
                        model.last = mid.0;
                        model.records.insert(mid.0, payload);
                        model.appending = None;
                        if o.stats().dropped > dropped_before {
                            // A full outbox dropped its oldest: settled.
                            let settled = o.acked().0;
                            model.acked = model.acked.max(settled);
                            model.records.retain(|m, _| *m > settled);
                        }
                    }
                    Err(_) if disk.fired().is_some() => return Ok(()),
                    Err(e) => return fail(format!("append failed without a cut: {e}")),
                }
            }
            65..90 if model.last > model.acked => {
                let upto = rng.random_range(model.acked + 1..=model.last);
                model.acking = Some(upto);
                match o.ack(Mid(upto)) {
                    Ok(()) => {
                        model.acking = None;
                        model.acked = upto;
                        model.records.retain(|m, _| *m > upto);
                    }
                    Err(_) if disk.fired().is_some() => return Ok(()),
                    Err(e) => return fail(format!("ack failed without a cut: {e}")),
                }
            }
            90..93 if model.base.is_none() => {
                let base = rng.random_range(0..1_000_000);
                match o.set_base(Mid(base)) {
                    Ok(()) => model.base = Some(base),
                    Err(_) if disk.fired().is_some() => return Ok(()),
                    Err(e) => return fail(format!("set_base failed without a cut: {e}")),
                }
            }
            _ => {
                let from = rng.random_range(0..=model.last + 1);
                if let Err(e) = o.read_from(Mid(from), 16)
                    && disk.fired().is_none()
                {
                    return fail(format!("read failed without a cut: {e}"));
                }
            }
        }
    }
    Ok(())
}

pub(super) fn run(seed: u64) -> Outcome<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = SimDisk::new();
    let max_bytes = rng.random_range(8 * 1024..64 * 1024);
    let mut model = Model::default();
    let mut cuts = 0;
    let mut o = recover_cut(&disk, &mut rng, max_bytes, &mut model, &mut cuts)?;
    for _ in 0..rng.random_range(2..6) {
        disk.arm_cut(rng.random_range(1..300), rng.random());
        life(&disk, &mut rng, &mut o, &mut model)?;
        if disk.fired().is_none() {
            if rng.random_bool(0.2) {
                disk.kill();
            } else {
                disk.power_cut(&mut rng);
            }
        }
        cuts += 1;
        o = recover_cut(&disk, &mut rng, max_bytes, &mut model, &mut cuts)?;
        // Whatever the cut took, numbering never goes back.
        if o.stats().last_mid.0 < model.last {
            // The next mid handed out must still be above every one before.
            model.last = model.last.max(o.stats().last_mid.0);
        }
    }
    Ok(cuts)
}
