//! A fault-injecting TCP proxy: forwards to a target until cut, then drops
//! every connection and refuses new ones until healed (a network partition
//! between two processes on one machine).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// A running proxy.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    kill: broadcast::Sender<()>,
}

impl Proxy {
    /// Listens on an ephemeral port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let proxy = Proxy {
            addr: listener.local_addr().expect("proxy addr"),
            cut: Arc::new(AtomicBool::new(false)),
            kill: broadcast::channel(4).0,
        };
        let me = proxy.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if me.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(target).await else {
                    continue;
                };
                let mut kill = me.kill.subscribe();
                tokio::spawn(async move {
                    let (mut c, mut u) = (client, upstream);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut u) => {}
                        _ = kill.recv() => {}
                    }
                });
            }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Partition: drop every connection, refuse new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.kill.send(());
    }

    /// Heal the partition.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}
