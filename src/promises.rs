//! The payment promises, stated once and checked by every scenario test and fuzz target.
//!
//! **Outside the stable API**: a checker for surelink's own tests and fuzz targets, public so
//! they can share it; it may change in any release.
//!
//! surelink promises three things:
//!
//! 1. **Never twice.** A message reaches the receiving application at most once, across every
//!    replica; a message sent again under the same idempotency key (an application retry,
//!    perhaps on another channel of the same server, or to another replica) reaches it at
//!    most once per key.
//! 2. **Acked means delivered.** When a send ends in `Ok(Receipt)`, the message was handed to
//!    a receiving application (or, with a claims store, claimed and handed over), or another
//!    send of the same *payment* was (its key with the same payload: the retry was recognised
//!    as already done).
//! 3. **Every send gets an outcome.** Acked, or an error that says whether the message may
//!    have been delivered ([`Outcome::Unknown`]: retry with the same key) or was certainly
//!    not ([`Outcome::NotDelivered`], [`Outcome::NotSent`]: retrying is safe with or without
//!    the key).
//!
//! **Requests** (protocol 2) keep three more, judged by [`Ledger::processed`] (the
//! application's processing, with the reply it produced: a request's delivery),
//! [`Ledger::replied`] (a reply its client received: its outcome, acked),
//! [`Ledger::nacked`] and [`Ledger::declined`]:
//!
//! 4. **Processed at most once per key** (promise 1, with processing as the delivery).
//! 5. **The same reply.** Every reply a client receives for a key is, byte for byte, the
//!    reply the first processing of that payment under the key produced (a keyless request:
//!    its own processing's); a request acked without a reply is a broken promise too.
//! 6. **Declined means nacked, and not processed.** A request reported to its client as
//!    declined ("not processed") was nacked by an application and processed nowhere. A nack
//!    does not forbid processing elsewhere (a copy that reached another replica, or a
//!    retry, is delivered afresh: a nack frees its key), but its client must then not hear
//!    "declined".
//!
//! Every request ends in an outcome (promise 3): its reply, or an error.
//!
//! A refusal by the peer ([`Outcome::NotDelivered`]) is judged per key as well as per send:
//! "not delivered, retrying is safe with or without the key" is false when the payment was
//! delivered, or handed to the application, under the same key by another send before the
//! refusal came (an application that believes it pays twice).
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
    /// The peer refused it: it was certainly not delivered, and neither was its payment
    /// under its key (retrying is safe with or without the key).
    NotDelivered,
    /// A definite error before anything reached the peer (the channel closed, the message
    /// was rejected or too large), or one that speaks of this send only: it was certainly
    /// not delivered; it says nothing of its key.
    NotSent,
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
            Err(e) => {
                let e = e.clone().into();
                if e.may_have_been_delivered() {
                    Outcome::Unknown
                } else if matches!(e, crate::channel::SendError::Refused { .. }) {
                    Outcome::NotDelivered
                } else {
                    Outcome::NotSent
                }
            }
        }
    }

    /// Whether it says the message was certainly not delivered.
    pub fn not_delivered(self) -> bool {
        matches!(self, Outcome::NotDelivered | Outcome::NotSent)
    }
}

/// One send: its key, its payload's digest when known, and, once known, its outcome (the
/// first one reported; a second is a violation in itself).
#[derive(Clone, Debug, Default)]
struct Send {
    key: Option<Vec<u8>>,
    /// The payload's digest ([`Ledger::sent_payment`]); `None`: not recorded, any delivery
    /// under the key counts as the same payment.
    digest: Option<u64>,
    outcomes: Vec<Outcome>,
    /// When (in the ledger's order) the first outcome was reported.
    outcome_at: Option<u64>,
    /// When the receiving side first decided to refuse it, and why ([`Ledger::refusing`]).
    refused_at: Option<(u64, String)>,
    /// When the receiving side handed it to an application ([`Ledger::handed_over`]).
    handed: Vec<u64>,
    /// From a sender whose promises are not judged (a hostile peer): only its deliveries
    /// count, for its key.
    foreign: bool,
    /// A request ([`Ledger::sent_request`]): its deliveries are its processings.
    request: bool,
    /// The replies its client received ([`Ledger::replied`]).
    replies: Vec<Vec<u8>>,
    /// An application declined it ([`Ledger::nacked`]).
    nacked: bool,
    /// Its client was told it was declined ([`Ledger::declined`]).
    declined: bool,
}

impl Send {
    /// Whether a delivery of `other` is a delivery of this send's payment.
    fn same_payment(&self, other: &Send) -> bool {
        self.key.is_some()
            && self.key == other.key
            && match (self.digest, other.digest) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// A record of sends and deliveries. Sends are named by the caller with an id unique across
/// the whole scenario (a test usually writes it into the payload, so a delivery can be traced
/// back to its send).
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    sends: BTreeMap<u64, Send>,
    /// (send, receiving application, when) per delivery, in order.
    deliveries: Vec<(u64, usize, u64)>,
    /// Deliveries of sends the ledger never heard of.
    unknown_deliveries: Vec<u64>,
    /// (request, the reply it produced) per processing, in order.
    processings: Vec<(u64, Vec<u8>)>,
    /// Counts every recorded event, to order them.
    clock: u64,
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
    /// An idempotency key was delivered more than once (by different sends, perhaps on
    /// different channels or replicas, perhaps with different payloads).
    KeyDeliveredTwice {
        /// The key (lossy UTF-8).
        key: String,
        /// The sends delivered under it.
        sends: Vec<u64>,
    },
    /// Send `send` was acked, but neither it nor another send of its payment (its key with
    /// the same payload) was delivered.
    AckedNotDelivered {
        /// The send.
        send: u64,
    },
    /// Send `send` was acked because its key was delivered, but with another payload: a
    /// second payment under a used key was reported as done.
    AckedOtherPayment {
        /// The send.
        send: u64,
        /// A send delivered under its key.
        by: u64,
        /// The key (lossy UTF-8).
        key: String,
    },
    /// Send `send` ended in a definite "not delivered" error but was delivered.
    RefusedButDelivered {
        /// The send.
        send: u64,
    },
    /// Send `send` was refused by the peer ("not delivered": retrying is safe with or
    /// without the key) after send `by` delivered its payment under the same key (or had it
    /// handed to an application that then took it).
    KeyRefusedButDelivered {
        /// The send refused.
        send: u64,
        /// The send whose delivery came first.
        by: u64,
        /// The key (lossy UTF-8).
        key: String,
        /// Why it was refused, if recorded ([`Ledger::refusing`]).
        why: String,
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
    /// Request `send` got a reply other than the one the first processing of its payment
    /// under its key (request `by`: itself, when keyless) produced.
    ReplyDiffers {
        /// The request.
        send: u64,
        /// The request whose processing came first.
        by: u64,
        /// The key (lossy UTF-8; empty when keyless).
        key: String,
        /// The reply the first processing produced (lossy UTF-8).
        expected: String,
        /// The reply received (lossy UTF-8).
        got: String,
    },
    /// Request `send` was acked without a reply.
    AckedWithoutReply {
        /// The request.
        send: u64,
    },
    /// Request `send` was reported to its client as declined, but no application nacked
    /// it.
    DeclinedWithoutNack {
        /// The request.
        send: u64,
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
            Violation::AckedOtherPayment { send, by, key } => write!(
                f,
                "send {send} acked as done, but its key {key:?} was delivered with another \
                 payload (send {by})"
            ),
            Violation::RefusedButDelivered { send } => {
                write!(f, "send {send} reported not delivered, but it was")
            }
            Violation::KeyRefusedButDelivered { send, by, key, why } => write!(
                f,
                "send {send} refused as not delivered ({why}), but its key {key:?} was \
                 delivered before by send {by}"
            ),
            Violation::NoOutcome { send } => write!(f, "send {send} has no outcome"),
            Violation::SeveralOutcomes { send, outcomes } => {
                write!(f, "send {send} has several outcomes: {outcomes:?}")
            }
            Violation::ReplyDiffers {
                send,
                by,
                key,
                expected,
                got,
            } => write!(
                f,
                "request {send} (key {key:?}) got the reply {got:?}, but the first processing \
                 (request {by}) replied {expected:?}"
            ),
            Violation::AckedWithoutReply { send } => {
                write!(f, "request {send} acked without a reply")
            }
            Violation::DeclinedWithoutNack { send } => {
                write!(
                    f,
                    "request {send} reported declined, but no application nacked it"
                )
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

/// A payload's digest (FNV-1a, 64 bits: stable across runs and platforms).
fn digest(payload: &[u8]) -> u64 {
    payload.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Ledger {
    /// Records send `send`, with its idempotency key if it has one. Sending the same id again
    /// is ignored (the first key stands). Any delivery under the key counts as its payment;
    /// [`Ledger::sent_payment`] also records the payload.
    pub fn sent(&mut self, send: u64, key: Option<&[u8]>) {
        self.sends.entry(send).or_insert_with(|| Send {
            key: key.map(<[u8]>::to_vec),
            ..Send::default()
        });
    }

    /// Records send `send` with its key and payload: an ack by key then needs a delivery of
    /// the same payload under that key (a retry carries the same payment; a second payment
    /// under a used key is not "already done"), and a refusal is a lie only about a delivery
    /// of the same payment.
    pub fn sent_payment(&mut self, send: u64, key: Option<&[u8]>, payload: &[u8]) {
        self.sends.entry(send).or_insert_with(|| Send {
            key: key.map(<[u8]>::to_vec),
            digest: Some(digest(payload)),
            ..Send::default()
        });
    }

    /// Records a message from a sender whose promises are not judged (a hostile peer), with
    /// its key and payload, as send `send`: its deliveries count for its key (a key is
    /// delivered at most once whoever sends it; an ack by key may rest on it), and it needs
    /// no outcome.
    pub fn foreign(&mut self, send: u64, key: Option<&[u8]>, payload: &[u8]) {
        self.sends.entry(send).or_insert_with(|| Send {
            key: key.map(<[u8]>::to_vec),
            digest: Some(digest(payload)),
            foreign: true,
            ..Send::default()
        });
    }

    /// Records request `send` (protocol 2) with its key and payload, as
    /// [`Ledger::sent_payment`]: its deliveries are its processings ([`Ledger::processed`]),
    /// and the replies its client receives ([`Ledger::replied`]) are checked against them.
    pub fn sent_request(&mut self, send: u64, key: Option<&[u8]>, payload: &[u8]) {
        self.sends.entry(send).or_insert_with(|| Send {
            key: key.map(<[u8]>::to_vec),
            digest: Some(digest(payload)),
            request: true,
            ..Send::default()
        });
    }

    /// Records that application `app` processed request `send` and answered it with
    /// `reply`: its delivery ([`Ledger::delivered`]), and the reply every reply its client
    /// (or a retry of the same payment under its key) receives must equal, if this is the
    /// first processing.
    pub fn processed(&mut self, app: usize, send: u64, reply: &[u8]) {
        self.delivered(app, send);
        if self.sends.contains_key(&send) {
            self.processings.push((send, reply.to_vec()));
        }
    }

    /// Records that an application declined request (or message) `send`: a nack, "not
    /// processed" (by this application: a copy elsewhere may still be).
    pub fn nacked(&mut self, send: u64) {
        if let Some(s) = self.sends.get_mut(&send) {
            s.nacked = true;
        }
    }

    /// Records that the client of `send` was told the peer's application declined it: its
    /// outcome, [`Outcome::NotSent`] (certainly not processed; it says nothing of its key),
    /// which needs a nack ([`Ledger::nacked`]) and no processing anywhere.
    pub fn declined(&mut self, send: u64) {
        self.outcome(send, Outcome::NotSent);
        if let Some(s) = self.sends.get_mut(&send) {
            s.declined = true;
        }
    }

    /// Records that the client of request `send` received `reply`: its outcome
    /// ([`Outcome::Acked`]: processed), and the reply, which must be its payment's first
    /// processing's.
    pub fn replied(&mut self, send: u64, reply: &[u8]) {
        self.outcome(send, Outcome::Acked);
        if let Some(s) = self.sends.get_mut(&send) {
            s.replies.push(reply.to_vec());
        }
    }

    /// Replies received so far.
    pub fn replies(&self) -> usize {
        self.sends.values().map(|s| s.replies.len()).sum()
    }

    /// Processings of requests so far.
    pub fn processings(&self) -> usize {
        self.processings.len()
    }

    /// Records what the sender of `send` learnt.
    pub fn outcome(&mut self, send: u64, outcome: Outcome) {
        self.clock += 1;
        let s = self.sends.entry(send).or_default();
        s.outcomes.push(outcome);
        s.outcome_at.get_or_insert(self.clock);
    }

    /// Records that the receiving side handed send `send` to an application, which has not
    /// taken it yet (it may never: its application may go away). If it is then delivered,
    /// its payment counts as delivered from this moment on (the receiver knew it), for
    /// judging refusals of its key.
    pub fn handed_over(&mut self, send: u64) {
        self.clock += 1;
        if let Some(s) = self.sends.get_mut(&send) {
            s.handed.push(self.clock);
        }
    }

    /// Records that the receiving side decided to refuse send `send`, and why (a REFUSE
    /// frame or a "refused" stream status left it; it reaches the sender later): its refusal
    /// is judged against what was delivered by this moment, not by the time the sender
    /// learns it.
    pub fn refusing(&mut self, send: u64, why: &str) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(s) = self.sends.get_mut(&send) {
            s.refused_at.get_or_insert_with(|| (clock, why.to_string()));
        }
    }

    /// Records that application `app` (a replica index, or 0) received send `send`.
    pub fn delivered(&mut self, app: usize, send: u64) {
        self.clock += 1;
        if self.sends.contains_key(&send) {
            self.deliveries.push((send, app, self.clock));
        } else {
            self.unknown_deliveries.push(send);
        }
    }

    /// Sends recorded (foreign ones included).
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

    /// Sends not yet given an outcome (foreign ones aside).
    pub fn pending(&self) -> Vec<u64> {
        self.sends
            .iter()
            .filter(|(_, s)| !s.foreign && s.outcomes.is_empty())
            .map(|(&id, _)| id)
            .collect()
    }

    /// Checks promises 1 and 2, refusals per send and per key, and that no send has two
    /// outcomes; sends still awaiting their outcome are allowed (the scenario may still be
    /// running).
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
                .filter(|x| {
                    !matches!(
                        x,
                        Violation::AckedNotDelivered { .. } | Violation::AckedOtherPayment { .. }
                    )
                })
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
        // Per delivery: (send, when its payment counts as delivered: the hand-over that led
        // to it, else the delivery itself).
        let mut known: Vec<(u64, u64)> = Vec::new();
        for &(send, app, when) in &self.deliveries {
            at.entry(send).or_default().push(app);
            let handed = self.sends[&send]
                .handed
                .iter()
                .rev()
                .find(|&&h| h <= when)
                .copied();
            known.push((send, handed.unwrap_or(when)));
        }
        found.extend(
            self.unknown_deliveries
                .iter()
                .map(|&send| Violation::Phantom { send }),
        );
        let mut by_key: BTreeMap<&[u8], BTreeSet<u64>> = BTreeMap::new();
        for (&send, apps) in &at {
            let s = &self.sends[&send];
            if apps.len() > 1 && !s.foreign {
                found.push(Violation::DeliveredTwice {
                    send,
                    at: apps.clone(),
                });
            }
            if let Some(key) = s.key.as_deref() {
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
            if s.foreign {
                continue;
            }
            if s.outcomes.len() > 1 {
                found.push(Violation::SeveralOutcomes {
                    send,
                    outcomes: s.outcomes.clone(),
                });
            }
            let delivered = at.contains_key(&send);
            if s.request {
                self.request_violations(send, s, &mut found);
            }
            match s.outcomes.first() {
                Some(Outcome::Acked) if !delivered => {
                    let under_key = s.key.as_deref().and_then(|k| by_key.get(k));
                    let same =
                        under_key.is_some_and(|d| d.iter().any(|o| s.same_payment(&self.sends[o])));
                    match under_key.and_then(|d| d.first()) {
                        Some(_) if same => {}
                        Some(&by) => found.push(Violation::AckedOtherPayment {
                            send,
                            by,
                            key: String::from_utf8_lossy(s.key.as_deref().unwrap_or_default())
                                .into_owned(),
                        }),
                        None => found.push(Violation::AckedNotDelivered { send }),
                    }
                }
                Some(o) if o.not_delivered() && delivered => {
                    found.push(Violation::RefusedButDelivered { send });
                }
                Some(Outcome::NotDelivered) => {
                    // The peer's refusal speaks for the key too: no other send of the same
                    // payment may have been delivered (or handed over, then delivered)
                    // before it.
                    let (refused_at, why) = match &s.refused_at {
                        Some((at, why)) => (*at, why.clone()),
                        None => (s.outcome_at.unwrap_or(u64::MAX), "refused".to_string()),
                    };
                    if let Some(&(by, _)) = known.iter().find(|&&(other, when)| {
                        other != send && when < refused_at && s.same_payment(&self.sends[&other])
                    }) {
                        found.push(Violation::KeyRefusedButDelivered {
                            send,
                            by,
                            key: String::from_utf8_lossy(s.key.as_deref().unwrap_or_default())
                                .into_owned(),
                            why,
                        });
                    }
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

    /// Promises 5 and 6 for request `send` (processed and declined: refused but delivered,
    /// found with promise 2).
    fn request_violations(&self, send: u64, s: &Send, found: &mut Vec<Violation>) {
        let key = || String::from_utf8_lossy(s.key.as_deref().unwrap_or_default()).into_owned();
        // The first processing of its payment: its own, or another send's under its key.
        let first = self
            .processings
            .iter()
            .find(|(p, _)| *p == send || s.same_payment(&self.sends[p]));
        for got in &s.replies {
            match first {
                Some((by, expected)) if expected != got => found.push(Violation::ReplyDiffers {
                    send,
                    by: *by,
                    key: key(),
                    expected: String::from_utf8_lossy(expected).into_owned(),
                    got: String::from_utf8_lossy(got).into_owned(),
                }),
                // None: a reply without a processing, found as acked, not delivered.
                _ => {}
            }
        }
        let acked = s.outcomes.first() == Some(&Outcome::Acked);
        if acked && s.replies.is_empty() {
            found.push(Violation::AckedWithoutReply { send });
        }
        if s.declined && !s.nacked {
            found.push(Violation::DeclinedWithoutNack { send });
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

    #[test]
    fn a_refusal_speaks_for_its_key() {
        // Delivered under the key, then a retry with the same payment is refused.
        let mut l = Ledger::default();
        l.sent_payment(1, Some(b"k"), b"pay 5");
        l.delivered(0, 1);
        l.sent_payment(2, Some(b"k"), b"pay 5");
        l.outcome(2, Outcome::NotDelivered);
        l.outcome(1, Outcome::Unknown);
        assert_eq!(
            l.check_final().unwrap_err().0,
            vec![Violation::KeyRefusedButDelivered {
                send: 2,
                by: 1,
                key: "k".into(),
                why: "refused".into(),
            }]
        );
        // Handed over before the refusal, taken after it: the receiver knew.
        let mut l = Ledger::default();
        l.sent_payment(1, Some(b"k"), b"pay 5");
        l.sent_payment(2, Some(b"k"), b"pay 5");
        l.handed_over(1);
        l.outcome(2, Outcome::NotDelivered);
        l.delivered(0, 1);
        l.outcome(1, Outcome::Acked);
        assert!(matches!(
            l.check_final().unwrap_err().0[..],
            [Violation::KeyRefusedButDelivered { send: 2, by: 1, .. }]
        ));
        // Refused before the other send arrived at all: the refusal was true when made,
        // even if the sender learnt it later.
        let mut l = Ledger::default();
        l.sent_payment(1, Some(b"k"), b"pay 5");
        l.sent_payment(2, Some(b"k"), b"pay 5");
        l.refusing(2, "out of window");
        l.handed_over(1);
        l.outcome(2, Outcome::NotDelivered);
        l.delivered(0, 1);
        l.outcome(1, Outcome::Acked);
        l.check_final().unwrap();
        let mut l = Ledger::default();
        l.sent_payment(1, Some(b"k"), b"pay 5");
        l.sent_payment(2, Some(b"k"), b"pay 5");
        l.outcome(2, Outcome::NotDelivered);
        l.handed_over(1);
        l.delivered(0, 1);
        l.outcome(1, Outcome::Acked);
        l.check_final().unwrap();
        // Another payment under the same key, or an error that speaks of the send only.
        let mut l = Ledger::default();
        l.sent_payment(1, Some(b"k"), b"pay 5");
        l.delivered(0, 1);
        l.outcome(1, Outcome::Acked);
        l.sent_payment(2, Some(b"k"), b"pay 6");
        l.outcome(2, Outcome::NotDelivered);
        l.sent_payment(3, Some(b"k"), b"pay 5");
        l.outcome(3, Outcome::NotSent);
        l.check_final().unwrap();
    }

    #[test]
    fn an_ack_by_key_needs_the_same_payment() {
        let mut l = Ledger::default();
        l.sent_payment(1, Some(b"k"), b"pay 5");
        l.delivered(0, 1);
        l.outcome(1, Outcome::Acked);
        // A different payment under a used key, acked as if done.
        l.sent_payment(2, Some(b"k"), b"pay 6");
        l.outcome(2, Outcome::Acked);
        // The same payment retried: done indeed.
        l.sent_payment(3, Some(b"k"), b"pay 5");
        l.outcome(3, Outcome::Acked);
        assert_eq!(
            l.check_final().unwrap_err().0,
            vec![Violation::AckedOtherPayment {
                send: 2,
                by: 1,
                key: "k".into()
            }]
        );
    }

    #[test]
    fn foreign_messages_count_for_their_keys_only() {
        let mut l = Ledger::default();
        // A hostile peer delivers key k twice (under two of its ids) and an unkeyed
        // message twice; it needs no outcome.
        l.foreign(100, Some(b"k"), b"x");
        l.foreign(101, None, b"y");
        l.delivered(3, 100);
        l.delivered(3, 101);
        l.delivered(3, 101);
        assert_eq!(l.pending(), Vec::<u64>::new());
        l.check_final().unwrap();
        // An honest send of the same payment is acked by key: done, by the other sender.
        l.sent_payment(1, Some(b"k"), b"x");
        l.outcome(1, Outcome::Acked);
        l.check_final().unwrap();
        // But the key delivered again, to anyone, is delivered twice.
        l.sent_payment(2, Some(b"k"), b"x");
        l.delivered(0, 2);
        l.outcome(2, Outcome::Acked);
        assert_eq!(
            l.check_final().unwrap_err().0,
            vec![Violation::KeyDeliveredTwice {
                key: "k".into(),
                sends: vec![2, 100]
            }]
        );
    }

    #[test]
    fn request_promises() {
        // Processed once, the reply replayed to a retry under the key: kept.
        let mut l = Ledger::default();
        l.sent_request(1, Some(b"r"), b"auth 5");
        l.processed(0, 1, b"approved #1");
        l.replied(1, b"approved #1");
        l.sent_request(2, Some(b"r"), b"auth 5");
        l.replied(2, b"approved #1");
        assert_eq!(l.replies(), 2);
        assert_eq!(l.processings(), 1);
        l.check_final().unwrap();
        // The retry processed again, and replied with its own processing's reply.
        l.sent_request(3, Some(b"r"), b"auth 5");
        l.processed(1, 3, b"approved #2");
        l.replied(3, b"approved #2");
        let Violations(v) = l.check_final().unwrap_err();
        assert!(v.contains(&Violation::KeyDeliveredTwice {
            key: "r".into(),
            sends: vec![1, 3]
        }));
        assert!(v.contains(&Violation::ReplyDiffers {
            send: 3,
            by: 1,
            key: "r".into(),
            expected: "approved #1".into(),
            got: "approved #2".into(),
        }));
        // A keyless request replied with bytes other than its processing's; one acked
        // without a reply; one declined after all, one declined without a nack; one nacked
        // by one application and processed by another, its reply received: kept.
        let mut l = Ledger::default();
        l.sent_request(1, None, b"q");
        l.processed(0, 1, b"a");
        l.replied(1, b"b");
        l.sent_request(2, None, b"q");
        l.processed(0, 2, b"c");
        l.outcome(2, Outcome::Acked);
        l.sent_request(3, Some(b"k"), b"q");
        l.nacked(3);
        l.processed(0, 3, b"d");
        l.declined(3);
        l.sent_request(4, Some(b"k4"), b"q");
        l.replied(4, b"e");
        l.sent_request(5, Some(b"k5"), b"q");
        l.declined(5);
        l.sent_request(6, Some(b"k6"), b"q");
        l.nacked(6);
        l.processed(1, 6, b"f");
        l.replied(6, b"f");
        let Violations(v) = l.check_final().unwrap_err();
        assert!(v
            .iter()
            .any(|x| matches!(x, Violation::ReplyDiffers { send: 1, by: 1, .. })));
        assert!(v.contains(&Violation::AckedWithoutReply { send: 2 }));
        assert!(v.contains(&Violation::RefusedButDelivered { send: 3 }));
        assert!(v.contains(&Violation::DeclinedWithoutNack { send: 5 }));
        // A reply with no processing at all: acked, not delivered.
        assert!(v.contains(&Violation::AckedNotDelivered { send: 4 }));
        assert!(!v.iter().any(|x| matches!(
            x,
            Violation::ReplyDiffers { send: 6, .. }
                | Violation::RefusedButDelivered { send: 6 }
                | Violation::AckedNotDelivered { send: 6 }
        )));
        // Declined after a nack and processed nowhere; a request without an outcome.
        let mut l = Ledger::default();
        l.sent_request(1, Some(b"k"), b"q");
        l.nacked(1);
        l.declined(1);
        l.sent_request(2, Some(b"k"), b"q");
        assert_eq!(
            l.check_final().unwrap_err().0,
            vec![Violation::NoOutcome { send: 2 }]
        );
    }

    #[test]
    fn outcomes_of_send_errors() {
        use crate::proto::link::SendError;
        let of = |e: SendError| Outcome::of::<(), _>(&Err(e));
        assert_eq!(
            of(SendError::Refused { id: 1, reason: 1 }),
            Outcome::NotDelivered
        );
        assert_eq!(of(SendError::Closed), Outcome::NotSent);
        assert_eq!(of(SendError::Timeout { id: 1 }), Outcome::Unknown);
        assert!(Outcome::NotSent.not_delivered() && !Outcome::Unknown.not_delivered());
    }
}
