use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::TestApp;

/// Warehouses WH1 (priority 1) and WH2 (2), and SKU A without stock.
pub(crate) async fn app_with_stock() -> TestApp {
    let app = TestApp::spawn().await;
    app.warehouse("WH1", 1).await;
    app.warehouse("WH2", 2).await;
    app.sku("A").await;
    app
}

#[tokio::test]
async fn receiving_creates_the_level_and_a_ledger_entry() {
    let app = app_with_stock().await;
    let level = app.receive("A", "WH1", 10).await;
    assert_eq!(
        (level["on_hand"].clone(), level["reserved"].clone(), level["available"].clone()),
        (json!(10), json!(0), json!(10))
    );
    let level = app.receive("A", "WH1", 5).await;
    assert_eq!(level["on_hand"], 15);

    let (_, ledger) = app.get("/v1/ledger?sku=A").await;
    let entries = ledger["items"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1]["kind"], "receive");
    assert_eq!((entries[1]["on_hand_delta"].clone(), entries[1]["on_hand_after"].clone()), (json!(5), json!(15)));
    app.assert_invariants().await;
}

#[tokio::test]
async fn receiving_into_unknown_sku_or_warehouse_is_404_and_changes_nothing() {
    let app = app_with_stock().await;
    for (sku, warehouse) in [("NOPE", "WH1"), ("A", "NOPE")] {
        let (status, body) =
            app.post("/v1/stock/receive", json!({"sku": sku, "warehouse": warehouse, "quantity": 1})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(body["detail"].as_str().unwrap().contains("NOPE"));
    }
    assert_eq!(app.ledger_count().await, 0);
}

#[tokio::test]
async fn adjusting_below_zero_is_refused_and_changes_nothing() {
    let app = app_with_stock().await;
    app.receive("A", "WH1", 3).await;
    let (status, body) =
        app.post("/v1/stock/adjust", json!({"sku": "A", "warehouse": "WH1", "delta": -4, "reason": "damage"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "insufficient_stock");
    assert_eq!(body["lines"][0], json!({"sku": "A", "requested": 4, "available": 3}));
    assert_eq!(app.level("A", "WH1").await, (3, 0));
    assert_eq!(app.ledger_count().await, 1);

    let (status, body) = app
        .post(
            "/v1/stock/adjust",
            json!({"sku": "A", "warehouse": "WH1", "delta": -3, "reason": "damage", "reference": "RMA-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["on_hand"], 0);
    let (_, ledger) = app.get("/v1/ledger?reference=RMA-1").await;
    assert_eq!(ledger["items"][0]["reason"], "damage");
    app.assert_invariants().await;
}

#[tokio::test]
async fn compare_and_set_adjust_answers_stale_quantity_with_the_current_value() {
    let app = app_with_stock().await;
    app.receive("A", "WH1", 8).await;
    let count = json!({"sku": "A", "warehouse": "WH1", "delta": 2, "reason": "count", "expected_on_hand": 7});
    let (status, body) = app.post("/v1/stock/adjust", count).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "stale_quantity");
    assert_eq!(body["current_on_hand"], 8);
    assert_eq!(app.level("A", "WH1").await, (8, 0));

    let count = json!({"sku": "A", "warehouse": "WH1", "delta": 2, "reason": "count", "expected_on_hand": 8});
    let (status, body) = app.post("/v1/stock/adjust", count).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["on_hand"], 10);
    app.assert_invariants().await;
}

#[tokio::test]
async fn adjusting_a_level_that_never_existed_can_add_but_not_remove() {
    let app = app_with_stock().await;
    let (status, _) =
        app.post("/v1/stock/adjust", json!({"sku": "A", "warehouse": "WH2", "delta": -1, "reason": "loss"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) =
        app.post("/v1/stock/adjust", json!({"sku": "A", "warehouse": "WH2", "delta": 4, "reason": "found"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.level("A", "WH2").await, (4, 0));
    app.assert_invariants().await;
}

#[tokio::test]
async fn transfers_move_units_atomically_or_not_at_all() {
    let app = app_with_stock().await;
    app.receive("A", "WH1", 10).await;
    let (status, body) = app
        .post("/v1/stock/transfer", json!({"sku": "A", "from": "WH1", "to": "WH2", "quantity": 4, "reference": "T-1"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["from"]["on_hand"].clone(), body["to"]["on_hand"].clone()), (json!(6), json!(4)));
    let (_, ledger) = app.get("/v1/ledger?reference=T-1").await;
    let kinds: Vec<&str> = ledger["items"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["transfer_out", "transfer_in"]);

    let (status, body) =
        app.post("/v1/stock/transfer", json!({"sku": "A", "from": "WH2", "to": "WH1", "quantity": 5})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "insufficient_stock");
    assert_eq!((app.level("A", "WH1").await, app.level("A", "WH2").await), ((6, 0), (4, 0)));

    // A move from a warehouse to itself is checked like any move and changes nothing.
    let entries = app.ledger_count().await;
    let (status, body) =
        app.post("/v1/stock/transfer", json!({"sku": "A", "from": "WH1", "to": "WH1", "quantity": 6})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["from"]["on_hand"].as_i64(), body["to"]["on_hand"].as_i64()), (Some(6), Some(6)), "{body}");
    let (status, body) =
        app.post("/v1/stock/transfer", json!({"sku": "A", "from": "WH1", "to": "WH1", "quantity": 7})).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("insufficient_stock")), "{body}");
    assert_eq!(app.level("A", "WH1").await, (6, 0));
    assert_eq!(app.ledger_count().await, entries, "no ledger entry for a move that moves nothing");
    app.assert_invariants().await;
}

#[tokio::test]
async fn stock_view_sums_the_warehouses() {
    let app = app_with_stock().await;
    app.sku("EMPTY").await;
    app.receive("A", "WH1", 7).await;
    app.receive("A", "WH2", 3).await;
    let (status, body) = app.get("/v1/stock/A").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["total"], json!({"on_hand": 10, "reserved": 0, "available": 10}));
    assert_eq!(body["warehouses"].as_array().unwrap().len(), 2);
    assert_eq!(body["warehouses"][0]["warehouse"], "WH1");

    let (status, body) = app.get("/v1/stock/EMPTY").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["total"], json!({"on_hand": 0, "reserved": 0, "available": 0}));
    assert_eq!(body["warehouses"], json!([]));
}

#[tokio::test]
async fn availability_answers_in_request_order_and_skips_inactive_warehouses() {
    let app = app_with_stock().await;
    app.sku("B").await;
    app.receive("A", "WH1", 7).await;
    app.receive("A", "WH2", 3).await;
    app.receive("B", "WH2", 2).await;
    app.put("/v1/warehouses/WH2", json!({"name": "WH2", "active": false})).await;
    let (status, body) = app.get("/v1/availability?sku=B&sku=UNKNOWN&sku=A").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["items"],
        json!([
            {"sku": "B", "available": 0, "warehouses": {}},
            {"sku": "UNKNOWN", "available": 0, "warehouses": {}},
            {"sku": "A", "available": 7, "warehouses": {"WH1": 7}},
        ])
    );
}

#[tokio::test]
async fn replenishment_settings_drive_the_low_stock_report() {
    let app = app_with_stock().await;
    app.sku("B").await;
    app.receive("A", "WH1", 5).await;
    app.receive("B", "WH1", 50).await;
    let (status, body) = app.put("/v1/stock/A/WH1", json!({"reorder_point": 5, "reorder_quantity": 20})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reorder_point"], 5);
    let (status, body) = app.put("/v1/stock/B/WH2", json!({"reorder_point": 1})).await;
    assert_eq!(status, StatusCode::CREATED, "a new level: {body}");

    let (status, body) = app.get("/v1/stock?below_reorder_point=true").await;
    assert_eq!(status, StatusCode::OK);
    let low: Vec<(String, String)> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["sku"].as_str().unwrap().to_owned(), l["warehouse"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(low, [("A".to_owned(), "WH1".to_owned()), ("B".to_owned(), "WH2".to_owned())]);
    let (_, body) = app.get("/v1/stock?warehouse=WH1").await;
    assert_eq!(body["items"].as_array().unwrap().len(), 2);

    let (status, _) = app.put("/v1/stock/A/NOPE", json!({"reorder_point": 1})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.put("/v1/stock/A/WH1", json!({"reorder_point": -1})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn lowering_a_backorder_limit_keeps_the_level_floor_in_the_database() {
    let app = app_with_stock().await;
    app.receive("A", "WH1", 1).await;
    let (status, _) = app.put("/v1/skus/A", json!({"backorder_limit": 5})).await;
    assert_eq!(status, StatusCode::OK);
    let floor: i64 = sqlx::query_scalar("SELECT backorder_limit FROM stock_levels WHERE sku = 'A'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(floor, 5, "the level carries the SKU's limit for its CHECK constraint");
    // The database itself refuses a level below its floor, whatever the application does.
    let err = sqlx::query("UPDATE stock_levels SET reserved = reserved + 7 WHERE sku = 'A'")
        .execute(&app.db)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stock_available_above_floor"), "{err}");
}

/// Concurrent availability reads share queries (the service's own histogram shows queries that
/// answered several requests), yet none is answered by a query older than the request: a read
/// that starts after a reservation was acknowledged always sees it.
#[tokio::test]
async fn coalesced_availability_reads_are_as_fresh_as_direct_ones() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

    use crate::drills;
    use crate::operability::{metrics, sample};
    let db_url = crate::helpers::fresh_database().await;
    let listen = format!("127.0.0.1:{}", drills::free_port());
    let log = drills::DrillLog::new("coalesced-reads");
    let service = drills::Service::start(&db_url, &listen, log.path(), &[]);
    let app = drills::app_for(&listen, &db_url).await;
    assert!(drills::wait_ready(&app.base, std::time::Duration::from_secs(30)).await.is_some(), "{log}");
    app.warehouse("W1", 1).await;
    app.warehouse("W2", 2).await;
    for sku in ["A", "B", "C", "D"] {
        app.sku(sku).await;
        app.receive(sku, "W1", 1000).await;
        app.receive(sku, "W2", 500).await;
    }
    let name = inventory::metrics::COALESCED_READS;
    let before = metrics(&app).await;

    let acknowledged = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..24)
        .map(|n| {
            let (client, base) = (app.client.clone(), app.base.clone());
            let (acknowledged, stop) = (Arc::clone(&acknowledged), Arc::clone(&stop));
            tokio::spawn(async move {
                let other = ["B", "C", "D"][n % 3];
                let mut reads = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let seen = acknowledged.load(Ordering::SeqCst);
                    let res = client.get(format!("{base}/v1/availability?sku=A&sku={other}")).send().await.unwrap();
                    assert_eq!(res.status(), StatusCode::OK);
                    let body: serde_json::Value = res.json().await.unwrap();
                    let a = body["items"][0]["available"].as_i64().unwrap();
                    assert!(a <= 1500 - seen, "a read begun after {seen} reservations answered {a}");
                    assert_eq!(
                        body["items"][1],
                        json!({"sku": other, "available": 1500, "warehouses": {"W1": 1000, "W2": 500}})
                    );
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for k in 1..=60 {
        let order =
            json!({"order_id": format!("fresh-{k}"), "lines": [{"sku": "A", "quantity": 1, "warehouse": "W1"}]});
        let (status, body) = app.post("/v1/reservations", order).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        acknowledged.store(k, Ordering::SeqCst);
        let (status, body) = app.get("/v1/availability?sku=A").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["items"][0]["available"], 1500 - k, "the writer's own read after its reservation");
    }
    stop.store(true, Ordering::SeqCst);
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.unwrap();
    }
    let after = metrics(&app).await;
    let delta = |suffix: &str| {
        sample(&after, &format!("{name}{suffix}"), &[]) - sample(&before, &format!("{name}{suffix}"), &[])
    };
    let (requests, queries) = (delta("_sum"), delta("_count"));
    assert_eq!(requests as u64, reads + 60, "every availability read went through the coalescer");
    assert!(queries < requests, "{requests} reads, {queries} queries: some queries answered several reads");
    service.stop();
}
