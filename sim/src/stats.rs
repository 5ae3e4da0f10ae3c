//! Counters and latency histograms shared by every simulated agent, and the report
//! built from them (text for people, one JSON object for scripts).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are kept in microseconds; an hour is far beyond anything we measure.
fn histogram() -> Mutex<Histogram<u64>> {
    Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"))
}

pub(crate) struct Stats {
    started: Instant,
    agents: usize,
    /// Agents inside a welcomed session right now.
    connected: AtomicUsize,
    /// When `connected` first reached `agents`, counted from `started`.
    all_connected_at: OnceLock<Duration>,
    /// The steady window opens this long after every agent has connected, so the
    /// first heartbeats after a connect storm do not count.
    warmup: Duration,
    pub(crate) enrolled: AtomicU64,
    pub(crate) reused_identities: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) heartbeats_sent: AtomicU64,
    pub(crate) heartbeats_acked: AtomicU64,
    /// Heartbeats acknowledged after every agent had connected.
    steady_acked: AtomicU64,
    pub(crate) updates_received: AtomicU64,
    pub(crate) updates_verified: AtomicU64,
    pub(crate) updates_completed: AtomicU64,
    pub(crate) updates_failed: AtomicU64,
    pub(crate) download_retries: AtomicU64,
    /// Bytes of builds and compressed copies received, retries included.
    pub(crate) download_bytes: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Build failures reported to the server, per target version.
    build_failures: Mutex<BTreeMap<String, u64>>,
    connect: Mutex<Histogram<u64>>,
    heartbeat_rtt: Mutex<Histogram<u64>>,
    heartbeat_rtt_steady: Mutex<Histogram<u64>>,
    update_notify: Mutex<Histogram<u64>>,
    update_completion: Mutex<Histogram<u64>>,
    /// Wall-clock milliseconds of each first receipt of a task's update, and of each
    /// completed update, so a script can measure from an event it timed itself (a
    /// promote request) to the last agent.
    update_received_at: Mutex<Vec<u64>>,
    update_completed_at: Mutex<Vec<u64>>,
}

impl Stats {
    pub(crate) fn new(agents: usize, warmup: Duration) -> Stats {
        Stats {
            started: Instant::now(),
            agents,
            connected: AtomicUsize::new(0),
            all_connected_at: OnceLock::new(),
            warmup,
            enrolled: AtomicU64::new(0),
            reused_identities: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            heartbeats_sent: AtomicU64::new(0),
            heartbeats_acked: AtomicU64::new(0),
            steady_acked: AtomicU64::new(0),
            updates_received: AtomicU64::new(0),
            updates_verified: AtomicU64::new(0),
            updates_completed: AtomicU64::new(0),
            updates_failed: AtomicU64::new(0),
            download_retries: AtomicU64::new(0),
            download_bytes: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            build_failures: Mutex::new(BTreeMap::new()),
            connect: histogram(),
            heartbeat_rtt: histogram(),
            heartbeat_rtt_steady: histogram(),
            update_notify: histogram(),
            update_completion: histogram(),
            update_received_at: Mutex::new(Vec::new()),
            update_completed_at: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn error(&self, kind: &str) {
        *lock(&self.errors).entry(kind.to_owned()).or_default() += 1;
    }

    /// An update result of class `build` sent for `version`.
    pub(crate) fn record_build_failure(&self, version: &str) {
        *lock(&self.build_failures)
            .entry(version.to_owned())
            .or_default() += 1;
    }

    /// Marks an agent as inside a session until the guard is dropped.
    pub(crate) fn session_open(&self) -> ConnectedGuard<'_> {
        let now = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        if now == self.agents {
            let _ = self.all_connected_at.set(self.started.elapsed());
        }
        ConnectedGuard(self)
    }

    pub(crate) fn record_connect(&self, took: Duration) {
        record(&self.connect, took);
    }

    pub(crate) fn record_heartbeat_ack(&self, rtt: Duration) {
        self.heartbeats_acked.fetch_add(1, Ordering::Relaxed);
        record(&self.heartbeat_rtt, rtt);
        if self
            .steady_since()
            .is_some_and(|since| self.started.elapsed() >= since)
        {
            self.steady_acked.fetch_add(1, Ordering::Relaxed);
            record(&self.heartbeat_rtt_steady, rtt);
        }
    }

    fn steady_since(&self) -> Option<Duration> {
        self.all_connected_at.get().map(|at| *at + self.warmup)
    }

    pub(crate) fn record_update_notify(&self, took: Duration) {
        record(&self.update_notify, took);
    }

    pub(crate) fn record_update_completion(&self, took: Duration) {
        record(&self.update_completion, took);
        lock(&self.update_completed_at).push(unix_ms());
    }

    /// The first receipt of a task's update by its agent.
    pub(crate) fn record_update_received(&self) {
        lock(&self.update_received_at).push(unix_ms());
    }

    /// When each update was first held, Unix milliseconds, in the order they came.
    pub(crate) fn update_received_times(&self) -> Vec<u64> {
        lock(&self.update_received_at).clone()
    }

    pub(crate) fn report(&self) -> Report {
        let elapsed = self.started.elapsed();
        let all_connected = self.all_connected_at.get().copied();
        let steady_secs = self
            .steady_since()
            .filter(|since| elapsed > *since)
            .map(|since| (elapsed - since).as_secs_f64());
        let steady_acked = self.steady_acked.load(Ordering::Relaxed);
        let errors = lock(&self.errors).clone();
        Report {
            agents: self.agents,
            elapsed_secs: round3(elapsed.as_secs_f64()),
            connected: self.connected.load(Ordering::Relaxed),
            all_connected_secs: all_connected.map(|d| round3(d.as_secs_f64())),
            connect_ms: Percentiles::of(&self.connect),
            enrolled: get(&self.enrolled),
            reused_identities: get(&self.reused_identities),
            reconnects: get(&self.reconnects),
            restarts: get(&self.restarts),
            heartbeats_sent: get(&self.heartbeats_sent),
            heartbeats_acked: get(&self.heartbeats_acked),
            steady_secs: steady_secs.map(round3),
            steady_heartbeats_per_sec: steady_secs
                .filter(|secs| *secs > 0.0)
                .map(|secs| round3(steady_acked as f64 / secs)),
            heartbeat_rtt_ms: Percentiles::of(&self.heartbeat_rtt),
            steady_heartbeat_rtt_ms: Percentiles::of(&self.heartbeat_rtt_steady),
            updates_received: get(&self.updates_received),
            updates_verified: get(&self.updates_verified),
            updates_completed: get(&self.updates_completed),
            updates_failed: get(&self.updates_failed),
            download_retries: get(&self.download_retries),
            download_bytes: get(&self.download_bytes),
            update_notify_ms: Percentiles::of(&self.update_notify),
            update_completion_ms: Percentiles::of(&self.update_completion),
            update_received_unix_ms: Moments::of(&self.update_received_at),
            update_completed_unix_ms: Moments::of(&self.update_completed_at),
            failures_reported: lock(&self.build_failures).clone(),
            errors_total: errors.values().sum(),
            errors,
        }
    }
}

pub(crate) struct ConnectedGuard<'a>(&'a Stats);

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A poisoned lock only means another agent panicked mid-update of a counter; the
/// figures are still worth reporting.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn record(histogram: &Mutex<Histogram<u64>>, took: Duration) {
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
    lock(histogram).saturating_record(micros);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) count: u64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Percentiles {
    fn of(histogram: &Mutex<Histogram<u64>>) -> Percentiles {
        let h = lock(histogram);
        let ms = |micros: u64| round3(micros as f64 / 1000.0);
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// Wall-clock times (Unix milliseconds) of a set of events: the first, the median, the
/// 99th percentile and the last. Null when nothing happened.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Moments {
    pub(crate) count: usize,
    pub(crate) first: u64,
    pub(crate) p50: u64,
    pub(crate) p99: u64,
    pub(crate) last: u64,
}

impl Moments {
    fn of(times: &Mutex<Vec<u64>>) -> Option<Moments> {
        let mut times = lock(times).clone();
        times.sort_unstable();
        let at =
            |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
        (!times.is_empty()).then(|| Moments {
            count: times.len(),
            first: times[0],
            p50: at(0.5),
            p99: at(0.99),
            last: times[times.len() - 1],
        })
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0 {
            return write!(f, "none");
        }
        write!(
            f,
            "p50 {} ms, p99 {} ms, max {} ms (n={})",
            self.p50, self.p99, self.max, self.count
        )
    }
}

/// Everything the simulator measured. Field names are read by the bench scripts and
/// the end-to-end test.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) agents: usize,
    pub(crate) elapsed_secs: f64,
    pub(crate) connected: usize,
    /// Seconds from start until every agent was connected at once; null if never.
    pub(crate) all_connected_secs: Option<f64>,
    /// First connection attempt to welcome, once per agent.
    pub(crate) connect_ms: Percentiles,
    /// Welcomes that carried a new secret (first enrollments and re-enrollments).
    pub(crate) enrolled: u64,
    /// Sessions opened with stored credentials, restarts after updates included.
    pub(crate) reused_identities: u64,
    /// Connection attempts after a failed attempt or a lost session.
    pub(crate) reconnects: u64,
    /// Sessions closed on purpose to come back on a new version.
    pub(crate) restarts: u64,
    pub(crate) heartbeats_sent: u64,
    pub(crate) heartbeats_acked: u64,
    /// Length of the window from `warmup` after every agent had connected to the end.
    pub(crate) steady_secs: Option<f64>,
    pub(crate) steady_heartbeats_per_sec: Option<f64>,
    /// Heartbeat sent to the pong of the ping that followed it.
    pub(crate) heartbeat_rtt_ms: Percentiles,
    pub(crate) steady_heartbeat_rtt_ms: Percentiles,
    pub(crate) updates_received: u64,
    /// Downloads whose size and SHA-256 matched the update.
    pub(crate) updates_verified: u64,
    /// Updates proven by the new version's first acknowledged heartbeat.
    pub(crate) updates_completed: u64,
    pub(crate) updates_failed: u64,
    /// 503 answers and network failures that were retried.
    pub(crate) download_retries: u64,
    /// Bytes of builds and compressed copies received, retries included.
    pub(crate) download_bytes: u64,
    /// Receipt time minus the update's `sent_at_ms`.
    pub(crate) update_notify_ms: Percentiles,
    /// Receipt of the update to the new version's first acknowledged heartbeat.
    pub(crate) update_completion_ms: Percentiles,
    pub(crate) update_received_unix_ms: Option<Moments>,
    pub(crate) update_completed_unix_ms: Option<Moments>,
    /// Results of class `build` sent (rolled back or failed), per target version, to
    /// compare with the server's failure counts.
    pub(crate) failures_reported: BTreeMap<String, u64>,
    pub(crate) errors_total: u64,
    pub(crate) errors: BTreeMap<String, u64>,
}

impl Report {
    /// One line for the progress log.
    pub(crate) fn progress_line(&self) -> String {
        format!(
            "[{:>7.1}s] connected {}/{}  heartbeats {} (acked {})  updates {}/{}  reconnects {}  errors {}",
            self.elapsed_secs,
            self.connected,
            self.agents,
            self.heartbeats_sent,
            self.heartbeats_acked,
            self.updates_completed,
            self.updates_received,
            self.reconnects,
            self.errors_total,
        )
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<f64>| v.map_or_else(|| "never".to_owned(), |v| format!("{v}"));
        writeln!(f, "drover-sim report after {} s", self.elapsed_secs)?;
        writeln!(
            f,
            "  agents connected:     {}/{}",
            self.connected, self.agents
        )?;
        writeln!(
            f,
            "  all connected after:  {} s",
            opt(self.all_connected_secs)
        )?;
        writeln!(f, "  connect time:         {}", self.connect_ms)?;
        writeln!(
            f,
            "  identities:           {} enrolled, {} reused",
            self.enrolled, self.reused_identities
        )?;
        writeln!(
            f,
            "  heartbeats:           {} sent, {} acked, steady {} /s over {} s",
            self.heartbeats_sent,
            self.heartbeats_acked,
            opt(self.steady_heartbeats_per_sec),
            opt(self.steady_secs)
        )?;
        writeln!(f, "  heartbeat round trip: {}", self.heartbeat_rtt_ms)?;
        writeln!(
            f,
            "    after all connected: {}",
            self.steady_heartbeat_rtt_ms
        )?;
        writeln!(
            f,
            "  updates:              {} received, {} verified, {} completed, {} failed, {} download retries, {} bytes downloaded",
            self.updates_received,
            self.updates_verified,
            self.updates_completed,
            self.updates_failed,
            self.download_retries,
            self.download_bytes
        )?;
        writeln!(f, "  update notification:  {}", self.update_notify_ms)?;
        writeln!(f, "  update completion:    {}", self.update_completion_ms)?;
        if !self.failures_reported.is_empty() {
            let per_version: Vec<String> = self
                .failures_reported
                .iter()
                .map(|(version, count)| format!("{version}: {count}"))
                .collect();
            writeln!(f, "  build failures sent:  {}", per_version.join(", "))?;
        }
        writeln!(
            f,
            "  reconnects:           {} ({} restarts for updates)",
            self.reconnects, self.restarts
        )?;
        write!(f, "  errors:               {}", self.errors_total)?;
        for (kind, count) in &self.errors {
            write!(f, "\n    {kind}: {count}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_connected_is_stamped_once_when_every_agent_is_in() {
        let stats = Stats::new(2, Duration::ZERO);
        let a = stats.session_open();
        assert!(stats.report().all_connected_secs.is_none());
        let b = stats.session_open();
        let stamped = stats.report().all_connected_secs;
        assert!(stamped.is_some());
        drop(a);
        drop(b);
        let _again = (stats.session_open(), stats.session_open());
        assert_eq!(stats.report().all_connected_secs, stamped);
        assert_eq!(stats.report().connected, 2);
    }

    #[test]
    fn moments_are_nearest_rank_over_wall_clock_times() {
        let stats = Stats::new(1, Duration::ZERO);
        assert!(stats.report().update_received_unix_ms.is_none());
        for at in (1..=200).rev() {
            lock(&stats.update_received_at).push(at);
        }
        let moments = stats
            .report()
            .update_received_unix_ms
            .expect("200 receipts");
        assert_eq!(
            (
                moments.count,
                moments.first,
                moments.p50,
                moments.p99,
                moments.last
            ),
            (200, 1, 100, 198, 200)
        );
    }

    #[test]
    fn build_failures_are_reported_per_version() {
        let stats = Stats::new(3, Duration::ZERO);
        assert!(stats.report().failures_reported.is_empty());
        stats.record_build_failure("1.1.0");
        stats.record_build_failure("1.2.0");
        stats.record_build_failure("1.1.0");
        let report = stats.report();
        assert_eq!(
            report.failures_reported,
            BTreeMap::from([("1.1.0".to_owned(), 2), ("1.2.0".to_owned(), 1)])
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["failures_reported"],
            serde_json::json!({"1.1.0": 2, "1.2.0": 1})
        );
        assert!(report.to_string().contains("1.1.0: 2, 1.2.0: 1"));
    }

    #[test]
    fn errors_are_counted_by_kind() {
        let stats = Stats::new(1, Duration::ZERO);
        stats.error("tcp_connect");
        stats.error("tcp_connect");
        stats.error("rejected_timeout");
        let report = stats.report();
        assert_eq!(report.errors_total, 3);
        assert_eq!(report.errors["tcp_connect"], 2);
    }
}
