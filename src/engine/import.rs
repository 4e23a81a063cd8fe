//! Bulk load of stock levels from CSV in two steps. [`stage`] reads the upload to the end
//! before any transaction begins, checking every line in Rust, into a spool file on disk;
//! [`apply`] then has `store::import` `COPY` the spool into a staging table and merge it in one
//! set-based transaction that writes `receive` (new level) or `adjust`/`count` (existing level) ledger
//! entries and availability events. Any bad row — reported by line number — and nothing is
//! applied.

use std::path::PathBuf;

use axum::body::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::{Error, Refusal, Result};
use crate::domain::{Code, FieldError, MAX_QUANTITY};
use crate::store::import as store;

/// Most bad rows listed in one answer.
const MAX_REPORTED: usize = 100;
/// Rows are sent to COPY in chunks of about this many bytes.
const COPY_CHUNK: usize = 256 * 1024;
/// Longest line accepted (without its line break); a longer one is a malformed body.
pub(crate) const MAX_LINE_BYTES: usize = 64 * 1024;

/// What an import did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ImportReport {
    /// The ledger `reference` of every entry this import wrote.
    pub import_id: String,
    pub rows: i64,
    pub levels_created: i64,
    pub ledger_entries: i64,
}

/// Column positions, from the header line (or the default order without one).
#[derive(Debug, Clone, Copy)]
struct Columns {
    sku: usize,
    warehouse: usize,
    on_hand: usize,
    reorder_point: Option<usize>,
    reorder_quantity: Option<usize>,
    count: usize,
}

impl Columns {
    const DEFAULT: Self =
        Self { sku: 0, warehouse: 1, on_hand: 2, reorder_point: Some(3), reorder_quantity: Some(4), count: 5 };

    /// The columns a header line names: the documented ones, in their order (any letter case),
    /// the last one or two left out if the file has no such column. The OpenAPI document's
    /// pattern for the body (`http::schemas::import_csv`) describes exactly these files.
    fn from_header(fields: &[&str]) -> Result<Self, String> {
        let names = ["sku", "warehouse", "on_hand", "reorder_point", "reorder_quantity"];
        let named = fields.len() >= 3
            && fields.len() <= names.len()
            && fields.iter().zip(names).all(|(field, name)| field.eq_ignore_ascii_case(name));
        if !named {
            return Err(format!("the header must be {HEADER}, got `{}`", fields.join(",")));
        }
        let count = fields.len();
        Ok(Self {
            count,
            reorder_point: (count > 3).then_some(3),
            reorder_quantity: (count > 4).then_some(4),
            ..Self::DEFAULT
        })
    }
}

/// Streams CSV lines in, checks each, and feeds the good ones to COPY.
struct Loader {
    columns: Option<Columns>,
    line: i64,
    rows: i64,
    errors: Vec<FieldError>,
    bad_rows: usize,
    out: String,
    /// The start of a line whose end has not arrived yet (at most `MAX_LINE_BYTES`).
    partial: Vec<u8>,
}

/// The columns a file may name in a header line, in order (the last two may be left out).
pub(crate) const HEADER: &str = "sku,warehouse,on_hand[,reorder_point[,reorder_quantity]]";

/// Spaces and tabs around a field, and one pair of double quotes around its text, are not part
/// of the value (spreadsheets write both).
pub(crate) fn unquote(field: &str) -> &str {
    let f = field.trim_matches([' ', '\t']);
    f.strip_prefix('"').and_then(|f| f.strip_suffix('"')).unwrap_or(f)
}

/// A count: 1 to 10 digits (no sign), from 0 to 1,000,000,000.
fn quantity(raw: &str, what: &str) -> Result<i64, String> {
    Some(raw)
        .filter(|r| (1..=10).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|r| r.parse::<i64>().ok())
        .filter(|n| (0..=MAX_QUANTITY).contains(n))
        .ok_or_else(|| format!("{what} must be a whole number from 0 to {MAX_QUANTITY}, got `{raw}`"))
}

impl Loader {
    fn new() -> Self {
        Self {
            columns: None,
            line: 0,
            rows: 0,
            errors: Vec::new(),
            bad_rows: 0,
            out: String::new(),
            partial: Vec::new(),
        }
    }

    /// Checks every line `chunk` completes. Each byte is looked at once: only the new bytes are
    /// searched for a line break, never the unfinished line kept from earlier chunks.
    fn push(&mut self, chunk: &[u8]) -> Result<(), Refusal> {
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            let mut partial = std::mem::take(&mut self.partial);
            let line = if partial.is_empty() {
                &rest[..end]
            } else {
                partial.extend_from_slice(&rest[..end]);
                &partial[..]
            };
            self.check_length(line.len())?;
            self.line(&String::from_utf8_lossy(line));
            partial.clear();
            self.partial = partial;
            rest = &rest[end + 1..];
        }
        self.check_length(self.partial.len() + rest.len())?;
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    /// Checks the last line, when the input does not end with a line break.
    fn finish(&mut self) {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.line(&String::from_utf8_lossy(&last));
        }
    }

    /// A line (complete or not) of `len` bytes is refused beyond the limit: the body is not
    /// the CSV it claims to be, and buffering it would be unbounded.
    fn check_length(&self, len: usize) -> Result<(), Refusal> {
        if len > MAX_LINE_BYTES {
            return Err(Refusal::NotCsv(format!(
                "line {} is longer than {MAX_LINE_BYTES} bytes: not a CSV of stock levels",
                self.line + 1
            )));
        }
        Ok(())
    }

    fn fail(&mut self, message: String) {
        self.bad_rows += 1;
        if self.errors.len() < MAX_REPORTED {
            self.errors.push(FieldError::new(format!("line {}", self.line), message));
        }
    }

    fn line(&mut self, raw: &str) {
        self.line += 1;
        let mut raw = raw.trim_end_matches('\r');
        // Spreadsheet programs start UTF-8 CSV with a byte order mark; it belongs to no field.
        if self.line == 1 {
            raw = raw.strip_prefix('\u{feff}').unwrap_or(raw);
        }
        if raw.trim_matches([' ', '\t']).is_empty() {
            return;
        }
        let fields: Vec<&str> = raw.split(',').map(unquote).collect();
        let columns = match self.columns {
            Some(c) => c,
            // A header names its columns; `on_hand` can never be a data value.
            None if fields.iter().any(|f| f.eq_ignore_ascii_case("on_hand")) => {
                match Columns::from_header(&fields) {
                    Ok(c) => self.columns = Some(c),
                    Err(e) => self.fail(e),
                }
                return;
            }
            None => {
                self.columns = Some(Columns::DEFAULT);
                Columns::DEFAULT
            }
        };
        if fields.len() < 3 || fields.len() > columns.count {
            return self.fail(format!(
                "expected sku,warehouse,on_hand[,reorder_point,reorder_quantity], got {} fields",
                fields.len()
            ));
        }
        let get = |i: Option<usize>| i.and_then(|i| fields.get(i).copied()).filter(|f| !f.is_empty());
        let sku = get(Some(columns.sku)).unwrap_or("");
        let warehouse = get(Some(columns.warehouse)).unwrap_or("");
        if let Err(e) = Code::parse(sku) {
            return self.fail(format!("sku `{sku}` {e}"));
        }
        if let Err(e) = Code::parse(warehouse) {
            return self.fail(format!("warehouse `{warehouse}` {e}"));
        }
        let on_hand = match quantity(get(Some(columns.on_hand)).unwrap_or(""), "on_hand") {
            Ok(n) => n,
            Err(e) => return self.fail(e),
        };
        let optional = |i: Option<usize>, what: &str| -> Result<String, String> {
            get(i).map(|raw| quantity(raw, what).map(|n| n.to_string())).unwrap_or(Ok(String::new()))
        };
        let point = optional(columns.reorder_point, "reorder_point");
        let reorder = optional(columns.reorder_quantity, "reorder_quantity");
        match (point, reorder) {
            (Ok(point), Ok(reorder)) => {
                self.rows += 1;
                // Codes cannot contain commas or quotes, so plain CSV is safe; empty means NULL.
                self.out.push_str(&format!("{},{sku},{warehouse},{on_hand},{point},{reorder}\n", self.line));
            }
            (Err(e), _) | (_, Err(e)) => self.fail(e),
        }
    }
}

/// Whether `text` reads as a CSV of levels without a bad row (for the document's pattern test).
#[cfg(test)]
pub(crate) fn reads_cleanly(text: &str) -> bool {
    let mut loader = Loader::new();
    loader.push(text.as_bytes()).is_ok() && {
        loader.finish();
        loader.bad_rows == 0
    }
}

/// A temporary file under the system's temp directory, deleted when dropped: after the import,
/// and also when it fails or its request is cancelled.
#[derive(Debug)]
struct Spool {
    path: PathBuf,
}

impl Spool {
    async fn create(dir: &std::path::Path) -> Result<(Self, tokio::fs::File)> {
        let path = dir.join(format!("inventory-import-{}.rows", uuid::Uuid::now_v7()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(|e| spool_error(&path, &e))?;
        Ok((Self { path }, file))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn spool_error(path: &std::path::Path, err: &std::io::Error) -> Error {
    Error::Bug(format!("import spool {}: {err}", path.display()))
}

/// An upload whose every row passed the format checks, spooled to disk as COPY input: ready to
/// be applied in a short transaction.
#[derive(Debug)]
pub struct Staged {
    spool: Spool,
    rows: i64,
    sha256: String,
}

impl Staged {
    /// The SHA-256 of the uploaded bytes, in hex.
    pub(crate) fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// Reads CSV `chunks` to the end, checking every line, into a spool file; more than
/// `max_bytes` in all is refused. No database work happens here: an upload takes as long as its
/// client sends, and a transaction open that long would hold back the event relay for everyone.
pub async fn stage<S, E>(chunks: S, max_bytes: usize) -> Result<Staged>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    stage_in(&std::env::temp_dir(), chunks, max_bytes).await
}

async fn stage_in<S, E>(dir: &std::path::Path, mut chunks: S, max_bytes: usize) -> Result<Staged>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let (spool, mut file) = Spool::create(dir).await?;
    let mut loader = Loader::new();
    let mut digest = Sha256::new();
    let mut received = 0usize;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|err| Refusal::NotCsv(format!("cannot read the CSV: {err}")))?;
        received = received.saturating_add(chunk.len());
        if received > max_bytes {
            return Err(Refusal::TooLarge { limit: max_bytes }.into());
        }
        digest.update(&chunk);
        loader.push(&chunk)?;
        if loader.out.len() >= COPY_CHUNK {
            spool_out(&spool, &mut file, &mut loader).await?;
        }
    }
    loader.finish();
    spool_out(&spool, &mut file, &mut loader).await?;
    file.flush().await.map_err(|e| spool_error(&spool.path, &e))?;
    if loader.bad_rows > 0 {
        return Err(reject(loader.errors, loader.bad_rows).into());
    }
    // An empty file (or one with only a header) is a valid import of nothing: it answers rows 0.
    Ok(Staged { spool, rows: loader.rows, sha256: hex::encode(digest.finalize()) })
}

/// Writes the checked rows so far to the spool (nothing once a bad row is found: the import
/// will be refused).
async fn spool_out(spool: &Spool, file: &mut tokio::fs::File, loader: &mut Loader) -> Result<()> {
    let out = std::mem::take(&mut loader.out);
    if loader.bad_rows == 0 {
        file.write_all(out.as_bytes()).await.map_err(|e| spool_error(&spool.path, &e))?;
    }
    Ok(())
}

/// Applies a staged upload inside the caller's transaction. `create_missing` creates unknown
/// SKUs and warehouses (named after their code) instead of rejecting their rows. Can be run
/// again (the transaction retried): the spool is only read.
///
/// Into a database without stock levels yet, this is a first load (`store::claim_first_load`):
/// the same rows, entries and events, written without a foreign-key check per row.
pub async fn apply(conn: &mut PgConnection, staged: &Staged, create_missing: bool) -> Result<ImportReport> {
    let path = &staged.spool.path;
    store::prepare(conn).await?;
    // Before any other lock: it takes whole tables (none for a file without rows).
    let first_load = if staged.rows > 0 { store::claim_first_load(conn).await? } else { None };
    let file = tokio::fs::File::open(path).await.map_err(|e| spool_error(path, &e))?;
    let rows = futures_util::stream::unfold(SpoolRows { file, rest: Vec::new() }, |mut rows| async move {
        rows.next().await.transpose().map(|chunk| (chunk, rows))
    });
    store::copy_rows(conn, Box::pin(rows)).await?.map_err(|e| spool_error(path, &e))?;

    let repeated = lines(store::repeated_rows(conn).await?);
    if !repeated.is_empty() {
        let total = repeated.len();
        return Err(reject(repeated, total).into());
    }
    if create_missing {
        store::create_missing(conn).await?;
    } else {
        // Unknown codes are a 404, as for every other operation naming them.
        let unknown = lines(store::rows_of_unknowns(conn).await?);
        if !unknown.is_empty() {
            return Err(Refusal::UnknownInRows(unknown).into());
        }
    }
    let import_id = format!("import:{}", uuid::Uuid::now_v7());
    let (ledger_entries, levels_created) = match first_load {
        // New levels hold nothing: no floor to check.
        Some(first_load) => {
            store::create_first_levels(conn).await?;
            let written = store::write(conn, &import_id, store::Before::FirstLoad).await?;
            store::finish_first_load(conn, first_load).await?;
            written
        }
        None => {
            store::lock_and_create_levels(conn).await?;
            let floors = lines(store::rows_below_floor(conn).await?);
            if !floors.is_empty() {
                let total = floors.len();
                return Err(reject(floors, total).into());
            }
            store::write(conn, &import_id, store::Before::Levels).await?
        }
    };
    Ok(ImportReport { import_id, rows: staged.rows, levels_created, ledger_entries })
}

/// The rows of a spool file as `COPY` input, about `COPY_CHUNK` bytes at a time, each with the
/// id of the ledger entry it may write appended: a UUIDv7 made here, as for every other entry
/// (made in SQL, they cost a tenth of a first load).
struct SpoolRows {
    file: tokio::fs::File,
    /// The start of a row whose end has not been read yet.
    rest: Vec<u8>,
}

impl SpoolRows {
    async fn next(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut chunk = vec![0; COPY_CHUNK];
        let read = self.file.read(&mut chunk).await?;
        let mut bytes = std::mem::take(&mut self.rest);
        if read == 0 {
            if bytes.is_empty() {
                return Ok(None);
            }
            // The spool's rows all end with a line break; a last one without is a row still.
            bytes.push(b'\n');
        }
        bytes.extend_from_slice(&chunk[..read]);
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |end| end + 1);
        self.rest = bytes.split_off(complete);
        let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 2);
        let mut id = uuid::Uuid::encode_buffer();
        for row in bytes.split_inclusive(|b| *b == b'\n') {
            out.extend_from_slice(&row[..row.len() - 1]);
            out.push(b',');
            out.extend_from_slice(uuid::Uuid::now_v7().hyphenated().encode_lower(&mut id).as_bytes());
            out.push(b'\n');
        }
        Ok(Some(out))
    }
}

fn reject(mut errors: Vec<FieldError>, total: usize) -> Refusal {
    errors.sort_by_key(|e| e.field.strip_prefix("line ").and_then(|n| n.parse::<i64>().ok()).unwrap_or(i64::MAX));
    if total > errors.len() {
        errors.push(FieldError::new("file", format!("{total} bad rows in all; the first {} are listed", errors.len())));
    }
    Refusal::Invalid(errors)
}

/// Row problems found by the database side of the checks, as field errors.
fn lines(rows: Vec<(i64, String)>) -> Vec<FieldError> {
    rows.into_iter().map(|(line, message)| FieldError::new(format!("line {line}"), message)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Loader {
        let mut l = Loader::new();
        for line in text.lines() {
            l.line(line);
        }
        l
    }

    #[test]
    fn rows_are_checked_and_numbered_from_one() {
        let l = load("sku,warehouse,on_hand,reorder_point\nA,W1,5,2\nbad sku,W1,1\nB,W1,-3\nC,W1,7\n\nD,W2,1,x\n");
        assert_eq!(l.rows, 2);
        let lines: Vec<&str> = l.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(lines, ["line 3", "line 4", "line 7"]);
        assert_eq!(l.out, "2,A,W1,5,2,\n5,C,W1,7,,\n");
    }

    #[test]
    fn lines_split_across_chunks_are_joined_and_the_last_needs_no_line_break() {
        let mut l = Loader::new();
        for chunk in ["A,W", "1,5\r\nB,W1,", "", "6\n", "C,W1,7"] {
            l.push(chunk.as_bytes()).unwrap();
        }
        l.finish();
        assert_eq!(l.out, "1,A,W1,5,,\n2,B,W1,6,,\n3,C,W1,7,,\n");
    }

    #[test]
    fn a_line_longer_than_the_limit_is_refused_with_its_number_even_before_it_ends() {
        let mut l = Loader::new();
        l.push(format!("A,W1,1\nB,W1,{}\n", "1".repeat(MAX_LINE_BYTES - 5)).as_bytes()).unwrap();
        assert_eq!(l.rows, 1, "a line of exactly the limit is a line");
        assert_eq!(l.bad_rows, 1);
        l.push(b"C,W1,").unwrap();
        let err = (0..MAX_LINE_BYTES).find_map(|_| l.push(b"1").err()).expect("refused");
        assert!(matches!(&err, Refusal::NotCsv(m) if m.starts_with("line 3 ")), "{err:?}");
        assert!(l.partial.len() <= MAX_LINE_BYTES);
    }

    #[tokio::test]
    async fn the_spool_file_is_deleted_after_the_import_and_when_the_upload_fails() {
        let dir = std::env::temp_dir().join(format!("inventory-spool-test-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir(&dir).unwrap();
        let files = || std::fs::read_dir(&dir).unwrap().count();
        let chunks = |items: Vec<Result<&'static str, &'static str>>| {
            futures_util::stream::iter(items.into_iter().map(|item| item.map(Bytes::from)))
        };
        let staged = stage_in(&dir, chunks(vec![Ok("A,W1,5\nB,"), Ok("W1,6\n")]), 14).await.unwrap();
        assert_eq!((staged.rows, files()), (2, 1), "a body of exactly the limit is accepted");
        assert_eq!(std::fs::read_to_string(&staged.spool.path).unwrap(), "1,A,W1,5,,\n2,B,W1,6,,\n");
        drop(staged);
        assert_eq!(files(), 0);
        let empty = stage_in(&dir, chunks(vec![Ok("")]), 14).await.unwrap();
        assert_eq!(empty.rows, 0, "an empty file is an import of nothing");
        drop(empty);
        assert_eq!(files(), 0);
        for failing in
            [vec![Ok("A,W1,5\n"), Err("connection reset")], vec![Ok("A,W1,x\n")], vec![Ok("A,W1,5\nB,"), Ok("W1,60\n")]]
        {
            assert!(stage_in(&dir, chunks(failing), 14).await.is_err());
            assert_eq!(files(), 0);
        }
        std::fs::remove_dir(&dir).unwrap();
    }

    #[tokio::test]
    async fn every_spooled_row_goes_to_copy_once_with_an_entry_id_of_its_own_across_chunks() {
        let path = std::env::temp_dir().join(format!("inventory-spool-rows-test-{}", uuid::Uuid::now_v7()));
        // Rows of several lengths, more of them than one chunk holds.
        let rows: Vec<String> = (0..COPY_CHUNK / 10).map(|i| format!("{i},S{i},W{},{},,", i % 7, i * 31)).collect();
        std::fs::write(&path, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
        let mut spool = SpoolRows { file: tokio::fs::File::open(&path).await.unwrap(), rest: Vec::new() };
        let mut sent = Vec::new();
        while let Some(chunk) = spool.next().await.unwrap() {
            assert!(chunk.ends_with(b"\n"), "whole rows only");
            sent.extend_from_slice(&chunk);
        }
        std::fs::remove_file(&path).unwrap();
        let sent = String::from_utf8(sent).unwrap();
        let (copied, ids): (Vec<&str>, Vec<uuid::Uuid>) = sent
            .lines()
            .map(|line| line.rsplit_once(',').unwrap())
            .map(|(row, id)| (row, id.parse::<uuid::Uuid>().unwrap()))
            .unzip();
        assert_eq!(copied, rows);
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "distinct, in the order of the rows");
    }

    #[test]
    fn a_header_names_the_columns_in_order_and_none_means_all_five() {
        let l = load("SKU,Warehouse,on_hand\nA,W1,4\n");
        assert_eq!(l.out, "2,A,W1,4,,\n");
        let l = load("A,W1,4,1,10\n");
        assert_eq!(l.out, "1,A,W1,4,1,10\n");
        let l = load(" \"A\" ,\tW1, 4 ,,\"\"\n");
        assert_eq!(l.out, "1,A,W1,4,,\n", "spaces, tabs and quotes around fields");
        for bad in ["sku,on_hand\n", "warehouse,on_hand,sku\n", "sku,warehouse,on_hand,note\n"] {
            assert!(load(bad).errors[0].message.contains("the header must be"), "{bad:?}");
        }
        for bad in ["A,W1,+4\n", "A,W1,00000000004\n", "A,W1,4 2\n"] {
            assert_eq!(load(bad).errors.len(), 1, "{bad:?}");
        }
    }
}
