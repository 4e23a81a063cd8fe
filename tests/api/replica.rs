//! Reads from a streaming replica: a primary and a hot standby of their own per test (from the
//! local PostgreSQL binaries, `pg_basebackup -R`), the service reading lag-tolerant data from
//! the standby while it keeps up, and from the primary — without a failed request — when it
//! lags or is down.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use inventory::config::ServerArgs;
use inventory::local_pg::{Durability, LocalPostgres};
use inventory::store::replica::{ReadReplica, Reads, Reason};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::drills::Cluster;
use crate::helpers::{self, TestApp};

/// A primary with a streaming standby, both stopped and deleted when dropped.
struct Replicated {
    primary: LocalPostgres,
    standby: LocalPostgres,
    standby_dir: PathBuf,
    _clusters: [Cluster; 2],
}

const DB: &str = "inventory";

impl Replicated {
    /// The pair for `test`, or `None` (the test is SKIPPED) without the server binaries.
    async fn start(test: &str) -> Option<Self> {
        let has_basebackup = inventory::local_pg::find_bin_dir().is_some_and(|dir| dir.join("pg_basebackup").is_file());
        if !has_basebackup {
            helpers::skip(test, "no local PostgreSQL server binaries with pg_basebackup: install them to run it");
            return None;
        }
        let root = std::env::temp_dir().join(format!("inventory-replica-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (primary_dir, standby_dir) = (root.join("primary"), root.join("standby"));
        let mut primary_guard = Cluster { dir: root.clone(), stop: None };
        let dir = primary_dir.clone();
        let primary = tokio::task::spawn_blocking(move || LocalPostgres::start(&dir, Durability::Throwaway))
            .await
            .unwrap()
            .unwrap_or_else(|err| panic!("cannot start the primary: {err}"));
        primary_guard.stop = Some(primary.stop_command_line());
        inventory::store::db::ensure_database(&primary.url("postgres"), DB).await.unwrap();
        let pool = PgPool::connect(&primary.url(DB)).await.unwrap();
        // The test clusters run with synchronous_commit off; the service's database commits as in
        // production (the lag measurement counts flushed commits).
        sqlx::query("ALTER DATABASE inventory SET synchronous_commit = on").execute(&pool).await.unwrap();
        inventory::store::db::MIGRATOR.run(&pool).await.unwrap();
        pool.close().await;
        let (dir, base) = (standby_dir.clone(), primary_dir.clone());
        let (primary, standby) = tokio::task::spawn_blocking(move || {
            let standby = primary.start_standby(&dir, Durability::Throwaway);
            (primary, standby)
        })
        .await
        .unwrap();
        let standby = standby.unwrap_or_else(|err| panic!("cannot start the standby of {}: {err}", base.display()));
        let standby_guard = Cluster { dir: standby_dir.clone(), stop: Some(standby.stop_command_line()) };
        Some(Self { primary, standby, standby_dir, _clusters: [standby_guard, primary_guard] })
    }

    /// The service on the primary, reading from the standby with lag bound `max_lag_ms`.
    async fn serve(&self, max_lag_ms: u64) -> (TestApp, Reads) {
        let args = inventory::config::DatabaseArgs { max_replica_lag_ms: max_lag_ms, ..helpers::database_args(None) };
        let db_url = self.primary.url(DB);
        let pool = inventory::store::db::connect(&db_url, &args).await.unwrap();
        let replica = ReadReplica::connect(&self.standby.url(DB), &args).unwrap();
        let reads = Reads::new(pool.clone(), Some(replica));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = ServerArgs { listen: listener.local_addr().unwrap(), ..ServerArgs::default() };
        let base = format!("http://{}", server.listen);
        let service = reads.clone();
        let task = tokio::spawn(async move {
            inventory::startup::serve_with_reads(listener, service, server, std::future::pending()).await.unwrap();
        });
        let app = TestApp {
            base,
            db: pool.pool().clone(),
            db_url: db_url.clone(),
            client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
            teardown: helpers::TearDown::new(&db_url, Some(task)),
        };
        (app, reads)
    }

    async fn standby_pool(&self) -> PgPool {
        PgPool::connect(&self.standby.url(DB)).await.unwrap()
    }
}

/// Waits until reads would go to the replica (its lag known and within the bound).
async fn until_replica_in_use(reads: &Reads, bound: Duration, within: Duration) {
    let started = Instant::now();
    while reads.lag().is_none_or(|lag| lag >= bound) {
        assert!(started.elapsed() < within, "the replica was not used within {within:?} (lag {:?})", reads.lag());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(reads: &Reads, reason: Reason) -> u64 {
    reads.tally().get(&reason).copied().unwrap_or(0)
}

fn primary_reads(reads: &Reads) -> u64 {
    reads.tally().iter().filter(|(r, _)| **r != Reason::Fresh).map(|(_, n)| n).sum()
}

async fn available(app: &TestApp, sku: &str) -> i64 {
    let (status, body) = app.get(&format!("/v1/availability?sku={sku}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["items"][0]["available"].as_i64().unwrap()
}

/// Typical numbers of a series of durations: (median, max).
fn median_max(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    (times[times.len() / 2], *times.last().unwrap())
}

#[tokio::test]
async fn lag_tolerant_reads_are_answered_by_the_replica_while_it_keeps_up() {
    let Some(pair) = Replicated::start("reads").await else { return };
    let (app, reads) = pair.serve(5_000).await;
    app.warehouse("BER", 1).await;
    app.warehouse("HAM", 2).await;
    for sku in ["A", "B"] {
        app.sku(sku).await;
        app.receive(sku, "BER", 10).await;
        app.receive(sku, "HAM", 5).await;
    }
    let (status, body) =
        app.put("/v1/channels/WEB", json!({"name": "web", "warehouses": [{"warehouse": "HAM"}]})).await;
    assert!(status.is_success(), "{body}");
    let (status, body) =
        app.post("/v1/reservations", json!({"order_id": "o-1", "lines": [{"sku": "A", "quantity": 3}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    until_replica_in_use(&reads, Duration::from_millis(500), Duration::from_secs(20)).await;
    // The lag while the replica keeps up, as the service measures it.
    let mut lags = Vec::new();
    for _ in 0..20 {
        lags.extend(reads.lag());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (median, max) = median_max(lags);
    eprintln!("replica lag while keeping up (idle primary): median {median:?}, max {max:?}");
    // The replica may be behind by its lag: wait for it to show the reservation.
    let started = Instant::now();
    while available(&app, "A").await != 12 {
        assert!(started.elapsed() < Duration::from_secs(5), "the replica never showed the reservation");
    }
    let moment = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fresh, elsewhere) = (count(&reads, Reason::Fresh), primary_reads(&reads));

    let (status, body) = app.get("/v1/availability?sku=A&sku=B&sku=NONE").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"][0], json!({"sku": "A", "available": 12, "warehouses": {"BER": 7, "HAM": 5}}));
    assert_eq!(body["items"][2]["available"], 0);
    let (status, body) = app.get("/v1/availability?sku=A&channel=WEB").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"][0]["available"], 5, "{body}");
    let (status, body) = app.get("/v1/stock?limit=3").await;
    assert_eq!((status, body["items"].as_array().unwrap().len()), (StatusCode::OK, 3), "{body}");
    let (status, body) = app.get(&format!("/v1/stock?cursor={}", body["next_cursor"].as_str().unwrap())).await;
    assert_eq!((status, body["items"].as_array().unwrap().len()), (StatusCode::OK, 1), "{body}");
    let (status, body) = app.get("/v1/stock/A").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["total"], json!({"on_hand": 15, "reserved": 3, "available": 12}));
    let as_of = moment.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (status, body) = app.get(&format!("/v1/stock/A?as_of={as_of}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["total"]["reserved"], 3, "{body}");
    // The ledger, page by page: every entry once, in the order the primary gives.
    let mut seen = Vec::new();
    let mut path = "/v1/ledger?limit=2".to_owned();
    let mut ledger_pages = 0;
    loop {
        ledger_pages += 1;
        let (status, body) = app.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        seen.extend(body["items"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        match body["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/ledger?limit=2&after={cursor}"),
            None => break,
        }
    }
    let expected: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM ledger ORDER BY txid, id").fetch_all(&app.db).await.unwrap();
    assert_eq!(seen, expected);
    let (status, body) = app.get("/v1/events").await;
    assert_eq!(status, StatusCode::OK);
    let kinds: Vec<&str> = body["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"reservation.created"), "{body}");
    let on_replica = count(&reads, Reason::Fresh) - fresh;
    assert_eq!(on_replica, 7 + ledger_pages, "every read went to the replica: {:?}", reads.tally());
    assert_eq!(primary_reads(&reads), elsewhere, "no read went to the primary: {:?}", reads.tally());

    // What the replica does not know is only the primary's to say.
    let (status, _) = app.get("/v1/stock/NOPE").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get("/v1/ledger?after=0190a5f0-0000-7000-8000-000000000000").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(count(&reads, Reason::NotFound), 2, "{:?}", reads.tally());
    // Reads, and the lag, in the metrics.
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for series in ["inventory_reads_total{path=\"replica\",reason=\"fresh\"}", "inventory_replica_lag_seconds "] {
        assert!(metrics.lines().any(|l| l.starts_with(series)), "{series} is not in /metrics");
    }
}

#[tokio::test]
async fn an_availability_read_after_a_reservation_reflects_it_within_the_lag_bound() {
    let Some(pair) = Replicated::start("bound").await else { return };
    let bound = Duration::from_millis(1000);
    let (app, reads) = pair.serve(bound.as_millis() as u64).await;
    app.warehouse("BER", 1).await;
    app.sku("A").await;
    app.receive("A", "BER", 100).await;
    until_replica_in_use(&reads, bound, Duration::from_secs(20)).await;
    let started = Instant::now();
    while available(&app, "A").await != 100 {
        assert!(started.elapsed() < Duration::from_secs(5), "the replica never showed the stock");
    }
    let fresh = count(&reads, Reason::Fresh);
    let mut delays = Vec::new();
    for n in 1..=20 {
        let (status, body) = app
            .post("/v1/reservations", json!({"order_id": format!("o-{n}"), "lines": [{"sku": "A", "quantity": 1}]}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let reserved = Instant::now();
        while available(&app, "A").await != 100 - n {
            assert!(reserved.elapsed() < bound * 3, "reservation {n} not visible after {:?}", reserved.elapsed());
        }
        delays.push(reserved.elapsed());
    }
    let (median, max) = median_max(delays);
    eprintln!("reservation → availability showing it (via the replica): median {median:?}, max {max:?}");
    assert!(max <= bound + Duration::from_millis(250), "a reservation took {max:?} to show (bound {bound:?})");
    assert!(count(&reads, Reason::Fresh) - fresh >= 20, "the reads went to the replica: {:?}", reads.tally());
}

#[tokio::test]
async fn stopping_the_standby_moves_reads_to_the_primary_with_no_failed_request_and_back_once_it_returns() {
    let Some(mut pair) = Replicated::start("stop").await else { return };
    let (app, reads) = pair.serve(1_000).await;
    app.warehouse("BER", 1).await;
    app.sku("A").await;
    app.receive("A", "BER", 40).await;
    until_replica_in_use(&reads, Duration::from_secs(1), Duration::from_secs(20)).await;
    let started = Instant::now();
    while available(&app, "A").await != 40 {
        assert!(started.elapsed() < Duration::from_secs(5), "the replica never showed the stock");
    }
    let fresh = count(&reads, Reason::Fresh);
    let paths = ["/v1/availability?sku=A", "/v1/stock?limit=10", "/v1/stock/A", "/v1/ledger?limit=10", "/v1/events"];
    let readers: Vec<_> = (0..4)
        .map(|n| {
            let (client, base) = (app.client.clone(), app.base.clone());
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for i in 0..50 {
                    let path = paths[(n + i) % paths.len()];
                    match client.get(format!("{base}{path}")).send().await {
                        Ok(res) if res.status() == StatusCode::OK => {
                            let body: Value = res.json().await.unwrap();
                            if path.starts_with("/v1/availability") && body["items"][0]["available"] != 40 {
                                failed.push(format!("{path}: {body}"));
                            }
                        }
                        Ok(res) => failed.push(format!("{path}: {}", res.status())),
                        Err(err) => failed.push(format!("{path}: {err}")),
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                failed
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // As a crash would: `pg_ctl stop -m immediate`.
    let stop = pair.standby.stop_command_line();
    let stopped = tokio::task::spawn_blocking(move || Command::new("sh").args(["-c", &stop]).status()).await.unwrap();
    assert!(stopped.unwrap().success(), "stop the standby");
    let mut failed = Vec::new();
    for reader in readers {
        failed.extend(reader.await.unwrap());
    }
    assert!(failed.is_empty(), "{} of 200 reads failed: {failed:?}", failed.len());
    eprintln!("200 reads across a standby stop: {:?}", reads.tally());
    assert!(count(&reads, Reason::Fresh) > fresh, "some reads went to the replica before it stopped");
    let moved =
        count(&reads, Reason::ReplicaDown) + count(&reads, Reason::ReplicaError) + count(&reads, Reason::Lagging);
    assert!(moved > 0, "reads moved to the primary: {:?}", reads.tally());
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("inventory_reads_total{path=\"primary\",reason=\"replica_")),
        "{metrics}"
    );

    // Back: reads return to the replica once it is up and caught up.
    let dir = pair.standby_dir.clone();
    pair.standby = tokio::task::spawn_blocking(move || LocalPostgres::start(&dir, Durability::Throwaway))
        .await
        .unwrap()
        .expect("restart the standby");
    let fresh = count(&reads, Reason::Fresh);
    let started = Instant::now();
    while count(&reads, Reason::Fresh) == fresh {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "reads never returned to the replica: {:?}",
            reads.tally()
        );
        assert_eq!(available(&app, "A").await, 40);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("reads back on the replica {:?} after its restart", started.elapsed());
}

#[tokio::test]
async fn a_replica_lagging_beyond_the_bound_sends_reads_to_the_primary_which_sees_the_new_write() {
    let Some(pair) = Replicated::start("lagging").await else { return };
    let bound = Duration::from_millis(300);
    let (app, reads) = pair.serve(bound.as_millis() as u64).await;
    app.warehouse("BER", 1).await;
    app.sku("A").await;
    app.receive("A", "BER", 10).await;
    until_replica_in_use(&reads, bound, Duration::from_secs(20)).await;
    let started = Instant::now();
    while available(&app, "A").await != 10 {
        assert!(started.elapsed() < Duration::from_secs(5), "the replica never showed the stock");
    }
    let standby = pair.standby_pool().await;
    sqlx::query("SELECT pg_wal_replay_pause()").execute(&standby).await.unwrap();
    app.receive("A", "BER", 5).await;
    let written = Instant::now();
    // Within the bound the replica may still answer 10; past it, every read is the primary's.
    while available(&app, "A").await != 15 {
        assert!(written.elapsed() < bound * 3, "the new stock was not read within {:?}", bound * 3);
    }
    let seen_after = written.elapsed();
    tokio::time::sleep(bound).await;
    let lagging = count(&reads, Reason::Lagging);
    for _ in 0..5 {
        assert_eq!(available(&app, "A").await, 15);
        let (status, body) = app.get("/v1/stock/A").await;
        assert_eq!((status, &body["total"]["on_hand"]), (StatusCode::OK, &json!(15)));
    }
    assert_eq!(count(&reads, Reason::Lagging) - lagging, 10, "{:?}", reads.tally());
    let lag = reads.lag().unwrap();
    assert!(lag > bound, "the measured lag grows while replay is paused: {lag:?}");
    eprintln!("replay paused: new stock read (from the primary) after {seen_after:?}; lag measured {lag:?}");
    sqlx::query("SELECT pg_wal_replay_resume()").execute(&standby).await.unwrap();
    until_replica_in_use(&reads, bound, Duration::from_secs(10)).await;
    let fresh = count(&reads, Reason::Fresh);
    assert_eq!(available(&app, "A").await, 15);
    assert!(count(&reads, Reason::Fresh) > fresh || primary_reads(&reads) > 0);
}
