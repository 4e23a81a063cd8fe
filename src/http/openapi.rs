//! The OpenAPI 3.1 document, generated from the handlers' annotations; the responses and
//! parameters many operations share, declared once; and the shapes of the answers that are
//! not a stored row (pages, lists, views).

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder, ResponsesBuilder, Schema};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

use crate::store::catalogue::Warehouse;
use crate::store::events::Event;
use crate::store::ledger::Entry;
use crate::store::reservations::Reservation;
use crate::store::stock::Level;

/// The stable `code` of a problem (for the document only: the codes answered are those of
/// `error.rs`, which a test holds to this list).
#[derive(Debug, ToSchema)]
#[expect(dead_code, reason = "described, never built")]
#[schema(rename_all = "snake_case")]
pub(crate) enum ProblemCode {
    MalformedRequest,
    ValidationFailed,
    NotFound,
    InsufficientStock,
    DuplicateOrder,
    ReservationNotActive,
    ReservationPartlyFulfilled,
    OverFulfilment,
    OverRelease,
    StaleQuantity,
    BackorderLimitInUse,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    PayloadTooLarge,
    UnsupportedMediaType,
    MethodNotAllowed,
    Unauthorized,
    Forbidden,
    Unavailable,
    OutcomeUnknown,
    TooManyStreams,
    InternalError,
}

/// An RFC 9457 problem (`application/problem+json`). Conflicts may carry more members. For the
/// document only: `error.rs` builds the bodies.
#[derive(Debug, ToSchema)]
#[expect(dead_code, reason = "described, never built")]
pub(crate) struct Problem {
    #[schema(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: ProblemCode,
    /// The request's `x-request-id`.
    pub request_id: String,
    /// 422 `validation_failed`: every bad field.
    pub errors: Option<Vec<crate::domain::FieldError>>,
    /// 409 `insufficient_stock`: every short line.
    pub lines: Option<Vec<crate::domain::Shortage>>,
    /// 409 `duplicate_order`: the existing reservation.
    pub reservation_id: Option<String>,
    /// 409 `reservation_not_active`: the reservation's status.
    pub reservation_status: Option<String>,
    /// 409 `stale_quantity`: the `on_hand` at the moment of the change.
    pub current_on_hand: Option<i64>,
}

/// The problem answers many operations share, each declared once under `components/responses`
/// (by name) and referred to from the operations that can give it.
const SHARED_PROBLEMS: &[(&str, &str)] = &[
    ("BadRequest", "malformed request: bad JSON or query values, wrong types, a NUL byte in the path or query"),
    ("Unauthorized", "no valid API key: send `Authorization: Bearer <key>`"),
    ("Forbidden", "the API key's role does not allow this call"),
    ("UnknownSkuOrWarehouse", "unknown SKU or warehouse"),
    ("UnknownReservation", "unknown reservation"),
    ("UnknownWebhook", "unknown webhook subscription"),
    ("PayloadTooLarge", "the body is larger than the limit (--body-limit)"),
    ("UnsupportedMediaType", "the body is not declared as JSON (`Content-Type: application/json`)"),
    ("ValidationFailed", "invalid values: every bad field under `errors`; nothing was changed"),
    ("InternalError", "a bug; the answer carries the request id to report"),
    (
        "Unavailable",
        "the database is unreachable or overloaded, or the service is shutting down; nothing was changed; retry later",
    ),
    (
        "OutcomeUnknown",
        "the request ran out of time (--request-timeout-secs) or lost the database while committing: it may or may \
         not have been applied; retry with the same Idempotency-Key",
    ),
];

/// A reference to one of [`SHARED_PROBLEMS`].
fn shared(name: &str) -> RefOr<Response> {
    debug_assert!(SHARED_PROBLEMS.iter().any(|(n, _)| *n == name), "{name} is not declared");
    Ref::from_response_name(name).into()
}

/// A problem+json answer with its own description.
fn problem(description: &str) -> RefOr<Response> {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build();
    ResponseBuilder::new().description(description).content("application/problem+json", content).build().into()
}

/// Declares a set of shared problem answers once, for every operation that can give them.
macro_rules! problems {
    ($(#[$doc:meta])* $name:ident { $($status:literal => $response:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub(crate) struct $name;

        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                ResponsesBuilder::new()$(.response($status, shared($response)))+.build().into()
            }
        }
    };
}

problems!(
    /// The answer every operation can give to a bad query or path (a value of the wrong type,
    /// a NUL byte).
    QueryErrors { "400" => "BadRequest" }
);

problems!(
    /// The answers of every operation that takes a JSON body, before it reaches the engine.
    BodyErrors {
        "400" => "BadRequest",
        "413" => "PayloadTooLarge",
        "415" => "UnsupportedMediaType",
        "422" => "ValidationFailed",
    }
);

problems!(
    /// The answers of a listing to a bad query: a value of the wrong type, a bad `limit`, a
    /// filter that is not a valid code.
    PageErrors { "400" => "BadRequest", "422" => "ValidationFailed" }
);

problems!(
    /// A stock operation naming a SKU or warehouse that does not exist.
    UnknownSkuOrWarehouse { "404" => "UnknownSkuOrWarehouse" }
);

problems!(
    /// An operation on a reservation that does not exist.
    UnknownReservation { "404" => "UnknownReservation" }
);

problems!(
    /// An operation on a webhook subscription that does not exist.
    UnknownWebhook { "404" => "UnknownWebhook" }
);

/// What every POST (and the order edit's PUT) says about retries.
const IDEMPOTENCY: &str = "Send an `Idempotency-Key` header (1–255 printable ASCII characters, see \
    `components/parameters/IdempotencyKey`) to make a retry safe: the same key with the same request replays the \
    first answer (`Idempotent-Replayed: true`); with a different request it is 422 `idempotency_key_reused`; \
    while the first is still running, 409 `idempotency_in_progress`. Keys are kept at least 24 hours.";

/// Completes the generated document as this service answers: the shared problems declared
/// under `components/responses`; on every operation the failures any request can meet (401
/// and 403 where a key is needed, 500, and 503/504 where the database is involved); no
/// security on what is public (`auth::required_role` decides, as it does for requests); and
/// the configured limits (`--max-page-size`, `--max-reservation-lines`).
pub(crate) fn finish(openapi: &mut utoipa::openapi::OpenApi, config: &crate::config::ServerArgs) {
    use axum::http::Method;
    let components = openapi.components.get_or_insert_with(Default::default);
    for (name, description) in SHARED_PROBLEMS {
        components.responses.insert((*name).to_owned(), problem(description));
    }
    // The `Idempotency-Key` header is described once here and in every POST's description, but
    // is no parameter of the operations: a generator of test requests (schemathesis) that sends
    // one key with two different bodies gets the contract's 422 `idempotency_key_reused` and
    // takes it for a valid request rejected.
    for parameter in super::extract::IdempotencyKey::into_params(|| None) {
        components.parameters.insert("IdempotencyKey".to_owned(), parameter.into());
    }
    for name in ["ReserveBody", "LinesBody"] {
        if let Some(RefOr::T(Schema::Object(body))) = components.schemas.get_mut(name)
            && let Some(RefOr::T(Schema::Array(lines))) = body.properties.get_mut("lines")
        {
            lines.max_items = Some(config.max_reservation_lines);
        }
    }
    for (path, item) in openapi.paths.paths.iter_mut() {
        let operations = [
            (Method::GET, item.get.as_mut()),
            (Method::PUT, item.put.as_mut()),
            (Method::POST, item.post.as_mut()),
            (Method::DELETE, item.delete.as_mut()),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation else { continue };
            if method == Method::POST || (method == Method::PUT && path == "/v1/reservations/{id}/lines") {
                let description = operation.description.get_or_insert_with(String::new);
                if !description.is_empty() {
                    description.push_str("\n\n");
                }
                description.push_str(IDEMPOTENCY);
            }
            let mut add = |status: &str, name: &str| {
                operation.responses.responses.entry(status.to_owned()).or_insert_with(|| shared(name));
            };
            match crate::auth::required_role(&method, path, config.metrics_public) {
                Some(_) => {
                    add("401", "Unauthorized");
                    add("403", "Forbidden");
                }
                None => operation.security = Some(Vec::new()),
            }
            add("500", "InternalError");
            if path != "/health/live" && path != "/metrics" {
                add("503", "Unavailable");
                add("504", "OutcomeUnknown");
            }
            for parameter in operation.parameters.iter_mut().flatten() {
                if let RefOr::T(parameter) = parameter
                    && parameter.name == "limit"
                    && let Some(RefOr::T(Schema::Object(limit))) = parameter.schema.as_mut()
                {
                    limit.maximum = Some(config.max_page_size.into());
                }
            }
        }
    }
}

super::schemas::one_parameter!(
    super::extract::IdempotencyKey,
    "Idempotency-Key",
    Header,
    "1–255 printable ASCII characters; a retry with the same key and request replays the first answer",
    super::schemas::idempotency_key()
);

// The shapes of answers (serialised as they are declared).

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WarehouseList {
    pub items: Vec<Warehouse>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LevelPage {
    pub items: Vec<Level>,
    /// Pass back as `cursor`; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LedgerPage {
    pub items: Vec<Entry>,
    /// Pass back as `after`; null on the last page.
    pub next_cursor: Option<uuid::Uuid>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventPage {
    pub items: Vec<Event>,
    /// The last id returned (or `after` when nothing is new): poll on with `after=next_cursor`.
    pub next_cursor: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WebhookList {
    pub items: Vec<crate::store::webhooks::Webhook>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReservationList {
    pub items: Vec<Reservation>,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub(crate) struct Totals {
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StockView {
    pub sku: String,
    pub backorder_limit: i64,
    pub total: Totals,
    pub warehouses: Vec<Level>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AvailabilityItem<'a> {
    pub sku: &'a str,
    /// Sum over active warehouses.
    pub available: i64,
    #[schema(value_type = BTreeMap<String, i64>)]
    pub warehouses: ByWarehouse<'a>,
}

/// Available units by warehouse code, written as a JSON object in code order: sorted once in
/// place, where a map would build a tree for every item of every answer.
#[derive(Debug)]
pub(crate) struct ByWarehouse<'a>(Vec<(&'a str, i64)>);

impl ByWarehouse<'_> {
    /// The units of every warehouse together.
    pub(crate) fn total(&self) -> i64 {
        self.0.iter().map(|(_, units)| units).sum()
    }
}

/// From one entry per warehouse, in any order.
impl<'a> FromIterator<(&'a str, i64)> for ByWarehouse<'a> {
    fn from_iter<I: IntoIterator<Item = (&'a str, i64)>>(entries: I) -> Self {
        let mut entries: Vec<(&'a str, i64)> = entries.into_iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        debug_assert!(entries.windows(2).all(|w| w[0].0 != w[1].0), "one entry per warehouse");
        Self(entries)
    }
}

impl Serialize for ByWarehouse<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (warehouse, units) in &self.0 {
            map.serialize_entry(warehouse, units)?;
        }
        map.end()
    }
}

// Borrows the rows it answers from: an answer is written without copying them.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Availability<'a> {
    pub items: Vec<AvailabilityItem<'a>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    pub status: &'static str,
    /// `/health/ready`: the newest migration, applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<i64>,
}

#[derive(Debug)]
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "API key (`inventory keys new --role …`) as `Authorization: Bearer <key>`. Roles: read (GET), \
                         orders (reservations), ops (catalogue and stock), admin (everything, and alone webhooks). Not required when the \
                         service runs without keys on loopback.",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "inventory",
        description = "Multi-warehouse inventory reservation service. Every error is application/problem+json \
                       (see the Problem schema). Every POST accepts an `Idempotency-Key` header.",
    ),
    modifiers(&BearerAuth),
    security(("api_key" = [])),
    // Schemas only parameters refer to (bodies bring theirs along).
    components(schemas(Problem, ProblemCode, crate::domain::EventKind, super::schemas::LevelCursor)),
    tags(
        (name = "reservations", description = "What order services call: hold, fulfil, release, extend."),
        (name = "stock", description = "Ops: receive, adjust, transfer, look up."),
        (name = "catalogue", description = "Warehouses and SKUs."),
        (name = "ledger", description = "Every change of every stock level."),
        (name = "events", description = "Transactional outbox: stock crossings and reservation lifecycle."),
        (name = "webhooks", description = "Push delivery of the events, signed (admin only)."),
        (name = "operations", description = "Health, metrics."),
    )
)]
#[derive(Debug)]
pub(crate) struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Error, Refusal};
    use crate::http::error::ApiError;
    use utoipa::PartialSchema;

    #[test]
    fn warehouses_are_written_as_the_map_they_replace_in_code_order_whatever_order_they_came_in() {
        // The database hands a SKU's warehouses over in no particular order.
        let came = [("WH2", 5), ("A-1", 0), ("WH10", -2), ("wh1", 7)];
        let written: ByWarehouse<'_> = came.into_iter().collect();
        let map: BTreeMap<&str, i64> = came.into_iter().collect();
        assert_eq!(serde_json::to_string(&written).unwrap(), serde_json::to_string(&map).unwrap());
        assert_eq!(serde_json::to_string(&written).unwrap(), r#"{"A-1":0,"WH10":-2,"WH2":5,"wh1":7}"#);
        assert_eq!(written.total(), 10);
        let none: ByWarehouse<'_> = std::iter::empty().collect();
        assert_eq!((serde_json::to_string(&none).unwrap().as_str(), none.total()), ("{}", 0));
    }

    #[test]
    fn every_code_answered_is_a_documented_problem_code() {
        let id = uuid::Uuid::nil();
        let settle = crate::domain::Settle::Fulfil;
        let refusals = [
            Refusal::UnknownSku("A".into()),
            Refusal::UnknownWebhook("H".into()),
            Refusal::InsufficientStock { detail: String::new(), lines: Vec::new() },
            Refusal::DuplicateOrder { order_id: "o".into(), reservation_id: id },
            Refusal::NotActive { reservation_id: id, status: crate::domain::Status::Expired },
            Refusal::PartlyFulfilled { reservation_id: id },
            Refusal::UnknownChannel("web".into()),
            Refusal::OverSettle { settle, sku: "A".into(), warehouse: "W".into(), requested: 2, held: 1 },
            Refusal::OverSettle {
                settle: crate::domain::Settle::Release,
                sku: "A".into(),
                warehouse: "W".into(),
                requested: 2,
                held: 1,
            },
            Refusal::StaleQuantity { current_on_hand: 1 },
            Refusal::BackorderLimitInUse { warehouse: "W".into(), available: -2, limit: 1 },
            Refusal::IdempotencyInProgress,
            Refusal::IdempotencyKeyReused,
            Refusal::TooManyStreams(String::new()),
            Refusal::Invalid(Vec::new()),
            Refusal::UnknownInRows(Vec::new()),
            Refusal::NotCsv(String::new()),
            Refusal::TooLarge { limit: 1 },
        ];
        let mut errors: Vec<ApiError> = refusals.into_iter().map(ApiError::from).collect();
        errors.extend([
            ApiError::Malformed(String::new()),
            ApiError::Validation(Vec::new()),
            ApiError::NotFound(String::new()),
            ApiError::PayloadTooLarge { limit: 1 },
            ApiError::UnsupportedMediaType,
            ApiError::Unauthorized(String::new()),
            ApiError::Forbidden(String::new()),
            ApiError::MethodNotAllowed,
            ApiError::Timeout(std::time::Duration::from_secs(1)),
            ApiError::from(Error::OutcomeUnknown(String::new())),
            ApiError::from(Error::Unavailable(String::new())),
            ApiError::from(Error::Bug(String::new())),
        ]);
        let schema = serde_json::to_value(ProblemCode::schema()).unwrap();
        let documented: Vec<&str> = schema["enum"].as_array().unwrap().iter().filter_map(|c| c.as_str()).collect();
        for err in &errors {
            assert!(documented.contains(&err.code()), "{} is answered but not documented", err.code());
        }
    }
}
