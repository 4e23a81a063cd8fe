//! Integration tests: real PostgreSQL, real HTTP on port 0.

mod auth;
mod batching;
mod bench;
mod catalogue;
mod cli;
mod commit;
mod concurrency;
mod docs;
mod drills;
mod errors;
mod events;
mod expiry;
mod fuzz;
mod helpers;
mod idempotency;
mod import;
mod migrations;
mod model;
mod openapi;
mod operability;
mod paging;
mod proxy;
mod reservations;
mod stock;
mod tls;
mod traces;
