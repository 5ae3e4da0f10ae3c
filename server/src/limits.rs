//! Rate limits against hostile or broken peers: `Rate` ("N per period") and its token
//! `Bucket`, and the `EnrollmentLimiter`, which counts enrollment (or dashboard login)
//! attempts per source address in a map of bounded size. Callers pass the time in, so
//! tests need no clock. `PerSource` caps what one source address holds at once
//! (downloads, connections).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A limit of `burst` events at once, refilled evenly over `per`: `20/1m` allows 20 in a
/// row, then one every 3 seconds. A burst of 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub per: Duration,
}

impl Rate {
    pub const UNLIMITED: Rate = Rate {
        burst: 0,
        per: Duration::from_secs(1),
    };

    pub fn is_unlimited(&self) -> bool {
        self.burst == 0
    }

    /// Parses `N/PERIOD` (`6000/1m`, `20/60s`, `10/1h`), or `0`/`off` for no limit.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let text = text.trim();
        if matches!(text, "0" | "off" | "none" | "unlimited") {
            return Ok(Rate::UNLIMITED);
        }
        let usage = || format!("{text:?} is not a limit like 20/1m (N per period) or off");
        let (count, period) = text.split_once('/').ok_or_else(usage)?;
        let burst: u32 = count.trim().parse().map_err(|_| usage())?;
        let period = period.trim();
        // `20/s` reads as 20 per second.
        let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
            period.to_owned()
        } else {
            format!("1{period}")
        };
        let per = humantime::parse_duration(&period).map_err(|e| format!("{}: {e}", usage()))?;
        if burst == 0 {
            return Ok(Rate::UNLIMITED);
        }
        if per.is_zero() {
            return Err(format!("{text:?}: the period must be longer than zero"));
        }
        Ok(Rate { burst, per })
    }

    /// The steady rate the bucket refills at.
    pub fn per_second(&self) -> f64 {
        f64::from(self.burst) / self.per.as_secs_f64()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            f.write_str("off")
        } else {
            write!(f, "{}/{}", self.burst, humantime::format_duration(self.per))
        }
    }
}

/// A token bucket: full at first, one token per event, refilled at the rate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second()).min(f64::from(rate.burst));
        self.at = self.at.max(now);
    }

    /// Takes a token; false when none is left.
    pub(crate) fn take(&mut self, rate: Rate, now: Instant) -> bool {
        if rate.is_unlimited() {
            return true;
        }
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn has_token(&mut self, rate: Rate, now: Instant) -> bool {
        rate.is_unlimited() || {
            self.refill(rate, now);
            self.tokens >= 1.0
        }
    }

    /// Full again: the same as never having been used.
    fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        rate.is_unlimited() || {
            self.refill(rate, now);
            self.tokens >= f64::from(rate.burst)
        }
    }
}

/// How many enrollment attempts one source address gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrollmentLimits {
    /// Every enrollment hello, good or bad.
    pub attempts: Rate,
    /// Enrollment hellos that failed (unknown or revoked token, no fingerprint). An
    /// address out of these is refused even with a good token until it refills.
    pub failures: Rate,
}

impl Default for EnrollmentLimits {
    /// Generous for every attempt, since re-enrolling is normal and a whole site may
    /// enroll from behind one address (`drover-sim` enrolls 1,000 agents per address in
    /// seconds); strict for failures, which a working agent does not produce.
    fn default() -> EnrollmentLimits {
        EnrollmentLimits {
            attempts: Rate {
                burst: 6000,
                per: Duration::from_secs(60),
            },
            failures: Rate {
                burst: 20,
                per: Duration::from_secs(60),
            },
        }
    }
}

/// Dashboard logins per source address: a person types a token a few times; a script
/// guessing tokens is stopped after ten failures a minute.
pub(crate) const LOGIN_LIMITS: EnrollmentLimits = EnrollmentLimits {
    attempts: Rate {
        burst: 60,
        per: Duration::from_secs(60),
    },
    failures: Rate {
        burst: 10,
        per: Duration::from_secs(60),
    },
};

/// Source addresses tracked at most; beyond it, addresses whose buckets have refilled are
/// forgotten first, then the longest-idle quarter.
const MAX_SOURCES: usize = 16_384;

/// Enrollment attempts per source address. An IPv6 source is its /64, which one machine
/// or site usually owns whole.
pub(crate) struct EnrollmentLimiter {
    limits: EnrollmentLimits,
    /// What is attempted, for the refusal: `enrollment` or `login`.
    what: &'static str,
    sources: Mutex<HashMap<IpAddr, SourceBuckets>>,
    max_sources: usize,
}

struct SourceBuckets {
    attempts: Bucket,
    failures: Bucket,
    touched: Instant,
}

/// Why an enrollment attempt was refused before it was looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TooManyAttempts(pub(crate) String);

impl EnrollmentLimiter {
    pub(crate) fn new(limits: EnrollmentLimits) -> EnrollmentLimiter {
        EnrollmentLimiter::of("enrollment", limits)
    }

    /// A limiter of attempts at `what` (`login`), with the same bookkeeping.
    pub(crate) fn of(what: &'static str, limits: EnrollmentLimits) -> EnrollmentLimiter {
        EnrollmentLimiter {
            what,
            limits,
            sources: Mutex::default(),
            max_sources: MAX_SOURCES,
        }
    }

    /// Counts an enrollment attempt from `source`, or refuses it. A refused attempt costs
    /// nothing, so retrying does not extend the wait.
    pub(crate) fn attempt(&self, source: IpAddr, now: Instant) -> Result<(), TooManyAttempts> {
        let limits = self.limits;
        if limits.attempts.is_unlimited() && limits.failures.is_unlimited() {
            return Ok(());
        }
        let mut sources = self.lock();
        let buckets = self.entry(&mut sources, source, now);
        if !buckets.failures.has_token(limits.failures, now) {
            return Err(TooManyAttempts(format!(
                "too many failed {} attempts from this address (limit {}); retry later",
                self.what, limits.failures
            )));
        }
        if !buckets.attempts.take(limits.attempts, now) {
            return Err(TooManyAttempts(format!(
                "too many {} attempts from this address (limit {}); retry later",
                self.what, limits.attempts
            )));
        }
        Ok(())
    }

    /// Counts a failed enrollment from `source`.
    pub(crate) fn failed(&self, source: IpAddr, now: Instant) {
        if self.limits.failures.is_unlimited() {
            return;
        }
        let mut sources = self.lock();
        let buckets = self.entry(&mut sources, source, now);
        buckets.failures.take(self.limits.failures, now);
    }

    fn entry<'a>(
        &self,
        sources: &'a mut HashMap<IpAddr, SourceBuckets>,
        source: IpAddr,
        now: Instant,
    ) -> &'a mut SourceBuckets {
        let key = source_key(source);
        if !sources.contains_key(&key) && sources.len() >= self.max_sources {
            self.prune(sources, now);
        }
        let limits = self.limits;
        let buckets = sources.entry(key).or_insert_with(|| SourceBuckets {
            attempts: Bucket::full(limits.attempts, now),
            failures: Bucket::full(limits.failures, now),
            touched: now,
        });
        buckets.touched = buckets.touched.max(now);
        buckets
    }

    /// Forgets addresses whose buckets are full again (no different from new ones); if
    /// that frees too little, the longest-idle quarter too. Each pass frees at least a
    /// quarter, so its cost is spread over that many new addresses.
    fn prune(&self, sources: &mut HashMap<IpAddr, SourceBuckets>, now: Instant) {
        let limits = self.limits;
        sources.retain(|_, b| {
            !(b.attempts.is_full(limits.attempts, now) && b.failures.is_full(limits.failures, now))
        });
        if sources.len() < self.max_sources * 3 / 4 {
            return;
        }
        let mut touched: Vec<Instant> = sources.values().map(|b| b.touched).collect();
        let cut = touched.len() / 4;
        let (_, oldest_kept, _) = touched.select_nth_unstable(cut);
        let oldest_kept = *oldest_kept;
        sources.retain(|_, b| b.touched > oldest_kept);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, SourceBuckets>> {
        // Buckets are plain numbers; a panic elsewhere cannot leave them inconsistent.
        self.sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }
}

/// Things held at once per source address (IPv6 by its /64): downloads, connections.
pub(crate) struct PerSource {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl PerSource {
    pub(crate) fn new(max: usize) -> PerSource {
        PerSource {
            max,
            held: Mutex::default(),
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// A slot for `source`, or `None` while it holds `max` already.
    pub(crate) fn try_take(self: &Arc<Self>, source: IpAddr) -> Option<SourceSlot> {
        let key = source_key(source);
        let mut held = self.lock();
        let count = held.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            owner: self.clone(),
            key,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One source's slot, given back when dropped.
pub(crate) struct SourceSlot {
    owner: Arc<PerSource>,
    key: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.owner.lock();
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// IPv4 as it is (also when mapped into IPv6); IPv6 by its /64.
pub(crate) fn source_key(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_default_to_the_library_defaults() {
        use clap::Parser;
        let args = crate::config::Args::try_parse_from(["drover-server"]).unwrap();
        let defaults = EnrollmentLimits::default();
        assert_eq!(args.enroll_limit, defaults.attempts);
        assert_eq!(args.enroll_failure_limit, defaults.failures);
    }

    fn rate(text: &str) -> Rate {
        Rate::parse(text).unwrap()
    }

    #[test]
    fn rates_parse_from_n_per_period() {
        let cases = [
            ("20/1m", Ok((20, 60))),
            (" 6000/60s ", Ok((6000, 60))),
            ("10/s", Ok((10, 1))),
            ("3/h", Ok((3, 3600))),
            ("0", Ok((0, 1))),
            ("off", Ok((0, 1))),
            ("20", Err(())),
            ("x/1m", Err(())),
            ("-1/1m", Err(())),
            ("5/0s", Err(())),
            ("5/soon", Err(())),
        ];
        for (text, expected) in cases {
            let got = Rate::parse(text)
                .map(|r| (r.burst, r.per.as_secs()))
                .map_err(|_| ());
            assert_eq!(got, expected, "{text:?}");
        }
        assert_eq!(rate("20/1m").to_string(), "20/1m");
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_evenly() {
        let start = Instant::now();
        let rate = rate("4/2s");
        let mut bucket = Bucket::full(rate, start);
        assert!((0..4).all(|_| bucket.take(rate, start)));
        assert!(!bucket.take(rate, start));
        // Two per second come back, never more than the burst.
        assert!(!bucket.take(rate, start + Duration::from_millis(400)));
        assert!(bucket.take(rate, start + Duration::from_millis(500)));
        let later = start + Duration::from_secs(3600);
        assert!((0..4).all(|_| bucket.take(rate, later)));
        assert!(!bucket.take(rate, later));
        // Time running backwards (a stale `now`) takes nothing away.
        assert!(!bucket.take(rate, start));
    }

    #[test]
    fn an_unlimited_rate_never_refuses() {
        let now = Instant::now();
        let mut bucket = Bucket::full(Rate::UNLIMITED, now);
        assert!((0..10_000).all(|_| bucket.take(Rate::UNLIMITED, now)));
    }

    fn limiter(attempts: &str, failures: &str) -> EnrollmentLimiter {
        EnrollmentLimiter::new(EnrollmentLimits {
            attempts: rate(attempts),
            failures: rate(failures),
        })
    }

    #[test]
    fn failures_lock_an_address_out_even_with_a_good_token() {
        let limiter = limiter("100/1m", "3/1m");
        let (bad, good): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.attempt(bad, now), Ok(()));
            limiter.failed(bad, now);
        }
        let refused = limiter.attempt(bad, now).unwrap_err();
        assert!(
            refused.0.contains("failed enrollment attempts"),
            "{refused:?}"
        );
        // Other addresses are unaffected, and the locked one recovers as it refills.
        assert_eq!(limiter.attempt(good, now), Ok(()));
        assert_eq!(limiter.attempt(bad, now + Duration::from_secs(20)), Ok(()));
    }

    #[test]
    fn every_attempt_counts_against_the_generous_limit() {
        let limiter = limiter("5/1m", "off");
        let source: IpAddr = "192.0.2.7".parse().unwrap();
        let now = Instant::now();
        assert!((0..5).all(|_| limiter.attempt(source, now).is_ok()));
        let refused = limiter.attempt(source, now).unwrap_err();
        assert!(
            refused.0.contains("too many enrollment attempts"),
            "{refused:?}"
        );
        assert!(refused.0.contains("5/1m"), "{refused:?}");
        // Refusals cost nothing: one refill interval later exactly one more gets in.
        let later = now + Duration::from_secs(12);
        assert!(limiter.attempt(source, later).is_ok());
        assert!(limiter.attempt(source, later).is_err());
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() {
        let limiter = limiter("2/1h", "off");
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(limiter.attempt(a, now).is_ok());
        assert!(limiter.attempt(b, now).is_ok());
        assert!(limiter.attempt(a, now).is_err());
        assert!(limiter.attempt(other, now).is_ok());
        let v4: IpAddr = "203.0.113.5".parse().unwrap();
        let mapped: IpAddr = "::ffff:203.0.113.5".parse().unwrap();
        assert!(limiter.attempt(v4, now).is_ok());
        assert!(limiter.attempt(mapped, now).is_ok());
        assert!(limiter.attempt(v4, now).is_err());
    }

    #[test]
    fn an_attacker_cycling_addresses_cannot_grow_the_map_without_bound() {
        let mut limiter = limiter("10/1h", "3/1h");
        limiter.max_sources = 1000;
        let now = Instant::now();
        // A locked-out address, touched last, must survive the pruning.
        let victim: IpAddr = "198.51.100.1".parse().unwrap();
        for i in 0u32..50_000 {
            let source = IpAddr::V4((0x0a00_0000 + i).into());
            let at = now + Duration::from_millis(u64::from(i));
            let _ = limiter.attempt(source, at);
            limiter.failed(source, at);
            if i == 49_990 {
                for _ in 0..3 {
                    limiter.failed(victim, at);
                }
            }
            assert!(limiter.tracked() <= 1000);
        }
        let end = now + Duration::from_secs(50);
        assert!(limiter.attempt(victim, end).is_err());
        // Addresses whose buckets refilled are forgotten first.
        let refilled = now + Duration::from_secs(10 * 3600);
        limiter.prune(&mut limiter.lock(), refilled);
        assert_eq!(limiter.tracked(), 0);
    }
}
