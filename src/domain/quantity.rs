//! Quantities of units and the reasons for manual adjustments.

use std::fmt;

/// The largest quantity (and the largest absolute adjustment) the contract accepts.
pub(crate) const MAX_QUANTITY: i64 = 1_000_000_000;

/// A whole number of units from 1 to 1,000,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Quantity(i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QuantityError {
    #[error("must be between 1 and {MAX_QUANTITY}")]
    OutOfRange,
    #[error("must be non-zero and between -{MAX_QUANTITY} and {MAX_QUANTITY}")]
    BadDelta,
}

impl Quantity {
    pub fn parse(raw: i64) -> Result<Self, QuantityError> {
        if (1..=MAX_QUANTITY).contains(&raw) { Ok(Self(raw)) } else { Err(QuantityError::OutOfRange) }
    }

    pub(crate) fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A signed, non-zero change of `on_hand` within ±1,000,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delta(i64);

impl Delta {
    pub fn parse(raw: i64) -> Result<Self, QuantityError> {
        if raw != 0 && (-MAX_QUANTITY..=MAX_QUANTITY).contains(&raw) {
            Ok(Self(raw))
        } else {
            Err(QuantityError::BadDelta)
        }
    }

    pub(crate) fn get(self) -> i64 {
        self.0
    }
}

/// Why an ops person adjusted a stock level by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdjustReason {
    Count,
    Damage,
    Loss,
    Found,
    Return,
    Correction,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be one of count, damage, loss, found, return, correction")]
pub(crate) struct ReasonError;

impl AdjustReason {
    pub(crate) const ALL: [Self; 6] =
        [Self::Count, Self::Damage, Self::Loss, Self::Found, Self::Return, Self::Correction];

    pub fn parse(raw: &str) -> Result<Self, ReasonError> {
        Ok(match raw {
            "count" => Self::Count,
            "damage" => Self::Damage,
            "loss" => Self::Loss,
            "found" => Self::Found,
            "return" => Self::Return,
            "correction" => Self::Correction,
            _ => return Err(ReasonError),
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Damage => "damage",
            Self::Loss => "loss",
            Self::Found => "found",
            Self::Return => "return",
            Self::Correction => "correction",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_quantity_prints_as_its_number() {
        assert_eq!(Quantity::parse(42).unwrap().to_string(), "42");
        assert_eq!(format!("{:>4}", Quantity::parse(7).unwrap()), "   7");
    }

    #[test]
    fn quantity_bounds_are_inclusive() {
        assert!(Quantity::parse(0).is_err());
        assert_eq!(Quantity::parse(1).map(Quantity::get), Ok(1));
        assert_eq!(Quantity::parse(MAX_QUANTITY).map(Quantity::get), Ok(MAX_QUANTITY));
        assert!(Quantity::parse(MAX_QUANTITY + 1).is_err());
        assert!(Quantity::parse(-1).is_err());
    }

    #[test]
    fn delta_rejects_zero_and_out_of_range() {
        assert!(Delta::parse(0).is_err());
        assert!(Delta::parse(MAX_QUANTITY + 1).is_err());
        assert!(Delta::parse(-MAX_QUANTITY - 1).is_err());
        assert!(Delta::parse(i64::MIN).is_err());
        assert_eq!(Delta::parse(-MAX_QUANTITY).map(Delta::get), Ok(-MAX_QUANTITY));
    }

    #[test]
    fn reasons_round_trip() {
        for r in ["count", "damage", "loss", "found", "return", "correction"] {
            assert_eq!(AdjustReason::parse(r).unwrap().as_str(), r);
        }
        assert!(AdjustReason::parse("theft").is_err());
        assert!(AdjustReason::parse("Count").is_err());
    }

    proptest! {
        #[test]
        fn quantity_accepts_exactly_the_range(n in any::<i64>()) {
            prop_assert_eq!(Quantity::parse(n).is_ok(), (1..=MAX_QUANTITY).contains(&n));
        }

        #[test]
        fn delta_accepts_exactly_the_range(n in any::<i64>()) {
            prop_assert_eq!(Delta::parse(n).is_ok(), n != 0 && (-MAX_QUANTITY..=MAX_QUANTITY).contains(&n));
        }
    }
}
