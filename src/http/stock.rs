//! Ops stock operations and stock reads.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use super::answer::respond;
use super::error::ApiError;
use super::extract::{Body, IdempotencyKey, OptionalJson, Path, Query, whole_number};
use super::openapi::{
    Availability, AvailabilityItem, BodyErrors, ByWarehouse, LevelPage, PageErrors, Problem, QueryErrors, StockView,
    Totals, UnknownSkuOrWarehouse,
};
use super::schemas::{self, Count, LevelCursor, Text};
use super::state::{AppState, page_limit};
use crate::domain::{
    AdjustReason, ChannelCode, Code, Delta, MAX_QUANTITY, Quantity, Sku, Validator, WarehouseCode, text,
};
use crate::engine::Refusal;
use crate::engine::availability::Found;
use crate::engine::import;
use crate::engine::stock::{Adjust, Receive, Transfer};
use crate::store::catalogue;
use crate::store::replica::{Answer, Reason};
use crate::store::stock::{self, Level, LevelFilter, Replenishment};

/// Most SKUs one availability request may ask for.
pub(crate) const MAX_AVAILABILITY_SKUS: usize = 1000;

/// Goods that arrived.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"sku": "TSHIRT-M", "warehouse": "BER", "quantity": 50, "reference": "PO-7"}))]
pub(crate) struct ReceiveBody {
    #[schema(value_type = Sku)]
    sku: Option<String>,
    #[schema(value_type = WarehouseCode)]
    warehouse: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Quantity, required = true)]
    quantity: Option<i64>,
    /// A delivery note, purchase order, … (shown in the ledger).
    #[schema(value_type = Option<Text>)]
    reference: Option<String>,
}

#[utoipa::path(operation_id = "receiveStock",
    summary = "Receive goods",
    description = "Adds `quantity` to `on_hand` of the level (created on first receipt), with a `receive` ledger entry. The SKU and the warehouse must exist.",
    post, path = "/v1/stock/receive", tag = "stock", request_body = ReceiveBody,
    responses((status = 200, description = "the level after the receipt", body = Level),
        BodyErrors, UnknownSkuOrWarehouse))]
pub(crate) async fn receive(
    State(state): State<AppState>,
    key: IdempotencyKey,
    Body { value: body, raw }: Body<ReceiveBody>,
) -> Result<Response, ApiError> {
    let mut v = Validator::new();
    let sku = v.required("sku", body.sku, Sku::parse);
    let warehouse = v.required("warehouse", body.warehouse, WarehouseCode::parse);
    let quantity = v.required("quantity", body.quantity, Quantity::parse);
    let reference = v.optional("reference", body.reference, text);
    let cmd =
        v.finish(|| Some(Receive { sku: sku?, warehouse: warehouse?, quantity: quantity?, reference: reference? }))?;
    let key = key.keyed(&raw, StatusCode::OK);
    respond(state.engine.receive(&cmd, key.as_ref()).await, StatusCode::OK)
}

/// A change of `on_hand` by hand.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"sku": "TSHIRT-M", "warehouse": "BER", "delta": -2, "reason": "count", "expected_on_hand": 50}))]
pub(crate) struct AdjustBody {
    #[schema(value_type = Sku)]
    sku: Option<String>,
    #[schema(value_type = WarehouseCode)]
    warehouse: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Delta, required = true)]
    delta: Option<i64>,
    #[schema(value_type = AdjustReason)]
    reason: Option<String>,
    #[schema(value_type = Option<Text>)]
    reference: Option<String>,
    /// Compare-and-set: the `on_hand` the counter saw; 409 `stale_quantity` if it moved since.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Option<i64>, minimum = 0)]
    expected_on_hand: Option<i64>,
}

#[utoipa::path(operation_id = "adjustStock",
    summary = "Adjust stock by hand",
    description = "Changes `on_hand` by `delta` for a count, damage, loss, find, return or correction, with an `adjust` ledger entry. `on_hand` never drops below what is reserved (409 `insufficient_stock`). With `expected_on_hand`, the change applies only if `on_hand` is still that value (409 `stale_quantity` otherwise): a count that raced with a shipment is not lost.",
    post, path = "/v1/stock/adjust", tag = "stock", request_body = AdjustBody,
    responses((status = 200, description = "the level after the adjustment", body = Level),
        (status = 409, description = "insufficient_stock or stale_quantity", body = Problem, content_type = "application/problem+json"),
        BodyErrors, UnknownSkuOrWarehouse))]
pub(crate) async fn adjust(
    State(state): State<AppState>,
    key: IdempotencyKey,
    Body { value: body, raw }: Body<AdjustBody>,
) -> Result<Response, ApiError> {
    let mut v = Validator::new();
    let sku = v.required("sku", body.sku, Sku::parse);
    let warehouse = v.required("warehouse", body.warehouse, WarehouseCode::parse);
    let delta = v.required("delta", body.delta, Delta::parse);
    let reason = v.required("reason", body.reason, |r| AdjustReason::parse(&r));
    let reference = v.optional("reference", body.reference, text);
    let expected_on_hand =
        v.optional(
            "expected_on_hand",
            body.expected_on_hand,
            |n| {
                if n >= 0 { Ok(n) } else { Err("must not be negative") }
            },
        );
    let cmd = v.finish(|| {
        Some(Adjust {
            sku: sku?,
            warehouse: warehouse?,
            delta: delta?,
            reason: reason?,
            reference: reference?,
            expected_on_hand: expected_on_hand?,
        })
    })?;
    let key = key.keyed(&raw, StatusCode::OK);
    respond(state.engine.adjust(&cmd, key.as_ref()).await, StatusCode::OK)
}

/// Units moved between warehouses (from a warehouse to itself: checked, and nothing moves).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"sku": "TSHIRT-M", "from": "BER", "to": "HAM", "quantity": 10}))]
pub(crate) struct TransferBody {
    #[schema(value_type = Sku)]
    sku: Option<String>,
    #[schema(value_type = WarehouseCode)]
    from: Option<String>,
    #[schema(value_type = WarehouseCode)]
    to: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Quantity, required = true)]
    quantity: Option<i64>,
    #[schema(value_type = Option<Text>)]
    reference: Option<String>,
}

#[utoipa::path(operation_id = "transferStock",
    summary = "Move stock between warehouses",
    description = "Moves available units from `from` to `to` in one transaction (`transfer_out` and `transfer_in` ledger entries); needs `available(from) >= quantity`, else 409 `insufficient_stock`. Reserved units never move. A move from a warehouse to itself is checked the same way and changes nothing.",
    post, path = "/v1/stock/transfer", tag = "stock", request_body = TransferBody,
    responses((status = 200, description = "both levels after the move", body = crate::engine::stock::Transferred),
        (status = 409, description = "insufficient_stock", body = Problem, content_type = "application/problem+json"),
        BodyErrors, UnknownSkuOrWarehouse))]
pub(crate) async fn transfer(
    State(state): State<AppState>,
    key: IdempotencyKey,
    Body { value: body, raw }: Body<TransferBody>,
) -> Result<Response, ApiError> {
    let mut v = Validator::new();
    let sku = v.required("sku", body.sku, Sku::parse);
    let from = v.required("from", body.from, WarehouseCode::parse);
    let to = v.required("to", body.to, WarehouseCode::parse);
    let quantity = v.required("quantity", body.quantity, Quantity::parse);
    let reference = v.optional("reference", body.reference, text);
    let cmd =
        v.finish(|| Some(Transfer { sku: sku?, from: from?, to: to?, quantity: quantity?, reference: reference? }))?;
    let key = key.keyed(&raw, StatusCode::OK);
    respond(state.engine.transfer(&cmd, key.as_ref()).await, StatusCode::OK)
}

/// Replenishment settings of one level; what is left out stays as it is.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"reorder_point": 20, "reorder_quantity": 100}))]
pub(crate) struct ReplenishmentBody {
    /// `available` at or below this is low stock.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Option<Count>)]
    reorder_point: Option<i64>,
    /// How much to order when low.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Option<Count>)]
    reorder_quantity: Option<i64>,
}

#[utoipa::path(operation_id = "putReplenishment",
    summary = "Set reorder point and quantity",
    description = "Sets the replenishment settings of one level (creating the level with nothing on hand if it does not exist: 201). A level whose `available` is at or below its reorder point is in the low-stock report (`GET /v1/stock?below_reorder_point=true`) and raises `stock.low`.",
    put, path = "/v1/stock/{sku}/{warehouse}", tag = "stock",
    params(("sku" = Sku, Path, description = "the SKU"), ("warehouse" = WarehouseCode, Path, description = "warehouse code")),
    request_body = Option<ReplenishmentBody>,
    responses((status = 200, description = "updated", body = Level),
        (status = 201, description = "the level was created", body = Level), BodyErrors,
        UnknownSkuOrWarehouse))]
pub(crate) async fn put_replenishment(
    State(state): State<AppState>,
    Path((sku, warehouse)): Path<(String, String)>,
    OptionalJson(body): OptionalJson<ReplenishmentBody>,
) -> Result<Response, ApiError> {
    let body = body.unwrap_or_default();
    let mut v = Validator::new();
    let sku = v.check("sku", Sku::parse(sku));
    let warehouse = v.check("warehouse", WarehouseCode::parse(warehouse));
    let in_range = |n: i64| {
        if (0..=MAX_QUANTITY).contains(&n) { Ok(n) } else { Err(format!("must be between 0 and {MAX_QUANTITY}")) }
    };
    let reorder_point = v.optional("reorder_point", body.reorder_point, in_range);
    let reorder_quantity = v.optional("reorder_quantity", body.reorder_quantity, in_range);
    let settings = v.finish(|| {
        Some(Replenishment {
            sku: sku?,
            warehouse: warehouse?,
            reorder_point: reorder_point?,
            reorder_quantity: reorder_quantity?,
        })
    })?;
    let (level, created) = state.engine.set_replenishment(&settings).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(level)).into_response())
}

/// The `as_of` parameter of a stock read, as the document describes it.
#[derive(Debug)]
pub(crate) struct AsOfParam;

schemas::one_parameter!(
    AsOfParam,
    "as_of",
    Query,
    "An RFC 3339 time (write `+` as `%2B`, or use `Z`): the levels as they stood at that moment, from the ledger. Levels that did not exist yet are left out; `updated_at` is the time of the level's last ledger entry at or before the moment (or its creation, before its first entry). `reorder_point` and `reorder_quantity` are the current settings: they are not in the ledger. A time later than the database's clock (no allowance for clock skew: leave `as_of` out for now) → 422.",
    schemas::moment(),
);

/// The query of a stock read: `as_of` as sent, parsed by hand for a clear answer.
#[derive(Debug, Deserialize)]
pub(crate) struct StockQuery {
    as_of: Option<String>,
}

#[utoipa::path(operation_id = "getSkuStock",
    summary = "Stock of one SKU",
    description = "The SKU's level in every warehouse, and the totals; with `as_of`, as they stood at that moment (from the ledger).",
    get, path = "/v1/stock/{sku}", tag = "stock", params(("sku" = Sku, Path, description = "the SKU"), AsOfParam),
    responses((status = 200, description = "per warehouse and in total", body = StockView),
        (status = 404, description = "unknown SKU", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`as_of` is later than the database's clock", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn get_sku_stock(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    Query(q): Query<StockQuery>,
) -> Result<Response, ApiError> {
    let as_of = q.as_of.as_deref().map(parse_moment).transpose()?;
    if Code::parse(sku.as_str()).is_err() {
        return Err(Refusal::UnknownSku(sku).into());
    }
    // A moment the replica may not hold everything of yet is read on the primary.
    let primary_because = as_of.filter(|&at| !state.reads.covers(at)).map(|_| Reason::AsOf);
    let name = sku.as_str();
    let read = state
        .reads
        .run(primary_because, |source| async move {
            let mut conn = source.pool.acquire_untried().await?;
            let Some(record) = catalogue::get_sku(&mut conn, name).await? else {
                return Ok(if source.replica { Answer::AskPrimary(Reason::NotFound) } else { Answer::Done(None) });
            };
            let levels = match as_of {
                None => stock::levels_of_sku(&mut conn, name).await?,
                Some(at) if stock::is_in_the_future(&mut conn, at).await? => {
                    return Ok(if source.replica {
                        Answer::AskPrimary(Reason::AsOf)
                    } else {
                        Answer::Done(Some((record, None)))
                    });
                }
                Some(at) => stock::levels_of_sku_as_of(&mut conn, name, at).await?,
            };
            Ok(Answer::Done(Some((record, Some(levels)))))
        })
        .await?;
    let (record, levels) = read.ok_or_else(|| Refusal::UnknownSku(sku.clone()))?;
    let Some(levels) = levels else {
        return Err(ApiError::field("as_of", "is in the future: the levels at that moment are not known yet"));
    };
    // Over every listed level, active warehouse or not, as without `as_of`.
    let total = levels.iter().fold(Totals::default(), |t, l| Totals {
        on_hand: t.on_hand + l.on_hand,
        reserved: t.reserved + l.reserved,
        available: t.available + l.available,
    });
    let view = StockView { sku: record.sku, backorder_limit: record.backorder_limit, total, warehouses: levels };
    Ok(axum::Json(view).into_response())
}

/// An RFC 3339 time; anything else is a malformed query (400), as other query values of the
/// wrong shape are.
fn parse_moment(raw: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(raw).map(|t| t.with_timezone(&Utc)).map_err(|_| {
        ApiError::Malformed(format!(
            "bad query parameter: `as_of` must be an RFC 3339 time such as 2025-01-31T12:00:00Z \
             (in a URL, write `+` as `%2B`), not `{raw}`"
        ))
    })
}

/// `GET /v1/availability?sku=A&sku=B` (also `sku=A,B`): one item per requested SKU, in request
/// order; unknown or unstocked SKUs read 0 so a product page never breaks.
#[utoipa::path(operation_id = "getAvailability",
    summary = "Availability of SKUs",
    description = "What can be sold now, per SKU: the sum of `available` over active warehouses (with `channel`: that channel's active warehouses, in its order of preference), and per warehouse. One item per requested SKU in request order; an unknown or unstocked SKU reads 0, so a product page never breaks. It sees every committed change; with a read replica (`--database-read-url`), every change committed more than `--max-replica-lag-ms` ago.",
    get, path = "/v1/availability", tag = "stock",
    params(AvailabilityQuery,
        ("channel" = Option<ChannelCode>, Query, description = "Only this sales channel's active warehouses (an unknown channel is 404).")),
    responses((status = 200, description = "one item per requested SKU, in request order", body = Availability),
        (status = 404, description = "unknown channel", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no SKU, or too many", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn availability(
    State(state): State<AppState>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let mut requested: Vec<&str> = Vec::new();
    let mut channel = None;
    // Other parameters (cache busters and the like) are ignored: a product page never breaks.
    for (key, value) in &pairs {
        if key == "channel" {
            match ChannelCode::parse(value.as_str()) {
                Ok(code) if channel.is_none() => channel = Some(code),
                Ok(_) => return Err(ApiError::field("channel", "at most one channel")),
                Err(err) => return Err(ApiError::field("channel", format!("`{value}` {err}"))),
            }
        } else if key == "sku" {
            for sku in value.split(',') {
                // A malformed code names no SKU that could exist: say so instead of reading 0.
                if let Err(err) = Sku::parse(sku) {
                    return Err(ApiError::field("sku", format!("`{sku}` {err}")));
                }
                requested.push(sku);
            }
        }
    }
    if requested.is_empty() {
        return Err(ApiError::field("sku", "at least one sku is required"));
    }
    if requested.len() > MAX_AVAILABILITY_SKUS {
        return Err(ApiError::field("sku", format!("at most {MAX_AVAILABILITY_SKUS} skus per request")));
    }
    let mut unique: Vec<String> = requested.iter().map(|&sku| sku.to_owned()).collect();
    unique.sort_unstable();
    unique.dedup();
    let found = match &channel {
        None => state.availability.availability(&unique).await?,
        Some(code) => Box::pin(availability_in_channel(&state, unique, code)).await?,
    };
    let items = requested
        .into_iter()
        .map(|sku| {
            let warehouses: ByWarehouse<'_> = found.of(sku).collect();
            let available = warehouses.total();
            AvailabilityItem { sku, available, warehouses }
        })
        .collect();
    Ok(axum::Json(Availability { items }).into_response())
}

/// Availability of `skus` (sorted, without duplicates) in `channel`'s active warehouses; an
/// unknown channel is refused.
async fn availability_in_channel(
    state: &AppState,
    skus: Vec<String>,
    channel: &ChannelCode,
) -> Result<Found, ApiError> {
    let name = channel.as_str();
    let asked = skus.as_slice();
    let rows = state
        .reads
        .find(None, |pool| async move {
            stock::availability_in_channel(&mut *pool.acquire_untried().await?, asked, name).await
        })
        .await?
        .ok_or_else(|| Refusal::UnknownChannel(channel.to_string()))?;
    Ok(Found::new(skus, rows)?)
}

/// The CSV body of an import, as the document describes it.
#[derive(Debug)]
pub(crate) struct ImportCsv;

impl utoipa::PartialSchema for ImportCsv {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        schemas::import_csv().into()
    }
}

impl utoipa::ToSchema for ImportCsv {}

/// The `sku` parameters of an availability request, as the document describes them.
#[derive(Debug)]
pub(crate) struct AvailabilityQuery;

schemas::one_parameter!(
    AvailabilityQuery,
    "sku",
    Query,
    "Repeat for each SKU (or comma-separate them), up to 1000 SKUs.",
    schemas::availability_skus(),
    required(utoipa::openapi::Required::True),
    style(Some(utoipa::openapi::path::ParameterStyle::Form)),
    explode(Some(true)),
);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this warehouse's levels.
    #[param(value_type = Option<WarehouseCode>)]
    warehouse: Option<String>,
    /// Only levels with `available <= reorder_point` (the low-stock report).
    below_reorder_point: Option<bool>,
    /// Page size, default 100.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    #[param(value_type = Option<LevelCursor>)]
    cursor: Option<String>,
}

#[utoipa::path(operation_id = "listStockLevels",
    summary = "List stock levels",
    description = "Every level, by SKU and warehouse, in pages (`next_cursor`). With `below_reorder_point=true`, only levels at or below their reorder point: the low-stock report.",
    get, path = "/v1/stock", tag = "stock", params(ListQuery),
    responses((status = 200, description = "a page of levels", body = LevelPage),
        PageErrors))]
pub(crate) async fn list(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Result<Response, ApiError> {
    let limit = page_limit(q.limit, &state)?;
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let mut v = Validator::new();
    let warehouse = v.optional("warehouse", q.warehouse, WarehouseCode::parse);
    let warehouse = v.finish(|| warehouse)?;
    let page = LevelFilter {
        warehouse: warehouse.map(WarehouseCode::into_string),
        below_reorder_point: q.below_reorder_point.unwrap_or(false),
        after,
        limit,
    };
    let page = &page;
    let (items, more) = state
        .reads
        .read(|pool| async move { stock::page_levels(&mut *pool.acquire_untried().await?, page).await })
        .await?;
    let next_cursor = more.then(|| items.last().map(|l| encode_cursor(&l.sku, &l.warehouse))).flatten();
    Ok(axum::Json(LevelPage { items, next_cursor }).into_response())
}

/// Cursors are opaque to clients: lowercase hex of `sku/warehouse` (`/` cannot occur in either
/// code). Exactly these match the document's `LevelCursor` pattern.
pub(crate) fn encode_cursor(sku: &str, warehouse: &str) -> String {
    format!("{sku}/{warehouse}").bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(cursor: &str) -> Result<(String, String), ApiError> {
    let bad = || ApiError::Malformed("bad cursor: pass back the next_cursor of the previous page".into());
    let lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    if !cursor.len().is_multiple_of(2) || !cursor.bytes().all(|b| lower_hex(&b)) {
        return Err(bad());
    }
    let bytes = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&cursor[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (sku, warehouse) = text.split_once('/').ok_or_else(bad)?;
    match (Code::parse(sku), Code::parse(warehouse)) {
        (Ok(sku), Ok(warehouse)) => Ok((sku.into_string(), warehouse.into_string())),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = encode_cursor("SKU-1", "WH.2");
        assert_eq!(decode_cursor(&c).unwrap(), ("SKU-1".to_owned(), "WH.2".to_owned()));
        for bad in ["zz", "abc", "ä0", "6162", "412F42", "2d2f41", "2f41"] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ImportQuery {
    /// Create unknown SKUs and warehouses instead of rejecting their rows.
    create_missing: Option<bool>,
}

/// `POST /v1/stock/import`: a CSV body (`sku,warehouse,on_hand[,reorder_point,reorder_quantity]`,
/// header optional), streamed into the database. `on_hand` is the counted quantity: the level
/// is set to it, with a `receive` (new level) or `adjust`/`count` ledger entry.
#[utoipa::path(operation_id = "importStock",
    summary = "Import counted stock from CSV",
    description = "Sets `on_hand` of many levels at once from a CSV body, in one transaction: all rows or none. A new level gets a `receive` ledger entry, a changed one an `adjust`/`count` entry. Bad rows are listed by line number (422; rows naming unknown SKUs or warehouses: 404, or create them with `create_missing=true`). The body is streamed to disk first, up to `--import-max-bytes`.",
    post, path = "/v1/stock/import", tag = "stock", params(ImportQuery),
    request_body(content = inline(ImportCsv), content_type = "text/csv", description = "sku,warehouse,on_hand[,reorder_point,reorder_quantity]"),
    responses((status = 200, description = "everything applied", body = crate::engine::import::ImportReport),
        (status = 422, description = "bad rows, by line number; nothing applied", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "rows naming unknown SKUs or warehouses, by line number (without create_missing); nothing applied", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "the body is not CSV", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "the body is larger than the import limit (--import-max-bytes); nothing applied", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "idempotency_in_progress: a request with this Idempotency-Key is still running", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn import(
    State(state): State<AppState>,
    key: IdempotencyKey,
    Query(q): Query<ImportQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let content_type = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime != "text/csv" && mime != "text/plain" && mime != "application/csv" {
        return Err(ApiError::UnsupportedMediaType);
    }
    let limit = state.config.import_max_bytes;
    let declared = headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    // The whole body is checked and spooled before the transaction begins (see `stage`).
    let staged = import::stage(body.into_data_stream(), limit).await?;
    let create_missing = q.create_missing.unwrap_or(false);
    // The request as its Idempotency-Key sees it: the CSV by its digest, and the option.
    let request = json!({ "csv_sha256": staged.sha256(), "create_missing": create_missing });
    let key = key.keyed(&request, StatusCode::OK);
    respond(state.engine.import(&staged, create_missing, key.as_ref()).await, StatusCode::OK)
}
