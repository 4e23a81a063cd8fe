//! The ledger, oldest first, in cursor pages.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::Query;
use super::openapi::{LedgerPage, PageErrors, Problem};
use super::schemas::Text;
use super::state::{AppState, page_limit};
use crate::domain::{Sku, Validator, WarehouseCode, text};
use crate::store::ledger::{self, EntryPage, Paged};
use crate::store::replica::{Answer, Reason};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LedgerQuery {
    /// Only this SKU's entries.
    #[param(value_type = Option<Sku>)]
    sku: Option<String>,
    /// Only this warehouse's entries.
    #[param(value_type = Option<WarehouseCode>)]
    warehouse: Option<String>,
    /// Only entries with this reference (a reservation's entries carry its id).
    #[param(value_type = Option<Text>)]
    reference: Option<String>,
    /// The entries after this one (a `next_cursor`).
    after: Option<uuid::Uuid>,
    /// The same as `after`.
    cursor: Option<uuid::Uuid>,
    /// Page size, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[utoipa::path(operation_id = "listLedgerEntries",
    summary = "Read the ledger",
    description = "Every change of every stock level, oldest first, in pages: pass `next_cursor` back as `after`. Filter by SKU, warehouse or reference (a reservation's entries carry its id). Append-only: entries are never changed.",
    get, path = "/v1/ledger", tag = "ledger", params(LedgerQuery),
    responses((status = 200, description = "a page of entries, oldest first", body = LedgerPage),
        (status = 404, description = "`after` names no ledger entry", body = Problem, content_type = "application/problem+json"),
        PageErrors))]
pub(crate) async fn list(State(state): State<AppState>, Query(q): Query<LedgerQuery>) -> Result<Response, ApiError> {
    let limit = page_limit(q.limit, &state)?;
    let mut v = Validator::new();
    let sku = v.optional("sku", q.sku, Sku::parse);
    let warehouse = v.optional("warehouse", q.warehouse, WarehouseCode::parse);
    let reference = v.optional("reference", q.reference, text);
    let (sku, warehouse, reference) = v.finish(|| Some((sku?, warehouse?, reference?)))?;
    let page = EntryPage {
        sku: sku.map(Sku::into_string),
        warehouse: warehouse.map(WarehouseCode::into_string),
        reference,
        after: q.after.or(q.cursor),
        limit,
    };
    // On the replica, a page must be as complete as the primary's was within the lag bound
    // (its writer horizon at least the primary's then), and a cursor it does not know (yet) is
    // looked up on the primary.
    let floor = state.reads.horizon_floor().unwrap_or(i64::MAX);
    let page = &page;
    let paged = state
        .reads
        .run(None, |source| async move {
            let mut conn = source.pool.acquire_untried().await?;
            let paged = ledger::page(&mut conn, page, source.replica.then_some(floor)).await?;
            Ok(match paged {
                Paged::UnknownCursor if source.replica => Answer::AskPrimary(Reason::NotFound),
                Paged::Behind => Answer::AskPrimary(Reason::Lagging),
                paged => Answer::Done(paged),
            })
        })
        .await?;
    let Paged::Page(items, more) = paged else {
        return Err(ApiError::NotFound(
            "`after`: no ledger entry has this id; pass an entry id or a next_cursor".into(),
        ));
    };
    let next_cursor = more.then(|| items.last().map(|e| e.id)).flatten();
    Ok(axum::Json(LedgerPage { items, next_cursor }).into_response())
}
