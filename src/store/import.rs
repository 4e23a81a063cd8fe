//! The database side of a CSV import: a staging table filled by `COPY`, checked and merged
//! into the stock levels with set-based statements, all in the caller's transaction.
//!
//! Locks: the SKU rows are share-locked (their backorder limit is copied into new levels),
//! missing levels created, then every other level of the import locked in (sku, warehouse)
//! order — the order of `store/mod.rs`.

use sqlx::PgConnection;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Lifts the statement timeout for this transaction (a million rows take longer than a request
/// may; row locks still time out) and creates the staging table, dropped at commit.
pub(crate) async fn prepare(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL statement_timeout = 0").execute(&mut *conn).await?;
    sqlx::query(
        "CREATE TEMP TABLE import_rows (line bigint, sku text, warehouse text, on_hand bigint,
                                        reorder_point bigint, reorder_quantity bigint)
         ON COMMIT DROP",
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// `COPY`s CSV rows (`line,sku,warehouse,on_hand,reorder_point,reorder_quantity`) from `input`
/// into the staging table, `chunk` bytes at a time. The inner error: `input` could not be read
/// (the copy was aborted).
pub(crate) async fn copy_rows<R: AsyncRead + Unpin>(
    conn: &mut PgConnection,
    input: &mut R,
    chunk: usize,
) -> Result<Result<(), std::io::Error>, sqlx::Error> {
    let mut copy = conn
        .copy_in_raw(
            "COPY import_rows (line, sku, warehouse, on_hand, reorder_point, reorder_quantity) FROM STDIN (FORMAT csv)",
        )
        .await?;
    let mut buf = vec![0; chunk];
    loop {
        let n = match input.read(&mut buf).await {
            Ok(n) => n,
            Err(err) => {
                let _ = copy.abort("cannot read the import input").await;
                return Ok(Err(err));
            }
        };
        if n == 0 {
            break;
        }
        copy.send(&buf[..n]).await?;
    }
    copy.finish().await?;
    Ok(Ok(()))
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

/// Sets every level to its row, writes a `receive` (new level) or `adjust`/`count` ledger entry
/// under `reference` for each change of `on_hand`, and the availability events of the
/// crossings; returns (ledger entries, levels created).
///
/// The crossing rules are `domain::EventKind::crossings`, stated again in SQL so that a
/// million levels are merged in one statement; a test holds the two together.
pub(crate) async fn write(conn: &mut PgConnection, reference: &str) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "WITH old AS (
             SELECT l.sku, l.warehouse, l.reserved, r.on_hand, c.sku IS NOT NULL AS created,
                    CASE WHEN c.sku IS NOT NULL THEN 0 ELSE l.on_hand END AS on_hand0,
                    coalesce(r.reorder_point, l.reorder_point) AS reorder_point, r.reorder_quantity,
                    r.reorder_point IS NOT NULL OR r.reorder_quantity IS NOT NULL AS settings
               FROM stock_levels l JOIN import_rows r ON r.sku = l.sku AND r.warehouse = l.warehouse
               LEFT JOIN import_created c ON c.sku = l.sku AND c.warehouse = l.warehouse
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
             SELECT uuid_v7(), sku, warehouse, CASE WHEN created THEN 'receive' ELSE 'adjust' END,
                    on_hand - on_hand0, 0, on_hand, reserved, $1, CASE WHEN created THEN NULL ELSE 'count' END
               FROM old WHERE on_hand <> on_hand0
             RETURNING 1
         ), crossings AS (
             INSERT INTO events (type, sku, warehouse, data)
             SELECT t.type, o.sku, o.warehouse,
                    jsonb_build_object('available_before', o.on_hand0 - o.reserved, 'available', o.on_hand - o.reserved,
                                       'on_hand', o.on_hand, 'reserved', o.reserved, 'reorder_point', o.reorder_point)
               FROM old o
              CROSS JOIN LATERAL (VALUES
                    ('stock.out_of_stock', o.on_hand0 - o.reserved > 0 AND o.on_hand - o.reserved <= 0),
                    ('stock.back_in_stock', o.on_hand0 - o.reserved <= 0 AND o.on_hand - o.reserved > 0),
                    ('stock.low', o.reorder_point > 0 AND o.on_hand0 - o.reserved > o.reorder_point
                                  AND o.on_hand - o.reserved <= o.reorder_point)) AS t(type, hit)
              WHERE t.hit
         )
         SELECT (SELECT count(*) FROM entries), (SELECT count(*) FROM old WHERE created)",
    )
    .bind(reference)
    .fetch_one(conn)
    .await
}
