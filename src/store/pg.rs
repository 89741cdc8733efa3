//! The PostgreSQL dedupe store (feature `postgres`).
//!
//! A pool of connections (deadpool-postgres): a connection that broke (the server restarted,
//! its backend was terminated) is noticed and replaced, so the store recovers by itself. Every
//! statement runs under a server-side `statement_timeout`, and every operation under a
//! client-side deadline, so a claim never hangs.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio::time::Instant;
use tokio_postgres::error::Severity;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, NoTls, ToStatement};

use super::{Claim, Claimed, DedupeStore, StoreError, StoreFuture};

/// A connection from [`PgStore`]'s pool ([`PgStore::client`]): dereferences to a
/// `tokio_postgres::Client`; dropping it returns it to the pool.
pub type PooledClient = Object;

/// The table [`PgStore::connect`] and [`PgStore::builder`] use unless told otherwise.
pub const DEFAULT_TABLE: &str = "surelink_claims";

/// The schema of the default table ([`DEFAULT_TABLE`]), for operators who create it
/// themselves; [`PgStoreBuilder::schema`] gives it for another table. Idempotent: it also
/// adds the `claimant` column to a table created by an older version.
pub const PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS surelink_claims (
    channel_id bytea       NOT NULL,
    message_id bigint      NOT NULL,
    idem_key   bytea,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    claimant   bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (channel_id, message_id)
);
ALTER TABLE surelink_claims ADD COLUMN IF NOT EXISTS claimant bigint NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX IF NOT EXISTS surelink_claims_idem_key
    ON surelink_claims (idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS surelink_claims_claimed_at ON surelink_claims (claimed_at);
";

/// Rows [`DedupeStore::expire`] deletes per statement (each statement under the statement
/// timeout, however many claims expired).
const EXPIRE_BATCH: i64 = 10_000;

/// Claims in a PostgreSQL table shared by replicas.
///
/// One row per claim, unique by (channel id, message id) and, where a key was given, by
/// idempotency key; a claim is one `INSERT … ON CONFLICT DO NOTHING`, so two replicas racing
/// for the same message (or key) get exactly one `Claimed::Now` between them, whichever
/// commits first. A claim that conflicts is checked once more against its own claimant (see
/// [`Claim::claimant`]): the row its own lost attempt wrote answers `Now`. Expiry deletes rows
/// older than the TTL ([`DedupeStore::expire`]; a server calls it periodically). Time is the
/// database's clock (`now()`), one clock for every replica. The schema: [`PG_SCHEMA`].
///
/// **Connections** come from a pool ([`PgStoreBuilder::pool_size`]); a broken connection is
/// dropped and a new one made on the next use, so the store outlives a restart of the
/// server. Each statement runs under `statement_timeout` (the server cancels it: a
/// definite failure) and each operation under a client-side deadline
/// ([`StoreError::Timeout`]: its outcome unknown), so nothing waits forever.
///
/// Every replica of a service connects to the same database and puts the store in its
/// [`Config::store`](crate::channel::Config::store):
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use surelink::channel::{Config, Listener};
/// use surelink::store::PgStore;
///
/// let store = PgStore::builder("postgres://surelink@db.internal/payments")
///     .table("payments.surelink_claims")
///     .ttl(Duration::from_secs(24 * 3600))
///     .statement_timeout(Duration::from_secs(2))
///     .pool_size(8)
///     .create_schema(true)
///     .connect()
///     .await?;
/// let mut config = Config::default();
/// config.store = Some(Arc::new(store));
/// # let endpoint: surelink::quinn::Endpoint = unimplemented!();
/// // The listener claims every delivery in the store before it acks it, and sweeps
/// // expired claims.
/// let listener = Listener::new(endpoint, config);
/// # let _ = listener;
/// # Ok(())
/// # }
/// ```
///
/// **Inside the application's transaction** (the inbox pattern): [`PgStore::claim_in`] runs
/// the same claim on the application's own `Transaction`, so the claim and the application's
/// effect (its ledger row) commit together or not at all.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    ttl: Duration,
    op_timeout: Duration,
    table: Arc<str>,
    sql: Arc<Sql>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PgStore")
            .field("table", &self.table)
            .field("ttl", &self.ttl)
            .field("operation_timeout", &self.op_timeout)
            .field("pool_size", &status.max_size)
            .field("connections", &status.size)
            .finish()
    }
}

/// Configures and connects a [`PgStore`]: [`PgStore::builder`].
#[derive(Clone)]
pub struct PgStoreBuilder {
    url: String,
    table: String,
    ttl: Duration,
    statement_timeout: Duration,
    operation_timeout: Option<Duration>,
    pool_size: usize,
    create_schema: bool,
}

impl std::fmt::Debug for PgStoreBuilder {
    /// Leaves the URL out (it may hold a password).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStoreBuilder")
            .field("table", &self.table)
            .field("ttl", &self.ttl)
            .field("statement_timeout", &self.statement_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("pool_size", &self.pool_size)
            .field("create_schema", &self.create_schema)
            .finish()
    }
}

impl PgStoreBuilder {
    /// The table (default [`DEFAULT_TABLE`]): lowercase letters, digits and `_`, not
    /// starting with a digit, optionally qualified by a schema (`schema.table`); at most 52
    /// characters for the table (its index names add a suffix) and 63 for the schema.
    /// Checked by [`PgStoreBuilder::connect`] ([`StoreError::Config`]).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// How long a claim is kept at least (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// PostgreSQL's `statement_timeout` on the store's connections (default 2 s; zero turns
    /// it off): a statement running longer (waiting for a lock, say) is cancelled by the
    /// server and the operation fails definitely.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// The client-side deadline of one operation: getting a connection and running its
    /// statements (default: the statement timeout plus 1 s, or 3 s when it is off). Past
    /// it, [`StoreError::Timeout`] when a statement was sent (outcome unknown), or
    /// [`StoreError::Unavailable`] when no connection could be had.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = Some(timeout);
        self
    }

    /// At most this many connections (default 8; at least 1).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Whether [`PgStoreBuilder::connect`] creates the table and its indexes if missing, and
    /// adds the `claimant` column to a table of an older version (default `false`: the table
    /// must exist, created by the operator from [`PgStoreBuilder::schema`]).
    pub fn create_schema(mut self, create: bool) -> Self {
        self.create_schema = create;
        self
    }

    /// The schema (SQL) of the configured table: the table, its `claimant` column for a
    /// table of an older version, and its indexes. Idempotent.
    pub fn schema(&self) -> Result<String, StoreError> {
        Ok(TableName::parse(&self.table)?.schema())
    }

    /// Connects: checks the configuration, opens a first connection, creates the schema if
    /// asked, and checks that the table has the columns the store uses.
    pub async fn connect(self) -> Result<PgStore, StoreError> {
        let name = TableName::parse(&self.table)?;
        let mut pg: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| StoreError::Config(format!("bad connection URL: {e}")))?;
        let ms = self.statement_timeout.as_millis().min(i32::MAX as u128);
        let options = match pg.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} -c statement_timeout={ms}"),
            _ => format!("-c statement_timeout={ms}"),
        };
        pg.options(options);
        let op_timeout = self.operation_timeout.unwrap_or(if ms == 0 {
            Duration::from_secs(3)
        } else {
            self.statement_timeout + Duration::from_secs(1)
        });
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(op_timeout);
        }
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let store = PgStore {
            pool,
            ttl: self.ttl,
            op_timeout,
            table: name.full.clone().into(),
            sql: Arc::new(Sql::new(&name.full)),
        };
        let deadline = Instant::now() + op_timeout;
        let mut conn = store.connection(deadline).await?;
        let setup = async {
            if self.create_schema {
                create_schema(&mut conn, &name).await?;
            }
            // The table and every column the store uses exist.
            for sql in store.sql.all() {
                conn.prepare_cached(sql).await?;
            }
            Ok::<_, StoreError>(())
        };
        // Schema creation may wait for a lock a little longer than one operation.
        match tokio::time::timeout(op_timeout * 2, setup).await {
            Ok(r) => r?,
            Err(_) => {
                drop(Object::take(conn));
                return Err(StoreError::Timeout {
                    after: op_timeout * 2,
                });
            }
        }
        Ok(store)
    }
}

/// Creates the table, or migrates an older one, under an advisory lock (replicas starting
/// together do not race), touching an existing table only for what it lacks.
async fn create_schema(conn: &mut Object, name: &TableName) -> Result<(), StoreError> {
    let tx = conn.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("surelink schema {}", name.full)],
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL,
                    EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1)
                            AND attname = 'claimant' AND NOT attisdropped),
                    to_regclass($2) IS NOT NULL,
                    to_regclass($3) IS NOT NULL",
            &[
                &name.full,
                &name.index("idem_key"),
                &name.index("claimed_at"),
            ],
        )
        .await?;
    let (table, claimant, key_index, time_index): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !table {
        tx.batch_execute(&name.schema()).await?;
    } else {
        if !claimant {
            tracing::info!(table = %name.full, "surelink: adding the claimant column");
            tx.batch_execute(&name.add_claimant()).await?;
        }
        if !key_index {
            tx.batch_execute(&name.key_index()).await?;
        }
        if !time_index {
            tx.batch_execute(&name.time_index()).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// A validated table name, optionally schema-qualified.
struct TableName {
    /// As written in SQL: `table` or `schema.table`.
    full: String,
    /// `schema.` or empty.
    schema: String,
    /// The table's own name (index names derive from it).
    table: String,
}

impl TableName {
    fn parse(name: &str) -> Result<TableName, StoreError> {
        let bad = |why: &str| {
            StoreError::Config(format!(
                "table name {name:?}: {why} (lowercase letters, digits and _, optionally schema.table)"
            ))
        };
        let ident = |part: &str, max: usize| -> Result<(), StoreError> {
            let mut chars = part.chars();
            match chars.next() {
                None => return Err(bad("an empty name")),
                Some(c) if !(c.is_ascii_lowercase() || c == '_') => {
                    return Err(bad("must start with a lowercase letter or _"))
                }
                Some(_) => {}
            }
            if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                return Err(bad("invalid character"));
            }
            if part.len() > max {
                return Err(bad(&format!("longer than {max} characters")));
            }
            Ok(())
        };
        let (schema, table) = match name.split_once('.') {
            Some((s, t)) => {
                ident(s, 63)?;
                (format!("{s}."), t)
            }
            None => (String::new(), name),
        };
        ident(table, 52)?;
        Ok(TableName {
            full: name.to_string(),
            schema,
            table: table.to_string(),
        })
    }

    /// An index's qualified name.
    fn index(&self, suffix: &str) -> String {
        format!("{}{}_{suffix}", self.schema, self.table)
    }

    fn schema(&self) -> String {
        format!(
            "
CREATE TABLE IF NOT EXISTS {t} (
    channel_id bytea       NOT NULL,
    message_id bigint      NOT NULL,
    idem_key   bytea,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    claimant   bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (channel_id, message_id)
);
{add}
{key}
{time}
",
            t = self.full,
            add = self.add_claimant(),
            key = self.key_index(),
            time = self.time_index(),
        )
    }

    fn add_claimant(&self) -> String {
        format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS claimant bigint NOT NULL DEFAULT 0;",
            self.full
        )
    }

    fn key_index(&self) -> String {
        format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS {}_idem_key\n    ON {} (idem_key) WHERE idem_key IS NOT NULL;",
            self.table, self.full
        )
    }

    fn time_index(&self) -> String {
        format!(
            "CREATE INDEX IF NOT EXISTS {}_claimed_at ON {} (claimed_at);",
            self.table, self.full
        )
    }
}

/// The statements, for one table. Parameters: $1 channel id, $2 message id, $3 key,
/// $4 claimant.
#[derive(Debug)]
struct Sql {
    insert: String,
    owned: String,
    lookup: String,
    expire: String,
    release: String,
}

impl Sql {
    fn new(t: &str) -> Sql {
        Sql {
            insert: format!(
                "INSERT INTO {t} (channel_id, message_id, idem_key, claimant)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true"
            ),
            owned: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE channel_id = $1 AND message_id = $2
                 AND idem_key IS NOT DISTINCT FROM $3::bytea AND claimant = $4)"
            ),
            lookup: format!(
                "SELECT EXISTS (SELECT 1 FROM {t}
                 WHERE (channel_id = $1 AND message_id = $2)
                    OR ($3::bytea IS NOT NULL AND idem_key = $3))"
            ),
            expire: format!(
                "DELETE FROM {t} WHERE (channel_id, message_id) IN (
                     SELECT channel_id, message_id FROM {t}
                     WHERE claimed_at < now() - make_interval(secs => $1) LIMIT $2)"
            ),
            release: format!(
                "DELETE FROM {t} WHERE channel_id = $1 AND message_id = $2
                 AND idem_key IS NOT DISTINCT FROM $3::bytea AND claimant = $4 AND $4 <> 0"
            ),
        }
    }

    fn all(&self) -> [&str; 5] {
        [
            &self.insert,
            &self.owned,
            &self.lookup,
            &self.expire,
            &self.release,
        ]
    }
}

/// Whether a PostgreSQL error means the statement definitely failed: the server answered
/// with an ERROR (which rolls the statement back), as against a broken connection or a
/// FATAL error, after which a statement may have committed without its answer arriving.
pub(super) fn failed_definitely(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.parsed_severity() == Some(Severity::Error))
}

/// A PostgreSQL error for people: the server's own message and code where it sent one
/// (tokio-postgres says only "db error" then).
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The claim on `client` with the given statements (text or prepared).
async fn claim_on<C, S>(
    client: &C,
    insert: &S,
    owned: &S,
    claim: &Claim,
) -> Result<Claimed, StoreError>
where
    C: GenericClient + Sync,
    S: ?Sized + ToStatement + Sync + Send,
{
    let (channel, message, key, claimant) = params(claim);
    let params: [&(dyn ToSql + Sync); 4] = [&channel, &message, &key, &claimant];
    if client.query_opt(insert, &params).await?.is_some() {
        return Ok(Claimed::Now);
    }
    if claim.claimant == 0 {
        return Ok(Claimed::Before);
    }
    // Claimed already: by this claimant's own earlier attempt (answered `Now` again), or by
    // someone else. A statement of its own, so that it sees a row committed while the
    // INSERT waited for it.
    let mine: bool = client.query_one(owned, &params).await?.get(0);
    Ok(if mine { Claimed::Now } else { Claimed::Before })
}

fn params(claim: &Claim) -> (&[u8], i64, Option<&[u8]>, i64) {
    (
        &claim.channel[..],
        claim.message as i64,
        claim.key.as_deref(),
        claim.claimant as i64,
    )
}

impl PgStore {
    /// A builder for a store at `url` (`postgres://user@host:port/db`, no TLS: run it on a
    /// trusted network or a local socket).
    pub fn builder(url: impl Into<String>) -> PgStoreBuilder {
        PgStoreBuilder {
            url: url.into(),
            table: DEFAULT_TABLE.to_string(),
            ttl: Duration::from_secs(24 * 3600),
            statement_timeout: Duration::from_secs(2),
            operation_timeout: None,
            pool_size: 8,
            create_schema: false,
        }
    }

    /// Connects to `url` with the defaults (table [`DEFAULT_TABLE`], 2 s statement timeout,
    /// 8 connections), creates the table if missing (or adds what an older version's table
    /// lacks), and keeps claims for `ttl`. Shorthand for
    /// `PgStore::builder(url).ttl(ttl).create_schema(true).connect()`.
    pub async fn connect(url: &str, ttl: Duration) -> Result<PgStore, StoreError> {
        PgStore::builder(url)
            .ttl(ttl)
            .create_schema(true)
            .connect()
            .await
    }

    /// Claims `claim` in this store's table on `client`: a plain connection, or the
    /// application's open `Transaction`, where the claim commits (or rolls back) with the
    /// rest of it. Runs on the application's connection, so the store's timeouts do not
    /// apply (the connection's own settings do).
    pub async fn claim_in(
        &self,
        client: &(impl GenericClient + Sync),
        claim: &Claim,
    ) -> Result<Claimed, StoreError> {
        claim_on(
            client,
            self.sql.insert.as_str(),
            self.sql.owned.as_str(),
            claim,
        )
        .await
    }

    /// A connection from the store's pool (it dereferences to a `tokio_postgres::Client`;
    /// dropping it returns it to the pool), for an application that wants to share them.
    pub async fn client(&self) -> Result<PooledClient, StoreError> {
        self.connection(Instant::now() + self.op_timeout).await
    }

    /// The table, as configured.
    pub fn table(&self) -> &str {
        &self.table
    }

    async fn connection(&self, deadline: Instant) -> Result<Object, StoreError> {
        match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(StoreError::Unavailable(match e {
                deadpool_postgres::PoolError::Backend(e) => e.to_string(),
                e => e.to_string(),
            })),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no connection within {:?}",
                self.op_timeout
            ))),
        }
    }

    /// The answer of an operation run on `conn` under its deadline. A connection whose
    /// statement did not answer in time leaves the pool (it may still be busy with it), and
    /// so does one that failed otherwise than by a server ERROR.
    fn finish<T>(
        &self,
        conn: Object,
        answer: Result<Result<T, StoreError>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match answer {
            // A connection that broke (or whose state is in doubt) leaves the pool at once
            // rather than failing the next operation too before the pool notices.
            Ok(Err(StoreError::Postgres(e))) => {
                if !failed_definitely(&e) || conn.is_closed() {
                    drop(Object::take(conn));
                }
                Err(StoreError::Postgres(e))
            }
            Ok(r) => r,
            Err(_) => {
                drop(Object::take(conn));
                Err(StoreError::Timeout {
                    after: self.op_timeout,
                })
            }
        }
    }
}

impl DedupeStore for PgStore {
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        Box::pin(async move {
            let deadline = Instant::now() + self.op_timeout;
            let conn = self.connection(deadline).await?;
            let answer = tokio::time::timeout_at(deadline, async {
                let insert = conn.prepare_cached(&self.sql.insert).await?;
                let owned = conn.prepare_cached(&self.sql.owned).await?;
                claim_on(&**conn, &insert, &owned, claim).await
            })
            .await;
            self.finish(conn, answer)
        })
    }

    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let deadline = Instant::now() + self.op_timeout;
            let conn = self.connection(deadline).await?;
            let answer = tokio::time::timeout_at(deadline, async {
                let lookup = conn.prepare_cached(&self.sql.lookup).await?;
                let (channel, message, key, _) = params(claim);
                let row = conn.query_one(&lookup, &[&channel, &message, &key]).await?;
                Ok(row.get(0))
            })
            .await;
            self.finish(conn, answer)
        })
    }

    fn release<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            if claim.claimant == 0 {
                return Ok(false);
            }
            let deadline = Instant::now() + self.op_timeout;
            let conn = self.connection(deadline).await?;
            let answer = tokio::time::timeout_at(deadline, async {
                let release = conn.prepare_cached(&self.sql.release).await?;
                let (channel, message, key, claimant) = params(claim);
                let n = conn
                    .execute(&release, &[&channel, &message, &key, &claimant])
                    .await?;
                Ok(n > 0)
            })
            .await;
            self.finish(conn, answer)
        })
    }

    fn expire(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            // In batches, each its own operation: a backlog of expired claims larger than
            // one statement can delete within the statement timeout still drains.
            let mut removed = 0;
            loop {
                let deadline = Instant::now() + self.op_timeout;
                let conn = self.connection(deadline).await?;
                let answer = tokio::time::timeout_at(deadline, async {
                    let expire = conn.prepare_cached(&self.sql.expire).await?;
                    Ok(conn
                        .execute(&expire, &[&self.ttl.as_secs_f64(), &EXPIRE_BATCH])
                        .await?)
                })
                .await;
                let n = self.finish(conn, answer)?;
                removed += n;
                if n < EXPIRE_BATCH as u64 {
                    return Ok(removed);
                }
            }
        })
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_tables_schema_is_pg_schema() {
        assert_eq!(
            TableName::parse(DEFAULT_TABLE).unwrap().schema().trim(),
            PG_SCHEMA.trim()
        );
    }

    #[test]
    fn table_names_are_identifiers() {
        for good in ["claims", "_c1", "payments.surelink_claims", "a_b_9"] {
            assert!(TableName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Claims",
            "1claims",
            "claims; DROP TABLE ledger",
            "claims\"",
            "a.b.c",
            ".claims",
            "claims.",
            "cl aims",
            "claïms",
            &"x".repeat(53),
        ] {
            let err = TableName::parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?}"));
            assert!(matches!(err, StoreError::Config(_)), "{bad:?}: {err:?}");
            assert!(!err.outcome_unknown());
        }
        let name = TableName::parse("pay.claims").unwrap();
        assert_eq!(name.index("idem_key"), "pay.claims_idem_key");
        assert!(name
            .key_index()
            .contains("EXISTS claims_idem_key\n    ON pay.claims "));
    }
}
