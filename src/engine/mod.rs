//! The operations of the service, each one transaction body: they take the caller's
//! transaction, lock through `store`, decide, and write.

pub mod book;
pub mod feed;
pub mod import;
pub mod reservations;
pub mod stock;
