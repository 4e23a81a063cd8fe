//! Every SQL statement of the service (the benchmark binary has its own), and every lock. Functions take a connection (usually a
//! transaction the caller owns) and return `sqlx::Error`; what an error means is `db::trouble`.
//!
//! Lock order — every transaction takes its locks in this order, so two transactions that
//! touch the same rows queue instead of deadlocking:
//!
//! 1. the idempotency key's advisory lock (`idempotency::claim`), and the writer's shared
//!    advisory lock taken right after BEGIN (`db::begin_writer`);
//! 2. reservation rows (`reservations::lock`, `reservations::lock_overdue`), in the order of
//!    their unique `(order_id, channel)` for new ones (`reservations::insert_many`);
//! 3. SKU rows, shared, when a level is created from them (`stock::ensure_level`,
//!    `import::lock_and_create_levels`);
//! 4. stock levels, in (sku, warehouse) order (`levels::lock_skus`, `levels::lock_skus_and_levels`, `levels::lock`,
//!    `levels::lock_held`, `catalogue::lock_floors`, `import::lock_and_create_levels`); a level created in the same
//!    transaction is invisible to others until commit, so locking it first cannot deadlock;
//! 5. the ledger, event and new allocation rows written with them, in the same statement
//!    (`levels::write`) — new rows, locked by nobody else. The relay (`events::relay`) runs one at a time under its own
//!    advisory lock, reads only committed events and inserts their ids (`event_ids`).
//!
//! A first load (`import::claim_first_load`, into a database without stock levels) instead
//! takes the skus, warehouses, stock_levels and ledger tables exclusively, right after step 1
//! and before any row lock, in one statement. Should it deadlock with a transaction that holds
//! one of them and waits for another, or wait longer than the lock timeout, it lets go of them
//! and imports row by row.

pub(crate) mod catalogue;
pub(crate) mod channels;
pub mod db;
pub mod events;
pub(crate) mod idempotency;
pub mod import;
pub mod invariants;
pub(crate) mod ledger;
pub(crate) mod levels;
pub mod replica;
pub mod reservations;
pub(crate) mod stock;
pub(crate) mod webhooks;
