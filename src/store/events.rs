//! The outbox: relaying committed events into the public, gap-free order, and reading them.

use crate::store::db::Db;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::EventKind;

/// An event for the outbox, written in the transaction of the change it reports.
#[derive(Debug, Clone)]
pub(crate) struct NewEvent {
    pub kind: EventKind,
    pub sku: Option<String>,
    pub warehouse: Option<String>,
    pub reservation_id: Option<Uuid>,
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Event {
    pub id: i64,
    pub at: DateTime<Utc>,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warehouse: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<Uuid>,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// Events numbered by one relay run at most. Large: a run that stops short leaves the frontier
/// where it was, so the next run looks at the whole backlog again (a million levels imported are
/// a million events: one run).
const RELAY_BATCH: i64 = 1_000_000;

/// Gives the next public ids to committed events, in one short transaction; returns how many.
///
/// Ids are handed out here, after the commit, as `max(id) + n` in `seq` order, by one relay at a
/// time (advisory lock; several service instances can run it): an event that commits later gets
/// a larger id at a later run, so a reader paging with `after` never misses one, and no running
/// transaction — however long — holds the feed back. (Events of one entity stay in order: the
/// change that follows another waits for its commit.) An id is a row of `event_ids`; the event
/// row itself is never written again. The events waiting for one are found from the relay's
/// frontier (`event_relay`, see `migrations/0011_event_ids.sql`), which a run that numbers
/// everything it sees moves up to the writer frontier it took before looking.
pub(crate) async fn relay(pool: &Db) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(7041, 1)").fetch_one(&mut *tx).await?;
    if !locked {
        return Ok(0);
    }
    // A backlog (an import's events) is numbered in one statement, however long it takes.
    sqlx::query("SET LOCAL statement_timeout = 0").execute(&mut *tx).await?;
    // Where the last complete run left off, as values the planner sees: it probes the newest
    // rows of both tables by index.
    let (horizon, running, after): (i64, Vec<i64>, i64) =
        sqlx::query_as("SELECT horizon::text::int8, running::text[]::int8[], numbered_after FROM event_relay")
            .fetch_one(&mut *tx)
            .await?;
    // In a statement of its own, before the events are read: every writer below it that is not
    // among `now_running` has finished by then, so the next statement sees its events.
    let (now_next, now_running): (i64, Vec<i64>) =
        sqlx::query_as("SELECT next_id::text::int8, running::text[]::int8[] FROM writer_frontier()")
            .fetch_one(&mut *tx)
            .await?;
    // The same events as `unrelayed_events()`.
    let done = sqlx::query(
        "WITH ready AS (
             SELECT txid, seq, row_number() OVER (ORDER BY seq) AS n
               FROM (SELECT e.txid, e.seq FROM events e
                      WHERE (e.txid >= $1::int8::text::xid8 OR e.txid = ANY ($2::int8[]::text[]::xid8[]))
                        AND NOT EXISTS (SELECT 1 FROM event_ids n
                                         WHERE n.id > $3 AND n.txid = e.txid AND n.seq = e.seq)
                      ORDER BY e.seq LIMIT $4) s
         ), top AS (SELECT coalesce(max(id), 0) AS id FROM event_ids)
         INSERT INTO event_ids (id, txid, seq)
         SELECT top.id + ready.n, ready.txid, ready.seq FROM ready, top",
    )
    .bind(horizon)
    .bind(&running)
    .bind(after)
    .bind(RELAY_BATCH)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() < RELAY_BATCH as u64 {
        // Every committed event has its id now, so has every event below `now_next` except
        // those of `now_running`. The ids handed out to events of the frontier's open part (in
        // this run, or in earlier ones while a writer was running) bound what the next run
        // compares against.
        sqlx::query(
            "UPDATE event_relay
                SET horizon = $1::int8::text::xid8, running = $2::int8[]::text[]::xid8[],
                    numbered_after = coalesce(
                        (SELECT min(n.id) - 1 FROM event_ids n
                          WHERE n.id > $3
                            AND (n.txid >= $1::int8::text::xid8 OR n.txid = ANY ($2::int8[]::text[]::xid8[]))),
                        (SELECT max(n.id) FROM event_ids n),
                        0)",
        )
        .bind(now_next)
        .bind(&now_running)
        .bind(after)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(done.rows_affected())
}

/// Relayed events after `after`, oldest first, optionally of some types only.
pub(crate) async fn page(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
    types: &[String],
) -> Result<Vec<Event>, sqlx::Error> {
    sqlx::query_as(
        "SELECT n.id, e.at, e.type, e.sku, e.warehouse, e.reservation_id, e.data
           FROM event_ids n JOIN events e ON e.txid = n.txid AND e.seq = n.seq
          WHERE n.id > $1 AND (cardinality($3::text[]) = 0 OR e.type = ANY($3))
          ORDER BY n.id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .bind(types)
    .fetch_all(conn)
    .await
}

/// The highest relayed id (0 when none).
pub(crate) async fn last_id(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM event_ids").fetch_one(conn).await
}

/// Events after `after` matching `types` (all when empty), at most `limit`, looking at no more
/// than `max_scan` events: returns them and the cursor to continue from — the last event
/// returned when `limit` was reached, else the last event looked at, so that a filter for a
/// rare type moves on instead of scanning the same stretch again on every poll.
pub(crate) async fn scan(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
    types: &[String],
    max_scan: i64,
) -> Result<(Vec<Event>, i64), sqlx::Error> {
    if types.is_empty() {
        let items = page(conn, after, limit, types).await?;
        let cursor = items.last().map_or(after, |e| e.id);
        return Ok((items, cursor));
    }
    let (mut cursor, mut scanned, mut found) = (after, 0, Vec::new());
    while scanned < max_scan {
        let chunk = page(conn, cursor, 1_000.min(max_scan - scanned), &[]).await?;
        let Some(last) = chunk.last().map(|e| e.id) else { break };
        let full = chunk.len() as i64 == 1_000.min(max_scan - scanned);
        scanned += chunk.len() as i64;
        for event in chunk {
            cursor = event.id;
            if types.contains(&event.kind) {
                found.push(event);
                if found.len() as i64 >= limit {
                    return Ok((found, cursor));
                }
            }
        }
        cursor = last;
        if !full {
            break;
        }
    }
    Ok((found, cursor))
}

/// Deletes relayed events older than the retention, oldest ids first, but never the newest one
/// (its id is the counter the next ids continue from) nor one a webhook subscription has still
/// to deliver. An event and its id go together.
pub async fn purge(conn: &mut PgConnection, retention_secs: i64, batch: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "WITH old AS (
             SELECT n.id, n.txid, n.seq FROM event_ids n
              WHERE n.id < (SELECT max(id) FROM event_ids)
                AND n.id <= (SELECT coalesce(min(delivered_through), 9223372036854775807) FROM webhook_progress)
              ORDER BY n.id LIMIT $2
         ), gone AS (
             DELETE FROM events e USING old
              WHERE e.txid = old.txid AND e.seq = old.seq AND e.at < now() - make_interval(secs => $1)
              RETURNING e.txid, e.seq
         )
         DELETE FROM event_ids n USING gone JOIN old ON old.txid = gone.txid AND old.seq = gone.seq
          WHERE n.id = old.id",
    )
    .bind(retention_secs as f64)
    .bind(batch)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
