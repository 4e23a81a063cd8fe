//! Cursor pagination returns every row exactly once.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::helpers::TestApp;

/// Follows `next_cursor` through a listing and returns every item.
async fn all_pages(app: &TestApp, first: &str, cursor_param: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut path = first.to_owned();
    for _ in 0..100 {
        let (status, body) = app.get(&path).await;
        assert!(status.is_success(), "{body}");
        items.extend(body["items"].as_array().unwrap().iter().cloned());
        match body["next_cursor"].as_str() {
            Some(cursor) => path = format!("{first}&{cursor_param}={cursor}"),
            None => return items,
        }
    }
    panic!("pagination does not end");
}

#[tokio::test]
async fn stock_pages_return_every_level_exactly_once() {
    let app = TestApp::spawn().await;
    for w in ["W1", "W2", "W3"] {
        app.warehouse(w, 1).await;
    }
    for i in 0..9 {
        let sku = format!("S{i}");
        app.sku(&sku).await;
        for w in ["W1", "W2", "W3"] {
            app.receive(&sku, w, i + 1).await;
        }
    }
    let items = all_pages(&app, "/v1/stock?limit=4", "cursor").await;
    assert_eq!(items.len(), 27);
    let keys: HashSet<(String, String)> =
        items.iter().map(|l| (l["sku"].as_str().unwrap().into(), l["warehouse"].as_str().unwrap().into())).collect();
    assert_eq!(keys.len(), 27);
    // A page size that divides the total exactly still ends without an empty page.
    let (_, body) = app.get("/v1/stock?limit=27").await;
    assert_eq!(body["next_cursor"], Value::Null);
}

#[tokio::test]
async fn ledger_pages_return_every_entry_exactly_once_oldest_first() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.sku("B").await;
    for i in 1..=12 {
        app.receive(if i % 3 == 0 { "B" } else { "A" }, "W1", i).await;
    }
    let items = all_pages(&app, "/v1/ledger?limit=5&sku=A", "after").await;
    let deltas: Vec<i64> = items.iter().map(|e| e["on_hand_delta"].as_i64().unwrap()).collect();
    assert_eq!(deltas, [1, 2, 4, 5, 7, 8, 10, 11]);
    let all = all_pages(&app, "/v1/ledger?limit=5", "after").await;
    assert_eq!(all.len(), 12);
    let (_, body) = app.get("/v1/ledger?warehouse=W1&sku=B").await;
    assert_eq!(body["items"].as_array().unwrap().len(), 4);
    assert_eq!(body["items"][3], all[11], "{}", json!(all));
}

/// A reader that tails the ledger with `after` while writers commit out of the order their
/// entries were decided in sees every entry exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_tailing_the_ledger_during_concurrent_writes_sees_every_entry_exactly_once() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.warehouse("W2", 2).await;
    for i in 0..8 {
        app.sku(&format!("T{i}")).await;
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = (0..16).map(|w| {
        let app = &app;
        async move {
            for n in 0..25 {
                let sku = format!("T{}", (w + n) % 8);
                let body = if n % 5 == 4 {
                    json!({"order_id": format!("o{w}-{n}"), "lines": [{"sku": sku, "quantity": 1}]})
                } else {
                    json!({"sku": sku, "warehouse": if n % 2 == 0 { "W1" } else { "W2" }, "quantity": 1 + n})
                };
                let path = if n % 5 == 4 { "/v1/reservations" } else { "/v1/stock/receive" };
                let (status, answer) = app.post(path, body).await;
                assert!(status.is_success() || status == reqwest::StatusCode::CONFLICT, "{status} {answer}");
            }
        }
    });
    let reader = async {
        let mut seen: Vec<String> = Vec::new();
        let mut cursor: Option<String> = None;
        let mut quiet_after_done = 0;
        while quiet_after_done < 3 {
            let path = match &cursor {
                Some(c) => format!("/v1/ledger?limit=7&after={c}"),
                None => "/v1/ledger?limit=7".to_owned(),
            };
            let (status, body) = app.get(&path).await;
            assert!(status.is_success(), "{body}");
            let items = body["items"].as_array().unwrap();
            seen.extend(items.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
            if let Some(last) = items.last() {
                cursor = Some(last["id"].as_str().unwrap().to_owned());
            }
            if items.is_empty() && done.load(std::sync::atomic::Ordering::SeqCst) {
                quiet_after_done += 1;
            }
        }
        seen
    };
    let (seen, ()) = tokio::join!(reader, async {
        futures::future::join_all(writers).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let all: Vec<String> = sqlx::query_scalar("SELECT id::text FROM ledger").fetch_all(&app.db).await.unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an entry was returned twice");
    let missed: Vec<&String> = all.iter().filter(|id| !unique.contains(id)).collect();
    assert!(missed.is_empty(), "the reader never saw {} of {} entries, e.g. {:?}", missed.len(), all.len(), missed[0]);
    app.assert_invariants().await;
}

/// Only the service's own writers hold the ledger and the event feed back: a session of
/// someone else holding a row lock (a transaction id) for long does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_outside_the_service_does_not_hold_back_the_ledger_or_the_feed() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("STUCK").await;
    app.sku("FREE").await;
    app.receive("STUCK", "W1", 1).await;
    let mut blocker = app.db.begin().await.unwrap();
    sqlx::query("SELECT * FROM stock_levels WHERE sku = 'STUCK' FOR UPDATE").execute(&mut *blocker).await.unwrap();

    app.receive("FREE", "W1", 3).await;
    let (_, page) = app.get("/v1/ledger?sku=FREE").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "the entry is listed at once: {page}");
    let started = std::time::Instant::now();
    loop {
        let (_, feed) = app.get("/v1/events?type=stock.back_in_stock").await;
        if feed["items"].as_array().unwrap().iter().any(|e| e["sku"] == "FREE") {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(3), "the feed is held back: {feed}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    blocker.rollback().await.unwrap();
    app.assert_invariants().await;
}
