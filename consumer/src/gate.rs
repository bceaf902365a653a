//! The group's shared circuit breaker as this instance sees it: watching
//! it, counting failures into it, and deciding who probes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::breaker::{self, Gate, State};
use crate::store::{self};
use crate::{Ctx, HandlerError};

impl Ctx {
    /// Re-reads the shared breaker; every instance logs and counts the
    /// transitions it sees.
    pub(crate) async fn watch_breaker(self: Arc<Self>, cancel: CancellationToken) {
        let group = self.group();
        set_breaker_gauge(&group, &self.breaker.borrow().state);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.config.breaker_poll) => {}
            }
            match self.store.breaker().await {
                Ok(now) => self.observe_breaker(now),
                Err(e) => tracing::warn!(error = %e, "cannot read the circuit breaker"),
            }
        }
    }

    pub(crate) fn observe_breaker(&self, now: store::StoredBreaker) {
        let before = self.breaker.borrow().clone();
        if now.generation == before.generation {
            return;
        }
        if now.state.name() != before.state.name() {
            let group = self.group();
            tracing::warn!(group = %group, from = before.state.name(), to = now.state.name(), "circuit breaker transition");
            metrics::counter!("fleet_consumer_breaker_transitions_total", "group" => group.clone(), "to" => now.state.name())
                .increment(1);
            set_breaker_gauge(&group, &now.state);
        }
        self.breaker.send_replace(now);
    }

    /// Counts one failure and opens the breaker when the group had too many.
    pub(crate) async fn failure(&self, error: &HandlerError) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        let kind = match error {
            HandlerError::Record(_) => "record",
            HandlerError::Unavailable(_) => "unavailable",
        };
        metrics::counter!("fleet_consumer_failures_total", "group" => self.group(), "kind" => kind)
            .increment(1);
        let policy = self.config.breaker;
        let counted = match self
            .store
            .record_failure(&self.instance, policy.window)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot record a failure in the store");
                return;
            }
        };
        let Ok(current) = self.store.breaker().await else {
            return;
        };
        let now = fleet_api::UnixMillis::now().0;
        if let Some(next) = breaker::after_failure(&current.state, counted, now, &policy) {
            if let Ok(true) = self.store.transition(current.generation, &next).await {
                tracing::warn!(failures_in_window = counted, window_s = policy.window.as_secs(), last_error = %error, "circuit breaker opened");
            }
            if let Ok(b) = self.store.breaker().await {
                self.observe_breaker(b);
            }
        }
    }

    /// What a worker may do now; `me` names it (instance and partition) so
    /// that one worker of the group probes.
    pub(crate) async fn gate(&self, me: &str) -> Gate {
        let current = self.breaker.borrow().clone();
        let now = fleet_api::UnixMillis::now().0;
        match breaker::gate(&current.state, me, now, &self.config.breaker) {
            Gate::Probe if !matches!(&current.state, State::HalfOpen { prober, .. } if prober == me) =>
            {
                let next = State::HalfOpen {
                    prober: me.to_string(),
                    since_ms: now,
                };
                match self.store.transition(current.generation, &next).await {
                    Ok(true) => {
                        tracing::info!(prober = me, "circuit breaker half-open; probing");
                        if let Ok(b) = self.store.breaker().await {
                            self.observe_breaker(b);
                        }
                        Gate::Probe
                    }
                    _ => {
                        if let Ok(b) = self.store.breaker().await {
                            self.observe_breaker(b);
                        }
                        Gate::Wait(Duration::from_millis(100))
                    }
                }
            }
            g => g,
        }
    }

    /// After the probe's outcome: success closes the breaker for everyone.
    pub(crate) async fn probe_succeeded(&self, me: &str) {
        let Ok(current) = self.store.breaker().await else {
            return;
        };
        if let Some(next) = breaker::after_success(&current.state, me)
            && let Ok(true) = self.store.transition(current.generation, &next).await
        {
            tracing::info!(prober = me, "probe succeeded; circuit breaker closed");
        }
        if let Ok(b) = self.store.breaker().await {
            self.observe_breaker(b);
        }
    }

    pub(crate) fn breaker_closed(&self) -> bool {
        matches!(self.breaker.borrow().state, State::Closed)
    }
}

pub(crate) fn set_breaker_gauge(group: &str, state: &State) {
    let v = match state {
        State::Closed => 0.0,
        State::HalfOpen { .. } => 1.0,
        State::Open { .. } => 2.0,
    };
    metrics::gauge!("fleet_consumer_breaker_state", "group" => group.to_string()).set(v);
}
