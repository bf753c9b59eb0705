//! One SQL interface over both stores: the embedded SQLite (the default) and
//! PostgreSQL (several nodes on one database).
//!
//! Its shape is rusqlite's (`execute`, `query_row`, `prepare` +
//! `query_map`, `optional`, `params!`, `Row::get`), so the SQL modules read
//! as they did when they spoke rusqlite directly, and one statement serves
//! both engines:
//!
//! - placeholders are written `?1`, `?2` (or `?`); on PostgreSQL they become
//!   `$1`, `$2` when the statement is prepared ([`to_postgres`]);
//! - values cross as [`Value`] (null, 64-bit integer, double, text, bytes).
//!   A parameter is encoded as the type PostgreSQL inferred for its slot (an
//!   integer bound where PostgreSQL expects `int4` is sent as `int4`), and a
//!   column is decoded from whatever type PostgreSQL returns (`numeric` from
//!   `SUM`, `bool` from a comparison) into the same [`Value`]s SQLite yields;
//! - the SQL itself is the common subset: `COALESCE`, `IS DISTINCT FROM`,
//!   `ON CONFLICT … DO`, `RETURNING`, `CASE` instead of summing booleans.
//!
//! The schemas differ only in types and are kept side by side in `store`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// Errors of either engine, and of converting a value.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A query that must return a row returned none ([`OptionalExtension`]).
    #[error("the query returned no rows")]
    NoRows,
    #[error(transparent)]
    Sqlite(rusqlite::Error),
    #[error("{}", postgres_message(.0))]
    Postgres(#[from] postgres::Error),
    #[error("column {column}: {message}")]
    Conversion { column: String, message: String },
    #[error("{0}")]
    Other(String),
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::QueryReturnedNoRows => DbError::NoRows,
            e => DbError::Sqlite(e),
        }
    }
}

impl DbError {
    /// True for a unique or primary key violation (both engines).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            }
            DbError::Postgres(e) => e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }
}

/// PostgreSQL's own message with its detail (the driver's `Display` says
/// only "db error").
fn postgres_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => e.to_string(),
    }
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// A value as both engines store it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Int(_) => "integer",
            Value::Real(_) => "real",
            Value::Text(_) => "text",
            Value::Blob(_) => "blob",
        }
    }
}

// ---- parameters ---------------------------------------------------------------

/// A Rust value bound as a statement parameter.
pub trait ToSql {
    fn to_value(&self) -> Value;
}

macro_rules! int_to_sql {
    ($($t:ty),*) => {$(
        impl ToSql for $t {
            fn to_value(&self) -> Value {
                Value::Int(*self as i64)
            }
        }
    )*};
}
int_to_sql!(i8, i16, i32, i64, isize, u8, u16, u32, u64, usize);

impl ToSql for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}
impl ToSql for f32 {
    fn to_value(&self) -> Value {
        Value::Real(f64::from(*self))
    }
}
impl ToSql for bool {
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl ToSql for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}
impl ToSql for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl ToSql for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl ToSql for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl ToSql for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}
impl<T: ToSql> ToSql for Option<T> {
    fn to_value(&self) -> Value {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null,
        }
    }
}
impl<T: ToSql + ?Sized> ToSql for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: ToSql + ?Sized> ToSql for Box<T> {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: ToSql + ?Sized> ToSql for Arc<T> {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl ToSql for std::borrow::Cow<'_, str> {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}

/// A statement's parameters: `[]`, an array, a tuple, or [`params!`].
pub trait Params {
    fn values(self) -> Vec<Value>;
}

impl Params for &[&dyn ToSql] {
    fn values(self) -> Vec<Value> {
        self.iter().map(|v| v.to_value()).collect()
    }
}

impl Params for [&dyn ToSql; 0] {
    fn values(self) -> Vec<Value> {
        Vec::new()
    }
}

impl Params for Vec<Value> {
    fn values(self) -> Vec<Value> {
        self
    }
}

macro_rules! array_params {
    ($($n:literal),*) => {$(
        impl<T: ToSql> Params for [T; $n] {
            fn values(self) -> Vec<Value> {
                self.iter().map(ToSql::to_value).collect()
            }
        }
        impl<T: ToSql> Params for &[T; $n] {
            fn values(self) -> Vec<Value> {
                self.iter().map(ToSql::to_value).collect()
            }
        }
    )*};
}
array_params!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16);

impl Params for () {
    fn values(self) -> Vec<Value> {
        Vec::new()
    }
}

macro_rules! tuple_params {
    ($(($($t:ident $i:tt),+))*) => {$(
        impl<$($t: ToSql),+> Params for ($($t,)+) {
            fn values(self) -> Vec<Value> {
                vec![$(self.$i.to_value()),+]
            }
        }
    )*};
}
tuple_params! {
    (A 0)
    (A 0, B 1)
    (A 0, B 1, C 2)
    (A 0, B 1, C 2, D 3)
    (A 0, B 1, C 2, D 3, E 4)
    (A 0, B 1, C 2, D 3, E 4, F 5)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15)
}

/// `params![a, b, c]`: parameters of mixed types.
#[macro_export]
macro_rules! params {
    () => { &[] as &[&dyn $crate::db::ToSql] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::db::ToSql),+] as &[&dyn $crate::db::ToSql] };
}
pub use crate::params;

// ---- rows -----------------------------------------------------------------------

/// A Rust value read from a column.
pub trait FromSql: Sized {
    fn from_value(v: &Value) -> std::result::Result<Self, String>;
}

fn mismatch<T>(v: &Value, want: &str) -> std::result::Result<T, String> {
    Err(format!("expected {want}, found {}", v.kind()))
}

macro_rules! int_from_sql {
    ($($t:ty),*) => {$(
        impl FromSql for $t {
            fn from_value(v: &Value) -> std::result::Result<Self, String> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i)
                        .map_err(|_| format!("{i} is out of range for {}", stringify!($t))),
                    // PostgreSQL's `numeric` (SUM of integers) arrives as a
                    // double; a whole one is an integer.
                    Value::Real(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => <$t>::try_from(*f as i64)
                        .map_err(|_| format!("{f} is out of range for {}", stringify!($t))),
                    v => mismatch(v, "an integer"),
                }
            }
        }
    )*};
}
int_from_sql!(i8, i16, i32, i64, isize, u8, u16, u32, u64, usize);

impl FromSql for f64 {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Real(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            v => mismatch(v, "a number"),
        }
    }
}
impl FromSql for f32 {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        f64::from_value(v).map(|f| f as f32)
    }
}
impl FromSql for bool {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Int(i) => Ok(*i != 0),
            v => mismatch(v, "a boolean"),
        }
    }
}
impl FromSql for String {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            Value::Blob(b) => String::from_utf8(b.clone()).map_err(|e| e.to_string()),
            v => mismatch(v, "text"),
        }
    }
}
impl FromSql for Vec<u8> {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            Value::Text(s) => Ok(s.as_bytes().to_vec()),
            v => mismatch(v, "bytes"),
        }
    }
}
impl FromSql for Value {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        Ok(v.clone())
    }
}
impl<T: FromSql> FromSql for Option<T> {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// A column by position or by name.
pub trait RowIndex {
    fn index(&self, names: &[String]) -> Result<usize>;
}
impl RowIndex for usize {
    fn index(&self, names: &[String]) -> Result<usize> {
        if *self < names.len() {
            Ok(*self)
        } else {
            Err(DbError::Other(format!(
                "column {self} is out of range ({} columns)",
                names.len()
            )))
        }
    }
}
impl RowIndex for &str {
    fn index(&self, names: &[String]) -> Result<usize> {
        names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(self))
            .ok_or_else(|| DbError::Other(format!("no column named {self}")))
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row {
    names: Arc<[String]>,
    values: Vec<Value>,
}

impl Row {
    /// The columns' names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The row's values, in column order.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    pub fn get<I: RowIndex, T: FromSql>(&self, idx: I) -> Result<T> {
        let i = idx.index(&self.names)?;
        T::from_value(&self.values[i]).map_err(|message| DbError::Conversion {
            column: self.names[i].clone(),
            message,
        })
    }
}

/// `.optional()` on a query that may find no row.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(DbError::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

// ---- connections ------------------------------------------------------------------

/// Which engine a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A PostgreSQL connection with its prepared statements.
pub struct PgConn {
    pub(crate) client: postgres::Client,
    statements: HashMap<String, postgres::Statement>,
}

impl PgConn {
    pub fn new(client: postgres::Client) -> PgConn {
        PgConn {
            client,
            statements: HashMap::new(),
        }
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        // A statement PostgreSQL refuses is a bug: say which.
        let stmt = self.client.prepare(&to_postgres(sql)).map_err(|e| {
            DbError::Other(format!(
                "{} in: {}",
                postgres_message(&e),
                sql.split_whitespace().collect::<Vec<_>>().join(" ")
            ))
        })?;
        if self.statements.len() > 512 {
            self.statements.clear();
        }
        self.statements.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }

    pub fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.client.batch_execute(sql)?)
    }
}

enum Backend<'a> {
    Sqlite(&'a rusqlite::Connection),
    Postgres(&'a RefCell<PgConn>),
}

/// A connection (or an open transaction: [`Transaction`] is the same type)
/// lent to a store closure.
pub struct Connection<'a> {
    backend: Backend<'a>,
}

/// Inside `Store::write`, the connection is in a transaction.
pub type Transaction<'a> = Connection<'a>;

impl<'a> Connection<'a> {
    pub fn sqlite(conn: &'a rusqlite::Connection) -> Connection<'a> {
        Connection {
            backend: Backend::Sqlite(conn),
        }
    }

    pub fn postgres(conn: &'a RefCell<PgConn>) -> Connection<'a> {
        Connection {
            backend: Backend::Postgres(conn),
        }
    }

    pub fn engine(&self) -> Engine {
        match self.backend {
            Backend::Sqlite(_) => Engine::Sqlite,
            Backend::Postgres(_) => Engine::Postgres,
        }
    }

    /// Runs a statement; the number of rows it changed.
    pub fn execute<P: Params>(&self, sql: &str, params: P) -> Result<usize> {
        let values = params.values();
        match &self.backend {
            Backend::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(values.iter().map(to_rusqlite)))?)
            }
            Backend::Postgres(c) => {
                let mut pg = borrow(c)?;
                let stmt = pg.statement(sql)?;
                let refs = pg_params(&values);
                Ok(pg.client.execute(&stmt, &refs)? as usize)
            }
        }
    }

    /// Runs several statements with no parameters (schemas, tests).
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Backend::Postgres(c) => borrow(c)?.batch(sql),
        }
    }

    /// Every row of a query.
    pub fn query<P: Params>(&self, sql: &str, params: P) -> Result<Vec<Row>> {
        let values = params.values();
        match &self.backend {
            Backend::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let names: Arc<[String]> =
                    stmt.column_names().iter().map(|n| n.to_string()).collect();
                let n = names.len();
                let mut rows =
                    stmt.query(rusqlite::params_from_iter(values.iter().map(to_rusqlite)))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut vals = Vec::with_capacity(n);
                    for i in 0..n {
                        vals.push(from_rusqlite(r.get_ref(i)?));
                    }
                    out.push(Row {
                        names: names.clone(),
                        values: vals,
                    });
                }
                Ok(out)
            }
            Backend::Postgres(c) => {
                let mut pg = borrow(c)?;
                let stmt = pg.statement(sql)?;
                let names: Arc<[String]> =
                    stmt.columns().iter().map(|c| c.name().to_owned()).collect();
                let refs = pg_params(&values);
                let rows = pg.client.query(&stmt, &refs)?;
                rows.iter()
                    .map(|r| {
                        let values = (0..names.len())
                            .map(|i| r.try_get::<_, PgValue>(i).map(|v| v.0))
                            .collect::<std::result::Result<Vec<_>, _>>()?;
                        Ok(Row {
                            names: names.clone(),
                            values,
                        })
                    })
                    .collect()
            }
        }
    }

    /// The first row of a query, mapped; [`DbError::NoRows`] when there is none.
    pub fn query_row<T, P: Params, F: FnOnce(&Row) -> Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> Result<T> {
        let rows = self.query(sql, params)?;
        match rows.first() {
            Some(r) => f(r),
            None => Err(DbError::NoRows),
        }
    }

    /// A statement to run with [`Statement::query_map`] and friends.
    pub fn prepare(&self, sql: &str) -> Result<Statement<'_, 'a>> {
        Ok(Statement {
            conn: self,
            sql: sql.to_owned(),
        })
    }
}

fn borrow(c: &RefCell<PgConn>) -> Result<std::cell::RefMut<'_, PgConn>> {
    c.try_borrow_mut()
        .map_err(|_| DbError::Other("a PostgreSQL connection was used re-entrantly".into()))
}

/// A statement bound to a connection (rusqlite's `prepare` shape).
pub struct Statement<'c, 'a> {
    conn: &'c Connection<'a>,
    sql: String,
}

impl Statement<'_, '_> {
    pub fn query_map<T, P: Params, F: FnMut(&Row) -> Result<T>>(
        &mut self,
        params: P,
        mut f: F,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        let rows = self.conn.query(&self.sql, params)?;
        Ok(rows.iter().map(&mut f).collect::<Vec<_>>().into_iter())
    }

    pub fn query_row<T, P: Params, F: FnOnce(&Row) -> Result<T>>(
        &mut self,
        params: P,
        f: F,
    ) -> Result<T> {
        self.conn.query_row(&self.sql, params, f)
    }

    pub fn execute<P: Params>(&mut self, params: P) -> Result<usize> {
        self.conn.execute(&self.sql, params)
    }

    pub fn exists<P: Params>(&mut self, params: P) -> Result<bool> {
        Ok(!self.conn.query(&self.sql, params)?.is_empty())
    }
}

// ---- SQLite values ----------------------------------------------------------------------

fn to_rusqlite(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match v {
        Value::Null => V::Null,
        Value::Int(i) => V::Integer(*i),
        Value::Real(f) => V::Real(*f),
        Value::Text(s) => V::Text(s.clone()),
        Value::Blob(b) => V::Blob(b.clone()),
    }
}

fn from_rusqlite(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef as V;
    match v {
        V::Null => Value::Null,
        V::Integer(i) => Value::Int(i),
        V::Real(f) => Value::Real(f),
        V::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        V::Blob(b) => Value::Blob(b.to_vec()),
    }
}

// ---- PostgreSQL values -----------------------------------------------------------------

use postgres::types::{FromSql as PgFromSql, IsNull, ToSql as PgToSql, Type};

type BoxError = Box<dyn std::error::Error + Sync + Send>;

fn pg_params(values: &[Value]) -> Vec<&(dyn PgToSql + Sync)> {
    values.iter().map(|v| v as &(dyn PgToSql + Sync)).collect()
}

/// A parameter is encoded as the type PostgreSQL inferred for its slot.
impl PgToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, BoxError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::FLOAT4 => (*i as f32).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    i.to_string().as_str().to_sql(&Type::TEXT, out)
                }
                ref t => Err(format!("an integer cannot be sent as {t}").into()),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                Type::INT8 if f.fract() == 0.0 => (*f as i64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR | Type::UNKNOWN => {
                    f.to_string().as_str().to_sql(&Type::TEXT, out)
                }
                ref t => Err(format!("a real number cannot be sent as {t}").into()),
            },
            Value::Text(s) => match *ty {
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    s.as_str().to_sql(&Type::TEXT, out)
                }
                Type::BYTEA => s.as_bytes().to_sql(ty, out),
                ref t => Err(format!("text cannot be sent as {t}").into()),
            },
            Value::Blob(b) => match *ty {
                Type::BYTEA => b.as_slice().to_sql(ty, out),
                ref t => Err(format!("bytes cannot be sent as {t}").into()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// Any column, decoded into the values SQLite yields.
struct PgValue(Value);

impl<'r> PgFromSql<'r> for PgValue {
    fn from_sql(ty: &Type, raw: &'r [u8]) -> std::result::Result<Self, BoxError> {
        let v = match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i64::from(i32::from_sql(ty, raw)?)),
            Type::INT2 => Value::Int(i64::from(i16::from_sql(ty, raw)?)),
            Type::OID => Value::Int(i64::from(u32::from_sql(ty, raw)?)),
            Type::BOOL => Value::Int(i64::from(bool::from_sql(ty, raw)?)),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f64::from(f32::from_sql(ty, raw)?)),
            Type::NUMERIC => numeric(raw)?,
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                Value::Text(<&str>::from_sql(ty, raw)?.to_owned())
            }
            Type::JSON => Value::Text(<&str>::from_sql(&Type::TEXT, raw)?.to_owned()),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            ref t => return Err(format!("unsupported column type {t}").into()),
        };
        Ok(PgValue(v))
    }

    fn from_sql_null(_: &Type) -> std::result::Result<Self, BoxError> {
        Ok(PgValue(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// PostgreSQL's binary `numeric`: an integer when it has no fraction digits
/// and fits, else a double.
fn numeric(raw: &[u8]) -> std::result::Result<Value, BoxError> {
    let word = |i: usize| -> std::result::Result<i16, BoxError> {
        raw.get(i..i + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "a truncated numeric".into())
    };
    let ndigits = word(0)?.max(0) as usize;
    let weight = i32::from(word(2)?);
    let sign = word(4)? as u16;
    let dscale = word(6)?;
    if sign == 0xC000 {
        return Ok(Value::Real(f64::NAN));
    }
    let mut int: i128 = 0;
    let mut exact = dscale == 0 && weight < 9;
    let mut f = 0.0f64;
    for i in 0..ndigits {
        let d = i32::from(word(8 + 2 * i)?);
        let power = weight - i as i32;
        f += f64::from(d) * 10_000f64.powi(power);
        if power < 0 {
            exact = false;
        } else if exact {
            int += i128::from(d) * 10_000i128.pow(power as u32);
        }
    }
    let negative = sign == 0x4000;
    if exact && let Ok(i) = i64::try_from(if negative { -int } else { int }) {
        return Ok(Value::Int(i));
    }
    Ok(Value::Real(if negative { -f } else { f }))
}

/// SQLite's placeholders (`?1`, `?`) as PostgreSQL's (`$1`), outside string
/// literals, quoted names and comments.
pub fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut next_anon = 1;
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                out.push('$');
                if digits.is_empty() {
                    out.push_str(&next_anon.to_string());
                    next_anon += 1;
                } else {
                    out.push_str(&digits);
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_literals() {
        assert_eq!(
            to_postgres("SELECT '?1', \"a?\" FROM t WHERE a = ?1 AND b = ?12 -- ?3\n AND c = ?"),
            "SELECT '?1', \"a?\" FROM t WHERE a = $1 AND b = $12 -- ?3\n AND c = $1"
        );
        assert_eq!(to_postgres("VALUES (?, ?)"), "VALUES ($1, $2)");
    }

    #[test]
    fn numerics_decode_to_integers_or_doubles() {
        // 12345678 = [1234, 5678] weight 1; -1.5 = [1, 5000] weight 0 dscale 1.
        let enc = |digits: &[i16], weight: i16, sign: u16, dscale: i16| {
            let mut b = Vec::new();
            for w in [digits.len() as i16, weight, sign as i16, dscale] {
                b.extend_from_slice(&w.to_be_bytes());
            }
            for d in digits {
                b.extend_from_slice(&d.to_be_bytes());
            }
            b
        };
        assert_eq!(
            numeric(&enc(&[1234, 5678], 1, 0, 0)).expect("n"),
            Value::Int(12_345_678)
        );
        assert_eq!(
            numeric(&enc(&[1, 5000], 0, 0x4000, 1)).expect("n"),
            Value::Real(-1.5)
        );
        assert_eq!(numeric(&enc(&[], 0, 0, 0)).expect("n"), Value::Int(0));
        assert_eq!(
            numeric(&enc(&[2], 2, 0, 0)).expect("n"),
            Value::Int(200_000_000)
        );
    }

    #[test]
    fn sqlite_round_trips_values_and_names() {
        let c = rusqlite::Connection::open_in_memory().expect("open");
        let conn = Connection::sqlite(&c);
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, x REAL, b BLOB)")
            .expect("schema");
        conn.execute(
            "INSERT INTO t (name, x, b) VALUES (?1, ?2, ?3)",
            params![String::from("a"), 1.5, vec![1u8, 2]],
        )
        .expect("insert");
        conn.execute("INSERT INTO t (name) VALUES (?1)", [None::<String>])
            .expect("insert null");
        let (name, x): (String, f64) = conn
            .query_row("SELECT name, x FROM t WHERE id = ?1", [1], |r| {
                Ok((r.get("name")?, r.get(1)?))
            })
            .expect("row");
        assert_eq!((name.as_str(), x), ("a", 1.5));
        let names: Vec<Option<String>> = conn
            .prepare("SELECT name FROM t ORDER BY id")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_>>()
            .expect("rows");
        assert_eq!(names, vec![Some("a".into()), None]);
        let none = conn
            .query_row("SELECT id FROM t WHERE id = 99", [], |r| r.get::<_, i64>(0))
            .optional()
            .expect("optional");
        assert_eq!(none, None);
        let err = conn
            .query_row("SELECT name FROM t WHERE id = 1", [], |r| {
                r.get::<_, i64>(0)
            })
            .expect_err("text is not an integer");
        assert!(err.to_string().contains("name"), "{err}");
    }
}
