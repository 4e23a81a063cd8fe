//! Webhooks: subscriptions, and the sender that POSTs each matching event of the feed to them,
//! signed, in feed order, at least once.
//!
//! A sender claims one due subscription in a transaction (`store::webhooks::claim_due`, a row
//! lock that skips what another sender holds), sends the next matching event, records the
//! outcome and commits. The lock is held for the attempt, so across all service instances one
//! sender at a time delivers a subscription, and the next event goes out only once the previous
//! one got a 2xx. A sender that dies mid-attempt leaves its transaction uncommitted: the event is
//! sent again by whoever claims the subscription next (at least once). A failed attempt is
//! retried after [`retry_pause`], for as long as it takes.
//!
//! The senders use their own small pool, so a slow receiver (an attempt holds a connection for
//! up to 10 s) never takes a connection the requests need, and there are only so many of them
//! (`--webhook-concurrency`): a receiver that is down holds up one sender for at most an attempt.

use std::time::Duration;

use crate::store::db::Db;
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use sqlx::PgConnection;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::error::{Refusal, Result};
use crate::domain::webhooks::{ATTEMPT_TIMEOUT, Secret, retry_pause};
use crate::store::events::{self, Event};
use crate::store::webhooks::{self as store, Claimed, WebhookUpsert};

/// How often an idle sender looks for due work even when no new event was announced (retries
/// that came due, events another instance relayed before this one's feed saw them).
const IDLE: Duration = Duration::from_millis(500);
/// Events looked at per claim when passing over those a subscription does not want.
const SCAN: i64 = 500;
/// Most bytes of a receiver's answer read (and dropped), so the connection can be reused.
const MAX_ANSWER: usize = 64 * 1024;
/// How often the lag metrics are brought up to date.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Creates or updates a subscription; the flag tells whether it was created.
pub(crate) async fn upsert(conn: &mut PgConnection, upsert: &WebhookUpsert) -> Result<(store::Webhook, bool)> {
    let created = store::upsert(conn, upsert).await?;
    let view = store::get(conn, upsert.name.as_str())
        .await?
        .ok_or_else(|| Refusal::UnknownWebhook(upsert.name.clone().into_string()))?;
    Ok((view, created))
}

/// Deletes a subscription; an attempt in flight for it is waited for.
pub(crate) async fn delete(conn: &mut PgConnection, name: &str) -> Result<()> {
    // An attempt holds the progress row for at most its timeout: wait that long, not the
    // (shorter) lock timeout of ordinary requests.
    let wait = format!("{}ms", (ATTEMPT_TIMEOUT + Duration::from_secs(2)).as_millis());
    sqlx::query("SELECT set_config('lock_timeout', $1, true)").bind(wait).execute(&mut *conn).await?;
    if store::delete(conn, name).await? { Ok(()) } else { Err(Refusal::UnknownWebhook(name.to_owned()).into()) }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How one attempt ended.
#[derive(Debug)]
enum Attempt {
    /// A 2xx.
    Delivered(u16),
    /// Another status.
    Rejected(u16),
    /// No connection, or it broke.
    Unreachable(String),
    /// No answer within the timeout.
    TimedOut,
}

impl Attempt {
    fn outcome(&self) -> &'static str {
        match self {
            Self::Delivered(_) => "delivered",
            Self::Rejected(_) => "rejected",
            Self::Unreachable(_) => "unreachable",
            Self::TimedOut => "timeout",
        }
    }
}

/// Starts `concurrency` senders on `db` (their own pool) and the lag sampler; they stop when
/// `stop` flips (an attempt in flight is dropped uncommitted, and sent again later).
pub(crate) fn start(
    db: Db,
    concurrency: usize,
    news: watch::Receiver<i64>,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
    let client: HttpClient = Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let mut tasks: Vec<JoinHandle<()>> = (0..concurrency)
        .map(|_| tokio::spawn(sender(db.clone(), client.clone(), news.clone(), stop.clone())))
        .collect();
    if concurrency > 0 {
        tasks.push(tokio::spawn(sample_lag(db, stop)));
    }
    tasks
}

async fn sender(db: Db, client: HttpClient, mut news: watch::Receiver<i64>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        news.mark_unchanged();
        let busy = tokio::select! {
            result = deliver_next(&db, &client) => match result {
                Ok(busy) => busy,
                Err(err) => {
                    tracing::warn!(error = %err, "webhook delivery failed; will retry");
                    false
                }
            },
            _ = stop.changed() => return,
        };
        if !busy {
            tokio::select! {
                _ = news.changed() => {}
                _ = tokio::time::sleep(IDLE) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Claims one due subscription and makes one attempt at its next matching event (passing over
/// those it does not want); `false` when nothing was due.
async fn deliver_next(db: &Db, client: &HttpClient) -> Result<bool> {
    let mut tx = db.begin().await?;
    let Some(sub) = store::claim_due(&mut tx).await? else {
        tx.commit().await?;
        return Ok(false);
    };
    let page = events::page(&mut tx, sub.delivered_through, SCAN, &[]).await?;
    let wanted = |e: &Event| sub.types.as_ref().is_none_or(|types| types.contains(&e.kind));
    let passed = page.iter().take_while(|e| !wanted(e)).last().map_or(sub.delivered_through, |e| e.id);
    let Some(event) = page.iter().find(|e| wanted(e)) else {
        store::record_progress(&mut tx, &sub.name, passed, None).await?;
        tx.commit().await?;
        return Ok(true);
    };
    let attempt = send(client, &sub, event).await;
    metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "outcome" => attempt.outcome()).increment(1);
    match attempt {
        Attempt::Delivered(status) => {
            store::record_progress(&mut tx, &sub.name, event.id, Some(i32::from(status))).await?;
            metrics::gauge!(crate::metrics::WEBHOOK_FAILING, "webhook" => sub.name.clone()).set(0.0);
        }
        failed => {
            let failures = u32::try_from(sub.attempts).unwrap_or(0).saturating_add(1);
            let pause = retry_pause(failures);
            let (status, error) = match failed {
                Attempt::Rejected(status) => (Some(i32::from(status)), format!("answered HTTP {status}")),
                Attempt::Unreachable(why) => (None, why),
                _ => (None, format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())),
            };
            tracing::info!(webhook = %sub.name, event = event.id, failures, ?pause, %error, "webhook attempt failed");
            store::record_failure(&mut tx, &sub.name, passed, status, &error, pause.as_secs_f64()).await?;
            metrics::gauge!(crate::metrics::WEBHOOK_FAILING, "webhook" => sub.name.clone()).set(f64::from(failures));
        }
    }
    tx.commit().await?;
    Ok(true)
}

/// POSTs one event, signed, and waits for the answer (at most [`ATTEMPT_TIMEOUT`]).
async fn send(client: &HttpClient, sub: &Claimed, event: &Event) -> Attempt {
    // Checked when the subscription was stored; a secret that no longer parses fails the attempt.
    let secret = match Secret::parse(&sub.secret) {
        Ok(secret) => secret,
        Err(_) => return Attempt::Unreachable("the stored secret is not valid".into()),
    };
    // The same JSON object the feed answers for this event.
    let body = match serde_json::to_vec(event) {
        Ok(body) => body,
        Err(err) => return Attempt::Unreachable(format!("cannot render the event: {err}")),
    };
    let timestamp = chrono::Utc::now().timestamp();
    let request = axum::http::Request::post(sub.url.as_str())
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .header(axum::http::header::USER_AGENT, concat!("inventory-webhooks/", env!("CARGO_PKG_VERSION")))
        .header("webhook-id", event.id.to_string())
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", secret.sign(event.id, timestamp, &body))
        .body(Full::new(Bytes::from(body)));
    let request = match request {
        Ok(request) => request,
        Err(err) => return Attempt::Unreachable(format!("cannot build the request: {err}")),
    };
    let exchange = async {
        let response = client.request(request).await.map_err(|err| describe(&err))?;
        let status = response.status();
        // Read (a bounded part of) the answer, so the connection can serve the next event.
        let _ = http_body_util::Limited::new(response.into_body(), MAX_ANSWER).collect().await;
        Ok::<_, String>(status)
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
        Ok(Ok(status)) if status.is_success() => Attempt::Delivered(status.as_u16()),
        Ok(Ok(status)) => Attempt::Rejected(status.as_u16()),
        Ok(Err(why)) => Attempt::Unreachable(why),
        Err(_) => Attempt::TimedOut,
    }
}

/// An error and its causes, in one line.
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Keeps the lag gauges current: each subscription's pending events and failures in a row.
async fn sample_lag(db: Db, mut stop: watch::Receiver<bool>) {
    let mut known: Vec<String> = Vec::new();
    loop {
        let sampled = async {
            let mut conn = db.acquire().await?;
            store::lag(&mut conn).await
        }
        .await;
        match sampled {
            Ok(rows) => {
                let mut max = 0;
                for (name, pending, attempts) in &rows {
                    metrics::gauge!(crate::metrics::WEBHOOK_PENDING, "webhook" => name.clone()).set(*pending as f64);
                    metrics::gauge!(crate::metrics::WEBHOOK_FAILING, "webhook" => name.clone())
                        .set(f64::from(*attempts));
                    max = max.max(*pending);
                }
                // A deleted subscription reads 0 from then on.
                for gone in known.iter().filter(|k| !rows.iter().any(|(n, _, _)| n == *k)) {
                    metrics::gauge!(crate::metrics::WEBHOOK_PENDING, "webhook" => gone.clone()).set(0.0);
                    metrics::gauge!(crate::metrics::WEBHOOK_FAILING, "webhook" => gone.clone()).set(0.0);
                }
                known = rows.into_iter().map(|(n, _, _)| n).collect();
                metrics::gauge!(crate::metrics::WEBHOOK_PENDING_MAX).set(max as f64);
            }
            Err(err) => tracing::debug!(error = %err, "webhook lag not sampled"),
        }
        tokio::select! {
            _ = tokio::time::sleep(LAG_EVERY) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
