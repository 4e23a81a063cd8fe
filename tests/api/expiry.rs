//! Holds expire on time; extend moves the deadline; fulfil racing expiry has one winner.

use std::time::{Duration, Instant};

use futures::future::join_all;
use inventory::config::ServerArgs;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;

async fn fast_expiry_shop() -> TestApp {
    let app = TestApp::spawn_with(ServerArgs { expiry_interval_ms: 200, ..ServerArgs::default() }).await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 100).await;
    app
}

async fn status_of(app: &TestApp, id: &str) -> String {
    let (_, r) = app.get(&format!("/v1/reservations/{id}")).await;
    r["status"].as_str().unwrap().to_owned()
}

async fn wait_for_status(app: &TestApp, id: &str, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if status_of(app, id).await == want {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("reservation {id} did not become {want} within {limit:?}");
}

#[tokio::test]
async fn an_expired_hold_gives_its_units_back_with_expire_entries() {
    let app = fast_expiry_shop().await;
    let (status, r) = app
        .post("/v1/reservations", json!({"order_id": "o", "ttl_seconds": 1, "lines": [{"sku": "A", "quantity": 7}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    let id = r["id"].as_str().unwrap();
    assert_eq!(app.level("A", "W1").await, (100, 7));
    // The contract allows 5 seconds after the deadline.
    wait_for_status(&app, id, "expired", Duration::from_secs(6)).await;
    assert_eq!(app.level("A", "W1").await, (100, 0));
    let (_, ledger) = app.get(&format!("/v1/ledger?reference={id}")).await;
    assert_eq!(ledger["items"][1]["kind"], "expire");
    assert_eq!(ledger["items"][1]["reserved_delta"], -7);
    let (status, body) = app.call(reqwest::Method::POST, &format!("/v1/reservations/{id}/fulfil"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["reservation_status"], "expired");
    assert_eq!(body["status"], 409, "the problem's status stays the HTTP status");
    app.assert_invariants().await;
}

#[tokio::test]
async fn extending_a_hold_prevents_its_expiry() {
    let app = fast_expiry_shop().await;
    let (_, r) = app
        .post("/v1/reservations", json!({"order_id": "o", "ttl_seconds": 1, "lines": [{"sku": "A", "quantity": 1}]}))
        .await;
    let id = r["id"].as_str().unwrap();
    let (status, extended) = app.post(&format!("/v1/reservations/{id}/extend"), json!({"ttl_seconds": 120})).await;
    assert_eq!(status, StatusCode::OK, "{extended}");
    assert!(extended["expires_at"].as_str().unwrap() > r["expires_at"].as_str().unwrap());
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(status_of(&app, id).await, "active");
    assert_eq!(app.level("A", "W1").await, (100, 1));
}

#[tokio::test]
async fn fulfil_racing_expiry_has_exactly_one_winner_per_reservation() {
    let app = fast_expiry_shop().await;
    let mut ids = Vec::new();
    let mut deadlines = Vec::new();
    for i in 0..40 {
        let (status, r) = app
            .post(
                "/v1/reservations",
                json!({"order_id": format!("o-{i}"), "ttl_seconds": 2, "lines": [{"sku": "A", "quantity": 2}]}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        ids.push(r["id"].as_str().unwrap().to_owned());
        deadlines.push(r["expires_at"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap());
    }
    // Each fulfil fires at its own reservation's deadline plus an offset from -400 ms to
    // +380 ms, so some land before the deadline and some after (and around the sweep).
    let results: Vec<(StatusCode, Value)> = join_all(ids.iter().zip(&deadlines).enumerate().map(|(i, (id, at))| {
        let app = &app;
        async move {
            let fire = *at + chrono::Duration::milliseconds(-400 + 20 * i as i64);
            let wait = (fire - chrono::Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait).await;
            app.call(reqwest::Method::POST, &format!("/v1/reservations/{id}/fulfil"), None).await
        }
    }))
    .await;
    for id in &ids {
        let status = status_of(&app, id).await;
        if status == "active" {
            wait_for_status(&app, id, "expired", Duration::from_secs(6)).await;
        }
    }
    let mut fulfilled = 0;
    for ((status, body), id) in results.iter().zip(&ids) {
        let final_status = status_of(&app, id).await;
        match *status {
            StatusCode::OK => {
                fulfilled += 1;
                assert_eq!(final_status, "fulfilled", "a fulfil that won is not expired afterwards");
            }
            StatusCode::CONFLICT => {
                assert_eq!(body["code"], "reservation_not_active");
                assert_eq!(final_status, "expired", "a fulfil that lost leaves the expiry's result");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(0 < fulfilled && fulfilled < 40, "no race happened: {fulfilled} of 40 fulfils won");
    assert_eq!(app.level("A", "W1").await, (100 - 2 * fulfilled, 0), "levels are exact");
    app.assert_invariants().await;
}

/// The stored status and deadline of a reservation (what the sweep wrote, not what a read shows).
async fn stored(app: &TestApp, id: &str) -> (String, chrono::DateTime<chrono::Utc>) {
    sqlx::query_as("SELECT status, expires_at FROM reservations WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// Waits until the sweep has stored `expired`; returns how long after its deadline that was.
async fn swept_after_deadline(app: &TestApp, id: &str, limit: Duration) -> chrono::Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        let (status, deadline) = stored(app, id).await;
        if status == "expired" {
            return chrono::Utc::now() - deadline;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("reservation {id} was not expired by the sweep within {limit:?}");
}

async fn hold(app: &TestApp, order: &str, sku: &str, ttl: i64) -> String {
    let body = json!({"order_id": order, "lines": [{"sku": sku, "quantity": 1}], "ttl_seconds": ttl});
    let (status, r) = app.post("/v1/reservations", body).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    r["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_row_or_a_broken_reservation_delays_only_its_own_expiry() {
    // The default sweep interval: the contract's 5 s bound must hold with it.
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    for sku in ["HA", "HB", "HC"] {
        app.sku(sku).await;
        app.receive(sku, "W1", 10).await;
    }
    let broken = hold(&app, "c", "HC", 1).await;
    let stuck = hold(&app, "a", "HA", 1).await;
    let free = hold(&app, "b", "HB", 2).await;
    // HC's level refuses every change from now on: its reservation can never expire.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_hc() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.sku = 'HC' THEN RAISE EXCEPTION 'HC is broken'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER refuse_hc BEFORE UPDATE ON stock_levels FOR EACH ROW EXECUTE FUNCTION refuse_hc();",
    )
    .execute(&app.db)
    .await
    .unwrap();
    // Another session holds HA's level for a long time.
    let mut blocker = app.db.begin().await.unwrap();
    sqlx::query("SELECT * FROM stock_levels WHERE sku = 'HA' FOR UPDATE").execute(&mut *blocker).await.unwrap();

    let late = swept_after_deadline(&app, &free, Duration::from_secs(12)).await;
    assert!(late < chrono::Duration::seconds(5), "HB expired {late} after its deadline, behind HA's stuck row");
    assert_eq!(stored(&app, &stuck).await.0, "active", "HA's reservation waits for its row");
    assert_eq!(stored(&app, &broken).await.0, "active", "HC's reservation cannot expire");
    // Later holds keep expiring while both are still stuck.
    let next = hold(&app, "d", "HB", 1).await;
    let late = swept_after_deadline(&app, &next, Duration::from_secs(12)).await;
    assert!(late < chrono::Duration::seconds(5), "a later hold expired {late} after its deadline");

    blocker.rollback().await.unwrap();
    let released = Instant::now();
    swept_after_deadline(&app, &stuck, Duration::from_secs(10)).await;
    assert!(released.elapsed() < Duration::from_secs(5), "HA expired {:?} after its row was free", released.elapsed());
    sqlx::raw_sql("DROP TRIGGER refuse_hc ON stock_levels").execute(&app.db).await.unwrap();
    swept_after_deadline(&app, &broken, Duration::from_secs(20)).await;
    assert_eq!(app.level("HA", "W1").await, (10, 0));
    assert_eq!(app.level("HB", "W1").await, (10, 0));
    assert_eq!(app.level("HC", "W1").await, (10, 0));
    app.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fifty_overdue_holds_all_expire_within_five_seconds_at_the_default_interval() {
    // The default sweep (every second, 100 per transaction): 250 holds take several batches.
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 1_000).await;
    let created = join_all((0..250).map(|i| {
        let app = &app;
        async move {
            let body = json!({"order_id": format!("x{i}"), "ttl_seconds": 1, "lines": [{"sku": "A", "quantity": 1}]});
            app.post("/v1/reservations", body).await
        }
    }))
    .await;
    assert!(created.iter().all(|(s, _)| *s == StatusCode::CREATED));
    let mut first_seen: std::collections::HashMap<String, chrono::Duration> = std::collections::HashMap::new();
    let started = Instant::now();
    while first_seen.len() < 250 {
        assert!(started.elapsed() < Duration::from_secs(20), "only {} of 250 expired", first_seen.len());
        let rows: Vec<(String, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as("SELECT id::text, expires_at FROM reservations WHERE status = 'expired'")
                .fetch_all(&app.db)
                .await
                .unwrap();
        let now = chrono::Utc::now();
        for (id, deadline) in rows {
            first_seen.entry(id).or_insert(now - deadline);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let worst = first_seen.values().max().unwrap();
    assert!(*worst < chrono::Duration::seconds(5), "a hold expired {worst} after its deadline");
    assert_eq!(app.level("A", "W1").await, (1_000, 0));
    app.assert_invariants().await;
}
