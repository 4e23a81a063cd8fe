-- Stock as of a past moment (`GET /v1/stock/{sku}?as_of=`): the last ledger entry of each level
-- at or before that moment.
--
-- `at` defaulted to now(), the start of the writing transaction. Two transactions on one level
-- can take its row lock in the other order than they started, so the entry with the latest
-- `at` need not be the last one written. Every ledger insert runs after the level's row lock is
-- taken, so the clock at the insert orders one level's entries as its lock does (the entries
-- of one statement come in apply order, with time-ordered ids to break ties). Entries written
-- before this migration keep their transaction start times.
ALTER TABLE ledger ALTER COLUMN at SET DEFAULT clock_timestamp();

-- The lookup: one backward index probe per level, (sku, warehouse, at <= T) newest first.
-- `ledger_by_level_in_commit_order` (sku, warehouse, txid, id) stays: ledger pages need it.
CREATE INDEX ledger_by_level_at ON ledger (sku, warehouse, at, id);

-- When a level came into being, so that a level created without stock (by its replenishment
-- settings) is in the past answer from then on, with nothing on hand. Levels created before this
-- migration have none (a constant NULL: no table rewrite) and count from their first entry.
ALTER TABLE stock_levels ADD COLUMN created_at timestamptz;
ALTER TABLE stock_levels ALTER COLUMN created_at SET DEFAULT clock_timestamp();
