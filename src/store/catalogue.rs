//! Warehouses and SKUs.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use crate::domain::{Sku, WarehouseCode};

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Warehouse {
    pub code: String,
    pub name: String,
    pub region: Option<String>,
    pub priority: i32,
    pub active: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a `PUT /v1/warehouses/{code}` sets; `None` keeps the current value (or the default).
#[derive(Debug, Clone)]
pub(crate) struct WarehouseUpsert {
    pub code: WarehouseCode,
    pub name: String,
    pub region: Option<String>,
    pub priority: Option<i32>,
    pub active: Option<bool>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct SkuRecord {
    pub sku: String,
    pub name: Option<String>,
    pub backorder_limit: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub(crate) struct SkuUpsert {
    pub sku: Sku,
    pub name: Option<String>,
    pub backorder_limit: Option<i64>,
}

/// Creates or updates a warehouse; the flag tells whether it was created.
pub(crate) async fn upsert_warehouse(
    conn: &mut PgConnection,
    w: &WarehouseUpsert,
) -> Result<(Warehouse, bool), sqlx::Error> {
    let row: (Warehouse, bool) = sqlx::query_as::<_, WarehouseWithFlag>(
        "INSERT INTO warehouses AS w (code, name, region, priority, active)
         VALUES ($1, $2, $3, COALESCE($4, 100), COALESCE($5, true))
         ON CONFLICT (code) DO UPDATE SET
             name = EXCLUDED.name,
             region = COALESCE($3, w.region),
             priority = COALESCE($4, w.priority),
             active = COALESCE($5, w.active),
             updated_at = now()
         RETURNING w.*, (xmax = 0) AS inserted",
    )
    .bind(w.code.as_str())
    .bind(&w.name)
    .bind(&w.region)
    .bind(w.priority)
    .bind(w.active)
    .fetch_one(&mut *conn)
    .await
    .map(Into::into)?;
    Ok(row)
}

#[derive(sqlx::FromRow)]
struct WarehouseWithFlag {
    #[sqlx(flatten)]
    warehouse: Warehouse,
    inserted: bool,
}

impl From<WarehouseWithFlag> for (Warehouse, bool) {
    fn from(w: WarehouseWithFlag) -> Self {
        (w.warehouse, w.inserted)
    }
}

pub(crate) async fn list_warehouses(conn: &mut PgConnection) -> Result<Vec<Warehouse>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM warehouses ORDER BY priority, code").fetch_all(conn).await
}

pub(crate) async fn get_warehouse(conn: &mut PgConnection, code: &str) -> Result<Option<Warehouse>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM warehouses WHERE code = $1").bind(code).fetch_optional(conn).await
}

/// Creates or updates a SKU (the row only; see [`lock_floors`] and [`copy_backorder_limit`]).
/// The flag tells whether it was created.
pub(crate) async fn upsert_sku(conn: &mut PgConnection, s: &SkuUpsert) -> Result<(SkuRecord, bool), sqlx::Error> {
    let row: SkuWithFlag = sqlx::query_as(
        "INSERT INTO skus AS s (sku, name, backorder_limit)
         VALUES ($1, $2, COALESCE($3, 0))
         ON CONFLICT (sku) DO UPDATE SET
             name = COALESCE($2, s.name),
             backorder_limit = COALESCE($3, s.backorder_limit),
             updated_at = now()
         RETURNING s.*, (xmax = 0) AS inserted",
    )
    .bind(s.sku.as_str())
    .bind(&s.name)
    .bind(s.backorder_limit)
    .fetch_one(&mut *conn)
    .await?;
    Ok((row.sku, row.inserted))
}

/// Locks every level of a SKU (in warehouse order) and returns each one's `available`.
pub(crate) async fn lock_floors(conn: &mut PgConnection, sku: &str) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT warehouse, on_hand - reserved FROM stock_levels WHERE sku = $1 ORDER BY warehouse FOR UPDATE",
    )
    .bind(sku)
    .fetch_all(conn)
    .await
}

/// Copies a SKU's backorder limit onto its (locked) levels; their CHECK constraint enforces it.
pub(crate) async fn copy_backorder_limit(conn: &mut PgConnection, sku: &str, limit: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE stock_levels SET backorder_limit = $2 WHERE sku = $1 AND backorder_limit <> $2")
        .bind(sku)
        .bind(limit)
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct SkuWithFlag {
    #[sqlx(flatten)]
    sku: SkuRecord,
    inserted: bool,
}

pub(crate) async fn get_sku(conn: &mut PgConnection, sku: &str) -> Result<Option<SkuRecord>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM skus WHERE sku = $1").bind(sku).fetch_optional(conn).await
}

/// The SKU's backorder limit (`None`: no such SKU) and which of `codes` are warehouses.
pub(crate) async fn find_sku_and_warehouses(
    conn: &mut PgConnection,
    sku: &str,
    codes: &[&str],
) -> Result<(Option<i64>, Vec<String>), sqlx::Error> {
    sqlx::query_as(
        "SELECT (SELECT backorder_limit FROM skus WHERE sku = $1),
                ARRAY(SELECT code FROM warehouses WHERE code = ANY($2))",
    )
    .bind(sku)
    .bind(codes)
    .fetch_one(conn)
    .await
}

/// Of the given SKUs and warehouses, those that do not exist, each sorted.
pub(crate) async fn unknown(
    conn: &mut PgConnection,
    skus: &[&str],
    warehouses: &[&str],
) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    sqlx::query_as(
        "SELECT ARRAY(SELECT s FROM unnest($1::text[]) s WHERE NOT EXISTS (SELECT 1 FROM skus WHERE sku = s) ORDER BY s),
                ARRAY(SELECT w FROM unnest($2::text[]) w WHERE NOT EXISTS (SELECT 1 FROM warehouses WHERE code = w) ORDER BY w)",
    )
    .bind(skus)
    .bind(warehouses)
    .fetch_one(conn)
    .await
}
