//! Extractors that answer bad input with our problem+json instead of axum's plain text.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::state::AppState;
use crate::engine::{Keyed, Refusal};

/// A JSON body kept both typed and raw (the raw value is the request's fingerprint for
/// idempotency keys). Errors as for [`Json`].
#[derive(Debug, Clone)]
pub(crate) struct Body<T> {
    pub value: T,
    pub raw: serde_json::Value,
}

/// Like [`Body`], but an empty body (or a JSON `null`) is allowed: `value` is `None`, `raw` is `null`.
#[derive(Debug, Clone)]
pub(crate) struct OptionalBody<T> {
    pub value: Option<T>,
    pub raw: serde_json::Value,
}

impl<T: DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let Json(raw) = Json::<serde_json::Value>::from_request(req, state).await?;
        let value = typed(&raw)?;
        Ok(Body { value, raw })
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for OptionalBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let OptionalJson(raw) = OptionalJson::<serde_json::Value>::from_request(req, state).await?;
        match raw {
            None | Some(serde_json::Value::Null) => Ok(OptionalBody { value: None, raw: serde_json::Value::Null }),
            Some(raw) => Ok(OptionalBody { value: Some(typed(&raw)?), raw }),
        }
    }
}

/// The typed value of a JSON body, which must be an object (serde would otherwise read a
/// struct from an array of its fields in order).
fn typed<T: DeserializeOwned>(raw: &serde_json::Value) -> Result<T, ApiError> {
    if !raw.is_object() {
        return Err(ApiError::Malformed("the body must be a JSON object".into()));
    }
    T::deserialize(raw).map_err(|err| ApiError::Malformed(format!("the body has a field of the wrong type: {err}")))
}

/// The `Idempotency-Key` header (1–255 printable ASCII characters, or absent), with the method
/// and path it was sent to.
#[derive(Debug, Clone)]
pub(crate) struct IdempotencyKey {
    key: Option<String>,
    method: &'static str,
    path: String,
}

impl IdempotencyKey {
    /// The request as its key's claim and stored answer see it (`None` without a key): method,
    /// path and the canonical text of its body (serde_json's maps are sorted), and the status
    /// a success is stored with.
    pub(crate) fn keyed(&self, body: &serde_json::Value, success: StatusCode) -> Option<Keyed> {
        Some(Keyed {
            key: self.key.clone()?,
            method: self.method,
            path: self.path.clone(),
            fingerprint: body.to_string(),
            success: success.as_u16(),
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let path = parts.uri.path().to_owned();
        let method = if parts.method == axum::http::Method::PUT { "PUT" } else { "POST" };
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyKey { key: None, method, path });
        };
        let key = value
            .to_str()
            .ok()
            .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| (0x20..0x7f).contains(&b)));
        match key {
            Some(key) => Ok(IdempotencyKey { key: Some(key.to_owned()), method, path }),
            None => Err(ApiError::field("Idempotency-Key", "must be 1 to 255 printable ASCII characters")),
        }
    }
}

/// A JSON body. Wrong content type → 415, too large → 413, not JSON or wrong types → 400.
#[derive(Debug, Clone)]
pub(crate) struct Json<T>(pub T);

/// An optional JSON body: an empty body or `null` is `None`.
#[derive(Debug, Clone)]
pub(crate) struct OptionalJson<T>(pub Option<T>);

impl<T: DeserializeOwned> FromRequest<AppState> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let json = is_json(req.headers());
        let bytes = read_body(req, state).await?;
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        parse(&bytes).map(Json)
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let json = is_json(req.headers());
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        // JSON `null` is no body too.
        match parse::<serde_json::Value>(&bytes)? {
            serde_json::Value::Null => Ok(OptionalJson(None)),
            raw => typed(&raw).map(|v| OptionalJson(Some(v))),
        }
    }
}

async fn read_body(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit: state.config.body_limit }
        } else {
            ApiError::Malformed(format!("cannot read the request body: {rejection}"))
        }
    })
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|err| {
        use serde_json::error::Category;
        let what = match err.classify() {
            Category::Syntax | Category::Eof | Category::Io => "the body is not valid JSON",
            Category::Data => "the body has a field of the wrong type",
        };
        ApiError::Malformed(format!("{what}: {err}"))
    })
}

/// Query parameters; a value of the wrong shape → 400.
#[derive(Debug, Clone)]
pub(crate) struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(Query)
            .map_err(|err| ApiError::Malformed(format!("bad query parameter: {err}")))
    }
}

/// Path parameters; undecodable segments → 400.
#[derive(Debug, Clone)]
pub(crate) struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|err| ApiError::Malformed(format!("bad path: {err}")))
    }
}

/// A reservation id from the path, as sent. [`ReservationId::get`] parses it: anything but a
/// UUID names no reservation (404). The handler asks only after its body was read, so a bad body
/// is answered as such, and no answer leaves a body unread.
#[derive(Debug, Clone)]
pub(crate) struct ReservationId(String);

impl ReservationId {
    pub(crate) fn get(&self) -> Result<uuid::Uuid, ApiError> {
        uuid::Uuid::parse_str(&self.0).map_err(|_| Refusal::UnknownReservation(self.0.clone()).into())
    }
}

/// The `{id}` of a reservation's path, as the document describes it.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct ReservationParam {
    /// reservation id (UUID)
    #[expect(dead_code, reason = "described, read by ReservationId")]
    id: String,
}

impl<S: Send + Sync> FromRequestParts<S> for ReservationId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state).await?;
        Ok(ReservationId(raw))
    }
}

/// Reads an optional JSON integer field. JSON has one number type, and JSON Schema (so the
/// OpenAPI document) counts `2.0` as the integer 2: a whole number written with a fraction or
/// an exponent is accepted; `2.5` or a number beyond 64 bits is the wrong type (400). `null`
/// reads as absent. Use as `#[serde(default, deserialize_with = "whole_number")]`.
pub(crate) fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    struct Whole;

    impl<'de> serde::de::Visitor<'de> for Whole {
        type Value = Option<i64>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a whole number")
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
            Ok(Some(n))
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
            i64::try_from(n).map(Some).map_err(|_| E::custom(format!("{n} is beyond the 64-bit range")))
        }

        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
            // 2^63 as f64 is exactly i64::MAX + 1, the first value out of range.
            const LIMIT: f64 = 9_223_372_036_854_775_808.0;
            if n.fract() == 0.0 && (-LIMIT..LIMIT).contains(&n) {
                Ok(Some(n as i64))
            } else {
                Err(E::invalid_type(serde::de::Unexpected::Float(n), &self))
            }
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    deserializer.deserialize_option(Whole)
}
