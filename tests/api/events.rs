//! The event feed: crossings and lifecycle events, gap-free paging, SSE resume.

use std::time::{Duration, Instant};

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;

/// Every event after `after`, following `next_cursor`.
async fn events_after(app: &TestApp, after: i64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = after;
    loop {
        let (status, page) = app.get(&format!("/v1/events?after={cursor}&limit=100")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().unwrap().clone();
        if items.is_empty() {
            return out;
        }
        cursor = page["next_cursor"].as_i64().unwrap();
        out.extend(items);
    }
}

/// Waits until every committed event has its public id (the relay lags behind any transaction
/// still running on the server, including other tests').
async fn wait_relayed(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        app.get("/v1/events?limit=1").await;
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM unrelayed_events()").fetch_one(&app.db).await.unwrap();
        if pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{pending} events never relayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn availability_crossings_and_lifecycle_changes_are_events() {
    crossings_and_lifecycle_changes(&TestApp::spawn().await).await;
}

/// The scenario of [`availability_crossings_and_lifecycle_changes_are_events`], on any service
/// with a database of its own (behind a pooler, say).
pub async fn crossings_and_lifecycle_changes(app: &TestApp) {
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 5).await;
    app.put("/v1/stock/A/W1", json!({"reorder_point": 3})).await;
    let (_, r) = app.post("/v1/reservations", json!({"order_id": "o1", "lines": [{"sku": "A", "quantity": 1}]})).await;
    let (_, r2) = app.post("/v1/reservations", json!({"order_id": "o2", "lines": [{"sku": "A", "quantity": 4}]})).await;
    let (status, _) =
        app.post("/v1/reservations", json!({"order_id": "o3", "lines": [{"sku": "A", "quantity": 1}]})).await;
    assert_eq!(status, StatusCode::CONFLICT, "refused: no events");
    app.call(reqwest::Method::POST, &format!("/v1/reservations/{}/release", r2["id"].as_str().unwrap()), None).await;
    app.call(reqwest::Method::POST, &format!("/v1/reservations/{}/fulfil", r["id"].as_str().unwrap()), None).await;

    wait_relayed(app).await;
    let events = events_after(app, 0).await;
    assert_eq!(
        types(&events),
        [
            "stock.back_in_stock",  // receive: 0 → 5
            "reservation.created",  // o1: 5 → 4, still above the reorder point
            "reservation.created",  // o2: 4 → 0 ...
            "stock.out_of_stock",   // ... is out of stock ...
            "stock.low",            // ... and crosses the reorder point 3
            "reservation.released", // release o2: 0 → 4
            "stock.back_in_stock",
            "reservation.fulfilled", // fulfil o1: available stays 4
        ]
    );
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>(), "ids are gap-free from 1");
    assert_eq!(events[3]["sku"], "A");
    assert_eq!(events[3]["warehouse"], "W1");
    assert_eq!(events[3]["data"]["available"], 0);
    assert_eq!(events[2]["reservation_id"], r2["id"]);
    let (_, only) = app.get("/v1/events?type=reservation.created").await;
    assert_eq!(only["items"].as_array().unwrap().len(), 2);
    let (status, _) = app.get("/v1/events?type=stock.exploded").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_reader_following_the_feed_during_200_concurrent_operations_sees_every_event_once_in_order() {
    let app = TestApp::spawn().await;
    for w in ["W1", "W2"] {
        app.warehouse(w, 1).await;
    }
    let skus: Vec<String> = (0..5).map(|i| format!("S{i}")).collect();
    for sku in &skus {
        app.sku(sku).await;
        app.receive(sku, "W1", 20).await;
    }
    wait_relayed(&app).await;
    let baseline = events_after(&app, 0).await.len() as i64;

    let done = std::sync::atomic::AtomicBool::new(false);
    // The reader polls the feed with `after` while the writers run.
    let reader = async {
        let mut seen: Vec<i64> = Vec::new();
        let mut cursor = baseline;
        let started = Instant::now();
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
            let (_, page) = app.get(&format!("/v1/events?after={cursor}&limit=50")).await;
            for e in page["items"].as_array().unwrap() {
                seen.push(e["id"].as_i64().unwrap());
            }
            cursor = page["next_cursor"].as_i64().unwrap();
            if finished && page["items"].as_array().unwrap().is_empty() {
                // Everything committed is numbered: read the rest.
                wait_relayed(&app).await;
                let (_, page) = app.get(&format!("/v1/events?after={cursor}&limit=1000")).await;
                seen.extend(page["items"].as_array().unwrap().iter().map(|e| e["id"].as_i64().unwrap()));
                return seen;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "reader never caught up");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let writers = async {
        let results = join_all((0..200usize).map(|i| {
            let app = &app;
            let skus = &skus;
            async move {
                let sku = &skus[i % skus.len()];
                match i % 4 {
                    0 => {
                        app.post("/v1/stock/transfer", json!({"sku": sku, "from": "W1", "to": "W2", "quantity": 1}))
                            .await
                    }
                    1 => {
                        app.post(
                            "/v1/stock/adjust",
                            json!({"sku": sku, "warehouse": "W1", "delta": -1, "reason": "count"}),
                        )
                        .await
                    }
                    _ => {
                        let (s, r) = app
                            .post(
                                "/v1/reservations",
                                json!({"order_id": format!("o{i}"), "lines": [{"sku": sku, "quantity": 1 + i % 3}]}),
                            )
                            .await;
                        if s == StatusCode::CREATED && i % 3 == 0 {
                            let id = r["id"].as_str().unwrap();
                            return app
                                .call(reqwest::Method::POST, &format!("/v1/reservations/{id}/release"), None)
                                .await;
                        }
                        (s, r)
                    }
                }
            }
        }))
        .await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        results
    };
    let (seen, results) = tokio::join!(reader, writers);
    assert!(results.iter().all(|(s, _)| s.is_success() || *s == StatusCode::CONFLICT), "no 5xx");

    wait_relayed(&app).await;
    let all = events_after(&app, baseline).await;
    let ids: Vec<i64> = all.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, ((baseline + 1)..=(baseline + all.len() as i64)).collect::<Vec<_>>(), "gap-free");
    assert_eq!(seen, ids, "the live reader saw every event exactly once, in order");

    // Every committed change has exactly its events, none for refused ones.
    let created: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations").fetch_one(&app.db).await.unwrap();
    let released: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE status = 'released'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let count = |t: &str| all.iter().filter(|e| e["type"] == t).count() as i64;
    assert_eq!(count("reservation.created"), created);
    assert_eq!(count("reservation.released"), released);
    app.assert_invariants().await;
}

/// Reads SSE frames from a streaming response until `n` events arrived; returns their ids.
async fn read_sse_ids(res: &mut reqwest::Response, n: usize) -> Vec<i64> {
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ids: Vec<i64> = text.lines().filter_map(|l| l.strip_prefix("id: ")).map(|v| v.parse().unwrap()).collect();
        if ids.len() >= n {
            return ids[..n].to_vec();
        }
        assert!(Instant::now() < deadline, "stream too slow: {text}");
        let chunk = tokio::time::timeout(Duration::from_secs(20), res.chunk()).await.unwrap().unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn the_stream_is_live_and_resumes_after_last_event_id() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    for i in 0..3 {
        app.post("/v1/reservations", json!({"order_id": format!("o{i}"), "lines": [{"sku": "A", "quantity": 1}]}))
            .await;
    }
    // 3 refused reservations (no stock) emit nothing; receipts and later holds do.
    app.receive("A", "W1", 10).await;
    let mut res = app.client.get(app.url("/v1/events/stream")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let first = read_sse_ids(&mut res, 1).await;
    assert_eq!(first, [1]);
    // Live: an event committed after connecting arrives on the open stream.
    app.post("/v1/reservations", json!({"order_id": "live", "lines": [{"sku": "A", "quantity": 1}]})).await;
    app.post("/v1/reservations", json!({"order_id": "live2", "lines": [{"sku": "A", "quantity": 1}]})).await;
    let ids = read_sse_ids(&mut res, 2).await;
    assert_eq!(ids, [2, 3]);
    drop(res);
    // Events while no stream is open (the feed then keeps no memory, only the head).
    for order in ["gap1", "gap2"] {
        app.post("/v1/reservations", json!({"order_id": order, "lines": [{"sku": "A", "quantity": 1}]})).await;
    }
    let (_, page) = app.get("/v1/events?after=3").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut resumed = app.client.get(app.url("/v1/events/stream")).header("last-event-id", "2").send().await.unwrap();
    assert_eq!(read_sse_ids(&mut resumed, 3).await, [3, 4, 5], "resumes right after the last seen id");
    app.post("/v1/reservations", json!({"order_id": "live3", "lines": [{"sku": "A", "quantity": 1}]})).await;
    assert_eq!(read_sse_ids(&mut resumed, 1).await, [6], "and goes on live");
}

#[tokio::test]
async fn a_filtered_page_moves_its_cursor_past_the_events_it_skipped() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 100).await;
    for i in 0..20 {
        let (status, _) = app
            .post("/v1/reservations", json!({"order_id": format!("f{i}"), "lines": [{"sku": "A", "quantity": 1}]}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (_, all) = app.get("/v1/events?limit=1000").await;
    let last = all["items"].as_array().unwrap().last().unwrap()["id"].as_i64().unwrap();
    assert!(last >= 21, "{all}");
    // No stock.low event exists: the page is empty, but the cursor has moved past what it saw,
    // so the next poll does not scan the same stretch again.
    let (status, page) = app.get("/v1/events?type=stock.low").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"], json!([]));
    assert_eq!(page["next_cursor"], last, "{page}");
    // A filter that matches stops at its last match when the page is full.
    let (_, page) = app.get("/v1/events?type=reservation.created&limit=5").await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert_eq!(page["next_cursor"], items[4]["id"]);
}

#[tokio::test]
async fn streams_beyond_the_limits_are_429_and_a_closed_stream_frees_its_place() {
    use inventory::auth::{Role, mint};
    let (a, a_line) = mint("a", Role::Read);
    let (b, b_line) = mint("b", Role::Read);
    let (ops, ops_line) = mint("ops", Role::Ops);
    let server = inventory::config::ServerArgs {
        api_keys: Some(format!("{a_line},{b_line},{ops_line}")),
        max_event_streams: 3,
        max_event_streams_per_key: 2,
        ..Default::default()
    };
    let app = TestApp::spawn_with(server).await;
    let open = |key: &str| app.client.get(app.url("/v1/events/stream")).bearer_auth(key).send();
    let a1 = open(&a).await.unwrap();
    let a2 = open(&a).await.unwrap();
    assert_eq!((a1.status(), a2.status()), (StatusCode::OK, StatusCode::OK));
    let refused = open(&a).await.unwrap();
    crate::helpers::assert_problem(refused, StatusCode::TOO_MANY_REQUESTS, "too_many_streams").await;
    let b1 = open(&b).await.unwrap();
    assert_eq!(b1.status(), StatusCode::OK);
    let refused = open(&b).await.unwrap();
    let body = crate::helpers::assert_problem(refused, StatusCode::TOO_MANY_REQUESTS, "too_many_streams").await;
    assert!(body["detail"].as_str().unwrap().contains("3 event streams"), "the total limit: {body}");
    drop(a1);
    // The server notices the closed stream at its next write (a heartbeat or an event).
    let deadline = Instant::now() + Duration::from_secs(30);
    let ops_put = |path: &str| app.client.put(app.url(path)).bearer_auth(&ops).json(&json!({"name": "x"})).send();
    assert!(ops_put("/v1/warehouses/W1").await.unwrap().status().is_success());
    assert!(ops_put("/v1/skus/A").await.unwrap().status().is_success());
    loop {
        // An event makes the server write to every stream, and so find the closed one.
        let receive = json!({"sku": "A", "warehouse": "W1", "quantity": 1});
        let res = app.client.post(app.url("/v1/stock/receive")).bearer_auth(&ops).json(&receive).send().await;
        assert!(res.unwrap().status().is_success());
        let again = open(&b).await.unwrap();
        if again.status() == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "a closed stream never gave its place back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((a2, b1));
}

/// Open streams share one relay: 200 idle streams make the database do hardly more work than
/// none, and a new event still reaches every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_open_streams_share_one_relay_and_all_get_each_event() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    let mut streams = Vec::new();
    for n in 0..200 {
        let path = if n % 4 == 3 { "/v1/events/stream?type=stock.back_in_stock" } else { "/v1/events/stream" };
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        streams.push(res);
    }
    let commits = || async {
        let n: i64 = sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&app.db)
            .await
            .unwrap();
        n
    };
    let before = commits().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = commits().await - before;
    // One relay (≈10 runs/s) and the expiry sweep; one query per stream per poll would be
    // thousands.
    assert!(idle < 400, "{idle} transactions in 2 s with 200 idle streams");

    app.receive("A", "W1", 5).await;
    let ids = join_all(streams.iter_mut().map(|res| read_sse_ids(res, 1))).await;
    assert!(ids.iter().all(|got| got == &[1]), "every stream got the back-in-stock event");
}

#[tokio::test]
async fn purged_events_leave_the_newest_id_and_what_a_webhook_has_still_to_deliver() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 100).await;
    for i in 0..5 {
        let order = json!({"order_id": format!("p{i}"), "lines": [{"sku": "A", "quantity": 1}]});
        assert_eq!(app.post("/v1/reservations", order).await.0, StatusCode::CREATED);
    }
    wait_relayed(&app).await;
    let ids =
        |page: Value| page["items"].as_array().unwrap().iter().map(|e| e["id"].as_i64().unwrap()).collect::<Vec<_>>();
    assert_eq!(ids(app.get("/v1/events").await.1), [1, 2, 3, 4, 5, 6]);
    let age = async |through: i64| {
        sqlx::query(
            "UPDATE events e SET at = now() - interval '2 days'
               FROM event_ids n WHERE n.txid = e.txid AND n.seq = e.seq AND n.id <= $1",
        )
        .bind(through)
        .execute(&app.db)
        .await
        .unwrap();
    };
    let purge = async || {
        let mut conn = app.db.acquire().await.unwrap();
        inventory::store::events::purge(&mut conn, 86_400, 1_000).await.unwrap()
    };
    age(4).await;
    // A subscription (its receiver down) that has delivered events up to 2.
    let hook = json!({"url": "http://127.0.0.1:9/hook", "secret": crate::webhooks::new_secret()});
    assert_eq!(app.put("/v1/webhooks/behind", hook).await.0, StatusCode::CREATED);
    sqlx::query("UPDATE webhook_progress SET delivered_through = 2").execute(&app.db).await.unwrap();

    assert_eq!(purge().await, 2, "old events the webhook has delivered");
    assert_eq!(ids(app.get("/v1/events").await.1), [3, 4, 5, 6]);
    assert_eq!(app.call(reqwest::Method::DELETE, "/v1/webhooks/behind", None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(purge().await, 2, "the rest of the old events");
    age(6).await;
    assert_eq!(purge().await, 1, "every old event but the newest");
    assert_eq!(purge().await, 0);
    assert_eq!(ids(app.get("/v1/events").await.1), [6]);
    let left: (i64, i64) = sqlx::query_as("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM event_ids)")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(left, (1, 1), "an event and its id go together");
    // The ids go on from the newest.
    let order = json!({"order_id": "after", "lines": [{"sku": "A", "quantity": 1}]});
    assert_eq!(app.post("/v1/reservations", order).await.0, StatusCode::CREATED);
    assert_eq!(ids(app.get("/v1/events?after=6").await.1), [7]);
}

#[tokio::test]
async fn an_event_of_a_writer_that_commits_long_after_later_ones_still_gets_its_id() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 100).await;
    // A writer announced as the service's are writes an event and stays open…
    let mut slow = app.begin_writer().await;
    sqlx::query("INSERT INTO events (type, data) VALUES ('stock.low', '{\"slow\": true}')")
        .execute(&mut *slow)
        .await
        .unwrap();
    // …while later events commit and are numbered, over several relay runs.
    for i in 0..3 {
        let order = json!({"order_id": format!("s{i}"), "lines": [{"sku": "A", "quantity": 1}]});
        assert_eq!(app.post("/v1/reservations", order).await.0, StatusCode::CREATED);
        wait_relayed(&app).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (_, before) = app.get("/v1/events").await;
    assert_eq!(before["items"].as_array().unwrap().len(), 4, "{before}");
    slow.commit().await.unwrap();
    wait_relayed(&app).await;
    let (_, after) = app.get("/v1/events").await;
    let items = after["items"].as_array().unwrap();
    let ids: Vec<i64> = items.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5], "{after}");
    assert_eq!(items[4]["data"], json!({"slow": true}), "the late commit gets the next id");
}
