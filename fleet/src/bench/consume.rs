//! `fleet bench consume`: how fast a consumer group drains a hub's log,
//! against the baseline of reading the same log alone over the same HTTP
//! API (every partition in parallel, same batch size), in one run.
//!
//! The log is filled once through MQTT; then every round measures, in turn:
//! the plain read, a consumer group with a no-op handler (leases,
//! checkpoints after every batch in a SQLite store), and the built-in SQL
//! sink into PostgreSQL (store on PostgreSQL too, as for many machines).
//! Each consumer phase uses a fresh group, so it starts from offset 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use clap::Args;
use consumer::sink::SqlSink;
use consumer::{Consumer, ConsumerConfig, Handler, HandlerError};
use fleet_api::client::HubClient;
use fleet_api::hub::WireRecord;
use fleet_api::{Offset, PartitionId, Secret};
use registry_sync::testing::TempPg;
use serde::Serialize;

use super::driver::{self, Load};
use super::ingest::{BENCH_TOKEN, start_hub};
use super::{machine, median};

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Seconds of MQTT load that fill the log before measuring.
    #[arg(long, default_value_t = 3)]
    fill_s: u64,
    /// Publishing connections during the fill (one device each).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Records per read and per handler call.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Rounds; each measures every phase once, in turn.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Skip the PostgreSQL phase (no server at hand).
    #[arg(long)]
    no_postgres: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    phase: &'static str,
    records_per_s: f64,
    samples: Vec<f64>,
    ratio_to_read: f64,
}

struct Noop;

#[async_trait]
impl Handler for Noop {
    async fn handle(&self, _batch: &[WireRecord]) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Runs the benchmark.
///
/// # Errors
/// When the hub, PostgreSQL or a phase fails.
pub async fn run(args: ConsumeArgs, json: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(dir.path(), args.connections).await?;
    let http = hub.http.context("the hub's HTTP address")?;
    let url = format!("http://{http}");
    driver::run(
        hub.addr,
        &hub.clients,
        Load {
            window: 64,
            payload: args.payload,
            duration: Duration::from_secs(args.fill_s),
            rate: None,
        },
    )
    .await
    .context("fill the log")?;
    let client = HubClient::new(url.clone(), Some(Secret::new(BENCH_TOKEN)));
    let hws: Vec<Offset> = client
        .status()
        .await?
        .partitions
        .iter()
        .map(|p| p.high_watermark)
        .collect();
    let total: u64 = hws.iter().map(|o| o.0).sum();
    if !json {
        eprintln!("machine: {}", machine());
        eprintln!(
            "{total} records of {} B in {} partitions; batches of {}; {} rounds",
            args.payload,
            hws.len(),
            args.batch,
            args.rounds
        );
    }
    let mut phases: Vec<(&'static str, Vec<f64>)> = vec![
        ("read the log alone", vec![]),
        ("consumer, no-op handler (SQLite store)", vec![]),
    ];
    if !args.no_postgres {
        phases.push(("consumer, PostgreSQL sink (PostgreSQL store)", vec![]));
    }
    for round in 0..args.rounds {
        for (i, (name, samples)) in phases.iter_mut().enumerate() {
            let secs = match i {
                0 => read_all(&client, &hws, args.batch).await?,
                1 => {
                    let store = format!(
                        "sqlite://{}",
                        dir.path().join(format!("store-{round}.db")).display()
                    );
                    consume_all(&url, &store, Arc::new(Noop), total, args.batch).await?
                }
                _ => {
                    let store = TempPg::new().await;
                    let sink_db = TempPg::new().await;
                    let sink = SqlSink::open(sink_db.url(), "telemetry").await?;
                    let secs =
                        consume_all(&url, store.url(), Arc::new(sink.clone()), total, args.batch)
                            .await?;
                    anyhow::ensure!(
                        sink.count().await? == total,
                        "the sink holds {} of {total} records",
                        sink.count().await?
                    );
                    secs
                }
            };
            let rate = total as f64 / secs;
            if !json {
                eprintln!("  round {}: {name}: {rate:.0} records/s", round + 1);
            }
            samples.push(rate);
        }
    }
    let base = median(&phases[0].1);
    let rows: Vec<Row> = phases
        .into_iter()
        .map(|(phase, samples)| {
            let m = median(&samples);
            Row {
                phase,
                records_per_s: m,
                samples,
                ratio_to_read: m / base,
            }
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::json!({"machine": machine(), "records": total, "rows": rows})
        );
    } else {
        println!("{:<46} {:>12} {:>10}", "phase", "records/s", "vs read");
        for r in &rows {
            println!(
                "{:<46} {:>12.0} {:>9.2}×",
                r.phase, r.records_per_s, r.ratio_to_read
            );
        }
    }
    Ok(())
}

/// Reads every partition to its high watermark, all in parallel; seconds.
async fn read_all(client: &HubClient, hws: &[Offset], batch: usize) -> anyhow::Result<f64> {
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (p, hw) in hws.iter().enumerate() {
        let (client, hw) = (client.clone(), *hw);
        tasks.spawn(async move {
            let mut from = Offset(0);
            while from < hw {
                let page = client
                    .records(PartitionId(p as u32), from, batch, Duration::ZERO)
                    .await?;
                let last = page
                    .records
                    .last()
                    .context("empty page below the watermark")?;
                from = last.offset.next();
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Runs a fresh consumer group until it processed `total` records; seconds.
async fn consume_all(
    hub: &str,
    store: &str,
    handler: Arc<dyn Handler>,
    total: u64,
    batch: usize,
) -> anyhow::Result<f64> {
    let mut config = ConsumerConfig::new("bench", vec![hub.to_string()], store);
    config.hub_token = Some(Secret::new(BENCH_TOKEN));
    config.batch = batch;
    let start = tokio::time::Instant::now();
    let consumer = Consumer::start(config, handler).await?;
    let deadline = start + Duration::from_secs(600);
    while consumer.status().processed < total {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the consumer stalled at {} of {total}",
            consumer.status().processed
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    consumer.shutdown().await;
    Ok(secs)
}
