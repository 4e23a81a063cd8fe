//! The `Idempotency-Key` protocol: claim the key, run the operation, store its answer — all in
//! the operation's own transaction. A retry with the same key and request replays the stored
//! answer; the same key with another request is refused; a retry while the first still runs is
//! told to wait. Only results and refusals are stored: an operation that failed otherwise (the
//! database, a bug) rolls back with its claim, and a retry runs it again.

use crate::store::db::Db;
use serde::Serialize;
use sqlx::{Connection, PgConnection};

use super::error::{Error, Refusal, Result};
use super::tx::{TxFuture, transact};
use crate::store::idempotency::{self as store, Stored};

/// A keyed request as its claim and stored answer see it.
#[derive(Debug, Clone)]
pub(crate) struct Keyed {
    pub key: String,
    pub method: &'static str,
    pub path: String,
    /// The canonical text of the request (same text, same request).
    pub fingerprint: String,
    /// The status stored with a successful answer.
    pub success: u16,
}

/// An answer as stored and replayed: a status and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub status: u16,
    pub body: String,
}

/// Writes a refusal down the way it is answered; given by the layer that answers.
pub(crate) type Render = fn(&Refusal) -> Answer;

/// What a request with (or without) a key came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Executed now; the result as JSON.
    Done(String),
    /// Executed before; the stored answer.
    Replay(Answer),
    /// Refused, now or before this key's request was seen again.
    Refused(Refusal),
}

impl Outcome {
    /// The outcome of executing a request now.
    pub(crate) fn executed<T: Serialize>(result: Result<T, Refusal>) -> Result<Self> {
        match result {
            Ok(value) => Ok(Self::Done(serde_json::to_string(&value).map_err(|e| Error::Bug(e.to_string()))?)),
            Err(refusal) => Ok(Self::Refused(refusal)),
        }
    }
}

/// Claims the keys of a batch and looks up stored answers: for each key, `Some(outcome)` when
/// it is already decided (replay, reuse, in progress), `None` when the request must run.
pub(crate) async fn claim_many(conn: &mut PgConnection, keyed: &[&Keyed]) -> Result<Vec<Option<Outcome>>> {
    let keys: Vec<&str> = keyed.iter().map(|k| k.key.as_str()).collect();
    let claims = store::claim(conn, &keys).await?;
    Ok(keyed
        .iter()
        .zip(claims)
        .map(|(k, (locked, stored))| {
            if !locked {
                return Some(Outcome::Refused(Refusal::IdempotencyInProgress));
            }
            let stored = stored?;
            if stored.method == k.method && stored.path == k.path && stored.request == k.fingerprint {
                Some(Outcome::Replay(Answer { status: stored.status as u16, body: stored.response }))
            } else {
                Some(Outcome::Refused(Refusal::IdempotencyKeyReused))
            }
        })
        .collect())
}

/// Stores the answers of keyed requests executed in this transaction (refusals too).
pub(crate) async fn store_many(conn: &mut PgConnection, answers: &[(&Keyed, &Outcome)], render: Render) -> Result<()> {
    let rows: Vec<Stored> = answers
        .iter()
        .filter_map(|(k, outcome)| {
            let answer = match outcome {
                Outcome::Done(body) => Answer { status: k.success, body: body.clone() },
                Outcome::Refused(refusal) => render(refusal),
                Outcome::Replay(_) => return None,
            };
            Some(Stored {
                key: k.key.clone(),
                method: k.method.to_owned(),
                path: k.path.clone(),
                request: k.fingerprint.clone(),
                status: answer.status as i16,
                response: answer.body,
            })
        })
        .collect();
    Ok(store::insert(conn, &rows).await?)
}

/// Everything one attempt needs, passed by reference into the transaction body.
struct Attempt<'a, C: ?Sized, F> {
    keyed: &'a Keyed,
    render: Render,
    ctx: &'a C,
    op: &'a F,
}

/// Runs `op` in a transaction once per idempotency key (or plainly, without a key).
pub async fn run<C, T, F>(db: &Db, keyed: Option<&Keyed>, render: Render, ctx: &C, op: F) -> Result<Outcome>
where
    C: Sync + ?Sized,
    T: Serialize + Send,
    F: for<'c> Fn(&'c mut PgConnection, &'c C) -> TxFuture<'c, T> + Sync,
{
    let Some(keyed) = keyed else {
        return match transact(db, ctx, op).await {
            Ok(value) => Outcome::executed(Ok(value)),
            Err(Error::Refused(refusal)) => Ok(Outcome::Refused(refusal)),
            Err(err) => Err(err),
        };
    };
    let attempt = Attempt { keyed, render, ctx, op: &op };
    transact(db, &attempt, |conn, a| Box::pin(once(conn, a))).await
}

async fn once<C, T, F>(conn: &mut PgConnection, attempt: &Attempt<'_, C, F>) -> Result<Outcome>
where
    C: Sync + ?Sized,
    T: Serialize + Send,
    F: for<'c> Fn(&'c mut PgConnection, &'c C) -> TxFuture<'c, T> + Sync,
{
    let Attempt { keyed, render, ctx, op } = attempt;
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
        // A refusal is an answer: a retry replays it. Anything else is not stored (its
        // transaction rolls back), so a retry runs again.
        Err(Error::Refused(refusal)) => {
            savepoint.rollback().await?;
            Err(refusal)
        }
        Err(err) => return Err(err),
    };
    let outcome = Outcome::executed(result)?;
    store_many(conn, &[(keyed, &outcome)], *render).await?;
    Ok(outcome)
}
