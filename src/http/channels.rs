//! Sales channels: where orders come from, and the warehouses each sells from.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::extract::{OptionalJson, Path, whole_number};
use super::openapi::{BodyErrors, Problem, QueryErrors};
use super::schemas::Name;
use super::state::AppState;
use crate::domain::{ChannelCode, Validator, WarehouseCode, text};
use crate::engine::Refusal;
use crate::store::channels::{self, Channel, ChannelUpsert};

/// Most warehouses one channel may name.
pub(crate) const MAX_CHANNEL_WAREHOUSES: usize = 1000;

/// A channel, whole: its name and every warehouse it sells from.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(example = json!({"name": "Web shop DE", "warehouses": [{"warehouse": "BER", "priority": 1}, {"warehouse": "HAM"}]}))]
pub(crate) struct ChannelBody {
    #[schema(value_type = Name)]
    name: Option<String>,
    /// The warehouses the channel sells from; replaces the previous list. A warehouse listed
    /// twice counts once, at its first place, with the last priority given.
    #[schema(value_type = Vec<ChannelWarehouseBody>, max_items = 1000)]
    warehouses: Option<Vec<ChannelWarehouseBody>>,
}

/// A warehouse of a channel.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct ChannelWarehouseBody {
    #[schema(value_type = WarehouseCode)]
    warehouse: Option<String>,
    /// Its priority in this channel (lower is preferred); default: the warehouse's own, which
    /// it then follows.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 1_000_000)]
    priority: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ChannelList {
    pub items: Vec<Channel>,
}

fn name(raw: String) -> Result<String, String> {
    let n = text(raw)?;
    if n.trim().is_empty() { Err("must not be empty".to_owned()) } else { Ok(n) }
}

fn priority(raw: i64) -> Result<i32, &'static str> {
    i32::try_from(raw).ok().filter(|p| (0..=1_000_000).contains(p)).ok_or("must be between 0 and 1000000")
}

fn parse_channel(code: String, body: ChannelBody) -> Result<ChannelUpsert, ApiError> {
    let mut v = Validator::new();
    let code = v.check("code", ChannelCode::parse(code));
    let name = v.required("name", body.name, name);
    let mut warehouses: Vec<(String, Option<i32>)> = Vec::new();
    match body.warehouses {
        None => v.fail("warehouses", "is required"),
        Some(raw) if raw.len() > MAX_CHANNEL_WAREHOUSES => {
            v.fail("warehouses", format!("at most {MAX_CHANNEL_WAREHOUSES} warehouses per channel"))
        }
        Some(raw) => {
            for (i, entry) in raw.into_iter().enumerate() {
                let warehouse =
                    v.required(&format!("warehouses[{i}].warehouse"), entry.warehouse, WarehouseCode::parse);
                let priority = v.optional(&format!("warehouses[{i}].priority"), entry.priority, priority);
                // Listed again: counted once, at its first place, with the last priority given
                // (as JSON takes the last of two equal keys).
                if let (Some(w), Some(p)) = (warehouse, priority) {
                    match warehouses.iter_mut().find(|(x, _)| x == w.as_str()) {
                        Some((_, earlier)) => *earlier = p,
                        None => warehouses.push((w.into_string(), p)),
                    }
                }
            }
        }
    }
    Ok(v.finish(|| Some(ChannelUpsert { code: code?.into_string(), name: name?, warehouses }))?)
}

#[utoipa::path(operation_id = "putChannel",
    summary = "Create or replace a sales channel",
    description = "201 when the code is new, 200 when it existed. The channel sells from the listed warehouses only (each must exist, else 404), in the order of their `priority` in the channel (default: the warehouse's own). Reservations and plans with `channel` are allocated from its active warehouses only, and `order_id` is unique per channel. Changing a channel never touches reservations already made.",
    put, path = "/v1/channels/{code}", tag = "catalogue",
    params(("code" = ChannelCode, Path, description = "channel code")), request_body = ChannelBody,
    responses((status = 201, description = "created", body = Channel),
        (status = 200, description = "updated", body = Channel),
        (status = 404, description = "a listed warehouse does not exist", body = Problem, content_type = "application/problem+json"),
        BodyErrors))]
pub(crate) async fn put_channel(
    State(state): State<AppState>,
    Path(code): Path<String>,
    OptionalJson(body): OptionalJson<ChannelBody>,
) -> Result<Response, ApiError> {
    let upsert = parse_channel(code, body.unwrap_or_default())?;
    let (channel, created) = state.engine.upsert_channel(&upsert).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(channel)).into_response())
}

#[utoipa::path(operation_id = "getChannel",
    summary = "Get a sales channel",
    description = "One channel with its warehouses (each with its priority in the channel and whether it is active).",
    get, path = "/v1/channels/{code}", tag = "catalogue",
    params(("code" = ChannelCode, Path, description = "channel code")),
    responses((status = 200, description = "the channel", body = Channel),
        (status = 404, description = "unknown channel", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn get_channel(State(state): State<AppState>, Path(code): Path<String>) -> Result<Response, ApiError> {
    let mut conn = state.db.acquire().await?;
    let channel = channels::get(&mut conn, &code).await?.ok_or(Refusal::UnknownChannel(code))?;
    Ok(axum::Json(channel).into_response())
}

#[utoipa::path(operation_id = "listChannels",
    summary = "List sales channels",
    description = "Every channel, by code, with its warehouses.",
    get, path = "/v1/channels", tag = "catalogue",
    responses((status = 200, description = "every channel, by code", body = ChannelList), QueryErrors))]
pub(crate) async fn list_channels(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut conn = state.db.acquire().await?;
    let items = channels::list(&mut conn).await?;
    Ok(axum::Json(ChannelList { items }).into_response())
}
