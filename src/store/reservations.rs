//! Reservations and their allocations.
//!
//! Locking rule: a transaction locks reservation rows before stock levels, never after, so
//! reservations and levels cannot deadlock each other.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::Status;

/// A reservation as clients see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Reservation {
    pub id: Uuid,
    pub order_id: String,
    /// The sales channel it was made for (`null`: none).
    pub channel: Option<String>,
    pub status: String,
    pub strategy: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub lines: Vec<ReservationLine>,
}

/// One line of a reservation, with where it is held from.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Line)]
pub struct ReservationLine {
    pub sku: String,
    pub quantity: i64,
    pub allocations: Vec<AllocationView>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AllocationView {
    pub warehouse: String,
    pub quantity: i64,
    pub fulfilled: i64,
    pub released: i64,
    pub held: i64,
}

/// A reservation row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Header {
    pub id: Uuid,
    pub order_id: String,
    pub channel: Option<String>,
    pub status: String,
    pub strategy: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// `expires_at` has passed by the database's clock.
    pub overdue: bool,
}

impl Header {
    /// The stored status; `None` for a value the service never writes.
    pub(crate) fn status(&self) -> Option<Status> {
        Status::parse(&self.status)
    }
}

/// An allocation row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Allocation {
    pub reservation_id: Uuid,
    pub sku: String,
    pub warehouse: String,
    pub line_no: i32,
    pub seq: i32,
    pub quantity: i64,
    pub fulfilled: i64,
    pub released: i64,
}

impl Allocation {
    pub(crate) fn held(&self) -> i64 {
        self.quantity - self.fulfilled - self.released
    }
}

/// Builds the client view from a header and its allocations (in any order).
pub(crate) fn assemble(header: Header, mut allocations: Vec<Allocation>) -> Reservation {
    allocations.sort_by_key(|a| (a.line_no, a.seq));
    let mut lines: Vec<ReservationLine> = Vec::new();
    for a in allocations {
        let view = AllocationView {
            warehouse: a.warehouse.clone(),
            quantity: a.quantity,
            fulfilled: a.fulfilled,
            released: a.released,
            held: a.held(),
        };
        match lines.last_mut() {
            Some(line) if line.sku == a.sku => {
                line.quantity += a.quantity;
                line.allocations.push(view);
            }
            _ => lines.push(ReservationLine { sku: a.sku, quantity: a.quantity, allocations: vec![view] }),
        }
    }
    Reservation {
        id: header.id,
        order_id: header.order_id,
        channel: header.channel,
        status: header.status,
        strategy: header.strategy,
        created_at: header.created_at,
        expires_at: header.expires_at,
        lines,
    }
}

/// The columns of new reservation rows, one entry per reservation.
#[derive(Debug, Default)]
pub(crate) struct NewRows<'a> {
    pub ids: Vec<Uuid>,
    pub order_ids: Vec<&'a str>,
    pub channels: Vec<Option<&'a str>>,
    pub strategies: Vec<&'a str>,
    pub ttl_seconds: Vec<f64>,
}

/// Inserts many reservation rows at once, in `(order_id, channel)` order (so concurrent batches
/// meet on the unique index in the same order); returns the rows inserted, not the duplicates.
pub(crate) async fn insert_many(conn: &mut PgConnection, rows: &NewRows<'_>) -> Result<Vec<Header>, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO reservations (id, order_id, channel, strategy, expires_at)
         SELECT id, order_id, channel, strategy, now() + make_interval(secs => ttl)
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::float8[])
                AS n(id, order_id, channel, strategy, ttl)
          ORDER BY order_id, channel NULLS FIRST
         ON CONFLICT (order_id, channel) DO NOTHING
         RETURNING id, order_id, channel, status, strategy, created_at, expires_at, false AS overdue",
    )
    .bind(&rows.ids)
    .bind(&rows.order_ids)
    .bind(&rows.channels)
    .bind(&rows.strategies)
    .bind(&rows.ttl_seconds)
    .fetch_all(conn)
    .await
}

/// The reservation ids of existing orders, each `(order_id, channel)` with its id.
pub(crate) async fn ids_of_orders(
    conn: &mut PgConnection,
    orders: &[(&str, Option<&str>)],
) -> Result<Vec<(String, Option<String>, Uuid)>, sqlx::Error> {
    let (order_ids, channels): (Vec<&str>, Vec<Option<&str>>) = orders.iter().copied().unzip();
    sqlx::query_as(
        "SELECT r.order_id, r.channel, r.id
           FROM unnest($1::text[], $2::text[]) AS o(order_id, channel)
           JOIN reservations r ON r.order_id = o.order_id AND r.channel IS NOT DISTINCT FROM o.channel",
    )
    .bind(order_ids)
    .bind(channels)
    .fetch_all(conn)
    .await
}

/// Deletes reservation rows this transaction inserted for orders it then refused.
pub(crate) async fn delete_refused(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM reservations WHERE id = ANY($1)").bind(ids).execute(conn).await?;
    Ok(())
}

/// The reservation of `order_id` in `channel` (`None`: the one made without a channel).
pub(crate) async fn id_of_order(
    conn: &mut PgConnection,
    order_id: &str,
    channel: Option<&str>,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM reservations WHERE order_id = $1 AND channel IS NOT DISTINCT FROM $2")
        .bind(order_id)
        .bind(channel)
        .fetch_optional(conn)
        .await
}

/// The reservations of `order_id`: in `channel` when it is given, else in every channel and
/// none (oldest first).
pub(crate) async fn ids_of_order(
    conn: &mut PgConnection,
    order_id: &str,
    channel: Option<&str>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM reservations WHERE order_id = $1 AND ($2::text IS NULL OR channel = $2) ORDER BY id",
    )
    .bind(order_id)
    .bind(channel)
    .fetch_all(conn)
    .await
}

/// Locks one reservation row.
pub(crate) async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Option<Header>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, order_id, channel, status, strategy, created_at, expires_at, expires_at <= now() AS overdue
           FROM reservations WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Locks the given reservations (ids sorted, without duplicates), in id order; an unknown id
/// is left out.
pub(crate) async fn lock_many(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Header>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, order_id, channel, status, strategy, created_at, expires_at, expires_at <= now() AS overdue
           FROM reservations WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// What the expiry sweep leaves out this time: reservations whose expiry failed, and
/// reservations that hold units of a level found stuck (locked by someone else for long).
#[derive(Debug, Clone, Default)]
pub(crate) struct SweepSkips {
    pub ids: Vec<Uuid>,
    pub levels: Vec<(String, String)>,
    /// Only this reservation (the one-at-a-time fallback).
    pub only: Option<Uuid>,
}

impl SweepSkips {
    /// The skipped levels as two columns, SKUs and warehouses, for `unnest`.
    fn level_columns(&self) -> (Vec<&str>, Vec<&str>) {
        self.levels.iter().map(|(s, w)| (s.as_str(), w.as_str())).unzip()
    }
}

/// Active reservations past their deadline (database clock), oldest deadline first, at most
/// `$1`: not one of the ids in `$2`, holding nothing of the levels `($3[i], $4[i])`, and only
/// `$5` when it is given. A statement may add a locking clause.
macro_rules! overdue_sql {
    () => {
        "SELECT r.id, r.order_id, r.channel, r.status, r.strategy, r.created_at, r.expires_at, true AS overdue
           FROM reservations r
          WHERE r.status = 'active' AND r.expires_at <= now()
            AND r.id <> ALL($2::uuid[])
            AND NOT EXISTS (
                SELECT 1 FROM reservation_allocations a
                  JOIN unnest($3::text[], $4::text[]) AS s(sku, warehouse)
                    ON s.sku = a.sku AND s.warehouse = a.warehouse
                 WHERE a.reservation_id = r.id AND a.quantity > a.fulfilled + a.released)
            AND ($5::uuid IS NULL OR r.id = $5)
          ORDER BY r.expires_at, r.id
          LIMIT $1"
    };
}

/// Locks up to `limit` active reservations whose deadline has passed (database clock), oldest
/// deadline first, skipping rows other transactions hold (a fulfil in progress, another
/// instance's sweep) and whatever `skips` names.
pub(crate) async fn lock_overdue(
    conn: &mut PgConnection,
    limit: i64,
    skips: &SweepSkips,
) -> Result<Vec<Header>, sqlx::Error> {
    overdue(conn, limit, skips, concat!(overdue_sql!(), " FOR UPDATE OF r SKIP LOCKED")).await
}

/// Ids of overdue active reservations (unlocked, a hint for the one-at-a-time fallback).
pub(crate) async fn overdue_ids(
    conn: &mut PgConnection,
    limit: i64,
    skips: &SweepSkips,
) -> Result<Vec<Uuid>, sqlx::Error> {
    Ok(overdue(conn, limit, skips, overdue_sql!()).await?.into_iter().map(|h| h.id).collect())
}

/// Runs an `overdue_sql!` statement.
async fn overdue(
    conn: &mut PgConnection,
    limit: i64,
    skips: &SweepSkips,
    sql: &'static str,
) -> Result<Vec<Header>, sqlx::Error> {
    let (skus, warehouses) = skips.level_columns();
    sqlx::query_as(sql)
        .bind(limit)
        .bind(&skips.ids)
        .bind(&skus)
        .bind(&warehouses)
        .bind(skips.only)
        .fetch_all(conn)
        .await
}

/// The levels a reservation still holds units of.
pub(crate) async fn held_levels(conn: &mut PgConnection, id: Uuid) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT sku, warehouse FROM reservation_allocations
          WHERE reservation_id = $1 AND quantity > fulfilled + released
          ORDER BY sku, warehouse",
    )
    .bind(id)
    .fetch_all(conn)
    .await
}

pub(crate) async fn allocations(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Allocation>, sqlx::Error> {
    sqlx::query_as(
        "SELECT reservation_id, sku, warehouse, line_no, seq, quantity, fulfilled, released
           FROM reservation_allocations WHERE reservation_id = ANY($1)
          ORDER BY reservation_id, line_no, seq",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Removes a (locked) reservation's allocations, for an order edit to write its new ones (see
/// [`RowWrites::inserted`]), and marks the reservation updated.
pub(crate) async fn clear_allocations(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM reservation_allocations WHERE reservation_id = $1").bind(id).execute(&mut *conn).await?;
    sqlx::query("UPDATE reservations SET updated_at = now() WHERE id = $1").bind(id).execute(conn).await?;
    Ok(())
}

/// The reservation rows a transaction writes in the same statement as its stock levels
/// (`levels::write`): nothing by default.
#[derive(Debug, Default)]
pub(crate) struct RowWrites<'a> {
    /// Allocations of new reservations.
    pub inserted: &'a [Allocation],
    /// Allocations whose fulfilled/released counters are written back.
    pub settled: &'a [&'a Allocation],
    /// Reservations' new statuses (a row already in it is left alone).
    pub statuses: &'a [(Uuid, Status)],
}

/// Moves the deadline to `now + ttl` by the database's clock; returns the new deadline.
pub(crate) async fn extend(conn: &mut PgConnection, id: Uuid, ttl_seconds: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE reservations SET expires_at = now() + make_interval(secs => $2), updated_at = now()
          WHERE id = $1 RETURNING expires_at",
    )
    .bind(id)
    .bind(ttl_seconds as f64)
    .fetch_one(conn)
    .await
}

/// Reads one reservation with its allocations.
pub(crate) async fn get(conn: &mut PgConnection, id: Uuid) -> Result<Option<Reservation>, sqlx::Error> {
    let header: Option<Header> = sqlx::query_as(
        "SELECT id, order_id, channel, status, strategy, created_at, expires_at, expires_at <= now() AS overdue
           FROM reservations WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(header) = header else { return Ok(None) };
    let allocations = allocations(conn, &[id]).await?;
    Ok(Some(assemble(header, allocations)))
}

/// How far behind the expiry sweep is: seconds since the oldest deadline still unhandled (0
/// when none).
pub(crate) async fn expiry_lag(conn: &mut PgConnection) -> Result<f64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(extract(epoch FROM now() - min(expires_at))::float8, 0)
           FROM reservations WHERE status = 'active' AND expires_at <= now()",
    )
    .fetch_one(conn)
    .await
}
