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
