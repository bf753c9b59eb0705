//! The PostgreSQL store against a real PostgreSQL (a throwaway cluster from
//! Debian's `postgresql`, see `viva_tests::pg`): its schema is SQLite's with
//! PostgreSQL's types, and values cross both engines alike.
//!
//! The scheduler, API and LTI suites also run on PostgreSQL:
//! `VIVA_TEST_STORE=postgres cargo test --workspace --test scheduler --test api --test lti`
//! (scripts/test does).

use std::collections::BTreeMap;

use viva_daemon::db::{Connection, Engine, Value};
use viva_daemon::store::{Location, Store};

fn pg_store() -> Store {
    let url = viva_tests::pg::fresh_database().expect("a test database");
    let store = Store::open_at(&Location::Postgres(url)).expect("open the PostgreSQL store");
    assert_eq!(store.engine(), Engine::Postgres);
    store
}

/// Column name → type class, per table.
type Schema = BTreeMap<String, Vec<(String, &'static str)>>;

fn class(decl: &str) -> &'static str {
    let d = decl.to_ascii_uppercase();
    if d.contains("INT") {
        "integer"
    } else if d.contains("REAL") || d.contains("DOUBLE") || d.contains("FLOAT") {
        "real"
    } else if d.contains("TEXT") || d.contains("CHAR") {
        "text"
    } else {
        "other"
    }
}

fn schema(conn: &Connection<'_>) -> viva_daemon::Result<Schema> {
    let (tables_sql, columns_sql) = match conn.engine() {
        Engine::Sqlite => (
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
            "SELECT name, type FROM pragma_table_info(?1) ORDER BY cid",
        ),
        Engine::Postgres => (
            "SELECT table_name FROM information_schema.tables
             WHERE table_schema = current_schema() ORDER BY table_name",
            "SELECT column_name, data_type FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = ?1 ORDER BY ordinal_position",
        ),
    };
    let tables: Vec<String> = conn
        .prepare(tables_sql)?
        .query_map([], |r| r.get(0))?
        .collect::<viva_daemon::db::Result<_>>()?;
    let mut out = Schema::new();
    for t in tables {
        let cols = conn
            .prepare(columns_sql)?
            .query_map([&t], |r| {
                Ok((r.get::<_, String>(0)?, class(&r.get::<_, String>(1)?)))
            })?
            .collect::<viva_daemon::db::Result<_>>()?;
        out.insert(t, cols);
    }
    Ok(out)
}

#[tokio::test]
async fn the_postgres_schema_is_sqlites_with_postgres_types() {
    if viva_tests::pg::unavailable() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = Store::open(&dir.path().join("viva.db")).expect("sqlite");
    let pg = pg_store();
    let a = sqlite.read(schema).await.expect("sqlite schema");
    let b = pg.read(schema).await.expect("postgres schema");
    assert!(a.len() > 20, "{a:?}");
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same tables"
    );
    for (table, cols) in &a {
        assert_eq!(
            cols, &b[table],
            "table {table}: the same columns, in order, of the same kinds"
        );
    }
    // Opening again migrates nothing and keeps the data.
    pg.write(|tx| {
        tx.execute(
            "INSERT INTO contexts (id, title, created_at) VALUES (?1, ?2, ?3)",
            ("c1", "Course", 5i64),
        )?;
        Ok(())
    })
    .await
    .expect("insert");
}

#[tokio::test]
async fn values_cross_postgres_as_they_cross_sqlite() {
    if viva_tests::pg::unavailable() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = Store::open(&dir.path().join("viva.db")).expect("sqlite");
    let pg = pg_store();
    for store in [sqlite, pg] {
        let engine = store.engine();
        let got = store
            .write(|tx| {
                tx.execute(
                    "INSERT INTO contexts (id, title, created_at) VALUES (?1, ?2, ?3)",
                    viva_daemon::params!["c", "Café ünïcode", 1_700_000_000_000i64],
                )?;
                tx.execute(
                    "INSERT INTO worker_times (kind, models, start_seconds, stop_seconds, updated_at)
                     VALUES (?1, ?2, ?3, NULL, ?4)",
                    viva_daemon::params!["stt", "m", 1.25f64, 7u32],
                )?;
                // An identity key comes back with RETURNING on both.
                let batch: i64 = tx.query_row(
                    "INSERT INTO batches (opened_at) VALUES (?1) RETURNING id",
                    [3i64],
                    |r| r.get(0),
                )?;
                let row = tx.query_row(
                    "SELECT c.title, c.created_at, w.start_seconds, w.stop_seconds,
                            COUNT(*) > 0, COALESCE(SUM(w.updated_at), 0), ?1 + 1
                     FROM contexts c, worker_times w WHERE c.id = ?2
                     GROUP BY c.title, c.created_at, w.start_seconds, w.stop_seconds",
                    viva_daemon::params![41i64, "c"],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>("created_at")?,
                            r.get::<_, f64>(2)?,
                            r.get::<_, Option<f64>>(3)?,
                            r.get::<_, bool>(4)?,
                            r.get::<_, i64>(5)?,
                            r.get::<_, i64>(6)?,
                        ))
                    },
                )?;
                Ok((batch, row))
            })
            .await
            .expect("values");
        assert_eq!(
            got,
            (
                1,
                (
                    "Café ünïcode".to_string(),
                    1_700_000_000_000,
                    1.25,
                    None,
                    true,
                    7,
                    42
                )
            ),
            "{engine:?}"
        );
        // A failed write leaves nothing behind.
        let failed = store
            .write(|tx| {
                tx.execute(
                    "INSERT INTO contexts (id, title, created_at) VALUES ('d', 'D', 1)",
                    (),
                )?;
                tx.execute(
                    "INSERT INTO contexts (id, title, created_at) VALUES ('c', 'again', 1)",
                    (),
                )?;
                Ok(())
            })
            .await
            .expect_err("a duplicate key");
        match &failed {
            viva_daemon::Error::Db(e) => assert!(e.is_unique_violation(), "{engine:?}: {e}"),
            e => panic!("{engine:?}: {e}"),
        }
        let n: i64 = store
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM contexts", [], |r| r.get(0))?))
            .await
            .expect("count");
        assert_eq!(n, 1, "{engine:?}: the failed transaction rolled back");
        let v: Value = store
            .read(|c| Ok(c.query_row("SELECT NULL", [], |r| r.get(0))?))
            .await
            .expect("null");
        assert_eq!(v, Value::Null);
    }
}

/// `viva migrate-store` moves a SQLite site into PostgreSQL: every row, the
/// grades and transcripts as they were, and new work continues after the
/// copied ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_store_moves_a_sqlite_site_to_postgres() {
    use std::time::Duration;
    use viva_daemon::Role;
    use viva_tests::{TestDaemon, tone};
    if viva_tests::pg::unavailable() {
        return;
    }
    // A site on SQLite (whatever VIVA_TEST_STORE says) with graded work.
    let old = TestDaemon::start(&[], |c| {
        c.store = None;
        c.scheduler.stt_batch_size = 2;
        c.scheduler.batch_window = Duration::from_millis(200);
    })
    .await;
    let tok = old.token(Role::Learner, "migrating-student", "sandbox");
    let mut ids = Vec::new();
    for name in ["first.wav", "second.wav", "third.wav"] {
        let f = tone(old.dir.path(), name, 1.0);
        let (status, body) = old.upload(&tok, "sandbox-oral-1", &f).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    let before = old.wait_settled(&ids, Duration::from_secs(60)).await;
    for s in &before {
        assert_eq!(s["state"], "evaluated", "{s}");
    }
    let kept = old.stop_keeping_files().await;
    let db = kept.path().join("var/viva.db");

    let url = viva_tests::pg::fresh_database().expect("a target database");
    let mut cmd = std::process::Command::new(viva_tests::viva_bin());
    cmd.args(["migrate-store", "--from"])
        .arg(format!("sqlite:{}", db.display()))
        .env("VIVA_MIGRATE_TO", &url)
        .env("VIVA_DATA_DIR", kept.path().join("var"));
    let out = viva_tests::process::output(&mut cmd, Duration::from_secs(120)).expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("submissions") && stdout.contains("copied"),
        "{stdout}"
    );
    // A second run refuses: the target is no longer empty.
    let again = viva_tests::process::output(&mut cmd, Duration::from_secs(120)).expect("runs");
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("new, empty database"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // The same site on PostgreSQL.
    let target = url.clone();
    // The same data directory (media, keys), now with the PostgreSQL store.
    let data_dir = kept.path().join("var");
    let new = TestDaemon::start(&[], move |c| {
        c.store = Some(target);
        c.data_dir = data_dir;
        c.scheduler.stt_batch_size = 1;
    })
    .await;
    // The first node on the database seeded the shared session key from the
    // site's own: sessions from before the move still work.
    let (status, v) = new
        .get(&tok, &format!("/api/v1/submissions/{}", ids[0]))
        .await;
    assert_eq!(status, 200, "a session from the SQLite site: {v}");
    let admin = new.token(Role::Admin, "test-admin", "sandbox");
    for (id, was) in ids.iter().zip(&before) {
        let (status, now) = new.get(&admin, &format!("/api/v1/submissions/{id}")).await;
        assert_eq!(status, 200, "{now}");
        assert_eq!(now["media_available"], true, "{now}");
        for field in [
            "state",
            "transcript",
            "evaluations",
            "attempt",
            "user_id",
            "sha256",
            "batch_id",
            "duration_seconds",
            "created_at",
            "finished_at",
        ] {
            assert_eq!(now[field], was[field], "{field} of {id}");
        }
    }
    // New work continues: a fresh upload gets a new batch and is graded.
    let tok = new.token(Role::Learner, "migrating-student", "sandbox");
    let f = tone(new.dir.path(), "fourth.wav", 1.0);
    let (status, body) = new.upload(&tok, "sandbox-oral-1", &f).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["attempt"], 4, "attempts continue: {body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let done = new.wait_settled(&[id], Duration::from_secs(60)).await;
    assert_eq!(done[0]["state"], "evaluated", "{}", done[0]);
    new.stop().await;
}

/// A node id serves from one daemon at a time: a second daemon under the
/// same id is refused with the reason (another id is welcome), and may
/// start once the first is gone.
#[tokio::test]
async fn a_second_daemon_with_the_same_node_id_is_refused() {
    if viva_tests::pg::unavailable() {
        return;
    }
    let url = viva_tests::pg::fresh_database().expect("a test database");
    let location = Location::Postgres(url);
    let first = Store::open_at(&location).expect("first");
    first.claim_node("node-a").await.expect("the first daemon");
    let second = Store::open_at(&location).expect("a second handle opens (doctor, migrate)");
    let e = second
        .claim_node("node-a")
        .await
        .expect_err("a second daemon is refused");
    assert!(e.to_string().contains("another Viva daemon"), "{e}");
    let other = Store::open_at(&location).expect("a third handle");
    other
        .claim_node("node-b")
        .await
        .expect("another node id is welcome");
    drop(first);
    // The lock goes with the first daemon's connection.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match second.claim_node("node-a").await {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() > deadline => panic!("still refused: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}
