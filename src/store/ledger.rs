//! Reading the ledger.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Entry {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub sku: String,
    pub warehouse: String,
    pub kind: String,
    pub on_hand_delta: i64,
    pub reserved_delta: i64,
    pub on_hand_after: i64,
    pub reserved_after: i64,
    pub reference: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct EntryPage {
    pub sku: Option<String>,
    pub warehouse: Option<String>,
    pub reference: Option<String>,
    pub after: Option<Uuid>,
    pub limit: i64,
}

/// What a page read came to.
#[derive(Debug)]
pub(crate) enum Paged {
    /// Entries in commit order, and whether more follow.
    Page(Vec<Entry>, bool),
    /// The `after` entry does not exist (here).
    UnknownCursor,
    /// The writer horizon is below the floor asked for: this server is too far behind.
    Behind,
}

/// One page of entries in commit order, from a server whose writer horizon is at least `floor`.
///
/// On a hot standby `writer_horizon()` is still safe, merely more conservative: `pg_locks`
/// there shows none of the primary's locks, so every transaction the standby knows to be running
/// on the primary (its snapshot's `xip`, from the WAL and the running-xacts records) caps the
/// horizon, and whatever is below it has had its commit or abort replayed, hence is visible to
/// the page's later statement.
///
/// Only entries below the writer horizon are shown, in (`txid`, `id`) order: whatever commits
/// later has a `txid` at or above it, so it comes after any cursor already handed out and a
/// reader paging with `after` never misses it (see migration 0006). The horizon is taken in a
/// statement before the page's. One statement per filter shape, so each can use its index.
pub(crate) async fn page(conn: &mut PgConnection, page: &EntryPage, floor: Option<i64>) -> Result<Paged, sqlx::Error> {
    let (horizon, known): (i64, bool) = sqlx::query_as(
        "SELECT writer_horizon()::text::int8, $1::uuid IS NULL OR EXISTS (SELECT 1 FROM ledger WHERE id = $1)",
    )
    .bind(page.after)
    .fetch_one(&mut *conn)
    .await?;
    if !known {
        return Ok(Paged::UnknownCursor);
    }
    if floor.is_some_and(|floor| horizon < floor) {
        return Ok(Paged::Behind);
    }
    // The same page; only the leading condition differs, so that each shape uses its index.
    macro_rules! page_where {
        ($lead:literal) => {
            concat!(
                "SELECT id, at, sku, warehouse, kind, on_hand_delta, reserved_delta, on_hand_after, reserved_after,
                        reference, reason
                   FROM ledger
                  WHERE ",
                $lead,
                "
                    AND ($1::text IS NULL OR sku = $1)
                    AND ($2::text IS NULL OR warehouse = $2)
                    AND ($3::text IS NULL OR reference = $3)
                    AND txid < $6::text::xid8
                    AND ($4::uuid IS NULL OR (txid, id) > (SELECT txid, id FROM ledger WHERE id = $4))
                  ORDER BY txid, id
                  LIMIT $5"
            )
        };
    }
    let sql = match (&page.sku, &page.reference) {
        (Some(_), _) => page_where!("sku = $1"),
        (None, Some(_)) => page_where!("reference = $3"),
        (None, None) => page_where!("true"),
    };
    let mut rows: Vec<Entry> = sqlx::query_as(sql)
        .bind(&page.sku)
        .bind(&page.warehouse)
        .bind(&page.reference)
        .bind(page.after)
        .bind(page.limit + 1)
        .bind(horizon)
        .fetch_all(conn)
        .await?;
    let more = rows.len() as i64 > page.limit;
    rows.truncate(page.limit as usize);
    Ok(Paged::Page(rows, more))
}
