//! A deterministic model of two regions driven through seeded random
//! histories of writes, replication, retention on both roles, forced and
//! planned promotions, deaths and returns, reconciling with the same rule
//! the hubs use ([`divergence`], [`first_after`], [`epoch_end`]) on an epoch
//! history kept the way the hubs keep it (noted on append, cut with the
//! log, taken from the primary when skipping forward).
//!
//! After every history: where both regions still hold an offset they hold
//! the same record; every record acknowledged as `replicated` was held, at
//! its offset, by every region whose log reaches past it (retention may
//! have deleted it since, but no region ever claimed that offset with
//! another record or with a gap); failback archived only foreign records.

use std::collections::BTreeSet;

use fleet_api::{Epoch, Offset};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{divergence, epoch_end, first_after};

/// A record: the epoch it was written in and a unique id.
type Rec = (Epoch, u64);

/// What a region holds at an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Held(Rec),
    /// Held once, deleted by retention.
    Deleted(Rec),
    /// Skipped forward over: never held here.
    Gap,
}

impl Slot {
    fn rec(self) -> Option<Rec> {
        match self {
            Slot::Held(r) | Slot::Deleted(r) => Some(r),
            Slot::Gap => None,
        }
    }

    fn held(self) -> Option<Rec> {
        match self {
            Slot::Held(r) => Some(r),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Region {
    log: Vec<Slot>,
    /// The first retained offset.
    start: usize,
    /// The epoch history as the hubs keep it.
    hist: Vec<(Epoch, Offset)>,
    epoch: Epoch,
    primary: bool,
    alive: bool,
    /// A secondary pulls only after reconciling with the current primary.
    reconciled: bool,
    /// As primary: how far the peer has pulled (holds retention).
    pulled: usize,
    /// As primary: the peer was detached by a forced promotion and has not
    /// caught up since (it does not hold retention).
    detached: bool,
}

impl Region {
    fn hw(&self) -> Offset {
        Offset(self.log.len() as u64)
    }

    fn append(&mut self, rec: Rec) {
        if self.hist.last().is_none_or(|(e, _)| rec.0 > *e) {
            self.hist.push((rec.0, self.hw()));
        }
        self.log.push(Slot::Held(rec));
    }

    /// The history derived from the retained records only (what the hubs
    /// did before the epoch history was kept beyond retention).
    fn retained_history(&self) -> Vec<(Epoch, Offset)> {
        let mut out: Vec<(Epoch, Offset)> = Vec::new();
        for (o, s) in self.log.iter().enumerate().skip(self.start) {
            if let Some((e, _)) = s.held()
                && out.last().is_none_or(|(last, _)| e > *last)
            {
                out.push((e, Offset(o as u64)));
            }
        }
        out
    }

    /// Cuts back to `at`, returning the retained records cut.
    fn cut(&mut self, at: usize) -> Vec<(u64, Rec)> {
        let archived = self
            .log
            .iter()
            .enumerate()
            .skip(at.max(self.start))
            .filter_map(|(o, s)| s.held().map(|r| (o as u64, r)))
            .collect();
        self.log.truncate(at);
        self.start = self.start.min(at);
        self.hist.retain(|(_, s)| s.0 < at as u64);
        self.pulled = self.pulled.min(at);
        archived
    }

    fn retain(&mut self, upto: usize) {
        for s in self.log.iter_mut().take(upto).skip(self.start) {
            if let Slot::Held(r) = *s {
                *s = Slot::Deleted(r);
            }
        }
        self.start = self.start.max(upto);
    }
}

/// Which epoch history a returning hub reconciles on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rule {
    /// The hubs' rule: the kept epoch history.
    History,
    /// Only where the last epoch ends (KIP-279).
    LastEpochOnly,
    /// The whole rule, but on the retained records only.
    RetainedOnly,
}

struct World {
    r: [Region; 2],
    /// The highest epoch ever used (a concierge knows it).
    max_epoch: Epoch,
    /// `(offset, id)` acknowledged as `replicated` to some device.
    acked: BTreeSet<(u64, u64)>,
    /// `(offset, record)` set aside by failback.
    archived: Vec<(u64, Rec)>,
    next_id: u64,
    rule: Rule,
    retention: bool,
}

impl World {
    fn new(rule: Rule, retention: bool) -> World {
        let a = Region {
            epoch: Epoch(1),
            primary: true,
            alive: true,
            reconciled: true,
            ..Region::default()
        };
        let b = Region {
            epoch: Epoch(1),
            alive: true,
            ..Region::default()
        };
        World {
            r: [a, b],
            max_epoch: Epoch(1),
            acked: BTreeSet::new(),
            archived: Vec::new(),
            next_id: 0,
            rule,
            retention,
        }
    }

    fn write(&mut self, i: usize, n: usize) {
        if !(self.r[i].alive && self.r[i].primary) {
            return;
        }
        for _ in 0..n {
            let rec = (self.r[i].epoch, self.next_id);
            self.r[i].append(rec);
            self.next_id += 1;
        }
    }

    /// Both alive: the one with the lower epoch learns the higher one (a
    /// primary that learns it steps down).
    fn meet(&mut self) {
        if !(self.r[0].alive && self.r[1].alive) {
            return;
        }
        let (hi, lo) = if self.r[0].epoch >= self.r[1].epoch {
            (0, 1)
        } else {
            (1, 0)
        };
        if self.r[lo].epoch < self.r[hi].epoch || (self.r[lo].primary && self.r[hi].primary) {
            let e = self.r[hi].epoch;
            let lo = &mut self.r[lo];
            lo.epoch = e;
            lo.primary = false;
            lo.reconciled = false;
        }
    }

    fn reconcile(&mut self, s: usize) {
        let p = 1 - s;
        for _ in 0..100 {
            let me = &self.r[s];
            let hw = me.hw();
            let hist = match self.rule {
                Rule::RetainedOnly => me.retained_history(),
                _ => me.hist.clone(),
            };
            let Some(&(mine, _)) = hist.last() else {
                self.r[s].reconciled = true;
                return;
            };
            let theirs = match self.rule {
                Rule::RetainedOnly => self.r[p].retained_history(),
                _ => self.r[p].hist.clone(),
            };
            let answer = epoch_end(&theirs, self.r[p].hw(), mine);
            let cut = match self.rule {
                Rule::LastEpochOnly => (answer.offset < hw).then_some(answer.offset),
                _ => {
                    let own = first_after(&hist, hw, answer.epoch);
                    divergence(mine, hw, answer, own).expect("plausible answer")
                }
            };
            let Some(cut) = cut else {
                self.r[s].reconciled = true;
                return;
            };
            let moved = self.r[s].cut(cut.0 as usize);
            self.archived.extend(moved);
        }
        panic!("reconciling does not converge");
    }

    fn primary(&self) -> Option<usize> {
        (0..2).find(|&i| self.r[i].primary)
    }

    /// The secondary pulls up to `n` records; the primary then counts
    /// everything below the secondary's end as replicated.
    fn replicate(&mut self, n: usize) {
        self.meet();
        if !(self.r[0].alive && self.r[1].alive) {
            return;
        }
        let Some(p) = self.primary() else { return };
        let s = 1 - p;
        if self.r[s].primary {
            return;
        }
        if !self.r[s].reconciled {
            self.reconcile(s);
        }
        let from = self.r[s].log.len();
        if from > self.r[p].log.len() {
            // Pulls are refused ("diverged") and the hub reconciles again.
            self.r[s].reconciled = false;
            return;
        }
        if from < self.r[p].start {
            // 410: skip forward, taking the primary's history below.
            let to = self.r[p].start;
            let below: Vec<(Epoch, Offset)> = self.r[p]
                .hist
                .iter()
                .copied()
                .filter(|(_, at)| at.0 < to as u64)
                .collect();
            let me = &mut self.r[s];
            me.log.resize(to, Slot::Gap);
            me.start = to;
            me.hist = below;
        }
        let from = self.r[s].log.len();
        let to = from.saturating_add(n).min(self.r[p].log.len());
        for o in from..to {
            let rec = self.r[p].log[o]
                .held()
                .expect("the primary retains what it serves");
            self.r[s].append(rec);
        }
        // The pull from `to` acknowledges everything below it.
        let end = self.r[s].log.len();
        for o in 0..end {
            if let Some((_, id)) = self.r[p].log[o].held() {
                self.acked.insert((o as u64, id));
            }
        }
        let prim = &mut self.r[p];
        prim.pulled = prim.pulled.max(end);
        if end == prim.log.len() {
            prim.detached = false;
        }
    }

    fn forced(&mut self, i: usize) {
        if !self.r[i].alive || self.r[i].primary {
            return;
        }
        self.max_epoch = Epoch(self.max_epoch.0 + 1);
        let reg = &mut self.r[i];
        reg.epoch = self.max_epoch;
        reg.primary = true;
        reg.reconciled = true;
        reg.detached = true;
        reg.pulled = 0;
    }

    fn planned(&mut self) {
        self.meet();
        if !(self.r[0].alive && self.r[1].alive) {
            return;
        }
        let Some(p) = self.primary() else { return };
        // Catch up to exactly what the fenced primary holds, then switch.
        self.replicate(usize::MAX);
        let s = 1 - p;
        if self.r[s].primary || self.r[s].log.len() != self.r[p].log.len() || !self.r[s].reconciled
        {
            return;
        }
        self.max_epoch = Epoch(self.max_epoch.0 + 1);
        self.r[s].epoch = self.max_epoch;
        self.r[s].primary = true;
        self.r[s].detached = false;
        self.r[s].pulled = self.r[s].log.len();
        self.r[p].primary = false;
        self.r[p].epoch = self.max_epoch;
        self.r[p].reconciled = false;
    }

    /// A concierge (or an operator) tells region `i` the highest epoch in
    /// use: a stale primary steps down.
    fn learn(&mut self, i: usize) {
        let reg = &mut self.r[i];
        if reg.alive && reg.epoch < self.max_epoch {
            reg.epoch = self.max_epoch;
            reg.primary = false;
            reg.reconciled = false;
        }
    }

    /// Retention on region `i`, never past what its role allows: a
    /// secondary anything it holds; a primary what its attached peer has
    /// pulled (anything when the peer is detached).
    fn retain(&mut self, i: usize, rng: &mut StdRng) {
        let reg = &self.r[i];
        if !self.retention || !reg.alive {
            return;
        }
        let floor = if !reg.primary || reg.detached {
            reg.log.len()
        } else {
            reg.pulled.min(reg.log.len())
        };
        if floor > reg.start {
            let upto = rng.random_range(reg.start..=floor);
            self.r[i].retain(upto);
        }
    }

    fn step(&mut self, rng: &mut StdRng) {
        let i = rng.random_range(0..2usize);
        match rng.random_range(0..12u32) {
            0..=3 => {
                let n = rng.random_range(1..40);
                self.write(i, n);
            }
            4..=5 => {
                let n = rng.random_range(1..60);
                self.replicate(n);
            }
            6 => self.r[i].alive = false,
            7 => self.r[i].alive = true,
            8 => self.forced(i),
            9 => self.learn(i),
            10 => self.retain(i, rng),
            _ => self.planned(),
        }
    }

    /// Everyone returns and replication runs to the end.
    fn settle(&mut self) {
        self.r[0].alive = true;
        self.r[1].alive = true;
        if self.primary().is_none() {
            self.forced(0);
        }
        for _ in 0..4 {
            self.replicate(usize::MAX);
        }
    }

    /// The final history, or why the model found it wrong.
    fn check(&self) -> Result<(), String> {
        let (a, b) = (&self.r[0].log, &self.r[1].log);
        if a.len() != b.len() {
            return Err(format!("the regions end at {} and {}", a.len(), b.len()));
        }
        for (o, (x, y)) in a.iter().zip(b).enumerate() {
            if let (Some(x), Some(y)) = (x.held(), y.held())
                && x != y
            {
                return Err(format!("the regions hold different records at offset {o}"));
            }
        }
        for &(o, id) in &self.acked {
            for (i, reg) in self.r.iter().enumerate() {
                let Some(slot) = reg.log.get(o as usize) else {
                    continue;
                };
                if slot.rec().is_none_or(|(_, x)| x != id) {
                    return Err(format!(
                        "record {id}, acknowledged as replicated at offset {o}, was never held there by region {i} ({slot:?})"
                    ));
                }
            }
        }
        let primary = self.primary().map_or(a, |p| &self.r[p].log);
        for &(o, (_, id)) in &self.archived {
            if primary
                .get(o as usize)
                .and_then(|s| s.rec())
                .is_some_and(|(_, x)| x == id)
            {
                return Err(format!(
                    "record {id} at offset {o} was archived although the final history holds it"
                ));
            }
        }
        Ok(())
    }
}

/// The history that defeats a last-epoch-only check (issue: KIP-279): A at
/// epoch 1 writes 0..150 while B holds 0..80; B is forced (epoch 2) and
/// writes 80..120; B dies; A is forced (epoch 3); B returns. With
/// `b_retains`, B's retention deletes the start of its epoch 2 first.
fn kip_279(rule: Rule, b_retains: bool) -> World {
    let mut w = World::new(rule, true);
    w.write(0, 80);
    w.replicate(usize::MAX);
    w.r[1].alive = false;
    w.write(0, 70);
    w.r[0].alive = false;
    w.r[1].alive = true;
    w.forced(1);
    w.write(1, 40);
    if b_retains {
        w.r[1].retain(110);
    }
    w.r[1].alive = false;
    w.r[0].alive = true;
    // A learns of epoch 2 (a concierge or operator demotes it), then is forced.
    w.learn(0);
    w.forced(0);
    w.write(0, 10);
    w.r[1].alive = true;
    w.replicate(usize::MAX);
    w.replicate(usize::MAX);
    w
}

fn run(rule: Rule, retention: bool, seed: u64) -> World {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = World::new(rule, retention);
    let len = rng.random_range(5..120);
    for _ in 0..len {
        w.step(&mut rng);
    }
    w.settle();
    w
}

fn seeds() -> u64 {
    std::env::var("FLEET_MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000)
}

#[test]
fn the_kip_279_history_is_reconciled_on_the_whole_epoch_history() {
    let w = kip_279(Rule::History, false);
    w.check().expect("the history rule reconciles KIP-279");
    assert_eq!(w.r[1].log.len(), 160);
    // B's epoch-2 records, and nothing else, were set aside.
    let archived: Vec<u64> = w.archived.iter().map(|(o, _)| *o).collect();
    assert_eq!(archived, (80..120).collect::<Vec<_>>());
    assert!(w.archived.iter().all(|(_, (e, _))| *e == Epoch(2)));
    // Also when B's retention deleted where its epoch 2 began.
    kip_279(Rule::History, true)
        .check()
        .expect("the kept history reconciles below the retained log");
}

#[test]
fn the_old_rules_are_defeated_by_the_kip_279_history() {
    // The model is sharp enough to see the old rules' failures.
    assert!(kip_279(Rule::LastEpochOnly, false).check().is_err());
    assert!(kip_279(Rule::RetainedOnly, true).check().is_err());
}

#[test]
fn random_failover_histories_keep_every_replicated_record() {
    for seed in 0..seeds() {
        for retention in [false, true] {
            if let Err(e) = run(Rule::History, retention, seed).check() {
                panic!("seed {seed} (retention {retention}): {e}");
            }
        }
    }
}

#[test]
fn random_histories_find_the_old_rules_failures() {
    // The random histories reach the failing shapes on their own.
    for (rule, retention) in [(Rule::LastEpochOnly, false), (Rule::RetainedOnly, true)] {
        let failing = (0..3000u64).find(|&seed| run(rule, retention, seed).check().is_err());
        assert!(failing.is_some(), "no random history defeats {rule:?}");
    }
}
