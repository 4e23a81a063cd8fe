//! What every handler can reach.

use std::sync::Arc;

use crate::store::db::Db;

use super::error::ApiError;
use crate::config::ServerArgs;
use crate::engine::Engine;

/// What every handler can reach: cloned for every request (by each layer and extractor that
/// takes it), so one shared allocation rather than a dozen reference counts.
#[derive(Debug, Clone)]
pub(crate) struct AppState(Arc<Shared>);

impl AppState {
    pub(crate) fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
#[derive(Debug)]
pub(crate) struct Shared {
    /// The primary: every write, and the reads that must see their own writes.
    pub db: Db,
    /// The reads that tolerate a bounded lag: on the read replica while it is fresh.
    pub reads: crate::store::replica::Reads,
    pub config: Arc<ServerArgs>,
    /// Flips to `true` when the server starts draining; long-lived streams end on it.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Set when the shutdown signal arrives: `/health/ready` answers 503 from then on, while
    /// requests are still served for the drain delay.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// API keys; empty means no authentication (loopback only, see startup).
    pub keys: Arc<crate::auth::Keys>,
    /// Every operation that changes something.
    pub engine: Engine,
    /// Availability reads, coalesced.
    pub availability: crate::engine::availability::Coalescer,
    /// The event relay and the live streams' shared memory of recent events.
    pub feed: crate::engine::feed::Feed,
}

/// A page size from a query: default, at least 1, at most the configured maximum.
pub(crate) fn page_limit(requested: Option<i64>, state: &AppState) -> Result<i64, ApiError> {
    match requested {
        None => Ok(100.min(state.config.max_page_size)),
        Some(n) if (1..=state.config.max_page_size).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::field("limit", format!("must be between 1 and {}", state.config.max_page_size))),
    }
}
