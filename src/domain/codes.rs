//! Identifiers of warehouses and SKUs.

use std::fmt;

/// Why a string is not a valid code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CodeError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most 64 characters")]
    TooLong,
    #[error("must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$")]
    BadCharacters,
}

/// A string matching `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`: the shape of both warehouse codes
/// and SKUs in the contract.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Code(String);

impl Code {
    pub fn parse(raw: impl Into<String>) -> Result<Self, CodeError> {
        let raw = raw.into();
        let bytes = raw.as_bytes();
        let Some(first) = bytes.first() else {
            return Err(CodeError::Empty);
        };
        if bytes.len() > 64 {
            return Err(CodeError::TooLong);
        }
        let rest_ok = bytes[1..].iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !first.is_ascii_alphanumeric() || !rest_ok {
            return Err(CodeError::BadCharacters);
        }
        Ok(Self(raw))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn into_string(self) -> String {
        self.0
    }
}

macro_rules! code_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub(crate) struct $name(Code);

        impl $name {
            pub fn parse(raw: impl Into<String>) -> Result<Self, CodeError> {
                Code::parse(raw).map(Self)
            }

            pub(crate) fn as_str(&self) -> &str {
                self.0.as_str()
            }

            pub(crate) fn into_string(self) -> String {
                self.0.into_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    };
}

code_newtype!(
    /// A stock keeping unit identifier.
    Sku
);
code_newtype!(
    /// A warehouse code.
    WarehouseCode
);
code_newtype!(
    /// A sales channel's code.
    ChannelCode
);
code_newtype!(
    /// The name of a webhook subscription (the same shape as a warehouse code).
    WebhookName
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_code_gives_back_the_text_it_was_parsed_from() {
        assert_eq!(Code::parse("WH-1.b").unwrap().into_string(), "WH-1.b");
        assert_eq!(Code::parse("x_9").unwrap().as_str(), "x_9");
    }

    #[test]
    fn accepts_the_contract_examples() {
        for ok in ["A", "WH-1", "sku_42.blue", "0", &"x".repeat(64)] {
            assert!(Sku::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_codes_with_a_reason() {
        assert_eq!(Sku::parse(""), Err(CodeError::Empty));
        assert_eq!(Sku::parse("x".repeat(65)), Err(CodeError::TooLong));
        for bad in ["-a", ".a", "_a", "a b", "a/b", "ä", "a\n", "a:b"] {
            assert_eq!(WarehouseCode::parse(bad), Err(CodeError::BadCharacters), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn every_string_of_the_pattern_parses_and_round_trips(s in "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}") {
            let sku = Sku::parse(s.clone()).unwrap();
            prop_assert_eq!(sku.as_str(), s.as_str());
        }

        #[test]
        fn parse_agrees_with_the_pattern(s in "\\PC{0,70}") {
            let matches = !s.is_empty()
                && s.len() <= 64
                && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            prop_assert_eq!(Code::parse(s).is_ok(), matches);
        }
    }
}
