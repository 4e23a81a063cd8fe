-- Leave room on every stock and allocation page so that the constant updates of on_hand /
-- reserved and fulfilled / released can be HOT updates (same page, no index entries): at flash
-- sale rates that halves the index and WAL traffic of a reservation. Pages written from now on
-- (new levels, imports) get the room; `VACUUM FULL stock_levels` repacks old ones.
ALTER TABLE stock_levels SET (fillfactor = 70);
ALTER TABLE reservation_allocations SET (fillfactor = 80);
