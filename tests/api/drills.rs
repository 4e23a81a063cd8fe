//! Fault drills: the service killed mid-load, its database stopped and started under it, a stock
//! row locked by someone else. Each drill is bounded in time, stays on loopback, and ends by
//! checking the contract's invariants and that no request was applied twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use inventory::config::ServerArgs;
use inventory::local_pg::{Durability, LocalPostgres};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};

use crate::helpers::{self, TestApp, assert_problem};

const BIN: &str = env!("CARGO_BIN_EXE_inventory");

/// The one warehouse of the load drills: every reservation has exactly one allocation, so each
/// effect shows up as exactly one ledger entry.
const WAREHOUSE: &str = "W1";
const LOAD_SKUS: [&str; 4] = ["L0", "L1", "L2", "L3"];
/// Stock per load SKU: far more than the load can reserve, so every reservation is granted.
const INITIAL_STOCK: i64 = 1_000_000;
/// Most kill -9 rounds of the crash drill before it gives up finding its window (it stops at
/// the first round that finds it; a fresh-clone CI run once needed more than 15).
const MAX_KILLS: usize = 40;

// ---------------------------------------------------------------------------------------------
// Drill 1: kill -9 mid-load
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_service_killed_mid_load_applies_every_acknowledged_request_exactly_once_after_restart() {
    let db_url = helpers::fresh_database().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let log = DrillLog::new("crash");
    let mut service = Service::start(&db_url, &listen, log.path(), &[]);
    let app = app_for(&listen, &db_url).await;
    assert!(wait_ready(&app.base, Duration::from_secs(30)).await.is_some(), "service did not start ({log})");
    stock_up(&app).await;

    // Kill again and again until a kill has landed in the window this drill is about: a request
    // in flight (cut off), and a request committed but not yet answered (its retry is replayed).
    let http = load_client();
    let started = Instant::now();
    let mut clients: Vec<Client> = (0..16).map(|id| Client::new(id, "crash")).collect();
    let mut kills = 0;
    let tally = loop {
        kills += 1;
        let stop = Arc::new(AtomicBool::new(false));
        let fault = Arc::new(AtomicBool::new(false));
        let running: Vec<_> = clients
            .drain(..)
            .map(|c| tokio::spawn(c.drive(http.clone(), app.base.clone(), stop.clone(), fault.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(600 + rand::random_range(0..400))).await;
        fault.store(true, Ordering::SeqCst);
        let killed = Command::new("kill").args(["-9", &service.pid().to_string()]).status().unwrap();
        assert!(killed.success(), "kill -9 failed");
        service.reap();
        service = Service::start(&db_url, &listen, log.path(), &[]);
        wait_ready(&app.base, Duration::from_secs(30)).await.unwrap_or_else(|| panic!("no restart ({log})"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        clients = join_all(running).await.into_iter().map(Result::unwrap).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        clients =
            join_all(clients.into_iter().map(|c| c.retry_pending(http.clone(), app.base.clone(), deadline))).await;
        let tally = Tally::of(&clients);
        if (tally.cut_off > 0 && tally.replayed > 0) || kills >= MAX_KILLS {
            break tally;
        }
    };
    eprintln!(
        "crash drill: {} requests driven in {:?} by {} clients; {kills} kill -9 and restarts; {} in flight at a \
         kill, {} refused while down; {} retries, {} of them replayed (committed, answer lost); server errors {:?}",
        tally.driven,
        started.elapsed(),
        clients.len(),
        tally.cut_off,
        tally.refused,
        tally.retries,
        tally.replayed,
        tally.server_errors,
    );
    assert!(tally.driven >= 100, "too little load to mean anything: {}", tally.driven);
    assert!(
        tally.cut_off > 0 && tally.replayed > 0,
        "after {kills} kills no request was caught between commit and answer ({} cut off, {} replayed): not a drill",
        tally.cut_off,
        tally.replayed
    );
    let unexpected: Vec<&String> =
        tally.server_errors.keys().filter(|k| *k != "503 unavailable" && *k != "504 outcome_unknown").collect();
    assert!(unexpected.is_empty(), "server errors other than 503 unavailable / 504 outcome_unknown: {unexpected:?}");

    let violations = verify_exactly_once(&app, &clients, "crash").await;
    eprintln!("crash drill: {violations} violation(s) found");
    service.stop();
}

// ---------------------------------------------------------------------------------------------
// Drill 2: PostgreSQL stopped (immediate) and started again under a running service
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_database_stopped_under_load_gives_quick_503s_and_the_service_recovers_by_itself() {
    if !crate::helpers::local_postgres_or_skip(
        "drills::a_database_stopped_under_load_gives_quick_503s_and_the_service_recovers_by_itself",
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("inventory-drill-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cluster = Cluster { dir: dir.clone(), stop: None };
    let local = start_cluster(dir.clone()).await;
    let stop_line = local.stop_command_line();
    cluster.stop = Some(stop_line.clone());
    let port = local.port();
    inventory::store::db::ensure_database(&local.url("postgres"), "drill").await.unwrap();
    // A throwaway cluster runs with synchronous_commit=off: a commit is acknowledged before its
    // WAL is written, and an immediate stop loses it (seen here: a fulfil answered 200, gone
    // after the restart). The service's own clusters are durable; so must this database be for
    // "acknowledged means applied" to hold. Written WAL survives a PostgreSQL crash even with
    // fsync off, since the kernel still has it.
    let mut admin = PgConnection::connect(&local.url("postgres")).await.unwrap();
    sqlx::query("ALTER DATABASE drill SET synchronous_commit = on").execute(&mut admin).await.unwrap();
    admin.close().await.unwrap();
    let db_url = local.url("drill");

    // A short acquire timeout keeps the outage drill quick; the 503 must come within it.
    let acquire_timeout = Duration::from_secs(2);
    let listen = format!("127.0.0.1:{}", free_port());
    let log = DrillLog::new("dbrestart");
    let timeout_arg = acquire_timeout.as_secs().to_string();
    let service = Service::start(&db_url, &listen, log.path(), &["--db-acquire-timeout-secs", &timeout_arg]);
    let app = app_for(&listen, &db_url).await;
    assert!(wait_ready(&app.base, Duration::from_secs(30)).await.is_some(), "service did not start ({log})");
    stock_up(&app).await;
    app.sku("AFTER").await;
    app.receive("AFTER", WAREHOUSE, 10).await;
    // The drill's own pool must not hold the old connections across the outage.
    app.db.close().await;

    let stop = Arc::new(AtomicBool::new(false));
    let fault = Arc::new(AtomicBool::new(false));
    let http = load_client();
    let started = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|id| {
            tokio::spawn(Client::new(id, "dbdown").drive(http.clone(), app.base.clone(), stop.clone(), fault.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    fault.store(true, Ordering::SeqCst);
    let stopped = tokio::task::spawn_blocking(move || Command::new("sh").args(["-c", &stop_line]).output())
        .await
        .unwrap()
        .unwrap();
    assert!(stopped.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&stopped.stderr));
    let stopped_at = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let clients: Vec<Client> = join_all(clients).await.into_iter().map(Result::unwrap).collect();

    // While PostgreSQL is down: every database-backed request is a quick 503, liveness stays up.
    let bound = acquire_timeout + Duration::from_secs(2);
    let down_reserve = json!({"order_id": "down-reserve", "lines": [{"sku": "AFTER", "quantity": 1}]});
    let down_receive = json!({"sku": "AFTER", "warehouse": WAREHOUSE, "quantity": 5, "reference": "down-receive"});
    let probes = [
        ("POST", "/v1/reservations", Some(down_reserve)),
        ("POST", "/v1/stock/receive", Some(down_receive)),
        ("GET", "/v1/stock/AFTER", None),
        ("GET", "/v1/reservations?order_id=down-reserve", None),
        ("GET", "/health/ready", None),
    ];
    let answers = join_all(probes.iter().enumerate().map(|(i, (method, path, body))| {
        let app = &app;
        async move {
            let mut req = app.client.request(method.parse().unwrap(), app.url(path));
            if let Some(body) = body {
                req = req.header("Idempotency-Key", format!("down-{i}")).json(body);
            }
            let sent = Instant::now();
            let res = req.timeout(Duration::from_secs(20)).send().await;
            (*method, *path, sent.elapsed(), res)
        }
    }))
    .await;
    let mut slowest = Duration::ZERO;
    for (method, path, took, res) in answers {
        let res = res.unwrap_or_else(|err| panic!("{method} {path} while the database is down: no answer ({err})"));
        assert_problem(res, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
        assert!(took <= bound, "{method} {path} took {took:?} to answer 503 while the database is down");
        slowest = slowest.max(took);
    }
    let (live, _) = app.get("/health/live").await;
    assert_eq!(live, StatusCode::OK, "the process itself stays live");

    // PostgreSQL comes back on the same port; the service must notice by itself.
    let local = start_cluster(dir.clone()).await;
    assert_eq!(local.port(), port, "the cluster came back on another port");
    let back = Instant::now();
    let recovered = wait_ready(&app.base, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("/health/ready not 200 within 15 s of the database's return ({log})"));
    let (status, body) = app
        .post("/v1/reservations", json!({"order_id": "after-outage", "lines": [{"sku": "AFTER", "quantity": 2}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let first_write = back.elapsed();

    let deadline = Instant::now() + Duration::from_secs(30);
    let clients =
        join_all(clients.into_iter().map(|c| c.retry_pending(http.clone(), app.base.clone(), deadline))).await;
    let tally = Tally::of(&clients);
    eprintln!(
        "database restart drill: {} requests driven by {} clients; immediate stop at {stopped_at:?}; {} \
         unanswered or 503 when it stopped, {} during the outage; outage probes answered 503 within {slowest:?}; \
         ready {recovered:?} and first write {first_write:?} after the cluster was back on port {port}; {} retries \
         ({} replayed); server errors {:?}",
        tally.driven,
        clients.len(),
        tally.cut_off,
        tally.refused,
        tally.retries,
        tally.replayed,
        tally.server_errors,
    );
    assert!(tally.driven >= 50, "too little load to mean anything: {}", tally.driven);
    // 503 before anything was committed; 504 when the connection broke during COMMIT (the
    // outcome is unknown: the keyed retry above tells, and applies nothing twice).
    assert!(
        tally.server_errors.keys().all(|k| k == "503 unavailable" || k == "504 outcome_unknown"),
        "a database outage must be 503 unavailable or 504 outcome_unknown, nothing else: {:?}",
        tally.server_errors
    );

    let app = TestApp { db: PgPool::connect(&db_url).await.unwrap(), ..app };
    // What was refused during the outage changed nothing.
    let down: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM reservations WHERE order_id = 'down-reserve')
              + (SELECT count(*) FROM ledger WHERE reference = 'down-receive')",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(down, 0, "a request answered 503 during the outage left a trace");
    assert_eq!(app.level("AFTER", WAREHOUSE).await, (10, 2));
    let violations = verify_exactly_once(&app, &clients, "dbdown").await;
    eprintln!("database restart drill: {violations} violation(s) found");
    app.db.close().await;
    drop(service);
    drop(local);
    drop(cluster);
}

/// Starts (or restarts) the drill's own cluster under `dir`, off the async threads.
async fn start_cluster(dir: PathBuf) -> LocalPostgres {
    tokio::task::spawn_blocking(move || LocalPostgres::start(&dir, Durability::Throwaway))
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("cannot start the drill's PostgreSQL: {err}"))
}

/// A test's own PostgreSQL cluster: stopped and deleted when dropped, also when the test fails.
pub(crate) struct Cluster {
    pub dir: PathBuf,
    /// Shell command line of an immediate stop, once the cluster was started.
    pub stop: Option<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop {
            let _ = Command::new("sh").args(["-c", &format!("{stop} >/dev/null 2>&1")]).stdin(Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Drill 3: a stock row locked by someone else
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_stuck_row_lock_fails_its_sku_fast_while_other_skus_keep_selling() {
    let lock_timeout = Duration::from_millis(500);
    let mut database = helpers::database_args(None);
    database.db_lock_timeout_ms = lock_timeout.as_millis() as u64;
    let app = TestApp::spawn_with_database_args(ServerArgs::default(), database).await;
    app.warehouse(WAREHOUSE, 1).await;
    app.sku("STUCK").await;
    app.sku("FREE").await;
    app.receive("STUCK", WAREHOUSE, 100).await;
    app.receive("FREE", WAREHOUSE, 1000).await;

    // Someone else (a hung migration, a console session) holds the STUCK row.
    let mut locker = PgConnection::connect(&app.db_url).await.unwrap();
    let mut held = locker.begin().await.unwrap();
    let on_hand: i64 =
        sqlx::query_scalar("SELECT on_hand FROM stock_levels WHERE sku = 'STUCK' AND warehouse = 'W1' FOR UPDATE")
            .fetch_one(&mut *held)
            .await
            .unwrap();
    assert_eq!(on_hand, 100);

    // Requests for STUCK, each under its own key so they can be retried later.
    let stuck_calls: Vec<(String, &str, Value)> = (0..8)
        .map(|i| {
            let key = format!("stuck-{i}");
            if i % 2 == 0 {
                (
                    key,
                    "/v1/reservations",
                    json!({"order_id": format!("stuck-order-{i}"), "lines": [{"sku": "STUCK", "quantity": 2}]}),
                )
            } else {
                (
                    key,
                    "/v1/stock/receive",
                    json!({"sku": "STUCK", "warehouse": WAREHOUSE, "quantity": 3, "reference": format!("stuck-{i}")}),
                )
            }
        })
        .collect();
    let stuck = join_all(stuck_calls.iter().map(|(key, path, body)| {
        let app = &app;
        async move {
            let sent = Instant::now();
            let res = app.client.post(app.url(path)).header("Idempotency-Key", key).json(body).send().await.unwrap();
            let took = sent.elapsed();
            assert_problem(res, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
            took
        }
    }));
    // Meanwhile 50 requests for FREE, all of which must succeed.
    let free = join_all((0..50).map(|i| {
        let app = &app;
        async move {
            let sent = Instant::now();
            let (status, body) = if i % 2 == 0 {
                app.post(
                    "/v1/reservations",
                    json!({"order_id": format!("free-{i}"), "lines": [{"sku": "FREE", "quantity": 1}]}),
                )
                .await
            } else {
                app.post("/v1/stock/receive", json!({"sku": "FREE", "warehouse": WAREHOUSE, "quantity": 1})).await
            };
            assert!(status.is_success(), "a FREE request failed while STUCK is locked: {status} {body}");
            sent.elapsed()
        }
    }));
    let (stuck_times, free_times) = tokio::join!(stuck, free);
    // lock_timeout bounds each lock acquisition, not the statement: a request queued behind
    // another waiter first waits for the row's tuple lock, then for the holder's transaction,
    // so one of them takes about twice the timeout (seen: 1.0-1.1 s of 500 ms).
    // The slack is for a loaded 2-core machine: what matters is that a stuck request fails in
    // the order of the lock timeout, not after the request timeout (30 s).
    let bound = lock_timeout * 2 + Duration::from_secs(3);
    let (stuck_min, stuck_max) = min_max(&stuck_times);
    assert!(stuck_max <= bound, "a STUCK request took {stuck_max:?} to fail; the lock timeout is {lock_timeout:?}");
    assert!(
        stuck_min >= lock_timeout.mul_f32(0.8),
        "a STUCK request failed after {stuck_min:?}, before the lock timeout: it was not the lock"
    );
    let (_, free_max) = min_max(&free_times);

    // The pool is not exhausted: every connection the refused requests used came back, and one
    // more request goes through at once, the row still locked.
    let (size, idle) = settled_pool(&app.db).await;
    assert_eq!(idle, size as usize, "connections still checked out after the stuck requests failed");
    let sent = Instant::now();
    let (status, body) =
        app.post("/v1/stock/receive", json!({"sku": "FREE", "warehouse": WAREHOUSE, "quantity": 1})).await;
    let after = sent.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(after < Duration::from_secs(3), "a request after the stuck ones took {after:?}");

    // Nothing of the refused requests was applied.
    assert_eq!(app.level("STUCK", WAREHOUSE).await, (100, 0));

    held.rollback().await.unwrap();
    locker.close().await.unwrap();

    // Released: the same requests, same keys, now succeed, once.
    let mut replays = 0;
    for (key, path, body) in &stuck_calls {
        for attempt in 0..2 {
            let res = app.client.post(app.url(path)).header("Idempotency-Key", key).json(body).send().await.unwrap();
            assert!(res.status().is_success(), "{key} after the lock was released: {}", res.status());
            let replayed = res.headers().get("idempotent-replayed").is_some();
            assert_eq!(replayed, attempt == 1, "{key}: a 503 must not be stored, a success must be");
            replays += usize::from(replayed);
        }
    }
    assert_eq!(app.level("STUCK", WAREHOUSE).await, (100 + 4 * 3, 4 * 2));
    assert_eq!(app.level("FREE", WAREHOUSE).await, (1000 + 25 + 1, 25));
    let entries: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, count(*) FROM ledger WHERE sku = 'STUCK' GROUP BY kind ORDER BY kind")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(entries, [("receive".to_owned(), 5), ("reserve".to_owned(), 4)], "each request applied once");
    app.assert_invariants().await;
    eprintln!(
        "stuck lock drill: {} STUCK requests failed 503 in {stuck_min:?}..{stuck_max:?} (lock timeout \
         {lock_timeout:?}); 50 FREE requests succeeded meanwhile, slowest {free_max:?}; next request {after:?}; \
         pool {idle}/{size} idle afterwards; {} retries after release succeeded once ({replays} replays); \
         invariants hold",
        stuck_calls.len(),
        stuck_calls.len(),
    );
}

/// `(size, idle)` of a pool once nothing holds a connection (background tasks borrow one
/// briefly, so this waits up to a second for the two to agree).
async fn settled_pool(pool: &PgPool) -> (u32, usize) {
    let started = Instant::now();
    loop {
        let (size, idle) = (pool.size(), pool.num_idle());
        if idle == size as usize || started.elapsed() > Duration::from_secs(1) {
            return (size, idle);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn min_max(times: &[Duration]) -> (Duration, Duration) {
    (times.iter().copied().min().unwrap_or_default(), times.iter().copied().max().unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// The load: order-service clients that reserve, then fulfil or release what they reserved
// ---------------------------------------------------------------------------------------------

/// One POST exactly as a client sends it, and sends it again after a fault: same key, same body.
#[derive(Debug, Clone)]
struct Call {
    key: String,
    path: String,
    /// `None`: an empty body (settle everything still held).
    body: Option<Value>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Reserve {
        order_id: String,
        sku: String,
        quantity: i64,
    },
    /// Fulfils or releases `quantity` units of a reservation the client was told was created.
    Settle {
        order_id: String,
        fulfil: bool,
        quantity: i64,
    },
}

/// A reservation a client was told about and has not settled yet.
#[derive(Debug, Clone)]
struct Created {
    order_id: String,
    id: String,
    sku: String,
    quantity: i64,
}

/// An answer the service owned up to.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Value,
    /// It carried `Idempotent-Replayed: true`.
    pub(crate) replayed: bool,
}

/// One load client and what it was told.
#[derive(Debug)]
struct Client {
    id: usize,
    tag: &'static str,
    next: usize,
    open: Vec<Created>,
    /// Every answered call with its answer, in the order the answers came.
    acked: Vec<(Call, StatusCode, Value)>,
    /// Calls without an answer yet, oldest first.
    pending: Vec<Call>,
    driven: usize,
    /// Unanswered calls sent before the fault was injected (in flight when it hit).
    cut_off: usize,
    /// Unanswered calls sent after it.
    refused: usize,
    retries: usize,
    replayed: usize,
    /// 5xx answers by "status code".
    server_errors: BTreeMap<String, usize>,
}

impl Client {
    fn new(id: usize, tag: &'static str) -> Self {
        Self {
            id,
            tag,
            next: 0,
            open: Vec::new(),
            acked: Vec::new(),
            pending: Vec::new(),
            driven: 0,
            cut_off: 0,
            refused: 0,
            retries: 0,
            replayed: 0,
            server_errors: BTreeMap::new(),
        }
    }

    /// Every other call settles the oldest open reservation (fulfil or release, all or one unit),
    /// the rest reserve 1–3 units of one SKU for a new order.
    fn next_call(&mut self) -> Call {
        let n = self.next;
        self.next += 1;
        let key = format!("{}-{}-{n}", self.tag, self.id);
        if n % 2 == 1 && !self.open.is_empty() {
            let r = self.open.remove(0);
            let fulfil = (n / 2).is_multiple_of(2);
            let (body, quantity) = if r.quantity > 1 && (n / 4).is_multiple_of(2) {
                (Some(json!({"lines": [{"sku": r.sku, "warehouse": WAREHOUSE, "quantity": 1}]})), 1)
            } else {
                (None, r.quantity)
            };
            let verb = if fulfil { "fulfil" } else { "release" };
            Call {
                key,
                path: format!("/v1/reservations/{}/{verb}", r.id),
                body,
                op: Op::Settle { order_id: r.order_id, fulfil, quantity },
            }
        } else {
            let order_id = format!("{}-order-{}-{n}", self.tag, self.id);
            let sku = LOAD_SKUS[(self.id + n) % LOAD_SKUS.len()].to_owned();
            let quantity = 1 + (n % 3) as i64;
            Call {
                key,
                path: "/v1/reservations".into(),
                body: Some(json!({"order_id": order_id, "lines": [{"sku": sku, "quantity": quantity}]})),
                op: Op::Reserve { order_id, sku, quantity },
            }
        }
    }

    /// Sends calls until `stop`; unanswered ones are kept for a retry.
    async fn drive(
        mut self,
        http: reqwest::Client,
        base: String,
        stop: Arc<AtomicBool>,
        fault: Arc<AtomicBool>,
    ) -> Self {
        while !stop.load(Ordering::SeqCst) {
            let call = self.next_call();
            let after_fault = fault.load(Ordering::SeqCst);
            self.driven += 1;
            match self.send(&http, &base, &call).await {
                Some(answer) => self.record(call, answer),
                None => {
                    if after_fault {
                        self.refused += 1;
                    } else {
                        self.cut_off += 1;
                    }
                    self.pending.push(call);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        self
    }

    /// Sends every unanswered call again, same key and body, until it is answered.
    async fn retry_pending(mut self, http: reqwest::Client, base: String, deadline: Instant) -> Self {
        for call in std::mem::take(&mut self.pending) {
            loop {
                self.retries += 1;
                if let Some(answer) = self.send(&http, &base, &call).await {
                    self.replayed += usize::from(answer.replayed);
                    self.record(call, answer);
                    break;
                }
                assert!(Instant::now() < deadline, "{} {} is still unanswered", call.key, call.path);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self
    }

    fn record(&mut self, call: Call, answer: Answer) {
        if let Op::Reserve { order_id, sku, quantity } = &call.op
            && answer.status == StatusCode::CREATED
        {
            let id = answer.body["id"].as_str().unwrap_or_default().to_owned();
            self.open.push(Created { order_id: order_id.clone(), id, sku: sku.clone(), quantity: *quantity });
        }
        self.acked.push((call, answer.status, answer.body));
    }

    /// `Some` for a 2xx or 4xx answer (except "still running"); `None` for no answer or a 5xx.
    async fn send(&mut self, http: &reqwest::Client, base: &str, call: &Call) -> Option<Answer> {
        let mut req = http.post(format!("{base}{}", call.path)).header("Idempotency-Key", &call.key);
        if let Some(body) = &call.body {
            req = req.json(body);
        }
        let res = req.send().await.ok()?;
        let status = res.status();
        let replayed = res.headers().get("idempotent-replayed").is_some();
        let bytes = res.bytes().await.ok()?;
        match stand_by(&call.key, status, &bytes) {
            Ok(body) => Some(Answer { status, body, replayed }),
            Err(Unsettled::ServerError(what)) => {
                *self.server_errors.entry(what).or_default() += 1;
                None
            }
            Err(Unsettled::InProgress) => None,
        }
    }
}

/// Why an answer to a keyed call settles nothing for a client that retries it.
#[derive(Debug)]
pub(crate) enum Unsettled {
    /// A 5xx, as "status code" (`503 unavailable`).
    ServerError(String),
    /// The first try with the key is still running.
    InProgress,
}

/// Reads the answer to the keyed call `key`: its JSON body when a client can stand by it (a 2xx,
/// or a 4xx other than "still running"), else why not.
pub(crate) fn stand_by(key: &str, status: StatusCode, bytes: &[u8]) -> Result<Value, Unsettled> {
    let body: Value = serde_json::from_slice(bytes)
        .unwrap_or_else(|err| panic!("{key} answered {status} with a body that is not JSON: {err}"));
    if status.is_server_error() {
        let code = body["code"].as_str().unwrap_or("?");
        return Err(Unsettled::ServerError(format!("{} {code}", status.as_u16())));
    }
    if status == StatusCode::CONFLICT && body["code"] == "idempotency_in_progress" {
        return Err(Unsettled::InProgress);
    }
    Ok(body)
}

/// The clients' figures, summed.
#[derive(Debug, Default)]
struct Tally {
    driven: usize,
    cut_off: usize,
    refused: usize,
    retries: usize,
    replayed: usize,
    server_errors: BTreeMap<String, usize>,
}

impl Tally {
    fn of(clients: &[Client]) -> Self {
        let mut t = Self::default();
        for c in clients {
            t.driven += c.driven;
            t.cut_off += c.cut_off;
            t.refused += c.refused;
            t.retries += c.retries;
            t.replayed += c.replayed;
            for (k, n) in &c.server_errors {
                *t.server_errors.entry(k.clone()).or_default() += n;
            }
        }
        t
    }
}

/// What the clients were told about one reservation, summed over its acknowledged calls.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Told {
    id: String,
    sku: String,
    quantity: i64,
    fulfilled: i64,
    released: i64,
}

impl Told {
    fn held(&self) -> i64 {
        self.quantity - self.fulfilled - self.released
    }

    fn status(&self) -> &'static str {
        match (self.held(), self.fulfilled) {
            (h, _) if h > 0 => "active",
            (_, f) if f > 0 => "fulfilled",
            _ => "released",
        }
    }
}

/// A reservation as stored, its allocations summed.
#[derive(Debug, sqlx::FromRow)]
struct Stored {
    order_id: String,
    id: String,
    status: String,
    sku: Option<String>,
    allocations: i64,
    quantity: i64,
    fulfilled: i64,
    released: i64,
}

/// Compares the database with what the clients were told, once every call is answered: every
/// acknowledged reservation exists exactly once under its acknowledged id, no other exists,
/// every acknowledged settle shows exactly once (allocations, ledger, levels), every key is
/// stored once, and the invariants hold. Panics listing every discrepancy; returns how many
/// there were (0).
async fn verify_exactly_once(app: &TestApp, clients: &[Client], tag: &str) -> usize {
    let mut problems = Vec::new();
    let mut told: BTreeMap<String, Told> = BTreeMap::new();
    let acked = || clients.iter().flat_map(|c| &c.acked);
    for c in clients {
        assert!(c.pending.is_empty(), "client {} still has unanswered calls", c.id);
    }
    for (call, status, body) in acked() {
        if let Op::Reserve { order_id, sku, quantity } = &call.op {
            if *status != StatusCode::CREATED {
                problems.push(format!("reserving {order_id} answered {status} {body}"));
                continue;
            }
            let id = body["id"].as_str().unwrap_or_default().to_owned();
            let entry = Told { id, sku: sku.clone(), quantity: *quantity, fulfilled: 0, released: 0 };
            if told.insert(order_id.clone(), entry).is_some() {
                problems.push(format!("{order_id} was acknowledged as created twice"));
            }
        }
    }
    for (call, status, body) in acked() {
        if let Op::Settle { order_id, fulfil, quantity } = &call.op {
            if *status != StatusCode::OK {
                problems.push(format!("settling {order_id} ({}) answered {status} {body}", call.path));
                continue;
            }
            let r = told.get_mut(order_id).expect("a settle only follows an acknowledged reservation");
            if *fulfil {
                r.fulfilled += quantity;
            } else {
                r.released += quantity;
            }
        }
    }

    // Reservations: exactly the acknowledged ones, each once, each as the clients were told.
    let rows: Vec<Stored> = sqlx::query_as(
        "SELECT r.order_id, r.id::text AS id, r.status, min(a.sku) AS sku, count(a.sku) AS allocations,
                coalesce(sum(a.quantity), 0)::bigint AS quantity,
                coalesce(sum(a.fulfilled), 0)::bigint AS fulfilled,
                coalesce(sum(a.released), 0)::bigint AS released
           FROM reservations r LEFT JOIN reservation_allocations a ON a.reservation_id = r.id
          WHERE r.order_id LIKE $1
          GROUP BY r.order_id, r.id, r.status",
    )
    .bind(format!("{tag}-%"))
    .fetch_all(&app.db)
    .await
    .unwrap();
    let mut by_order: HashMap<&str, Vec<&Stored>> = HashMap::new();
    for row in &rows {
        by_order.entry(row.order_id.as_str()).or_default().push(row);
    }
    for (order_id, found) in &by_order {
        if found.len() > 1 {
            problems.push(format!("order {order_id} has {} reservations", found.len()));
        }
        if !told.contains_key(*order_id) {
            problems.push(format!("reservation for {order_id} exists, but no client was told it was created"));
        }
    }
    for (order_id, t) in &told {
        let Some(found) = by_order.get(order_id.as_str()) else {
            problems.push(format!("acknowledged reservation {order_id} ({}) does not exist", t.id));
            continue;
        };
        let row = found[0];
        let actual = Told {
            id: row.id.clone(),
            sku: row.sku.clone().unwrap_or_default(),
            quantity: row.quantity,
            fulfilled: row.fulfilled,
            released: row.released,
        };
        if actual != *t || row.allocations != 1 || row.status != t.status() {
            problems.push(format!(
                "{order_id}: told {t:?} ({}), database has {actual:?} ({}, {} allocation(s))",
                t.status(),
                row.status,
                row.allocations
            ));
        }
    }

    // Levels: stock minus what was fulfilled; reserved is what is still held.
    for sku in LOAD_SKUS {
        let mine = told.values().filter(|t| t.sku == sku);
        let fulfilled: i64 = mine.clone().map(|t| t.fulfilled).sum();
        let held: i64 = mine.map(Told::held).sum();
        let expected = (INITIAL_STOCK - fulfilled, held);
        let level = app.level(sku, WAREHOUSE).await;
        if level != expected {
            problems
                .push(format!("{sku}: (on_hand, reserved) is {level:?}, the acknowledged effects give {expected:?}"));
        }
    }

    // Ledger: per reservation one reserve entry, and one fulfil / release entry if it had one.
    let entries: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT reference, kind, count(*) FROM ledger
          WHERE sku = ANY($1) AND kind IN ('reserve', 'fulfil', 'release') GROUP BY reference, kind",
    )
    .bind(LOAD_SKUS.to_vec())
    .fetch_all(&app.db)
    .await
    .unwrap();
    let mut expected_entries: HashMap<(String, &str), i64> = HashMap::new();
    for t in told.values() {
        expected_entries.insert((t.id.clone(), "reserve"), 1);
        if t.fulfilled > 0 {
            expected_entries.insert((t.id.clone(), "fulfil"), 1);
        }
        if t.released > 0 {
            expected_entries.insert((t.id.clone(), "release"), 1);
        }
    }
    for (reference, kind, n) in &entries {
        match expected_entries.remove(&(reference.clone(), kind.as_str())) {
            Some(1) if *n == 1 => {}
            _ => problems.push(format!("ledger has {n} {kind} entr(ies) for {reference}")),
        }
    }
    for ((reference, kind), _) in expected_entries {
        problems.push(format!("ledger lacks the {kind} entry of {reference}"));
    }

    // Outbox: one reservation.created event per reservation.
    let events: Vec<(String, i64)> = sqlx::query_as(
        "SELECT e.reservation_id::text, count(*) FROM events e JOIN reservations r ON r.id = e.reservation_id
          WHERE e.type = 'reservation.created' AND r.order_id LIKE $1 GROUP BY e.reservation_id",
    )
    .bind(format!("{tag}-%"))
    .fetch_all(&app.db)
    .await
    .unwrap();
    if events.len() != told.len() || events.iter().any(|(_, n)| *n != 1) {
        let doubled: Vec<_> = events.iter().filter(|(_, n)| *n != 1).collect();
        problems.push(format!(
            "{} reservations but {} have a reservation.created event; doubled: {doubled:?}",
            told.len(),
            events.len()
        ));
    }

    // Idempotency keys: every answered call stored exactly once (the key is the primary key).
    let answered = acked().count() as i64;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE key LIKE $1")
        .bind(format!("{tag}-%"))
        .fetch_one(&app.db)
        .await
        .unwrap();
    if stored != answered {
        problems.push(format!("{answered} calls were answered but {stored} idempotency keys are stored"));
    }

    let mut conn = app.db.acquire().await.unwrap();
    for v in inventory::store::invariants::violations(&mut conn).await.unwrap() {
        problems.push(format!("invariant: {v}"));
    }
    assert!(
        problems.is_empty(),
        "{} violation(s) after the drill:\n{}",
        problems.len(),
        problems.iter().map(|p| format!("  {p}\n")).collect::<String>()
    );
    problems.len()
}

// ---------------------------------------------------------------------------------------------
// The service binary and other plumbing
// ---------------------------------------------------------------------------------------------

/// The release binary serving one database on a fixed loopback port; killed if still running
/// when dropped.
pub(crate) struct Service {
    child: Child,
}

impl Service {
    pub(crate) fn start(database_url: &str, listen: &str, log: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(database_url, listen, log, extra, &[])
    }

    /// [`Service::start`] with these environment variables, and none of the `OTEL_*` ones this
    /// process has (a drill exports no traces unless it says so).
    pub(crate) fn start_with_env(
        database_url: &str,
        listen: &str,
        log: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let out = OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut command = Command::new(BIN);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(|name| name.starts_with("OTEL_")) {
                command.env_remove(name);
            }
        }
        let child = command
            .envs(env.iter().copied())
            .args(["serve", "--database-url", database_url, "--listen", listen])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self { child }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process after it was killed.
    pub(crate) fn reap(&mut self) {
        self.child.wait().unwrap();
    }

    /// SIGTERM and a graceful exit.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill").arg(self.pid().to_string()).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "graceful shutdown exits 0, got {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the service did not stop on SIGTERM");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The service's log for one drill, in the temp directory: deleted when the drill passes, kept
/// (and named) when it fails.
pub(crate) struct DrillLog(PathBuf);

impl DrillLog {
    pub(crate) fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("inventory-drill-{name}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl std::fmt::Display for DrillLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "service log: {}", self.0.display())
    }
}

impl Drop for DrillLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("drill failed; {self}");
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// A [`TestApp`] for a service running elsewhere (the binary), with its own pool on `db_url`.
pub(crate) async fn app_for(listen: &str, db_url: &str) -> TestApp {
    TestApp {
        base: format!("http://{listen}"),
        db: PgPool::connect(db_url).await.expect("connect to the drill's database"),
        db_url: db_url.to_owned(),
        client: reqwest::Client::new(),
        teardown: helpers::TearDown::new(db_url, None),
    }
}

/// The load's warehouse and SKUs, each with `INITIAL_STOCK` units.
async fn stock_up(app: &TestApp) {
    app.warehouse(WAREHOUSE, 1).await;
    for sku in LOAD_SKUS {
        app.sku(sku).await;
        app.receive(sku, WAREHOUSE, INITIAL_STOCK).await;
    }
}

fn load_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(32).build().unwrap()
}

/// A port nothing listens on now and that no earlier call in this test process handed out: the
/// kernel can give a just-released port again, and two services told the same port would leave
/// one of them unstarted while the other answers for both.
pub(crate) fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Polls `/health/ready` until it answers 200; returns how long that took.
pub(crate) async fn wait_ready(base: &str, deadline: Duration) -> Option<Duration> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let started = Instant::now();
    while started.elapsed() < deadline {
        if let Ok(res) = client.get(format!("{base}/health/ready")).send().await
            && res.status().is_success()
        {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
