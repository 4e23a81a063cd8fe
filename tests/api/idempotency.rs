//! Idempotency-Key: one effect per key, replays, misuse.

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;

async fn shop() -> TestApp {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 10).await;
    app
}

pub async fn post_with_key(app: &TestApp, path: &str, key: &str, body: &Value) -> (StatusCode, Option<String>, Value) {
    let res = app.client.post(app.url(path)).header("idempotency-key", key).json(body).send().await.unwrap();
    let status = res.status();
    let replayed = res.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap().to_owned());
    (status, replayed, res.json().await.unwrap())
}

#[tokio::test]
async fn a_retry_with_the_same_key_and_body_replays_the_first_answer() {
    let app = shop().await;
    let body = json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 3}]});
    let (status, replayed, first) = post_with_key(&app, "/v1/reservations", "key-1", &body).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, None));
    let (status, replayed, second) = post_with_key(&app, "/v1/reservations", "key-1", &body).await;
    assert_eq!((status, replayed.as_deref()), (StatusCode::CREATED, Some("true")));
    assert_eq!(first, second);
    assert_eq!(app.level("A", "W1").await, (10, 3), "one effect");
    app.assert_invariants().await;
}

#[tokio::test]
async fn the_same_key_with_another_body_is_422() {
    let app = shop().await;
    let body = json!({"sku": "A", "warehouse": "W1", "quantity": 1});
    let (status, _, _) = post_with_key(&app, "/v1/stock/receive", "k", &body).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, problem) =
        post_with_key(&app, "/v1/stock/receive", "k", &json!({"sku": "A", "warehouse": "W1", "quantity": 2})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["code"], "idempotency_key_reused");
    let (status, _, _) = post_with_key(&app, "/v1/stock/adjust", "k", &body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "another endpoint under the same key");
    assert_eq!(app.level("A", "W1").await, (11, 0));
}

#[tokio::test]
async fn concurrent_identical_requests_under_one_key_have_one_effect() {
    let app = shop().await;
    let body = json!({"sku": "A", "warehouse": "W1", "quantity": 5});
    let results = join_all((0..8).map(|_| post_with_key(&app, "/v1/stock/receive", "burst", &body))).await;
    for (status, _, answer) in &results {
        match *status {
            StatusCode::OK => assert_eq!(answer["on_hand"], 15),
            StatusCode::CONFLICT => assert_eq!(answer["code"], "idempotency_in_progress"),
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert_eq!(app.level("A", "W1").await, (15, 0), "exactly one receipt");
    let (status, replayed, _) = post_with_key(&app, "/v1/stock/receive", "burst", &body).await;
    assert_eq!((status, replayed.as_deref()), (StatusCode::OK, Some("true")));
    app.assert_invariants().await;
}

#[tokio::test]
async fn a_refused_request_is_replayed_as_refused() {
    let app = shop().await;
    let body = json!({"order_id": "big", "lines": [{"sku": "A", "quantity": 11}]});
    let (status, _, first) = post_with_key(&app, "/v1/reservations", "k409", &body).await;
    assert_eq!(status, StatusCode::CONFLICT);
    app.receive("A", "W1", 5).await;
    // Stock arrived meanwhile, but the key's answer stays what it was.
    let (status, replayed, second) = post_with_key(&app, "/v1/reservations", "k409", &body).await;
    assert_eq!((status, replayed.as_deref()), (StatusCode::CONFLICT, Some("true")));
    assert_eq!(first["lines"], second["lines"]);
    assert_eq!(second["code"], "insufficient_stock");
    assert_eq!(app.level("A", "W1").await, (15, 0));
}

#[tokio::test]
async fn a_bad_key_is_rejected() {
    let app = shop().await;
    let res = app
        .client
        .post(app.url("/v1/stock/receive"))
        .header("idempotency-key", "x".repeat(256))
        .json(&json!({"sku": "A", "warehouse": "W1", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.level("A", "W1").await, (10, 0));
}

/// The hazard the key claim must avoid, shown in PostgreSQL itself: in READ COMMITTED one
/// statement that wins the key's lock after the first request committed still reads the
/// snapshot taken before that commit, and so misses the stored answer. The service therefore
/// looks answers up in a statement of their own, after the lock is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_in_the_locking_statement_can_miss_an_answer_committed_before_the_lock_was_won() {
    let app = TestApp::spawn().await;
    let lock = "SELECT pg_advisory_xact_lock(hashtextextended('race-key', 7041))";
    let mut first = app.db.begin().await.unwrap();
    sqlx::query(lock).execute(&mut *first).await.unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (key, method, path, request, status, response)
         VALUES ('race-key', 'POST', '/v1/stock/receive', '{}', 200, '{}')",
    )
    .execute(&mut *first)
    .await
    .unwrap();
    let db = app.db.clone();
    let second = tokio::spawn(async move {
        let mut tx = db.begin().await.unwrap();
        // Snapshot first (the sleep), then the lock, then the lookup, all in one statement.
        let row: (bool, i64) = sqlx::query_as(
            "SELECT pg_try_advisory_xact_lock(hashtextextended('race-key', 7041)),
                    (SELECT count(*) FROM idempotency_keys WHERE key = 'race-key')
               FROM (SELECT pg_sleep(1)) AS wait",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let after: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE key = 'race-key'")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        (row, after)
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    first.commit().await.unwrap();
    let ((locked, seen_in_statement), seen_after) = second.await.unwrap();
    assert!(locked, "the lock was free once the first request committed");
    assert_eq!(seen_in_statement, 0, "the locking statement's snapshot predates the commit");
    assert_eq!(seen_after, 1, "a statement after the lock sees the stored answer");
}

async fn concurrent_retries_of_one_reservation_key_have_one_effect_and_one_answer(batch_max: usize) {
    let server = inventory::config::ServerArgs { batch_max, ..Default::default() };
    let app = TestApp::spawn_with(server).await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 1_000).await;
    for round in 0..10 {
        let key = format!("burst-{round}");
        let body = json!({"order_id": format!("o-{round}"), "lines": [{"sku": "A", "quantity": 2}]});
        let results = join_all((0..32).map(|_| post_with_key(&app, "/v1/reservations", &key, &body))).await;
        let mut created: Vec<&Value> = Vec::new();
        for (status, _, answer) in &results {
            match *status {
                StatusCode::CREATED => created.push(answer),
                StatusCode::CONFLICT => assert_eq!(answer["code"], "idempotency_in_progress", "{answer}"),
                other => panic!("batch_max {batch_max}, round {round}: unexpected {other}: {answer}"),
            }
        }
        assert!(!created.is_empty(), "round {round}: someone got the answer");
        assert!(created.iter().all(|a| *a == created[0]), "round {round}: every 201 is the same answer");
        let (status, replayed, again) = post_with_key(&app, "/v1/reservations", &key, &body).await;
        assert_eq!((status, replayed.as_deref()), (StatusCode::CREATED, Some("true")));
        assert_eq!(&again, created[0]);
    }
    assert_eq!(app.level("A", "W1").await, (1_000, 20), "one reservation per key");
    app.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_reservation_key_have_one_effect_and_one_answer_batched() {
    concurrent_retries_of_one_reservation_key_have_one_effect_and_one_answer(128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_reservation_key_have_one_effect_and_one_answer_unbatched() {
    concurrent_retries_of_one_reservation_key_have_one_effect_and_one_answer(1).await;
}

async fn concurrent_posts_of_one_order_id_under_different_keys_create_it_once(batch_max: usize) {
    let server = inventory::config::ServerArgs { batch_max, ..Default::default() };
    let app = TestApp::spawn_with(server).await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 1_000).await;
    for round in 0..5 {
        let body = json!({"order_id": format!("same-{round}"), "lines": [{"sku": "A", "quantity": 3}]});
        let results = join_all((0..24).map(|n| {
            let (app, body) = (&app, &body);
            async move { post_with_key(app, "/v1/reservations", &format!("k-{round}-{n}"), body).await }
        }))
        .await;
        let mut created = 0;
        let mut winner = None;
        for (status, _, answer) in &results {
            match *status {
                StatusCode::CREATED => {
                    created += 1;
                    winner = answer["id"].as_str().map(str::to_owned);
                }
                StatusCode::CONFLICT => assert_eq!(answer["code"], "duplicate_order", "{answer}"),
                other => panic!("batch_max {batch_max}: unexpected {other}: {answer}"),
            }
        }
        assert_eq!(created, 1, "batch_max {batch_max}, round {round}: exactly one 201");
        for (status, _, answer) in &results {
            if *status == StatusCode::CONFLICT {
                assert_eq!(answer["reservation_id"].as_str(), winner.as_deref(), "names the existing reservation");
            }
        }
    }
    assert_eq!(app.level("A", "W1").await, (1_000, 15));
    app.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_of_one_order_id_under_different_keys_create_it_once_batched() {
    concurrent_posts_of_one_order_id_under_different_keys_create_it_once(128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_of_one_order_id_under_different_keys_create_it_once_unbatched() {
    concurrent_posts_of_one_order_id_under_different_keys_create_it_once(1).await;
}
