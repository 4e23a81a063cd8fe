//! Wiring: locate the database, migrate, serve with graceful shutdown.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Keys;
use crate::config::{Cli, Command, DatabaseArgs, KeysCommand, Pooler, ServerArgs};
use crate::engine::{self, Engine, Refusal};
use crate::http::{self, AppState};
use crate::store::db::{self, Database, Db, MIGRATOR, SetupError};
use crate::store::replica::{ReadReplica, Reads};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("server error: {0}")]
    Serve(#[source] std::io::Error),
    #[error("{0} invariant violation(s) found")]
    Violations(usize),
    #[error("{0}")]
    Engine(#[from] engine::Error),
    #[error("configuration: {0}")]
    Config(String),
}

/// Runs the subcommand the command line asked for.
pub async fn run(cli: Cli) -> Result<(), RunError> {
    if let Some(Command::Keys(KeysCommand::New { role, name })) = &cli.command {
        let role = crate::auth::Role::parse(role).map_err(RunError::Config)?;
        let (secret, line) = crate::auth::mint(name, role);
        println!("key (shown once, give it to the client): {secret}");
        println!("config entry (add to INVENTORY_API_KEYS or --api-keys-file): {line}");
        return Ok(());
    }
    if let Some(Command::DataDir) = &cli.command {
        println!("{}", crate::local_pg::describe_data_dir(&cli.database.data_dir));
        if cli.database.database_url.is_some() {
            println!("(DATABASE_URL is set: the service uses that database, not this directory)");
        }
        return Ok(());
    }
    let command = cli.command.clone().unwrap_or_else(|| Command::Serve(cli.server.clone()));
    let owner = matches!(command, Command::Serve(_));
    let public = !cli.server.listen.ip().is_loopback();
    if owner && public && cli.database.database_url.is_none() && !cli.server.self_managed_postgres {
        return Err(RunError::Config(format!(
            "refusing to start a self-managed development PostgreSQL for a service on {}: set DATABASE_URL, \
             or pass --self-managed-postgres to run the development cluster under {} anyway",
            cli.server.listen,
            cli.database.data_dir.display()
        )));
    }
    if cli.database.database_url.is_none() && cli.database.database_pooler != Pooler::None {
        return Err(RunError::Config(
            "--database-pooler needs a DATABASE_URL (the pooler's address): the self-started PostgreSQL has no \
             pooler in front of it"
                .into(),
        ));
    }
    // One service per self-started cluster: it alone stops the cluster when it exits. The lock
    // is the kernel's, so a service killed with -9 leaves no stale claim and the next one adopts
    // the cluster it left running.
    let _claim = if owner && cli.database.database_url.is_none() {
        Some(claim_data_dir(&cli.database.data_dir).map_err(RunError::Config)?)
    } else {
        None
    };
    let database = Database::locate(&cli.database).await?;
    let result = match command {
        Command::Serve(_) => serve_command(&cli, &database).await,
        Command::Migrate => migrate_command(&cli.database, &database).await,
        Command::Check => check_command(&cli.database, &database).await,
        Command::Keys(_) | Command::DataDir => Ok(()),
        Command::Import { file, create_missing } => {
            import_command(&cli.database, &database, &file, create_missing).await
        }
    };
    // A one-off command stops a cluster it started, unless a service has since taken it over
    // (it holds the data directory's lock and will stop the cluster itself).
    let served_by_another = !owner && data_dir_served(&cli.database.data_dir);
    if !served_by_another {
        database.shutdown(owner).await;
    }
    result
}

/// Whether a running `inventory serve` holds the data directory's lock.
fn data_dir_served(data_dir: &std::path::Path) -> bool {
    let Ok(file) = std::fs::File::open(data_dir.join("serve.lock")) else { return false };
    matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// Takes the data directory's exclusive `serve.lock` (held until the process ends), or says
/// which process holds it.
fn claim_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    std::fs::create_dir_all(data_dir).map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let path = data_dir.join("serve.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    if let Err(err) = file.try_lock() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
        return Err(match err {
            std::fs::TryLockError::WouldBlock => format!(
                "another `inventory serve`{who} is already using the data directory {}: stop it first, or give \
                 this one its own --data-dir or a DATABASE_URL",
                data_dir.display()
            ),
            std::fs::TryLockError::Error(e) => format!("cannot lock {}: {e}", path.display()),
        });
    }
    let _ = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id()));
    Ok(file)
}

async fn serve_command(cli: &Cli, database: &Database) -> Result<(), RunError> {
    let keys = keys_of(&cli.server)?;
    if keys.is_empty() {
        if cli.server.listen.ip().is_loopback() {
            tracing::warn!("NO API KEYS CONFIGURED: every caller may do everything; allowed on loopback only");
        } else if cli.server.insecure_no_auth {
            tracing::warn!(addr = %cli.server.listen, "NO API KEYS on a non-loopback address (--insecure-no-auth)");
        } else {
            return Err(RunError::Config(format!(
                "refusing to serve {} without API keys: configure keys (inventory keys new --role orders) \
                 or pass --insecure-no-auth",
                cli.server.listen
            )));
        }
    }
    let pool = db::connect(&database.url, &cli.database).await?;
    if cli.server.no_migrate {
        tracing::info!("migrations left to `inventory migrate` (--no-migrate); /health/ready waits for them");
    } else {
        db::migrate(&pool).await?;
    }
    let listener = TcpListener::bind(cli.server.listen)
        .await
        .map_err(|source| RunError::Bind { addr: cli.server.listen, source })?;
    tracing::info!(addr = %listener.local_addr().map_err(RunError::Serve)?, "inventory listening");
    let replica = match &cli.database.database_read_url {
        Some(url) => {
            tracing::info!(max_lag_ms = cli.database.max_replica_lag_ms, "lag-tolerant reads go to the read replica");
            Some(ReadReplica::connect(url, &cli.database)?)
        }
        None => None,
    };
    let reads = Reads::new(pool.clone(), replica.clone());
    serve_with_reads(listener, reads, cli.server.clone(), shutdown_signal()).await?;
    pool.pool().close().await;
    if let Some(replica) = replica {
        replica.pool.pool().close().await;
    }
    Ok(())
}

/// The configured API keys (`--api-keys` and `--api-keys-file`).
fn keys_of(server: &ServerArgs) -> Result<Keys, RunError> {
    Keys::load(server.api_keys.as_deref(), server.api_keys_file.as_deref()).map_err(RunError::Config)
}

async fn migrate_command(args: &DatabaseArgs, database: &Database) -> Result<(), RunError> {
    if args.database_pooler != Pooler::None {
        return Err(RunError::Config(
            "`inventory migrate` cannot run through a transaction pooler (the migrator holds a session-level \
             advisory lock): give it a DATABASE_URL straight to PostgreSQL, without --database-pooler"
                .into(),
        ));
    }
    let pool = db::connect(&database.url, args).await?;
    MIGRATOR.run(pool.pool()).await.map_err(SetupError::from)?;
    tracing::info!("migrations applied");
    pool.pool().close().await;
    Ok(())
}

async fn check_command(args: &DatabaseArgs, database: &Database) -> Result<(), RunError> {
    let pool = db::connect(&database.url, args).await?;
    db::migrate(&pool).await?;
    let violations = crate::store::invariants::whole_database(&pool).await.map_err(engine::Error::from)?;
    pool.pool().close().await;
    for v in &violations {
        println!("VIOLATION {v}");
    }
    if violations.is_empty() {
        println!("ok: all invariants hold");
        Ok(())
    } else {
        Err(RunError::Violations(violations.len()))
    }
}

async fn import_command(
    args: &DatabaseArgs,
    database: &Database,
    file: &std::path::Path,
    create_missing: bool,
) -> Result<(), RunError> {
    use tokio::io::AsyncReadExt;
    let pool = db::connect(&database.url, args).await?;
    db::migrate(&pool).await?;
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if file.as_os_str() == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(file)
                .await
                .map_err(|e| RunError::Config(format!("cannot open {}: {e}", file.display())))?,
        )
    };
    let chunks = futures_util::stream::unfold(reader, |mut reader| async move {
        let mut buf = vec![0u8; 1 << 20];
        match reader.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), reader))
            }
            Err(e) => Some((Err(e), reader)),
        }
    });
    let started = std::time::Instant::now();
    // The file is checked and spooled before the transaction begins, as over HTTP.
    let result = async {
        // A local file has no size limit (that one protects the service from its clients).
        let staged = engine::import::stage(Box::pin(chunks), usize::MAX).await?;
        // A writer of ledger entries and events: readers of both wait for it (see db::begin_writer).
        let mut tx = db::begin_writer(&pool, db::WriterSetup::default()).await?;
        let report = engine::import::apply(&mut tx, &staged, create_missing).await?;
        tx.commit().await.map_err(engine::Error::from_commit)?;
        Ok::<_, engine::Error>(report)
    }
    .await;
    let report = match result {
        Ok(report) => report,
        Err(engine::Error::Refused(Refusal::Invalid(errors) | Refusal::UnknownInRows(errors))) => {
            for e in &errors {
                println!("REJECTED {}: {}", e.field, e.message);
            }
            return Err(RunError::Config("nothing imported: fix the rows above".into()));
        }
        Err(engine::Error::Refused(Refusal::NotCsv(problem))) => {
            return Err(RunError::Config(format!("nothing imported: {problem}")));
        }
        Err(other) => return Err(other.into()),
    };
    pool.pool().close().await;
    println!(
        "imported {} rows in {:.1}s: {} levels created, {} ledger entries (reference {})",
        report.rows,
        started.elapsed().as_secs_f64(),
        report.levels_created,
        report.ledger_entries,
        report.import_id
    );
    Ok(())
}

/// Serves the API on an already-bound listener until `shutdown` resolves, then drains
/// in-flight requests (bounded by the request timeout) and stops background tasks.
pub async fn serve(
    listener: TcpListener,
    pool: Db,
    server: ServerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    serve_with_reads(listener, Reads::new(pool, None), server, shutdown).await
}

/// [`serve`] with the lag-tolerant reads going where `reads` sends them (a read replica while
/// it is fresh); its primary pool serves everything else.
pub async fn serve_with_reads(
    listener: TcpListener,
    reads: Reads,
    server: ServerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let pool = reads.primary().clone();
    let keys = keys_of(&server)?;
    crate::metrics::handle();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = crate::background::spawn(pool.clone(), &server, stop_rx.clone());
    tasks.extend(reads.spawn_sampler(stop_rx.clone()));
    let engine = Engine::start(pool.clone(), &server, http::error::answer_of);
    let limits =
        engine::feed::StreamLimits { total: server.max_event_streams, per_caller: server.max_event_streams_per_key };
    let feed = engine::feed::Feed::start(pool.clone(), limits, stop_rx.clone());
    let senders = u32::try_from(server.webhook_concurrency).unwrap_or(u32::MAX);
    tasks.extend(engine::webhooks::start(
        // The senders' own pool: a connection per sender (each holds one for an attempt, up to
        // 10 s) and one for the lag sampler, so a slow receiver never takes one from requests.
        pool.sibling(senders.saturating_add(1)),
        server.webhook_concurrency,
        feed.subscribe(),
        stop_rx.clone(),
    ));
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain_delay = std::time::Duration::from_secs(server.drain_delay_secs);
    let state = AppState::new(http::state::Shared {
        db: pool,
        availability: engine::availability::Coalescer::spawn(reads.clone(), server.coalesced_read_concurrency),
        reads,
        config: Arc::new(server),
        shutdown: stop_rx,
        draining: draining.clone(),
        keys: Arc::new(keys),
        engine,
        feed,
    });
    let app = http::app(state);
    // Draining starts with the signal: not ready at once (load balancers stop sending), still
    // serving for the drain delay; then background tasks and event streams stop, no new
    // connection is accepted, and requests in flight finish.
    let drain = async move {
        shutdown.await;
        draining.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(delay = ?drain_delay, "draining: /health/ready answers 503, requests are still served");
        tokio::time::sleep(drain_delay).await;
        let _ = stop_tx.send(true);
    };
    let result = axum::serve(listener, app).with_graceful_shutdown(drain).await.map_err(RunError::Serve);
    for task in tasks {
        let _ = task.await;
    }
    result
}

/// Resolves on SIGINT, SIGTERM or SIGHUP (the terminal that started the service closed): all
/// three drain the service and stop the cluster it started.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let signal = |kind: tokio::signal::unix::SignalKind, name: &'static str| async move {
        match tokio::signal::unix::signal(kind) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for {name}");
                std::future::pending::<()>().await;
            }
        }
    };
    use tokio::signal::unix::SignalKind;
    tokio::select! {
        () = ctrl_c => {},
        () = signal(SignalKind::terminate(), "SIGTERM") => {},
        () = signal(SignalKind::hangup(), "SIGHUP") => {},
    }
    tracing::info!("shutdown signal received, draining");
}
