//! The SQL backends. SQLite and PostgreSQL run the same statements; the few
//! differences (connect options, how the clock row is locked) live in the two
//! small inherent impls, and `impl_store!` stamps the shared code out for each
//! concrete database type so that no generic `sqlx` bounds leak into the API.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fleet_api::{
    DeviceId, DeviceKey, DeviceRecord, DeviceStatus, KeyHash, Region, Tags, UnixMillis, Version,
};
use futures::StreamExt;
use futures::stream::BoxStream;
use sqlx::ConnectOptions;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Database, Pool, Postgres, QueryBuilder, Sqlite, Transaction};

use super::{
    ApplyTx, AuthOutcome, Backend, Counts, NewDevice, Patch, RegistryError, RegistryStore, Result,
    Seq,
};
use crate::hlc;
use crate::merge::{Head, Outcome, decide};

static MIGRATE_SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static MIGRATE_POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// Rows per multi-row statement: 10 binds each stays far below both
/// backends' bind limits (SQLite 32 766, PostgreSQL 65 535).
const CHUNK: usize = 1000;

const SELECT_RECORD: &str = "SELECT device_id, key_sha256, status, tags, created_at, updated_at, \
     version, origin, deleted, seq FROM devices";

type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A registry on one SQL database.
pub struct SqlStore<DB: Database> {
    pool: Pool<DB>,
    wall: WallClock,
}

/// The embedded default: one SQLite file in WAL mode.
pub type SqliteStore = SqlStore<Sqlite>;
/// The scale backend.
pub type PostgresStore = SqlStore<Postgres>;

impl<DB: Database> fmt::Debug for SqlStore<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore").field("db", &DB::NAME).finish()
    }
}

impl<DB: Database> SqlStore<DB> {
    /// Replaces the wall clock (milliseconds since the epoch) used for
    /// versions and timestamps; for tests of clock skew.
    #[must_use]
    pub fn with_wall_clock(mut self, wall: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.wall = Arc::new(wall);
        self
    }

    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }
}

impl SqlStore<Sqlite> {
    /// Opens or creates the SQLite file named by `url` (`sqlite://PATH`).
    ///
    /// # Errors
    /// When the file cannot be opened or migrated.
    pub async fn open(url: &str) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a device whose key was printed survives power loss.
            .synchronous(SqliteSynchronous::Full)
            // Long merges hold the write lock; other writers wait rather than fail.
            .busy_timeout(Duration::from_secs(30))
            // The worker thread hands rows over one channel message each; a
            // deep buffer lets it run ahead instead of switching per row.
            .row_buffer_size(4096)
            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        MIGRATE_SQLITE.run(&pool).await?;
        Ok(Self {
            pool,
            wall: Arc::new(hlc::wall_ms),
        })
    }

    async fn begin_write(&self) -> Result<(Transaction<'static, Sqlite>, Version, u64)> {
        // IMMEDIATE takes SQLite's write lock now, so the clock read below
        // cannot be invalidated by another writer.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (hlc, seq): (i64, i64) =
            sqlx::query_as("SELECT hlc, seq FROM registry_meta WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        Ok((tx, Version(hlc as u64), seq as u64))
    }
}

impl SqlStore<Postgres> {
    /// Connects to the PostgreSQL database named by `url` and migrates it.
    ///
    /// # Errors
    /// When the server is unreachable or the schema cannot be migrated.
    pub async fn open(url: &str) -> Result<Self> {
        let opts = PgConnectOptions::from_str(url)?
            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await?;
        MIGRATE_POSTGRES.run(&pool).await?;
        Ok(Self {
            pool,
            wall: Arc::new(hlc::wall_ms),
        })
    }

    async fn begin_write(&self) -> Result<(Transaction<'static, Postgres>, Version, u64)> {
        let mut tx = self.pool.begin().await?;
        // The row lock serializes writers in commit order (a waiting UPDATE
        // re-reads the row after the holder commits).
        let (hlc, seq): (i64, i64) =
            sqlx::query_as("SELECT hlc, seq FROM registry_meta WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        Ok((tx, Version(hlc as u64), seq as u64))
    }
}

/// A stored row before validation.
#[derive(sqlx::FromRow)]
struct Row {
    device_id: String,
    key_sha256: Vec<u8>,
    status: String,
    tags: String,
    created_at: i64,
    updated_at: i64,
    version: i64,
    origin: String,
    deleted: bool,
    seq: i64,
}

impl Row {
    fn into_record(self) -> Result<DeviceRecord> {
        let corrupt = |reason: String| RegistryError::Corrupt {
            device_id: self.device_id.clone(),
            reason,
        };
        let key: [u8; 32] = self
            .key_sha256
            .as_slice()
            .try_into()
            .map_err(|_| corrupt(format!("key_sha256 has {} bytes", self.key_sha256.len())))?;
        Ok(DeviceRecord {
            device_id: DeviceId::new(&self.device_id).map_err(|e| corrupt(e.to_string()))?,
            key_sha256: KeyHash(key),
            status: self.status.parse().map_err(corrupt)?,
            tags: Tags::from_stored(self.tags).map_err(|e| corrupt(e.to_string()))?,
            created_at: UnixMillis(self.created_at as u64),
            updated_at: UnixMillis(self.updated_at as u64),
            version: Version(self.version as u64),
            origin: Region::new(&self.origin).map_err(|e| corrupt(e.to_string()))?,
            deleted: self.deleted,
        })
    }
}

/// An open write transaction holding the registry clock.
pub struct SqlTx<DB: Database> {
    tx: Transaction<'static, DB>,
    wall: WallClock,
    hlc: Version,
    seq: u64,
    dirty: bool,
}

impl<DB: Database> fmt::Debug for SqlTx<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlTx")
            .field("hlc", &self.hlc)
            .field("seq", &self.seq)
            .finish()
    }
}

impl<DB: Database> SqlTx<DB> {
    fn next_version(&mut self) -> Result<Version> {
        let wall = (self.wall)();
        let next = hlc::tick(self.hlc, wall);
        if hlc::plausible(next, wall).is_err() {
            return Err(RegistryError::ClockAhead { clock: self.hlc });
        }
        self.hlc = next;
        self.dirty = true;
        Ok(next)
    }

    fn now(&self) -> UnixMillis {
        UnixMillis((self.wall)())
    }
}

fn head_of(
    (id, version, origin, deleted): (String, i64, String, bool),
) -> Result<(DeviceId, Head)> {
    let corrupt = |reason: String| RegistryError::Corrupt {
        device_id: id.clone(),
        reason,
    };
    let head = Head {
        version: Version(version as u64),
        origin: Region::new(&origin).map_err(|e| corrupt(e.to_string()))?,
        deleted,
    };
    Ok((
        DeviceId::new(&id).map_err(|e| corrupt(e.to_string()))?,
        head,
    ))
}

fn unknown_id(id: &DeviceId) -> RegistryError {
    RegistryError::NotFound(id.clone())
}

macro_rules! impl_store {
    ($db:ty, $backend:expr) => {
        impl SqlTx<$db> {
            async fn lock(store: &SqlStore<$db>) -> Result<Self> {
                let (tx, hlc, seq) = store.begin_write().await?;
                Ok(Self {
                    tx,
                    wall: store.wall.clone(),
                    hlc,
                    seq,
                    dirty: false,
                })
            }

            async fn fetch_existing(
                &mut self,
                ids: &[&DeviceId],
            ) -> Result<HashMap<DeviceId, DeviceRecord>> {
                let mut out = HashMap::with_capacity(ids.len());
                for chunk in ids.chunks(CHUNK) {
                    let mut qb = QueryBuilder::<$db>::new(SELECT_RECORD);
                    qb.push(" WHERE device_id IN (");
                    let mut sep = qb.separated(", ");
                    for id in chunk {
                        sep.push_bind(id.as_str().to_owned());
                    }
                    qb.push(")");
                    let rows: Vec<Row> = qb
                        .build_query_as()
                        .persistent(false)
                        .fetch_all(&mut *self.tx)
                        .await?;
                    for row in rows {
                        let rec = row.into_record()?;
                        out.insert(rec.device_id.clone(), rec);
                    }
                }
                Ok(out)
            }

            /// The merge heads of the stored records among `ids`.
            ///
            /// Sorted batches (every merge and export-file import) are read
            /// with one range scan, bounded so that a target much denser
            /// than the batch falls back to point lookups for the rest.
            async fn fetch_heads(&mut self, ids: &[&DeviceId]) -> Result<HashMap<DeviceId, Head>> {
                let mut out = HashMap::with_capacity(ids.len());
                let mut rest: &[&DeviceId] = ids;
                if ids.len() > 1 && ids.windows(2).all(|w| w[0] < w[1]) {
                    let limit = 2 * ids.len() as i64;
                    let (first, last) = (ids[0], ids[ids.len() - 1]);
                    let rows: Vec<(String, i64, String, bool)> = sqlx::query_as(
                        "SELECT device_id, version, origin, deleted FROM devices \
                         WHERE device_id >= $1 AND device_id <= $2 ORDER BY device_id LIMIT $3",
                    )
                    .bind(first.as_str().to_owned())
                    .bind(last.as_str().to_owned())
                    .bind(limit)
                    .fetch_all(&mut *self.tx)
                    .await?;
                    let full = rows.len() as i64 == limit;
                    let mut reached: Option<DeviceId> = None;
                    for row in rows {
                        let (id, head) = head_of(row)?;
                        reached = Some(id.clone());
                        out.insert(id, head);
                    }
                    rest = match (full, reached) {
                        // The scan stopped early: look up the ids past where it stopped.
                        (true, Some(r)) => &ids[ids.partition_point(|id| **id <= r)..],
                        _ => &[],
                    };
                }
                for chunk in rest.chunks(CHUNK) {
                    let mut qb = QueryBuilder::<$db>::new(
                        "SELECT device_id, version, origin, deleted FROM devices WHERE device_id IN (",
                    );
                    let mut sep = qb.separated(", ");
                    for id in chunk {
                        sep.push_bind(id.as_str().to_owned());
                    }
                    qb.push(")");
                    let rows: Vec<(String, i64, String, bool)> = qb
                        .build_query_as()
                        .persistent(false)
                        .fetch_all(&mut *self.tx)
                        .await?;
                    for row in rows {
                        let (id, head) = head_of(row)?;
                        out.insert(id, head);
                    }
                }
                Ok(out)
            }

            /// Writes records that win the merge rule, each with a new change
            /// sequence. Returns the number of rows written.
            async fn write(&mut self, records: &[&DeviceRecord]) -> Result<u64> {
                let mut written = 0;
                for chunk in records.chunks(CHUNK) {
                    let mut qb = QueryBuilder::<$db>::new(
                        "INSERT INTO devices (device_id, key_sha256, status, tags, created_at, \
                         updated_at, version, origin, deleted, seq) ",
                    );
                    let first_seq = self.seq;
                    qb.push_values(chunk.iter().enumerate(), |mut b, (i, r)| {
                        b.push_bind(r.device_id.as_str().to_owned())
                            .push_bind(r.key_sha256.0.to_vec())
                            .push_bind(r.status.as_str())
                            .push_bind(r.tags.as_json().to_owned())
                            .push_bind(r.created_at.0 as i64)
                            .push_bind(r.updated_at.0 as i64)
                            .push_bind(r.version.0 as i64)
                            .push_bind(r.origin.as_str().to_owned())
                            .push_bind(r.deleted)
                            .push_bind((first_seq + 1 + i as u64) as i64);
                    });
                    qb.push(
                        " ON CONFLICT (device_id) DO UPDATE SET key_sha256 = excluded.key_sha256, \
                         status = excluded.status, tags = excluded.tags, \
                         created_at = excluded.created_at, updated_at = excluded.updated_at, \
                         version = excluded.version, origin = excluded.origin, \
                         deleted = excluded.deleted, seq = excluded.seq \
                         WHERE excluded.version > devices.version \
                            OR (excluded.version = devices.version AND excluded.origin > devices.origin)",
                    );
                    let res = qb.build().persistent(false).execute(&mut *self.tx).await?;
                    written += res.rows_affected();
                    self.seq += chunk.len() as u64;
                    for r in chunk.iter() {
                        self.hlc = hlc::observe(self.hlc, r.version);
                    }
                    self.dirty = true;
                }
                Ok(written)
            }

            async fn finish(mut self) -> Result<()> {
                if self.dirty {
                    sqlx::query("UPDATE registry_meta SET hlc = $1, seq = $2 WHERE id = 1")
                        .bind(self.hlc.0 as i64)
                        .bind(self.seq as i64)
                        .execute(&mut *self.tx)
                        .await?;
                }
                self.tx.commit().await?;
                Ok(())
            }

            async fn write_one(mut self, rec: DeviceRecord) -> Result<DeviceRecord> {
                let n = self.write(&[&rec]).await?;
                if n != 1 {
                    // Rolled back when `self` drops.
                    return Err(RegistryError::NotApplied(rec.device_id));
                }
                self.finish().await?;
                Ok(rec)
            }

            async fn live(&mut self, id: &DeviceId) -> Result<DeviceRecord> {
                self.fetch_existing(&[id])
                    .await?
                    .remove(id)
                    .filter(|r| !r.deleted)
                    .ok_or_else(|| unknown_id(id))
            }
        }

        #[async_trait]
        impl ApplyTx for SqlTx<$db> {
            async fn apply(&mut self, batch: &[DeviceRecord]) -> Result<Vec<Outcome>> {
                let wall = (self.wall)();
                for rec in batch {
                    hlc::plausible(rec.version, wall).map_err(|reason| {
                        RegistryError::ImplausibleVersion {
                            device_id: rec.device_id.clone(),
                            reason,
                        }
                    })?;
                }
                let ids: Vec<&DeviceId> = batch.iter().map(|r| &r.device_id).collect();
                let mut current = self.fetch_heads(&ids).await?;
                let mut latest: HashMap<&DeviceId, &DeviceRecord> = HashMap::new();
                let mut outcomes = Vec::with_capacity(batch.len());
                for rec in batch {
                    let head = Head::of(rec);
                    let outcome = decide(current.get(&rec.device_id), &head);
                    if outcome.changes() {
                        current.insert(rec.device_id.clone(), head);
                        latest.insert(&rec.device_id, rec);
                    }
                    outcomes.push(outcome);
                }
                // The final record of every id that changed (a batch may name an id twice).
                let changed: Vec<&DeviceRecord> = latest.into_values().collect();
                self.write(&changed).await?;
                for rec in batch {
                    self.hlc = hlc::observe(self.hlc, rec.version);
                }
                Ok(outcomes)
            }

            async fn compare(&mut self, heads: &[(DeviceId, Head)]) -> Result<Vec<Outcome>> {
                let ids: Vec<&DeviceId> = heads.iter().map(|(id, _)| id).collect();
                let mut current = self.fetch_heads(&ids).await?;
                let mut outcomes = Vec::with_capacity(heads.len());
                for (id, head) in heads {
                    let outcome = decide(current.get(id), head);
                    if outcome.changes() {
                        current.insert(id.clone(), head.clone());
                    }
                    outcomes.push(outcome);
                }
                Ok(outcomes)
            }

            async fn set_follow_watermark(&mut self, source: &str, seq: Seq) -> Result<()> {
                sqlx::query(
                    "INSERT INTO registry_follow (source_id, seq, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (source_id) DO UPDATE SET seq = excluded.seq, \
                     updated_at = excluded.updated_at",
                )
                .bind(source.to_owned())
                .bind(seq.0 as i64)
                .bind(self.now().0 as i64)
                .execute(&mut *self.tx)
                .await?;
                Ok(())
            }

            async fn commit(self: Box<Self>) -> Result<()> {
                (*self).finish().await
            }

            async fn rollback(self: Box<Self>) -> Result<()> {
                self.tx.rollback().await?;
                Ok(())
            }
        }

        #[async_trait]
        impl RegistryStore for SqlStore<$db> {
            fn backend(&self) -> Backend {
                $backend
            }

            async fn region(&self) -> Result<Option<Region>> {
                let (region,): (Option<String>,) =
                    sqlx::query_as("SELECT region FROM registry_meta WHERE id = 1")
                        .fetch_one(&self.pool)
                        .await?;
                region
                    .map(|r| {
                        Region::new(&r).map_err(|e| RegistryError::Corrupt {
                            device_id: String::new(),
                            reason: format!("registry region: {e}"),
                        })
                    })
                    .transpose()
            }

            async fn claim_region(&self, region: &Region) -> Result<()> {
                sqlx::query("UPDATE registry_meta SET region = $1 WHERE id = 1 AND region IS NULL")
                    .bind(region.as_str().to_owned())
                    .execute(&self.pool)
                    .await?;
                match self.region().await? {
                    Some(r) if &r == region => Ok(()),
                    Some(r) => Err(RegistryError::RegionMismatch {
                        registry: r,
                        given: region.clone(),
                    }),
                    None => Err(RegistryError::NoRegion),
                }
            }

            async fn store_id(&self) -> Result<String> {
                let fresh = format!("{:032x}", rand::random::<u128>());
                sqlx::query("UPDATE registry_meta SET store_id = $1 WHERE id = 1 AND store_id IS NULL")
                    .bind(fresh)
                    .execute(&self.pool)
                    .await?;
                let (id,): (String,) =
                    sqlx::query_as("SELECT store_id FROM registry_meta WHERE id = 1")
                        .fetch_one(&self.pool)
                        .await?;
                Ok(id)
            }

            async fn create(&self, devices: Vec<NewDevice>) -> Result<Vec<DeviceRecord>> {
                let region = self.region().await?.ok_or(RegistryError::NoRegion)?;
                let mut tx = SqlTx::<$db>::lock(self).await?;
                let ids: Vec<&DeviceId> = devices.iter().map(|d| &d.device_id).collect();
                let existing = tx.fetch_heads(&ids).await?;
                let mut seen = std::collections::HashSet::with_capacity(ids.len());
                for id in &ids {
                    let live = existing.get(*id).is_some_and(|h| !h.deleted);
                    if live || !seen.insert(*id) {
                        return Err(RegistryError::AlreadyExists((*id).clone()));
                    }
                }
                let now = tx.now();
                let mut records: Vec<DeviceRecord> = Vec::with_capacity(devices.len());
                for d in devices {
                    records.push(DeviceRecord {
                        device_id: d.device_id,
                        key_sha256: d.key_sha256,
                        status: d.status,
                        tags: d.tags,
                        created_at: now,
                        updated_at: now,
                        version: tx.next_version()?,
                        origin: region.clone(),
                        deleted: false,
                    });
                }
                let refs: Vec<&DeviceRecord> = records.iter().collect();
                let n = tx.write(&refs).await?;
                if n != records.len() as u64 {
                    // Rolled back when `tx` drops.
                    return Err(RegistryError::NotApplied(records[0].device_id.clone()));
                }
                tx.finish().await?;
                Ok(records)
            }

            async fn update(&self, id: &DeviceId, patch: Patch) -> Result<DeviceRecord> {
                let region = self.region().await?.ok_or(RegistryError::NoRegion)?;
                let mut tx = SqlTx::<$db>::lock(self).await?;
                let mut rec = tx.live(id).await?;
                let Patch {
                    status,
                    tags,
                    key_sha256,
                } = patch;
                if let Some(s) = status {
                    rec.status = s;
                }
                if let Some(t) = tags {
                    rec.tags = t;
                }
                if let Some(k) = key_sha256 {
                    rec.key_sha256 = k;
                }
                rec.version = tx.next_version()?;
                rec.updated_at = tx.now();
                rec.origin = region;
                tx.write_one(rec).await
            }

            async fn remove(&self, id: &DeviceId) -> Result<DeviceRecord> {
                let region = self.region().await?.ok_or(RegistryError::NoRegion)?;
                let mut tx = SqlTx::<$db>::lock(self).await?;
                let mut rec = tx.live(id).await?;
                rec.deleted = true;
                rec.status = DeviceStatus::Disabled;
                rec.tags = Tags::default();
                rec.version = tx.next_version()?;
                rec.updated_at = tx.now();
                rec.origin = region;
                tx.write_one(rec).await
            }

            async fn get(&self, id: &DeviceId) -> Result<Option<DeviceRecord>> {
                let row: Option<Row> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_RECORD} WHERE device_id = $1")))
                        .bind(id.as_str().to_owned())
                        .fetch_optional(&self.pool)
                        .await?;
                row.map(Row::into_record).transpose()
            }

            async fn verify(&self, id: &DeviceId, key: &DeviceKey) -> Result<AuthOutcome> {
                let row: Option<(Vec<u8>, String, bool)> = sqlx::query_as(
                    "SELECT key_sha256, status, deleted FROM devices WHERE device_id = $1",
                )
                .bind(id.as_str().to_owned())
                .fetch_optional(&self.pool)
                .await?;
                let Some((hash, status, deleted)) = row else {
                    // Same work as a known device, so timing does not reveal which ids exist.
                    let _ = KeyHash([0; 32]).matches(key);
                    return Ok(AuthOutcome::Unknown);
                };
                let stored = KeyHash(hash.as_slice().try_into().map_err(|_| {
                    RegistryError::Corrupt {
                        device_id: id.to_string(),
                        reason: "key_sha256 is not 32 bytes".into(),
                    }
                })?);
                Ok(if deleted {
                    AuthOutcome::Unknown
                } else if !stored.matches(key) {
                    AuthOutcome::WrongKey
                } else if status == "enabled" {
                    AuthOutcome::Enabled
                } else {
                    AuthOutcome::Disabled
                })
            }

            fn scan(&self) -> BoxStream<'_, Result<DeviceRecord>> {
                sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(format!(
                    "{SELECT_RECORD} ORDER BY device_id"
                )))
                .fetch(&self.pool)
                .map(|row| row.map_err(RegistryError::from).and_then(Row::into_record))
                .boxed()
            }

            fn scan_heads(&self) -> BoxStream<'_, Result<(DeviceId, Head)>> {
                sqlx::query_as::<_, (String, i64, String, bool)>(
                    "SELECT device_id, version, origin, deleted FROM devices ORDER BY device_id",
                )
                .fetch(&self.pool)
                .map(|row| row.map_err(RegistryError::from).and_then(head_of))
                .boxed()
            }

            async fn get_many(&self, ids: &[DeviceId]) -> Result<Vec<DeviceRecord>> {
                let mut out = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(CHUNK) {
                    let mut qb = QueryBuilder::<$db>::new(SELECT_RECORD);
                    qb.push(" WHERE device_id IN (");
                    let mut sep = qb.separated(", ");
                    for id in chunk {
                        sep.push_bind(id.as_str().to_owned());
                    }
                    qb.push(")");
                    let rows: Vec<Row> = qb.build_query_as().persistent(false).fetch_all(&self.pool).await?;
                    for row in rows {
                        out.push(row.into_record()?);
                    }
                }
                Ok(out)
            }

            async fn changes_since(
                &self,
                after: Seq,
                limit: u32,
            ) -> Result<Vec<(Seq, DeviceRecord)>> {
                let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "{SELECT_RECORD} WHERE seq > $1 ORDER BY seq LIMIT $2"
                )))
                .bind(after.0 as i64)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter()
                    .map(|r| {
                        let seq = Seq(r.seq as u64);
                        r.into_record().map(|rec| (seq, rec))
                    })
                    .collect()
            }

            async fn max_seq(&self) -> Result<Seq> {
                let (seq,): (i64,) = sqlx::query_as("SELECT seq FROM registry_meta WHERE id = 1")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(Seq(seq as u64))
            }

            async fn counts(&self) -> Result<Counts> {
                let (devices,): (i64,) =
                    sqlx::query_as("SELECT COUNT(*) FROM devices WHERE NOT deleted")
                        .fetch_one(&self.pool)
                        .await?;
                let (tombstones,): (i64,) =
                    sqlx::query_as("SELECT COUNT(*) FROM devices WHERE deleted")
                        .fetch_one(&self.pool)
                        .await?;
                Ok(Counts {
                    devices: devices as u64,
                    tombstones: tombstones as u64,
                })
            }

            async fn begin_apply(&self) -> Result<Box<dyn ApplyTx>> {
                Ok(Box::new(SqlTx::<$db>::lock(self).await?))
            }

            async fn close(&self) {
                self.pool.close().await;
            }

            async fn follow_watermark(&self, source: &str) -> Result<Seq> {
                let row: Option<(i64,)> =
                    sqlx::query_as("SELECT seq FROM registry_follow WHERE source_id = $1")
                        .bind(source.to_owned())
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(Seq(row.map_or(0, |(s,)| s as u64)))
            }
        }
    };
}

impl_store!(Sqlite, Backend::Sqlite);
impl_store!(Postgres, Backend::Postgres);
