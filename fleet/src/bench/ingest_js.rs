//! `fleet bench ingest --log jetstream`: the hub's MQTT ingest into an R3
//! JetStream log (three nats-server processes with fsync before ack)
//! against a raw async-nats publisher writing the same records (the hub's
//! frames, one subject per device) to streams of the same configuration
//! on the same cluster, with the same connections and window; and against
//! the hub on its embedded file log. Rounds alternate the targets; medians.

use std::future::IntoFuture;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use bytes::Bytes;
use fleet_api::local::NatsCluster;
use fleet_api::{DeviceId, Epoch, Mid, Offset, Region, UnixMillis, partition_for};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use hub::log::NewRecord;
use hub::log::jetstream::{stored_body, stream_layout};
use serde::Serialize;
use tokio::time::Instant;

use super::driver::{self, Client, Load};
use super::ingest::{bench_clients, register, spawn_hub};
use super::{machine, median};

/// Partitions of the hubs' logs and of the raw publisher's streams.
const PARTITIONS: u32 = 8;

#[derive(Debug, Serialize)]
struct Row {
    target: &'static str,
    msgs_per_s: f64,
    samples: Vec<f64>,
}

/// What a phase measures on one target.
enum Target {
    /// A hub over MQTT.
    Hub {
        addr: std::net::SocketAddr,
        clients: Vec<Client>,
        _process: tokio::process::Child,
    },
    /// Several hubs of one region sharing one log, each device sent to the
    /// hub that writes its partition (as the concierge would).
    Hubs {
        /// Per hub: its MQTT address and the devices it writes.
        hubs: Vec<(std::net::SocketAddr, Vec<Client>)>,
        http: Vec<std::net::SocketAddr>,
        processes: Vec<tokio::process::Child>,
    },
    /// async-nats publishing straight into the streams.
    Raw {
        js: jetstream::Context,
        devices: Vec<(String, DeviceId)>,
    },
}

/// Runs the benchmark.
///
/// # Errors
/// When the cluster or a hub does not start, or a phase fails.
pub async fn run(
    connections: usize,
    window: usize,
    payload: usize,
    seconds: u64,
    rounds: usize,
    json: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let nats_dir = dir.path().join("nats");
    std::fs::create_dir_all(&nats_dir)?;
    let cluster = NatsCluster::start(&nats_dir, "bench", 3)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut targets: Vec<(&'static str, Target)> = vec![
        (
            "hub-jetstream",
            start_hub(
                &dir.path().join("js"),
                connections,
                &["--log", &cluster.log_url("bench_hub")],
            )
            .await?,
        ),
        (
            "raw-jetstream",
            start_raw(&cluster, connections, "bench_hub").await?,
        ),
        (
            "2hubs-jetstream",
            start_hubs(
                &dir.path().join("js2"),
                connections,
                &cluster.log_url("bench_two"),
                2,
            )
            .await?,
        ),
        (
            "hub-file",
            start_hub(&dir.path().join("file"), connections, &[]).await?,
        ),
    ];
    if !json {
        eprintln!("machine: {}", machine());
        eprintln!(
            "{connections} connections × {window} in flight, {payload} B payloads, {seconds} s phases, {rounds} rounds; \
             JetStream: 3 nats-server {} on loopback, R3 streams, sync_interval: always",
            fleet_api::local::NATS_SERVER_VERSION
        );
    }
    let load = Load {
        window,
        payload,
        duration: Duration::from_secs(seconds),
        rate: None,
    };
    // Warm-up, not measured.
    for (_, t) in &mut targets {
        phase(
            t,
            Load {
                duration: Duration::from_secs(1),
                ..load
            },
        )
        .await?;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        // Every other round in reverse order: the machine's speed drifts
        // (seen here: +25 % over a minute), and a fixed order would give
        // whichever target comes later the faster minutes.
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (name, t) = &mut targets[i];
            let rate = phase(t, load)
                .await
                .with_context(|| format!("{name} phase"))?;
            if !json {
                eprintln!("  round {} {name:<14} {rate:>9.0} msgs/s", round + 1);
            }
            rates[i].push(rate);
        }
    }
    // The hub against the raw publisher round by round: the two phases of
    // a round are next to each other in time.
    let paired: Vec<f64> = rates[0]
        .iter()
        .zip(&rates[1])
        .map(|(hub, raw)| hub / raw.max(1e-9))
        .collect();
    // Last, one of the two hubs is killed under load.
    let mut takeover = None;
    if let Some((
        _,
        Target::Hubs {
            hubs,
            http,
            processes,
        },
    )) = targets.get_mut(2)
    {
        let devices = hubs
            .iter()
            .enumerate()
            .flat_map(|(i, (_, cs))| cs.iter().map(move |c| (c.clone(), i)))
            .collect();
        let addrs: Vec<_> = http
            .iter()
            .copied()
            .zip(hubs.iter().map(|(m, _)| *m))
            .collect();
        let t = super::takeover::measure(&addrs, devices, &mut processes[0], 0, 1500)
            .await
            .context("kill one of two hubs")?;
        takeover = Some(t);
    }
    let rows: Vec<Row> = targets
        .iter()
        .zip(&rates)
        .map(|((name, _), r)| Row {
            target: name,
            msgs_per_s: median(r),
            samples: r.clone(),
        })
        .collect();
    let vs_raw = rows[0].msgs_per_s / rows[1].msgs_per_s.max(1e-9);
    let two_vs_raw = rows[2].msgs_per_s / rows[1].msgs_per_s.max(1e-9);
    let two_vs_one = rows[2].msgs_per_s / rows[0].msgs_per_s.max(1e-9);
    let vs_file = rows[0].msgs_per_s / rows[3].msgs_per_s.max(1e-9);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "machine": machine(),
                "results": rows,
                "hub_vs_raw_publisher": vs_raw,
                "hub_vs_raw_publisher_by_round": paired,
                "hub_vs_raw_publisher_median_of_rounds": median(&paired),
                "jetstream_vs_file_log": vs_file,
                "two_hubs_vs_raw_publisher": two_vs_raw,
                "two_hubs_vs_one": two_vs_one,
                "hub_killed": takeover,
            })
        );
    } else {
        println!("{:<14} {:>12}", "target", "msgs/s");
        for r in &rows {
            println!("{:<14} {:>12.0}", r.target, r.msgs_per_s);
        }
        println!("hub on JetStream / raw publisher = {vs_raw:.2} (target ≥ 0.80)");
        let by_round: Vec<String> = paired.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "  round by round: {} (median {:.2})",
            by_round.join(" "),
            median(&paired)
        );
        println!("two hubs, one log / raw publisher = {two_vs_raw:.2}");
        println!("two hubs / one hub, same log     = {two_vs_one:.2}");
        println!("hub on JetStream / hub on files  = {vs_file:.2}");
        if let Some(t) = &takeover {
            println!(
                "one of two hubs killed: its {} devices' first PUBACK after the kill p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (lease {} ms, no failover)",
                t.devices, t.p50_ms, t.p99_ms, t.max_ms, t.lease_ttl_ms
            );
        }
    }
    Ok(())
}

async fn start_hub(dir: &Path, n: usize, extra: &[&str]) -> anyhow::Result<Target> {
    std::fs::create_dir_all(dir)?;
    let mut clients = bench_clients(n);
    let registry = register(dir, "bench", &mut clients).await?;
    let mut args = vec!["--partitions", "8"];
    args.extend_from_slice(extra);
    let hub = spawn_hub(&dir.join("hub"), "bench", &registry, &args).await?;
    Ok(Target::Hub {
        addr: hub.mqtt,
        clients,
        _process: hub.process,
    })
}

/// The raw publisher, placed as the hub whose streams are named after
/// `hub_prefix` is: connected to the same server, each partition's stream
/// led by the server that leads the hub's (where a stream's leader sits
/// and whether publishes reach it through another server changes the
/// servers' cost per message by a third between placements).
async fn start_raw(cluster: &NatsCluster, n: usize, hub_prefix: &str) -> anyhow::Result<Target> {
    let server = hub_server(
        cluster,
        &hub::log::jetstream::connection_name(hub_prefix, None),
    )
    .await?;
    let addr: async_nats::ServerAddr =
        format!("nats://{}", cluster.servers[server].client).parse()?;
    let client = async_nats::ConnectOptions::new()
        .name("fleet-bench raw publisher")
        .connect(addr)
        .await
        .context("connect the raw publisher")?;
    let js = jetstream::new(client);
    let mut devices = Vec::new();
    for p in 0..PARTITIONS {
        let (config, _) = stream_layout("bench_raw", fleet_api::PartitionId(p), 3, "x");
        js.get_or_create_stream(config)
            .await
            .map_err(|e| anyhow::anyhow!("create raw stream: {e}"))?;
        let (hub_stream, _) = stream_layout(hub_prefix, fleet_api::PartitionId(p), 3, "x");
        let (raw_stream, _) = stream_layout("bench_raw", fleet_api::PartitionId(p), 3, "x");
        follow_leader(&js, &hub_stream.name, &raw_stream.name).await?;
    }
    for i in 0..n {
        let id = DeviceId::new(format!("bench-{i:04}"))?;
        let p = partition_for(&id, PARTITIONS);
        let (_, subject) = stream_layout("bench_raw", p, 3, id.as_str());
        devices.push((subject, id));
    }
    Ok(Target::Raw { js, devices })
}

/// Which of the cluster's servers holds the connection named `name`.
async fn hub_server(cluster: &NatsCluster, name: &str) -> anyhow::Result<usize> {
    let http = reqwest::Client::new();
    for (i, s) in cluster.servers.iter().enumerate() {
        let url = format!("http://{}/connz?subs=0&limit=10000", s.monitor);
        let connz: serde_json::Value = http.get(&url).send().await?.json().await?;
        let found = connz["connections"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"].as_str() == Some(name)));
        if found {
            return Ok(i);
        }
    }
    bail!("no server holds a connection named {name:?}")
}

/// Moves the leader of stream `follower` to the server leading `leader`.
async fn follow_leader(
    js: &jetstream::Context,
    leader: &str,
    follower: &str,
) -> anyhow::Result<()> {
    let leader_of = |name: String| async move {
        let mut s = js
            .get_stream(&name)
            .await
            .map_err(|e| anyhow::anyhow!("stream {name}: {e}"))?;
        let info = s
            .info()
            .await
            .map_err(|e| anyhow::anyhow!("stream {name}: {e}"))?;
        anyhow::Ok(info.cluster.as_ref().and_then(|c| c.leader.clone()))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let want = leader_of(leader.to_string()).await?;
        let have = leader_of(follower.to_string()).await?;
        if want.is_some() && want == have {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("stream {follower} is led by {have:?}, not by {want:?} as {leader} is");
        }
        if let (Some(want), Some(_)) = (&want, &have) {
            let asked: Result<serde_json::Value, _> = js
                .request(
                    format!("STREAM.LEADER.STEPDOWN.{follower}"),
                    &serde_json::json!({ "placement": { "preferred": want } }),
                )
                .await;
            if let Err(e) = asked {
                tracing::debug!(error = %e, stream = follower, "leader stepdown");
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// One measured phase; messages acknowledged per second.
async fn phase(t: &mut Target, load: Load) -> anyhow::Result<f64> {
    match t {
        Target::Hub { addr, clients, .. } => Ok(driver::run(*addr, clients, load).await?.rate()),
        Target::Raw { js, devices } => raw_phase(js, devices, load).await,
        Target::Hubs { hubs, .. } => {
            let runs = hubs
                .iter()
                .filter(|(_, clients)| !clients.is_empty())
                .map(|(addr, clients)| driver::run(*addr, clients, load));
            let measured = futures::future::try_join_all(runs).await?;
            Ok(measured.iter().map(driver::Measured::rate).sum())
        }
    }
}

/// `count` hubs sharing the log at `url` (`--hub-id`), with the `n` bench
/// devices divided by which hub writes their partition.
async fn start_hubs(dir: &Path, n: usize, url: &str, count: usize) -> anyhow::Result<Target> {
    std::fs::create_dir_all(dir)?;
    let mut clients = bench_clients(n);
    let registry = register(dir, "bench", &mut clients).await?;
    let mut processes = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..count {
        let id = format!("hub{i}");
        let args = ["--partitions", "8", "--log", url, "--hub-id", &id];
        let hub = spawn_hub(&dir.join(&id), "bench", &registry, &args).await?;
        addrs.push((hub.mqtt, hub.http));
        processes.push(hub.process);
    }
    // Until every partition has a writer and every hub some.
    let deadline = Instant::now() + Duration::from_secs(60);
    let owners = loop {
        let mut owners: Vec<Option<usize>> = vec![None; PARTITIONS as usize];
        let mut each = vec![0usize; count];
        for (i, (_, http)) in addrs.iter().enumerate() {
            let http = format!("http://{http}");
            let status = fleet_api::client::HubClient::new(http.clone(), None)
                .status()
                .await
                .map_err(|e| anyhow::anyhow!("status of {http}: {e}"))?;
            for p in status.owned.unwrap_or_default() {
                if let Some(o) = owners.get_mut(p.0 as usize) {
                    *o = Some(i);
                    each[i] += 1;
                }
            }
        }
        if owners.iter().all(Option::is_some) && each.iter().all(|n| *n > 0) {
            break owners;
        }
        if Instant::now() > deadline {
            bail!("the {count} hubs never divided the partitions: {owners:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut hubs: Vec<(std::net::SocketAddr, Vec<Client>)> =
        addrs.iter().map(|(mqtt, _)| (*mqtt, Vec::new())).collect();
    for c in clients {
        let p = partition_for(&DeviceId::new(&c.id)?, PARTITIONS);
        let owner = owners[p.0 as usize].unwrap_or(0);
        hubs[owner].1.push(c);
    }
    Ok(Target::Hubs {
        hubs,
        http: addrs.iter().map(|(_, http)| *http).collect(),
        processes,
    })
}

async fn raw_phase(
    js: &jetstream::Context,
    devices: &[(String, DeviceId)],
    load: Load,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut tasks = Vec::new();
    for (subject, id) in devices {
        let (js, subject, id) = (js.clone(), subject.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u64;
            let mut inflight = FuturesOrdered::new();
            let mut mid = 0u64;
            while Instant::now() < deadline || !inflight.is_empty() {
                while inflight.len() < load.window && Instant::now() < deadline {
                    mid += 1;
                    let body = record(&id, mid, load.payload);
                    let ack = js
                        .publish(subject.clone(), body)
                        .await
                        .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
                    inflight.push_back(ack.into_future());
                }
                match inflight.next().await {
                    Some(r) => {
                        r.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                        acked += 1;
                    }
                    None => break,
                }
            }
            anyhow::Ok(acked)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// The message body the hub would store for this publish.
fn record(id: &DeviceId, mid: u64, payload: usize) -> Bytes {
    let rec = NewRecord {
        device_id: id.clone(),
        mid: Some(Mid(mid)),
        enqueued_at: UnixMillis(1_700_000_000_000),
        region: Region::new("bench").expect("region"),
        epoch: Epoch(1),
        payload: Bytes::from(vec![b'x'; payload]),
    };
    stored_body(Offset(mid), &rec)
}
