//! The expiry sweep: releases what overdue reservations hold, batch by batch, and keeps one
//! stuck row or one broken reservation from stalling everyone else's expiry.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::store::db::{Db, WriterSetup};
use uuid::Uuid;

use super::error::Result;
use super::reservations::{SWEEP_LOCK_TIMEOUT, expire_due};
use super::tx::transact_with;
use crate::store::reservations::{SweepSkips, expiry_lag, held_levels, overdue_ids};

/// The sweep's transactions wait at most [`SWEEP_LOCK_TIMEOUT`] for a row.
const SWEEP: WriterSetup = WriterSetup { lock_cap: Some(SWEEP_LOCK_TIMEOUT), generic_plans: false };

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
pub(crate) struct Sweeper {
    batch: i64,
    stuck_levels: HashMap<(String, String), Instant>,
    failed: HashMap<Uuid, Instant>,
}

impl Sweeper {
    pub(crate) fn new(batch: i64) -> Self {
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
    pub(crate) async fn sweep(&mut self, pool: &Db) {
        metrics::counter!(crate::metrics::EXPIRY_SWEEPS).increment(1);
        let now = Instant::now();
        self.stuck_levels.retain(|_, since| now.duration_since(*since) < STUCK_LEVEL_PAUSE);
        self.failed.retain(|_, since| now.duration_since(*since) < FAILED_PAUSE);
        if let Ok(mut conn) = pool.acquire().await
            && let Ok(lag) = expiry_lag(&mut conn).await
        {
            metrics::gauge!(crate::metrics::EXPIRY_LAG).set(lag);
        }
        let mut rounds = 0;
        while rounds < MAX_ROUNDS {
            rounds += 1;
            let ctx = (self.batch, self.skips());
            match transact_with(pool, SWEEP, &ctx, |tx, (batch, skips)| Box::pin(expire_due(tx, *batch, skips))).await {
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
    async fn one_at_a_time(&mut self, pool: &Db, rounds: &mut usize) -> Result<bool> {
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
            match transact_with(pool, SWEEP, &ctx, |tx, skips| Box::pin(expire_due(tx, 1, skips))).await {
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
