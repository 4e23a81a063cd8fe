//! Running an operation as one transaction, again as a whole when PostgreSQL asks for it.

use std::future::Future;
use std::time::Duration;

use crate::store::db::Db;
use tracing::Instrument;

use super::error::{Error, Result};
use crate::store::db::{WriterSetup, begin_writer};

/// How many times a transaction that hit a deadlock or serialization failure is run in all.
const MAX_ATTEMPTS: u32 = 5;

/// Sleeps before attempt `tries + 1`: jittered exponential backoff.
async fn backoff(tries: u32) {
    let jitter = rand::random_range(0..(5u64 << tries));
    tokio::time::sleep(Duration::from_millis(jitter)).await;
}

/// The future of one transaction body, borrowing the transaction's connection and context.
pub(crate) type TxFuture<'c, T> = std::pin::Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>;

/// Runs `body(tx, ctx)` inside a transaction, committing on `Ok` and rolling back on `Err`.
/// A deadlock or serialization failure (40P01, 40001) runs the whole transaction again, with
/// jittered backoff, at most `MAX_ATTEMPTS` times in all; it never reaches the client as a 500.
/// Each attempt is a DEBUG span, `transaction`, with its number (and the SQLSTATE that ended it
/// when it is run again), beneath the operation that runs it: a transaction outside any span (the
/// expiry sweep's, every second) is exported as no trace of its own.
pub(crate) async fn transact<C, T, F>(pool: &Db, ctx: &C, body: F) -> Result<T>
where
    C: Sync + ?Sized,
    F: for<'c> FnMut(&'c mut sqlx::PgConnection, &'c C) -> TxFuture<'c, T>,
{
    transact_with(pool, WriterSetup::default(), ctx, body).await
}

/// [`transact`], begun as `setup` says (a cap on row lock waits, generic plans).
pub(crate) async fn transact_with<C, T, F>(pool: &Db, setup: WriterSetup, ctx: &C, mut body: F) -> Result<T>
where
    C: Sync + ?Sized,
    F: for<'c> FnMut(&'c mut sqlx::PgConnection, &'c C) -> TxFuture<'c, T>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        let span = if crate::telemetry::exporting() && tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            tracing::debug_span!("transaction", attempt = tries, sqlstate = tracing::field::Empty)
        };
        let attempt = async {
            let mut tx = begin_writer(pool, setup).await?;
            match body(&mut tx, ctx).await {
                Ok(out) => {
                    tx.commit().await.map_err(Error::from_commit)?;
                    Ok::<T, Error>(out)
                }
                Err(err) => {
                    // Rolled back here, before anyone is answered or the work runs again: a
                    // dropped transaction is only rolled back when its connection is next used,
                    // and until then it still holds its locks — an idempotency key's among them,
                    // which a retry on another connection would find taken (409
                    // idempotency_in_progress for a request nobody is running). A connection that
                    // broke cannot roll back and needs not: the server ends its transaction.
                    let _ = tx.rollback().await;
                    Err(err)
                }
            }
        };
        match attempt.instrument(span.clone()).await {
            Err(err) if err.is_retryable() && tries < MAX_ATTEMPTS => {
                let sqlstate = err.sqlstate().unwrap_or_default();
                span.record("sqlstate", sqlstate.as_str());
                tracing::debug!(%sqlstate, tries, "retrying transaction");
                metrics::counter!(crate::metrics::TX_RETRIES, "sqlstate" => sqlstate).increment(1);
                backoff(tries).await;
            }
            Err(err) if err.is_retryable() => {
                tracing::warn!(error = %err, tries, "transaction kept conflicting; giving up");
                return Err(Error::Unavailable(format!("gave up after {tries} conflicting attempts")));
            }
            other => return other,
        }
    }
}
