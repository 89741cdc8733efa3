//! The payment promises, stated once and checked by every scenario test and fuzz target.
//!
//! **Outside the stable API**: a checker for surelink's own tests and fuzz targets, public so
//! they can share it; it may change in any release.
//!
//! surelink promises three things:
//!
//! 1. **Never twice.** A message reaches the receiving application at most once, across every
//!    replica; a message sent again under the same idempotency key (an application retry)
//!    reaches it at most once per key.
//! 2. **Acked means delivered.** When a send ends in `Ok(Receipt)`, the message was handed to
//!    a receiving application (or, with a claims store, claimed and handed over), or another
//!    send with the same key was (the retry was recognised as already done).
//! 3. **Every send gets an outcome.** Acked, or an error that says whether the message may
//!    have been delivered ([`Outcome::Unknown`]: retry with the same key) or was certainly
//!    not ([`Outcome::NotDelivered`]: retrying is safe with or without the key).
//!
//! A [`Ledger`] records what each sender saw per send and what each application received,
//! and [`Ledger::check`] asserts the promises over the record. Tests over real quinn, the
//! deterministic protocol tests and the fuzz targets all record into one and call it, so the
//! promises are written down exactly once.
//!
//! ```
//! use surelink::promises::{Ledger, Outcome};
//!
//! let mut ledger = Ledger::default();
//! ledger.sent(1, Some(b"order-42"));
//! ledger.delivered(0, 1);
//! ledger.outcome(1, Outcome::Acked);
//! // The application retried after a timeout; the retry was recognised by its key.
//! ledger.sent(2, Some(b"order-42"));
//! ledger.outcome(2, Outcome::Acked);
//! ledger.check().unwrap();
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What a sender learnt about one send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: the peer delivered it (or recognised its key as delivered before).
    Acked,
    /// A definite error: the message was certainly not delivered.
    NotDelivered,
    /// An error that leaves the outcome unknown: it may have been delivered.
    Unknown,
}

impl Outcome {
    /// The outcome a channel's `send` result stands for (a
    /// [`channel::SendError`](crate::channel::SendError), or the core's
    /// [`link::SendError`](crate::proto::link::SendError) it comes from).
    pub fn of<T, E>(result: &Result<T, E>) -> Outcome
    where
        E: Clone + Into<crate::channel::SendError>,
    {
        match result {
            Ok(_) => Outcome::Acked,
            Err(e) if e.clone().into().may_have_been_delivered() => Outcome::Unknown,
            Err(_) => Outcome::NotDelivered,
        }
    }
}

/// One send: its key and, once known, its outcome (the first one reported; a second is a
/// violation in itself).
#[derive(Clone, Debug, Default)]
struct Send {
    key: Option<Vec<u8>>,
    outcomes: Vec<Outcome>,
}

/// A record of sends and deliveries. Sends are named by the caller with an id unique across
/// the whole scenario (a test usually writes it into the payload, so a delivery can be traced
/// back to its send).
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    sends: BTreeMap<u64, Send>,
    /// (send, receiving application) per delivery, in order.
    deliveries: Vec<(u64, usize)>,
    /// Deliveries of sends the ledger never heard of.
    unknown_deliveries: Vec<u64>,
}

/// A broken promise, with the send it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Send `send` was handed to applications more than once (`times`, by application index).
    DeliveredTwice {
        /// The send.
        send: u64,
        /// The applications that received it, once per delivery.
        at: Vec<usize>,
    },
    /// Two different sends with the same idempotency key were both delivered.
    KeyDeliveredTwice {
        /// The key (lossy UTF-8).
        key: String,
        /// The sends delivered under it.
        sends: Vec<u64>,
    },
    /// Send `send` was acked, but neither it nor another send with its key was delivered.
    AckedNotDelivered {
        /// The send.
        send: u64,
    },
    /// Send `send` ended in a definite "not delivered" error but was delivered.
    RefusedButDelivered {
        /// The send.
        send: u64,
    },
    /// Send `send` has no outcome ([`Ledger::check_final`] only).
    NoOutcome {
        /// The send.
        send: u64,
    },
    /// Send `send` got more than one outcome.
    SeveralOutcomes {
        /// The send.
        send: u64,
        /// The outcomes, in the order reported.
        outcomes: Vec<Outcome>,
    },
    /// An application received a message that was never sent.
    Phantom {
        /// The send id found in the delivery.
        send: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::DeliveredTwice { send, at } => {
                write!(
                    f,
                    "send {send} delivered {} times (applications {at:?})",
                    at.len()
                )
            }
            Violation::KeyDeliveredTwice { key, sends } => {
                write!(f, "key {key:?} delivered under sends {sends:?}")
            }
            Violation::AckedNotDelivered { send } => {
                write!(f, "send {send} acked but never delivered")
            }
            Violation::RefusedButDelivered { send } => {
                write!(f, "send {send} reported not delivered, but it was")
            }
            Violation::NoOutcome { send } => write!(f, "send {send} has no outcome"),
            Violation::SeveralOutcomes { send, outcomes } => {
                write!(f, "send {send} has several outcomes: {outcomes:?}")
            }
            Violation::Phantom { send } => write!(f, "delivered {send}, which was never sent"),
        }
    }
}

/// Every violation found by a check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} broken promise(s): {}", .0.len(), summary(.0))]
pub struct Violations(pub Vec<Violation>);

fn summary(v: &[Violation]) -> String {
    let mut parts: Vec<String> = v.iter().take(8).map(ToString::to_string).collect();
    if v.len() > 8 {
        parts.push(format!("… and {} more", v.len() - 8));
    }
    parts.join("; ")
}

impl Ledger {
    /// Records send `send`, with its idempotency key if it has one. Sending the same id again
    /// is ignored (the first key stands).
    pub fn sent(&mut self, send: u64, key: Option<&[u8]>) {
        self.sends.entry(send).or_insert_with(|| Send {
            key: key.map(<[u8]>::to_vec),
            outcomes: Vec::new(),
        });
    }

    /// Records what the sender of `send` learnt.
    pub fn outcome(&mut self, send: u64, outcome: Outcome) {
        self.sends.entry(send).or_default().outcomes.push(outcome);
    }

    /// Records that application `app` (a replica index, or 0) received send `send`.
    pub fn delivered(&mut self, app: usize, send: u64) {
        if self.sends.contains_key(&send) {
            self.deliveries.push((send, app));
        } else {
            self.unknown_deliveries.push(send);
        }
    }

    /// Sends recorded.
    pub fn sends(&self) -> usize {
        self.sends.len()
    }

    /// Deliveries recorded.
    pub fn deliveries(&self) -> usize {
        self.deliveries.len()
    }

    /// Sends whose outcome is `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.sends
            .values()
            .filter(|s| s.outcomes.first() == Some(&outcome))
            .count()
    }

    /// Checks promises 1 and 2 and that no send has two outcomes; sends still awaiting their
    /// outcome are allowed (the scenario may still be running).
    pub fn check(&self) -> Result<(), Violations> {
        self.violations(false)
    }

    /// The promises that hold at every instant even where an ack may run ahead of the
    /// application (a replica that claimed a message and handed it over, while the
    /// application has not yet read it): [`Ledger::check`] without "acked means delivered".
    /// Call [`Ledger::check_final`] once the applications have read what they were given.
    pub fn check_handed_over(&self) -> Result<(), Violations> {
        self.violations(false).or_else(|Violations(v)| {
            let v: Vec<Violation> = v
                .into_iter()
                .filter(|x| !matches!(x, Violation::AckedNotDelivered { .. }))
                .collect();
            if v.is_empty() {
                Ok(())
            } else {
                Err(Violations(v))
            }
        })
    }

    /// [`Ledger::check`], and every send has its outcome (promise 3): call at the end of a
    /// scenario.
    pub fn check_final(&self) -> Result<(), Violations> {
        self.violations(true)
    }

    fn violations(&self, fin: bool) -> Result<(), Violations> {
        let mut found = Vec::new();
        let mut at: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for &(send, app) in &self.deliveries {
            at.entry(send).or_default().push(app);
        }
        found.extend(
            self.unknown_deliveries
                .iter()
                .map(|&send| Violation::Phantom { send }),
        );
        let mut by_key: BTreeMap<&[u8], BTreeSet<u64>> = BTreeMap::new();
        for (&send, apps) in &at {
            if apps.len() > 1 {
                found.push(Violation::DeliveredTwice {
                    send,
                    at: apps.clone(),
                });
            }
            if let Some(key) = self.sends[&send].key.as_deref() {
                by_key.entry(key).or_default().insert(send);
            }
        }
        for (key, sends) in &by_key {
            if sends.len() > 1 {
                found.push(Violation::KeyDeliveredTwice {
                    key: String::from_utf8_lossy(key).into_owned(),
                    sends: sends.iter().copied().collect(),
                });
            }
        }
        for (&send, s) in &self.sends {
            if s.outcomes.len() > 1 {
                found.push(Violation::SeveralOutcomes {
                    send,
                    outcomes: s.outcomes.clone(),
                });
            }
            let delivered = at.contains_key(&send);
            match s.outcomes.first() {
                Some(Outcome::Acked) => {
                    let by_key = s
                        .key
                        .as_deref()
                        .is_some_and(|k| by_key.get(k).is_some_and(|d| !d.is_empty()));
                    if !delivered && !by_key {
                        found.push(Violation::AckedNotDelivered { send });
                    }
                }
                Some(Outcome::NotDelivered) if delivered => {
                    found.push(Violation::RefusedButDelivered { send });
                }
                Some(_) => {}
                None if fin => found.push(Violation::NoOutcome { send }),
                None => {}
            }
        }
        if found.is_empty() {
            Ok(())
        } else {
            Err(Violations(found))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_run_passes() {
        let mut l = Ledger::default();
        for i in 0..10 {
            l.sent(i, None);
            l.delivered((i % 2) as usize, i);
            l.outcome(i, Outcome::Acked);
        }
        l.sent(10, None);
        l.outcome(10, Outcome::Unknown);
        l.sent(11, None);
        l.outcome(11, Outcome::NotDelivered);
        l.check_final().unwrap();
        assert_eq!(l.count(Outcome::Acked), 10);
    }

    #[test]
    fn each_broken_promise_is_found() {
        let mut l = Ledger::default();
        // Twice across replicas.
        l.sent(1, None);
        l.delivered(0, 1);
        l.delivered(1, 1);
        l.outcome(1, Outcome::Acked);
        // Acked, never delivered.
        l.sent(2, None);
        l.outcome(2, Outcome::Acked);
        // Definite refusal, delivered all the same.
        l.sent(3, None);
        l.delivered(0, 3);
        l.outcome(3, Outcome::NotDelivered);
        // One key, two deliveries.
        l.sent(4, Some(b"k"));
        l.sent(5, Some(b"k"));
        l.delivered(0, 4);
        l.delivered(0, 5);
        l.outcome(4, Outcome::Acked);
        l.outcome(5, Outcome::Acked);
        // No outcome.
        l.sent(6, None);
        // Two outcomes.
        l.sent(7, None);
        l.outcome(7, Outcome::Unknown);
        l.outcome(7, Outcome::Acked);
        l.delivered(0, 99);
        assert!(l.check().is_err());
        let Violations(v) = l.check_final().unwrap_err();
        assert!(v.contains(&Violation::DeliveredTwice {
            send: 1,
            at: vec![0, 1]
        }));
        assert!(v.contains(&Violation::AckedNotDelivered { send: 2 }));
        assert!(v.contains(&Violation::RefusedButDelivered { send: 3 }));
        assert!(v.contains(&Violation::KeyDeliveredTwice {
            key: "k".into(),
            sends: vec![4, 5]
        }));
        assert!(v.contains(&Violation::NoOutcome { send: 6 }));
        assert!(v.contains(&Violation::Phantom { send: 99 }));
        assert!(v
            .iter()
            .any(|x| matches!(x, Violation::SeveralOutcomes { send: 7, .. })));
        // Without the final check, a send still waiting is fine.
        let mut l = Ledger::default();
        l.sent(1, None);
        l.check().unwrap();
        assert!(l.check_final().is_err());
    }

    #[test]
    fn an_ack_by_key_needs_a_delivery_under_that_key() {
        let mut l = Ledger::default();
        l.sent(1, Some(b"order-1"));
        l.outcome(1, Outcome::Unknown);
        l.sent(2, Some(b"order-1"));
        l.outcome(2, Outcome::Acked);
        assert_eq!(
            l.check_final().unwrap_err().0,
            vec![Violation::AckedNotDelivered { send: 2 }]
        );
        l.delivered(0, 1);
        l.check_final().unwrap();
    }
}
