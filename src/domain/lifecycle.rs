//! The kinds the service records: reservation statuses, ledger entry kinds and event types, and
//! the rules that say when a change produces which.

use std::fmt;

/// Where a reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Fulfilled,
    Released,
    Expired,
}

impl Status {
    pub const ALL: [Self; 4] = [Self::Active, Self::Fulfilled, Self::Released, Self::Expired];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Fulfilled => "fulfilled",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }

    /// The status stored as `raw`; `None` for a value the service never writes.
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// The contract's end-state rule: active while anything is held; once nothing is, fulfilled
    /// when any unit was fulfilled, else expired (by the sweep) or released.
    pub fn after(held: i64, fulfilled: i64, by_expiry: bool) -> Self {
        if held > 0 {
            Self::Active
        } else if fulfilled > 0 {
            Self::Fulfilled
        } else if by_expiry {
            Self::Expired
        } else {
            Self::Released
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which of fulfil (deduct held units) and release (give them back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Fulfil,
    Release,
}

impl Settle {
    pub fn verb(self) -> &'static str {
        match self {
            Self::Fulfil => "fulfil",
            Self::Release => "release",
        }
    }
}

/// The kinds of ledger entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Receive,
    Adjust,
    TransferOut,
    TransferIn,
    Reserve,
    Release,
    Expire,
    Fulfil,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Receive => "receive",
            Self::Adjust => "adjust",
            Self::TransferOut => "transfer_out",
            Self::TransferIn => "transfer_in",
            Self::Reserve => "reserve",
            Self::Release => "release",
            Self::Expire => "expire",
            Self::Fulfil => "fulfil",
        }
    }

    /// Whether the entry moves held units (`reserved`) rather than physical ones (`on_hand`).
    pub fn moves_held_units(self) -> bool {
        matches!(self, Self::Reserve | Self::Release | Self::Expire)
    }
}

/// Every event type of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    OutOfStock,
    BackInStock,
    Low,
    Created,
    /// An open reservation's lines were changed.
    Modified,
    Fulfilled,
    Released,
    Expired,
}

impl EventKind {
    pub const ALL: [Self; 8] = [
        Self::OutOfStock,
        Self::BackInStock,
        Self::Low,
        Self::Created,
        Self::Modified,
        Self::Fulfilled,
        Self::Released,
        Self::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfStock => "stock.out_of_stock",
            Self::BackInStock => "stock.back_in_stock",
            Self::Low => "stock.low",
            Self::Created => "reservation.created",
            Self::Modified => "reservation.modified",
            Self::Fulfilled => "reservation.fulfilled",
            Self::Released => "reservation.released",
            Self::Expired => "reservation.expired",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == raw)
    }

    /// The event of a reservation reaching `status` (`Active`: it was just created).
    pub fn of_reservation(status: Status) -> Self {
        match status {
            Status::Active => Self::Created,
            Status::Fulfilled => Self::Fulfilled,
            Status::Released => Self::Released,
            Status::Expired => Self::Expired,
        }
    }

    /// The stock events of one level's availability going from `before` to `after` in one
    /// transaction (not on every intermediate change). `import` states the same rules in SQL;
    /// a test holds the two together.
    pub fn crossings(before: i64, after: i64, reorder_point: i64) -> Vec<Self> {
        let mut kinds = Vec::new();
        if before > 0 && after <= 0 {
            kinds.push(Self::OutOfStock);
        }
        if before <= 0 && after > 0 {
            kinds.push(Self::BackInStock);
        }
        if reorder_point > 0 && before > reorder_point && after <= reorder_point {
            kinds.push(Self::Low);
        }
        kinds
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_none() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Status::parse("cancelled"), None);
        assert_eq!(EventKind::parse("stock.gone"), None);
    }

    #[test]
    fn the_end_state_rule_prefers_fulfilled_then_the_cause() {
        assert_eq!(Status::after(1, 5, true), Status::Active);
        assert_eq!(Status::after(0, 1, true), Status::Fulfilled);
        assert_eq!(Status::after(0, 0, true), Status::Expired);
        assert_eq!(Status::after(0, 0, false), Status::Released);
    }

    #[test]
    fn crossings_fire_on_the_edge_only() {
        use EventKind::*;
        assert_eq!(EventKind::crossings(1, 0, 0), [OutOfStock]);
        assert_eq!(EventKind::crossings(0, -2, 0), []);
        assert_eq!(EventKind::crossings(-1, 1, 0), [BackInStock]);
        assert_eq!(EventKind::crossings(6, 5, 5), [Low]);
        assert_eq!(EventKind::crossings(5, 4, 5), []);
        assert_eq!(EventKind::crossings(6, 0, 5), [OutOfStock, Low]);
        assert_eq!(EventKind::crossings(6, 0, 0), [OutOfStock]);
    }
}
