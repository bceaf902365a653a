//! Delivery of a batch to the handler: whole first, then record by record
//! with retries, dead-lettering records that exhaust them.

use std::sync::atomic::Ordering;

use fleet_api::hub::WireRecord;
use tokio_util::sync::CancellationToken;

use crate::{Ctx, HandlerError};

/// A failed call of the handler.
struct Failed {
    error: HandlerError,
    /// It panicked (the error says so too).
    panicked: bool,
}

/// How processing a batch ended.
pub(crate) enum Outcome {
    /// Every record is done (handled or dead-lettered).
    Done,
    /// The first `done` records are; the rest wait (downstream unavailable
    /// or the breaker opened).
    Stalled { done: usize },
}

impl Ctx {
    /// Hands `batch` to the handler: as a whole first; after a record
    /// rejection, one record at a time with retries, dead-lettering records
    /// that exhaust them.
    pub(crate) async fn process(
        &self,
        batch: &[WireRecord],
        probing: bool,
        me: &str,
        stop: &CancellationToken,
    ) -> Outcome {
        let group = self.group();
        match self.call(batch).await {
            Ok(()) => {
                self.processed(batch.len());
                if probing {
                    self.probe_succeeded(me).await;
                }
                return Outcome::Done;
            }
            Err(Failed { error: e, panicked }) => {
                self.failure(&e).await;
                if let HandlerError::Unavailable(reason) = &e {
                    tracing::warn!(reason = %reason, records = batch.len(), "downstream unavailable; the batch waits");
                    return Outcome::Stalled { done: 0 };
                }
                if probing && panicked {
                    // A handler that panics proves nothing about the
                    // downstream: the breaker stays open, the batch waits
                    // (rather than the log draining into dead letters).
                    return Outcome::Stalled { done: 0 };
                }
                if probing {
                    // The downstream answered: the records are the problem.
                    self.probe_succeeded(me).await;
                }
            }
        }
        for (i, record) in batch.iter().enumerate() {
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                let result = self
                    .call(std::slice::from_ref(record))
                    .await
                    .map_err(|f| f.error);
                match result {
                    Ok(()) => {
                        self.processed(1);
                        break;
                    }
                    Err(e) => {
                        self.failure(&e).await;
                        let HandlerError::Record(reason) = e else {
                            return Outcome::Stalled { done: i };
                        };
                        if attempts >= self.config.retry.attempts {
                            match self.store.dead_letter(record, &reason, attempts).await {
                                Ok(()) => {
                                    tracing::warn!(offset = %record.offset, device_id = %record.device_id, attempts, reason = %reason, "record dead-lettered");
                                    self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                                    metrics::counter!("fleet_consumer_dead_letters_total", "group" => group.clone())
                                        .increment(1);
                                    break;
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot write the dead letter; the record waits");
                                    return Outcome::Stalled { done: i };
                                }
                            }
                        }
                        metrics::counter!("fleet_consumer_retries_total", "group" => group.clone())
                            .increment(1);
                        let d = (self.config.jitter)(self.config.retry.ceiling(attempts));
                        if !self.sleep_or(d, stop).await || !self.breaker_closed() {
                            // Stopped, or the breaker opened meanwhile: the
                            // record starts over later with fresh attempts.
                            return Outcome::Stalled { done: i };
                        }
                    }
                }
            }
        }
        Outcome::Done
    }

    /// The handler, with a panic taken as a failed attempt on `records`:
    /// retried, then dead-lettered like any rejected record (a panic that
    /// ended the worker was redelivered, and panicked, forever).
    async fn call(&self, records: &[WireRecord]) -> Result<(), Failed> {
        use futures::FutureExt;
        match std::panic::AssertUnwindSafe(self.handler.handle(records))
            .catch_unwind()
            .await
        {
            Ok(result) => result.map_err(|error| Failed {
                error,
                panicked: false,
            }),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                tracing::error!(records = records.len(), panic = %what, "the handler panicked");
                metrics::counter!("fleet_consumer_handler_panics_total", "group" => self.group())
                    .increment(1);
                Err(Failed {
                    error: HandlerError::Record(format!("the handler panicked: {what}")),
                    panicked: true,
                })
            }
        }
    }

    pub(crate) fn processed(&self, n: usize) {
        self.counters
            .processed
            .fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!("fleet_consumer_records_total", "group" => self.group())
            .increment(n as u64);
    }
}
