//! The reservation engine: reserve, plan, fulfil, release, extend, expire. Each function is
//! one transaction body: lock (reservation rows first, then stock levels in (sku, warehouse)
//! order), decide in Rust, write set-based.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use super::book::{Book, CannotApply};
use super::error::{Error, Refusal, Result};
use crate::domain::allocation::{self, Candidate, ChannelScope, Line, Placement, Strategy};
use crate::domain::{EntryKind, EventKind, FieldError, Settle, Shortage, Status};
use crate::store::events::NewEvent;
use crate::store::reservations::{self as store, Allocation, Header, Reservation};
use crate::store::{catalogue, channels};

/// A validated request to hold stock for one order.
#[derive(Debug, Clone)]
pub struct NewReservation {
    pub order_id: String,
    /// The sales channel the order comes from: allocation only from its warehouses.
    pub channel: Option<String>,
    pub lines: Vec<Line>,
    pub ttl_seconds: i64,
    pub strategy: Strategy,
}

/// A validated `{sku, warehouse, quantity}` of a partial fulfil or release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartLine {
    pub sku: String,
    pub warehouse: String,
    pub quantity: i64,
}

/// What a plan answers: the allocation the service would make right now.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Plan {
    pub order_id: String,
    pub channel: Option<String>,
    pub strategy: &'static str,
    pub lines: Vec<PlanLine>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct PlanLine {
    pub sku: String,
    pub quantity: i64,
    pub allocations: Vec<PlanAllocation>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct PlanAllocation {
    pub warehouse: String,
    pub quantity: i64,
}

fn short(shortages: Vec<Shortage>) -> Refusal {
    let detail = shortages
        .iter()
        .map(|s| format!("{}: requested {}, available {}", s.sku, s.requested, s.available))
        .collect::<Vec<_>>()
        .join("; ");
    Refusal::InsufficientStock { detail: format!("not enough stock: {detail}"), lines: shortages }
}

/// SKUs and pinned warehouses the orders name that do not exist at all. Only asked about names
/// the locked levels do not already prove to exist, so the common path costs no round trip.
#[derive(Debug, Default)]
struct Unknown {
    skus: Vec<String>,
    warehouses: Vec<String>,
}

impl Unknown {
    async fn find(conn: &mut PgConnection, reqs: &[&NewReservation], book: &Book) -> Result<Self> {
        let lines = || reqs.iter().flat_map(|r| &r.lines);
        let mut skus: Vec<&str> = lines().map(|l| l.sku.as_str()).filter(|s| !book.has_sku(s)).collect();
        let mut warehouses: Vec<&str> =
            lines().filter_map(|l| l.warehouse.as_deref().filter(|w| !book.has_level(&l.sku, w))).collect();
        if skus.is_empty() && warehouses.is_empty() {
            return Ok(Self::default());
        }
        skus.sort_unstable();
        skus.dedup();
        warehouses.sort_unstable();
        warehouses.dedup();
        let (skus, warehouses) = catalogue::unknown(conn, &skus, &warehouses).await?;
        Ok(Self { skus, warehouses })
    }

    /// The order's first unknown SKU, else its first unknown pinned warehouse.
    fn refusal_for(&self, req: &NewReservation) -> Result<(), Refusal> {
        if let Some(sku) = self.skus.iter().find(|s| req.lines.iter().any(|l| &l.sku == *s)) {
            return Err(Refusal::UnknownSku(sku.clone()));
        }
        let pinned = |w: &String| req.lines.iter().any(|l| l.warehouse.as_ref() == Some(w));
        if let Some(w) = self.warehouses.iter().find(|w| pinned(w)) {
            return Err(Refusal::UnknownWarehouse(w.clone()));
        }
        Ok(())
    }
}

/// The sales channels named by a set of orders, as they stand in this transaction.
#[derive(Debug, Default)]
struct Channels(Vec<ChannelScope>);

impl Channels {
    async fn load(conn: &mut PgConnection, reqs: &[&NewReservation]) -> Result<Self> {
        let mut codes: Vec<&str> = reqs.iter().filter_map(|r| r.channel.as_deref()).collect();
        if codes.is_empty() {
            return Ok(Self::default());
        }
        codes.sort_unstable();
        codes.dedup();
        Ok(Self(channels::scopes(conn, &codes).await?))
    }

    /// The scope an order is allocated in (`None`: no channel, every warehouse), refusing an
    /// unknown channel and lines pinned to a warehouse outside it.
    fn scope_of(&self, req: &NewReservation) -> Result<Option<&ChannelScope>, Refusal> {
        let Some(code) = &req.channel else { return Ok(None) };
        let scope = self.0.iter().find(|s| &s.code == code).ok_or_else(|| Refusal::UnknownChannel(code.clone()))?;
        let outside: Vec<FieldError> = req
            .lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let w = l.warehouse.as_deref().filter(|w| !scope.contains(w))?;
                Some(FieldError::new(
                    format!("lines[{i}].warehouse"),
                    format!("{w} is not a warehouse of channel {code}"),
                ))
            })
            .collect();
        if outside.is_empty() { Ok(Some(scope)) } else { Err(Refusal::Invalid(outside)) }
    }
}

/// The candidates an order may be allocated from: every level of its SKUs, or only those of
/// its channel's warehouses, ranked by the channel.
fn candidates(book: &Book, skus: &[&str], scope: Option<&ChannelScope>) -> Vec<Candidate> {
    let all = book.candidates_of(skus);
    match scope {
        Some(scope) => scope.narrow(all),
        None => all,
    }
}

/// The outbox event of a reservation reaching `status` (`Active`: just created).
fn lifecycle_event(id: Uuid, order_id: &str, channel: Option<&str>, status: Status) -> NewEvent {
    NewEvent {
        kind: EventKind::of_reservation(status),
        sku: None,
        warehouse: None,
        reservation_id: Some(id),
        data: serde_json::json!({ "order_id": order_id, "channel": channel, "status": status.as_str() }),
    }
}

/// The status a reservation has once its allocations look like this.
fn status_of(allocations: &[Allocation], by_expiry: bool) -> Status {
    let held = allocations.iter().map(Allocation::held).sum();
    let fulfilled = allocations.iter().map(|a| a.fulfilled).sum();
    Status::after(held, fulfilled, by_expiry)
}

/// The SKUs of an order in first-appearance order.
fn sku_order(lines: &[Line]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for l in lines {
        if !out.contains(&l.sku.as_str()) {
            out.push(&l.sku);
        }
    }
    out
}

/// Holds stock for one order, all or nothing.
pub(crate) async fn reserve(conn: &mut PgConnection, req: &NewReservation) -> Result<Reservation> {
    Ok(reserve_many(conn, &[req]).await?.pop().ok_or_else(|| Error::Bug("no answer".into()))??)
}

/// Holds stock for many orders in one transaction: each order all or nothing, decided in the
/// order given against the levels as the orders before it left them, each with its own answer.
/// The outer error means the transaction itself failed (roll back); a refusal refuses only
/// that order, which then leaves no trace.
pub async fn reserve_many(
    conn: &mut PgConnection,
    reqs: &[&NewReservation],
) -> Result<Vec<Result<Reservation, Refusal>>> {
    let ids: Vec<Uuid> = reqs.iter().map(|_| Uuid::now_v7()).collect();
    let new_rows = store::NewRows {
        ids: ids.clone(),
        order_ids: reqs.iter().map(|r| r.order_id.as_str()).collect(),
        channels: reqs.iter().map(|r| r.channel.as_deref()).collect(),
        strategies: reqs.iter().map(|r| r.strategy.as_str()).collect(),
        ttl_seconds: reqs.iter().map(|r| r.ttl_seconds as f64).collect(),
    };
    let mut headers: BTreeMap<Uuid, Header> =
        store::insert_many(conn, &new_rows).await?.into_iter().map(|h| (h.id, h)).collect();
    let taken: Vec<(&str, Option<&str>)> = reqs
        .iter()
        .zip(&ids)
        .filter(|(_, id)| !headers.contains_key(id))
        .map(|(r, _)| (r.order_id.as_str(), r.channel.as_deref()))
        .collect();
    let existing: BTreeMap<(String, Option<String>), Uuid> = if taken.is_empty() {
        BTreeMap::new()
    } else {
        store::ids_of_orders(conn, &taken).await?.into_iter().map(|(o, c, id)| ((o, c), id)).collect()
    };

    let live: Vec<&NewReservation> =
        reqs.iter().zip(&ids).filter(|(_, id)| headers.contains_key(id)).map(|(r, _)| *r).collect();
    let channels = Channels::load(conn, &live).await?;
    let (skus, pinned) = levels_to_lock(&live);
    let mut book = if pinned.is_empty() {
        Book::lock_skus(conn, &skus).await?
    } else {
        Book::lock_skus_and_levels(conn, &skus, &pinned).await?
    };
    let unknown = Unknown::find(conn, &live, &book).await?;

    let mut answers = Vec::with_capacity(reqs.len());
    let mut rows = Vec::new();
    let mut refused = Vec::new();
    for (req, id) in reqs.iter().zip(ids) {
        let Some(header) = headers.remove(&id) else {
            let reservation_id =
                existing.get(&(req.order_id.clone(), req.channel.clone())).copied().unwrap_or_default();
            answers.push(Err(Refusal::DuplicateOrder { order_id: req.order_id.clone(), reservation_id }));
            continue;
        };
        match hold(&mut book, &unknown, &channels, req, id)? {
            Ok(allocations) => {
                book.event(lifecycle_event(id, &req.order_id, req.channel.as_deref(), Status::Active));
                rows.extend(allocations.iter().cloned());
                answers.push(Ok(store::assemble(header, allocations)));
            }
            Err(err) => {
                refused.push(id);
                answers.push(Err(err));
            }
        }
    }
    book.flush_with(conn, &store::RowWrites { inserted: &rows, ..Default::default() }).await?;
    if !refused.is_empty() {
        store::delete_refused(conn, &refused).await?;
    }
    Ok(answers)
}

/// The stock levels a set of orders may be allocated from: every active level of a SKU some
/// line takes from wherever it is (first), and the single levels pinned lines take from
/// (second). A pinned line can only be held where it is pinned, and a `single` order with one
/// pinned warehouse only there, so their SKUs' other levels are neither read nor locked — a
/// row lock is a write, and fewer locked rows meet fewer other transactions.
fn levels_to_lock<'a>(orders: &[&'a NewReservation]) -> (Vec<&'a str>, Vec<(&'a str, &'a str)>) {
    let mut skus: Vec<&str> = Vec::new();
    let mut pinned: Vec<(&str, &str)> = Vec::new();
    for order in orders {
        let mut pins: Vec<&str> = order.lines.iter().filter_map(|l| l.warehouse.as_deref()).collect();
        pins.sort_unstable();
        pins.dedup();
        for line in &order.lines {
            let at = match (order.strategy, line.warehouse.as_deref(), pins.as_slice()) {
                (Strategy::Priority, Some(pin), _) => Some(pin),
                // Every line of a `single` order comes from its one pinned warehouse, if it has
                // one; with two pinned warehouses nothing fits (each line's pin is looked at).
                (Strategy::Single, _, [pin]) => Some(*pin),
                (Strategy::Single, Some(pin), _) => Some(pin),
                _ => None,
            };
            match at {
                Some(warehouse) => pinned.push((line.sku.as_str(), warehouse)),
                None => skus.push(line.sku.as_str()),
            }
        }
    }
    skus.sort_unstable();
    skus.dedup();
    pinned.retain(|(sku, _)| skus.binary_search(sku).is_err());
    pinned.sort_unstable();
    pinned.dedup();
    (skus, pinned)
}

/// Decides one order against the book and, when it fits, applies it. A refusal refuses the
/// order (nothing applied); an error is a bug that must roll everything back.
fn hold(
    book: &mut Book,
    unknown: &Unknown,
    channels: &Channels,
    req: &NewReservation,
    id: Uuid,
) -> Result<Result<Vec<Allocation>, Refusal>> {
    // An unknown SKU or warehouse is 404 before a known warehouse outside the channel is 422.
    if let Err(refusal) = unknown.refusal_for(req) {
        return Ok(Err(refusal));
    }
    let scope = match channels.scope_of(req) {
        Ok(scope) => scope,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let skus = sku_order(&req.lines);
    let planned = match allocation::allocate(&req.lines, &candidates(book, &skus, scope), req.strategy) {
        Ok(planned) => planned,
        Err(shortages) => return Ok(Err(short(shortages))),
    };
    let reference = id.to_string();
    let mut rows = Vec::with_capacity(planned.len());
    let mut seq = 0;
    for (i, p) in planned.iter().enumerate() {
        seq = if i > 0 && planned[i - 1].sku == p.sku { seq + 1 } else { 0 };
        book.apply(&p.sku, &p.warehouse, EntryKind::Reserve, 0, p.quantity, Some(&reference))
            .map_err(|_| Error::Bug(format!("allocation exceeded {}/{}", p.sku, p.warehouse)))?;
        rows.push(Allocation {
            reservation_id: id,
            sku: p.sku.clone(),
            warehouse: p.warehouse.clone(),
            line_no: skus.iter().position(|s| *s == p.sku).unwrap_or(0) as i32,
            seq,
            quantity: p.quantity,
            fulfilled: 0,
            released: 0,
        });
    }
    Ok(Ok(rows))
}

/// The allocation `reserve` would make right now, holding nothing.
pub(crate) async fn plan(conn: &mut PgConnection, req: &NewReservation) -> Result<Plan> {
    if let Some(reservation_id) = store::id_of_order(conn, &req.order_id, req.channel.as_deref()).await? {
        return Err(Refusal::DuplicateOrder { order_id: req.order_id.clone(), reservation_id }.into());
    }
    let channels = Channels::load(conn, &[req]).await?;
    let skus = sku_order(&req.lines);
    let book = Book::read_skus(conn, &skus).await?;
    Unknown::find(conn, &[req], &book).await?.refusal_for(req)?;
    let scope = channels.scope_of(req)?;
    let planned = allocation::allocate(&req.lines, &candidates(&book, &skus, scope), req.strategy).map_err(short)?;
    let mut lines: Vec<PlanLine> = Vec::new();
    for Placement { sku, warehouse, quantity } in planned {
        let allocation = PlanAllocation { warehouse, quantity };
        match lines.last_mut() {
            Some(line) if line.sku == sku => {
                line.quantity += quantity;
                line.allocations.push(allocation);
            }
            _ => lines.push(PlanLine { sku, quantity, allocations: vec![allocation] }),
        }
    }
    Ok(Plan { order_id: req.order_id.clone(), channel: req.channel.clone(), strategy: req.strategy.as_str(), lines })
}

/// Locks a reservation that must still be active (and not past its deadline).
async fn lock_active(conn: &mut PgConnection, id: Uuid) -> Result<(Header, Vec<Allocation>)> {
    let header = store::lock(conn, id).await?.ok_or_else(|| Refusal::UnknownReservation(id.to_string()))?;
    let allocations = store::allocations(conn, &[id]).await?;
    still_active(&header, &allocations)?;
    Ok((header, allocations))
}

/// Refuses a reservation that is no longer active — also one past its deadline that the sweep
/// has not reached yet: the expiry wins, so a late fulfil can never take units that are about
/// to be given back. It is refused with the status the sweep will give it.
fn still_active(header: &Header, allocations: &[Allocation]) -> Result<()> {
    let id = header.id;
    let stored = header.status().ok_or_else(|| Error::Bug(format!("reservation {id} has status {}", header.status)))?;
    let status = if stored == Status::Active && header.overdue {
        let mut swept = allocations.to_vec();
        swept.iter_mut().for_each(|a| a.released = a.quantity - a.fulfilled);
        status_of(&swept, true)
    } else {
        stored
    };
    if status != Status::Active {
        return Err(Refusal::NotActive { reservation_id: id, status }.into());
    }
    Ok(())
}

/// The longest an expiry transaction waits for a row lock.
pub(crate) const SWEEP_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);

/// A validated fulfil (deduct) or release (give back) of what a reservation holds: everything
/// still held when `parts` is `None`, else the listed quantities.
#[derive(Debug, Clone)]
pub struct SettleRequest {
    pub id: Uuid,
    pub kind: Settle,
    pub parts: Option<Vec<PartLine>>,
}

/// Settles one reservation.
pub(crate) async fn settle(conn: &mut PgConnection, req: &SettleRequest) -> Result<Reservation> {
    let mut results = settle_many(conn, &[req]).await?;
    match results.pop() {
        Some(result) => Ok(result?),
        None => Err(Error::Bug("a settle got no answer".into())),
    }
}

/// Settles several reservations (each at most once) in one transaction, each all or nothing and
/// with its own answer, in the order given: reservation rows locked in id order, then, with
/// their allocations read, every level they hold units of, in (sku, warehouse) order; everything
/// written in one statement.
pub async fn settle_many(
    conn: &mut PgConnection,
    reqs: &[&SettleRequest],
) -> Result<Vec<Result<Reservation, Refusal>>> {
    let mut ids: Vec<Uuid> = reqs.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != reqs.len() {
        return Err(Error::Bug("a reservation settled twice in one transaction".into()));
    }
    let mut headers: BTreeMap<Uuid, Header> =
        store::lock_many(conn, &ids).await?.into_iter().map(|h| (h.id, h)).collect();
    // Every level they hold units of is locked with the allocations' read; a settle takes only
    // from those (more than is held is refused below).
    let (allocations, mut book) = Book::lock_held(conn, &ids).await?;
    let mut held: BTreeMap<Uuid, Vec<Allocation>> = BTreeMap::new();
    for a in allocations {
        held.entry(a.reservation_id).or_default().push(a);
    }
    // What each one takes from each level, or why it is refused.
    let mut amounts: Vec<Result<Amounts, Refusal>> = Vec::with_capacity(reqs.len());
    for req in reqs {
        let Some(header) = headers.get(&req.id) else {
            amounts.push(Err(Refusal::UnknownReservation(req.id.to_string())));
            continue;
        };
        let allocations = held.get(&req.id).map_or(&[][..], Vec::as_slice);
        amounts.push(match still_active(header, allocations) {
            Ok(()) => settle_amounts(req, allocations),
            Err(Error::Refused(refusal)) => Err(refusal),
            Err(err) => return Err(err),
        });
    }

    let mut answers = Vec::with_capacity(reqs.len());
    let mut changed: Vec<Allocation> = Vec::new();
    let mut statuses: Vec<(Uuid, Status)> = Vec::new();
    for (req, amounts) in reqs.iter().zip(amounts) {
        let amounts = match amounts {
            Ok(amounts) => amounts,
            Err(refusal) => {
                answers.push(Err(refusal));
                continue;
            }
        };
        let mut header = headers.remove(&req.id).ok_or_else(|| Error::Bug("a locked reservation vanished".into()))?;
        let mut allocations = held.remove(&req.id).unwrap_or_default();
        if let Err(refusal) = take(&mut book, req, &amounts)? {
            answers.push(Err(refusal));
            continue;
        }
        for a in allocations.iter_mut() {
            if let Some(q) = amounts.get(&(a.sku.clone(), a.warehouse.clone())) {
                match req.kind {
                    Settle::Fulfil => a.fulfilled += q,
                    Settle::Release => a.released += q,
                }
                changed.push(a.clone());
            }
        }
        let status = status_of(&allocations, false);
        if Some(status) != header.status() {
            book.event(lifecycle_event(req.id, &header.order_id, header.channel.as_deref(), status));
            statuses.push((req.id, status));
            header.status = status.as_str().to_owned();
        }
        answers.push(Ok(store::assemble(header, allocations)));
    }
    let settled: Vec<&Allocation> = changed.iter().collect();
    book.flush_with(conn, &store::RowWrites { settled: &settled, statuses: &statuses, ..Default::default() }).await?;
    Ok(answers)
}

/// Units per (sku, warehouse).
type Amounts = BTreeMap<(String, String), i64>;

/// How much a settle takes from each of the reservation's levels, refusing more than is held.
fn settle_amounts(req: &SettleRequest, allocations: &[Allocation]) -> Result<Amounts, Refusal> {
    let mut amounts = Amounts::new();
    match &req.parts {
        None => {
            for a in allocations.iter().filter(|a| a.held() > 0) {
                amounts.insert((a.sku.clone(), a.warehouse.clone()), a.held());
            }
        }
        Some(parts) => {
            for p in parts {
                *amounts.entry((p.sku.clone(), p.warehouse.clone())).or_default() += p.quantity;
            }
        }
    }
    for ((sku, warehouse), quantity) in &amounts {
        let held = allocations.iter().find(|a| &a.sku == sku && &a.warehouse == warehouse).map_or(0, Allocation::held);
        if *quantity > held {
            return Err(Refusal::OverSettle {
                settle: req.kind,
                sku: sku.clone(),
                warehouse: warehouse.clone(),
                requested: *quantity,
                held,
            });
        }
    }
    Ok(amounts)
}

/// Takes a settle's amounts from the locked levels, all or none: a fulfil of a backordered
/// hold the warehouse lacks the physical units for is refused and changes nothing.
fn take(book: &mut Book, req: &SettleRequest, amounts: &Amounts) -> Result<Result<(), Refusal>> {
    let (entry, ships) = match req.kind {
        Settle::Fulfil => (EntryKind::Fulfil, true),
        Settle::Release => (EntryKind::Release, false),
    };
    let not_locked = |sku: &str, warehouse: &str| Error::Bug(format!("level {sku}/{warehouse} not locked"));
    let mut shortages = Vec::new();
    for ((sku, warehouse), &quantity) in amounts {
        let on_hand_delta = if ships { -quantity } else { 0 };
        match book.allows(sku, warehouse, on_hand_delta, -quantity) {
            Ok(()) => {}
            Err(CannotApply::Floor { on_hand, .. }) => {
                shortages.push(Shortage { sku: sku.clone(), requested: quantity, available: on_hand.max(0) })
            }
            Err(CannotApply::NotLocked) => return Err(not_locked(sku, warehouse)),
        }
    }
    if !shortages.is_empty() {
        return Ok(Err(Refusal::InsufficientStock {
            detail: "the warehouse lacks the physical units to fulfil a backordered hold".into(),
            lines: shortages,
        }));
    }
    let reference = req.id.to_string();
    for ((sku, warehouse), &quantity) in amounts {
        let on_hand_delta = if ships { -quantity } else { 0 };
        book.apply(sku, warehouse, entry, on_hand_delta, -quantity, Some(&reference))
            .map_err(|_| not_locked(sku, warehouse))?;
    }
    Ok(Ok(()))
}

/// A validated change of an open reservation: its complete new set of lines.
#[derive(Debug, Clone)]
pub(crate) struct Edit {
    pub lines: Vec<Line>,
    /// When given, the deadline moves to now + this.
    pub ttl_seconds: Option<i64>,
}

/// What an edit does to the units a reservation holds, per (sku, warehouse).
#[derive(Debug, Default, PartialEq, Eq)]
struct Resize {
    /// Units that stay where they are.
    kept: BTreeMap<(String, String), i64>,
    /// Units given back.
    released: BTreeMap<(String, String), i64>,
    /// What is still to be allocated: pinned shortfalls and unpinned growth.
    growth: Vec<Line>,
}

/// Decides an edit from what is held now (`(sku, warehouse) → units`) and the new lines. Per
/// SKU: units held at a pinned warehouse serve that pin first; the rest serve the unpinned
/// quantity, the most preferred warehouses' units first (`rank` of sku and warehouse: lower is
/// preferred), so a
/// shrink gives back the least preferred first; whatever is not covered is growth.
fn resize<R: Ord>(held: &BTreeMap<(String, String), i64>, lines: &[Line], rank: impl Fn(&str, &str) -> R) -> Resize {
    let mut out = Resize::default();
    let mut skus: Vec<&str> = sku_order(lines);
    for (sku, _) in held.keys() {
        if !skus.contains(&sku.as_str()) {
            skus.push(sku);
        }
    }
    for sku in skus {
        let mut pinned: BTreeMap<&str, i64> = BTreeMap::new();
        let mut unpinned = 0;
        for line in lines.iter().filter(|l| l.sku == sku) {
            match &line.warehouse {
                Some(w) => *pinned.entry(w).or_default() += line.quantity,
                None => unpinned += line.quantity,
            }
        }
        let mut free: Vec<(&str, i64)> = Vec::new();
        for ((_, warehouse), &units) in held.range((sku.to_owned(), String::new())..).take_while(|((s, _), _)| s == sku)
        {
            let for_pin = pinned.get(warehouse.as_str()).copied().unwrap_or(0).min(units);
            if for_pin > 0 {
                out.kept.insert((sku.to_owned(), warehouse.clone()), for_pin);
            }
            if units > for_pin {
                free.push((warehouse, units - for_pin));
            }
        }
        for (warehouse, want) in &pinned {
            let have = out.kept.get(&(sku.to_owned(), (*warehouse).to_owned())).copied().unwrap_or(0);
            if *want > have {
                out.growth.push(Line {
                    sku: sku.to_owned(),
                    quantity: want - have,
                    warehouse: Some((*warehouse).to_owned()),
                });
            }
        }
        free.sort_by_key(|(warehouse, _)| rank(sku, warehouse));
        for (warehouse, units) in free {
            let keep = units.min(unpinned);
            unpinned -= keep;
            let key = (sku.to_owned(), warehouse.to_owned());
            if keep > 0 {
                *out.kept.entry(key.clone()).or_default() += keep;
            }
            if units > keep {
                out.released.insert(key, units - keep);
            }
        }
        if unpinned > 0 {
            out.growth.push(Line { sku: sku.to_owned(), quantity: unpinned, warehouse: None });
        }
    }
    out
}

/// Changes an open reservation's lines to `edit.lines`, all or nothing: units already held stay
/// where they are, growth is allocated as a new order of the same channel and strategy would
/// be, a shrink gives back the least preferred warehouses' units first. Only an active
/// reservation with nothing fulfilled can change. Afterwards its allocations are exactly what
/// it holds.
pub(crate) async fn modify(conn: &mut PgConnection, id: Uuid, edit: &Edit) -> Result<Reservation> {
    let (mut header, allocations) = lock_active(conn, id).await?;
    if allocations.iter().any(|a| a.fulfilled > 0) {
        return Err(Refusal::PartlyFulfilled { reservation_id: id }.into());
    }
    let strategy =
        Strategy::parse(&header.strategy).map_err(|_| Error::Bug(format!("strategy {}", header.strategy)))?;
    let req = NewReservation {
        order_id: header.order_id.clone(),
        channel: header.channel.clone(),
        lines: edit.lines.clone(),
        ttl_seconds: 0,
        strategy,
    };
    let channels = Channels::load(conn, &[&req]).await?;

    let mut held: BTreeMap<(String, String), i64> = BTreeMap::new();
    for a in allocations.iter().filter(|a| a.held() > 0) {
        *held.entry((a.sku.clone(), a.warehouse.clone())).or_default() += a.held();
    }
    let skus = sku_order(&req.lines);
    let held_keys: Vec<(&str, &str)> = held.keys().map(|(s, w)| (s.as_str(), w.as_str())).collect();
    let mut book = Book::lock_skus_and_levels(conn, &skus, &held_keys).await?;
    Unknown::find(conn, &[&req], &book).await?.refusal_for(&req)?;
    let scope = channels.scope_of(&req)?;

    // Preference among the warehouses units are held in: the channel's order (warehouses no
    // longer in it, and inactive ones, last), else the warehouses' own.
    let rank = |sku: &str, warehouse: &str| {
        let level = book.get(sku, warehouse);
        let active = level.is_some_and(|l| l.active);
        let (priority, active) = match (scope, level) {
            (Some(scope), _) => match scope.warehouses.iter().find(|(w, _)| w == warehouse) {
                Some((_, p)) => (*p, active),
                None => (i32::MAX, false),
            },
            (None, Some(level)) => (level.priority, active),
            (None, None) => (i32::MAX, false),
        };
        (!active, priority, warehouse.to_owned())
    };
    let change = resize(&held, &req.lines, rank);

    let reference = id.to_string();
    for ((sku, warehouse), &units) in &change.released {
        book.apply(sku, warehouse, EntryKind::Release, 0, -units, Some(&reference))
            .map_err(|_| Error::Bug(format!("cannot release {sku}/{warehouse}")))?;
    }
    let mut placed: Vec<Placement> = Vec::new();
    if !change.growth.is_empty() {
        let growth_skus = sku_order(&change.growth);
        placed = allocation::allocate(&change.growth, &candidates(&book, &growth_skus, scope), req.strategy).map_err(
            |shortages| {
                // Told as the whole new quantity of the SKU against what it could have.
                let kept = |sku: &str| change.kept.iter().filter(|((s, _), _)| s == sku).map(|(_, q)| q).sum::<i64>();
                short(
                    shortages
                        .into_iter()
                        .map(|s| Shortage {
                            requested: s.requested + kept(&s.sku),
                            available: s.available + kept(&s.sku),
                            sku: s.sku,
                        })
                        .collect(),
                )
            },
        )?;
        for p in &placed {
            book.apply(&p.sku, &p.warehouse, EntryKind::Reserve, 0, p.quantity, Some(&reference))
                .map_err(|_| Error::Bug(format!("allocation exceeded {}/{}", p.sku, p.warehouse)))?;
        }
    }

    // The new allocations: per SKU in the new order, kept units where they were (in their old
    // order), then the growth.
    let mut rows: Vec<Allocation> = Vec::new();
    for (line_no, sku) in skus.iter().enumerate() {
        let mut mine: Vec<(String, i64)> = Vec::new();
        for a in allocations.iter().filter(|a| a.sku == *sku) {
            if let Some(&units) = change.kept.get(&(a.sku.clone(), a.warehouse.clone())) {
                mine.push((a.warehouse.clone(), units));
            }
        }
        for p in placed.iter().filter(|p| p.sku == *sku) {
            match mine.iter_mut().find(|(w, _)| *w == p.warehouse) {
                Some((_, units)) => *units += p.quantity,
                None => mine.push((p.warehouse.clone(), p.quantity)),
            }
        }
        rows.extend(mine.into_iter().enumerate().map(|(seq, (warehouse, quantity))| Allocation {
            reservation_id: id,
            sku: (*sku).to_owned(),
            warehouse,
            line_no: line_no as i32,
            seq: seq as i32,
            quantity,
            fulfilled: 0,
            released: 0,
        }));
    }

    book.event(NewEvent {
        kind: EventKind::Modified,
        sku: None,
        warehouse: None,
        reservation_id: Some(id),
        data: serde_json::json!({ "order_id": header.order_id, "channel": header.channel, "status": "active" }),
    });
    store::clear_allocations(conn, id).await?;
    book.flush_with(conn, &store::RowWrites { inserted: &rows, ..Default::default() }).await?;
    if let Some(ttl) = edit.ttl_seconds {
        header.expires_at = store::extend(conn, id, ttl).await?;
    }
    Ok(store::assemble(header, rows))
}

/// Moves the deadline of an active reservation to now + ttl.
pub(crate) async fn extend(conn: &mut PgConnection, id: Uuid, ttl_seconds: i64) -> Result<Reservation> {
    let (mut header, allocations) = lock_active(conn, id).await?;
    header.expires_at = store::extend(conn, id, ttl_seconds).await?;
    Ok(store::assemble(header, allocations))
}

/// Releases up to `batch` overdue reservations in one transaction, leaving out what `skips`
/// names; returns how many. Its transaction should wait at most [`SWEEP_LOCK_TIMEOUT`] for any
/// row: a level someone holds for long then fails it quickly, and the sweep leaves that level's
/// reservations for later instead of stalling every other SKU's expiry behind it.
pub(crate) async fn expire_due(conn: &mut PgConnection, batch: i64, skips: &store::SweepSkips) -> Result<usize> {
    let due = store::lock_overdue(conn, batch, skips).await?;
    if due.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = due.iter().map(|h| h.id).collect();
    let (mut allocations, mut book) = Book::lock_held(conn, &ids).await?;
    for a in allocations.iter_mut().filter(|a| a.held() > 0) {
        let held = a.held();
        book.apply(&a.sku, &a.warehouse, EntryKind::Expire, 0, -held, Some(&a.reservation_id.to_string()))
            .map_err(|_| Error::Bug(format!("cannot expire {}/{}", a.sku, a.warehouse)))?;
        a.released += held;
    }
    let statuses: Vec<Status> = ids
        .iter()
        .map(|id| {
            let mine: Vec<Allocation> = allocations.iter().filter(|a| a.reservation_id == *id).cloned().collect();
            status_of(&mine, true)
        })
        .collect();
    for (header, status) in due.iter().zip(&statuses) {
        book.event(lifecycle_event(header.id, &header.order_id, header.channel.as_deref(), *status));
    }
    let all: Vec<&Allocation> = allocations.iter().collect();
    let statuses: Vec<(Uuid, Status)> = ids.iter().copied().zip(statuses).collect();
    book.flush_with(conn, &store::RowWrites { settled: &all, statuses: &statuses, ..Default::default() }).await?;
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(units: &[(&str, &str, i64)]) -> BTreeMap<(String, String), i64> {
        units.iter().map(|(s, w, q)| (((*s).to_owned(), (*w).to_owned()), *q)).collect()
    }

    fn line(sku: &str, quantity: i64, warehouse: Option<&str>) -> Line {
        Line { sku: sku.into(), quantity, warehouse: warehouse.map(Into::into) }
    }

    /// W1 is preferred over W2 over W3.
    fn rank(_: &str, warehouse: &str) -> String {
        warehouse.to_owned()
    }

    #[test]
    fn growth_keeps_what_is_held_and_asks_only_for_the_difference() {
        let got = resize(&held(&[("A", "W2", 2)]), &[line("A", 5, None)], rank);
        assert_eq!(got.kept, held(&[("A", "W2", 2)]));
        assert!(got.released.is_empty());
        assert_eq!(got.growth, [line("A", 3, None)]);
    }

    #[test]
    fn a_shrink_gives_back_the_least_preferred_units_first() {
        let got = resize(&held(&[("A", "W1", 2), ("A", "W2", 2), ("A", "W3", 2)]), &[line("A", 3, None)], rank);
        assert_eq!(got.kept, held(&[("A", "W1", 2), ("A", "W2", 1)]));
        assert_eq!(got.released, held(&[("A", "W2", 1), ("A", "W3", 2)]));
        assert!(got.growth.is_empty());
    }

    #[test]
    fn a_sku_left_out_is_given_back_entirely_and_a_new_one_is_growth() {
        let got = resize(&held(&[("A", "W1", 2)]), &[line("B", 1, None)], rank);
        assert!(got.kept.is_empty());
        assert_eq!(got.released, held(&[("A", "W1", 2)]));
        assert_eq!(got.growth, [line("B", 1, None)]);
    }

    #[test]
    fn pins_are_served_by_units_held_there_first() {
        // 3 held at W1 and 2 at W2; now 2 pinned to W2, 1 pinned to W3, 2 anywhere.
        let got = resize(
            &held(&[("A", "W1", 3), ("A", "W2", 2)]),
            &[line("A", 2, Some("W2")), line("A", 1, Some("W3")), line("A", 2, None)],
            rank,
        );
        assert_eq!(got.kept, held(&[("A", "W1", 2), ("A", "W2", 2)]));
        assert_eq!(got.released, held(&[("A", "W1", 1)]));
        assert_eq!(got.growth, [line("A", 1, Some("W3"))]);
    }

    #[test]
    fn the_same_lines_change_nothing() {
        let now = held(&[("A", "W1", 2), ("B", "W3", 1)]);
        let got = resize(&now, &[line("A", 2, None), line("B", 1, None)], rank);
        assert_eq!(got, Resize { kept: now, ..Resize::default() });
    }
}
