//! What a writer has in flight: answers matched to publishes, completed
//! in order; after an error, every unconfirmed publish confirmed one by
//! one by resending it and reading back.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use fleet_api::Offset;
use tokio::time::Instant;

use super::acks::{Answer, Event};
use super::{Item, Writer, headers};
use crate::log::{LogError, LogResult};

/// Sends `item` once more through the JetStream context (the slow path,
/// after an error) and waits for its acknowledgement.
async fn send_and_wait(js: &jetstream::Context, item: &Item) -> Answer {
    let msg = PublishMessage::build()
        .payload(item.body.clone())
        .headers(headers(item));
    let ack = js
        .send_publish(item.subject.clone(), msg)
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(|a| a.sequence).map_err(|e| e.to_string())
}

impl Writer {
    pub(super) fn on_event(&mut self, event: Event) {
        match event {
            Event::Answer(answer) => self.answered(answer),
            Event::Tick => self.check_expired(),
        }
    }

    /// Notes an answer to a publish in flight; `None`: the subscription
    /// ended, and what is in flight must be confirmed.
    pub(super) fn answered(&mut self, answer: Option<(u64, Answer)>) {
        let Some((offset, answer)) = answer else {
            if let Some(front) = self.inflight.front_mut() {
                front.answer = Some(Err("the acknowledgements' subscription ended".into()));
            }
            return;
        };
        let Some(first) = self.inflight.front().map(|i| i.offset) else {
            return;
        };
        let Some(i) = offset.checked_sub(first) else {
            return;
        };
        if let Some(item) = usize::try_from(i)
            .ok()
            .and_then(|i| self.inflight.get_mut(i))
            && item.offset == offset
            && item.answer.is_none()
        {
            item.answer = Some(answer);
        }
    }

    /// A publish unanswered for too long is taken for failed (and then
    /// confirmed by reading back).
    pub(super) fn check_expired(&mut self) {
        let Some(front) = self.inflight.front_mut() else {
            return;
        };
        if front.answer.is_none() && self.acks.expired(front.sent) {
            front.answer = Some(Err(format!(
                "no acknowledgement within {:?}",
                super::super::NATS_WAIT
            )));
        }
    }

    /// Completes the answered publishes at the front, in order.
    pub(super) async fn settle(&mut self) {
        while let Some(answer) = self.inflight.front_mut().and_then(|i| i.answer.take()) {
            let Some(item) = self.inflight.pop_front() else {
                return;
            };
            match answer {
                Ok(seq) if seq == item.offset + 1 => self.complete(item),
                Ok(seq) => {
                    let why = format!(
                        "offset {} was stored at sequence {seq} (the stream moved: another writer?)",
                        item.offset
                    );
                    self.inflight.push_front(item);
                    self.fail(why);
                }
                Err(e) => {
                    tracing::warn!(partition = %self.p(), offset = item.offset, error = %e, "jetstream publish failed; confirming in order");
                    self.inflight.push_front(item);
                    self.resync().await;
                }
            }
        }
    }

    pub(super) fn complete(&mut self, item: Item) {
        self.part.advance(Offset(item.offset + 1));
        let _ = item.reply.send(Ok(Offset(item.offset)));
        for f in item.flushes {
            let _ = f.send(Ok(()));
        }
    }

    /// Confirms every unconfirmed publish, in order, by resending it with
    /// the same body (this writer's id) and expectation.
    pub(super) async fn resync(&mut self) {
        self.acks.new_round();
        while let Some(item) = self.inflight.pop_front() {
            if let Some(Ok(seq)) = item.answer
                && seq == item.offset + 1
            {
                self.complete(item);
                continue;
            }
            let deadline = Instant::now() + self.retry_for;
            let (js, stream) = (self.js.clone(), self.stream.clone());
            match confirm(&js, &stream, &item, deadline, self.retry_for).await {
                Ok(()) => self.complete(item),
                Err(why) => {
                    self.inflight.push_front(item);
                    self.fail(why);
                    return;
                }
            }
        }
    }

    /// Waits for every publish in flight; `Err` if the partition failed.
    pub(super) async fn quiesce(&mut self) -> LogResult<()> {
        self.drain().await;
        match self.failed {
            Some(_) => Err(self.refuse()),
            None => Ok(()),
        }
    }

    /// Waits for every publish in flight.
    pub(super) async fn drain(&mut self) {
        loop {
            self.settle().await;
            if self.inflight.is_empty() || self.failed.is_some() {
                return;
            }
            let event = self.acks.event(true).await;
            self.on_event(event);
        }
    }
}

async fn confirm(
    js: &jetstream::Context,
    stream: &stream::Stream,
    item: &Item,
    deadline: Instant,
    retry_for: Duration,
) -> Result<(), String> {
    let mut pause = Duration::from_millis(50);
    loop {
        let last = match send_and_wait(js, item).await {
            Ok(seq) if seq == item.offset + 1 => return Ok(()),
            Ok(seq) => {
                return Err(format!(
                    "offset {} was stored at sequence {seq}",
                    item.offset
                ));
            }
            // Whatever the error is called (a refused expectation, a
            // timeout), a message at this offset is final: ours (its id)
            // or another writer's.
            // Bounded: async-nats does not time out handing a request to
            // a client that is reconnecting with its queue full.
            Err(e) => match tokio::time::timeout(
                super::super::NATS_WAIT,
                super::super::read::get(stream, item.offset + 1),
            )
            .await
            .unwrap_or_else(|_| Err(LogError::Io("timed out".to_string())))
            {
                Ok(Some(m)) => {
                    // The body holds this writer's id and the offset.
                    if m.payload == item.body {
                        return Ok(());
                    }
                    return Err(format!(
                        "another writer appended at offset {}: this hub is fenced",
                        item.offset
                    ));
                }
                Ok(None) => e,
                Err(err) => format!("{e}; reading it back: {err}"),
            },
        };
        if Instant::now() + pause > deadline {
            return Err(format!(
                "offset {} not confirmed within {:?}: {last}",
                item.offset, retry_for
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use fleet_api::local::NatsCluster;
    use fleet_api::{DeviceId, Epoch, Mid, PartitionId, Region, UnixMillis};
    use tokio::sync::oneshot;

    use super::*;
    use crate::log::NewRecord;
    use crate::log::jetstream::{stored_body, stream_layout};

    fn rec(mid: u64) -> NewRecord {
        NewRecord {
            device_id: DeviceId::new("d").unwrap(),
            mid: Some(Mid(mid)),
            enqueued_at: UnixMillis(1_700_000_000_000),
            region: Region::new("eu").unwrap(),
            epoch: Epoch(1),
            payload: Bytes::from(format!("d/{mid}")),
        }
    }

    fn item(offset: u64, subject: &str, body: Bytes) -> Item {
        Item {
            offset,
            subject: subject.to_string().into(),
            body,
            reply: oneshot::channel().0,
            flushes: Vec::new(),
            answer: None,
            sent: 0,
        }
    }

    /// The confirmation after an error, against real servers: a publish
    /// that was stored but whose answer never came is ours (its resend is
    /// refused, the body at its offset is the one sent); the same record
    /// stored at its offset by another writer (another id) is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stored_publish_is_ours_and_another_writers_same_record_is_not() {
        let cluster = NatsCluster::shared();
        let client = async_nats::connect(format!("nats://{}", cluster.servers[0].client));
        let js = jetstream::new(client.await.unwrap());
        let (config, subject) = stream_layout("confirm", PartitionId(0), 3, "d");
        let stream = js.create_stream(config).await.unwrap();
        let wait = Duration::from_secs(10);

        // Offset 0: stored, its answer lost.
        let ours = stored_body(Offset(0), &rec(1));
        js.publish(subject.clone(), ours.clone())
            .await
            .unwrap()
            .await
            .unwrap();
        let sent = item(0, &subject, ours);
        confirm(&js, &stream, &sent, Instant::now() + wait, wait)
            .await
            .unwrap();

        // Offset 1: another writer stored the same record first.
        let theirs = stored_body(Offset(1), &rec(2));
        js.publish(subject.clone(), theirs)
            .await
            .unwrap()
            .await
            .unwrap();
        let mine = item(1, &subject, stored_body(Offset(1), &rec(2)));
        let err = confirm(&js, &stream, &mine, Instant::now() + wait, wait)
            .await
            .unwrap_err();
        assert!(err.contains("another writer"), "{err}");

        // Offset 2: nothing there yet: the resend stores it.
        let next = item(2, &subject, stored_body(Offset(2), &rec(3)));
        confirm(&js, &stream, &next, Instant::now() + wait, wait)
            .await
            .unwrap();
        let m = stream.get_raw_message(3).await.unwrap();
        assert_eq!(m.payload, next.body);
    }
}
