//! API keys with roles. Keys are random secrets sent as `Authorization: Bearer <key>`; the
//! service only knows their SHA-256 hashes (from configuration) and compares them in constant
//! time. Keys are never logged.

use std::fmt;

use axum::http::Method;
use sha2::{Digest, Sha256};

/// What a key may do. Each role includes `read`; `admin` includes everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Orders,
    Ops,
    Admin,
}

impl Role {
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw {
            "read" => Ok(Self::Read),
            "orders" => Ok(Self::Orders),
            "ops" => Ok(Self::Ops),
            "admin" => Ok(Self::Admin),
            other => Err(format!("unknown role `{other}`: one of read, orders, ops, admin")),
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Orders => "orders",
            Self::Ops => "ops",
            Self::Admin => "admin",
        }
    }

    pub(crate) fn allows(self, needed: Role) -> bool {
        self == Role::Admin || needed == Role::Read || self == needed
    }
}

/// One configured key: a name for logs, its role and the SHA-256 of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub name: String,
    pub role: Role,
    hash: [u8; 32],
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

impl KeyEntry {
    /// Parses a config line `name:role:sha256hex`.
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut parts = line.trim().splitn(3, ':');
        let (Some(name), Some(role), Some(hash)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("expected name:role:sha256hex".into());
        };
        let bytes = hex::decode(hash.trim()).map_err(|_| "the hash must be 64 hex digits".to_owned())?;
        let hash: [u8; 32] = bytes.try_into().map_err(|_| "the hash must be 64 hex digits".to_owned())?;
        Ok(Self { name: name.to_owned(), role: Role::parse(role)?, hash })
    }
}

/// Every configured key.
#[derive(Debug, Clone, Default)]
pub struct Keys(Vec<KeyEntry>);

impl Keys {
    /// Parses key lines (`name:role:sha256hex`), one per line or comma-separated; `#` starts a comment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, line) in text.split(['\n', ',']).enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                keys.push(KeyEntry::parse(line).map_err(|e| format!("api key entry {}: {e}", i + 1))?);
            }
        }
        Ok(Self(keys))
    }

    /// The keys of `--api-keys` (inline entries) and `--api-keys-file`, together.
    pub(crate) fn load(inline: Option<&str>, file: Option<&std::path::Path>) -> Result<Self, String> {
        let mut text = inline.unwrap_or_default().to_owned();
        if let Some(path) = file {
            let file = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            text.push('\n');
            text.push_str(&file);
        }
        Self::parse(&text)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entry whose hash matches `secret`. Looks at every entry whatever matches, and compares
    /// whole hashes without early exit, so timing says nothing about the keys.
    pub fn find(&self, secret: &str) -> Option<&KeyEntry> {
        let hash = hash(secret);
        let mut found = None;
        for entry in &self.0 {
            let diff = entry.hash.iter().zip(hash.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(entry);
            }
        }
        found
    }
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Mints a new key: the secret (shown once) and its config line.
pub fn mint(name: &str, role: Role) -> (String, String) {
    let secret = format!("inv_{}", hex::encode(rand::random::<[u8; 24]>()));
    let line = format!("{name}:{}:{}", role.as_str(), hex::encode(hash(&secret)));
    (secret, line)
}

/// The role a request needs: reads need `read`; reservations need `orders`; catalogue and stock
/// changes need `ops`; webhooks (every method) need `admin`. `None`: open to everyone.
pub(crate) fn required_role(method: &Method, path: &str, metrics_public: bool) -> Option<Role> {
    if path.starts_with("/health/") || path == "/openapi.json" || path.starts_with("/docs") {
        return None;
    }
    if path == "/metrics" {
        return (!metrics_public).then_some(Role::Read);
    }
    // Webhook subscriptions carry signing secrets and send data out: admin only, reads too.
    if path == "/v1/webhooks" || path.starts_with("/v1/webhooks/") {
        return Some(Role::Admin);
    }
    if method == Method::GET || method == Method::HEAD {
        return Some(Role::Read);
    }
    if path.starts_with("/v1/reservations") { Some(Role::Orders) } else { Some(Role::Ops) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_are_found_by_their_line_and_nothing_else() {
        let (secret, line) = mint("shop", Role::Orders);
        let keys = Keys::parse(&format!("# comment\n{line}\n")).unwrap();
        let entry = keys.find(&secret).unwrap();
        assert_eq!((entry.name.as_str(), entry.role), ("shop", Role::Orders));
        assert!(keys.find("inv_wrong").is_none());
        assert!(!format!("{keys:?}").contains(&line[line.len() - 64..]), "hashes stay out of Debug");
    }

    #[test]
    fn roles_allow_what_the_contract_says() {
        assert!(Role::Orders.allows(Role::Read));
        assert!(Role::Ops.allows(Role::Ops));
        assert!(!Role::Orders.allows(Role::Ops));
        assert!(!Role::Read.allows(Role::Orders));
        assert!(Role::Admin.allows(Role::Ops) && Role::Admin.allows(Role::Orders));
        let post = Method::POST;
        assert_eq!(required_role(&post, "/v1/reservations/x/fulfil", true), Some(Role::Orders));
        assert_eq!(required_role(&post, "/v1/stock/receive", true), Some(Role::Ops));
        assert_eq!(required_role(&Method::PUT, "/v1/skus/A", true), Some(Role::Ops));
        assert_eq!(required_role(&Method::GET, "/v1/stock/A", true), Some(Role::Read));
        assert_eq!(required_role(&Method::GET, "/health/ready", false), None);
        assert_eq!(required_role(&Method::GET, "/metrics", false), Some(Role::Read));
        for method in [Method::GET, Method::PUT, Method::DELETE] {
            assert_eq!(required_role(&method, "/v1/webhooks/h1", true), Some(Role::Admin), "{method}");
        }
        assert_eq!(required_role(&Method::GET, "/v1/webhooks", true), Some(Role::Admin));
        assert!(!Role::Ops.allows(Role::Admin) && !Role::Read.allows(Role::Admin));
    }

    #[test]
    fn bad_lines_are_reported() {
        assert!(Keys::parse("shop:orders").is_err());
        assert!(Keys::parse("shop:boss:00").is_err());
        assert!(Keys::parse(&format!("shop:orders:{}", "zz".repeat(32))).is_err());
    }
}
