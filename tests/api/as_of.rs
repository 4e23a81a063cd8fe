//! `GET /v1/stock/{sku}?as_of=`: the levels as they stood at a past moment, from the ledger.

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem};
use crate::stock::app_with_stock;

/// The database's clock (the one ledger times come from).
async fn db_now(app: &TestApp) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(&app.db).await.unwrap()
}

/// The `at` of the newest ledger entry of a SKU.
async fn last_entry_at(app: &TestApp, sku: &str) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT max(at) FROM ledger WHERE sku = $1").bind(sku).fetch_one(&app.db).await.unwrap()
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// `/v1/stock/{sku}?as_of=…` with the time percent-encoded.
fn path_as_of(sku: &str, as_of: &str) -> String {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    let encoded: String =
        as_of.bytes().map(|b| if unreserved(b) { char::from(b).to_string() } else { format!("%{b:02X}") }).collect();
    format!("/v1/stock/{sku}?as_of={encoded}")
}

async fn stock_as_of(app: &TestApp, sku: &str, as_of: &str) -> (StatusCode, Value) {
    let res = app.client.get(app.url(&path_as_of(sku, as_of))).send().await.unwrap();
    let status = res.status();
    (status, res.json().await.unwrap())
}

/// `stock_as_of` that must succeed.
async fn view_as_of(app: &TestApp, sku: &str, at: DateTime<Utc>) -> Value {
    let (status, body) = stock_as_of(app, sku, &rfc3339(at)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// `(warehouse, on_hand, reserved, available)` of a listed level.
type Level = (String, i64, i64, i64);

/// The listed levels and the totals `(on_hand, reserved, available)`.
fn quantities(view: &Value) -> (Vec<Level>, (i64, i64, i64)) {
    let n = |v: &Value, f: &str| v[f].as_i64().unwrap_or_else(|| panic!("{f} in {v}"));
    let levels = view["warehouses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["warehouse"].as_str().unwrap().to_owned(), n(l, "on_hand"), n(l, "reserved"), n(l, "available")))
        .collect();
    let t = &view["total"];
    (levels, (n(t, "on_hand"), n(t, "reserved"), n(t, "available")))
}

fn level(warehouse: &str, on_hand: i64, reserved: i64) -> Level {
    (warehouse.to_owned(), on_hand, reserved, on_hand - reserved)
}

#[tokio::test]
async fn stock_as_of_a_past_moment_answers_the_levels_as_they_stood() {
    let app = app_with_stock().await;
    let before_anything = db_now(&app).await;

    app.receive("A", "WH1", 10).await;
    let received = last_entry_at(&app, "A").await;
    let (status, body) =
        app.post("/v1/stock/adjust", json!({"sku": "A", "warehouse": "WH1", "delta": -2, "reason": "damage"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let adjusted = last_entry_at(&app, "A").await;
    let order = json!({"order_id": "o-1", "lines": [{"sku": "A", "quantity": 3, "warehouse": "WH1"}]});
    let (status, body) = app.post("/v1/reservations", order).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let reserved = last_entry_at(&app, "A").await;
    let (status, body) =
        app.post("/v1/stock/transfer", json!({"sku": "A", "from": "WH1", "to": "WH2", "quantity": 4})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let transferred = last_entry_at(&app, "A").await;
    assert!(received < adjusted && adjusted < reserved && reserved < transferred);

    let view = view_as_of(&app, "A", before_anything).await;
    assert_eq!(quantities(&view), (vec![], (0, 0, 0)), "before the first entry: {view}");
    assert_eq!(view["sku"], "A");
    assert_eq!(view["backorder_limit"], 0);

    let view = view_as_of(&app, "A", received).await;
    assert_eq!(quantities(&view), (vec![level("WH1", 10, 0)], (10, 0, 10)), "{view}");
    let at: DateTime<Utc> = view["warehouses"][0]["updated_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(at, received, "updated_at is the entry's time");

    let between = adjusted + (reserved - adjusted) / 2;
    let view = view_as_of(&app, "A", between).await;
    assert_eq!(quantities(&view), (vec![level("WH1", 8, 0)], (8, 0, 8)), "{view}");
    let view = view_as_of(&app, "A", reserved - Duration::microseconds(1)).await;
    assert_eq!(quantities(&view), (vec![level("WH1", 8, 0)], (8, 0, 8)), "just before the reservation: {view}");

    // WH2's level was created by the transfer, after this moment: left out.
    let view = view_as_of(&app, "A", reserved).await;
    assert_eq!(quantities(&view), (vec![level("WH1", 8, 3)], (8, 3, 5)), "{view}");

    let view = view_as_of(&app, "A", transferred).await;
    assert_eq!(quantities(&view), (vec![level("WH1", 4, 3), level("WH2", 4, 0)], (8, 3, 5)), "{view}");

    // Any RFC 3339 spelling of the moment: another offset, `+` written as %2B.
    let in_berlin = reserved.with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap()).to_rfc3339();
    let (status, view) = stock_as_of(&app, "A", &in_berlin).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(quantities(&view), (vec![level("WH1", 8, 3)], (8, 3, 5)), "{in_berlin}: {view}");
}

/// Without the ledger's updated_at times, which the level's own column keeps differently (the
/// transaction's start; replenishment changes too).
fn without_times(mut view: Value) -> Value {
    for level in view["warehouses"].as_array_mut().unwrap() {
        level.as_object_mut().unwrap().remove("updated_at");
    }
    view
}

#[tokio::test]
async fn stock_as_of_now_answers_what_the_plain_read_answers() {
    let app = app_with_stock().await;
    app.warehouse("WH3", 3).await;
    app.warehouse("OLD", 4).await;
    let (status, body) = app.put("/v1/skus/A", json!({"backorder_limit": 5})).await;
    assert!(status.is_success(), "{body}");
    app.receive("A", "WH1", 7).await;
    app.receive("A", "OLD", 3).await;
    let (status, body) = app.put("/v1/warehouses/OLD", json!({"name": "old", "active": false})).await;
    assert!(status.is_success(), "{body}");
    let order = json!({"order_id": "o-1", "lines": [{"sku": "A", "quantity": 9, "warehouse": "WH1"}]});
    let (status, body) = app.post("/v1/reservations", order).await;
    assert_eq!(status, StatusCode::CREATED, "a backorder: {body}");
    app.receive("A", "WH2", 1).await;
    let (status, body) =
        app.post("/v1/stock/transfer", json!({"sku": "A", "from": "WH2", "to": "WH1", "quantity": 1})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A level with settings but nothing ever received: it exists, with nothing on hand.
    let (status, body) = app.put("/v1/stock/A/WH3", json!({"reorder_point": 4, "reorder_quantity": 10})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let now = db_now(&app).await;
    let (status, plain) = app.get("/v1/stock/A").await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    let as_of = view_as_of(&app, "A", now).await;
    assert_eq!(without_times(as_of.clone()), without_times(plain.clone()), "as_of now:\n{as_of}\nplain:\n{plain}");
    assert_eq!(
        quantities(&as_of),
        (vec![level("OLD", 3, 0), level("WH1", 8, 9), level("WH2", 0, 0), level("WH3", 0, 0)], (11, 9, 2))
    );
    assert_eq!(as_of["warehouses"][3]["reorder_point"], 4);
}

/// A ledger entry: `(at, on_hand_delta, reserved_delta, on_hand_after, reserved_after)`.
type Entry = (DateTime<Utc>, i64, i64, i64, i64);

/// Many reservations and receipts race for one level. Every entry's `at` then follows the
/// level's lock order: in (at, id) order each entry continues the one before, and the stock as
/// of any entry's time is that entry's (or that of a later one with the very same time).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_times_follow_lock_order_under_concurrency() {
    let app = app_with_stock().await;
    app.receive("A", "WH1", 100).await;
    let requests = (0..120).map(|i| {
        let app = &app;
        async move {
            let (status, body) = if i % 2 == 0 {
                let order = json!({"order_id": format!("o-{i}"), "lines": [{"sku": "A", "quantity": 1 + i % 3, "warehouse": "WH1"}]});
                app.post("/v1/reservations", order).await
            } else {
                app.post("/v1/stock/receive", json!({"sku": "A", "warehouse": "WH1", "quantity": 1 + i % 4})).await
            };
            assert!(status.is_success(), "{status} {body}");
        }
    });
    join_all(requests).await;

    let entries: Vec<Entry> = sqlx::query_as(
        "SELECT at, on_hand_delta, reserved_delta, on_hand_after, reserved_after
           FROM ledger WHERE sku = 'A' AND warehouse = 'WH1' ORDER BY at, id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(entries.len(), 121);
    let mut state = (0, 0);
    for (at, dh, dr, on_hand, reserved) in &entries {
        state = (state.0 + dh, state.1 + dr);
        assert_eq!(state, (*on_hand, *reserved), "the entry at {at} does not continue the one before it");
    }

    let checks = entries.iter().enumerate().map(|(i, (at, ..))| {
        let app = &app;
        let entries = &entries;
        async move {
            let view = view_as_of(app, "A", *at).await;
            // The last entry with this very time (entries of one statement may share it).
            let last = entries.iter().skip(i).take_while(|e| e.0 == *at).last().unwrap();
            let expected = (vec![level("WH1", last.3, last.4)], (last.3, last.4, last.3 - last.4));
            assert_eq!(quantities(&view), expected, "as of {at}: {view}");
        }
    });
    join_all(checks).await;

    let view = view_as_of(&app, "A", db_now(&app).await).await;
    let (on_hand, reserved) = app.level("A", "WH1").await;
    assert_eq!(quantities(&view), (vec![level("WH1", on_hand, reserved)], (on_hand, reserved, on_hand - reserved)));
}

#[tokio::test]
async fn stock_as_of_the_future_garbage_or_an_unknown_sku_is_refused() {
    let app = app_with_stock().await;
    app.receive("A", "WH1", 1).await;

    let tomorrow = rfc3339(db_now(&app).await + Duration::days(1));
    let res = app.client.get(app.url(&path_as_of("A", &tomorrow))).send().await.unwrap();
    let problem = assert_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "as_of", "{problem}");

    // Not an RFC 3339 time: a malformed query value, like any other of the wrong shape.
    for garbage in ["yesterday", "2025-01-31", "2025-01-31T12:00:00", "1738324800", "", "2025-13-01T00:00:00Z"] {
        let res = app.client.get(app.url(&path_as_of("A", garbage))).send().await.unwrap();
        assert_problem(res, StatusCode::BAD_REQUEST, "malformed_request").await;
    }
    // An unencoded `+` arrives as a space.
    let res = app.client.get(app.url("/v1/stock/A?as_of=2025-01-31T12:00:00+01:00")).send().await.unwrap();
    let problem = assert_problem(res, StatusCode::BAD_REQUEST, "malformed_request").await;
    assert!(problem["detail"].as_str().unwrap().contains("%2B"), "{problem}");

    let yesterday = rfc3339(db_now(&app).await - Duration::days(1));
    for sku in ["NOPE", "no%20such%20sku"] {
        let res = app.client.get(app.url(&path_as_of(sku, &yesterday))).send().await.unwrap();
        assert_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    }
}
