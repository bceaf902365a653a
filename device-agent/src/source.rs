//! Where telemetry comes from on a device: lines on stdin, and a local Unix
//! socket through which other processes hand messages over. A message is
//! taken only into the outbox; a socket client is told `ok MID` once it is
//! there (durable with `--fsync always`), or `error REASON`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::agent::SharedOutbox;

/// Counts of what the sources took and refused.
#[derive(Debug, Default)]
pub struct Taken {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
}

async fn take(
    outbox: &Arc<SharedOutbox>,
    line: Vec<u8>,
    limit: usize,
    taken: &Taken,
) -> Result<fleet_api::Mid, String> {
    if line.len() > limit {
        taken.refused.fetch_add(1, Ordering::Relaxed);
        return Err(format!(
            "message of {} bytes is over the {limit}-byte limit",
            line.len()
        ));
    }
    let outbox = outbox.clone();
    // Appending may fsync: keep it off the async workers.
    let appended = tokio::task::spawn_blocking(move || outbox.append(&line)).await;
    match appended {
        Ok(Ok(mid)) => {
            taken.accepted.fetch_add(1, Ordering::Relaxed);
            Ok(mid)
        }
        Ok(Err(e)) => {
            taken.refused.fetch_add(1, Ordering::Relaxed);
            Err(e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Takes every line of stdin until EOF.
pub async fn stdin(outbox: Arc<SharedOutbox>, limit: usize, taken: Arc<Taken>) {
    let mut lines = BufReader::new(tokio::io::stdin()).split(b'\n');
    while let Ok(Some(mut line)) = lines.next_segment().await {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if let Err(e) = take(&outbox, line, limit, &taken).await {
            tracing::warn!(error = %e, "refused a line from stdin");
        }
    }
}

/// Serves the Unix socket at `path` (replacing a stale one).
///
/// # Errors
/// When the socket cannot be bound.
pub fn socket(
    path: &Path,
    outbox: Arc<SharedOutbox>,
    limit: usize,
    taken: Arc<Taken>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (outbox, taken) = (outbox.clone(), taken.clone());
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut lines = BufReader::new(rd).split(b'\n');
                while let Ok(Some(line)) = lines.next_segment().await {
                    let reply = match take(&outbox, line, limit, &taken).await {
                        Ok(mid) => format!("ok {mid}\n"),
                        Err(e) => format!("error {e}\n"),
                    };
                    if wr.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }))
}

/// Fsyncs the outbox every `every` and wakes the sender (periodic policy).
pub async fn sync_every(outbox: Arc<SharedOutbox>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let o = outbox.clone();
        let synced = tokio::task::spawn_blocking(move || o.lock().sync()).await;
        match synced {
            Ok(Ok(())) => outbox.ready.notify_one(),
            Ok(Err(e)) => tracing::error!(error = %e, "outbox fsync failed"),
            Err(_) => return,
        }
    }
}
