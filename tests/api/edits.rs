//! Changing an open reservation's lines (`PUT /v1/reservations/{id}/lines`): grow, shrink,
//! drop, all or nothing, only while active and unfulfilled, serialized with every other change.

use std::time::Duration;

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;

/// W1 (priority 1) with 5 units of A, W2 (priority 2) with 10 units of A and 10 of B.
async fn shop() -> TestApp {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.warehouse("W2", 2).await;
    app.sku("A").await;
    app.sku("B").await;
    app.receive("A", "W1", 5).await;
    app.receive("A", "W2", 10).await;
    app.receive("B", "W2", 10).await;
    app
}

async fn reserve(app: &TestApp, order_id: &str, lines: Value) -> String {
    let (status, r) = app.post("/v1/reservations", json!({"order_id": order_id, "lines": lines})).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    r["id"].as_str().unwrap().to_owned()
}

async fn edit(app: &TestApp, id: &str, body: Value) -> (StatusCode, Value) {
    app.put(&format!("/v1/reservations/{id}/lines"), body).await
}

/// `sku → [(warehouse, held)]` of a reservation body, lines in order.
fn holds(reservation: &Value) -> Vec<(String, Vec<(String, i64)>)> {
    reservation["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let allocations = l["allocations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| (a["warehouse"].as_str().unwrap().to_owned(), a["held"].as_i64().unwrap()))
                .collect();
            (l["sku"].as_str().unwrap().to_owned(), allocations)
        })
        .collect()
}

fn expect(list: &[(&str, &[(&str, i64)])]) -> Vec<(String, Vec<(String, i64)>)> {
    list.iter()
        .map(|(sku, allocations)| ((*sku).to_owned(), allocations.iter().map(|(w, q)| ((*w).to_owned(), *q)).collect()))
        .collect()
}

/// `(kind, warehouse, reserved_delta)` of the reservation's ledger entries, oldest first.
async fn entries(app: &TestApp, id: &str) -> Vec<(String, String, i64)> {
    let (_, ledger) = app.get(&format!("/v1/ledger?reference={id}")).await;
    ledger["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                format!("{}/{}", e["sku"].as_str().unwrap(), e["warehouse"].as_str().unwrap()),
                e["reserved_delta"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn entry(kind: &str, level: &str, delta: i64) -> (String, String, i64) {
    (kind.to_owned(), level.to_owned(), delta)
}

#[tokio::test]
async fn growing_a_line_keeps_what_is_held_and_takes_the_rest_like_a_new_order() {
    let app = shop().await;
    let id = reserve(&app, "o-1", json!([{"sku": "A", "quantity": 2}])).await;
    let (status, r) = edit(&app, &id, json!({"lines": [{"sku": "A", "quantity": 7}]})).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!((r["status"].as_str(), r["lines"][0]["quantity"].as_i64()), (Some("active"), Some(7)));
    assert_eq!(holds(&r), expect(&[("A", &[("W1", 5), ("W2", 2)])]));
    assert_eq!((app.level("A", "W1").await, app.level("A", "W2").await), ((5, 5), (10, 2)));
    assert_eq!(
        entries(&app, &id).await,
        [entry("reserve", "A/W1", 2), entry("reserve", "A/W1", 3), entry("reserve", "A/W2", 2)]
    );
    let (_, again) = app.get(&format!("/v1/reservations/{id}")).await;
    assert_eq!(holds(&again), holds(&r), "the change is stored as answered");
    app.assert_invariants().await;
}

#[tokio::test]
async fn shrinking_gives_back_the_least_preferred_warehouse_first() {
    let app = shop().await;
    let id = reserve(&app, "o-1", json!([{"sku": "A", "quantity": 8}])).await; // W1 5, W2 3
    let (status, r) = edit(&app, &id, json!({"lines": [{"sku": "A", "quantity": 4}]})).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(holds(&r), expect(&[("A", &[("W1", 4)])]));
    assert_eq!(r["lines"][0]["quantity"], 4);
    assert_eq!((app.level("A", "W1").await, app.level("A", "W2").await), ((5, 4), (10, 0)));
    let releases: Vec<_> = entries(&app, &id).await.into_iter().filter(|e| e.0 == "release").collect();
    assert_eq!(releases, [entry("release", "A/W1", -1), entry("release", "A/W2", -3)]);
    app.assert_invariants().await;
}

#[tokio::test]
async fn a_sku_left_out_is_released_and_a_new_one_is_held() {
    let app = shop().await;
    let id = reserve(&app, "o-1", json!([{"sku": "A", "quantity": 2}, {"sku": "B", "quantity": 1}])).await;
    let (status, r) = edit(&app, &id, json!({"lines": [{"sku": "B", "quantity": 3}]})).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(holds(&r), expect(&[("B", &[("W2", 3)])]));
    assert_eq!((app.level("A", "W1").await, app.level("B", "W2").await), ((5, 0), (10, 3)));
    // Pinning moves nothing that is already where the pin says, and takes the rest there.
    let (status, r) = edit(
        &app,
        &id,
        json!({"lines": [{"sku": "B", "quantity": 3}, {"sku": "A", "quantity": 2, "warehouse": "W2"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(holds(&r), expect(&[("B", &[("W2", 3)]), ("A", &[("W2", 2)])]));
    app.assert_invariants().await;
}

#[tokio::test]
async fn growth_beyond_stock_is_409_and_changes_nothing() {
    let app = shop().await;
    let id = reserve(&app, "o-1", json!([{"sku": "A", "quantity": 2}, {"sku": "B", "quantity": 1}])).await;
    let (_, before) = app.get(&format!("/v1/reservations/{id}")).await;
    let ledger = app.ledger_count().await;
    let (status, body) = edit(
        &app,
        &id,
        json!({"lines": [{"sku": "A", "quantity": 16}, {"sku": "B", "quantity": 2}], "ttl_seconds": 60}),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("insufficient_stock")), "{body}");
    assert_eq!(body["lines"], json!([{"sku": "A", "requested": 16, "available": 15}]));
    let (_, after) = app.get(&format!("/v1/reservations/{id}")).await;
    assert_eq!(after, before, "nothing changed, the deadline neither");
    assert_eq!(app.ledger_count().await, ledger);
    assert_eq!((app.level("A", "W1").await, app.level("B", "W2").await), ((5, 2), (10, 1)));
    app.assert_invariants().await;
}

#[tokio::test]
async fn only_an_active_unfulfilled_reservation_can_change() {
    let app = shop().await;
    let lines = json!({"lines": [{"sku": "A", "quantity": 1}]});
    // Partly fulfilled.
    let id = reserve(&app, "o-1", json!([{"sku": "A", "quantity": 2}])).await;
    let (status, _) = app
        .post(
            &format!("/v1/reservations/{id}/fulfil"),
            json!({"lines": [{"sku": "A", "warehouse": "W1", "quantity": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = edit(&app, &id, lines.clone()).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("reservation_partly_fulfilled")), "{body}");
    assert_eq!(body["reservation_id"], id.as_str());
    // Released.
    let id = reserve(&app, "o-2", json!([{"sku": "A", "quantity": 1}])).await;
    app.post(&format!("/v1/reservations/{id}/release"), json!({})).await;
    let (status, body) = edit(&app, &id, lines.clone()).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("reservation_not_active")), "{body}");
    assert_eq!(body["reservation_status"], "released");
    // Expired: past its deadline it is over, swept or not.
    let (_, r) = app
        .post("/v1/reservations", json!({"order_id": "o-3", "ttl_seconds": 1, "lines": [{"sku": "B", "quantity": 1}]}))
        .await;
    let id = r["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, body) = edit(&app, id, lines.clone()).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("reservation_not_active")), "{body}");
    assert_eq!(body["reservation_status"], "expired");
    // Unknown, and invalid bodies.
    let (status, _) = edit(&app, "0190b8a0-0000-7000-8000-000000000000", lines).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let id = reserve(&app, "o-4", json!([{"sku": "A", "quantity": 1}])).await;
    for (body, field) in [
        (json!({"lines": []}), "lines"),
        (json!({}), "lines"),
        (json!({"lines": [{"sku": "A", "quantity": 0}]}), "lines[0].quantity"),
        (json!({"lines": [{"sku": "A", "quantity": 1}], "ttl_seconds": 0}), "ttl_seconds"),
    ] {
        let (status, problem) = edit(&app, &id, body.clone()).await;
        assert_eq!(
            (status, problem["errors"][0]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{body}"
        );
    }
    let (status, body) = edit(&app, &id, json!({"lines": [{"sku": "NOPE", "quantity": 1}]})).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{body}");
    app.assert_invariants().await;
}

#[tokio::test]
async fn an_edit_is_an_event_moves_the_deadline_when_asked_and_replays_under_its_key() {
    let app = shop().await;
    let (_, r) = app.post("/v1/reservations", json!({"order_id": "o-1", "lines": [{"sku": "A", "quantity": 1}]})).await;
    let id = r["id"].as_str().unwrap();
    let body = json!({"lines": [{"sku": "A", "quantity": 2}], "ttl_seconds": 3600});
    let send = |body: &Value| {
        app.client
            .put(app.url(&format!("/v1/reservations/{id}/lines")))
            .header("Idempotency-Key", "edit-1")
            .json(body)
            .send()
    };
    let first = send(&body).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let first: Value = first.json().await.unwrap();
    assert!(first["expires_at"].as_str().unwrap() > r["expires_at"].as_str().unwrap(), "{first}");
    let replay = send(&body).await.unwrap();
    assert_eq!(replay.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(replay.json::<Value>().await.unwrap(), first);
    assert_eq!(app.level("A", "W1").await, (5, 2), "the replay changed nothing");
    let reused = send(&json!({"lines": [{"sku": "A", "quantity": 3}]})).await.unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let (_, events) = app.get("/v1/events?type=reservation.modified").await;
    let events = events["items"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reservation_id"], id);
    assert_eq!(events[0]["data"]["order_id"], "o-1");
    app.assert_invariants().await;
}

#[tokio::test]
async fn growth_in_a_channel_comes_from_the_channels_warehouses() {
    let app = shop().await;
    app.warehouse("W3", 3).await;
    app.receive("A", "W3", 10).await;
    let (status, _) = app
        .put("/v1/channels/web", json!({"name": "Web", "warehouses": [{"warehouse": "W3"}, {"warehouse": "W2"}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, r) = app
        .post("/v1/reservations", json!({"order_id": "o-1", "channel": "web", "lines": [{"sku": "A", "quantity": 1}]}))
        .await;
    let id = r["id"].as_str().unwrap();
    assert_eq!(holds(&r), expect(&[("A", &[("W2", 1)])]));
    let (status, r) = edit(&app, id, json!({"lines": [{"sku": "A", "quantity": 14}]})).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(holds(&r), expect(&[("A", &[("W2", 10), ("W3", 4)])]), "never W1, though it is preferred");
    let (status, body) = edit(&app, id, json!({"lines": [{"sku": "A", "quantity": 1, "warehouse": "W1"}]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    app.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_fulfils_and_orders_serialize_and_keep_every_invariant() {
    let app = shop().await;
    let deadlocks = app.deadlocks().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            reserve(&app, &format!("o-{i}"), json!([{"sku": "A", "quantity": 1}, {"sku": "B", "quantity": 1}])).await,
        );
    }
    let ids = &ids;
    let results = join_all((0..80).map(|i| {
        let app = &app;
        async move {
            let id = &ids[i % 4];
            match i % 8 {
                // Somebody else buying the same stock.
                0 => {
                    app.post(
                        "/v1/reservations",
                        json!({"order_id": format!("other-{i}"), "lines": [{"sku": "A", "quantity": 1}]}),
                    )
                    .await
                }
                // The last edit of reservation 3 races its fulfil.
                7 => app.post(&format!("/v1/reservations/{id}/fulfil"), json!({})).await,
                _ => {
                    let lines = json!([{"sku": "A", "quantity": 1 + i % 3}, {"sku": "B", "quantity": 1 + i % 2}]);
                    edit(app, id, json!({ "lines": lines })).await
                }
            }
        }
    }))
    .await;
    for (status, body) in &results {
        let allowed = [
            (StatusCode::OK, None),
            (StatusCode::CREATED, None),
            (StatusCode::CONFLICT, Some("insufficient_stock")),
            (StatusCode::CONFLICT, Some("reservation_not_active")),
        ];
        let code = body["code"].as_str();
        assert!(allowed.iter().any(|(s, c)| s == status && (c.is_none() || *c == code)), "{status} {body}");
    }
    // Each reservation holds what its allocations say; together with the other orders, that is
    // every level's `reserved` (invariant 4, checked below), and the ledger agrees (invariant 3).
    for id in ids {
        let (_, r) = app.get(&format!("/v1/reservations/{id}")).await;
        if r["status"] == "active" {
            for line in r["lines"].as_array().unwrap() {
                let held: i64 =
                    line["allocations"].as_array().unwrap().iter().map(|a| a["held"].as_i64().unwrap()).sum();
                assert_eq!(line["quantity"].as_i64().unwrap(), held, "{r}");
            }
        }
    }
    app.assert_invariants_and_no_deadlock(deadlocks).await;
}
