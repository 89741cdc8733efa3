//! surelink: payment messages over lossy networks.
//!
//! surelink delivers small, important messages (payments) over QUIC ([`quinn`]) so that a
//! lost packet costs no retransmission timeout: each message travels as Reed-Solomon coded
//! shards in QUIC DATAGRAM frames, any `k` of `n` shards rebuild it, and a late ack triggers
//! fresh repair shards instead of a wait. Every send ends in an outcome: a [`Receipt`]
//! (the peer's application took the message) or a [`SendError`] that says whether the
//! message may have been delivered; idempotency keys make a retry safe, and a message is
//! never delivered twice, across reconnects and (with a shared claims store) across
//! replicas.
//!
//! # Quickstart
//!
//! A server and a client in one program, over loopback:
//!
//! ```
//! use surelink::channel::{self, Channel, Config, Identity, Listener};
//! use surelink::quinn::Endpoint;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // The server: a QUIC endpoint with a certificate (self-signed here, for development)
//!     // and a Listener that accepts channels on it.
//!     let identity = Identity::self_signed(["localhost"])?;
//!     let server_cert = identity.cert_chain[0].clone();
//!     let server_config = channel::server_config(identity.cert_chain, identity.key)?;
//!     let endpoint = Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
//!     let addr = endpoint.local_addr()?;
//!     let mut listener = Listener::new(endpoint, Config::default());
//!     let server = tokio::spawn(async move {
//!         // One channel per client. This server only receives: it keeps the `Messages` half.
//!         let (_channel, mut messages) = listener.accept().await.expect("a client");
//!         while let Some(payment) = messages.recv().await {
//!             // Taking the payment from `recv` is what acks it to the client.
//!             println!("{:?}: {:?}", payment.key, payment.payload);
//!         }
//!     });
//!
//!     // The client: trust the server's certificate, connect, send keyed payments.
//!     let mut roots = surelink::rustls::RootCertStore::empty();
//!     roots.add(server_cert)?;
//!     let client_config = Some(channel::client_config(roots)?);
//!     let endpoint = Endpoint::client("127.0.0.1:0".parse()?)?;
//!     let (channel, _messages) =
//!         Channel::connect(&endpoint, addr, "localhost", client_config, Config::default()).await?;
//!     for n in 1..=3 {
//!         let key = format!("till-7/order-{n}"); // the idempotency key: one delivery per key
//!         match channel.send_with_key(key, format!("pay {n}.00 EUR")).await {
//!             Ok(receipt) => println!("delivered in {:?}", receipt.latency),
//!             Err(e) if e.may_have_been_delivered() => println!("unknown, retry with the key: {e}"),
//!             Err(e) => println!("not delivered: {e}"),
//!         }
//!     }
//!     channel.close().await; // every send has its outcome; then a goodbye ends the channel
//!     server.await?;
//!     Ok(())
//! }
//! ```
//!
//! The self-signed certificate comes from `channel::Identity::self_signed` (feature `rcgen`); in
//! production, load the service's certificate with [`Identity::from_files`], and trust its
//! CA on the client with [`channel::ServerTrust::ca_file`] and [`channel::client_config_with`].
//!
//! # The stable API
//!
//! - [`channel`]: [`Channel`] (send, with [`SendOptions`]: idempotency key, deadline;
//!   [`Channel::request`](channel::Channel::request): a request and its reply, protocol 2),
//!   [`Messages`] (receive [`Delivered`] messages; answer requests, and with
//!   `Config::explicit_ack` every message, with `reply`, `ack` or `nack`), [`Listener`] and [`Server`] (the server
//!   side), [`Config`] (every setting, with its default), [`SendError`], [`Receipt`],
//!   [`ChannelStats`](channel::ChannelStats), and the TLS helpers.
//! - [`store`]: the claims store replicas share ([`DedupeStore`](store::DedupeStore),
//!   [`MemoryStore`](store::MemoryStore), and `PgStore` with the feature `postgres`).
//! - Re-exports of the crates in surelink's signatures, at the versions it was built with:
//!   [`quinn`] (endpoints, connections, transport configs), [`rustls`] (root stores,
//!   certificates and keys) and [`bytes`] (payloads).
//!
//! # Cargo features
//!
//! | feature | adds |
//! |---|---|
//! | `simd-accel` | SIMD GF(2^8) arithmetic in `reed-solomon-erasure` (needs a C compiler) |
//! | `postgres` | `store::PgStore`: claims in PostgreSQL, shared by replicas |
//! | `rcgen` | `channel::Identity::self_signed`: self-signed certificates for development and tests |
//! | `sim` | the packet-loss simulator (`sim`), and `rcgen` |
//!
//! # Internals: outside the stable API
//!
//! These modules are public so that the fuzz targets, benchmarks and tests can drive the
//! protocol directly. They are not part of the stable API: anything in them may change in
//! any release. Applications use [`channel`] and [`store`].
//!
//! - [`wire`]: frames ⇄ bytes. The wire protocol itself is specified in `docs/PROTOCOL.md`.
//! - [`fec`]: messages ⇄ Reed-Solomon shards, reassembly.
//! - [`proto`]: the sans-I/O protocol state machines, including the channel's whole policy
//!   ([`proto::link`]). The configuration, stats and delivery types [`channel`] re-exports
//!   from here ([`SenderConfig`](channel::SenderConfig),
//!   [`ReceiverConfig`](channel::ReceiverConfig), [`Delivered`], [`Receipt`], …) are part
//!   of the stable API through [`channel`].
//! - [`tune`]: loss models and the redundancy planner.
//! - [`promises`]: the checker of the payment promises that tests and fuzz targets share.
//! - `sim` (feature `sim`): the packet-loss simulator under quinn, for tests, benchmarks and
//!   demos.
//!
//! # Layout
//!
//! | module   | owns | knows nothing of |
//! |----------|------|------------------|
//! | [`wire`] | bytes ⇄ frames (shard, ack, hello, close), varints, [`wire::DecodeError`] | codes, time, sockets |
//! | [`fec`]  | messages ⇄ shards: block building (per message or across messages), parity via `reed-solomon-erasure`, extra repair on demand, reassembly under memory caps | byte layout beyond [`wire`], time sources, sockets |
//! | [`proto`] | the sans-I/O protocol: message ids, first flights, acks, RTT percentile, hedges (budget, backoff), deadlines, dedupe window (delivered, passed and forgotten ids), redundant acks; the receiver's one state per message (`Claiming → Handed → taken`, `Refused`, `Replayed`, `Discarded`); [`proto::keys`]: the idempotency-key record a server's channels share (held until taken, per client, with payload digests, refused when full); input `(now, datagram)`, output datagrams, timers, events. [`proto::link`]: the channel's whole policy as a `Link` driven by `(now, Input)` → `Action`s and a timer, one file per concern (connections and replicas, claims, the stream path, the hand-off, sends) | quinn, tokio, the clock |
//! | [`tune`] | loss models' math (binomial tail, Gilbert-Elliott chain), choosing (k, m, linger, hedge delay) for a target, the online per-shard loss estimate | I/O |
//! | [`channel`] | the async shell: one driver task performs what a `proto::link::Link` decides over quinn connections (datagrams, plus streams for large messages, dials, store calls); `Channel::open`/`connect`, `Listener`/`Server` (channel ids, reconnects), `send` → `Receipt`, `Messages` (bounded), `stats()`, TLS config helpers (PEM/DER identities, CA trust or pinning, mutual TLS; never 0-RTT) | codes |
//! | [`promises`] | the payment promises stated once: a [`promises::Ledger`] of what each sender saw and each application received, checked by every scenario test and fuzz target | transport |
//! | [`store`] | claims of delivered messages shared by replicas: the `DedupeStore` trait, `MemoryStore`, `PgStore` (feature `postgres`) | transport |
//! | `sim` (feature `sim`) | the packet-loss simulator: a seeded link model, an in-memory network of quinn sockets on tokio's clock, the same model over a real UDP socket, an endpoint-pair harness | surelink's protocol: it works under any quinn application |
//!
//! `wire`, `fec`, `proto` and `tune` are pure: they take bytes, messages and `now` as inputs and return bytes,
//! blocks, deadlines and events. Nothing in them spawns a task or reads a clock, which keeps the
//! decoder fuzzable and the protocol deterministic under the simulator. `sim` does I/O (it is
//! a socket) but its link model is pure too.
//!
//! Redundancy is adaptive by default: the sender measures the link's loss per shard from its
//! acks and plans each message's code with [`tune::plan`] (see `proto::SenderConfig::adaptive`).
//!
//! [`Channel`]: channel::Channel
//! [`Messages`]: channel::Messages
//! [`Listener`]: channel::Listener
//! [`Server`]: channel::Server
//! [`Config`]: channel::Config
//! [`SendOptions`]: channel::SendOptions
//! [`SendError`]: channel::SendError
//! [`Receipt`]: channel::Receipt
//! [`Delivered`]: channel::Delivered
//! [`Identity::from_files`]: channel::Identity::from_files

#![forbid(unsafe_code)]
// docs.rs (all features, nightly) labels feature-gated items with the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]

pub use bytes;
pub use quinn;
pub use quinn::rustls;

pub mod channel;
pub mod fec;
pub mod metrics;
pub mod promises;
pub mod proto;
#[cfg(feature = "sim")]
pub mod sim;
pub mod store;
pub mod tune;
pub mod wire;

/// The README's Rust code blocks, compiled and run as doctests so its quickstart stays true.
#[cfg(all(doctest, feature = "rcgen"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
