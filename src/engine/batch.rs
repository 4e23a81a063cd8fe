//! The batching front of reserving and settling.
//!
//! Concurrent reservation requests are gathered for a very short window (at most
//! `batch_max` orders, at most `batch_window_us` after the first) and decided in ONE
//! transaction: claim their idempotency keys, insert the reservation rows, lock every stock row
//! of the batch in (sku, warehouse) order, decide each order in arrival order (each all or
//! nothing, each with its own answer), write levels, ledger, allocations and stored answers
//! set-based, commit, and only then answer every waiter. A hot SKU thus costs one row update
//! per batch instead of a queue of lock waits. Fulfils and releases are batched the same way,
//! by a batcher of their own ([`Work`] is what the two have in common).
//!
//! When the batch transaction itself fails (a lock timeout, a broken connection, a bug), no
//! order is answered with that failure: each one runs again on its own, in its own request's
//! task, exactly as without batching.

use std::time::Duration;

use sqlx::PgConnection;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use super::error::{Error, Refusal, Result};
use super::idempotency::{self, Keyed, Outcome, Render};
use super::reservations::{self, NewReservation, SettleRequest};
use super::tx::{TxFuture, transact_with};
use crate::config::ServerArgs;
use crate::store::db::{Db, WriterSetup};
use crate::store::reservations::Reservation;

/// What can be decided in a batch: many requests in one transaction, each with its own answer.
pub(crate) trait Work: std::fmt::Debug + Send + Sync + 'static {
    /// The histogram of how many requests a batch decided.
    const SIZES: &'static str;
    /// What ties two requests to one part of a split batch: the rows both may lock (hashed).
    fn links(&self) -> Vec<u64>;
    /// Whether two requests cannot share a transaction.
    fn clashes(&self, other: &Self) -> bool;
    /// Decides every request, in order, in the caller's transaction; a refusal refuses only its
    /// own request, an error fails the batch.
    fn run_many<'c>(
        conn: &'c mut PgConnection,
        work: &'c [&'c Self],
    ) -> TxFuture<'c, Vec<Result<Reservation, Refusal>>>;
}

fn hash_of(value: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

/// Orders sharing a SKU stay together (they would only queue on its rows); two orders with one
/// order id cannot share a transaction (the second is a duplicate of the first).
impl Work for NewReservation {
    const SIZES: &'static str = crate::metrics::BATCH_SIZE;

    fn links(&self) -> Vec<u64> {
        self.lines.iter().map(|l| hash_of(&l.sku)).collect()
    }

    fn clashes(&self, other: &Self) -> bool {
        self.order_id == other.order_id
    }

    fn run_many<'c>(
        conn: &'c mut PgConnection,
        work: &'c [&'c Self],
    ) -> TxFuture<'c, Vec<Result<Reservation, Refusal>>> {
        Box::pin(reservations::reserve_many(conn, work))
    }
}

/// Settles of different reservations may run side by side (the levels they share are locked in
/// order); two settles of one reservation cannot share a transaction.
impl Work for SettleRequest {
    const SIZES: &'static str = crate::metrics::SETTLE_BATCH_SIZE;

    fn links(&self) -> Vec<u64> {
        vec![hash_of(self.id)]
    }

    fn clashes(&self, other: &Self) -> bool {
        self.id == other.id
    }

    fn run_many<'c>(
        conn: &'c mut PgConnection,
        work: &'c [&'c Self],
    ) -> TxFuture<'c, Vec<Result<Reservation, Refusal>>> {
        Box::pin(reservations::settle_many(conn, work))
    }
}

/// The lock wait of a batch transaction: 250 ms, or the configured one when shorter (which
/// applies to orders running alone).
const BATCH_LOCK_TIMEOUT: Duration = Duration::from_millis(250);

/// A batch is split only when each part gets at least this many orders.
const MIN_SPLIT: usize = 4;

/// Orders waiting for a batch, at most.
const QUEUE: usize = 4096;

/// A request waiting for its batch.
#[derive(Debug)]
struct Job<W> {
    req: W,
    key: Option<Keyed>,
    /// `None`: the batch failed as a whole; run this order on its own.
    reply: oneshot::Sender<Option<Result<Outcome>>>,
    /// The span of the request's `reserve`, for the batch's span; none when no span is exported.
    origin: tracing::Span,
}

/// The handle requests submit to; cheap to clone.
#[derive(Debug)]
pub(crate) struct Batcher<W> {
    queue: mpsc::Sender<Job<W>>,
}

impl<W> Clone for Batcher<W> {
    fn clone(&self) -> Self {
        Self { queue: self.queue.clone() }
    }
}

impl<W: Work> Batcher<W> {
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

    /// Decides one request within a batch. `None` when it must run on its own instead.
    pub(crate) async fn submit(&self, req: W, key: Option<Keyed>) -> Option<Result<Outcome>> {
        let (reply, answer) = oneshot::channel();
        let origin = if crate::telemetry::exporting() { tracing::Span::current() } else { tracing::Span::none() };
        self.queue.send(Job { req, key, reply, origin }).await.ok()?;
        answer.await.ok().flatten()
    }
}

struct Gather<W> {
    rx: mpsc::Receiver<Job<W>>,
    max: usize,
    window: Duration,
    slots: std::sync::Arc<Semaphore>,
    /// Most batches one gathering is split into (the machine's cores).
    parallelism: usize,
    db: Db,
    render: Render,
}

impl<W: Work> Gather<W> {
    async fn run(mut self) {
        // A request that could not join the previous batch (a clash) starts the next.
        let mut carried: Option<Job<W>> = None;
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
                metrics::histogram!(W::SIZES).record(part.len() as f64);
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
fn split<T: Linked>(batch: Vec<T>, parts: usize) -> Vec<Vec<T>> {
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

/// What [`split`] needs of a request: what links it to others.
trait Linked {
    fn links(&self) -> Vec<u64>;
}

impl<W: Work> Linked for Job<W> {
    fn links(&self) -> Vec<u64> {
        self.req.links()
    }
}

/// For each request, a group number: requests share a group exactly when they are linked
/// (union-find over the requests, joined by link).
fn connected_groups<T: Linked>(orders: &[T]) -> Vec<usize> {
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut parent: Vec<usize> = (0..orders.len()).collect();
    let mut first_with: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for (i, order) in orders.iter().enumerate() {
        for link in order.links() {
            match first_with.get(&link) {
                Some(&j) => {
                    let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                    parent[a.max(b)] = a.min(b);
                }
                None => {
                    first_with.insert(link, i);
                }
            }
        }
    }
    (0..orders.len()).map(|i| root(&mut parent, i)).collect()
}

/// The span of a batch, in the trace of its first order and linked to the others' (one
/// transaction decides them all, so it has one parent).
fn batch_span<W>(batch: &[Job<W>]) -> tracing::Span {
    let span =
        tracing::debug_span!(parent: batch.first().and_then(|job| job.origin.id()), "batch", orders = batch.len());
    if !span.is_disabled() {
        for job in batch.iter().skip(1) {
            span.follows_from(&job.origin);
        }
    }
    span
}

/// Two requests that cannot share a transaction: clashing work or the same key.
fn clashes<W: Work>(a: &Job<W>, b: &Job<W>) -> bool {
    a.req.clashes(&b.req) || matches!((&a.key, &b.key), (Some(x), Some(y)) if x.key == y.key)
}

async fn execute<W: Work>(db: &Db, batch: Vec<Job<W>>, render: Render) {
    let (work, replies): (Vec<(W, Option<Keyed>)>, Vec<_>) =
        batch.into_iter().map(|j| ((j.req, j.key), j.reply)).unzip();
    let ctx = (work, render);
    // A batch waits for rows other batches hold for a few milliseconds at most. Waiting longer
    // means a stuck row: give up early, so the batch's other rows are not held hostage, and let
    // each order run alone under the normal lock timeout.
    let setup = WriterSetup { lock_cap: Some(BATCH_LOCK_TIMEOUT), generic_plans: true };
    match transact_with(db, setup, &ctx, |conn, (work, render)| Box::pin(decide(conn, work, *render))).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Some(Ok(outcome)));
            }
        }
        // The batch may have committed: every order gets that answer (running them again
        // could apply them twice; a keyed retry replays whatever was stored).
        Err(Error::OutcomeUnknown(cause)) => {
            tracing::warn!(%cause, requests = ctx.0.len(), "a batch's commit outcome is unknown");
            for reply in replies {
                let _ = reply.send(Some(Err(Error::OutcomeUnknown(cause.clone()))));
            }
        }
        // Nobody gets a connection: running each order alone would only fail again, slower.
        Err(err) if err.is_database_down() => {
            tracing::warn!(error = %err, requests = ctx.0.len(), "a batch found the database down");
            for reply in replies {
                let _ = reply.send(Some(Err(Error::Unavailable(err.to_string()))));
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, requests = ctx.0.len(), "a batch failed; each request runs on its own");
            metrics::counter!(crate::metrics::BATCH_FALLBACKS).increment(1);
            for reply in replies {
                let _ = reply.send(None);
            }
        }
    }
}

/// The batch transaction body.
async fn decide<W: Work>(conn: &mut PgConnection, work: &[(W, Option<Keyed>)], render: Render) -> Result<Vec<Outcome>> {
    let keyed: Vec<&Keyed> = work.iter().filter_map(|(_, k)| k.as_ref()).collect();
    let mut claims = if keyed.is_empty() { Vec::new() } else { idempotency::claim_many(conn, &keyed).await? };
    claims.reverse();
    // Per order: already decided by its key (replay, reuse, in progress), or to run now.
    let mut decided: Vec<Option<Outcome>> =
        work.iter().map(|(_, key)| if key.is_some() { claims.pop().flatten() } else { None }).collect();
    let runs: Vec<bool> = decided.iter().map(Option::is_none).collect();
    let live: Vec<&W> = work.iter().zip(&runs).filter(|(_, run)| **run).map(|((req, _), _)| req).collect();
    let mut results = W::run_many(conn, &live).await?.into_iter();
    for slot in decided.iter_mut().filter(|d| d.is_none()) {
        let result = results.next().ok_or_else(|| Error::Bug("a request got no answer".into()))?;
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

    impl Linked for Order {
        fn links(&self) -> Vec<u64> {
            self.1.iter().map(hash_of).collect()
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
