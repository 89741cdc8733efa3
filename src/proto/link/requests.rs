//! Requests and replies (protocol 2): a request is a message whose sender waits for the
//! peer application's reply; the reply is a message the other way, correlated by the
//! request's id, and coded, hedged and acked like any message.
//!
//! A request's life here, one entry in `waiting` ([`Requested`]):
//!
//! ```text
//!   request ──▶ in flight ──reply──▶ Replied (the slot is freed when the sender lets go)
//!                  ├──ack (the peer's application answered)──▶ acked ──reply──▶ Replied
//!                  │                                            └──deadline──▶ NoReply (processed, reply unknown)
//!                  ├──refused / declined──▶ not processed
//!                  └──deadline / connection lost──▶ unknown
//! ```
//!
//! Rules stated once:
//! - **The reply completes the request**, whenever it comes: before its ack (the ack was
//!   lost), or after it. One deadline covers the whole round trip.
//! - **Replies are the channel's, not the application's**: the receiver takes them at once
//!   ([`Receiver::poll_reply`](crate::proto::Receiver::poll_reply)), whether or not the
//!   application reads its `Messages`. A reply nobody waits for (its request timed out) is
//!   dropped, counted.
//! - **The answering side sends what its receiver says** ([`Receiver::poll_reply_out`](
//!   crate::proto::Receiver::poll_reply_out)): the application's reply, or the reply a
//!   retried request's key keeps. A reply that finds the sender full waits here, in order.

use super::*;

/// Most replies waiting for room in the sender; beyond it the oldest is dropped (counted in
/// [`LinkStats::replies_dropped`]): its request's sender learns `NoReply`, and a retry under
/// the request's key gets the reply its key keeps.
const MAX_REPLIES_WAITING: usize = 4096;

/// The token of a send the link makes itself (a reply): its outcome goes to nobody.
pub(super) const INTERNAL: u64 = u64::MAX;

impl Link {
    /// The application sends a request: on the datagram path only (a request is small; one
    /// too large for a datagram fails with `TooLarge`), and only to a protocol-2 peer.
    pub(super) fn request(
        &mut self,
        now: Instant,
        token: u64,
        key: Option<Bytes>,
        payload: Bytes,
        deadline: Option<Duration>,
    ) {
        if self.phase == Phase::Running && self.peer.receiver.protocol() < 2 {
            self.complete(token, Err(SendError::RequestsUnsupported));
            return;
        }
        let len = Envelope::overhead_of(key.as_deref(), Kind::Request) + payload.len();
        let max = self
            .config
            .stream_threshold
            .min(self.config.receiver.reassembler.limits.max_message_len as usize);
        if len > max {
            self.complete(token, Err(SendError::TooLarge { len, max }));
            return;
        }
        self.send(now, token, key, Kind::Request, payload, deadline);
    }

    /// The application answered message `id` (the ack, the refusal and the reply come from
    /// the receiver). Its room in the hand-off came back when it was received (or comes
    /// back now, if it was owed); an answer for a message never received (dropped in the
    /// hand-off when the application went away) frees the room it held.
    pub(super) fn answered(&mut self, now: Instant, id: u64, answer: Answer) {
        if !matches!(answer, Answer::Reply(_)) {
            // Nothing to record with its claim. A nack or a drop says it was not processed:
            // its claim, settled before the hand-over, is released (best effort: a replica
            // that dies first leaves it settled, and a retry is then acked as a replay).
            if let Some((request, claimant, epoch)) = self.settled_handed.remove(&id) {
                if matches!(answer, Answer::Nack | Answer::GiveBack) {
                    self.push_release(&request, claimant, epoch);
                }
            }
        }
        self.peer.receiver.answered(now, id, answer);
        if !self.answer_received(id) {
            self.room += 1;
        }
    }

    /// Takes the replies that arrived (completing their requests) and sends the replies
    /// the receiver has for the peer.
    pub(super) fn exchange_replies(&mut self, now: Instant) {
        while let Some(reply) = self.peer.receiver.poll_reply() {
            self.replied(now, reply.to, reply.payload);
        }
        while let Some(reply) = self.peer.receiver.poll_reply_out() {
            if self.replies_waiting.len() >= MAX_REPLIES_WAITING {
                self.replies_waiting.pop_front();
                self.stats.replies_dropped += 1;
            }
            self.replies_waiting.push_back(reply);
        }
        if self.is_closed() {
            return;
        }
        while let Some((to, payload)) = self.replies_waiting.pop_front() {
            let kind = Kind::Reply { to };
            let len = Envelope::overhead_of(None, kind) + payload.len();
            if len > self.config.stream_threshold && self.config.streams {
                self.send(now, INTERNAL, None, kind, payload, None);
                self.stats.replies_sent += 1;
                continue;
            }
            match self.peer.sender.send_kind(now, None, kind, &payload) {
                Ok(_) => self.stats.replies_sent += 1,
                Err(crate::proto::SendError::Backpressure { .. }) => {
                    // The sender is full: the reply waits for room, first in line.
                    self.replies_waiting.push_front((to, payload));
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "surelink channel: reply not sendable");
                    self.stats.replies_dropped += 1;
                }
            }
        }
    }

    /// The reply to request `to` arrived: it completes the request if it still waits.
    fn replied(&mut self, now: Instant, to: u64, payload: Bytes) {
        let Some(w) = self.waiting.get_mut(&to) else {
            self.stats.replies_unmatched += 1;
            return;
        };
        let Some(r) = &w.request else {
            self.stats.replies_unmatched += 1;
            return;
        };
        if w.completed {
            self.stats.replies_unmatched += 1;
            return;
        }
        let reply = Reply {
            id: to,
            payload,
            latency: now.saturating_duration_since(r.sent),
            replayed: r.acked == Some(true),
        };
        let token = w.token;
        if r.acked.is_some() {
            // The sender let the message go already: the slot is free now.
            self.waiting.remove(&to);
            self.actions.push_back(Action::Replied { token, reply });
            self.actions.push_back(Action::FreeSlot { token });
        } else {
            // Its ack is still to come (or its deadline): the slot is freed then.
            w.completed = true;
            self.actions.push_back(Action::Replied { token, reply });
        }
    }

    /// The sender's ack for message `id`: for a request awaiting its reply, the entry stays
    /// (the reply completes it). Returns whether `id` was such a request.
    pub(super) fn request_acked(&mut self, id: u64, replayed: bool) -> bool {
        match self.waiting.get_mut(&id) {
            Some(Waiting {
                completed: false,
                request: Some(r),
                ..
            }) => {
                r.acked = Some(replayed);
                true
            }
            _ => false,
        }
    }

    /// Request `id`'s deadline passed after its ack, without a reply: it was processed, its
    /// reply is unknown. Returns whether `id` was such a request (handled here).
    pub(super) fn reply_overdue(&mut self, id: u64) -> bool {
        let overdue = matches!(
            self.waiting.get(&id),
            Some(Waiting {
                completed: false,
                request: Some(Requested { acked: Some(_), .. }),
                ..
            })
        );
        if overdue {
            let w = self.waiting.remove(&id).expect("checked");
            self.stats.replies_missing += 1;
            self.complete(w.token, Err(SendError::NoReply { id }));
        }
        overdue
    }
}
