//! Warehouses and SKUs: creating and changing them.

use sqlx::PgConnection;

use super::error::{Refusal, Result};
use crate::store::catalogue::{self as store, SkuRecord, SkuUpsert, Warehouse, WarehouseUpsert};

/// Creates or updates a warehouse; the flag tells whether it was created.
pub(crate) async fn upsert_warehouse(conn: &mut PgConnection, upsert: &WarehouseUpsert) -> Result<(Warehouse, bool)> {
    Ok(store::upsert_warehouse(conn, upsert).await?)
}

/// Creates or updates a SKU. A new `backorder_limit` is copied onto every stock level of the
/// SKU in the same transaction; lowering it below what a level already has backordered is
/// refused.
pub(crate) async fn upsert_sku(conn: &mut PgConnection, upsert: &SkuUpsert) -> Result<(SkuRecord, bool)> {
    let (record, created) = store::upsert_sku(conn, upsert).await?;
    if !created && upsert.backorder_limit.is_some() {
        let limit = record.backorder_limit;
        let floors = store::lock_floors(conn, &record.sku).await?;
        if let Some((warehouse, available)) = floors.into_iter().find(|(_, available)| *available < -limit) {
            return Err(Refusal::BackorderLimitInUse { warehouse, available, limit }.into());
        }
        store::copy_backorder_limit(conn, &record.sku, limit).await?;
    }
    Ok((record, created))
}
