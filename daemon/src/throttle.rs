//! Throttles: token-bucket rate limiters (bytes/s, IOPS) whose rate can change
//! while they are in use, and the CPU and I/O priorities of the process.
//!
//! The limiter hands out tickets in order: a request for `n` tokens is
//! allowed once the tokens earned since the limiter was made reach the sum of
//! all requests up to and including it. Tokens accrue at the rate; unused
//! ones pile up to a burst of `rate / 20` at most (50 ms worth). A request
//! larger than the burst simply waits for its whole size, so over any span
//! `T` no more than `rate × T + burst` tokens are allowed, and a busy caller
//! gets the full rate. Waiting times are recomputed from the current rate, so
//! [`RateLimiter::set_rate`] takes effect for callers already waiting.

use std::{
    fmt, io,
    str::FromStr,
    sync::{Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use crate::sys::prio;

const NANOS: u128 = 1_000_000_000;
/// Longest single sleep, so a caller notices cancellation promptly.
const SLICE: Duration = Duration::from_millis(50);

/// A token bucket; rate 0 means unlimited.
pub struct RateLimiter {
    bucket: Mutex<Bucket>,
    changed: Condvar,
}

/// A place in the limiter's queue, from [`RateLimiter::reserve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket(u128);

/// Accounts in token-nanoseconds (tokens × 10⁹), so one nanosecond at
/// `rate` tokens/s earns exactly `rate` units and nothing is rounded.
struct Bucket {
    rate: u64,
    /// Earned since creation; never more than a burst ahead of `issued`.
    earned: u128,
    /// Promised to callers since creation.
    issued: u128,
    last: Instant,
}

impl Bucket {
    fn burst(&self) -> u128 {
        u128::from((self.rate / 20).max(1)) * NANOS
    }

    fn advance(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        if self.rate == 0 {
            self.earned = self.issued;
            return;
        }
        let cap = self.issued.saturating_add(self.burst());
        self.earned = self
            .earned
            .saturating_add(dt.saturating_mul(u128::from(self.rate)))
            .min(cap);
    }

    fn reserve(&mut self, now: Instant, n: u64) -> Ticket {
        self.advance(now);
        self.issued = self.issued.saturating_add(u128::from(n) * NANOS);
        Ticket(self.issued)
    }

    fn wait(&mut self, now: Instant, ticket: Ticket) -> Duration {
        self.advance(now);
        if self.rate == 0 || self.earned >= ticket.0 {
            return Duration::ZERO;
        }
        let nanos = (ticket.0 - self.earned).div_ceil(u128::from(self.rate));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn set_rate(&mut self, now: Instant, rate: u64) {
        self.advance(now);
        if self.rate == 0 {
            // Coming from unlimited: start with no credit and no debt.
            self.earned = self.issued;
        }
        self.rate = rate;
        self.advance(now);
    }
}

impl RateLimiter {
    /// A limiter allowing `per_sec` tokens per second (0 = unlimited).
    pub fn new(per_sec: u64) -> Self {
        Self {
            bucket: Mutex::new(Bucket {
                rate: per_sec,
                earned: 0,
                issued: 0,
                last: Instant::now(),
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Bucket> {
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the rate; callers already waiting follow the new rate.
    pub fn set_rate(&self, per_sec: u64) {
        self.lock().set_rate(Instant::now(), per_sec);
        self.changed.notify_all();
    }

    /// Tokens per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.lock().rate
    }

    /// Blocks until `n` tokens are allowed.
    pub fn acquire(&self, n: u64) {
        self.acquire_while(n, || true);
    }

    /// Like [`acquire`](Self::acquire), but gives up (returning false) once
    /// `keep_going` returns false; it is polled at least every 50 ms.
    pub fn acquire_while(&self, n: u64, keep_going: impl Fn() -> bool) -> bool {
        if n == 0 {
            return true;
        }
        let ticket = self.reserve(n);
        let mut bucket = self.lock();
        loop {
            let wait = bucket.wait(Instant::now(), ticket);
            if wait.is_zero() {
                return true;
            }
            if !keep_going() {
                return false;
            }
            bucket = self
                .changed
                .wait_timeout(bucket, wait.min(SLICE))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Takes a place in the queue for `n` tokens without waiting; the caller
    /// must not go ahead before [`wait_time`](Self::wait_time) is zero.
    pub fn reserve(&self, n: u64) -> Ticket {
        self.lock().reserve(Instant::now(), n)
    }

    /// How long `ticket` still has to wait at the current rate.
    pub fn wait_time(&self, ticket: Ticket) -> Duration {
        self.lock().wait(Instant::now(), ticket)
    }

    /// The bucket's arithmetic on an injected clock: reserves `n` tokens at
    /// `now` and returns how long the caller must wait before using them.
    pub fn take(&self, now: Instant, n: u64) -> Duration {
        let mut bucket = self.lock();
        let ticket = bucket.reserve(now, n);
        bucket.wait(now, ticket)
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rate", &self.rate())
            .finish()
    }
}

/// An I/O scheduling class and level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoPrio {
    /// Only when no one else uses the disk.
    Idle,
    /// Best effort at level 0 (highest) to 7 (lowest).
    BestEffort(u8),
}

/// Level of a bare `best-effort`, the kernel's default.
const DEFAULT_BE_LEVEL: u8 = 4;

impl IoPrio {
    /// The kernel's encoding, as in `ioprio_set(2)` and an SQE's `ioprio`.
    pub fn raw(self) -> u16 {
        match self {
            IoPrio::Idle => prio::ioprio_value(prio::IOPRIO_CLASS_IDLE, 0),
            IoPrio::BestEffort(level) => {
                prio::ioprio_value(prio::IOPRIO_CLASS_BE, u16::from(level.min(7)))
            }
        }
    }
}

impl fmt::Display for IoPrio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoPrio::Idle => f.write_str("idle"),
            IoPrio::BestEffort(level) => write!(f, "best-effort:{level}"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseIoPrioError {
    #[error("unknown I/O priority {0:?}: expected idle, best-effort or best-effort:N with N from 0 (highest) to 7")]
    Unknown(String),
    #[error("best-effort level {0:?} is not a number from 0 (highest) to 7")]
    Level(String),
}

impl FromStr for IoPrio {
    type Err = ParseIoPrioError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.split_once(':') {
            None if s == "idle" => Ok(IoPrio::Idle),
            None if s == "best-effort" => Ok(IoPrio::BestEffort(DEFAULT_BE_LEVEL)),
            Some(("best-effort", level)) => match level.trim().parse::<u8>() {
                Ok(n) if n <= 7 => Ok(IoPrio::BestEffort(n)),
                _ => Err(ParseIoPrioError::Level(level.to_owned())),
            },
            _ => Err(ParseIoPrioError::Unknown(s.to_owned())),
        }
    }
}

/// Sets the nice value of every thread of the process (and so of the
/// threads they start later).
pub fn apply_nice(n: i32) -> io::Result<()> {
    prio::set_process_nice(n)
}

/// Sets the I/O priority of every thread of the process (and so of the
/// threads they start later).
pub fn apply_ioprio(p: IoPrio) -> io::Result<()> {
    prio::set_process_ioprio(p.raw())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    /// Drives `limiter` on a fake clock for `span` with requests of random
    /// sizes up to `max_req`; returns the tokens allowed within the span.
    fn allowed_within(limiter: &RateLimiter, span: Duration, max_req: u64, seed: u64) -> u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let start = Instant::now();
        let mut now = start;
        let mut allowed = 0;
        loop {
            let n = rng.gen_range(1..=max_req);
            now += limiter.take(now, n);
            if now > start + span {
                return allowed;
            }
            allowed += n;
        }
    }

    #[test]
    fn allows_rate_times_span_within_5_percent() {
        for (rate, max_req) in [
            (100 << 20, 1 << 20),
            (10 << 20, 1 << 20),
            (1 << 20, 64 << 10),
            (50_000, 4096),
            (100, 1),
        ] {
            let limiter = RateLimiter::new(rate);
            let allowed = allowed_within(&limiter, Duration::from_secs(10), max_req, rate);
            let want = rate * 10;
            let err = allowed.abs_diff(want) as f64 / want as f64;
            assert!(err < 0.05, "rate {rate}: allowed {allowed}, want {want}");
            // Never more than the rate plus one burst.
            assert!(
                allowed <= want + rate / 20,
                "rate {rate}: allowed {allowed}"
            );
        }
    }

    #[test]
    fn idle_time_saves_at_most_a_burst() {
        let limiter = RateLimiter::new(1000);
        let t0 = Instant::now() + Duration::from_secs(100);
        // After a long idle spell, 50 tokens (the burst) go at once...
        assert_eq!(limiter.take(t0, 50), Duration::ZERO);
        // ...and the next 100 wait 100 ms.
        assert_eq!(limiter.take(t0, 100), Duration::from_millis(100));
    }

    #[test]
    fn requests_wait_in_order() {
        let limiter = RateLimiter::new(1000);
        let t0 = Instant::now();
        let a = limiter.take(t0, 1000);
        let b = limiter.take(t0, 1000);
        assert!(b > a);
        assert_eq!(b - a, Duration::from_secs(1));
    }

    #[test]
    fn rate_change_applies_to_waiting_tickets() {
        let limiter = RateLimiter::new(10);
        let t = limiter.reserve(1000);
        assert!(limiter.wait_time(t) > Duration::from_secs(90));
        limiter.set_rate(1_000_000);
        assert!(limiter.wait_time(t) < Duration::from_millis(2));
        limiter.set_rate(0);
        assert_eq!(limiter.rate(), 0);
        assert_eq!(
            limiter.wait_time(limiter.reserve(u64::MAX / 4)),
            Duration::ZERO
        );
    }

    #[test]
    fn unlimited_never_waits() {
        let limiter = RateLimiter::new(0);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(limiter.take(now, 1 << 30), Duration::ZERO);
        }
    }

    #[test]
    fn real_time_rate_is_roughly_kept() {
        // 1 MiB/s, 600 KiB in 4 KiB requests: about 0.55 s after the burst.
        let limiter = RateLimiter::new(1 << 20);
        let start = Instant::now();
        for _ in 0..150 {
            limiter.acquire(4096);
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(500), "took {took:?}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }

    #[test]
    fn waiter_follows_live_rate_change_and_cancel() {
        let limiter = Arc::new(RateLimiter::new(1));
        limiter.acquire(1);
        let l = limiter.clone();
        let waiter = std::thread::spawn(move || {
            let start = Instant::now();
            l.acquire(1000);
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        limiter.set_rate(0);
        assert!(waiter.join().unwrap() < Duration::from_secs(5));

        limiter.set_rate(1);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            let ok =
                limiter.acquire_while(1000, || !stop.load(std::sync::atomic::Ordering::Relaxed));
            assert!(!ok);
        });
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn process_wide_priorities_reach_every_thread() {
        // Values that change nothing for the rest of the test process.
        let nice = prio::thread_nice(0).unwrap();
        apply_nice(nice).unwrap();
        apply_ioprio(IoPrio::BestEffort(4)).unwrap();
        let tid = std::thread::spawn(|| prio::thread_ioprio(0).unwrap());
        assert_eq!(prio::thread_ioprio(0).unwrap(), IoPrio::BestEffort(4).raw());
        assert_eq!(tid.join().unwrap(), IoPrio::BestEffort(4).raw());
    }

    #[test]
    fn parses_io_priorities() {
        assert_eq!("idle".parse(), Ok(IoPrio::Idle));
        assert_eq!("best-effort".parse(), Ok(IoPrio::BestEffort(4)));
        assert_eq!("best-effort:0".parse(), Ok(IoPrio::BestEffort(0)));
        assert_eq!("best-effort:7".parse(), Ok(IoPrio::BestEffort(7)));
        assert_eq!(
            "best-effort:8".parse::<IoPrio>(),
            Err(ParseIoPrioError::Level("8".into()))
        );
        assert_eq!(
            "realtime".parse::<IoPrio>(),
            Err(ParseIoPrioError::Unknown("realtime".into()))
        );
        let msg = "best-effort:x".parse::<IoPrio>().unwrap_err().to_string();
        assert!(msg.contains("0 (highest) to 7"), "{msg}");
        for p in [IoPrio::Idle, IoPrio::BestEffort(3)] {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
        assert_eq!(IoPrio::BestEffort(7).raw(), (2 << 13) | 7);
        assert_eq!(IoPrio::Idle.raw(), 3 << 13);
    }
}
