//! The application: every operation of the service, each run as one PostgreSQL transaction.
//!
//! [`Engine`] is the one entry point: `reserve`, `settle`, `receive`, … take a validated
//! request and an optional idempotency key and return an [`Outcome`] or an [`Error`]; whether a
//! reservation went through a batch, and how its key was claimed and its answer stored, stays
//! in here. The operation bodies lock through `store`, decide in memory ([`book::Book`],
//! `domain`), and write set-based.
//!
//! Each entry point opens a DEBUG span (exported as a trace span beneath the request's, hidden
//! from the default logs), and each transaction attempt one beneath it ([`tx::transact`]).

pub(crate) mod availability;
pub(crate) mod batch;
pub(crate) mod book;
pub(crate) mod catalogue;
pub(crate) mod error;
pub(crate) mod expiry;
pub(crate) mod feed;
pub(crate) mod idempotency;
pub mod import;
pub mod reservations;
pub(crate) mod stock;
pub(crate) mod tx;
pub(crate) mod webhooks;

use crate::store::db::Db;
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use self::batch::Batcher;
pub(crate) use self::error::Result;
pub use self::error::{Error, Refusal};
pub(crate) use self::idempotency::{Answer, Keyed, Outcome, Render};
use self::reservations::{Edit, NewReservation, PartLine, SettleRequest};
use self::tx::{TxFuture, transact};
use crate::config::ServerArgs;
use crate::domain::Settle;
use crate::store::catalogue::{SkuRecord, SkuUpsert, Warehouse, WarehouseUpsert};
use crate::store::channels::{Channel, ChannelUpsert};
use crate::store::stock::{Level, Replenishment};
use crate::store::webhooks::{Webhook, WebhookUpsert};

/// The engine of one process; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Engine {
    db: Db,
    /// Gathers reservations into batches; `None` when batching is off (`batch_max` 1).
    batcher: Option<Batcher<NewReservation>>,
    /// Gathers fulfils and releases into batches, likewise.
    settler: Option<Batcher<SettleRequest>>,
    render: Render,
}

impl Engine {
    /// The engine, with its batcher running when batching is on. `render` writes a refusal
    /// down for replay the way it is answered.
    pub fn start(db: Db, config: &ServerArgs, render: Render) -> Self {
        let batcher = (config.batch_max > 1).then(|| Batcher::spawn(db.clone(), config, render));
        let settler = (config.batch_max > 1).then(|| Batcher::spawn(db.clone(), config, render));
        Self { db, batcher, settler, render }
    }

    /// Runs `op` as one transaction, once per key.
    async fn run<C, T, F>(&self, key: Option<&Keyed>, ctx: &C, op: F) -> Result<Outcome>
    where
        C: Sync + ?Sized,
        T: Serialize + Send,
        F: for<'c> Fn(&'c mut PgConnection, &'c C) -> TxFuture<'c, T> + Sync,
    {
        idempotency::run(&self.db, key, self.render, ctx, op).await
    }

    /// Holds stock for one order, all or nothing: in a batch with concurrent orders when
    /// batching is on, alone when it is off or the batch failed as a whole.
    #[tracing::instrument(level = "debug", skip_all, fields(order_id = %req.order_id, lines = req.lines.len(), keyed = key.is_some()))]
    pub(crate) async fn reserve(&self, req: NewReservation, key: Option<Keyed>) -> Result<Outcome> {
        if let Some(batcher) = &self.batcher
            && let Some(outcome) = batcher.submit(req.clone(), key.clone()).await
        {
            return outcome;
        }
        self.run(key.as_ref(), &req, |tx, req| Box::pin(reservations::reserve(tx, req))).await
    }

    /// The allocation `reserve` would make now, holding nothing.
    #[tracing::instrument(level = "debug", skip_all, fields(order_id = %req.order_id, lines = req.lines.len()))]
    pub(crate) async fn plan(&self, req: &NewReservation, key: Option<&Keyed>) -> Result<Outcome> {
        self.run(key, req, |tx, req| Box::pin(reservations::plan(tx, req))).await
    }

    /// Fulfils or releases what a reservation holds (all of it when `parts` is `None`): in a
    /// batch with concurrent settles when batching is on, alone when it is off or the batch
    /// failed as a whole.
    #[tracing::instrument(level = "debug", skip_all, fields(reservation = %id, kind = kind.verb(), keyed = key.is_some()))]
    pub(crate) async fn settle(
        &self,
        id: Uuid,
        kind: Settle,
        parts: Option<Vec<PartLine>>,
        key: Option<&Keyed>,
    ) -> Result<Outcome> {
        let req = SettleRequest { id, kind, parts };
        if let Some(settler) = &self.settler
            && let Some(outcome) = settler.submit(req.clone(), key.cloned()).await
        {
            return outcome;
        }
        self.run(key, &req, |tx, req| Box::pin(reservations::settle(tx, req))).await
    }

    /// Changes an open reservation's lines to a complete new set, all or nothing.
    #[tracing::instrument(level = "debug", skip_all, fields(reservation = %id, lines = edit.lines.len(), keyed = key.is_some()))]
    pub(crate) async fn modify(&self, id: Uuid, edit: Edit, key: Option<&Keyed>) -> Result<Outcome> {
        self.run(key, &(id, edit), |tx, (id, edit)| Box::pin(reservations::modify(tx, *id, edit))).await
    }

    /// Moves an active reservation's deadline to now + `ttl_seconds`.
    #[tracing::instrument(level = "debug", skip_all, fields(reservation = %id, keyed = key.is_some()))]
    pub(crate) async fn extend(&self, id: Uuid, ttl_seconds: i64, key: Option<&Keyed>) -> Result<Outcome> {
        self.run(key, &(id, ttl_seconds), |tx, (id, ttl)| Box::pin(reservations::extend(tx, *id, *ttl))).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(sku = %cmd.sku, warehouse = %cmd.warehouse, keyed = key.is_some()))]
    pub(crate) async fn receive(&self, cmd: &stock::Receive, key: Option<&Keyed>) -> Result<Outcome> {
        self.run(key, cmd, |tx, cmd| Box::pin(stock::receive(tx, cmd))).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(sku = %cmd.sku, warehouse = %cmd.warehouse, keyed = key.is_some()))]
    pub(crate) async fn adjust(&self, cmd: &stock::Adjust, key: Option<&Keyed>) -> Result<Outcome> {
        self.run(key, cmd, |tx, cmd| Box::pin(stock::adjust(tx, cmd))).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(sku = %cmd.sku, from = %cmd.from, to = %cmd.to, keyed = key.is_some()))]
    pub(crate) async fn transfer(&self, cmd: &stock::Transfer, key: Option<&Keyed>) -> Result<Outcome> {
        self.run(key, cmd, |tx, cmd| Box::pin(stock::transfer(tx, cmd))).await
    }

    /// Applies a staged CSV upload.
    #[tracing::instrument(level = "debug", skip_all, fields(create_missing = create_missing, keyed = key.is_some()))]
    pub async fn import(&self, staged: &import::Staged, create_missing: bool, key: Option<&Keyed>) -> Result<Outcome> {
        self.run(key, staged, move |tx, staged| Box::pin(import::apply(tx, staged, create_missing))).await
    }

    /// Sets a level's replenishment settings; the flag tells whether the level was created.
    #[tracing::instrument(level = "debug", skip_all, fields(sku = %settings.sku, warehouse = %settings.warehouse))]
    pub(crate) async fn set_replenishment(&self, settings: &Replenishment) -> Result<(Level, bool)> {
        transact(&self.db, settings, |tx, settings| Box::pin(stock::set_replenishment(tx, settings))).await
    }

    /// Creates or updates a warehouse; the flag tells whether it was created.
    #[tracing::instrument(level = "debug", skip_all, fields(warehouse = %upsert.code))]
    pub(crate) async fn upsert_warehouse(&self, upsert: &WarehouseUpsert) -> Result<(Warehouse, bool)> {
        transact(&self.db, upsert, |tx, upsert| Box::pin(catalogue::upsert_warehouse(tx, upsert))).await
    }

    /// Creates or updates a SKU; the flag tells whether it was created.
    #[tracing::instrument(level = "debug", skip_all, fields(sku = %upsert.sku))]
    pub(crate) async fn upsert_sku(&self, upsert: &SkuUpsert) -> Result<(SkuRecord, bool)> {
        transact(&self.db, upsert, |tx, upsert| Box::pin(catalogue::upsert_sku(tx, upsert))).await
    }

    /// Creates or replaces a sales channel; the flag tells whether it was created.
    #[tracing::instrument(level = "debug", skip_all, fields(channel = %upsert.code))]
    pub(crate) async fn upsert_channel(&self, upsert: &ChannelUpsert) -> Result<(Channel, bool)> {
        transact(&self.db, upsert, |tx, upsert| Box::pin(catalogue::upsert_channel(tx, upsert))).await
    }

    /// Creates or updates a webhook subscription; the flag tells whether it was created. (A plain
    /// transaction: it writes no ledger entries or events, so it does not announce itself as a
    /// writer.)
    #[tracing::instrument(level = "debug", skip_all, fields(webhook = %upsert.name))]
    pub(crate) async fn upsert_webhook(&self, upsert: &WebhookUpsert) -> Result<(Webhook, bool)> {
        let mut tx = self.db.begin().await?;
        let out = webhooks::upsert(&mut tx, upsert).await?;
        tx.commit().await.map_err(Error::from_commit)?;
        Ok(out)
    }

    /// Deletes a webhook subscription (a plain transaction, as for [`Engine::upsert_webhook`]:
    /// waiting for an attempt in flight must not hold the ledger's writer horizon back).
    #[tracing::instrument(level = "debug", skip_all, fields(webhook = %name))]
    pub(crate) async fn delete_webhook(&self, name: &str) -> Result<()> {
        let mut tx = self.db.begin().await?;
        webhooks::delete(&mut tx, name).await?;
        tx.commit().await.map_err(Error::from_commit)?;
        Ok(())
    }
}
