//! Reads from a streaming replica: where a read that tolerates a bounded lag goes, how stale the
//! replica is, and the way back to the primary.
//!
//! **Lag** is measured, not estimated from replay timestamps (`now() -
//! pg_last_xact_replay_timestamp()` grows while the primary is idle). Every [`SAMPLE_EVERY`] a
//! sampler notes the moment `t` and then reads the primary's `pg_current_wal_flush_lsn()`: every
//! commit acknowledged before `t` lies at or below that position. It then reads the replica's
//! `pg_last_wal_replay_lsn()`. The replica is *fresh as of* the newest `t` whose position it has
//! replayed: it holds every commit the primary had acknowledged by then. The lag at any moment is
//! `now - fresh_as_of` — about the sampling round trip while the replica keeps up (idle or not),
//! growing by itself when the replica falls behind, stops replaying, or the sampler cannot reach
//! either server. A read goes to the replica only while that lag is within `--max-replica-lag-ms`
//! and the replica answered the last sample as a standby. (Commits acknowledged with
//! `synchronous_commit = off` and not yet flushed are not counted: the replica cannot have them.)
//!
//! A read on the replica that fails (connection refused, broken, timed out, cancelled by a
//! recovery conflict) runs again on the primary, so a dying replica fails no request. A negative
//! answer (no such SKU, channel or cursor) is only the primary's to give.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::db::{self, Db, SetupError};
use crate::config::DatabaseArgs;

/// How often the sampler measures the replica's lag and health.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The shortest wait for a replica connection (the wait is otherwise the lag bound itself: a
/// connection that takes longer than that to get is no better than the primary).
const MIN_ACQUIRE: Duration = Duration::from_millis(100);

/// The replica reads may go to, and how stale it may be.
#[derive(Debug, Clone)]
pub struct ReadReplica {
    pub pool: Db,
    pub max_lag: Duration,
}

impl ReadReplica {
    /// A lazy pool for `url` with the primary's session settings: the service starts (and stays
    /// up) while the replica is down; reads then go to the primary.
    pub fn connect(url: &str, args: &DatabaseArgs) -> Result<Self, SetupError> {
        let max_lag = Duration::from_millis(args.max_replica_lag_ms);
        let (options, pooled) = db::connect_settings(url, args)?;
        let acquire = max_lag.clamp(MIN_ACQUIRE, args.acquire_timeout().max(MIN_ACQUIRE));
        let pool = Db::lazy(options, pooled, args.db_pool_size, acquire);
        Ok(Self { pool, max_lag })
    }
}

/// Why a read went where it went: the `reason` label of `inventory_reads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// On the replica: it was fresh within the bound.
    Fresh,
    /// No replica is configured.
    NoReplica,
    /// The replica is further behind than the bound (or its lag is not known yet).
    Lagging,
    /// The last sample could not reach the replica.
    ReplicaDown,
    /// The replica answered, but not as a standby (promoted, or a primary): not a replica of ours.
    NotStandby,
    /// The read failed on the replica and ran again on the primary.
    ReplicaError,
    /// The replica found nothing (SKU, channel, cursor): the primary confirms.
    NotFound,
    /// `?as_of=` is later than the moment the replica is known to be complete up to.
    AsOf,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::NoReplica => "no_replica",
            Self::Lagging => "lagging",
            Self::ReplicaDown => "replica_down",
            Self::NotStandby => "not_standby",
            Self::ReplicaError => "replica_error",
            Self::NotFound => "not_found",
            Self::AsOf => "as_of",
        }
    }

    /// The `path` label: where the read was answered.
    pub fn path(self) -> &'static str {
        if self == Self::Fresh { "replica" } else { "primary" }
    }
}

/// Where one attempt of a read runs.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub pool: Db,
    /// The replica (its answer may be stale within the bound), not the primary.
    pub replica: bool,
}

/// What one attempt of a read came to.
#[derive(Debug)]
pub(crate) enum Answer<T> {
    Done(T),
    /// Only on the replica: this answer is the primary's to give.
    AskPrimary(Reason),
}

/// The pools reads go to; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reads {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    primary: Db,
    replica: Option<ReadReplica>,
    seen: Mutex<Seen>,
    tally: Mutex<BTreeMap<Reason, u64>>,
}

/// What the sampler has seen.
#[derive(Debug, Default)]
struct Seen {
    /// The primary's samples, oldest first, for the last lag bound or so.
    marks: VecDeque<Mark>,
    /// The newest sample moment whose WAL position the replica has replayed.
    fresh_as_of: Option<Instant>,
    health: Health,
}

/// One sample of the primary, taken at `at` (noted before the query: conservative).
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    lsn: i64,
    /// `writer_horizon()` then: no ledger entry below it could still commit.
    horizon: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Health {
    #[default]
    Unknown,
    Up,
    Down,
    NotStandby,
}

impl Reads {
    /// Reads from `primary` only, or from `replica` while it is fresh (once
    /// [`Reads::spawn_sampler`] measures it).
    pub fn new(primary: Db, replica: Option<ReadReplica>) -> Self {
        Self { inner: Arc::new(Inner { primary, replica, seen: Mutex::default(), tally: Mutex::default() }) }
    }

    /// The primary's pool.
    pub fn primary(&self) -> &Db {
        &self.inner.primary
    }

    /// The replica's current lag (see the module documentation); `None` without a replica or
    /// before the first sample it passed.
    pub fn lag(&self) -> Option<Duration> {
        self.inner.replica.as_ref()?;
        self.seen().fresh_as_of.map(|t| t.elapsed())
    }

    /// Reads answered so far, by reason (the replica's are [`Reason::Fresh`]): this instance's
    /// share of `inventory_reads_total`.
    pub fn tally(&self) -> BTreeMap<Reason, u64> {
        self.inner.tally.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.inner.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replica's pool while a read may go there, else why not.
    fn route(&self) -> Result<Db, Reason> {
        let Some(replica) = &self.inner.replica else { return Err(Reason::NoReplica) };
        let seen = self.seen();
        match seen.health {
            Health::Up => {}
            Health::Down => return Err(Reason::ReplicaDown),
            Health::NotStandby => return Err(Reason::NotStandby),
            Health::Unknown => return Err(Reason::Lagging),
        }
        match seen.fresh_as_of {
            Some(t) if t.elapsed() <= replica.max_lag => Ok(replica.pool.clone()),
            _ => Err(Reason::Lagging),
        }
    }

    /// Whether the replica holds every commit acknowledged up to `at` (an `as_of` read of that
    /// moment answers there as the primary would).
    pub(crate) fn covers(&self, at: DateTime<Utc>) -> bool {
        let Some(fresh) = self.seen().fresh_as_of else { return false };
        let Ok(ago) = chrono::Duration::from_std(fresh.elapsed()) else { return false };
        at <= Utc::now() - ago
    }

    /// The least writer horizon a replica's ledger page must reach to be within the lag bound:
    /// the primary's horizon at the oldest sample inside the bound (`None`: no sample is).
    pub(crate) fn horizon_floor(&self) -> Option<i64> {
        let max_lag = self.inner.replica.as_ref()?.max_lag;
        self.seen().marks.iter().find(|m| m.at.elapsed() <= max_lag).map(|m| m.horizon)
    }

    /// How long a read on the replica may wait for it to catch up with something the primary
    /// has (the lag bound).
    pub(crate) fn max_lag(&self) -> Duration {
        self.inner.replica.as_ref().map_or(Duration::ZERO, |r| r.max_lag)
    }

    /// Runs `read` on the replica when it is fresh (and `primary_because` is `None`), else, or
    /// when that fails or asks for the primary, on the primary. `read` must answer
    /// [`Answer::Done`] on the primary.
    pub(crate) async fn run<T, F, Fut>(&self, primary_because: Option<Reason>, read: F) -> Result<T, sqlx::Error>
    where
        F: Fn(Source) -> Fut,
        Fut: Future<Output = Result<Answer<T>, sqlx::Error>>,
    {
        let reason = match primary_because.map_or_else(|| self.route(), Err) {
            Ok(pool) => match read(Source { pool, replica: true }).await {
                Ok(Answer::Done(value)) => {
                    self.count(Reason::Fresh);
                    return Ok(value);
                }
                Ok(Answer::AskPrimary(reason)) => reason,
                Err(err) => {
                    tracing::warn!(error = %err, "read on the replica failed; reading from the primary");
                    Reason::ReplicaError
                }
            },
            Err(reason) => reason,
        };
        let primary = &self.inner.primary;
        match primary.once_more_if_lost(|| read(Source { pool: primary.clone(), replica: false })).await? {
            Answer::Done(value) => {
                self.count(reason);
                Ok(value)
            }
            Answer::AskPrimary(_) => {
                Err(sqlx::Error::Decode("a read asked the primary for the primary's answer".into()))
            }
        }
    }

    /// [`Reads::run`] for a read whose answer is the same on both.
    pub(crate) async fn read<T, F, Fut>(&self, read: F) -> Result<T, sqlx::Error>
    where
        F: Fn(Db) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.run(None, |source| {
            let attempt = read(source.pool);
            async move { attempt.await.map(Answer::Done) }
        })
        .await
    }

    /// [`Reads::run`] for a lookup: `None` from the replica (not there yet?) is asked again on
    /// the primary, whose `None` is the answer.
    pub(crate) async fn find<T, F, Fut>(
        &self,
        primary_because: Option<Reason>,
        read: F,
    ) -> Result<Option<T>, sqlx::Error>
    where
        F: Fn(Db) -> Fut,
        Fut: Future<Output = Result<Option<T>, sqlx::Error>>,
    {
        self.run(primary_because, |source| {
            let attempt = read(source.pool);
            async move {
                Ok(match attempt.await? {
                    None if source.replica => Answer::AskPrimary(Reason::NotFound),
                    found => Answer::Done(found),
                })
            }
        })
        .await
    }

    fn count(&self, reason: Reason) {
        *self.inner.tally.lock().unwrap_or_else(|e| e.into_inner()).entry(reason).or_default() += 1;
        metrics::counter!(crate::metrics::READS, "path" => reason.path(), "reason" => reason.as_str()).increment(1);
    }

    /// Starts the sampler (when there is a replica); it runs until `stop` flips.
    pub fn spawn_sampler(&self, stop: watch::Receiver<bool>) -> Option<tokio::task::JoinHandle<()>> {
        let replica = self.inner.replica.clone()?;
        metrics::gauge!(crate::metrics::REPLICA_UP).set(0.0);
        Some(tokio::spawn(self.clone().sample_loop(replica, stop)))
    }

    async fn sample_loop(self, replica: ReadReplica, mut stop: watch::Receiver<bool>) {
        // Connections of their own: a busy request pool must not starve the measurement.
        let primary = own_pool(&self.inner.primary, replica.max_lag);
        let standby = own_pool(&replica.pool, replica.max_lag);
        let mut ticker = tokio::time::interval(SAMPLE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                break;
            }
            self.sample(&primary, &standby, replica.max_lag).await;
        }
        primary.pool().close().await;
        standby.pool().close().await;
    }

    /// One measurement: the primary's position, then the replica's.
    async fn sample(&self, primary: &Db, standby: &Db, max_lag: Duration) {
        // Each query waits at most the bound: a server that answers slower is no use to reads.
        let limit = max_lag.max(MIN_ACQUIRE);
        let at = Instant::now();
        let mark = tokio::time::timeout(limit, async {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::int8, writer_horizon()::text::int8",
            )
            .fetch_one(&mut *primary.acquire().await?)
            .await
        })
        .await;
        let position = tokio::time::timeout(limit, async {
            sqlx::query_as::<_, (bool, Option<i64>)>(
                "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8",
            )
            .fetch_one(&mut *standby.acquire().await?)
            .await
        })
        .await;
        let mut seen = self.seen();
        match mark {
            Ok(Ok((lsn, horizon))) => seen.marks.push_back(Mark { at, lsn, horizon }),
            Ok(Err(err)) => tracing::debug!(error = %err, "cannot sample the primary's WAL position"),
            Err(_) => tracing::debug!("sampling the primary's WAL position timed out"),
        }
        // Kept: the samples inside the bound, and the newest one before it.
        let keep = max_lag + SAMPLE_EVERY;
        while seen.marks.len() > 1 && seen.marks.front().is_some_and(|m| m.at.elapsed() > keep) {
            seen.marks.pop_front();
        }
        let health = match position {
            Ok(Ok((true, Some(replayed)))) => {
                if let Some(newest) = seen.marks.iter().rev().find(|m| m.lsn <= replayed) {
                    seen.fresh_as_of = seen.fresh_as_of.max(Some(newest.at));
                }
                Health::Up
            }
            Ok(Ok(_)) => Health::NotStandby,
            Ok(Err(err)) => {
                if seen.health != Health::Down {
                    tracing::warn!(error = %err, "the read replica is unreachable; reads go to the primary");
                }
                Health::Down
            }
            Err(_) => {
                if seen.health != Health::Down {
                    tracing::warn!("the read replica does not answer; reads go to the primary");
                }
                Health::Down
            }
        };
        if health == Health::NotStandby && seen.health != Health::NotStandby {
            tracing::error!("DATABASE_READ_URL is not a standby (promoted, or a primary): reads go to the primary");
        }
        if health == Health::Up && seen.health != Health::Up {
            tracing::info!("the read replica answers; reads go to it while its lag is within the bound");
        }
        seen.health = health;
        metrics::gauge!(crate::metrics::REPLICA_UP).set(if health == Health::Up { 1.0 } else { 0.0 });
        if let Some(fresh) = seen.fresh_as_of {
            metrics::gauge!(crate::metrics::REPLICA_LAG).set(fresh.elapsed().as_secs_f64());
        }
    }
}

/// A one-connection pool with `db`'s server and session settings.
fn own_pool(db: &Db, max_lag: Duration) -> Db {
    db.sibling_with(1, max_lag.max(MIN_ACQUIRE))
}
