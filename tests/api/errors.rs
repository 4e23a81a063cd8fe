//! Every error class answers problem+json with the contract's status and code, and changes nothing.

use inventory::config::ServerArgs;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, assert_problem};

async fn app() -> TestApp {
    let app = TestApp::spawn_with(ServerArgs { body_limit: 4096, ..ServerArgs::default() }).await;
    app.warehouse("WH1", 1).await;
    app.sku("A").await;
    app
}

fn post(app: &TestApp, path: &str) -> reqwest::RequestBuilder {
    app.client.post(app.url(path))
}

#[tokio::test]
async fn a_body_that_is_not_json_is_400() {
    let app = app().await;
    let res = post(&app, "/v1/stock/receive")
        .header("content-type", "application/json")
        .body("{\"sku\": ")
        .send()
        .await
        .unwrap();
    assert_problem(res, StatusCode::BAD_REQUEST, "malformed_request").await;
    assert_eq!(app.ledger_count().await, 0);
}

#[tokio::test]
async fn wrong_types_are_400() {
    let app = app().await;
    for body in [
        json!({"sku": "A", "warehouse": "WH1", "quantity": "3"}),
        json!({"sku": 1}),
        json!([1, 2]),
        json!({"quantity": 1.5}),
    ] {
        let res = post(&app, "/v1/stock/receive").json(&body).send().await.unwrap();
        assert_problem(res, StatusCode::BAD_REQUEST, "malformed_request").await;
    }
    assert_eq!(app.ledger_count().await, 0);
}

#[tokio::test]
async fn invalid_values_are_422_with_every_field() {
    let app = app().await;
    let body = json!({"sku": "bad sku", "warehouse": "WH1", "delta": 0, "reason": "theft"});
    let res = post(&app, "/v1/stock/adjust").json(&body).send().await.unwrap();
    let problem = assert_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let fields: Vec<&str> =
        problem["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["sku", "delta", "reason"]);
    let res = post(&app, "/v1/stock/receive")
        .json(&json!({"sku": "A", "warehouse": "WH1", "quantity": 1_000_000_001}))
        .send()
        .await
        .unwrap();
    assert_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(app.ledger_count().await, 0);
}

#[tokio::test]
async fn unknown_things_are_404() {
    let app = app().await;
    let res = post(&app, "/v1/stock/receive")
        .json(&json!({"sku": "NOPE", "warehouse": "WH1", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    let res = app.client.get(app.url("/v1/no/such/route")).send().await.unwrap();
    assert_problem(res, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn conflicts_are_409() {
    let app = app().await;
    let res = post(&app, "/v1/stock/adjust")
        .json(&json!({"sku": "A", "warehouse": "WH1", "delta": -1, "reason": "loss"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, StatusCode::CONFLICT, "insufficient_stock").await;
}

#[tokio::test]
async fn an_oversized_body_is_413() {
    let app = app().await;
    let body = json!({"sku": "A", "warehouse": "WH1", "quantity": 1, "reference": "x".repeat(10_000)});
    let res = post(&app, "/v1/stock/receive").json(&body).send().await.unwrap();
    assert_problem(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert_eq!(app.ledger_count().await, 0);
}

/// No GET or DELETE handler reads a body, yet a client may send one: it is read and dropped
/// before the answer goes out (a body left unread made the server reset the connection,
/// which could cut the answer off), and one over the limit is 413.
#[tokio::test]
async fn a_body_sent_with_a_get_or_delete_is_dropped_and_one_over_the_limit_is_413() {
    let app = app().await;
    for round in 0..3 {
        // A new connection each time: nothing is left to a reused one to absorb.
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let res = client.get(app.url("/v1/availability?sku=A")).body("x".repeat(3000)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "round {round}");
        let answer: serde_json::Value = res.json().await.unwrap();
        assert_eq!(answer["items"][0]["sku"], "A", "round {round}: {answer}");
        let res = client.delete(app.url("/v1/webhooks/nope")).body("{}").send().await.unwrap();
        assert_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    }
    let res = app.client.get(app.url("/v1/availability?sku=A")).body("x".repeat(5000)).send().await.unwrap();
    assert_problem(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
}

#[tokio::test]
async fn a_body_that_is_not_declared_json_is_415() {
    let app = app().await;
    let body = r#"{"sku": "A", "warehouse": "WH1", "quantity": 1}"#;
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut req = post(&app, "/v1/stock/receive").body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        assert_problem(req.send().await.unwrap(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
    }
    assert_eq!(app.ledger_count().await, 0);
}

#[tokio::test]
async fn bad_query_values_are_400() {
    let app = app().await;
    for path in [
        "/v1/stock?below_reorder_point=maybe",
        "/v1/stock?cursor=zz",
        "/v1/ledger?after=not-a-uuid",
        "/v1/events?after=x",
    ] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_problem(res, StatusCode::BAD_REQUEST, "malformed_request").await;
    }
    let res = app.client.get(app.url("/v1/ledger?limit=0")).send().await.unwrap();
    assert_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
}

#[tokio::test]
async fn a_wrong_method_is_a_problem_too() {
    let app = app().await;
    let res = app.client.delete(app.url("/v1/stock/receive")).send().await.unwrap();
    assert_problem(res, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test]
async fn a_database_that_is_down_is_503_and_readiness_fails() {
    let app = TestApp::spawn_with_dead_database().await;
    let res = post(&app, "/v1/stock/receive")
        .json(&json!({"sku": "A", "warehouse": "WH1", "quantity": 1}))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(res, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    assert!(!problem.to_string().contains("127.0.0.1"), "no connection details leak: {problem}");
    let res = app.client.get(app.url("/health/ready")).send().await.unwrap();
    assert_problem(res, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    let (status, _) = app.get("/health/live").await;
    assert_eq!(status, StatusCode::OK);
}

/// Server sessions ended under the service while its connections sat in the pool (an operator's
/// `pg_terminate_backend`, a pooler recycling them) fail no request: a connection used moments
/// ago is not tried again before it is handed out, so the BEGIN or the routed read that finds it
/// lost runs once more on another connection (a plain read tries its connection first).
#[tokio::test]
async fn connections_ended_under_the_service_fail_no_request() {
    let app = app().await;
    app.receive("A", "WH1", 100).await;
    // Not the pool the service shares with the test: its sessions are ended too.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&app.db_url).await.unwrap();
    // Each round ends every session of the service, then sends each kind of request, a
    // different kind first: the first one meets a lost connection.
    let kinds = ["write", "reservation", "coalesced read", "read"];
    for round in 0..kinds.len() {
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'inventory'",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert!(ended > 0, "round {round}: the service had connections to end");
        for kind in kinds.iter().cycle().skip(round).take(kinds.len()) {
            let (status, body) = match *kind {
                "write" => app.post("/v1/stock/receive", json!({"sku": "A", "warehouse": "WH1", "quantity": 1})).await,
                "reservation" => {
                    let order = json!({"order_id": format!("lost-{round}"), "lines": [{"sku": "A", "quantity": 1}]});
                    app.post("/v1/reservations", order).await
                }
                "coalesced read" => app.get("/v1/availability?sku=A").await,
                _ => app.get("/v1/skus/A").await,
            };
            assert!(status.is_success(), "round {round}: a {kind} after the sessions ended: {status} {body}");
        }
    }
    let (status, body) = app.get("/v1/availability?sku=A").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["items"][0]["available"], 100, "4 units received and 4 reserved, each once: {body}");
}

/// Server sessions ended while availability reads keep coming fail no read. A coalesced-read
/// slot keeps its connection from one query to the next while requests wait; a kept connection
/// found lost is dropped and the query runs again on another, and a query that still fails
/// leaves each of its requests to read alone. (With both of those removed, reads here fail 503.)
#[tokio::test]
async fn sessions_ended_under_a_stream_of_coalesced_reads_fail_no_read() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let app = app().await;
    app.receive("A", "WH1", 100).await;
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&app.db_url).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let (client, url, stop) = (app.client.clone(), app.url("/v1/availability?sku=A"), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut reads = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let res = client.get(&url).send().await.unwrap();
                    let status = res.status();
                    let body: serde_json::Value = res.json().await.unwrap();
                    assert_eq!(status, StatusCode::OK, "a read while sessions were ended: {body}");
                    assert_eq!(body["items"][0]["available"], 100, "{body}");
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let mut ended = 0;
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        ended += sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'inventory'",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.unwrap();
    }
    assert!(ended >= 10, "sessions of the service were ended while it read: {ended}");
    assert!(reads > 100, "the readers kept reading: {reads} reads");
}

#[tokio::test]
async fn the_request_id_is_echoed_and_put_in_problems() {
    let app = app().await;
    let res = app.client.get(app.url("/v1/skus/NOPE")).header("x-request-id", "trace-me-42").send().await.unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-me-42");
    let problem = assert_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(problem["request_id"], "trace-me-42");
}

/// The body is read and judged before the path's reservation id: a broken body is answered as
/// such (never a 404 sent while the body is still unread), and only a good body on a path that
/// names no reservation is 404.
#[tokio::test]
async fn a_bad_body_is_answered_as_such_before_the_reservation_id_is_looked_at() {
    let app = app().await;
    for action in ["fulfil", "release", "extend"] {
        let path = format!("/v1/reservations/not-a-uuid/{action}");
        let res = post(&app, &path).header("content-type", "application/json").body("{\"lines\": ").send().await;
        assert_problem(res.unwrap(), StatusCode::BAD_REQUEST, "malformed_request").await;
        let res = post(&app, &path).header("content-type", "text/plain").body("{}").send().await;
        assert_problem(res.unwrap(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
        let big = json!({"lines": [{"sku": "x".repeat(10_000), "warehouse": "W", "quantity": 1}], "ttl_seconds": 1});
        let res = post(&app, &path).json(&big).send().await;
        assert_problem(res.unwrap(), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
        let good = if action == "extend" { json!({"ttl_seconds": 60}) } else { json!({}) };
        let res = post(&app, &path).json(&good).send().await;
        assert_problem(res.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
    }
}
