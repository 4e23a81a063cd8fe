//! Allocation: which warehouses an order's lines are held from. A pure function of the
//! candidate stock levels, the lines and the strategy.
//!
//! Rules (contract, "Reservations"):
//! - lines naming the same SKU count together;
//! - a line with a warehouse is pinned to it; the others go to active warehouses;
//! - `priority`: lowest priority value first (ties by warehouse code), splitting a line across
//!   warehouses when needed;
//! - `single`: the whole order from the best-priority warehouse that can fill all of it;
//! - backorder capacity (`available` down to `-backorder_limit`) is used only after real stock
//!   everywhere eligible;
//! - all or nothing: either every line is allocated or the shortages are listed.

use std::collections::BTreeMap;

/// How unpinned lines are spread over warehouses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    #[default]
    Priority,
    Single,
}

impl Strategy {
    pub(crate) const ALL: [Self; 2] = [Self::Priority, Self::Single];

    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        match raw {
            "priority" => Ok(Self::Priority),
            "single" => Ok(Self::Single),
            _ => Err("must be one of priority, single"),
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Priority => "priority",
            Self::Single => "single",
        }
    }
}

/// One stock level an order may draw from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub sku: String,
    pub warehouse: String,
    pub priority: i32,
    pub active: bool,
    /// `on_hand - reserved`; negative when backordered.
    pub available: i64,
    pub backorder_limit: i64,
}

impl Candidate {
    /// Units that exist physically and are not held.
    fn real(&self) -> i64 {
        self.available.max(0)
    }

    /// Everything that may still be held, backorders included.
    fn capacity(&self) -> i64 {
        (self.available + self.backorder_limit).max(0)
    }
}

/// A sales channel's warehouses, each with the priority it has in that channel (lower is
/// preferred; the warehouse's own unless the channel sets one).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChannelScope {
    pub code: String,
    pub warehouses: Vec<(String, i32)>,
}

impl ChannelScope {
    pub fn contains(&self, warehouse: &str) -> bool {
        self.warehouses.iter().any(|(w, _)| w == warehouse)
    }

    /// The candidates the channel sells from, each ranked by the channel's priority.
    pub fn narrow(&self, candidates: Vec<Candidate>) -> Vec<Candidate> {
        candidates
            .into_iter()
            .filter_map(|c| {
                let (_, priority) = self.warehouses.iter().find(|(w, _)| *w == c.warehouse)?;
                Some(Candidate { priority: *priority, ..c })
            })
            .collect()
    }
}

/// A requested line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
    pub warehouse: Option<String>,
}

/// Units of one SKU held from one warehouse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    pub sku: String,
    pub warehouse: String,
    pub quantity: i64,
}

/// A SKU the order cannot get enough of: what was asked, and what could be had (also the
/// `lines` of an `insufficient_stock` answer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(as = ShortLine)]
pub struct Shortage {
    pub sku: String,
    pub requested: i64,
    pub available: i64,
}

/// Allocates every line or reports every short SKU. Allocations come grouped by SKU in the
/// order the SKUs first appear in `lines`, each SKU's warehouses in the order they were used.
pub(crate) fn allocate(
    lines: &[Line],
    candidates: &[Candidate],
    strategy: Strategy,
) -> Result<Vec<Placement>, Vec<Shortage>> {
    match strategy {
        Strategy::Priority => allocate_by_priority(lines, candidates),
        Strategy::Single => allocate_single(lines, candidates),
    }
}

/// SKUs in order of first appearance, with the total requested.
fn demand(lines: &[Line]) -> Vec<(&str, i64)> {
    let mut out: Vec<(&str, i64)> = Vec::new();
    for line in lines {
        match out.iter_mut().find(|(sku, _)| *sku == line.sku) {
            Some((_, total)) => *total += line.quantity,
            None => out.push((&line.sku, line.quantity)),
        }
    }
    out
}

/// Candidates of one SKU that take new reservations, best first.
fn ranked<'a>(candidates: &'a [Candidate], sku: &str) -> Vec<&'a Candidate> {
    let mut out: Vec<&Candidate> = candidates.iter().filter(|c| c.sku == sku && c.active).collect();
    out.sort_by(|a, b| (a.priority, &a.warehouse).cmp(&(b.priority, &b.warehouse)));
    out
}

/// Units taken so far per warehouse, in the order first used.
#[derive(Default)]
struct Taken(Vec<(String, i64)>);

impl Taken {
    fn add(&mut self, warehouse: &str, quantity: i64) {
        if quantity == 0 {
            return;
        }
        match self.0.iter_mut().find(|(w, _)| w == warehouse) {
            Some((_, q)) => *q += quantity,
            None => self.0.push((warehouse.to_owned(), quantity)),
        }
    }

    fn get(&self, warehouse: &str) -> i64 {
        self.0.iter().find(|(w, _)| w == warehouse).map_or(0, |(_, q)| *q)
    }
}

fn allocate_by_priority(lines: &[Line], candidates: &[Candidate]) -> Result<Vec<Placement>, Vec<Shortage>> {
    let mut allocations = Vec::new();
    let mut shortages = Vec::new();
    for (sku, requested) in demand(lines) {
        let ranked = ranked(candidates, sku);
        let mut taken = Taken::default();
        let mut short = 0;

        // Pinned lines first: they have no choice. Real stock, then backorder capacity.
        for line in lines.iter().filter(|l| l.sku == sku) {
            let Some(pin) = &line.warehouse else { continue };
            let mut rest = line.quantity;
            if let Some(c) = ranked.iter().find(|c| &c.warehouse == pin) {
                for limit in [c.real(), c.capacity()] {
                    let take = rest.min((limit - taken.get(pin)).max(0));
                    taken.add(pin, take);
                    rest -= take;
                }
            }
            short += rest;
        }

        // Unpinned: real stock in priority order everywhere, then backorders in the same order.
        let mut rest: i64 = lines.iter().filter(|l| l.sku == sku && l.warehouse.is_none()).map(|l| l.quantity).sum();
        for capacity in [Candidate::real as fn(&Candidate) -> i64, Candidate::capacity] {
            for c in &ranked {
                let take = rest.min((capacity(c) - taken.get(&c.warehouse)).max(0));
                taken.add(&c.warehouse, take);
                rest -= take;
            }
        }
        short += rest;

        if short > 0 {
            shortages.push(Shortage { sku: sku.to_owned(), requested, available: requested - short });
        } else {
            allocations.extend(taken.0.into_iter().map(|(warehouse, quantity)| Placement {
                sku: sku.to_owned(),
                warehouse,
                quantity,
            }));
        }
    }
    if shortages.is_empty() { Ok(allocations) } else { Err(shortages) }
}

fn allocate_single(lines: &[Line], candidates: &[Candidate]) -> Result<Vec<Placement>, Vec<Shortage>> {
    let demand = demand(lines);
    let mut pins: Vec<&str> = lines.iter().filter_map(|l| l.warehouse.as_deref()).collect();
    pins.sort_unstable();
    pins.dedup();

    // Every active warehouse holding any of the SKUs, best first (or only the pinned one).
    let mut warehouses: BTreeMap<(i32, &str), ()> = BTreeMap::new();
    for c in candidates.iter().filter(|c| c.active) {
        if pins.is_empty() || pins == [c.warehouse.as_str()] {
            warehouses.insert((c.priority, &c.warehouse), ());
        }
    }
    let level =
        |sku: &str, warehouse: &str| candidates.iter().find(|c| c.active && c.sku == sku && c.warehouse == warehouse);
    let fills = |warehouse: &str, capacity: fn(&Candidate) -> i64| {
        demand.iter().filter(|(sku, requested)| level(sku, warehouse).map_or(0, capacity) >= *requested).count()
    };

    // Real stock first everywhere, backorders only when no warehouse can fill from real stock.
    for capacity in [Candidate::real as fn(&Candidate) -> i64, Candidate::capacity] {
        if let Some(&(_, warehouse)) = warehouses.keys().find(|(_, w)| fills(w, capacity) == demand.len()) {
            return Ok(demand
                .iter()
                .map(|(sku, requested)| Placement {
                    sku: (*sku).to_owned(),
                    warehouse: warehouse.to_owned(),
                    quantity: *requested,
                })
                .collect());
        }
    }

    // Report against the warehouse that comes closest (most SKUs filled, then priority).
    let best = warehouses.keys().map(|(_, w)| *w).max_by(|a, b| {
        fills(a, Candidate::capacity).cmp(&fills(b, Candidate::capacity)).then_with(|| {
            // max_by keeps the last maximum; prefer the better-ranked warehouse on ties.
            let rank = |w: &str| warehouses.keys().position(|(_, x)| *x == w);
            rank(b).cmp(&rank(a))
        })
    });
    Err(demand
        .iter()
        .filter_map(|(sku, requested)| {
            let available = best.and_then(|w| level(sku, w)).map_or(0, Candidate::capacity);
            (available < *requested).then(|| Shortage { sku: (*sku).to_owned(), requested: *requested, available })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{Just, prop_assert, prop_assert_eq, prop_oneof, proptest};
    use proptest::strategy::Strategy as Gen;

    fn cand(sku: &str, warehouse: &str, priority: i32, available: i64) -> Candidate {
        Candidate {
            sku: sku.into(),
            warehouse: warehouse.into(),
            priority,
            active: true,
            available,
            backorder_limit: 0,
        }
    }

    fn line(sku: &str, quantity: i64) -> Line {
        Line { sku: sku.into(), quantity, warehouse: None }
    }

    fn pinned(sku: &str, quantity: i64, warehouse: &str) -> Line {
        Line { sku: sku.into(), quantity, warehouse: Some(warehouse.into()) }
    }

    fn alloc(sku: &str, warehouse: &str, quantity: i64) -> Placement {
        Placement { sku: sku.into(), warehouse: warehouse.into(), quantity }
    }

    #[test]
    fn priority_fills_the_best_warehouse_first_and_splits() {
        let cands = [cand("A", "W2", 20, 10), cand("A", "W1", 10, 3)];
        let got = allocate(&[line("A", 5)], &cands, Strategy::Priority).unwrap();
        assert_eq!(got, [alloc("A", "W1", 3), alloc("A", "W2", 2)]);
    }

    #[test]
    fn priority_ties_are_broken_by_warehouse_code() {
        let cands = [cand("A", "WB", 10, 5), cand("A", "WA", 10, 5)];
        assert_eq!(allocate(&[line("A", 2)], &cands, Strategy::Priority).unwrap(), [alloc("A", "WA", 2)]);
    }

    #[test]
    fn pinned_lines_use_only_their_warehouse() {
        let cands = [cand("A", "W1", 1, 10), cand("A", "W2", 2, 1)];
        assert_eq!(allocate(&[pinned("A", 1, "W2")], &cands, Strategy::Priority).unwrap(), [alloc("A", "W2", 1)]);
        let err = allocate(&[pinned("A", 2, "W2")], &cands, Strategy::Priority).unwrap_err();
        assert_eq!(err, [Shortage { sku: "A".into(), requested: 2, available: 1 }]);
    }

    #[test]
    fn lines_of_the_same_sku_count_together() {
        let cands = [cand("A", "W1", 1, 3)];
        let err = allocate(&[line("A", 2), line("A", 2)], &cands, Strategy::Priority).unwrap_err();
        assert_eq!(err, [Shortage { sku: "A".into(), requested: 4, available: 3 }]);
        let ok = allocate(&[line("A", 2), pinned("A", 1, "W1")], &cands, Strategy::Priority).unwrap();
        assert_eq!(ok, [alloc("A", "W1", 3)]);
    }

    #[test]
    fn inactive_warehouses_are_skipped() {
        let mut off = cand("A", "W1", 1, 10);
        off.active = false;
        let cands = [off, cand("A", "W2", 2, 10)];
        assert_eq!(allocate(&[line("A", 4)], &cands, Strategy::Priority).unwrap(), [alloc("A", "W2", 4)]);
        assert!(allocate(&[pinned("A", 1, "W1")], &cands, Strategy::Priority).is_err());
    }

    #[test]
    fn a_channel_sells_only_from_its_warehouses_in_its_own_order() {
        let cands = vec![cand("A", "W1", 1, 10), cand("A", "W2", 2, 10), cand("A", "W3", 3, 10)];
        let scope = ChannelScope { code: "web".into(), warehouses: vec![("W3".into(), 1), ("W2".into(), 50)] };
        let narrowed = scope.narrow(cands);
        assert_eq!(
            narrowed.iter().map(|c| (c.warehouse.as_str(), c.priority)).collect::<Vec<_>>(),
            [("W2", 50), ("W3", 1)]
        );
        let got = allocate(&[line("A", 12)], &narrowed, Strategy::Priority).unwrap();
        assert_eq!(got, [alloc("A", "W3", 10), alloc("A", "W2", 2)]);
        assert!(scope.contains("W2") && !scope.contains("W1"));
    }

    #[test]
    fn backorders_come_last_and_are_capped() {
        let mut w1 = cand("A", "W1", 1, 2);
        w1.backorder_limit = 5;
        let mut w2 = cand("A", "W2", 2, 3);
        w2.backorder_limit = 5;
        let cands = [w1, w2];
        // Real stock everywhere (2 + 3) before any backorder, then backorders by priority.
        let got = allocate(&[line("A", 7)], &cands, Strategy::Priority).unwrap();
        assert_eq!(got, [alloc("A", "W1", 4), alloc("A", "W2", 3)]);
        let err = allocate(&[line("A", 16)], &cands, Strategy::Priority).unwrap_err();
        assert_eq!(err, [Shortage { sku: "A".into(), requested: 16, available: 15 }]);
    }

    #[test]
    fn every_short_sku_is_listed() {
        let cands = [cand("A", "W1", 1, 1), cand("B", "W1", 1, 5), cand("C", "W1", 1, 0)];
        let err = allocate(&[line("A", 2), line("B", 1), line("C", 1)], &cands, Strategy::Priority).unwrap_err();
        let skus: Vec<&str> = err.iter().map(|s| s.sku.as_str()).collect();
        assert_eq!(skus, ["A", "C"]);
    }

    #[test]
    fn single_picks_the_best_warehouse_that_fills_everything() {
        let cands = [cand("A", "W1", 1, 5), cand("B", "W1", 1, 0), cand("A", "W2", 2, 5), cand("B", "W2", 2, 5)];
        let got = allocate(&[line("A", 2), line("B", 1)], &cands, Strategy::Single).unwrap();
        assert_eq!(got, [alloc("A", "W2", 2), alloc("B", "W2", 1)]);
    }

    #[test]
    fn single_refuses_when_no_warehouse_fills_the_order() {
        let cands = [cand("A", "W1", 1, 5), cand("B", "W1", 1, 0), cand("A", "W2", 2, 0), cand("B", "W2", 2, 5)];
        let err = allocate(&[line("A", 2), line("B", 1)], &cands, Strategy::Single).unwrap_err();
        assert_eq!(err, [Shortage { sku: "B".into(), requested: 1, available: 0 }]);
        // Even though priority would split it fine.
        assert!(allocate(&[line("A", 2), line("B", 1)], &cands, Strategy::Priority).is_ok());
        // A SKU the closest warehouse holds exactly enough of is not short.
        let err = allocate(&[line("A", 5), line("B", 1)], &cands, Strategy::Single).unwrap_err();
        assert_eq!(err, [Shortage { sku: "B".into(), requested: 1, available: 0 }]);
    }

    #[test]
    fn unknown_skus_are_short_with_nothing_available() {
        let err = allocate(&[line("Z", 1)], &[], Strategy::Single).unwrap_err();
        assert_eq!(err, [Shortage { sku: "Z".into(), requested: 1, available: 0 }]);
    }

    fn arb_case() -> impl Gen<Value = (Vec<Line>, Vec<Candidate>)> {
        let warehouses = ["W1", "W2", "W3"];
        let skus = ["A", "B", "C"];
        let raw_cands = proptest::collection::vec((0..3usize, 0..3usize, 0..4i32, -5..20i64, 0..4i64), 0..9);
        // Whether a warehouse is active is a property of the warehouse, shared by its levels.
        let cands =
            (raw_cands, proptest::array::uniform3(proptest::bool::weighted(0.8))).prop_map(move |(raw, active)| {
                let mut seen = std::collections::BTreeSet::new();
                raw.into_iter()
                    .filter(|(s, w, ..)| seen.insert((*s, *w)))
                    .map(|(s, w, priority, available, limit)| Candidate {
                        sku: skus[s].into(),
                        warehouse: warehouses[w].into(),
                        priority,
                        active: active[w],
                        // Respect the invariant the database guarantees: available >= -limit.
                        available: available.max(-limit),
                        backorder_limit: limit,
                    })
                    .collect::<Vec<_>>()
            });
        let lines = proptest::collection::vec((0..3usize, 1..12i64, proptest::option::of(0..3usize)), 1..5).prop_map(
            move |raw| {
                raw.into_iter()
                    .map(|(s, q, w)| Line {
                        sku: skus[s].into(),
                        quantity: q,
                        warehouse: w.map(|w| warehouses[w].into()),
                    })
                    .collect::<Vec<_>>()
            },
        );
        (lines, cands)
    }

    #[test]
    fn strategies_parse_from_their_names_and_nothing_else() {
        for strategy in [Strategy::Priority, Strategy::Single] {
            assert_eq!(Strategy::parse(strategy.as_str()), Ok(strategy));
        }
        assert_eq!((Strategy::Priority.as_str(), Strategy::Single.as_str()), ("priority", "single"));
        for bad in ["", "Priority", "SINGLE", "cheapest", "single "] {
            assert!(Strategy::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Strategy::default(), Strategy::Priority);
    }

    fn strategies() -> impl Gen<Value = Strategy> {
        prop_oneof![Just(Strategy::Priority), Just(Strategy::Single)]
    }

    proptest! {
        #[test]
        fn never_allocates_beyond_capacity_and_is_all_or_nothing((lines, cands) in arb_case(), strategy in strategies()) {
            match allocate(&lines, &cands, strategy) {
                Ok(allocs) => {
                    for (sku, requested) in demand(&lines) {
                        let got: i64 = allocs.iter().filter(|a| a.sku == sku).map(|a| a.quantity).sum();
                        prop_assert_eq!(got, requested, "every SKU fully allocated");
                    }
                    for a in &allocs {
                        prop_assert!(a.quantity > 0);
                        let c = cands.iter().find(|c| c.sku == a.sku && c.warehouse == a.warehouse);
                        let c = c.expect("allocated from a known level");
                        prop_assert!(c.active, "never from an inactive warehouse");
                        prop_assert!(a.quantity <= c.capacity(), "never beyond available + backorder_limit");
                    }
                    for l in lines.iter().filter(|l| l.warehouse.is_some()) {
                        let at_pin: i64 = allocs.iter().filter(|a| a.sku == l.sku && Some(&a.warehouse) == l.warehouse.as_ref()).map(|a| a.quantity).sum();
                        prop_assert!(at_pin >= l.quantity, "pinned line honoured");
                    }
                    if strategy == Strategy::Single {
                        prop_assert!(allocs.windows(2).all(|w| w[0].warehouse == w[1].warehouse));
                    }
                }
                Err(shortages) => {
                    prop_assert!(!shortages.is_empty());
                    for s in &shortages {
                        prop_assert!(s.available < s.requested);
                        prop_assert!(s.available >= 0);
                    }
                }
            }
        }

        #[test]
        fn priority_order_and_backorders_last_hold_for_unpinned_lines((lines, cands) in arb_case()) {
            let lines: Vec<Line> = lines.into_iter().map(|l| Line { warehouse: None, ..l }).collect();
            if let Ok(allocs) = allocate(&lines, &cands, Strategy::Priority) {
                for a in &allocs {
                    let ranked = ranked(&cands, &a.sku);
                    let used_backorder = allocs.iter().any(|b| b.sku == a.sku && b.quantity > ranked.iter().find(|c| c.warehouse == b.warehouse).unwrap().real());
                    let me = ranked.iter().position(|c| c.warehouse == a.warehouse).unwrap();
                    for better in &ranked[..me] {
                        let got = allocs.iter().find(|b| b.sku == a.sku && b.warehouse == better.warehouse).map_or(0, |b| b.quantity);
                        prop_assert!(got >= better.real(), "a better warehouse's real stock is used up first");
                    }
                    if used_backorder {
                        for c in &ranked {
                            let got = allocs.iter().find(|b| b.sku == a.sku && b.warehouse == c.warehouse).map_or(0, |b| b.quantity);
                            prop_assert!(got >= c.real(), "backorders only after all real stock");
                        }
                    }
                }
            }
        }

        /// Independent of how the allocator works: an order is refused exactly when it cannot be
        /// filled. `priority`: every pinned warehouse can hold what is pinned to it, and the
        /// SKU's active warehouses together can hold everything (unpinned units may go anywhere,
        /// so this is the whole condition). `single`: one active warehouse (the pinned one, if
        /// lines are pinned) can hold every SKU's total.
        #[test]
        fn an_order_is_refused_exactly_when_it_cannot_be_filled((lines, cands) in arb_case(), strategy in strategies()) {
            let capacity = |sku: &str, warehouse: &str| {
                cands.iter().find(|c| c.active && c.sku == sku && c.warehouse == warehouse).map_or(0, |c| (c.available + c.backorder_limit).max(0))
            };
            let fillable = match strategy {
                Strategy::Priority => demand(&lines).iter().all(|(sku, total)| {
                    let mut pinned: BTreeMap<&str, i64> = BTreeMap::new();
                    for l in lines.iter().filter(|l| l.sku == *sku) {
                        if let Some(w) = &l.warehouse {
                            *pinned.entry(w.as_str()).or_default() += l.quantity;
                        }
                    }
                    let everywhere: i64 = cands.iter().filter(|c| c.sku == *sku).map(|c| capacity(sku, &c.warehouse)).sum();
                    pinned.iter().all(|(w, q)| *q <= capacity(sku, w)) && *total <= everywhere
                }),
                Strategy::Single => {
                    let mut pins: Vec<&str> = lines.iter().filter_map(|l| l.warehouse.as_deref()).collect();
                    pins.sort_unstable();
                    pins.dedup();
                    let mut homes: Vec<&str> = cands.iter().filter(|c| c.active).map(|c| c.warehouse.as_str()).collect();
                    homes.sort_unstable();
                    homes.dedup();
                    homes.iter().filter(|w| pins.is_empty() || pins == [**w]).any(|w| {
                        demand(&lines).iter().all(|(sku, total)| *total <= capacity(sku, w))
                    })
                }
            };
            prop_assert_eq!(allocate(&lines, &cands, strategy).is_ok(), fillable, "lines {:?}", lines);
        }

        #[test]
        fn allocation_is_deterministic_whatever_the_candidate_order((lines, cands) in arb_case(), strategy in strategies()) {
            let mut reversed = cands.clone();
            reversed.reverse();
            prop_assert_eq!(allocate(&lines, &cands, strategy), allocate(&lines, &reversed, strategy));
        }
    }
}
