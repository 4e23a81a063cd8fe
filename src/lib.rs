//! `inventory`: a multi-warehouse inventory reservation service in front of PostgreSQL.
//!
//! The layers, each importing only those below it:
//!
//! - `http` — routes, extractors, authentication, problem+json: adapts requests to the engine;
//! - `engine` — the operations: idempotency, batching, locking through `store`, deciding;
//! - `store` — every SQL statement and every lock, with the lock order in `store/mod.rs`;
//! - `domain` — validated codes and quantities, allocation, statuses and event rules: no I/O.
//!
//! Beside them: `config`, `auth` (keys and roles), `metrics` (names), `local_pg`, `telemetry`;
//! `startup` and `background` wire everything together.

pub mod auth;
pub(crate) mod background;
pub mod config;
pub mod domain;
pub mod engine;
pub(crate) mod http;
pub mod local_pg;
pub mod metrics;
pub mod startup;
pub mod store;
pub mod telemetry;
