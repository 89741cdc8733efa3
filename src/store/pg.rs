//! The PostgreSQL dedupe store (feature `postgres`).

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, GenericClient, NoTls};

use super::{Claim, Claimed, DedupeStore, StoreError, StoreFuture};

/// Claims in a PostgreSQL table shared by replicas.
///
/// One row per claim, unique by (channel id, message id) and, where a key was given, by
/// idempotency key; a claim is one `INSERT … ON CONFLICT DO NOTHING`, so two replicas racing
/// for the same message (or key) get exactly one `Claimed::Now` between them, whichever
/// commits first. Expiry deletes rows older than the TTL ([`DedupeStore::expire`]; a server
/// calls it periodically). Time is the database's clock (`now()`), one clock for every
/// replica.
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS surelink_claims (
///     channel_id bytea       NOT NULL,
///     message_id bigint      NOT NULL,
///     idem_key   bytea,
///     claimed_at timestamptz NOT NULL DEFAULT now(),
///     PRIMARY KEY (channel_id, message_id)
/// );
/// CREATE UNIQUE INDEX IF NOT EXISTS surelink_claims_idem_key
///     ON surelink_claims (idem_key) WHERE idem_key IS NOT NULL;
/// CREATE INDEX IF NOT EXISTS surelink_claims_claimed_at ON surelink_claims (claimed_at);
/// ```
///
/// **Inside the application's transaction** (the inbox pattern): [`PgStore::claim_in`] runs
/// the same claim on the application's own `Transaction`, so the claim and the application's
/// effect (its ledger row) commit together or not at all.
#[derive(Clone)]
pub struct PgStore {
    client: Arc<Client>,
    ttl: Duration,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("ttl", &self.ttl).finish()
    }
}

/// The schema, created if missing by [`PgStore::connect`].
pub const PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS surelink_claims (
    channel_id bytea       NOT NULL,
    message_id bigint      NOT NULL,
    idem_key   bytea,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel_id, message_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS surelink_claims_idem_key
    ON surelink_claims (idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS surelink_claims_claimed_at ON surelink_claims (claimed_at);
";

const CLAIM: &str = "INSERT INTO surelink_claims (channel_id, message_id, idem_key)
     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true";

const LOOKUP: &str = "SELECT EXISTS (SELECT 1 FROM surelink_claims
     WHERE (channel_id = $1 AND message_id = $2) OR ($3::bytea IS NOT NULL AND idem_key = $3))";

const EXPIRE: &str =
    "DELETE FROM surelink_claims WHERE claimed_at < now() - make_interval(secs => $1)";

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`, no TLS: run it on a trusted network
    /// or a local socket), creates the table if missing, and keeps claims for `ttl`. The
    /// connection runs on its own tokio task.
    pub async fn connect(url: &str, ttl: Duration) -> Result<PgStore, StoreError> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "surelink: PostgreSQL dedupe store connection ended");
            }
        });
        client.batch_execute(PG_SCHEMA).await?;
        Ok(PgStore {
            client: Arc::new(client),
            ttl,
        })
    }

    /// Claims `claim` on `client`: a plain connection, or the application's open
    /// `Transaction`, where the claim commits (or rolls back) with the rest of it.
    pub async fn claim_in(
        client: &impl GenericClient,
        claim: &Claim,
    ) -> Result<Claimed, StoreError> {
        let row = client
            .query_opt(
                CLAIM,
                &[
                    &&claim.channel[..],
                    &(claim.message as i64),
                    &claim.key.as_deref(),
                ],
            )
            .await?;
        Ok(if row.is_some() {
            Claimed::Now
        } else {
            Claimed::Before
        })
    }

    /// The client this store uses (for an application that wants to share the connection).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl DedupeStore for PgStore {
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        Box::pin(async move { PgStore::claim_in(&*self.client, claim).await })
    }

    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let row = self
                .client
                .query_one(
                    LOOKUP,
                    &[
                        &&claim.channel[..],
                        &(claim.message as i64),
                        &claim.key.as_deref(),
                    ],
                )
                .await?;
            Ok(row.get(0))
        })
    }

    fn expire(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            Ok(self
                .client
                .execute(EXPIRE, &[&self.ttl.as_secs_f64()])
                .await?)
        })
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}
