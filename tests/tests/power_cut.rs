//! The real hub binary on a file system that loses what was not synced
//! (`fleet-lazyfs`, FUSE, the simulated disk's fault model): devices publish
//! in parallel, the hub is killed mid-stream, the power is cut (unsynced
//! writes and directory entries vanish or tear), the hub restarts on what
//! is left. Every record it acknowledged is there, byte for byte, at a
//! dense offset, every time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::mqtt::RawClient;
use tests::{HubNode, Registry, harness, wait_for};

/// The FUSE file system, mounted until dropped.
struct LazyFs {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl LazyFs {
    fn mount(at: &Path) -> LazyFs {
        std::fs::create_dir_all(at).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-lazyfs"))
            .arg(at)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fleet-lazyfs (needs /dev/fuse and fusermount3: scripts/services.sh)");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "mounted",
            "fleet-lazyfs did not mount {}",
            at.display()
        );
        LazyFs {
            child,
            stdin,
            stdout,
        }
    }

    /// Cuts the power; returns how many unsynced operations were lost.
    fn cut(&mut self, seed: u64) -> String {
        writeln!(self.stdin, "cut {seed}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("cut "), "{line}");
        line.trim().to_string()
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

fn payload(device: &str, mid: u64) -> Vec<u8> {
    let mut p = format!("{device}:{mid}:").into_bytes();
    // Sizes from a few bytes to several sectors, so writes tear mid-frame.
    let len = (mid * 7919 % 3000) as usize;
    p.extend((0..len).map(|i| (i as u64 ^ mid) as u8));
    p
}

/// Publishes `device`'s mids from `first` with up to 32 in flight until
/// the connection ends; returns the mids the hub acknowledged.
async fn publish_until_cut(
    hub: std::net::SocketAddr,
    reg_key: String,
    device: String,
    first: u64,
) -> Vec<u64> {
    let (mut c, code) = RawClient::connect(hub, &device, Some((&device, &reg_key))).await;
    assert_eq!(
        code,
        Some(ConnectReturnCode::Success),
        "{device} could not connect"
    );
    let mut inflight: BTreeMap<u16, u64> = BTreeMap::new();
    let mut acked = Vec::new();
    let mut next = first;
    loop {
        while inflight.len() < 32 {
            let pkid = (next % 60_000) as u16 + 1;
            c.publish(
                &format!("devices/{device}/messages/events/{next}"),
                QoS::AtLeastOnce,
                pkid,
                &payload(&device, next),
            )
            .await;
            inflight.insert(pkid, next);
            next += 1;
        }
        match c.recv(Duration::from_secs(10)).await {
            Ok(Packet::PubAck(a)) => {
                if let Some(mid) = inflight.remove(&a.pkid) {
                    acked.push(mid);
                }
            }
            Ok(_) => {}
            Err(_) => return acked,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_loses_no_acknowledged_record_to_power_cuts() {
    let h = harness!("a_hub_loses_no_acknowledged_record_to_power_cuts");
    let devices = ["d1", "d2", "d3", "d4"];
    let mut reg = Registry::sqlite(h.dir(), "a").await;
    reg.add(&devices).await;
    let disk = h.dir().join("disk");
    let mut fs = LazyFs::mount(&disk);
    let data = disk.join("hub");
    let data_arg = data.display().to_string();
    let extra = [
        "--data",
        &data_arg,
        "--segment-bytes",
        "65536",
        "--partitions",
        "2",
    ];
    let mut hub: HubNode = h.hub("hub", "a", &reg.url, &extra);
    let mut acked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut next: BTreeMap<String, u64> = devices.iter().map(|d| (d.to_string(), 1)).collect();
    let mut lost_ops = 0u64;
    // Four cycles at least, and more (at most 20) until a cut has dropped
    // an unsynced write: whether the kill lands between a write and its
    // fsync is timing, and a test that never cut one proves nothing.
    let mut cycle = 0u64;
    while cycle < 4 || (lost_ops == 0 && cycle < 20) {
        let publishers: Vec<_> = devices
            .iter()
            .map(|d| {
                tokio::spawn(publish_until_cut(
                    hub.mqtt,
                    reg.key(d),
                    d.to_string(),
                    next[*d],
                ))
            })
            .collect();
        // Kill mid-stream, once the hub has acknowledged a good share.
        let stored = |hub: &HubNode| {
            let client = hub.client();
            async move {
                client
                    .status()
                    .await
                    .map(|s| s.partitions.iter().map(|p| p.high_watermark.0).sum::<u64>())
                    .unwrap_or(0)
            }
        };
        let before = stored(&hub).await;
        wait_for(60, "the hub to store 300 more records", || async {
            stored(&hub).await >= before + 300
        })
        .await;
        hub.node.kill9();
        let report = fs.cut(cycle);
        lost_ops += report
            .split_whitespace()
            .find_map(|w| w.strip_prefix("dropped="))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        for (d, p) in devices.iter().zip(publishers) {
            let mids = p.await.unwrap();
            if let Some(m) = mids.iter().max() {
                let n = next.get_mut(*d).unwrap();
                *n = (*n).max(m + 1);
            }
            // Resends after the restart start above everything sent.
            *next.get_mut(*d).unwrap() += 100;
            acked.entry(d.to_string()).or_default().extend(mids);
        }
        eprintln!(
            "cycle {cycle}: {report}, {} acknowledged so far",
            acked.values().map(Vec::len).sum::<usize>()
        );
        hub.restart(&h);
        // Every acknowledged record, byte for byte, at dense offsets.
        for d in devices {
            let records = hub.records_of(d, 2).await;
            let stored: BTreeMap<u64, &[u8]> = records
                .iter()
                .map(|r| (r.mid.unwrap().0, r.payload.as_slice()))
                .collect();
            for mid in &acked[d] {
                assert_eq!(
                    stored.get(mid).copied(),
                    Some(payload(d, *mid).as_slice()),
                    "cycle {cycle} ({report}): {d} mid {mid} was acknowledged and is gone or changed"
                );
            }
        }
        let status = hub.client().status().await.unwrap();
        for p in &status.partitions {
            // Page through the whole partition: every offset, in order.
            let mut expect = p.log_start;
            while expect < p.high_watermark {
                let page = hub
                    .client()
                    .records_upto(
                        p.id,
                        expect,
                        10_000,
                        Duration::ZERO,
                        fleet_api::hub::ReadUpto::Committed,
                    )
                    .await
                    .unwrap();
                assert!(!page.records.is_empty(), "nothing served at {expect}");
                for r in &page.records {
                    assert_eq!(r.offset, expect, "offsets are dense");
                    expect = expect.next();
                }
            }
        }
        cycle += 1;
    }
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total >= 1200, "only {total} acknowledged");
    assert!(
        lost_ops > 0,
        "{cycle} power cuts never lost an unsynced write: the test did not exercise anything"
    );
    drop(hub);
    drop(fs);
}
