//! The benchmark commands still run and report what they promise: a short
//! run of each, through the real binary, checking the shape and the
//! invariants of the report (never a timing).

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("--json")
        .arg("bench")
        .args(args)
        .output()
        .expect("run fleet bench");
    assert!(
        out.status.success(),
        "fleet bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("a JSON report");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn positive(v: &serde_json::Value) -> bool {
    v.as_f64().is_some_and(|x| x > 0.0)
}

#[test]
fn replication_bench_reports_ratios_lag_and_lossless_planned_promotions() {
    let r = bench(&[
        "replication",
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--connections",
        "2",
        "--window",
        "4",
        "--catch-up-records",
        "2000",
    ]);
    // The returning secondary pulled at least the backlog, to lag 0.
    assert!(r["catch_up"]["backlog"].as_u64().unwrap() >= 2000, "{r}");
    assert!(positive(&r["catch_up"]["records_per_s"]), "{r}");
    let rows = r["throughput"].as_array().expect("throughput");
    let names: Vec<&str> = rows.iter().map(|t| t["target"].as_str().unwrap()).collect();
    assert_eq!(names, ["off", "async", "sync"]);
    assert!(rows.iter().all(|t| positive(&t["msgs_per_s"])), "{r}");
    assert_eq!(rows[0]["ratio_to_off"], 1.0);
    assert_eq!(r["lag"].as_array().unwrap().len(), 2, "{r}");
    let promotions = r["promotion"].as_array().unwrap();
    let planned = &promotions[0];
    assert_eq!(planned["mode"], "planned");
    assert_eq!(
        planned["unreplicated"],
        serde_json::json!([0]),
        "planned loses nothing"
    );
    assert!(positive(&planned["first_puback_ms"][0]));
    assert_eq!(promotions[1]["mode"], "forced");
    assert!(positive(&promotions[1]["first_puback_ms"][0]));
}

#[test]
fn concierge_bench_measures_both_protocols_against_their_baselines() {
    let r = bench(&[
        "concierge",
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--connections",
        "4",
    ]);
    let rows = r["results"].as_array().expect("results");
    let pairs: Vec<(&str, &str)> = rows
        .iter()
        .map(|x| {
            (
                x["protocol"].as_str().unwrap(),
                x["target"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("http", "concierge"),
            ("http", "axum"),
            ("dns", "concierge"),
            ("dns", "nsd")
        ]
    );
    assert!(rows.iter().all(|x| positive(&x["per_s"])), "{r}");
    assert!(positive(&r["endpoint_vs_axum"]) && positive(&r["dns_vs_nsd"]));
}

#[test]
fn consume_bench_reads_every_phase() {
    let r = bench(&[
        "consume",
        "--fill-s",
        "1",
        "--rounds",
        "1",
        "--connections",
        "2",
    ]);
    let rows = r["rows"].as_array().expect("rows");
    assert!(rows.len() >= 3, "{r}");
    assert!(rows.iter().all(|x| positive(&x["records_per_s"])), "{r}");
}

#[test]
fn connections_bench_holds_every_device_on_every_target() {
    let r = bench(&[
        "connections",
        "--devices",
        "200",
        "--idle-s",
        "1",
        "--keep-alive-s",
        "2",
    ]);
    let rows = r.as_array().expect("rows");
    let targets: Vec<&str> = rows.iter().filter_map(|x| x["target"].as_str()).collect();
    assert_eq!(targets, ["hub", "hub-tls", "rumqttd", "mosquitto"], "{r}");
    for row in rows {
        assert_eq!(row["connected"], 200, "{row}");
        assert_eq!(row["failed"], 0, "{row}");
        assert!(positive(&row["connects_per_s"]), "{row}");
        assert!(positive(&row["rss_after_kib"]), "{row}");
    }
}
