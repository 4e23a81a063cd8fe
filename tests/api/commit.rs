//! A connection lost while committing: the answer says the outcome is unknown (504), never
//! "nothing changed" (503), and a keyed retry tells what happened.

use inventory::config::ServerArgs;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, fresh_database};
use crate::proxy::CommitTrap;

async fn trapped(batch_max: usize) -> (TestApp, CommitTrap) {
    let db_url = fresh_database().await;
    let trap = CommitTrap::start(&db_url).await;
    let server = ServerArgs { batch_max, ..ServerArgs::default() };
    let service_url = trap.url(&db_url);
    (TestApp::spawn_through(server, db_url, &service_url).await, trap)
}

async fn post_keyed(app: &TestApp, path: &str, key: &str, body: &Value) -> (StatusCode, bool, Value) {
    let res = app.client.post(app.url(path)).header("idempotency-key", key).json(body).send().await.unwrap();
    let status = res.status();
    let replayed = res.headers().get("idempotent-replayed").is_some();
    (status, replayed, res.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_whose_commit_loses_its_connection_answers_504_outcome_unknown_and_its_retry_replays() {
    let (app, trap) = trapped(128).await;
    app.warehouse("W1", 1).await;
    app.sku("TRAP-RCV").await;
    app.receive("TRAP-RCV", "W1", 5).await;

    trap.arm("TRAP-RCV");
    let body = json!({"sku": "TRAP-RCV", "warehouse": "W1", "quantity": 3});
    let (status, _, problem) = post_keyed(&app, "/v1/stock/receive", "rcv-1", &body).await;
    assert_eq!(trap.sprung(), 1, "the trap cut the receive's commit");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{problem}");
    assert_eq!(problem["code"], "outcome_unknown", "{problem}");
    // The server did commit: the change is there, once.
    assert_eq!(app.level("TRAP-RCV", "W1").await, (8, 0));

    let (status, replayed, again) = post_keyed(&app, "/v1/stock/receive", "rcv-1", &body).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert!(replayed, "the retry is answered from the stored first answer");
    assert_eq!(app.level("TRAP-RCV", "W1").await, (8, 0), "applied once");
    app.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_batch_whose_commit_loses_its_connection_answers_504_to_its_orders() {
    for batch_max in [128, 1] {
        let (app, trap) = trapped(batch_max).await;
        app.warehouse("W1", 1).await;
        app.sku("TRAP-RES").await;
        app.receive("TRAP-RES", "W1", 10).await;

        trap.arm("trap-order");
        let body = json!({"order_id": "trap-order", "lines": [{"sku": "TRAP-RES", "quantity": 4}]});
        let (status, _, problem) = post_keyed(&app, "/v1/reservations", "res-1", &body).await;
        assert_eq!(trap.sprung(), 1, "batch_max {batch_max}: the trap cut the commit");
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "batch_max {batch_max}: {problem}");
        assert_eq!(problem["code"], "outcome_unknown");
        assert_eq!(app.level("TRAP-RES", "W1").await, (10, 4), "batch_max {batch_max}: committed");

        let (status, replayed, again) = post_keyed(&app, "/v1/reservations", "res-1", &body).await;
        assert_eq!(status, StatusCode::CREATED, "batch_max {batch_max}: {again}");
        assert!(replayed);
        let (_, found) = app.get("/v1/reservations?order_id=trap-order").await;
        assert_eq!(found["items"].as_array().unwrap().len(), 1, "exactly one reservation: {found}");
        assert_eq!(app.level("TRAP-RES", "W1").await, (10, 4));
        app.assert_invariants().await;
    }
}
