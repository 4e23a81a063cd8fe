//! The reservation engine over HTTP: allocation cases, lifecycle, conflicts.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;

/// Three warehouses W1 (priority 1), W2 (2), W3 (3) and SKUs A, B.
async fn shop() -> TestApp {
    let app = TestApp::spawn().await;
    for (w, p) in [("W1", 1), ("W2", 2), ("W3", 3)] {
        app.warehouse(w, p).await;
    }
    app.sku("A").await;
    app.sku("B").await;
    app
}

async fn reserve(app: &TestApp, body: Value) -> (StatusCode, Value) {
    app.post("/v1/reservations", body).await
}

/// `(warehouse, quantity)` of each allocation of the reservation's line for `sku`.
fn allocations(reservation: &Value, sku: &str) -> Vec<(String, i64)> {
    reservation["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["sku"] == sku)
        .map(|l| {
            l["allocations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| (a["warehouse"].as_str().unwrap().to_owned(), a["quantity"].as_i64().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

fn pairs(list: &[(&str, i64)]) -> Vec<(String, i64)> {
    list.iter().map(|(w, q)| ((*w).to_owned(), *q)).collect()
}

#[tokio::test]
async fn reserving_holds_stock_and_writes_one_reserve_entry_per_level() {
    let app = shop().await;
    app.receive("A", "W1", 5).await;
    app.receive("B", "W2", 5).await;
    let (status, r) =
        reserve(&app, json!({"order_id": "o-1", "lines": [{"sku": "A", "quantity": 2}, {"sku": "B", "quantity": 3}]}))
            .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(r["status"], "active");
    assert_eq!(r["order_id"], "o-1");
    assert_eq!(r["lines"][0]["sku"], "A");
    assert_eq!(r["lines"][0]["quantity"], 2);
    assert_eq!(
        r["lines"][1]["allocations"][0],
        json!({"warehouse": "W2", "quantity": 3, "fulfilled": 0, "released": 0, "held": 3})
    );
    let created = chrono::DateTime::parse_from_rfc3339(r["created_at"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(r["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - created).num_seconds(), 900, "default ttl");
    assert_eq!(app.level("A", "W1").await, (5, 2));
    assert_eq!(app.level("B", "W2").await, (5, 3));

    let id = r["id"].as_str().unwrap();
    let (_, ledger) = app.get(&format!("/v1/ledger?reference={id}")).await;
    let entries = ledger["items"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().all(|e| e["kind"] == "reserve" && e["on_hand_delta"] == 0));
    let (status, fetched) = app.get(&format!("/v1/reservations/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched["lines"], r["lines"]);
    let (_, by_order) = app.get("/v1/reservations?order_id=o-1").await;
    assert_eq!(by_order["items"][0]["id"], id);
    let (_, none) = app.get("/v1/reservations?order_id=nope").await;
    assert_eq!(none["items"], json!([]));
    app.assert_invariants().await;
}

#[tokio::test]
async fn a_pinned_line_is_held_only_from_its_warehouse() {
    let app = shop().await;
    app.receive("A", "W1", 5).await;
    app.receive("A", "W3", 5).await;
    let (status, r) =
        reserve(&app, json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 4, "warehouse": "W3"}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(allocations(&r, "A"), pairs(&[("W3", 4)]));
    let (status, r) =
        reserve(&app, json!({"order_id": "o2", "lines": [{"sku": "A", "quantity": 2, "warehouse": "W3"}]})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(r["lines"], json!([{"sku": "A", "requested": 2, "available": 1}]));
    let (status, _) =
        reserve(&app, json!({"order_id": "o3", "lines": [{"sku": "A", "quantity": 1, "warehouse": "NOPE"}]})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.assert_invariants().await;
}

#[tokio::test]
async fn priority_fills_the_best_warehouse_first_and_splits_a_line() {
    let app = shop().await;
    app.receive("A", "W3", 10).await;
    app.receive("A", "W2", 3).await;
    app.receive("A", "W1", 2).await;
    let (status, r) = reserve(&app, json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 7}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(allocations(&r, "A"), pairs(&[("W1", 2), ("W2", 3), ("W3", 2)]));
    assert_eq!(r["lines"][0]["quantity"], 7);
    app.assert_invariants().await;
}

#[tokio::test]
async fn priority_ties_are_broken_by_warehouse_code() {
    let app = TestApp::spawn().await;
    app.warehouse("ZED", 5).await;
    app.warehouse("ALPHA", 5).await;
    app.sku("A").await;
    app.receive("A", "ZED", 5).await;
    app.receive("A", "ALPHA", 5).await;
    let (_, r) = reserve(&app, json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 1}]})).await;
    assert_eq!(allocations(&r, "A"), pairs(&[("ALPHA", 1)]));
}

#[tokio::test]
async fn single_takes_the_whole_order_from_the_best_warehouse_that_can_fill_it() {
    let app = shop().await;
    app.receive("A", "W1", 5).await; // W1 lacks B
    app.receive("A", "W2", 5).await;
    app.receive("B", "W2", 5).await;
    app.receive("B", "W3", 5).await;
    app.receive("A", "W3", 5).await;
    let body = json!({"order_id": "o", "strategy": "single", "lines": [{"sku": "A", "quantity": 3}, {"sku": "B", "quantity": 2}]});
    let (status, r) = reserve(&app, body).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(allocations(&r, "A"), pairs(&[("W2", 3)]));
    assert_eq!(allocations(&r, "B"), pairs(&[("W2", 2)]));
    app.assert_invariants().await;
}

#[tokio::test]
async fn single_refuses_an_order_no_one_warehouse_can_fill() {
    let app = shop().await;
    app.receive("A", "W1", 5).await;
    app.receive("B", "W2", 5).await;
    let body = json!({"order_id": "o", "strategy": "single", "lines": [{"sku": "A", "quantity": 1}, {"sku": "B", "quantity": 1}]});
    let (status, r) = reserve(&app, body).await;
    assert_eq!(status, StatusCode::CONFLICT, "{r}");
    assert_eq!(r["code"], "insufficient_stock");
    assert!(!r["lines"].as_array().unwrap().is_empty());
    assert_eq!((app.level("A", "W1").await, app.level("B", "W2").await), ((5, 0), (5, 0)));
    let (_, none) = app.get("/v1/reservations?order_id=o").await;
    assert_eq!(none["items"], json!([]), "a refused order leaves no reservation");
}

#[tokio::test]
async fn inactive_warehouses_take_no_new_reservations() {
    let app = shop().await;
    app.receive("A", "W1", 5).await;
    app.receive("A", "W2", 5).await;
    app.put("/v1/warehouses/W1", json!({"name": "W1", "active": false})).await;
    let (_, r) = reserve(&app, json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 2}]})).await;
    assert_eq!(allocations(&r, "A"), pairs(&[("W2", 2)]));
    let (status, r) = reserve(&app, json!({"order_id": "o2", "lines": [{"sku": "A", "quantity": 4}]})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(r["lines"], json!([{"sku": "A", "requested": 4, "available": 3}]));
}

#[tokio::test]
async fn backorders_are_used_last_and_capped_per_warehouse() {
    let app = shop().await;
    app.put("/v1/skus/A", json!({"backorder_limit": 3})).await;
    app.receive("A", "W1", 1).await;
    app.receive("A", "W2", 2).await;
    // Real stock everywhere first (1 + 2), then W1's backorder capacity.
    let (status, r) = reserve(&app, json!({"order_id": "o1", "lines": [{"sku": "A", "quantity": 5}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(allocations(&r, "A"), pairs(&[("W1", 3), ("W2", 2)]));
    // Left: W1 1 more backorder, W2 3 backorders.
    let (status, r) = reserve(&app, json!({"order_id": "o2", "lines": [{"sku": "A", "quantity": 5}]})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(r["lines"], json!([{"sku": "A", "requested": 5, "available": 4}]));
    let (status, _) = reserve(&app, json!({"order_id": "o3", "lines": [{"sku": "A", "quantity": 4}]})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(app.level("A", "W1").await, (1, 4));
    assert_eq!(app.level("A", "W2").await, (2, 5));
    app.assert_invariants().await;
}

#[tokio::test]
async fn lines_naming_the_same_sku_count_together() {
    let app = shop().await;
    app.receive("A", "W1", 3).await;
    let body = json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 2}, {"sku": "A", "quantity": 2}]});
    let (status, r) = reserve(&app, body).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(r["lines"], json!([{"sku": "A", "requested": 4, "available": 3}]));
    let body = json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 1}, {"sku": "A", "quantity": 2, "warehouse": "W1"}]});
    let (status, r) = reserve(&app, body).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(r["lines"].as_array().unwrap().len(), 1);
    assert_eq!(allocations(&r, "A"), pairs(&[("W1", 3)]));
    app.assert_invariants().await;
}

#[tokio::test]
async fn a_short_order_lists_every_short_line_and_holds_nothing() {
    let app = shop().await;
    app.sku("C").await;
    app.receive("A", "W1", 1).await;
    app.receive("B", "W1", 9).await;
    let body = json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 2}, {"sku": "B", "quantity": 1}, {"sku": "C", "quantity": 1}]});
    let (status, r) = reserve(&app, body).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        r["lines"],
        json!([{"sku": "A", "requested": 2, "available": 1}, {"sku": "C", "requested": 1, "available": 0}])
    );
    assert_eq!(app.level("B", "W1").await, (9, 0), "all or nothing");
    let (status, _) = reserve(&app, json!({"order_id": "o", "lines": [{"sku": "UNKNOWN", "quantity": 1}]})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.assert_invariants().await;
}

#[tokio::test]
async fn an_order_id_is_reserved_once() {
    let app = shop().await;
    app.receive("A", "W1", 5).await;
    let (_, first) = reserve(&app, json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 1}]})).await;
    let (status, r) = reserve(&app, json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 2}]})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(r["code"], "duplicate_order");
    assert_eq!(r["reservation_id"], first["id"]);
    assert_eq!(app.level("A", "W1").await, (5, 1));
}

#[tokio::test]
async fn a_plan_answers_like_a_reservation_but_holds_nothing() {
    let app = shop().await;
    app.receive("A", "W1", 2).await;
    app.receive("A", "W2", 2).await;
    let (status, p) =
        app.post("/v1/reservations/plan", json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 3}]})).await;
    assert_eq!(status, StatusCode::OK, "{p}");
    assert_eq!(allocations(&p, "A"), pairs(&[("W1", 2), ("W2", 1)]));
    assert_eq!(app.level("A", "W1").await, (2, 0));
    let (status, p) =
        app.post("/v1/reservations/plan", json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 5}]})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(p["code"], "insufficient_stock");
    assert_eq!(app.ledger_count().await, 2, "only the receipts");
}

#[tokio::test]
async fn partial_fulfilment_then_release_ends_fulfilled() {
    let app = shop().await;
    app.receive("A", "W1", 3).await;
    app.receive("A", "W2", 3).await;
    let (_, r) = reserve(&app, json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 5}]})).await;
    let id = r["id"].as_str().unwrap();
    let (status, r) = app
        .post(
            &format!("/v1/reservations/{id}/fulfil"),
            json!({"lines": [{"sku": "A", "warehouse": "W2", "quantity": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["status"], "active");
    assert_eq!(
        r["lines"][0]["allocations"][1],
        json!({"warehouse": "W2", "quantity": 2, "fulfilled": 1, "released": 0, "held": 1})
    );
    assert_eq!(app.level("A", "W2").await, (2, 1));

    let (status, r) = app.call(reqwest::Method::POST, &format!("/v1/reservations/{id}/release"), None).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["status"], "fulfilled", "something was fulfilled");
    assert_eq!((app.level("A", "W1").await, app.level("A", "W2").await), ((3, 0), (2, 0)));
    let (_, ledger) = app.get(&format!("/v1/ledger?reference={id}")).await;
    let kinds: Vec<&str> = ledger["items"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["reserve", "reserve", "fulfil", "release", "release"]);

    let (status, r) = app.call(reqwest::Method::POST, &format!("/v1/reservations/{id}/fulfil"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        (r["code"].clone(), r["reservation_status"].clone()),
        (json!("reservation_not_active"), json!("fulfilled"))
    );
    app.assert_invariants().await;
}

#[tokio::test]
async fn releasing_everything_ends_released_and_fulfilling_everything_ends_fulfilled() {
    let app = shop().await;
    app.receive("A", "W1", 10).await;
    let (_, r1) = reserve(&app, json!({"order_id": "o1", "lines": [{"sku": "A", "quantity": 4}]})).await;
    let (_, r2) = reserve(&app, json!({"order_id": "o2", "lines": [{"sku": "A", "quantity": 3}]})).await;
    let (status, r1) = app.post(&format!("/v1/reservations/{}/release", r1["id"].as_str().unwrap()), json!({})).await;
    assert_eq!((status, r1["status"].clone()), (StatusCode::OK, json!("released")));
    let (status, r2) =
        app.call(reqwest::Method::POST, &format!("/v1/reservations/{}/fulfil", r2["id"].as_str().unwrap()), None).await;
    assert_eq!((status, r2["status"].clone()), (StatusCode::OK, json!("fulfilled")));
    assert_eq!(app.level("A", "W1").await, (7, 0));
    let (status, r) =
        app.post(&format!("/v1/reservations/{}/extend", r2["id"].as_str().unwrap()), json!({"ttl_seconds": 60})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(r["code"], "reservation_not_active");
    app.assert_invariants().await;
}

#[tokio::test]
async fn fulfilling_more_than_held_is_over_fulfilment() {
    let app = shop().await;
    app.receive("A", "W1", 10).await;
    let (_, r) = reserve(&app, json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 2}]})).await;
    let id = r["id"].as_str().unwrap();
    for lines in [
        json!([{"sku": "A", "warehouse": "W1", "quantity": 3}]),
        json!([{"sku": "A", "warehouse": "W2", "quantity": 1}]),
    ] {
        let (status, body) = app.post(&format!("/v1/reservations/{id}/fulfil"), json!({"lines": lines})).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["code"], "over_fulfilment");
    }
    let (status, body) = app
        .post(
            &format!("/v1/reservations/{id}/release"),
            json!({"lines": [{"sku": "A", "warehouse": "W1", "quantity": 3}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "over_release");
    assert_eq!(app.level("A", "W1").await, (10, 2));
    app.assert_invariants().await;
}

#[tokio::test]
async fn a_backordered_hold_cannot_ship_units_that_do_not_exist() {
    let app = shop().await;
    app.put("/v1/skus/A", json!({"backorder_limit": 5})).await;
    app.receive("A", "W1", 1).await;
    let (_, r) = reserve(&app, json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 3}]})).await;
    let id = r["id"].as_str().unwrap();
    let (status, body) = app.call(reqwest::Method::POST, &format!("/v1/reservations/{id}/fulfil"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "insufficient_stock");
    assert_eq!(body["lines"], json!([{"sku": "A", "requested": 3, "available": 1}]));
    let (status, body) = app
        .post(
            &format!("/v1/reservations/{id}/fulfil"),
            json!({"lines": [{"sku": "A", "warehouse": "W1", "quantity": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.receive("A", "W1", 2).await;
    let (status, body) = app.call(reqwest::Method::POST, &format!("/v1/reservations/{id}/fulfil"), None).await;
    assert_eq!((status, body["status"].clone()), (StatusCode::OK, json!("fulfilled")));
    assert_eq!(app.level("A", "W1").await, (0, 0));
    app.assert_invariants().await;
}

#[tokio::test]
async fn unknown_reservations_are_404_and_bad_requests_422() {
    let app = shop().await;
    for path in ["/v1/reservations/0196f6a0-0000-7000-8000-000000000000", "/v1/reservations/not-a-uuid"] {
        let (status, _) = app.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let (status, _) =
        app.call(reqwest::Method::POST, "/v1/reservations/0196f6a0-0000-7000-8000-000000000000/fulfil", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for (body, field) in [
        (json!({"lines": [{"sku": "A", "quantity": 1}]}), "order_id"),
        (json!({"order_id": "o", "lines": []}), "lines"),
        (json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 0}]}), "lines[0].quantity"),
        (json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 1}], "ttl_seconds": 0}), "ttl_seconds"),
        (json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 1}], "ttl_seconds": 604_801}), "ttl_seconds"),
        (json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 1}], "strategy": "cheapest"}), "strategy"),
    ] {
        let (status, r) = reserve(&app, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{r}");
        assert_eq!(r["errors"][0]["field"], field);
    }
    let lines: Vec<Value> = (0..101).map(|_| json!({"sku": "A", "quantity": 1})).collect();
    let (status, _) = reserve(&app, json!({"order_id": "o", "lines": lines})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.ledger_count().await, 0);
}

#[tokio::test]
async fn a_misspelt_partial_fulfilment_is_refused_rather_than_fulfilling_everything() {
    let app = shop().await;
    app.receive("A", "W1", 10).await;
    let (_, r) = reserve(&app, json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 4}]})).await;
    let id = r["id"].as_str().unwrap();
    let (status, body) = app
        .post(
            &format!("/v1/reservations/{id}/fulfil"),
            json!({"line": [{"sku": "A", "warehouse": "W1", "quantity": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(app.level("A", "W1").await, (10, 4), "nothing fulfilled");
}

#[tokio::test]
async fn single_with_lines_pinned_to_different_warehouses_is_insufficient_stock() {
    // No one warehouse can fill an order pinned to two: answered like any order no single
    // warehouse can fill, and nothing is held.
    let app = shop().await;
    let body = json!({"order_id": "o", "strategy": "single", "lines": [
        {"sku": "A", "quantity": 1, "warehouse": "W1"}, {"sku": "B", "quantity": 1, "warehouse": "W2"}]});
    let (status, r) = reserve(&app, body).await;
    assert_eq!((status, r["code"].as_str()), (StatusCode::CONFLICT, Some("insufficient_stock")), "{r}");
    assert_eq!(r["lines"].as_array().map(Vec::len), Some(2), "{r}");
    app.assert_invariants().await;
}
