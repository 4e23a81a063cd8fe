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

/// 0011 moves event ids out of the event rows: ids already handed out stay, committed events
/// that had none yet get the next ones from the relay, in order, and nothing is numbered twice.
#[tokio::test]
async fn events_numbered_before_0011_keep_their_ids_and_the_rest_get_the_next_ones() {
    let url = crate::helpers::empty_database().await;
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    inventory::store::db::MIGRATOR.run_to(10, &db).await.unwrap();
    sqlx::query(
        "INSERT INTO events (type, data) SELECT 'stock.low', jsonb_build_object('n', n) FROM generate_series(1, 5) n",
    )
    .execute(&db)
    .await
    .unwrap();
    // The relay of that version had numbered the first three.
    sqlx::query("UPDATE events SET id = (data->>'n')::int8 WHERE (data->>'n')::int8 <= 3").execute(&db).await.unwrap();
    inventory::store::db::MIGRATOR.run(&db).await.unwrap();

    let app = crate::helpers::TestApp::spawn_through(inventory::config::ServerArgs::default(), url.clone(), &url).await;
    // From now on only an announced writer may insert events: the relay's frontier would pass
    // another while it runs.
    let event = "INSERT INTO events (type, data) VALUES ('stock.low', '{\"n\": 6}')";
    let refused = sqlx::query(event).execute(&db).await.unwrap_err();
    assert!(refused.to_string().contains("announced writers"), "{refused}");
    let service_db = inventory::store::db::Db::from(db.clone());
    let mut writer = inventory::store::db::begin_writer(&service_db, Default::default()).await.unwrap();
    sqlx::query(event).execute(&mut *writer).await.unwrap();
    writer.commit().await.unwrap();
    let (_, page) = app.get("/v1/events").await;
    let got: Vec<(i64, i64)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["id"].as_i64().unwrap(), e["data"]["n"].as_i64().unwrap()))
        .collect();
    assert_eq!(got, [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)], "{page}");
    let unrelayed: i64 = sqlx::query_scalar("SELECT count(*) FROM unrelayed_events()").fetch_one(&db).await.unwrap();
    assert_eq!(unrelayed, 0);
}
