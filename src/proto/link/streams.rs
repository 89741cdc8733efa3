//! The stream path: large messages sent on streams (start, outcome, retry on the next
//! connection), and stream messages received (judged now, parked while the application is
//! behind, bounded, dropped with their connection).

use super::*;

impl Link {
    /// Parks a stream message until the application catches up. Parked messages hold at most
    /// `max_queued_bytes` (or one message): past it a copy of a message the receiver knows is
    /// answered at once (it adds nothing to the backlog), and a new one is refused (it was not
    /// delivered: its sender may retry it, with its key).
    pub(super) fn park(&mut self, now: Instant, answer: u64, message: Bytes) {
        let over = !self.parked.is_empty()
            && self.parked_bytes + message.len() > self.config.receiver.max_queued_bytes;
        if over {
            let id = crate::wire::decode_stream_message(message.clone())
                .ok()
                .map(|(id, _)| id);
            let parked = |id: u64| {
                self.parked.iter().any(|(_, m)| {
                    crate::wire::decode_stream_message(m.clone()).is_ok_and(|(p, _)| p == id)
                })
            };
            if id.is_some_and(parked) {
                // A copy of a parked message: its answer comes with the parked one's (this
                // stream gets none; its sender retries or learns an unknown outcome).
                self.actions.push_back(Action::AnswerStream {
                    answer,
                    status: None,
                });
            } else if id.is_some_and(|id| self.peer.receiver.is_new(now, id)) {
                self.stats.streams_refused_parked += 1;
                self.actions.push_back(Action::AnswerStream {
                    answer,
                    status: Some(crate::wire::STREAM_REFUSED),
                });
            } else {
                self.take_stream_message(now, answer, message);
            }
            return;
        }
        self.parked_bytes += message.len();
        self.parked.push_back((answer, message));
    }

    /// Parked stream messages are dropped unanswered (their streams belong to a connection
    /// that was replaced, or the channel ends).
    pub(super) fn drop_parked(&mut self) {
        self.parked_bytes = 0;
        for (answer, _) in std::mem::take(&mut self.parked) {
            self.actions.push_back(Action::AnswerStream {
                answer,
                status: None,
            });
        }
    }

    pub(super) fn start_stream(&mut self, id: u64) {
        let (Some(conn), Some(s)) = (self.primary, self.streams.get_mut(&id)) else {
            return;
        };
        s.running_on = Some((conn, self.generation));
        s.attempts += 1;
        self.actions.push_back(Action::OpenStream {
            conn,
            id,
            head: s.head.clone(),
            body: s.body.clone(),
            deadline: s.deadline,
        });
    }

    pub(super) fn stream_done(&mut self, now: Instant, id: u64, conn: ConnId, end: StreamEnd) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Some((on, generation)) = s.running_on else {
            return;
        };
        if on != conn {
            return;
        }
        let outcome = match end {
            StreamEnd::Status(STREAM_DELIVERED) => Ok(false),
            StreamEnd::Status(STREAM_REPLAYED) if self.config.protocol >= 2 => Ok(true),
            StreamEnd::Status(_) | StreamEnd::Refused if self.crossed.contains(&id) => {
                Err(SendError::ConnectionLost {
                    reason: REFUSED_AFTER_FAILOVER.into(),
                })
            }
            // A reset says only that this stream was not read: a re-sent stream's first copy,
            // or another message with its key, may have been delivered.
            StreamEnd::Refused if s.keyed || s.attempts > 1 => Err(SendError::ConnectionLost {
                reason: RESET_UNKNOWN.into(),
            }),
            StreamEnd::Status(_) | StreamEnd::Refused => Err(SendError::Refused { id, reason: 0 }),
            StreamEnd::Deadline => Err(SendError::Timeout { id }),
            StreamEnd::Connection(reason) => {
                let may_retry = self.role != Role::Plain && now < s.deadline;
                if generation < self.fresh_since {
                    Err(SendError::ConnectionLost {
                        reason: PEER_LOST_STATE.into(),
                    })
                } else if !may_retry {
                    Err(SendError::ConnectionLost { reason })
                } else {
                    // Same id on the next connection: the peer's dedupe window makes the
                    // retry safe even if the first attempt was delivered.
                    s.running_on = None;
                    if generation != self.generation {
                        self.start_stream(id);
                    }
                    return;
                }
            }
        };
        let s = self.streams.remove(&id).expect("found above");
        self.crossed.remove(&id);
        self.peer.sender.reserved_done(now, id);
        self.complete(
            s.token,
            outcome.map(|replayed| Receipt {
                id,
                latency: now.saturating_duration_since(s.started),
                shards_sent: 0,
                hedges: 0,
                replayed,
            }),
        );
    }

    pub(super) fn take_stream_message(&mut self, now: Instant, answer: u64, message: Bytes) {
        match self.peer.handle_stream_message(now, message) {
            StreamStatus::Now(status) => self.actions.push_back(Action::AnswerStream {
                answer,
                status: Some(status),
            }),
            StreamStatus::Unanswered => self.actions.push_back(Action::AnswerStream {
                answer,
                status: None,
            }),
            // Answered once its claim is, or the application took it; a re-send of the same
            // message takes over the answer (the older stream's reader then gives up).
            StreamStatus::Later(id) => {
                if let Some(old) = self.stream_waiting.insert(id, answer) {
                    self.actions.push_back(Action::AnswerStream {
                        answer: old,
                        status: None,
                    });
                }
            }
        }
    }
}
