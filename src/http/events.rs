//! The event feed: pages (`GET /v1/events`) and a live Server-Sent Events stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::json;

use super::extract::Query;
use super::{AppState, page_limit};
use crate::error::ApiError;
use crate::store::events::{self, Event, TYPES};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    after: Option<i64>,
    limit: Option<i64>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

fn types(raw: Option<&str>) -> Result<Vec<String>, ApiError> {
    let Some(raw) = raw else { return Ok(Vec::new()) };
    raw.split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            if TYPES.contains(&t) {
                Ok(t.to_owned())
            } else {
                Err(ApiError::Malformed(format!("unknown event type `{t}`; one of {}", TYPES.join(", "))))
            }
        })
        .collect()
}

/// `GET /v1/events?after=&limit=&type=`: `next_cursor` is the last id returned (or `after`
/// when nothing is new), so a reader can keep polling with it.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(EventQuery),
    responses(
        (status = 200, description = "events after `after`, by id", body = crate::http::openapi::EventPage),
        (status = 400, description = "bad parameter values", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        (status = 422, description = "`limit` out of range", body = crate::http::openapi::Problem, content_type = "application/problem+json")
    )
)]
pub async fn list(State(state): State<AppState>, Query(q): Query<EventQuery>) -> Result<Response, ApiError> {
    let limit = page_limit(q.limit, &state)?;
    let types = types(q.kind.as_deref())?;
    let after = q.after.unwrap_or(0).max(0);
    // Number whatever has committed, so a reader sees its own writes without waiting for the relay.
    events::relay(&state.db).await?;
    let mut conn = state.db.acquire().await?;
    let items = events::page(&mut conn, after, limit, &types).await?;
    let next_cursor = items.last().map_or(after, |e| e.id);
    Ok(axum::Json(json!({ "items": items, "next_cursor": next_cursor })).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    after: Option<i64>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// `GET /v1/events/stream?after=`: the same events, live, as SSE with `id:` lines. A client
/// resumes with `Last-Event-ID` (which wins over `after`). Ends when the service shuts down.
#[utoipa::path(
    get,
    path = "/v1/events/stream",
    tag = "events",
    params(StreamQuery, ("Last-Event-ID" = Option<i64>, Header, description = "resume after this id (wins over `after`)")),
    responses(
        (status = 400, description = "malformed request (bad query values, a NUL byte in the path or query)", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        (status = 200, description = "Server-Sent Events with `id:` lines and heartbeats", body = String, content_type = "text/event-stream")
    )
)]
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>, ApiError> {
    let types = types(q.kind.as_deref())?;
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| ApiError::Malformed("Last-Event-ID must be an event id".into()))?,
        ),
        None => None,
    };
    let after = resume.or(q.after).unwrap_or(0).max(0);
    let poll = Duration::from_millis(200);
    let feed = Feed { state, after, types, buffer: Vec::new() };
    let stream = stream::unfold(feed, move |mut feed| async move {
        loop {
            if *feed.state.shutdown.borrow() {
                return None;
            }
            if let Some(event) = feed.buffer.pop() {
                feed.after = event.id;
                return Some((Ok(to_sse(&event)), feed));
            }
            match feed.fetch().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "event stream read failed; retrying"),
            }
            let mut shutdown = feed.state.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = shutdown.changed() => {}
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("heartbeat")))
}

struct Feed {
    state: AppState,
    after: i64,
    types: Vec<String>,
    /// Fetched but not yet sent, newest first (popped from the end).
    buffer: Vec<Event>,
}

impl Feed {
    /// Fills the buffer; `true` when something new arrived.
    async fn fetch(&mut self) -> Result<bool, ApiError> {
        events::relay(&self.state.db).await?;
        let mut conn = self.state.db.acquire().await?;
        let mut items = events::page(&mut conn, self.after, 500, &self.types).await?;
        items.reverse();
        self.buffer = items;
        Ok(!self.buffer.is_empty())
    }
}

fn to_sse(event: &Event) -> sse::Event {
    sse::Event::default()
        .id(event.id.to_string())
        .event(event.kind.clone())
        .data(serde_json::to_string(event).unwrap_or_default())
}
