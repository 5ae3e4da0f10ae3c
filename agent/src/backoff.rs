//! Reconnect delays: full-jitter exponential backoff. After a failure the agent waits a
//! uniformly random time in [0, min(cap, base * 2^attempt)], so a fleet that lost its
//! server at one moment does not come back at one moment.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, drawn from `rng`; each call raises the ceiling until the cap.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.random_range(0..=millis))
    }

    /// Called after a session that was accepted: the next failure starts over.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            ceilings.push(backoff.ceiling().as_secs());
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= Duration::from_secs(*ceilings.last().unwrap()));
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_spread_over_the_whole_range() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<Duration> = (0..1000)
            .map(|_| {
                let mut backoff = Backoff::new(Duration::from_secs(8), Duration::from_secs(60));
                backoff.next_delay(&mut rng)
            })
            .collect();
        let low = delays.iter().filter(|d| d.as_secs() < 2).count();
        let high = delays.iter().filter(|d| d.as_secs() >= 6).count();
        // Full jitter: roughly a quarter in each of the bottom and top quarters.
        assert!((150..350).contains(&low), "{low} delays under 2s");
        assert!((150..350).contains(&high), "{high} delays over 6s");
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        backoff.attempt = u32::MAX;
        assert_eq!(backoff.ceiling(), Duration::from_secs(60));
        let _ = backoff.next_delay(&mut rand::rng());
    }
}
