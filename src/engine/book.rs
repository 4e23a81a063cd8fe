//! The locked stock levels of one transaction, changed in memory and written back at once.
//!
//! A transaction locks every level it may touch (in (sku, warehouse) order), decides in Rust,
//! records each change here — which checks invariants 1 and 2 and computes the ledger entry's
//! after-values — and then [`Book::flush`] writes all levels and ledger entries in a single
//! set-based statement. The CHECK constraints stay the last line of defence.

use std::collections::BTreeMap;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::allocation::Candidate;
use crate::error::ApiError;
use crate::store::stock::EntryKind;

/// A level as locked, and as changed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    pub on_hand: i64,
    pub reserved: i64,
    pub backorder_limit: i64,
    pub priority: i32,
    pub active: bool,
    pub reorder_point: i64,
}

impl Level {
    pub fn available(&self) -> i64 {
        self.on_hand - self.reserved
    }
}

type Key = (String, String);

#[derive(Debug, Clone)]
struct Entry {
    id: Uuid,
    sku: String,
    warehouse: String,
    kind: EntryKind,
    on_hand_delta: i64,
    reserved_delta: i64,
    on_hand_after: i64,
    reserved_after: i64,
    reference: Option<String>,
    reason: Option<&'static str>,
}

/// Why a change was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The level was not locked by this book (or does not exist).
    Unknown,
    /// The change would break invariant 1 or 2; carries the level's `on_hand` and `available`.
    Floor { on_hand: i64, available: i64 },
}

#[derive(Debug, Default)]
pub struct Book {
    levels: BTreeMap<Key, Level>,
    locked: BTreeMap<Key, (i64, i64)>,
    entries: Vec<Entry>,
    events: Vec<Event>,
}

/// An event for the outbox, written by [`Book::flush`] in the same transaction.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: &'static str,
    pub sku: Option<String>,
    pub warehouse: Option<String>,
    pub reservation_id: Option<Uuid>,
    pub data: serde_json::Value,
}

#[derive(sqlx::FromRow)]
struct Row {
    sku: String,
    warehouse: String,
    on_hand: i64,
    reserved: i64,
    backorder_limit: i64,
    priority: i32,
    active: bool,
    reorder_point: i64,
}

impl Book {
    /// Locks every level of the given SKUs in active warehouses (the only ones that take new
    /// reservations), in (sku, warehouse) order.
    pub async fn lock_skus(conn: &mut PgConnection, skus: &[&str]) -> Result<Self, ApiError> {
        let mut skus = skus.to_vec();
        skus.sort_unstable();
        skus.dedup();
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT l.sku, l.warehouse, l.on_hand, l.reserved, l.backorder_limit, w.priority, w.active, l.reorder_point
               FROM stock_levels l JOIN warehouses w ON w.code = l.warehouse AND w.active
              WHERE l.sku = ANY($1)
              ORDER BY l.sku, l.warehouse
                FOR UPDATE OF l",
        )
        .bind(&skus)
        .fetch_all(conn)
        .await?;
        Ok(Self::from_rows(rows))
    }

    /// Locks exactly the given levels, in (sku, warehouse) order.
    pub async fn lock_levels(conn: &mut PgConnection, keys: &[(&str, &str)]) -> Result<Self, ApiError> {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let (skus, warehouses): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT l.sku, l.warehouse, l.on_hand, l.reserved, l.backorder_limit, w.priority, w.active, l.reorder_point
               FROM stock_levels l
               JOIN warehouses w ON w.code = l.warehouse
               JOIN unnest($1::text[], $2::text[]) AS k(sku, warehouse)
                 ON k.sku = l.sku AND k.warehouse = l.warehouse
              ORDER BY l.sku, l.warehouse
                FOR UPDATE OF l",
        )
        .bind(&skus)
        .bind(&warehouses)
        .fetch_all(conn)
        .await?;
        Ok(Self::from_rows(rows))
    }

    /// Reads levels without locking them (for plans, which change nothing).
    pub async fn read_skus(conn: &mut PgConnection, skus: &[&str]) -> Result<Self, ApiError> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT l.sku, l.warehouse, l.on_hand, l.reserved, l.backorder_limit, w.priority, w.active, l.reorder_point
               FROM stock_levels l JOIN warehouses w ON w.code = l.warehouse AND w.active
              WHERE l.sku = ANY($1)",
        )
        .bind(skus)
        .fetch_all(conn)
        .await?;
        Ok(Self::from_rows(rows))
    }

    fn from_rows(rows: Vec<Row>) -> Self {
        let mut book = Self::default();
        for r in rows {
            let key = (r.sku, r.warehouse);
            book.locked.insert(key.clone(), (r.on_hand, r.reserved));
            let level = Level {
                on_hand: r.on_hand,
                reserved: r.reserved,
                backorder_limit: r.backorder_limit,
                priority: r.priority,
                active: r.active,
                reorder_point: r.reorder_point,
            };
            book.levels.insert(key, level);
        }
        book
    }

    pub fn get(&self, sku: &str, warehouse: &str) -> Option<&Level> {
        self.levels.get(&(sku.to_owned(), warehouse.to_owned()))
    }

    pub fn has_sku(&self, sku: &str) -> bool {
        self.levels.range((sku.to_owned(), String::new())..).next().is_some_and(|((s, _), _)| s == sku)
    }

    pub fn has_level(&self, sku: &str, warehouse: &str) -> bool {
        self.get(sku, warehouse).is_some()
    }

    /// The levels of `skus` as allocation candidates, as they stand now.
    pub fn candidates_of(&self, skus: &[&str]) -> Vec<Candidate> {
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
    pub fn check(&self, sku: &str, warehouse: &str, on_hand_delta: i64, reserved_delta: i64) -> Result<(), Refused> {
        let level = self.get(sku, warehouse).ok_or(Refused::Unknown)?;
        let on_hand = level.on_hand + on_hand_delta;
        let reserved = level.reserved + reserved_delta;
        if on_hand < 0 || reserved < 0 || on_hand - reserved < -level.backorder_limit {
            return Err(Refused::Floor { on_hand: level.on_hand, available: level.available() });
        }
        Ok(())
    }

    /// Changes a level and records its ledger entry, or refuses and changes nothing.
    pub fn apply(
        &mut self,
        sku: &str,
        warehouse: &str,
        kind: EntryKind,
        on_hand_delta: i64,
        reserved_delta: i64,
        reference: Option<&str>,
    ) -> Result<(), Refused> {
        self.apply_with_reason(sku, warehouse, kind, on_hand_delta, reserved_delta, reference, None)
    }

    /// Records an event for the outbox.
    pub fn event(&mut self, event: Event) {
        self.events.push(event);
    }

    /// [`Book::apply`] with the reason of a manual adjustment.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_with_reason(
        &mut self,
        sku: &str,
        warehouse: &str,
        kind: EntryKind,
        on_hand_delta: i64,
        reserved_delta: i64,
        reference: Option<&str>,
        reason: Option<&'static str>,
    ) -> Result<(), Refused> {
        self.check(sku, warehouse, on_hand_delta, reserved_delta)?;
        let level = self.levels.get_mut(&(sku.to_owned(), warehouse.to_owned())).ok_or(Refused::Unknown)?;
        level.on_hand += on_hand_delta;
        level.reserved += reserved_delta;
        self.entries.push(Entry {
            id: Uuid::now_v7(),
            sku: sku.to_owned(),
            warehouse: warehouse.to_owned(),
            kind,
            on_hand_delta,
            reserved_delta,
            on_hand_after: level.on_hand,
            reserved_after: level.reserved,
            reference: reference.map(str::to_owned),
            reason,
        });
        Ok(())
    }

    /// Writes every changed level and every ledger entry in one statement, then verifies that
    /// the database arrived at the values computed here.
    pub async fn flush(mut self, conn: &mut PgConnection) -> Result<(), ApiError> {
        self.stock_events();
        if !self.events.is_empty() {
            insert_events(conn, &self.events).await?;
        }
        if self.entries.is_empty() {
            return Ok(());
        }
        let mut level_sku = Vec::new();
        let mut level_wh = Vec::new();
        let mut d_on_hand = Vec::new();
        let mut d_reserved = Vec::new();
        for (key, level) in &self.levels {
            let (on_hand0, reserved0) = self.locked[key];
            if (level.on_hand, level.reserved) != (on_hand0, reserved0) {
                level_sku.push(key.0.as_str());
                level_wh.push(key.1.as_str());
                d_on_hand.push(level.on_hand - on_hand0);
                d_reserved.push(level.reserved - reserved0);
            }
        }
        let e = &self.entries;
        for entry in e {
            let units = match entry.kind {
                EntryKind::Reserve | EntryKind::Release | EntryKind::Expire => entry.reserved_delta,
                _ => entry.on_hand_delta,
            };
            metrics::counter!(crate::metrics::UNITS, "kind" => entry.kind.as_str()).increment(units.unsigned_abs());
        }
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "WITH upd AS (
                 UPDATE stock_levels l
                    SET on_hand = l.on_hand + d.dh, reserved = l.reserved + d.dr, updated_at = now()
                   FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS d(sku, warehouse, dh, dr)
                  WHERE l.sku = d.sku AND l.warehouse = d.warehouse
              RETURNING l.sku, l.warehouse, l.on_hand, l.reserved
             ), entries AS (
                 INSERT INTO ledger (id, sku, warehouse, kind, on_hand_delta, reserved_delta,
                                     on_hand_after, reserved_after, reference, reason)
                 SELECT * FROM unnest($5::uuid[], $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[],
                                      $11::int8[], $12::int8[], $13::text[], $14::text[])
             )
             SELECT sku, warehouse, on_hand, reserved FROM upd",
        )
        .bind(&level_sku)
        .bind(&level_wh)
        .bind(&d_on_hand)
        .bind(&d_reserved)
        .bind(e.iter().map(|e| e.id).collect::<Vec<_>>())
        .bind(e.iter().map(|e| e.sku.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|e| e.warehouse.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|e| e.on_hand_delta).collect::<Vec<_>>())
        .bind(e.iter().map(|e| e.reserved_delta).collect::<Vec<_>>())
        .bind(e.iter().map(|e| e.on_hand_after).collect::<Vec<_>>())
        .bind(e.iter().map(|e| e.reserved_after).collect::<Vec<_>>())
        .bind(e.iter().map(|e| e.reference.as_deref()).collect::<Vec<_>>())
        .bind(e.iter().map(|e| e.reason).collect::<Vec<_>>())
        .fetch_all(conn)
        .await?;
        // The rows were locked by this transaction, so anything else is a bug: roll back.
        let consistent = rows.len() == level_sku.len()
            && rows.iter().all(|(sku, wh, on_hand, reserved)| {
                self.levels
                    .get(&(sku.clone(), wh.clone()))
                    .is_some_and(|l| (l.on_hand, l.reserved) == (*on_hand, *reserved))
            });
        if consistent { Ok(()) } else { Err(ApiError::Internal("stock levels changed under a row lock".into())) }
    }
}

impl Book {
    /// Availability crossings of every changed level, computed once per transaction on the
    /// transition from the locked value to the final one (not on every intermediate change).
    fn stock_events(&mut self) {
        for (key, level) in &self.levels {
            let (on_hand0, reserved0) = self.locked[key];
            let before = on_hand0 - reserved0;
            let after = level.available();
            let mut kinds = Vec::new();
            if before > 0 && after <= 0 {
                kinds.push("stock.out_of_stock");
            }
            if before <= 0 && after > 0 {
                kinds.push("stock.back_in_stock");
            }
            if level.reorder_point > 0 && before > level.reorder_point && after <= level.reorder_point {
                kinds.push("stock.low");
            }
            for kind in kinds {
                self.events.push(Event {
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

async fn insert_events(conn: &mut PgConnection, events: &[Event]) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO events (type, sku, warehouse, reservation_id, data)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::jsonb[])",
    )
    .bind(events.iter().map(|e| e.kind).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.sku.as_deref()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.warehouse.as_deref()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.reservation_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.data.clone()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(on_hand: i64, reserved: i64, backorder_limit: i64) -> Book {
        Book::from_rows(vec![Row {
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
        assert_eq!(b.apply("A", "W", EntryKind::Reserve, 0, 5, None), Err(Refused::Floor { on_hand: 3, available: 2 }));
        assert_eq!(
            b.apply("A", "W", EntryKind::Fulfil, -4, -1, None),
            Err(Refused::Floor { on_hand: 3, available: 2 })
        );
        assert_eq!(b.apply("A", "X", EntryKind::Reserve, 0, 1, None), Err(Refused::Unknown));
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
