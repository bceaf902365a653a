//! Reading a region's hubs at the end of a drill: their statuses and the
//! region's log.

use std::collections::HashMap;

use fleet_api::PartitionId;
use fleet_api::hub::StatusResponse;

use super::status;

/// Every hub of a region satisfies `pred` (each answers its status).
pub(super) async fn every(
    http: &reqwest::Client,
    urls: &[String],
    pred: impl Fn(StatusResponse) -> bool,
) -> bool {
    for url in urls {
        if !status(http, url).await.is_some_and(&pred) {
            return false;
        }
    }
    true
}

/// A region's log. A region of several hubs shares one log; each partition
/// is read from the hub that writes it (its view is current), else, when
/// no hub claims it, from every hub that answers, keeping the longest read
/// (a view that lags holds a prefix of the same records).
pub(super) async fn read_log(
    urls: &[String],
    token: &fleet_api::Secret,
) -> anyhow::Result<HashMap<String, Vec<u64>>> {
    let mut clients = Vec::new();
    let mut partitions = 0;
    for url in urls {
        let client = fleet_api::client::HubClient::new(url, Some(token.clone()));
        let status = client.status().await?;
        partitions = partitions.max(status.partitions.len() as u32);
        clients.push((client, status.owned.unwrap_or_default()));
    }
    anyhow::ensure!(!clients.is_empty(), "a region without hubs");
    let mut by_device: HashMap<String, Vec<u64>> = HashMap::new();
    for p in 0..partitions {
        let p = PartitionId(p);
        let writer = clients.iter().find(|(_, owned)| owned.contains(&p));
        let read = match writer {
            Some((client, _)) => read_partition(client, p).await?,
            None => {
                let mut longest: Option<Vec<(String, u64)>> = None;
                let mut failed = None;
                for (client, _) in &clients {
                    match read_partition(client, p).await {
                        Ok(r) if longest.as_ref().is_none_or(|l| r.len() > l.len()) => {
                            longest = Some(r);
                        }
                        Ok(_) => {}
                        Err(e) => failed = Some(e),
                    }
                }
                match (longest, failed) {
                    (Some(l), _) => l,
                    (None, Some(e)) => return Err(e),
                    (None, None) => Vec::new(),
                }
            }
        };
        for (device, mid) in read {
            by_device.entry(device).or_default().push(mid);
        }
    }
    Ok(by_device)
}

/// Partition `p` as one hub serves it: each record's device and mid.
async fn read_partition(
    client: &fleet_api::client::HubClient,
    p: PartitionId,
) -> anyhow::Result<Vec<(String, u64)>> {
    Ok(client
        .committed_records(p)
        .await?
        .into_iter()
        .filter_map(|r| Some((r.device_id.to_string(), r.mid?.0)))
        .collect())
}
