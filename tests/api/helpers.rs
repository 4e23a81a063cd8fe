//! The test harness: one throwaway PostgreSQL per test binary (or the server in DATABASE_URL),
//! a migrated template database, and per test a fresh database copied from it plus the service
//! on port 0.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use inventory::config::{DatabaseArgs, ServerArgs};
use inventory::local_pg::{Durability, LocalPostgres};
use inventory::store::db::Db;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

struct TestServer {
    /// URL of a database on the server to run CREATE DATABASE from.
    admin_url: String,
    template: String,
    /// Keeps the throwaway cluster's handle alive for the whole process.
    _local: Option<LocalPostgres>,
}

static SERVER: OnceLock<TestServer> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// Replaces the database name in a PostgreSQL URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

fn server() -> &'static TestServer {
    // Started on a plain thread with its own runtime: tests each run their own runtime and
    // a runtime cannot be blocked on from inside another.
    SERVER.get_or_init(|| std::thread::spawn(start_server).join().expect("test database setup panicked"))
}

fn start_server() -> TestServer {
    let pid = std::process::id();
    let (admin_url, local) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let dir = std::env::temp_dir().join(format!("inventory-test-{pid}"));
            let local = LocalPostgres::start(&dir, Durability::Throwaway)
                .unwrap_or_else(|err| panic!("cannot start a throwaway PostgreSQL: {err}"));
            spawn_reaper(pid, &local, dir);
            (local.url("postgres"), Some(local))
        }
    };
    let template = format!("inventory_template_{pid}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let admin = PgPool::connect(&admin_url).await.expect("connect to the test server");
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {template}"))).execute(&admin).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {template}"))).execute(&admin).await.unwrap();
        admin.close().await;
        let pool = PgPool::connect(&with_database(&admin_url, &template)).await.unwrap();
        inventory::store::db::MIGRATOR.run(&pool).await.expect("migrations apply to an empty database");
        pool.close().await;
    });
    TestServer { admin_url, template, _local: local }
}

/// The test process cannot run destructors for statics, so a detached watchdog stops the
/// throwaway cluster and deletes its directory once this process has exited.
#[allow(clippy::zombie_processes)] // it must outlive us: never waited for, by design
fn spawn_reaper(pid: u32, local: &LocalPostgres, dir: PathBuf) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {} >/dev/null 2>&1; rm -rf '{}'",
        local.stop_command_line(),
        dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the cluster reaper");
}

/// Database settings as the service would get them from the command line.
pub fn database_args(url: Option<String>) -> DatabaseArgs {
    DatabaseArgs { database_url: url, ..DatabaseArgs::default() }
}

/// A fresh database copied from the migrated template; returns its URL.
pub async fn fresh_database() -> String {
    let server = server();
    let name = format!("inventory_test_{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let admin = PgPool::connect(&server.admin_url).await.expect("connect to the test server");
    let sql = format!("CREATE DATABASE {name} TEMPLATE {}", server.template);
    let mut tries = 0;
    // Concurrent copies of one template can collide briefly; try again.
    while let Err(err) = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).execute(&admin).await {
        tries += 1;
        assert!(tries < 20, "CREATE DATABASE keeps failing: {err}");
        tokio::time::sleep(Duration::from_millis(50 * tries)).await;
    }
    admin.close().await;
    with_database(&server.admin_url, &name)
}

/// A fresh database with nothing in it, not even the migrations; returns its URL.
pub async fn empty_database() -> String {
    let server = server();
    let name = format!("inventory_empty_{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let admin = PgPool::connect(&server.admin_url).await.expect("connect to the test server");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.unwrap();
    admin.close().await;
    with_database(&server.admin_url, &name)
}

/// Whether the local PostgreSQL server binaries are installed; when not, the test says it is
/// SKIPPED (and fails under CI, where they must be).
pub fn local_postgres_or_skip(test: &str) -> bool {
    if inventory::local_pg::find_bin_dir().is_some() {
        return true;
    }
    skip(test, "no local PostgreSQL server binaries (initdb, pg_ctl, postgres): install them to run it");
    false
}

/// The service running on port 0 against its own fresh database.
#[derive(Debug)]
pub struct TestApp {
    pub base: String,
    pub db: PgPool,
    pub db_url: String,
    pub client: reqwest::Client,
    /// Checks the invariants (and that the service did not panic) when the test is done.
    pub teardown: TearDown,
}

/// The end of every test, which no test can forget: when the [`TestApp`] is dropped at the end
/// of a test that has not failed, the contract's invariants are checked over its database, and
/// a service task that panicked fails the test.
#[derive(Debug)]
pub struct TearDown {
    db_url: String,
    check: std::sync::atomic::AtomicBool,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl TearDown {
    pub fn new(db_url: &str, server: Option<tokio::task::JoinHandle<()>>) -> Self {
        Self { db_url: db_url.to_owned(), check: std::sync::atomic::AtomicBool::new(true), server }
    }
}

impl Drop for TearDown {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Some(server) = self.server.take() {
            if server.is_finished() {
                if let Some(Err(err)) = futures::FutureExt::now_or_never(server) {
                    panic!("the service task failed: {err}");
                }
            } else {
                server.abort();
            }
        }
        if !self.check.load(Ordering::SeqCst) {
            return;
        }
        // Drop cannot await: check on a thread of its own, with a runtime of its own.
        let url = self.db_url.clone();
        let violations = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.ok()?;
                inventory::store::invariants::violations(&mut conn).await.ok()
            })
        })
        .join()
        .expect("the invariant check panicked");
        if let Some(violations) = violations {
            assert!(
                violations.is_empty(),
                "invariants broken at the end of the test:\n{}",
                violations.iter().map(|v| format!("  {v}\n")).collect::<String>()
            );
        }
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(ServerArgs::default()).await
    }

    pub async fn spawn_with(server: ServerArgs) -> Self {
        Self::spawn_with_database_args(server, database_args(None)).await
    }

    /// Like [`TestApp::spawn_with`], with the pool built from `database` (lock timeout, pool
    /// size, …); its `database_url` is ignored in favour of a fresh database.
    pub async fn spawn_with_database_args(server: ServerArgs, database: DatabaseArgs) -> Self {
        let db_url = fresh_database().await;
        let db = inventory::store::db::connect(&db_url, &database).await.expect("connect to the test database");
        Self::serve(db.pool().clone(), db, db_url, server).await
    }

    /// The service on the database of `db_url`, reached through `service_url` (a
    /// fault-injecting proxy, say); the test's own pool `db` connects directly.
    pub async fn spawn_through(server: ServerArgs, db_url: String, service_url: &str) -> Self {
        Self::spawn_through_with(server, db_url, service_url, database_args(None)).await
    }

    /// [`TestApp::spawn_through`] with the service's pool built from `database` (a pooler in
    /// between, say); its `database_url` is ignored in favour of `service_url`.
    pub async fn spawn_through_with(
        server: ServerArgs,
        db_url: String,
        service_url: &str,
        database: DatabaseArgs,
    ) -> Self {
        let service = inventory::store::db::connect(service_url, &database).await.expect("connect via route");
        let db =
            inventory::store::db::connect(&db_url, &database_args(None)).await.expect("connect to the test database");
        Self::serve(db.pool().clone(), service, db_url, server).await
    }

    /// The service with a pool that points at nothing: the database is "down".
    pub async fn spawn_with_dead_database() -> Self {
        let port = crate::drills::free_port();
        let db_url = format!("postgres://postgres@127.0.0.1:{port}/nothing");
        let db =
            sqlx::postgres::PgPoolOptions::new().acquire_timeout(Duration::from_secs(1)).connect_lazy(&db_url).unwrap();
        Self::serve(db.clone(), db.into(), db_url, ServerArgs::default()).await
    }

    async fn serve(db: PgPool, service_pool: Db, db_url: String, mut server: ServerArgs) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        server.listen = listener.local_addr().unwrap();
        let base = format!("http://{}", server.listen);
        let pool = service_pool;
        let task = tokio::spawn(async move {
            inventory::startup::serve(listener, pool, server, std::future::pending()).await.unwrap();
        });
        let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
        let teardown = TearDown::new(&db_url, Some(task));
        Self { base, db, db_url, client, teardown }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request with an optional JSON body and returns status and parsed body
    /// (`Value::Null` for an empty body).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.client.request(method, self.url(path));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.expect("request reaches the service");
        let status = res.status();
        let bytes = res.bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("a JSON body") };
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// Creates a warehouse (priority given) and asserts it worked.
    pub async fn warehouse(&self, code: &str, priority: i64) {
        let (status, body) =
            self.put(&format!("/v1/warehouses/{code}"), json!({"name": code, "priority": priority})).await;
        assert!(status.is_success(), "{status} {body}");
    }

    pub async fn sku(&self, sku: &str) {
        let (status, body) = self.put(&format!("/v1/skus/{sku}"), json!({"name": sku})).await;
        assert!(status.is_success(), "{status} {body}");
    }

    pub async fn receive(&self, sku: &str, warehouse: &str, quantity: i64) -> Value {
        let (status, body) =
            self.post("/v1/stock/receive", json!({"sku": sku, "warehouse": warehouse, "quantity": quantity})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// `(on_hand, reserved)` of a level straight from the database ((0, 0) when absent).
    pub async fn level(&self, sku: &str, warehouse: &str) -> (i64, i64) {
        sqlx::query_as("SELECT on_hand, reserved FROM stock_levels WHERE sku = $1 AND warehouse = $2")
            .bind(sku)
            .bind(warehouse)
            .fetch_optional(&self.db)
            .await
            .unwrap()
            .unwrap_or((0, 0))
    }

    pub async fn ledger_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM ledger").fetch_one(&self.db).await.unwrap()
    }

    /// For a test that breaks the invariants on purpose: no check at the end.
    pub fn expect_broken_invariants(&self) {
        self.teardown.check.store(false, Ordering::SeqCst);
    }

    /// Deadlocks PostgreSQL has detected in this test's database so far.
    pub async fn deadlocks(&self) -> i64 {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.db_url).await.unwrap();
        sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }

    /// Checks the invariants, then closes the service's connections (their backends report
    /// their statistics as they exit) and asserts that no deadlock happened since `before`
    /// ([`TestApp::deadlocks`]). The service retries a deadlock quietly, so only the database's
    /// own count can show one. Ends the service's use of its database.
    pub async fn assert_invariants_and_no_deadlock(&self, before: i64) {
        self.assert_invariants().await;
        self.db.close().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(self.deadlocks().await - before, 0, "PostgreSQL detected deadlocks (retried by the service)");
    }

    /// A transaction begun as the service begins its writers (`db::begin_writer`): announced,
    /// so ledger pages wait for it and the event relay keeps it among the running writers, and
    /// allowed to insert events.
    pub async fn begin_writer(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let db = inventory::store::db::Db::from(self.db.clone());
        inventory::store::db::begin_writer(&db, Default::default()).await.unwrap()
    }

    /// The contract's invariants over the whole test database: panics listing every violation.
    pub async fn assert_invariants(&self) {
        let mut conn = self.db.acquire().await.unwrap();
        let violations = inventory::store::invariants::violations(&mut conn).await.unwrap();
        assert!(
            violations.is_empty(),
            "invariants broken:\n{}",
            violations.iter().map(|v| format!("  {v}\n")).collect::<String>()
        );
    }
}

/// Whether this run is CI (`CI` set to anything but empty or `false`), where nothing may skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Declares that `test` cannot run here, and why. Under CI that is a failure. Elsewhere the
/// line goes straight to the terminal's stderr, past the test harness's output capture, so the
/// skip shows in the normal `cargo test` output next to the `ok` the harness prints.
pub fn skip(test: &str, reason: &str) {
    assert!(!in_ci(), "{test} cannot be skipped under CI: {reason}");
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "\nSKIPPED {test}: {reason}");
}

/// Asserts a problem+json answer with the given status and code; returns the body.
pub async fn assert_problem(res: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(res.status(), status);
    let content_type = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = res.json().await.expect("a JSON problem body");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    for member in ["type", "title", "detail", "request_id"] {
        assert!(body[member].is_string(), "problem lacks {member}: {body}");
    }
    body
}
