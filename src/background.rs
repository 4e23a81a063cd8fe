//! Background tasks on a timer: the expiry sweep (`engine::expiry`) and the purges of
//! idempotency keys and old events (the event relay runs in `engine::feed`). They stop when the
//! shutdown channel flips, and are safe to run in several service instances at once.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ServerArgs;
use crate::engine::expiry::Sweeper;
use crate::store::db::Db;
use crate::store::{events, idempotency};

/// Starts every background task; they end when `stop` becomes `true`.
pub(crate) fn spawn(pool: Db, config: &ServerArgs, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
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
                // In a transaction, as every statement behind a transaction pooler must be.
                let purged = async {
                    let mut tx = pool.begin().await?;
                    let keys = idempotency::purge(&mut tx, retention, 10_000).await;
                    tx.commit().await?;
                    keys
                };
                match purged.await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(purged = n, "idempotency keys purged"),
                    Err(err) => tracing::warn!(error = %err, "idempotency purge failed"),
                }
                let purged = async {
                    let mut tx = pool.begin().await?;
                    let events = events::purge(&mut tx, event_retention, 10_000).await;
                    tx.commit().await?;
                    events
                };
                match purged.await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(purged = n, "events purged"),
                    Err(err) => tracing::warn!(error = %err, "event purge failed"),
                }
            }
        })),
    ]
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
