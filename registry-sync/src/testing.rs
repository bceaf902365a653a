//! Throwaway PostgreSQL databases on the machine's server, for tests and
//! benchmarks.
//!
//! Every test gets a fresh database (`CREATE DATABASE`), dropped when the
//! guard goes out of scope. The server is the one `scripts/services.sh`
//! starts; a test that cannot reach it fails loudly instead of skipping.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

/// The admin URL of the test server; override with `FLEET_TEST_PG`.
pub fn admin_url() -> String {
    std::env::var("FLEET_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database that exists for as long as this guard.
#[derive(Debug)]
pub struct TempPg {
    name: String,
    url: String,
}

impl TempPg {
    /// Creates a fresh, empty database.
    ///
    /// # Panics
    /// When PostgreSQL is not reachable: tests needing it must not pass silently.
    pub async fn new() -> TempPg {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "fleet_t_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let admin = admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL is not reachable at {admin} ({e}); run scripts/services.sh")
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        TempPg { name, url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TempPg {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime; use a private one on a thread.
        let dropper = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        });
        let _ = dropper.join();
    }
}
