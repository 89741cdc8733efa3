//! The claims pipeline, in two phases: a message is *reserved* in the store (a lease and a
//! fencing epoch), then *settled* just before the application takes it, one at a time, and
//! acked after the take (by the receiver). Attempts have their own timeout and are retried
//! with the same claimant while the channel runs.
//!
//! A job's steps, stated once:
//!
//! ```text
//!  Reserving ──Held──▶ Reserved ──(its turn)──▶ Settling ──Now──▶ (delivered; acked on the take)
//!     │  ├──Busy──▶ Reserving again when the holder's lease ends     └──Fenced──▶ (dropped, unacked)
//!     │  └──Before / Conflict──▶ (acked as a replay / refused)
//!     └──(inbox pattern) Held──▶ (handed to the application with its lease; it settles)
//!
//!  A request (protocol 2) has two more steps:
//!  (settled, handed) ──its reply──▶ RecordingReply ──Recorded──▶ (acked, the reply sent)
//!  Reserving ──Before──▶ FetchingReply ──Reply(Some)──▶ (acked as a replay, the kept reply sent)
//!                                     └──Reply(None)──▶ (unanswered: the first may still be at work)
//! ```
//!
//! Rules:
//! - At most one settle is in flight or waiting for its take per channel: a settle is asked
//!   only when every message handed over was taken. A replica that dies holds at most that
//!   one message settled and not taken (the gap the two phases leave).
//! - A claimant names one message of one incarnation of the peer on this link
//!   ([`claimant`]): the same for every attempt and every copy, so the store recognises a
//!   retry (a lost answer) or a re-reservation (a copy after a rollback) as this link's own.
//! - A reservation this link gives up (the application went away, the channel stopped) is
//!   released, best effort; otherwise its lease ends by itself.
//! - A request's reply is recorded with its claim **before** it goes out: a reply its
//!   requester saw is the one every replica answers a retry with. A replica that dies
//!   between the application's reply and the record leaves the request processed with no
//!   reply kept (the same window as a settled message not taken): a retry is left
//!   unanswered, never processed again.

use super::*;

/// The claimant token for message `id` of the peer's incarnation `generation` on a link
/// seeded with `seed`: distinct per message (a store matches a claimant per row), never 0.
pub(super) fn claimant(seed: u64, generation: u64, id: u64) -> u64 {
    // SplitMix64's finaliser over the three.
    let mut z = seed
        .wrapping_add(generation.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(id.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z.max(1)
}

impl Link {
    pub(super) fn start_claim(&mut self, request: ClaimRequest) {
        if self.config.receiver.claims == Claims::Application && !self.config.reserve {
            // The inbox pattern without a store here: the application claims on its own.
            self.peer.receiver.reserved(&request, None);
            return;
        }
        self.next_claim += 1;
        let key = self.next_claim;
        let job = ClaimJob {
            claimant: claimant(self.config.claimant_seed, request.generation, request.id),
            request,
            backoff: Duration::from_millis(10),
            attempt: None,
            retry_at: None,
            step: ClaimStep::Reserve {
                lease: self.config.lease,
            },
            started: false,
        };
        self.claims.insert(key, job);
        self.claim_attempt(key);
    }

    pub(super) fn claim_attempt(&mut self, key: u64) {
        self.next_claim += 1;
        let attempt = self.next_claim;
        let timeout = self.config.claim_attempt_timeout;
        let Some(job) = self.claims.remove(&key) else {
            return;
        };
        self.actions.push_back(Action::Claim {
            attempt,
            id: job.request.id,
            key: job.request.key.clone(),
            digest: job.request.digest,
            claimant: job.claimant,
            timeout,
            step: job.step.clone(),
        });
        // Jobs are keyed by their attempt in flight, or by their last attempt while waiting.
        self.claims.insert(
            attempt,
            ClaimJob {
                attempt: Some(attempt),
                retry_at: None,
                ..job
            },
        );
    }

    pub(super) fn claim_answered(
        &mut self,
        now: Instant,
        attempt: u64,
        result: Result<StoreAnswer, String>,
    ) {
        let Some(mut job) = self.claims.remove(&attempt) else {
            return;
        };
        if job.attempt != Some(attempt) {
            self.claims.insert(attempt, job);
            return;
        }
        job.attempt = None;
        if self.app_gone {
            self.answered_after_app_gone(now, job, result);
            return;
        }
        let lease = |job: &ClaimJob, epoch| Lease {
            claimant: job.claimant,
            epoch,
        };
        let outcome = match (job.step.clone(), result) {
            (_, Err(e)) => {
                self.stats.claim_attempts_failed += 1;
                tracing::warn!(error = %e, id = job.request.id, "surelink: claim failed");
                // Retried for as long as the channel runs, with the same claimant and step:
                // the failed attempt may have been written (a settle above all: a message
                // settled but never handed over would be acked by any replica that finds it).
                job.retry_at = Some(now + job.backoff);
                job.backoff = (job.backoff * 2).min(Duration::from_secs(1));
                self.claims.insert(attempt, job);
                return;
            }
            (ClaimStep::RecordReply { reply, .. }, Ok(StoreAnswer::Recorded { recorded })) => {
                if recorded {
                    self.stats.replies_recorded += 1;
                } else {
                    // Sent all the same: the request is settled here, so a retry is never
                    // processed again; another replica would leave it unanswered.
                    tracing::warn!(
                        id = job.request.id,
                        "surelink: a reply could not be recorded with its claim"
                    );
                }
                self.peer
                    .receiver
                    .reply_recorded(now, job.request.id, reply);
                return;
            }
            (ClaimStep::FetchReply, Ok(StoreAnswer::Reply(Some(reply)))) => {
                self.peer.receiver.replay_reply(now, &job.request, reply);
                ClaimOutcome::Before
            }
            (ClaimStep::FetchReply, Ok(StoreAnswer::Reply(None))) => {
                // Settled, but no reply kept (yet): the first may still be with an
                // application, or its replica died before recording it. No answer now.
                self.stats.replies_unknown += 1;
                ClaimOutcome::Failed
            }
            (ClaimStep::Reserve { .. }, Ok(StoreAnswer::Before)) if job.request.request => {
                // Settled before: its answer is the reply kept with it.
                job.step = ClaimStep::FetchReply;
                job.backoff = Duration::from_millis(10);
                self.claims.insert(attempt, job);
                self.claim_attempt(attempt);
                return;
            }
            (_, Ok(StoreAnswer::Before)) => ClaimOutcome::Before,
            (_, Ok(StoreAnswer::Conflict)) => ClaimOutcome::Conflict,
            (ClaimStep::Reserve { .. }, Ok(StoreAnswer::Busy { retry_in })) => {
                // Another replica holds it: neither delivered nor free. Asked again when the
                // holder's lease ends (taken over then if the holder died).
                self.stats.claims_busy += 1;
                job.retry_at = Some(now + retry_in + BUSY_SLACK);
                job.backoff = Duration::from_millis(10);
                self.claims.insert(attempt, job);
                return;
            }
            (ClaimStep::Reserve { .. }, Ok(StoreAnswer::Reserved { epoch, took_over })) => {
                self.stats.takeovers += u64::from(took_over);
                if self.config.receiver.claims == Claims::Application {
                    // The application settles it inside its own transaction.
                    let lease = lease(&job, epoch);
                    self.peer.receiver.reserved(&job.request, Some(lease));
                    return;
                }
                // Held: settled in its turn (`settle_next`).
                job.step = ClaimStep::Settle { epoch };
                job.backoff = Duration::from_millis(10);
                self.claims.insert(attempt, job);
                return;
            }
            (ClaimStep::Settle { epoch }, Ok(StoreAnswer::Settled { late })) => {
                self.stats.leases_expired += u64::from(late);
                // Until the application answers it: a request's reply is recorded with this
                // claim, a nack or a drop releases it (bounded by the hand-off).
                self.settled_handed
                    .insert(job.request.id, (job.request.clone(), job.claimant, epoch));
                // Handed over now; until the application takes it, it is the window's one
                // message.
                ClaimOutcome::Now
            }
            (ClaimStep::Settle { epoch }, Ok(StoreAnswer::Fenced)) => {
                // Taken over: the new owner delivers it; this one must not.
                self.stats.fenced_settles += 1;
                tracing::info!(
                    id = job.request.id,
                    epoch,
                    "surelink: settle fenced (the reservation was taken over)"
                );
                ClaimOutcome::Failed
            }
            (step, Ok(answer)) => {
                // An answer that does not fit the step (a broken store): counted as a failed
                // attempt and retried.
                self.stats.claim_attempts_failed += 1;
                tracing::warn!(
                    ?step,
                    ?answer,
                    "surelink: store answer does not fit the claim"
                );
                job.retry_at = Some(now + job.backoff);
                job.backoff = (job.backoff * 2).min(Duration::from_secs(1));
                self.claims.insert(attempt, job);
                return;
            }
        };
        self.peer.receiver.claim_done(now, &job.request, outcome);
    }

    /// Asks the next settle when its turn has come: no settle in flight, and every message
    /// handed over taken. The oldest reserved message goes first.
    pub(super) fn settle_next(&mut self) {
        // Messages received and not yet answered are not taken yet either: with them
        // outstanding a settle waits too, so a crash leaves at most one message settled and
        // not taken.
        if self.app_gone
            || self.room < self.config.handoff.max(1)
            || self.peer.receiver.has_deliveries()
            || self.awaiting_answers()
        {
            return;
        }
        let settling = self
            .claims
            .values()
            .any(|j| matches!(j.step, ClaimStep::Settle { .. }) && j.started);
        if settling {
            return;
        }
        let next = self
            .claims
            .iter()
            .filter(|(_, j)| matches!(j.step, ClaimStep::Settle { .. }))
            .min_by_key(|(_, j)| (j.request.generation, j.request.id))
            .map(|(&k, _)| k);
        if let Some(key) = next {
            if let Some(job) = self.claims.get_mut(&key) {
                job.started = true;
            }
            self.claim_attempt(key);
        }
    }

    /// The channel gives this claim up: its message is dropped unacked. A reservation not
    /// settled is released (best effort; its lease ends anyway). A settle in flight is the
    /// gap: it may have been written, and another replica would then ack the message as
    /// delivered (its sender learns that, or an unknown outcome).
    pub(super) fn give_up_claim(&mut self, now: Instant, job: ClaimJob) {
        // Reserved, or settled by an attempt whose answer never came, or reserved by an
        // attempt that failed after it was written: never handed over, so released (a release
        // deletes only this claimant's row; epoch 0 names any of its epochs).
        let epoch = match job.step {
            ClaimStep::Settle { epoch } | ClaimStep::Release { epoch } => epoch,
            ClaimStep::Reserve { .. } => 0,
            // Settled and handed over (its reply unrecorded), or settled elsewhere: not this
            // link's to release.
            ClaimStep::RecordReply { .. } | ClaimStep::FetchReply => {
                self.peer
                    .receiver
                    .claim_done(now, &job.request, ClaimOutcome::Failed);
                return;
            }
        };
        self.push_release(&job.request, job.claimant, epoch);
        self.peer
            .receiver
            .claim_done(now, &job.request, ClaimOutcome::Failed);
    }

    /// Asks the store to release `request`'s reservation or claim (best effort, no answer).
    pub(super) fn push_release(&mut self, request: &ClaimRequest, claimant: u64, epoch: u64) {
        self.stats.reservations_released += 1;
        self.actions.push_back(Action::Claim {
            attempt: 0,
            id: request.id,
            key: request.key.clone(),
            digest: request.digest,
            claimant,
            timeout: self.config.claim_attempt_timeout,
            step: ClaimStep::Release { epoch },
        });
    }

    /// The application went away. Nothing more is handed over, so nothing more may be
    /// settled: jobs not in flight end now (a reservation released, a settle retrying after
    /// an error released as well, since it may have been written); jobs in flight end when
    /// they answer (`answered_after_app_gone`). A message already settled and handed over
    /// stays settled: another replica may have acked a copy of it as settled already, so
    /// releasing it could not make that ack true (the window two-phase claims leave).
    pub(super) fn give_up_reserved(&mut self, now: Instant) {
        let waiting: Vec<u64> = self
            .claims
            .iter()
            .filter(|(_, j)| j.attempt.is_none())
            .map(|(&k, _)| k)
            .collect();
        for key in waiting {
            if let Some(job) = self.claims.remove(&key) {
                self.give_up_claim(now, job);
            }
        }
    }

    /// A claim attempt answered after the application went away: a reservation or a settle
    /// that went through is released (nobody will take its message), and the message is
    /// dropped unanswered; nothing is retried.
    fn answered_after_app_gone(
        &mut self,
        now: Instant,
        job: ClaimJob,
        result: Result<StoreAnswer, String>,
    ) {
        let outcome = match (job.step.clone(), result) {
            (_, Ok(StoreAnswer::Before)) => ClaimOutcome::Before,
            (_, Ok(StoreAnswer::Conflict)) => ClaimOutcome::Conflict,
            (ClaimStep::Reserve { .. }, Ok(StoreAnswer::Reserved { epoch, .. }))
            | (ClaimStep::Settle { epoch }, Ok(StoreAnswer::Settled { .. }) | Err(_)) => {
                self.push_release(&job.request, job.claimant, epoch);
                ClaimOutcome::Failed
            }
            _ => ClaimOutcome::Failed,
        };
        self.peer.receiver.claim_done(now, &job.request, outcome);
    }

    /// Starts recording the replies the application gave to settled requests (each before
    /// it goes out).
    pub(super) fn record_replies(&mut self, now: Instant) {
        while let Some((id, reply)) = self.peer.receiver.poll_reply_record() {
            let Some((request, claimant, epoch)) = self.settled_handed.remove(&id) else {
                // Not settled here (the inbox pattern, or an id of another incarnation):
                // nothing to record it with.
                self.peer.receiver.reply_recorded(now, id, reply);
                continue;
            };
            self.next_claim += 1;
            let key = self.next_claim;
            self.claims.insert(
                key,
                ClaimJob {
                    request,
                    claimant,
                    backoff: Duration::from_millis(10),
                    attempt: None,
                    retry_at: None,
                    step: ClaimStep::RecordReply { epoch, reply },
                    started: true,
                },
            );
            self.claim_attempt(key);
        }
    }

    /// Reservations held now (reserved and not yet settled, or settling).
    pub(super) fn reservations_held(&self) -> usize {
        self.claims
            .values()
            .filter(|j| matches!(j.step, ClaimStep::Settle { .. }))
            .count()
    }

    pub(super) fn claim_timers(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .claims
            .iter()
            .filter(|(_, j)| j.retry_at.is_some_and(|t| t <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in due {
            self.claim_attempt(key);
        }
        if let Phase::Finishing { until } = self.phase {
            if now >= until {
                let jobs: Vec<ClaimJob> = std::mem::take(&mut self.claims).into_values().collect();
                for job in jobs {
                    self.give_up_claim(now, job);
                }
            }
        }
    }
}

/// Added to a busy reservation's remaining lease before asking again (clocks and the
/// store's own round trip).
const BUSY_SLACK: Duration = Duration::from_millis(5);

#[cfg(test)]
impl Link {
    /// Tests: the store answers claim attempt `attempt` (a reservation) with `Reserved`,
    /// and the settle that follows (if its turn comes now) with `Settled`: a one-phase
    /// "claimed now". Returns the actions drained meanwhile, the settle's request excluded.
    pub(crate) fn claim_now(&mut self, now: Instant, attempt: u64) -> Vec<Action> {
        self.handle(
            now,
            Input::ClaimAnswered {
                attempt,
                result: Ok(StoreAnswer::Reserved {
                    epoch: 1,
                    took_over: false,
                }),
            },
        );
        let mut out = Vec::new();
        let mut settle = None;
        while let Some(a) = self.poll_action() {
            match a {
                Action::Claim {
                    attempt,
                    step: ClaimStep::Settle { .. },
                    ..
                } => settle = Some(attempt),
                a => out.push(a),
            }
        }
        if let Some(attempt) = settle {
            self.handle(
                now,
                Input::ClaimAnswered {
                    attempt,
                    result: Ok(StoreAnswer::Settled { late: false }),
                },
            );
            out.extend(std::iter::from_fn(|| self.poll_action()));
        }
        out
    }
}
