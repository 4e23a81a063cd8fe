//! The OpenAPI 3.1 document, generated from the handlers' annotations, and the shapes that
//! only exist in it (pages, problems).

use std::collections::BTreeMap;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::store::catalogue::Warehouse;
use crate::store::events::Event;
use crate::store::ledger::Entry;
use crate::store::reservations::Reservation;
use crate::store::stock::Level;

/// The stable `code` of a problem.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum ProblemCode {
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

/// An RFC 9457 problem (`application/problem+json`). Conflicts may carry more members.
#[derive(Debug, ToSchema)]
pub struct Problem {
    #[schema(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: ProblemCode,
    /// The request's `x-request-id`.
    pub request_id: String,
    /// 422 `validation_failed`: every bad field.
    pub errors: Option<Vec<FieldErrorDoc>>,
    /// 409 `insufficient_stock`: every short line.
    pub lines: Option<Vec<ShortLineDoc>>,
    /// 409 `duplicate_order`: the existing reservation.
    pub reservation_id: Option<String>,
    /// 409 `reservation_not_active`: the reservation's status.
    pub reservation_status: Option<String>,
    /// 409 `stale_quantity`: the `on_hand` at the moment of the change.
    pub current_on_hand: Option<i64>,
}

#[derive(Debug, ToSchema)]
#[schema(as = FieldError)]
pub struct FieldErrorDoc {
    pub field: String,
    pub message: String,
}

#[derive(Debug, ToSchema)]
#[schema(as = ShortLine)]
pub struct ShortLineDoc {
    pub sku: String,
    pub requested: i64,
    pub available: i64,
}

#[derive(Debug, ToSchema)]
pub struct WarehouseList {
    pub items: Vec<Warehouse>,
}

#[derive(Debug, ToSchema)]
pub struct LevelPage {
    pub items: Vec<Level>,
    /// Pass back as `cursor`; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, ToSchema)]
pub struct LedgerPage {
    pub items: Vec<Entry>,
    /// Pass back as `after`; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, ToSchema)]
pub struct EventPage {
    pub items: Vec<Event>,
    /// The last id returned (or `after` when nothing is new): poll on with `after=next_cursor`.
    pub next_cursor: i64,
}

#[derive(Debug, ToSchema)]
pub struct ReservationList {
    pub items: Vec<Reservation>,
}

#[derive(Debug, ToSchema)]
pub struct Totals {
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
}

#[derive(Debug, ToSchema)]
pub struct StockView {
    pub sku: String,
    pub backorder_limit: i64,
    pub total: Totals,
    pub warehouses: Vec<Level>,
}

#[derive(Debug, ToSchema)]
pub struct AvailabilityItem {
    pub sku: String,
    /// Sum over active warehouses.
    pub available: i64,
    pub warehouses: BTreeMap<String, i64>,
}

#[derive(Debug, ToSchema)]
pub struct Availability {
    pub items: Vec<AvailabilityItem>,
}

#[derive(Debug, ToSchema)]
pub struct Health {
    pub status: String,
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
pub struct ApiDoc;
