//! What the engine answers when an operation does not succeed.
//!
//! A [`Refusal`] is a definite answer about the request: nothing changed, and when it comes from
//! an operation run under an Idempotency-Key, a retry with that key gets the same answer again
//! (it is stored). Every other [`Error`] says the request could not be decided: it is never
//! stored, so a retry runs again. What is stored, retried or run again on its own is decided on
//! these variants alone.

use uuid::Uuid;

use crate::domain::{FieldError, Settle, Shortage, Status};
use crate::store::db::{Trouble, trouble};

/// A definite "no", with a stable code and the details a client needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("sku {0} does not exist")]
    UnknownSku(String),
    #[error("warehouse {0} does not exist")]
    UnknownWarehouse(String),
    #[error("reservation {0} does not exist")]
    UnknownReservation(String),
    #[error("channel {0} does not exist")]
    UnknownChannel(String),
    #[error("webhook {0} does not exist")]
    UnknownWebhook(String),
    /// Not enough stock for every short line (`detail` says how it was measured).
    #[error("{detail}")]
    InsufficientStock { detail: String, lines: Vec<Shortage> },
    #[error("order {order_id} already has reservation {reservation_id}")]
    DuplicateOrder { order_id: String, reservation_id: Uuid },
    #[error("reservation {reservation_id} is {status}")]
    NotActive { reservation_id: Uuid, status: Status },
    /// Only a reservation with nothing fulfilled yet can have its lines changed.
    #[error("reservation {reservation_id} is partly fulfilled; its lines can no longer change")]
    PartlyFulfilled { reservation_id: Uuid },
    /// More would be fulfilled or released than is held.
    #[error("cannot {} {requested} of {sku} at {warehouse}: {held} held", settle.verb())]
    OverSettle { settle: Settle, sku: String, warehouse: String, requested: i64, held: i64 },
    #[error("on_hand is {current_on_hand}, not the expected value")]
    StaleQuantity { current_on_hand: i64 },
    #[error("{warehouse} already has {} units backordered, more than the new limit {limit}", -available)]
    BackorderLimitInUse { warehouse: String, available: i64, limit: i64 },
    #[error("a request with this Idempotency-Key is still being processed; retry shortly")]
    IdempotencyInProgress,
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("{0}")]
    TooManyStreams(String),
    /// Well-formed fields that cannot be applied as they are: rows of an upload, lines pinned
    /// to a warehouse outside the order's channel.
    #[error("{} field(s) are invalid", .0.len())]
    Invalid(Vec<FieldError>),
    /// Rows of an upload naming SKUs or warehouses that do not exist, by line.
    #[error("{} row(s) name an unknown SKU or warehouse (import with create_missing=true to create them)", .0.len())]
    UnknownInRows(Vec<FieldError>),
    /// An upload that is not the CSV it claims to be.
    #[error("{0}")]
    NotCsv(String),
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
}

impl Refusal {
    /// The stable code clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownSku(_)
            | Self::UnknownWarehouse(_)
            | Self::UnknownReservation(_)
            | Self::UnknownChannel(_)
            | Self::UnknownWebhook(_)
            | Self::UnknownInRows(_) => "not_found",
            Self::InsufficientStock { .. } => "insufficient_stock",
            Self::DuplicateOrder { .. } => "duplicate_order",
            Self::NotActive { .. } => "reservation_not_active",
            Self::PartlyFulfilled { .. } => "reservation_partly_fulfilled",
            Self::OverSettle { settle: Settle::Fulfil, .. } => "over_fulfilment",
            Self::OverSettle { settle: Settle::Release, .. } => "over_release",
            Self::StaleQuantity { .. } => "stale_quantity",
            Self::BackorderLimitInUse { .. } => "backorder_limit_in_use",
            Self::IdempotencyInProgress => "idempotency_in_progress",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::TooManyStreams(_) => "too_many_streams",
            Self::Invalid(_) => "validation_failed",
            Self::NotCsv(_) => "malformed_request",
            Self::TooLarge { .. } => "payload_too_large",
        }
    }
}

/// Why an operation has no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The database refused or failed a statement; what that means is [`Error::trouble`].
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Nothing changed, and trying again at once would not help: conflicts kept recurring, the
    /// database is down for a whole batch, or it is not ready (migrations pending).
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// The connection broke while the transaction was committing: the change may or may not
    /// have been applied. Never treated as "nothing changed".
    #[error("the outcome of the commit is unknown: {0}")]
    OutcomeUnknown(String),
    /// Something that cannot happen did; the transaction rolls back.
    #[error("internal error: {0}")]
    Bug(String),
}

impl Error {
    /// Classifies an error of COMMIT itself: an answer from the server (an error it raised)
    /// means the transaction rolled back; anything else (the connection broke after COMMIT
    /// was sent) leaves the outcome unknown.
    pub(crate) fn from_commit(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Database(_) => Self::Database(err),
            other => Self::OutcomeUnknown(other.to_string()),
        }
    }

    /// What kind of database trouble this is, if it is one.
    pub(crate) fn trouble(&self) -> Option<Trouble> {
        match self {
            Self::Database(err) => Some(trouble(err)),
            Self::Unavailable(_) => Some(Trouble::Down),
            _ => None,
        }
    }

    /// Serialization failures and deadlocks: the transaction can be run again as a whole.
    pub(crate) fn is_retryable(&self) -> bool {
        self.trouble() == Some(Trouble::Retry)
    }

    /// A lock or statement timeout: one row (or statement) is stuck, the rest are fine.
    pub(crate) fn is_busy(&self) -> bool {
        self.trouble() == Some(Trouble::Busy)
    }

    /// The database cannot be reached at all (not one row or request's trouble).
    pub(crate) fn is_database_down(&self) -> bool {
        self.trouble() == Some(Trouble::Down)
    }

    /// The SQLSTATE of a database error, if this is one.
    pub(crate) fn sqlstate(&self) -> Option<String> {
        match self {
            Self::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

/// The result of an engine operation.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;
