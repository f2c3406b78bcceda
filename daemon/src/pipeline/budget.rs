//! The memory budget: a semaphore counting bytes of data in flight.
//!
//! The reader takes a [`Permit`] before it submits a read; the permit travels
//! with the data through the compressor to the consumer, and gives its bytes
//! back when dropped. So the bytes held by all pipeline stages and by pieces
//! the consumer has not yet sent never exceed the cap. A request larger than
//! the whole cap is clamped to the cap, so it waits for everything else to be
//! returned and then still goes ahead.

use std::{
    fmt,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

/// A byte semaphore. Cloning gives another handle to the same budget.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

struct Inner {
    cap: u64,
    state: Mutex<State>,
    returned: Condvar,
}

struct State {
    used: u64,
    peak: u64,
    closed: bool,
}

/// Bytes taken from a [`Budget`], returned on drop.
pub struct Permit {
    budget: Budget,
    bytes: u64,
}

impl Budget {
    /// A budget of `cap` bytes (at least 1).
    pub fn new(cap: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                cap: cap.max(1),
                state: Mutex::new(State {
                    used: 0,
                    peak: 0,
                    closed: false,
                }),
                returned: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn cap(&self) -> u64 {
        self.inner.cap
    }

    /// Bytes currently held by permits.
    pub fn in_use(&self) -> u64 {
        self.lock().used
    }

    /// Most bytes ever held at once.
    pub fn peak(&self) -> u64 {
        self.lock().peak
    }

    /// Takes `n` bytes (clamped to the cap) if they are free now.
    pub fn try_acquire(&self, n: u64) -> Option<Permit> {
        let n = n.min(self.inner.cap);
        let mut state = self.lock();
        self.take(&mut state, n)
    }

    /// Waits until `n` bytes (clamped to the cap) are free and takes them;
    /// `None` once the budget is [closed](Self::close).
    pub fn acquire(&self, n: u64) -> Option<Permit> {
        let n = n.min(self.inner.cap);
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if let Some(permit) = self.take(&mut state, n) {
                return Some(permit);
            }
            // The timeout is only a guard against a lost wake-up.
            state = self
                .inner
                .returned
                .wait_timeout(state, Duration::from_secs(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn take(&self, state: &mut State, n: u64) -> Option<Permit> {
        if state.closed || state.used + n > self.inner.cap {
            return None;
        }
        state.used += n;
        state.peak = state.peak.max(state.used);
        Some(Permit {
            budget: self.clone(),
            bytes: n,
        })
    }

    /// Refuses all further requests and wakes everyone waiting; permits
    /// already out still return their bytes.
    pub fn close(&self) {
        self.lock().closed = true;
        self.inner.returned.notify_all();
    }

    fn give_back(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut state = self.lock();
        state.used -= n;
        drop(state);
        self.inner.returned.notify_all();
    }
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Budget")
            .field("cap", &self.inner.cap)
            .field("used", &state.used)
            .field("peak", &state.peak)
            .finish()
    }
}

impl Permit {
    /// Bytes this permit holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Moves `n` of this permit's bytes (or all it has, if fewer) into a new
    /// permit.
    pub fn split(&mut self, n: u64) -> Permit {
        let n = n.min(self.bytes);
        self.bytes -= n;
        Permit {
            budget: self.budget.clone(),
            bytes: n,
        }
    }

    /// Returns all but `n` bytes to the budget now.
    pub fn shrink_to(&mut self, n: u64) {
        if n < self.bytes {
            let excess = self.bytes - n;
            self.bytes = n;
            self.budget.give_back(excess);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("bytes", &self.bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_return_their_bytes() {
        let budget = Budget::new(100);
        let mut a = budget.acquire(60).unwrap();
        assert!(budget.try_acquire(41).is_none());
        let b = a.split(20);
        assert_eq!((a.bytes(), b.bytes()), (40, 20));
        drop(a);
        assert_eq!(budget.in_use(), 20);
        let mut c = budget.try_acquire(80).unwrap();
        c.shrink_to(10);
        assert_eq!(budget.in_use(), 30);
        drop((b, c));
        assert_eq!(budget.in_use(), 0);
        assert_eq!(budget.peak(), 100);
    }

    #[test]
    fn oversized_request_is_clamped_and_waits_for_the_rest() {
        let budget = Budget::new(100);
        let small = budget.acquire(10).unwrap();
        let b = budget.clone();
        let waiter = std::thread::spawn(move || b.acquire(1000).unwrap().bytes());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        drop(small);
        assert_eq!(waiter.join().unwrap(), 100);
        assert_eq!(budget.peak(), 100);
    }

    #[test]
    fn close_wakes_waiters() {
        let budget = Budget::new(10);
        let held = budget.acquire(10).unwrap();
        let b = budget.clone();
        let waiter = std::thread::spawn(move || b.acquire(5).is_none());
        std::thread::sleep(Duration::from_millis(50));
        budget.close();
        assert!(waiter.join().unwrap());
        drop(held);
        assert_eq!(budget.in_use(), 0);
    }
}
