//! Validated domain types and pure rules. Nothing in here does I/O.

pub mod allocation;
mod codes;
mod quantity;

pub use codes::{Code, Sku, WarehouseCode};
pub use quantity::{AdjustReason, Delta, MAX_QUANTITY, Quantity};

/// One problem with one input field, reported under `errors` in a 422 answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Collects field errors while a request body is parsed into domain types, so that a client
/// learns about every bad field at once instead of one per round trip.
#[derive(Debug, Default)]
pub struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a required field: a missing value and a parse failure are both recorded.
    pub fn required<T, R, E>(&mut self, field: &str, raw: Option<R>, parse: impl FnOnce(R) -> Result<T, E>) -> Option<T>
    where
        E: std::fmt::Display,
    {
        match raw {
            None => {
                self.errors.push(FieldError::new(field, "is required"));
                None
            }
            Some(raw) => self.check(field, parse(raw)),
        }
    }

    /// Parses an optional field: absent is fine, a present but bad value is recorded.
    /// The outer `Option` is `None` when the value was bad.
    pub fn optional<T, R, E>(
        &mut self,
        field: &str,
        raw: Option<R>,
        parse: impl FnOnce(R) -> Result<T, E>,
    ) -> Option<Option<T>>
    where
        E: std::fmt::Display,
    {
        match raw {
            None => Some(None),
            Some(raw) => self.check(field, parse(raw)).map(Some),
        }
    }

    /// Records the error of a parse result, if any.
    pub fn check<T, E: std::fmt::Display>(&mut self, field: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(err) => {
                self.errors.push(FieldError::new(field, err.to_string()));
                None
            }
        }
    }

    /// Records a rule that spans fields.
    pub fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// Ends validation: `Ok(value)` when no field failed, else every collected error.
    pub fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, Vec<FieldError>> {
        if self.errors.is_empty() {
            // Every field parsed, so `build` can only see `Some`s; `None` would be a bug here.
            build().ok_or_else(|| vec![FieldError::new("body", "is invalid")])
        } else {
            Err(self.errors)
        }
    }
}
