//! Coalesced availability reads: concurrent `GET /v1/availability` requests (without a
//! channel) are answered by one query for all their SKUs.
//!
//! A request joins the next query to *start*, never one already running, so every answer comes
//! from a statement that began after the request arrived: it sees every change committed
//! before the request, exactly as a direct read would. At most
//! `--coalesced-read-concurrency` queries run at once; requests that arrive meanwhile queue,
//! and the next free slot takes all of them (up to [`MAX_SKUS`] SKUs) into one query. When a
//! slot is free, a request goes at once: an idle service adds no wait. A query that fails
//! answers nobody with its error: each of its requests then reads on its own, as without
//! coalescing.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::store::replica::Reads;
use crate::store::stock::{self, SkuAvailability};

/// Most SKUs one coalesced query asks for (a single request may ask for as many on its own).
const MAX_SKUS: usize = 1_000;

/// Requests waiting for a query, at most; more wait for room in the queue.
const QUEUE: usize = 4_096;

/// A request waiting for its query.
#[derive(Debug)]
struct Ask {
    /// Sorted, without duplicates.
    skus: Vec<String>,
    /// `None`: the query failed; read on your own.
    reply: oneshot::Sender<Option<Found>>,
}

/// The answer of one availability query, shared by every request it answered (no request
/// copies another's): look a SKU's warehouses up with [`Found::of`].
#[derive(Debug, Clone)]
pub(crate) struct Found(Arc<Table>);

#[derive(Debug)]
struct Table {
    /// Every SKU asked for, sorted (Rust's order), without duplicates; `found` is parallel.
    skus: Vec<String>,
    /// Where each SKU's levels are in `levels` (`None` for a SKU without levels).
    found: Vec<Option<usize>>,
    /// One entry per SKU that has levels, in the database's order.
    levels: Vec<SkuAvailability>,
}

impl Found {
    /// `levels` answer `skus` (sorted, without duplicates): at most one entry per SKU.
    pub(crate) fn new(skus: Vec<String>, levels: Vec<SkuAvailability>) -> Self {
        debug_assert!(skus.windows(2).all(|w| w[0] < w[1]), "the SKUs come sorted, without duplicates");
        // The database's collation orders the SKUs, not Rust: find each one's entry by name.
        let of_sku: HashMap<&str, usize> = levels.iter().enumerate().map(|(i, l)| (l.sku.as_str(), i)).collect();
        debug_assert_eq!(of_sku.len(), levels.len(), "one entry per SKU");
        let found = skus.iter().map(|sku| of_sku.get(sku.as_str()).copied()).collect();
        Self(Arc::new(Table { skus, found, levels }))
    }

    /// `sku`'s available units per active warehouse, in no particular order; none for a SKU not
    /// asked for or without levels.
    pub(crate) fn of(&self, sku: &str) -> impl Iterator<Item = (&str, i64)> {
        let table = &*self.0;
        let levels = match table.skus.binary_search_by(|s| s.as_str().cmp(sku)) {
            Ok(i) => table.found[i].map(|at| &table.levels[at]),
            Err(_) => None,
        };
        levels.into_iter().flat_map(|l| l.warehouses.iter().map(String::as_str).zip(l.available.iter().copied()))
    }
}

/// The handle requests submit to; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Coalescer {
    queue: mpsc::Sender<Ask>,
    reads: Reads,
}

impl Coalescer {
    /// Starts the gathering task, which runs at most `concurrency` queries at once (each holds
    /// one database connection); it ends when every handle is gone.
    pub(crate) fn spawn(reads: Reads, concurrency: usize) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(gather(rx, reads.clone(), Arc::new(Semaphore::new(concurrency.max(1)))));
        Self { queue, reads }
    }

    /// Availability of `skus` (sorted, without duplicates) in active warehouses, as
    /// [`stock::availability`] answers it.
    pub(crate) async fn availability(&self, skus: &[String]) -> Result<Found, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Ask { skus: skus.to_vec(), reply }).await.is_ok()
            && let Ok(Some(found)) = answer.await
        {
            return Ok(found);
        }
        // Rare (the query failed, or the service is stopping): boxed, so that the common path's
        // future stays small.
        Box::pin(read(&self.reads, skus.to_vec())).await
    }
}

/// One query for `skus` (sorted, without duplicates).
async fn read(reads: &Reads, skus: Vec<String>) -> Result<Found, sqlx::Error> {
    let asked = skus.as_slice();
    let levels =
        reads.read(|pool| async move { stock::availability(&mut *pool.acquire_untried().await?, asked).await }).await?;
    Ok(Found::new(skus, levels))
}

async fn gather(mut rx: mpsc::Receiver<Ask>, reads: Reads, slots: Arc<Semaphore>) {
    // A request that did not fit into the previous query starts the next.
    let mut carried: Option<Ask> = None;
    loop {
        let first = match carried.take() {
            Some(ask) => ask,
            None => match rx.recv().await {
                Some(ask) => ask,
                None => return,
            },
        };
        // Waiting for a free slot lets the queue fill: the busier the database, the more
        // requests each query answers.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut skus = first.skus.len();
        let mut asks = vec![first];
        while let Ok(ask) = rx.try_recv() {
            if skus + ask.skus.len() > MAX_SKUS {
                carried = Some(ask);
                break;
            }
            skus += ask.skus.len();
            asks.push(ask);
        }
        let reads = reads.clone();
        tokio::spawn(async move {
            answer(&reads, asks).await;
            drop(slot);
        });
    }
}

/// Runs one query for every SKU of `asks` and hands each the shared answer.
async fn answer(reads: &Reads, mut asks: Vec<Ask>) {
    metrics::histogram!(crate::metrics::COALESCED_READS).record(asks.len() as f64);
    let mut skus: Vec<String> = asks.iter_mut().flat_map(|a| std::mem::take(&mut a.skus)).collect();
    skus.sort_unstable();
    skus.dedup();
    match read(reads, skus).await {
        Ok(found) => {
            for ask in asks {
                let _ = ask.reply.send(Some(found.clone()));
            }
        }
        Err(err) => {
            tracing::debug!(error = %err, requests = asks.len(), "a coalesced availability read failed; each reads alone");
            for ask in asks {
                let _ = ask.reply.send(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(sku: &str, rows: &[(&str, i64)]) -> SkuAvailability {
        SkuAvailability {
            sku: sku.into(),
            warehouses: rows.iter().map(|(w, _)| (*w).to_owned()).collect(),
            available: rows.iter().map(|(_, a)| *a).collect(),
        }
    }

    #[test]
    fn each_sku_finds_its_own_levels_whatever_order_the_database_sorted_them_in() {
        // A collation may sort `a-1` after `A2` or `a1`.
        let skus: Vec<String> = ["A2", "a-1", "a1", "none"].iter().map(|s| s.to_string()).collect();
        let rows = vec![levels("a1", &[("W2", 5), ("W1", 3)]), levels("a-1", &[("W1", 7)]), levels("A2", &[("W3", 0)])];
        let found = Found::new(skus, rows);
        let names = |sku| found.of(sku).collect::<Vec<_>>();
        assert_eq!(names("a1"), [("W2", 5), ("W1", 3)]);
        assert_eq!(names("a-1"), [("W1", 7)]);
        assert_eq!(names("A2"), [("W3", 0)]);
        assert_eq!(found.of("none").count(), 0);
        assert_eq!(found.of("not-asked").count(), 0);
    }
}
