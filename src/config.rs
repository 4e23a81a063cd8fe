//! Typed settings from flags and environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Multi-warehouse inventory reservation service in front of PostgreSQL.
///
/// Without DATABASE_URL the service starts (and stops) its own PostgreSQL cluster from the
/// local PostgreSQL binaries, keeping its data under --data-dir.
#[derive(Debug, Parser)]
#[command(name = "inventory", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// The service's flags when no subcommand is given (`inventory --listen …`); after
    /// parsing, `serve`'s own (`inventory serve --listen …`) are here too.
    #[command(flatten)]
    pub server: ServerArgs,

    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, env = "INVENTORY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true,
        help_heading = "Logging")]
    pub log_format: LogFormat,

    /// Settings read from environment variables under an old name (to log once logging runs).
    #[arg(skip)]
    pub deprecated: Vec<String>,
}

/// Environment variables renamed to match their flags: `(old, new, argument id)`. The old name
/// still works, with a warning, when the new one is not set.
const RENAMED_ENV: &[(&str, &str, &str)] = &[
    ("INVENTORY_DB_ACQUIRE_TIMEOUT", "INVENTORY_DB_ACQUIRE_TIMEOUT_SECS", "db_acquire_timeout_secs"),
    ("INVENTORY_REQUEST_TIMEOUT", "INVENTORY_REQUEST_TIMEOUT_SECS", "request_timeout_secs"),
];

impl Cli {
    /// The command line and the environment, with an optional setting that is set but empty
    /// (`DATABASE_URL=`, as compose files and shells leave behind) taken as unset rather than as
    /// a value that fails to parse.
    pub fn from_env_and_args() -> Self {
        Self::from_args_and(std::env::args_os(), |name| std::env::var(name).ok())
    }

    /// [`Cli::from_env_and_args`] with the arguments and the environment given (for tests);
    /// exits with clap's message on bad arguments, as `parse` does.
    pub fn from_args_and(
        args: impl IntoIterator<Item = std::ffi::OsString>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command().get_matches_from(args);
        let mut cli = Self::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
        // The service's flags belong to `serve` (or to no subcommand): given before a subcommand,
        // they would be silently ignored, so they are refused.
        if let Some((name, _)) = matches.subcommand() {
            let server = ServerArgs::augment_args(clap::Command::new("serve"));
            let misplaced = server.get_arguments().find(|arg| {
                matches.value_source(arg.get_id().as_str()) == Some(clap::parser::ValueSource::CommandLine)
            });
            if let Some(arg) = misplaced {
                let flag = arg.get_long().unwrap_or_default();
                let message = if name == "serve" {
                    format!("--{flag} goes after the subcommand: inventory serve --{flag} …\n")
                } else {
                    format!("--{flag} is a flag of `inventory serve`, not of `inventory {name}`\n")
                };
                clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, message).exit();
            }
        }
        if let Some(Command::Serve(server)) = &cli.command {
            cli.server = server.clone();
        }
        // Where a setting was given: the service's under `serve` (or at the top without a
        // subcommand), the database's (global) in the innermost subcommand, which sees them all.
        let mut innermost = &matches;
        while let Some((_, sub)) = innermost.subcommand() {
            innermost = sub;
        }
        let serve = matches.subcommand_matches("serve").unwrap_or(&matches);
        // An old variable fills in a setting that neither its flag nor its new variable gave.
        for (old, new, id) in RENAMED_ENV {
            let Some(value) = env(old).filter(|v| !v.trim().is_empty()) else { continue };
            let given_in = if *id == "request_timeout_secs" { serve } else { innermost };
            if given_in.value_source(id) != Some(clap::parser::ValueSource::DefaultValue) {
                cli.deprecated.push(format!("{old} is ignored: {new} (or its flag) is set"));
                continue;
            }
            match value.trim().parse::<u64>() {
                Ok(n) if *id == "db_acquire_timeout_secs" => cli.database.db_acquire_timeout_secs = n,
                Ok(n) => cli.server.request_timeout_secs = n,
                Err(_) => {
                    clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{old}: not a number: {value}\n"))
                        .exit()
                }
            }
            cli.deprecated.push(format!("{old} is deprecated: use {new}"));
        }
        let blank = |v: &Option<String>| v.as_deref().is_some_and(|s| s.trim().is_empty());
        if blank(&cli.database.database_url) {
            cli.database.database_url = None;
        }
        if blank(&cli.database.database_read_url) {
            cli.database.database_read_url = None;
        }
        if blank(&cli.server.api_keys) {
            cli.server.api_keys = None;
        }
        if cli.server.api_keys_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            cli.server.api_keys_file = None;
        }
        cli
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the HTTP service (the default when no subcommand is given).
    Serve(ServerArgs),
    /// Apply database migrations and exit.
    Migrate,
    /// Verify the contract's invariants over the whole database; exit 1 on any violation.
    Check,
    /// Bulk-load stock levels from a CSV file (sku,warehouse,on_hand[,reorder_point,reorder_quantity]).
    Import {
        /// The CSV file; `-` reads standard input.
        file: std::path::PathBuf,
        /// Create unknown SKUs and warehouses instead of rejecting their rows.
        #[arg(long)]
        create_missing: bool,
    },
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print where the self-started PostgreSQL keeps its data (to back it up or remove it).
    DataDir,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Mint a new API key: prints the key (once) and the line to add to the key configuration.
    New {
        /// What the key may do: read, orders (reservations + read), ops (catalogue and stock + read), admin.
        #[arg(long, value_parser = ["read", "orders", "ops", "admin"])]
        role: String,
        /// A name for the key, shown in logs (never the key itself).
        #[arg(long, default_value = "key")]
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the data lives.
#[derive(Clone, Args)]
#[command(next_help_heading = "Database")]
pub struct DatabaseArgs {
    /// PostgreSQL URL. When set it always wins over --data-dir.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,

    /// Directory of the self-started PostgreSQL cluster, used when no DATABASE_URL is given.
    #[arg(long, env = "INVENTORY_DATA_DIR", default_value = ".inventory", global = true)]
    pub data_dir: PathBuf,

    /// Maximum number of pooled database connections.
    #[arg(long, env = "INVENTORY_DB_POOL_SIZE", default_value_t = 16, global = true)]
    pub db_pool_size: u32,

    /// Seconds to wait for a pooled connection before answering 503.
    #[arg(long, env = "INVENTORY_DB_ACQUIRE_TIMEOUT_SECS", default_value_t = 5, global = true)]
    pub db_acquire_timeout_secs: u64,

    /// Milliseconds a statement waits for a row lock before giving up (PostgreSQL lock_timeout).
    #[arg(long, env = "INVENTORY_DB_LOCK_TIMEOUT_MS", default_value_t = 2_000, global = true)]
    pub db_lock_timeout_ms: u64,

    /// Milliseconds a single statement may run (PostgreSQL statement_timeout).
    #[arg(long, env = "INVENTORY_DB_STATEMENT_TIMEOUT_MS", default_value_t = 30_000, global = true)]
    pub db_statement_timeout_ms: u64,

    /// What stands between the service and PostgreSQL: `none` (a direct connection, or a pooler
    /// in session mode) or `transaction` (PgBouncer or the like in transaction pooling mode: no
    /// startup options, no prepared statements kept, every statement in a transaction, and no
    /// migrations through it).
    #[arg(long, env = "INVENTORY_DATABASE_POOLER", value_enum, default_value_t = Pooler::None, global = true)]
    pub database_pooler: Pooler,

    /// PostgreSQL URL of a streaming replica of DATABASE_URL: availability, stock listings, the
    /// ledger and the event feed are read there while it is fresh enough (see
    /// --max-replica-lag-ms), from the primary otherwise.
    #[arg(long, env = "DATABASE_READ_URL", hide_env_values = true, global = true)]
    pub database_read_url: Option<String>,

    /// Milliseconds the read replica may be behind the primary before reads go to the primary.
    #[arg(long, env = "INVENTORY_MAX_REPLICA_LAG_MS", default_value_t = 1000, global = true)]
    pub max_replica_lag_ms: u64,
}

/// What stands between the service and PostgreSQL (`--database-pooler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pooler {
    /// A server session is the service's for as long as the connection lasts.
    None,
    /// A server session is the service's for one transaction only (PgBouncer's
    /// `pool_mode = transaction`).
    Transaction,
}

impl std::fmt::Debug for DatabaseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("DatabaseArgs")
            .field("database_url", &self.database_url.as_ref().map(|_| "<redacted>"))
            .field("data_dir", &self.data_dir)
            .field("db_pool_size", &self.db_pool_size)
            .field("db_acquire_timeout_secs", &self.db_acquire_timeout_secs)
            .field("db_lock_timeout_ms", &self.db_lock_timeout_ms)
            .field("db_statement_timeout_ms", &self.db_statement_timeout_ms)
            .field("database_pooler", &self.database_pooler)
            .field("database_read_url", &self.database_read_url.as_ref().map(|_| "<redacted>"))
            .field("max_replica_lag_ms", &self.max_replica_lag_ms)
            .finish()
    }
}

impl DatabaseArgs {
    pub(crate) fn acquire_timeout(&self) -> Duration {
        Duration::from_secs(self.db_acquire_timeout_secs)
    }
}

/// The default of `--import-max-bytes`: 512 MiB.
pub(crate) const DEFAULT_IMPORT_MAX_BYTES: usize = 512 * 1024 * 1024;

/// Live event streams open at once, by default.
pub(crate) const DEFAULT_MAX_EVENT_STREAMS: usize = 1024;
/// Live event streams one API key may hold open, by default.
pub(crate) const DEFAULT_MAX_EVENT_STREAMS_PER_KEY: usize = 512;

/// How the HTTP server behaves.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "INVENTORY_LISTEN", default_value = "127.0.0.1:8080", help_heading = "Server")]
    pub listen: SocketAddr,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "INVENTORY_BODY_LIMIT", default_value_t = 1024 * 1024, help_heading = "Limits")]
    pub body_limit: usize,

    /// Largest accepted CSV body of `POST /v1/stock/import`, in bytes (it is spooled to disk,
    /// not held in memory).
    #[arg(long, env = "INVENTORY_IMPORT_MAX_BYTES", default_value_t = DEFAULT_IMPORT_MAX_BYTES, help_heading = "Limits")]
    pub import_max_bytes: usize,

    /// Seconds between SIGTERM and the end of accepting requests: `/health/ready` answers 503 at
    /// once, so load balancers stop sending, while requests still get answers.
    #[arg(long, env = "INVENTORY_DRAIN_DELAY_SECS", default_value_t = 5, help_heading = "Server")]
    pub drain_delay_secs: u64,

    /// Seconds a request may take before it is answered 504 `outcome_unknown` (also bounds
    /// graceful shutdown).
    #[arg(long, env = "INVENTORY_REQUEST_TIMEOUT_SECS", default_value_t = 30, help_heading = "Limits")]
    pub request_timeout_secs: u64,

    /// Largest page a listing endpoint returns.
    #[arg(long, env = "INVENTORY_MAX_PAGE_SIZE", default_value_t = 1000, help_heading = "Limits")]
    pub max_page_size: i64,

    /// Most lines one reservation may have.
    #[arg(long, env = "INVENTORY_MAX_RESERVATION_LINES", default_value_t = 100, help_heading = "Limits")]
    pub max_reservation_lines: usize,

    /// Milliseconds between sweeps of the expiry task.
    #[arg(long, env = "INVENTORY_EXPIRY_INTERVAL_MS", default_value_t = 1000, help_heading = "Background work")]
    pub expiry_interval_ms: u64,

    /// Reservations expired per transaction by the expiry task.
    #[arg(long, env = "INVENTORY_EXPIRY_BATCH_SIZE", default_value_t = 100, help_heading = "Background work")]
    pub expiry_batch_size: i64,

    /// Seconds an Idempotency-Key is kept (at least 24 hours by contract).
    #[arg(
        long,
        env = "INVENTORY_IDEMPOTENCY_RETENTION_SECS",
        default_value_t = 86_400,
        help_heading = "Background work"
    )]
    pub idempotency_retention_secs: i64,

    /// API keys as `name:role:sha256hex` entries, comma-separated (see `inventory keys new`).
    #[arg(long, env = "INVENTORY_API_KEYS", hide_env_values = true, help_heading = "Auth")]
    pub api_keys: Option<String>,

    /// A file of API key entries, one `name:role:sha256hex` per line.
    #[arg(long, env = "INVENTORY_API_KEYS_FILE", help_heading = "Auth")]
    pub api_keys_file: Option<std::path::PathBuf>,

    /// Do not apply migrations at start-up (they run as a separate `inventory migrate` job);
    /// `/health/ready` answers 503 until they are applied.
    #[arg(long, env = "INVENTORY_NO_MIGRATE", help_heading = "Server")]
    pub no_migrate: bool,

    /// Let a service on a non-loopback address start its own development PostgreSQL when no
    /// DATABASE_URL is given (without this it refuses: a production instance that lost its
    /// DATABASE_URL must fail, not come up with an empty database).
    #[arg(long, env = "INVENTORY_SELF_MANAGED_POSTGRES", help_heading = "Server")]
    pub self_managed_postgres: bool,

    /// Serve without API keys on a non-loopback address (never do this in production).
    #[arg(long, env = "INVENTORY_INSECURE_NO_AUTH", help_heading = "Auth")]
    pub insecure_no_auth: bool,

    /// Whether /metrics is open without a key (otherwise it needs the read role).
    #[arg(long, env = "INVENTORY_METRICS_PUBLIC", default_value_t = true, action = clap::ArgAction::Set, help_heading = "Auth")]
    pub metrics_public: bool,

    /// Seconds events are kept in the feed.
    #[arg(long, env = "INVENTORY_EVENT_RETENTION_SECS", default_value_t = 604_800, help_heading = "Background work")]
    pub event_retention_secs: i64,

    /// Most reservations (or fulfils and releases) decided in one transaction (1 turns batching off).
    #[arg(long, env = "INVENTORY_BATCH_MAX", default_value_t = 128, help_heading = "Batching")]
    pub batch_max: usize,

    /// Microseconds a batch waits for more reservations after its first one.
    #[arg(long, env = "INVENTORY_BATCH_WINDOW_US", default_value_t = 1000, help_heading = "Batching")]
    pub batch_window_us: u64,

    /// Batches in flight at once, of reservations and of fulfils/releases each (each holds one database connection).
    #[arg(long, env = "INVENTORY_BATCH_CONCURRENCY", default_value_t = 4, help_heading = "Batching")]
    pub batch_concurrency: usize,

    /// Availability queries in flight at once, each answering every request that arrived while
    /// the earlier ones ran (each holds one database connection). Fewer means larger queries:
    /// more requests answered per statement, less database work per request.
    #[arg(long, env = "INVENTORY_COALESCED_READ_CONCURRENCY", default_value_t = 2, help_heading = "Batching")]
    pub coalesced_read_concurrency: usize,

    /// Most live event streams open at once (more are answered 429).
    #[arg(long, env = "INVENTORY_MAX_EVENT_STREAMS", default_value_t = DEFAULT_MAX_EVENT_STREAMS, help_heading = "Limits")]
    pub max_event_streams: usize,

    /// Most live event streams one API key (or, without keys, everyone together) may hold open.
    #[arg(long, env = "INVENTORY_MAX_EVENT_STREAMS_PER_KEY", default_value_t = DEFAULT_MAX_EVENT_STREAMS_PER_KEY, help_heading = "Limits")]
    pub max_event_streams_per_key: usize,

    /// Webhook deliveries in flight at once, to different subscriptions (each holds one
    /// connection of the senders' own pool); 0 sends none.
    #[arg(long, env = "INVENTORY_WEBHOOK_CONCURRENCY", default_value_t = 4, help_heading = "Background work")]
    pub webhook_concurrency: usize,
}

impl ServerArgs {
    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// The defaults of the command line's arguments — the `#[arg]`s above are their only
/// definition — without reading the environment (tests and embedders get the same defaults
/// the binary starts with, whatever `INVENTORY_*` variables are set).
fn defaults<T: clap::FromArgMatches + Args>() -> T {
    let command = T::augment_args(clap::Command::new("inventory")).mut_args(|arg| arg.env(None));
    let matches = command.try_get_matches_from(["inventory"]).expect("every argument has a default or is optional");
    T::from_arg_matches(&matches).expect("defaults parse into their own types")
}

impl Default for ServerArgs {
    fn default() -> Self {
        defaults()
    }
}

impl Default for DatabaseArgs {
    fn default() -> Self {
        defaults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line as the binary reads it (without the old environment names).
    fn parse(args: &[&str]) -> Cli {
        Cli::from_args_and(args.iter().map(std::ffi::OsString::from), |_| None)
    }

    #[test]
    fn serve_is_the_default_and_flags_work_after_the_subcommand() {
        let cli = parse(&["inventory"]);
        assert!(cli.command.is_none());
        let cli = parse(&["inventory", "serve", "--listen", "127.0.0.1:9999", "--data-dir", "/tmp/x"]);
        assert!(matches!(cli.command, Some(Command::Serve(_))));
        assert_eq!(cli.server.listen.port(), 9999);
        assert_eq!(cli.database.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn renamed_environment_variables_still_work_with_a_warning() {
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let old = |name: &str| match name {
            "INVENTORY_REQUEST_TIMEOUT" => Some("7".to_owned()),
            "INVENTORY_DB_ACQUIRE_TIMEOUT" => Some("3".to_owned()),
            _ => None,
        };
        let cli = Cli::from_args_and(args(&["inventory"]), old);
        assert_eq!((cli.server.request_timeout_secs, cli.database.db_acquire_timeout_secs), (7, 3));
        assert!(
            cli.deprecated.iter().any(|w| w.contains("use INVENTORY_REQUEST_TIMEOUT_SECS")),
            "{:?}",
            cli.deprecated
        );
        // A flag (or the new name) wins, and the old name is said to be ignored.
        let cli = Cli::from_args_and(args(&["inventory", "serve", "--request-timeout-secs", "9"]), old);
        assert_eq!(cli.server.request_timeout_secs, 9);
        assert!(
            cli.deprecated.iter().any(|w| w.starts_with("INVENTORY_REQUEST_TIMEOUT is ignored")),
            "{:?}",
            cli.deprecated
        );
        let cli = Cli::from_args_and(args(&["inventory", "check", "--db-acquire-timeout-secs", "4"]), old);
        assert_eq!(cli.database.db_acquire_timeout_secs, 4, "a database flag after the subcommand wins");
        let cli = Cli::from_args_and(args(&["inventory", "--db-acquire-timeout-secs", "4", "check"]), old);
        assert_eq!(cli.database.db_acquire_timeout_secs, 4, "and before it");
        let cli = Cli::from_args_and(args(&["inventory", "keys", "new", "--role", "read"]), old);
        assert_eq!(cli.database.db_acquire_timeout_secs, 3);
        let cli = Cli::from_args_and(args(&["inventory"]), |_| None);
        assert!(cli.deprecated.is_empty());
    }

    #[test]
    fn the_import_size_limit_defaults_to_512_mib_and_is_a_flag() {
        let cli = Cli::try_parse_from(["inventory"]).unwrap();
        assert_eq!(cli.server.import_max_bytes, 512 * 1024 * 1024);
        assert_eq!(ServerArgs::default().import_max_bytes, cli.server.import_max_bytes);
        let cli = parse(&["inventory", "serve", "--import-max-bytes", "1000"]);
        assert_eq!(cli.server.import_max_bytes, 1000);
    }

    #[test]
    fn the_defaults_are_the_command_lines_and_ignore_the_environment() {
        let cli = Cli::try_parse_from(["inventory"]).unwrap();
        let server = ServerArgs::default();
        assert_eq!(server.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!((server.batch_max, server.max_page_size), (cli.server.batch_max, cli.server.max_page_size));
        assert_eq!(DatabaseArgs::default().db_pool_size, 16);
        assert_eq!(DatabaseArgs::default().data_dir, PathBuf::from(".inventory"));
    }

    #[test]
    fn the_pooler_is_none_unless_set_and_works_with_every_subcommand() {
        assert_eq!(DatabaseArgs::default().database_pooler, Pooler::None);
        let cli = parse(&["inventory", "check", "--database-pooler", "transaction"]);
        assert_eq!(cli.database.database_pooler, Pooler::Transaction);
        let cli = parse(&["inventory", "--database-pooler", "transaction", "serve"]);
        assert_eq!(cli.database.database_pooler, Pooler::Transaction);
    }

    #[test]
    fn debug_output_hides_the_database_url() {
        let cli = Cli::try_parse_from(["inventory", "--database-url", "postgres://u:hunter2@h/db"]).unwrap();
        assert!(!format!("{cli:?}").contains("hunter2"));
    }
}
