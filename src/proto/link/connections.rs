//! Connections and replicas: redial with backoff, attach (resume, claims, new), the warm
//! standby (dial, upgrade, ranking, switch), and failover on silence.

use super::*;

impl Link {
    pub(super) fn replicas(&self) -> usize {
        match self.role {
            Role::Client { replicas, .. } => replicas,
            _ => 0,
        }
    }

    pub(super) fn dial_id(&mut self) -> u64 {
        self.next_dial += 1;
        self.next_dial
    }

    /// When a silent replica is given up: only for a client of several replicas, with a
    /// connection, while messages await their outcome.
    pub(super) fn failover_deadline(&self) -> Option<Instant> {
        if self.replicas() < 2 || self.primary.is_none() {
            return None;
        }
        self.waiting_since.map(|t| t + self.config.failover_after)
    }

    /// The primary connection is gone.
    pub(super) fn lost(&mut self, now: Instant, how: Lost, reason: String) {
        tracing::debug!(%reason, "surelink channel: connection lost");
        self.primary = None;
        match self.role {
            Role::Plain => self.finish(now, reason, 0, "channel stopped"),
            Role::Client { .. } => {
                if !matches!(how, Lost::Retryable | Lost::Goodbye) {
                    self.finish(now, reason, 0, "channel stopped");
                    return;
                }
                // A warm standby takes over at once (its Hello's floor is older, hence
                // lower: the store judges the ids in between).
                if let Some(s) = self.standby.take() {
                    self.standby_dial = None;
                    self.peer.sender.set_secondary(false);
                    self.stats.standby_failovers += 1;
                    self.attach(
                        now,
                        (s.conn, s.size, s.protocol),
                        s.attached,
                        Some(s.replica),
                    );
                    return;
                }
                self.redial = Some(Redial {
                    give_up: now + self.config.reconnect.give_up_after,
                    backoff: self.config.reconnect.first_backoff,
                    index: self.current,
                    last: reason,
                    dial: None,
                    retry_at: None,
                });
                self.redial_attempt(now);
            }
            Role::Server => {
                if matches!(how, Lost::LocallyClosed | Lost::Goodbye) {
                    self.finish(now, reason, 0, "channel stopped");
                } else {
                    self.detached_until = Some(now + self.config.channel_ttl);
                }
            }
        }
    }

    pub(super) fn redial_attempt(&mut self, now: Instant) {
        let n = self.replicas();
        let dial = self.dial_id();
        let floor = self.floor();
        let attempt_timeout = self.config.reconnect.attempt_timeout;
        let Some(r) = &mut self.redial else {
            return;
        };
        if n > 1 {
            r.index = (r.index + 1) % n;
        }
        r.dial = Some(dial);
        let timeout = attempt_timeout.min(r.give_up.saturating_duration_since(now));
        let replica = r.index;
        self.actions.push_back(Action::Dial {
            dial,
            replica,
            floor,
            timeout,
        });
    }

    pub(super) fn dial_done(
        &mut self,
        now: Instant,
        dial: u64,
        result: Result<Dialed, DialFailure>,
    ) {
        // A connection without datagrams cannot carry the channel: a failed attempt (another
        // replica, or a later attempt, may do better).
        let result = match result {
            Ok(d) if d.max_datagram_size.is_none() => {
                self.close(d.conn, 1, "datagrams required");
                Err(DialFailure {
                    refused: false,
                    reason: "the connection does not carry QUIC datagrams".into(),
                })
            }
            other => other,
        };
        if let Some(r) = &mut self.redial {
            if r.dial == Some(dial) {
                r.dial = None;
                match result {
                    Ok(d) => {
                        let replica = r.index;
                        self.redial = None;
                        let to = (d.conn, d.max_datagram_size, d.protocol);
                        self.attach(now, to, d.attached, Some(replica));
                    }
                    Err(e) if e.refused => {
                        let reason = format!("reconnecting was refused: {}", e.reason);
                        self.finish(now, reason, 0, "channel stopped");
                    }
                    Err(e) => {
                        r.last = e.reason;
                        if now + r.backoff >= r.give_up {
                            let reason = format!(
                                "no connection within {:?}; last error: {}",
                                self.config.reconnect.give_up_after, r.last
                            );
                            self.finish(now, reason, 0, "channel stopped");
                        } else {
                            r.retry_at = Some(now + r.backoff);
                            r.backoff = (r.backoff * 2).min(self.config.reconnect.max_backoff);
                        }
                    }
                }
                return;
            }
        }
        if let Some(d) = &mut self.standby_dial {
            if let Some((id, replica)) = d.dial {
                if id == dial {
                    d.dial = None;
                    match result {
                        Ok(dialed) => {
                            self.standby_dial = None;
                            self.standby_ready(now, dialed, replica);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e.reason, replica, "standby failed");
                            d.pos += 1;
                            if d.pos < d.candidates.len() {
                                self.standby_attempt(now);
                            } else if let Some(pause) = d.pause {
                                d.retry_at = Some(now + pause);
                            } else {
                                self.standby_dial = None;
                                self.schedule_upgrade(now);
                            }
                        }
                    }
                    return;
                }
            }
        }
        // Nobody waits for it any more.
        if let Ok(d) = result {
            self.close(d.conn, 0, "not needed");
        }
    }

    pub(super) fn standby_ready(&mut self, now: Instant, d: Dialed, replica: usize) {
        tracing::debug!(replica, "surelink channel: warm standby ready");
        if let Some(old) = self.standby.take() {
            self.close(old.conn, 0, "replaced by a preferred replica");
        }
        self.standby = Some(Standby {
            conn: d.conn,
            attached: d.attached,
            replica,
            size: d.max_datagram_size,
            protocol: d.protocol,
        });
        self.update_secondary();
        self.ranking.standby_path = None;
        self.ranking.better = 0;
        self.schedule_upgrade(now);
    }

    /// Hedge copies go to the standby only when both it and the primary judge by the
    /// shared claims store: otherwise a copy could be delivered as a second message.
    pub(super) fn update_secondary(&mut self) {
        let both = self.primary_attached == Attached::Claims
            && self
                .standby
                .as_ref()
                .is_some_and(|s| s.attached == Attached::Claims);
        self.peer.sender.set_secondary(both);
    }

    /// Moves the channel to connection `conn` (with its datagram size and negotiated
    /// protocol version). When the peer still holds the channel, unacked messages are
    /// re-sent on it with their ids and stream messages restart; when it lost its state,
    /// they fail with an unknown outcome instead.
    pub(super) fn attach(
        &mut self,
        now: Instant,
        (conn, size, protocol): (ConnId, Option<usize>, u8),
        attached: Attached,
        replica: Option<usize>,
    ) {
        let Some(size) = size else {
            self.close(conn, 1, "datagrams required");
            return;
        };
        if let Some(old) = self.primary.take() {
            self.close(old, 0, "replaced by a newer connection");
        }
        self.primary = Some(conn);
        self.primary_attached = attached;
        // Parked stream messages came on the replaced connection: their streams are gone
        // with it (issue 21 case 4: kept, they piled up with every reattach).
        self.drop_parked();
        self.peer.sender.set_max_datagram_size(size);
        // A replica of another version (an upgrade under way) gets what it speaks: no
        // MESSAGE, REPAIR or REPLAYED frame toward a version-1 peer.
        let version = self.config.protocol.min(protocol);
        self.peer.sender.set_protocol(version);
        self.peer.receiver.set_protocol(version);
        self.generation += 1;
        match attached {
            Attached::Resumed => self.peer.new_connection(now),
            Attached::Claims => {
                tracing::debug!("surelink channel: a replica sharing the claims store took over");
                self.crossed
                    .extend(self.waiting.keys().chain(self.streams.keys()).copied());
                self.peer.peer_claims_only(now);
            }
            Attached::New => {
                tracing::warn!("surelink channel: the server lost the channel's state; messages in flight fail with an unknown outcome");
                self.peer.peer_lost_state(now);
                self.fresh_since = self.generation;
                let lost: Vec<u64> = self
                    .streams
                    .iter()
                    .filter(|(_, s)| s.running_on.is_none())
                    .map(|(&id, _)| id)
                    .collect();
                for id in lost {
                    if let Some(s) = self.streams.remove(&id) {
                        self.peer.sender.reserved_done(now, id);
                        self.complete(
                            s.token,
                            Err(SendError::ConnectionLost {
                                reason: PEER_LOST_STATE.into(),
                            }),
                        );
                    }
                }
            }
        }
        self.stats.reconnects += 1;
        self.waiting_since = None;
        if replica.is_some_and(|r| r != self.current) {
            // Another replica: whatever it answered, it may not know what the last one
            // delivered (only the shared store does).
            self.crossed
                .extend(self.waiting.keys().chain(self.streams.keys()).copied());
        }
        if let Some(index) = replica {
            if index != self.current && self.switching {
                self.stats.switches += 1;
                tracing::info!(
                    replica = index,
                    "surelink channel: switched to a better replica"
                );
            } else if index != self.current {
                self.stats.failovers += 1;
                tracing::info!(replica = index, "surelink channel: failed over");
            }
            self.current = index;
        }
        self.switching = false;
        self.ranking.primary_path = None;
        self.ranking.better = 0;
        self.detached_until = None;
        self.update_secondary();
        self.start_standby(now);
        let waiting: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, s)| s.running_on.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in waiting {
            self.start_stream(id);
        }
    }

    pub(super) fn start_standby(&mut self, now: Instant) {
        if !self.config.warm_standby
            || self.replicas() < 2
            || self.standby.is_some()
            || self.standby_dial.is_some()
            || self.primary.is_none()
        {
            return;
        }
        let current = self.current;
        let candidates = (0..self.replicas()).filter(|&i| i != current).collect();
        self.standby_dial = Some(StandbyDial {
            candidates,
            pos: 0,
            pause: Some(self.config.reconnect.max_backoff),
            dial: None,
            retry_at: None,
        });
        self.standby_attempt(now);
    }

    pub(super) fn standby_attempt(&mut self, _now: Instant) {
        let dial = self.dial_id();
        let floor = self.floor();
        let timeout = self.config.reconnect.attempt_timeout;
        let Some(d) = &mut self.standby_dial else {
            return;
        };
        let Some(&replica) = d.candidates.get(d.pos) else {
            return;
        };
        d.dial = Some((dial, replica));
        self.actions.push_back(Action::Dial {
            dial,
            replica,
            floor,
            timeout,
        });
    }

    /// The replicas more preferred than the standby's (and not the one in use), in order.
    pub(super) fn better_standbys(&self) -> Vec<usize> {
        let Some(s) = &self.standby else {
            return Vec::new();
        };
        (0..s.replica).filter(|&i| i != self.current).collect()
    }

    pub(super) fn schedule_upgrade(&mut self, now: Instant) {
        self.standby_upgrade_at =
            (!self.better_standbys().is_empty()).then_some(now + STANDBY_UPGRADE);
    }

    pub(super) fn upgrade_standby(&mut self, now: Instant) {
        let candidates = self.better_standbys();
        if candidates.is_empty() || self.standby_dial.is_some() {
            return;
        }
        self.standby_dial = Some(StandbyDial {
            candidates,
            pos: 0,
            pause: None,
            dial: None,
            retry_at: None,
        });
        self.standby_attempt(now);
    }

    /// Scores the primary and the standby; moves to the standby when it has scored much
    /// better for [`SWITCH_AFTER`] samples in a row.
    pub(super) fn rank(&mut self, now: Instant, samples: &[(ConnId, PathSample)]) {
        let n = self.replicas();
        if n < 2 {
            return;
        }
        let r = &mut self.ranking;
        r.scores.resize(n, None);
        r.rtt.resize(n, None);
        r.loss.resize(n, None);
        let smooth = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.7 * o + 0.3 * new));
        let mut primary = None;
        let mut standby = None;
        for &(conn, sample) in samples {
            let (index, last) = if Some(conn) == self.primary {
                (self.current, &mut r.primary_path)
            } else if let Some(s) = self.standby.as_ref().filter(|s| s.conn == conn) {
                (s.replica, &mut r.standby_path)
            } else {
                continue;
            };
            let (sent, lost) = (sample.sent_packets, sample.lost_packets);
            let loss = match *last {
                Some((s0, l0)) if sent >= s0 + LOSS_SAMPLE_MIN => {
                    Some((lost.saturating_sub(l0) as f64 / (sent - s0) as f64).min(1.0))
                }
                _ => None,
            };
            if loss.is_some() || last.is_none() {
                *last = Some((sent, lost));
            }
            let rtt = sample.rtt.as_secs_f64() * 1000.0;
            r.rtt[index] = smooth(r.rtt[index], rtt);
            if let Some(l) = loss {
                r.loss[index] = smooth(r.loss[index], l);
            }
            r.scores[index] = r.rtt[index].map(|rtt| score(rtt, r.loss[index]));
            if Some(conn) == self.primary {
                primary = Some(index);
            } else {
                standby = Some(index);
            }
        }
        let ratio = self.config.switch_ratio;
        // Loss counts only where both replicas have a measure of it; otherwise the round
        // trips alone decide.
        let better = match (primary, standby) {
            (Some(p), Some(s)) if ratio > 0.0 => {
                let both = r.loss[p].is_some() && r.loss[s].is_some();
                let of = |i: usize| {
                    let rtt = r.rtt[i].unwrap_or(f64::INFINITY);
                    score(rtt, if both { r.loss[i] } else { None })
                };
                of(s) < ratio * of(p) && of(p) - of(s) > SWITCH_MIN_GAIN_MS
            }
            _ => false,
        };
        r.better = if better { r.better + 1 } else { 0 };
        if r.better >= SWITCH_AFTER {
            self.switch_to_standby(now);
        }
    }

    pub(super) fn switch_to_standby(&mut self, now: Instant) {
        let Some(s) = self.standby.take() else {
            return;
        };
        if let Some(old) = self.primary.take() {
            self.close(old, 0, "switching to a better replica");
        }
        self.standby_dial = None;
        self.ranking.standby_path = None;
        self.peer.sender.set_secondary(false);
        self.switching = true;
        self.attach(
            now,
            (s.conn, s.size, s.protocol),
            s.attached,
            Some(s.replica),
        );
    }
}
