//! What the OpenAPI document says about the values the domain checks: codes, quantities, free
//! text, enumerations, cursors. Each is a named schema (`Sku`, `Quantity`, `Text`, …) that
//! request bodies and parameters refer to, so a client generator or a fuzzer knows exactly what
//! the service accepts. The checks themselves live in `domain` and the handlers; the tests at the
//! bottom hold each schema to its check.

use std::borrow::Cow;

use utoipa::openapi::schema::{ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::{RefOr, schema};
use utoipa::{PartialSchema, ToSchema};

use crate::domain::allocation::Strategy;
use crate::domain::webhooks::MAX_URL;
use crate::domain::{
    AdjustReason, ChannelCode, Delta, EventKind, MAX_QUANTITY, MAX_TEXT, Quantity, Sku, WarehouseCode, WebhookName,
};

/// The shape of SKUs and warehouse codes, as `domain::Code` checks it.
pub(crate) const CODE_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$";
/// Free text: no control characters (Unicode category Cc), as `domain::text` checks it.
pub(crate) const TEXT_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F]*$";
/// Free text with at least one character that is neither a control character nor white space
/// (Unicode White_Space, as Rust's `trim` sees it, spelled out: `\s` differs between regex
/// dialects, ECMA's includes U+FEFF).
const NAME_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F]*[^\x00-\x1F\x7F-\x9F \xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\x00-\x1F\x7F-\x9F]*$";

/// A webhook secret, as `domain::webhooks::Secret` checks it: `whsec_` and the standard, padded
/// base64 (no stray bits in the last character) of 24 to 64 bytes — whole groups of 4 for a
/// multiple of 3 bytes, else a last group ending `==` (one byte more) or `=` (two more).
const WEBHOOK_SECRET_PATTERN: &str = "^whsec_(?:(?:[A-Za-z0-9+/]{4}){8,21}\
    |(?:[A-Za-z0-9+/]{4}){8,21}[A-Za-z0-9+/][AQgw]==\
    |(?:[A-Za-z0-9+/]{4}){8,20}[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$";

/// A webhook's URL, as `domain::webhooks::url` checks it: http(s), a host name or address (IPv6
/// in brackets), a port up to 65535, then a path and query of URL characters.
const WEBHOOK_URL_PATTERN: &str = "^https?://(?:[A-Za-z0-9._~-]+|\\[[0-9A-Fa-f:.]+\\])\
    (?::(?:[0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?\
    (?:[/?][A-Za-z0-9._~:/?\\[\\]@!$&'()*+,;=%-]*)?$";

/// A stock-level cursor: the lowercase hex of `sku/warehouse` (see `stock::encode_cursor`),
/// spelled out byte by byte so that exactly the cursors the service can read match.
fn cursor_pattern() -> String {
    // The hex of one character that may start a code ([A-Za-z0-9]), and of one that may follow.
    let first = "(?:3[0-9]|4[1-9a-f]|5[0-9a]|6[1-9a-f]|7[0-9a])";
    let rest = "(?:3[0-9]|4[1-9a-f]|5[0-9af]|6[1-9a-f]|7[0-9a]|2[de])";
    format!("^{first}{rest}{{0,63}}2f{first}{rest}{{0,63}}$")
}

fn string(description: &str) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).description(Some(description))
}

pub(crate) fn integer(min: i64, max: i64, description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(min))
        .maximum(Some(max))
        .description(Some(description))
}

fn enumeration<'a>(values: impl IntoIterator<Item = &'a str>, description: &str) -> ObjectBuilder {
    string(description).enum_values(Some(values))
}

fn code(description: &str, example: &str) -> ObjectBuilder {
    string(description).min_length(Some(1)).max_length(Some(64)).pattern(Some(CODE_PATTERN)).examples([example])
}

fn text(description: &str) -> ObjectBuilder {
    string(description).max_length(Some(MAX_TEXT)).pattern(Some(TEXT_PATTERN))
}

/// Describes the one parameter an extractor that parses by hand reads: `$name` in `$in`
/// (`Query`, `Header`), with its schema and any further `ParameterBuilder` settings.
macro_rules! one_parameter {
    ($ty:ty, $name:literal, $in:ident, $description:literal, $schema:expr $(, $setting:ident($value:expr))* $(,)?) => {
        impl utoipa::IntoParams for $ty {
            fn into_params(
                _: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
            ) -> Vec<utoipa::openapi::path::Parameter> {
                vec![
                    utoipa::openapi::path::ParameterBuilder::new()
                        .name($name)
                        .parameter_in(utoipa::openapi::path::ParameterIn::$in)
                        .description(Some($description))
                        .schema(Some($schema))
                        $(.$setting($value))*
                        .build(),
                ]
            }
        }
    };
}
pub(crate) use one_parameter;

/// A named schema: `$name` in `components/schemas`, referred to wherever `$ty` is a field's
/// or a parameter's type.
macro_rules! named_schema {
    ($ty:ty, $name:literal, $schema:expr) => {
        impl PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                Schema::from($schema).into()
            }
        }

        impl ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

named_schema!(Sku, "Sku", code("A stock keeping unit: 1–64 of A–Z a–z 0–9 _ . -, starting alphanumeric.", "TSHIRT-M"));
named_schema!(
    WarehouseCode,
    "WarehouseCode",
    code("A warehouse code: 1–64 of A–Z a–z 0–9 _ . -, starting alphanumeric.", "BER")
);
named_schema!(
    ChannelCode,
    "ChannelCode",
    code("A sales channel's code: 1–64 of A–Z a–z 0–9 _ . -, starting alphanumeric.", "web-de")
);
named_schema!(
    WebhookName,
    "WebhookName",
    code("A webhook subscription's name: 1–64 of A–Z a–z 0–9 _ . -, starting alphanumeric.", "search-indexer")
);
named_schema!(Quantity, "Quantity", integer(1, MAX_QUANTITY, "A whole number of units.").examples([3]));
named_schema!(
    Delta,
    "Delta",
    OneOfBuilder::new()
        .description(Some("A signed, non-zero change of on_hand."))
        .item(integer(-MAX_QUANTITY, -1, "fewer units"))
        .item(integer(1, MAX_QUANTITY, "more units"))
);
named_schema!(
    Strategy,
    "Strategy",
    enumeration(
        Strategy::ALL.map(Strategy::as_str),
        "How unpinned lines are spread: `priority` (default) takes each line from the preferred warehouses \
         first; `single` takes the whole order from one warehouse."
    )
);
named_schema!(
    AdjustReason,
    "AdjustReason",
    enumeration(AdjustReason::ALL.map(AdjustReason::as_str), "Why on_hand was changed by hand.")
);
named_schema!(EventKind, "EventType", enumeration(EventKind::ALL.map(EventKind::as_str), "An event type."));

/// Free text (names, regions, references): at most 255 characters, no control characters.
#[derive(Debug)]
pub(crate) struct Text;
named_schema!(Text, "Text", text("Free text: at most 255 characters, no control characters."));

/// A name: free text that is not blank.
#[derive(Debug)]
pub(crate) struct Name;
named_schema!(Name, "Name", text("Free text that is not blank.").min_length(Some(1)).pattern(Some(NAME_PATTERN)));

/// The order service's own id of an order.
#[derive(Debug)]
pub(crate) struct OrderId;
named_schema!(
    OrderId,
    "OrderId",
    text("The order service's id of the order; one reservation per order id.").min_length(Some(1)).examples(["1001"])
);

/// The secret webhook deliveries are signed with.
#[derive(Debug)]
pub(crate) struct WebhookSecret;
named_schema!(
    WebhookSecret,
    "WebhookSecret",
    string(
        "`whsec_` followed by the base64 (standard alphabet, padded) of 24 to 64 random bytes, e.g. \
         `\"whsec_\" + base64.b64encode(os.urandom(32))`. The key is the decoded bytes.",
    )
    .pattern(Some(WEBHOOK_SECRET_PATTERN))
    .examples(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
);

/// Where webhook deliveries go.
#[derive(Debug)]
pub(crate) struct WebhookUrl;
named_schema!(
    WebhookUrl,
    "WebhookUrl",
    string("An http:// or https:// URL: a host (IPv6 in brackets), an optional port, path and query; no user name, no fragment.")
        .max_length(Some(MAX_URL))
        .pattern(Some(WEBHOOK_URL_PATTERN))
        .examples(["https://hooks.example.com/inventory"])
);

/// How long a hold lasts, in seconds.
#[derive(Debug)]
pub(crate) struct TtlSeconds;
named_schema!(
    TtlSeconds,
    "TtlSeconds",
    integer(1, super::reservations::MAX_TTL, "Seconds until the hold expires (at most 7 days).").examples([900])
);

/// A count from 0 to 1,000,000,000 (reorder points, backorder limits).
#[derive(Debug)]
pub(crate) struct Count;
named_schema!(Count, "Count", integer(0, MAX_QUANTITY, "A whole number of units, 0 or more."));

/// The position after which a stock listing continues.
#[derive(Debug)]
pub(crate) struct LevelCursor;
named_schema!(
    LevelCursor,
    "LevelCursor",
    string("Pass back the `next_cursor` of the previous page.").pattern(Some(cursor_pattern()))
);

/// One Server-Sent Event of the live feed, as a client's SSE parser hands it over.
#[derive(Debug)]
pub(crate) struct SseEvent;
named_schema!(
    SseEvent,
    "SseEvent",
    ObjectBuilder::new()
        .description(Some("One event of the stream: `id:`, `event:` and `data:` lines (heartbeats are comments)."))
        .property("id", string("The event's id: resume after it with `Last-Event-ID`.").pattern(Some("^[0-9]+$")))
        .required("id")
        .property("event", schema::Ref::from_schema_name("EventType"))
        .required("event")
        .property(
            "data",
            string("The event as JSON, the same object as an item of `GET /v1/events` (schema `Event`).")
                .content_media_type("application/json"),
        )
        .required("data")
);

/// The `Idempotency-Key` header's value.
pub(crate) fn idempotency_key() -> Schema {
    string("1–255 printable ASCII characters.")
        .min_length(Some(1))
        .max_length(Some(255))
        .pattern(Some("^[ -~]+$"))
        .into()
}

/// The CSV body of an import, exactly as `engine::import` reads it: an optional byte order
/// mark; blank lines anywhere; an optional header line naming the columns in order (any letter
/// case); rows of sku, warehouse, on_hand and up to as many optional counts as the header names
/// (two without a header); fields may be padded with spaces or tabs and quoted once; lines end
/// with `\n` or `\r\n`. (Each level at most once, and SKUs and warehouses that exist, are not
/// the pattern's to say.)
pub(crate) fn import_csv() -> Schema {
    let code = &CODE_PATTERN[1..CODE_PATTERN.len() - 1];
    let count = "(?:[0-9]{1,9}|0[0-9]{9}|1000000000)";
    let field = |value: &str| format!("[ \\t]*(?:{value}|\"{value}\")[ \\t]*");
    let end = "\\r*(?:\\n|$)";
    let blank = format!("[ \\t]*{end}");
    // Any letter case: `sku` is `[sS][kK][uU]`.
    let name = |name: &str| {
        let letters: String = name
            .chars()
            .map(|c| if c == '_' { "_".to_owned() } else { format!("[{c}{}]", c.to_ascii_uppercase()) })
            .collect();
        field(&letters)
    };
    let names = ["sku", "warehouse", "on_hand", "reorder_point", "reorder_quantity"];
    let header = |columns: usize| names[..columns].iter().map(|n| name(n)).collect::<Vec<_>>().join(",") + end;
    // A row has sku, warehouse and on_hand, and up to `columns - 3` more counts, each may be empty.
    let row = |columns: usize| {
        let optional = format!(",{}", field(&format!("(?:{count})?")));
        let mut tail = String::new();
        for _ in 3..columns {
            tail = format!("(?:{optional}{tail})?");
        }
        format!("{},{},{}{tail}{end}", field(code), field(code), field(count))
    };
    let body = |columns: usize| format!("(?:{}|{blank})*", row(columns));
    let by_header = [
        format!("{}{}", header(3), body(3)),
        format!("{}{}", header(4), body(4)),
        format!("(?:{})?{}", header(5), body(5)),
    ];
    string(
        "`sku,warehouse,on_hand[,reorder_point,reorder_quantity]` per line, with an optional header line naming \
         the columns in this order (the last one or two may be left out); quantities 0 to 1,000,000,000; fields \
         may be padded with spaces and quoted; each level at most once.",
    )
    .pattern(Some(format!("^\\uFEFF?(?:{blank})*(?:{})$", by_header.join("|"))))
    .into()
}

/// Any 64-bit event id (a negative one reads as 0).
pub(crate) fn event_id() -> Schema {
    integer(i64::MIN, i64::MAX, "An event id.").into()
}

/// The `type` filter of the event feed: one or more types, comma-separated.
pub(crate) fn event_types() -> Schema {
    ArrayBuilder::new().items(schema::Ref::from_schema_name("EventType")).into()
}

/// A moment in time, RFC 3339.
pub(crate) fn moment() -> Schema {
    string("A moment, RFC 3339.")
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .examples(["2025-01-31T12:00:00Z"])
        .into()
}

/// One `sku` parameter of an availability request: a SKU, or several comma-separated.
pub(crate) fn availability_skus() -> Schema {
    let code = &CODE_PATTERN[1..CODE_PATTERN.len() - 1];
    let item = string("A SKU, or several comma-separated; an unknown SKU reads 0.")
        .pattern(Some(format!("^{code}(?:,{code})*$")));
    ArrayBuilder::new().items(item).min_items(Some(1)).max_items(Some(super::stock::MAX_AVAILABILITY_SKUS)).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Code;

    fn regex(pattern: &str) -> regex::Regex {
        regex::Regex::new(pattern).unwrap()
    }

    #[test]
    fn the_code_pattern_is_the_code_check() {
        let pattern = regex(CODE_PATTERN);
        for s in ["A", "WH-1", "sku_42.blue", "0", &"x".repeat(64), "", "-a", "a b", "ä", &"x".repeat(65), "a/b"] {
            assert_eq!(pattern.is_match(s), Code::parse(s).is_ok(), "{s:?}");
        }
    }

    #[test]
    fn the_name_pattern_is_the_name_check() {
        let pattern = regex(NAME_PATTERN);
        for s in ["Berlin", " x ", "\u{feff}", "", " ", "\u{a0}\u{3000}", "\u{2009}", "a\tb", "Grüße"] {
            let ok = crate::domain::text(s.to_owned()).is_ok_and(|t| !t.trim().is_empty());
            assert_eq!(pattern.is_match(s), ok, "{s:?}");
        }
    }

    #[test]
    fn the_text_pattern_is_the_text_check() {
        let pattern = regex(TEXT_PATTERN);
        for s in ["", "plain", "Grüße 🙂", "tab\there", "nul\0", "del\u{7f}", "c1\u{85}", "nbsp\u{a0}"] {
            assert_eq!(pattern.is_match(s), crate::domain::text(s.to_owned()).is_ok(), "{s:?}");
        }
    }

    /// The pattern accepts exactly the files the reader accepts: every sample is read without a
    /// bad row if and only if it matches.
    #[test]
    fn the_import_pattern_matches_exactly_what_the_reader_accepts() {
        let schema = serde_json::to_value(import_csv()).unwrap();
        let pattern = regex(schema["pattern"].as_str().unwrap());
        let samples = [
            "",
            "\n",
            "A,B,5",
            "A,B,5,1,2\n",
            "sku,warehouse,on_hand\r\nA,B,0\r\n",
            "SKU,Warehouse,On_Hand\nA,B,1",
            "sku,warehouse,on_hand,reorder_point\nA,B,1,2\n\nC,D,3",
            "\u{feff}A,B,5\n",
            " \"A\" ,\tB, 5 ,,\"\"\n",
            "A,B,0000000005",
            "A,B,1000000000",
            "  \n\r\nA,B,5\r\r\n  ",
            "x",
            "A,B,-1",
            "A,B,+1",
            "A,B,5,1,2,3",
            "sku,warehouse,on_hand\nA,B,1,2",
            "A,B,1000000001",
            "A,B,00000000005",
            "-A,B,1",
            "A,,1",
            "A,B,",
            "warehouse,sku,on_hand\nB,A,1",
            "sku,warehouse,on_hand,note\nA,B,1,x",
            "A,B,5\nsku,warehouse,on_hand",
            "\"A,B,5",
            "A,B,5\r,1",
            "A,B,\"5",
            " \u{a0}A,B,5",
            "A,B,5\u{a0}",
        ];
        for sample in samples {
            let reads = crate::engine::import::reads_cleanly(sample);
            assert_eq!(pattern.is_match(sample), reads, "{sample:?}: pattern and reader disagree");
        }
    }

    #[test]
    fn the_webhook_secret_pattern_is_the_secret_check() {
        use base64::Engine as _;
        let pattern = regex(WEBHOOK_SECRET_PATTERN);
        let b64 = |n: usize| {
            base64::engine::general_purpose::STANDARD
                .encode((0..n).map(|i| (i as u8).wrapping_mul(37)).collect::<Vec<_>>())
        };
        let mut samples: Vec<String> = (0..70).map(|n| format!("whsec_{}", b64(n))).collect();
        let good = b64(32);
        samples.extend([
            good.clone(),
            format!("whsec_{}", good.trim_end_matches('=')),
            format!("whsec_{}=", good),
            format!("whsec_{}", good.replace('=', "B")),
            format!("whsec_{}B=", &good[..good.len() - 2]),
            format!("whsec_{}E=", &good[..good.len() - 2]),
            format!("whsec_{}", b64(25).replace("==", "B=")),
            format!("whsec_{}Q==", &b64(25)[..b64(25).len() - 3]),
            format!("whsec_{}R==", &b64(25)[..b64(25).len() - 3]),
            format!("whsec_{}", b64(24).replace('A', "-")),
            format!("whsec_{} ", b64(24)),
            format!("WHSEC_{}", b64(24)),
            "whsec_".to_owned(),
        ]);
        for s in &samples {
            assert_eq!(pattern.is_match(s), crate::domain::webhooks::Secret::parse(s).is_ok(), "{s:?}");
        }
        assert!(samples.iter().filter(|s| pattern.is_match(s)).count() >= 41, "every length from 24 to 64 bytes");
    }

    proptest::proptest! {
        #[test]
        fn the_webhook_secret_pattern_agrees_on_any_base64_like_text(s in "whsec_[A-Za-z0-9+/]{30,90}={0,3}") {
            let pattern = regex(WEBHOOK_SECRET_PATTERN);
            proptest::prop_assert_eq!(pattern.is_match(&s), crate::domain::webhooks::Secret::parse(&s).is_ok());
        }

        #[test]
        fn the_webhook_url_pattern_agrees_on_any_url_like_text(s in "https?://[a-z0-9:.\\[\\]@#/? %-]{0,20}") {
            let pattern = regex(WEBHOOK_URL_PATTERN);
            proptest::prop_assert_eq!(pattern.is_match(&s), crate::domain::webhooks::url(s.clone()).is_ok());
        }
    }

    #[test]
    fn the_webhook_url_pattern_is_the_url_check() {
        let pattern = regex(WEBHOOK_URL_PATTERN);
        let long = format!("http://a/{}", "x".repeat(MAX_URL));
        for s in [
            "http://localhost",
            "https://hooks.example.com/inventory?token=abc&x=%20",
            "http://127.0.0.1:8080/",
            "http://[::1]:9000/hook",
            "http://h:65535",
            "http://h:65536",
            "http://h:99999",
            "http://h:00080",
            "http://h:123456",
            "http://h:",
            "http://h:x",
            "http://[::1",
            "http://[]",
            "http://[::1]x",
            "https://user@example.com/",
            "http://example.com#f",
            "http://example.com/a b",
            "http://example.com/ä",
            "http://",
            "ftp://h",
            "HTTP://h",
            "http://h?q",
            &long,
        ] {
            let accepted = crate::domain::webhooks::url(s.to_owned()).is_ok();
            let matches = pattern.is_match(s) && s.chars().count() <= MAX_URL;
            assert_eq!(matches, accepted, "{s:?}");
        }
    }

    #[test]
    fn exactly_the_cursors_the_listing_hands_out_match_the_cursor_pattern() {
        let pattern = regex(&cursor_pattern());
        for (sku, warehouse) in [("A", "B"), ("SKU-1", "WH.2"), ("z_9", "Zz-0"), (&*"x".repeat(64), &*"y".repeat(64))] {
            let cursor = super::super::stock::encode_cursor(sku, warehouse);
            assert!(pattern.is_match(&cursor), "{cursor}");
        }
        for (bad, why) in [
            ("41", "no slash"),
            ("2f41", "no SKU"),
            ("412f", "no warehouse"),
            ("2d2f41", "starts with -"),
            ("412F42", "uppercase"),
            ("41202f42", "space"),
            ("", "empty"),
        ] {
            assert!(!pattern.is_match(bad), "{bad}: {why}");
        }
    }
}
