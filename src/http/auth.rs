//! Authentication: 401 without a valid API key, 403 when its role does not allow
//! the call (keys and roles: `crate::auth`).

use axum::extract::Request;

use super::error::ApiError;
use super::state::AppState;
use crate::auth::required_role;

/// The name of the API key a request came with (absent when no keys are configured).
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub String);

/// 401 without a valid key, 403 when its role does not allow the call; else the request, with
/// its [`Caller`] when keys are configured. With no keys configured every call is allowed (the
/// server refuses to start like that off loopback).
pub(crate) fn admit(state: &AppState, mut request: Request) -> Result<Request, ApiError> {
    if state.keys.is_empty() {
        return Ok(request);
    }
    let Some(needed) = required_role(request.method(), request.uri().path(), state.config.metrics_public) else {
        return Ok(request);
    };
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(entry) = presented.and_then(|secret| state.keys.find(secret)) else {
        return Err(ApiError::Unauthorized("a valid API key is required: Authorization: Bearer <key>".into()));
    };
    if !entry.role.allows(needed) {
        return Err(ApiError::Forbidden(format!(
            "the key `{}` has role {}, this call needs {}",
            entry.name,
            entry.role.as_str(),
            needed.as_str()
        )));
    }
    tracing::Span::current().record("api_key", entry.name.as_str());
    request.extensions_mut().insert(Caller(entry.name.clone()));
    Ok(request)
}
