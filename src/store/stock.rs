//! Stock levels as clients see them: creating them, their replenishment settings, reading and
//! paging. (Locking and changing them: `levels.rs`.)

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgRow, PgValueFormat};
use sqlx::{PgConnection, Row, ValueRef};

use crate::domain::{Sku, WarehouseCode};

/// A stock level as clients see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Level {
    pub sku: String,
    pub warehouse: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
    pub reorder_point: i64,
    pub reorder_quantity: i64,
    pub updated_at: DateTime<Utc>,
}

/// The columns that make a [`Level`], for `concat!` into static SQL.
macro_rules! level_columns {
    () => {
        "sku, warehouse, on_hand, reserved, on_hand - reserved AS available, \
         reorder_point, reorder_quantity, updated_at"
    };
}

/// Creates the (empty) stock level unless it exists, copying the SKU's backorder limit. The SKU
/// row is share-locked meanwhile, so a concurrent change of the limit either sees the new level
/// or is seen by it (locks: SKU row, then level).
pub(crate) async fn ensure_level(
    conn: &mut PgConnection,
    sku: &Sku,
    warehouse: &WarehouseCode,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO stock_levels (sku, warehouse, backorder_limit)
         SELECT sku, $2, backorder_limit FROM skus WHERE sku = $1 FOR SHARE
         ON CONFLICT (sku, warehouse) DO NOTHING",
    )
    .bind(sku.as_str())
    .bind(warehouse.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// One level as it is now.
pub(crate) async fn read_level(
    conn: &mut PgConnection,
    sku: &str,
    warehouse: &str,
) -> Result<Option<Level>, sqlx::Error> {
    sqlx::query_as(concat!("SELECT ", level_columns!(), " FROM stock_levels WHERE sku = $1 AND warehouse = $2"))
        .bind(sku)
        .bind(warehouse)
        .fetch_optional(conn)
        .await
}

/// What a `PUT /v1/stock/{sku}/{warehouse}` sets; `None` keeps the current value.
#[derive(Debug, Clone)]
pub(crate) struct Replenishment {
    pub sku: Sku,
    pub warehouse: WarehouseCode,
    pub reorder_point: Option<i64>,
    pub reorder_quantity: Option<i64>,
}

/// Sets the replenishment settings of a level, creating the level when needed. The flag tells
/// whether the level was created.
pub(crate) async fn set_replenishment(
    conn: &mut PgConnection,
    r: &Replenishment,
) -> Result<(Level, bool), sqlx::Error> {
    let row: LevelWithFlag = sqlx::query_as(concat!(
        "INSERT INTO stock_levels AS s (sku, warehouse, backorder_limit, reorder_point, reorder_quantity)
         SELECT sku, $2, backorder_limit, COALESCE($3, 0), COALESCE($4, 0) FROM skus WHERE sku = $1 FOR SHARE
         ON CONFLICT (sku, warehouse) DO UPDATE SET
             reorder_point = COALESCE($3, s.reorder_point),
             reorder_quantity = COALESCE($4, s.reorder_quantity),
             updated_at = now()
         RETURNING ",
        level_columns!(),
        ", (xmax = 0) AS inserted"
    ))
    .bind(r.sku.as_str())
    .bind(r.warehouse.as_str())
    .bind(r.reorder_point)
    .bind(r.reorder_quantity)
    .fetch_one(conn)
    .await?;
    Ok((row.level, row.inserted))
}

#[derive(sqlx::FromRow)]
struct LevelWithFlag {
    #[sqlx(flatten)]
    level: Level,
    inserted: bool,
}

/// Every level of one SKU, by warehouse.
pub(crate) async fn levels_of_sku(conn: &mut PgConnection, sku: &str) -> Result<Vec<Level>, sqlx::Error> {
    sqlx::query_as(concat!("SELECT ", level_columns!(), " FROM stock_levels WHERE sku = $1 ORDER BY warehouse"))
        .bind(sku)
        .fetch_all(conn)
        .await
}

/// Every level of one SKU as it stood at `as_of`, by warehouse: each level's last ledger entry at
/// or before that moment (`updated_at` is that entry's `at`), or nothing on hand if it had been
/// created by then but had no entry yet; levels that did not exist yet are left out. The
/// replenishment settings are the current ones (they are not in the ledger).
///
/// Ledger `at` is the clock at the insert, after the level's row lock (migration 0009), so per
/// level it follows lock order; equal times are broken by the time-ordered id. Entries written
/// before 0009 carry their transaction's start time, and a level from before 0009 exists from its
/// first entry on.
///
/// Plan: Index Scan on stock_levels_pkey (sku = $1), and per level a Limit 1 over a backward Index
/// Scan on ledger_by_level_at (sku, warehouse, at <= $2): one probe per level, however long its
/// ledger (0.1–0.2 ms at 1.8M entries, 200k per level; without the index ~1 s).
pub(crate) async fn levels_of_sku_as_of(
    conn: &mut PgConnection,
    sku: &str,
    as_of: DateTime<Utc>,
) -> Result<Vec<Level>, sqlx::Error> {
    sqlx::query_as(
        "SELECT l.sku, l.warehouse,
                coalesce(e.on_hand_after, 0) AS on_hand, coalesce(e.reserved_after, 0) AS reserved,
                coalesce(e.on_hand_after - e.reserved_after, 0) AS available,
                l.reorder_point, l.reorder_quantity, coalesce(e.at, l.created_at) AS updated_at
           FROM stock_levels l
           LEFT JOIN LATERAL (
                SELECT g.at, g.on_hand_after, g.reserved_after
                  FROM ledger g
                 WHERE g.sku = l.sku AND g.warehouse = l.warehouse AND g.at <= $2
                 ORDER BY g.at DESC, g.id DESC
                 LIMIT 1) e ON true
          WHERE l.sku = $1 AND (e.at IS NOT NULL OR l.created_at <= $2)
          ORDER BY l.warehouse",
    )
    .bind(sku)
    .bind(as_of)
    .fetch_all(conn)
    .await
}

/// Whether `at` is later than the database's clock: a moment whose levels are not settled yet.
pub(crate) async fn is_in_the_future(conn: &mut PgConnection, at: DateTime<Utc>) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT $1::timestamptz > clock_timestamp()").bind(at).fetch_one(conn).await
}

/// Availability of many SKUs in active warehouses: the product-page read path. One statement,
/// an index range scan per SKU on the primary key, one row per SKU that has levels there (a
/// quarter of the rows of one per level with four warehouses: decoding rows was most of the
/// service's work for a coalesced read). Read each row with [`sku_of`] and [`levels_of`], which
/// copy nothing out of it.
pub(crate) async fn availability(conn: &mut PgConnection, skus: &[String]) -> Result<Vec<PgRow>, sqlx::Error> {
    // The two arrays are parallel: PostgreSQL computes every aggregate of a group in one pass
    // over its rows, and neither has an ORDER BY or DISTINCT of its own that would sort its
    // input apart. Inactive warehouses are left out by a list read once per statement, not by a
    // join: every level's warehouse exists (a foreign key), and the join cost a hash table built
    // for every statement and a probe per row, and grouping by hash where the index scan already
    // delivers each SKU's rows together (~11 % more reads per second, for this query in pgbench
    // as well).
    sqlx::query(
        "SELECT l.sku, array_agg(l.warehouse), array_agg(l.on_hand - l.reserved)
           FROM stock_levels l
          WHERE l.sku = ANY($1)
            AND l.warehouse <> ALL (ARRAY(SELECT code FROM warehouses WHERE NOT active))
          GROUP BY l.sku",
    )
    .bind(skus)
    .fetch_all(conn)
    .await
}

/// [`availability`] in one sales channel: only its active warehouses. `None` when the channel
/// does not exist.
pub(crate) async fn availability_in_channel(
    conn: &mut PgConnection,
    skus: &[String],
    channel: &str,
) -> Result<Option<Vec<PgRow>>, sqlx::Error> {
    // A channel without levels of these SKUs gives one row of NULLs, which tells it from a
    // channel that does not exist (no row).
    let mut rows = sqlx::query(
        "SELECT l.sku, array_agg(l.warehouse), array_agg(l.on_hand - l.reserved)
           FROM channels c
           LEFT JOIN (channel_warehouses m
                      JOIN warehouses w ON w.code = m.warehouse AND w.active
                      JOIN stock_levels l ON l.warehouse = m.warehouse AND l.sku = ANY($1))
                  ON m.channel = c.code
          WHERE c.code = $2
          GROUP BY l.sku",
    )
    .bind(skus)
    .bind(channel)
    .fetch_all(conn)
    .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    rows.retain(|row| row.try_get_raw(0).is_ok_and(|sku| !sku.is_null()));
    Ok(Some(rows))
}

/// The SKU of a row of [`availability`].
pub(crate) fn sku_of(row: &PgRow) -> Result<&str, sqlx::Error> {
    row.try_get(0)
}

/// The (warehouse, available units) pairs of a row of [`availability`], read where they lie in
/// the row (sqlx would copy every warehouse code into a `String` of its own). Checked whole
/// before the first pair comes: a malformed row is an error, never a short answer.
pub(crate) fn levels_of(row: &PgRow) -> Result<Levels<'_>, sqlx::Error> {
    let column = |at: usize| -> Result<&[u8], sqlx::Error> {
        let value = row.try_get_raw(at)?;
        if value.format() != PgValueFormat::Binary {
            return Err(sqlx::Error::Decode("an availability row came in text format".into()));
        }
        value.as_bytes().map_err(sqlx::Error::Decode)
    };
    Levels::new(column(1)?, column(2)?).map_err(|err| sqlx::Error::Decode(err.into()))
}

/// The pairs of [`levels_of`]: a warehouse code and its available units.
#[derive(Debug, Clone)]
pub(crate) struct Levels<'r> {
    warehouses: Elements<'r>,
    available: Elements<'r>,
}

impl<'r> Levels<'r> {
    /// From the binary forms of a `text[]` and an `int8[]` of the same length, without NULLs.
    fn new(warehouses: &'r [u8], available: &'r [u8]) -> Result<Self, &'static str> {
        let (warehouses, available) = (Elements::new(warehouses)?, Elements::new(available)?);
        if warehouses.left != available.left {
            return Err("the warehouse and unit arrays differ in length");
        }
        for (code, units) in warehouses.clone().zip(available.clone()) {
            std::str::from_utf8(code.ok_or("a NULL warehouse")?).map_err(|_| "a warehouse code that is not UTF-8")?;
            if units.ok_or("NULL units")?.len() != 8 {
                return Err("units that are not an int8");
            }
        }
        Ok(Self { warehouses, available })
    }
}

impl<'r> Iterator for Levels<'r> {
    type Item = (&'r str, i64);

    fn next(&mut self) -> Option<Self::Item> {
        // Checked by `new`: nothing below fails.
        let code = std::str::from_utf8(self.warehouses.next()??).ok()?;
        let units = i64::from_be_bytes(self.available.next()??.try_into().ok()?);
        Some((code, units))
    }
}

/// The elements of a one-dimensional array in PostgreSQL's binary format, in order (`None` for
/// a NULL): the dimension header, then a length (-1 for NULL) and the bytes of each element.
#[derive(Debug, Clone)]
struct Elements<'r> {
    rest: &'r [u8],
    left: usize,
}

impl<'r> Elements<'r> {
    /// Checks the header and that the elements fill the value exactly.
    fn new(bytes: &'r [u8]) -> Result<Self, &'static str> {
        let int = |at: usize| bytes.get(at..at + 4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        // Dimensions, a has-NULLs flag, the element type; per dimension its length and lower bound.
        let elements = match int(0).ok_or("a truncated array")? {
            0 => Self { rest: &[], left: 0 },
            1 => {
                let len = usize::try_from(int(12).ok_or("a truncated array")?).map_err(|_| "a negative length")?;
                Self { rest: &bytes[20.min(bytes.len())..], left: len }
            }
            _ => return Err("an array of more than one dimension"),
        };
        let mut walk = elements.clone();
        while walk.left > 0 {
            walk.next().ok_or("a truncated array element")?;
        }
        if !walk.rest.is_empty() {
            return Err("bytes after an array's last element");
        }
        Ok(elements)
    }
}

impl<'r> Iterator for Elements<'r> {
    type Item = Option<&'r [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let len = i32::from_be_bytes(self.rest.get(..4)?.try_into().ok()?);
        let rest = &self.rest[4..];
        let (element, rest) = match usize::try_from(len) {
            Ok(len) if len <= rest.len() => (Some(&rest[..len]), &rest[len..]),
            Ok(_) => return None,
            Err(_) => (None, rest),
        };
        self.rest = rest;
        self.left -= 1;
        Some(element)
    }
}

/// A filter and position for paging through stock levels in (sku, warehouse) order.
#[derive(Debug, Clone, Default)]
pub(crate) struct LevelFilter {
    pub warehouse: Option<String>,
    pub below_reorder_point: bool,
    pub after: Option<(String, String)>,
    pub limit: i64,
}

/// One page of levels; fetches one row more than asked to know whether another page exists.
pub(crate) async fn page_levels(
    conn: &mut PgConnection,
    page: &LevelFilter,
) -> Result<(Vec<Level>, bool), sqlx::Error> {
    let (after_sku, after_wh) = page.after.clone().unwrap_or_default();
    let mut rows: Vec<Level> = sqlx::query_as(concat!(
        "SELECT ",
        level_columns!(),
        " FROM stock_levels
          WHERE ($1::text IS NULL OR warehouse = $1)
            AND (NOT $2 OR on_hand - reserved <= reorder_point)
            AND (sku, warehouse) > ($3, $4)
          ORDER BY sku, warehouse
          LIMIT $5"
    ))
    .bind(&page.warehouse)
    .bind(page.below_reorder_point)
    .bind(after_sku)
    .bind(after_wh)
    .bind(page.limit + 1)
    .fetch_all(conn)
    .await?;
    let more = rows.len() as i64 > page.limit;
    rows.truncate(page.limit as usize);
    Ok((rows, more))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-dimensional array in PostgreSQL's binary format (`None`: NULL).
    fn array(elements: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = Vec::new();
        for int in [1, i32::from(elements.iter().any(Option::is_none)), 25, elements.len() as i32, 1] {
            out.extend_from_slice(&int.to_be_bytes());
        }
        for element in elements {
            match element {
                Some(bytes) => {
                    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                    out.extend_from_slice(bytes);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out
    }

    #[test]
    fn levels_read_in_place_pair_each_warehouse_with_its_units() {
        let (five, minus_two) = (5i64.to_be_bytes(), (-2i64).to_be_bytes());
        let codes = array(&[Some(b"W-EU"), Some(b"W2")]);
        let units = array(&[Some(&five), Some(&minus_two)]);
        let levels: Vec<(&str, i64)> = Levels::new(&codes, &units).unwrap().collect();
        assert_eq!(levels, [("W-EU", 5), ("W2", -2)]);
        let empty = 0i32.to_be_bytes().repeat(3);
        assert_eq!(Levels::new(&empty, &empty).unwrap().count(), 0);
    }

    #[test]
    fn a_malformed_levels_row_is_refused_whole() {
        let one = 1i64.to_be_bytes();
        let codes = array(&[Some(b"W1"), Some(b"W2")]);
        let units = array(&[Some(&one), Some(&one)]);
        assert!(Levels::new(&codes, &units).is_ok());
        // Lengths that differ, NULLs, units of the wrong width, bad UTF-8, truncation, extra bytes.
        assert!(Levels::new(&codes, &array(&[Some(&one)])).is_err());
        assert!(Levels::new(&array(&[None, Some(b"W2")]), &units).is_err());
        assert!(Levels::new(&codes, &array(&[Some(&one), None])).is_err());
        assert!(Levels::new(&codes, &array(&[Some(&one), Some(b"1234")])).is_err());
        assert!(Levels::new(&array(&[Some(b"W1"), Some(&[0xff, 0xfe])]), &units).is_err());
        assert!(Levels::new(&codes[..codes.len() - 1], &units).is_err());
        assert!(Levels::new(&[codes.as_slice(), b"x"].concat(), &units).is_err());
        let mut two_dimensions = codes.clone();
        two_dimensions[3] = 2;
        assert!(Levels::new(&two_dimensions, &units).is_err());
    }
}
