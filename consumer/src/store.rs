//! The state a consumer group shares between its instances: partition leases,
//! checkpoints, the circuit breaker (with its failure window) and the
//! dead-letter log. One SQL schema, used through sqlx's `Any` driver, so a
//! single machine runs on one SQLite file and many machines on PostgreSQL,
//! and the same test suite covers both.
//!
//! Every write that could race another instance is a compare-and-set in one
//! statement: a lease is taken only when free or expired, a checkpoint only
//! moves forward and only for the lease holder, the breaker changes only from
//! the state the writer saw. Times are wall-clock milliseconds because the
//! instances share them across machines.

use std::str::FromStr;
use std::time::Duration;

use fleet_api::hub::WireRecord;
use fleet_api::{DeviceId, Epoch, Mid, Offset, PartitionId, Region, UnixMillis};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::breaker::State;

/// Errors of the consumer store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store URL {0} (use sqlite://PATH or postgres://…)")]
    Url(String),
    #[error("consumer store: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("consumer store holds an unknown breaker state {0:?}")]
    BadState(String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// Which SQL dialect the store speaks (DDL differs; queries do not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a `sqlite://` or `postgres://` URL names.
    ///
    /// # Errors
    /// Any other scheme.
    pub fn of(url: &str) -> Result<Backend> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::Url(fleet_api::secret::redact_url(url)))
        }
    }
}

/// Opens a pool on `url` through the `Any` driver: SQLite files are created
/// when missing and run in WAL mode with a busy timeout, so that several
/// processes on one machine can share them.
///
/// # Errors
/// Bad URL or unreachable database.
pub async fn connect(url: &str, max_connections: u32) -> Result<(AnyPool, Backend)> {
    sqlx::any::install_default_drivers();
    let backend = Backend::of(url)?;
    let url = match backend {
        Backend::Sqlite if !url.contains("mode=") => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode=rwc")
        }
        _ => url.to_string(),
    };
    let opts = AnyConnectOptions::from_str(&url)?;
    let pool = AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    sqlx::query("PRAGMA journal_mode=WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout=10000")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous=FULL")
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            })
        })
        .connect_with(opts)
        .await?;
    Ok((pool, backend))
}

const SCHEMA_SQLITE: &str = r"
CREATE TABLE IF NOT EXISTS consumer_instances (
    group_name TEXT NOT NULL, instance TEXT NOT NULL, expires_ms INTEGER NOT NULL,
    PRIMARY KEY (group_name, instance));
CREATE TABLE IF NOT EXISTS consumer_leases (
    group_name TEXT NOT NULL, partition_id INTEGER NOT NULL, owner TEXT,
    expires_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (group_name, partition_id));
CREATE TABLE IF NOT EXISTS consumer_checkpoints (
    group_name TEXT NOT NULL, partition_id INTEGER NOT NULL,
    next_offset INTEGER NOT NULL, last_epoch INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (group_name, partition_id));
CREATE TABLE IF NOT EXISTS consumer_breaker (
    group_name TEXT PRIMARY KEY, state TEXT NOT NULL, since_ms INTEGER NOT NULL,
    manual INTEGER NOT NULL, prober TEXT, generation INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS consumer_failures (
    group_name TEXT NOT NULL, at_ms INTEGER NOT NULL, instance TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS consumer_failures_at ON consumer_failures (group_name, at_ms);
CREATE TABLE IF NOT EXISTS consumer_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_name TEXT NOT NULL, partition_id INTEGER NOT NULL, log_offset INTEGER NOT NULL,
    epoch INTEGER NOT NULL, device_id TEXT NOT NULL, mid INTEGER, region TEXT NOT NULL,
    enqueued_at INTEGER NOT NULL, payload BLOB NOT NULL, reason TEXT NOT NULL,
    attempts INTEGER NOT NULL, failed_ms INTEGER NOT NULL, replayed_ms INTEGER,
    UNIQUE (group_name, partition_id, log_offset, epoch));
";

const SCHEMA_POSTGRES: &str = r"
CREATE TABLE IF NOT EXISTS consumer_instances (
    group_name TEXT NOT NULL, instance TEXT NOT NULL, expires_ms BIGINT NOT NULL,
    PRIMARY KEY (group_name, instance));
CREATE TABLE IF NOT EXISTS consumer_leases (
    group_name TEXT NOT NULL, partition_id BIGINT NOT NULL, owner TEXT,
    expires_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (group_name, partition_id));
CREATE TABLE IF NOT EXISTS consumer_checkpoints (
    group_name TEXT NOT NULL, partition_id BIGINT NOT NULL,
    next_offset BIGINT NOT NULL, last_epoch BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (group_name, partition_id));
CREATE TABLE IF NOT EXISTS consumer_breaker (
    group_name TEXT PRIMARY KEY, state TEXT NOT NULL, since_ms BIGINT NOT NULL,
    manual BIGINT NOT NULL, prober TEXT, generation BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS consumer_failures (
    group_name TEXT NOT NULL, at_ms BIGINT NOT NULL, instance TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS consumer_failures_at ON consumer_failures (group_name, at_ms);
CREATE TABLE IF NOT EXISTS consumer_dead_letters (
    id BIGSERIAL PRIMARY KEY,
    group_name TEXT NOT NULL, partition_id BIGINT NOT NULL, log_offset BIGINT NOT NULL,
    epoch BIGINT NOT NULL, device_id TEXT NOT NULL, mid BIGINT, region TEXT NOT NULL,
    enqueued_at BIGINT NOT NULL, payload BYTEA NOT NULL, reason TEXT NOT NULL,
    attempts BIGINT NOT NULL, failed_ms BIGINT NOT NULL, replayed_ms BIGINT,
    UNIQUE (group_name, partition_id, log_offset, epoch));
";

/// Runs each `;`-separated statement of `schema` (the `Any` driver runs one
/// statement per call). Concurrent first starts race on PostgreSQL's catalog,
/// so the whole schema runs under an advisory lock there.
async fn apply_schema(pool: &AnyPool, backend: Backend) -> Result<()> {
    let mut conn = pool.acquire().await?;
    let schema = match backend {
        Backend::Sqlite => SCHEMA_SQLITE,
        Backend::Postgres => {
            sqlx::query("SELECT pg_advisory_lock(727274)")
                .execute(&mut *conn)
                .await?;
            SCHEMA_POSTGRES
        }
    };
    let mut result = Ok(());
    for stmt in schema.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        if let Err(e) = sqlx::query(stmt).execute(&mut *conn).await {
            result = Err(e.into());
            break;
        }
    }
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_unlock(727274)")
            .execute(&mut *conn)
            .await?;
    }
    result
}

/// A group's checkpoint of one partition: records before `next` are done;
/// `last_epoch` is the epoch of the record at `next - 1` (0 when none), which
/// tells after a failover whether the new primary holds the same record there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub next: Offset,
    pub last_epoch: Epoch,
}

/// One entry of the dead-letter log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub group: String,
    pub record: WireRecord,
    pub reason: String,
    pub attempts: u32,
    pub failed_at: UnixMillis,
    pub replayed_at: Option<UnixMillis>,
}

/// The breaker as stored: its state and a generation that every transition
/// bumps (the compare-and-set token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBreaker {
    pub state: State,
    pub generation: i64,
}

/// A group's view of the shared consumer store.
#[derive(Clone, Debug)]
pub struct ConsumerStore {
    pool: AnyPool,
    group: String,
}

fn now_ms() -> i64 {
    int(fleet_api::UnixMillis::now().0)
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl ConsumerStore {
    /// Connects to `url` and creates the tables when missing.
    ///
    /// # Errors
    /// Bad URL, unreachable database or failed DDL.
    pub async fn open(url: &str, group: &str) -> Result<ConsumerStore> {
        let (pool, backend) = connect(url, 8).await?;
        apply_schema(&pool, backend).await?;
        Ok(ConsumerStore {
            pool,
            group: group.to_string(),
        })
    }

    /// The group this store serves.
    pub fn group(&self) -> &str {
        &self.group
    }

    // ------------------------------------------------------------ instances

    /// Announces `instance` as alive for `ttl`; returns how many instances of
    /// the group are alive (itself included).
    ///
    /// # Errors
    /// Database errors.
    pub async fn heartbeat(&self, instance: &str, ttl: Duration) -> Result<u32> {
        let now = now_ms();
        let expires = now + int(ttl.as_millis() as u64);
        sqlx::query(
            "INSERT INTO consumer_instances (group_name, instance, expires_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (group_name, instance) DO UPDATE SET expires_ms = excluded.expires_ms",
        )
        .bind(&self.group)
        .bind(instance)
        .bind(expires)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM consumer_instances WHERE group_name = $1 AND expires_ms < $2")
            .bind(&self.group)
            .bind(now - 60_000)
            .execute(&self.pool)
            .await?;
        let row = sqlx::query(
            "SELECT COUNT(*) FROM consumer_instances WHERE group_name = $1 AND expires_ms >= $2",
        )
        .bind(&self.group)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>(0)?.max(1) as u32)
    }

    /// Says goodbye: the instance and its leases are freed at once.
    ///
    /// # Errors
    /// Database errors.
    pub async fn leave(&self, instance: &str) -> Result<()> {
        sqlx::query("DELETE FROM consumer_instances WHERE group_name = $1 AND instance = $2")
            .bind(&self.group)
            .bind(instance)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "UPDATE consumer_leases SET owner = NULL, expires_ms = 0 WHERE group_name = $1 AND owner = $2",
        )
        .bind(&self.group)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // --------------------------------------------------------------- leases

    /// Makes sure lease and checkpoint rows exist for every partition; a new
    /// checkpoint of partition `p` starts at `starts[p]`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn ensure_partitions(&self, starts: &[Offset]) -> Result<()> {
        for (p, start) in (0u32..).zip(starts) {
            sqlx::query(
                "INSERT INTO consumer_leases (group_name, partition_id, owner, expires_ms) \
                 VALUES ($1, $2, NULL, 0) ON CONFLICT (group_name, partition_id) DO NOTHING",
            )
            .bind(&self.group)
            .bind(i64::from(p))
            .execute(&self.pool)
            .await?;
            sqlx::query(
                "INSERT INTO consumer_checkpoints (group_name, partition_id, next_offset, last_epoch, updated_ms) \
                 VALUES ($1, $2, $3, 0, $4) ON CONFLICT (group_name, partition_id) DO NOTHING",
            )
            .bind(&self.group)
            .bind(i64::from(p))
            .bind(int(start.0))
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Takes partition `p` for `ttl` if it is free, expired or already ours.
    ///
    /// # Errors
    /// Database errors.
    pub async fn try_claim(&self, p: PartitionId, instance: &str, ttl: Duration) -> Result<bool> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE consumer_leases SET owner = $1, expires_ms = $2 \
             WHERE group_name = $3 AND partition_id = $4 \
               AND (owner IS NULL OR owner = $1 OR expires_ms < $5)",
        )
        .bind(instance)
        .bind(now + int(ttl.as_millis() as u64))
        .bind(&self.group)
        .bind(i64::from(p.0))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Extends every lease `instance` holds; returns the partitions it still
    /// holds (a lease that expired and was taken by another is gone).
    ///
    /// # Errors
    /// Database errors.
    pub async fn renew(&self, instance: &str, ttl: Duration) -> Result<Vec<PartitionId>> {
        let now = now_ms();
        sqlx::query(
            "UPDATE consumer_leases SET expires_ms = $1 WHERE group_name = $2 AND owner = $3",
        )
        .bind(now + int(ttl.as_millis() as u64))
        .bind(&self.group)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        let rows = sqlx::query(
            "SELECT partition_id FROM consumer_leases WHERE group_name = $1 AND owner = $2 ORDER BY partition_id",
        )
        .bind(&self.group)
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(PartitionId(r.try_get::<i64, _>(0)? as u32)))
            .collect()
    }

    /// Partitions nobody holds (free or expired).
    ///
    /// # Errors
    /// Database errors.
    pub async fn claimable(&self) -> Result<Vec<PartitionId>> {
        let rows = sqlx::query(
            "SELECT partition_id FROM consumer_leases \
             WHERE group_name = $1 AND (owner IS NULL OR expires_ms < $2) ORDER BY partition_id",
        )
        .bind(&self.group)
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(PartitionId(r.try_get::<i64, _>(0)? as u32)))
            .collect()
    }

    /// Gives partition `p` back.
    ///
    /// # Errors
    /// Database errors.
    pub async fn release(&self, p: PartitionId, instance: &str) -> Result<()> {
        sqlx::query(
            "UPDATE consumer_leases SET owner = NULL, expires_ms = 0 \
             WHERE group_name = $1 AND partition_id = $2 AND owner = $3",
        )
        .bind(&self.group)
        .bind(i64::from(p.0))
        .bind(instance)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Who holds each partition now (`None`: free or expired).
    ///
    /// # Errors
    /// Database errors.
    pub async fn owners(&self) -> Result<Vec<(PartitionId, Option<String>)>> {
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT partition_id, owner, expires_ms FROM consumer_leases WHERE group_name = $1 ORDER BY partition_id",
        )
        .bind(&self.group)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let owner: Option<String> = r.try_get(1)?;
                let expires: i64 = r.try_get(2)?;
                Ok((
                    PartitionId(r.try_get::<i64, _>(0)? as u32),
                    owner.filter(|_| expires >= now),
                ))
            })
            .collect()
    }

    // ---------------------------------------------------------- checkpoints

    /// The checkpoint of partition `p` (`None` before `ensure_partitions`).
    ///
    /// # Errors
    /// Database errors.
    pub async fn checkpoint(&self, p: PartitionId) -> Result<Option<Checkpoint>> {
        let row = sqlx::query(
            "SELECT next_offset, last_epoch FROM consumer_checkpoints WHERE group_name = $1 AND partition_id = $2",
        )
        .bind(&self.group)
        .bind(i64::from(p.0))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| checkpoint_of(&r)).transpose()
    }

    /// Every checkpoint of the group, by partition.
    ///
    /// # Errors
    /// Database errors.
    pub async fn checkpoints(&self) -> Result<Vec<(PartitionId, Checkpoint)>> {
        let rows = sqlx::query(
            "SELECT partition_id, next_offset, last_epoch FROM consumer_checkpoints WHERE group_name = $1 ORDER BY partition_id",
        )
        .bind(&self.group)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    PartitionId(r.try_get::<i64, _>(0)? as u32),
                    Checkpoint {
                        next: Offset(r.try_get::<i64, _>(1)? as u64),
                        last_epoch: Epoch(r.try_get::<i64, _>(2)? as u64),
                    },
                ))
            })
            .collect()
    }

    /// Moves the checkpoint of `p` forward to `to`, only while `instance`
    /// holds the lease. Returns false when it no longer does (the caller
    /// must stop working on `p`). Never moves a checkpoint backwards.
    ///
    /// # Errors
    /// Database errors.
    pub async fn commit(&self, p: PartitionId, to: Checkpoint, instance: &str) -> Result<bool> {
        self.set_checkpoint(p, to, instance, true).await
    }

    /// Moves the checkpoint of `p` back to `to` (after a failover showed that
    /// records past it were replaced), only while `instance` holds the lease.
    ///
    /// # Errors
    /// Database errors.
    pub async fn rewind(&self, p: PartitionId, to: Checkpoint, instance: &str) -> Result<bool> {
        self.set_checkpoint(p, to, instance, false).await
    }

    async fn set_checkpoint(
        &self,
        p: PartitionId,
        to: Checkpoint,
        instance: &str,
        forward_only: bool,
    ) -> Result<bool> {
        let direction = if forward_only {
            "next_offset <= $1"
        } else {
            "next_offset >= $1"
        };
        let sql = format!(
            "UPDATE consumer_checkpoints SET next_offset = $1, last_epoch = $2, updated_ms = $3 \
             WHERE group_name = $4 AND partition_id = $5 AND {direction} \
               AND EXISTS (SELECT 1 FROM consumer_leases l WHERE l.group_name = $4 \
                           AND l.partition_id = $5 AND l.owner = $6)"
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(int(to.next.0))
            .bind(int(to.last_epoch.0))
            .bind(now_ms())
            .bind(&self.group)
            .bind(i64::from(p.0))
            .bind(instance)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        // Not applied: either the lease is gone, or the checkpoint already
        // is where we wanted it (a no-op, still ours).
        let held = sqlx::query(
            "SELECT 1 FROM consumer_leases WHERE group_name = $1 AND partition_id = $2 AND owner = $3",
        )
        .bind(&self.group)
        .bind(i64::from(p.0))
        .bind(instance)
        .fetch_optional(&self.pool)
        .await?;
        Ok(held.is_some())
    }

    /// Sets a checkpoint by hand (operators: skip or re-read), regardless of
    /// leases; running instances pick it up when they next take the partition.
    ///
    /// # Errors
    /// Database errors.
    pub async fn reset_checkpoint(&self, p: PartitionId, to: Checkpoint) -> Result<()> {
        sqlx::query(
            "UPDATE consumer_checkpoints SET next_offset = $1, last_epoch = $2, updated_ms = $3 \
             WHERE group_name = $4 AND partition_id = $5",
        )
        .bind(int(to.next.0))
        .bind(int(to.last_epoch.0))
        .bind(now_ms())
        .bind(&self.group)
        .bind(i64::from(p.0))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // -------------------------------------------------------------- breaker

    /// The group's breaker (closed when never written).
    ///
    /// # Errors
    /// Database errors or a state this version does not know.
    pub async fn breaker(&self) -> Result<StoredBreaker> {
        let row = sqlx::query(
            "SELECT state, since_ms, manual, prober, generation FROM consumer_breaker WHERE group_name = $1",
        )
        .bind(&self.group)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(StoredBreaker {
                state: State::Closed,
                generation: 0,
            });
        };
        let name: String = r.try_get(0)?;
        let since_ms = r.try_get::<i64, _>(1)?.max(0) as u64;
        let manual = r.try_get::<i64, _>(2)? != 0;
        let prober: Option<String> = r.try_get(3)?;
        let state = match name.as_str() {
            "closed" => State::Closed,
            "open" => State::Open { since_ms, manual },
            "half_open" => State::HalfOpen {
                prober: prober.unwrap_or_default(),
                since_ms,
            },
            _ => return Err(StoreError::BadState(name)),
        };
        Ok(StoredBreaker {
            state,
            generation: r.try_get(4)?,
        })
    }

    /// Replaces the breaker's state if it is still at `generation`; returns
    /// whether this call made the transition.
    ///
    /// # Errors
    /// Database errors.
    pub async fn transition(&self, generation: i64, next: &State) -> Result<bool> {
        let (since_ms, manual, prober) = match next {
            State::Closed => (now_ms(), false, None),
            State::Open { since_ms, manual } => (int(*since_ms), *manual, None),
            State::HalfOpen { prober, since_ms } => (int(*since_ms), false, Some(prober.clone())),
        };
        if generation == 0 {
            // First write: whoever inserts the row wins.
            let done = sqlx::query(
                "INSERT INTO consumer_breaker (group_name, state, since_ms, manual, prober, generation) \
                 VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT (group_name) DO NOTHING",
            )
            .bind(&self.group)
            .bind(next.name())
            .bind(since_ms)
            .bind(i64::from(manual))
            .bind(prober)
            .execute(&self.pool)
            .await?;
            return Ok(done.rows_affected() == 1);
        }
        let done = sqlx::query(
            "UPDATE consumer_breaker SET state = $1, since_ms = $2, manual = $3, prober = $4, \
             generation = generation + 1 WHERE group_name = $5 AND generation = $6",
        )
        .bind(next.name())
        .bind(since_ms)
        .bind(i64::from(manual))
        .bind(prober)
        .bind(&self.group)
        .bind(generation)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records one handler failure and returns how many the group had within
    /// `window` (this one included); older entries are pruned.
    ///
    /// # Errors
    /// Database errors.
    pub async fn record_failure(&self, instance: &str, window: Duration) -> Result<u64> {
        let now = now_ms();
        let since = now - int(window.as_millis() as u64);
        sqlx::query(
            "INSERT INTO consumer_failures (group_name, at_ms, instance) VALUES ($1, $2, $3)",
        )
        .bind(&self.group)
        .bind(now)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM consumer_failures WHERE group_name = $1 AND at_ms < $2")
            .bind(&self.group)
            .bind(since - 60_000)
            .execute(&self.pool)
            .await?;
        let row = sqlx::query(
            "SELECT COUNT(*) FROM consumer_failures WHERE group_name = $1 AND at_ms > $2",
        )
        .bind(&self.group)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>(0)?.max(0) as u64)
    }

    // --------------------------------------------------------- dead letters

    /// Appends `record` to the dead-letter log (once per record: a record
    /// dead-lettered again after a crash is not duplicated).
    ///
    /// # Errors
    /// Database errors.
    pub async fn dead_letter(
        &self,
        record: &WireRecord,
        reason: &str,
        attempts: u32,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO consumer_dead_letters (group_name, partition_id, log_offset, epoch, device_id, mid, \
             region, enqueued_at, payload, reason, attempts, failed_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (group_name, partition_id, log_offset, epoch) DO NOTHING",
        )
        .bind(&self.group)
        .bind(i64::from(record.partition.0))
        .bind(int(record.offset.0))
        .bind(int(record.epoch.0))
        .bind(record.device_id.as_str())
        .bind(record.mid.map(|m| int(m.0)))
        .bind(record.region.as_str())
        .bind(int(record.enqueued_at.0))
        .bind(record.payload.clone())
        .bind(reason)
        .bind(i64::from(attempts))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Dead letters in log order; `pending_only` leaves out replayed ones.
    ///
    /// # Errors
    /// Database errors or a row that does not decode.
    pub async fn dead_letters(&self, pending_only: bool, limit: u32) -> Result<Vec<DeadLetter>> {
        let filter = if pending_only {
            " AND replayed_ms IS NULL"
        } else {
            ""
        };
        let sql = format!(
            "SELECT id, partition_id, log_offset, epoch, device_id, mid, region, enqueued_at, payload, \
             reason, attempts, failed_ms, replayed_ms FROM consumer_dead_letters \
             WHERE group_name = $1{filter} ORDER BY id LIMIT $2"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&self.group)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| self.dead_letter_of(r)).collect()
    }

    fn dead_letter_of(&self, r: &AnyRow) -> Result<DeadLetter> {
        let bad = |what: &str| {
            StoreError::Sql(sqlx::Error::Decode(
                format!("dead letter: invalid {what}").into(),
            ))
        };
        let device: String = r.try_get(4)?;
        let region: String = r.try_get(6)?;
        Ok(DeadLetter {
            id: r.try_get(0)?,
            group: self.group.clone(),
            record: WireRecord {
                partition: PartitionId(r.try_get::<i64, _>(1)? as u32),
                offset: Offset(r.try_get::<i64, _>(2)? as u64),
                epoch: Epoch(r.try_get::<i64, _>(3)? as u64),
                device_id: DeviceId::new(device).map_err(|_| bad("device_id"))?,
                mid: r.try_get::<Option<i64>, _>(5)?.map(|m| Mid(m as u64)),
                region: Region::new(region).map_err(|_| bad("region"))?,
                enqueued_at: UnixMillis(r.try_get::<i64, _>(7)? as u64),
                payload: r.try_get(8)?,
            },
            reason: r.try_get(9)?,
            attempts: r.try_get::<i64, _>(10)? as u32,
            failed_at: UnixMillis(r.try_get::<i64, _>(11)? as u64),
            replayed_at: r
                .try_get::<Option<i64>, _>(12)?
                .map(|t| UnixMillis(t as u64)),
        })
    }

    /// Marks dead letter `id` as replayed.
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_replayed(&self, id: i64) -> Result<()> {
        sqlx::query(
            "UPDATE consumer_dead_letters SET replayed_ms = $1 WHERE group_name = $2 AND id = $3",
        )
        .bind(now_ms())
        .bind(&self.group)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

fn checkpoint_of(r: &AnyRow) -> Result<Checkpoint> {
    Ok(Checkpoint {
        next: Offset(r.try_get::<i64, _>(0)?.max(0) as u64),
        last_epoch: Epoch(r.try_get::<i64, _>(1)?.max(0) as u64),
    })
}
