//! The store: the embedded SQLite file (the default: WAL, foreign keys) or a
//! PostgreSQL database shared by several nodes; numbered migrations per
//! engine, one writer thread and a small pool of readers either way.
//!
//! All SQL runs off the async threads: writes on the single writer thread (so
//! there is never write contention inside the daemon), reads on the blocking
//! pool. Each write closure is one short `IMMEDIATE` transaction; callers never
//! keep one open across a model call (they cannot: the closure is synchronous).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::cell::RefCell;

use rusqlite::{OpenFlags, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::db::{Connection, DbError, Engine, OptionalExtension, PgConn, Transaction};
use crate::error::{Error, Result};

/// Numbered migrations; the index + 1 is the schema version. Never edit a
/// migration that has shipped: add a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: courses, people and assignments.
    r#"
    CREATE TABLE contexts (
        id          TEXT PRIMARY KEY,
        title       TEXT NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE users (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL DEFAULT '',
        email       TEXT NOT NULL DEFAULT '',
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE memberships (
        context_id  TEXT NOT NULL REFERENCES contexts(id) ON DELETE CASCADE,
        user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        roles       TEXT NOT NULL,
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (context_id, user_id)
    );
    CREATE TABLE assignments (
        id              TEXT PRIMARY KEY,
        context_id      TEXT NOT NULL REFERENCES contexts(id),
        title           TEXT NOT NULL,
        prompt          TEXT NOT NULL,
        rubric          TEXT NOT NULL,
        plugin          TEXT NOT NULL,
        plugin_config   TEXT NOT NULL DEFAULT '{}',
        release_policy  TEXT NOT NULL DEFAULT 'manual'
                        CHECK (release_policy IN ('manual', 'auto-unless-flagged', 'auto')),
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    );
    CREATE INDEX assignments_by_context ON assignments(context_id);
    "#,
    // 2: submissions, STT batches and the durable job queue.
    r#"
    CREATE TABLE batches (
        id           INTEGER PRIMARY KEY,
        opened_at    INTEGER NOT NULL,
        closed_at    INTEGER,
        stt_done_at  INTEGER
    );
    CREATE TABLE submissions (
        id                TEXT PRIMARY KEY,
        assignment_id     TEXT NOT NULL REFERENCES assignments(id),
        user_id           TEXT NOT NULL REFERENCES users(id),
        attempt           INTEGER NOT NULL,
        state             TEXT NOT NULL,
        batch_id          INTEGER REFERENCES batches(id),
        original_name     TEXT,
        media_dir         TEXT,
        original_path     TEXT,
        wav_path          TEXT,
        sha256            TEXT NOT NULL,
        size_bytes        INTEGER NOT NULL,
        duration_seconds  REAL NOT NULL,
        media_info        TEXT NOT NULL,
        transcript        TEXT,
        score             TEXT,
        failure_code      TEXT,
        failure_reason    TEXT,
        created_at        INTEGER NOT NULL,
        updated_at        INTEGER NOT NULL,
        finished_at       INTEGER,
        media_purged_at   INTEGER,
        UNIQUE (assignment_id, user_id, attempt)
    );
    CREATE INDEX submissions_by_user ON submissions(user_id);
    CREATE INDEX submissions_by_state ON submissions(state);
    CREATE TABLE jobs (
        id                INTEGER PRIMARY KEY,
        submission_id     TEXT NOT NULL REFERENCES submissions(id) ON DELETE CASCADE,
        stage             TEXT NOT NULL CHECK (stage IN ('stt', 'eval', 'score')),
        role              TEXT NOT NULL DEFAULT '',
        state             TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
        attempts          INTEGER NOT NULL DEFAULT 0,
        not_before        INTEGER NOT NULL DEFAULT 0,
        lease_owner       TEXT,
        lease_expires_at  INTEGER,
        result            TEXT,
        last_error        TEXT,
        service_ms        INTEGER,
        created_at        INTEGER NOT NULL,
        started_at        INTEGER,
        finished_at       INTEGER,
        UNIQUE (submission_id, stage, role)
    );
    CREATE INDEX jobs_by_state ON jobs(stage, state, not_before);
    "#,
    // 3: the grade outbox (consumed by LTI grade passback) and the audit log.
    r#"
    CREATE TABLE grade_outbox (
        id               INTEGER PRIMARY KEY,
        submission_id    TEXT NOT NULL REFERENCES submissions(id) ON DELETE CASCADE,
        kind             TEXT NOT NULL CHECK (kind IN ('pending', 'released')),
        payload          TEXT NOT NULL,
        state            TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  INTEGER NOT NULL,
        last_error       TEXT,
        created_at       INTEGER NOT NULL,
        delivered_at     INTEGER,
        UNIQUE (submission_id, kind)
    );
    CREATE TABLE audit_log (
        id       INTEGER PRIMARY KEY,
        at       INTEGER NOT NULL,
        actor    TEXT NOT NULL,
        action   TEXT NOT NULL,
        subject  TEXT NOT NULL DEFAULT '',
        details  TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_by_subject ON audit_log(subject);
    "#,
    // 4: uploaded rubric plugins (the .wasm lives in <data>/plugins/<sha256>.wasm).
    r#"
    CREATE TABLE plugins (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        version         TEXT NOT NULL,
        description     TEXT NOT NULL DEFAULT '',
        sha256          TEXT NOT NULL,
        size_bytes      INTEGER NOT NULL,
        context_id      TEXT REFERENCES contexts(id) ON DELETE CASCADE,
        interface       TEXT NOT NULL,
        config_schema   TEXT NOT NULL,
        default_config  TEXT NOT NULL,
        enabled         INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
        uploaded_by     TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    );
    CREATE INDEX plugins_by_name ON plugins(name, context_id);
    "#,
    // 5: LTI platform registrations, LTI users and resource links.
    r#"
    CREATE TABLE lti_registrations (
        issuer      TEXT NOT NULL,
        client_id   TEXT NOT NULL,
        config      TEXT NOT NULL,
        source      TEXT NOT NULL DEFAULT 'manual' CHECK (source IN ('manual', 'dynamic')),
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (issuer, client_id)
    );
    CREATE TABLE lti_users (
        issuer   TEXT NOT NULL,
        sub      TEXT NOT NULL,
        user_id  TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        PRIMARY KEY (issuer, sub)
    );
    CREATE INDEX lti_users_by_user ON lti_users(user_id);
    CREATE TABLE lti_links (
        id                TEXT PRIMARY KEY,
        issuer            TEXT NOT NULL,
        client_id         TEXT NOT NULL,
        deployment_id     TEXT NOT NULL,
        resource_link_id  TEXT NOT NULL,
        context_id        TEXT NOT NULL REFERENCES contexts(id) ON DELETE CASCADE,
        assignment_id     TEXT REFERENCES assignments(id) ON DELETE SET NULL,
        title             TEXT,
        lineitem_url      TEXT,
        lineitems_url     TEXT,
        ags_scopes        TEXT NOT NULL DEFAULT '',
        nrps_url          TEXT,
        created_at        INTEGER NOT NULL,
        updated_at        INTEGER NOT NULL,
        UNIQUE (issuer, client_id, deployment_id, resource_link_id)
    );
    CREATE INDEX lti_links_by_assignment ON lti_links(assignment_id);
    CREATE INDEX lti_links_by_context ON lti_links(context_id);
    CREATE TABLE lti_link_members (
        link_id         TEXT NOT NULL REFERENCES lti_links(id) ON DELETE CASCADE,
        user_id         TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        sub             TEXT NOT NULL,
        last_launch_at  INTEGER NOT NULL,
        PRIMARY KEY (link_id, user_id)
    );
    CREATE INDEX lti_link_members_by_user ON lti_link_members(user_id);
    "#,
    // 6: upload idempotency keys (a retried upload whose first try landed
    // returns that submission instead of making a second one).
    r#"
    ALTER TABLE submissions ADD COLUMN upload_key TEXT;
    CREATE UNIQUE INDEX submissions_by_upload_key
        ON submissions(assignment_id, user_id, upload_key) WHERE upload_key IS NOT NULL;
    "#,
    // 7: one-time platform registration invitations made by a Viva
    // administrator (only the token's sha256 is kept; `issuer`, when set, is
    // the issuer the administrator allowed, which may live on another host).
    r#"
    CREATE TABLE lti_invites (
        token_hash  TEXT PRIMARY KEY,
        issuer      TEXT,
        created_by  TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        used_at     INTEGER,
        used_by     TEXT
    );
    "#,
    // 8: an LTI user belongs to one registration: (issuer, client_id, sub).
    // Hosted Canvas tenants share an issuer, so (issuer, sub) let a second
    // registration speak for the first one's users. Existing users keep
    // their ids, bound to the registration they launched through (the first
    // by client id when there were several; a launch through another one
    // makes a new user); users with no recorded launch keep none and get a
    // new identity at their next launch.
    r#"
    CREATE TABLE lti_users_new (
        issuer     TEXT NOT NULL,
        client_id  TEXT NOT NULL,
        sub        TEXT NOT NULL,
        user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        PRIMARY KEY (issuer, client_id, sub)
    );
    INSERT INTO lti_users_new (issuer, client_id, sub, user_id)
        SELECT u.issuer, MIN(l.client_id), u.sub, u.user_id FROM lti_users u
        JOIN lti_link_members m ON m.user_id = u.user_id
        JOIN lti_links l ON l.id = m.link_id AND l.issuer = u.issuer
        GROUP BY u.issuer, u.sub, u.user_id;
    DROP TABLE lti_users;
    ALTER TABLE lti_users_new RENAME TO lti_users;
    CREATE INDEX lti_users_by_user ON lti_users(user_id);
    "#,
    // 9: an instructor may cap the attempts a student has at an assignment
    // (NULL: unlimited, the default).
    r#"
    ALTER TABLE assignments ADD COLUMN max_attempts INTEGER CHECK (max_attempts IS NULL OR max_attempts > 0);
    "#,
    // 10: measured worker load and stop times per kind and models (the
    // swap cost the ETA planner and the cost-aware switch weigh), kept
    // across restarts: a daemon knows its GPU's loads before its first swap.
    r#"
    CREATE TABLE worker_times (
        kind           TEXT NOT NULL,
        models         TEXT NOT NULL,
        start_seconds  REAL,
        stop_seconds   REAL,
        updated_at     INTEGER NOT NULL,
        PRIMARY KEY (kind, models)
    );
    "#,
    // 11: rubric and plugin versions: an assignment pins its current version
    // (rubric, prompt, plugin by sha256, plugin configuration); every edit of
    // those makes a new row in `assignment_versions`, history kept. A
    // submission records the version it is graded under; a rescore
    // (`rescores`) brings settled submissions to the current one. Existing
    // assignments become version 1, pinned by name only (`plugin_sha256`
    // empty: resolved as before until the next edit).
    r#"
    CREATE TABLE assignment_versions (
        assignment_id  TEXT NOT NULL REFERENCES assignments(id) ON DELETE CASCADE,
        version        INTEGER NOT NULL,
        prompt         TEXT NOT NULL,
        rubric         TEXT NOT NULL,
        plugin         TEXT NOT NULL,
        plugin_sha256  TEXT NOT NULL DEFAULT '',
        plugin_config  TEXT NOT NULL DEFAULT '{}',
        change         TEXT NOT NULL CHECK (change IN ('created', 'scoring', 'evaluation')),
        summary        TEXT NOT NULL DEFAULT '',
        created_by     TEXT NOT NULL,
        created_at     INTEGER NOT NULL,
        PRIMARY KEY (assignment_id, version)
    );
    ALTER TABLE assignments ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE assignments ADD COLUMN plugin_sha256 TEXT NOT NULL DEFAULT '';
    INSERT INTO assignment_versions (assignment_id, version, prompt, rubric, plugin,
                                     plugin_config, change, created_by, created_at)
        SELECT id, 1, prompt, rubric, plugin, plugin_config, 'created', 'migration', updated_at
        FROM assignments;
    ALTER TABLE submissions ADD COLUMN assignment_version INTEGER;
    ALTER TABLE submissions ADD COLUMN rescore_id TEXT;
    UPDATE submissions SET assignment_version = 1;
    CREATE TABLE rescores (
        id             TEXT PRIMARY KEY,
        assignment_id  TEXT NOT NULL REFERENCES assignments(id) ON DELETE CASCADE,
        version        INTEGER NOT NULL,
        total          INTEGER NOT NULL,
        scoring_only   INTEGER NOT NULL,
        reevaluate     INTEGER NOT NULL,
        done           INTEGER,
        failed         INTEGER,
        created_by     TEXT NOT NULL,
        created_at     INTEGER NOT NULL,
        finished_at    INTEGER
    );
    CREATE INDEX rescores_by_assignment ON rescores(assignment_id);
    CREATE INDEX submissions_by_rescore ON submissions(rescore_id) WHERE rescore_id IS NOT NULL;
    "#,
    // 12: calibration (issue 16): the instructor's own levels per criterion
    // (set blind, before seeing the evaluations, or by an override), the
    // submissions an instructor marked as exemplars for the evaluators, and
    // an assignment's threshold for automatic release.
    r#"
    CREATE TABLE instructor_grades (
        submission_id TEXT NOT NULL REFERENCES submissions(id) ON DELETE CASCADE,
        criterion_id  TEXT NOT NULL,
        level         TEXT,
        points        REAL NOT NULL,
        source        TEXT NOT NULL CHECK (source IN ('blind', 'override')),
        graded_by     TEXT NOT NULL,
        graded_at     INTEGER NOT NULL,
        PRIMARY KEY (submission_id, criterion_id)
    );
    CREATE TABLE exemplars (
        submission_id TEXT PRIMARY KEY REFERENCES submissions(id) ON DELETE CASCADE,
        assignment_id TEXT NOT NULL REFERENCES assignments(id) ON DELETE CASCADE,
        marked_by     TEXT NOT NULL,
        marked_at     INTEGER NOT NULL
    );
    CREATE INDEX exemplars_by_assignment ON exemplars(assignment_id);
    CREATE TABLE calibration_gates (
        assignment_id TEXT PRIMARY KEY REFERENCES assignments(id) ON DELETE CASCADE,
        min_qwk       REAL NOT NULL,
        min_sample    INTEGER NOT NULL CHECK (min_sample > 0),
        updated_by    TEXT NOT NULL,
        updated_at    INTEGER NOT NULL
    );
    "#,
    // 13: an assignment's language (a Whisper code such as 'fr'; NULL: Whisper
    // detects it) and vocabulary (course terms, Whisper's initial prompt;
    // NULL: none). Both travel in each STT job.
    r#"
    ALTER TABLE assignments ADD COLUMN language TEXT;
    ALTER TABLE assignments ADD COLUMN vocabulary TEXT;
    "#,
    // 14: several nodes on one store (PostgreSQL): the node whose GPU
    // queue holds a batch, the nodes and when each was last seen (a node
    // not seen for a lease has its batches dissolved and its leases taken),
    // and jobs that run on one node at a time (grade passback, retention).
    NODES_MIGRATION,
    // 15: what every api node must see, in the store rather than in one
    // node's memory or files: shared secrets (sealed; only used on
    // PostgreSQL), single-use tickets, LTI login states and deep-linking
    // requests (each keyed by the sha256 of its token), and uploaded plugin
    // components (base64, by sha256; each node caches them in
    // <data_dir>/plugins).
    SHARED_STATE_MIGRATION,
];

/// Migration 14 of SQLite, 2 of PostgreSQL (the same SQL on both).
const NODES_MIGRATION: &str = r#"
    ALTER TABLE batches ADD COLUMN node TEXT;
    CREATE TABLE nodes (
        id          TEXT PRIMARY KEY,
        role        TEXT NOT NULL,
        started_at  BIGINT NOT NULL,
        seen_at     BIGINT NOT NULL
    );
    CREATE TABLE singletons (
        name        TEXT PRIMARY KEY,
        node        TEXT NOT NULL,
        expires_at  BIGINT NOT NULL
    );
"#;

/// Migration 15 of SQLite, 3 of PostgreSQL (the same SQL on both).
const SHARED_STATE_MIGRATION: &str = r#"
    CREATE TABLE secrets (
        name        TEXT PRIMARY KEY,
        sealed      TEXT NOT NULL,
        version     BIGINT NOT NULL,
        updated_at  BIGINT NOT NULL
    );
    CREATE TABLE tickets (
        id_hash     TEXT PRIMARY KEY,
        user_id     TEXT NOT NULL,
        scope       TEXT NOT NULL,
        claims      TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        expires_at  BIGINT NOT NULL
    );
    CREATE INDEX tickets_by_user ON tickets (user_id, created_at);
    CREATE INDEX tickets_by_expiry ON tickets (expires_at);
    -- The state's text comes last and its size is in the indexes: a
    -- login counts and sums its platform's states from the indexes alone
    -- (SQLite reads a large text's overflow pages to reach later columns).
    CREATE TABLE lti_states (
        state_hash  TEXT PRIMARY KEY,
        issuer      TEXT NOT NULL,
        size        BIGINT NOT NULL,
        created_at  BIGINT NOT NULL,
        value       TEXT NOT NULL
    );
    CREATE INDEX lti_states_by_issuer ON lti_states (issuer, created_at, size);
    CREATE INDEX lti_states_by_age ON lti_states (created_at, size);
    CREATE TABLE lti_deep_links (
        handle_hash TEXT PRIMARY KEY,
        context     TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        expires_at  BIGINT NOT NULL
    );
    CREATE TABLE plugin_components (
        sha256      TEXT PRIMARY KEY,
        component   TEXT NOT NULL,
        created_at  BIGINT NOT NULL
    );
"#;

/// PostgreSQL's migrations (`store = "postgres://…"`). The first one is
/// SQLite's migrations 1–13 at once; later changes add a migration to both
/// lists. The schemas differ only in types (tested).
pub const PG_MIGRATIONS: &[&str] = &[
    include_str!("store/postgres-1.sql"),
    NODES_MIGRATION,
    SHARED_STATE_MIGRATION,
];

/// The schema version this build understands (SQLite's numbering).
#[cfg(test)]
pub fn schema_version() -> u32 {
    MIGRATIONS.len() as u32
}

pub use crate::config::{StoreLocation as Location, redact_url};

/// The schema version this build gives the store at `location`.
pub fn schema_version_at(location: &Location) -> u32 {
    match location {
        Location::Sqlite(_) => MIGRATIONS.len() as u32,
        Location::Postgres(_) => PG_MIGRATIONS.len() as u32,
    }
}

/// The schema version of the store at `location`, read without changing it:
/// `None` when there is no database yet (`viva doctor`).
pub fn stored_version_at(location: &Location) -> Result<Option<u32>> {
    match location {
        Location::Sqlite(path) => stored_version(path),
        Location::Postgres(url) => pg_read_once(url, version_in),
    }
}

/// The sealed value of the shared secret `name` in the PostgreSQL store at
/// `url`, read without changing the store (`viva doctor`): `None` when the
/// store has no such secret yet (or no schema).
pub fn pg_sealed_secret(url: &str, name: &str) -> Result<Option<String>> {
    pg_read_once(url, |conn| {
        if version_in(conn)?.unwrap_or(0) < PG_MIGRATIONS.len() as u32 {
            return Ok(None);
        }
        Ok(conn
            .query_row("SELECT sealed FROM secrets WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    })
}

/// One read on a connection of its own to the PostgreSQL store at `url`,
/// without opening the store. Runs on a plain thread: the client blocks on
/// a runtime of its own, which panics inside another runtime.
fn pg_read_once<T: Send>(
    url: &str,
    f: impl FnOnce(&Connection<'_>) -> Result<T> + Send,
) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let conn = RefCell::new(pg_connect(url)?);
            f(&Connection::postgres(&conn))
        })
        .join()
        .map_err(|_| Error::Internal("a read of the PostgreSQL store panicked".into()))?
    })
}

/// The schema version of the database at `path`, read without changing
/// it: `None` when there is no database file yet (`viva doctor`).
pub fn stored_version(path: &Path) -> Result<Option<u32>> {
    if !path.exists() {
        return Ok(None);
    }
    let raw = open_connection(path, true)?;
    version_in(&Connection::sqlite(&raw))
}

/// The highest applied migration (0 before the first).
fn version_in(conn: &Connection<'_>) -> Result<Option<u32>> {
    let has_table_sql = match conn.engine() {
        Engine::Sqlite => {
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        }
        Engine::Postgres => {
            "SELECT COUNT(*) > 0 FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_name = 'schema_version'"
        }
    };
    let has_table: bool = conn.query_row(has_table_sql, [], |r| r.get(0))?;
    if !has_table {
        return Ok(Some(0));
    }
    Ok(Some(conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?))
}

/// The writer's connection: owned by the writer thread.
enum Writer {
    Sqlite(rusqlite::Connection),
    Postgres(Box<PgWriter>),
}

struct PgWriter {
    url: String,
    conn: RefCell<PgConn>,
    /// The node id whose lock this connection's session holds (taken again
    /// after a reconnect).
    node: Option<String>,
}

/// The advisory lock key of node `node` on a PostgreSQL store: a node id
/// serves from one daemon at a time.
fn node_lock_key(node: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("viva-node:{node}").as_bytes());
    i64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

fn take_node_lock(conn: &RefCell<PgConn>, node: &str) -> Result<()> {
    let got: bool = Connection::postgres(conn).query_row(
        "SELECT pg_try_advisory_lock(?1)",
        [node_lock_key(node)],
        |r| r.get(0),
    )?;
    if got {
        Ok(())
    } else {
        Err(Error::Unavailable(format!(
            "another Viva daemon is serving this PostgreSQL database as node {node:?}; \
             give each node its own [node] id (or stop the other one)"
        )))
    }
}

impl Writer {
    /// Runs `f` in one transaction: committed when it returns `Ok`, rolled
    /// back otherwise.
    fn transaction<T>(&mut self, f: impl FnOnce(&Connection<'_>) -> Result<T>) -> Result<T> {
        match self {
            Writer::Sqlite(conn) => {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let value = f(&Connection::sqlite(&tx))?;
                tx.commit()?;
                Ok(value)
            }
            Writer::Postgres(w) => {
                if w.conn.borrow().client.is_closed() {
                    tracing::warn!("the PostgreSQL writer connection closed; reconnecting");
                    *w.conn.borrow_mut() = pg_connect(&w.url)?;
                    if let Some(node) = &w.node {
                        take_node_lock(&w.conn, node)?;
                    }
                }
                w.conn.borrow_mut().batch("BEGIN")?;
                match f(&Connection::postgres(&w.conn)) {
                    Ok(value) => {
                        w.conn.borrow_mut().batch("COMMIT")?;
                        Ok(value)
                    }
                    Err(e) => {
                        if let Err(rollback) = w.conn.borrow_mut().batch("ROLLBACK") {
                            tracing::warn!(error = %rollback, "rolling back a failed write");
                        }
                        Err(e)
                    }
                }
            }
        }
    }
}

type WriteJob = Box<dyn FnOnce(&mut Writer) + Send>;

/// Handle to the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    location: Location,
    writer: mpsc::UnboundedSender<WriteJob>,
    readers: Mutex<Readers>,
}

enum Readers {
    Sqlite(Vec<rusqlite::Connection>),
    Postgres(Vec<PgConn>),
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A PostgreSQL client's drop blocks on its runtime, which panics on
        // an async thread: close the idle readers on a thread of their own.
        if let Ok(mut r) = self.readers.lock()
            && let Readers::Postgres(pool) = &mut *r
            && !pool.is_empty()
        {
            let pool = std::mem::take(pool);
            let _ = std::thread::Builder::new()
                .name("viva-db-close".into())
                .spawn(move || drop(pool));
        }
    }
}

fn open_connection(path: &Path, read_only: bool) -> Result<rusqlite::Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = rusqlite::Connection::open_with_flags(path, flags).map_err(DbError::from)?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(DbError::from)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(DbError::from)?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(DbError::from)?;
        // WAL + NORMAL: a committed transaction survives a process crash
        // (kill -9); only an OS crash can lose the last few commits.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(DbError::from)?;
    }
    Ok(conn)
}

/// Connects to PostgreSQL. Plain TCP or a Unix socket: put TLS in front
/// (a local pgbouncer/stunnel) when the database is across a network.
pub(crate) fn pg_connect(url: &str) -> Result<PgConn> {
    // The client blocks on a runtime of its own, which tokio refuses inside
    // another's thread: connect on a plain thread (callers may be async).
    let connected = std::thread::scope(|s| {
        s.spawn(|| postgres::Client::connect(url, postgres::NoTls))
            .join()
            .map_err(|_| Error::Internal("connecting to PostgreSQL panicked".into()))
    })?;
    let client = connected.map_err(|e| {
        Error::Unavailable(format!(
            "cannot connect to the PostgreSQL store at {}: {} (check `store` in viva.toml or VIVA_STORE, and that the server is running)",
            redact_url(url),
            crate::db::DbError::from(e)
        ))
    })?;
    Ok(PgConn::new(client))
}

/// Brings the SQLite database to the current schema. Refuses a newer one.
pub fn migrate(conn: &mut rusqlite::Connection, path: &Path) -> Result<u32> {
    migrate_to(
        &Connection::sqlite(conn),
        &path.display().to_string(),
        MIGRATIONS,
    )
}

/// Applies `migrations` in order, each in its own transaction, recording
/// each version; refuses a database newer than the list.
fn migrate_to(conn: &Connection<'_>, location: &str, migrations: &[&str]) -> Result<u32> {
    if conn.engine() == Engine::Postgres {
        // Two nodes starting together: one migrates, the other waits.
        conn.execute_batch("SELECT pg_advisory_lock(7361626)")?;
    }
    let result = apply_migrations(conn, location, migrations);
    if conn.engine() == Engine::Postgres {
        conn.execute_batch("SELECT pg_advisory_unlock(7361626)")?;
    }
    result
}

fn apply_migrations(conn: &Connection<'_>, location: &str, migrations: &[&str]) -> Result<u32> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version     INTEGER PRIMARY KEY,
            applied_at  BIGINT NOT NULL
        );",
    )?;
    let current: u32 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?;
    let supported = migrations.len() as u32;
    if current > supported {
        return Err(Error::SchemaTooNew {
            path: location.to_owned(),
            found: current,
            supported,
        });
    }
    for (i, sql) in migrations.iter().enumerate().skip(current as usize) {
        let version = i as u32 + 1;
        let begin = match conn.engine() {
            Engine::Sqlite => "BEGIN EXCLUSIVE",
            Engine::Postgres => "BEGIN",
        };
        conn.execute_batch(begin)?;
        let applied = conn.execute_batch(sql).and_then(|()| {
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
                (version, crate::clock::now_ms()),
            )
        });
        match applied {
            Ok(_) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e.into());
            }
        }
        tracing::info!(version, "applied database migration");
    }
    Ok(supported)
}

impl Store {
    /// Opens (creating if needed) and migrates the SQLite database, and
    /// starts the writer thread.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_at(&Location::Sqlite(path.to_owned()))
    }

    /// Opens and migrates the store at `location`.
    pub fn open_at(location: &Location) -> Result<Store> {
        let (writer, readers) = match location {
            Location::Sqlite(path) => {
                let mut conn = open_connection(path, false)?;
                migrate(&mut conn, path)?;
                (Writer::Sqlite(conn), Readers::Sqlite(Vec::new()))
            }
            Location::Postgres(url) => {
                // The client blocks on a runtime of its own: off the caller's
                // thread, which may be async.
                let conn = std::thread::scope(|s| {
                    s.spawn(|| {
                        let conn = RefCell::new(pg_connect(url)?);
                        migrate_to(
                            &Connection::postgres(&conn),
                            &redact_url(url),
                            PG_MIGRATIONS,
                        )?;
                        Ok::<_, Error>(conn.into_inner())
                    })
                    .join()
                    .map_err(|_| Error::Internal("migrating PostgreSQL panicked".into()))
                })??;
                (
                    Writer::Postgres(Box::new(PgWriter {
                        url: url.clone(),
                        conn: RefCell::new(conn),
                        node: None,
                    })),
                    Readers::Postgres(Vec::new()),
                )
            }
        };
        let mut writer = writer;
        let (tx, mut rx) = mpsc::unbounded_channel::<WriteJob>();
        std::thread::Builder::new()
            .name("viva-db-writer".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job(&mut writer);
                }
            })
            .map_err(Error::io("starting the database writer thread"))?;
        Ok(Store {
            inner: Arc::new(Inner {
                location: location.clone(),
                writer: tx,
                readers: Mutex::new(readers),
            }),
        })
    }

    /// Where the store lives.
    pub fn location(&self) -> &Location {
        &self.inner.location
    }

    /// The schema version this build gives this store.
    pub fn schema_version(&self) -> u32 {
        schema_version_at(&self.inner.location)
    }

    /// Which engine the store runs on.
    pub fn engine(&self) -> Engine {
        match self.inner.location {
            Location::Sqlite(_) => Engine::Sqlite,
            Location::Postgres(_) => Engine::Postgres,
        }
    }

    /// Makes this handle node `node`'s daemon (PostgreSQL: a session
    /// advisory lock on the writer's connection, held while it lives;
    /// SQLite: the data directory lock does this). Fails when another
    /// daemon serves as that node.
    pub async fn claim_node(&self, node: &str) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        let node = node.to_owned();
        let job: WriteJob = Box::new(move |w: &mut Writer| {
            let result = match w {
                Writer::Sqlite(_) => Ok(()),
                Writer::Postgres(pg) => take_node_lock(&pg.conn, &node).map(|()| {
                    pg.node = Some(node);
                }),
            };
            let _ = reply.send(result);
        });
        self.inner
            .writer
            .send(job)
            .map_err(|_| Error::Unavailable("the database writer has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Internal("the database writer dropped a request".into()))?
    }

    /// Runs `f` in one short write transaction on the writer thread.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: WriteJob = Box::new(move |w: &mut Writer| {
            let _ = reply.send(w.transaction(f));
        });
        self.inner
            .writer
            .send(job)
            .map_err(|_| Error::Unavailable("the database writer has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Internal("the database writer dropped a request".into()))?
    }

    /// Runs `f` on a read connection on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection<'_>) -> Result<T> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read_here(f))
            .await
            .map_err(|e| Error::Internal(format!("database reader panicked: {e}")))?
    }

    /// Synchronous read, for code already off the async threads.
    pub fn read_blocking<T: Send>(
        &self,
        f: impl FnOnce(&Connection<'_>) -> Result<T> + Send,
    ) -> Result<T> {
        match &self.inner.location {
            // The client blocks on a runtime of its own, which panics on a
            // thread inside another runtime: such a caller gets a thread for
            // the read.
            Location::Postgres(_) if tokio::runtime::Handle::try_current().is_ok() => {
                std::thread::scope(|s| {
                    s.spawn(|| self.read_here(f))
                        .join()
                        .map_err(|_| Error::Internal("a database read panicked".into()))?
                })
            }
            _ => self.read_here(f),
        }
    }

    /// A read on this thread.
    fn read_here<T>(&self, f: impl FnOnce(&Connection<'_>) -> Result<T>) -> Result<T> {
        match &self.inner.location {
            Location::Sqlite(path) => {
                let taken = match self.inner.readers.lock() {
                    Ok(mut r) => match &mut *r {
                        Readers::Sqlite(pool) => pool.pop(),
                        Readers::Postgres(_) => None,
                    },
                    Err(_) => None,
                };
                let conn = match taken {
                    Some(c) => c,
                    None => open_connection(path, true)?,
                };
                let result = f(&Connection::sqlite(&conn));
                if let Ok(mut r) = self.inner.readers.lock()
                    && let Readers::Sqlite(pool) = &mut *r
                    && pool.len() < 8
                {
                    pool.push(conn);
                }
                result
            }
            Location::Postgres(url) => {
                let taken = match self.inner.readers.lock() {
                    Ok(mut r) => match &mut *r {
                        Readers::Postgres(pool) => pool.pop(),
                        Readers::Sqlite(_) => None,
                    },
                    Err(_) => None,
                };
                let conn = match taken {
                    Some(c) if !c.client.is_closed() => c,
                    _ => pg_connect(url)?,
                };
                let cell = RefCell::new(conn);
                let result = f(&Connection::postgres(&cell));
                let conn = cell.into_inner();
                if !conn.client.is_closed()
                    && let Ok(mut r) = self.inner.readers.lock()
                    && let Readers::Postgres(pool) = &mut *r
                    && pool.len() < 8
                {
                    pool.push(conn);
                }
                result
            }
        }
    }
}

/// What [`copy`] moved: rows per table, in copy order.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyReport {
    pub tables: Vec<(String, u64)>,
}

/// Tables in an order that satisfies their foreign keys (the SQLite
/// schema's creation order), without `schema_version`.
fn tables_in_order(conn: &Connection<'_>) -> Result<Vec<String>> {
    let sql = match conn.engine() {
        Engine::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table'
             AND name NOT LIKE 'sqlite_%' AND name <> 'schema_version' ORDER BY rowid"
        }
        Engine::Postgres => {
            return Err(Error::bad_request(
                "migrate_store_source",
                "copy from a SQLite store (the source of `viva migrate-store` is sqlite:…)",
            ));
        }
    };
    Ok(conn
        .prepare(sql)?
        .query_map([], |r| r.get(0))?
        .collect::<crate::db::Result<_>>()?)
}

/// Copies every row of the SQLite store `from` into the empty store `to`
/// (`viva migrate-store`), in one transaction on `to`, then moves the
/// identity counters past the copied ids and checks the counts. The source is
/// only read (opening it brings it to this build's schema first). `progress` is told each table's name and row count as it starts.
pub async fn copy(
    from: &Store,
    to: &Store,
    progress: impl Fn(&str, u64) + Send + Sync + 'static,
) -> Result<CopyReport> {
    let (tables, dump) = from
        .read(|c| {
            let tables = tables_in_order(c)?;
            let mut dump = Vec::new();
            for t in &tables {
                dump.push(c.query(&format!("SELECT * FROM {t}"), ())?);
            }
            Ok((tables, dump))
        })
        .await?;
    let progress = Arc::new(progress);
    let report = to
        .write(move |tx| {
            let nonempty: i64 = tx.query_row(
                "SELECT (SELECT COUNT(*) FROM contexts) + (SELECT COUNT(*) FROM submissions)
                        + (SELECT COUNT(*) FROM lti_registrations)",
                (),
                |r| r.get(0),
            )?;
            if nonempty > 0 {
                return Err(Error::bad_request(
                    "migrate_store_target",
                    "the target store already holds courses, submissions or registrations; \
                     migrate into a new, empty database",
                ));
            }
            let mut report = Vec::new();
            for (table, rows) in tables.iter().zip(dump) {
                progress(table, rows.len() as u64);
                // The sandbox course a fresh daemon creates is replaced by the source's.
                tx.execute(&format!("DELETE FROM {table}"), ())?;
                if let Some(first) = rows.first() {
                    let names = first.names();
                    let sql = format!(
                        "INSERT INTO {table} ({}) VALUES ({})",
                        names.join(", "),
                        (1..=names.len())
                            .map(|i| format!("?{i}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    for row in &rows {
                        tx.execute(&sql, row.values().to_vec())?;
                    }
                    if tx.engine() == Engine::Postgres {
                        let identity: bool = tx.query_row(
                            "SELECT COUNT(*) > 0 FROM information_schema.columns
                             WHERE table_schema = current_schema() AND table_name = ?1
                               AND column_name = 'id' AND is_identity = 'YES'",
                            [table.as_str()],
                            |r| r.get(0),
                        )?;
                        if identity {
                            // Identity keys continue after the copied ids.
                            tx.query_row(
                                &format!(
                                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), MAX(id))
                                     FROM {table}"
                                ),
                                (),
                                |_| Ok(()),
                            )?;
                        }
                    }
                }
                let copied: i64 =
                    tx.query_row(&format!("SELECT COUNT(*) FROM {table}"), (), |r| r.get(0))?;
                if copied as usize != rows.len() {
                    return Err(Error::Internal(format!(
                        "{table}: {} rows read but {copied} in the target",
                        rows.len()
                    )));
                }
                report.push((table.clone(), copied as u64));
            }
            Ok(CopyReport { tables: report })
        })
        .await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn mig(conn: &mut Connection, path: &Path, migrations: &[&str]) -> Result<u32> {
        migrate_to(
            &crate::db::Connection::sqlite(conn),
            &path.display().to_string(),
            migrations,
        )
    }

    fn tables(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .expect("prepare");
        stmt.query_map([], |r| r.get(0))
            .expect("query")
            .collect::<std::result::Result<_, _>>()
            .expect("rows")
    }

    /// A course `c` with an assignment `a` and a student `u`.
    const COURSE: &str = "INSERT INTO contexts VALUES ('c', 'C', 0);
         INSERT INTO users (id, created_at) VALUES ('u', 0);
         INSERT INTO assignments (id, context_id, title, prompt, rubric, plugin, created_at, updated_at)
             VALUES ('a', 'c', 't', 'p', '{}', 'x', 0, 0);";

    fn db_at(version: usize) -> (tempfile::TempDir, Connection, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("viva.db");
        let mut conn = open_connection(&path, false).expect("open");
        mig(&mut conn, &path, &MIGRATIONS[..version]).expect("migrate");
        (dir, conn, path)
    }

    #[test]
    fn migration_1_creates_courses_people_assignments() {
        let (_d, conn, _) = db_at(1);
        let t = tables(&conn);
        for name in ["contexts", "users", "memberships", "assignments"] {
            assert!(t.contains(&name.to_string()), "{name} missing: {t:?}");
        }
        assert!(!t.contains(&"submissions".to_string()));
        conn.execute("INSERT INTO contexts VALUES ('c', 'C', 0)", [])
            .expect("context");
        let bad = conn.execute(
            "INSERT INTO assignments (id, context_id, title, prompt, rubric, plugin, release_policy, created_at, updated_at)
             VALUES ('a', 'c', 't', 'p', '{}', 'x', 'sometimes', 0, 0)",
            [],
        );
        assert!(bad.is_err(), "release policy is checked");
        let orphan = conn.execute(
            "INSERT INTO assignments (id, context_id, title, prompt, rubric, plugin, created_at, updated_at)
             VALUES ('a', 'nope', 't', 'p', '{}', 'x', 0, 0)",
            [],
        );
        assert!(orphan.is_err(), "foreign keys are on");
    }

    #[test]
    fn migration_2_adds_submissions_and_a_unique_job_per_stage() {
        let (_d, conn, _) = db_at(2);
        conn.execute_batch(COURSE).expect("course");
        conn.execute_batch(
            "INSERT INTO submissions (id, assignment_id, user_id, attempt, state, sha256, size_bytes,
                 duration_seconds, media_info, created_at, updated_at)
                 VALUES ('s', 'a', 'u', 1, 'queued', 'h', 1, 1.0, '{}', 0, 0);
             INSERT INTO jobs (submission_id, stage, state, created_at) VALUES ('s', 'stt', 'queued', 0);",
        )
        .expect("rows");
        let dup = conn.execute(
            "INSERT INTO jobs (submission_id, stage, state, created_at) VALUES ('s', 'stt', 'queued', 0)",
            [],
        );
        assert!(dup.is_err(), "one STT job per submission");
        let dup_attempt = conn.execute(
            "INSERT INTO submissions (id, assignment_id, user_id, attempt, state, sha256, size_bytes,
                 duration_seconds, media_info, created_at, updated_at)
                 VALUES ('s2', 'a', 'u', 1, 'queued', 'h', 1, 1.0, '{}', 0, 0)",
            [],
        );
        assert!(dup_attempt.is_err(), "attempt numbers are unique");
    }

    #[test]
    fn migration_3_adds_outbox_with_one_row_per_kind() {
        let (_d, conn, _) = db_at(3);
        let t = tables(&conn);
        assert!(t.contains(&"grade_outbox".to_string()));
        assert!(t.contains(&"audit_log".to_string()));
        let bad = conn.execute(
            "INSERT INTO grade_outbox (submission_id, kind, payload, next_attempt_at, created_at)
             VALUES ('s', 'maybe', '{}', 0, 0)",
            [],
        );
        assert!(bad.is_err());
    }

    #[test]
    fn migration_4_adds_plugins_scoped_to_a_course_or_the_site() {
        let (_d, conn, _) = db_at(4);
        assert!(tables(&conn).contains(&"plugins".to_string()));
        conn.execute("INSERT INTO contexts VALUES ('c', 'C', 0)", [])
            .expect("context");
        let insert = |id: &str, ctx: Option<&str>, enabled: i64| {
            conn.execute(
                "INSERT INTO plugins (id, name, version, sha256, size_bytes, context_id, interface,
                     config_schema, default_config, enabled, uploaded_by, created_at, updated_at)
                 VALUES (?1, 'p', '1', 'h', 1, ?2, 'viva:rubric@0.1.0', '{}', '{}', ?3, 'a', 0, 0)",
                rusqlite::params![id, ctx, enabled],
            )
        };
        insert("site", None, 1).expect("site-wide");
        insert("course", Some("c"), 1).expect("course");
        assert!(
            insert("orphan", Some("nope"), 1).is_err(),
            "course must exist"
        );
        assert!(insert("bad", None, 2).is_err(), "enabled is a boolean");
    }

    #[test]
    fn migration_5_adds_lti_registrations_links_and_users() {
        let (_d, conn, _) = db_at(5);
        let t = tables(&conn);
        for name in [
            "lti_registrations",
            "lti_users",
            "lti_links",
            "lti_link_members",
        ] {
            assert!(t.contains(&name.to_string()), "{name} missing: {t:?}");
        }
        conn.execute_batch(
            "INSERT INTO contexts VALUES ('c', 'C', 0);
             INSERT INTO users (id, created_at) VALUES ('u', 0);
             INSERT INTO lti_registrations (issuer, client_id, config, created_at, updated_at)
                 VALUES ('https://p', '1', '{}', 0, 0);
             INSERT INTO lti_links (id, issuer, client_id, deployment_id, resource_link_id,
                 context_id, created_at, updated_at) VALUES ('l', 'https://p', '1', 'd', 'r', 'c', 0, 0);
             INSERT INTO lti_users VALUES ('https://p', 'sub', 'u');
             INSERT INTO lti_link_members VALUES ('l', 'u', 'sub', 0);",
        )
        .expect("rows");
        let dup = conn.execute(
            "INSERT INTO lti_registrations (issuer, client_id, config, created_at, updated_at)
             VALUES ('https://p', '1', '{}', 0, 0)",
            [],
        );
        assert!(dup.is_err(), "one registration per (issuer, client_id)");
        let dup_link = conn.execute(
            "INSERT INTO lti_links (id, issuer, client_id, deployment_id, resource_link_id,
                 context_id, created_at, updated_at) VALUES ('l2', 'https://p', '1', 'd', 'r', 'c', 0, 0)",
            [],
        );
        assert!(dup_link.is_err(), "one link per platform resource link");
        let bad_source = conn.execute(
            "INSERT INTO lti_registrations (issuer, client_id, config, source, created_at, updated_at)
             VALUES ('https://q', '1', '{}', 'guessed', 0, 0)",
            [],
        );
        assert!(bad_source.is_err());
        // Deleting a user (data deletion) takes their LTI identity and launches along.
        conn.execute("DELETE FROM users WHERE id = 'u'", [])
            .expect("delete user");
        let n: i64 = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM lti_users) + (SELECT COUNT(*) FROM lti_link_members)",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(n, 0);
    }

    #[test]
    fn migration_6_adds_upload_keys_unique_per_student_and_assignment() {
        let (_d, conn, _) = db_at(6);
        let sub = |id: &str, user: &str, attempt: i64, key: Option<&str>| {
            conn.execute(
                "INSERT INTO submissions (id, assignment_id, user_id, attempt, state, sha256,
                     size_bytes, duration_seconds, media_info, created_at, updated_at, upload_key)
                 VALUES (?1, 'a', ?2, ?3, 'queued', 'h', 1, 1.0, '{}', 0, 0, ?4)",
                rusqlite::params![id, user, attempt, key],
            )
        };
        conn.execute_batch(COURSE).expect("course");
        conn.execute("INSERT INTO users (id, created_at) VALUES ('v', 0)", [])
            .expect("second student");
        sub("s1", "u", 1, Some("key-0001")).expect("first");
        assert!(
            sub("s2", "u", 2, Some("key-0001")).is_err(),
            "one submission per key"
        );
        sub("s3", "v", 1, Some("key-0001")).expect("another student's key");
        sub("s4", "u", 3, None).expect("no key");
        sub("s5", "u", 4, None).expect("no key, again");
    }

    #[test]
    fn migration_7_adds_single_use_registration_invites() {
        let (_d, conn, _) = db_at(7);
        conn.execute(
            "INSERT INTO lti_invites (token_hash, created_by, created_at, expires_at)
             VALUES ('h', 'cli', 0, 10)",
            [],
        )
        .expect("invite");
        assert!(
            conn.execute(
                "INSERT INTO lti_invites (token_hash, created_by, created_at, expires_at)
                 VALUES ('h', 'cli', 0, 10)",
                [],
            )
            .is_err(),
            "one row per token"
        );
        let used = conn
            .execute(
                "UPDATE lti_invites SET used_at = 5 WHERE token_hash = 'h' AND used_at IS NULL",
                [],
            )
            .expect("use");
        assert_eq!(used, 1);
        let again = conn
            .execute(
                "UPDATE lti_invites SET used_at = 6 WHERE token_hash = 'h' AND used_at IS NULL",
                [],
            )
            .expect("use again");
        assert_eq!(again, 0, "an invitation is used once");
    }

    #[test]
    fn migration_8_binds_lti_users_to_their_registration() {
        let (_d, mut conn, path) = db_at(7);
        conn.execute_batch(
            "INSERT INTO contexts VALUES ('c', 'C', 0);
             INSERT INTO users (id, created_at) VALUES ('u1', 0), ('u2', 0), ('u3', 0);
             INSERT INTO lti_links (id, issuer, client_id, deployment_id, resource_link_id,
                 context_id, created_at, updated_at)
                 VALUES ('l1', 'https://canvas', '100', 'd', 'r1', 'c', 0, 0),
                        ('l2', 'https://canvas', '200', 'd', 'r2', 'c', 0, 0);
             INSERT INTO lti_users VALUES ('https://canvas', 'a', 'u1'),
                 ('https://canvas', 'b', 'u2'), ('https://canvas', 'never', 'u3');
             INSERT INTO lti_link_members VALUES ('l1', 'u1', 'a', 0), ('l2', 'u2', 'b', 0),
                 ('l1', 'u2', 'b', 0);",
        )
        .expect("rows");
        mig(&mut conn, &path, &MIGRATIONS[..8]).expect("migrate");
        let mut stmt = conn
            .prepare("SELECT issuer, client_id, sub, user_id FROM lti_users ORDER BY sub")
            .expect("prepare");
        let rows: Vec<(String, String, String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        let row = |i: &str, c: &str, s: &str, u: &str| {
            (i.to_owned(), c.to_owned(), s.to_owned(), u.to_owned())
        };
        assert_eq!(
            rows,
            vec![
                row("https://canvas", "100", "a", "u1"),
                // launched through both registrations: bound to one of them
                row("https://canvas", "100", "b", "u2"),
            ]
        );
        // The same sub under another registration is another row.
        conn.execute(
            "INSERT INTO lti_users VALUES ('https://canvas', '200', 'a', 'u3')",
            [],
        )
        .expect("same sub, other registration");
        conn.execute("DELETE FROM users WHERE id = 'u1'", [])
            .expect("delete");
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM lti_users WHERE user_id = 'u1'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(n, 0, "deleting a user takes its LTI identity along");
    }

    #[test]
    fn evaluator_calls_are_recovered_from_their_jobs() {
        let (_d, conn, _) = db_at(MIGRATIONS.len());
        conn.execute_batch(COURSE).expect("course");
        conn.execute_batch(
            "INSERT INTO submissions (id, assignment_id, user_id, attempt, state, sha256, size_bytes,
                 duration_seconds, media_info, created_at, updated_at)
                 VALUES ('s1', 'a', 'u', 1, 'released', 'h', 1, 20.0, '{}', 0, 0),
                        ('s2', 'a', 'u', 2, 'released', 'h', 1, 30.0, '{}', 0, 0),
                        ('s3', 'a', 'u', 3, 'released', 'h', 1, 60.0, '{}', 0, 0);
             -- role a: one call of s1+s2 (started 1000), then s3 alone (started 9000);
             -- newest first by finish time; the failed job is no call
             INSERT INTO jobs (submission_id, stage, role, state, service_ms, created_at, started_at, finished_at)
                 VALUES ('s1', 'eval', 'a', 'done', 5000, 0, 1000, 6000),
                        ('s2', 'eval', 'a', 'done', 5000, 0, 1000, 6000),
                        ('s3', 'eval', 'a', 'done', 4000, 0, 9000, 13000),
                        ('s1', 'eval', 'b', 'done', 2000, 0, 1000, 3000),
                        ('s2', 'eval', 'b', 'failed', NULL, 0, 1000, NULL);",
        )
        .expect("rows");
        let calls = crate::jobs::recent_eval_calls(&crate::db::Connection::sqlite(&conn), 10)
            .expect("calls");
        assert_eq!(
            calls,
            vec![
                ("a".to_string(), 1, 60.0, 4.0),
                ("a".to_string(), 2, 50.0, 5.0),
                ("b".to_string(), 1, 20.0, 2.0),
            ]
        );
    }

    #[test]
    fn migration_9_adds_an_optional_attempt_limit_to_assignments() {
        let (_d, conn, _) = db_at(9);
        conn.execute_batch(COURSE).expect("course");
        let max: Option<i64> = conn
            .query_row(
                "SELECT max_attempts FROM assignments WHERE id = 'a'",
                [],
                |r| r.get(0),
            )
            .expect("read");
        assert_eq!(max, None, "existing assignments stay unlimited");
        conn.execute("UPDATE assignments SET max_attempts = 3 WHERE id = 'a'", [])
            .expect("a limit");
        assert!(
            conn.execute("UPDATE assignments SET max_attempts = 0 WHERE id = 'a'", [])
                .is_err(),
            "zero attempts is no assignment"
        );
    }

    #[test]
    fn the_versions_migration_makes_existing_assignments_version_1() {
        // Found by its content, not its number (migrations get renumbered
        // when branches merge).
        let n = MIGRATIONS
            .iter()
            .position(|m| m.contains("CREATE TABLE assignment_versions"))
            .expect("the versions migration");
        let (_d, mut conn, path) = db_at(n);
        conn.execute_batch(COURSE).expect("course");
        conn.execute_batch(
            "INSERT INTO submissions (id, assignment_id, user_id, attempt, state, sha256,
                 size_bytes, duration_seconds, media_info, created_at, updated_at)
             VALUES ('s', 'a', 'u', 1, 'released', 'h', 1, 1.0, '{}', 0, 0);",
        )
        .expect("submission");
        mig(&mut conn, &path, MIGRATIONS).expect("migrate");
        let (version, sha): (i64, String) = conn
            .query_row(
                "SELECT version, plugin_sha256 FROM assignments WHERE id = 'a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("assignment");
        assert_eq!(
            (version, sha.as_str()),
            (1, ""),
            "pinned by name until edited"
        );
        let (v, plugin, change): (i64, String, String) = conn
            .query_row(
                "SELECT version, plugin, change FROM assignment_versions WHERE assignment_id = 'a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("version 1");
        assert_eq!((v, plugin.as_str(), change.as_str()), (1, "x", "created"));
        let sv: i64 = conn
            .query_row(
                "SELECT assignment_version FROM submissions WHERE id = 's'",
                [],
                |r| r.get(0),
            )
            .expect("submission version");
        assert_eq!(sv, 1);
        assert!(
            conn.execute(
                "INSERT INTO assignment_versions (assignment_id, version, prompt, rubric, plugin,
                     change, created_by, created_at) VALUES ('a', 2, 'p', '{}', 'x', 'bogus', 't', 0)",
                [],
            )
            .is_err(),
            "a change is created, scoring or evaluation"
        );
    }

    #[test]
    fn the_calibration_migration_adds_instructor_grades_exemplars_and_gates() {
        // Found by its content, not its number.
        let n = MIGRATIONS
            .iter()
            .position(|m| m.contains("CREATE TABLE instructor_grades"))
            .expect("the calibration migration");
        let (_d, conn, _) = db_at(n + 1);
        conn.execute_batch(COURSE).expect("course");
        conn.execute_batch(
            "INSERT INTO submissions (id, assignment_id, user_id, attempt, state, sha256, size_bytes,
                 duration_seconds, media_info, created_at, updated_at)
                 VALUES ('s1', 'a', 'u', 1, 'awaiting_review', 'h', 1, 20.0, '{}', 0, 0);
             INSERT INTO instructor_grades VALUES ('s1', 'content', 'complete', 4, 'blind', 't', 0);
             INSERT INTO exemplars VALUES ('s1', 'a', 't', 0);
             INSERT INTO calibration_gates VALUES ('a', 0.7, 10, 't', 0);",
        )
        .expect("rows");
        assert!(
            conn.execute(
                "INSERT INTO instructor_grades VALUES ('s1', 'language', NULL, 2, 'guess', 't', 0)",
                []
            )
            .is_err(),
            "a source is blind or override"
        );
        assert!(
            conn.execute("UPDATE calibration_gates SET min_sample = 0", [])
                .is_err()
        );
        conn.execute("DELETE FROM submissions WHERE id = 's1'", [])
            .expect("delete");
        let n: i64 = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM instructor_grades) + (SELECT COUNT(*) FROM exemplars)",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(
            n, 0,
            "a deleted submission takes its calibration rows along"
        );
    }

    #[test]
    fn the_language_migration_leaves_existing_assignments_detecting() {
        // The last migration is this one until another is appended: test it
        // on a database just before and just after.
        let v = MIGRATIONS
            .iter()
            .position(|m| m.contains("ADD COLUMN vocabulary"))
            .expect("the language migration");
        let (_d, mut conn, path) = db_at(v);
        conn.execute_batch(COURSE).expect("course");
        mig(&mut conn, &path, &MIGRATIONS[..v + 1]).expect("migrate");
        let (lang, vocab): (Option<String>, Option<String>) = conn
            .query_row(
                "SELECT language, vocabulary FROM assignments WHERE id = 'a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("read");
        assert_eq!((lang, vocab), (None, None));
        conn.execute(
            "UPDATE assignments SET language = 'fr', vocabulary = 'chlorophylle' WHERE id = 'a'",
            [],
        )
        .expect("set");
    }

    #[test]
    fn migrating_twice_is_a_no_op_and_versions_are_recorded() {
        let (_d, mut conn, path) = db_at(MIGRATIONS.len());
        assert_eq!(migrate(&mut conn, &path).expect("again"), schema_version());
        let n: u32 = conn
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, schema_version());
    }

    #[test]
    fn a_newer_database_is_refused_with_a_clear_message() {
        let (_d, mut conn, path) = db_at(MIGRATIONS.len());
        conn.execute(
            "INSERT INTO schema_version VALUES (?1, 0)",
            [schema_version() + 1],
        )
        .expect("bump");
        let e = migrate(&mut conn, &path).expect_err("refused");
        let msg = e.to_string();
        assert!(msg.contains("newer than this viva"), "{msg}");
    }

    #[tokio::test]
    async fn writes_are_transactions_and_reads_see_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("viva.db")).expect("open");
        let mode: String = store
            .read(|c| Ok(c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?))
            .await
            .expect("mode");
        assert_eq!(mode, "wal");
        // A failing closure rolls back everything it did.
        let failed = store
            .write(|tx| {
                tx.execute("INSERT INTO contexts VALUES ('c', 'C', 0)", [])?;
                Err::<(), _>(Error::Internal("boom".into()))
            })
            .await;
        assert!(failed.is_err());
        let n: i64 = store
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM contexts", [], |r| r.get(0))?))
            .await
            .expect("count");
        assert_eq!(n, 0);
        store
            .write(|tx| Ok(tx.execute("INSERT INTO contexts VALUES ('c', 'C', 0)", [])?))
            .await
            .expect("insert");
        let n: i64 = store
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM contexts", [], |r| r.get(0))?))
            .await
            .expect("count");
        assert_eq!(n, 1);
    }
}
