//! Warehouses and SKUs.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use crate::domain::{Sku, WarehouseCode};
use crate::error::ApiError;

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Warehouse {
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
pub struct WarehouseUpsert {
    pub code: WarehouseCode,
    pub name: String,
    pub region: Option<String>,
    pub priority: Option<i32>,
    pub active: Option<bool>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct SkuRecord {
    pub sku: String,
    pub name: Option<String>,
    pub backorder_limit: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct SkuUpsert {
    pub sku: Sku,
    pub name: Option<String>,
    pub backorder_limit: Option<i64>,
}

/// Creates or updates a warehouse; the flag tells whether it was created.
pub async fn upsert_warehouse(conn: &mut PgConnection, w: &WarehouseUpsert) -> Result<(Warehouse, bool), ApiError> {
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

pub async fn list_warehouses(conn: &mut PgConnection) -> Result<Vec<Warehouse>, ApiError> {
    Ok(sqlx::query_as("SELECT * FROM warehouses ORDER BY priority, code").fetch_all(conn).await?)
}

pub async fn get_warehouse(conn: &mut PgConnection, code: &str) -> Result<Warehouse, ApiError> {
    sqlx::query_as("SELECT * FROM warehouses WHERE code = $1")
        .bind(code)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("warehouse {code} does not exist")))
}

/// Creates or updates a SKU. A new `backorder_limit` is copied onto every stock level of the
/// SKU in the same transaction (the levels' CHECK constraint enforces it); lowering it below
/// what is already backordered is a 409.
pub async fn upsert_sku(conn: &mut PgConnection, s: &SkuUpsert) -> Result<(SkuRecord, bool), ApiError> {
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

    if !row.inserted && s.backorder_limit.is_some() {
        // Lock the SKU's levels in warehouse order before changing them (see store/mod.rs).
        let floors: Vec<(String, i64)> = sqlx::query_as(
            "SELECT warehouse, on_hand - reserved FROM stock_levels WHERE sku = $1 ORDER BY warehouse FOR UPDATE",
        )
        .bind(s.sku.as_str())
        .fetch_all(&mut *conn)
        .await?;
        let limit = row.sku.backorder_limit;
        if let Some((warehouse, available)) = floors.iter().find(|(_, available)| *available < -limit) {
            return Err(ApiError::conflict(
                "backorder_limit_in_use",
                format!("{warehouse} already has {} units backordered, more than the new limit {limit}", -available),
            )
            .with("warehouse", warehouse.as_str())
            .with("available", *available));
        }
        sqlx::query("UPDATE stock_levels SET backorder_limit = $2 WHERE sku = $1 AND backorder_limit <> $2")
            .bind(s.sku.as_str())
            .bind(limit)
            .execute(&mut *conn)
            .await?;
    }
    Ok((row.sku, row.inserted))
}

#[derive(sqlx::FromRow)]
struct SkuWithFlag {
    #[sqlx(flatten)]
    sku: SkuRecord,
    inserted: bool,
}

pub async fn get_sku(conn: &mut PgConnection, sku: &str) -> Result<SkuRecord, ApiError> {
    sqlx::query_as("SELECT * FROM skus WHERE sku = $1")
        .bind(sku)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("sku {sku} does not exist")))
}

/// 404 unless the SKU and every warehouse exist; returns the SKU's backorder limit.
pub async fn require_sku_and_warehouses(
    conn: &mut PgConnection,
    sku: &Sku,
    warehouses: &[&WarehouseCode],
) -> Result<i64, ApiError> {
    let codes: Vec<&str> = warehouses.iter().map(|w| w.as_str()).collect();
    let (limit, known): (Option<i64>, Vec<String>) = sqlx::query_as(
        "SELECT (SELECT backorder_limit FROM skus WHERE sku = $1),
                ARRAY(SELECT code FROM warehouses WHERE code = ANY($2))",
    )
    .bind(sku.as_str())
    .bind(&codes)
    .fetch_one(conn)
    .await?;
    let limit = limit.ok_or_else(|| ApiError::not_found(format!("sku {sku} does not exist")))?;
    if let Some(missing) = codes.iter().find(|c| !known.iter().any(|k| k == *c)) {
        return Err(ApiError::not_found(format!("warehouse {missing} does not exist")));
    }
    Ok(limit)
}
