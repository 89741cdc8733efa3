//! Which message ids were delivered (a bounded window above a low watermark), and which
//! idempotency keys were (a bounded map with a TTL).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

/// What the window says about an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not delivered before: deliver it (the window now records it).
    New,
    /// Delivered before (or below the watermark): do not deliver; re-ack.
    Duplicate,
    /// Too far above the watermark to track: neither deliver nor ack (the receiver refuses
    /// it).
    OutOfWindow,
}

/// Delivered ids: every id below `floor`, plus a set above it of at most `window` ids' span.
///
/// The floor advances past every id delivered contiguously. A hole (an id below delivered
/// ones, never delivered) holds the floor up until one of:
/// - the sender says every id below some point has its outcome ([`DedupeWindow::advance_to`],
///   from a FLOOR frame): the floor moves there at once;
/// - `hole_ttl` passes without progress: the floor jumps past the hole (a fallback for a
///   sender that sends no FLOOR; the sender gives up on a message at its deadline, so
///   `hole_ttl` must exceed the sender's deadline plus an RTT).
///
/// Neither ever moves the floor past a *pinned* id ([`DedupeWindow::pin`]: a message whose
/// claim is pending), so a claim that answers late still finds its id above the floor.
///
/// Ids above the floor are held as disjoint ranges, so memory grows with the number of holes,
/// not with the number of ids.
#[derive(Clone, Debug)]
pub struct DedupeWindow {
    floor: u64,
    /// Delivered ids above the floor: start → end (inclusive), disjoint and never adjacent,
    /// every start above `floor`.
    above: BTreeMap<u64, u64>,
    /// Ids in `above`.
    tracked: u64,
    window: u64,
    hole_ttl: Duration,
    stuck_since: Option<Instant>,
    /// Ids the floor must not pass (claims pending).
    pins: BTreeSet<u64>,
}

impl DedupeWindow {
    /// A window tracking ids up to `window` above the floor, skipping holes after `hole_ttl`.
    pub fn new(window: u64, hole_ttl: Duration) -> Self {
        DedupeWindow {
            floor: 0,
            above: BTreeMap::new(),
            tracked: 0,
            window: window.max(1),
            hole_ttl,
            stuck_since: None,
            pins: BTreeSet::new(),
        }
    }

    /// A window whose floor starts at `floor`: every id below it counts as delivered (for a
    /// channel taken over from another server: the client says every id below was acked or
    /// given up).
    pub fn starting_at(floor: u64, window: u64, hole_ttl: Duration) -> Self {
        DedupeWindow {
            floor,
            ..DedupeWindow::new(window, hole_ttl)
        }
    }

    /// What [`DedupeWindow::check`] would answer for `id`, without recording it.
    pub fn peek(&mut self, now: Instant, id: u64) -> Seen {
        self.expire_holes(now);
        if self.contains(id) {
            Seen::Duplicate
        } else if id - self.floor >= self.window {
            Seen::OutOfWindow
        } else {
            Seen::New
        }
    }

    /// Records a delivery of `id` if it is new.
    pub fn check(&mut self, now: Instant, id: u64) -> Seen {
        let seen = self.peek(now, id);
        if seen != Seen::New {
            return seen;
        }
        let before = self.floor;
        self.insert(id);
        self.absorb();
        // The hole timer runs from the last progress of the floor.
        self.stuck_since = match (self.above.is_empty(), self.floor != before) {
            (true, _) => None,
            (false, true) => Some(now),
            (false, false) => self.stuck_since.or(Some(now)),
        };
        Seen::New
    }

    /// Adds `id` (at or above the floor, not held) to `above`, merging with neighbours.
    fn insert(&mut self, id: u64) {
        let prev = self
            .above
            .range(..id)
            .next_back()
            .map(|(&s, &e)| (s, e))
            .filter(|&(_, e)| e + 1 == id);
        let next = id
            .checked_add(1)
            .and_then(|n| self.above.remove(&n).map(|e| (n, e)));
        let start = prev.map_or(id, |(s, _)| s);
        let end = next.map_or(id, |(_, e)| e);
        self.above.insert(start, end);
        self.tracked += 1;
    }

    /// Moves the floor over a range starting at it.
    fn absorb(&mut self) {
        if let Some(end) = self.above.remove(&self.floor) {
            self.tracked -= end - self.floor + 1;
            self.floor = end + 1;
        }
    }

    /// Whether `id` was delivered (or lies below the floor).
    pub fn contains(&self, id: u64) -> bool {
        id < self.floor
            || self
                .above
                .range(..=id)
                .next_back()
                .is_some_and(|(_, &e)| e >= id)
    }

    /// Every id below this is delivered or was given up on.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Ids tracked above the floor.
    pub fn tracked(&self) -> usize {
        usize::try_from(self.tracked).unwrap_or(usize::MAX)
    }

    /// Keeps the floor from passing `id` (a message whose claim is pending) until
    /// [`DedupeWindow::unpin`].
    pub fn pin(&mut self, id: u64) {
        if id >= self.floor {
            self.pins.insert(id);
        }
    }

    /// Releases a [`DedupeWindow::pin`].
    pub fn unpin(&mut self, id: u64) {
        self.pins.remove(&id);
    }

    /// The sender says every id below `floor` has its outcome (acked or given up): the floor
    /// moves up to it (never down, and never past a pinned id). Whether it moved.
    pub fn advance_to(&mut self, now: Instant, floor: u64) -> bool {
        let target = self.pins.first().map_or(floor, |&p| p.min(floor));
        if target <= self.floor {
            return false;
        }
        self.floor = target;
        while let Some((&s, &e)) = self.above.first_key_value() {
            if s > self.floor {
                break;
            }
            self.above.pop_first();
            self.tracked -= e - s + 1;
            self.floor = self.floor.max(e + 1);
        }
        self.absorb();
        self.stuck_since = (!self.above.is_empty()).then_some(now);
        true
    }

    /// Delivered ids for an ack, as at most `max` ranges in descending order, leaving out
    /// the ids in `withheld` (delivered but not to be acked yet). In order of priority:
    /// 1. the range from id 0 and the range just below the floor (everything below it);
    /// 2. the range around each id in `triggers` (the ids that caused this ack: new
    ///    deliveries, re-sent copies), so an ack always names what it answers, however many
    ///    holes lie above;
    /// 3. the newest ranges.
    pub fn ack_ranges(
        &self,
        max: usize,
        triggers: &[u64],
        withheld: &BTreeSet<u64>,
    ) -> Vec<RangeInclusive<u64>> {
        let max = max.max(1);
        let mut out: Vec<RangeInclusive<u64>> = Vec::new();
        let add = |r: Option<RangeInclusive<u64>>, out: &mut Vec<RangeInclusive<u64>>| {
            if let Some(r) = r {
                if out.len() < max && !out.contains(&r) {
                    out.push(r);
                }
            }
        };
        if self.floor > 0 {
            add(self.piece_around(0, withheld), &mut out);
            add(self.piece_around(self.floor - 1, withheld), &mut out);
        }
        for &id in triggers {
            add(self.piece_around(id, withheld), &mut out);
        }
        // Newest first: ranges above the floor from the top, then the floor range, each
        // split around withheld ids.
        let below = (self.floor > 0).then(|| (0, self.floor - 1));
        let spans = self.above.iter().rev().map(|(&s, &e)| (s, e)).chain(below);
        'fill: for (s, e) in spans {
            let mut hi = e;
            let mut cuts = withheld.range(s..=e).rev();
            loop {
                if out.len() >= max {
                    break 'fill;
                }
                match cuts.next() {
                    Some(&w) => {
                        if w < hi {
                            add(Some(w + 1..=hi), &mut out);
                        }
                        if w == s {
                            break;
                        }
                        hi = w - 1;
                    }
                    None => {
                        add(Some(s..=hi), &mut out);
                        break;
                    }
                }
            }
        }
        out.sort_by(|a, b| b.start().cmp(a.start()));
        out
    }

    /// The largest run of ackable ids (delivered, not withheld) around `id`, if it is one.
    fn piece_around(&self, id: u64, withheld: &BTreeSet<u64>) -> Option<RangeInclusive<u64>> {
        if withheld.contains(&id) {
            return None;
        }
        let (s, e) = if id < self.floor {
            (0, self.floor - 1)
        } else {
            let (&s, &e) = self.above.range(..=id).next_back()?;
            if e < id {
                return None;
            }
            (s, e)
        };
        let lo = withheld.range(s..id).next_back().map_or(s, |&w| w + 1);
        let hi = if id < e {
            withheld.range(id + 1..=e).next().map_or(e, |&w| w - 1)
        } else {
            e
        };
        Some(lo..=hi)
    }

    fn expire_holes(&mut self, now: Instant) {
        let Some(since) = self.stuck_since else {
            return;
        };
        if now.saturating_duration_since(since) < self.hole_ttl {
            return;
        }
        // Skip the hole: the floor moves to the lowest delivered id above it (never past a
        // pinned id), then on.
        if let Some((&lowest, _)) = self.above.first_key_value() {
            let target = self.pins.first().map_or(lowest, |&p| p.min(lowest));
            self.floor = self.floor.max(target);
            self.absorb();
        }
        self.stuck_since = (!self.above.is_empty()).then_some(now);
    }
}

/// What [`KeyWindow::check`] says about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySeen {
    /// Not delivered within the TTL: recorded now.
    New,
    /// Delivered within the TTL.
    Seen,
    /// Not held, and `max_keys` unexpired keys are: not recorded. The message must be
    /// refused (it could not be recognised if retried).
    Full,
}

/// Bytes a held key costs besides its own bytes: its map entry and its place in the
/// expiry queue (a `Bytes` handle and an `Instant` in each, plus the map's overhead).
pub const KEY_OVERHEAD_BYTES: usize = 128;

/// Idempotency keys delivered within the last `ttl`, at most `max_keys` of them.
///
/// A key is kept exactly `ttl` after its delivery (payment APIs keep theirs 24 h), never
/// less: when `max_keys` unexpired keys are held, a new key is *not* taken
/// ([`KeySeen::Full`]; the receiver refuses its message, and the sender may retry it later)
/// rather than forgetting an older one early. Memory is bounded by `max_keys × (key length +
/// `[`KEY_OVERHEAD_BYTES`]`)`; keys are copied out of the datagram, so a held key never keeps a
/// datagram alive.
#[derive(Clone, Debug)]
pub struct KeyWindow {
    ttl: Duration,
    max_keys: usize,
    keys: HashMap<bytes::Bytes, Instant>,
    order: VecDeque<(Instant, bytes::Bytes)>,
    refused: u64,
}

impl KeyWindow {
    /// A window remembering keys for `ttl`, at most `max_keys` (at least 1) at a time.
    pub fn new(ttl: Duration, max_keys: usize) -> Self {
        KeyWindow {
            ttl,
            max_keys: max_keys.max(1),
            keys: HashMap::new(),
            order: VecDeque::new(),
            refused: 0,
        }
    }

    /// Records `key` as delivered at `now` if it is new and there is room.
    pub fn check(&mut self, now: Instant, key: &bytes::Bytes) -> KeySeen {
        self.expire(now);
        if self.keys.contains_key(key) {
            return KeySeen::Seen;
        }
        if self.keys.len() >= self.max_keys {
            self.refused += 1;
            return KeySeen::Full;
        }
        let key = bytes::Bytes::copy_from_slice(key);
        self.keys.insert(key.clone(), now);
        self.order.push_back((now, key));
        KeySeen::New
    }

    /// Whether `key` was delivered within the TTL, without recording it.
    pub fn contains(&mut self, now: Instant, key: &bytes::Bytes) -> bool {
        self.expire(now);
        self.keys.contains_key(key)
    }

    /// Whether a new key would be refused now.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.keys.len() >= self.max_keys
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// New keys not taken because `max_keys` unexpired keys were held.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            let (_, key) = self.order.pop_front().expect("checked");
            self.keys.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue case 6: at `max_keys` a new key is refused, never an old one forgotten early.
    #[test]
    fn keys_dedupe_within_ttl_and_are_never_forgotten_early() {
        let t0 = Instant::now();
        let key = |s: &'static str| bytes::Bytes::from_static(s.as_bytes());
        let mut w = KeyWindow::new(Duration::from_secs(10), 3);
        assert_eq!(w.check(t0, &key("a")), KeySeen::New);
        assert_eq!(
            w.check(t0 + Duration::from_secs(9), &key("a")),
            KeySeen::Seen,
            "within the TTL"
        );
        assert_eq!(
            w.check(t0 + Duration::from_secs(10), &key("a")),
            KeySeen::New,
            "expired, then new"
        );
        assert_eq!(
            w.check(t0 + Duration::from_secs(10), &key("b")),
            KeySeen::New
        );
        assert_eq!(
            w.check(t0 + Duration::from_secs(10), &key("c")),
            KeySeen::New
        );
        assert_eq!((w.len(), w.refused()), (3, 0));
        // A fourth key is refused; every held key is still recognised.
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(w.check(t1, &key("d")), KeySeen::Full);
        assert_eq!((w.len(), w.refused()), (3, 1));
        for k in ["a", "b", "c"] {
            assert_eq!(w.check(t1, &key(k)), KeySeen::Seen, "{k} kept");
        }
        // Once the oldest expire, there is room again.
        assert_eq!(
            w.check(t0 + Duration::from_secs(20), &key("d")),
            KeySeen::New
        );
    }

    #[test]
    fn floor_window_ranges_and_holes() {
        let t0 = Instant::now();
        let none = BTreeSet::new();
        let mut w = DedupeWindow::new(100, Duration::from_secs(10));
        for id in [0, 1, 2, 5, 6, 9] {
            assert_eq!(w.check(t0, id), Seen::New);
        }
        assert_eq!(w.check(t0, 1), Seen::Duplicate);
        assert_eq!(w.check(t0, 6), Seen::Duplicate);
        assert_eq!(w.floor(), 3);
        assert_eq!(w.tracked(), 3);
        assert_eq!(w.ack_ranges(10, &[], &none), vec![9..=9, 5..=6, 0..=2]);
        assert_eq!(w.ack_ranges(2, &[], &none), vec![9..=9, 0..=2]);
        assert_eq!(w.ack_ranges(2, &[5], &none), vec![5..=6, 0..=2]);
        assert_eq!(w.check(t0, 103), Seen::OutOfWindow);
        assert!(!w.contains(103) && !w.contains(3) && w.contains(5));
        // Filling the hole moves the floor.
        w.check(t0, 3);
        w.check(t0, 4);
        assert_eq!(
            (w.floor(), w.ack_ranges(10, &[], &none)),
            (7, vec![9..=9, 0..=6])
        );
        // Hole at 7, 8 never filled: after the TTL the floor skips it.
        w.check(t0 + Duration::from_secs(5), 11);
        assert_eq!(w.floor(), 7);
        assert_eq!(w.check(t0 + Duration::from_secs(11), 20), Seen::New);
        assert_eq!(w.floor(), 10);
        assert_eq!(w.check(t0 + Duration::from_secs(11), 8), Seen::Duplicate);
    }

    /// Issue case 7: with more holes above the floor than an ack has ranges, an ack still
    /// names the range from 0 and the ids that triggered it.
    #[test]
    fn acks_name_the_floor_and_their_triggers_past_many_holes() {
        let t0 = Instant::now();
        let none = BTreeSet::new();
        let mut w = DedupeWindow::new(1000, Duration::from_secs(10));
        // 0 delivered, 1 missing, then 20 holes: 3, 5, ..., 41 delivered.
        w.check(t0, 0);
        for id in (3..=41).step_by(2) {
            w.check(t0, id);
        }
        let r = w.ack_ranges(16, &[], &none);
        assert_eq!(r.len(), 16);
        assert_eq!(r.last(), Some(&(0..=0)), "the range from 0 is always named");
        // A new id below the holes: named.
        assert_eq!(w.check(t0, 10), Seen::New);
        let r = w.ack_ranges(16, &[10], &none);
        assert!(r.contains(&(9..=11)), "{r:?}");
        assert_eq!(r.len(), 16);
        assert!(
            r.windows(2).all(|p| *p[0].start() > p[1].end() + 1),
            "{r:?}"
        );
        // A re-sent old id: named too.
        let r = w.ack_ranges(16, &[5], &none);
        assert!(r.contains(&(5..=5)), "{r:?}");
        // More triggers than ranges: still at most `max` (the wire's limit holds), the
        // range from 0 first.
        let all: Vec<u64> = (0..=41).collect();
        let r = w.ack_ranges(16, &all, &none);
        assert_eq!((r.len(), r.last()), (16, Some(&(0..=0))));
        // Withheld ids are never named, even under the floor.
        let withheld: BTreeSet<u64> = [0, 10].into();
        let r = w.ack_ranges(64, &[10, 11], &withheld);
        assert!(
            !r.iter().any(|r| r.contains(&0) || r.contains(&10)),
            "{r:?}"
        );
        assert!(r.contains(&(11..=11)), "{r:?}");
    }

    /// Issue cases 3, 4, 5: the sender's floor moves the window at once, but never past a
    /// pinned (claim pending) id; nor does the hole timer.
    #[test]
    fn floor_advances_on_request_but_never_past_a_pin() {
        let t0 = Instant::now();
        let mut w = DedupeWindow::new(64, Duration::from_secs(10));
        assert_eq!(w.check(t0, 1000), Seen::OutOfWindow);
        assert!(w.advance_to(t0, 1000));
        assert!(!w.advance_to(t0, 900), "never backwards");
        assert_eq!(w.check(t0, 1000), Seen::New);
        assert_eq!(w.floor(), 1001);
        // A pending claim at 1001; later ids delivered; the hole timer and the sender's
        // floor both stop at the pin.
        w.pin(1001);
        for id in 1002..1010 {
            w.check(t0, id);
        }
        assert_eq!(w.check(t0 + Duration::from_secs(11), 1020), Seen::New);
        assert_eq!(w.floor(), 1001);
        w.advance_to(t0, 2000);
        assert_eq!(w.floor(), 1001);
        assert!(!w.contains(1001));
        w.unpin(1001);
        assert_eq!(w.check(t0, 1001), Seen::New);
        assert_eq!(w.floor(), 1010);
        w.advance_to(t0, 1030);
        assert_eq!((w.floor(), w.tracked()), (1030, 0));
    }
}
