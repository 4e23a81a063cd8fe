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

/// Gives the next public ids to committed events, in one short transaction; returns how many.
///
/// Ids are handed out here, after the commit, as `max(id) + n` in `seq` order, by one relay at a
/// time (advisory lock; several service instances can run it): an event that commits later gets
/// a larger id at a later run, so a reader paging with `after` never misses one, and no running
/// transaction — however long — holds the feed back. (Events of one entity stay in order: the
/// change that follows another waits for its commit.)
pub(crate) async fn relay(pool: &Db) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(7041, 1)").fetch_one(&mut *tx).await?;
    if !locked {
        return Ok(0);
    }
    let done = sqlx::query(
        "WITH ready AS (
             SELECT seq, row_number() OVER (ORDER BY seq) AS n
               FROM (SELECT seq FROM events
                      WHERE id IS NULL
                      ORDER BY seq LIMIT 10000) s
         ), top AS (SELECT coalesce(max(id), 0) AS id FROM events)
         UPDATE events e SET id = top.id + ready.n
           FROM ready, top
          WHERE e.seq = ready.seq",
    )
    .execute(&mut *tx)
    .await?;
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
        "SELECT id, at, type, sku, warehouse, reservation_id, data FROM events
          WHERE id > $1 AND (cardinality($3::text[]) = 0 OR type = ANY($3))
          ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .bind(types)
    .fetch_all(conn)
    .await
}

/// The highest relayed id (0 when none).
pub(crate) async fn last_id(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM events").fetch_one(conn).await
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

/// Deletes relayed events older than the retention, but never the newest one (it carries the
/// counter the next ids continue from) nor one a webhook subscription has still to deliver.
pub(crate) async fn purge(conn: &mut PgConnection, retention_secs: i64, batch: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM events WHERE seq IN (
             SELECT seq FROM events
              WHERE at < now() - make_interval(secs => $1)
                AND id IS NOT NULL AND id < (SELECT max(id) FROM events)
                AND id <= (SELECT coalesce(min(delivered_through), 9223372036854775807) FROM webhook_progress)
              ORDER BY at LIMIT $2)",
    )
    .bind(retention_secs as f64)
    .bind(batch)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
