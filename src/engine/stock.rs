//! Ops stock operations: receive, adjust, transfer, replenishment settings.

use serde::Serialize;
use sqlx::PgConnection;

use crate::domain::{AdjustReason, Delta, Quantity, Sku, WarehouseCode};
use crate::error::{ApiError, ShortLine};
use crate::store::catalogue::require_sku_and_warehouses;
use crate::store::stock::{self, Change, EntryKind, Level};

#[derive(Debug, Clone)]
pub struct Receive {
    pub sku: Sku,
    pub warehouse: WarehouseCode,
    pub quantity: Quantity,
    pub reference: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Adjust {
    pub sku: Sku,
    pub warehouse: WarehouseCode,
    pub delta: Delta,
    pub reason: AdjustReason,
    pub reference: Option<String>,
    pub expected_on_hand: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Transfer {
    pub sku: Sku,
    pub from: WarehouseCode,
    pub to: WarehouseCode,
    pub quantity: Quantity,
    pub reference: Option<String>,
}

/// Both sides of a transfer after it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Transferred {
    pub sku: String,
    pub quantity: i64,
    pub from: Level,
    pub to: Level,
}

/// Goods arrived: `on_hand += quantity`, creating the level on first receive.
pub async fn receive(conn: &mut PgConnection, cmd: &Receive) -> Result<Level, ApiError> {
    require_sku_and_warehouses(conn, &cmd.sku, &[&cmd.warehouse]).await?;
    stock::ensure_level(conn, &cmd.sku, &cmd.warehouse).await?;
    stock::lock_levels(conn, &cmd.sku, &[&cmd.warehouse]).await?;
    stock::apply(
        conn,
        &Change {
            sku: cmd.sku.as_str(),
            warehouse: cmd.warehouse.as_str(),
            kind: EntryKind::Receive,
            on_hand_delta: cmd.quantity.get(),
            reserved_delta: 0,
            reference: cmd.reference.as_deref(),
            reason: None,
        },
    )
    .await
}

/// A counted or corrected change of `on_hand`, optionally compare-and-set on `on_hand`.
pub async fn adjust(conn: &mut PgConnection, cmd: &Adjust) -> Result<Level, ApiError> {
    require_sku_and_warehouses(conn, &cmd.sku, &[&cmd.warehouse]).await?;
    stock::ensure_level(conn, &cmd.sku, &cmd.warehouse).await?;
    let level = stock::lock_levels(conn, &cmd.sku, &[&cmd.warehouse])
        .await?
        .pop()
        .ok_or_else(|| ApiError::Internal("stock level missing after ensure_level".into()))?;
    if let Some(expected) = cmd.expected_on_hand
        && expected != level.on_hand
    {
        return Err(ApiError::StaleQuantity { current_on_hand: level.on_hand });
    }
    let delta = cmd.delta.get();
    let on_hand = level.on_hand + delta;
    let available = level.available + delta;
    if on_hand < 0 || available < -level.backorder_limit {
        let requested = -delta;
        return Err(ApiError::InsufficientStock {
            detail: format!(
                "removing {requested} units from {}/{} would leave on_hand {on_hand}, available {available}",
                cmd.sku, cmd.warehouse
            ),
            lines: vec![ShortLine { sku: cmd.sku.to_string(), requested, available: level.available.max(0) }],
        });
    }
    stock::apply(
        conn,
        &Change {
            sku: cmd.sku.as_str(),
            warehouse: cmd.warehouse.as_str(),
            kind: EntryKind::Adjust,
            on_hand_delta: delta,
            reserved_delta: 0,
            reference: cmd.reference.as_deref(),
            reason: Some(cmd.reason.as_str()),
        },
    )
    .await
}

/// Moves on-hand units between two warehouses atomically. The destination level must exist
/// before this transaction starts (see [`prepare_transfer`]), so both rows are only ever locked
/// in warehouse order.
pub async fn transfer(conn: &mut PgConnection, cmd: &Transfer) -> Result<Transferred, ApiError> {
    let levels = stock::lock_levels(conn, &cmd.sku, &[&cmd.from, &cmd.to]).await?;
    let find = |w: &WarehouseCode| levels.iter().find(|l| l.warehouse == w.as_str());
    let quantity = cmd.quantity.get();
    let from_available = find(&cmd.from).map_or(0, |l| l.available);
    if from_available < quantity || find(&cmd.to).is_none() {
        return Err(ApiError::InsufficientStock {
            detail: format!("{} has {from_available} units of {} available, {quantity} requested", cmd.from, cmd.sku),
            lines: vec![ShortLine { sku: cmd.sku.to_string(), requested: quantity, available: from_available.max(0) }],
        });
    }
    let reference = cmd.reference.as_deref();
    let out = Change {
        sku: cmd.sku.as_str(),
        warehouse: cmd.from.as_str(),
        kind: EntryKind::TransferOut,
        on_hand_delta: -quantity,
        reserved_delta: 0,
        reference,
        reason: None,
    };
    let into =
        Change { warehouse: cmd.to.as_str(), kind: EntryKind::TransferIn, on_hand_delta: quantity, ..out.clone() };
    // Write in lock order too, to keep row access patterns uniform.
    let (first, second) = if cmd.from < cmd.to { (out, into) } else { (into, out) };
    let a = stock::apply(conn, &first).await?;
    let b = stock::apply(conn, &second).await?;
    let (from, to) = if a.warehouse == cmd.from.as_str() { (a, b) } else { (b, a) };
    Ok(Transferred { sku: cmd.sku.to_string(), quantity, from, to })
}

/// Checks a transfer's SKU and warehouses and creates the destination level if needed, in its
/// own short transaction before the transfer's. Creating an empty level changes no quantity,
/// so it needs no ledger entry and is harmless if the transfer then fails.
pub async fn prepare_transfer(conn: &mut PgConnection, cmd: &Transfer) -> Result<(), ApiError> {
    require_sku_and_warehouses(conn, &cmd.sku, &[&cmd.from, &cmd.to]).await?;
    stock::ensure_level(conn, &cmd.sku, &cmd.to).await
}
