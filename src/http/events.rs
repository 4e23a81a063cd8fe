//! The event feed: pages (`GET /v1/events`) and a live Server-Sent Events stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::Query;
use super::openapi::{EventPage, PageErrors, Problem, QueryErrors};
use super::schemas;
use super::state::{AppState, page_limit};
use crate::domain::EventKind;
use crate::engine::feed::{self, StreamSlot};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventQuery {
    /// The events after this id (a `next_cursor`); default 0, the beginning.
    #[param(schema_with = schemas::event_id)]
    after: Option<i64>,
    /// Page size, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// The `type` filter of the feed: `type=a&type=b` or `type=a,b` (or both); none means every
/// type. It is read from the query apart from the other parameters, which occur once.
#[derive(Debug)]
pub(crate) struct TypeFilter(Vec<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for TypeFilter {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(parts.uri.query().unwrap_or_default())
            .map_err(|err| ApiError::Malformed(format!("bad query parameter: {err}")))?;
        let mut types = Vec::new();
        for t in pairs.iter().filter(|(k, _)| k == "type").flat_map(|(_, v)| v.split(',')).filter(|t| !t.is_empty()) {
            let Some(kind) = EventKind::parse(t) else {
                let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                return Err(ApiError::Malformed(format!("unknown event type `{t}`; one of {}", known.join(", "))));
            };
            types.push(kind.as_str().to_owned());
        }
        Ok(TypeFilter(types))
    }
}

schemas::one_parameter!(
    TypeFilter,
    "type",
    Query,
    "Only events of these types: repeat the parameter, or comma-separate the types.",
    schemas::event_types(),
    style(Some(utoipa::openapi::path::ParameterStyle::Form)),
    explode(Some(true)),
);

/// `GET /v1/events?after=&limit=&type=`: `next_cursor` is the last id returned (or `after`
/// when nothing is new), so a reader can keep polling with it.
#[utoipa::path(operation_id = "listEvents",
    summary = "Read the event feed",
    description = "Stock crossings (out of stock, back in stock, low) and reservation lifecycle events, by id, gap-free for a reader that pages with `after`. `next_cursor` is the last id looked at: poll on with it.",
    get, path = "/v1/events", tag = "events", params(EventQuery, TypeFilter),
    responses((status = 200, description = "events after `after`, by id", body = EventPage),
        PageErrors))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Query(q): Query<EventQuery>,
    TypeFilter(types): TypeFilter,
) -> Result<Response, ApiError> {
    let limit = page_limit(q.limit, &state)?;
    let after = q.after.unwrap_or(0).max(0);
    // A reader sees its own writes: wait for a relay run that began after this request (one
    // run serves every reader waiting for it), instead of each reader relaying on its own.
    state.feed.catch_up(CATCH_UP).await;
    let (items, next_cursor) = state.feed.list(&state.reads, after, limit, &types, MAX_SCAN).await?;
    Ok(axum::Json(EventPage { items, next_cursor }).into_response())
}

/// The longest a page waits for the relay to number what has just committed.
const CATCH_UP: Duration = Duration::from_secs(1);
/// Most events one filtered page looks at; `next_cursor` then moves past what it looked at.
const MAX_SCAN: i64 = 10_000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamQuery {
    /// Start after this id; default 0, the beginning.
    #[param(schema_with = schemas::event_id)]
    after: Option<i64>,
}

/// The `Last-Event-ID` header a reconnecting SSE client sends.
#[derive(Debug)]
pub(crate) struct LastEventId;

schemas::one_parameter!(
    LastEventId,
    "Last-Event-ID",
    Header,
    "Resume after this id (wins over `after`).",
    schemas::event_id()
);

/// `GET /v1/events/stream?after=`: the same events, live, as SSE with `id:` lines. A client
/// resumes with `Last-Event-ID` (which wins over `after`). Ends when the service shuts down.
#[utoipa::path(operation_id = "streamEvents",
    summary = "Stream the event feed (SSE)",
    description = "The same events as `GET /v1/events`, live, as Server-Sent Events with `id:` lines and a heartbeat comment every 15 s. Resume after a disconnect with `Last-Event-ID` (or `after`). The stream ends when the service shuts down. At most `--max-event-streams` open streams (429 beyond).",
    get, path = "/v1/events/stream", tag = "events",
    params(StreamQuery, TypeFilter, LastEventId),
    responses((status = 200, description = "Server-Sent Events with `id:` lines and heartbeats", body = schemas::SseEvent, content_type = "text/event-stream"),
        (status = 429, description = "too many streams open (in all, or for this API key)", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn stream(
    State(state): State<AppState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
    TypeFilter(types): TypeFilter,
) -> Result<Response, ApiError> {
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
    let caller = caller.map_or_else(|| "anonymous".to_owned(), |c| c.0.0.clone());
    let slot = state.feed.open_stream(&caller)?;
    let news = state.feed.subscribe();
    let reader = Reader { state, after, types, news, _slot: slot };
    // Each wake sends everything that is new as one chunk of frames rendered once per event
    // (not once per stream), and an idle stream a heartbeat comment now and then.
    let body = stream::unfold(reader, |mut reader| async move {
        loop {
            if *reader.state.shutdown.borrow() {
                return None;
            }
            match reader.next_chunk().await {
                Ok(Some(chunk)) => return Some((Ok::<_, Infallible>(chunk), reader)),
                Ok(None) => {}
                Err(err) => tracing::warn!(error = %err, "event stream read failed; retrying"),
            }
            let mut shutdown = reader.state.shutdown.clone();
            tokio::select! {
                _ = reader.news.changed() => {}
                _ = tokio::time::sleep(HEARTBEAT) => {
                    return Some((Ok(Bytes::from_static(b":heartbeat\n\n")), reader));
                }
                _ = shutdown.changed() => {}
            }
        }
    });
    let mut response = Response::new(axum::body::Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// An idle stream sends a comment this often, so proxies and clients see it is alive.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// One live stream's position.
struct Reader {
    state: AppState,
    /// The highest id looked at: events up to it were sent or did not match.
    after: i64,
    types: Vec<String>,
    news: tokio::sync::watch::Receiver<i64>,
    /// Holds the stream's place under the limits until the stream is dropped.
    _slot: StreamSlot,
}

impl Reader {
    /// The frames of the events after the cursor, from the feed's memory, or from the database
    /// while far behind; `None` when nothing new has arrived.
    async fn next_chunk(&mut self) -> crate::engine::Result<Option<Bytes>> {
        self.news.mark_unchanged();
        let (slice, from_database) = match self.state.feed.recent_after(self.after, &self.types, feed::PAGE as usize) {
            Some(slice) => (slice, false),
            None => (self.state.feed.page_from_database(&self.state.reads, self.after, &self.types).await?, true),
        };
        let moved = slice.scanned_to > self.after;
        self.after = slice.scanned_to;
        if !slice.events.is_empty() {
            let mut chunk = Vec::with_capacity(slice.events.iter().map(|f| f.frame.len()).sum());
            for framed in &slice.events {
                chunk.extend_from_slice(&framed.frame);
            }
            return Ok(Some(Bytes::from(chunk)));
        }
        // A filter catching up from the database that skipped a page looks on at once (more may
        // follow), but hands back an empty comment first: the stream stays alive, and the loop
        // around it notices shutdown between pages.
        Ok((moved && from_database).then(|| Bytes::from_static(b":\n\n")))
    }
}
