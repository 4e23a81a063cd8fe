//! Ops stock operations: receive, adjust, transfer, replenishment settings.

use serde::Serialize;
use sqlx::PgConnection;

use super::book::Book;
use crate::domain::{AdjustReason, Delta, Quantity, Sku, WarehouseCode};
use crate::error::{ApiError, ShortLine};
use crate::store::catalogue::require_sku_and_warehouses;
use crate::store::stock::{self, EntryKind, Level};

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
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Transferred {
    pub sku: String,
    pub quantity: i64,
    pub from: Level,
    pub to: Level,
}

/// Locks one level, applies one change through the book (ledger entry and events included)
/// and returns the level as it is now.
async fn change_one(
    conn: &mut PgConnection,
    sku: &Sku,
    warehouse: &WarehouseCode,
    decide: impl FnOnce(&mut Book) -> Result<(), ApiError>,
) -> Result<Level, ApiError> {
    let mut book = Book::lock_levels(conn, &[(sku.as_str(), warehouse.as_str())]).await?;
    decide(&mut book)?;
    book.flush(conn).await?;
    stock::read_level(conn, sku.as_str(), warehouse.as_str()).await
}

/// Goods arrived: `on_hand += quantity`, creating the level on first receive.
pub async fn receive(conn: &mut PgConnection, cmd: &Receive) -> Result<Level, ApiError> {
    require_sku_and_warehouses(conn, &cmd.sku, &[&cmd.warehouse]).await?;
    stock::ensure_level(conn, &cmd.sku, &cmd.warehouse).await?;
    change_one(conn, &cmd.sku, &cmd.warehouse, |book| {
        let (sku, wh) = (cmd.sku.as_str(), cmd.warehouse.as_str());
        book.apply(sku, wh, EntryKind::Receive, cmd.quantity.get(), 0, cmd.reference.as_deref())
            .map_err(|_| ApiError::Internal(format!("cannot receive into {sku}/{wh}")))
    })
    .await
}

/// A counted or corrected change of `on_hand`, optionally compare-and-set on `on_hand`.
pub async fn adjust(conn: &mut PgConnection, cmd: &Adjust) -> Result<Level, ApiError> {
    require_sku_and_warehouses(conn, &cmd.sku, &[&cmd.warehouse]).await?;
    stock::ensure_level(conn, &cmd.sku, &cmd.warehouse).await?;
    change_one(conn, &cmd.sku, &cmd.warehouse, |book| {
        let (sku, wh) = (cmd.sku.as_str(), cmd.warehouse.as_str());
        let level = book.get(sku, wh).ok_or_else(|| ApiError::Internal("level missing after ensure_level".into()))?;
        if let Some(expected) = cmd.expected_on_hand
            && expected != level.on_hand
        {
            return Err(ApiError::StaleQuantity { current_on_hand: level.on_hand });
        }
        let delta = cmd.delta.get();
        let available = level.available();
        book.apply_with_reason(
            sku,
            wh,
            EntryKind::Adjust,
            delta,
            0,
            cmd.reference.as_deref(),
            Some(cmd.reason.as_str()),
        )
        .map_err(|_| ApiError::InsufficientStock {
            detail: format!("removing {} units from {sku}/{wh} would break its floor (available {available})", -delta),
            lines: vec![ShortLine { sku: sku.to_owned(), requested: -delta, available: available.max(0) }],
        })
    })
    .await
}

/// Moves on-hand units between two warehouses atomically, creating the destination level when
/// needed. That creation is part of the transfer's transaction, so a refused transfer leaves
/// nothing behind. It is deadlock-free although the new row is locked before the other one:
/// until commit nobody else can see it, and whoever waits on its key holds no row lock yet
/// (every operation creates its levels before it locks any).
pub async fn transfer(conn: &mut PgConnection, cmd: &Transfer) -> Result<Transferred, ApiError> {
    require_sku_and_warehouses(conn, &cmd.sku, &[&cmd.from, &cmd.to]).await?;
    stock::ensure_level(conn, &cmd.sku, &cmd.to).await?;
    let (sku, from, to) = (cmd.sku.as_str(), cmd.from.as_str(), cmd.to.as_str());
    let mut book = Book::lock_levels(conn, &[(sku, from), (sku, to)]).await?;
    let quantity = cmd.quantity.get();
    let from_available = book.get(sku, from).map_or(0, |l| l.available());
    let short = || short_transfer(cmd, from_available);
    // A transfer moves available units only: never reserved ones, never backorder capacity.
    if from_available < quantity || !book.has_level(sku, to) {
        return Err(short());
    }
    let reference = cmd.reference.as_deref();
    book.apply(sku, from, EntryKind::TransferOut, -quantity, 0, reference).map_err(|_| short())?;
    book.apply(sku, to, EntryKind::TransferIn, quantity, 0, reference).map_err(|_| short())?;
    book.flush(conn).await?;
    let from = stock::read_level(conn, sku, from).await?;
    let to = stock::read_level(conn, sku, to).await?;
    Ok(Transferred { sku: sku.to_owned(), quantity, from, to })
}

fn short_transfer(cmd: &Transfer, available: i64) -> ApiError {
    let quantity = cmd.quantity.get();
    ApiError::InsufficientStock {
        detail: format!("{} has {available} units of {} available, {quantity} requested", cmd.from, cmd.sku),
        lines: vec![ShortLine { sku: cmd.sku.to_string(), requested: quantity, available: available.max(0) }],
    }
}
