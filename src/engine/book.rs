//! The locked stock levels of one transaction, changed in memory and written back at once.
//!
//! A transaction locks every level it may touch (through `store::levels`, in (sku, warehouse)
//! order), decides in Rust, records each change here — which checks invariants 1 and 2 and
//! computes the ledger entry's after-values — and then [`Book::flush`] writes all levels and
//! ledger entries in a single set-based statement. The CHECK constraints stay the last line of
//! defence. Everything but `flush` and the constructors that lock is plain memory, testable
//! without a database.

use std::collections::BTreeMap;

use sqlx::PgConnection;
use uuid::Uuid;

use super::error::{Error, Result};
use crate::domain::allocation::Candidate;
use crate::domain::{EntryKind, EventKind};
use crate::store::events::NewEvent;
use crate::store::levels::{self, LevelChange, LevelRow, NewEntry};
use crate::store::reservations::{Allocation, RowWrites};

type Key = (String, String);

/// Why the book did not make a change; nothing was changed. (The operation decides whether
/// that refuses the request or is a bug.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CannotApply {
    /// The level was not locked by this book (or does not exist).
    NotLocked,
    /// The change would break invariant 1 or 2; carries the level's `on_hand` and `available`.
    Floor { on_hand: i64, available: i64 },
}

#[derive(Debug, Default)]
pub(crate) struct Book {
    /// Each level as locked, and as changed so far.
    levels: BTreeMap<Key, LevelRow>,
    locked: BTreeMap<Key, (i64, i64)>,
    entries: Vec<NewEntry>,
    events: Vec<NewEvent>,
}

impl Book {
    /// Locks every level of the given SKUs in active warehouses.
    pub(crate) async fn lock_skus(conn: &mut PgConnection, skus: &[&str]) -> Result<Self> {
        Ok(Self::from_rows(levels::lock_skus(conn, skus).await?))
    }

    /// Locks every level of `skus` in active warehouses and the levels `keys` anywhere.
    pub(crate) async fn lock_skus_and_levels(
        conn: &mut PgConnection,
        skus: &[&str],
        keys: &[(&str, &str)],
    ) -> Result<Self> {
        Ok(Self::from_rows(levels::lock_skus_and_levels(conn, skus, keys).await?))
    }

    /// Locks exactly the given levels.
    pub(crate) async fn lock_levels(conn: &mut PgConnection, keys: &[(&str, &str)]) -> Result<Self> {
        Ok(Self::from_rows(levels::lock(conn, keys).await?))
    }

    /// Reads the allocations of the given (locked) reservations and locks every level where
    /// they still hold units.
    pub(crate) async fn lock_held(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(Vec<Allocation>, Self)> {
        let (allocations, rows) = levels::lock_held(conn, ids).await?;
        Ok((allocations, Self::from_rows(rows)))
    }

    /// Reads levels without locking them (for plans, which change nothing).
    pub(crate) async fn read_skus(conn: &mut PgConnection, skus: &[&str]) -> Result<Self> {
        Ok(Self::from_rows(levels::read_skus(conn, skus).await?))
    }

    fn from_rows(rows: Vec<LevelRow>) -> Self {
        let mut book = Self::default();
        for row in rows {
            let key = (row.sku.clone(), row.warehouse.clone());
            book.locked.insert(key.clone(), (row.on_hand, row.reserved));
            book.levels.insert(key, row);
        }
        book
    }

    pub(crate) fn get(&self, sku: &str, warehouse: &str) -> Option<&LevelRow> {
        self.levels.get(&(sku.to_owned(), warehouse.to_owned()))
    }
    pub(crate) fn has_sku(&self, sku: &str) -> bool {
        self.levels.range((sku.to_owned(), String::new())..).next().is_some_and(|((s, _), _)| s == sku)
    }

    pub(crate) fn has_level(&self, sku: &str, warehouse: &str) -> bool {
        self.get(sku, warehouse).is_some()
    }

    /// The levels of `skus` as allocation candidates, as they stand now.
    pub(crate) fn candidates_of(&self, skus: &[&str]) -> Vec<Candidate> {
        let mut out = Vec::new();
        for (i, sku) in skus.iter().enumerate() {
            if skus[..i].contains(sku) {
                continue;
            }
            let levels = self.levels.range(((*sku).to_owned(), String::new())..).take_while(|((s, _), _)| s == sku);
            out.extend(levels.map(|((sku, warehouse), l)| Candidate {
                sku: sku.clone(),
                warehouse: warehouse.clone(),
                priority: l.priority,
                active: l.active,
                available: l.available(),
                backorder_limit: l.backorder_limit,
            }));
        }
        out
    }

    /// Whether a change would keep invariants 1 and 2, without making it.
    pub(crate) fn allows(
        &self,
        sku: &str,
        warehouse: &str,
        on_hand_delta: i64,
        reserved_delta: i64,
    ) -> Result<(), CannotApply> {
        let level = self.get(sku, warehouse).ok_or(CannotApply::NotLocked)?;
        let on_hand = level.on_hand + on_hand_delta;
        let reserved = level.reserved + reserved_delta;
        if on_hand < 0 || reserved < 0 || on_hand - reserved < -level.backorder_limit {
            return Err(CannotApply::Floor { on_hand: level.on_hand, available: level.available() });
        }
        Ok(())
    }

    /// Records an event for the outbox.
    pub(crate) fn event(&mut self, event: NewEvent) {
        self.events.push(event);
    }

    /// Changes a level and records its ledger entry (returned, for a reason to be added), or
    /// refuses and changes nothing.
    pub(crate) fn apply(
        &mut self,
        sku: &str,
        warehouse: &str,
        kind: EntryKind,
        on_hand_delta: i64,
        reserved_delta: i64,
        reference: Option<&str>,
    ) -> Result<&mut NewEntry, CannotApply> {
        self.allows(sku, warehouse, on_hand_delta, reserved_delta)?;
        let level = self.levels.get_mut(&(sku.to_owned(), warehouse.to_owned())).ok_or(CannotApply::NotLocked)?;
        level.on_hand += on_hand_delta;
        level.reserved += reserved_delta;
        self.entries.push(NewEntry {
            id: Uuid::now_v7(),
            sku: sku.to_owned(),
            warehouse: warehouse.to_owned(),
            kind,
            on_hand_delta,
            reserved_delta,
            on_hand_after: level.on_hand,
            reserved_after: level.reserved,
            reference: reference.map(str::to_owned),
            reason: None,
        });
        Ok(self.entries.last_mut().expect("just pushed"))
    }

    /// Writes every changed level, ledger entry and event in one statement, then verifies that
    /// the database arrived at the values computed here.
    pub(crate) async fn flush(self, conn: &mut PgConnection) -> Result<()> {
        self.flush_with(conn, &RowWrites::default()).await
    }

    /// [`Book::flush`], writing the reservation rows of `rows` in the same statement.
    pub(crate) async fn flush_with(mut self, conn: &mut PgConnection, rows: &RowWrites<'_>) -> Result<()> {
        self.stock_events();
        let no_rows = rows.inserted.is_empty() && rows.settled.is_empty() && rows.statuses.is_empty();
        if self.entries.is_empty() && self.events.is_empty() && no_rows {
            return Ok(());
        }
        let changes: Vec<LevelChange> = self
            .levels
            .iter()
            .filter_map(|(key, level)| {
                let (on_hand0, reserved0) = self.locked[key];
                ((level.on_hand, level.reserved) != (on_hand0, reserved0)).then(|| LevelChange {
                    sku: &key.0,
                    warehouse: &key.1,
                    on_hand_delta: level.on_hand - on_hand0,
                    reserved_delta: level.reserved - reserved0,
                })
            })
            .collect();
        for entry in &self.entries {
            let units = if entry.kind.moves_held_units() { entry.reserved_delta } else { entry.on_hand_delta };
            metrics::counter!(crate::metrics::UNITS, "kind" => entry.kind.as_str()).increment(units.unsigned_abs());
        }
        let written = levels::write(conn, &changes, &self.entries, &self.events, rows).await?;
        // The rows were locked by this transaction, so anything else is a bug: roll back.
        let consistent = written.len() == changes.len()
            && written.iter().all(|(sku, wh, on_hand, reserved)| {
                self.get(sku, wh).is_some_and(|l| (l.on_hand, l.reserved) == (*on_hand, *reserved))
            });
        if consistent { Ok(()) } else { Err(Error::Bug("stock levels changed under a row lock".into())) }
    }
}

impl Book {
    /// Availability crossings of every changed level, on the transition from the locked value
    /// to the final one (see [`EventKind::crossings`]).
    fn stock_events(&mut self) {
        for (key, level) in &self.levels {
            let (on_hand0, reserved0) = self.locked[key];
            let before = on_hand0 - reserved0;
            let after = level.available();
            for kind in EventKind::crossings(before, after, level.reorder_point) {
                self.events.push(NewEvent {
                    kind,
                    sku: Some(key.0.clone()),
                    warehouse: Some(key.1.clone()),
                    reservation_id: None,
                    data: serde_json::json!({
                        "available_before": before,
                        "available": after,
                        "on_hand": level.on_hand,
                        "reserved": level.reserved,
                        "reorder_point": level.reorder_point,
                    }),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(on_hand: i64, reserved: i64, backorder_limit: i64) -> Book {
        Book::from_rows(vec![LevelRow {
            sku: "A".into(),
            warehouse: "W".into(),
            on_hand,
            reserved,
            backorder_limit,
            priority: 1,
            active: true,
            reorder_point: 0,
        }])
    }

    #[test]
    fn refuses_changes_below_the_floors_and_changes_nothing() {
        let mut b = book(3, 1, 2);
        assert_eq!(
            b.apply("A", "W", EntryKind::Reserve, 0, 5, None),
            Err(CannotApply::Floor { on_hand: 3, available: 2 })
        );
        assert_eq!(
            b.apply("A", "W", EntryKind::Fulfil, -4, -1, None),
            Err(CannotApply::Floor { on_hand: 3, available: 2 })
        );
        assert_eq!(b.apply("A", "X", EntryKind::Reserve, 0, 1, None), Err(CannotApply::NotLocked));
        assert_eq!(b.get("A", "W").unwrap().reserved, 1);
        assert!(b.entries.is_empty());
    }

    #[test]
    fn entries_carry_running_after_values() {
        let mut b = book(10, 0, 0);
        b.apply("A", "W", EntryKind::Reserve, 0, 4, Some("r1")).unwrap();
        b.apply("A", "W", EntryKind::Fulfil, -3, -3, Some("r1")).unwrap();
        let after: Vec<(i64, i64)> = b.entries.iter().map(|e| (e.on_hand_after, e.reserved_after)).collect();
        assert_eq!(after, [(10, 4), (7, 1)]);
    }
}
