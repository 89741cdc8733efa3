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
use tokio_postgres::{GenericClient, IsolationLevel, NoTls, ToStatement};

use bytes::Bytes;

use super::{check_reply, Claim, Claimed, DedupeStore, Reserved, Settled, StoreError, StoreFuture};

/// A connection from [`PgStore`]'s pool ([`PgStore::client`]): dereferences to a
/// `tokio_postgres::Client`; dropping it returns it to the pool.
pub type PooledClient = Object;

/// The table [`PgStore::connect`] and [`PgStore::builder`] use unless told otherwise.
pub const DEFAULT_TABLE: &str = "surelink_claims";

/// The schema of the default table ([`DEFAULT_TABLE`]) and its channel table
/// (`surelink_claims_channels`), for operators who create them themselves;
/// [`PgStoreBuilder::schema`] gives it for another table. Idempotent: it also migrates a
/// table created by an older version (adds the `claimant`, `client`, `digest`, `epoch`,
/// `lease_until` and `reply` columns, replaces the unique index on `idem_key` by one on
/// `(client, idem_key)`, adds the channel table); an old claim's client is all zeros, the
/// anonymous client, it is settled (no lease, epoch 0), and it has no reply.
pub const PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS surelink_claims (
    channel_id bytea       NOT NULL,
    message_id bigint      NOT NULL,
    idem_key   bytea,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    claimant   bigint      NOT NULL DEFAULT 0,
    client     bytea       NOT NULL DEFAULT '\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
    digest     bytea,
    epoch      bigint      NOT NULL DEFAULT 0,
    lease_until timestamptz,
    reply      bytea,
    PRIMARY KEY (channel_id, message_id)
);
ALTER TABLE surelink_claims
    ADD COLUMN IF NOT EXISTS claimant bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS client   bytea  NOT NULL DEFAULT '\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
    ADD COLUMN IF NOT EXISTS digest   bytea,
    ADD COLUMN IF NOT EXISTS epoch    bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS lease_until timestamptz,
    ADD COLUMN IF NOT EXISTS reply    bytea;
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
/// (client, idempotency key). Its columns: `channel_id`, `message_id`, `idem_key`, `client`
/// and `digest` (what was claimed, see [`Claim`]), `claimant` (who), `epoch` (the fencing
/// epoch of its reservation; `0` in rows of older versions), `lease_until` (`NULL`: settled,
/// the record of a delivery; else a reservation whose lease ends then), `reply` (the
/// application's reply, recorded by the claimant that settled it,
/// [`DedupeStore::record_reply`]; `NULL` until then) and `claimed_at` (when it was reserved
/// or settled, the later: the TTL counts from it; a reply expires with its row). Channel
/// owners ([`DedupeStore::bind_channel`]) live in a second table, the claims table's name
/// with `_channels` appended, one row per channel. Expiry deletes claims (settled or not) older
/// than the TTL, and bindings older than the TTL with no claim left
/// ([`DedupeStore::expire`]; a server calls it periodically). Time is the database's clock
/// (`now()`), one clock for every replica. The schema: [`PG_SCHEMA`].
///
/// **Two phases** (the [module docs](super)), with the semantics of
/// [`MemoryStore`](super::MemoryStore). A reservation ([`DedupeStore::reserve`]) or a
/// one-phase claim ([`DedupeStore::claim`]) is first one `INSERT … ON CONFLICT DO NOTHING`,
/// so replicas racing for a new message (or key) get exactly one row between them. When it
/// meets a row, a transaction locks the row that answers (the pair's own, else the key's:
/// `SELECT … FOR UPDATE`, a statement of its own, so it sees a row committed while the
/// insert waited) and decides on it: settled (`Before`, or `Now` to its own claimant's
/// one-phase retry), the key's with another digest (`Conflict`), another claimant's live
/// reservation (`Busy`), its own (renewed, or settled by a one-phase claim), or one whose
/// lease ended (taken over: the next epoch). A settle ([`DedupeStore::settle`]) is one
/// `UPDATE` of the row that is still its claimant's at its epoch, then a `SELECT` if it
/// changed nothing (settled already by the same claimant and epoch: a retry; else fenced).
/// A reply is recorded by one guarded `UPDATE` (the row its claimant settled, at its epoch,
/// with no reply or the same one) and read by one `SELECT` (by (client, key), else by
/// (channel, message) for a keyless claim).
///
/// **Upgrading**: [`PgStoreBuilder::create_schema`] (or [`PG_SCHEMA`] run by hand) migrates
/// a table of an older version in place (`ADD COLUMN IF NOT EXISTS`). Its rows are settled
/// claims (no lease, epoch 0) without replies. From a version without clients and digests,
/// the claims already in it belong to the anonymous client and carry no digest, so they
/// still refuse their messages and their keys for anonymous clients, but under mutual TLS a
/// key first claimed before the upgrade is not recognised as that client's until it
/// expires. A replica of a version without reservations treats a reservation as a claim
/// (delivered before): upgrade every replica before relying on reservations. One of a
/// version without replies ignores them (it writes none; they go with its rows).
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
/// **Inside the application's transaction** (the inbox pattern): [`PgStore::claim_in`]
/// settles the message's reservation (or claims it in one phase) on the application's own
/// `Transaction`, so the settle and the application's effect (its ledger row) commit
/// together or not at all.
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
    /// and migrates a table of an older version (adds the `claimant`, `client`, `digest`,
    /// `epoch`, `lease_until` and `reply` columns, makes keys unique per client, adds the
    /// channel owners' table) (default `false`: the tables must exist, created or migrated by
    /// the operator from [`PgStoreBuilder::schema`]; a table missing a column is refused).
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
                     AND attname IN ('claimant', 'client', 'digest', 'epoch', 'lease_until',
                                     'reply')
                     AND NOT attisdropped) = 6,
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
            tracing::info!(
                table = %name.full,
                "surelink: adding the columns an older version lacks \
                 (claimant, client, digest, epoch, lease_until, reply)"
            );
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
    epoch      bigint      NOT NULL DEFAULT 0,
    lease_until timestamptz,
    reply      bytea,
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
    ADD COLUMN IF NOT EXISTS digest   bytea,
    ADD COLUMN IF NOT EXISTS epoch    bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS lease_until timestamptz,
    ADD COLUMN IF NOT EXISTS reply    bytea;",
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

/// The statements, for one table. Each lists its parameters; "own" is the test of
/// [`MemoryStore`](super::MemoryStore)'s: the same non-zero claimant, client and key.
#[derive(Debug)]
struct Sql {
    /// A new row ($1 channel id, $2 message id, $3 key, $4 claimant, $5 client, $6 digest,
    /// $7 epoch, $8 lease in seconds: NULL settles it at once); a row back if inserted.
    insert: String,
    /// The pair's row, locked ($1 channel id, $2 message id, $3 key, $4 claimant, $5
    /// client): its epoch, whether settled, whether its lease runs still, the lease's
    /// microseconds left, whether it is the claim's own.
    pair: String,
    /// The (client, key)'s row, locked ($1 client, $2 key): its pair, epoch and digest,
    /// whether settled, whether its lease runs still, the microseconds left.
    key: String,
    /// The pair's row renewed, taken over or settled ($1 channel id, $2 message id, $3
    /// claimant, $4 epoch, $5 lease in seconds or NULL).
    take: String,
    /// Deletes a pair's row ($1 channel id, $2 message id).
    delete: String,
    /// Gives a pair's row its key ($1 channel id, $2 message id, $3 key).
    set_key: String,
    /// Settles the pair's reservation if it is its own at the epoch ($1 channel id, $2
    /// message id, $3 key, $4 claimant, $5 client, $6 epoch): whether its lease had ended.
    settle: String,
    /// After a settle that changed nothing (same parameters): whether the row is settled,
    /// and whether it is its own at the epoch.
    settled: String,
    lookup: String,
    expire: String,
    release: String,
    bind: String,
    expire_channels: String,
    /// Records a reply on the row its claimant settled ($1 channel id, $2 message id, $3
    /// key, $4 claimant, $5 client, $6 epoch or 0 for any, $7 reply): whether it did (or the
    /// same reply was there).
    record_reply: String,
    /// The reply of the settled row of (client, key) ($1 client, $2 key, $3 digest or NULL).
    reply_by_key: String,
    /// The reply of the settled keyless row of (channel, message) ($1 channel id, $2
    /// message id, $3 client, $4 digest or NULL).
    reply_by_pair: String,
}

impl Sql {
    fn new(name: &TableName) -> Sql {
        let (t, c) = (&name.full, name.channels());
        // The claim's own row: see `MemoryStore::owns`.
        let own =
            "claimant = $4 AND $4 <> 0 AND client = $5 AND idem_key IS NOT DISTINCT FROM $3::bytea";
        // Microseconds until a lease ends (0 once ended or settled), by the database's clock.
        let left = "GREATEST(0, extract(epoch FROM lease_until - now()) * 1000000)::bigint";
        Sql {
            insert: format!(
                "INSERT INTO {t} (channel_id, message_id, idem_key, claimant, client, digest,
                                  epoch, lease_until)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
                 ON CONFLICT DO NOTHING RETURNING true"
            ),
            pair: format!(
                "SELECT epoch, lease_until IS NULL, COALESCE(lease_until > now(), false),
                        {left}, {own}
                 FROM {t} WHERE channel_id = $1 AND message_id = $2 FOR UPDATE"
            ),
            key: format!(
                "SELECT channel_id, message_id, epoch, digest, lease_until IS NULL,
                        COALESCE(lease_until > now(), false), {left}
                 FROM {t} WHERE client = $1 AND idem_key = $2 FOR UPDATE"
            ),
            take: format!(
                "UPDATE {t} SET claimant = $3, epoch = $4,
                     lease_until = now() + make_interval(secs => $5), claimed_at = now()
                 WHERE channel_id = $1 AND message_id = $2"
            ),
            delete: format!("DELETE FROM {t} WHERE channel_id = $1 AND message_id = $2"),
            set_key: format!(
                "UPDATE {t} SET idem_key = $3 WHERE channel_id = $1 AND message_id = $2"
            ),
            // The row locked first (the FROM), so that the lease read is the one replaced.
            settle: format!(
                "UPDATE {t} AS n SET lease_until = NULL, claimed_at = now()
                 FROM (SELECT lease_until FROM {t} WHERE channel_id = $1 AND message_id = $2
                       FOR UPDATE) AS o
                 WHERE n.channel_id = $1 AND n.message_id = $2 AND n.lease_until IS NOT NULL
                   AND n.claimant = $4 AND $4 <> 0 AND n.client = $5
                   AND n.idem_key IS NOT DISTINCT FROM $3::bytea AND n.epoch = $6 AND $6 <> 0
                 RETURNING COALESCE(o.lease_until < now(), false)"
            ),
            settled: format!(
                "SELECT lease_until IS NULL, {own} AND epoch = $6 AND $6 <> 0
                 FROM {t} WHERE channel_id = $1 AND message_id = $2"
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
                 AND client = $5 AND ($6::bigint = 0 OR epoch = $6::bigint)"
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
            record_reply: format!(
                "UPDATE {t} SET reply = $7
                 WHERE channel_id = $1 AND message_id = $2
                   AND idem_key IS NOT DISTINCT FROM $3::bytea AND claimant = $4 AND $4 <> 0
                   AND client = $5 AND ($6::bigint = 0 OR epoch = $6::bigint)
                   AND lease_until IS NULL AND (reply IS NULL OR reply = $7::bytea)"
            ),
            reply_by_key: format!(
                "SELECT reply FROM {t}
                 WHERE client = $1 AND idem_key = $2 AND lease_until IS NULL
                   AND ($3::bytea IS NULL OR digest IS NULL OR digest = $3::bytea)"
            ),
            reply_by_pair: format!(
                "SELECT reply FROM {t}
                 WHERE channel_id = $1 AND message_id = $2 AND idem_key IS NULL
                   AND client = $3 AND lease_until IS NULL
                   AND ($4::bytea IS NULL OR digest IS NULL OR digest = $4::bytea)"
            ),
        }
    }

    fn all(&self) -> [&str; 16] {
        [
            &self.insert,
            &self.pair,
            &self.key,
            &self.take,
            &self.delete,
            &self.set_key,
            &self.settle,
            &self.settled,
            &self.lookup,
            &self.expire,
            &self.release,
            &self.bind,
            &self.expire_channels,
            &self.record_reply,
            &self.reply_by_key,
            &self.reply_by_pair,
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

/// The statements of a take ([`take_on`]): prepared ones, or their text (for
/// [`PgStore::claim_in`] on the application's connection).
struct TakeSql<'s, S: ?Sized> {
    insert: &'s S,
    pair: &'s S,
    key: &'s S,
    take: &'s S,
    delete: &'s S,
    set_key: &'s S,
}

/// Rounds of [`resolve_on`] before it gives up (each round needs another replica's change
/// between its statements: a row released, expired or taken over, then claimed again).
const ROUNDS: usize = 4;

/// A lease for the statements: seconds, or NULL for a claim settled at once.
fn lease_secs(lease: Option<Duration>) -> Option<f64> {
    lease.map(|l| l.as_secs_f64())
}

/// A lease's time left, from the microseconds the database counted (bad data: none left).
fn left(micros: Option<i64>) -> Duration {
    Duration::from_micros(micros.and_then(|us| u64::try_from(us).ok()).unwrap_or(0))
}

/// Inserts `claim`'s row (with `key`, which may differ from the claim's) at `epoch`:
/// whether it was new, `false` if its pair or (client, key) was held.
async fn insert_on<C, S>(
    client: &C,
    insert: &S,
    claim: &Claim,
    key: Option<&[u8]>,
    epoch: i64,
    lease: Option<f64>,
) -> Result<bool, StoreError>
where
    C: GenericClient + Sync,
    S: ?Sized + ToStatement + Sync + Send,
{
    let (channel, message, _, claimant, who, digest) = params(claim);
    let row = client
        .query_opt(
            insert,
            &[
                &channel, &message, &key, &claimant, &who, &digest, &epoch, &lease,
            ],
        )
        .await?;
    Ok(row.is_some())
}

/// Reserves `claim` for `lease` (`None`: claims it in one phase, settled at once) on
/// `client`, which must be inside a transaction if it is to be race-free (the application's,
/// or the store's own): [`MemoryStore`](super::MemoryStore)'s `take`, in SQL.
async fn take_on<C, S>(
    client: &C,
    sql: &TakeSql<'_, S>,
    claim: &Claim,
    lease: Option<Duration>,
) -> Result<Reserved, StoreError>
where
    C: GenericClient + Sync,
    S: ?Sized + ToStatement + Sync + Send,
{
    let lease = lease_secs(lease);
    if insert_on(client, sql.insert, claim, claim.key.as_deref(), 1, lease).await? {
        return Ok(Reserved::Held {
            epoch: 1,
            took_over: false,
        });
    }
    resolve_on(client, sql, claim, lease).await
}

/// After an insert of `claim` that found its pair or its (client, key) held: decides on the
/// row that answers (the pair's own, else the key's), locked. Every statement is a new
/// snapshot, so it sees a row committed while the insert waited for it; a row gone before
/// it was locked (released, expired, taken over through its key) is inserted afresh.
///
/// Needs no rollback of its own: it writes only once it holds what it decided on (the
/// pair's row, or the key's row and then a pair row of its own), so it runs on the
/// application's transaction as well as on the store's.
async fn resolve_on<C, S>(
    client: &C,
    sql: &TakeSql<'_, S>,
    claim: &Claim,
    lease: Option<f64>,
) -> Result<Reserved, StoreError>
where
    C: GenericClient + Sync,
    S: ?Sized + ToStatement + Sync + Send,
{
    let (channel, message, key, claimant, who, _) = params(claim);
    for _ in 0..ROUNDS {
        if let Some(row) = client
            .query_opt(sql.pair, &[&channel, &message, &key, &claimant, &who])
            .await?
        {
            let epoch: i64 = row.try_get(0)?;
            let settled: bool = row.try_get(1)?;
            let live: bool = row.try_get(2)?;
            let own: bool = row.try_get(4)?;
            if settled {
                // Its owner's one-phase retry (a lost answer) is its own again.
                return Ok(if own && lease.is_none() {
                    Reserved::Held {
                        epoch: epoch as u64,
                        took_over: false,
                    }
                } else {
                    Reserved::Before
                });
            }
            if live && !own {
                return Ok(Reserved::Busy {
                    retry_in: left(row.try_get(3)?),
                });
            }
            // Its own reservation (renewed, or settled now), or one whose lease ended (taken
            // over: the next epoch, so the old owner's settle is fenced).
            let took_over = !own;
            let epoch = epoch.saturating_add(i64::from(took_over));
            client
                .execute(sql.take, &[&channel, &message, &claimant, &epoch, &lease])
                .await?;
            return Ok(Reserved::Held {
                epoch: epoch as u64,
                took_over,
            });
        }
        if let Some(k) = key {
            if let Some(row) = client.query_opt(sql.key, &[&who, &k]).await? {
                let held_channel: Vec<u8> = row.try_get(0)?;
                let held_message: i64 = row.try_get(1)?;
                let epoch: i64 = row.try_get(2)?;
                let digest: Option<Vec<u8>> = row.try_get(3)?;
                let settled: bool = row.try_get(4)?;
                let live: bool = row.try_get(5)?;
                if matches!((&digest, &claim.digest), (Some(a), Some(b)) if a[..] != b[..]) {
                    return Ok(Reserved::Conflict);
                }
                if settled {
                    return Ok(Reserved::Before);
                }
                if live {
                    return Ok(Reserved::Busy {
                        retry_in: left(row.try_get(6)?),
                    });
                }
                // Another message's reservation of the key, its lease ended (a retry under a
                // new id): this pair takes the key over. Its row first, without the key (the
                // key's row still holds it): if the pair was claimed meanwhile, nothing was
                // written, and the next round answers by that row.
                let epoch = epoch.saturating_add(1);
                if insert_on(client, sql.insert, claim, None, epoch, lease).await? {
                    client
                        .execute(sql.delete, &[&held_channel, &held_message])
                        .await?;
                    // Nobody else can have taken the key: its row was locked, then deleted
                    // by this transaction (a concurrent insert of it waits for the outcome).
                    client
                        .execute(sql.set_key, &[&channel, &message, &k])
                        .await?;
                    return Ok(Reserved::Held {
                        epoch: epoch as u64,
                        took_over: true,
                    });
                }
                continue;
            }
        }
        // The row that refused the insert is gone: insert again.
        if insert_on(client, sql.insert, claim, key, 1, lease).await? {
            return Ok(Reserved::Held {
                epoch: 1,
                took_over: false,
            });
        }
    }
    // The rows kept changing under it: neither delivered nor free as far as it can tell;
    // the caller judges the message again later.
    Ok(Reserved::Busy {
        retry_in: Duration::ZERO,
    })
}

/// What a settle found ([`settle_on`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settling {
    /// Settled now.
    Now { late: bool },
    /// Settled before, by this claimant at this epoch (a retry whose first answer was lost,
    /// or, in an application's transaction, a transaction that committed before).
    Already,
    /// Settled by another claimant, or at another epoch: delivered elsewhere.
    SettledElsewhere,
    /// Another claimant's (or another epoch's) reservation, or no row at all.
    NotHeld,
}

/// Settles the reservation `claim` names on `client` (one UPDATE, and a SELECT when it
/// changed nothing): no transaction of its own needed.
async fn settle_on<C, S>(
    client: &C,
    settle: &S,
    settled: &S,
    claim: &Claim,
) -> Result<Settling, StoreError>
where
    C: GenericClient + Sync,
    S: ?Sized + ToStatement + Sync + Send,
{
    let (channel, message, key, claimant, who, _) = params(claim);
    let epoch = claim.epoch as i64;
    let p: [&(dyn ToSql + Sync); 6] = [&channel, &message, &key, &claimant, &who, &epoch];
    if let Some(row) = client.query_opt(settle, &p).await? {
        return Ok(Settling::Now {
            late: row.try_get(0)?,
        });
    }
    // Nothing changed: settled already (by this claimant at this epoch: a retry whose first
    // answer was lost), or not this claimant's at this epoch.
    Ok(match client.query_opt(settled, &p).await? {
        Some(row) => match (row.try_get::<_, bool>(0)?, row.try_get::<_, bool>(1)?) {
            (true, true) => Settling::Already,
            (true, false) => Settling::SettledElsewhere,
            (false, _) => Settling::NotHeld,
        },
        None => Settling::NotHeld,
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

    /// The inbox pattern's claim, on `client`: the application's open `Transaction`, where
    /// it commits (or rolls back) with the application's effect (its ledger row). Runs on the
    /// application's connection, so the store's timeouts do not apply (the connection's own
    /// settings do).
    ///
    /// - With a reservation (`claim.epoch != 0`, as [`Claim::of`] builds it from a message
    ///   its channel reserved): *settles* it, as [`DedupeStore::settle`] does, in one UPDATE
    ///   (and a SELECT when it changed nothing). [`Claimed::Now`]: settled now, by this
    ///   transaction; [`Claimed::Before`]: the message was settled before, by another owner
    ///   (delivered elsewhere) or by an earlier transaction with this very reservation that
    ///   committed although its answer was lost: ack it without applying its effect again;
    ///   [`Claimed::Busy`]: another owner holds the reservation now, or it is gone (taken
    ///   over, released or expired): roll back, do not ack.
    /// - Without one (`claim.epoch == 0`): the one-phase claim of [`DedupeStore::claim`],
    ///   which meets reservations too: another claimant's live one answers
    ///   [`Claimed::Busy`], one whose lease ended is taken over and settled.
    ///
    /// Pass a transaction: a one-phase claim that meets another row takes several
    /// statements, atomic (and so race-free between replicas) only inside one. On a plain
    /// connection in autocommit, only a settle and a claim that finds nothing are.
    pub async fn claim_in(
        &self,
        client: &(impl GenericClient + Sync),
        claim: &Claim,
    ) -> Result<Claimed, StoreError> {
        let s = &self.sql;
        if claim.epoch != 0 {
            return Ok(
                match settle_on(client, s.settle.as_str(), s.settled.as_str(), claim).await? {
                    Settling::Now { .. } => Claimed::Now,
                    // Settled by an earlier transaction of the application, which committed
                    // with its effect (its answer lost): this one must not apply it again.
                    Settling::Already | Settling::SettledElsewhere => Claimed::Before,
                    Settling::NotHeld => Claimed::Busy,
                },
            );
        }
        let sql = TakeSql {
            insert: s.insert.as_str(),
            pair: s.pair.as_str(),
            key: s.key.as_str(),
            take: s.take.as_str(),
            delete: s.delete.as_str(),
            set_key: s.set_key.as_str(),
        };
        Ok(claimed(take_on(client, &sql, claim, None).await?))
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

/// A one-phase take's answer as a claim's.
fn claimed(r: Reserved) -> Claimed {
    match r {
        Reserved::Held { .. } => Claimed::Now,
        Reserved::Busy { .. } => Claimed::Busy,
        Reserved::Before => Claimed::Before,
        Reserved::Conflict => Claimed::Conflict,
    }
}

impl PgStore {
    /// Reserves (or, `lease` `None`, claims in one phase) on a pooled connection under one
    /// operation's deadline: the insert alone (autocommit) when it is new, else the rest of
    /// the take ([`resolve_on`]) in a transaction of its own.
    async fn take(&self, claim: &Claim, lease: Option<Duration>) -> Result<Reserved, StoreError> {
        let deadline = Instant::now() + self.op_timeout;
        let mut conn = self.connection(deadline).await?;
        let answer = tokio::time::timeout_at(deadline, async {
            let s = &self.sql;
            let insert = conn.prepare_cached(&s.insert).await?;
            let lease = lease_secs(lease);
            if insert_on(&**conn, &insert, claim, claim.key.as_deref(), 1, lease).await? {
                return Ok(Reserved::Held {
                    epoch: 1,
                    took_over: false,
                });
            }
            let pair = conn.prepare_cached(&s.pair).await?;
            let key = conn.prepare_cached(&s.key).await?;
            let take = conn.prepare_cached(&s.take).await?;
            let delete = conn.prepare_cached(&s.delete).await?;
            let set_key = conn.prepare_cached(&s.set_key).await?;
            let sql = TakeSql {
                insert: &insert,
                pair: &pair,
                key: &key,
                take: &take,
                delete: &delete,
                set_key: &set_key,
            };
            // Dropped unfinished (an error, the deadline), it rolls back. READ COMMITTED
            // whatever the database's default: each statement sees what committed before it.
            let tx = conn
                .build_transaction()
                .isolation_level(IsolationLevel::ReadCommitted)
                .start()
                .await?;
            let answer = resolve_on(&*tx, &sql, claim, lease).await?;
            tx.commit().await?;
            Ok(answer)
        })
        .await;
        self.finish(conn, answer)
    }
}

impl DedupeStore for PgStore {
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        Box::pin(async move { self.take(claim, None).await.map(claimed) })
    }

    fn reserve<'a>(&'a self, claim: &'a Claim, lease: Duration) -> StoreFuture<'a, Reserved> {
        Box::pin(async move {
            if claim.claimant == 0 {
                // An anonymous reservation could never be settled: nobody owns it.
                return Ok(Reserved::Busy { retry_in: lease });
            }
            self.take(claim, Some(lease)).await
        })
    }

    fn settle<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Settled> {
        Box::pin(async move {
            if claim.claimant == 0 || claim.epoch == 0 {
                return Ok(Settled::Fenced);
            }
            let deadline = Instant::now() + self.op_timeout;
            let conn = self.connection(deadline).await?;
            let answer = tokio::time::timeout_at(deadline, async {
                let settle = conn.prepare_cached(&self.sql.settle).await?;
                let settled = conn.prepare_cached(&self.sql.settled).await?;
                settle_on(&**conn, &settle, &settled, claim).await
            })
            .await;
            Ok(match self.finish(conn, answer)? {
                Settling::Now { late } => Settled::Now { late },
                // The link's own retry of a settle whose answer was lost.
                Settling::Already => Settled::Now { late: false },
                Settling::SettledElsewhere | Settling::NotHeld => Settled::Fenced,
            })
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
            let epoch = claim.epoch as i64;
            let n = self
                .execute(
                    &self.sql.release,
                    &[&channel, &message, &key, &claimant, &client, &epoch],
                )
                .await?;
            Ok(n > 0)
        })
    }

    fn record_reply<'a>(&'a self, claim: &'a Claim, reply: &'a [u8]) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_reply(reply)?;
            if claim.claimant == 0 {
                return Ok(false);
            }
            let (channel, message, key, claimant, client, _) = params(claim);
            let epoch = claim.epoch as i64;
            let n = self
                .execute(
                    &self.sql.record_reply,
                    &[&channel, &message, &key, &claimant, &client, &epoch, &reply],
                )
                .await?;
            Ok(n > 0)
        })
    }

    fn reply<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            let deadline = Instant::now() + self.op_timeout;
            let conn = self.connection(deadline).await?;
            let answer = tokio::time::timeout_at(deadline, async {
                let (channel, message, key, _, client, digest) = params(claim);
                let row = match key {
                    Some(key) => {
                        let by_key = conn.prepare_cached(&self.sql.reply_by_key).await?;
                        conn.query_opt(&by_key, &[&client, &key, &digest]).await?
                    }
                    None => {
                        let by_pair = conn.prepare_cached(&self.sql.reply_by_pair).await?;
                        conn.query_opt(&by_pair, &[&channel, &message, &client, &digest])
                            .await?
                    }
                };
                Ok(match row {
                    Some(row) => row.try_get::<_, Option<Vec<u8>>>(0)?.map(Bytes::from),
                    None => None,
                })
            })
            .await;
            self.finish(conn, answer)
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
