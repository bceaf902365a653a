//! The reference handler: telemetry into a SQL table (PostgreSQL or SQLite)
//! with an insert that ignores rows it already holds, so that the
//! at-least-once delivery of the consumer has an exactly-once effect.
//!
//! A record is identified twice: by `(device_id, mid)` — the device's own
//! sequence, which also catches a message a device re-sent to the other
//! region after a failover — and by `(partition_id, log_offset, epoch)` for
//! publishes without a `mid`. `ON CONFLICT DO NOTHING` without a target
//! skips a row that collides with either.

use std::fmt::Write as _;

use async_trait::async_trait;
use fleet_api::hub::WireRecord;
use sqlx::{AnyPool, Row};

use super::store::{Backend, StoreError, connect};
use super::{Handler, HandlerError};

/// Rows per INSERT statement (8 parameters each; far below SQLite's limit).
const ROWS_PER_STATEMENT: usize = 500;

/// A table of telemetry records.
#[derive(Clone, Debug)]
pub struct SqlSink {
    pool: AnyPool,
    table: String,
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
        let (pool, backend) = connect(url, 8).await?;
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
        let mut conn = pool.acquire().await?;
        if backend == Backend::Postgres {
            // Two instances starting together race on the catalog.
            sqlx::query("SELECT pg_advisory_lock(727275)")
                .execute(&mut *conn)
                .await?;
        }
        // The table name is validated above; values are bound.
        let created = sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&mut *conn)
            .await;
        if backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_unlock(727275)")
                .execute(&mut *conn)
                .await?;
        }
        created?;
        drop(conn);
        Ok(SqlSink {
            pool,
            table: table.to_string(),
        })
    }

    /// Rows in the table (for reports and tests).
    ///
    /// # Errors
    /// Database errors.
    pub async fn count(&self) -> Result<u64, sqlx::Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {}",
            self.table
        )))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>(0)?.max(0) as u64)
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
        let mut tx = self.pool.begin().await.map_err(classify)?;
        for chunk in batch.chunks(ROWS_PER_STATEMENT) {
            let sql = self.insert_sql(chunk.len());
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.device_id.as_str().to_string())
                    .bind(r.mid.map(|m| m.0 as i64))
                    .bind(i64::from(r.partition.0))
                    .bind(r.offset.0 as i64)
                    .bind(r.epoch.0 as i64)
                    .bind(r.region.as_str().to_string())
                    .bind(r.enqueued_at.0 as i64)
                    .bind(r.payload.clone());
            }
            q.execute(&mut *tx).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }

    async fn check(&self) -> Result<(), HandlerError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(classify)
    }
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
