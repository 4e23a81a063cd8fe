//! Warehouses and SKUs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{OptionalJson, Path};
use super::openapi::{BodyErrors, Problem, QueryErrors, WarehouseList};
use super::state::AppState;
use crate::domain::{Code, MAX_QUANTITY, Sku, Validator, WarehouseCode, text};
use crate::engine::Refusal;
use crate::store::catalogue::{self, SkuUpsert, WarehouseUpsert};

fn created_or_ok(created: bool) -> StatusCode {
    if created { StatusCode::CREATED } else { StatusCode::OK }
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub(crate) struct WarehouseBody {
    name: Option<String>,
    region: Option<String>,
    priority: Option<i64>,
    active: Option<bool>,
}

#[utoipa::path(operation_id = "putWarehouse", put, path = "/v1/warehouses/{code}", tag = "catalogue",
    params(("code" = String, Path, description = "warehouse code")), request_body = WarehouseBody,
    responses((status = 201, description = "created", body = crate::store::catalogue::Warehouse),
        (status = 200, description = "updated", body = crate::store::catalogue::Warehouse), BodyErrors))]
pub(crate) async fn put_warehouse(
    State(state): State<AppState>,
    Path(code): Path<String>,
    OptionalJson(body): OptionalJson<WarehouseBody>,
) -> Result<Response, ApiError> {
    let body = body.unwrap_or_default();
    let mut v = Validator::new();
    let code = v.check("code", WarehouseCode::parse(code));
    let name = v.required("name", body.name, |n| {
        let n = text(n)?;
        if n.trim().is_empty() { Err("must not be empty".to_owned()) } else { Ok(n) }
    });
    let region = v.optional("region", body.region, text);
    let priority = v.optional("priority", body.priority, |p| {
        i32::try_from(p).ok().filter(|p| (0..=1_000_000).contains(p)).ok_or("must be between 0 and 1000000")
    });
    let upsert = v.finish(|| {
        Some(WarehouseUpsert { code: code?, name: name?, region: region?, priority: priority?, active: body.active })
    })?;
    let (warehouse, created) = state.engine.upsert_warehouse(&upsert).await?;
    Ok((created_or_ok(created), axum::Json(warehouse)).into_response())
}

#[utoipa::path(operation_id = "getWarehouse", get, path = "/v1/warehouses/{code}", tag = "catalogue",
    params(("code" = String, Path, description = "warehouse code")),
    responses((status = 200, description = "the warehouse", body = crate::store::catalogue::Warehouse),
        (status = 404, description = "unknown warehouse", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn get_warehouse(
    State(state): State<AppState>,
    Path(code): Path<String>,
) -> Result<Response, ApiError> {
    let mut conn = state.db.acquire().await?;
    let warehouse = catalogue::get_warehouse(&mut conn, &code).await?.ok_or(Refusal::UnknownWarehouse(code))?;
    Ok(axum::Json(warehouse).into_response())
}

#[utoipa::path(operation_id = "listWarehouses", get, path = "/v1/warehouses", tag = "catalogue",
    responses((status = 200, description = "every warehouse, by priority", body = WarehouseList), QueryErrors))]
pub(crate) async fn list_warehouses(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut conn = state.db.acquire().await?;
    let items = catalogue::list_warehouses(&mut conn).await?;
    Ok(axum::Json(WarehouseList { items }).into_response())
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub(crate) struct SkuBody {
    name: Option<String>,
    backorder_limit: Option<i64>,
}

#[utoipa::path(operation_id = "putSku", put, path = "/v1/skus/{sku}", tag = "catalogue", params(("sku" = String, Path, description = "the SKU")),
    request_body = SkuBody,
    responses((status = 201, description = "created", body = crate::store::catalogue::SkuRecord),
        (status = 200, description = "updated", body = crate::store::catalogue::SkuRecord),
        (status = 409, description = "backorder_limit_in_use: lowering the limit below what is backordered", body = Problem, content_type = "application/problem+json"),
        BodyErrors))]
pub(crate) async fn put_sku(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    OptionalJson(body): OptionalJson<SkuBody>,
) -> Result<Response, ApiError> {
    let body = body.unwrap_or_default();
    let mut v = Validator::new();
    let sku = v.check("sku", Sku::parse(sku));
    let name = v.optional("name", body.name, text);
    let backorder_limit = v.optional("backorder_limit", body.backorder_limit, |n| {
        if (0..=MAX_QUANTITY).contains(&n) { Ok(n) } else { Err(format!("must be between 0 and {MAX_QUANTITY}")) }
    });
    let upsert = v.finish(|| Some(SkuUpsert { sku: sku?, name: name?, backorder_limit: backorder_limit? }))?;
    let (sku, created) = state.engine.upsert_sku(&upsert).await?;
    Ok((created_or_ok(created), axum::Json(sku)).into_response())
}

#[utoipa::path(operation_id = "getSku", get, path = "/v1/skus/{sku}", tag = "catalogue", params(("sku" = String, Path, description = "the SKU")),
    responses((status = 200, description = "the SKU", body = crate::store::catalogue::SkuRecord),
        (status = 404, description = "unknown SKU", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn get_sku(State(state): State<AppState>, Path(sku): Path<String>) -> Result<Response, ApiError> {
    if Code::parse(sku.as_str()).is_err() {
        return Err(Refusal::UnknownSku(sku).into());
    }
    let mut conn = state.db.acquire().await?;
    let record = catalogue::get_sku(&mut conn, &sku).await?.ok_or(Refusal::UnknownSku(sku))?;
    Ok(axum::Json(record).into_response())
}
