//! Background tasks: the expiry sweep and the purges of idempotency keys and old events (the
//! event relay runs in `engine::feed`). Both stop when the
//! shutdown channel flips, and both are safe to run in several service instances at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ServerArgs;
use crate::db::transact;
use crate::engine::reservations::expire_due;
use crate::error::ApiError;
use crate::http::idempotency::purge_expired;
use crate::store::events;
use crate::store::reservations::{SweepSkips, held_levels, overdue_ids};
use uuid::Uuid;

/// Starts every background task; they end when `stop` becomes `true`.
pub fn spawn(pool: PgPool, config: &ServerArgs, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let interval = Duration::from_millis(config.expiry_interval_ms.max(10));
    let batch = config.expiry_batch_size.max(1);
    let retention = config.idempotency_retention_secs.max(0);
    let event_retention = config.event_retention_secs.max(0);
    vec![
        tokio::spawn(every(interval, stop.clone(), {
            let pool = pool.clone();
            let sweeper = std::sync::Arc::new(tokio::sync::Mutex::new(Sweeper::new(batch)));
            move || {
                let (pool, sweeper) = (pool.clone(), sweeper.clone());
                async move { sweeper.lock().await.sweep(&pool).await }
            }
        })),
        tokio::spawn(every(Duration::from_secs(60), stop, move || {
            let pool = pool.clone();
            async move {
                match purge_expired(&pool, retention, 10_000).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(purged = n, "idempotency keys purged"),
                    Err(err) => tracing::warn!(error = %err, "idempotency purge failed"),
                }
                match events::purge(&pool, event_retention, 10_000).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(purged = n, "events purged"),
                    Err(err) => tracing::warn!(error = %err, "event purge failed"),
                }
            }
        })),
    ]
}

/// How long the sweep leaves alone a level it found locked by someone else.
const STUCK_LEVEL_PAUSE: Duration = Duration::from_secs(2);
/// How long the sweep leaves alone a reservation whose expiry failed for another reason.
const FAILED_PAUSE: Duration = Duration::from_secs(10);
/// Most transactions one sweep runs (a bound, should something fail in a loop).
const MAX_ROUNDS: usize = 100;

/// The expiry sweep and what it remembers between ticks: levels found stuck and reservations
/// whose expiry failed, each left out for a while, so that one stuck row or one broken
/// reservation delays only the reservations that touch it.
#[derive(Debug)]
pub struct Sweeper {
    batch: i64,
    stuck_levels: HashMap<(String, String), Instant>,
    failed: HashMap<Uuid, Instant>,
}

impl Sweeper {
    pub fn new(batch: i64) -> Self {
        Self { batch: batch.max(1), stuck_levels: HashMap::new(), failed: HashMap::new() }
    }

    fn skips(&self) -> SweepSkips {
        SweepSkips {
            ids: self.failed.keys().copied().collect(),
            levels: self.stuck_levels.keys().cloned().collect(),
            only: None,
        }
    }

    /// Expires overdue reservations batch by batch until none is left (or only skipped ones).
    pub async fn sweep(&mut self, pool: &PgPool) {
        metrics::counter!(crate::metrics::EXPIRY_SWEEPS).increment(1);
        let now = Instant::now();
        self.stuck_levels.retain(|_, since| now.duration_since(*since) < STUCK_LEVEL_PAUSE);
        self.failed.retain(|_, since| now.duration_since(*since) < FAILED_PAUSE);
        // How far behind the sweep is: the oldest deadline still unhandled (0 when none).
        let lag: Result<f64, sqlx::Error> = sqlx::query_scalar(
            "SELECT coalesce(extract(epoch FROM now() - min(expires_at))::float8, 0)
               FROM reservations WHERE status = 'active' AND expires_at <= now()",
        )
        .fetch_one(pool)
        .await;
        if let Ok(lag) = lag {
            metrics::gauge!(crate::metrics::EXPIRY_LAG).set(lag);
        }
        let mut rounds = 0;
        while rounds < MAX_ROUNDS {
            rounds += 1;
            let ctx = (self.batch, self.skips());
            match transact(pool, &ctx, |tx, (batch, skips)| Box::pin(expire_due(tx, *batch, skips))).await {
                Ok(n) => {
                    record(n);
                    if (n as i64) < self.batch {
                        return;
                    }
                }
                Err(err) if err.is_database_down() => {
                    tracing::warn!(error = %err, "expiry sweep found the database down; will retry");
                    return;
                }
                // Something in the batch is stuck or broken: go one at a time to find it, and
                // leave it out while the rest expire.
                Err(err) => {
                    tracing::warn!(error = %err, "expiry batch failed; expiring one at a time");
                    match self.one_at_a_time(pool, &mut rounds).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(err) => {
                            tracing::warn!(error = %err, "expiry sweep failed; will retry");
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Expires the next overdue reservations one per transaction, remembering what fails.
    /// `false` when there was nothing left to try.
    async fn one_at_a_time(&mut self, pool: &PgPool, rounds: &mut usize) -> Result<bool, ApiError> {
        let ids = {
            let mut conn = pool.acquire().await?;
            overdue_ids(&mut conn, self.batch, &self.skips()).await?
        };
        if ids.is_empty() {
            return Ok(false);
        }
        for id in ids {
            *rounds += 1;
            let levels = {
                let mut conn = pool.acquire().await?;
                held_levels(&mut conn, id).await?
            };
            // A level found stuck a moment ago skips this one too.
            let mut skips = self.skips();
            skips.only = Some(id);
            let ctx = skips;
            match transact(pool, &ctx, |tx, skips| Box::pin(expire_due(tx, 1, skips))).await {
                Ok(n) => record(n),
                Err(err) if err.is_database_down() => return Err(err),
                Err(err) if err.is_busy() => {
                    tracing::warn!(reservation = %id, ?levels, "a level of this reservation is locked; its expiry waits");
                    let now = Instant::now();
                    self.stuck_levels.extend(levels.into_iter().map(|l| (l, now)));
                }
                Err(err) => {
                    tracing::error!(reservation = %id, error = %err, "cannot expire this reservation; will retry later");
                    self.failed.insert(id, Instant::now());
                }
            }
        }
        Ok(true)
    }
}

fn record(n: usize) {
    if n > 0 {
        tracing::info!(expired = n, "reservations expired");
        metrics::counter!(crate::metrics::EXPIRED).increment(n as u64);
    }
}

async fn every<F, Fut>(period: Duration, mut stop: watch::Receiver<bool>, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => work().await,
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
