//! Prometheus metrics: the recorder, and every metric's name, type, unit and help text (kept
//! here so they stay consistent). `http::operations` serves them. Names carry the `inventory_`
//! prefix and a unit suffix; label values come from fixed sets only. The standard `process_*`
//! metrics (CPU, memory, open files, start time) come from `metrics-process`.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "inventory_http_requests_total";
pub const HTTP_DURATION: &str = "inventory_http_request_duration_seconds";
pub const RESERVATIONS: &str = "inventory_reservations_total";
pub const UNITS: &str = "inventory_stock_units_total";
pub const EXPIRY_SWEEPS: &str = "inventory_expiry_sweeps_total";
pub const EXPIRED: &str = "inventory_reservations_expired_total";
pub const EXPIRY_LAG: &str = "inventory_expiry_lag_seconds";
pub const IDEMPOTENT_REPLAYS: &str = "inventory_idempotent_replays_total";
pub const TX_RETRIES: &str = "inventory_db_transaction_retries_total";
pub const EVENTS_RELAYED: &str = "inventory_events_relayed_total";
pub const EVENT_STREAMS: &str = "inventory_event_streams_open";
pub const BATCH_SIZE: &str = "inventory_reservation_batch_orders";
pub const SETTLE_BATCH_SIZE: &str = "inventory_settle_batch_requests";
pub const COALESCED_READS: &str = "inventory_availability_coalesced_requests";
pub const BATCH_FALLBACKS: &str = "inventory_reservation_batch_fallbacks_total";
pub const POOL_CONNECTIONS: &str = "inventory_db_pool_connections";
pub const POOL_MAX: &str = "inventory_db_pool_max_connections";
pub const BUILD_INFO: &str = "inventory_build_info";
pub const WEBHOOK_DELIVERIES: &str = "inventory_webhook_deliveries_total";
pub const WEBHOOK_FAILING: &str = "inventory_webhook_consecutive_failures";
pub const WEBHOOK_PENDING: &str = "inventory_webhook_pending_events";
pub const WEBHOOK_PENDING_MAX: &str = "inventory_webhook_pending_events_max";
pub const READS: &str = "inventory_reads_total";
pub const REPLICA_LAG: &str = "inventory_replica_lag_seconds";
pub const REPLICA_UP: &str = "inventory_replica_up";

/// The commit this binary was built from (`build.rs`), or `unknown`.
pub const COMMIT: &str = env!("INVENTORY_COMMIT");

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Installs the global recorder once per process, describes every metric, and returns the
/// handle.
pub(crate) fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
        let builder = PrometheusBuilder::new()
            .set_buckets(&buckets)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(SETTLE_BATCH_SIZE.into()), &sizes))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(COALESCED_READS.into()), &sizes))
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        describe();
        handle
    })
}

/// Brings the sampled metrics up to date; called before each scrape.
pub(crate) fn sample() {
    PROCESS.get_or_init(|| {
        let collector = metrics_process::Collector::default();
        collector.describe();
        collector
    });
    if let Some(collector) = PROCESS.get() {
        collector.collect();
    }
}

fn describe() {
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by method, route template and status.");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "Time from a request's arrival to its answer.");
    describe_counter!(
        RESERVATIONS,
        "Reservation requests by outcome: created, replayed, or the problem code (insufficient_stock, …)."
    );
    describe_counter!(UNITS, "Units moved by ledger entry kind (receive, reserve, fulfil, release, expire, …).");
    describe_counter!(EXPIRY_SWEEPS, "Runs of the expiry sweeper.");
    describe_counter!(EXPIRED, "Reservations released because their hold expired.");
    describe_gauge!(
        EXPIRY_LAG,
        Unit::Seconds,
        "How long past its deadline the oldest overdue hold was at the last sweep (the contract allows 5 s)."
    );
    describe_counter!(IDEMPOTENT_REPLAYS, "Requests answered from a stored answer of the same Idempotency-Key.");
    describe_counter!(TX_RETRIES, "Transactions retried after a serialization failure or deadlock, by SQLSTATE.");
    describe_counter!(EVENTS_RELAYED, "Events numbered into the feed by the relay.");
    describe_gauge!(EVENT_STREAMS, "Live event streams (SSE) open.");
    describe_histogram!(BATCH_SIZE, "Orders decided together in one reservation batch transaction.");
    describe_histogram!(SETTLE_BATCH_SIZE, "Fulfils and releases decided together in one batch transaction.");
    describe_histogram!(COALESCED_READS, "Availability requests answered together by one query.");
    describe_counter!(
        BATCH_FALLBACKS,
        "Reservation batches that failed as a whole and were retried one order per transaction."
    );
    describe_gauge!(POOL_CONNECTIONS, "Database pool connections, by state (in_use, idle).");
    describe_gauge!(POOL_MAX, "Most connections the database pool opens (--db-pool-size).");
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Webhook delivery attempts by outcome: delivered (2xx), rejected (another status), unreachable, timeout."
    );
    describe_gauge!(
        WEBHOOK_FAILING,
        "Failed attempts in a row at a subscription's next event, by webhook (0: delivering normally)."
    );
    describe_gauge!(WEBHOOK_PENDING, "Matching events not yet delivered, by webhook (sampled every 5 s).");
    describe_gauge!(WEBHOOK_PENDING_MAX, "The most events any one webhook subscription has pending.");
    describe_counter!(
        READS,
        "Lag-tolerant reads by where they were answered (path: replica, primary) and why (reason: fresh, \
         no_replica, lagging, replica_down, not_standby, replica_error, not_found, as_of)."
    );
    describe_gauge!(
        REPLICA_LAG,
        Unit::Seconds,
        "How far the read replica is behind: time since the newest primary WAL position it has replayed was sampled."
    );
    describe_gauge!(
        REPLICA_UP,
        "1 while the read replica answers as a standby, else 0 (reads then go to the primary)."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the labels name the running version and commit.");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => COMMIT).set(1.0);
}
