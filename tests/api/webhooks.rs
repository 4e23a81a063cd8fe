//! Webhooks: signed push delivery of the feed's events, in order, at least once, through a
//! receiver that fails, a service killed with -9, and two service instances on one database.
//! A small receiver on loopback in the test records every request it gets.

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures::future::join_all;
use hmac::{KeyInit, Mac};
use inventory::auth::{Role, mint};
use inventory::config::ServerArgs;
use reqwest::Method;
use serde_json::{Value, json};

use crate::drills::{self, DrillLog, Service};
use crate::helpers::{self, TestApp, assert_problem};

/// How long any delivery may take to show up (retries included).
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The receiver
// ---------------------------------------------------------------------------------------------

/// One request the receiver got.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    headers: HeaderMap,
    pub(crate) body: Bytes,
    /// What the receiver answered (or is answering).
    status: u16,
}

impl Delivery {
    pub(crate) fn id(&self) -> i64 {
        self.headers["webhook-id"].to_str().unwrap().parse().unwrap()
    }
}

#[derive(Debug)]
pub(crate) struct Seen {
    requests: Mutex<Vec<Delivery>>,
    /// The status every request is answered with.
    answer: AtomicU16,
    /// How long each answer takes.
    pub(crate) delay_ms: AtomicU64,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) max_in_flight: AtomicUsize,
    /// The event ids of the requests in the handler now, one entry per request.
    in_flight_ids: Mutex<Vec<i64>>,
    /// The most distinct events in the handler at once: two requests of the same event can
    /// overlap when an instance killed mid-delivery had already sent it and another sends it again.
    pub(crate) max_distinct_in_flight: AtomicUsize,
}

/// A webhook receiver on 127.0.0.1, recording what it gets as it arrives.
pub(crate) struct Receiver {
    pub(crate) url: String,
    pub(crate) seen: Arc<Seen>,
}

impl Receiver {
    pub(crate) async fn start() -> Self {
        Self::on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn on(listener: tokio::net::TcpListener) -> Self {
        let seen = Arc::new(Seen {
            requests: Mutex::new(Vec::new()),
            answer: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            in_flight_ids: Mutex::new(Vec::new()),
            max_distinct_in_flight: AtomicUsize::new(0),
        });
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(seen.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, seen }
    }

    fn answer(&self, status: u16) {
        self.seen.answer.store(status, Ordering::SeqCst);
    }

    pub(crate) fn requests(&self) -> Vec<Delivery> {
        self.seen.requests.lock().unwrap().clone()
    }

    /// The event ids answered with a 2xx, in the order they arrived.
    pub(crate) fn accepted(&self) -> Vec<i64> {
        self.requests().iter().filter(|d| (200..300).contains(&d.status)).map(Delivery::id).collect()
    }
}

async fn receive(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let delivery = Delivery { headers, body, status: seen.answer.load(Ordering::SeqCst) };
    let (id, status) = (delivery.id(), delivery.status);
    let _in_flight = InFlight::enter(&seen, id);
    seen.requests.lock().unwrap().push(delivery);
    tokio::time::sleep(Duration::from_millis(seen.delay_ms.load(Ordering::SeqCst))).await;
    StatusCode::from_u16(status).unwrap()
}

/// One request in the handler, until its answer is sent or its connection is gone: hyper drops
/// the handler of a request whose sender closed the connection (an instance killed mid-delivery),
/// and that request is no longer in flight then.
struct InFlight<'a> {
    seen: &'a Seen,
    id: i64,
}

impl<'a> InFlight<'a> {
    fn enter(seen: &'a Seen, id: i64) -> Self {
        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let mut ids = seen.in_flight_ids.lock().unwrap();
        ids.push(id);
        let mut distinct = ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        seen.max_distinct_in_flight.fetch_max(distinct.len(), Ordering::SeqCst);
        Self { seen, id }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut ids = self.seen.in_flight_ids.lock().unwrap();
        let at = ids.iter().position(|i| *i == self.id).unwrap();
        ids.swap_remove(at);
        self.seen.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A fresh secret of 32 random bytes: `whsec_…`.
pub(crate) fn new_secret() -> String {
    format!("whsec_{}", STANDARD.encode(rand::random::<[u8; 32]>()))
}

/// The Standard Webhooks signature, computed here independently of the service.
fn expected_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Polls `check` until it gives a value, failing after [`PATIENCE`] with `what`.
pub(crate) async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < PATIENCE, "after {PATIENCE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every event of the feed after `after` (the relay caught up first), following `next_cursor`.
pub(crate) async fn feed_after(app: &TestApp, after: i64) -> Vec<Value> {
    eventually("every committed event is relayed", async || {
        app.get("/v1/events?limit=1").await;
        let unrelayed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM unrelayed_events()").fetch_one(&app.db).await.unwrap();
        (unrelayed == 0).then_some(())
    })
    .await;
    let (mut items, mut cursor) = (Vec::new(), after);
    loop {
        let (status, page) = app.get(&format!("/v1/events?after={cursor}&limit=1000")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let page_items = page["items"].as_array().unwrap();
        if page_items.is_empty() {
            return items;
        }
        items.extend(page_items.iter().cloned());
        cursor = page["next_cursor"].as_i64().unwrap();
    }
}

pub(crate) fn ids(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["id"].as_i64().unwrap()).collect()
}

/// The id of the last event in the feed now.
async fn last_event_id(app: &TestApp) -> i64 {
    feed_after(app, 0).await.last().map_or(0, |e| e["id"].as_i64().unwrap())
}

/// A warehouse W1 and a SKU A with `stock` units (one `stock.back_in_stock` event).
async fn stock(app: &TestApp, stock: i64) {
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", stock).await;
}

/// Reserves one unit of A for `order`: a `reservation.created` event.
async fn reserve(app: &TestApp, order: &str) -> Value {
    let (status, body) =
        app.post("/v1/reservations", json!({"order_id": order, "lines": [{"sku": "A", "quantity": 1}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

pub(crate) async fn subscribe(app: &TestApp, name: &str, url: &str, secret: &str, types: Option<&[&str]>) -> Value {
    let mut body = json!({"url": url, "secret": secret});
    if let Some(types) = types {
        body["types"] = json!(types);
    }
    let (status, answer) = app.put(&format!("/v1/webhooks/{name}"), body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    answer
}

/// Waits until `name` has nothing pending and the receiver accepted exactly `expected` (after
/// dropping repeats of one event in a row: at least once allows the last one again).
async fn wait_delivered(app: &TestApp, receiver: &Receiver, name: &str, expected: &[i64]) -> Vec<i64> {
    eventually(
        &format!("{name} delivers {} events; the receiver has {:?}", expected.len(), receiver.accepted()),
        async || {
            let (_, hook) = app.get(&format!("/v1/webhooks/{name}")).await;
            let mut accepted = receiver.accepted();
            accepted.dedup();
            (hook["pending"] == 0 && accepted.len() >= expected.len()).then_some(accepted)
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn each_delivery_is_signed_with_the_secret_and_carries_the_feeds_own_json_for_the_event() {
    let app = TestApp::spawn().await;
    stock(&app, 100).await;
    let before = last_event_id(&app).await;
    let receiver = Receiver::start().await;
    let secret = new_secret();
    let created = subscribe(&app, "search", &receiver.url, &secret, None).await;
    assert_eq!(created["delivered_through"], before, "a new subscription starts after the last event: {created}");
    assert_eq!((created["pending"].as_i64(), created["types"].is_null()), (Some(0), true), "{created}");
    for order in ["o1", "o2", "o3"] {
        reserve(&app, order).await;
    }
    let feed = feed_after(&app, before).await;
    assert_eq!(feed.len(), 3, "{feed:?}");
    let accepted = wait_delivered(&app, &receiver, "search", &ids(&feed)).await;
    assert_eq!(accepted, ids(&feed), "the events after the subscription, each once, in order");

    let sent = Instant::now();
    for (delivery, item) in receiver.requests().iter().zip(&feed) {
        let header =
            |name: &str| delivery.headers.get(name).unwrap_or_else(|| panic!("no {name} header")).to_str().unwrap();
        assert_eq!(header("webhook-id"), item["id"].to_string());
        assert_eq!(header("content-type"), "application/json");
        let timestamp = header("webhook-timestamp");
        let at: i64 = timestamp.parse().expect("Unix seconds");
        assert!((chrono::Utc::now().timestamp() - at).abs() < 60 + sent.elapsed().as_secs() as i64, "{at}");
        assert_eq!(
            header("webhook-signature"),
            expected_signature(&secret, header("webhook-id"), timestamp, &delivery.body),
            "the signature verifies with the secret"
        );
        let body: Value = serde_json::from_slice(&delivery.body).unwrap();
        assert_eq!(&body, item, "the body is the feed's item for this event");
    }
    let (_, hook) = app.get("/v1/webhooks/search").await;
    assert_eq!(hook["delivered_through"], feed.last().unwrap()["id"], "{hook}");
    assert_eq!((hook["last_status"].as_i64(), hook["last_error"].is_null()), (Some(200), true), "{hook}");
    assert!(hook["last_attempt_at"].is_string(), "{hook}");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("inventory_webhook_deliveries_total{outcome=\"delivered\"}"), "{metrics}");
}

#[tokio::test]
async fn many_events_are_delivered_each_once_in_feed_order() {
    let app = TestApp::spawn().await;
    stock(&app, 1000).await;
    let before = last_event_id(&app).await;
    let receiver = Receiver::start().await;
    subscribe(&app, "orders", &receiver.url, &new_secret(), None).await;
    // Eight clients at once, so events commit (and are numbered) in an order of their own.
    for round in 0..8 {
        join_all((0..8).map(|i| {
            let app = &app;
            async move { reserve(app, &format!("o{round}-{i}")).await }
        }))
        .await;
    }
    let feed = feed_after(&app, before).await;
    assert_eq!(feed.len(), 64);
    let accepted = wait_delivered(&app, &receiver, "orders", &ids(&feed)).await;
    assert_eq!(accepted, ids(&feed));
    assert_eq!(receiver.accepted().len(), 64, "a receiver that always answers 2xx gets each event once");
}

#[tokio::test]
async fn a_receiver_that_is_down_then_fails_then_recovers_gets_everything_in_order() {
    let app = TestApp::spawn().await;
    stock(&app, 100).await;
    let before = last_event_id(&app).await;
    // Nobody listens on this port yet: connections are refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}/hook", listener.local_addr().unwrap());
    drop(listener);
    subscribe(&app, "erp", &closed, &new_secret(), None).await;
    for order in ["o1", "o2", "o3", "o4", "o5"] {
        reserve(&app, order).await;
    }
    let feed = feed_after(&app, before).await;
    let refused = eventually("an attempt at the closed port fails", async || {
        let (_, hook) = app.get("/v1/webhooks/erp").await;
        hook["last_error"].is_string().then_some(hook)
    })
    .await;
    assert!(refused["last_status"].is_null(), "no answer, no status: {refused}");
    assert_eq!(refused["pending"], 5, "{refused}");
    assert_eq!(refused["delivered_through"], before, "nothing delivered: {refused}");

    // The receiver comes up, answering 500; the subscription moves to it and keeps its place.
    let receiver = Receiver::start().await;
    receiver.answer(500);
    let (status, moved) = app.put("/v1/webhooks/erp", json!({"url": receiver.url, "secret": new_secret()})).await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!((moved["delivered_through"].as_i64(), moved["pending"].as_i64()), (Some(before), Some(5)), "{moved}");
    let failing = eventually("the receiver answers 500 twice", async || {
        let (_, hook) = app.get("/v1/webhooks/erp").await;
        (receiver.requests().len() >= 2 && hook["last_status"] == 500).then_some(hook)
    })
    .await;
    assert!(failing["last_error"].as_str().unwrap().contains("500"), "{failing}");
    assert_eq!(failing["pending"], 5, "{failing}");
    assert!(failing["attempts"].as_i64().unwrap() >= 1, "{failing}");
    let first = feed[0]["id"].as_i64().unwrap();
    assert!(receiver.requests().iter().all(|d| d.id() == first), "nothing after the first event before it succeeds");

    receiver.answer(200);
    let accepted = wait_delivered(&app, &receiver, "erp", &ids(&feed)).await;
    assert_eq!(accepted, ids(&feed), "everything, in order, no gaps");
    let (_, hook) = app.get("/v1/webhooks/erp").await;
    assert_eq!(hook["pending"], 0, "{hook}");
    assert_eq!((hook["last_status"].as_i64(), hook["last_error"].is_null()), (Some(200), true), "{hook}");
    assert_eq!(hook["attempts"], 0, "{hook}");
}

#[tokio::test]
async fn a_service_killed_mid_delivery_skips_nothing_after_restart() {
    let db_url = helpers::fresh_database().await;
    let listen = format!("127.0.0.1:{}", drills::free_port());
    let log = DrillLog::new("webhooks-kill");
    let args = ["--drain-delay-secs", "0"];
    let mut service = Service::start(&db_url, &listen, log.path(), &args);
    let app = drills::app_for(&listen, &db_url).await;
    assert!(drills::wait_ready(&app.base, PATIENCE).await.is_some(), "service did not start ({log})");
    stock(&app, 100).await;
    let before = last_event_id(&app).await;
    let receiver = Receiver::start().await;
    // A slow receiver: a delivery is nearly always in flight.
    receiver.seen.delay_ms.store(300, Ordering::SeqCst);
    subscribe(&app, "slow", &receiver.url, &new_secret(), None).await;
    for i in 0..12 {
        reserve(&app, &format!("o{i}")).await;
    }
    let feed = feed_after(&app, before).await;
    assert_eq!(feed.len(), 12);

    eventually("a few deliveries made, one in flight", async || {
        (receiver.accepted().len() >= 3 && receiver.seen.in_flight.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    let killed = std::process::Command::new("kill").args(["-9", &service.pid().to_string()]).status().unwrap();
    assert!(killed.success());
    service.reap();
    // The delivery its connection carried is gone with it, not in flight for ever.
    eventually("no delivery in flight after the kill", async || {
        (receiver.seen.in_flight.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    let at_kill = receiver.accepted();
    assert!(at_kill.len() < feed.len(), "the kill came before the end: {at_kill:?}");
    service = Service::start(&db_url, &listen, log.path(), &args);
    assert!(drills::wait_ready(&app.base, PATIENCE).await.is_some(), "service did not restart ({log})");

    let accepted = wait_delivered(&app, &receiver, "slow", &ids(&feed)).await;
    assert_eq!(accepted, ids(&feed), "nothing skipped, in order ({log})");
    let all = receiver.accepted();
    assert!(all.windows(2).all(|w| w[0] <= w[1]), "never back to an earlier event: {all:?}");
    assert!(all.len() <= feed.len() + 1, "at most the event in flight at the kill again: {all:?}");
    service.stop();
}

#[tokio::test]
async fn two_instances_deliver_each_event_in_order_and_never_two_at_once() {
    let app = TestApp::spawn().await;
    // A second service instance on the same database.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ServerArgs { listen: listener.local_addr().unwrap(), ..ServerArgs::default() };
    let other_base = format!("http://{}", server.listen);
    let pool = inventory::store::db::connect(&app.db_url, &helpers::database_args(None)).await.unwrap();
    let other = AbortOnDrop(tokio::spawn(inventory::startup::serve(listener, pool, server, std::future::pending())));
    stock(&app, 1000).await;
    let before = last_event_id(&app).await;
    let receiver = Receiver::start().await;
    // Each answer takes a moment: two deliveries at once would overlap at the receiver.
    receiver.seen.delay_ms.store(15, Ordering::SeqCst);
    subscribe(&app, "shared", &receiver.url, &new_secret(), None).await;
    for i in 0..40 {
        // Orders come in through both instances.
        let base = if i % 2 == 0 { &app.base } else { &other_base };
        let res = app
            .client
            .post(format!("{base}/v1/reservations"))
            .json(&json!({"order_id": format!("o{i}"), "lines": [{"sku": "A", "quantity": 1}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    let feed = feed_after(&app, before).await;
    assert_eq!(feed.len(), 40);
    let accepted = wait_delivered(&app, &receiver, "shared", &ids(&feed)).await;
    assert_eq!(accepted, ids(&feed));
    assert_eq!(receiver.accepted().len(), 40, "each event once");
    assert_eq!(receiver.seen.max_in_flight.load(Ordering::SeqCst), 1, "one delivery in flight at a time");
    drop(other);
}

/// A service task, aborted when dropped (also when the test fails).
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), inventory::startup::RunError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test]
async fn a_subscription_with_types_gets_only_those_and_moves_past_the_rest() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    let before = last_event_id(&app).await;
    let receiver = Receiver::start().await;
    let types = ["stock.out_of_stock", "stock.back_in_stock"];
    let created = subscribe(&app, "stock", &receiver.url, &new_secret(), Some(&types)).await;
    assert_eq!(created["types"], json!(types));
    app.receive("A", "W1", 2).await; // back in stock
    let first = reserve(&app, "o1").await;
    let second = reserve(&app, "o2").await; // out of stock
    let (status, _) =
        app.call(Method::POST, &format!("/v1/reservations/{}/release", second["id"].as_str().unwrap()), None).await; // back in stock
    assert_eq!(status, StatusCode::OK);
    reserve(&app, "o3").await; // out of stock again
    let fulfil = format!("/v1/reservations/{}/fulfil", first["id"].as_str().unwrap());
    let (status, _) = app.call(Method::POST, &fulfil, None).await; // the feed ends on an unwanted event
    assert_eq!(status, StatusCode::OK);
    let feed = feed_after(&app, before).await;
    let wanted: Vec<i64> = feed
        .iter()
        .filter(|e| types.contains(&e["type"].as_str().unwrap()))
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(wanted.len(), 4, "{feed:?}");
    assert!(wanted.len() < feed.len());
    let accepted = wait_delivered(&app, &receiver, "stock", &wanted).await;
    assert_eq!(accepted, wanted);
    let hook = eventually("the subscription moves past the events it does not want", async || {
        let (_, hook) = app.get("/v1/webhooks/stock").await;
        (hook["delivered_through"] == feed.last().unwrap()["id"]).then_some(hook)
    })
    .await;
    assert_eq!(hook["pending"], 0, "{hook}");
}

#[tokio::test]
async fn bad_subscriptions_are_refused_secrets_never_shown_and_only_admins_may_touch_them() {
    let (admin, admin_line) = mint("root", Role::Admin);
    let (ops, ops_line) = mint("warehouse-team", Role::Ops);
    let (read, read_line) = mint("dashboard", Role::Read);
    let server = ServerArgs { api_keys: Some(format!("{admin_line},{ops_line},{read_line}")), ..ServerArgs::default() };
    let app = TestApp::spawn_with(server).await;
    let call = async |method: Method, path: &str, key: &str, body: Option<Value>| {
        let mut req = app.client.request(method, app.url(path)).bearer_auth(key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.unwrap()
    };
    let secret = new_secret();
    let good = json!({"url": "http://127.0.0.1:9/hook", "secret": secret});

    let short = format!("whsec_{}", STANDARD.encode([1u8; 23]));
    let long = format!("whsec_{}", STANDARD.encode([1u8; 65]));
    let bad = [
        (json!({"url": "ftp://example.com/x", "secret": secret}), "url"),
        (json!({"url": "example.com", "secret": secret}), "url"),
        (json!({"secret": secret}), "url"),
        (json!({"url": "http://example.com", "secret": "s3cr3t"}), "secret"),
        (json!({"url": "http://example.com", "secret": short}), "secret"),
        (json!({"url": "http://example.com", "secret": long}), "secret"),
        (json!({"url": "http://example.com"}), "secret"),
        (json!({"url": "http://example.com", "secret": secret, "types": ["stock.exploded"]}), "types"),
        (json!({"url": "http://example.com", "secret": secret, "types": []}), "types"),
    ];
    for (body, field) in bad {
        let res = call(Method::PUT, "/v1/webhooks/h1", &admin, Some(body.clone())).await;
        let problem = assert_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert_eq!(problem["errors"][0]["field"], field, "{body}: {problem}");
    }
    let res = call(Method::PUT, "/v1/webhooks/-bad", &admin, Some(good.clone())).await;
    assert_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let list: Value = call(Method::GET, "/v1/webhooks", &admin, None).await.json().await.unwrap();
    assert_eq!(list, json!({"items": []}), "nothing was stored");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM webhooks").fetch_one(&app.db).await.unwrap();
    assert_eq!(stored, 0);

    // Only admins, for every method, reads included.
    for key in [&ops, &read] {
        for (method, path) in
            [(Method::GET, "/v1/webhooks"), (Method::GET, "/v1/webhooks/h1"), (Method::DELETE, "/v1/webhooks/h1")]
        {
            assert_problem(call(method, path, key, None).await, StatusCode::FORBIDDEN, "forbidden").await;
        }
        let res = call(Method::PUT, "/v1/webhooks/h1", key, Some(good.clone())).await;
        assert_problem(res, StatusCode::FORBIDDEN, "forbidden").await;
    }

    // Created, updated, read, listed: the secret is in no answer.
    let mut answers = Vec::new();
    let res = call(Method::PUT, "/v1/webhooks/h1", &admin, Some(good.clone())).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    answers.push(res.text().await.unwrap());
    let types = json!({"url": "https://example.com/h", "secret": secret, "types": ["reservation.created"]});
    let res = call(Method::PUT, "/v1/webhooks/h1", &admin, Some(types)).await;
    assert_eq!(res.status(), StatusCode::OK);
    answers.push(res.text().await.unwrap());
    for path in ["/v1/webhooks/h1", "/v1/webhooks"] {
        let res = call(Method::GET, path, &admin, None).await;
        assert_eq!(res.status(), StatusCode::OK);
        answers.push(res.text().await.unwrap());
    }
    let key = secret.strip_prefix("whsec_").unwrap();
    for answer in &answers {
        assert!(!answer.contains(key) && !answer.contains("secret"), "{answer}");
    }
    let hook: Value = serde_json::from_str(&answers[2]).unwrap();
    assert_eq!((hook["name"].as_str(), hook["url"].as_str()), (Some("h1"), Some("https://example.com/h")), "{hook}");
    assert_eq!(hook["types"], json!(["reservation.created"]));
    for field in ["delivered_through", "pending", "last_status", "last_error", "last_attempt_at"] {
        assert!(hook.get(field).is_some(), "{field} missing: {hook}");
    }

    // Deleted once; unknown ones are 404.
    assert_eq!(call(Method::DELETE, "/v1/webhooks/h1", &admin, None).await.status(), StatusCode::NO_CONTENT);
    for (method, path) in [
        (Method::GET, "/v1/webhooks/h1"),
        (Method::DELETE, "/v1/webhooks/h1"),
        (Method::GET, "/v1/webhooks/nope"),
        (Method::GET, "/v1/webhooks/-bad"),
    ] {
        assert_problem(call(method, path, &admin, None).await, StatusCode::NOT_FOUND, "not_found").await;
    }
}

#[tokio::test]
async fn a_receiver_that_never_answers_times_out_after_10_s_and_stalls_no_other_subscription() {
    let app = TestApp::spawn().await;
    stock(&app, 100).await;
    let before = last_event_id(&app).await;
    // Accepts connections and reads requests, but never answers.
    let hung = Receiver::start().await;
    hung.seen.delay_ms.store(3_600_000, Ordering::SeqCst);
    let healthy = Receiver::start().await;
    subscribe(&app, "hung", &hung.url, &new_secret(), None).await;
    subscribe(&app, "healthy", &healthy.url, &new_secret(), None).await;

    let started = Instant::now();
    for order in ["o1", "o2", "o3"] {
        reserve(&app, order).await;
    }
    let feed = feed_after(&app, before).await;
    let delivered = wait_delivered(&app, &healthy, "healthy", &ids(&feed)).await;
    assert_eq!(delivered, ids(&feed));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the healthy subscription got everything in {:?}, not held up by the hung one's attempt",
        started.elapsed()
    );
    eventually("the hung subscription's first attempt got its request", async || {
        (!hung.requests().is_empty()).then_some(())
    })
    .await;

    // The hung attempt ends at its 10 s timeout as a failure, and the event stays pending.
    let hook = eventually("the hung attempt is recorded as failed", async || {
        let (_, hook) = app.get("/v1/webhooks/hung").await;
        hook["last_error"].is_string().then_some(hook)
    })
    .await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(9), "the attempt was given up after {waited:?}, before 10 s");
    assert!(hook["last_status"].is_null(), "no answer, no status: {hook}");
    assert_eq!(hook["pending"], 3, "nothing was taken as delivered: {hook}");
    assert_eq!(hook["delivered_through"], before, "{hook}");
    assert!(hung.accepted().iter().all(|id| *id == ids(&feed)[0]), "only the first event was tried");
}
