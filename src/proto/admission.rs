//! Admission of new connections on a server: address validation and a cap on handshakes in
//! progress, decided before a connection attempt costs the server any state.
//!
//! A QUIC handshake held open costs a server about 40 KiB until it completes or times out,
//! and its first packet can come from a spoofed address. The rules, in order:
//!
//! 1. At `max_handshakes` handshakes in progress a new attempt is **ignored** (dropped
//!    without an answer: an answer to a spoofed address would be reflected traffic). Its
//!    client retries after its own timeout.
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
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            retry_above: 64,
            max_handshakes: 1024,
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
}

impl Admission {
    /// A policy with `config`.
    pub fn new(config: AdmissionConfig) -> Self {
        Admission {
            config,
            stats: AdmissionStats::default(),
        }
    }

    /// Decides about an attempt whose address is `validated` (it came with a Retry token)
    /// and which `may_retry` (quinn may still send it a Retry).
    pub fn decide(&mut self, validated: bool, may_retry: bool) -> Admit {
        let admit = if self.stats.in_progress >= self.config.max_handshakes {
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
            }
            Admit::Retry => self.stats.retries += 1,
            Admit::Ignore => self.stats.ignored += 1,
        }
        admit
    }

    /// A handshake [`Admit::Accept`]ed earlier ended (completed or failed).
    pub fn handshake_ended(&mut self) {
        self.stats.in_progress = self.stats.in_progress.saturating_sub(1);
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
        let mut a = Admission::new(AdmissionConfig {
            retry_above: 2,
            max_handshakes: 3,
        });
        assert_eq!(a.decide(false, true), Admit::Accept);
        assert_eq!(a.decide(false, true), Admit::Accept);
        assert_eq!(a.decide(false, true), Admit::Retry, "above the threshold");
        assert_eq!(a.decide(false, false), Admit::Accept, "cannot be retried");
        assert_eq!(a.decide(true, false), Admit::Ignore, "at the cap");
        a.handshake_ended();
        assert_eq!(a.decide(true, false), Admit::Accept, "validated");
        let st = a.stats();
        assert_eq!(
            (st.in_progress, st.accepted, st.retries, st.ignored),
            (3, 4, 1, 1)
        );
        let mut always = Admission::new(AdmissionConfig {
            retry_above: 0,
            max_handshakes: 10,
        });
        assert_eq!(always.decide(false, true), Admit::Retry);
    }
}
