//! The contract's invariants, checked over the whole database with set-based SQL.

use crate::store::db::Db;
use serde::Serialize;
use sqlx::PgConnection;

/// One broken invariant on one stock level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Violation {
    pub sku: String,
    pub warehouse: String,
    pub rule: String,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}: {}: {}", self.sku, self.warehouse, self.rule, self.detail)
    }
}

/// Every violation of invariants 1–4 (empty when the database is consistent). Runs in one
/// REPEATABLE READ snapshot when called inside such a transaction, so concurrent writers
/// cannot produce false alarms.
pub async fn violations(conn: &mut PgConnection) -> Result<Vec<Violation>, sqlx::Error> {
    sqlx::query_as(
        "WITH sums AS (
             SELECT sku, warehouse, sum(on_hand_delta) AS on_hand, sum(reserved_delta) AS reserved
               FROM ledger GROUP BY sku, warehouse
         )
         SELECT l.sku, l.warehouse, 'on_hand_non_negative' AS rule,
                format('on_hand is %s', l.on_hand) AS detail
           FROM stock_levels l WHERE l.on_hand < 0
         UNION ALL
         SELECT l.sku, l.warehouse, 'available_above_floor',
                format('available %s is below -backorder_limit %s', l.on_hand - l.reserved, -s.backorder_limit)
           FROM stock_levels l JOIN skus s USING (sku)
          WHERE l.on_hand - l.reserved < -s.backorder_limit
         UNION ALL
         SELECT l.sku, l.warehouse, 'ledger_matches_level',
                format('ledger sums to on_hand %s / reserved %s, level has %s / %s',
                       coalesce(m.on_hand, 0), coalesce(m.reserved, 0), l.on_hand, l.reserved)
           FROM stock_levels l LEFT JOIN sums m USING (sku, warehouse)
          WHERE coalesce(m.on_hand, 0) <> l.on_hand OR coalesce(m.reserved, 0) <> l.reserved
         UNION ALL
         SELECT m.sku, m.warehouse, 'ledger_matches_level', 'ledger entries for a level that does not exist'
           FROM sums m LEFT JOIN stock_levels l USING (sku, warehouse)
          WHERE l.sku IS NULL
         UNION ALL
         SELECT l.sku, l.warehouse, 'held_matches_reserved',
                format('active reservations hold %s, level has reserved %s', coalesce(h.held, 0), l.reserved)
           FROM stock_levels l
           LEFT JOIN (SELECT a.sku, a.warehouse, sum(a.quantity - a.fulfilled - a.released) AS held
                        FROM reservation_allocations a JOIN reservations r ON r.id = a.reservation_id
                       WHERE r.status = 'active'
                       GROUP BY a.sku, a.warehouse) h USING (sku, warehouse)
          WHERE coalesce(h.held, 0) <> l.reserved
         UNION ALL
         SELECT a.sku, a.warehouse, 'finished_reservation_holds_nothing',
                format('reservation %s is %s but holds %s', r.id, r.status, a.quantity - a.fulfilled - a.released)
           FROM reservation_allocations a JOIN reservations r ON r.id = a.reservation_id
          WHERE r.status <> 'active' AND a.quantity - a.fulfilled - a.released <> 0
         ORDER BY 1, 2, 3",
    )
    .fetch_all(conn)
    .await
}

/// [`violations`] over the whole database in one read-only REPEATABLE READ snapshot, without a
/// statement timeout (at 5M levels the check takes longer than a request may).
pub(crate) async fn whole_database(db: &Db) -> Result<Vec<Violation>, sqlx::Error> {
    let mut tx = db.begin_as("ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
    sqlx::query("SET LOCAL statement_timeout = 0").execute(&mut *tx).await?;
    let found = violations(&mut tx).await?;
    tx.rollback().await?;
    Ok(found)
}
