//! Locking stock levels and writing them back together with their ledger entries.
//!
//! Every lock here is taken in (sku, warehouse) order (see the lock order in `store/mod.rs`).

use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::EntryKind;
use crate::store::events::NewEvent;
use crate::store::reservations::{Allocation, RowWrites};

/// A level as a transaction locks (or reads) it, with its warehouse's allocation settings.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct LevelRow {
    pub sku: String,
    pub warehouse: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub backorder_limit: i64,
    pub priority: i32,
    pub active: bool,
    pub reorder_point: i64,
}

impl LevelRow {
    pub(crate) fn available(&self) -> i64 {
        self.on_hand - self.reserved
    }
}

/// Locks every level of the given SKUs in active warehouses (the only ones that take new
/// reservations).
pub(crate) async fn lock_skus(conn: &mut PgConnection, skus: &[&str]) -> Result<Vec<LevelRow>, sqlx::Error> {
    let mut skus = skus.to_vec();
    skus.sort_unstable();
    skus.dedup();
    sqlx::query_as(
        "SELECT l.sku, l.warehouse, l.on_hand, l.reserved, l.backorder_limit, w.priority, w.active, l.reorder_point
           FROM stock_levels l JOIN warehouses w ON w.code = l.warehouse AND w.active
          WHERE l.sku = ANY($1)
          ORDER BY l.sku, l.warehouse
            FOR UPDATE OF l",
    )
    .bind(&skus)
    .fetch_all(conn)
    .await
}

/// Locks every level of `skus` in active warehouses and the levels `keys` (in any warehouse),
/// in one statement in (sku, warehouse) order: what an order edit may grow into or give back.
/// (`sku = ANY($1 || $2)` at the top keeps it an index scan; under the OR alone it was not.)
pub(crate) async fn lock_skus_and_levels(
    conn: &mut PgConnection,
    skus: &[&str],
    keys: &[(&str, &str)],
) -> Result<Vec<LevelRow>, sqlx::Error> {
    let (key_skus, key_warehouses): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    sqlx::query_as(
        "SELECT l.sku, l.warehouse, l.on_hand, l.reserved, l.backorder_limit, w.priority, w.active, l.reorder_point
           FROM stock_levels l JOIN warehouses w ON w.code = l.warehouse
          WHERE l.sku = ANY($1 || $2)
            AND ((l.sku = ANY($1) AND w.active)
                 OR (l.sku, l.warehouse) IN (SELECT * FROM unnest($2::text[], $3::text[])))
          ORDER BY l.sku, l.warehouse
            FOR UPDATE OF l",
    )
    .bind(skus)
    .bind(&key_skus)
    .bind(&key_warehouses)
    .fetch_all(conn)
    .await
}

/// Locks exactly the given levels.
pub(crate) async fn lock(conn: &mut PgConnection, keys: &[(&str, &str)]) -> Result<Vec<LevelRow>, sqlx::Error> {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    let (skus, warehouses): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
    sqlx::query_as(
        "SELECT l.sku, l.warehouse, l.on_hand, l.reserved, l.backorder_limit, w.priority, w.active, l.reorder_point
           FROM stock_levels l
           JOIN warehouses w ON w.code = l.warehouse
           JOIN unnest($1::text[], $2::text[]) AS k(sku, warehouse)
             ON k.sku = l.sku AND k.warehouse = l.warehouse
          ORDER BY l.sku, l.warehouse
            FOR UPDATE OF l",
    )
    .bind(&skus)
    .bind(&warehouses)
    .fetch_all(conn)
    .await
}

/// One allocation of [`lock_held`], with its level when that was locked.
#[derive(sqlx::FromRow)]
struct HeldRow {
    #[sqlx(flatten)]
    allocation: Allocation,
    on_hand: Option<i64>,
    reserved: Option<i64>,
    backorder_limit: Option<i64>,
    priority: Option<i32>,
    active: Option<bool>,
    reorder_point: Option<i64>,
}

/// Reads the allocations of the given reservations (which the caller has locked, so nobody else
/// changes them) and locks, in (sku, warehouse) order, every level where they still hold units:
/// what a settle may take from, in one round trip. The allocations come in (reservation, line,
/// seq) order; a level as locked, once for each allocation that holds units of it.
pub(crate) async fn lock_held(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<(Vec<Allocation>, Vec<LevelRow>), sqlx::Error> {
    // Both CTEs are materialized: the level lock runs once, in its own order, whatever the join.
    let rows: Vec<HeldRow> = sqlx::query_as(
        "WITH a AS MATERIALIZED (
             SELECT reservation_id, sku, warehouse, line_no, seq, quantity, fulfilled, released
               FROM reservation_allocations WHERE reservation_id = ANY($1)
         ), locked AS MATERIALIZED (
             SELECT l.sku, l.warehouse, l.on_hand, l.reserved, l.backorder_limit, w.priority, w.active, l.reorder_point
               FROM stock_levels l JOIN warehouses w ON w.code = l.warehouse
              WHERE (l.sku, l.warehouse) IN (SELECT sku, warehouse FROM a WHERE quantity > fulfilled + released)
              ORDER BY l.sku, l.warehouse
                FOR UPDATE OF l
         )
         SELECT a.*, k.on_hand, k.reserved, k.backorder_limit, k.priority, k.active, k.reorder_point
           FROM a LEFT JOIN locked k ON k.sku = a.sku AND k.warehouse = a.warehouse
          ORDER BY a.reservation_id, a.line_no, a.seq",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    let mut levels: Vec<LevelRow> = Vec::new();
    let mut allocations = Vec::with_capacity(rows.len());
    for row in rows {
        match (row.on_hand, row.reserved, row.backorder_limit, row.priority, row.active, row.reorder_point) {
            (
                Some(on_hand),
                Some(reserved),
                Some(backorder_limit),
                Some(priority),
                Some(active),
                Some(reorder_point),
            ) => levels.push(LevelRow {
                sku: row.allocation.sku.clone(),
                warehouse: row.allocation.warehouse.clone(),
                on_hand,
                reserved,
                backorder_limit,
                priority,
                active,
                reorder_point,
            }),
            (None, None, None, None, None, None) => {}
            _ => return Err(sqlx::Error::Protocol("a level came back locked in part".into())),
        }
        allocations.push(row.allocation);
    }
    Ok((allocations, levels))
}

/// Reads the levels of the given SKUs in active warehouses without locking them (for plans,
/// which change nothing).
pub(crate) async fn read_skus(conn: &mut PgConnection, skus: &[&str]) -> Result<Vec<LevelRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT l.sku, l.warehouse, l.on_hand, l.reserved, l.backorder_limit, w.priority, w.active, l.reorder_point
           FROM stock_levels l JOIN warehouses w ON w.code = l.warehouse AND w.active
          WHERE l.sku = ANY($1)",
    )
    .bind(skus)
    .fetch_all(conn)
    .await
}

/// The change of one locked level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LevelChange<'a> {
    pub sku: &'a str,
    pub warehouse: &'a str,
    pub on_hand_delta: i64,
    pub reserved_delta: i64,
}

/// A ledger entry to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewEntry {
    pub id: Uuid,
    pub sku: String,
    pub warehouse: String,
    pub kind: EntryKind,
    pub on_hand_delta: i64,
    pub reserved_delta: i64,
    pub on_hand_after: i64,
    pub reserved_after: i64,
    pub reference: Option<String>,
    pub reason: Option<&'static str>,
}

/// Applies every change and writes every ledger entry, outbox event and reservation row of
/// `rows` in one statement (one round trip); returns each changed level's `(sku, warehouse,
/// on_hand, reserved)` as the database has it now.
pub(crate) async fn write(
    conn: &mut PgConnection,
    changes: &[LevelChange<'_>],
    entries: &[NewEntry],
    events: &[NewEvent],
    rows: &RowWrites<'_>,
) -> Result<Vec<(String, String, i64, i64)>, sqlx::Error> {
    let (e, v, a, u, st) = (entries, events, rows.inserted, rows.settled, rows.statuses);
    sqlx::query_as(
        "WITH upd AS (
             UPDATE stock_levels l
                SET on_hand = l.on_hand + d.dh, reserved = l.reserved + d.dr, updated_at = now()
               FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS d(sku, warehouse, dh, dr)
              WHERE l.sku = d.sku AND l.warehouse = d.warehouse
          RETURNING l.sku, l.warehouse, l.on_hand, l.reserved
         ), entries AS (
             INSERT INTO ledger (id, sku, warehouse, kind, on_hand_delta, reserved_delta,
                                 on_hand_after, reserved_after, reference, reason)
             SELECT * FROM unnest($5::uuid[], $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[],
                                  $11::int8[], $12::int8[], $13::text[], $14::text[])
         ), outbox AS (
             INSERT INTO events (type, sku, warehouse, reservation_id, data)
             SELECT * FROM unnest($15::text[], $16::text[], $17::text[], $18::uuid[], $19::jsonb[])
         ), held AS (
             INSERT INTO reservation_allocations (reservation_id, sku, warehouse, line_no, seq, quantity)
             SELECT * FROM unnest($20::uuid[], $21::text[], $22::text[], $23::int4[], $24::int4[], $25::int8[])
         ), settled AS (
             UPDATE reservation_allocations a SET fulfilled = d.fulfilled, released = d.released
               FROM unnest($26::uuid[], $27::text[], $28::text[], $29::int8[], $30::int8[])
                    AS d(reservation_id, sku, warehouse, fulfilled, released)
              WHERE a.reservation_id = d.reservation_id AND a.sku = d.sku AND a.warehouse = d.warehouse
         ), statuses AS (
             UPDATE reservations r SET status = d.status, updated_at = now()
               FROM unnest($31::uuid[], $32::text[]) AS d(id, status)
              WHERE r.id = d.id AND r.status <> d.status
         )
         SELECT sku, warehouse, on_hand, reserved FROM upd",
    )
    .bind(changes.iter().map(|c| c.sku).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.warehouse).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.on_hand_delta).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.reserved_delta).collect::<Vec<_>>())
    .bind(e.iter().map(|e| e.id).collect::<Vec<_>>())
    .bind(e.iter().map(|e| e.sku.as_str()).collect::<Vec<_>>())
    .bind(e.iter().map(|e| e.warehouse.as_str()).collect::<Vec<_>>())
    .bind(e.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
    .bind(e.iter().map(|e| e.on_hand_delta).collect::<Vec<_>>())
    .bind(e.iter().map(|e| e.reserved_delta).collect::<Vec<_>>())
    .bind(e.iter().map(|e| e.on_hand_after).collect::<Vec<_>>())
    .bind(e.iter().map(|e| e.reserved_after).collect::<Vec<_>>())
    .bind(e.iter().map(|e| e.reference.as_deref()).collect::<Vec<_>>())
    .bind(e.iter().map(|e| e.reason).collect::<Vec<_>>())
    .bind(v.iter().map(|v| v.kind.as_str()).collect::<Vec<_>>())
    .bind(v.iter().map(|v| v.sku.as_deref()).collect::<Vec<_>>())
    .bind(v.iter().map(|v| v.warehouse.as_deref()).collect::<Vec<_>>())
    .bind(v.iter().map(|v| v.reservation_id).collect::<Vec<_>>())
    .bind(v.iter().map(|v| &v.data).collect::<Vec<_>>())
    .bind(a.iter().map(|a| a.reservation_id).collect::<Vec<_>>())
    .bind(a.iter().map(|a| a.sku.as_str()).collect::<Vec<_>>())
    .bind(a.iter().map(|a| a.warehouse.as_str()).collect::<Vec<_>>())
    .bind(a.iter().map(|a| a.line_no).collect::<Vec<_>>())
    .bind(a.iter().map(|a| a.seq).collect::<Vec<_>>())
    .bind(a.iter().map(|a| a.quantity).collect::<Vec<_>>())
    .bind(u.iter().map(|a| a.reservation_id).collect::<Vec<_>>())
    .bind(u.iter().map(|a| a.sku.as_str()).collect::<Vec<_>>())
    .bind(u.iter().map(|a| a.warehouse.as_str()).collect::<Vec<_>>())
    .bind(u.iter().map(|a| a.fulfilled).collect::<Vec<_>>())
    .bind(u.iter().map(|a| a.released).collect::<Vec<_>>())
    .bind(st.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind(st.iter().map(|(_, status)| status.as_str()).collect::<Vec<_>>())
    .fetch_all(conn)
    .await
}
