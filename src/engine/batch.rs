//! The batching front of reserving.
//!
//! Concurrent reservation requests are gathered for a very short window (at most
//! `batch_max` orders, at most `batch_window_us` after the first) and decided in ONE
//! transaction: claim their idempotency keys, insert the reservation rows, lock every stock row
//! of the batch in (sku, warehouse) order, decide each order in arrival order (each all or
//! nothing, each with its own answer), write levels, ledger, allocations and stored answers
//! set-based, commit, and only then answer every waiter. A hot SKU thus costs one row update
//! per batch instead of a queue of lock waits.
//!
//! When the batch transaction itself fails (a lock timeout, a broken connection, a bug), no
//! order is answered with that failure: each one runs again on its own, in its own request's
//! task, exactly as without batching.

use std::time::Duration;

use sqlx::PgConnection;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use super::error::{Error, Result};
use super::idempotency::{self, Keyed, Outcome, Render};
use super::reservations::{self, NewReservation};
use super::tx::transact_with;
use crate::config::ServerArgs;
use crate::store::db::Db;

/// The lock wait of a batch transaction: 250 ms, or the configured one when shorter (which
/// applies to orders running alone).
const BATCH_LOCK_TIMEOUT: Duration = Duration::from_millis(250);

/// A batch is split only when each part gets at least this many orders.
const MIN_SPLIT: usize = 4;

/// Orders waiting for a batch, at most.
const QUEUE: usize = 4096;

/// A reservation request waiting for its batch.
#[derive(Debug)]
struct Job {
    req: NewReservation,
    key: Option<Keyed>,
    /// `None`: the batch failed as a whole; run this order on its own.
    reply: oneshot::Sender<Option<Result<Outcome>>>,
    /// The span of the request's `reserve`, for the batch's span; none when no span is exported.
    origin: tracing::Span,
}

/// The handle requests submit to; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Batcher {
    queue: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the gathering task; it ends when every handle is gone, after finishing its work.
    pub(crate) fn spawn(db: Db, config: &ServerArgs, render: Render) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let gather = Gather {
            rx,
            max: config.batch_max.max(1),
            window: Duration::from_micros(config.batch_window_us),
            slots: std::sync::Arc::new(Semaphore::new(config.batch_concurrency.max(1))),
            parallelism: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(config.batch_concurrency.max(1)),
            db,
            render,
        };
        tokio::spawn(gather.run());
        Self { queue }
    }

    /// Decides one order within a batch. `None` when it must run on its own instead.
    pub(crate) async fn submit(&self, req: NewReservation, key: Option<Keyed>) -> Option<Result<Outcome>> {
        let (reply, answer) = oneshot::channel();
        let origin = if crate::telemetry::exporting() { tracing::Span::current() } else { tracing::Span::none() };
        self.queue.send(Job { req, key, reply, origin }).await.ok()?;
        answer.await.ok().flatten()
    }
}

struct Gather {
    rx: mpsc::Receiver<Job>,
    max: usize,
    window: Duration,
    slots: std::sync::Arc<Semaphore>,
    /// Most batches one gathering is split into (the machine's cores).
    parallelism: usize,
    db: Db,
    render: Render,
}

impl Gather {
    async fn run(mut self) {
        // An order that could not join the previous batch (same order id or key) starts the next.
        let mut carried: Option<Job> = None;
        loop {
            let first = match carried.take() {
                Some(job) => job,
                None => match self.rx.recv().await {
                    Some(job) => job,
                    None => return,
                },
            };
            // Waiting for a free slot lets the queue fill: the busier the database, the
            // bigger the batches.
            let Ok(slot) = self.slots.clone().acquire_owned().await else { return };
            let deadline = tokio::time::Instant::now() + self.window;
            let mut batch = vec![first];
            while batch.len() < self.max {
                let next = match self.rx.try_recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        tokio::time::timeout_at(deadline, self.rx.recv()).await.ok().flatten()
                    }
                };
                let Some(job) = next else { break };
                if batch.iter().any(|b| clashes(b, &job)) {
                    carried = Some(job);
                    break;
                }
                batch.push(job);
            }
            // One batch runs in one database backend, on one core. When slots are free, orders
            // on different SKUs are split into independent batches that run side by side;
            // orders sharing a SKU stay together (they would only queue on its row).
            let mut slots = vec![slot];
            while slots.len() < self.parallelism && batch.len() >= MIN_SPLIT * (slots.len() + 1) {
                match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => slots.push(slot),
                    Err(_) => break,
                }
            }
            for (part, slot) in split(batch, slots.len()).into_iter().zip(slots) {
                metrics::histogram!(crate::metrics::BATCH_SIZE).record(part.len() as f64);
                let (db, render) = (self.db.clone(), self.render);
                let span = batch_span(&part);
                tokio::spawn(
                    async move {
                        execute(&db, part, render).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
        }
    }
}

/// Splits a batch into at most `parts` batches that share no SKU: orders linked through any
/// common SKU (directly or through other orders) stay in one part, in arrival order, so an
/// earlier order is always decided before a later one that wants the same stock. Groups are
/// dealt largest first to the least loaded part; empty parts are dropped.
fn split<T: HasSkus>(batch: Vec<T>, parts: usize) -> Vec<Vec<T>> {
    if parts <= 1 {
        return vec![batch];
    }
    let groups = connected_groups(&batch);
    let mut sizes: Vec<(usize, usize)> = Vec::new(); // (size, group)
    for &g in &groups {
        match sizes.iter_mut().find(|(_, group)| *group == g) {
            Some((size, _)) => *size += 1,
            None => sizes.push((1, g)),
        }
    }
    sizes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut load = vec![0usize; parts];
    let mut part_of_group = std::collections::HashMap::new();
    for (size, group) in sizes {
        let least = (0..parts).min_by_key(|&p| load[p]).unwrap_or(0);
        load[least] += size;
        part_of_group.insert(group, least);
    }
    let mut out: Vec<Vec<T>> = (0..parts).map(|_| Vec::new()).collect();
    for (job, group) in batch.into_iter().zip(groups) {
        out[part_of_group[&group]].push(job);
    }
    out.retain(|part| !part.is_empty());
    out
}

/// What [`split`] needs of an order: its SKUs.
trait HasSkus {
    fn skus(&self) -> impl Iterator<Item = &str>;
}

impl HasSkus for Job {
    fn skus(&self) -> impl Iterator<Item = &str> {
        self.req.lines.iter().map(|l| l.sku.as_str())
    }
}

/// For each order, a group number: orders share a group exactly when they are linked through
/// common SKUs (union-find over the orders, joined by SKU).
fn connected_groups<T: HasSkus>(orders: &[T]) -> Vec<usize> {
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut parent: Vec<usize> = (0..orders.len()).collect();
    let mut first_with: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, order) in orders.iter().enumerate() {
        for sku in order.skus() {
            match first_with.get(sku) {
                Some(&j) => {
                    let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                    parent[a.max(b)] = a.min(b);
                }
                None => {
                    first_with.insert(sku, i);
                }
            }
        }
    }
    (0..orders.len()).map(|i| root(&mut parent, i)).collect()
}

/// The span of a batch, in the trace of its first order and linked to the others' (one
/// transaction decides them all, so it has one parent).
fn batch_span(batch: &[Job]) -> tracing::Span {
    let span =
        tracing::debug_span!(parent: batch.first().and_then(|job| job.origin.id()), "batch", orders = batch.len());
    if !span.is_disabled() {
        for job in batch.iter().skip(1) {
            span.follows_from(&job.origin);
        }
    }
    span
}

/// Two orders that cannot share a transaction: the same order id or the same key.
fn clashes(a: &Job, b: &Job) -> bool {
    a.req.order_id == b.req.order_id || matches!((&a.key, &b.key), (Some(x), Some(y)) if x.key == y.key)
}

async fn execute(db: &Db, batch: Vec<Job>, render: Render) {
    let (work, replies): (Vec<(NewReservation, Option<Keyed>)>, Vec<_>) =
        batch.into_iter().map(|j| ((j.req, j.key), j.reply)).unzip();
    let ctx = (work, render);
    // A batch waits for rows other batches hold for a few milliseconds at most. Waiting longer
    // means a stuck row: give up early, so the batch's other rows are not held hostage, and let
    // each order run alone under the normal lock timeout.
    let cap = Some(BATCH_LOCK_TIMEOUT);
    match transact_with(db, cap, &ctx, |conn, (work, render)| Box::pin(decide(conn, work, *render))).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Some(Ok(outcome)));
            }
        }
        // The batch may have committed: every order gets that answer (running them again
        // could apply them twice; a keyed retry replays whatever was stored).
        Err(Error::OutcomeUnknown(cause)) => {
            tracing::warn!(%cause, orders = ctx.0.len(), "a reservation batch's commit outcome is unknown");
            for reply in replies {
                let _ = reply.send(Some(Err(Error::OutcomeUnknown(cause.clone()))));
            }
        }
        // Nobody gets a connection: running each order alone would only fail again, slower.
        Err(err) if err.is_database_down() => {
            tracing::warn!(error = %err, orders = ctx.0.len(), "a reservation batch found the database down");
            for reply in replies {
                let _ = reply.send(Some(Err(Error::Unavailable(err.to_string()))));
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, orders = ctx.0.len(), "a reservation batch failed; each order runs on its own");
            metrics::counter!(crate::metrics::BATCH_FALLBACKS).increment(1);
            for reply in replies {
                let _ = reply.send(None);
            }
        }
    }
}

/// The batch transaction body.
async fn decide(
    conn: &mut PgConnection,
    work: &[(NewReservation, Option<Keyed>)],
    render: Render,
) -> Result<Vec<Outcome>> {
    let keyed: Vec<&Keyed> = work.iter().filter_map(|(_, k)| k.as_ref()).collect();
    let mut claims = if keyed.is_empty() { Vec::new() } else { idempotency::claim_many(conn, &keyed).await? };
    claims.reverse();
    // Per order: already decided by its key (replay, reuse, in progress), or to run now.
    let mut decided: Vec<Option<Outcome>> =
        work.iter().map(|(_, key)| if key.is_some() { claims.pop().flatten() } else { None }).collect();
    let runs: Vec<bool> = decided.iter().map(Option::is_none).collect();
    let live: Vec<&NewReservation> = work.iter().zip(&runs).filter(|(_, run)| **run).map(|((req, _), _)| req).collect();
    let mut results = reservations::reserve_many(conn, &live).await?.into_iter();
    for slot in decided.iter_mut().filter(|d| d.is_none()) {
        let result = results.next().ok_or_else(|| Error::Bug("an order got no answer".into()))?;
        *slot = Some(Outcome::executed(result)?);
    }
    let outcomes: Vec<Outcome> = decided.into_iter().flatten().collect();
    let ran: Vec<(&Keyed, &Outcome)> = work
        .iter()
        .zip(&outcomes)
        .zip(runs)
        .filter_map(|(((_, key), outcome), run)| key.as_ref().filter(|_| run).map(|k| (k, outcome)))
        .collect();
    idempotency::store_many(conn, &ran, render).await?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Order(usize, Vec<&'static str>);

    impl HasSkus for Order {
        fn skus(&self) -> impl Iterator<Item = &str> {
            self.1.iter().copied()
        }
    }

    #[test]
    fn orders_linked_by_any_sku_stay_in_one_part_in_arrival_order() {
        // [X, Y] comes first; [Y] later must not be decided before it in another part.
        let batch = vec![
            Order(0, vec!["X", "Y"]),
            Order(1, vec!["A"]),
            Order(2, vec!["Y"]),
            Order(3, vec!["B"]),
            Order(4, vec!["C", "X"]),
            Order(5, vec!["A", "D"]),
            Order(6, vec!["E"]),
            Order(7, vec!["D"]),
        ];
        for parts in 1..=4 {
            let split = split(batch.clone(), parts);
            assert_eq!(split.iter().map(Vec::len).sum::<usize>(), batch.len(), "nothing lost");
            for part in &split {
                assert!(part.windows(2).all(|w| w[0].0 < w[1].0), "arrival order kept: {part:?}");
            }
            let part_of = |n: usize| split.iter().position(|p| p.iter().any(|o| o.0 == n)).unwrap();
            for a in &batch {
                for b in &batch {
                    if a.1.iter().any(|s| b.1.contains(s)) {
                        assert_eq!(part_of(a.0), part_of(b.0), "{a:?} and {b:?} share a SKU ({parts} parts)");
                    }
                }
            }
            // Transitively linked: 0-2 via Y, 0-4 via X; 1-5 via A, 5-7 via D.
            assert_eq!(part_of(2), part_of(4));
            assert_eq!(part_of(1), part_of(7));
        }
        assert!(split(batch, 4).len() > 1, "unrelated groups still run side by side");
    }
}
