//! Bulk import of stock levels from CSV, over HTTP and from the command line.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use inventory::config::ServerArgs;

use crate::helpers::{TestApp, assert_problem};

pub async fn import(app: &TestApp, query: &str, csv: &str) -> (StatusCode, Value) {
    let res = app
        .client
        .post(app.url(&format!("/v1/stock/import{query}")))
        .header("content-type", "text/csv")
        .body(csv.to_owned())
        .send()
        .await
        .unwrap();
    (res.status(), res.json().await.unwrap())
}

/// An upload whose body the test sends piece by piece, on its own connection.
struct SlowUpload {
    body: tokio::sync::mpsc::Sender<axum::body::Bytes>,
    answer: tokio::task::JoinHandle<(StatusCode, Value)>,
}

impl SlowUpload {
    /// Sends the request head at once; the body follows with `send` and ends with `finish`.
    async fn start(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> Self {
        let (body, pieces) = tokio::sync::mpsc::channel::<axum::body::Bytes>(4);
        let stream = futures::stream::unfold(pieces, |mut pieces| async move {
            let piece = pieces.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(piece)), pieces))
        });
        let host = app.base.trim_start_matches("http://").to_owned();
        let tcp = tokio::net::TcpStream::connect(&host).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let mut req = hyper::Request::post(path).header("host", host).header("content-type", "text/csv");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(http_body_util::StreamBody::new(stream)).unwrap();
        let answer = tokio::spawn(async move {
            let res = sender.send_request(req).await.unwrap();
            let status = StatusCode::from_u16(res.status().as_u16()).unwrap();
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice(&bytes).unwrap())
        });
        Self { body, answer }
    }

    /// Adds to the body; a piece the service no longer reads (it has answered) is dropped.
    async fn send(&self, piece: &str) {
        let _ = self.body.send(axum::body::Bytes::from(piece.to_owned())).await;
    }

    async fn finish(self) -> (StatusCode, Value) {
        drop(self.body);
        self.answer.await.unwrap()
    }
}

#[tokio::test]
async fn an_import_sets_levels_with_receive_then_count_entries() {
    let app = TestApp::spawn().await;
    let csv = "sku,warehouse,on_hand,reorder_point,reorder_quantity\nA,W1,10,2,20\nA,W2,0\nB,W1,5\n";
    let (status, report) = import(&app, "?create_missing=true", csv).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (report["rows"].clone(), report["levels_created"].clone(), report["ledger_entries"].clone()),
        (json!(3), json!(3), json!(2))
    );
    assert_eq!(app.level("A", "W1").await, (10, 0));
    assert_eq!(app.level("A", "W2").await, (0, 0));
    let (_, stock) = app.get("/v1/stock/A").await;
    assert_eq!(stock["warehouses"][0]["reorder_point"], 2);
    let (_, wh) = app.get("/v1/warehouses/W2").await;
    assert_eq!(wh["name"], "W2", "created from its code");

    // A second import is a stock count: only differences are written, as adjust/count.
    let (status, report) = import(&app, "", "A,W1,7\nB,W1,5\n").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ledger_entries"], 1);
    let id = report["import_id"].as_str().unwrap();
    let (_, ledger) = app.get(&format!("/v1/ledger?reference={id}")).await;
    assert_eq!(ledger["items"][0]["kind"], "adjust");
    assert_eq!(ledger["items"][0]["reason"], "count");
    assert_eq!(ledger["items"][0]["on_hand_delta"], -3);
    app.assert_invariants().await;
}

#[tokio::test]
async fn any_bad_row_rejects_the_whole_import_by_line_number() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    let before = app.ledger_count().await;
    let (status, problem) = import(&app, "", "sku,warehouse,on_hand\nA,W1,5\nA,W1,x\nA W,W1,1\nZZ,W1,1\n").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    let fields: Vec<&str> =
        problem["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["line 3", "line 4"], "format errors first; unknown SKUs are checked once the format is fine");
    let (status, problem) = import(&app, "", "A,W1,5\nZZ,W1,1\nA,W1,6\n").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> =
        problem["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["line 1", "line 3"], "a level named twice: {problem}");
    // Unknown codes are a 404 (as for every operation naming them), listed by line.
    let (status, problem) = import(&app, "", "A,W1,5\nZZ,W1,1\nA,W9,6\n").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{problem}");
    let fields: Vec<&str> =
        problem["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["line 2", "line 3"], "the unknown SKU and warehouse: {problem}");
    // An empty file, or one with only a header, imports nothing and says so.
    for empty in ["", "sku,warehouse,on_hand\n"] {
        let (status, report) = import(&app, "", empty).await;
        assert_eq!((status, report["rows"].as_i64()), (StatusCode::OK, Some(0)), "{empty:?}: {report}");
    }
    assert_eq!(app.ledger_count().await, before, "nothing applied");
    assert_eq!(app.level("A", "W1").await, (0, 0));
    let res = app.client.post(app.url("/v1/stock/import")).json(&json!({"rows": []})).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn an_import_cannot_count_below_what_is_held() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 5).await;
    app.post("/v1/reservations", json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 4}]})).await;
    let (status, problem) = import(&app, "", "A,W1,3\n").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "line 1");
    assert_eq!(app.level("A", "W1").await, (5, 4));
    app.assert_invariants().await;
}

#[tokio::test]
async fn the_import_command_loads_a_file() {
    let app = TestApp::spawn().await;
    let path = std::env::temp_dir().join(format!("inventory-import-{}.csv", std::process::id()));
    let mut csv = String::from("sku,warehouse,on_hand\n");
    for i in 0..2000 {
        csv.push_str(&format!("S{i},W{},{}\n", i % 4, i % 50));
    }
    std::fs::write(&path, csv).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inventory"))
        .args(["import", path.to_str().unwrap(), "--create-missing", "--database-url", &app.db_url])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 2000 rows"));
    assert_eq!(app.level("S1999", "W3").await, (49, 0));
    let levels: i64 = sqlx::query_scalar("SELECT count(*) FROM stock_levels").fetch_one(&app.db).await.unwrap();
    assert_eq!(levels, 2000);
    app.assert_invariants().await;
}

/// Whether a level existed before the import must not depend on comparing transaction ids: an
/// existing level whose row version carries the importing transaction's xid (here it was
/// touched earlier in the same transaction; in production, an old level after xid wraparound)
/// is still an existing level, locked and counted with `adjust`/`count`.
#[tokio::test]
async fn an_existing_level_is_counted_even_when_its_row_carries_the_import_transactions_xid() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.sku("B").await;
    app.receive("A", "W1", 5).await;
    let mut tx = app.begin_writer().await;
    sqlx::query("UPDATE stock_levels SET updated_at = now() WHERE sku = 'A'").execute(&mut *tx).await.unwrap();
    let chunks = futures::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from("A,W1,7\nB,W1,3\n"))]);
    let staged = inventory::engine::import::stage(chunks, usize::MAX).await.unwrap();
    let report = inventory::engine::import::apply(&mut tx, &staged, false).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!((report.levels_created, report.ledger_entries), (1, 2), "{report:?}");
    assert_eq!(app.level("A", "W1").await, (7, 0));
    assert_eq!(app.level("B", "W1").await, (3, 0));
    let (_, ledger) = app.get(&format!("/v1/ledger?reference={}", report.import_id)).await;
    let entries: Vec<(&str, &str, Value, i64)> = ledger["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["sku"].as_str().unwrap(),
                e["kind"].as_str().unwrap(),
                e["reason"].clone(),
                e["on_hand_delta"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut entries = entries;
    entries.sort_by_key(|e| e.0);
    assert_eq!(entries, [("A", "adjust", json!("count"), 2), ("B", "receive", Value::Null, 3)]);
    app.assert_invariants().await;
}

#[tokio::test]
async fn a_utf8_byte_order_mark_at_the_start_of_the_csv_is_ignored() {
    let app = TestApp::spawn().await;
    let (status, report) = import(&app, "?create_missing=true", "\u{feff}sku,warehouse,on_hand\nA,W1,5\n").await;
    assert_eq!(status, StatusCode::OK, "with a header: {report}");
    assert_eq!(report["rows"], 1);
    let (status, report) = import(&app, "?create_missing=true", "\u{feff}B,W1,6\n").await;
    assert_eq!(status, StatusCode::OK, "without a header: {report}");
    assert_eq!((app.level("A", "W1").await, app.level("B", "W1").await), ((5, 0), (6, 0)));
    app.assert_invariants().await;
}

#[tokio::test]
async fn a_line_over_the_length_limit_is_400_naming_its_line_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let csv = format!("sku,warehouse,on_hand\nA,W1,1\nB,W1,{}\nC,W1,1\n", "9".repeat(100_000));
    let res = app
        .client
        .post(app.url("/v1/stock/import?create_missing=true"))
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    let problem = assert_problem(res, StatusCode::BAD_REQUEST, "malformed_request").await;
    assert!(problem["detail"].as_str().unwrap().contains("line 3"), "{problem}");
    assert_eq!(app.ledger_count().await, 0, "nothing applied");
    app.assert_invariants().await;
}

/// The event feed only numbers events of transactions older than the oldest one running: an
/// upload must not hold a transaction open while its body is still arriving.
#[tokio::test]
async fn the_event_feed_keeps_moving_while_an_upload_is_still_arriving() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.sku("B").await;
    let upload = SlowUpload::start(&app, "/v1/stock/import", &[]).await;
    upload.send("sku,warehouse,on_hand\nA,W1,5\n").await;
    // Long enough for the service to be reading the body.
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.receive("B", "W1", 3).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (status, page) = app.get("/v1/events?limit=100").await;
        assert_eq!(status, StatusCode::OK, "{page}");
        if page["items"].as_array().unwrap().iter().any(|e| e["sku"] == "B") {
            break;
        }
        assert!(Instant::now() < deadline, "the receive made during the upload is not in the feed: {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!upload.answer.is_finished(), "the upload is still open");
    upload.send("B,W1,4\n").await;
    let (status, report) = upload.finish().await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!((report["rows"].clone(), report["levels_created"].clone()), (json!(2), json!(1)));
    assert_eq!((app.level("A", "W1").await, app.level("B", "W1").await), ((5, 0), (4, 0)));
    app.assert_invariants().await;
}

#[tokio::test]
async fn an_import_over_the_size_limit_is_413_and_changes_nothing() {
    let app = TestApp::spawn_with(ServerArgs { import_max_bytes: 1000, ..ServerArgs::default() }).await;
    let rows = |from: usize, n: usize| (from..from + n).map(|i| format!("S{i:04},W1,{i}\n")).collect::<String>();
    assert!(rows(0, 60).len() < 1000);
    let (status, report) = import(&app, "?create_missing=true", &rows(0, 60)).await;
    assert_eq!(status, StatusCode::OK, "under the limit: {report}");
    let before = app.ledger_count().await;

    // Declared too large up front (Content-Length).
    let res = app
        .client
        .post(app.url("/v1/stock/import?create_missing=true"))
        .header("content-type", "text/csv")
        .body(rows(100, 200))
        .send()
        .await
        .unwrap();
    assert_problem(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    // Found too large while it streams in (chunked, no length).
    let upload = SlowUpload::start(&app, "/v1/stock/import?create_missing=true", &[]).await;
    for piece in 0..4 {
        upload.send(&rows(100 + piece * 50, 50)).await;
    }
    let (status, problem) = upload.finish().await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")));

    assert_eq!(app.ledger_count().await, before, "nothing applied");
    let skus: i64 = sqlx::query_scalar("SELECT count(*) FROM skus").fetch_one(&app.db).await.unwrap();
    assert_eq!(skus, 60, "no SKU created");
    app.assert_invariants().await;
}

async fn import_with_key(app: &TestApp, query: &str, key: &str, csv: &str) -> (StatusCode, Option<String>, Value) {
    let res = app
        .client
        .post(app.url(&format!("/v1/stock/import{query}")))
        .header("content-type", "text/csv")
        .header("idempotency-key", key)
        .body(csv.to_owned())
        .send()
        .await
        .unwrap();
    let status = res.status();
    let replayed = res.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap().to_owned());
    (status, replayed, res.json().await.unwrap())
}

/// A retried import must not set old absolute counts over stock movements made since.
#[tokio::test]
async fn a_retried_import_with_its_key_replays_the_first_answer_and_keeps_later_movements() {
    let app = TestApp::spawn().await;
    let csv = "sku,warehouse,on_hand\nA,W1,10\nB,W1,4\n";
    let (status, replayed, first) = import_with_key(&app, "?create_missing=true", "import-1", csv).await;
    assert_eq!((status, replayed), (StatusCode::OK, None), "{first}");
    app.receive("A", "W1", 5).await;
    let ledger = app.ledger_count().await;

    let (status, replayed, again) = import_with_key(&app, "?create_missing=true", "import-1", csv).await;
    assert_eq!((status, replayed.as_deref()), (StatusCode::OK, Some("true")), "{again}");
    assert_eq!(again, first, "the first answer, import_id included");
    assert_eq!(app.level("A", "W1").await, (15, 0), "the receive made after the import is kept");
    assert_eq!(app.ledger_count().await, ledger, "nothing applied twice");
    app.assert_invariants().await;
}

#[tokio::test]
async fn an_import_key_reused_for_another_csv_or_other_options_is_422() {
    let app = TestApp::spawn().await;
    let (status, _, first) = import_with_key(&app, "?create_missing=true", "import-1", "A,W1,10\n").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let ledger = app.ledger_count().await;
    for (query, csv) in [("?create_missing=true", "A,W1,3\n"), ("", "A,W1,10\n")] {
        let res = app
            .client
            .post(app.url(&format!("/v1/stock/import{query}")))
            .header("content-type", "text/csv")
            .header("idempotency-key", "import-1")
            .body(csv)
            .send()
            .await
            .unwrap();
        assert_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused").await;
    }
    assert_eq!(app.level("A", "W1").await, (10, 0));
    assert_eq!(app.ledger_count().await, ledger, "nothing applied");
    app.assert_invariants().await;
}

/// The availability-crossing rules are stated twice: in Rust (`EventKind::crossings`, used by
/// every operation through the book) and in the import's set-based SQL. Twin levels go through
/// the same transitions, one by import and one by adjustment: both must report exactly the
/// events the rule names.
#[tokio::test]
async fn import_and_adjustment_report_the_same_stock_crossings() {
    use inventory::domain::EventKind;
    let app = TestApp::spawn().await;
    app.warehouse("IMP", 1).await;
    app.warehouse("ENG", 1).await;
    let mut cases = Vec::new();
    for on_hand0 in [0, 3, 5, 6, 7, 10] {
        for reserved in [0, 2] {
            for reorder_point in [0, 5] {
                for on_hand1 in [0, 1, 3, 5, 6, 7, 12] {
                    if on_hand1 >= reserved && on_hand0 >= reserved && on_hand1 != on_hand0 {
                        cases.push((on_hand0, reserved, reorder_point, on_hand1));
                    }
                }
            }
        }
    }
    for (n, &(on_hand0, reserved, reorder_point, _)) in cases.iter().enumerate() {
        let sku = format!("X{n}");
        app.sku(&sku).await;
        for wh in ["IMP", "ENG"] {
            let (status, _) = app.put(&format!("/v1/stock/{sku}/{wh}"), json!({"reorder_point": reorder_point})).await;
            assert_eq!(status, StatusCode::CREATED);
            if on_hand0 > 0 {
                app.receive(&sku, wh, on_hand0).await;
            }
            if reserved > 0 {
                let line = json!({"sku": sku, "quantity": reserved, "warehouse": wh});
                let (status, _) =
                    app.post("/v1/reservations", json!({"order_id": format!("{sku}-{wh}"), "lines": [line]})).await;
                assert_eq!(status, StatusCode::CREATED);
            }
        }
    }
    let (_, page) = app.get("/v1/events?limit=1").await;
    let mut mark = page["next_cursor"].as_i64().unwrap();
    loop {
        let (_, page) = app.get(&format!("/v1/events?after={mark}&limit=1000")).await;
        let next = page["next_cursor"].as_i64().unwrap();
        if next == mark {
            break;
        }
        mark = next;
    }

    let csv: String = cases.iter().enumerate().map(|(n, c)| format!("X{n},IMP,{}\n", c.3)).collect();
    let (status, body) = import(&app, "", &csv).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (n, &(on_hand0, _, _, on_hand1)) in cases.iter().enumerate() {
        let adjust =
            json!({"sku": format!("X{n}"), "warehouse": "ENG", "delta": on_hand1 - on_hand0, "reason": "count"});
        let (status, body) = app.post("/v1/stock/adjust", adjust).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    let mut seen: std::collections::BTreeMap<(String, String), Vec<String>> = Default::default();
    let mut after = mark;
    loop {
        let (_, page) = app.get(&format!("/v1/events?after={after}&limit=1000")).await;
        for e in page["items"].as_array().unwrap() {
            if let (Some(sku), Some(wh)) = (e["sku"].as_str(), e["warehouse"].as_str()) {
                seen.entry((sku.to_owned(), wh.to_owned())).or_default().push(e["type"].as_str().unwrap().to_owned());
            }
        }
        let next = page["next_cursor"].as_i64().unwrap();
        if next == after {
            break;
        }
        after = next;
    }
    let mut crossing = 0;
    for (n, &(on_hand0, reserved, reorder_point, on_hand1)) in cases.iter().enumerate() {
        let rule: Vec<String> = EventKind::crossings(on_hand0 - reserved, on_hand1 - reserved, reorder_point)
            .into_iter()
            .map(|k| k.as_str().to_owned())
            .collect();
        crossing += usize::from(!rule.is_empty());
        for wh in ["IMP", "ENG"] {
            let mut got = seen.remove(&(format!("X{n}"), wh.to_owned())).unwrap_or_default();
            got.sort();
            let mut want = rule.clone();
            want.sort();
            assert_eq!(
                got, want,
                "{wh}: on_hand {on_hand0} -> {on_hand1}, reserved {reserved}, reorder point {reorder_point}"
            );
        }
    }
    assert!(crossing >= 20, "the cases cross every rule often: {crossing} of {}", cases.len());
    assert!(seen.is_empty(), "events for levels no case changed: {seen:?}");
}

/// The foreign keys of the levels and the ledger, as the catalog states them.
async fn foreign_keys(app: &TestApp) -> Vec<(String, String, String, bool)> {
    sqlx::query_as(
        "SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid), convalidated FROM pg_constraint
          WHERE contype = 'f' AND conrelid IN ('stock_levels'::regclass, 'ledger'::regclass) ORDER BY 1, 2",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
}

/// A first load drops the foreign keys of the levels and the ledger while it writes: they are
/// back, checked, after it commits, and after it is refused.
#[tokio::test]
async fn a_first_load_leaves_the_foreign_keys_as_they_were_and_writes_what_any_import_writes() {
    let app = TestApp::spawn().await;
    let keys = foreign_keys(&app).await;
    assert_eq!(keys.len(), 3, "{keys:?}");
    let (status, problem) = import(&app, "?create_missing=true", "A,W1,5\nB,W1,1\nA,W1,6\n").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(foreign_keys(&app).await, keys, "refused");
    let skus: i64 = sqlx::query_scalar("SELECT count(*) FROM skus").fetch_one(&app.db).await.unwrap();
    assert_eq!(skus, 0, "nothing applied");

    let csv = "sku,warehouse,on_hand,reorder_point\nA,W1,5,2\nA,W2,0,2\nB,W1,1\n";
    let (status, report) = import(&app, "?create_missing=true", csv).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(foreign_keys(&app).await, keys, "imported");
    assert_eq!((report["levels_created"].clone(), report["ledger_entries"].clone()), (json!(3), json!(2)));
    let (_, ledger) = app.get(&format!("/v1/ledger?reference={}", report["import_id"].as_str().unwrap())).await;
    let mut entries: Vec<(&str, &str, &str, i64)> = ledger["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let text = |k: &str| e[k].as_str().unwrap();
            (text("sku"), text("warehouse"), text("kind"), e["on_hand_delta"].as_i64().unwrap())
        })
        .collect();
    entries.sort();
    assert_eq!(entries, [("A", "W1", "receive", 5), ("B", "W1", "receive", 1)]);
    // A new level with stock on hand is back in stock; nothing comes below its reorder point.
    let events: Vec<(String, String, String, sqlx::types::Json<Value>)> =
        sqlx::query_as("SELECT type, sku, warehouse, data FROM events ORDER BY sku, warehouse, type")
            .fetch_all(&app.db)
            .await
            .unwrap();
    let back = |sku: &str, on_hand: i64, reorder_point: i64| {
        let data = json!({"available_before": 0, "available": on_hand, "on_hand": on_hand, "reserved": 0,
                          "reorder_point": reorder_point});
        ("stock.back_in_stock".to_owned(), sku.to_owned(), "W1".to_owned(), sqlx::types::Json(data))
    };
    assert_eq!(events, [back("A", 5, 2), back("B", 1, 0)]);

    // The next import is not a first load: it counts.
    let (status, report) = import(&app, "", "A,W1,1\nA,W2,3\n").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!((report["levels_created"].clone(), report["ledger_entries"].clone()), (json!(0), json!(2)));
    assert_eq!(foreign_keys(&app).await, keys);
    assert_eq!((app.level("A", "W1").await, app.level("A", "W2").await), ((1, 0), (3, 0)));
    app.assert_invariants().await;
}

/// While another transaction holds one of the tables a first load takes, it waits no longer
/// than the lock timeout, then imports row by row.
#[tokio::test]
async fn a_first_load_that_cannot_have_the_tables_imports_row_by_row() {
    let app = TestApp::spawn().await;
    let keys = foreign_keys(&app).await;
    let mut holder = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE ledger IN ACCESS SHARE MODE").execute(&mut *holder).await.unwrap();
    let (status, report) = import(&app, "?create_missing=true", "A,W1,5\nB,W1,0\n").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!((report["levels_created"].clone(), report["ledger_entries"].clone()), (json!(2), json!(1)));
    holder.rollback().await.unwrap();
    assert_eq!(foreign_keys(&app).await, keys);
    assert_eq!((app.level("A", "W1").await, app.level("B", "W1").await), ((5, 0), (0, 0)));
    app.assert_invariants().await;
}
