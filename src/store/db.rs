//! Connecting to PostgreSQL: the pool, migrations, the self-started cluster, the BEGIN of a
//! writer, and what a database error means for whoever must decide what to do next.

use std::str::FromStr;
use std::time::{Duration, Instant};

use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use crate::config::{DatabaseArgs, Pooler};
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
         (its migrations use features of 15: UNIQUE NULLS NOT DISTINCT)"
    )]
    TooOld { found: String },
    #[error(
        "the database schema is not current (at migration {applied:?}, this binary needs {latest}), and \
         migrations cannot run through a transaction pooler: run `inventory migrate` with a DATABASE_URL \
         straight to PostgreSQL, without --database-pooler"
    )]
    NotMigrated { applied: Option<i64>, latest: i64 },
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
        ensure_database(&local.socket_url("postgres"), "inventory").await?;
        Ok(Self { url: local.socket_url("inventory"), local: Some(local) })
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
pub const MIN_SERVER_VERSION: u32 = 15;

/// The service's connections to PostgreSQL, and how a transaction begins on them.
///
/// Behind a transaction pooler (`--database-pooler transaction`, PgBouncer's
/// `pool_mode = transaction`) a server session belongs to the service for one transaction only,
/// so nothing may outlive a transaction: no session settings (the timeouts are set in every
/// transaction instead of as startup options), no prepared statement kept between transactions
/// (the statement cache is off), and no statement outside a transaction — sqlx sends a statement
/// with parameters in two round trips (Parse, Sync; Bind, Execute, Sync), and the pooler may hand
/// the second one to another server session, which does not have the statement. [`Db::acquire`]
/// therefore hands out a transaction there, and [`Db::begin`] starts every transaction by
/// dropping the prepared statements earlier clients of that server session left behind (sqlx
/// names its statements per connection, so another client's `sqlx_s_1` would collide with ours).
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
    /// Behind a transaction pooler: the statements every BEGIN sends along.
    pooled: Option<Arc<str>>,
    /// When a connection of `pool` was last found lost.
    lost: Arc<LostMark>,
}

/// A connection for statements that need no transaction of their own (reads): the pooled
/// connection itself, or behind a transaction pooler a transaction, rolled back when dropped.
pub(crate) enum Conn {
    Session(PoolConnection<Postgres>),
    Transaction(Transaction<'static, Postgres>),
}

impl std::ops::Deref for Conn {
    type Target = sqlx::PgConnection;

    fn deref(&self) -> &Self::Target {
        match self {
            Self::Session(conn) => conn,
            Self::Transaction(tx) => tx,
        }
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Self::Session(conn) => conn,
            Self::Transaction(tx) => tx,
        }
    }
}

/// A pool built elsewhere (tests, tools), used directly: no pooler in between.
impl From<PgPool> for Db {
    fn from(pool: PgPool) -> Self {
        Self { pool, pooled: None, lost: Arc::default() }
    }
}

impl Db {
    /// The pool itself, for what the pooler setting does not concern (its statistics, closing it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether a transaction pooler stands in between (`--database-pooler transaction`).
    pub fn pooled(&self) -> bool {
        self.pooled.is_some()
    }

    /// Whether `err` says its connection is gone rather than anything about the statement (the
    /// server session ended, the socket broke). If so, every connection of the pool that went
    /// idle before now is tried before it is handed out again: what ended this one's session
    /// may have ended theirs (a restart, `pg_terminate_backend` of them all), and a statement
    /// run again after this must not meet the next one of them.
    pub(crate) fn lost(&self, err: &sqlx::Error) -> bool {
        let lost = match err {
            sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
            // admin_shutdown (`pg_terminate_backend` too), crash_shutdown
            sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("57P01" | "57P02")),
            _ => false,
        };
        if lost {
            *self.lost.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        lost
    }

    /// BEGIN (and behind a transaction pooler this transaction's timeouts).
    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.begin_as("").await
    }

    /// BEGIN with transaction modes (`ISOLATION LEVEL …`, `READ ONLY`; ours, never user input).
    pub(crate) async fn begin_as(&self, modes: &'static str) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.begin_then(modes, "").await
    }

    /// BEGIN with `modes`, then `then` (statements of ours, never user input), all in one
    /// message: one round trip, whatever the transaction sets up first.
    async fn begin_then(&self, modes: &str, then: &str) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let begin = format!("BEGIN {modes}");
        let parts = [begin.trim_end(), self.pooled.as_deref().unwrap_or(""), then];
        let sql = parts.iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join("; ");
        self.once_more_if_lost(|| async {
            if sql == "BEGIN" {
                self.pool.begin().await
            } else {
                self.pool.begin_with(sqlx::AssertSqlSafe(sql.clone())).await
            }
        })
        .await
    }

    /// Runs `op`, and once more (on another connection) when it finds its connection lost
    /// ([`Db::lost`]): for what changes nothing unless it gets past its first statement, a BEGIN
    /// or a read.
    pub(crate) async fn once_more_if_lost<T, F, Fut>(&self, op: F) -> Result<T, sqlx::Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        match op().await {
            Err(err) if self.lost(&err) => {
                tracing::debug!(error = %err, "a pooled connection was lost; running again on another");
                op().await
            }
            other => other,
        }
    }

    /// A connection for reads (see [`Conn`]), tried first (one round trip): a read that fails
    /// on a lost connection is not run again. One found lost is replaced ([`Db::lost`]).
    pub(crate) async fn acquire(&self) -> Result<Conn, sqlx::Error> {
        if self.pooled.is_some() {
            // A transaction, whose BEGIN runs again on another connection when it finds its own lost.
            return self.acquire_untried().await;
        }
        let mut conn = self.pool.acquire().await?;
        match sqlx::Connection::ping(&mut *conn).await {
            Ok(()) => Ok(Conn::Session(conn)),
            Err(err) if self.lost(&err) => Ok(Conn::Session(self.pool.acquire().await?)),
            Err(err) => Err(err),
        }
    }

    /// [`Db::acquire`] without trying the connection first, for a read that runs again when its
    /// connection turns out lost ([`Reads::run`](super::replica::Reads::run)).
    pub(crate) async fn acquire_untried(&self) -> Result<Conn, sqlx::Error> {
        if self.pooled.is_some() {
            Ok(Conn::Transaction(self.begin().await?))
        } else {
            Ok(Conn::Session(self.pool.acquire().await?))
        }
    }

    /// A second pool to the same database with the same settings, of at most `size` connections,
    /// connecting on first use.
    pub(crate) fn sibling(&self, size: u32) -> Self {
        self.sibling_with(size, Duration::from_secs(5))
    }

    /// [`Db::sibling`], waiting at most `acquire_timeout` for a connection.
    pub(crate) fn sibling_with(&self, size: u32, acquire_timeout: Duration) -> Self {
        Self::lazy(self.pool.connect_options().as_ref().clone(), self.pooled.clone(), size, acquire_timeout)
    }

    /// A pool of at most `size` connections with these settings (from [`connect_settings`]),
    /// connecting on first use.
    pub(crate) fn lazy(
        options: PgConnectOptions,
        pooled: Option<Arc<str>>,
        size: u32,
        acquire_timeout: Duration,
    ) -> Self {
        let lost = Arc::<LostMark>::default();
        let pool = pool_options(size, acquire_timeout, lost.clone()).connect_lazy_with(options);
        Self { pool, pooled, lost }
    }
}

/// A connection that sat in the pool at least this long is tried (one round trip) before it is
/// handed out; one used more recently is not. sqlx tries every connection on every hand-out by
/// default: a round trip in front of every transaction and every coalesced read, about 6 % of
/// the throughput of availability reads and of uniform reservations
/// (`bench/results/2026-11-30-issue-12-targets.md`). Nothing depends on that check: a
/// connection handed out untried meets its first statement in a BEGIN or in a read run by
/// [`Reads::run`](super::replica::Reads::run), and both run once more on another connection
/// when they find theirs lost, after which every connection that went idle before is tried
/// first ([`Db::lost`]); plain reads try their connection themselves ([`Db::acquire`]). The
/// check stays for connections idle this long, where it costs little: after a quiet spell, a
/// restart of PostgreSQL is found before any statement meets it.
const TRY_AFTER_IDLE: Duration = Duration::from_millis(100);

/// When a connection of a pool was last found lost ([`Db::lost`]).
#[derive(Debug, Default)]
struct LostMark(std::sync::Mutex<Option<Instant>>);

impl LostMark {
    /// Whether a connection idle for `idle` went idle before the last loss.
    fn predates(&self, idle: Duration) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|at| idle >= at.elapsed())
    }
}

/// The settings of every pool of the service: at most `size` connections, none kept open when
/// idle for five minutes, a connection tried before it is handed out only after
/// [`TRY_AFTER_IDLE`] or when it went idle before a loss.
fn pool_options(size: u32, acquire_timeout: Duration, lost: Arc<LostMark>) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(size.max(1))
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            let suspect = meta.idle_for >= TRY_AFTER_IDLE || lost.predates(meta.idle_for);
            Box::pin(async move {
                if suspect {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// Builds the pool, and refuses a server older than [`MIN_SERVER_VERSION`]. Every session gets
/// `lock_timeout` and `statement_timeout` (as startup options, or behind a transaction pooler in
/// every transaction), so a stuck row lock turns into a fast 503 for that row instead of a hung
/// pool.
pub async fn connect(url: &str, args: &DatabaseArgs) -> Result<Db, SetupError> {
    let (options, pooled) = connect_settings(url, args)?;
    let lost = Arc::<LostMark>::default();
    let pool = pool_options(args.db_pool_size, args.acquire_timeout(), lost.clone())
        .connect_with(options)
        .await
        .map_err(SetupError::Connect)?;
    // Without parameters: one round trip (the simple protocol), fine outside a transaction.
    let (number, found): (String, String) =
        sqlx::query_as("SELECT current_setting('server_version_num'), current_setting('server_version')")
            .fetch_one(&pool)
            .await
            .map_err(SetupError::Connect)?;
    if number.parse::<u32>().unwrap_or(0) < MIN_SERVER_VERSION * 10_000 {
        return Err(SetupError::TooOld { found });
    }
    Ok(Db { pool, pooled, lost })
}

/// Brings the schema up to date. Behind a transaction pooler it cannot (sqlx's migrator holds a
/// session-level advisory lock while it works): there it only makes sure `inventory migrate` has
/// been run over a direct connection.
pub async fn migrate(db: &Db) -> Result<(), SetupError> {
    if !db.pooled() {
        return Ok(MIGRATOR.run(&db.pool).await?);
    }
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied = match applied_migration(db).await {
        Ok(applied) => applied,
        // No migration table yet.
        Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P01") => None,
        Err(err) => return Err(SetupError::Connect(err)),
    };
    if applied.unwrap_or(0) < latest {
        return Err(SetupError::NotMigrated { applied, latest });
    }
    Ok(())
}

/// The server of `url` with the settings every connection of the service gets, and, behind a
/// transaction pooler, what every BEGIN sends along instead (see [`Db`]).
pub(crate) fn connect_settings(
    url: &str,
    args: &DatabaseArgs,
) -> Result<(PgConnectOptions, Option<Arc<str>>), SetupError> {
    let lock_timeout = format!("{}ms", args.db_lock_timeout_ms);
    let statement_timeout = format!("{}ms", args.db_statement_timeout_ms);
    let options = PgConnectOptions::from_str(url).map_err(SetupError::Connect)?.application_name("inventory");
    Ok(match args.database_pooler {
        Pooler::None => (
            options
                .options([("lock_timeout", lock_timeout.as_str()), ("statement_timeout", statement_timeout.as_str())]),
            None,
        ),
        // PgBouncer refuses the `options` startup parameter and, unless told to ignore it,
        // `extra_float_digits` (PostgreSQL 12 and newer print floats exactly without it).
        Pooler::Transaction => (
            options.statement_cache_capacity(0).extra_float_digits(None),
            Some(Arc::from(format!(
                "SET LOCAL lock_timeout = '{lock_timeout}'; SET LOCAL statement_timeout = '{statement_timeout}'; \
                 DEALLOCATE ALL"
            ))),
        ),
    })
}

/// How a writer transaction starts (see [`begin_writer`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterSetup {
    /// Lowers the transaction's `lock_timeout` to this (a configured shorter one stays).
    pub lock_cap: Option<Duration>,
    /// Every statement of the transaction runs its connection's generic plan
    /// (`plan_cache_mode = force_generic_plan`) instead of being planned again for its
    /// arguments. For the batches: their statements find rows by key from arrays, whose plan does
    /// not depend on the arrays' contents, while planning their many-CTE statements for every
    /// batch took ~5 % of all CPU under load. Ignored behind a transaction pooler: no statement is
    /// kept there, each is planned anyway, and a generic plan would only lose the arguments.
    pub generic_plans: bool,
}

/// BEGIN for a transaction that may write ledger entries or events: it announces itself as a
/// writer (a shared advisory lock, taken right after BEGIN, before it has a transaction id), so
/// ledger pages wait for it and for nobody else (`writer_horizon()`, migrations 0006, 0007,
/// 0011), and the event relay keeps it among the writers still running, whose events it looks
/// for again (`writer_frontier()`, 0011). `inventory.writer` lets it insert events: 0011's
/// trigger refuses anyone else. Set it only like this, with `SET LOCAL` next to the lock — a
/// transaction that had it without the lock could insert events the relay has already passed.
/// `setup` may cap the lock wait and choose generic plans. BEGIN, the announcement and the
/// settings travel in one message.
pub async fn begin_writer(
    db: &Db,
    setup: WriterSetup,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut then = String::from("SELECT pg_advisory_xact_lock_shared(7041, 2); SET LOCAL inventory.writer = on");
    if let Some(cap) = setup.lock_cap {
        let ms = cap.as_millis();
        then.push_str(&format!(
            "; SELECT set_config('lock_timeout',
                 CASE WHEN s = '0' OR s::interval > interval '{ms} ms' THEN '{ms}ms' ELSE s END, true)
               FROM current_setting('lock_timeout') AS s"
        ));
    }
    if setup.generic_plans && !db.pooled() {
        then.push_str("; SET LOCAL plan_cache_mode = force_generic_plan");
    }
    db.begin_then("", &then).await
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
pub(crate) async fn applied_migration(db: &Db) -> Result<Option<i64>, sqlx::Error> {
    let mut conn = db.acquire().await?;
    sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success").fetch_one(&mut *conn).await
}
