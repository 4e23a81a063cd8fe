//! Validated domain types and pure rules. Nothing in here does I/O.

pub mod allocation;
mod codes;
mod lifecycle;
mod quantity;
pub(crate) mod webhooks;

pub use allocation::Shortage;
pub(crate) use codes::{ChannelCode, Code, Sku, WarehouseCode, WebhookName};
pub(crate) use lifecycle::EntryKind;
pub use lifecycle::{EventKind, Settle, Status};
pub(crate) use quantity::{AdjustReason, Delta, MAX_QUANTITY, Quantity};

/// Longest accepted free-text field (names, regions, references).
pub(crate) const MAX_TEXT: usize = 255;

/// Free text (names, regions, references): at most [`MAX_TEXT`] characters, no control characters.
pub(crate) fn text(raw: String) -> Result<String, String> {
    if raw.chars().count() > MAX_TEXT {
        Err(format!("must be at most {MAX_TEXT} characters"))
    } else if raw.chars().any(char::is_control) {
        Err("must not contain control characters".into())
    } else {
        Ok(raw)
    }
}

/// One problem with one input field, reported under `errors` in a 422 answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Collects field errors while a request body is parsed into domain types, so that a client
/// learns about every bad field at once instead of one per round trip.
#[derive(Debug, Default)]
pub(crate) struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Parses a required field: a missing value and a parse failure are both recorded.
    pub(crate) fn required<T, R, E>(
        &mut self,
        field: &str,
        raw: Option<R>,
        parse: impl FnOnce(R) -> Result<T, E>,
    ) -> Option<T>
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
    pub(crate) fn optional<T, R, E>(
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
    pub(crate) fn check<T, E: std::fmt::Display>(&mut self, field: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(err) => {
                self.errors.push(FieldError::new(field, err.to_string()));
                None
            }
        }
    }

    /// Records a rule that spans fields.
    pub(crate) fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    /// Ends validation: `Ok(value)` when no field failed, else every collected error.
    pub(crate) fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, Vec<FieldError>> {
        if self.errors.is_empty() {
            // Every field parsed, so `build` can only see `Some`s; `None` would be a bug here.
            build().ok_or_else(|| vec![FieldError::new("body", "is invalid")])
        } else {
            Err(self.errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn positive(raw: i64) -> Result<i64, String> {
        if raw > 0 { Ok(raw) } else { Err(format!("must be positive, got {raw}")) }
    }

    #[test]
    fn every_bad_field_is_collected_and_nothing_is_built() {
        let mut v = Validator::new();
        let a = v.required("a", Some(5), positive);
        let b = v.required("b", None::<i64>, positive);
        let c = v.required("c", Some(-1), positive);
        let d = v.optional("d", None::<i64>, positive);
        let e = v.optional("e", Some(7), positive);
        let f = v.optional("f", Some(0), positive);
        let g = v.check("g", positive(3));
        assert_eq!((a, b, c), (Some(5), None, None));
        assert_eq!((d, e, f, g), (Some(None), Some(Some(7)), None, Some(3)));
        v.fail("lines", "cannot be empty");
        let errors = v.finish(|| Some(())).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["b", "c", "f", "lines"]);
        assert_eq!(errors[0].message, "is required");
        assert_eq!(errors[1].message, "must be positive, got -1");
        assert_eq!(errors[3], FieldError::new("lines", "cannot be empty"));
    }

    #[test]
    fn a_clean_validation_builds_the_value() {
        let mut v = Validator::new();
        let a = v.required("a", Some(2), positive);
        let b = v.optional("b", Some(3), positive);
        assert_eq!(v.finish(|| Some(a? + b??)), Ok(5));
        // A builder that still finds a gap is a bug, reported rather than panicking.
        assert_eq!(Validator::new().finish(|| None::<()>).unwrap_err()[0].field, "body");
    }
}
