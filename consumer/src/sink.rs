//! The reference handler: telemetry into a SQL table (PostgreSQL or SQLite)
//! with an insert that ignores rows it already holds, so that the
//! at-least-once delivery of the consumer has an exactly-once effect.
//!
//! A record is identified twice: by `(device_id, mid)` — the device's own
//! sequence, which also catches a message a device re-sent to the other
//! region after a failover — and by `(partition_id, log_offset, epoch)` for
//! publishes without a `mid`. `ON CONFLICT DO NOTHING` without a target
//! skips a row that collides with either.
//!
//! On PostgreSQL a batch is one `INSERT … SELECT FROM UNNEST(arrays)` through
//! the native driver: eight array parameters whatever the batch size, so the
//! statement is prepared once and each batch is a single round trip. SQLite
//! takes multi-row `VALUES` through the `Any` driver.

use std::fmt::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use fleet_api::hub::WireRecord;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AnyPool, Row};

use crate::store::{Backend, StoreError, connect};
use crate::{Handler, HandlerError};

/// Rows per SQLite INSERT statement (8 parameters each; far below SQLite's limit).
const ROWS_PER_STATEMENT: usize = 500;

/// A table of telemetry records.
#[derive(Clone, Debug)]
pub struct SqlSink {
    db: Db,
    table: String,
}

/// The connection pool, by backend.
#[derive(Clone, Debug)]
enum Db {
    Postgres(PgPool),
    Sqlite(AnyPool),
}

/// Errors of opening the sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "sink table name {0:?}: use letters, digits and _ (at most 63, not starting with a digit)"
    )]
    Table(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("sink: {0}")]
    Sql(#[from] sqlx::Error),
}

impl SqlSink {
    /// Connects to `url` and creates `table` when missing.
    ///
    /// # Errors
    /// Bad table name, URL or database.
    pub async fn open(url: &str, table: &str) -> Result<SqlSink, SinkError> {
        let valid = !table.is_empty()
            && table.len() <= 63
            && !table.starts_with(|c: char| c.is_ascii_digit())
            && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(SinkError::Table(table.to_string()));
        }
        let backend = Backend::of(url)?;
        let db = match backend {
            Backend::Postgres => Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(url)
                    .await?,
            ),
            Backend::Sqlite => Db::Sqlite(connect(url, 8).await?.0),
        };
        let (int, blob) = match backend {
            Backend::Sqlite => ("INTEGER", "BLOB"),
            Backend::Postgres => ("BIGINT", "BYTEA"),
        };
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
             device_id TEXT NOT NULL, mid {int}, partition_id {int} NOT NULL, \
             log_offset {int} NOT NULL, epoch {int} NOT NULL, region TEXT NOT NULL, \
             enqueued_at {int} NOT NULL, payload {blob} NOT NULL, \
             UNIQUE (device_id, mid), UNIQUE (partition_id, log_offset, epoch))"
        );
        // The table name is validated above; values are bound.
        let ddl = sqlx::AssertSqlSafe(ddl);
        match &db {
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                // Two instances starting together race on the catalog.
                sqlx::query("SELECT pg_advisory_lock(727275)")
                    .execute(&mut *conn)
                    .await?;
                let created = sqlx::query(ddl).execute(&mut *conn).await;
                sqlx::query("SELECT pg_advisory_unlock(727275)")
                    .execute(&mut *conn)
                    .await?;
                created?;
            }
            Db::Sqlite(pool) => {
                sqlx::query(ddl).execute(pool).await?;
            }
        }
        Ok(SqlSink {
            db,
            table: table.to_string(),
        })
    }

    /// Rows in the table (for reports and tests).
    ///
    /// # Errors
    /// Database errors.
    pub async fn count(&self) -> Result<u64, sqlx::Error> {
        let sql = format!("SELECT COUNT(*) FROM {}", self.table);
        let n: i64 = match &self.db {
            Db::Postgres(pool) => sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_one(pool)
                .await?
                .try_get(0)?,
            Db::Sqlite(pool) => sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_one(pool)
                .await?
                .try_get(0)?,
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// PostgreSQL: the whole batch as eight arrays.
    async fn insert_unnest(&self, pool: &PgPool, batch: &[WireRecord]) -> Result<(), sqlx::Error> {
        let n = batch.len();
        let mut devices = Vec::with_capacity(n);
        let mut mids = Vec::with_capacity(n);
        let mut partitions = Vec::with_capacity(n);
        let mut offsets = Vec::with_capacity(n);
        let mut epochs = Vec::with_capacity(n);
        let mut regions = Vec::with_capacity(n);
        let mut enqueued = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        for r in batch {
            devices.push(r.device_id.as_str());
            mids.push(r.mid.map(|m| sql_int(m.0)));
            partitions.push(i64::from(r.partition.0));
            offsets.push(sql_int(r.offset.0));
            epochs.push(sql_int(r.epoch.0));
            regions.push(r.region.as_str());
            enqueued.push(sql_int(r.enqueued_at.0));
            payloads.push(r.payload.as_slice());
        }
        let sql = format!(
            "INSERT INTO {} (device_id, mid, partition_id, log_offset, epoch, region, enqueued_at, payload) \
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::text[], $7::int8[], $8::bytea[]) \
             ON CONFLICT DO NOTHING",
            self.table
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(devices)
            .bind(mids)
            .bind(partitions)
            .bind(offsets)
            .bind(epochs)
            .bind(regions)
            .bind(enqueued)
            .bind(payloads)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// SQLite: multi-row `VALUES` in one transaction.
    async fn insert_values(&self, pool: &AnyPool, batch: &[WireRecord]) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        for chunk in batch.chunks(ROWS_PER_STATEMENT) {
            let sql = self.insert_sql(chunk.len());
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.device_id.as_str().to_string())
                    .bind(r.mid.map(|m| sql_int(m.0)))
                    .bind(i64::from(r.partition.0))
                    .bind(sql_int(r.offset.0))
                    .bind(sql_int(r.epoch.0))
                    .bind(r.region.as_str().to_string())
                    .bind(sql_int(r.enqueued_at.0))
                    .bind(r.payload.clone());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    fn insert_sql(&self, rows: usize) -> String {
        let mut sql = format!(
            "INSERT INTO {} (device_id, mid, partition_id, log_offset, epoch, region, enqueued_at, payload) VALUES ",
            self.table
        );
        for r in 0..rows {
            let b = r * 8;
            let sep = if r == 0 { "" } else { ", " };
            let _ = write!(
                sql,
                "{sep}(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8
            );
        }
        sql.push_str(" ON CONFLICT DO NOTHING");
        sql
    }
}

#[async_trait]
impl Handler for SqlSink {
    async fn handle(&self, batch: &[WireRecord]) -> Result<(), HandlerError> {
        match &self.db {
            Db::Postgres(pool) => self.insert_unnest(pool, batch).await,
            Db::Sqlite(pool) => self.insert_values(pool, batch).await,
        }
        .map_err(classify)
    }

    async fn check(&self) -> Result<(), HandlerError> {
        match &self.db {
            Db::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
            Db::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
        }
        .map_err(classify)
    }
}

/// SQL has no unsigned 64-bit integer: values above `i64::MAX` are stored as
/// their two's complement (the same bits), as the store does.
fn sql_int(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// Connection trouble means "try again later"; anything else is about the
/// rows.
pub fn classify(e: sqlx::Error) -> HandlerError {
    let unavailable = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: connection (08), resources (53), operator
            // intervention such as a shutdown (57), rollback (40).
            ["08", "53", "57", "40"].iter().any(|c| code.starts_with(c))
                // SQLite: busy, locked, I/O error, disk full, cannot open.
                || ["5", "6", "10", "13", "14"].contains(&code.as_ref())
                || code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14))
        }
        _ => false,
    };
    if unavailable {
        HandlerError::Unavailable(e.to_string())
    } else {
        HandlerError::Record(e.to_string())
    }
}
