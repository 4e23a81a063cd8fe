//! Sales channels and the warehouses each sells from.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use crate::domain::allocation::ChannelScope;

/// A channel as clients see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Channel {
    pub code: String,
    pub name: String,
    /// Its warehouses in the order they were given.
    pub warehouses: Vec<ChannelWarehouse>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A warehouse of a channel.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct ChannelWarehouse {
    pub warehouse: String,
    /// Its priority in this channel (lower is preferred).
    pub priority: i32,
    /// The priority is the warehouse's own (none was set for the channel), and follows it.
    pub inherited: bool,
    /// Whether the warehouse takes new reservations (an inactive one is left out of allocation
    /// and availability).
    pub active: bool,
}

/// What a `PUT /v1/channels/{code}` sets: the whole channel.
#[derive(Debug, Clone)]
pub(crate) struct ChannelUpsert {
    pub code: String,
    pub name: String,
    /// Warehouses in order, each with the priority set for the channel (`None`: its own).
    pub warehouses: Vec<(String, Option<i32>)>,
}

#[derive(sqlx::FromRow)]
struct Row {
    code: String,
    name: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct MemberRow {
    channel: String,
    #[sqlx(flatten)]
    warehouse: ChannelWarehouse,
}

/// Creates or replaces a channel; the flag tells whether it was created.
pub(crate) async fn upsert(conn: &mut PgConnection, c: &ChannelUpsert) -> Result<(Channel, bool), sqlx::Error> {
    let created: bool = sqlx::query_scalar(
        "INSERT INTO channels AS c (code, name) VALUES ($1, $2)
         ON CONFLICT (code) DO UPDATE SET name = EXCLUDED.name, updated_at = now()
         RETURNING (xmax = 0)",
    )
    .bind(&c.code)
    .bind(&c.name)
    .fetch_one(&mut *conn)
    .await?;
    let (warehouses, priorities): (Vec<&str>, Vec<Option<i32>>) =
        c.warehouses.iter().map(|(w, p)| (w.as_str(), *p)).unzip();
    // Two statements: in one, a DELETE in a WITH clause would run after the INSERT and a
    // warehouse the channel keeps would meet its old row.
    sqlx::query("DELETE FROM channel_warehouses WHERE channel = $1").bind(&c.code).execute(&mut *conn).await?;
    sqlx::query(
        "INSERT INTO channel_warehouses (channel, warehouse, priority, position)
         SELECT $1, w, p, n FROM unnest($2::text[], $3::int4[]) WITH ORDINALITY AS m(w, p, n)",
    )
    .bind(&c.code)
    .bind(&warehouses)
    .bind(&priorities)
    .execute(&mut *conn)
    .await?;
    let channel = get(conn, &c.code).await?.ok_or_else(|| sqlx::Error::RowNotFound)?;
    Ok((channel, created))
}

pub(crate) async fn get(conn: &mut PgConnection, code: &str) -> Result<Option<Channel>, sqlx::Error> {
    Ok(read(conn, Some(code)).await?.pop())
}

/// Every channel, by code.
pub(crate) async fn list(conn: &mut PgConnection) -> Result<Vec<Channel>, sqlx::Error> {
    read(conn, None).await
}

/// One channel (`Some`) or all of them, with their warehouses.
async fn read(conn: &mut PgConnection, code: Option<&str>) -> Result<Vec<Channel>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT code, name, created_at, updated_at FROM channels WHERE $1::text IS NULL OR code = $1 ORDER BY code",
    )
    .bind(code)
    .fetch_all(&mut *conn)
    .await?;
    let mut members: Vec<MemberRow> = sqlx::query_as(
        "SELECT m.channel, m.warehouse, coalesce(m.priority, w.priority) AS priority,
                m.priority IS NULL AS inherited, w.active
           FROM channel_warehouses m JOIN warehouses w ON w.code = m.warehouse
          WHERE $1::text IS NULL OR m.channel = $1
          ORDER BY m.channel, m.position",
    )
    .bind(code)
    .fetch_all(&mut *conn)
    .await?;
    members.reverse();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut warehouses = Vec::new();
        while members.last().is_some_and(|m| m.channel == row.code) {
            warehouses.extend(members.pop().map(|m| m.warehouse));
        }
        out.push(Channel {
            code: row.code,
            name: row.name,
            warehouses,
            created_at: row.created_at,
            updated_at: row.updated_at,
        });
    }
    Ok(out)
}

/// The allocation scopes of the given channels (those that exist), read in the caller's
/// transaction: which warehouses each sells from, at which priority.
pub(crate) async fn scopes(conn: &mut PgConnection, codes: &[&str]) -> Result<Vec<ChannelScope>, sqlx::Error> {
    let rows: Vec<(String, Option<String>, Option<i32>)> = sqlx::query_as(
        "SELECT c.code, m.warehouse, coalesce(m.priority, w.priority)
           FROM channels c
           LEFT JOIN channel_warehouses m ON m.channel = c.code
           LEFT JOIN warehouses w ON w.code = m.warehouse
          WHERE c.code = ANY($1)
          ORDER BY c.code, m.position",
    )
    .bind(codes)
    .fetch_all(conn)
    .await?;
    let mut out: Vec<ChannelScope> = Vec::new();
    for (code, warehouse, priority) in rows {
        if out.last().is_none_or(|s| s.code != code) {
            out.push(ChannelScope { code, warehouses: Vec::new() });
        }
        if let (Some(scope), Some(w), Some(p)) = (out.last_mut(), warehouse, priority) {
            scope.warehouses.push((w, p));
        }
    }
    Ok(out)
}
