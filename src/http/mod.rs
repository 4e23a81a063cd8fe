//! The HTTP API: router, shared state, and one module per resource. Handlers only adapt:
//! parse into domain types, call the engine (or, for plain reads, the store), render; every
//! error becomes problem+json in `error.rs`.

pub(crate) mod answer;
pub(crate) mod auth;
pub(crate) mod catalogue;
pub(crate) mod channels;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod extract;
pub(crate) mod ledger;
pub(crate) mod openapi;
pub(crate) mod operations;
pub(crate) mod request_id;
pub mod reservations;
pub(crate) mod schemas;
pub(crate) mod state;
pub(crate) mod stock;
pub(crate) mod webhooks;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use self::error::ApiError;
pub(crate) use self::state::AppState;
use crate::engine::Error;

/// The whole API, ready to serve.
pub(crate) fn app(state: AppState) -> Router {
    let body_limit = state.config.body_limit;
    let (router, mut openapi) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(operations::live))
        .routes(routes!(operations::ready))
        .routes(routes!(operations::metrics))
        .routes(routes!(catalogue::list_warehouses))
        .routes(routes!(catalogue::put_warehouse, catalogue::get_warehouse))
        .routes(routes!(catalogue::put_sku, catalogue::get_sku))
        .routes(routes!(channels::list_channels))
        .routes(routes!(channels::put_channel, channels::get_channel))
        .routes(routes!(stock::list))
        .routes(routes!(stock::receive))
        .routes(routes!(stock::adjust))
        .routes(routes!(stock::transfer))
        .routes(routes!(stock::get_sku_stock))
        .routes(routes!(stock::put_replenishment))
        .routes(routes!(stock::availability))
        .routes(routes!(stock::import))
        .routes(routes!(ledger::list))
        .routes(routes!(events::list))
        .routes(routes!(events::stream))
        .routes(routes!(webhooks::list))
        .routes(routes!(webhooks::put, webhooks::get, webhooks::delete))
        .routes(routes!(reservations::create, reservations::list))
        .routes(routes!(reservations::plan))
        .routes(routes!(reservations::get))
        .routes(routes!(reservations::fulfil))
        .routes(routes!(reservations::release))
        .routes(routes!(reservations::extend))
        .routes(routes!(reservations::change_lines))
        .split_for_parts();
    openapi::finish(&mut openapi, &state.config);
    router
        // `/docs` (Swagger UI, served from the binary: no CDN) and `/openapi.json`.
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
        .route_layer(middleware::from_fn(request_id::record_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        // A panic answers a problem+json 500 (inside the request-id scope) instead of a dropped connection.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::Failed(Error::Bug("handler panicked".into())).into_response()
        }))
        .layer(middleware::from_fn_with_state(state.clone(), front))
        .with_state(state)
}

/// The one middleware in front of every route: one `from_fn` layer instead of five, each of
/// which boxed a future and cloned the stack beneath it for every request. In order: the
/// request id and span ([`request_id::scope`]), an unused body read and dropped, the API key
/// ([`auth::admit`]), NUL bytes refused, and the request's time limit around the rest.
async fn front(State(state): State<AppState>, request: Request, next: Next) -> Response {
    request_id::scope(request, |request| async move {
        let limit = state.config.request_timeout();
        let request = match read_unused_body(state.config.body_limit, limit, request).await {
            Ok(request) => request,
            Err(err) => return err.into_response(),
        };
        let request = match auth::admit(&state, request) {
            Ok(request) => request,
            Err(err) => return err.into_response(),
        };
        if let Err(err) = reject_nul_bytes(&request) {
            return err.into_response();
        }
        with_timeout(limit, next.run(request)).await
    })
    .await
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such resource".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A NUL byte can never be part of a code, an id or any text the service stores (PostgreSQL
/// text cannot hold it): refuse it in the path or query before it reaches a handler.
fn reject_nul_bytes(req: &Request) -> Result<(), ApiError> {
    let uri = req.uri();
    let has_nul = |s: &str| s.as_bytes().windows(3).any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0');
    if has_nul(uri.path()) || uri.query().is_some_and(has_nul) {
        return Err(ApiError::Malformed("the path or query contains a NUL byte (%00)".into()));
    }
    Ok(())
}

/// A GET, HEAD, DELETE or OPTIONS request has no use for a body, and no handler reads one. A
/// body left unread when the answer goes out makes the server close the connection with data
/// still unread, which the kernel turns into a reset that can cut the answer off on its way to
/// the client. So such a body is read and dropped first (counted, not kept: at most the body
/// limit, else 413; a broken or late body is 400). Without a body, nothing waits.
async fn read_unused_body(limit: usize, wait: std::time::Duration, req: Request) -> Result<Request, ApiError> {
    use axum::http::Method;
    use http_body_util::BodyExt;
    if ![Method::GET, Method::HEAD, Method::DELETE, Method::OPTIONS].contains(req.method())
        || axum::body::HttpBody::is_end_stream(req.body())
    {
        return Ok(req);
    }
    let (parts, mut body) = req.into_parts();
    let drain = async {
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| ApiError::Malformed("the request body could not be read".into()))?;
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
        }
        Ok(())
    };
    match tokio::time::timeout(wait, drain).await {
        Ok(Ok(())) => Ok(Request::from_parts(parts, axum::body::Body::empty())),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(ApiError::Malformed("the request body did not arrive in time".into())),
    }
}

/// Bounds every request (and so graceful shutdown). A request cut off here answers 504
/// `outcome_unknown`: its transaction is dropped uncommitted, unless it was already committing
/// (or had handed its order to a batch that commits).
async fn with_timeout(limit: std::time::Duration, answer: impl Future<Output = Response>) -> Response {
    match tokio::time::timeout(limit, answer).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(limit).into_response(),
    }
}
