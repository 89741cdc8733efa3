//! The application's sends: the datagram path or a stream, per-send deadlines, outcomes and
//! slots, and the floor the channel tells its peer.

use super::*;

impl Link {
    pub(super) fn send(
        &mut self,
        now: Instant,
        token: u64,
        key: Option<Bytes>,
        kind: Kind,
        payload: Bytes,
        deadline: Option<Duration>,
    ) {
        if self.phase != Phase::Running {
            self.complete(token, Err(SendError::Closed));
            return;
        }
        // A send's own deadline may be shorter or longer than the channel's (a terminal's
        // authorization waits 40-60 s), up to a day.
        let own = self.config.sender.deadline;
        let deadline = deadline.map(|d| d.min(crate::proto::MAX_DEADLINE));
        let len = Envelope::overhead_of(key.as_deref(), kind) + payload.len();
        let threshold = self
            .config
            .stream_threshold
            .min(self.config.receiver.reassembler.limits.max_message_len as usize);
        if len <= threshold {
            let until = deadline.unwrap_or(own);
            match self
                .peer
                .sender
                .send_until(now, key.as_deref(), kind, &payload, until)
            {
                Ok(id) => {
                    // The sender gives the message up at its deadline. A request's deadline
                    // covers its reply too, which may come after the sender let the message
                    // go: it has an entry here.
                    let request = (kind == Kind::Request).then_some(Requested {
                        sent: now,
                        acked: None,
                    });
                    if request.is_some() {
                        self.send_deadlines.insert((now + until, id));
                    }
                    self.waiting.insert(
                        id,
                        Waiting {
                            token,
                            completed: false,
                            request,
                        },
                    );
                }
                Err(e) => self.complete(token, Err(SendError::Rejected(e))),
            }
            return;
        }
        if !self.config.streams {
            self.complete(
                token,
                Err(SendError::TooLarge {
                    len,
                    max: threshold,
                }),
            );
            return;
        }
        if let Some(k) = &key {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                self.complete(
                    token,
                    Err(SendError::Rejected(crate::proto::SendError::InvalidKey {
                        len: k.len(),
                    })),
                );
                return;
            }
        }
        let id = self
            .peer
            .sender
            .reserve_id_until(now, deadline.unwrap_or(own));
        self.stats.stream_messages_sent += 1;
        self.streams.insert(
            id,
            StreamSend {
                head: encode_stream_head(id),
                body: Envelope::encode_kind(key.as_deref(), kind, &payload),
                token,
                started: now,
                deadline: now + deadline.unwrap_or(own),
                running_on: None,
                keyed: key.is_some(),
                attempts: 0,
            },
        );
        self.start_stream(id);
    }

    /// The lowest message id still awaiting its outcome (datagram or stream path), or the
    /// next id: every id below was acked or given up.
    pub(super) fn floor(&self) -> u64 {
        let streams = self.streams.keys().min().copied();
        let sender = self.peer.sender.floor();
        streams.map_or(sender, |s| s.min(sender))
    }

    pub(super) fn in_flight(&self) -> usize {
        if self.is_closed() {
            // Every send has its outcome; what the sender still holds goes nowhere.
            return 0;
        }
        self.peer.sender.in_flight() + self.streams.len()
    }

    pub(super) fn complete(&mut self, token: u64, outcome: Result<Receipt, SendError>) {
        if token == super::requests::INTERNAL {
            // The link's own send (a reply): nobody waits for it.
            return;
        }
        self.actions.push_back(Action::Complete { token, outcome });
        self.actions.push_back(Action::FreeSlot { token });
    }
}
