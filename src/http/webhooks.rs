//! Webhook subscriptions (admin only, see `auth::required_role`); `engine::webhooks` delivers.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{OptionalJson, Path};
use super::openapi::{BodyErrors, QueryErrors, UnknownWebhook, WebhookList};
use super::schemas::{WebhookSecret, WebhookUrl};
use super::state::AppState;
use crate::domain::webhooks::{self, Secret};
use crate::domain::{Code, EventKind, Validator, WebhookName};
use crate::engine::Refusal;
use crate::store::webhooks::{self as store, Webhook, WebhookUpsert};

/// A subscription: where to send events, the secret to sign them with, and which types.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "url": "https://hooks.example.com/inventory",
    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "types": ["stock.out_of_stock", "stock.back_in_stock"]
}))]
pub(crate) struct WebhookBody {
    #[schema(value_type = WebhookUrl)]
    url: Option<String>,
    /// Never answered back.
    #[schema(value_type = WebhookSecret)]
    secret: Option<String>,
    /// Only events of these types; every type when left out.
    #[schema(value_type = Option<Vec<EventKind>>, min_items = 1)]
    types: Option<Vec<String>>,
}

#[utoipa::path(operation_id = "putWebhook",
    summary = "Create or update a webhook subscription",
    description = "201 when the name is new, 200 when it existed. Each event of the feed that matches `types` (every type when left out) is POSTed to `url` as the same JSON object `GET /v1/events` answers, in feed order, the next one only after the previous one got a 2xx, signed as the Standard Webhooks specification describes (`webhook-id`: the event id, `webhook-timestamp`, `webhook-signature`: `v1,` + base64 of HMAC-SHA256 with the key in `secret` over `{id}.{timestamp}.{body}`). A failed attempt (not 2xx, no connection, no answer within 10 s) is retried after 1 s, then twice as long each time up to 285 s (attempts at most 5 minutes apart), without end. A new subscription starts after the last event in the feed; an update keeps its progress and makes the next attempt due at once. The secret is never answered back.",
    put, path = "/v1/webhooks/{name}", tag = "webhooks",
    params(("name" = WebhookName, Path, description = "the subscription's name")),
    request_body = WebhookBody,
    responses((status = 201, description = "created", body = Webhook),
        (status = 200, description = "updated", body = Webhook), BodyErrors))]
pub(crate) async fn put(
    State(state): State<AppState>,
    Path(name): Path<String>,
    OptionalJson(body): OptionalJson<WebhookBody>,
) -> Result<Response, ApiError> {
    let body = body.unwrap_or_default();
    let mut v = Validator::new();
    let name = v.check("name", WebhookName::parse(name));
    let url = v.required("url", body.url, webhooks::url);
    let secret = v.required("secret", body.secret, |s| Secret::parse(&s).map(|_| s));
    let types = v.optional("types", body.types, parse_types);
    let upsert = v.finish(|| Some(WebhookUpsert { name: name?, url: url?, secret: secret?, types: types? }))?;
    let (webhook, created) = state.engine.upsert_webhook(&upsert).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(webhook)).into_response())
}

/// Known event types, at least one, each once (in the order given).
fn parse_types(raw: Vec<String>) -> Result<Vec<String>, String> {
    if raw.is_empty() {
        return Err("must name at least one event type (leave it out for every type)".into());
    }
    let mut types = Vec::new();
    for t in raw {
        let Some(kind) = EventKind::parse(&t) else {
            let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
            return Err(format!("unknown event type `{t}`; one of {}", known.join(", ")));
        };
        if !types.iter().any(|k: &String| k == kind.as_str()) {
            types.push(kind.as_str().to_owned());
        }
    }
    Ok(types)
}

#[utoipa::path(operation_id = "getWebhook",
    summary = "Get a webhook subscription and its progress",
    description = "The subscription (without its secret) and how delivery goes: `delivered_through` (every event up to this id was delivered or did not match), `pending` (matching events not yet delivered), and the last attempt's `last_status`, `last_error` and `last_attempt_at`.",
    get, path = "/v1/webhooks/{name}", tag = "webhooks",
    params(("name" = WebhookName, Path, description = "the subscription's name")),
    responses((status = 200, description = "the subscription", body = Webhook), UnknownWebhook, QueryErrors))]
pub(crate) async fn get(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    if Code::parse(name.as_str()).is_err() {
        return Err(Refusal::UnknownWebhook(name).into());
    }
    let mut conn = state.db.acquire().await?;
    let webhook = store::get(&mut conn, &name).await?.ok_or(Refusal::UnknownWebhook(name))?;
    Ok(axum::Json(webhook).into_response())
}

#[utoipa::path(operation_id = "listWebhooks",
    summary = "List webhook subscriptions",
    description = "Every subscription by name, with its progress (never a secret).",
    get, path = "/v1/webhooks", tag = "webhooks",
    responses((status = 200, description = "every subscription, by name", body = WebhookList), QueryErrors))]
pub(crate) async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut conn = state.db.acquire().await?;
    let items = store::list(&mut conn).await?;
    Ok(axum::Json(WebhookList { items }).into_response())
}

#[utoipa::path(operation_id = "deleteWebhook",
    summary = "Delete a webhook subscription",
    description = "Stops delivery to the subscription and forgets it. An attempt in flight is waited for (at most its 10 s).",
    delete, path = "/v1/webhooks/{name}", tag = "webhooks",
    params(("name" = WebhookName, Path, description = "the subscription's name")),
    responses((status = 204, description = "deleted"), UnknownWebhook, QueryErrors))]
pub(crate) async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    if Code::parse(name.as_str()).is_err() {
        return Err(Refusal::UnknownWebhook(name).into());
    }
    state.engine.delete_webhook(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
