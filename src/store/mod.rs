//! Claims of delivered messages, shared by the replicas of a service.
//!
//! A server that delivers a message first *claims* it: the pair (channel id, message id) and,
//! when the sender attached one, the application's idempotency key (scoped by the client that
//! sent it). A claim succeeds once; every later claim of the same pair, or of the same
//! client's key under any id, is refused as [`Claimed::Before`], or as [`Claimed::Conflict`]
//! when the key was claimed with another payload. Replicas that share one store therefore
//! deliver each message at most once between them, and a server acks a message only after
//! its claim is durable, so a replica that crashes after acking cannot cause a second
//! delivery elsewhere.
//!
//! Two stores: [`MemoryStore`] (the default, one process, no setup) and, with the `postgres`
//! feature, `PgStore` (a table keyed by channel id + message id and by idempotency key,
//! `INSERT … ON CONFLICT DO NOTHING`, expiry by TTL; a pool of connections that replaces
//! broken ones, a statement timeout and a client-side deadline on every operation).
//!
//! **Scope of keys.** Message ids are per channel; idempotency keys are per *client*
//! ([`Claim::client`]), not per channel (an application that retries after a restart comes
//! back on a new channel, and its key must still be recognised). Under mutual TLS the client
//! is the SHA-256 of its end-entity certificate, so two clients' `order-42` are two keys.
//! Without mutual TLS every client is [`ANONYMOUS`](crate::proto::ANONYMOUS): all of them
//! share one namespace, and keys must be unique across them (a UUID, or a terminal or
//! merchant id before the order number).
//!
//! **A key names one payload.** A claim carries the SHA-256 of its payload
//! ([`Claim::digest`]). A key claimed before with another payload answers
//! [`Claimed::Conflict`]: the message is refused, not acked as a replay (a retry that changed
//! the amount must not be reported delivered).
//!
//! **Channel owners.** A server that takes over a channel it never held (a client failing
//! over from another replica) first binds the channel id to the client
//! ([`DedupeStore::bind_channel`]): a channel belongs to the client that opened it, on every
//! replica, so a second client that learned the id cannot claim the channel's future message
//! ids there. Without mutual TLS every client is the same anonymous owner: the channel id is
//! then a bearer token.
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
//! **Two phases: reserve, then settle** ([`DedupeStore::reserve`], [`DedupeStore::settle`]).
//! A one-phase claim counts as the delivery from the moment it is written, so a replica that
//! dies between its claim and its application's take has lost a message every other replica
//! acks as claimed before. A channel with a store therefore claims in two steps:
//! - it *reserves* the message: a row owned by its claimant, with a lease (a deadline on the
//!   store's clock) and a fencing epoch. Other replicas answer a held reservation
//!   [`Reserved::Busy`]: neither delivered nor free, so they neither deliver nor ack it;
//! - it *settles* the reservation just before its application takes the message, and acks
//!   only after the take. A settle names the epoch it was given; it succeeds only while that
//!   epoch's owner still holds the row ([`Settled::Fenced`] otherwise, and the message must
//!   not be handed over).
//!
//! A reservation whose lease ended is *taken over* by the next replica that reserves the
//! message (or its key): the row gets the new owner and the next epoch, so the old owner's
//! late settle is fenced. An owner that is slow but not taken over still settles (late: the
//! lease bounds how long others wait, not how long the owner may take). What remains: a
//! message settled whose replica dies before its application takes it (at most the one a
//! channel settles at a time), and an application that dies after its take; the inbox
//! pattern ([`PgStore::claim_in`](crate::store::PgStore) with the reservation the message
//! carries) closes both, since the settle commits with the application's effect.
//!
//! **Replies.** A store may keep the application's reply to a request with its claim
//! ([`DedupeStore::record_reply`], [`DedupeStore::reply`]), so that a retry of the request
//! (the same client's key with the same payload, or the same channel and message id) gets
//! the same reply byte for byte on whichever replica it reaches. Only the claimant that
//! settled the claim records it, once: a second, different reply is refused, never written
//! over the first. At most [`MAX_REPLY`] bytes. A reply lives and expires with its claim.
//! Both stores here keep replies; the trait's defaults answer
//! [`StoreError::RepliesUnsupported`].
//!
//! **Expiry.** A claim lives at least the store's TTL: [`DedupeStore::expire`] removes claims
//! older than that, and nothing else does. Until then a retry of the message, by id or by
//! key, is refused; after it the message could be delivered again, so the TTL must exceed
//! the longest time an application retries (payment APIs keep keys for 24 h). A channel's
//! binding to its owner lives at least the TTL after it was last bound, and as long as any
//! claim of the channel does.

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

/// The largest reply a store keeps ([`DedupeStore::record_reply`]): 65,536 bytes. A larger
/// one is refused with [`StoreError::ReplyTooLarge`].
pub const MAX_REPLY: usize = 65_536;

/// What a server claims before it delivers a message.
///
/// `Default` gives an anonymous claim of message 0 on channel `[0; 16]`, for struct
/// literals: `Claim { channel, message, key, ..Claim::default() }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Claim {
    /// The channel's id (the same on every replica: the client chooses it).
    pub channel: [u8; 16],
    /// The message id on that channel.
    pub message: u64,
    /// The application's idempotency key, if the sender attached one.
    pub key: Option<Bytes>,
    /// Whose key: the SHA-256 of the client's end-entity certificate under mutual TLS
    /// ([`Channel::key_scope`](crate::channel::Channel::key_scope)), else
    /// [`ANONYMOUS`](crate::proto::ANONYMOUS) (all zeros: every client without an identity
    /// shares one namespace). A key is unique per (client, key).
    pub client: [u8; 32],
    /// SHA-256 of the message's payload ([`payload_digest`](crate::proto::payload_digest)),
    /// kept with its key: a later claim of the same client's key with another digest answers
    /// [`Claimed::Conflict`]. `None` when the caller does not know it; then no conflict is
    /// found for this claim (nor, later, against it).
    pub digest: Option<[u8; 32]>,
    /// Who claims: a token unique to the claiming receiver, so that it can retry a claim
    /// whose answer was lost. A claim that finds the same (channel, message) already claimed
    /// with the same key by the same non-zero claimant answers [`Claimed::Now`] (its own
    /// earlier attempt committed); `0` is anonymous and never matches. The receiver must
    /// reuse a claimant only to retry a claim it has no answer to: once a claim answered, a
    /// new claim of the same message with the same claimant would be answered `Now` again.
    pub claimant: u64,
    /// The fencing epoch of the reservation this claim settles ([`DedupeStore::settle`], and
    /// [`PgStore::claim_in`](crate::store::PgStore) in the inbox pattern): the epoch
    /// [`Reserved::Held`] gave. `0`: no reservation (a one-phase claim).
    pub epoch: u64,
}

impl Claim {
    /// The claim of a message delivered on channel `channel` (its [`Channel::id`](crate::channel::Channel::id)),
    /// with its payload's digest, for an anonymous client (use [`Claim::with_client`] with
    /// [`Channel::key_scope`](crate::channel::Channel::key_scope) under mutual TLS). In the
    /// inbox pattern the message carries the reservation its channel made
    /// ([`Delivered::lease`](crate::proto::Delivered::lease)): the claim then settles it (its
    /// claimant and epoch); without one it is a one-phase claim by the anonymous claimant
    /// (`0`: a lost answer means a rolled-back transaction).
    pub fn of(channel: [u8; 16], delivered: &crate::proto::Delivered) -> Claim {
        Claim {
            channel,
            message: delivered.id,
            key: delivered.key.clone(),
            client: crate::proto::ANONYMOUS,
            digest: Some(crate::proto::payload_digest(&delivered.payload)),
            claimant: delivered.lease.map_or(0, |l| l.claimant),
            epoch: delivered.lease.map_or(0, |l| l.epoch),
        }
    }

    /// This claim for client `client` (see [`Claim::client`]).
    ///
    /// ```
    /// # fn inbox(channel: &surelink::channel::Channel, m: &surelink::channel::Delivered) {
    /// use surelink::store::Claim;
    /// let claim = Claim::of(channel.id(), m).with_client(channel.key_scope());
    /// # let _ = claim;
    /// # }
    /// ```
    pub fn with_client(self, client: [u8; 32]) -> Claim {
        Claim { client, ..self }
    }
}

/// Refuses a reply longer than [`MAX_REPLY`] ([`StoreError::ReplyTooLarge`]).
fn check_reply(reply: &[u8]) -> Result<(), StoreError> {
    if reply.len() > MAX_REPLY {
        return Err(StoreError::ReplyTooLarge {
            len: reply.len(),
            max: MAX_REPLY,
        });
    }
    Ok(())
}

/// Whether two payload digests may name the same payload (`None` is unknown: it matches).
fn same_payload(a: Option<[u8; 32]>, b: Option<[u8; 32]>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// The answer to a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claimed {
    /// This claim is the first: deliver the message.
    Now,
    /// The message, or its client's idempotency key with the same payload, was claimed before
    /// (here or on another replica): it was delivered; ack it without delivering it again.
    Before,
    /// The client's idempotency key was claimed before with another payload (both claims
    /// carried a [`Claim::digest`]): do not deliver this message, and refuse it (the sender
    /// learns `SendError::KeyReused`). Nothing was recorded.
    Conflict,
    /// Another claimant holds a reservation of the message (or of its key) whose lease has
    /// not ended, or, for a claim that settles a reservation, the reservation was taken over
    /// (fenced): neither delivered nor free. Do not deliver it and do not ack it (roll back):
    /// the replica that holds it delivers it, or a later copy is judged again. Nothing was
    /// recorded.
    Busy,
}

pub use crate::proto::Lease;

/// The answer to a reservation ([`DedupeStore::reserve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reserved {
    /// The claimant holds the message until its lease ends: settle it with `epoch`
    /// ([`DedupeStore::settle`]), then hand it over. `took_over`: the reservation was another
    /// claimant's whose lease had ended (that owner's settle is now fenced).
    Held {
        /// The fencing epoch to settle with.
        epoch: u64,
        /// Whether it was taken over from another owner.
        took_over: bool,
    },
    /// Another claimant's reservation holds it for `retry_in` more: neither delivered nor
    /// free. Do not deliver or ack it; reserve again once the lease ends.
    Busy {
        /// Until the holder's lease ends (by the store's clock).
        retry_in: Duration,
    },
    /// Settled before (delivered, here or by another replica), by id or by its key with the
    /// same payload: ack it, deliver nothing.
    Before,
    /// Its key was claimed (or reserved) with another payload: refuse it. Nothing recorded.
    Conflict,
}

/// The answer to a settle ([`DedupeStore::settle`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// Settled (or settled already by this claimant and epoch: a retry whose first answer
    /// was lost): hand the message over, ack it after the take. `late`: the lease had ended
    /// first (nobody took it over; the owner was slow).
    Now {
        /// Whether the lease had ended before the settle.
        late: bool,
    },
    /// The reservation is no longer this claimant's at this epoch (taken over, released or
    /// expired): do not hand the message over, do not ack it.
    Fenced,
}

/// Why a store could not answer. The message is then neither delivered nor acked: the
/// sender hedges and retries, and its deadline gives the application a definite outcome.
/// [`StoreError::outcome_unknown`] tells whether the operation may nevertheless have taken
/// effect (a claim written whose answer was lost).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The store does not keep replies ([`DedupeStore::record_reply`] and
    /// [`DedupeStore::reply`] have their default implementations): nothing was recorded.
    #[error(
        "dedupe store {store} does not keep replies \
         (DedupeStore::record_reply and reply are not implemented)"
    )]
    RepliesUnsupported {
        /// The store's type.
        store: &'static str,
    },
    /// A reply longer than [`MAX_REPLY`] bytes: nothing was recorded.
    #[error("reply of {len} bytes refused: a store keeps replies of at most {max} bytes")]
    ReplyTooLarge {
        /// The reply's length.
        len: usize,
        /// The limit ([`MAX_REPLY`]).
        max: usize,
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
    /// e.g. cancelled by its statement timeout, or a reply was refused: too large, or the
    /// store keeps none).
    ///
    /// After an unknown outcome, retry the claim with the same [`Claim::claimant`]: a claim
    /// that was in fact written answers [`Claimed::Now`] to its claimant.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            StoreError::Full { .. }
            | StoreError::RepliesUnsupported { .. }
            | StoreError::ReplyTooLarge { .. } => false,
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
    /// Claims `claim` in one phase (reserve and settle at once); durable before the future
    /// completes with `Ok`. Refused ([`Claimed::Before`]) if its (channel, message) pair or
    /// its (client, key) was claimed before and has not expired; [`Claimed::Conflict`]
    /// (nothing recorded) if its pair is new but its (client, key) was claimed with another
    /// payload digest; [`Claimed::Busy`] if another claimant's live reservation holds it (one
    /// whose lease ended is taken over).
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed>;

    /// Reserves `claim` for its claimant for `lease` (two-phase claims; see the module
    /// docs): a fresh row, its own reservation renewed, or one whose lease ended taken over
    /// ([`Reserved::Held`]); another claimant's live reservation of its pair or of its
    /// (client, key) answers [`Reserved::Busy`]; a settled claim [`Reserved::Before`] (or
    /// [`Reserved::Conflict`] for its key with another digest). Durable before `Ok`. The
    /// claimant must be non-zero. Required (a wrapper forwards it).
    fn reserve<'a>(&'a self, claim: &'a Claim, lease: Duration) -> StoreFuture<'a, Reserved>;

    /// Settles the reservation `claim` names (its pair, claimant and [`Claim::epoch`]): the
    /// claim becomes the record of delivery ([`Settled::Now`]), or, if the row is no longer
    /// this claimant's at this epoch, [`Settled::Fenced`]. Idempotent for its owner: a
    /// retry after a lost answer answers `Now` again. Durable before `Ok`. Required.
    fn settle<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Settled>;

    /// Whether `claim`'s pair, or its (client, key), is claimed or reserved.
    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool>;

    /// Undoes `claim` (best effort, for a message reserved or settled but never taken by an
    /// application): deletes the claim or reservation only if the store holds it for the
    /// same (channel, message), client and key, by the same non-zero claimant, at
    /// [`Claim::epoch`] unless that is 0; returns whether it did. An anonymous claim
    /// (claimant `0`) is never released. The default releases nothing.
    fn release<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        let _ = claim;
        Box::pin(std::future::ready(Ok(false)))
    }

    /// Records `reply`, the application's reply to the request this settled claim names, with
    /// the claim: by (client, key) when it has a key, else by (channel, message). Only the
    /// claimant that settled it, at its epoch, may record ([`Claim::claimant`],
    /// [`Claim::epoch`]; epoch 0 = one-phase claim, any claimant with the same claimant
    /// token): the row is the claim's own pair, with the same client and key, settled by the
    /// same non-zero claimant (at [`Claim::epoch`] unless that is 0), as
    /// [`DedupeStore::release`] judges it.
    ///
    /// Answers `true` when recorded (or the same bytes were already recorded), `false` when
    /// fenced (the claim is not this claimant's, or not settled); never overwrites a different
    /// reply already recorded (answers `false`). A reply longer than [`MAX_REPLY`] bytes is
    /// refused ([`StoreError::ReplyTooLarge`]). Durable before `Ok`. The reply lives as long
    /// as its claim: [`DedupeStore::expire`] and [`DedupeStore::release`] remove it with it.
    ///
    /// The default keeps nothing: [`StoreError::RepliesUnsupported`].
    fn record_reply<'a>(&'a self, claim: &'a Claim, reply: &'a [u8]) -> StoreFuture<'a, bool> {
        let _ = (claim, reply);
        Box::pin(std::future::ready(Err(StoreError::RepliesUnsupported {
            store: std::any::type_name::<Self>(),
        })))
    }

    /// The reply recorded with the claim's key (same client and key, and the same digest
    /// when both are known), or keyless, with its (channel, message); `None` if none was
    /// recorded (or the claim was never settled).
    ///
    /// A keyed claim finds the reply under its (client, key) whatever its channel and
    /// message id (a retry after a restart comes on a new channel); a keyless claim finds it
    /// under its (channel, message) for the same client, and only a keyless claim's reply
    /// there. A key whose payload digest differs from the claim's answers `None` (the claim
    /// would be a [`Claimed::Conflict`]).
    ///
    /// The default keeps nothing: [`StoreError::RepliesUnsupported`].
    fn reply<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Option<Bytes>> {
        let _ = claim;
        Box::pin(std::future::ready(Err(StoreError::RepliesUnsupported {
            store: std::any::type_name::<Self>(),
        })))
    }

    /// Binds channel id `channel` to `owner` (the client's identity: the SHA-256 of its
    /// end-entity certificate under mutual TLS, else [`ANONYMOUS`](crate::proto::ANONYMOUS)),
    /// on every replica sharing the store. `true`: the channel is now bound to `owner` (newly,
    /// or again: the binding's lifetime starts afresh); `false`: it is bound to another owner,
    /// and the server must refuse the connection. A server calls it before it takes over a
    /// channel it does not hold, so that a client that learned another's channel id cannot
    /// claim that channel's future message ids on a replica that never held it.
    ///
    /// A binding is removed by [`DedupeStore::expire`] once it is older than the TTL and no
    /// claim of its channel is left. Required, with no default: a store shared by replicas
    /// that bound nothing would let any client take over any channel whose id it learned
    /// (a wrapper forwards it to the store it wraps).
    fn bind_channel(&self, channel: [u8; 16], owner: [u8; 32]) -> StoreFuture<'_, bool>;

    /// Removes claims older than the store's TTL, and the channel bindings that expire with
    /// them; returns how many claims.
    fn expire(&self) -> StoreFuture<'_, u64>;

    /// The store's TTL: how long a claim is kept at least.
    fn ttl(&self) -> Duration;

    /// Whether claims outlive the process (a server warns once when it starts with a store
    /// that says no: a restart forgets every key). Default `true`; [`MemoryStore`] says
    /// `false`.
    fn is_durable(&self) -> bool {
        true
    }
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
/// `max_claims` unexpired claims (and as many channel bindings); past that, claims fail with
/// [`StoreError::Full`] (the message is not acked and its sender retries later) rather than
/// forgetting a claim early, which could deliver a payment twice. Time is tokio's clock, so
/// the store follows virtual time in tests.
///
/// ```
/// use std::time::Duration;
/// use surelink::store::{Claim, Claimed, DedupeStore, MemoryStore};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let store = MemoryStore::new(Duration::from_secs(24 * 3600), 1_000_000);
/// let pay = |channel, message, claimant, payload: &str| Claim {
///     channel: [channel; 16],
///     message,
///     key: Some("order-1".into()),
///     digest: Some(surelink::proto::payload_digest(payload.as_bytes())),
///     claimant,
///     ..Claim::default()
/// };
/// let claim = pay(7, 1, 42, "10.00 EUR");
/// assert_eq!(store.claim(&claim).await?, Claimed::Now);
/// // The same claimant retrying (its first answer was lost): still its claim.
/// assert_eq!(store.claim(&claim).await?, Claimed::Now);
/// // Anyone else, by id or by key: claimed before.
/// let other = pay(8, 5, 9, "10.00 EUR");
/// assert_eq!(store.claim(&other).await?, Claimed::Before);
/// // The key with another payload: a conflict, not a replay.
/// assert_eq!(store.claim(&pay(8, 6, 9, "999.00 EUR")).await?, Claimed::Conflict);
/// // Another client's "order-1" is another key.
/// let theirs = Claim { client: [3; 32], ..pay(8, 7, 9, "999.00 EUR") };
/// assert_eq!(store.claim(&theirs).await?, Claimed::Now);
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

/// (client, idempotency key).
type Key = ([u8; 32], Bytes);

/// One claim held: settled, or a reservation.
#[derive(Debug)]
struct Held {
    /// When it was reserved or settled (expiry counts the TTL from the later).
    at: Instant,
    /// A reservation's lease end; `None` once settled.
    lease: Option<Instant>,
    /// Its fencing epoch (0 for a one-phase claim that found nothing).
    epoch: u64,
    /// Its place in `Memory::order`.
    seq: u64,
    key: Option<Bytes>,
    client: [u8; 32],
    digest: Option<[u8; 32]>,
    claimant: u64,
    /// The application's reply, once its claimant recorded it ([`DedupeStore::record_reply`]).
    reply: Option<Bytes>,
}

/// A channel's owner, bound (or last refreshed, by a bind or a claim) at `at`.
#[derive(Debug)]
struct Binding {
    owner: [u8; 32],
    at: Instant,
    /// Its place in `Memory::bound_order`.
    seq: u64,
}

#[derive(Debug, Default)]
struct Memory {
    pairs: HashMap<Pair, Held>,
    /// (client, key) → the pair that claimed it.
    keys: HashMap<Key, Pair>,
    /// Claim order (sequence number → pair), oldest first, for expiry; a released claim
    /// leaves it at once.
    order: BTreeMap<u64, Pair>,
    next_seq: u64,
    /// Channel id → its owner.
    channels: HashMap<[u8; 16], Binding>,
    /// Bindings by last refresh (sequence number → channel), oldest first, for expiry.
    bound_order: BTreeMap<u64, [u8; 16]>,
}

impl Memory {
    fn remove(&mut self, pair: &Pair) {
        if let Some(held) = self.pairs.remove(pair) {
            self.order.remove(&held.seq);
            if let Some(k) = held.key {
                self.keys.remove(&(held.client, k));
            }
        }
    }

    /// Restarts `pair`'s TTL at `now` (reserved again, taken over or settled).
    fn stamp(&mut self, pair: &Pair, now: Instant) {
        let seq = self.next_seq;
        if let Some(held) = self.pairs.get_mut(pair) {
            self.order.remove(&held.seq);
            held.seq = seq;
            held.at = now;
            self.order.insert(seq, *pair);
            self.next_seq += 1;
        }
    }

    /// Starts `channel`'s binding lifetime afresh at `now` (a bind by its owner, or a claim
    /// on it: a binding outlives its channel's claims).
    fn refresh(&mut self, channel: &[u8; 16], now: Instant) {
        let seq = self.next_seq;
        if let Some(b) = self.channels.get_mut(channel) {
            self.bound_order.remove(&b.seq);
            b.at = now;
            b.seq = seq;
            self.bound_order.insert(seq, *channel);
            self.next_seq += 1;
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

    /// Channel bindings held now ([`DedupeStore::bind_channel`]).
    pub fn channels_bound(&self) -> usize {
        self.lock().channels.len()
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
        // A binding is refreshed by every claim of its channel, so one older than the TTL
        // has no claim left.
        while let Some((&seq, channel)) = m.bound_order.first_key_value() {
            let channel = *channel;
            let at = m
                .channels
                .get(&channel)
                .expect("ordered bindings are held")
                .at;
            if now.saturating_duration_since(at) < self.ttl {
                break;
            }
            m.bound_order.remove(&seq);
            m.channels.remove(&channel);
        }
        removed
    }

    /// Whether `held` is `claim`'s own earlier claim (same client and key, same non-zero
    /// claimant).
    fn owns(held: &Held, claim: &Claim) -> bool {
        claim.claimant != 0
            && held.claimant == claim.claimant
            && held.client == claim.client
            && held.key == claim.key
    }
}

impl Default for MemoryStore {
    /// 24 h, at most 1,000,000 claims (each costs about 350 bytes of map entries besides
    /// its key's bytes and its reply's, by the entries' sizes: some 350 MB when full without
    /// replies; replies, of up to [`MAX_REPLY`] bytes each, add their own length).
    fn default() -> Self {
        MemoryStore::new(Duration::from_secs(24 * 3600), 1_000_000)
    }
}

impl MemoryStore {
    /// Reserves `claim` for `lease` (`None`: claims it in one phase, settled at once), under
    /// the lock. The row that answers is the pair's own, else its (client, key)'s.
    fn take(
        &self,
        m: &mut Memory,
        claim: &Claim,
        lease: Option<Duration>,
    ) -> Result<Reserved, StoreError> {
        let now = Instant::now();
        let pair = (claim.channel, claim.message);
        let by_pair = m.pairs.contains_key(&pair);
        let row = if by_pair {
            Some(pair)
        } else {
            let key = claim.key.as_ref().map(|k| (claim.client, k.clone()));
            key.and_then(|k| m.keys.get(&k).copied())
        };
        let mut epoch = 1;
        let mut took_over = false;
        if let Some(row) = row {
            let held = m.pairs.get(&row).expect("keys name held claims");
            if !by_pair && !same_payload(held.digest, claim.digest) {
                return Ok(Reserved::Conflict);
            }
            let own = by_pair && MemoryStore::owns(held, claim);
            match held.lease {
                // Settled: its owner's one-phase retry (a lost answer) is its own again.
                None if own && lease.is_none() => {
                    return Ok(Reserved::Held {
                        epoch: held.epoch,
                        took_over: false,
                    })
                }
                None => return Ok(Reserved::Before),
                Some(until) if !own && until > now => {
                    return Ok(Reserved::Busy {
                        retry_in: until - now,
                    })
                }
                _ => {}
            }
            // Its own reservation (renewed, or settled now), or one whose lease ended (taken
            // over: the next epoch, so the old owner's settle is fenced).
            took_over = !own;
            epoch = held.epoch + u64::from(took_over);
            if by_pair {
                let held = m.pairs.get_mut(&row).expect("held");
                held.claimant = claim.claimant;
                held.epoch = epoch;
                held.lease = lease.map(|l| now + l);
                m.stamp(&row, now);
                m.refresh(&claim.channel, now);
                return Ok(Reserved::Held { epoch, took_over });
            }
            // The key's reservation was another message's (a retry under a new id): that row
            // goes, this one holds the key.
            m.remove(&row);
        }
        if m.pairs.len() >= self.max_claims {
            self.expire_now(m);
            if m.pairs.len() >= self.max_claims {
                return Err(StoreError::Full {
                    max: self.max_claims,
                });
            }
        }
        let seq = m.next_seq;
        m.next_seq += 1;
        if let Some(k) = &claim.key {
            m.keys.insert((claim.client, k.clone()), pair);
        }
        m.order.insert(seq, pair);
        m.pairs.insert(
            pair,
            Held {
                at: now,
                lease: lease.map(|l| now + l),
                epoch,
                seq,
                key: claim.key.clone(),
                client: claim.client,
                digest: claim.digest,
                claimant: claim.claimant,
                reply: None,
            },
        );
        m.refresh(&claim.channel, now);
        Ok(Reserved::Held { epoch, took_over })
    }
}

impl DedupeStore for MemoryStore {
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        let result = self.take(&mut self.lock(), claim, None).map(|r| match r {
            Reserved::Held { .. } => Claimed::Now,
            Reserved::Busy { .. } => Claimed::Busy,
            Reserved::Before => Claimed::Before,
            Reserved::Conflict => Claimed::Conflict,
        });
        Box::pin(std::future::ready(result))
    }

    fn reserve<'a>(&'a self, claim: &'a Claim, lease: Duration) -> StoreFuture<'a, Reserved> {
        let result = if claim.claimant == 0 {
            // An anonymous reservation could never be settled: nobody owns it.
            Ok(Reserved::Busy { retry_in: lease })
        } else {
            self.take(&mut self.lock(), claim, Some(lease))
        };
        Box::pin(std::future::ready(result))
    }

    fn settle<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Settled> {
        let now = Instant::now();
        let mut m = self.lock();
        let pair = (claim.channel, claim.message);
        let answer = match m.pairs.get_mut(&pair) {
            Some(held)
                if MemoryStore::owns(held, claim)
                    && claim.epoch != 0
                    && held.epoch == claim.epoch =>
            {
                match held.lease.take() {
                    Some(until) => {
                        m.stamp(&pair, now);
                        Settled::Now { late: now > until }
                    }
                    None => Settled::Now { late: false },
                }
            }
            _ => Settled::Fenced,
        };
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        let m = self.lock();
        let known = m.pairs.contains_key(&(claim.channel, claim.message))
            || claim
                .key
                .as_ref()
                .is_some_and(|k| m.keys.contains_key(&(claim.client, k.clone())));
        Box::pin(std::future::ready(Ok(known)))
    }

    fn release<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        let mut m = self.lock();
        let pair = (claim.channel, claim.message);
        let owned = m.pairs.get(&pair).is_some_and(|held| {
            MemoryStore::owns(held, claim) && (claim.epoch == 0 || held.epoch == claim.epoch)
        });
        if owned {
            m.remove(&pair);
        }
        Box::pin(std::future::ready(Ok(owned)))
    }

    fn record_reply<'a>(&'a self, claim: &'a Claim, reply: &'a [u8]) -> StoreFuture<'a, bool> {
        let result = check_reply(reply).map(|()| {
            let mut m = self.lock();
            match m.pairs.get_mut(&(claim.channel, claim.message)) {
                Some(held)
                    if MemoryStore::owns(held, claim)
                        && (claim.epoch == 0 || held.epoch == claim.epoch)
                        && held.lease.is_none() =>
                {
                    match &held.reply {
                        Some(recorded) => recorded[..] == reply[..],
                        None => {
                            held.reply = Some(Bytes::copy_from_slice(reply));
                            true
                        }
                    }
                }
                _ => false,
            }
        });
        Box::pin(std::future::ready(result))
    }

    fn reply<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Option<Bytes>> {
        let m = self.lock();
        let held = match &claim.key {
            Some(k) => m
                .keys
                .get(&(claim.client, k.clone()))
                .and_then(|pair| m.pairs.get(pair)),
            None => m
                .pairs
                .get(&(claim.channel, claim.message))
                .filter(|held| held.key.is_none() && held.client == claim.client),
        };
        let reply = held
            .filter(|held| held.lease.is_none() && same_payload(held.digest, claim.digest))
            .and_then(|held| held.reply.clone());
        Box::pin(std::future::ready(Ok(reply)))
    }

    fn bind_channel(&self, channel: [u8; 16], owner: [u8; 32]) -> StoreFuture<'_, bool> {
        let result = (|| {
            let mut m = self.lock();
            let now = Instant::now();
            if let Some(b) = m.channels.get(&channel) {
                if b.owner != owner {
                    return Ok(false);
                }
                m.refresh(&channel, now);
                return Ok(true);
            }
            if m.channels.len() >= self.max_claims {
                self.expire_now(&mut m);
                if m.channels.len() >= self.max_claims {
                    return Err(StoreError::Full {
                        max: self.max_claims,
                    });
                }
            }
            let seq = m.next_seq;
            m.next_seq += 1;
            m.bound_order.insert(seq, channel);
            m.channels.insert(
                channel,
                Binding {
                    owner,
                    at: now,
                    seq,
                },
            );
            Ok(true)
        })();
        Box::pin(std::future::ready(result))
    }

    fn expire(&self) -> StoreFuture<'_, u64> {
        let removed = self.expire_now(&mut self.lock());
        Box::pin(std::future::ready(Ok(removed)))
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn is_durable(&self) -> bool {
        false
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
            ..Claim::default()
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

    /// A reply lives as long as its claim: expiry removes both (the reply semantics
    /// themselves: `tests/common::check_reply_semantics`, run on both stores).
    #[tokio::test(start_paused = true)]
    async fn a_reply_expires_with_its_claim() {
        let store = MemoryStore::new(Duration::from_secs(10), 100);
        let mine = by(7, claim(1, 0, Some("auth-1")));
        assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(store.record_reply(&mine, b"approved").await.unwrap());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            store.expire().await.unwrap(),
            1,
            "recording a reply does not extend its claim's life"
        );
        assert_eq!(store.reply(&mine).await.unwrap(), None);
        assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
        assert_eq!(store.reply(&mine).await.unwrap(), None, "a new claim");
    }

    /// A store written before replies (it implements only the required methods) still
    /// compiles, and says clearly that it keeps none.
    #[tokio::test]
    async fn a_store_without_replies_says_so() {
        #[derive(Debug, Default)]
        struct Plain(MemoryStore);
        impl DedupeStore for Plain {
            fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
                self.0.claim(claim)
            }
            fn reserve<'a>(&'a self, c: &'a Claim, lease: Duration) -> StoreFuture<'a, Reserved> {
                self.0.reserve(c, lease)
            }
            fn settle<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Settled> {
                self.0.settle(claim)
            }
            fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
                self.0.lookup(claim)
            }
            fn bind_channel(&self, channel: [u8; 16], owner: [u8; 32]) -> StoreFuture<'_, bool> {
                self.0.bind_channel(channel, owner)
            }
            fn expire(&self) -> StoreFuture<'_, u64> {
                self.0.expire()
            }
            fn ttl(&self) -> Duration {
                self.0.ttl()
            }
        }
        let store: &dyn DedupeStore = &Plain::default();
        let mine = by(7, claim(1, 0, Some("auth-1")));
        assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
        let err = store.record_reply(&mine, b"approved").await.unwrap_err();
        assert!(
            matches!(err, StoreError::RepliesUnsupported { store } if store.ends_with("Plain")),
            "{err:?}"
        );
        assert!(!err.outcome_unknown());
        assert!(err.to_string().contains("does not keep replies"), "{err}");
        assert!(matches!(
            store.reply(&mine).await,
            Err(StoreError::RepliesUnsupported { .. })
        ));
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

    /// A release names its epoch: it deletes a reservation (or a claim settled from one) of
    /// that epoch only, so a stale release cannot undo a later reservation by the same
    /// claimant (found by the review of issue 23).
    #[tokio::test(start_paused = true)]
    async fn a_release_names_its_epoch() {
        let store = MemoryStore::new(Duration::from_secs(60), 10);
        let mine = by(7, claim(1, 0, Some("k")));
        let lease = Duration::from_secs(2);
        assert!(matches!(
            store.reserve(&mine, lease).await.unwrap(),
            Reserved::Held { epoch: 1, .. }
        ));
        let stale = Claim {
            epoch: 2,
            ..mine.clone()
        };
        assert!(!store.release(&stale).await.unwrap(), "another epoch");
        let own = Claim {
            epoch: 1,
            ..mine.clone()
        };
        assert!(store.release(&own).await.unwrap());
        assert!(store.is_empty());
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

    /// Issue 21 case 7: a binding lives the TTL after its last bind by its owner or claim
    /// of its channel, and goes with the channel's last claim; then another owner may bind
    /// the id. Bindings are bounded like claims.
    #[tokio::test(start_paused = true)]
    async fn a_binding_expires_with_its_channels_claims() {
        let (a, b) = ([1; 32], [2; 32]);
        let store = MemoryStore::new(Duration::from_secs(10), 2);
        assert!(store.bind_channel([1; 16], a).await.unwrap());
        assert!(!store.bind_channel([1; 16], b).await.unwrap());
        tokio::time::advance(Duration::from_secs(5)).await;
        store.claim(&claim(1, 0, None)).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(store.expire().await.unwrap(), 0);
        assert!(
            !store.bind_channel([1; 16], b).await.unwrap(),
            "11 s after the bind, 6 s after its claim: still a's"
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(store.expire().await.unwrap(), 1);
        assert_eq!(store.channels_bound(), 0, "gone with its last claim");
        assert!(store.bind_channel([1; 16], b).await.unwrap());
        // A bind by its owner starts the binding's lifetime afresh.
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(store.bind_channel([1; 16], b).await.unwrap());
        tokio::time::advance(Duration::from_secs(8)).await;
        store.expire().await.unwrap();
        assert!(!store.bind_channel([1; 16], a).await.unwrap());
        // At most `max_claims` bindings: refused rather than forgotten.
        assert!(store.bind_channel([2; 16], a).await.unwrap());
        assert!(matches!(
            store.bind_channel([3; 16], a).await,
            Err(StoreError::Full { max: 2 })
        ));
        assert!(
            store.bind_channel([2; 16], a).await.unwrap(),
            "bound already"
        );
    }

    /// Issue 21 cases 6 and 8: a released claim frees its client's key only; a conflict
    /// records nothing and counts against nothing.
    #[tokio::test]
    async fn keys_are_per_client_and_a_conflict_records_nothing() {
        let store = MemoryStore::new(Duration::from_secs(10), 2);
        let digest = |p: &str| Some(crate::proto::payload_digest(p.as_bytes()));
        let pay = |channel, message, client, payload| Claim {
            digest: digest(payload),
            ..claim(channel, message, Some("k")).with_client(client)
        };
        let mine = by(7, pay(1, 0, [1; 32], "10.00"));
        assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
        assert_eq!(
            store.claim(&pay(2, 0, [1; 32], "99.00")).await.unwrap(),
            Claimed::Conflict
        );
        assert_eq!(store.len(), 1);
        assert_eq!(
            store.claim(&pay(2, 0, [2; 32], "99.00")).await.unwrap(),
            Claimed::Now,
            "another client's key"
        );
        assert!(
            !store
                .release(&by(7, pay(1, 0, [2; 32], "10.00")))
                .await
                .unwrap(),
            "released only by its own client"
        );
        assert!(store.release(&mine).await.unwrap());
        assert_eq!(
            store.claim(&pay(3, 0, [1; 32], "99.00")).await.unwrap(),
            Claimed::Now,
            "the key is free again"
        );
        assert_eq!(
            store.claim(&pay(4, 0, [2; 32], "10.00")).await.unwrap(),
            Claimed::Conflict,
            "client 2's key still names its own payload"
        );
    }
}
