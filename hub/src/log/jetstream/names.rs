//! The names of a log's streams, subjects and buckets.

use std::time::Duration;

use async_nats::jetstream::stream;
use fleet_api::PartitionId;

/// Names of a log's streams, subjects and bucket.
#[derive(Clone, Debug)]
pub(super) struct StreamNames {
    pub(super) prefix: String,
}

impl StreamNames {
    pub(super) fn stream(&self, p: PartitionId, generation: u32) -> String {
        format!("{}_p{}_g{generation}", self.prefix, p.0)
    }

    /// `{prefix}.{p}.{g}.{device}`: one subject per device, so the last
    /// record of a device can be found without a scan. A device id's dots
    /// are written `%2E` (a subject token holds none).
    ///
    /// Built by hand, once per append: `format!` and `replace` here were
    /// about 8 % of the hub's CPU on the ingest path (perf).
    pub(super) fn subject(&self, p: PartitionId, generation: u32, device: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + device.len() * 3 + 24);
        s.push_str(&self.prefix);
        s.push('.');
        push_u64(&mut s, u64::from(p.0));
        s.push('.');
        push_u64(&mut s, u64::from(generation));
        s.push('.');
        for (i, part) in device.split('.').enumerate() {
            if i > 0 {
                s.push_str("%2E");
            }
            s.push_str(part);
        }
        s
    }

    pub(super) fn config(
        &self,
        p: PartitionId,
        generation: u32,
        replicas: usize,
        first: u64,
    ) -> stream::Config {
        stream::Config {
            name: self.stream(p, generation),
            subjects: vec![format!("{}.{}.{generation}.>", self.prefix, p.0)],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            discard: stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            first_sequence: (first > 0).then_some(first + 1),
            ..Default::default()
        }
    }

    pub(super) fn bucket(&self) -> String {
        format!("{}_meta", self.prefix)
    }

    pub(super) fn leases(&self) -> String {
        format!("{}_leases", self.prefix)
    }

    pub(super) fn purged(&self) -> String {
        format!("{}_purged", self.prefix)
    }
}

/// Appends `n` in decimal to `s` without the formatting machinery.
pub(super) fn push_u64(s: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        s.push(char::from(d));
    }
}

/// The stream configuration of a new partition `p` of the log `prefix`,
/// and the subject of `device`'s records in it: what a raw publisher uses
/// to write the same records the same way (`fleet bench ingest`).
pub fn stream_layout(
    prefix: &str,
    p: PartitionId,
    replicas: usize,
    device: &str,
) -> (stream::Config, String) {
    let names = StreamNames {
        prefix: prefix.to_string(),
    };
    (names.config(p, 0, replicas, 0), names.subject(p, 0, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_numbers_are_written_as_format_would() {
        let names = StreamNames {
            prefix: "fleet_eu".to_string(),
        };
        assert_eq!(
            names.subject(PartitionId(3), 12, "a.b.c"),
            "fleet_eu.3.12.a%2Eb%2Ec"
        );
        assert_eq!(
            names.subject(PartitionId(0), 0, "dev-1"),
            "fleet_eu.0.0.dev-1"
        );
        for n in [0, 7, 10, 1_234_567, u64::MAX] {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, n.to_string());
        }
    }
}
