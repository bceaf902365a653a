//! `fleet torture`: seeded power cuts under every durable structure, on the
//! simulated disk (`fleet_api::storage::SimDisk`).
//!
//! Each seed runs a few "lives" of one structure: random operations, a
//! power cut at a random disk operation (sometimes a kill -9 instead),
//! recovery, then the checks: every acknowledged record is there byte for
//! byte, nothing corrupt or half-written is served, offsets stay dense, an
//! outbox never reuses or loses a mid it handed out, and a state file holds
//! the last acknowledged value or the one being written. A seed fixes
//! everything (operations, the cut point, what the cut keeps, and how
//! appends group into writes), so a failing seed replays exactly:
//! `fleet torture --seed N`.

mod files;
mod log;
mod outbox;

use std::ops::Range;

use clap::{Args, ValueEnum};

type Outcome<T> = Result<T, String>;

fn fail<T>(why: impl Into<String>) -> Outcome<T> {
    Err(why.into())
}

/// Before a recovery: now and then, a power cut somewhere inside it (within
/// its first `within` disk operations).
fn maybe_arm(disk: &fleet_api::storage::SimDisk, rng: &mut rand::rngs::StdRng, within: u64) {
    use rand::Rng;
    if rng.random_bool(0.3) {
        disk.arm_cut(rng.random_range(1..within), rng.random());
    }
}

/// After a recovery attempt: its outcome, or `None` when a power cut ended
/// it (counted; recover again).
fn settle<T>(
    disk: &fleet_api::storage::SimDisk,
    attempt: Outcome<T>,
    cuts: &mut u32,
) -> Option<Outcome<T>> {
    match attempt {
        Err(_) if disk.fired().is_some() => {
            *cuts += 1;
            disk.disarm();
            None
        }
        done => {
            disk.disarm();
            Some(done)
        }
    }
}

/// Which structure a run tortures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// The hub's event log.
    Log,
    /// The device agent's outbox.
    Outbox,
    /// The hub's state files (role and epoch, de-dup snapshot, peer pulled).
    Files,
}

impl Target {
    const ALL: [Target; 3] = [Target::Log, Target::Outbox, Target::Files];

    fn run(self, seed: u64) -> Outcome<u32> {
        match self {
            Target::Log => log::run(seed),
            Target::Outbox => outbox::run(seed),
            Target::Files => files::run(seed),
        }
    }
}

/// `fleet torture` arguments.
#[derive(Debug, Args)]
pub struct TortureArgs {
    /// How many seeds per structure.
    #[arg(long, default_value_t = 1000)]
    pub seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// Run only this seed (to replay a failure).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Only these structures (default: all).
    #[arg(long, value_enum)]
    pub only: Vec<Target>,
}

/// A failing seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub target: Target,
    pub seed: u64,
    pub why: String,
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seeds: u64,
    pub power_cuts: u64,
    pub failures: Vec<Failure>,
}

/// Runs `seeds` of each of `targets`; a panic counts as a failure of its
/// seed. `progress` hears about every finished seed.
pub fn torture(targets: &[Target], seeds: Range<u64>, mut progress: impl FnMut(&Report)) -> Report {
    let targets = if targets.is_empty() {
        &Target::ALL[..]
    } else {
        targets
    };
    let mut report = Report::default();
    for &target in targets {
        for seed in seeds.clone() {
            let outcome = std::panic::catch_unwind(|| target.run(seed)).unwrap_or_else(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(format!("panicked: {why}"))
            });
            report.seeds += 1;
            match outcome {
                Ok(cuts) => report.power_cuts += u64::from(cuts),
                Err(why) => report.failures.push(Failure { target, seed, why }),
            }
            progress(&report);
        }
    }
    report
}

/// `fleet torture`.
///
/// # Errors
/// When a seed fails (each is printed with the command that replays it).
pub fn main(args: TortureArgs) -> anyhow::Result<()> {
    let seeds = match args.seed {
        Some(s) => s..s.saturating_add(1),
        None => args.start..args.start.saturating_add(args.seeds),
    };
    let started = tokio::time::Instant::now();
    let report = torture(&args.only, seeds, |r| {
        if r.seeds % 500 == 0 {
            eprintln!(
                "torture: {} seeds, {} power cuts, {} failures",
                r.seeds,
                r.power_cuts,
                r.failures.len()
            );
        }
    });
    for f in &report.failures {
        println!(
            "FAIL {:?} seed {}: {}\n  replay: fleet torture --only {} --seed {}",
            f.target,
            f.seed,
            f.why,
            format!("{:?}", f.target).to_lowercase(),
            f.seed
        );
    }
    println!(
        "{} power cuts over {} seeds ({} structures), {} acknowledged records lost, in {:.1} s",
        report.power_cuts,
        report.seeds,
        if args.only.is_empty() {
            Target::ALL.len()
        } else {
            args.only.len()
        },
        if report.failures.is_empty() {
            "0".to_string()
        } else {
            format!("{} seeds with", report.failures.len())
        },
        started.elapsed().as_secs_f64()
    );
    if report.failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} seeds failed", report.failures.len())
    }
}
