//! A partition's epoch history, and where a returning hub's log leaves the
//! primary's history.
//!
//! Epochs never decrease along a partition's offsets (a hub appends only at
//! its current epoch, and replicates only a prefix of the primary's log).
//! The log keeps the start offset of every epoch beyond retention
//! ([`crate::log::EventLog::epoch_history`]): with retention on both roles,
//! the retained records alone would not say where an old epoch began.
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
use fleet_api::{Epoch, Offset};

/// `(epoch, start offset)` of every epoch of a partition, oldest first
/// ([`crate::log::EventLog::epoch_history`]).
pub type History = [(Epoch, Offset)];

/// The first offset of a record of an epoch above `after` (every record
/// counts as above `None`); `hw` when there is none.
pub fn first_after(history: &History, hw: Offset, after: Option<Epoch>) -> Offset {
    let found = match after {
        None => history.first(),
        Some(a) => history.iter().find(|(e, _)| *e > a),
    };
    found.map_or(hw, |(_, start)| (*start).min(hw))
}

/// The primary's answer about epoch `asked`: the largest epoch it holds or
/// held that is not above `asked`, and the first offset past it.
pub fn epoch_end(history: &History, hw: Offset, asked: Epoch) -> EpochEnd {
    EpochEnd {
        offset: first_after(history, hw, Some(asked)),
        epoch: history
            .iter()
            .rev()
            .find(|(e, _)| *e <= asked)
            .map(|(e, _)| *e),
    }
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
