//! A hub on an R3 JetStream log (three real nats-server processes, fsync
//! before ack) under a device's pipelined load: JetStream servers killed,
//! one back with its store wiped, the hub itself killed; every acknowledged
//! publish is stored once, in order, with its bytes.

use fleet_api::local::NatsCluster;
use tests::durability::{Pipelined, assert_stored};
use tests::{Registry, harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_on_jetstream_loses_nothing_when_servers_or_the_hub_die() {
    let h = harness!("a_hub_on_jetstream_loses_nothing_when_servers_or_the_hub_die");
    let mut cluster = NatsCluster::start(&h.dir().join("nats"), "js", 3)
        .await
        .unwrap();
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["d1", "d2"]).await;
    let url = cluster.log_url("eu");
    let mut hub = h.hub("hub-eu", "eu", &reg.url, &["--log", &url]);

    let mut p = Pipelined::new(&hub, &reg, "d1").await;
    p.run_until(500).await.unwrap();
    cluster.kill(0); // SIGKILL; the stream leader may be among them
    p.run_until(1000).await.unwrap();
    cluster.restart_wiped(0).await.unwrap(); // its disk is gone
    p.run_until(1000).await.unwrap();
    cluster.kill(1); // the wiped one must now hold its share
    p.run_until(1000).await.unwrap();
    // The hub dies mid-stream.
    hub.node.kill9();
    p.drain().await;
    let acked_d1 = p.acked.clone();
    cluster.restart(1).await.unwrap();
    hub.restart(&h);
    assert_stored(&hub, "d1", &acked_d1).await;

    // After the restart: de-duplication state rebuilt from JetStream, and
    // a second device through the same partitions.
    let mut q = Pipelined::new(&hub, &reg, "d2").await;
    q.run_until(500).await.unwrap();
    assert_stored(&hub, "d2", &q.acked).await;
    assert_stored(&hub, "d1", &acked_d1).await;
    assert!(acked_d1.len() >= 3500, "{}", acked_d1.len());
}
