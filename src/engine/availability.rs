//! Coalesced availability reads: concurrent `GET /v1/availability` requests (without a
//! channel) are answered by one query for all their SKUs.
//!
//! A request joins the next query to *start*, never one already running, so every answer comes
//! from a statement that began after the request arrived: it sees every change committed
//! before the request, exactly as a direct read would. At most
//! `--coalesced-read-concurrency` queries run at once; requests that arrive meanwhile queue,
//! and the next free slot takes all of them (up to [`MAX_SKUS`] SKUs) into one query. When a
//! slot is free, a request goes at once: an idle service adds no wait. A slot that finds more
//! requests waiting when its query ends keeps its connection for the next query (no trip through
//! the pool, whose check of a returned connection costs both sides a round trip); one that finds
//! none gives it back before it waits. A query that fails
//! answers nobody with its error: each of its requests then reads on its own, as without
//! coalescing.

use std::sync::Arc;

use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::store::db::Conn;
use crate::store::replica::{Answer, Reads};
use crate::store::stock;

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
    /// Which of `rows` holds each SKU's levels (`None` for a SKU without levels).
    found: Vec<Option<usize>>,
    /// The query's rows, read where they lie ([`stock::levels_of`]).
    rows: Vec<PgRow>,
}

impl Found {
    /// `rows` (of [`stock::availability`]) answer `skus` (sorted, without duplicates): at most
    /// one row per SKU, each checked whole here.
    pub(crate) fn new(skus: Vec<String>, rows: Vec<PgRow>) -> Result<Self, sqlx::Error> {
        let found = rows_of(&skus, rows.iter().map(stock::sku_of))?;
        for row in &rows {
            stock::levels_of(row)?;
        }
        Ok(Self(Arc::new(Table { skus, found, rows })))
    }

    /// `sku`'s available units per active warehouse, in no particular order; none for a SKU not
    /// asked for or without levels.
    pub(crate) fn of(&self, sku: &str) -> impl Iterator<Item = (&str, i64)> {
        let table = &*self.0;
        let row = match table.skus.binary_search_by(|s| s.as_str().cmp(sku)) {
            Ok(i) => table.found[i].map(|at| &table.rows[at]),
            Err(_) => None,
        };
        // Checked by `new`: a row's levels always read.
        row.and_then(|row| stock::levels_of(row).ok()).into_iter().flatten()
    }
}

/// For each of `skus` (sorted, without duplicates), which row holds it, given each row's SKU in
/// the database's order: the database's collation orders the SKUs, not Rust, so each row is
/// looked up by name. A SKU not asked for, or asked for twice, is an error.
fn rows_of<'r>(
    skus: &[String],
    row_skus: impl Iterator<Item = Result<&'r str, sqlx::Error>>,
) -> Result<Vec<Option<usize>>, sqlx::Error> {
    debug_assert!(skus.windows(2).all(|w| w[0] < w[1]), "the SKUs come sorted, without duplicates");
    let mut found = vec![None; skus.len()];
    for (at, sku) in row_skus.enumerate() {
        let sku = sku?;
        let i = skus
            .binary_search_by(|s| s.as_str().cmp(sku))
            .map_err(|_| sqlx::Error::Decode(format!("availability of `{sku}`, which was not asked for").into()))?;
        if found[i].replace(at).is_some() {
            return Err(sqlx::Error::Decode(format!("two availability rows for `{sku}`").into()));
        }
    }
    Ok(found)
}

/// The handle requests submit to; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Coalescer {
    queue: mpsc::Sender<Ask>,
    reads: Reads,
}

impl Coalescer {
    /// Starts `concurrency` query slots, each running one query at a time on one database
    /// connection; they end when every handle is gone.
    pub(crate) fn spawn(reads: Reads, concurrency: usize) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let waiting = Arc::new(Mutex::new(Waiting { rx, carried: None }));
        for _ in 0..concurrency.max(1) {
            tokio::spawn(serve(waiting.clone(), reads.clone()));
        }
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
        Box::pin(read(&self.reads, skus.to_vec(), &Kept::default())).await
    }
}

/// The connections a query slot keeps from one query to the next, one per server it read from.
#[derive(Default)]
struct Kept(std::sync::Mutex<[Option<PoolConnection<Postgres>>; 2]>);

impl Kept {
    fn take(&self, replica: bool) -> Option<PoolConnection<Postgres>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())[usize::from(replica)].take()
    }

    /// Keeps `conn` when it is a session of its own (behind a transaction pooler a read is a
    /// transaction, which ends with the read).
    fn keep(&self, replica: bool, conn: Conn) {
        if let Conn::Session(conn) = conn {
            self.0.lock().unwrap_or_else(|e| e.into_inner())[usize::from(replica)] = Some(conn);
        }
    }

    /// Gives every kept connection back to its pool.
    fn give_back(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = [None, None];
    }
}

/// One query for `skus` (sorted, without duplicates), on a connection `kept` holds if it has one
/// for the server the read goes to. A connection that fails is dropped: the read runs again on
/// another when it was lost ([`Reads::run`]).
async fn read(reads: &Reads, skus: Vec<String>, kept: &Kept) -> Result<Found, sqlx::Error> {
    let asked = skus.as_slice();
    let rows = reads
        .run(None, |source| async move {
            let mut conn = match kept.take(source.replica) {
                Some(conn) => Conn::Session(conn),
                None => source.pool.acquire_untried().await?,
            };
            let rows = stock::availability(&mut conn, asked).await?;
            kept.keep(source.replica, conn);
            Ok(Answer::Done(rows))
        })
        .await?;
    Found::new(skus, rows)
}

/// The requests waiting for a query, taken by whichever query slot is free first.
struct Waiting {
    rx: mpsc::Receiver<Ask>,
    /// A request that did not fit into the previous query: it starts the next.
    carried: Option<Ask>,
}

impl Waiting {
    /// Every request waiting now, up to [`MAX_SKUS`] SKUs (none: an empty list).
    fn take_now(&mut self) -> Vec<Ask> {
        let mut asks: Vec<Ask> = self.carried.take().into_iter().collect();
        let mut skus: usize = asks.iter().map(|a| a.skus.len()).sum();
        while let Ok(ask) = self.rx.try_recv() {
            if !asks.is_empty() && skus + ask.skus.len() > MAX_SKUS {
                self.carried = Some(ask);
                break;
            }
            skus += ask.skus.len();
            asks.push(ask);
        }
        asks
    }
}

/// One query slot: takes every waiting request, answers them with one query, and goes back for
/// more; when none is waiting, it gives its connection back and waits for the next request.
async fn serve(waiting: Arc<Mutex<Waiting>>, reads: Reads) {
    let kept = Kept::default();
    loop {
        let asks = {
            // Only the slot holding the lock waits for a request; the others wait for the lock,
            // without a connection: the lock is only ever held for long by a slot that found
            // nothing waiting.
            let mut waiting = match waiting.try_lock() {
                Ok(waiting) => waiting,
                Err(_) => {
                    kept.give_back();
                    waiting.lock().await
                }
            };
            let asks = waiting.take_now();
            if asks.is_empty() {
                kept.give_back();
                let Some(first) = waiting.rx.recv().await else { return };
                waiting.carried = Some(first);
                waiting.take_now()
            } else {
                asks
            }
        };
        answer(&reads, asks, &kept).await;
    }
}

/// Runs one query for every SKU of `asks` and hands each the shared answer.
async fn answer(reads: &Reads, mut asks: Vec<Ask>, kept: &Kept) {
    metrics::histogram!(crate::metrics::COALESCED_READS).record(asks.len() as f64);
    let mut skus: Vec<String> = asks.iter_mut().flat_map(|a| std::mem::take(&mut a.skus)).collect();
    skus.sort_unstable();
    skus.dedup();
    match read(reads, skus, kept).await {
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

    #[test]
    fn each_sku_finds_its_own_row_whatever_order_the_database_sorted_them_in() {
        // A collation may sort `a-1` after `A2` or `a1`.
        let skus: Vec<String> = ["A2", "a-1", "a1", "none"].iter().map(|s| s.to_string()).collect();
        let rows = ["a1", "a-1", "A2"].map(Ok);
        assert_eq!(rows_of(&skus, rows.into_iter()).unwrap(), [Some(2), Some(1), Some(0), None]);
    }

    #[test]
    fn a_row_not_asked_for_or_twice_is_an_error() {
        let skus: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        assert!(rows_of(&skus, ["a", "c"].map(Ok).into_iter()).is_err());
        assert!(rows_of(&skus, ["b", "b"].map(Ok).into_iter()).is_err());
    }
}
