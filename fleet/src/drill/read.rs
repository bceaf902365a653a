//! Reading a region's hubs at the end of a drill: their statuses and the
//! region's log.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use fleet_api::hub::StatusResponse;
use fleet_api::{Offset, PartitionId};

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

/// A region's log, each partition read from the hub that writes it (a
/// region of several hubs shares one log; the writer's view is current).
pub(super) async fn read_log(
    urls: &[String],
    token: &fleet_api::Secret,
) -> anyhow::Result<HashMap<String, Vec<u64>>> {
    let first = urls.first().context("a region without hubs")?;
    let mut clients = Vec::new();
    for url in urls {
        let client = fleet_api::client::HubClient::new(url, Some(token.clone()));
        let status = client.status().await?;
        clients.push((client, status));
    }
    let partitions = clients[0].1.partitions.len() as u32;
    let mut by_device: HashMap<String, Vec<u64>> = HashMap::new();
    for p in 0..partitions {
        let client = clients
            .iter()
            .find(|(_, s)| {
                s.owned
                    .as_ref()
                    .is_some_and(|o| o.contains(&PartitionId(p)))
            })
            .map_or_else(
                || fleet_api::client::HubClient::new(first, Some(token.clone())),
                |(c, _)| c.clone(),
            );
        let mut from = Offset(0);
        loop {
            let page = client
                .records_upto(
                    PartitionId(p),
                    from,
                    10_000,
                    Duration::ZERO,
                    fleet_api::hub::ReadUpto::Committed,
                )
                .await?;
            let Some(last) = page.records.last() else {
                break;
            };
            from = last.offset.next();
            for r in page.records {
                if let Some(m) = r.mid {
                    by_device
                        .entry(r.device_id.to_string())
                        .or_default()
                        .push(m.0);
                }
            }
        }
    }
    Ok(by_device)
}
