//! SQL. Functions take a connection (usually a transaction owned by the caller); the row
//! locking rules of the service live here.
//!
//! Locking rule, everywhere: stock rows are locked in (sku, warehouse) order, so two
//! transactions touching the same rows always queue instead of deadlocking.

pub mod catalogue;
pub mod check;
pub mod events;
pub mod ledger;
pub mod reservations;
pub mod stock;
