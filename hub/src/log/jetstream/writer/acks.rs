//! A partition writer's acknowledgements, all on one subscription.
//!
//! Each publish names the reply subject `{inbox}.{round}-{offset}` under
//! the writer's own inbox (one token under it, as async-nats's own request
//! inbox, so that the same subscribe permission covers it): the servers' acknowledgements arrive on one
//! subscription and are matched to their publishes by that subject, in any
//! order. The round changes whenever the writer gives up on what it had in
//! flight (a resync, a failure, a reload): a late acknowledgement of an
//! earlier round is ignored, never taken for a later publish at the same
//! offset.
//!
//! Written here rather than with async-nats's
//! `jetstream::Context::send_publish`, which gives every publish its own
//! inbox, oneshot channel, permit and timeout timer, and parses every
//! acknowledgement through an untagged enum: in a `perf` profile of
//! `fleet bench ingest --log jetstream` the writer tasks took 44 % of the
//! hub's CPU, most of it in that machinery. One timer per writer (a tick a
//! second) bounds how long a publish may wait, as the context's 5 s timeout
//! did.

use std::time::Duration;

use async_nats::{Client, HeaderMap, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;

use super::super::NATS_WAIT;

/// Ticks (seconds) a publish waits for its acknowledgement before the
/// writer confirms it by reading back.
const TIMEOUT_TICKS: u64 = NATS_WAIT.as_secs();

/// What the servers answered to one publish.
pub(super) type Answer = Result<u64, String>;

pub(super) struct Acks {
    client: Client,
    /// `_INBOX.{nuid}.`, unique to this writer.
    inbox: String,
    sub: Option<Subscriber>,
    round: u64,
    tick: Option<tokio::time::Interval>,
    /// Ticks so far.
    pub ticks: u64,
}

/// An acknowledgement's body: `{"stream":…,"seq":N}` or `{"error":{…}}`.
#[derive(Deserialize)]
struct Body {
    seq: Option<u64>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl Acks {
    pub fn new(client: Client) -> Acks {
        let mut inbox = client.new_inbox();
        inbox.push('.');
        Acks {
            client,
            inbox,
            sub: None,
            round: 0,
            tick: None,
            ticks: 0,
        }
    }

    /// Sends one publish whose acknowledgement comes back here.
    ///
    /// # Errors
    /// When it could not be sent (no subscription, a closed client).
    pub async fn send(
        &mut self,
        subject: async_nats::Subject,
        offset: u64,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(), String> {
        if self.sub.is_none() {
            // Bounded: a writer blocked here would neither time out what it
            // has in flight nor fail.
            let sub =
                tokio::time::timeout(NATS_WAIT, self.client.subscribe(format!("{}*", self.inbox)))
                    .await
                    .map_err(|_| "subscribe to acknowledgements: timed out".to_string())?
                    .map_err(|e| format!("subscribe to acknowledgements: {e}"))?;
            self.sub = Some(sub);
        }
        let mut reply = String::with_capacity(self.inbox.len() + 24);
        reply.push_str(&self.inbox);
        super::super::push_u64(&mut reply, self.round);
        reply.push('-');
        super::super::push_u64(&mut reply, offset);
        // Not sent when the timeout cancels it (the client's channel is
        // cancel-safe): the writer then confirms it as after any error.
        tokio::time::timeout(
            NATS_WAIT,
            self.client
                .publish_with_reply_and_headers(subject, reply, headers, body),
        )
        .await
        .map_err(|_| format!("publish: the client took none for {NATS_WAIT:?} (reconnecting?)"))?
        .map_err(|e| format!("publish: {e}"))
    }

    /// Forget everything in flight: acknowledgements of it are ignored.
    pub fn new_round(&mut self) {
        self.round = self.round.wrapping_add(1);
    }

    /// The next acknowledgement or, with `clock`, the next tick of the
    /// timeout clock, whichever comes first.
    pub async fn event(&mut self, clock: bool) -> Event {
        let tick = self.tick.get_or_insert_with(|| {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let ticked = tokio::select! {
            biased;
            answer = next(&mut self.sub, &self.inbox, self.round) => return Event::Answer(answer),
            _ = tick.tick(), if clock => true,
        };
        if ticked {
            self.ticks += 1;
        }
        Event::Tick
    }

    /// Whether a publish sent at tick `sent` has waited too long.
    pub fn expired(&self, sent: u64) -> bool {
        self.ticks > sent + TIMEOUT_TICKS
    }
}

/// What a writer waits for.
pub(super) enum Event {
    /// An acknowledgement of this round: its offset and answer; `None` when
    /// the subscription ended (the client closed).
    Answer(Option<(u64, Answer)>),
    Tick,
}

/// The next acknowledgement of this round; pending forever without a
/// subscription.
async fn next(sub: &mut Option<Subscriber>, inbox: &str, round: u64) -> Option<(u64, Answer)> {
    loop {
        let Some(s) = sub.as_mut() else {
            return std::future::pending().await;
        };
        let Some(msg) = s.next().await else {
            *sub = None;
            return None;
        };
        if let Some(found) = parse(&msg, inbox, round) {
            return Some(found);
        }
    }
}

fn parse(msg: &Message, inbox: &str, round: u64) -> Option<(u64, Answer)> {
    let rest = msg.subject.as_str().strip_prefix(inbox)?;
    let (r, offset) = rest.split_once('-')?;
    if r.parse::<u64>().ok()? != round {
        return None;
    }
    let offset = offset.parse::<u64>().ok()?;
    Some((offset, answer(msg)))
}

fn answer(msg: &Message) -> Answer {
    if let Some(status) = msg.status
        && !status.is_success()
    {
        return Err(format!(
            "status {status}{}",
            msg.description
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        ));
    }
    match serde_json::from_slice::<Body>(&msg.payload) {
        Ok(Body { error: Some(e), .. }) => Err(format!(
            "{} (code {}, error code {})",
            e.description, e.code, e.err_code
        )),
        Ok(Body {
            seq: Some(seq),
            error: None,
        }) => Ok(seq),
        Ok(Body {
            seq: None,
            error: None,
        }) => Err("an acknowledgement without a sequence".to_string()),
        Err(e) => Err(format!("an unreadable acknowledgement: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(payload: &str) -> Message {
        Message {
            subject: "x".into(),
            reply: None,
            payload: Bytes::from(payload.to_string()),
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn answers_of_an_earlier_round_or_another_inbox_are_ignored() {
        let mut m = msg(r#"{"stream":"s","seq":8}"#);
        m.subject = "_INBOX.abc.3-7".into();
        assert_eq!(parse(&m, "_INBOX.abc.", 3), Some((7, Ok(8))));
        assert_eq!(parse(&m, "_INBOX.abc.", 4), None);
        assert_eq!(parse(&m, "_INBOX.abd.", 3), None);
        m.subject = "_INBOX.abc.3".into();
        assert_eq!(parse(&m, "_INBOX.abc.", 3), None);
        m.subject = "_INBOX.abc.3-x".into();
        assert_eq!(parse(&m, "_INBOX.abc.", 3), None);
    }

    #[test]
    fn answers_are_read_from_the_servers_replies() {
        assert_eq!(answer(&msg(r#"{"stream":"s","seq":42}"#)), Ok(42));
        assert_eq!(
            answer(&msg(r#"{"stream":"s","seq":7,"duplicate":true}"#)),
            Ok(7)
        );
        let refused = answer(&msg(
            r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#,
        ));
        assert_eq!(
            refused,
            Err("wrong last sequence: 3 (code 400, error code 10071)".to_string())
        );
        assert!(answer(&msg("{}")).is_err());
        assert!(answer(&msg("not json")).is_err());
        let mut none = msg("");
        none.status = Some(async_nats::StatusCode::NO_RESPONDERS);
        assert!(answer(&none).unwrap_err().starts_with("status 503"));
    }
}
