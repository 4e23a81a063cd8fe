//! The database side of a CSV import: a staging table filled by `COPY`, checked and merged
//! into the stock levels with set-based statements, all in the caller's transaction.
//!
//! Locks: the SKU rows are share-locked (their backorder limit is copied into new levels),
//! missing levels created, then every other level of the import locked in (sku, warehouse)
//! order — the order of `store/mod.rs`. A first load ([`claim_first_load`]) takes the
//! catalogue, stock and ledger tables exclusively instead, before anything else.

use futures_util::{Stream, StreamExt};
use sqlx::{Connection, PgConnection};

/// Lifts the statement timeout for this transaction (a million rows take longer than a request
/// may; row locks still time out), gives its sorts and hashes of the staged rows room in memory,
/// and creates the staging table, dropped at commit.
pub(crate) async fn prepare(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL statement_timeout = 0").execute(&mut *conn).await?;
    sqlx::query("SET LOCAL work_mem = '64MB'").execute(&mut *conn).await?;
    sqlx::query(
        "CREATE TEMP TABLE import_rows (line bigint, sku text, warehouse text, on_hand bigint,
                                        reorder_point bigint, reorder_quantity bigint, entry_id uuid)
         ON COMMIT DROP",
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// `COPY`s CSV rows (`line,sku,warehouse,on_hand,reorder_point,reorder_quantity,entry_id`, the
/// last the id of the ledger entry the row may write) from `rows` into the staging table. The
/// inner error: `rows` could not be read (the copy was aborted).
pub(crate) async fn copy_rows<S>(
    conn: &mut PgConnection,
    mut rows: S,
) -> Result<Result<(), std::io::Error>, sqlx::Error>
where
    S: Stream<Item = std::io::Result<Vec<u8>>> + Unpin,
{
    let mut copy = conn
        .copy_in_raw(
            "COPY import_rows (line, sku, warehouse, on_hand, reorder_point, reorder_quantity, entry_id)
             FROM STDIN (FORMAT csv)",
        )
        .await?;
    while let Some(chunk) = rows.next().await {
        match chunk {
            Ok(chunk) => {
                copy.send(chunk).await?;
            }
            Err(err) => {
                let _ = copy.abort("cannot read the import input").await;
                return Ok(Err(err));
            }
        }
    }
    copy.finish().await?;
    // A temporary table is never analyzed on its own: without its row count and distinct
    // values the planner takes a million rows for a few hundred, and its nested loops over them
    // take hours instead of seconds.
    sqlx::query("ANALYZE import_rows").execute(&mut *conn).await?;
    Ok(Ok(()))
}

/// A first load in progress: how to add back the foreign keys [`claim_first_load`] dropped.
#[derive(Debug)]
pub(crate) struct FirstLoad {
    restore: Vec<String>,
}

/// Claims a first load when the database holds no stock level yet: takes the catalogue,
/// stock and ledger tables exclusively and drops the foreign keys of the levels and the
/// ledger. A million new levels and their entries are then written without a foreign-key check
/// per row — three per level, more than half the time of the whole import — and
/// [`finish_first_load`] adds the keys back, which checks every row in one pass before the
/// commit. Nobody sees the tables without them: the locks are held until then, and a rollback
/// restores them.
///
/// `None`, with nothing changed, when there are levels already (the row-by-row merge is the
/// only way), when the tables cannot be had within the lock timeout or without a deadlock (the
/// service is busy with them), or when this role does not own them.
pub(crate) async fn claim_first_load(conn: &mut PgConnection) -> Result<Option<FirstLoad>, sqlx::Error> {
    // Checked without a lock first: an import into a running service must not stall it.
    let empty: bool =
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM stock_levels)").fetch_one(&mut *conn).await?;
    if !empty {
        return Ok(None);
    }
    let mut savepoint = conn.begin().await?;
    match drop_foreign_keys(&mut savepoint).await {
        Ok(Some(restore)) => {
            savepoint.commit().await?;
            Ok(Some(FirstLoad { restore }))
        }
        Ok(None) => {
            savepoint.rollback().await?;
            Ok(None)
        }
        // lock_not_available (the lock timeout), deadlock_detected, insufficient_privilege (not
        // the owner)
        Err(sqlx::Error::Database(db)) if matches!(db.code().as_deref(), Some("55P03" | "40P01" | "42501")) => {
            tracing::info!(error = %db, "not loading as a first load");
            savepoint.rollback().await?;
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Locks the tables and drops the foreign keys of the levels and the ledger, if no level has
/// been created meanwhile; returns the statements that add them back exactly as they were.
async fn drop_foreign_keys(conn: &mut PgConnection) -> Result<Option<Vec<String>>, sqlx::Error> {
    // The tables the foreign keys join, all at once: dropping one locks both of its tables.
    sqlx::query("LOCK TABLE skus, warehouses, stock_levels, ledger IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *conn)
        .await?;
    let empty: bool =
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM stock_levels)").fetch_one(&mut *conn).await?;
    if !empty {
        return Ok(None);
    }
    // Read from the catalog, so that a key a later migration adds or changes is handled too.
    let keys: Vec<(String, String)> = sqlx::query_as(
        "SELECT format('ALTER TABLE %s DROP CONSTRAINT %I', conrelid::regclass, conname),
                format('ALTER TABLE %s ADD CONSTRAINT %I %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
           FROM pg_constraint
          WHERE contype = 'f' AND conrelid IN ('stock_levels'::regclass, 'ledger'::regclass)
          ORDER BY conrelid::regclass::text, conname",
    )
    .fetch_all(&mut *conn)
    .await?;
    let (drop, restore): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
    if !drop.is_empty() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop.join(";\n"))).execute(&mut *conn).await?;
    }
    Ok(Some(restore))
}

/// Creates every level of a first load with its imported values (none exists, and nobody else
/// can create one: the table is locked).
pub(crate) async fn create_first_levels(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO stock_levels (sku, warehouse, backorder_limit, on_hand, reorder_point, reorder_quantity)
         SELECT r.sku, r.warehouse, s.backorder_limit, r.on_hand, coalesce(r.reorder_point, 0),
                coalesce(r.reorder_quantity, 0)
           FROM import_rows r JOIN skus s ON s.sku = r.sku
          ORDER BY r.sku, r.warehouse",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds back the foreign keys of a first load; each is checked over its whole table.
pub(crate) async fn finish_first_load(conn: &mut PgConnection, first: FirstLoad) -> Result<(), sqlx::Error> {
    if !first.restore.is_empty() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(first.restore.join(";\n"))).execute(conn).await?;
    }
    Ok(())
}

/// Rows naming a level another row names too: `(line, message)`, at most 100.
pub(crate) async fn repeated_rows(conn: &mut PgConnection) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT line, format('%s/%s appears more than once', sku, warehouse) FROM (
             SELECT line, sku, warehouse, count(*) OVER (PARTITION BY sku, warehouse) AS n FROM import_rows) d
          WHERE n > 1 ORDER BY line LIMIT 100",
    )
    .fetch_all(conn)
    .await
}

/// Rows naming an unknown SKU or warehouse: `(line, message)`, at most 100.
pub(crate) async fn rows_of_unknowns(conn: &mut PgConnection) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT line, format('unknown sku %s (import with create_missing to create it)', sku) FROM import_rows r
          WHERE NOT EXISTS (SELECT 1 FROM skus s WHERE s.sku = r.sku)
         UNION ALL
         SELECT line, format('unknown warehouse %s (import with create_missing to create it)', warehouse)
           FROM import_rows r WHERE NOT EXISTS (SELECT 1 FROM warehouses w WHERE w.code = r.warehouse)
          ORDER BY 1 LIMIT 100",
    )
    .fetch_all(conn)
    .await
}

/// Creates the SKUs and warehouses the rows name that do not exist (named after their code).
pub(crate) async fn create_missing(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO skus (sku) SELECT DISTINCT sku FROM import_rows ORDER BY sku ON CONFLICT DO NOTHING")
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO warehouses (code, name) SELECT DISTINCT warehouse, warehouse FROM import_rows
          ORDER BY 1 ON CONFLICT DO NOTHING",
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Share-locks the SKU rows, creates missing levels directly with their imported values, then
/// locks every other level of the import. Which levels are new is what the INSERT itself
/// reports: RETURNING yields exactly the rows it inserted, never one that already existed or
/// that a concurrent transaction inserted first (transaction ids are not compared: they wrap
/// around).
pub(crate) async fn lock_and_create_levels(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT count(*) FROM (
             SELECT 1 FROM skus WHERE sku IN (SELECT sku FROM import_rows) ORDER BY sku FOR SHARE) locked",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "CREATE TEMP TABLE import_created (sku text, warehouse text, PRIMARY KEY (sku, warehouse)) ON COMMIT DROP",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "WITH created AS (
             INSERT INTO stock_levels (sku, warehouse, backorder_limit, on_hand, reorder_point, reorder_quantity)
             SELECT r.sku, r.warehouse, s.backorder_limit, r.on_hand, coalesce(r.reorder_point, 0),
                    coalesce(r.reorder_quantity, 0)
               FROM import_rows r JOIN skus s ON s.sku = r.sku
              ORDER BY r.sku, r.warehouse
             ON CONFLICT (sku, warehouse) DO NOTHING
             RETURNING sku, warehouse)
         INSERT INTO import_created (sku, warehouse) SELECT sku, warehouse FROM created",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "SELECT count(*) FROM (
             SELECT 1 FROM stock_levels l JOIN import_rows r ON r.sku = l.sku AND r.warehouse = l.warehouse
              WHERE NOT EXISTS (SELECT 1 FROM import_created c WHERE c.sku = l.sku AND c.warehouse = l.warehouse)
              ORDER BY l.sku, l.warehouse FOR UPDATE OF l) locked",
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Rows whose `on_hand` would break a level's floor: `(line, message)`, at most 100.
pub(crate) async fn rows_below_floor(conn: &mut PgConnection) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.line, format('on_hand %s is below what is held (%s) beyond the backorder limit %s',
                               r.on_hand, l.reserved, l.backorder_limit)
           FROM import_rows r JOIN stock_levels l ON l.sku = r.sku AND l.warehouse = r.warehouse
          WHERE r.on_hand - l.reserved < -l.backorder_limit
          ORDER BY r.line LIMIT 100",
    )
    .fetch_all(conn)
    .await
}

/// Where [`write`] finds each level of the import as it was before: `sku, warehouse, entry_id,
/// reserved, on_hand` (the imported count), `created, on_hand0` (the count before), `reorder_point,
/// reorder_quantity` (the imported settings) and `settings` (whether the row gives any).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Before {
    /// In the stock levels, the new ones among them listed in `import_created`.
    Levels,
    /// A first load: every level is new, with nothing on hand or reserved before.
    FirstLoad,
}

impl Before {
    fn rows(self) -> &'static str {
        match self {
            Self::Levels => {
                "SELECT l.sku, l.warehouse, r.entry_id, l.reserved, r.on_hand, c.sku IS NOT NULL AS created,
                        CASE WHEN c.sku IS NOT NULL THEN 0 ELSE l.on_hand END AS on_hand0,
                        coalesce(r.reorder_point, l.reorder_point) AS reorder_point, r.reorder_quantity,
                        r.reorder_point IS NOT NULL OR r.reorder_quantity IS NOT NULL AS settings
                   FROM stock_levels l JOIN import_rows r ON r.sku = l.sku AND r.warehouse = l.warehouse
                   LEFT JOIN import_created c ON c.sku = l.sku AND c.warehouse = l.warehouse"
            }
            Self::FirstLoad => {
                "SELECT sku, warehouse, entry_id, 0::bigint AS reserved, on_hand, true AS created, 0::bigint AS on_hand0,
                        coalesce(reorder_point, 0) AS reorder_point, reorder_quantity, false AS settings
                   FROM import_rows"
            }
        }
    }
}

/// Sets every level to its row, writes a `receive` (new level) or `adjust`/`count` ledger entry
/// under `reference` for each change of `on_hand`, and the availability events of the
/// crossings; returns (ledger entries, levels created).
///
/// The crossing rules are `domain::EventKind::crossings`, stated again in SQL so that a
/// million levels are merged in one statement; a test holds the two together.
pub(crate) async fn write(conn: &mut PgConnection, reference: &str, before: Before) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH old AS ({}
         ), upd AS (
             UPDATE stock_levels l
                SET on_hand = o.on_hand, reorder_point = o.reorder_point,
                    reorder_quantity = coalesce(o.reorder_quantity, l.reorder_quantity), updated_at = now()
               FROM old o
              WHERE l.sku = o.sku AND l.warehouse = o.warehouse AND NOT o.created
                AND (o.on_hand <> o.on_hand0 OR o.settings)
         ), entries AS (
             INSERT INTO ledger (id, sku, warehouse, kind, on_hand_delta, reserved_delta,
                                 on_hand_after, reserved_after, reference, reason)
             SELECT entry_id, sku, warehouse, CASE WHEN created THEN 'receive' ELSE 'adjust' END,
                    on_hand - on_hand0, 0, on_hand, reserved, $1, CASE WHEN created THEN NULL ELSE 'count' END
               FROM old WHERE on_hand <> on_hand0
             RETURNING 1
         ), crossings AS (
             INSERT INTO events (type, sku, warehouse, data)
             SELECT t.type, o.sku, o.warehouse,
                    jsonb_build_object('available_before', o.on_hand0 - o.reserved, 'available', o.on_hand - o.reserved,
                                       'on_hand', o.on_hand, 'reserved', o.reserved, 'reorder_point', o.reorder_point)
               FROM old o
              -- A constant list, each level tested against each entry: a list of the level's own
              -- values would be set up again for every level.
              CROSS JOIN (VALUES ('stock.out_of_stock'), ('stock.back_in_stock'), ('stock.low')) AS t(type)
              WHERE CASE t.type
                    WHEN 'stock.out_of_stock' THEN o.on_hand0 - o.reserved > 0 AND o.on_hand - o.reserved <= 0
                    WHEN 'stock.back_in_stock' THEN o.on_hand0 - o.reserved <= 0 AND o.on_hand - o.reserved > 0
                    ELSE o.reorder_point > 0 AND o.on_hand0 - o.reserved > o.reorder_point
                         AND o.on_hand - o.reserved <= o.reorder_point END
         )
         SELECT (SELECT count(*) FROM entries), (SELECT count(*) FROM old WHERE created)",
        before.rows()
    )))
    .bind(reference)
    .fetch_one(conn)
    .await
}
