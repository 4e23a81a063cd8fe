//! The batching reservation engine: many orders in one transaction, each with its own answer;
//! a batch that fails as a whole does not fail its orders.

use std::time::Duration;

use futures::future::join_all;
use inventory::config::ServerArgs;
use inventory::domain::Settle;
use inventory::domain::allocation::{Line, Strategy};
use inventory::engine::Refusal;
use inventory::engine::reservations::{NewReservation, PartLine, SettleRequest, reserve_many, settle_many};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, assert_problem};

fn order(order_id: &str, lines: &[(&str, i64)]) -> NewReservation {
    NewReservation {
        order_id: order_id.into(),
        channel: None,
        lines: lines
            .iter()
            .map(|(sku, quantity)| Line { sku: (*sku).into(), quantity: *quantity, warehouse: None })
            .collect(),
        ttl_seconds: 900,
        strategy: Strategy::Priority,
    }
}

#[tokio::test]
async fn one_batch_decides_orders_in_arrival_order_and_a_refused_order_leaves_no_trace() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.sku("B").await;
    app.receive("A", "W1", 5).await;
    app.receive("B", "W1", 2).await;
    let (status, taken) =
        app.post("/v1/reservations", json!({"order_id": "taken", "lines": [{"sku": "A", "quantity": 1}]})).await;
    assert_eq!(status, StatusCode::CREATED);

    let orders = [
        order("first", &[("A", 3)]),              // fits: A 4 → 1 available
        order("short", &[("A", 2)]),              // 1 left: refused
        order("ghost", &[("A", 1), ("NOPE", 1)]), // unknown SKU: refused, A untouched
        order("taken", &[("B", 1)]),              // order id used before
        order("last", &[("A", 1), ("B", 2)]),     // takes the last A and every B
        order("late", &[("B", 1)]),               // nothing left
    ];
    let refs: Vec<&NewReservation> = orders.iter().collect();
    let mut tx = app.begin_writer().await;
    let answers = reserve_many(&mut tx, &refs).await.expect("the batch itself succeeds");
    tx.commit().await.unwrap();

    let outcomes: Vec<Result<String, &str>> =
        answers.iter().map(|a| a.as_ref().map(|r| r.status.clone()).map_err(|e| e.code())).collect();
    assert_eq!(
        outcomes,
        [
            Ok("active".into()),
            Err("insufficient_stock"),
            Err("not_found"),
            Err("duplicate_order"),
            Ok("active".into()),
            Err("insufficient_stock"),
        ]
    );
    let Err(Refusal::DuplicateOrder { reservation_id, .. }) = &answers[3] else { panic!("{:?}", answers[3]) };
    assert_eq!(json!(reservation_id.to_string()), taken["id"], "the duplicate names the existing reservation");
    assert_eq!(app.level("A", "W1").await, (5, 5));
    assert_eq!(app.level("B", "W1").await, (2, 2));

    // Refused orders left no reservation, no allocation, no ledger entry behind.
    let orders_kept: Vec<String> =
        sqlx::query_scalar("SELECT order_id FROM reservations ORDER BY order_id").fetch_all(&app.db).await.unwrap();
    assert_eq!(orders_kept, ["first", "last", "taken"]);
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger WHERE kind = 'reserve'").fetch_one(&app.db).await.unwrap();
    assert_eq!(entries, 4, "taken A, first A, last A and B");
    for refused in ["short", "ghost", "late"] {
        let (status, _) =
            app.post("/v1/reservations", json!({"order_id": refused, "lines": [{"sku": "A", "quantity": 1}]})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{refused}: its order id is free, the stock is not");
    }
    app.assert_invariants().await;
}

/// A batch inserts its reservation rows before it locks any level (the lock order): a batch
/// waiting for another transaction's row of the same order holds no level lock, so that
/// transaction can still lock the level and finish.
#[tokio::test]
async fn a_batch_waiting_on_a_duplicate_order_holds_no_level_lock() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.sku("B").await;
    app.receive("A", "W1", 5).await;
    app.receive("B", "W1", 5).await;

    let mut first = app.begin_writer().await;
    let answers = reserve_many(&mut first, &[&order("same", &[("A", 1)])]).await.unwrap();
    assert!(answers[0].is_ok(), "{answers:?}");
    let mut second = app.begin_writer().await;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *second).await.unwrap();
    let waiting = tokio::spawn(async move {
        let answers = reserve_many(&mut second, &[&order("same", &[("B", 1)])]).await;
        second.commit().await.unwrap();
        answers
    });
    // The second batch now waits for the first transaction on the order's unique index.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let blocked: bool = sqlx::query_scalar("SELECT cardinality(pg_blocking_pids($1)) > 0")
            .bind(pid)
            .fetch_one(&app.db)
            .await
            .unwrap();
        if blocked {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the second batch never waited for the first");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let locked = sqlx::query("SELECT 1 FROM stock_levels WHERE sku = 'B' FOR UPDATE NOWAIT").execute(&mut *first).await;
    assert!(locked.is_ok(), "level B was locked by the waiting batch: {locked:?}");
    first.commit().await.unwrap();

    let answers = waiting.await.unwrap().expect("the waiting batch itself succeeds");
    assert!(matches!(answers[0], Err(Refusal::DuplicateOrder { .. })), "{answers:?}");
    assert_eq!(app.level("B", "W1").await, (5, 0));
    app.assert_invariants().await;
}

#[tokio::test]
async fn one_settle_batch_answers_each_on_its_own_merits_and_a_refused_one_leaves_no_trace() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 10).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let body = json!({"order_id": format!("s{n}"), "lines": [{"sku": "A", "quantity": 2}]});
        let (status, r) = app.post("/v1/reservations", body).await;
        assert_eq!(status, StatusCode::CREATED, "{r}");
        ids.push(r["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap());
    }
    let (status, _) = app.call(reqwest::Method::POST, &format!("/v1/reservations/{}/release", ids[4]), None).await;
    assert_eq!(status, StatusCode::OK);
    let part = |quantity| Some(vec![PartLine { sku: "A".into(), warehouse: "W1".into(), quantity }]);
    let settles = [
        SettleRequest { id: ids[0], kind: Settle::Fulfil, parts: None }, // ships 2
        SettleRequest { id: ids[1], kind: Settle::Release, parts: part(1) }, // gives 1 back
        SettleRequest { id: ids[2], kind: Settle::Fulfil, parts: part(3) }, // holds 2: refused
        SettleRequest { id: uuid::Uuid::now_v7(), kind: Settle::Fulfil, parts: None }, // unknown
        SettleRequest { id: ids[4], kind: Settle::Fulfil, parts: None }, // released before
        SettleRequest { id: ids[3], kind: Settle::Fulfil, parts: part(1) }, // ships 1 of 2
    ];
    let refs: Vec<&SettleRequest> = settles.iter().collect();
    let mut tx = app.begin_writer().await;
    let answers = settle_many(&mut tx, &refs).await.expect("the batch itself succeeds");
    tx.commit().await.unwrap();

    let outcomes: Vec<Result<String, &str>> =
        answers.iter().map(|a| a.as_ref().map(|r| r.status.clone()).map_err(|e| e.code())).collect();
    assert_eq!(
        outcomes,
        [
            Ok("fulfilled".into()),
            Ok("active".into()),
            Err("over_fulfilment"),
            Err("not_found"),
            Err("reservation_not_active"),
            Ok("active".into()),
        ]
    );
    // 10 received; 2 + 1 shipped; held: s1 1, s2 2, s3 1.
    assert_eq!(app.level("A", "W1").await, (7, 4));
    let (_, s2) = app.get(&format!("/v1/reservations/{}", ids[2])).await;
    assert_eq!(s2["lines"][0]["allocations"][0]["fulfilled"], 0, "the refused settle left s2 alone: {s2}");
    let entries: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, reference FROM ledger WHERE kind IN ('fulfil', 'release') ORDER BY at, id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    let expected: Vec<(String, String)> = [("release", 4), ("fulfil", 0), ("release", 1), ("fulfil", 3)]
        .iter()
        .map(|(kind, n)| ((*kind).to_owned(), ids[*n].to_string()))
        .collect();
    assert_eq!(entries, expected, "one entry per settle that went through, none for the refused");
    app.assert_invariants().await;
}

#[tokio::test]
async fn concurrent_settles_in_one_batch_window_keep_every_invariant() {
    // A long window puts the concurrent settles below into as few batches as clashes allow.
    let server = ServerArgs { batch_window_us: 200_000, ..ServerArgs::default() };
    let app = TestApp::spawn_with(server).await;
    app.warehouse("W1", 1).await;
    app.warehouse("W2", 2).await;
    app.sku("A").await;
    app.sku("B").await;
    app.receive("A", "W1", 30).await;
    app.receive("A", "W2", 30).await;
    app.receive("B", "W1", 40).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        let body =
            json!({"order_id": format!("c{n}"), "lines": [{"sku": "A", "quantity": 3}, {"sku": "B", "quantity": 2}]});
        let (status, r) = app.post("/v1/reservations", body).await;
        assert_eq!(status, StatusCode::CREATED, "{r}");
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    // Every reservation fulfilled or released twice at once (one of each pair wins), and every
    // fifth also over-released.
    let calls = ids.iter().enumerate().flat_map(|(n, id)| {
        let verb = if n % 2 == 0 { "fulfil" } else { "release" };
        let mut calls = vec![(n, format!("/v1/reservations/{id}/{verb}"), None); 2];
        if n % 5 == 0 {
            let body = json!({"lines": [{"sku": "B", "warehouse": "W1", "quantity": 3}]});
            calls.push((n, format!("/v1/reservations/{id}/release"), Some(body)));
        }
        calls
    });
    let answers = join_all(calls.map(|(n, path, body)| {
        let app = &app;
        async move { (n, app.call(reqwest::Method::POST, &path, body).await) }
    }))
    .await;
    for n in 0..20 {
        let mine: Vec<(StatusCode, &str)> = answers
            .iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, (status, body))| (*status, body["code"].as_str().unwrap_or("")))
            .collect();
        let ok = mine.iter().filter(|(s, _)| *s == StatusCode::OK).count();
        assert_eq!(ok, 1, "exactly one settle of reservation {n} went through: {mine:?}");
        for (status, code) in mine.iter().filter(|(s, _)| *s != StatusCode::OK) {
            assert_eq!(*status, StatusCode::CONFLICT);
            assert!(["reservation_not_active", "over_release"].contains(code), "{code}");
        }
    }
    // Ten fulfilled (3 A + 2 B each), ten released: nothing held, 30 A and 20 B shipped.
    let shipped_a = 60 - app.level("A", "W1").await.0 - app.level("A", "W2").await.0;
    assert_eq!(shipped_a, 30);
    assert_eq!(app.level("B", "W1").await, (20, 0));
    assert_eq!(app.level("A", "W1").await.1 + app.level("A", "W2").await.1, 0);
    app.assert_invariants().await;
}

#[tokio::test]
async fn a_batch_that_fails_as_a_whole_still_answers_each_order_on_its_own_merits() {
    // A long window puts every order below into one batch.
    let server = ServerArgs { batch_window_us: 300_000, ..ServerArgs::default() };
    let app = TestApp::spawn_with(server).await;
    app.warehouse("W1", 1).await;
    for sku in ["FREE", "STUCK"] {
        app.sku(sku).await;
        app.receive(sku, "W1", 100).await;
    }
    let before = fallbacks(&app).await;
    // Another session holds the STUCK row: the batch that includes it times out on its lock.
    let mut held = app.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM stock_levels WHERE sku = 'STUCK' FOR UPDATE").execute(&mut *held).await.unwrap();

    let requests = (0..10).map(|i| ("FREE", format!("free-{i}"))).chain([("STUCK", "stuck-0".to_owned())]);
    let answers = join_all(requests.map(|(sku, order_id)| {
        let app = &app;
        async move {
            let body = json!({"order_id": order_id, "lines": [{"sku": sku, "quantity": 1}]});
            let res = app.client.post(app.url("/v1/reservations")).json(&body).send().await.unwrap();
            (sku, res)
        }
    }))
    .await;
    for (sku, res) in answers {
        if sku == "FREE" {
            assert_eq!(res.status(), StatusCode::CREATED, "a FREE order failed with its batch: {:?}", res.text().await);
        } else {
            assert_problem(res, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
        }
    }
    held.rollback().await.unwrap();

    assert_eq!(app.level("FREE", "W1").await, (100, 10));
    assert_eq!(app.level("STUCK", "W1").await, (100, 0));
    let after = fallbacks(&app).await;
    assert!(after > before, "the fallback is counted ({before} → {after})");
    // The refused order changed nothing: it can be placed now that the row is free.
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(10),
        app.post("/v1/reservations", json!({"order_id": "stuck-0", "lines": [{"sku": "STUCK", "quantity": 1}]})),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.assert_invariants().await;
}

/// `inventory_reservation_batch_fallbacks_total` as `/metrics` shows it now.
async fn fallbacks(app: &TestApp) -> f64 {
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let name = inventory::metrics::BATCH_FALLBACKS;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// What an answer to a reservation says, without what differs by nature (ids, times).
fn gist(status: StatusCode, body: &serde_json::Value) -> serde_json::Value {
    if status == StatusCode::CREATED {
        let lines: Vec<serde_json::Value> = body["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| json!({"sku": l["sku"], "quantity": l["quantity"], "allocations": l["allocations"]}))
            .collect();
        json!({"status": 201, "lines": lines})
    } else {
        json!({"status": status.as_u16(), "code": body["code"], "lines": body["lines"]})
    }
}

/// The same seeded stream of orders, sent in concurrent waves to a batching service and one by
/// one to a service without batching, gets the same answers and leaves the same stock. Within a
/// wave no two orders share a SKU, so the outcome cannot depend on arrival order; the stock is
/// tight, so refusals, splits across warehouses, backorders, pins and `single` all occur.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_waves_answer_exactly_as_the_same_orders_sent_one_by_one() {
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("BATCH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let batched = TestApp::spawn_with(ServerArgs { batch_window_us: 20_000, ..ServerArgs::default() }).await;
    let single = TestApp::spawn_with(ServerArgs { batch_max: 1, ..ServerArgs::default() }).await;
    let skus: Vec<String> = (0..12).map(|i| format!("S{i}")).collect();
    let warehouses = [("W1", 1), ("W2", 2), ("W3", 2)];
    let mut rng = StdRng::seed_from_u64(seed);
    for app in [&batched, &single] {
        for (w, priority) in warehouses {
            app.warehouse(w, priority).await;
        }
    }
    for sku in &skus {
        let backorders = if rng.random_bool(0.25) { 3 } else { 0 };
        for app in [&batched, &single] {
            let (status, body) =
                app.put(&format!("/v1/skus/{sku}"), json!({"name": sku, "backorder_limit": backorders})).await;
            assert!(status.is_success(), "{body}");
        }
        for (w, _) in warehouses {
            let units = rng.random_range(0..8);
            if units > 0 {
                batched.receive(sku, w, units).await;
                single.receive(sku, w, units).await;
            }
        }
    }
    let mut answers = 0;
    for wave in 0..25 {
        let mut free = skus.clone();
        free.shuffle(&mut rng);
        let mut orders = Vec::new();
        for n in 0..rng.random_range(2..=6) {
            let take = rng.random_range(1..=2).min(free.len());
            if take == 0 {
                break;
            }
            let lines: Vec<serde_json::Value> = free
                .drain(..take)
                .map(|sku| {
                    let mut line = json!({"sku": sku, "quantity": rng.random_range(1..=6)});
                    if rng.random_bool(0.2) {
                        line["warehouse"] = json!(warehouses[rng.random_range(0..3)].0);
                    }
                    line
                })
                .collect();
            let strategy = if rng.random_bool(0.3) { "single" } else { "priority" };
            orders.push(json!({"order_id": format!("w{wave}-{n}"), "lines": lines, "strategy": strategy}));
        }
        let together = join_all(orders.iter().map(|o| batched.post("/v1/reservations", o.clone()))).await;
        for (order, (status, body)) in orders.iter().zip(together) {
            let (alone_status, alone) = single.post("/v1/reservations", order.clone()).await;
            assert_eq!(
                gist(status, &body),
                gist(alone_status, &alone),
                "seed {seed}, wave {wave}: {order} answered differently batched (left) and alone (right)"
            );
            answers += 1;
        }
    }
    for sku in &skus {
        let (_, a) = batched.get(&format!("/v1/stock/{sku}")).await;
        let (_, b) = single.get(&format!("/v1/stock/{sku}")).await;
        let levels = |v: &serde_json::Value| {
            v["warehouses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| (l["warehouse"].clone(), l["on_hand"].clone(), l["reserved"].clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(levels(&a), levels(&b), "seed {seed}: {sku} ends differently");
    }
    assert!(answers >= 50, "{answers}");
    batched.assert_invariants().await;
    single.assert_invariants().await;
}
