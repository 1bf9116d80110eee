//! A connection's one timer (the header timeout, each exchange's deadline, the parking time,
//! the drain's limit), moved later lazily: a kept-alive connection moves its deadline twice per
//! request, nearly always later, and moving a registered tokio timer takes the time driver's
//! lock and its wheel (about 400 instructions per request, 3% of the engine's). A later
//! deadline is only noted; when the timer fires before it, it is set to it then. So a busy
//! connection moves its tokio timer about once per period of its shortest deadline rather than
//! twice per request, and what it waits for ends no earlier and no later than it did.
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pin_project_lite::pin_project! {
    /// See the module's documentation. Polled, it is ready when [`Timer::deadline`] has passed.
    pub(crate) struct Timer {
        #[pin]
        sleep: Sleep,
        // The deadline in force is this many milliseconds after `sleep`'s (tokio's timers
        // count in milliseconds): 4 bytes in every connection's future rather than 16.
        later_ms: u32,
    }
}

impl Timer {
    pub(crate) fn at(deadline: Instant) -> Timer {
        Timer {
            sleep: tokio::time::sleep_until(deadline),
            later_ms: 0,
        }
    }

    pub(crate) fn after(d: Duration) -> Timer {
        Timer::at(Instant::now() + d)
    }

    /// The deadline in force (rounded up to a millisecond when it was moved later).
    pub(crate) fn deadline(&self) -> Instant {
        self.sleep.deadline() + Duration::from_millis(u64::from(self.later_ms))
    }

    /// Sets the deadline: at once if earlier than the tokio timer's, else noted.
    pub(crate) fn set(self: Pin<&mut Self>, deadline: Instant) {
        let this = self.project();
        let at = this.sleep.deadline();
        let later = deadline
            .checked_duration_since(at)
            .map(|d| d.as_nanos().div_ceil(1_000_000))
            .and_then(|ms| u32::try_from(ms).ok());
        match later {
            Some(ms) => *this.later_ms = ms,
            None => {
                *this.later_ms = 0;
                this.sleep.reset(deadline);
            }
        }
    }
}

impl Future for Timer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            ready!(this.sleep.as_mut().poll(cx));
            if *this.later_ms == 0 {
                return Poll::Ready(());
            }
            // Fired at a deadline since moved later: on to that one.
            let deadline = this.sleep.deadline() + Duration::from_millis(u64::from(*this.later_ms));
            *this.later_ms = 0;
            this.sleep.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once(t: Pin<&mut Timer>) -> Poll<()> {
        let waker = std::task::Waker::noop();
        t.poll(&mut Context::from_waker(waker))
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_later_is_kept_and_an_earlier_one_too() {
        let start = Instant::now();
        let t = Timer::after(Duration::from_millis(100));
        tokio::pin!(t);
        // Later: noted, and kept to.
        t.as_mut().set(start + Duration::from_millis(300));
        assert_eq!(t.deadline(), start + Duration::from_millis(300));
        t.as_mut().await;
        assert_eq!(Instant::now(), start + Duration::from_millis(300));
        // Earlier than the tokio timer's: set at once.
        let now = Instant::now();
        t.as_mut().set(now + Duration::from_millis(500));
        t.as_mut().set(now + Duration::from_millis(50));
        assert_eq!(t.deadline(), now + Duration::from_millis(50));
        t.as_mut().await;
        assert_eq!(Instant::now(), now + Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn it_is_not_ready_before_its_deadline_even_when_its_first_one_passed() {
        let start = Instant::now();
        let t = Timer::after(Duration::from_millis(10));
        tokio::pin!(t);
        t.as_mut().set(start + Duration::from_millis(1_000));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The tokio timer has fired (10 ms); the deadline in force (1 s) has not passed.
        assert!(poll_once(t.as_mut()).is_pending());
        tokio::time::sleep(Duration::from_millis(979)).await;
        assert!(poll_once(t.as_mut()).is_pending());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(poll_once(t.as_mut()).is_ready());
        // A past deadline: ready at once.
        t.as_mut().set(start);
        assert!(poll_once(t.as_mut()).is_ready());
    }

    #[test]
    fn it_costs_a_connection_no_more_than_its_sleep_and_one_word() {
        assert!(size_of::<Timer>() <= size_of::<Sleep>() + 8);
    }
}
