//! Concurrent stock operations keep every invariant.

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_and_adjustments_conserve_units() {
    transfers_and_adjustments_conserve_units(&TestApp::spawn().await).await;
}

/// The scenario of [`concurrent_transfers_and_adjustments_conserve_units`], on any service (behind a pooler, say).
pub async fn transfers_and_adjustments_conserve_units(app: &TestApp) {
    let deadlocks = app.deadlocks().await;
    app.warehouse("EAST", 1).await;
    app.warehouse("WEST", 2).await;
    app.sku("A").await;
    app.receive("A", "EAST", 100).await;
    app.receive("A", "WEST", 100).await;

    let requests = (0..100).map(|i| {
        async move {
            let (from, to) = if i % 2 == 0 { ("EAST", "WEST") } else { ("WEST", "EAST") };
            match i % 5 {
                // Adjustments in both directions; a removal may be refused, which is fine.
                0 => {
                    let delta = if i % 10 == 0 { 3 } else { -2 };
                    let (status, body) = app
                        .post(
                            "/v1/stock/adjust",
                            json!({"sku": "A", "warehouse": from, "delta": delta, "reason": "count"}),
                        )
                        .await;
                    (status, body, if status == StatusCode::OK { delta } else { 0 })
                }
                _ => {
                    let (status, body) = app
                        .post("/v1/stock/transfer", json!({"sku": "A", "from": from, "to": to, "quantity": 1 + i % 7}))
                        .await;
                    (status, body, 0)
                }
            }
        }
    });
    let results = join_all(requests).await;
    let mut expected_total = 200;
    for (status, body, delta) in &results {
        assert!(status == &StatusCode::OK || status == &StatusCode::CONFLICT, "{status} {body}");
        expected_total += delta;
    }
    let (east, west) = (app.level("A", "EAST").await, app.level("A", "WEST").await);
    assert_eq!(east.0 + west.0, expected_total, "units are conserved");
    assert!(results.iter().filter(|r| r.0 == StatusCode::OK).count() > 50, "most operations succeed");
    app.assert_invariants_and_no_deadlock(deadlocks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_buyers_of_fifty_units_get_exactly_fifty() {
    three_hundred_buyers_of_fifty_units(&TestApp::spawn().await).await;
}

/// The scenario of [`three_hundred_buyers_of_fifty_units_get_exactly_fifty`], on any service (behind a pooler, say).
pub async fn three_hundred_buyers_of_fifty_units(app: &TestApp) {
    let deadlocks = app.deadlocks().await;
    app.warehouse("W1", 1).await;
    app.sku("HOT").await;
    app.receive("HOT", "W1", 50).await;
    let started = std::time::Instant::now();
    let results = join_all((0..300).map(|i| async move {
        app.post(
            "/v1/reservations",
            json!({"order_id": format!("buyer-{i}"), "lines": [{"sku": "HOT", "quantity": 1}]}),
        )
        .await
    }))
    .await;
    let created = results.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
    let refused =
        results.iter().filter(|(s, b)| *s == StatusCode::CONFLICT && b["code"] == "insufficient_stock").count();
    assert_eq!(
        (created, refused),
        (50, 250),
        "{:?}",
        results.iter().find(|(s, _)| !s.is_success() && *s != StatusCode::CONFLICT)
    );
    assert_eq!(app.level("HOT", "W1").await, (50, 50));
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger WHERE kind = 'reserve'").fetch_one(&app.db).await.unwrap();
    assert_eq!(entries, 50);
    app.assert_invariants_and_no_deadlock(deadlocks).await;
    eprintln!("300 concurrent reservations took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_multi_line_orders_never_deadlock_or_lose_a_unit() {
    crossing_multi_line_orders(&TestApp::spawn().await).await;
}

/// The scenario of [`crossing_multi_line_orders_never_deadlock_or_lose_a_unit`], on any service (behind a pooler, say).
pub async fn crossing_multi_line_orders(app: &TestApp) {
    let deadlocks = app.deadlocks().await;
    let warehouses = ["W1", "W2", "W3"];
    for (i, w) in warehouses.iter().enumerate() {
        app.warehouse(w, i as i64).await;
    }
    let skus: Vec<String> = (0..8).map(|i| format!("S{i}")).collect();
    for sku in &skus {
        app.sku(sku).await;
        for w in warehouses {
            app.receive(sku, w, 40).await;
        }
    }
    let started = std::time::Instant::now();
    // Each order names 2–5 SKUs in a scrambled order, so lock requests cross.
    let results = join_all((0..240usize).map(|i| {
        let skus = &skus;
        async move {
            let n = 2 + i % 4;
            let lines: Vec<_> = (0..n)
                .map(|k| json!({"sku": skus[(i * 7 + k * 5) % skus.len()], "quantity": 1 + (i + k) % 3}))
                .rev()
                .collect();
            let strategy = if i % 3 == 0 { "single" } else { "priority" };
            let (status, body) = app
                .post("/v1/reservations", json!({"order_id": format!("o-{i}"), "lines": lines, "strategy": strategy}))
                .await;
            // Settle some of them right away, concurrently with the other reservations.
            if status == StatusCode::CREATED && i % 4 != 0 {
                let id = body["id"].as_str().unwrap();
                let action = if i % 2 == 0 { "fulfil" } else { "release" };
                let (s, b) = app.call(reqwest::Method::POST, &format!("/v1/reservations/{id}/{action}"), None).await;
                assert_eq!(s, StatusCode::OK, "{b}");
            }
            (status, body)
        }
    }))
    .await;
    for (status, body) in &results {
        assert!(
            *status == StatusCode::CREATED || (*status == StatusCode::CONFLICT && body["code"] == "insufficient_stock"),
            "{status} {body}"
        );
    }
    let created = results.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
    // Enough orders went through to make the crossing real (how many depends on how soon the
    // settles give units back, i.e. on the machine's load).
    assert!(created > 50, "only {created} of 240 orders were created");
    // Held units equal `reserved`, and ledger sums equal the levels, for every level.
    app.assert_invariants_and_no_deadlock(deadlocks).await;
    eprintln!("240 crossing orders took {:?}", started.elapsed());
}

/// What the service acknowledged exists: a reservation answered 201 can be fulfilled or
/// released at once, by every one of many clients running through the batcher side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_reservation_can_be_settled_at_once_under_load() {
    settling_every_acknowledged_reservation_under_load(&TestApp::spawn().await).await;
}

/// The scenario of [`every_acknowledged_reservation_can_be_settled_at_once_under_load`], on any service (behind a pooler, say).
pub async fn settling_every_acknowledged_reservation_under_load(app: &TestApp) {
    app.warehouse("W1", 1).await;
    app.warehouse("W2", 2).await;
    for i in 0..50 {
        app.sku(&format!("L{i}")).await;
        app.receive(&format!("L{i}"), "W1", 1_000).await;
        app.receive(&format!("L{i}"), "W2", 1_000).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(4);
    let clients = (0..64).map(|c| {
        async move {
            let mut n = 0;
            while std::time::Instant::now() < deadline {
                n += 1;
                let sku = format!("L{}", (c * 7 + n) % 50);
                let warehouse = if n % 2 == 0 { "W1" } else { "W2" };
                let line = json!({"sku": sku, "quantity": 1, "warehouse": warehouse});
                let mut body = json!({"order_id": format!("c{c}-{n}"), "lines": [line]});
                if n % 10 == 9 {
                    // Some holds are left to expire while the others are settled.
                    body["ttl_seconds"] = json!(1);
                }
                let (status, created) = app.post("/v1/reservations", body).await;
                assert_eq!(status, StatusCode::CREATED, "{created}");
                let id = created["id"].as_str().unwrap();
                if n % 10 == 9 {
                    continue;
                }
                let verb = if n % 3 == 0 { "release" } else { "fulfil" };
                let (status, settled) =
                    app.call(reqwest::Method::POST, &format!("/v1/reservations/{id}/{verb}"), None).await;
                assert_eq!(status, StatusCode::OK, "{verb} of {id}, acknowledged as created: {settled}");
            }
            n
        }
    });
    let total: usize = join_all(clients).await.into_iter().sum();
    assert!(total > 64, "{total}");
    app.assert_invariants().await;
}
