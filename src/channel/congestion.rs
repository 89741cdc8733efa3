//! A congestion-controller wrapper that keeps a silent path probe-able.
//!
//! Through an outage every packet in flight is lost, but quinn learns of it only from an
//! ACK: its congestion window stays full of packets that will never be acknowledged, and
//! nothing the application queues (surelink's probes included) leaves before a probe
//! timeout, which doubles through the outage (`pto × 2^n`). When the link returns, the
//! next packet can be seconds away. [`SilenceFloor`] wraps a controller (BBR by default)
//! and, once nothing has been acknowledged for `silence` while packets were sent, lets
//! packets go beyond the window: what is sent then is decided by the application (the
//! surelink sender probes at a fixed interval and spends no redundancy into a silent
//! path). The first ACK ends the silence and the inner controller's window applies
//! again.
//!
//! The packets lost in the outage are declared lost at that first ACK, and the inner
//! controller would answer as to congestion (BBR's recovery cuts its window to what is in
//! flight) just when the messages sent into the outage need resending. Worse, quinn's BBR
//! on a channel that was app-limited until then enters PROBE_RTT (a window of four packets
//! for 200 ms and more) the first time it is not, which is right after an outage (measured:
//! 480 KB to 5.8 KB after a 2 s outage). A path that went dead is not a congested one, so:
//! losses of packets sent before the silence ended are not passed to the inner controller
//! (losses of packets sent after it are, as always); and for a few round trips after the
//! silence the window is at least what it was before it, until the backlog fits the inner
//! window past its PROBE_RTT, at most a second, and no longer once a packet sent after the
//! silence is lost (the path may have come back narrower).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// Builds [`SilenceFloor`] controllers around `inner`'s.
#[derive(Debug)]
pub struct SilenceFloorConfig<F> {
    inner: Arc<F>,
    silence: Duration,
    floor: u64,
}

impl<F> SilenceFloorConfig<F> {
    /// Wraps `inner`: after `silence` without an acknowledgement, `floor` bytes may be sent
    /// beyond what is in flight.
    pub fn new(inner: Arc<F>, silence: Duration, floor: u64) -> Self {
        SilenceFloorConfig {
            inner,
            silence,
            floor,
        }
    }
}

impl<F: ControllerFactory + Send + Sync + 'static> ControllerFactory for SilenceFloorConfig<F> {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(SilenceFloor {
            inner: self.inner.clone().build(now, current_mtu),
            mtu: u64::from(current_mtu),
            silence: self.silence,
            floor: self.floor,
            last_ack: now,
            in_flight: 0,
            sent_since: 0,
            silent: false,
            resumed_at: None,
            before_silence: 0,
            held_until: None,
            hold_limit: None,
        })
    }
}

/// A controller whose window, after a silence, stays open by a floor above what is in
/// flight (see the module docs).
pub struct SilenceFloor {
    inner: Box<dyn Controller>,
    silence: Duration,
    floor: u64,
    last_ack: Instant,
    /// Bytes in flight at the last batch of acks.
    in_flight: u64,
    /// Bytes sent since then.
    sent_since: u64,
    silent: bool,
    /// When the last silence ended (its first ACK): losses of packets sent before are the
    /// outage's, not congestion.
    resumed_at: Option<Instant>,
    /// The inner window as the silence began, and until when it holds after the silence
    /// ended (see [`SilenceFloor::window`]): at least [`HOLD_ROUND_TRIPS`], then until the
    /// backlog fits the inner window past its PROBE_RTT, at most [`MAX_HOLD`]; a loss of a
    /// packet sent after the silence ends it at once.
    before_silence: u64,
    held_until: Option<Instant>,
    /// The path's current MTU.
    mtu: u64,
    /// The latest a hold lasts.
    hold_limit: Option<Instant>,
}

/// Round trips (the least seen) the window from before a silence holds after it ends, at
/// least; it holds on while the inner window is at its PROBE_RTT size (a few packets), for
/// at most [`MAX_HOLD`].
const HOLD_ROUND_TRIPS: u32 = 4;
const MAX_HOLD: Duration = Duration::from_secs(1);
/// An inner window at most this many packets is taken for PROBE_RTT's (four packets).
const PROBE_RTT_PACKETS: u64 = 8;

impl Controller for SilenceFloor {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        if self.in_flight == 0 && self.sent_since == 0 {
            // The first packet after an idle spell (nothing in flight, nothing sent since
            // the last ACK): a silence counts from here, not from the last ACK.
            self.last_ack = now;
        }
        self.sent_since = self.sent_since.saturating_add(bytes);
        let silent = now.saturating_duration_since(self.last_ack) >= self.silence;
        if silent && !self.silent {
            self.before_silence = self.inner.window();
        }
        self.silent = silent;
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.last_ack = now;
        if self.silent {
            self.resumed_at = Some(now);
            self.held_until = Some(now + rtt.min() * HOLD_ROUND_TRIPS);
            self.hold_limit = Some(now + MAX_HOLD);
        }
        self.silent = false;
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.in_flight = in_flight;
        self.sent_since = 0;
        // The hold ends once the backlog fits the inner window, which is past PROBE_RTT.
        let inner = self.inner.window();
        let probing_rtt = inner <= PROBE_RTT_PACKETS * self.mtu;
        let settled = !probing_rtt && in_flight <= inner;
        if self.held_until.is_some_and(|until| now >= until)
            && (settled || self.hold_limit.is_some_and(|limit| now >= limit))
        {
            self.held_until = None;
        }
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if self.resumed_at.is_some_and(|resumed| sent < resumed) {
            // Packets sent into the outage (`sent` is the latest lost packet's send time).
            return;
        }
        // A loss of a packet sent after the path returned: the window from before the
        // outage no longer holds (the path may have come back narrower).
        self.held_until = None;
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let mut window = self.inner.window();
        // For a few round trips after a silence the window is at least what it was before
        // it: what went into the outage needs resending, and quinn's BBR, which has never
        // probed its round trip while the channel was app-limited, enters PROBE_RTT (a
        // window of four packets for 200 ms and more) the first time it is not (measured:
        // 480 KB to 5.8 KB right after a 2 s outage).
        if self.held_until.is_some() {
            window = window.max(self.before_silence);
        }
        if self.silent {
            window.max(self.in_flight + self.sent_since + self.floor)
        } else {
            window
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(SilenceFloor {
            inner: self.inner.clone_box(),
            silence: self.silence,
            floor: self.floor,
            last_ack: self.last_ack,
            in_flight: self.in_flight,
            sent_since: self.sent_since,
            silent: self.silent,
            resumed_at: self.resumed_at,
            before_silence: self.before_silence,
            held_until: self.held_until,
            hold_limit: self.hold_limit,
            mtu: self.mtu,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
