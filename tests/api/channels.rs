//! Sales channels: their own warehouses and priorities, `order_id` unique per channel, and
//! availability per channel.

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;

/// Warehouses W1 (priority 1), W2 (2), W3 (3), SKU A with 10 units in each, and channel `web`
/// selling from W3 (priority 1 in it) and W2 (its own priority, 2).
async fn shop() -> TestApp {
    let app = TestApp::spawn().await;
    for (w, p) in [("W1", 1), ("W2", 2), ("W3", 3)] {
        app.warehouse(w, p).await;
    }
    app.sku("A").await;
    for w in ["W1", "W2", "W3"] {
        app.receive("A", w, 10).await;
    }
    let (status, body) = app
        .put(
            "/v1/channels/web",
            json!({"name": "Web shop", "warehouses": [{"warehouse": "W3", "priority": 1}, {"warehouse": "W2"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app
}

/// `(warehouse, quantity)` of every allocation of the reservation's first line.
fn allocations(reservation: &Value) -> Vec<(String, i64)> {
    reservation["lines"][0]["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["warehouse"].as_str().unwrap().to_owned(), a["quantity"].as_i64().unwrap()))
        .collect()
}

fn pairs(list: &[(&str, i64)]) -> Vec<(String, i64)> {
    list.iter().map(|(w, q)| ((*w).to_owned(), *q)).collect()
}

#[tokio::test]
async fn a_channel_is_created_read_listed_and_replaced() {
    let app = shop().await;
    let (status, web) = app.get("/v1/channels/web").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(web["code"], "web");
    assert_eq!(web["name"], "Web shop");
    assert_eq!(
        web["warehouses"],
        json!([
            {"warehouse": "W3", "priority": 1, "inherited": false, "active": true},
            {"warehouse": "W2", "priority": 2, "inherited": true, "active": true},
        ])
    );

    // Replaced as a whole, keeping a warehouse it had (with a new priority): 200, the new list only.
    let (status, body) = app
        .put(
            "/v1/channels/web",
            json!({"name": "Web", "warehouses": [{"warehouse": "W2", "priority": 9}, {"warehouse": "W1"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["warehouses"],
        json!([
            {"warehouse": "W2", "priority": 9, "inherited": false, "active": true},
            {"warehouse": "W1", "priority": 1, "inherited": true, "active": true},
        ])
    );
    let (status, body) =
        app.put("/v1/channels/web", json!({"name": "Web", "warehouses": [{"warehouse": "W1", "priority": 7}]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["warehouses"], json!([{"warehouse": "W1", "priority": 7, "inherited": false, "active": true}]));
    app.put("/v1/channels/market", json!({"name": "Marketplace", "warehouses": []})).await;
    let (_, list) = app.get("/v1/channels").await;
    let codes: Vec<&str> = list["items"].as_array().unwrap().iter().map(|c| c["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["market", "web"]);

    let (status, body) = app.get("/v1/channels/nope").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
}

#[tokio::test]
async fn a_channel_naming_an_unknown_warehouse_or_a_bad_value_is_refused_and_changes_nothing() {
    let app = shop().await;
    let (status, body) = app
        .put("/v1/channels/web", json!({"name": "X", "warehouses": [{"warehouse": "W1"}, {"warehouse": "NOPE"}]}))
        .await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{body}");
    let (status, body) = app
        .put(
            "/v1/channels/web",
            json!({"name": " ", "warehouses": [{"warehouse": "W1"}, {"warehouse": "W1"}, {"warehouse": "W2", "priority": -1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let fields: Vec<&str> = body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["name", "warehouses[2].priority"]);
    let (status, body) = app.put("/v1/channels/web", json!({"name": "X"})).await;
    assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("warehouses")));

    let (_, web) = app.get("/v1/channels/web").await;
    assert_eq!(web["name"], "Web shop", "nothing changed");
    assert_eq!(web["warehouses"].as_array().unwrap().len(), 2);

    // A warehouse listed twice counts once, at its first place, with the last priority given.
    let (status, body) = app
        .put(
            "/v1/channels/web",
            json!({"name": "Web", "warehouses": [{"warehouse": "W2", "priority": 5}, {"warehouse": "W1"}, {"warehouse": "W2"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["warehouses"],
        json!([
            {"warehouse": "W2", "priority": 2, "inherited": true, "active": true},
            {"warehouse": "W1", "priority": 1, "inherited": true, "active": true},
        ])
    );
}

#[tokio::test]
async fn a_channel_allocates_only_from_its_warehouses_in_its_own_order() {
    let app = shop().await;
    // Without a channel: W1 first (priority 1).
    let (status, r) =
        app.post("/v1/reservations", json!({"order_id": "o-1", "lines": [{"sku": "A", "quantity": 2}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(allocations(&r), pairs(&[("W1", 2)]));
    assert_eq!(r["channel"], Value::Null);
    // In `web`: W3 first (priority 1 there), then W2; never W1.
    let (status, r) = app
        .post("/v1/reservations", json!({"order_id": "o-2", "channel": "web", "lines": [{"sku": "A", "quantity": 12}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(r["channel"], "web");
    assert_eq!(allocations(&r), pairs(&[("W3", 10), ("W2", 2)]));
    // `web` has 8 left (W2), though W1 still has 8 more.
    let (status, body) = app
        .post("/v1/reservations", json!({"order_id": "o-3", "channel": "web", "lines": [{"sku": "A", "quantity": 9}]}))
        .await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("insufficient_stock")), "{body}");
    assert_eq!(body["lines"], json!([{"sku": "A", "requested": 9, "available": 8}]));
    // A plan in the channel answers the same way.
    let (status, plan) = app
        .post(
            "/v1/reservations/plan",
            json!({"order_id": "o-4", "channel": "web", "lines": [{"sku": "A", "quantity": 3}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    assert_eq!(plan["channel"], "web");
    assert_eq!(plan["lines"][0]["allocations"], json!([{"warehouse": "W2", "quantity": 3}]));
    app.assert_invariants().await;
}

#[tokio::test]
async fn an_inactive_warehouse_is_left_out_of_a_channels_allocation_and_availability() {
    let app = shop().await;
    let (status, _) = app.put("/v1/warehouses/W3", json!({"name": "W3", "active": false})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, r) = app
        .post("/v1/reservations", json!({"order_id": "o-1", "channel": "web", "lines": [{"sku": "A", "quantity": 3}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(allocations(&r), pairs(&[("W2", 3)]));
    let (_, availability) = app.get("/v1/availability?sku=A&channel=web").await;
    assert_eq!(availability["items"], json!([{"sku": "A", "available": 7, "warehouses": {"W2": 7}}]));
    let (_, web) = app.get("/v1/channels/web").await;
    assert_eq!(web["warehouses"][0]["active"], false);
}

#[tokio::test]
async fn a_line_pinned_outside_the_channel_is_422_and_an_unknown_channel_404() {
    let app = shop().await;
    let before = app.ledger_count().await;
    let (status, body) = app
        .post(
            "/v1/reservations",
            json!({"order_id": "o-1", "channel": "web", "lines": [{"sku": "A", "quantity": 1, "warehouse": "W2"},
                                                                    {"sku": "A", "quantity": 1, "warehouse": "W1"}]}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed")),
        "{body}"
    );
    assert_eq!(body["errors"][0]["field"], "lines[1].warehouse");
    // Pinned inside the channel is fine.
    let (status, r) = app
        .post(
            "/v1/reservations",
            json!({"order_id": "o-1", "channel": "web", "lines": [{"sku": "A", "quantity": 1, "warehouse": "W2"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(allocations(&r), pairs(&[("W2", 1)]));

    // A pinned warehouse that does not exist at all is 404, as without a channel.
    let (status, body) = app
        .post(
            "/v1/reservations",
            json!({"order_id": "o-9", "channel": "web", "lines": [{"sku": "A", "quantity": 1, "warehouse": "NOPE"}]}),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{body}");
    for path in ["/v1/reservations", "/v1/reservations/plan"] {
        let (status, body) =
            app.post(path, json!({"order_id": "o-2", "channel": "shop", "lines": [{"sku": "A", "quantity": 1}]})).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{path}: {body}");
        assert!(body["detail"].as_str().unwrap().contains("shop"), "{body}");
    }
    let (status, body) = app
        .post(
            "/v1/reservations",
            json!({"order_id": "o-2", "channel": "bad code", "lines": [{"sku": "A", "quantity": 1}]}),
        )
        .await;
    assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("channel")));
    let (status, body) = app.get("/v1/availability?sku=A&channel=shop").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    assert_eq!(app.ledger_count().await, before + 1, "only the one reservation made wrote the ledger");
    app.assert_invariants().await;
}

#[tokio::test]
async fn the_same_order_id_may_be_used_once_in_each_channel() {
    let app = shop().await;
    app.put("/v1/channels/market", json!({"name": "Marketplace", "warehouses": [{"warehouse": "W1"}]})).await;
    let order =
        |channel: Value| json!({"order_id": "1001", "channel": channel, "lines": [{"sku": "A", "quantity": 1}]});
    let mut ids = Vec::new();
    for channel in [json!("web"), json!("market"), Value::Null] {
        let (status, r) = app.post("/v1/reservations", order(channel.clone())).await;
        assert_eq!(status, StatusCode::CREATED, "{channel}: {r}");
        assert_eq!(r["channel"], channel);
        ids.push(r["id"].as_str().unwrap().to_owned());
        // A second time in the same channel (or again without one): duplicate_order with the first.
        let (status, body) = app.post("/v1/reservations", order(channel.clone())).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("duplicate_order")), "{body}");
        assert_eq!(body["reservation_id"], r["id"]);
        // A plan in the same channel says the same.
        let (status, body) = app.post("/v1/reservations/plan", order(channel)).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("duplicate_order")), "{body}");
    }

    let (_, found) = app.get("/v1/reservations?order_id=1001&channel=market").await;
    let found: Vec<&str> = found["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(found, [ids[1].as_str()]);
    let (_, all) = app.get("/v1/reservations?order_id=1001").await;
    let mut all: Vec<&str> = all["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    all.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(all, expected);
    let (_, none) = app.get("/v1/reservations?order_id=1001&channel=other").await;
    assert_eq!(none["items"], json!([]));
    app.assert_invariants().await;
}

#[tokio::test]
async fn availability_per_channel_sums_only_its_active_warehouses() {
    let app = shop().await;
    app.sku("B").await;
    app.receive("B", "W1", 4).await;
    let (status, body) = app.get("/v1/availability?sku=A&sku=B&sku=NONE&channel=web").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["items"],
        json!([
            {"sku": "A", "available": 20, "warehouses": {"W3": 10, "W2": 10}},
            {"sku": "B", "available": 0, "warehouses": {}},
            {"sku": "NONE", "available": 0, "warehouses": {}},
        ])
    );
    let (_, all) = app.get("/v1/availability?sku=A").await;
    assert_eq!(all["items"][0]["available"], 30, "without a channel: every active warehouse");
    // A channel without warehouses sells nothing.
    app.put("/v1/channels/empty", json!({"name": "Empty", "warehouses": []})).await;
    let (_, empty) = app.get("/v1/availability?sku=A&channel=empty").await;
    assert_eq!(empty["items"], json!([{"sku": "A", "available": 0, "warehouses": {}}]));
}

#[tokio::test]
async fn shrinking_a_channel_leaves_its_reservations_alone() {
    let app = shop().await;
    let (_, r) = app
        .post("/v1/reservations", json!({"order_id": "o-1", "channel": "web", "lines": [{"sku": "A", "quantity": 12}]}))
        .await;
    let id = r["id"].as_str().unwrap();
    let (status, _) =
        app.put("/v1/channels/web", json!({"name": "Web shop", "warehouses": [{"warehouse": "W1"}]})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, after) = app.get(&format!("/v1/reservations/{id}")).await;
    assert_eq!(after["status"], "active");
    assert_eq!(allocations(&after), pairs(&[("W3", 10), ("W2", 2)]));
    let (status, done) = app.post(&format!("/v1/reservations/{id}/fulfil"), json!({})).await;
    assert_eq!((status, done["status"].as_str()), (StatusCode::OK, Some("fulfilled")), "{done}");
    app.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_in_overlapping_channels_never_oversell() {
    let app = shop().await;
    let deadlocks = app.deadlocks().await;
    app.put(
        "/v1/channels/market",
        json!({"name": "Marketplace", "warehouses": [{"warehouse": "W2", "priority": 1}, {"warehouse": "W1"}]}),
    )
    .await;
    // web sells W3 + W2 (20 units), market W2 + W1 (20 units); 30 units in all, shared W2.
    let results = join_all((0..120).map(|i| {
        let app = &app;
        async move {
            let channel = match i % 3 {
                0 => json!("web"),
                1 => json!("market"),
                _ => Value::Null,
            };
            let body =
                json!({"order_id": format!("o-{}", i / 3), "channel": channel, "lines": [{"sku": "A", "quantity": 1}]});
            let (status, r) = app.post("/v1/reservations", body).await;
            (channel, status, r)
        }
    }))
    .await;
    let mut held = 0;
    for (channel, status, r) in &results {
        match *status {
            StatusCode::CREATED => {
                held += 1;
                let allowed: &[&str] = match channel.as_str() {
                    Some("web") => &["W3", "W2"],
                    Some("market") => &["W2", "W1"],
                    _ => &["W1", "W2", "W3"],
                };
                for (w, _) in allocations(r) {
                    assert!(allowed.contains(&w.as_str()), "{channel} allocated from {w}");
                }
            }
            StatusCode::CONFLICT => assert_eq!(r["code"], "insufficient_stock", "{r}"),
            other => panic!("unexpected {other}: {r}"),
        }
    }
    assert_eq!(held, 30, "exactly the 30 units are sold, no more");
    let levels = [app.level("A", "W1").await, app.level("A", "W2").await, app.level("A", "W3").await];
    assert!(levels.iter().all(|(on_hand, reserved)| (*on_hand, *reserved) == (10, 10)), "{levels:?}");
    app.assert_invariants_and_no_deadlock(deadlocks).await;
}
