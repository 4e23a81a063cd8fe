//! Prometheus metrics: the recorder, and the names used across the service (kept here so they
//! stay consistent). `http::operations` serves them.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub(crate) const HTTP_REQUESTS: &str = "http_requests_total";
pub(crate) const HTTP_DURATION: &str = "http_request_duration_seconds";
pub(crate) const RESERVATIONS: &str = "reservations_total";
pub(crate) const UNITS: &str = "stock_units_total";
pub(crate) const EXPIRY_SWEEPS: &str = "expiry_sweeps_total";
pub(crate) const EXPIRED: &str = "reservations_expired_total";
pub(crate) const EXPIRY_LAG: &str = "expiry_lag_seconds";
pub(crate) const IDEMPOTENT_REPLAYS: &str = "idempotent_replays_total";
pub(crate) const TX_RETRIES: &str = "db_transaction_retries_total";
pub(crate) const EVENTS_RELAYED: &str = "events_relayed_total";
pub(crate) const EVENT_STREAMS: &str = "event_streams_open";
pub(crate) const BATCH_SIZE: &str = "reservation_batch_size";
pub(crate) const BATCH_FALLBACKS: &str = "reservation_batch_fallbacks_total";
pub(crate) const POOL_SIZE: &str = "db_pool_connections";
pub(crate) const POOL_IDLE: &str = "db_pool_idle_connections";
pub(crate) const POOL_MAX: &str = "db_pool_max_connections";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder once per process and returns its handle.
pub(crate) fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
        let builder = PrometheusBuilder::new()
            .set_buckets(&buckets)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes))
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        handle
    })
}
