//! Coalesced availability reads: concurrent `GET /v1/availability` requests (without a
//! channel) are answered by one query for all their SKUs.
//!
//! A request joins the next query to *start*, never one already running, so every answer comes
//! from a statement that began after the request arrived: it sees every change committed
//! before the request, exactly as a direct read would. At most [`SLOTS`] queries run at once;
//! requests that arrive meanwhile queue, and the next free slot takes all of them (up to
//! [`MAX_SKUS`] SKUs) into one query. When a slot is free, a request goes at once: an idle
//! service adds no wait. A query that fails answers nobody with its error: each of its requests
//! then reads on its own, as without coalescing.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::store::replica::Reads;
use crate::store::stock::{self, AvailableRow};

/// Coalesced queries running at once (each holds one database connection).
const SLOTS: usize = 4;

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
    reply: oneshot::Sender<Option<Vec<AvailableRow>>>,
}

/// The handle requests submit to; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Coalescer {
    queue: mpsc::Sender<Ask>,
    reads: Reads,
}

impl Coalescer {
    /// Starts the gathering task; it ends when every handle is gone.
    pub(crate) fn spawn(reads: Reads) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(gather(rx, reads.clone(), Arc::new(Semaphore::new(SLOTS))));
        Self { queue, reads }
    }

    /// Availability of `skus` (sorted, without duplicates) in active warehouses, as
    /// [`stock::availability`] answers it.
    pub(crate) async fn availability(&self, skus: &[String]) -> Result<Vec<AvailableRow>, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Ask { skus: skus.to_vec(), reply }).await.is_ok()
            && let Ok(Some(rows)) = answer.await
        {
            return Ok(rows);
        }
        self.reads.read(|pool| async move { stock::availability(&mut *pool.acquire().await?, skus).await }).await
    }
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

/// Runs one query for every SKU of `asks` and hands each its own rows.
async fn answer(reads: &Reads, asks: Vec<Ask>) {
    metrics::histogram!(crate::metrics::COALESCED_READS).record(asks.len() as f64);
    let mut skus: Vec<String> = asks.iter().flat_map(|a| a.skus.iter().cloned()).collect();
    skus.sort_unstable();
    skus.dedup();
    let skus = skus.as_slice();
    match reads.read(|pool| async move { stock::availability(&mut *pool.acquire().await?, skus).await }).await {
        Ok(rows) => {
            // Each SKU's rows are adjacent (the query orders by SKU first).
            let mut of_sku: HashMap<&str, Range<usize>> = HashMap::with_capacity(skus.len());
            let mut start = 0;
            for end in 1..=rows.len() {
                if end == rows.len() || rows[end].sku != rows[start].sku {
                    of_sku.insert(rows[start].sku.as_str(), start..end);
                    start = end;
                }
            }
            for ask in asks {
                let mine =
                    ask.skus.iter().filter_map(|sku| of_sku.get(sku.as_str())).flat_map(|r| rows[r.clone()].iter());
                let _ = ask.reply.send(Some(mine.cloned().collect()));
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
