//! Connecting to PostgreSQL: the pool, migrations, the self-started cluster, the BEGIN of a
//! writer, and what a database error means for whoever must decide what to do next.

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::DatabaseArgs;
use crate::local_pg::{Durability, LocalPostgres};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The database the process talks to, and the local cluster behind it if we started one.
#[derive(Debug)]
pub(crate) struct Database {
    pub url: String,
    pub local: Option<LocalPostgres>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    LocalPg(#[from] crate::local_pg::LocalPgError),
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error(
        "PostgreSQL {found} is too old: the service needs PostgreSQL {MIN_SERVER_VERSION} or newer \
         (its migrations use features of 13)"
    )]
    TooOld { found: String },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl Database {
    /// `DATABASE_URL` when given; otherwise the local cluster under the data directory, started
    /// (and created) when needed, with an `inventory` database in it.
    pub(crate) async fn locate(args: &DatabaseArgs) -> Result<Self, SetupError> {
        if let Some(url) = &args.database_url {
            return Ok(Self { url: url.clone(), local: None });
        }
        let dir = args.data_dir.clone();
        let local = tokio::task::spawn_blocking(move || LocalPostgres::start(&dir, Durability::Durable)).await??;
        ensure_database(&local.url("postgres"), "inventory").await?;
        Ok(Self { url: local.url("inventory"), local: Some(local) })
    }

    /// Stops the local cluster, if this process runs one. `owner` (the service) stops it even
    /// when it attached to a running one; a one-off command (check, import, migrate) stops only a
    /// cluster it started itself, never the one a running service is using.
    pub(crate) async fn shutdown(self, owner: bool) {
        if let Some(local) = self.local.filter(|l| owner || l.launched()) {
            match tokio::task::spawn_blocking(move || local.stop()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!(error = %err, "stopping local PostgreSQL failed"),
                Err(err) => tracing::warn!(error = %err, "stopping local PostgreSQL panicked"),
            }
        }
    }
}

/// Creates `name` on the server behind `admin_url` unless it exists.
pub async fn ensure_database(admin_url: &str, name: &str) -> Result<(), SetupError> {
    let pool = PgPoolOptions::new().max_connections(1).connect(admin_url).await.map_err(SetupError::Connect)?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&pool)
        .await
        .map_err(SetupError::Connect)?;
    if !exists {
        // Identifiers cannot be bound as parameters; `name` is ours, never user input.
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', ""));
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await.map_err(SetupError::Connect)?;
    }
    pool.close().await;
    Ok(())
}

/// The oldest PostgreSQL major version the migrations run on.
pub const MIN_SERVER_VERSION: u32 = 13;

/// Builds the pool, and refuses a server older than [`MIN_SERVER_VERSION`]. Every session gets
/// `lock_timeout` and `statement_timeout`, so a stuck row lock turns into a fast 503 for that row
/// instead of a hung pool.
pub async fn connect(url: &str, args: &DatabaseArgs) -> Result<PgPool, SetupError> {
    let options = connect_options(url, args)?;
    let pool = PgPoolOptions::new()
        .max_connections(args.db_pool_size.max(1))
        .min_connections(0)
        .acquire_timeout(args.acquire_timeout())
        .idle_timeout(Some(Duration::from_secs(300)))
        .connect_with(options)
        .await
        .map_err(SetupError::Connect)?;
    let (number, found): (String, String) =
        sqlx::query_as("SELECT current_setting('server_version_num'), current_setting('server_version')")
            .fetch_one(&pool)
            .await
            .map_err(SetupError::Connect)?;
    if number.parse::<u32>().unwrap_or(0) < MIN_SERVER_VERSION * 10_000 {
        return Err(SetupError::TooOld { found });
    }
    Ok(pool)
}

/// The server of `url`, with the session settings every connection of the service gets.
pub(crate) fn connect_options(url: &str, args: &DatabaseArgs) -> Result<PgConnectOptions, SetupError> {
    let lock_timeout = format!("{}ms", args.db_lock_timeout_ms);
    let statement_timeout = format!("{}ms", args.db_statement_timeout_ms);
    Ok(PgConnectOptions::from_str(url)
        .map_err(SetupError::Connect)?
        .application_name("inventory")
        .options([("lock_timeout", lock_timeout.as_str()), ("statement_timeout", statement_timeout.as_str())]))
}

/// BEGIN for a transaction that may write ledger entries: it announces itself as a writer (a
/// shared advisory lock, taken right after BEGIN, before it has a transaction id), so readers of
/// the ledger wait for it and for nobody else (see `writer_horizon()` in migrations 0006, 0007).
pub(crate) async fn begin_writer(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock_shared(7041, 2)").execute(&mut *tx).await?;
    Ok(tx)
}

/// Lowers this transaction's `lock_timeout` to `limit` (a configured shorter one stays).
pub(crate) async fn cap_lock_timeout(conn: &mut sqlx::PgConnection, limit: Duration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT set_config('lock_timeout',
             CASE WHEN s = '0' OR s::interval > make_interval(secs => $1) THEN ($1 * 1000)::int8 || 'ms' ELSE s END,
             true)
           FROM current_setting('lock_timeout') AS s",
    )
    .bind(limit.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(())
}

/// What a database error means for whoever must decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trouble {
    /// A serialization failure or deadlock: run the whole transaction again.
    Retry,
    /// A lock or statement timeout: this row (or statement) is stuck, others are fine.
    Busy,
    /// The database cannot be reached: connection refused or broken, pool exhausted, shutting down.
    Down,
    /// Anything else: a bug or a broken constraint.
    Other,
}

/// Classifies a database error.
pub(crate) fn trouble(err: &sqlx::Error) -> Trouble {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Trouble::Down,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // serialization_failure, deadlock_detected
            Some("40001" | "40P01") => Trouble::Retry,
            // lock_not_available, query_canceled (statement_timeout)
            Some("55P03" | "57014") => Trouble::Busy,
            // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections
            Some("57P01" | "57P02" | "57P03" | "53300") => Trouble::Down,
            Some(code) if code.starts_with("08") => Trouble::Down,
            _ => Trouble::Other,
        },
        _ => Trouble::Other,
    }
}

/// The newest migration applied successfully (`None`: none yet).
pub(crate) async fn applied_migration(db: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success").fetch_one(db).await
}
