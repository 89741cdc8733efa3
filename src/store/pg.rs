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

/// The schema of the default table ([`DEFAULT_TABLE`]) and its channel table
/// (`surelink_claims_channels`), for operators who create them themselves;
/// [`PgStoreBuilder::schema`] gives it for another table. Idempotent: it also migrates a
/// table created by an older version (adds the `claimant`, `client` and `digest` columns,
/// replaces the unique index on `idem_key` by one on `(client, idem_key)`, adds the channel
/// table); an old claim's client is all zeros, the anonymous client.
pub const PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS surelink_claims (
    channel_id bytea       NOT NULL,
    message_id bigint      NOT NULL,
    idem_key   bytea,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    claimant   bigint      NOT NULL DEFAULT 0,
    client     bytea       NOT NULL DEFAULT '\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
    digest     bytea,
    PRIMARY KEY (channel_id, message_id)
);
ALTER TABLE surelink_claims
    ADD COLUMN IF NOT EXISTS claimant bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS client   bytea  NOT NULL DEFAULT '\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
    ADD COLUMN IF NOT EXISTS digest   bytea;
CREATE UNIQUE INDEX IF NOT EXISTS surelink_claims_client_key
    ON surelink_claims (client, idem_key) WHERE idem_key IS NOT NULL;
DROP INDEX IF EXISTS surelink_claims_idem_key;
CREATE INDEX IF NOT EXISTS surelink_claims_claimed_at ON surelink_claims (claimed_at);
CREATE TABLE IF NOT EXISTS surelink_claims_channels (
    channel_id bytea       PRIMARY KEY,
    owner      bytea       NOT NULL,
    bound_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS surelink_claims_bound_at ON surelink_claims_channels (bound_at);
";

/// Rows [`DedupeStore::expire`] deletes per statement (each statement under the statement
/// timeout, however many claims expired).
const EXPIRE_BATCH: i64 = 10_000;

/// Claims in a PostgreSQL table shared by replicas.
///
/// One row per claim, unique by (channel id, message id) and, where a key was given, by
/// (client, idempotency key); a claim is one `INSERT … ON CONFLICT DO NOTHING`, so two
/// replicas racing for the same message (or key) get exactly one `Claimed::Now` between
/// them, whichever commits first. A claim that conflicts is checked once more, in a second
/// statement: against its own claimant (see [`Claim::claimant`]: the row its own lost attempt
/// wrote answers `Now`) and against the payload digest its key was claimed with (another
/// digest answers `Claimed::Conflict`). Channel owners ([`DedupeStore::bind_channel`]) live
/// in a second table, the claims table's name with `_channels` appended, one row per
/// channel. Expiry deletes claims older than the TTL, and bindings older than the TTL with no
/// claim left ([`DedupeStore::expire`]; a server calls it periodically). Time is the
/// database's clock (`now()`), one clock for every replica. The schema: [`PG_SCHEMA`].
///
/// **Upgrading** from a version without clients and digests: [`PgStoreBuilder::create_schema`]
/// (or [`PG_SCHEMA`] run by hand) migrates the table in place; the claims already in it
/// belong to the anonymous client and carry no digest, so they still refuse their messages
/// and their keys for anonymous clients, but under mutual TLS a key first claimed before the
/// upgrade is not recognised as that client's until it expires.
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
    /// characters for the table (its index names add a suffix) and 63 for the schema. The
    /// channel owners' table is named after it, with `_channels` appended. Checked by
    /// [`PgStoreBuilder::connect`] ([`StoreError::Config`]).
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

    /// Whether [`PgStoreBuilder::connect`] creates the tables and their indexes if missing,
    /// and migrates a table of an older version (adds the `claimant`, `client` and `digest`
    /// columns, makes keys unique per client, adds the channel owners' table) (default
    /// `false`: the tables must exist, created by the operator from
    /// [`PgStoreBuilder::schema`]).
    pub fn create_schema(mut self, create: bool) -> Self {
        self.create_schema = create;
        self
    }

    /// The schema (SQL) of the configured table: the table, the columns a table of an older
    /// version lacks, its indexes (keys unique per client), and the channel owners' table
    /// (`<table>_channels`). Idempotent.
    pub fn schema(&self) -> Result<String, StoreError> {
        Ok(TableName::parse(&self.table)?.schema())
    }

    /// Connects: checks the configuration, opens a first connection, creates the schema if
    /// asked, and checks that the tables have the columns the store uses.
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
            sql: Arc::new(Sql::new(&name)),
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

/// Creates the tables, or migrates older ones, under an advisory lock (replicas starting
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
                    (SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass($1)
                     AND attname IN ('claimant', 'client', 'digest') AND NOT attisdropped) = 3,
                    to_regclass($2) IS NOT NULL,
                    to_regclass($3) IS NOT NULL,
                    to_regclass($4) IS NOT NULL,
                    to_regclass($5) IS NOT NULL,
                    to_regclass($6) IS NOT NULL",
            &[
                &name.full,
                &name.index("client_key"),
                &name.index("idem_key"),
                &name.index("claimed_at"),
                &name.channels(),
                &name.index("bound_at"),
            ],
        )
        .await?;
    let (table, columns, key_index, old_key_index, time_index, channels, bound_index): (
        bool,
        bool,
        bool,
        bool,
        bool,
        bool,
        bool,
    ) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
        row.get(6),
    );
    if !table {
        tx.batch_execute(&name.schema()).await?;
    } else {
        if !columns {
            tracing::info!(table = %name.full, "surelink: adding the claimant, client and digest columns");
            tx.batch_execute(&name.add_columns()).await?;
        }
        if !key_index {
            tracing::info!(table = %name.full, "surelink: keys unique per (client, key)");
            tx.batch_execute(&name.key_index()).await?;
        }
        if old_key_index {
            tx.batch_execute(&name.drop_old_key_index()).await?;
        }
        if !time_index {
            tx.batch_execute(&name.time_index()).await?;
        }
        if !channels {
            tracing::info!(table = %name.channels(), "surelink: adding the channel owners' table");
            tx.batch_execute(&name.channels_table()).await?;
        }
        if !bound_index {
            tx.batch_execute(&name.bound_index()).await?;
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

    /// The channel owners' table, qualified like the claims table.
    fn channels(&self) -> String {
        format!("{}_channels", self.full)
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
    client     bytea       NOT NULL DEFAULT {zeros},
    digest     bytea,
    PRIMARY KEY (channel_id, message_id)
);
{add}
{key}
{drop}
{time}
{channels}
{bound}
",
            t = self.full,
            zeros = ZEROS,
            add = self.add_columns(),
            key = self.key_index(),
            drop = self.drop_old_key_index(),
            time = self.time_index(),
            channels = self.channels_table(),
            bound = self.bound_index(),
        )
    }

    /// The columns a table of an older version may lack.
    fn add_columns(&self) -> String {
        format!(
            "ALTER TABLE {}
    ADD COLUMN IF NOT EXISTS claimant bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS client   bytea  NOT NULL DEFAULT {ZEROS},
    ADD COLUMN IF NOT EXISTS digest   bytea;",
            self.full
        )
    }

    fn key_index(&self) -> String {
        format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS {}_client_key\n    ON {} (client, idem_key) WHERE idem_key IS NOT NULL;",
            self.table, self.full
        )
    }

    /// Keys were unique across clients before: that index goes (after its successor exists).
    fn drop_old_key_index(&self) -> String {
        format!("DROP INDEX IF EXISTS {};", self.index("idem_key"))
    }

    fn time_index(&self) -> String {
        format!(
            "CREATE INDEX IF NOT EXISTS {}_claimed_at ON {} (claimed_at);",
            self.table, self.full
        )
    }

    fn channels_table(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
    channel_id bytea       PRIMARY KEY,
    owner      bytea       NOT NULL,
    bound_at   timestamptz NOT NULL DEFAULT now()
);",
            self.channels()
        )
    }

    fn bound_index(&self) -> String {
        format!(
            "CREATE INDEX IF NOT EXISTS {}_bound_at ON {} (bound_at);",
            self.table,
            self.channels()
        )
    }
}

/// The default of the `client` column: the anonymous client (32 zero bytes), so that claims
/// written before clients were told apart stay valid, as anonymous ones.
const ZEROS: &str = "'\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea";

/// The statements, for one table. Parameters of a claim: $1 channel id, $2 message id,
/// $3 key, $4 claimant, $5 client, $6 digest.
#[derive(Debug)]
struct Sql {
    insert: String,
    /// After an insert that conflicted: (its own earlier claim, the pair claimed, the
    /// client's key claimed with another digest).
    why: String,
    lookup: String,
    expire: String,
    release: String,
    bind: String,
    expire_channels: String,
}

impl Sql {
    fn new(name: &TableName) -> Sql {
        let (t, c) = (&name.full, name.channels());
        Sql {
            insert: format!(
                "INSERT INTO {t} (channel_id, message_id, idem_key, claimant, client, digest)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING true"
            ),
            why: format!(
                "SELECT
                   EXISTS (SELECT 1 FROM {t} WHERE channel_id = $1 AND message_id = $2
                           AND idem_key IS NOT DISTINCT FROM $3::bytea AND claimant = $4
                           AND $4 <> 0 AND client = $5),
                   EXISTS (SELECT 1 FROM {t} WHERE channel_id = $1 AND message_id = $2),
                   EXISTS (SELECT 1 FROM {t} WHERE $3::bytea IS NOT NULL AND client = $5
                           AND idem_key = $3 AND digest <> $6::bytea)"
            ),
            lookup: format!(
                "SELECT EXISTS (SELECT 1 FROM {t}
                 WHERE (channel_id = $1 AND message_id = $2)
                    OR ($3::bytea IS NOT NULL AND client = $4 AND idem_key = $3))"
            ),
            expire: format!(
                "DELETE FROM {t} WHERE (channel_id, message_id) IN (
                     SELECT channel_id, message_id FROM {t}
                     WHERE claimed_at < now() - make_interval(secs => $1) LIMIT $2)"
            ),
            release: format!(
                "DELETE FROM {t} WHERE channel_id = $1 AND message_id = $2
                 AND idem_key IS NOT DISTINCT FROM $3::bytea AND claimant = $4 AND $4 <> 0
                 AND client = $5"
            ),
            bind: format!(
                "INSERT INTO {c} AS b (channel_id, owner) VALUES ($1, $2)
                 ON CONFLICT (channel_id) DO UPDATE SET bound_at = now()
                 WHERE b.owner = EXCLUDED.owner
                 RETURNING true"
            ),
            expire_channels: format!(
                "DELETE FROM {c} WHERE channel_id IN (
                     SELECT b.channel_id FROM {c} b
                     WHERE b.bound_at < now() - make_interval(secs => $1)
                     AND NOT EXISTS (SELECT 1 FROM {t} WHERE {t}.channel_id = b.channel_id)
                     LIMIT $2)"
            ),
        }
    }

    fn all(&self) -> [&str; 7] {
        [
            &self.insert,
            &self.why,
            &self.lookup,
            &self.expire,
            &self.release,
            &self.bind,
            &self.expire_channels,
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
    why: &S,
    claim: &Claim,
) -> Result<Claimed, StoreError>
where
    C: GenericClient + Sync,
    S: ?Sized + ToStatement + Sync + Send,
{
    let p = params(claim);
    let params: [&(dyn ToSql + Sync); 6] = [&p.0, &p.1, &p.2, &p.3, &p.4, &p.5];
    if client.query_opt(insert, &params).await?.is_some() {
        return Ok(Claimed::Now);
    }
    if claim.claimant == 0 && (claim.key.is_none() || claim.digest.is_none()) {
        // Neither its own earlier claim nor a conflict can be: claimed before.
        return Ok(Claimed::Before);
    }
    // Claimed already: by this claimant's own earlier attempt (answered `Now` again), or by
    // someone else, maybe with another payload under the same key. A statement of its own,
    // so that it sees a row committed while the INSERT waited for it.
    let row = client.query_one(why, &params).await?;
    let (mine, pair, conflict): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    Ok(if mine {
        Claimed::Now
    } else if !pair && conflict {
        Claimed::Conflict
    } else {
        Claimed::Before
    })
}

/// A claim's statement parameters.
type Params<'a> = (
    &'a [u8],
    i64,
    Option<&'a [u8]>,
    i64,
    &'a [u8],
    Option<&'a [u8]>,
);

fn params(claim: &Claim) -> Params<'_> {
    (
        &claim.channel[..],
        claim.message as i64,
        claim.key.as_deref(),
        claim.claimant as i64,
        &claim.client[..],
        claim.digest.as_ref().map(|d| &d[..]),
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
            self.sql.why.as_str(),
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

impl PgStore {
    /// Runs `statement` (one of `self.sql`'s) with `params` under one operation's deadline:
    /// the rows changed.
    async fn execute(
        &self,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let deadline = Instant::now() + self.op_timeout;
        let conn = self.connection(deadline).await?;
        let answer = tokio::time::timeout_at(deadline, async {
            let statement = conn.prepare_cached(statement).await?;
            Ok(conn.execute(&statement, params).await?)
        })
        .await;
        self.finish(conn, answer)
    }

    /// Deletes with `statement` (parameters: the TTL in seconds, the batch size) in batches
    /// until one deletes less than a batch; how many in all.
    async fn expire_with(&self, statement: &str) -> Result<u64, StoreError> {
        // In batches, each its own operation: a backlog larger than one statement can delete
        // within the statement timeout still drains.
        let mut removed = 0;
        loop {
            let n = self
                .execute(statement, &[&self.ttl.as_secs_f64(), &EXPIRE_BATCH])
                .await?;
            removed += n;
            if n < EXPIRE_BATCH as u64 {
                return Ok(removed);
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
                let why = conn.prepare_cached(&self.sql.why).await?;
                claim_on(&**conn, &insert, &why, claim).await
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
                let (channel, message, key, _, client, _) = params(claim);
                let row = conn
                    .query_one(&lookup, &[&channel, &message, &key, &client])
                    .await?;
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
            let (channel, message, key, claimant, client, _) = params(claim);
            let n = self
                .execute(
                    &self.sql.release,
                    &[&channel, &message, &key, &claimant, &client],
                )
                .await?;
            Ok(n > 0)
        })
    }

    fn bind_channel(&self, channel: [u8; 16], owner: [u8; 32]) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let deadline = Instant::now() + self.op_timeout;
            let conn = self.connection(deadline).await?;
            let answer = tokio::time::timeout_at(deadline, async {
                let bind = conn.prepare_cached(&self.sql.bind).await?;
                let row = conn.query_opt(&bind, &[&&channel[..], &&owner[..]]).await?;
                Ok(row.is_some())
            })
            .await;
            self.finish(conn, answer)
        })
    }

    fn expire(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let removed = self.expire_with(&self.sql.expire).await?;
            self.expire_with(&self.sql.expire_channels).await?;
            Ok(removed)
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
            .contains("EXISTS claims_client_key\n    ON pay.claims (client, idem_key)"));
        assert_eq!(
            name.drop_old_key_index(),
            "DROP INDEX IF EXISTS pay.claims_idem_key;"
        );
        assert_eq!(name.channels(), "pay.claims_channels");
        assert!(name
            .bound_index()
            .starts_with("CREATE INDEX IF NOT EXISTS claims_bound_at ON pay.claims_channels "));
    }
}
