//! Integration tests: real PostgreSQL, real HTTP on port 0.

mod catalogue;
mod cli;
mod concurrency;
mod errors;
mod helpers;
mod paging;
mod stock;
