//! Reading the ledger.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::ApiError;

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Entry {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub sku: String,
    pub warehouse: String,
    pub kind: String,
    pub on_hand_delta: i64,
    pub reserved_delta: i64,
    pub on_hand_after: i64,
    pub reserved_after: i64,
    pub reference: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct EntryPage {
    pub sku: Option<String>,
    pub warehouse: Option<String>,
    pub reference: Option<String>,
    pub after: Option<Uuid>,
    pub limit: i64,
}

/// One page of entries, oldest first; the flag tells whether more follow.
pub async fn page(conn: &mut PgConnection, page: &EntryPage) -> Result<(Vec<Entry>, bool), ApiError> {
    let mut rows: Vec<Entry> = sqlx::query_as(
        "SELECT * FROM ledger
          WHERE ($1::text IS NULL OR sku = $1)
            AND ($2::text IS NULL OR warehouse = $2)
            AND ($3::text IS NULL OR reference = $3)
            AND ($4::uuid IS NULL OR id > $4)
          ORDER BY id
          LIMIT $5",
    )
    .bind(&page.sku)
    .bind(&page.warehouse)
    .bind(&page.reference)
    .bind(page.after)
    .bind(page.limit + 1)
    .fetch_all(conn)
    .await?;
    let more = rows.len() as i64 > page.limit;
    rows.truncate(page.limit as usize);
    Ok((rows, more))
}
