//! Several instances on one database: three `inventory serve` processes share one PostgreSQL
//! database while order-service and ops clients spread their calls over all three, and one
//! instance is killed with -9 and restarted mid-run. A call that got no answer is sent again
//! with the same key to another instance. Afterwards every promise is checked against what the
//! clients were told: the invariants (`inventory check`), each acknowledged effect exactly
//! once, each expiry once and within 5 s, a gap-free feed with each entity's events in order,
//! and a webhook that got every event in feed order, one delivery at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt;
use futures::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::drills::{self, Answer, DrillLog, Service, Unsettled};
use crate::helpers::{self, TestApp};
use crate::webhooks::{self, Receiver};

const BIN: &str = env!("CARGO_BIN_EXE_inventory");
const INSTANCES: usize = 3;
/// The instance that is killed.
const VICTIM: usize = 1;
const CLIENTS: usize = 9;
const LOAD: Duration = Duration::from_secs(12);
/// How long the killed instance stays down.
const DOWN: Duration = Duration::from_millis(1500);
/// The contract: an overdue reservation is released within 5 s of its deadline.
const EXPIRY_BOUND: TimeDelta = TimeDelta::seconds(5);
/// Every this many calls, a client sends an answered call again, to another instance.
const REPLAY_EVERY: usize = 7;
const TAG: &str = "fleet";
const WAREHOUSES: [&str; 2] = ["W1", "W2"];
/// SKUs with far more stock than the load can take: their operations are never refused.
const PLENTY_SKUS: [&str; 4] = ["F0", "F1", "F2", "F3"];
const PLENTY: i64 = 1_000_000;
/// A SKU with little stock, in W1 only: it runs out and comes back, so reservations are refused
/// now and then and its level crosses out of stock, back in stock and low.
const SCARCE: &str = "FS";
const SCARCE_STOCK: i64 = 24;
const SCARCE_REORDER_POINT: i64 = 6;

#[tokio::test]
async fn three_instances_with_one_killed_keep_every_promise() {
    let db_url = helpers::fresh_database().await;
    let log = DrillLog::new("fleet");
    let listens: Vec<String> = (0..INSTANCES).map(|_| format!("127.0.0.1:{}", drills::free_port())).collect();
    let start = |listen: &str| Service::start(&db_url, listen, log.path(), &["--drain-delay-secs", "0"]);
    let mut services: Vec<Service> = listens.iter().map(|l| start(l)).collect();
    let app = drills::app_for(&listens[0], &db_url).await;
    let bases: Vec<String> = listens.iter().map(|l| format!("http://{l}")).collect();
    for base in &bases {
        assert!(drills::wait_ready(base, Duration::from_secs(30)).await.is_some(), "{base} did not start ({log})");
    }
    stock_up(&app).await;
    let receiver = Receiver::start().await;
    let hook = webhooks::subscribe(&app, TAG, &receiver.url, &webhooks::new_secret(), None).await;
    let hook_from = hook["delivered_through"].as_i64().unwrap();

    let ctx = Arc::new(Ctx {
        http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
        bases,
        in_flight: (0..INSTANCES).map(|_| AtomicUsize::new(0)).collect(),
        stop: AtomicBool::new(false),
    });
    let started = Instant::now();
    let running: Vec<_> = (0..CLIENTS).map(|id| tokio::spawn(Client::new(id).drive(ctx.clone()))).collect();

    // Mid-run, with requests in flight to it, the victim is killed; it comes back on its port.
    tokio::time::sleep(LOAD * 2 / 5).await;
    let waiting = Instant::now();
    while ctx.in_flight[VICTIM].load(Ordering::SeqCst) < 2 && waiting.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let in_flight_at_kill = ctx.in_flight[VICTIM].load(Ordering::SeqCst);
    let killed = Command::new("kill").args(["-9", &services[VICTIM].pid().to_string()]).status().unwrap();
    assert!(killed.success(), "kill -9 failed");
    services[VICTIM].reap();
    let kills = 1;
    tokio::time::sleep(DOWN).await;
    services[VICTIM] = start(&listens[VICTIM]);
    let back = drills::wait_ready(&ctx.bases[VICTIM], Duration::from_secs(30)).await;
    assert!(back.is_some(), "the killed instance did not come back ({log})");
    let restarts = 1;
    tokio::time::sleep(LOAD.saturating_sub(started.elapsed())).await;
    ctx.stop.store(true, Ordering::SeqCst);
    let clients: Vec<Client> = join_all(running).await.into_iter().map(Result::unwrap).collect();
    let load_took = started.elapsed();

    settle_expiries(&app).await;
    let mut verdict = Verdict::default();
    let checked = inventory_check(&db_url, &mut verdict);
    let told = Told::of(&clients, &mut verdict);
    let fates = check_reservations(&app, &ctx, &told, &mut verdict).await;
    let lag = check_ledger(&app, &told, &fates, &mut verdict).await;
    let feed = webhooks::feed_after(&app, 0).await;
    check_feed(&app, &ctx, &feed, &told, &fates, &mut verdict).await;
    let deliveries = check_webhook(&app, &receiver, &feed, hook_from, kills, &mut verdict).await;

    let mut f = Figures::default();
    clients.iter().for_each(|c| f.add(&c.figures));
    verdict.problems.extend(clients.iter().flat_map(|c| c.problems.iter().cloned()));
    let expired = fates.values().filter(|f| f.by_expiry).count();
    let short = told.reservations.values().filter(|s| s.short).count();
    eprintln!(
        "fleet drill: {INSTANCES} instances, {CLIENTS} clients for {load_took:?}: {} requests sent, answered by \
         status {:?}; {} calls without an answer at first ({} connections refused, {} cut off, {} server errors \
         {:?}, {} still in progress; {} in flight at the kill), all resolved by a retry with the same key on \
         another instance ({} replayed, {} executed then); {} answers replayed on another instance, identical; \
         {kills} kill -9, {restarts} restart; {} reservations ({short} with a short TTL, {} refused), {expired} \
         expiries (slowest {} ms after its deadline), {} stock operations; {} events; {} webhook deliveries of the \
         events after the subscription ({} repeated); `inventory check`: {checked} violations; drill: {} violations",
        f.sent,
        f.statuses,
        f.unknown,
        f.refused,
        f.broken,
        f.server_errors.values().sum::<usize>(),
        f.server_errors,
        f.in_progress,
        in_flight_at_kill,
        f.resolved_replayed,
        f.resolved_executed,
        f.replay_checks,
        told.reservations.len(),
        told.refused.len(),
        lag.num_milliseconds(),
        told.stock_ops.len(),
        feed.len(),
        deliveries.0,
        deliveries.1,
        verdict.problems.len(),
    );
    assert!(f.sent >= 500, "too little load to mean anything: {} requests", f.sent);
    assert!(f.unknown > 0, "no call went unanswered: the kill did not hit the load");
    assert!(expired > 0 && f.replay_checks > 0, "no expiry or no replay: not a drill");
    let unexpected: Vec<&String> =
        f.server_errors.keys().filter(|k| *k != "503 unavailable" && *k != "504 outcome_unknown").collect();
    assert!(unexpected.is_empty(), "server errors other than 503 unavailable / 504 outcome_unknown: {unexpected:?}");
    verdict.assert_none(&log);
    for service in services {
        service.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Set-up and settling
// ---------------------------------------------------------------------------------------------

async fn stock_up(app: &TestApp) {
    for (i, warehouse) in WAREHOUSES.iter().enumerate() {
        app.warehouse(warehouse, i as i64 + 1).await;
    }
    for sku in PLENTY_SKUS {
        app.sku(sku).await;
        for warehouse in WAREHOUSES {
            app.receive(sku, warehouse, PLENTY).await;
        }
    }
    app.sku(SCARCE).await;
    app.receive(SCARCE, "W1", SCARCE_STOCK).await;
    let (status, body) =
        app.put(&format!("/v1/stock/{SCARCE}/W1"), json!({"reorder_point": SCARCE_REORDER_POINT})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Waits until every deadline that passed has had its 5 s, and the sweeps found nothing left.
async fn settle_expiries(app: &TestApp) {
    let latest: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT max(expires_at) FROM reservations WHERE order_id LIKE 'fleet-%' AND expires_at < now() + interval '1 minute'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    if let Some(latest) = latest {
        let wait = (latest + EXPIRY_BOUND - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(500)).await;
    }
}

/// Runs `inventory check` against the drill's database; returns the violations it reported.
fn inventory_check(db_url: &str, verdict: &mut Verdict) -> usize {
    let out = Command::new(BIN).args(["check", "--database-url", db_url]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let violations = stdout.lines().filter(|l| l.starts_with("VIOLATION")).count();
    if !out.status.success() || violations > 0 || !stdout.contains("ok: all invariants hold") {
        verdict.problem(format!(
            "inventory check exited {}: {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    violations
}

// ---------------------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------------------

/// What the clients share: the instances and how many requests each has in flight.
struct Ctx {
    http: reqwest::Client,
    bases: Vec<String>,
    in_flight: Vec<AtomicUsize>,
    stop: AtomicBool,
}

/// A call as a client makes it, and makes it again after no answer: same key, same body.
#[derive(Debug, Clone)]
struct Call {
    key: String,
    method: Method,
    path: String,
    body: Option<Value>,
    about: About,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Fulfil,
    Release,
    Extend,
    Lines,
}

#[derive(Debug, Clone)]
enum About {
    /// `scarce`: it asks for the scarce SKU, so it may be refused.
    Reserve { order_id: String, scarce: bool, short: bool },
    /// A change of a reservation the client was told is active.
    Change { id: String, change: Change, scarce: bool },
    /// Receive, adjust or transfer, with this many ledger entries when applied.
    Stock { entries: i64 },
}

/// A reservation a client believes active, as its last answer showed it.
#[derive(Debug)]
struct Open {
    id: String,
    body: Value,
}

#[derive(Debug, Default)]
struct Figures {
    /// HTTP requests, retries included.
    sent: usize,
    statuses: BTreeMap<u16, usize>,
    /// Calls whose first attempt got no answer.
    unknown: usize,
    refused: usize,
    broken: usize,
    server_errors: BTreeMap<String, usize>,
    in_progress: usize,
    resolved_replayed: usize,
    resolved_executed: usize,
    replay_checks: usize,
}

impl Figures {
    fn add(&mut self, o: &Self) {
        self.sent += o.sent;
        for (k, n) in &o.statuses {
            *self.statuses.entry(*k).or_default() += n;
        }
        for (k, n) in &o.server_errors {
            *self.server_errors.entry(k.clone()).or_default() += n;
        }
        self.unknown += o.unknown;
        self.refused += o.refused;
        self.broken += o.broken;
        self.in_progress += o.in_progress;
        self.resolved_replayed += o.resolved_replayed;
        self.resolved_executed += o.resolved_executed;
        self.replay_checks += o.replay_checks;
    }
}

struct Client {
    id: usize,
    n: usize,
    /// The instance the next call goes to (round robin).
    turn: usize,
    open: Vec<Open>,
    /// Every call with its answer, in the order the answers came.
    answered: Vec<(Call, Answer)>,
    figures: Figures,
    problems: Vec<String>,
}

impl Client {
    fn new(id: usize) -> Self {
        Self {
            id,
            n: 0,
            turn: id % INSTANCES,
            open: Vec::new(),
            answered: Vec::new(),
            figures: Figures::default(),
            problems: Vec::new(),
        }
    }

    async fn drive(mut self, ctx: Arc<Ctx>) -> Self {
        while !ctx.stop.load(Ordering::SeqCst) {
            let call = self.next_call();
            let answer = self.call(&ctx, &call).await;
            self.record(call, answer);
        }
        self
    }

    /// Sends `call` until some instance answers it, each retry to the next instance.
    async fn call(&mut self, ctx: &Ctx, call: &Call) -> Answer {
        let mut instance = self.turn;
        self.turn = (self.turn + 1) % INSTANCES;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut unanswered = false;
        loop {
            if let Some(answer) = self.attempt(ctx, instance, call).await {
                if unanswered {
                    if answer.replayed {
                        self.figures.resolved_replayed += 1;
                    } else {
                        self.figures.resolved_executed += 1;
                    }
                }
                if self.n.is_multiple_of(REPLAY_EVERY) {
                    self.check_replay(ctx, instance, call, &answer).await;
                }
                return answer;
            }
            if !unanswered {
                self.figures.unknown += 1;
                unanswered = true;
            }
            assert!(Instant::now() < deadline, "{} {} {} is still unanswered", call.method, call.path, call.key);
            instance = (instance + 1) % INSTANCES;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends an answered call again to another instance: the same answer, replayed.
    async fn check_replay(&mut self, ctx: &Ctx, answered_by: usize, call: &Call, first: &Answer) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut other = (answered_by + 1 + rand::random_range(0..INSTANCES - 1)) % INSTANCES;
        let again = loop {
            if let Some(again) = self.attempt(ctx, other, call).await {
                break again;
            }
            assert!(Instant::now() < deadline, "the replay of {} is still unanswered", call.key);
            other = (other + 1) % INSTANCES;
            if other == answered_by {
                other = (other + 1) % INSTANCES;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.figures.replay_checks += 1;
        let (a, b) = (without_request_id(&first.body), without_request_id(&again.body));
        if !again.replayed || again.status != first.status || a != b {
            self.problems.push(format!(
                "{} {} {} answered {} {a} by instance {answered_by}, then {} (replayed: {}) {b} by instance {other}",
                call.method, call.path, call.key, first.status, again.status, again.replayed
            ));
        }
    }

    /// One request to one instance; `None` when it got no answer it can stand by (no
    /// connection, a broken one, a 5xx, or the first try still running).
    async fn attempt(&mut self, ctx: &Ctx, instance: usize, call: &Call) -> Option<Answer> {
        let url = format!("{}{}", ctx.bases[instance], call.path);
        let mut req = ctx.http.request(call.method.clone(), url).header("Idempotency-Key", &call.key);
        if let Some(body) = &call.body {
            req = req.json(body);
        }
        self.figures.sent += 1;
        ctx.in_flight[instance].fetch_add(1, Ordering::SeqCst);
        let exchanged = async {
            let res = req.send().await?;
            let (status, replayed) = (res.status(), res.headers().contains_key("idempotent-replayed"));
            Ok::<_, reqwest::Error>((status, replayed, res.bytes().await?))
        }
        .await;
        ctx.in_flight[instance].fetch_sub(1, Ordering::SeqCst);
        let (status, replayed, bytes) = match exchanged {
            Ok(answer) => answer,
            Err(err) if err.is_connect() => {
                self.figures.refused += 1;
                return None;
            }
            Err(_) => {
                self.figures.broken += 1;
                return None;
            }
        };
        match drills::stand_by(&call.key, status, &bytes) {
            Ok(body) => {
                *self.figures.statuses.entry(status.as_u16()).or_default() += 1;
                Some(Answer { status, body, replayed })
            }
            Err(Unsettled::ServerError(what)) => {
                *self.figures.server_errors.entry(what).or_default() += 1;
                None
            }
            Err(Unsettled::InProgress) => {
                self.figures.in_progress += 1;
                None
            }
        }
    }

    fn record(&mut self, call: Call, answer: Answer) {
        match &call.about {
            About::Reserve { .. } if answer.status == StatusCode::CREATED => {
                let id = answer.body["id"].as_str().unwrap_or_default().to_owned();
                self.open.push(Open { id, body: answer.body.clone() });
            }
            About::Change { id, .. } => {
                let at = self.open.iter().position(|o| o.id == *id);
                let over = answer.body["code"] == "reservation_not_active"
                    || (answer.status == StatusCode::OK && answer.body["status"] != "active");
                match at {
                    Some(at) if over => {
                        self.open.remove(at);
                    }
                    Some(at) if answer.status == StatusCode::OK => self.open[at].body = answer.body.clone(),
                    _ => {}
                }
            }
            _ => {}
        }
        self.answered.push((call, answer));
    }

    /// The next call: new orders, changes of open ones, stock operations.
    fn next_call(&mut self) -> Call {
        self.n += 1;
        let key = format!("{TAG}-{}-{}", self.id, self.n);
        let roll = rand::random_range(0..100);
        if roll < 22 || self.open.is_empty() {
            return self.reserve(key);
        }
        if roll < 40 {
            return stock_call(key);
        }
        let open = &self.open[rand::random_range(0..self.open.len())];
        let id = open.id.clone();
        let held = held_allocations(&open.body);
        let nothing_fulfilled = allocations(&open.body).all(|a| a["fulfilled"] == 0);
        let settle = |verb: &str, change: Change| {
            let (sku, warehouse, _) = &held[rand::random_range(0..held.len())];
            let body =
                rand::random_bool(0.5).then(|| json!({"lines": [{"sku": sku, "warehouse": warehouse, "quantity": 1}]}));
            Call {
                key: key.clone(),
                method: Method::POST,
                path: format!("/v1/reservations/{id}/{verb}"),
                body,
                about: About::Change { id: id.clone(), change, scarce: false },
            }
        };
        match roll {
            40..55 => settle("fulfil", Change::Fulfil),
            55..68 => settle("release", Change::Release),
            68..80 => {
                let ttl = if rand::random_bool(0.3) { rand::random_range(1..=2) } else { 600 };
                Call {
                    key: key.clone(),
                    method: Method::POST,
                    path: format!("/v1/reservations/{id}/extend"),
                    body: Some(json!({"ttl_seconds": ttl})),
                    about: About::Change { id, change: Change::Extend, scarce: false },
                }
            }
            _ if nothing_fulfilled => {
                let (body, scarce) = new_lines(&open.body);
                Call {
                    key,
                    method: Method::PUT,
                    path: format!("/v1/reservations/{id}/lines"),
                    body: Some(body),
                    about: About::Change { id, change: Change::Lines, scarce },
                }
            }
            _ => settle("release", Change::Release),
        }
    }

    fn reserve(&self, key: String) -> Call {
        let order_id = format!("{TAG}-order-{}-{}", self.id, self.n);
        let first = rand::random_range(0..PLENTY_SKUS.len());
        let mut skus = vec![PLENTY_SKUS[first]];
        if rand::random_bool(0.4) {
            skus.push(PLENTY_SKUS[(first + 1) % PLENTY_SKUS.len()]);
        }
        let scarce = rand::random_bool(0.15);
        if scarce {
            skus.push(SCARCE);
        }
        let lines: Vec<Value> =
            skus.iter().map(|sku| json!({"sku": sku, "quantity": rand::random_range(1..=3)})).collect();
        let mut body = json!({"order_id": order_id, "lines": lines});
        let short = rand::random_bool(0.45);
        if short {
            body["ttl_seconds"] = json!(rand::random_range(1..=2));
        }
        Call {
            key,
            method: Method::POST,
            path: "/v1/reservations".into(),
            body: Some(body),
            about: About::Reserve { order_id, scarce, short },
        }
    }
}

/// A receive, an adjustment or a transfer of a random SKU.
fn stock_call(key: String) -> Call {
    let sku = PLENTY_SKUS[rand::random_range(0..PLENTY_SKUS.len())];
    let warehouse = WAREHOUSES[rand::random_range(0..WAREHOUSES.len())];
    let (path, body, entries) = match rand::random_range(0..3) {
        0 => {
            // Now and then the scarce SKU is restocked: it comes back in stock.
            let (sku, warehouse) = if rand::random_bool(0.25) { (SCARCE, "W1") } else { (sku, warehouse) };
            let quantity = rand::random_range(1..=5);
            ("receive", json!({"sku": sku, "warehouse": warehouse, "quantity": quantity, "reference": key}), 1)
        }
        1 => {
            let delta = rand::random_range(1..=3) * if rand::random_bool(0.5) { 1 } else { -1 };
            let reason = ["count", "damage", "found", "correction"][rand::random_range(0..4)];
            let body = json!({"sku": sku, "warehouse": warehouse, "delta": delta, "reason": reason, "reference": key});
            ("adjust", body, 1)
        }
        _ => {
            let to = WAREHOUSES.iter().find(|w| **w != warehouse).unwrap();
            let quantity = rand::random_range(1..=3);
            let body = json!({"sku": sku, "from": warehouse, "to": to, "quantity": quantity, "reference": key});
            ("transfer", body, 2)
        }
    };
    Call {
        key,
        method: Method::POST,
        path: format!("/v1/stock/{path}"),
        body: Some(body),
        about: About::Stock { entries },
    }
}

/// New lines for an order: quantities changed, lines dropped and added; whether it asks for the
/// scarce SKU.
fn new_lines(reservation: &Value) -> (Value, bool) {
    let mut lines: Vec<Value> = reservation["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|_| rand::random_bool(0.8))
        .map(|l| json!({"sku": l["sku"], "quantity": rand::random_range(1..=4)}))
        .collect();
    let has = |lines: &[Value], sku: &str| lines.iter().any(|l| l["sku"] == sku);
    let extra = PLENTY_SKUS[rand::random_range(0..PLENTY_SKUS.len())];
    if lines.is_empty() || (rand::random_bool(0.25) && !has(&lines, extra)) {
        lines.push(json!({"sku": extra, "quantity": rand::random_range(1..=3)}));
    }
    if rand::random_bool(0.1) && !has(&lines, SCARCE) {
        lines.push(json!({"sku": SCARCE, "quantity": 1}));
    }
    let mut body = json!({"lines": lines});
    if rand::random_bool(0.2) {
        body["ttl_seconds"] = json!(rand::random_range(1..=2));
    }
    (body, has(&lines, SCARCE))
}

fn allocations(reservation: &Value) -> impl Iterator<Item = &Value> {
    reservation["lines"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["allocations"].as_array().into_iter().flatten())
}

/// `(sku, warehouse, held)` of every allocation still holding units.
fn held_allocations(reservation: &Value) -> Vec<(String, String, i64)> {
    let mut out = Vec::new();
    for line in reservation["lines"].as_array().into_iter().flatten() {
        for a in line["allocations"].as_array().into_iter().flatten() {
            let held = a["held"].as_i64().unwrap_or(0);
            if held > 0 {
                out.push((line["sku"].as_str().unwrap().to_owned(), a["warehouse"].as_str().unwrap().to_owned(), held));
            }
        }
    }
    out
}

/// A body as compared between a first answer and its replay: a problem names its own request.
fn without_request_id(body: &Value) -> Value {
    let mut body = body.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("request_id");
    }
    body
}

// ---------------------------------------------------------------------------------------------
// What the clients were told, and the checks
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Verdict {
    problems: Vec<String>,
}

impl Verdict {
    fn problem(&mut self, p: String) {
        self.problems.push(p);
    }

    fn assert_none(&self, log: &DrillLog) {
        assert!(
            self.problems.is_empty(),
            "{} violation(s) after the fleet drill ({log}):\n{}",
            self.problems.len(),
            self.problems.iter().take(50).map(|p| format!("  {p}\n")).collect::<String>()
        );
    }
}

/// One reservation as its client was told about it.
#[derive(Debug)]
struct Story {
    order_id: String,
    short: bool,
    /// The last 2xx answer about it.
    last: Value,
    /// Acknowledged changes of its lines.
    edits: usize,
    /// The status a `reservation_not_active` answer told.
    told_over: Option<String>,
}

#[derive(Debug, Default)]
struct Told {
    /// By reservation id.
    reservations: BTreeMap<String, Story>,
    /// Orders refused for want of the scarce SKU.
    refused: HashSet<String>,
    /// Applied stock operations: key → ledger entries.
    stock_ops: HashMap<String, i64>,
    /// Every key that got an answer.
    keys: HashSet<String>,
}

impl Told {
    /// Sorts the answers by what they are about; an answer the load cannot have had is a problem.
    fn of(clients: &[Client], verdict: &mut Verdict) -> Self {
        let mut told = Self::default();
        for (call, answer) in clients.iter().flat_map(|c| &c.answered) {
            told.keys.insert(call.key.clone());
            let (status, body) = (answer.status, &answer.body);
            let code = body["code"].as_str().unwrap_or_default();
            match &call.about {
                About::Reserve { order_id, short, .. } if status == StatusCode::CREATED => {
                    let id = body["id"].as_str().unwrap_or_default().to_owned();
                    let story = Story {
                        order_id: order_id.clone(),
                        short: *short,
                        last: body.clone(),
                        edits: 0,
                        told_over: None,
                    };
                    if told.reservations.insert(id, story).is_some() {
                        verdict.problem(format!("{order_id}: a reservation id was acknowledged twice"));
                    }
                }
                About::Reserve { order_id, scarce: true, .. } if code == "insufficient_stock" => {
                    told.refused.insert(order_id.clone());
                }
                About::Change { id, change, scarce } => {
                    let Some(story) = told.reservations.get_mut(id) else {
                        verdict.problem(format!("{} on {id}, which no client was told was created", call.key));
                        continue;
                    };
                    if status == StatusCode::OK {
                        if story.told_over.is_some() {
                            verdict.problem(format!("{}: {id} changed after it was told over", call.key));
                        }
                        story.last = body.clone();
                        story.edits += usize::from(*change == Change::Lines);
                    } else if code == "reservation_not_active" {
                        story.told_over = body["reservation_status"].as_str().map(str::to_owned);
                    } else if !(*change == Change::Lines && *scarce && code == "insufficient_stock") {
                        verdict.problem(format!("{} {} answered {status} {body}", call.method, call.path));
                    }
                }
                About::Stock { entries } if status == StatusCode::OK => {
                    told.stock_ops.insert(call.key.clone(), *entries);
                }
                _ => verdict.problem(format!("{} {} ({}) answered {status} {body}", call.method, call.path, call.key)),
            }
        }
        told
    }
}

/// How a reservation ended up, by the clients' account.
#[derive(Debug)]
struct Fate {
    /// The reservation as it must read now.
    expected: Value,
    /// Its deadline passed while it was active: the sweep must have released it.
    by_expiry: bool,
    /// What it held when it expired: `(allocations holding units, units)`.
    held_at_expiry: (usize, i64),
}

/// The reservation a client last saw, after the expiry that its deadline calls for.
fn fate_of(story: &Story, now: DateTime<Utc>) -> Fate {
    let last = &story.last;
    let deadline: DateTime<Utc> = last["expires_at"].as_str().unwrap().parse().unwrap();
    if last["status"] != "active" || deadline > now {
        return Fate { expected: last.clone(), by_expiry: false, held_at_expiry: (0, 0) };
    }
    let held = held_allocations(last);
    let mut expected = last.clone();
    let mut fulfilled = 0;
    for line in expected["lines"].as_array_mut().unwrap() {
        for a in line["allocations"].as_array_mut().unwrap() {
            let held = a["held"].as_i64().unwrap();
            fulfilled += a["fulfilled"].as_i64().unwrap();
            a["released"] = json!(a["released"].as_i64().unwrap() + held);
            a["held"] = json!(0);
        }
    }
    expected["status"] = json!(if fulfilled > 0 { "fulfilled" } else { "expired" });
    Fate { expected, by_expiry: true, held_at_expiry: (held.len(), held.iter().map(|h| h.2).sum()) }
}

/// Every acknowledged reservation exists once under its id and reads as the clients' account
/// says; no other does. Returns each one's fate.
async fn check_reservations(app: &TestApp, ctx: &Ctx, told: &Told, verdict: &mut Verdict) -> BTreeMap<String, Fate> {
    let now = Utc::now();
    let fates: BTreeMap<String, Fate> = told.reservations.iter().map(|(id, s)| (id.clone(), fate_of(s, now))).collect();
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT order_id, id::text FROM reservations WHERE order_id LIKE 'fleet-%'")
            .fetch_all(&app.db)
            .await
            .unwrap();
    let mut by_order: HashMap<&str, Vec<&str>> = HashMap::new();
    for (order_id, id) in &stored {
        by_order.entry(order_id).or_default().push(id);
    }
    for (id, story) in &told.reservations {
        match by_order.get(story.order_id.as_str()).map(Vec::as_slice) {
            Some([one]) if one == id => {}
            found => {
                verdict.problem(format!("{} was acknowledged as {id}; the database has {found:?}", story.order_id))
            }
        }
    }
    let acknowledged: HashSet<&str> = told.reservations.values().map(|s| s.order_id.as_str()).collect();
    for order_id in by_order.keys().filter(|o| !acknowledged.contains(*o)) {
        let refused = if told.refused.contains(*order_id) { " (and was refused)" } else { "" };
        verdict.problem(format!("{order_id} has a reservation no client was told about{refused}"));
    }

    // Read back through all instances, a few at a time.
    let reads = futures::stream::iter(told.reservations.keys().enumerate())
        .map(|(i, id)| async move {
            let url = format!("{}/v1/reservations/{id}", ctx.bases[i % INSTANCES]);
            let res = ctx.http.get(url).send().await.unwrap();
            (id, res.status(), res.json::<Value>().await.unwrap())
        })
        .buffer_unordered(6)
        .collect::<Vec<_>>()
        .await;
    for (id, status, body) in reads {
        let (fate, story) = (&fates[id], &told.reservations[id]);
        if status != StatusCode::OK || body != fate.expected {
            verdict.problem(format!("{id}: expected {} but it reads {status} {body}", fate.expected));
        }
        if let Some(over) = &story.told_over
            && (!fate.by_expiry || fate.expected["status"] != *over)
        {
            verdict.problem(format!("{id}: a client was told it is {over}, but its last answer was {}", story.last));
        }
    }
    fates
}

/// Each reservation's ledger matches what it holds and shipped; each expiry released what was
/// held once, within 5 s of the deadline; each stock operation is in the ledger once; each
/// answered key is stored once. Returns the slowest expiry.
async fn check_ledger(app: &TestApp, told: &Told, fates: &BTreeMap<String, Fate>, verdict: &mut Verdict) -> TimeDelta {
    #[derive(sqlx::FromRow)]
    struct Sums {
        reference: String,
        kind: String,
        entries: i64,
        on_hand: i64,
        reserved: i64,
        first: DateTime<Utc>,
        last: DateTime<Utc>,
    }
    let sums: Vec<Sums> = sqlx::query_as(
        "SELECT reference, kind, count(*) AS entries, sum(on_hand_delta)::bigint AS on_hand,
                sum(reserved_delta)::bigint AS reserved, min(at) AS first, max(at) AS last
           FROM ledger WHERE reference IS NOT NULL GROUP BY reference, kind",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let mut by_reference: HashMap<&str, Vec<&Sums>> = HashMap::new();
    for s in &sums {
        by_reference.entry(&s.reference).or_default().push(s);
    }
    let mut slowest = TimeDelta::zero();
    for (id, fate) in fates {
        let mine = by_reference.remove(id.as_str()).unwrap_or_default();
        let held: i64 = allocations(&fate.expected).map(|a| a["held"].as_i64().unwrap()).sum();
        let fulfilled: i64 = allocations(&fate.expected).map(|a| a["fulfilled"].as_i64().unwrap()).sum();
        let (on_hand, reserved) = mine.iter().fold((0, 0), |(o, r), s| (o + s.on_hand, r + s.reserved));
        if (on_hand, reserved) != (-fulfilled, held) {
            verdict.problem(format!(
                "{id}: its ledger entries sum to on_hand {on_hand} / reserved {reserved}; it fulfilled {fulfilled} \
                 and holds {held}"
            ));
        }
        let expire = mine.iter().find(|s| s.kind == "expire");
        match (fate.by_expiry, expire) {
            (false, None) => {}
            (false, Some(_)) => verdict.problem(format!("{id} has expire entries but did not expire")),
            (true, None) => verdict.problem(format!("{id} expired without an expire entry")),
            (true, Some(s)) => {
                let deadline: DateTime<Utc> = fate.expected["expires_at"].as_str().unwrap().parse().unwrap();
                slowest = slowest.max(s.last - deadline);
                if (s.entries as usize, -s.reserved) != fate.held_at_expiry {
                    verdict.problem(format!(
                        "{id}: {} expire entries releasing {}, but it held {:?} (allocations, units)",
                        s.entries, -s.reserved, fate.held_at_expiry
                    ));
                }
                if s.first < deadline || s.last - deadline > EXPIRY_BOUND {
                    verdict.problem(format!("{id}: deadline {deadline}, expired {}..{}", s.first, s.last));
                }
            }
        }
    }
    for (key, entries) in &told.stock_ops {
        let found: i64 = by_reference.remove(key.as_str()).unwrap_or_default().iter().map(|s| s.entries).sum();
        if found != *entries {
            verdict.problem(format!("stock operation {key}: {found} ledger entries, {entries} expected"));
        }
    }
    for (reference, rest) in by_reference.iter().filter(|(r, _)| r.starts_with("fleet-") || r.len() == 36) {
        let kinds: Vec<&str> = rest.iter().map(|s| s.kind.as_str()).collect();
        verdict.problem(format!("ledger entries {kinds:?} under {reference}, which no client was told about"));
    }

    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE key LIKE 'fleet-%'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    if keys != told.keys.len() as i64 {
        verdict.problem(format!("{} keys were answered, {keys} are stored", told.keys.len()));
    }
    slowest
}

/// The feed is gap-free and the same through every instance; every reservation's events tell
/// its story in order, every level's crossings alternate.
async fn check_feed(
    app: &TestApp,
    ctx: &Ctx,
    feed: &[Value],
    told: &Told,
    fates: &BTreeMap<String, Fate>,
    verdict: &mut Verdict,
) {
    let ids = webhooks::ids(feed);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.db).await.unwrap();
    if ids != (1..=stored).collect::<Vec<_>>() {
        verdict.problem(format!("the feed's {} ids are not 1..={stored}, each once", ids.len()));
    }
    // Paged in small steps, page by page from another instance: the same feed.
    let (mut paged, mut cursor, mut page_no) = (Vec::new(), 0, 0);
    loop {
        let url = format!("{}/v1/events?after={cursor}&limit=97", ctx.bases[page_no % INSTANCES]);
        let page: Value = ctx.http.get(url).send().await.unwrap().json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        if items.is_empty() {
            break;
        }
        paged.extend(items.iter().cloned());
        cursor = page["next_cursor"].as_i64().unwrap();
        page_no += 1;
    }
    if paged != feed {
        verdict.problem(format!(
            "paging across instances read {} events, not the {} of the feed",
            paged.len(),
            feed.len()
        ));
    }

    let mut stories: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut crossings: BTreeMap<(&str, &str), Vec<&Value>> = BTreeMap::new();
    for event in feed {
        let kind = event["type"].as_str().unwrap();
        if let Some(id) = event["reservation_id"].as_str() {
            stories.entry(id).or_default().push(kind);
        } else if let (Some(sku), Some(warehouse)) = (event["sku"].as_str(), event["warehouse"].as_str()) {
            crossings.entry((sku, warehouse)).or_default().push(event);
        }
    }
    for (id, story) in &told.reservations {
        let mut expected = vec!["reservation.created"];
        expected.extend(std::iter::repeat_n("reservation.modified", story.edits));
        let status = fates[id].expected["status"].as_str().unwrap();
        let terminal = format!("reservation.{status}");
        if status != "active" {
            expected.push(&terminal);
        }
        let found = stories.remove(id.as_str()).unwrap_or_default();
        if found != expected {
            verdict.problem(format!("{id}: events {found:?}, expected {expected:?}"));
        }
    }
    for (id, found) in &stories {
        verdict.problem(format!("events {found:?} of reservation {id}, which no client was told about"));
    }
    // The expiry's event, too, came within 5 s of the deadline.
    for event in feed.iter().filter(|e| e["reservation_id"].is_string()) {
        let id = event["reservation_id"].as_str().unwrap();
        let Some(fate) = fates.get(id).filter(|f| f.by_expiry) else { continue };
        if event["type"] != format!("reservation.{}", fate.expected["status"].as_str().unwrap()) {
            continue;
        }
        let deadline: DateTime<Utc> = fate.expected["expires_at"].as_str().unwrap().parse().unwrap();
        let at: DateTime<Utc> = event["at"].as_str().unwrap().parse().unwrap();
        if at < deadline || at - deadline > EXPIRY_BOUND {
            verdict.problem(format!("{id}: deadline {deadline}, its {} event at {at}", event["type"]));
        }
    }
    for ((sku, warehouse), events) in &crossings {
        let mut in_stock = false;
        for e in events {
            let (before, after) =
                (e["data"]["available_before"].as_i64().unwrap(), e["data"]["available"].as_i64().unwrap());
            let point = e["data"]["reorder_point"].as_i64().unwrap();
            let fits = match e["type"].as_str().unwrap() {
                "stock.back_in_stock" => !in_stock && before <= 0 && after > 0,
                "stock.out_of_stock" => in_stock && before > 0 && after <= 0,
                "stock.low" => before > point && after <= point,
                _ => false,
            };
            if !fits {
                verdict.problem(format!("{sku}/{warehouse}: {e} does not follow its earlier events"));
            }
            match e["type"].as_str() {
                Some("stock.back_in_stock") => in_stock = true,
                Some("stock.out_of_stock") => in_stock = false,
                _ => {}
            }
        }
    }
}

/// The webhook got every event after its start, in feed order, each as the feed has it, one
/// event at a time; a repeat only of the event just sent, at most once per kill. Returns
/// `(deliveries, repeats)`.
async fn check_webhook(
    app: &TestApp,
    receiver: &Receiver,
    feed: &[Value],
    from: i64,
    kills: usize,
    verdict: &mut Verdict,
) -> (usize, usize) {
    let expected: Vec<i64> = webhooks::ids(feed).into_iter().filter(|id| *id > from).collect();
    webhooks::eventually(&format!("the webhook gets {} events", expected.len()), async || {
        let (_, hook) = app.get(&format!("/v1/webhooks/{TAG}")).await;
        (hook["pending"] == 0 && hook["delivered_through"] == json!(expected.last().copied().unwrap_or(from)))
            .then_some(())
    })
    .await;
    let requests = receiver.requests();
    let mut accepted = receiver.accepted();
    let all = accepted.len();
    accepted.dedup();
    if accepted != expected {
        verdict.problem(format!(
            "the webhook got {} distinct events in a row ({all} requests), the feed has {} after {from}",
            accepted.len(),
            expected.len()
        ));
    }
    if all - accepted.len() > kills {
        verdict.problem(format!("{} repeated deliveries for {kills} kill(s)", all - accepted.len()));
    }
    // One event at a time. An instance killed mid-delivery may have sent its last request
    // already when the instance taking over sends the same event again: that overlap is the
    // kill's repeat (counted above), never a second event.
    let distinct = receiver.seen.max_distinct_in_flight.load(Ordering::SeqCst);
    if distinct != 1 {
        verdict.problem(format!("{distinct} different webhook events were in flight at once"));
    }
    let most = receiver.seen.max_in_flight.load(Ordering::SeqCst);
    if most > 1 + kills {
        verdict.problem(format!("{most} webhook deliveries were in flight at once for {kills} kill(s)"));
    }
    let by_id: HashMap<i64, &Value> = feed.iter().map(|e| (e["id"].as_i64().unwrap(), e)).collect();
    for d in &requests {
        let body: Value = serde_json::from_slice(&d.body).unwrap();
        if by_id.get(&d.id()) != Some(&&body) {
            verdict.problem(format!("delivery of {} carried {body}", d.id()));
        }
    }
    (all, all - accepted.len())
}
