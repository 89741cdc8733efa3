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
            silence: self.silence,
            floor: self.floor,
            last_ack: now,
            in_flight: 0,
            sent_since: 0,
            silent: false,
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
}

impl Controller for SilenceFloor {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.sent_since = self.sent_since.saturating_add(bytes);
        self.silent = now.saturating_duration_since(self.last_ack) >= self.silence;
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
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let window = self.inner.window();
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
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
