//! Admission of new connections on a server: address validation and a cap on handshakes in
//! progress, decided before a connection attempt costs the server any state.
//!
//! A QUIC handshake held open costs a server about 40 KiB until it completes or times out,
//! and its first packet can come from a spoofed address. The rules, in order:
//!
//! 1. At `max_handshakes` handshakes in progress a new attempt is **ignored** (dropped
//!    without an answer: an answer to a spoofed address would be reflected traffic). Its
//!    client retries after its own timeout. So is one from an address (IP) that has
//!    `max_handshakes_per_address` in progress: one client, even with a validated address,
//!    cannot hold every handshake slot and lock the others out.
//! 2. Above `retry_above` handshakes in progress, an attempt from an address not yet
//!    validated is answered with a QUIC **Retry** (RFC 9000 §8.1.2): stateless, so a spoofed
//!    address never becomes state, and a real client comes back one round trip later with a
//!    token that validates it. `0` always asks for one; `usize::MAX` never.
//! 3. Everything else is accepted.
//!
//! Sans-I/O: the listener feeds it what quinn says about each attempt
//! ([`Admission::decide`]) and when a handshake ends ([`Admission::handshake_ended`]).

/// Settings of a server's [`Admission`] (part of `channel::Config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdmissionConfig {
    /// Above this many handshakes in progress, unvalidated addresses get a Retry. Default
    /// 64: an idle or ordinary server adds no round trip; a flood of spoofed ClientHellos
    /// costs no state.
    pub retry_above: usize,
    /// At this many handshakes in progress, new attempts are ignored. Default 1,024 (about
    /// 40 MiB of handshake state).
    pub max_handshakes: usize,
    /// At this many handshakes in progress from one IP address, its new attempts are
    /// ignored. Default 32 (a NAT of many terminals opens a few at once; an attacker with a
    /// real address cannot take every slot).
    pub max_handshakes_per_address: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            retry_above: 64,
            max_handshakes: 1024,
            max_handshakes_per_address: 32,
        }
    }
}

/// What to do with one connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Start the handshake (and count it until [`Admission::handshake_ended`]).
    Accept,
    /// Answer with a Retry: the client must prove its address first.
    Retry,
    /// Drop it without an answer (counted).
    Ignore,
}

/// Counters of an [`Admission`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Gauge: handshakes in progress.
    pub in_progress: usize,
    /// Attempts accepted.
    pub accepted: u64,
    /// Retries sent.
    pub retries: u64,
    /// Attempts ignored at the cap.
    pub ignored: u64,
}

/// A server's admission policy; see the [module docs](self).
#[derive(Debug, Default)]
pub struct Admission {
    config: AdmissionConfig,
    stats: AdmissionStats,
    /// Handshakes in progress per address (entries at zero are removed: bounded by
    /// `max_handshakes`).
    per_address: std::collections::HashMap<std::net::IpAddr, usize>,
}

impl Admission {
    /// A policy with `config`.
    pub fn new(config: AdmissionConfig) -> Self {
        Admission {
            config,
            stats: AdmissionStats::default(),
            per_address: std::collections::HashMap::new(),
        }
    }

    /// Decides about an attempt from `address` whose address is `validated` (it came with a
    /// Retry token) and which `may_retry` (quinn may still send it a Retry).
    pub fn decide(&mut self, address: std::net::IpAddr, validated: bool, may_retry: bool) -> Admit {
        let from_address = self.per_address.get(&address).copied().unwrap_or(0);
        let admit = if self.stats.in_progress >= self.config.max_handshakes
            || from_address >= self.config.max_handshakes_per_address
        {
            Admit::Ignore
        } else if !validated && may_retry && self.stats.in_progress >= self.config.retry_above {
            Admit::Retry
        } else {
            Admit::Accept
        };
        match admit {
            Admit::Accept => {
                self.stats.accepted += 1;
                self.stats.in_progress += 1;
                *self.per_address.entry(address).or_default() += 1;
            }
            Admit::Retry => self.stats.retries += 1,
            Admit::Ignore => self.stats.ignored += 1,
        }
        admit
    }

    /// A handshake from `address` [`Admit::Accept`]ed earlier ended (completed or failed).
    pub fn handshake_ended(&mut self, address: std::net::IpAddr) {
        self.stats.in_progress = self.stats.in_progress.saturating_sub(1);
        if let Some(n) = self.per_address.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&address);
            }
        }
    }

    /// Its counters.
    pub fn stats(&self) -> AdmissionStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Below `retry_above` everything is accepted; above it unvalidated addresses get a
    /// Retry (validated ones, and attempts quinn cannot retry, are accepted); at the cap
    /// everything is ignored; a handshake that ends makes room.
    #[test]
    fn retry_above_the_threshold_and_ignore_at_the_cap() {
        let ip = |n: u8| std::net::IpAddr::from([10, 0, 0, n]);
        let mut a = Admission::new(AdmissionConfig {
            retry_above: 2,
            max_handshakes: 3,
            max_handshakes_per_address: 10,
        });
        assert_eq!(a.decide(ip(1), false, true), Admit::Accept);
        assert_eq!(a.decide(ip(2), false, true), Admit::Accept);
        assert_eq!(
            a.decide(ip(3), false, true),
            Admit::Retry,
            "above the threshold"
        );
        assert_eq!(
            a.decide(ip(3), false, false),
            Admit::Accept,
            "cannot be retried"
        );
        assert_eq!(a.decide(ip(4), true, false), Admit::Ignore, "at the cap");
        a.handshake_ended(ip(1));
        assert_eq!(a.decide(ip(4), true, false), Admit::Accept, "validated");
        let st = a.stats();
        assert_eq!(
            (st.in_progress, st.accepted, st.retries, st.ignored),
            (3, 4, 1, 1)
        );
        let mut always = Admission::new(AdmissionConfig {
            retry_above: 0,
            max_handshakes: 10,
            max_handshakes_per_address: 10,
        });
        assert_eq!(always.decide(ip(1), false, true), Admit::Retry);
    }

    /// One address, validated or not, gets at most `max_handshakes_per_address` slots; the
    /// others still get theirs; its slots come back as its handshakes end.
    #[test]
    fn one_address_cannot_take_every_slot() {
        let (greedy, honest) = (
            std::net::IpAddr::from([192, 0, 2, 7]),
            std::net::IpAddr::from([198, 51, 100, 1]),
        );
        let mut a = Admission::new(AdmissionConfig {
            retry_above: usize::MAX,
            max_handshakes: 100,
            max_handshakes_per_address: 3,
        });
        for _ in 0..3 {
            assert_eq!(a.decide(greedy, true, false), Admit::Accept);
        }
        assert_eq!(a.decide(greedy, true, false), Admit::Ignore);
        assert_eq!(a.decide(honest, true, false), Admit::Accept);
        a.handshake_ended(greedy);
        assert_eq!(a.decide(greedy, true, false), Admit::Accept);
        for _ in 0..3 {
            a.handshake_ended(greedy);
        }
        a.handshake_ended(honest);
        assert_eq!(a.stats().in_progress, 0);
        assert!(a.per_address.is_empty(), "no entry left behind");
    }
}
