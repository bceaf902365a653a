//! A partition's epoch history, and where a returning hub's log leaves the
//! primary's history.
//!
//! Epochs never decrease along a partition's offsets (a hub appends only at
//! its current epoch, and replicates only a prefix of the primary's log), so
//! the log itself is the epoch history: the start offset of every epoch is
//! found by binary search over the records' epochs, and survives anything
//! the log survives.
//!
//! Reconciling asks the primary about the epoch of this hub's last record,
//! `E`. The primary answers with the *largest epoch it holds that is not
//! above `E`* (`E'`) and where that epoch ends in its history. When `E' = E`
//! the common prefix ends where the primary's `E` ends. When `E' < E` the
//! primary never wrote in any epoch between `E'` and `E`, so everything this
//! hub holds from its first record above `E'` on is foreign too; asking only
//! "where does `E` end?" would miss that (Kafka's KIP-279 history: B's
//! records of epoch 2 sit where A wrote more of epoch 1). The step repeats
//! until the log is a prefix of the primary's.

use fleet_api::hub::EpochEnd;
use fleet_api::{Epoch, Offset, PartitionId};

use super::epoch_at;
use crate::log::{EventLog, LogError};

/// The first offset of partition `p` holding a record of an epoch above
/// `after` (every record counts as above `None`); the high watermark when
/// there is none.
///
/// # Errors
/// When the log cannot be read.
pub(super) async fn first_after(
    log: &dyn EventLog,
    p: PartitionId,
    after: Option<Epoch>,
) -> Result<Offset, LogError> {
    let (mut lo, mut hi) = (log.log_start(p).0, log.high_watermark(p).0);
    let Some(after) = after else {
        return Ok(Offset(lo));
    };
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let later = epoch_at(log, p, Offset(mid))
            .await?
            .is_some_and(|e| e > after);
        if later {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(Offset(lo))
}

/// The primary's answer about epoch `asked`: the largest epoch it holds that
/// is not above `asked`, and the first offset past it.
///
/// # Errors
/// When the log cannot be read.
pub(super) async fn epoch_end(
    log: &dyn EventLog,
    p: PartitionId,
    asked: Epoch,
) -> Result<EpochEnd, LogError> {
    let end = first_after(log, p, Some(asked)).await?;
    let epoch = if end > log.log_start(p) {
        epoch_at(log, p, Offset(end.0 - 1)).await?
    } else {
        None
    };
    Ok(EpochEnd { offset: end, epoch })
}

/// The epoch history of partition `p`: `(epoch, start offset)` of every
/// epoch in the retained log, oldest first.
///
/// # Errors
/// When the log cannot be read.
pub(super) async fn epochs(
    log: &dyn EventLog,
    p: PartitionId,
) -> Result<Vec<(Epoch, Offset)>, LogError> {
    let hw = log.high_watermark(p);
    let mut at = log.log_start(p);
    let mut out = Vec::new();
    while at < hw {
        let Some(e) = epoch_at(log, p, at).await? else {
            break;
        };
        out.push((e, at));
        at = first_after(log, p, Some(e)).await?;
    }
    Ok(out)
}

/// Why an answer cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the primary answered epoch {answered} for a question about epoch {asked}")]
pub struct ImplausibleAnswer {
    asked: Epoch,
    answered: Epoch,
}

/// One reconciling step, decided from values only. `mine`: the epoch of
/// this hub's last record; `hw`: its high watermark; `answer`: the
/// primary's [`epoch_end`] for `mine`; `own_first_after`: this hub's
/// [`first_after`] of the answered epoch. Returns where to cut the log
/// (`None`: it is a prefix of the primary's history).
///
/// # Errors
/// When the answer names an epoch above the one asked about.
pub fn divergence(
    mine: Epoch,
    hw: Offset,
    answer: EpochEnd,
    own_first_after: Offset,
) -> Result<Option<Offset>, ImplausibleAnswer> {
    if let Some(e) = answer.epoch
        && e > mine
    {
        return Err(ImplausibleAnswer {
            asked: mine,
            answered: e,
        });
    }
    let keep = answer.offset.min(own_first_after);
    Ok((keep < hw).then_some(keep))
}

#[cfg(test)]
mod model;
