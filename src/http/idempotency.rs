//! `Idempotency-Key` for every POST: the first execution's status and body are stored in the
//! same transaction as its effect; a retry with the same key and body replays them; the same
//! key with another body is 422; a retry while the first still runs is 409.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

use super::AppState;
use crate::db::{TxFuture, transact};
use crate::error::ApiError;

/// The request as far as idempotency is concerned.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub key: Option<&'a str>,
    pub method: &'static str,
    pub path: &'a str,
    pub body: &'a Value,
    /// Status of a successful answer.
    pub success: StatusCode,
}

impl Request<'_> {
    /// The request as its key's claim and stored answer see it; `None` without a key.
    pub fn keyed(&self) -> Option<Keyed> {
        Some(Keyed {
            key: self.key?.to_owned(),
            method: self.method,
            path: self.path.to_owned(),
            fingerprint: fingerprint(self.body),
        })
    }
}

/// What a request with (or without) a key came to.
#[derive(Debug)]
pub enum Outcome {
    /// Executed now; the status and body of the answer.
    Fresh(StatusCode, String),
    /// Executed before; the stored answer.
    Replay(StatusCode, String),
    Refused(ApiError),
}

impl Outcome {
    /// The HTTP answer. Call it in the request's own task (a replayed problem names the
    /// current request id).
    pub fn render(self) -> Response {
        match self {
            Self::Fresh(status, body) => json_response(status, body, false),
            Self::Replay(status, body) => {
                metrics::counter!(crate::metrics::IDEMPOTENT_REPLAYS).increment(1);
                json_response(status, with_current_request_id(status, body), true)
            }
            Self::Refused(err) => err.into_response(),
        }
    }

    /// The outcome of executing a request now.
    pub fn executed<T: Serialize>(success: StatusCode, result: Result<T, ApiError>) -> Self {
        match result.and_then(|v| serde_json::to_string(&v).map_err(|e| ApiError::Internal(e.to_string()))) {
            Ok(body) => Self::Fresh(success, body),
            Err(err) => Self::Refused(err),
        }
    }
}

/// A keyed request in a batch: claimed, looked up and stored together with its neighbours.
#[derive(Debug, Clone)]
pub struct Keyed {
    pub key: String,
    pub method: &'static str,
    pub path: String,
    pub fingerprint: String,
}

/// The canonical text of a JSON body (serde_json's maps are sorted).
fn fingerprint(body: &Value) -> String {
    body.to_string()
}

/// Claims the keys of a batch (advisory transaction locks) and looks up stored answers: for
/// each key, `Some(outcome)` when it is already decided (replay, reuse, in progress), `None`
/// when the request must run.
pub async fn claim_many(conn: &mut PgConnection, keyed: &[&Keyed]) -> Result<Vec<Option<Outcome>>, ApiError> {
    let keys: Vec<&str> = keyed.iter().map(|k| k.key.as_str()).collect();
    // First the locks, then — in a second statement — the stored answers. In READ COMMITTED a
    // statement reads the snapshot taken when it began: a lookup in the locking statement
    // could be older than the lock it just won from a request that committed in between, miss
    // that request's stored answer, run it again, and fail on the key's unique index. A lock
    // is released only after its holder's commit is visible, so a snapshot taken after the
    // lock is held sees every stored answer.
    let locked: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtextextended(u.key, 7041))
           FROM unnest($1::text[]) WITH ORDINALITY AS u(key, n)
          ORDER BY u.n",
    )
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await?;
    #[derive(sqlx::FromRow)]
    struct Stored {
        method: Option<String>,
        path: Option<String>,
        request: Option<String>,
        status: Option<i16>,
        response: Option<String>,
    }
    let rows: Vec<Stored> = sqlx::query_as(
        "SELECT i.method, i.path, i.request, i.status, i.response
           FROM unnest($1::text[]) WITH ORDINALITY AS u(key, n)
           LEFT JOIN idempotency_keys i ON i.key = u.key
          ORDER BY u.n",
    )
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await?;
    Ok(keyed
        .iter()
        .zip(locked.into_iter().zip(rows))
        .map(|(k, (locked, row))| {
            if !locked {
                return Some(Outcome::Refused(in_progress()));
            }
            let (method, path, request, status, response) =
                (row.method?, row.path?, row.request?, row.status?, row.response?);
            if method == k.method && path == k.path && request == k.fingerprint {
                let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
                Some(Outcome::Replay(status, response))
            } else {
                Some(Outcome::Refused(ApiError::IdempotencyKeyReused))
            }
        })
        .collect())
}

/// Stores the answers of keyed requests executed in this transaction (client errors too;
/// server errors never reach here, their transaction rolls back).
pub async fn store_many(conn: &mut PgConnection, answers: &[(&Keyed, &Outcome)]) -> Result<(), ApiError> {
    let mut stored: Vec<&Keyed> = Vec::new();
    let (mut statuses, mut bodies): (Vec<i16>, Vec<String>) = (Vec::new(), Vec::new());
    for (k, outcome) in answers {
        let (status, body) = match outcome {
            Outcome::Fresh(status, body) => (*status, body.clone()),
            Outcome::Refused(err) => (err.status(), err.to_problem().to_string()),
            Outcome::Replay(..) => continue,
        };
        stored.push(k);
        statuses.push(status.as_u16() as i16);
        bodies.push(body);
    }
    if stored.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO idempotency_keys (key, method, path, request, status, response)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int2[], $6::text[])",
    )
    .bind(stored.iter().map(|k| k.key.as_str()).collect::<Vec<_>>())
    .bind(stored.iter().map(|k| k.method).collect::<Vec<_>>())
    .bind(stored.iter().map(|k| k.path.as_str()).collect::<Vec<_>>())
    .bind(stored.iter().map(|k| k.fingerprint.as_str()).collect::<Vec<_>>())
    .bind(statuses)
    .bind(bodies)
    .execute(conn)
    .await?;
    Ok(())
}

fn in_progress() -> ApiError {
    ApiError::conflict(
        "idempotency_in_progress",
        "a request with this Idempotency-Key is still being processed; retry shortly",
    )
}

/// Everything one attempt needs, passed by reference into the transaction body.
struct Attempt<'a, C: ?Sized, F> {
    keyed: &'a Keyed,
    success: StatusCode,
    ctx: &'a C,
    op: &'a F,
}

/// Runs `op` once per idempotency key (or plainly, without a key) and renders the answer.
pub async fn run<C, T, F>(state: &AppState, req: Request<'_>, ctx: &C, op: F) -> Result<Response, ApiError>
where
    C: Sync + ?Sized,
    T: Serialize + Send,
    F: for<'c> Fn(&'c mut PgConnection, &'c C) -> TxFuture<'c, T> + Sync,
{
    let Some(keyed) = req.keyed() else {
        let value = transact(&state.db, ctx, op).await?;
        return Ok(json_response(req.success, serde_json::to_string(&value).unwrap_or_default(), false));
    };
    let attempt = Attempt { keyed: &keyed, success: req.success, ctx, op: &op };
    let outcome = transact(&state.db, &attempt, |conn, a| Box::pin(once(conn, a))).await?;
    Ok(outcome.render())
}

async fn once<C, T, F>(conn: &mut PgConnection, attempt: &Attempt<'_, C, F>) -> Result<Outcome, ApiError>
where
    C: Sync + ?Sized,
    T: Serialize + Send,
    F: for<'c> Fn(&'c mut PgConnection, &'c C) -> TxFuture<'c, T> + Sync,
{
    let Attempt { keyed, success, ctx, op } = attempt;
    // The key is held until commit: a concurrent request with it is told to wait, not run twice.
    if let Some(decided) = claim_many(conn, &[keyed]).await?.pop().flatten() {
        return Ok(decided);
    }
    // The effect runs in a savepoint, so a refused request can still store its answer.
    let mut savepoint = conn.begin().await?;
    let result = match op(&mut savepoint, ctx).await {
        Ok(value) => {
            savepoint.commit().await?;
            Ok(value)
        }
        // Client errors are answers too: a retry replays them. Server errors are not stored,
        // so a retry runs again.
        Err(err) if err.status().is_client_error() => {
            savepoint.rollback().await?;
            Err(err)
        }
        Err(err) => return Err(err),
    };
    let outcome = Outcome::executed(*success, result);
    store_many(conn, &[(keyed, &outcome)]).await?;
    Ok(outcome)
}

fn json_response(status: StatusCode, body: String, replayed: bool) -> Response {
    let content_type = if status.is_success() { "application/json" } else { "application/problem+json" };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// A replayed problem names the request being answered now, not the first one.
fn with_current_request_id(status: StatusCode, body: String) -> String {
    if status.is_success() {
        return body;
    }
    match (serde_json::from_str::<Value>(&body), super::request_id::current()) {
        (Ok(Value::Object(mut map)), Some(id)) => {
            map.insert("request_id".into(), Value::String(id));
            Value::Object(map).to_string()
        }
        _ => body,
    }
}

/// Deletes keys older than the retention, a bounded batch at a time; returns how many.
pub async fn purge_expired(db: &sqlx::PgPool, retention_secs: i64, batch: i64) -> Result<u64, ApiError> {
    let done = sqlx::query(
        "DELETE FROM idempotency_keys WHERE key IN (
             SELECT key FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)
              ORDER BY created_at LIMIT $2)",
    )
    .bind(retention_secs as f64)
    .bind(batch)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
