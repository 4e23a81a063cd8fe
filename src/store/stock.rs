//! Stock levels as clients see them: creating them, their replenishment settings, reading and
//! paging. (Locking and changing them: `levels.rs`.)

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use crate::domain::{Sku, WarehouseCode};

/// A stock level as clients see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Level {
    pub sku: String,
    pub warehouse: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
    pub reorder_point: i64,
    pub reorder_quantity: i64,
    pub updated_at: DateTime<Utc>,
}

/// The columns that make a [`Level`], for `concat!` into static SQL.
macro_rules! level_columns {
    () => {
        "sku, warehouse, on_hand, reserved, on_hand - reserved AS available, \
         reorder_point, reorder_quantity, updated_at"
    };
}

/// Creates the (empty) stock level unless it exists, copying the SKU's backorder limit. The SKU
/// row is share-locked meanwhile, so a concurrent change of the limit either sees the new level
/// or is seen by it (locks: SKU row, then level).
pub(crate) async fn ensure_level(
    conn: &mut PgConnection,
    sku: &Sku,
    warehouse: &WarehouseCode,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO stock_levels (sku, warehouse, backorder_limit)
         SELECT sku, $2, backorder_limit FROM skus WHERE sku = $1 FOR SHARE
         ON CONFLICT (sku, warehouse) DO NOTHING",
    )
    .bind(sku.as_str())
    .bind(warehouse.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// One level as it is now.
pub(crate) async fn read_level(
    conn: &mut PgConnection,
    sku: &str,
    warehouse: &str,
) -> Result<Option<Level>, sqlx::Error> {
    sqlx::query_as(concat!("SELECT ", level_columns!(), " FROM stock_levels WHERE sku = $1 AND warehouse = $2"))
        .bind(sku)
        .bind(warehouse)
        .fetch_optional(conn)
        .await
}

/// What a `PUT /v1/stock/{sku}/{warehouse}` sets; `None` keeps the current value.
#[derive(Debug, Clone)]
pub(crate) struct Replenishment {
    pub sku: Sku,
    pub warehouse: WarehouseCode,
    pub reorder_point: Option<i64>,
    pub reorder_quantity: Option<i64>,
}

/// Sets the replenishment settings of a level, creating the level when needed. The flag tells
/// whether the level was created.
pub(crate) async fn set_replenishment(
    conn: &mut PgConnection,
    r: &Replenishment,
) -> Result<(Level, bool), sqlx::Error> {
    let row: LevelWithFlag = sqlx::query_as(concat!(
        "INSERT INTO stock_levels AS s (sku, warehouse, backorder_limit, reorder_point, reorder_quantity)
         SELECT sku, $2, backorder_limit, COALESCE($3, 0), COALESCE($4, 0) FROM skus WHERE sku = $1 FOR SHARE
         ON CONFLICT (sku, warehouse) DO UPDATE SET
             reorder_point = COALESCE($3, s.reorder_point),
             reorder_quantity = COALESCE($4, s.reorder_quantity),
             updated_at = now()
         RETURNING ",
        level_columns!(),
        ", (xmax = 0) AS inserted"
    ))
    .bind(r.sku.as_str())
    .bind(r.warehouse.as_str())
    .bind(r.reorder_point)
    .bind(r.reorder_quantity)
    .fetch_one(conn)
    .await?;
    Ok((row.level, row.inserted))
}

#[derive(sqlx::FromRow)]
struct LevelWithFlag {
    #[sqlx(flatten)]
    level: Level,
    inserted: bool,
}

/// Every level of one SKU, by warehouse.
pub(crate) async fn levels_of_sku(conn: &mut PgConnection, sku: &str) -> Result<Vec<Level>, sqlx::Error> {
    sqlx::query_as(concat!("SELECT ", level_columns!(), " FROM stock_levels WHERE sku = $1 ORDER BY warehouse"))
        .bind(sku)
        .fetch_all(conn)
        .await
}

/// Every level of one SKU as it stood at `as_of`, by warehouse: each level's last ledger entry at
/// or before that moment (`updated_at` is that entry's `at`), or nothing on hand if it had been
/// created by then but had no entry yet; levels that did not exist yet are left out. The
/// replenishment settings are the current ones (they are not in the ledger).
///
/// Ledger `at` is the clock at the insert, after the level's row lock (migration 0009), so per
/// level it follows lock order; equal times are broken by the time-ordered id. Entries written
/// before 0009 carry their transaction's start time, and a level from before 0009 exists from its
/// first entry on.
///
/// Plan: Index Scan on stock_levels_pkey (sku = $1), and per level a Limit 1 over a backward Index
/// Scan on ledger_by_level_at (sku, warehouse, at <= $2): one probe per level, however long its
/// ledger (0.1–0.2 ms at 1.8M entries, 200k per level; without the index ~1 s).
pub(crate) async fn levels_of_sku_as_of(
    conn: &mut PgConnection,
    sku: &str,
    as_of: DateTime<Utc>,
) -> Result<Vec<Level>, sqlx::Error> {
    sqlx::query_as(
        "SELECT l.sku, l.warehouse,
                coalesce(e.on_hand_after, 0) AS on_hand, coalesce(e.reserved_after, 0) AS reserved,
                coalesce(e.on_hand_after - e.reserved_after, 0) AS available,
                l.reorder_point, l.reorder_quantity, coalesce(e.at, l.created_at) AS updated_at
           FROM stock_levels l
           LEFT JOIN LATERAL (
                SELECT g.at, g.on_hand_after, g.reserved_after
                  FROM ledger g
                 WHERE g.sku = l.sku AND g.warehouse = l.warehouse AND g.at <= $2
                 ORDER BY g.at DESC, g.id DESC
                 LIMIT 1) e ON true
          WHERE l.sku = $1 AND (e.at IS NOT NULL OR l.created_at <= $2)
          ORDER BY l.warehouse",
    )
    .bind(sku)
    .bind(as_of)
    .fetch_all(conn)
    .await
}

/// Whether `at` is later than the database's clock: a moment whose levels are not settled yet.
pub(crate) async fn is_in_the_future(conn: &mut PgConnection, at: DateTime<Utc>) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT $1::timestamptz > clock_timestamp()").bind(at).fetch_one(conn).await
}

/// One SKU's available units per active warehouse: `warehouses` and `available` are parallel,
/// in no particular order.
#[derive(Debug, Clone)]
pub(crate) struct SkuAvailability {
    pub sku: String,
    pub warehouses: Vec<String>,
    pub available: Vec<i64>,
}

/// Availability of many SKUs in active warehouses: the product-page read path. One statement,
/// an index range scan per SKU on the primary key, one row per SKU that has levels there (a
/// quarter of the rows of one per level with four warehouses: decoding rows was most of the
/// service's work for a coalesced read).
pub(crate) async fn availability(
    conn: &mut PgConnection,
    skus: &[String],
) -> Result<Vec<SkuAvailability>, sqlx::Error> {
    // Columns by position, not by name: this runs for every product page. The two arrays are
    // parallel: PostgreSQL computes every aggregate of a group in one pass over its rows, and
    // neither has an ORDER BY or DISTINCT of its own that would sort its input apart.
    // Inactive warehouses are left out by a list read once per statement, not by a join: every
    // level's warehouse exists (a foreign key), and the join cost a hash table built for every
    // statement and a probe per row, and grouping by hash where the index scan already delivers
    // each SKU's rows together (~11 % more reads per second, for this query in pgbench as well).
    let rows: Vec<(String, Vec<String>, Vec<i64>)> = sqlx::query_as(
        "SELECT l.sku, array_agg(l.warehouse), array_agg(l.on_hand - l.reserved)
           FROM stock_levels l
          WHERE l.sku = ANY($1)
            AND l.warehouse <> ALL (ARRAY(SELECT code FROM warehouses WHERE NOT active))
          GROUP BY l.sku",
    )
    .bind(skus)
    .fetch_all(conn)
    .await?;
    debug_assert!(rows.iter().all(|(_, w, a)| w.len() == a.len()), "parallel arrays");
    Ok(rows.into_iter().map(|(sku, warehouses, available)| SkuAvailability { sku, warehouses, available }).collect())
}

/// [`availability`] in one sales channel: only its active warehouses, in no particular order
/// (the answer lists them by code). `None` when the channel does not exist.
pub(crate) async fn availability_in_channel(
    conn: &mut PgConnection,
    skus: &[String],
    channel: &str,
) -> Result<Option<Vec<SkuAvailability>>, sqlx::Error> {
    let rows: Vec<(Option<String>, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT l.sku, l.warehouse, l.on_hand - l.reserved
           FROM channels c
           LEFT JOIN (channel_warehouses m
                      JOIN warehouses w ON w.code = m.warehouse AND w.active
                      JOIN stock_levels l ON l.warehouse = m.warehouse AND l.sku = ANY($1))
                  ON m.channel = c.code
          WHERE c.code = $2
          ORDER BY l.sku",
    )
    .bind(skus)
    .bind(channel)
    .fetch_all(conn)
    .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    // The rows come by SKU: one entry per run of the same SKU.
    let mut found: Vec<SkuAvailability> = Vec::new();
    for (sku, warehouse, available) in rows {
        let (Some(sku), Some(warehouse), Some(available)) = (sku, warehouse, available) else { continue };
        if let Some(last) = found.last_mut()
            && last.sku == sku
        {
            last.warehouses.push(warehouse);
            last.available.push(available);
            continue;
        }
        found.push(SkuAvailability { sku, warehouses: vec![warehouse], available: vec![available] });
    }
    Ok(Some(found))
}

/// A filter and position for paging through stock levels in (sku, warehouse) order.
#[derive(Debug, Clone, Default)]
pub(crate) struct LevelFilter {
    pub warehouse: Option<String>,
    pub below_reorder_point: bool,
    pub after: Option<(String, String)>,
    pub limit: i64,
}

/// One page of levels; fetches one row more than asked to know whether another page exists.
pub(crate) async fn page_levels(
    conn: &mut PgConnection,
    page: &LevelFilter,
) -> Result<(Vec<Level>, bool), sqlx::Error> {
    let (after_sku, after_wh) = page.after.clone().unwrap_or_default();
    let mut rows: Vec<Level> = sqlx::query_as(concat!(
        "SELECT ",
        level_columns!(),
        " FROM stock_levels
          WHERE ($1::text IS NULL OR warehouse = $1)
            AND (NOT $2 OR on_hand - reserved <= reorder_point)
            AND (sku, warehouse) > ($3, $4)
          ORDER BY sku, warehouse
          LIMIT $5"
    ))
    .bind(&page.warehouse)
    .bind(page.below_reorder_point)
    .bind(after_sku)
    .bind(after_wh)
    .bind(page.limit + 1)
    .fetch_all(conn)
    .await?;
    let more = rows.len() as i64 > page.limit;
    rows.truncate(page.limit as usize);
    Ok((rows, more))
}
