//! Ops stock operations: receive, adjust, transfer, replenishment settings.

use serde::Serialize;
use sqlx::PgConnection;

use super::book::Book;
use super::error::{Error, Refusal, Result};
use crate::domain::{AdjustReason, Delta, EntryKind, Quantity, Shortage, Sku, WarehouseCode};
use crate::store::catalogue;
use crate::store::stock::{self, Level, Replenishment};

#[derive(Debug, Clone)]
pub(crate) struct Receive {
    pub sku: Sku,
    pub warehouse: WarehouseCode,
    pub quantity: Quantity,
    pub reference: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Adjust {
    pub sku: Sku,
    pub warehouse: WarehouseCode,
    pub delta: Delta,
    pub reason: AdjustReason,
    pub reference: Option<String>,
    pub expected_on_hand: Option<i64>,
}

#[derive(Debug, Clone)]
pub(crate) struct Transfer {
    pub sku: Sku,
    pub from: WarehouseCode,
    pub to: WarehouseCode,
    pub quantity: Quantity,
    pub reference: Option<String>,
}

/// Both sides of a transfer after it happened.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Transferred {
    pub sku: String,
    pub quantity: i64,
    pub from: Level,
    pub to: Level,
}

/// Refuses unless the SKU and every warehouse exist; returns the SKU's backorder limit.
pub(crate) async fn require_sku_and_warehouses(
    conn: &mut PgConnection,
    sku: &Sku,
    warehouses: &[&WarehouseCode],
) -> Result<i64> {
    let codes: Vec<&str> = warehouses.iter().map(|w| w.as_str()).collect();
    let (limit, known) = catalogue::find_sku_and_warehouses(conn, sku.as_str(), &codes).await?;
    let limit = limit.ok_or_else(|| Refusal::UnknownSku(sku.to_string()))?;
    if let Some(missing) = codes.iter().find(|c| !known.iter().any(|k| k == *c)) {
        return Err(Refusal::UnknownWarehouse((*missing).to_owned()).into());
    }
    Ok(limit)
}

/// One level as it is now; it must exist (it was locked or created in this transaction).
async fn level_now(conn: &mut PgConnection, sku: &str, warehouse: &str) -> Result<Level> {
    stock::read_level(conn, sku, warehouse)
        .await?
        .ok_or_else(|| Error::Bug(format!("stock level {sku}/{warehouse} vanished")))
}

/// Sets the replenishment settings of a level, creating the level when needed (`None` keeps
/// the current value); the flag tells whether the level was created.
pub(crate) async fn set_replenishment(conn: &mut PgConnection, settings: &Replenishment) -> Result<(Level, bool)> {
    require_sku_and_warehouses(conn, &settings.sku, &[&settings.warehouse]).await?;
    Ok(stock::set_replenishment(conn, settings).await?)
}

/// Locks one level, applies one change through the book (ledger entry and events included)
/// and returns the level as it is now.
async fn change_one(
    conn: &mut PgConnection,
    sku: &Sku,
    warehouse: &WarehouseCode,
    decide: impl FnOnce(&mut Book) -> Result<()>,
) -> Result<Level> {
    let mut book = Book::lock_levels(conn, &[(sku.as_str(), warehouse.as_str())]).await?;
    decide(&mut book)?;
    book.flush(conn).await?;
    level_now(conn, sku.as_str(), warehouse.as_str()).await
}

/// Goods arrived: `on_hand += quantity`, creating the level on first receive.
pub(crate) async fn receive(conn: &mut PgConnection, cmd: &Receive) -> Result<Level> {
    require_sku_and_warehouses(conn, &cmd.sku, &[&cmd.warehouse]).await?;
    stock::ensure_level(conn, &cmd.sku, &cmd.warehouse).await?;
    change_one(conn, &cmd.sku, &cmd.warehouse, |book| {
        let (sku, wh) = (cmd.sku.as_str(), cmd.warehouse.as_str());
        book.apply(sku, wh, EntryKind::Receive, cmd.quantity.get(), 0, cmd.reference.as_deref())
            .map(drop)
            .map_err(|_| Error::Bug(format!("cannot receive into {sku}/{wh}")))
    })
    .await
}

/// A counted or corrected change of `on_hand`, optionally compare-and-set on `on_hand`.
pub(crate) async fn adjust(conn: &mut PgConnection, cmd: &Adjust) -> Result<Level> {
    require_sku_and_warehouses(conn, &cmd.sku, &[&cmd.warehouse]).await?;
    stock::ensure_level(conn, &cmd.sku, &cmd.warehouse).await?;
    change_one(conn, &cmd.sku, &cmd.warehouse, |book| {
        let (sku, wh) = (cmd.sku.as_str(), cmd.warehouse.as_str());
        let level = book.get(sku, wh).ok_or_else(|| Error::Bug("level missing after ensure_level".into()))?;
        if let Some(expected) = cmd.expected_on_hand
            && expected != level.on_hand
        {
            return Err(Refusal::StaleQuantity { current_on_hand: level.on_hand }.into());
        }
        let delta = cmd.delta.get();
        let available = level.available();
        book.apply(sku, wh, EntryKind::Adjust, delta, 0, cmd.reference.as_deref())
            .map(|entry| entry.reason = Some(cmd.reason.as_str()))
            .map_err(|_| {
                Refusal::InsufficientStock {
                    detail: format!(
                        "removing {} units from {sku}/{wh} would break its floor (available {available})",
                        -delta
                    ),
                    lines: vec![Shortage { sku: sku.to_owned(), requested: -delta, available: available.max(0) }],
                }
                .into()
            })
    })
    .await
}

/// Moves on-hand units between two warehouses atomically, creating the destination level when
/// needed. That creation is part of the transfer's transaction, so a refused transfer leaves
/// nothing behind. It is deadlock-free although the new row is locked before the other one:
/// until commit nobody else can see it, and whoever waits on its key holds no row lock yet
/// (every operation creates its levels before it locks any).
pub(crate) async fn transfer(conn: &mut PgConnection, cmd: &Transfer) -> Result<Transferred> {
    require_sku_and_warehouses(conn, &cmd.sku, &[&cmd.from, &cmd.to]).await?;
    stock::ensure_level(conn, &cmd.sku, &cmd.to).await?;
    let (sku, from, to) = (cmd.sku.as_str(), cmd.from.as_str(), cmd.to.as_str());
    let pairs = [(sku, from), (sku, to)];
    let mut book = Book::lock_levels(conn, if from == to { &pairs[..1] } else { &pairs }).await?;
    let quantity = cmd.quantity.get();
    let from_available = book.get(sku, from).map_or(0, |l| l.available());
    let short = || short_transfer(cmd, from_available);
    // A move within one warehouse is checked like any move, and changes nothing.
    if from == to {
        if from_available < quantity {
            return Err(short().into());
        }
        let level = level_now(conn, sku, from).await?;
        return Ok(Transferred { sku: sku.to_owned(), quantity, from: level.clone(), to: level });
    }
    // A transfer moves available units only: never reserved ones, never backorder capacity.
    if from_available < quantity || !book.has_level(sku, to) {
        return Err(short().into());
    }
    let reference = cmd.reference.as_deref();
    book.apply(sku, from, EntryKind::TransferOut, -quantity, 0, reference).map_err(|_| short())?;
    book.apply(sku, to, EntryKind::TransferIn, quantity, 0, reference).map_err(|_| short())?;
    book.flush(conn).await?;
    let from = level_now(conn, sku, from).await?;
    let to = level_now(conn, sku, to).await?;
    Ok(Transferred { sku: sku.to_owned(), quantity, from, to })
}

fn short_transfer(cmd: &Transfer, available: i64) -> Refusal {
    let quantity = cmd.quantity.get();
    Refusal::InsufficientStock {
        detail: format!("{} has {available} units of {} available, {quantity} requested", cmd.from, cmd.sku),
        lines: vec![Shortage { sku: cmd.sku.to_string(), requested: quantity, available: available.max(0) }],
    }
}
