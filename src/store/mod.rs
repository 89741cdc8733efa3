//! Claims of delivered messages, shared by the replicas of a service.
//!
//! A server that delivers a message first *claims* it: the pair (channel id, message id) and,
//! when the sender attached one, the application's idempotency key. A claim succeeds once;
//! every later claim of the same pair, or of the same key under any id, is refused as
//! [`Claimed::Before`]. Replicas that share one store therefore deliver each message at most
//! once between them, and a server acks a message only after its claim is durable, so a
//! replica that crashes after acking cannot cause a second delivery elsewhere.
//!
//! Two stores: [`MemoryStore`] (the default, one process, no setup) and, with the `postgres`
//! feature, `PgStore` (a table keyed by channel id + message id and by idempotency key,
//! `INSERT … ON CONFLICT DO NOTHING`, expiry by TTL; a pool of connections that replaces
//! broken ones, a statement timeout and a client-side deadline on every operation).
//!
//! **Scope of keys.** Message ids are per channel; idempotency keys are global to the store
//! (an application that retries after a restart comes back on a new channel, and its key must
//! still be recognised). Keys must therefore be unique across the application's clients
//! (a UUID, or a merchant id and order number).
//!
//! **Claimants.** A claim names its claimant ([`Claim::claimant`]): a token of the receiver
//! that claims. A claim can be written and still be reported as an error (the connection to
//! the database broke after COMMIT, or the answer did not come in time): the receiver does
//! not know whether it holds the claim. Retrying with the same non-zero claimant settles it:
//! a row written by that claimant for the same message answers [`Claimed::Now`] again (the
//! earlier attempt won; its answer was lost), where any other claimant gets
//! [`Claimed::Before`]. [`StoreError::outcome_unknown`] says which errors leave that doubt, and
//! [`DedupeStore::release`] undoes a claim whose message was never handed to the application.
//!
//! **Expiry.** A claim lives at least the store's TTL: [`DedupeStore::expire`] removes claims
//! older than that, and nothing else does. Until then a retry of the message, by id or by
//! key, is refused; after it the message could be delivered again, so the TTL must exceed
//! the longest time an application retries (payment APIs keep keys for 24 h).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

#[cfg(feature = "postgres")]
mod pg;
#[cfg(feature = "postgres")]
pub use pg::{PgStore, PgStoreBuilder, PooledClient, DEFAULT_TABLE, PG_SCHEMA};

/// What a server claims before it delivers a message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Claim {
    /// The channel's id (the same on every replica: the client chooses it).
    pub channel: [u8; 16],
    /// The message id on that channel.
    pub message: u64,
    /// The application's idempotency key, if the sender attached one.
    pub key: Option<Bytes>,
    /// Who claims: a token unique to the claiming receiver, so that it can retry a claim
    /// whose answer was lost. A claim that finds the same (channel, message) already claimed
    /// with the same key by the same non-zero claimant answers [`Claimed::Now`] (its own
    /// earlier attempt committed); `0` is anonymous and never matches. The receiver must
    /// reuse a claimant only to retry a claim it has no answer to: once a claim answered, a
    /// new claim of the same message with the same claimant would be answered `Now` again.
    pub claimant: u64,
}

impl Claim {
    /// The claim of a message delivered on channel `channel` (its [`Channel::id`](crate::channel::Channel::id)),
    /// by an anonymous claimant (`0`: the inbox pattern, where the claim commits with the
    /// application's transaction and a lost answer means a rolled-back transaction).
    pub fn of(channel: [u8; 16], delivered: &crate::proto::Delivered) -> Claim {
        Claim {
            channel,
            message: delivered.id,
            key: delivered.key.clone(),
            claimant: 0,
        }
    }
}

/// The answer to a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// This claim is the first: deliver the message.
    Now,
    /// The message, or its idempotency key, was claimed before (here or on another replica):
    /// it was delivered; ack it without delivering it again.
    Before,
}

/// Why a store could not answer. The message is then neither delivered nor acked: the
/// sender hedges and retries, and its deadline gives the application a definite outcome.
/// [`StoreError::outcome_unknown`] tells whether the operation may nevertheless have taken
/// effect (a claim written whose answer was lost).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The in-memory store is full of unexpired claims (`MemoryStore::new`'s `max_claims`).
    #[error("dedupe store full: {max} unexpired claims")]
    Full {
        /// The limit.
        max: usize,
    },
    /// The store did not answer within `after` (the operation was sent and may have taken effect).
    #[error("dedupe store did not answer within {after:?}")]
    Timeout {
        /// The time allowed.
        after: Duration,
    },
    /// PostgreSQL refused the statement, or the connection broke while it ran.
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL dedupe store: {}", pg::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection to PostgreSQL could be had (connecting failed or timed out, or every
    /// pooled connection stayed busy): nothing was sent.
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL dedupe store unavailable: {0}")]
    Unavailable(String),
    /// The store's configuration is invalid (a bad table name or URL): nothing was sent.
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL dedupe store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether the operation's outcome is unknown: it may have taken effect although it
    /// reported this error (the statement was sent and no answer came, or the connection
    /// broke while it ran). `false`: it definitely did not take effect (the store was full,
    /// no connection could be had, or the database answered that the statement failed,
    /// e.g. cancelled by its statement timeout).
    ///
    /// After an unknown outcome, retry the claim with the same [`Claim::claimant`]: a claim
    /// that was in fact written answers [`Claimed::Now`] to its claimant.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            StoreError::Full { .. } => false,
            StoreError::Timeout { .. } => true,
            #[cfg(feature = "postgres")]
            StoreError::Postgres(e) => !pg::failed_definitely(e),
            #[cfg(feature = "postgres")]
            StoreError::Unavailable(_) | StoreError::Config(_) => false,
        }
    }
}

/// A boxed future of a store's answer (the trait is object safe: servers hold
/// `Arc<dyn DedupeStore>`).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A record of claimed messages, possibly shared by several servers.
pub trait DedupeStore: Send + Sync + fmt::Debug {
    /// Claims `claim`; durable before the future completes with `Ok`. Refused
    /// ([`Claimed::Before`]) if its (channel, message) pair or its key was claimed before
    /// and has not expired.
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed>;

    /// Whether `claim`'s pair, or its key, is claimed.
    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool>;

    /// Undoes `claim` (best effort, for a message claimed but never handed to the
    /// application): deletes the claim only if the store holds it for the same (channel,
    /// message) and key, by the same non-zero claimant; returns whether it did. An anonymous
    /// claim (claimant `0`) is never released. The default releases nothing.
    fn release<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        let _ = claim;
        Box::pin(std::future::ready(Ok(false)))
    }

    /// Removes claims older than the store's TTL; returns how many.
    fn expire(&self) -> StoreFuture<'_, u64>;

    /// The store's TTL: how long a claim is kept at least.
    fn ttl(&self) -> Duration;
}

/// Runs `store.expire()` every `every` on a tokio task until the handle is aborted (a
/// [`Listener`](crate::channel::Listener) with a store does this itself). A failed sweep is
/// logged and tried again at the next tick.
pub fn spawn_expiry<S>(store: Arc<S>, every: Duration) -> tokio::task::JoinHandle<()>
where
    S: DedupeStore + ?Sized + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match store.expire().await {
                Ok(n) if n > 0 => tracing::debug!(expired = n, "surelink: claims expired"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "surelink: expiring claims failed"),
            }
        }
    })
}

/// Claims in this process's memory: the default store for a single server. Bounded: at most
/// `max_claims` unexpired claims; past that, claims fail with [`StoreError::Full`] (the
/// message is not acked and its sender retries later) rather than forgetting a claim early,
/// which could deliver a payment twice. Time is tokio's clock, so the store follows virtual
/// time in tests.
///
/// ```
/// use std::time::Duration;
/// use surelink::store::{Claim, Claimed, DedupeStore, MemoryStore};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let store = MemoryStore::new(Duration::from_secs(24 * 3600), 1_000_000);
/// let claim = Claim { channel: [7; 16], message: 1, key: Some("order-1".into()), claimant: 42 };
/// assert_eq!(store.claim(&claim).await?, Claimed::Now);
/// // The same claimant retrying (its first answer was lost): still its claim.
/// assert_eq!(store.claim(&claim).await?, Claimed::Now);
/// // Anyone else, by id or by key: claimed before.
/// let other = Claim { channel: [8; 16], message: 5, key: Some("order-1".into()), claimant: 9 };
/// assert_eq!(store.claim(&other).await?, Claimed::Before);
/// // Undone by its claimant (the message never reached the application): claimable again.
/// assert!(store.release(&claim).await?);
/// assert_eq!(store.claim(&other).await?, Claimed::Now);
/// # Ok::<(), surelink::store::StoreError>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    ttl: Duration,
    max_claims: usize,
    inner: Mutex<Memory>,
}

/// (channel id, message id).
type Pair = ([u8; 16], u64);

/// One claim held.
#[derive(Debug)]
struct Held {
    at: Instant,
    /// Its place in `Memory::order`.
    seq: u64,
    key: Option<Bytes>,
    claimant: u64,
}

#[derive(Debug, Default)]
struct Memory {
    pairs: HashMap<Pair, Held>,
    /// Key → the pair that claimed it.
    keys: HashMap<Bytes, Pair>,
    /// Claim order (sequence number → pair), oldest first, for expiry; a released claim
    /// leaves it at once.
    order: BTreeMap<u64, Pair>,
    next_seq: u64,
}

impl Memory {
    fn remove(&mut self, pair: &Pair) {
        if let Some(held) = self.pairs.remove(pair) {
            self.order.remove(&held.seq);
            if let Some(k) = held.key {
                self.keys.remove(&k);
            }
        }
    }
}

impl MemoryStore {
    /// A store keeping claims for `ttl`, at most `max_claims` at once.
    pub fn new(ttl: Duration, max_claims: usize) -> MemoryStore {
        MemoryStore {
            ttl,
            max_claims: max_claims.max(1),
            inner: Mutex::default(),
        }
    }

    /// Claims held now (expired ones included until [`DedupeStore::expire`] runs).
    pub fn len(&self) -> usize {
        self.lock().pairs.len()
    }

    /// Whether no claim is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expire_now(&self, m: &mut Memory) -> u64 {
        let now = Instant::now();
        let mut removed = 0;
        while let Some((_, pair)) = m.order.first_key_value() {
            let pair = *pair;
            let at = m.pairs.get(&pair).expect("ordered claims are held").at;
            if now.saturating_duration_since(at) < self.ttl {
                break;
            }
            m.remove(&pair);
            removed += 1;
        }
        removed
    }

    /// Whether `held` is `claim`'s own earlier claim (same key, same non-zero claimant).
    fn owns(held: &Held, claim: &Claim) -> bool {
        claim.claimant != 0 && held.claimant == claim.claimant && held.key == claim.key
    }
}

impl Default for MemoryStore {
    /// 24 h, at most 1,000,000 claims (about 100 MB at most with short keys).
    fn default() -> Self {
        MemoryStore::new(Duration::from_secs(24 * 3600), 1_000_000)
    }
}

impl DedupeStore for MemoryStore {
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        let result = (|| {
            let mut m = self.lock();
            let pair = (claim.channel, claim.message);
            if let Some(held) = m.pairs.get(&pair) {
                return Ok(if MemoryStore::owns(held, claim) {
                    Claimed::Now
                } else {
                    Claimed::Before
                });
            }
            if claim.key.as_ref().is_some_and(|k| m.keys.contains_key(k)) {
                return Ok(Claimed::Before);
            }
            if m.pairs.len() >= self.max_claims {
                self.expire_now(&mut m);
                if m.pairs.len() >= self.max_claims {
                    return Err(StoreError::Full {
                        max: self.max_claims,
                    });
                }
            }
            let seq = m.next_seq;
            m.next_seq += 1;
            if let Some(k) = &claim.key {
                m.keys.insert(k.clone(), pair);
            }
            m.order.insert(seq, pair);
            m.pairs.insert(
                pair,
                Held {
                    at: Instant::now(),
                    seq,
                    key: claim.key.clone(),
                    claimant: claim.claimant,
                },
            );
            Ok(Claimed::Now)
        })();
        Box::pin(std::future::ready(result))
    }

    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        let m = self.lock();
        let known = m.pairs.contains_key(&(claim.channel, claim.message))
            || claim.key.as_ref().is_some_and(|k| m.keys.contains_key(k));
        Box::pin(std::future::ready(Ok(known)))
    }

    fn release<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        let mut m = self.lock();
        let pair = (claim.channel, claim.message);
        let owned = m
            .pairs
            .get(&pair)
            .is_some_and(|held| MemoryStore::owns(held, claim));
        if owned {
            m.remove(&pair);
        }
        Box::pin(std::future::ready(Ok(owned)))
    }

    fn expire(&self) -> StoreFuture<'_, u64> {
        let removed = self.expire_now(&mut self.lock());
        Box::pin(std::future::ready(Ok(removed)))
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(channel: u8, message: u64, key: Option<&'static str>) -> Claim {
        Claim {
            channel: [channel; 16],
            message,
            key: key.map(|k| Bytes::from_static(k.as_bytes())),
            claimant: 0,
        }
    }

    // The claim semantics themselves: `tests/common::check_claim_semantics`, run on both
    // stores (`tests/replicas.rs`, `tests/store_pg.rs`).
    #[tokio::test(start_paused = true)]
    async fn claims_expire_after_the_ttl() {
        let store = MemoryStore::new(Duration::from_secs(10), 100);
        store.claim(&claim(1, 0, None)).await.unwrap();
        store.claim(&claim(2, 0, None)).await.unwrap();
        store.claim(&claim(1, 1, Some("order-1"))).await.unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(store.expire().await.unwrap(), 0, "within the TTL");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(store.expire().await.unwrap(), 3);
        assert!(store.is_empty());
        assert_eq!(
            store.claim(&claim(3, 9, Some("order-1"))).await.unwrap(),
            Claimed::Now,
            "expired: claimable again"
        );
    }

    fn by(claimant: u64, c: Claim) -> Claim {
        Claim { claimant, ..c }
    }

    /// Issue case 2: a released claim leaves the store entirely: it no longer counts against
    /// `max_claims`, its key is free, and expiry does not trip over it.
    #[tokio::test(start_paused = true)]
    async fn a_released_claim_frees_its_room_and_its_key() {
        let store = MemoryStore::new(Duration::from_secs(10), 2);
        let mine = by(7, claim(1, 0, Some("order-1")));
        assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
        store.claim(&claim(1, 1, None)).await.unwrap();
        assert!(matches!(
            store.claim(&claim(1, 2, None)).await,
            Err(StoreError::Full { max: 2 })
        ));
        // Only its claimant releases it, and only with the same key.
        assert!(!store
            .release(&by(8, claim(1, 0, Some("order-1"))))
            .await
            .unwrap());
        assert!(!store.release(&by(7, claim(1, 0, None))).await.unwrap());
        assert!(
            !store.release(&claim(1, 1, None)).await.unwrap(),
            "anonymous"
        );
        assert!(store.release(&mine).await.unwrap());
        assert!(!store.release(&mine).await.unwrap(), "released once");
        assert_eq!(store.len(), 1);
        assert_eq!(
            store
                .claim(&by(9, claim(2, 5, Some("order-1"))))
                .await
                .unwrap(),
            Claimed::Now,
            "the key is free again"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        store
            .release(&by(9, claim(2, 5, Some("order-1"))))
            .await
            .unwrap();
        store.claim(&claim(1, 3, None)).await.unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            store.expire().await.unwrap(),
            1,
            "only (1, 1) is old enough"
        );
        assert_eq!(store.len(), 1);
    }

    /// Issue case 2: a claimant's retry after a lost answer gets `Now`; everyone else, and
    /// the claimant under another key, gets `Before`.
    #[tokio::test]
    async fn a_claimant_retrying_its_own_claim_gets_now() {
        let store = MemoryStore::new(Duration::from_secs(10), 10);
        let mine = by(7, claim(1, 0, Some("k")));
        assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
        assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
        assert_eq!(
            store.claim(&by(8, claim(1, 0, Some("k")))).await.unwrap(),
            Claimed::Before
        );
        assert_eq!(
            store.claim(&by(7, claim(1, 0, None))).await.unwrap(),
            Claimed::Before
        );
        assert_eq!(
            store.claim(&by(7, claim(1, 1, Some("k")))).await.unwrap(),
            Claimed::Before
        );
        assert_eq!(store.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_refuses_rather_than_forgets() {
        let store = MemoryStore::new(Duration::from_secs(10), 2);
        store.claim(&claim(1, 0, None)).await.unwrap();
        store.claim(&claim(1, 1, None)).await.unwrap();
        assert!(matches!(
            store.claim(&claim(1, 2, None)).await,
            Err(StoreError::Full { max: 2 })
        ));
        // Still remembered: nothing was forgotten to make room.
        assert_eq!(
            store.claim(&claim(1, 0, None)).await.unwrap(),
            Claimed::Before
        );
        // Once the oldest expire, there is room again.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(store.claim(&claim(1, 2, None)).await.unwrap(), Claimed::Now);
        assert_eq!(store.len(), 1);
    }
}
