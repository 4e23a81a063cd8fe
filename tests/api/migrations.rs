//! Migrations that have landed are never edited: a database migrated by an earlier build records
//! their checksums, and sqlx refuses to start against a changed one.

/// `version checksum` of every landed migration (SHA-384, as sqlx records it). A new migration
/// gets its line here when it lands; an existing line never changes.
const LANDED: &str = include_str!("landed_migrations.txt");

#[test]
fn landed_migrations_are_never_edited() {
    let landed: Vec<(i64, &str)> = LANDED
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (version, checksum) = l.split_once(' ').expect("`version checksum` lines");
            (version.parse().expect("a version number"), checksum.trim())
        })
        .collect();
    let current: Vec<(i64, String)> =
        inventory::store::db::MIGRATOR.iter().map(|m| (m.version, hex::encode(&m.checksum))).collect();
    for (version, checksum) in &landed {
        let now = current.iter().find(|(v, _)| v == version);
        assert!(now.is_some(), "landed migration {version} was removed");
        assert_eq!(now.unwrap().1, *checksum, "landed migration {version} was edited: add a new migration instead");
    }
    let unlisted: Vec<i64> = current.iter().map(|(v, _)| *v).filter(|v| !landed.iter().any(|(l, _)| l == v)).collect();
    assert!(
        unlisted.is_empty(),
        "migrations {unlisted:?} are not in tests/api/landed_migrations.txt: add `version checksum` lines for them"
    );
}
