//! Idempotency keys: the advisory lock that claims a key for one running request, and the
//! stored answers that later requests with the key replay.

use sqlx::PgConnection;

/// An answer stored under a key, with the request it answered.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Stored {
    pub key: String,
    pub method: String,
    pub path: String,
    /// The request's fingerprint.
    pub request: String,
    pub status: i16,
    pub response: String,
}

/// Tries to claim each key (an advisory lock held until this transaction ends); `false` where
/// another running transaction holds it. Then — in a second statement — reads the answers
/// stored under the keys, in the order given (`None` where there is none).
///
/// Two statements because in READ COMMITTED a statement reads the snapshot taken when it
/// began: a lookup in the locking statement could be older than the lock it just won from a
/// request that committed in between, miss that request's stored answer, run it again, and fail
/// on the key's unique index. A lock is released only after its holder's commit is visible, so
/// a snapshot taken after the lock is held sees every stored answer.
pub(crate) async fn claim(conn: &mut PgConnection, keys: &[&str]) -> Result<Vec<(bool, Option<Stored>)>, sqlx::Error> {
    let locked: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtextextended(u.key, 7041))
           FROM unnest($1::text[]) WITH ORDINALITY AS u(key, n)
          ORDER BY u.n",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    let stored: Vec<Stored> =
        sqlx::query_as("SELECT key, method, path, request, status, response FROM idempotency_keys WHERE key = ANY($1)")
            .bind(keys)
            .fetch_all(&mut *conn)
            .await?;
    Ok(keys.iter().zip(locked).map(|(key, locked)| (locked, stored.iter().find(|s| s.key == *key).cloned())).collect())
}

/// Stores answers.
pub(crate) async fn insert(conn: &mut PgConnection, rows: &[Stored]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO idempotency_keys (key, method, path, request, status, response)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int2[], $6::text[])",
    )
    .bind(rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.method.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.path.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.request.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.status).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.response.as_str()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes keys older than the retention, a bounded batch at a time; returns how many.
pub(crate) async fn purge(conn: &mut PgConnection, retention_secs: i64, batch: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM idempotency_keys WHERE key IN (
             SELECT key FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)
              ORDER BY created_at LIMIT $2)",
    )
    .bind(retention_secs as f64)
    .bind(batch)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
