//! The OpenAPI 3.1 document, generated from the handlers' annotations; the responses and
//! parameters many operations share, declared once; and the shapes of the answers that are
//! not a stored row (pages, lists, views).

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder, ResponsesBuilder, Type};
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

/// A problem+json answer, declared once: `Problem` by reference.
fn problem(description: &str) -> RefOr<Response> {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build();
    ResponseBuilder::new().description(description).content("application/problem+json", content).build().into()
}

/// Declares a set of problem+json responses once, for every operation that can give them.
macro_rules! problems {
    ($(#[$doc:meta])* $name:ident { $($status:literal => $description:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub(crate) struct $name;

        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                ResponsesBuilder::new()$(.response($status, problem($description)))+.build().into()
            }
        }
    };
}

problems!(
    /// The answer every operation can give to a bad query or path (a value of the wrong type,
    /// a NUL byte).
    QueryErrors { "400" => "malformed request (bad query values, a NUL byte in the path or query)" }
);

problems!(
    /// The answers of every operation that takes a JSON body, before it reaches the engine.
    BodyErrors {
        "400" => "malformed JSON or wrong types",
        "413" => "the body is too large",
        "415" => "the body is not declared JSON",
        "422" => "invalid values (every bad field under `errors`)",
    }
);

problems!(
    /// The answers of a listing to a bad query: a value of the wrong type, a bad `limit`.
    PageErrors {
        "400" => "malformed request (bad query values, a NUL byte in the path or query)",
        "422" => "`limit` out of range",
    }
);

problems!(
    /// A stock operation naming a SKU or warehouse that does not exist.
    UnknownSkuOrWarehouse { "404" => "unknown SKU or warehouse" }
);

problems!(
    /// An operation on a reservation that does not exist.
    UnknownReservation { "404" => "unknown reservation" }
);

impl IntoParams for super::extract::IdempotencyKey {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let schema =
            utoipa::openapi::ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)).max_length(Some(255));
        vec![
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .description(Some(
                    "1–255 printable ASCII characters; a retry with the same key and request replays the first answer",
                ))
                .schema(Some(schema))
                .build(),
        ]
    }
}

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
pub(crate) struct AvailabilityItem {
    pub sku: String,
    /// Sum over active warehouses.
    pub available: i64,
    pub warehouses: BTreeMap<String, i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Availability {
    pub items: Vec<AvailabilityItem>,
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
                         orders (reservations), ops (catalogue and stock), admin (everything). Not required when the \
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
    components(schemas(Problem, ProblemCode)),
    tags(
        (name = "reservations", description = "What order services call: hold, fulfil, release, extend."),
        (name = "stock", description = "Ops: receive, adjust, transfer, look up."),
        (name = "catalogue", description = "Warehouses and SKUs."),
        (name = "ledger", description = "Every change of every stock level."),
        (name = "events", description = "Transactional outbox: stock crossings and reservation lifecycle."),
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
    fn every_code_answered_is_a_documented_problem_code() {
        let id = uuid::Uuid::nil();
        let settle = crate::domain::Settle::Fulfil;
        let refusals = [
            Refusal::UnknownSku("A".into()),
            Refusal::InsufficientStock { detail: String::new(), lines: Vec::new() },
            Refusal::DuplicateOrder { order_id: "o".into(), reservation_id: id },
            Refusal::NotActive { reservation_id: id, status: crate::domain::Status::Expired },
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
            Refusal::BadRows(Vec::new()),
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
