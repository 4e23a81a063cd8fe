//! `inventory`: a multi-warehouse inventory reservation service in front of PostgreSQL.
//!
//! Data flows one way: `http` (parse, validate) → `domain` (decide) → `engine`/`store`
//! (lock, persist) → `http` (render).

pub mod auth;
pub mod background;
pub mod config;
pub mod db;
pub mod domain;
pub mod engine;
pub mod error;
pub mod http;
pub mod local_pg;
pub mod metrics;
pub mod startup;
pub mod store;
pub mod telemetry;
