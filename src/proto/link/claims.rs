//! The claims pipeline: a claim per delivered message, attempts with their own timeout,
//! retried with the same claimant while the channel runs.

use super::*;

impl Link {
    pub(super) fn start_claim(&mut self, request: ClaimRequest) {
        self.next_claim += 1;
        let key = self.next_claim;
        let job = ClaimJob {
            request,
            claimant: self.config.claimant_seed.wrapping_add(key),
            backoff: Duration::from_millis(10),
            attempt: None,
            retry_at: None,
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
        result: Result<ClaimOutcome, String>,
    ) {
        let Some(mut job) = self.claims.remove(&attempt) else {
            return;
        };
        if job.attempt != Some(attempt) {
            self.claims.insert(attempt, job);
            return;
        }
        let outcome = match result {
            Ok(o @ (ClaimOutcome::Now | ClaimOutcome::Before | ClaimOutcome::Conflict)) => o,
            Ok(ClaimOutcome::Failed) | Err(_) => {
                self.stats.claim_attempts_failed += 1;
                if let Err(e) = &result {
                    tracing::warn!(error = %e, id = job.request.id, "surelink: claim failed");
                }
                // Retried for as long as the channel runs, with the same claimant: the
                // failed attempt may have been written, and a message claimed but never
                // handed over would be acked by any replica that finds the claim.
                job.attempt = None;
                job.retry_at = Some(now + job.backoff);
                job.backoff = (job.backoff * 2).min(Duration::from_secs(1));
                self.claims.insert(attempt, job);
                return;
            }
        };
        self.peer.receiver.claim_done(now, &job.request, outcome);
    }

    /// The channel stops with this claim unresolved: its message is dropped unacked (its
    /// sender learns an unknown outcome, or an ack from a replica that finds the claim if an
    /// attempt was written: the known gap of a claim whose answer never came).
    pub(super) fn give_up_claim(&mut self, now: Instant, job: ClaimJob) {
        self.peer
            .receiver
            .claim_done(now, &job.request, ClaimOutcome::Failed);
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
                let jobs: Vec<ClaimJob> = self.claims.drain().map(|(_, j)| j).collect();
                for job in jobs {
                    self.give_up_claim(now, job);
                }
            }
        }
    }
}
