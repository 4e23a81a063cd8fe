//! Warehouses and SKUs: creating and changing them.

use sqlx::PgConnection;

use super::error::{Refusal, Result};
use crate::store::catalogue::{self as store, SkuRecord, SkuUpsert, Warehouse, WarehouseUpsert};
use crate::store::channels::{self, Channel, ChannelUpsert};

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

/// Creates or replaces a sales channel. Every warehouse it names must exist. Reservations made
/// through it before are not touched.
pub(crate) async fn upsert_channel(conn: &mut PgConnection, upsert: &ChannelUpsert) -> Result<(Channel, bool)> {
    let named: Vec<&str> = upsert.warehouses.iter().map(|(w, _)| w.as_str()).collect();
    let (_, unknown) = store::unknown(conn, &[], &named).await?;
    if let Some(first) = named.iter().find(|w| unknown.iter().any(|u| u == *w)) {
        return Err(Refusal::UnknownWarehouse((*first).to_owned()).into());
    }
    Ok(channels::upsert(conn, upsert).await?)
}
