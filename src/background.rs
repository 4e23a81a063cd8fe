//! Background tasks: the expiry sweep and the idempotency-key purge. Both stop when the
//! shutdown channel flips, and both are safe to run in several service instances at once.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ServerArgs;
use crate::db::transact;
use crate::engine::reservations::expire_due;
use crate::http::idempotency::purge_expired;
use crate::store::events;

/// Starts every background task; they end when `stop` becomes `true`.
pub fn spawn(pool: PgPool, config: &ServerArgs, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let interval = Duration::from_millis(config.expiry_interval_ms.max(10));
    let batch = config.expiry_batch_size.max(1);
    let retention = config.idempotency_retention_secs.max(0);
    let event_retention = config.event_retention_secs.max(0);
    vec![
        tokio::spawn(every(interval, stop.clone(), {
            let pool = pool.clone();
            move || {
                let pool = pool.clone();
                async move { sweep_expired(&pool, batch).await }
            }
        })),
        tokio::spawn(every(Duration::from_millis(100), stop.clone(), {
            let pool = pool.clone();
            move || {
                let pool = pool.clone();
                async move {
                    match events::relay(&pool).await {
                        Ok(n) => metrics::counter!(crate::metrics::EVENTS_RELAYED).increment(n),
                        Err(err) => tracing::warn!(error = %err, "event relay failed; will retry"),
                    }
                }
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

/// Expires overdue reservations batch by batch until none is left.
pub async fn sweep_expired(pool: &PgPool, batch: i64) {
    metrics::counter!(crate::metrics::EXPIRY_SWEEPS).increment(1);
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
    loop {
        match transact(pool, &batch, |tx, batch| Box::pin(expire_due(tx, *batch))).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(expired = n, "reservations expired");
                    metrics::counter!(crate::metrics::EXPIRED).increment(n as u64);
                }
                if (n as i64) < batch {
                    return;
                }
            }
            // One stuck reservation must not hold back the whole batch: go on one at a time.
            Err(err) if batch > 1 => {
                tracing::warn!(error = %err, "expiry batch failed; expiring one at a time");
                for _ in 0..batch {
                    match transact(pool, &1, |tx, one| Box::pin(expire_due(tx, *one))).await {
                        Ok(1) => {}
                        Ok(_) => return,
                        Err(err) => {
                            tracing::warn!(error = %err, "expiry sweep failed; will retry");
                            return;
                        }
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "expiry sweep failed; will retry");
                return;
            }
        }
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
