//! Webhook subscriptions and their delivery progress.
//!
//! Locks: a sender holds its subscription's `webhook_progress` row (`claim_due`, `FOR UPDATE
//! SKIP LOCKED`) from the claim through the attempt to the recorded outcome: one sender per
//! subscription at a time, across service instances, and only transaction-level locks.
//! Changing a subscription touches `webhooks` and, without waiting, its progress row when no
//! sender holds it; deleting it waits for the attempt in flight (at most its timeout).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use crate::domain::WebhookName;

/// A subscription as the API shows it (never its secret).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Webhook {
    #[schema(value_type = crate::domain::WebhookName)]
    pub name: String,
    pub url: String,
    /// The event types delivered; null: every type.
    #[schema(value_type = Option<Vec<crate::domain::EventKind>>)]
    pub types: Option<Vec<String>>,
    /// Every event up to this id was delivered (or did not match `types`).
    pub delivered_through: i64,
    /// Matching events in the feed after `delivered_through`, not yet delivered (counted up to
    /// 100,000: a subscription that far behind reads 100000).
    pub pending: i64,
    /// The HTTP status of the last attempt (null: no answer, or no attempt yet).
    pub last_status: Option<i32>,
    /// Why the last attempt failed (null when it succeeded, or none was made).
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// Failed attempts in a row at the next event.
    pub attempts: i32,
    /// When the next attempt is due (when there is an event to deliver).
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a `PUT /v1/webhooks/{name}` sets (`Debug` leaves the secret out).
#[derive(Clone)]
pub(crate) struct WebhookUpsert {
    pub name: WebhookName,
    pub url: String,
    /// As given (`whsec_…`), checked by `domain::webhooks::Secret`.
    pub secret: String,
    pub types: Option<Vec<String>>,
}

const VIEW: &str = "SELECT w.name, w.url, w.types, p.delivered_through,
            (SELECT count(*) FROM (SELECT 1 FROM event_ids n JOIN events e ON e.txid = n.txid AND e.seq = n.seq
              WHERE n.id > p.delivered_through AND (w.types IS NULL OR e.type = ANY(w.types))
              ORDER BY n.id LIMIT 100000) AS behind) AS pending,
            p.last_status, p.last_error, p.last_attempt_at, p.attempts, p.next_attempt_at,
            w.created_at, w.updated_at
       FROM webhooks w JOIN webhook_progress p USING (name)";

/// Creates or updates a subscription; the flag tells whether it was created. A new one starts
/// after the last event in the feed; an updated one keeps its progress, and when no attempt is
/// in flight its next attempt is due at once (a fixed URL is tried without waiting out a pause).
pub(crate) async fn upsert(conn: &mut PgConnection, w: &WebhookUpsert) -> Result<bool, sqlx::Error> {
    let created: bool = sqlx::query_scalar(
        "INSERT INTO webhooks AS w (name, url, secret, types) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET
             url = EXCLUDED.url, secret = EXCLUDED.secret, types = EXCLUDED.types, updated_at = now()
         RETURNING (xmax = 0)",
    )
    .bind(w.name.as_str())
    .bind(&w.url)
    .bind(&w.secret)
    .bind(&w.types)
    .fetch_one(&mut *conn)
    .await?;
    if created {
        sqlx::query(
            "INSERT INTO webhook_progress (name, delivered_through)
             VALUES ($1, (SELECT coalesce(max(id), 0) FROM event_ids))",
        )
        .bind(w.name.as_str())
        .execute(&mut *conn)
        .await?;
    } else {
        sqlx::query(
            "UPDATE webhook_progress SET attempts = 0, next_attempt_at = now()
              WHERE name = (SELECT name FROM webhook_progress WHERE name = $1 FOR UPDATE SKIP LOCKED)",
        )
        .bind(w.name.as_str())
        .execute(&mut *conn)
        .await?;
    }
    Ok(created)
}

pub(crate) async fn get(conn: &mut PgConnection, name: &str) -> Result<Option<Webhook>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("{VIEW} WHERE w.name = $1"))).bind(name).fetch_optional(conn).await
}

pub(crate) async fn list(conn: &mut PgConnection) -> Result<Vec<Webhook>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("{VIEW} ORDER BY w.name"))).fetch_all(conn).await
}

/// Deletes a subscription (and its progress); `false` when there was none.
pub(crate) async fn delete(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM webhooks WHERE name = $1").bind(name).execute(conn).await?;
    Ok(done.rows_affected() > 0)
}

/// A subscription claimed for delivery (`Debug` leaves the secret out).
#[derive(Clone, sqlx::FromRow)]
pub(crate) struct Claimed {
    pub name: String,
    pub url: String,
    pub secret: String,
    pub types: Option<Vec<String>>,
    pub delivered_through: i64,
    pub attempts: i32,
}

/// Locks the subscription whose attempt is most overdue and that has events after its
/// progress, skipping those another sender holds; `None` when none is due. The lock lasts
/// until the caller's transaction ends.
pub(crate) async fn claim_due(conn: &mut PgConnection) -> Result<Option<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.name, w.url, w.secret, w.types, p.delivered_through, p.attempts
           FROM webhook_progress p JOIN webhooks w USING (name)
          WHERE p.next_attempt_at <= now()
            AND p.delivered_through < (SELECT coalesce(max(id), 0) FROM event_ids)
          ORDER BY p.next_attempt_at
          LIMIT 1
          FOR UPDATE OF p SKIP LOCKED",
    )
    .fetch_optional(conn)
    .await
}

/// Records a delivered event (or, with `status` `None`, events passed over because they do not
/// match): progress moves to `through`, the failure count starts again.
pub(crate) async fn record_progress(
    conn: &mut PgConnection,
    name: &str,
    through: i64,
    status: Option<i32>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_progress SET delivered_through = $2, attempts = 0, next_attempt_at = now(),
                last_status = coalesce($3, last_status),
                last_error = CASE WHEN $3 IS NULL THEN last_error END,
                last_attempt_at = CASE WHEN $3 IS NULL THEN last_attempt_at ELSE now() END
          WHERE name = $1",
    )
    .bind(name)
    .bind(through)
    .bind(status)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a failed attempt: progress moves to `through` (events passed over before the one
/// that failed), and the next attempt waits `pause_secs`.
pub(crate) async fn record_failure(
    conn: &mut PgConnection,
    name: &str,
    through: i64,
    status: Option<i32>,
    error: &str,
    pause_secs: f64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_progress SET delivered_through = $2, attempts = attempts + 1,
                next_attempt_at = now() + make_interval(secs => $5),
                last_status = $3, last_error = $4, last_attempt_at = now()
          WHERE name = $1",
    )
    .bind(name)
    .bind(through)
    .bind(status)
    .bind(error)
    .bind(pause_secs)
    .execute(conn)
    .await?;
    Ok(())
}

/// Each subscription's name, pending events and failed attempts in a row (for the metrics).
pub(crate) async fn lag(conn: &mut PgConnection) -> Result<Vec<(String, i64, i32)>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT name, pending, attempts FROM ({VIEW}) v ORDER BY name")))
        .fetch_all(conn)
        .await
}

impl std::fmt::Debug for WebhookUpsert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookUpsert")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &"whsec_…")
            .field("types", &self.types)
            .finish()
    }
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &"whsec_…")
            .field("types", &self.types)
            .field("delivered_through", &self.delivered_through)
            .field("attempts", &self.attempts)
            .finish()
    }
}
