//! The event feed of one process: ONE task relays committed events into the public order and,
//! while any stream is open, keeps the most recent ones in memory; live streams are woken by it
//! and read from that memory, so a thousand open streams cost no more database work than one. A
//! stream that is far behind (or opened while the memory was empty) catches up from the database
//! a page at a time, then joins the others.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::store::db::Db;
use tokio::sync::{Notify, watch};

use super::error::{Error, Refusal, Result};
use crate::store::events::{self, Event};
use crate::store::replica::{Answer, Reads, Reason};

/// Events kept in memory for live streams.
const RECENT: usize = 10_000;
/// Events read from the database at a time (a stream catching up, or the relay task).
pub(crate) const PAGE: i64 = 500;
/// How often the relay runs when nobody asks for it.
const TICK: Duration = Duration::from_millis(100);

/// The process's feed; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Feed {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The newest relayed events, ids contiguous and ascending up to `head`, each with its SSE
    /// frame; emptied by the first relay run that moves the head while no stream is open.
    recent: RwLock<VecDeque<Arc<Framed>>>,
    /// The highest relayed id (the last of `recent` when it is not empty); streams wait for it
    /// to move.
    head: watch::Sender<i64>,
    /// `head` has been read from the database (history before it is not kept in memory).
    known: AtomicBool,
    /// Relay runs begun and finished, for readers that must see their own writes.
    started: AtomicU64,
    finished: watch::Sender<u64>,
    kick: Notify,
    streams: Mutex<StreamCount>,
    limits: StreamLimits,
    /// Streams reading the database at once (catching up from far behind): a crowd of them
    /// must not take the connections the order path needs.
    catching_up: tokio::sync::Semaphore,
}

/// Streams that may read the database at the same time.
const CATCHING_UP: usize = 2;

/// An event with its Server-Sent Events frame, rendered once for every stream.
#[derive(Debug)]
pub(crate) struct Framed {
    pub event: Event,
    pub frame: axum::body::Bytes,
}

impl Framed {
    pub(crate) fn new(event: Event) -> Self {
        let data = serde_json::to_string(&event).unwrap_or_default();
        let frame = format!("id: {}\nevent: {}\ndata: {data}\n\n", event.id, event.kind);
        Self { event, frame: frame.into() }
    }
}

/// Most live streams open at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamLimits {
    pub total: usize,
    pub per_caller: usize,
}

#[derive(Debug, Default)]
struct StreamCount {
    total: usize,
    by_caller: std::collections::HashMap<String, usize>,
}

/// What a stream reads next.
#[derive(Debug)]
pub(crate) struct Slice {
    /// Matching events after the cursor, oldest first.
    pub events: Vec<Arc<Framed>>,
    /// The highest id looked at (matching or not): the cursor moves here.
    pub scanned_to: i64,
}

impl Feed {
    /// The feed, with its relay task running until `stop` flips. It needs no database to
    /// start: the first relay run that reaches one learns where the feed stands.
    pub fn start(db: Db, limits: StreamLimits, stop: watch::Receiver<bool>) -> Self {
        let feed = Self {
            inner: Arc::new(Inner {
                recent: RwLock::new(VecDeque::new()),
                head: watch::Sender::new(0),
                known: AtomicBool::new(false),
                started: AtomicU64::new(0),
                finished: watch::Sender::new(0),
                kick: Notify::new(),
                streams: Mutex::default(),
                limits,
                catching_up: tokio::sync::Semaphore::new(CATCHING_UP),
            }),
        };
        tokio::spawn(feed.clone().relay_loop(db, stop));
        feed
    }

    async fn relay_loop(self, db: Db, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.inner.kick.notified() => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
            self.inner.started.fetch_add(1, Ordering::SeqCst);
            if let Err(err) = self.relay_once(&db).await {
                tracing::warn!(error = %err, "event relay failed; will retry");
            }
            self.inner.finished.send_modify(|n| *n += 1);
        }
    }

    /// Numbers what has committed, then takes every event after the head into memory (also
    /// those another instance numbered) — while a stream is open to read it. With none open
    /// only the head moves and the memory is emptied (it must never have a gap): a stream that
    /// opens later reads from the database up to the head, and from memory after it.
    async fn relay_once(&self, db: &Db) -> Result<()> {
        let relayed = events::relay(db).await?;
        metrics::counter!(crate::metrics::EVENTS_RELAYED).increment(relayed);
        let mut conn = db.acquire().await?;
        if !self.inner.known.load(Ordering::SeqCst) {
            self.inner.head.send_replace(events::last_id(&mut conn).await?);
            self.inner.known.store(true, Ordering::SeqCst);
            return Ok(());
        }
        if self.streaming() == 0 {
            let last = events::last_id(&mut conn).await?;
            if last != *self.inner.head.borrow() {
                self.inner.recent.write().unwrap_or_else(|e| e.into_inner()).clear();
                self.inner.head.send_replace(last);
            }
            return Ok(());
        }
        loop {
            let head = *self.inner.head.borrow();
            let fresh = events::page(&mut conn, head, PAGE, &[]).await?;
            let Some(last) = fresh.last().map(|e| e.id) else { return Ok(()) };
            let full = fresh.len() as i64 == PAGE;
            // Rendered before the lock is taken: streams read the memory meanwhile.
            let framed: Vec<Arc<Framed>> = fresh.into_iter().map(|e| Arc::new(Framed::new(e))).collect();
            {
                let mut recent = self.inner.recent.write().unwrap_or_else(|e| e.into_inner());
                recent.extend(framed);
                while recent.len() > RECENT {
                    recent.pop_front();
                }
            }
            self.inner.head.send_replace(last);
            if !full {
                return Ok(());
            }
        }
    }

    /// Waits (at most `limit`) until a relay run that began after this call has finished, so
    /// that a reader sees what it committed before asking. Many callers share one run.
    pub(crate) async fn catch_up(&self, limit: Duration) {
        let needed = self.inner.started.load(Ordering::SeqCst) + 1;
        let mut finished = self.inner.finished.subscribe();
        self.inner.kick.notify_one();
        let _ = tokio::time::timeout(limit, finished.wait_for(|n| *n >= needed)).await;
    }

    /// A page of the feed for a reader (`GET /v1/events`): events after `after` matching `types`,
    /// and the cursor to go on from (see `events::scan`). On the read replica while it is fresh,
    /// once it holds the head this process knows (waiting for its replay at most the lag bound):
    /// a reader then sees on the replica what it would see on the primary.
    pub(crate) async fn list(
        &self,
        reads: &Reads,
        after: i64,
        limit: i64,
        types: &[String],
        max_scan: i64,
    ) -> Result<(Vec<Event>, i64)> {
        let head = *self.inner.head.borrow();
        let patience = reads.max_lag();
        Ok(reads
            .run(None, |source| async move {
                let mut conn = source.pool.acquire_untried().await?;
                if source.replica && !reached(&mut conn, head, patience).await? {
                    return Ok(Answer::AskPrimary(Reason::Lagging));
                }
                Ok(Answer::Done(events::scan(&mut conn, after, limit, types, max_scan).await?))
            })
            .await?)
    }

    /// A receiver that changes whenever new events arrive.
    pub(crate) fn subscribe(&self) -> watch::Receiver<i64> {
        self.inner.head.subscribe()
    }

    /// Events after `after` from memory, matching `types` (all when empty), at most `limit`;
    /// `None` when memory does not reach back that far.
    pub(crate) fn recent_after(&self, after: i64, types: &[String], limit: usize) -> Option<Slice> {
        let head = *self.inner.head.borrow();
        let recent = self.inner.recent.read().unwrap_or_else(|e| e.into_inner());
        if after >= head {
            return Some(Slice { events: Vec::new(), scanned_to: after });
        }
        // Memory must hold the event right after the cursor (ids are gap-free when relayed;
        // the oldest ones go first, to retention).
        if recent.front()?.event.id > after + 1 {
            return None;
        }
        let skip = recent.partition_point(|f| f.event.id <= after);
        let mut scanned_to = after;
        let mut events = Vec::new();
        for framed in recent.range(skip..) {
            scanned_to = framed.event.id;
            if types.is_empty() || types.contains(&framed.event.kind) {
                events.push(framed.clone());
                if events.len() >= limit {
                    break;
                }
            }
        }
        Some(Slice { events, scanned_to })
    }

    /// Events after `after` from the database (a stream far behind the memory), at most one
    /// page, filtered by `types`; waits its turn among the streams doing the same. On the read
    /// replica while it is fresh, unless it has not got as far as this process's relay has: ids
    /// are numbered in one order on the primary, so the replica holds a prefix of them, and a
    /// page that stops short of the head would only delay the stream.
    pub(crate) async fn page_from_database(&self, reads: &Reads, after: i64, types: &[String]) -> Result<Slice> {
        let _turn = self.inner.catching_up.acquire().await.map_err(|e| Error::Bug(e.to_string()))?;
        let head = *self.inner.head.borrow();
        let page = reads
            .run(None, |source| async move {
                let page = events::page(&mut *source.pool.acquire_untried().await?, after, PAGE, &[]).await?;
                let short = (page.len() as i64) < PAGE && page.last().map_or(after, |e| e.id) < head;
                Ok(if source.replica && short { Answer::AskPrimary(Reason::Lagging) } else { Answer::Done(page) })
            })
            .await?;
        let scanned_to = page.last().map_or(after, |e| e.id);
        let events = page
            .into_iter()
            .filter(|e| types.is_empty() || types.contains(&e.kind))
            .map(|e| Arc::new(Framed::new(e)))
            .collect();
        Ok(Slice { events, scanned_to })
    }

    /// How many streams are open.
    fn streaming(&self) -> usize {
        self.inner.streams.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Opens a stream slot for `caller`, or says which limit is reached.
    pub(crate) fn open_stream(&self, caller: &str) -> Result<StreamSlot, Refusal> {
        let mut count = self.inner.streams.lock().unwrap_or_else(|e| e.into_inner());
        let limits = self.inner.limits;
        if count.total >= limits.total {
            return Err(Refusal::TooManyStreams(format!("{} event streams are open, the most allowed", limits.total)));
        }
        let mine = count.by_caller.entry(caller.to_owned()).or_default();
        if *mine >= limits.per_caller {
            return Err(Refusal::TooManyStreams(format!(
                "this caller has {} event streams open, the most allowed per key",
                limits.per_caller
            )));
        }
        *mine += 1;
        count.total += 1;
        metrics::gauge!(crate::metrics::EVENT_STREAMS).set(count.total as f64);
        Ok(StreamSlot { feed: self.clone(), caller: caller.to_owned() })
    }
}

/// Whether the database behind `conn` (a replica replaying) holds event `id`, polling for at
/// most `patience`.
async fn reached(conn: &mut sqlx::PgConnection, id: i64, patience: Duration) -> std::result::Result<bool, sqlx::Error> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if events::last_id(&mut *conn).await? >= id {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(REPLAY_POLL).await;
    }
}

/// How often a read waiting for the replica to replay looks again.
const REPLAY_POLL: Duration = Duration::from_millis(5);

/// An open stream's place; given back when the stream ends.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    feed: Feed,
    caller: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut count = self.feed.inner.streams.lock().unwrap_or_else(|e| e.into_inner());
        count.total = count.total.saturating_sub(1);
        if let Some(mine) = count.by_caller.get_mut(&self.caller) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                count.by_caller.remove(&self.caller);
            }
        }
        metrics::gauge!(crate::metrics::EVENT_STREAMS).set(count.total as f64);
    }
}
