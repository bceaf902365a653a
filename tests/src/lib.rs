//! End-to-end harness: starts Fleet components as real processes on
//! 127.0.0.1 with ephemeral ports (through the multi-call `fleet-node`
//! binary), gives each a log file that outlives the test, and offers the
//! clients the tests drive them with.
//!
//! Use [`harness!`] in an integration test of this crate to get a
//! [`Harness`] bound to the built binary.

pub mod certs;
pub mod consumers;
pub mod dns;
pub mod durability;
pub mod load;
pub mod mqtt;
pub mod proxy;
pub mod registry;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_api::DeviceId;

pub use certs::{PrivateCa, TestCert};
pub use registry::Registry;

/// The admin token every test hub uses.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The replication credential every test hub with a peer gets.
pub const PEER_TOKEN: &str = "test-peer-token-0123456789";

/// A harness for one test: a temporary directory and the node binary.
#[derive(Debug)]
pub struct Harness {
    exe: PathBuf,
    logs: PathBuf,
    dir: tempfile::TempDir,
    default_logs: bool,
    open_files: Option<u32>,
}

/// A [`Harness`] for the calling test, named after it.
#[macro_export]
macro_rules! harness {
    ($name:expr) => {
        $crate::Harness::new(
            env!("CARGO_BIN_EXE_fleet-node"),
            env!("CARGO_TARGET_TMPDIR"),
            $name,
        )
    };
}

impl Harness {
    pub fn new(exe: &str, tmp: &str, name: &str) -> Harness {
        let logs = Path::new(tmp).join("logs").join(name);
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs).expect("log directory");
        Harness {
            exe: PathBuf::from(exe),
            logs,
            dir: tempfile::tempdir().expect("temp dir"),
            default_logs: false,
            open_files: None,
        }
    }

    /// Processes may open at most `n` files (RLIMIT_NOFILE), so a test can
    /// run one out of file descriptors.
    pub fn with_open_files(mut self, n: u32) -> Harness {
        self.open_files = Some(n);
        self
    }

    /// Processes log with their own default filter, as an operator's would
    /// (not the tests' verbose one).
    pub fn with_default_logs(mut self) -> Harness {
        self.default_logs = true;
        self
    }

    /// A scratch directory removed with the harness.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where process logs go (kept after the test, for post-mortems).
    pub fn logs(&self) -> &Path {
        &self.logs
    }

    /// Starts `fleet-node ARGS…` and waits for its JSON ready line on stdout.
    ///
    /// # Panics
    /// When the process exits or prints no ready line within 30 s.
    pub fn spawn(&self, label: &str, args: &[String]) -> Node {
        self.spawn_limited(label, args, None)
    }

    /// [`Harness::spawn`] with every file the process writes capped at
    /// `max_file_kib` (RLIMIT_FSIZE, SIGXFSZ ignored): a write past the cap
    /// fails with `EFBIG`, as a write to a full disk fails with `ENOSPC`.
    pub fn spawn_limited(&self, label: &str, args: &[String], max_file_kib: Option<u64>) -> Node {
        let log = self.logs.join(format!("{label}.log"));
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut limits = String::new();
        if let Some(kib) = max_file_kib {
            // bash counts `ulimit -f` in KiB; an ignored signal stays ignored across exec.
            limits += &format!("trap '' XFSZ; ulimit -f {kib}; ");
        }
        if let Some(n) = self.open_files {
            limits += &format!("ulimit -n {n}; ");
        }
        let mut command = if limits.is_empty() {
            Command::new(&self.exe)
        } else {
            let mut c = Command::new("bash");
            c.arg("-c")
                .arg(format!("{limits}exec \"$0\" \"$@\""))
                .arg(&self.exe);
            c
        };
        let mut child = command
            .args(args)
            .env(
                "FLEET_LOG",
                if self.default_logs {
                    // Empty: the process's own default.
                    String::new()
                } else {
                    std::env::var("FLEET_LOG")
                        .unwrap_or_else(|_| "info,rumqttd=warn,rumqttd::server::broker=off".into())
                },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn fleet-node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = tx.send(first);
            for _ in lines {} // keep draining so the child never blocks
        });
        let ready = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(line)) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{label}: ready line is not JSON ({e}): {line}")),
            _ => {
                let _ = child.kill();
                panic!("{label} did not start; log:\n{}", tail(&log));
            }
        };
        Node {
            child,
            ready,
            label: label.to_string(),
            log,
        }
    }

    /// A `fleet-node ARGS…` command with its stderr in this test's logs, for
    /// processes without a ready line (agents, simulations).
    pub fn command(&self, label: &str, args: &[String]) -> Command {
        let log = self.logs.join(format!("{label}.log"));
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut c = Command::new(&self.exe);
        c.args(args)
            .env(
                "FLEET_LOG",
                std::env::var("FLEET_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stderr(Stdio::from(err));
        c
    }

    /// Arguments that run a device agent for `device` against concierge `c`.
    pub fn agent_args(
        &self,
        c: &ConciergeNode,
        device: &str,
        key: &str,
        outbox: &str,
        extra: &[&str],
    ) -> Vec<String> {
        let mut args: Vec<String> = [
            "device-agent",
            "--json",
            "run",
            "--device-id",
            device,
            "--outbox",
            outbox,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // `--key=` form: a base64url key may start with `-`, which a separate
        // argument would turn into an unknown flag.
        args.push(format!("--key={key}"));
        args.push("--concierge".into());
        args.push(format!("http://concierge.fleet.test:{}", c.http.port()));
        // Loopback, plain HTTP and MQTT: said explicitly.
        args.push("--allow-plaintext".into());
        args.push("--dns".into());
        args.push(c.dns.to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// A `{"device_id","key"}` file of `ids` (as `registry-sync device add
    /// --keys-out` writes) for `device-agent simulate`.
    pub fn keys_file(&self, reg: &Registry, ids: &[String]) -> PathBuf {
        let path = self.dir().join("keys.ndjson");
        let lines: String = ids
            .iter()
            .map(|id| format!("{{\"device_id\":\"{id}\",\"key\":\"{}\"}}\n", reg.key(id)))
            .collect();
        std::fs::write(&path, lines).expect("keys file");
        path
    }

    /// Arguments that run `device-agent simulate` of the devices in `keys`
    /// at `rate` msgs/s each for `secs` against concierge `c`, with one
    /// report line per device in `report`.
    pub fn simulate_args(
        &self,
        c: &ConciergeNode,
        keys: &Path,
        report: &Path,
        rate: &str,
        secs: &str,
        extra: &[&str],
    ) -> Vec<String> {
        let mut args: Vec<String> = [
            "device-agent",
            "simulate",
            "--rate",
            rate,
            "--duration-s",
            secs,
            "--dns",
            &c.dns.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--concierge".into());
        args.push(format!("http://concierge.fleet.test:{}", c.http.port()));
        // Loopback, plain HTTP and MQTT: said explicitly.
        args.push("--allow-plaintext".into());
        for (flag, path) in [
            ("--keys", keys.to_path_buf()),
            ("--outbox", self.dir().join("sim")),
            ("--report", report.to_path_buf()),
        ] {
            args.push(flag.into());
            args.push(path.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts two hubs that replicate between them: `a` (primary) and `b`
    /// (secondary), each with `--peer` pointing at the other (or at
    /// `peer_of_a` / `peer_of_b` when given, e.g. a proxy). `extra` goes to both.
    pub fn pair(
        &self,
        a: (&str, &Registry),
        b: (&str, &Registry),
        peers: Option<(String, String)>,
        extra: &[&str],
    ) -> (HubNode, HubNode) {
        self.pair_with(a, b, "http", peers, extra)
    }

    /// [`Harness::pair`] with peers reached through `scheme` (`https` when
    /// `extra` serves the API over TLS).
    pub fn pair_with(
        &self,
        a: (&str, &Registry),
        b: (&str, &Registry),
        scheme: &str,
        peers: Option<(String, String)>,
        extra: &[&str],
    ) -> (HubNode, HubNode) {
        let (http_a, http_b) = (reserve_port(), reserve_port());
        let (peer_of_a, peer_of_b) = peers.unwrap_or_else(|| {
            (
                format!("{scheme}://{http_b}"),
                format!("{scheme}://{http_a}"),
            )
        });
        let mut args_a: Vec<&str> =
            vec!["--http", &http_a, "--peer", &peer_of_a, "--role", "primary"];
        args_a.extend_from_slice(extra);
        let mut args_b: Vec<&str> = vec![
            "--http",
            &http_b,
            "--peer",
            &peer_of_b,
            "--role",
            "secondary",
        ];
        args_b.extend_from_slice(extra);
        let hub_b = self.hub(&format!("hub-{}", b.0), b.0, &b.1.url, &args_b);
        let hub_a = self.hub(&format!("hub-{}", a.0), a.0, &a.1.url, &args_a);
        (hub_a, hub_b)
    }

    /// Starts a hub process.
    pub fn hub(&self, label: &str, region: &str, registry: &str, extra: &[&str]) -> HubNode {
        self.hub_limited(label, region, registry, extra, None)
    }

    /// Starts a hub process whose files may not grow beyond `max_file_kib`.
    pub fn hub_limited(
        &self,
        label: &str,
        region: &str,
        registry: &str,
        extra: &[&str],
        max_file_kib: Option<u64>,
    ) -> HubNode {
        let data = self.dir().join(label);
        let mut args: Vec<String> = [
            "hub",
            "--json",
            "run",
            "--region",
            region,
            "--registry",
            registry,
            "--mqtt",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--admin-token",
            ADMIN_TOKEN,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--data".into());
        args.push(data.display().to_string());
        // Flags given in `extra` replace the defaults above.
        let mut rest = extra.iter();
        while let Some(flag) = rest.next() {
            let default = args.iter().position(|a| a == flag);
            match (
                default,
                flag.starts_with("--") && !["--json"].contains(flag),
            ) {
                (Some(i), true) if i + 1 < args.len() && !args[i + 1].starts_with("--") => {
                    if let Some(value) = rest.next() {
                        args[i + 1] = value.to_string();
                    }
                }
                _ => args.push(flag.to_string()),
            }
        }
        // Hubs with a peer share the replication credential.
        if args.iter().any(|a| a == "--peer") && !args.iter().any(|a| a == "--peer-token") {
            args.push("--peer-token".into());
            args.push(PEER_TOKEN.into());
        }
        HubNode::start(self, label, args, max_file_kib)
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A running process.
#[derive(Debug)]
pub struct Node {
    child: Child,
    pub ready: serde_json::Value,
    pub label: String,
    pub log: PathBuf,
}

impl Node {
    /// The address printed in the ready line under `key`.
    pub fn addr(&self, key: &str) -> SocketAddr {
        self.ready[key]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{}: no {key} address in {}", self.label, self.ready))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait")
    }

    /// The end of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the child (SIGKILL) when dropped, so a failing test leaves no process behind.
#[derive(Debug)]
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A hub process and its addresses.
#[derive(Debug)]
pub struct HubNode {
    pub node: Node,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub stream: Option<SocketAddr>,
    args: Vec<String>,
    label: String,
}

impl HubNode {
    fn start(
        h: &Harness,
        label: &str,
        mut args: Vec<String>,
        max_file_kib: Option<u64>,
    ) -> HubNode {
        let node = h.spawn_limited(label, &args, max_file_kib);
        let mqtt = node.addr("mqtt");
        let http = node.addr("http");
        let stream = node.ready["stream"].as_str().and_then(|s| s.parse().ok());
        // Restarts come back on the same ports: others (concierges, peers)
        // know this hub by its addresses.
        pin(&mut args, "--mqtt", mqtt);
        pin(&mut args, "--http", http);
        if let Some(stream) = stream {
            pin(&mut args, "--stream", stream);
        }
        HubNode {
            node,
            mqtt,
            http,
            stream,
            args,
            label: label.to_string(),
        }
    }

    /// The same hub as seen through another HTTP address (a proxy): for
    /// configuring others (concierges) only; it owns no process.
    pub fn alias(hub: &HubNode, http: SocketAddr) -> AliasHub {
        AliasHub {
            http,
            mqtt: hub.mqtt,
        }
    }

    /// Kills the hub (SIGKILL) and starts it again: same data, registry,
    /// flags and ports, no file size cap.
    pub fn restart(&mut self, h: &Harness) {
        self.node.kill9();
        *self = HubNode::start(h, &self.label.clone(), self.args.clone(), None);
    }

    /// Stops the hub cleanly (SIGTERM) and starts it again.
    pub fn restart_clean(&mut self, h: &Harness) {
        let status = self.node.terminate();
        assert!(
            status.success(),
            "hub exited with {status}:\n{}",
            self.node.log_tail()
        );
        *self = HubNode::start(h, &self.label.clone(), self.args.clone(), None);
    }

    /// Every record of `device` in this hub's log.
    pub async fn records_of(
        &self,
        device: &str,
        partitions: u32,
    ) -> Vec<fleet_api::hub::WireRecord> {
        let id = DeviceId::new(device).expect("device id");
        let p = fleet_api::partition_for(&id, partitions);
        self.client()
            .committed_records(p)
            .await
            .expect("read records")
            .into_iter()
            .filter(|r| r.device_id == id)
            .collect()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// An HTTP client of this hub with the admin token.
    pub fn client(&self) -> fleet_api::client::HubClient {
        fleet_api::client::HubClient::new(self.url(), Some(fleet_api::Secret::new(ADMIN_TOKEN)))
    }

    /// The current `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("{}/metrics", self.url());
        tokio::task::spawn_blocking(move || http_get(&url))
            .await
            .unwrap_or_default()
    }

    /// The value of one metric sample (labels written as in the exposition,
    /// e.g. `fleet_hub_connects_total{result="bad_credentials"}`); 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

/// A free `127.0.0.1:PORT` (see [`fleet_api::local::reserve_port`]).
pub fn reserve_port() -> String {
    fleet_api::local::reserve_port().to_string()
}

/// Sets `flag`'s value in `args` to `addr` (adding the flag when absent).
fn pin(args: &mut Vec<String>, flag: &str, addr: SocketAddr) {
    match args.iter().position(|a| a == flag) {
        Some(i) if i + 1 < args.len() => args[i + 1] = addr.to_string(),
        _ => {
            args.push(flag.to_string());
            args.push(addr.to_string());
        }
    }
}

/// Where a hub is: what a concierge is configured with.
pub trait HubAddrs {
    fn http_url(&self) -> String;
    fn mqtt_addr(&self) -> SocketAddr;
}

impl HubAddrs for HubNode {
    fn http_url(&self) -> String {
        self.url()
    }
    fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt
    }
}

/// A hub's addresses with its HTTP API reached through another address.
#[derive(Debug, Clone, Copy)]
pub struct AliasHub {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
}

impl HubAddrs for AliasHub {
    fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }
    fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt
    }
}

/// A running concierge replica.
#[derive(Debug)]
pub struct ConciergeNode {
    pub node: Node,
    pub http: SocketAddr,
    pub dns: SocketAddr,
}

impl ConciergeNode {
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }
}

impl Harness {
    /// Starts a concierge replica for `hubs` (region, hub) on `http` (use
    /// `127.0.0.1:0` for any port), zone `fleet.test`.
    pub fn concierge<H: HubAddrs>(
        &self,
        label: &str,
        http: &str,
        hubs: &[(&str, &H)],
        extra: &[&str],
    ) -> ConciergeNode {
        let specs: Vec<String> = hubs
            .iter()
            .map(|(region, hub)| format!("{region}={},mqtt://{}", hub.http_url(), hub.mqtt_addr()))
            .collect();
        self.concierge_specs(label, http, &specs, extra)
    }

    /// A concierge for hubs given as `REGION=HUB_HTTP_URL,MQTT_URL`.
    pub fn concierge_specs(
        &self,
        label: &str,
        http: &str,
        specs: &[String],
        extra: &[&str],
    ) -> ConciergeNode {
        let mut args: Vec<String> = [
            "concierge",
            "--json",
            "run",
            "--http",
            http,
            "--dns",
            "127.0.0.1:0",
            "--zone",
            "fleet.test",
            "--admin-token",
            ADMIN_TOKEN,
            "--poll-ms",
            "200",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for spec in specs {
            args.push("--hub".into());
            args.push(spec.clone());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let node = self.spawn(label, &args);
        let http = node.addr("http");
        let dns = node.addr("dns");
        ConciergeNode { node, http, dns }
    }
}

/// A plain blocking HTTP GET (for metrics and health in tests).
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let Ok(mut s) = std::net::TcpStream::connect(host) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Polls `check` until it holds or `secs` pass: a condition, not a sleep.
///
/// # Panics
/// On timeout, naming `what`.
pub async fn wait_for<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends `request` as written and returns the response's status code.
pub async fn raw_status(addr: std::net::SocketAddr, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut head)).await;
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}
