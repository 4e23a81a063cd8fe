//! The ledger, oldest first, in cursor pages.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::Query;
use super::openapi::{LedgerPage, Problem, QueryErrors};
use super::state::{AppState, page_limit};
use crate::store::ledger::{self, EntryPage};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LedgerQuery {
    sku: Option<String>,
    warehouse: Option<String>,
    reference: Option<String>,
    after: Option<uuid::Uuid>,
    cursor: Option<uuid::Uuid>,
    limit: Option<i64>,
}

#[utoipa::path(operation_id = "listLedgerEntries", get, path = "/v1/ledger", tag = "ledger", params(LedgerQuery),
    responses((status = 200, description = "a page of entries, oldest first", body = LedgerPage),
        (status = 422, description = "`limit` out of range, or `after` names no entry", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn list(State(state): State<AppState>, Query(q): Query<LedgerQuery>) -> Result<Response, ApiError> {
    let limit = page_limit(q.limit, &state)?;
    let page =
        EntryPage { sku: q.sku, warehouse: q.warehouse, reference: q.reference, after: q.after.or(q.cursor), limit };
    let mut conn = state.db.acquire().await?;
    let (items, more) = ledger::page(&mut conn, &page)
        .await?
        .ok_or_else(|| ApiError::field("after", "no ledger entry has this id; pass an entry id or a next_cursor"))?;
    let next_cursor = more.then(|| items.last().map(|e| e.id)).flatten();
    Ok(axum::Json(LedgerPage { items, next_cursor }).into_response())
}
