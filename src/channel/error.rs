//! The one error a `send` returns: [`SendError`], and why a message was refused before it
//! was sent ([`RejectReason`]).

use crate::proto::link::SendError as LinkError;

/// Why a message has no [`Receipt`](super::Receipt): the one error every `send` of a
/// [`Channel`](super::Channel) returns.
///
/// Every variant says whether the message may have been delivered
/// ([`may_have_been_delivered`](Self::may_have_been_delivered)) and whether sending it again
/// can end differently ([`is_retryable`](Self::is_retryable)):
///
/// | variant | may have been delivered | retryable |
/// |---|---|---|
/// | [`Timeout`](Self::Timeout), [`ConnectionLost`](Self::ConnectionLost) | **yes**: retry only with the same idempotency key | yes |
/// | [`Refused`](Self::Refused) | no | yes (it may be refused again for the same reason) |
/// | [`Declined`](Self::Declined) | no: the peer's application did not process it | yes |
/// | [`NoReply`](Self::NoReply) (a request) | **yes**, it was processed: retry with the same key to get its reply | yes |
/// | [`RequestsUnsupported`](Self::RequestsUnsupported) | no: nothing was sent | no |
/// | [`Rejected`](Self::Rejected) | no: nothing was sent | only for [`RejectReason::Backpressure`] |
/// | [`TooLarge`](Self::TooLarge), [`DatagramsUnsupported`](Self::DatagramsUnsupported) | no: nothing was sent | no |
/// | [`Closed`](Self::Closed) | no: nothing was sent | not on this channel |
///
/// A retry with the same idempotency key ([`SendOptions::key`](super::SendOptions::key)) is
/// safe while the peer keeps the key: it delivers at most one message per key for
/// `ReceiverConfig::key_ttl` (24 h by default), **as long as its key record survives**. A
/// server without a durable claims store (`Config::store`, e.g. `PgStore`) keeps its keys in
/// memory: a restart or a rolling deploy forgets them, and a retry after it may be delivered
/// again (such a server logs a warning once when it starts). A retry without a key is safe
/// only when [`may_have_been_delivered`](Self::may_have_been_delivered) is `false`.
///
/// ```
/// use surelink::channel::{Channel, SendError, SendOptions};
///
/// /// Sends a payment until it has a definite outcome: retries under the same key
/// /// while the outcome is unknown, gives up on a definite refusal.
/// async fn pay(channel: &Channel, key: &str, payment: &[u8]) -> Result<u64, SendError> {
///     loop {
///         let options = SendOptions::default().key(key.to_owned());
///         match channel.send_with(payment.to_vec(), options).await {
///             Ok(receipt) => return Ok(receipt.id),
///             // Delivered or not, the same key makes the retry safe.
///             Err(e) if e.may_have_been_delivered() => continue,
///             Err(e) => return Err(e),
///         }
///     }
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No ack before the deadline ([`SendOptions::deadline`](super::SendOptions::deadline),
    /// else `SenderConfig::deadline`, 5 s by default): the outcome is unknown.
    #[error("message {id}: no ack before the deadline; outcome unknown, retry with the same idempotency key (safe while the server keeps its keys: durably with a claims store)")]
    Timeout {
        /// The message id on this channel.
        id: u64,
    },
    /// The connection was lost (and not regained) while the message was in flight: the
    /// outcome is unknown.
    #[error("connection lost while the message was in flight; outcome unknown, retry with the same idempotency key (safe while the server keeps its keys: durably with a claims store): {reason}")]
    ConnectionLost {
        /// What happened.
        reason: String,
    },
    /// The message was refused before anything was sent (it was not delivered).
    #[error("message refused, nothing sent: {0}")]
    Rejected(RejectReason),
    /// The message is larger than this channel carries
    /// ([`Config::max_message_size`](super::Config::max_message_size), or the stream
    /// threshold when [`Config::streams`](super::Config::streams) is off); nothing was sent.
    #[error("message of {len} bytes, this channel carries at most {max}; nothing sent")]
    TooLarge {
        /// The message's length (payload and key).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The peer refused the message (outside its dedupe window, malformed, its key store
    /// full, or its application gone; [`RefuseReason`] says which): it was not delivered.
    #[error("message {id}: refused by the peer ({reason}), not delivered")]
    #[non_exhaustive]
    Refused {
        /// The message id on this channel.
        id: u64,
        /// Why.
        reason: RefuseReason,
    },
    /// The message's idempotency key was delivered before with another payload (another
    /// amount, another terminal, a bug in the client): this message was not delivered, and
    /// never will be under that key. Do not retry with the same key; find out which payment
    /// the key was used for.
    #[error(
        "message {id}: its idempotency key was already used for another payload; not delivered"
    )]
    KeyReused {
        /// The message id on this channel.
        id: u64,
    },
    /// The peer does not accept QUIC DATAGRAM frames, or the path is too small for them.
    #[error("the connection does not carry QUIC datagrams")]
    DatagramsUnsupported,
    /// The channel is closing or has stopped; nothing was sent.
    #[error("channel closed; nothing sent")]
    Closed,
    /// The peer's application declined the message or request ([`Delivered::nack`](
    /// super::Delivered::nack)): it did not process it. A retry under its key is delivered
    /// afresh.
    #[error("message {id}: declined by the peer's application, not processed")]
    Declined {
        /// The message id on this channel.
        id: u64,
    },
    /// A request ([`Channel::request`](super::Channel::request)) was processed by the
    /// peer's application (it was acked), but its reply did not come before the deadline.
    /// Retry with the same idempotency key: the peer answers the retry with the reply its
    /// key keeps, without processing the request again.
    #[error("request {id}: processed by the peer, but no reply before the deadline; retry with the same idempotency key to get its reply")]
    NoReply {
        /// The request's message id on this channel.
        id: u64,
    },
    /// The channel speaks protocol 1 (a peer of an older version), which has no requests:
    /// nothing was sent.
    #[error("the peer speaks protocol 1, which has no requests; nothing sent")]
    RequestsUnsupported,
}

/// Why a request ([`Channel::request`](super::Channel::request)) has no reply: the same
/// outcomes as a send's. [`may_have_been_delivered`](SendError::may_have_been_delivered) is
/// `true` when the request may have been processed (retry with the same key: a processed
/// request is answered with its first reply, never processed twice), `false` when it
/// certainly was not (refused, declined, or never sent).
pub type RequestError = SendError;

impl SendError {
    /// Whether the message may have been delivered: `true` for an unknown outcome
    /// ([`SendError::Timeout`], [`SendError::ConnectionLost`]), where a retry must carry the
    /// same idempotency key (the peer then delivers it at most once); `false` when it
    /// certainly was not, so a retry is safe with or without a key.
    pub fn may_have_been_delivered(&self) -> bool {
        matches!(
            self,
            SendError::Timeout { .. }
                | SendError::ConnectionLost { .. }
                | SendError::NoReply { .. }
        )
    }

    /// Whether sending the same message again on this channel can end differently. `false`
    /// when a retry would fail the same way: the message is too large or cannot be coded,
    /// its key is invalid, the connection carries no datagrams, or the channel is closed.
    /// Whatever this says, retry with the same idempotency key when
    /// [`may_have_been_delivered`](Self::may_have_been_delivered) is `true`.
    pub fn is_retryable(&self) -> bool {
        match self {
            SendError::Timeout { .. } | SendError::ConnectionLost { .. } => true,
            SendError::Refused { reason, .. } => reason.is_retryable(),
            SendError::Declined { .. } | SendError::NoReply { .. } => true,
            SendError::Rejected(reason) => matches!(reason, RejectReason::Backpressure { .. }),
            SendError::TooLarge { .. }
            | SendError::KeyReused { .. }
            | SendError::DatagramsUnsupported
            | SendError::RequestsUnsupported
            | SendError::Closed => false,
        }
    }
}

/// Why the peer refused a message ([`SendError::Refused`]): the REFUSE frame's reason
/// (docs/PROTOCOL.md §11). Whatever it is, the message was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefuseReason {
    /// Its envelope did not decode (reason 1): sending it again fails the same way.
    #[error("malformed")]
    Malformed,
    /// Its id was too far above the peer's dedupe window (2): a retry later may pass.
    #[error("outside the peer's window")]
    OutOfWindow,
    /// The peer holds as many idempotency keys as it may (3): retry once keys expire.
    #[error("the peer's key record is full")]
    KeysFull,
    /// Its block's code was wider than the peer accepts (4): this sender's configuration.
    #[error("block wider than the peer accepts")]
    Block,
    /// The peer's application is gone (5): not on this channel; a new one may work.
    #[error("the peer's application is gone")]
    ApplicationGone,
    /// The peer's floor passed its id before it was delivered (6): send it again (a new
    /// id), under its key.
    #[error("its id was passed")]
    Passed,
    /// No reason given (a stream message refused by its status byte or reset), or one this
    /// version does not know.
    #[error("reason {0}")]
    Other(u64),
}

impl RefuseReason {
    /// The reason for a REFUSE code.
    pub fn from_code(code: u64) -> Self {
        use crate::wire::*;
        match code {
            REFUSE_MALFORMED => RefuseReason::Malformed,
            REFUSE_OUT_OF_WINDOW => RefuseReason::OutOfWindow,
            REFUSE_KEYS_FULL => RefuseReason::KeysFull,
            REFUSE_BLOCK => RefuseReason::Block,
            REFUSE_CLOSED => RefuseReason::ApplicationGone,
            REFUSE_PASSED => RefuseReason::Passed,
            other => RefuseReason::Other(other),
        }
    }

    /// Whether sending the message again on this channel can end differently: not for a
    /// malformed message, a block too wide, or an application gone.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            RefuseReason::Malformed | RefuseReason::Block | RefuseReason::ApplicationGone
        )
    }
}

/// Why a message was refused before anything was sent ([`SendError::Rejected`]). It was not
/// delivered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// The idempotency key is empty or longer than 255 bytes.
    #[error("idempotency key of {len} bytes, allowed 1..=255")]
    InvalidKey {
        /// The key's length.
        len: usize,
    },
    /// The oldest message still awaiting its outcome holds the id span the peer's dedupe
    /// window allows (`SenderConfig::max_id_span`); retry once it has its outcome.
    #[error("backpressure: {in_flight} messages in flight and the oldest holds the id span")]
    Backpressure {
        /// Messages in flight.
        in_flight: usize,
    },
    /// The message cannot be coded into this connection's datagrams (the path's datagrams
    /// are too small, or the configuration leaves no room for shards).
    #[error("cannot be coded into datagrams: {reason}")]
    Unencodable {
        /// What the coder said.
        reason: String,
    },
}

impl From<crate::proto::SendError> for RejectReason {
    fn from(e: crate::proto::SendError) -> Self {
        match e {
            crate::proto::SendError::InvalidKey { len } => RejectReason::InvalidKey { len },
            crate::proto::SendError::Backpressure { in_flight } => {
                RejectReason::Backpressure { in_flight }
            }
            crate::proto::SendError::Encode(e) => RejectReason::Unencodable {
                reason: e.to_string(),
            },
        }
    }
}

impl From<LinkError> for SendError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Timeout { id } => SendError::Timeout { id },
            LinkError::ConnectionLost { reason } => SendError::ConnectionLost { reason },
            LinkError::Rejected(e) => SendError::Rejected(e.into()),
            LinkError::TooLarge { len, max } => SendError::TooLarge { len, max },
            LinkError::Refused { id, reason } => SendError::Refused {
                id,
                reason: RefuseReason::from_code(reason),
            },
            LinkError::KeyReused { id } => SendError::KeyReused { id },
            LinkError::DatagramsUnsupported => SendError::DatagramsUnsupported,
            LinkError::Closed => SendError::Closed,
            LinkError::Declined { id } => SendError::Declined { id },
            LinkError::NoReply { id } => SendError::NoReply { id },
            LinkError::RequestsUnsupported => SendError::RequestsUnsupported,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_core_error_keeps_its_meaning() {
        let cases = [
            LinkError::Timeout { id: 3 },
            LinkError::ConnectionLost {
                reason: "gone".into(),
            },
            LinkError::Rejected(crate::proto::SendError::InvalidKey { len: 0 }),
            LinkError::Rejected(crate::proto::SendError::Backpressure { in_flight: 9 }),
            LinkError::TooLarge { len: 10, max: 5 },
            LinkError::Refused { id: 4, reason: 3 },
            LinkError::Refused { id: 4, reason: 5 },
            LinkError::DatagramsUnsupported,
            LinkError::Closed,
            LinkError::Declined { id: 5 },
            LinkError::NoReply { id: 6 },
            LinkError::RequestsUnsupported,
        ];
        for core in cases {
            let public = SendError::from(core.clone());
            assert_eq!(
                public.may_have_been_delivered(),
                core.may_have_been_delivered(),
                "{core:?}"
            );
        }
        assert!(
            SendError::from(LinkError::Rejected(crate::proto::SendError::Backpressure {
                in_flight: 9
            }))
            .is_retryable()
        );
        // The refusal's reason survives, and says whether sending again can help: keys
        // full can (later), an application gone cannot on this channel.
        let refused = |reason| SendError::from(LinkError::Refused { id: 4, reason });
        assert!(matches!(
            refused(crate::wire::REFUSE_KEYS_FULL),
            SendError::Refused {
                reason: RefuseReason::KeysFull,
                ..
            }
        ));
        assert!(refused(crate::wire::REFUSE_KEYS_FULL).is_retryable());
        assert!(!refused(crate::wire::REFUSE_CLOSED).is_retryable());
        assert!(!refused(crate::wire::REFUSE_MALFORMED).is_retryable());
        assert!(refused(0).is_retryable(), "no reason given: as before");
        assert!(refused(crate::wire::REFUSE_CLOSED)
            .to_string()
            .contains("application is gone"));
        assert!(
            !SendError::from(LinkError::Rejected(crate::proto::SendError::InvalidKey {
                len: 0
            }))
            .is_retryable()
        );
    }
}
