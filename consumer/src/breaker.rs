//! The circuit breaker's rules, as pure functions of its state and time, so
//! that the shared breaker in the store and the tests (under paused tokio
//! time) run the same logic. More than `failures` failures within `window`
//! across every instance of a group open it; after `cooldown` one instance
//! probes (half-open); the probe's success closes it, its failure re-opens
//! it. A manually opened breaker stays open until closed by hand.

use std::time::Duration;

/// When the breaker opens and how long it stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    pub failures: u32,
    pub window: Duration,
    pub cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failures: 100,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(10),
        }
    }
}

/// The shared state of a group's breaker (times in ms since the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { since_ms: u64, manual: bool },
    HalfOpen { prober: String, since_ms: u64 },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }
}

/// What an instance may do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Fetch and process as usual.
    Proceed,
    /// Process one batch as the probe (after becoming the prober).
    Probe,
    /// Do not fetch; look again after this long.
    Wait(Duration),
}

/// What `me` may do in `state` at `now_ms`. `Probe` from an open breaker
/// means "try to become the prober" (a compare-and-set in the store).
pub fn gate(state: &State, me: &str, now_ms: u64, policy: &BreakerPolicy) -> Gate {
    let cooldown = policy.cooldown.as_millis() as u64;
    match state {
        State::Closed => Gate::Proceed,
        State::Open { manual: true, .. } => Gate::Wait(Duration::from_millis(500)),
        State::Open { since_ms, .. } => {
            let open_for = now_ms.saturating_sub(*since_ms);
            if open_for >= cooldown {
                Gate::Probe
            } else {
                Gate::Wait(Duration::from_millis((cooldown - open_for).clamp(50, 1000)))
            }
        }
        State::HalfOpen { prober, .. } if prober == me => Gate::Probe,
        // A prober that vanished is replaced after another cooldown.
        State::HalfOpen { since_ms, .. } if now_ms.saturating_sub(*since_ms) >= 2 * cooldown => {
            Gate::Probe
        }
        State::HalfOpen { .. } => Gate::Wait(Duration::from_millis(200)),
    }
}

/// The state after a failure, given how many failures (this one included)
/// the window holds.
pub fn after_failure(
    state: &State,
    failures_in_window: u64,
    now_ms: u64,
    policy: &BreakerPolicy,
) -> Option<State> {
    match state {
        State::Closed if failures_in_window > u64::from(policy.failures) => Some(State::Open {
            since_ms: now_ms,
            manual: false,
        }),
        State::HalfOpen { .. } => Some(State::Open {
            since_ms: now_ms,
            manual: false,
        }),
        _ => None,
    }
}

/// The state after a successful batch by `me`.
pub fn after_success(state: &State, me: &str) -> Option<State> {
    match state {
        State::HalfOpen { prober, .. } if prober == me => Some(State::Closed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use tokio::time::Instant;

    /// A shared breaker for several instances, in memory, on tokio time.
    struct Shared {
        state: State,
        failures: VecDeque<u64>,
        policy: BreakerPolicy,
        start: Instant,
    }

    impl Shared {
        fn now(&self) -> u64 {
            self.start.elapsed().as_millis() as u64
        }

        fn fail(&mut self) {
            let now = self.now();
            self.failures.push_back(now);
            let window = self.policy.window.as_millis() as u64;
            while self.failures.front().is_some_and(|t| now - t > window) {
                self.failures.pop_front();
            }
            if let Some(next) =
                after_failure(&self.state, self.failures.len() as u64, now, &self.policy)
            {
                self.state = next;
            }
        }

        fn try_probe(&mut self, me: &str) -> bool {
            let now = self.now();
            match gate(&self.state, me, now, &self.policy) {
                Gate::Probe => {
                    self.state = State::HalfOpen {
                        prober: me.into(),
                        since_ms: now,
                    };
                    true
                }
                _ => false,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_across_instances_probes_after_cooldown_and_closes() {
        let policy = BreakerPolicy {
            failures: 10,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(5),
        };
        let mut b = Shared {
            state: State::Closed,
            failures: VecDeque::new(),
            policy,
            start: Instant::now(),
        };
        // Two instances fail alternately: the 11th failure in the window opens it.
        for i in 0..10 {
            b.fail();
            assert_eq!(b.state, State::Closed, "after {} failures", i + 1);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        b.fail();
        assert!(matches!(b.state, State::Open { .. }));
        assert!(matches!(
            gate(&b.state, "x", b.now(), &policy),
            Gate::Wait(_)
        ));
        // Not before the cooldown.
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!b.try_probe("x"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            b.try_probe("x"),
            "the first instance after the cooldown probes"
        );
        assert!(!b.try_probe("y"), "only one prober");
        assert_eq!(
            gate(&b.state, "y", b.now(), &policy),
            Gate::Wait(Duration::from_millis(200))
        );
        // A failed probe re-opens; a successful one closes.
        b.fail();
        assert!(matches!(b.state, State::Open { .. }));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_probe("y"));
        b.state = after_success(&b.state, "y").expect("closes");
        assert_eq!(b.state, State::Closed);
        assert_eq!(after_success(&b.state, "y"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_count() {
        let policy = BreakerPolicy {
            failures: 3,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(1),
        };
        let mut b = Shared {
            state: State::Closed,
            failures: VecDeque::new(),
            policy,
            start: Instant::now(),
        };
        for _ in 0..20 {
            b.fail();
            tokio::time::advance(Duration::from_secs(4)).await;
        }
        assert_eq!(
            b.state,
            State::Closed,
            "one failure every 4 s never exceeds 3 per 10 s"
        );
    }

    #[test]
    fn a_vanished_prober_is_replaced_and_manual_open_holds() {
        let policy = BreakerPolicy::default();
        let half = State::HalfOpen {
            prober: "gone".into(),
            since_ms: 0,
        };
        assert_eq!(
            gate(&half, "me", 5_000, &policy),
            Gate::Wait(Duration::from_millis(200))
        );
        assert_eq!(gate(&half, "me", 20_000, &policy), Gate::Probe);
        let manual = State::Open {
            since_ms: 0,
            manual: true,
        };
        assert!(matches!(
            gate(&manual, "me", 1_000_000, &policy),
            Gate::Wait(_)
        ));
    }
}
