//! Parked idle connections: a kept-alive HTTP/1 client connection that has said nothing for
//! `--park-idle-after` gives up its task. The native engine hands it back ([`h1::Idle`]), its
//! socket leaves tokio's reactor for the proxy's parked set (one epoll instance, watched by
//! one task), and what it keeps is its client state in a slot of one vector: no task, no
//! readiness registration, no buffer. (Not to be confused with the pre-dialled connections
//! that detection parks in the stash: those are upstream connections.)
//!
//! A parked connection is resumed, in a task of its own again, exactly where the engine left
//! it: when its socket becomes readable (its next request, or the peer's close), or when its
//! direction begins to drain (it then closes as an idle connection does). Its head is still
//! due by the deadline its wait began with: past it, the connection is closed here and counted
//! as the header timeout it is. It stays open and counted (`sidecar_tcp_connections_active`)
//! throughout; `sidecar_tcp_connections_parked` counts the parked ones.
//!
//! Only plain sockets are parked (a mesh TLS session's state is not the socket's), and only
//! after a request was answered and nothing of the next one was read.
//!
//! A parked connection is kept inline in the set's vector, and what it held on the heap while
//! it had a task (the task, the readiness registration, its route and observer) is freed, for
//! the next connections to use.
//!
//! This file is the set itself; what a parked HTTP/1 connection keeps, and how it is served
//! again, is `parked.rs` (the set knows it as a [`Sleeper`], and the proxy's shared state knows
//! the set as a [`ParkSet`]: this file imports nothing of the engine).
use std::any::Any;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Dir;

/// Events taken from the parked set per look.
const EVENTS: usize = 64;

/// A parked connection, as the set sees it (kept inline in the set's vector).
pub(crate) trait Sleeper: Send + Sized + 'static {
    /// Its socket.
    fn fd(&self) -> RawFd;
    fn dir(&self) -> Dir;
    /// Its next request head is due by then.
    fn deadline(&self) -> Instant;
    /// Serves it again in a task of its own: it spoke, closed, or its direction is draining.
    fn wake(self);
    /// Its deadline passed: closes it, counted as the header timeout it is.
    fn expire(self);
}

/// A parked set as the proxy's shared state holds it, without naming what it parks.
pub(crate) trait ParkSet: Send + Sync {
    /// `--park-idle-after`.
    fn after(&self) -> Duration;
    /// See [`Parker::watch`].
    fn watch(&self, stops: [CancellationToken; 2])
        -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// The set itself, for the code that parks into it ([`Parker::of`]).
    fn as_any(&self) -> &dyn Any;
}

impl<T: Sleeper> ParkSet for Parker<T> {
    fn after(&self) -> Duration {
        self.after
    }

    fn watch(
        &self,
        stops: [CancellationToken; 2],
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(Parker::watch(self, stops))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The parked set of one proxy.
pub(crate) struct Parker<T> {
    epoll: AsyncFd<OwnedFd>,
    /// `--park-idle-after`.
    after: Duration,
    state: Mutex<State<T>>,
    /// An earlier deadline than the watcher's timer, or the first one.
    changed: Notify,
    /// `sidecar_tcp_connections_parked`, per direction (`Dir::index`).
    gauges: [IntGauge; 2],
}

struct State<T> {
    /// Index = the low half of a connection's epoll key; the generation (the high half) tells a
    /// reused slot from the one an old event or deadline meant.
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    /// (deadline, key), earliest first; entries of connections woken since are stale, and
    /// skipped when they come up.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Per direction (`Dir::index`): its drain began, nothing of it is parked any more.
    draining: [bool; 2],
}

impl<T> Default for State<T> {
    fn default() -> Self {
        State {
            slots: Vec::new(),
            free: Vec::new(),
            deadlines: BinaryHeap::new(),
            draining: [false; 2],
        }
    }
}

struct Slot<T> {
    generation: u32,
    sleeper: Option<T>,
}

fn key(index: u32, generation: u32) -> u64 {
    u64::from(generation) << 32 | u64::from(index)
}

fn split(key: u64) -> (usize, u32) {
    // Truncation intended: the low half is the index, the high half the generation.
    ((key & 0xffff_ffff) as usize, (key >> 32) as u32)
}

impl<T: Sleeper> Parker<T> {
    /// The parked set, or the reason there cannot be one (the proxy then keeps idle connections
    /// in their tasks). `gauges`: the parked connections per direction (`Dir::index`).
    pub(crate) fn new(after: Duration, gauges: [IntGauge; 2]) -> io::Result<Parker<T>> {
        // SAFETY: no pointers; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an `OwnedFd` owned by the `AsyncFd` from here on: open, and the same one,
        // until it is dropped with it.
        let epoll = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Parker {
            epoll,
            after,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            gauges,
        })
    }

    /// The set of `T`s behind `set`, if that is what it is.
    pub(crate) fn of(set: &dyn ParkSet) -> Option<&Parker<T>> {
        set.as_any().downcast_ref()
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every operation under the lock leaves the state consistent before anything can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, key: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: key,
        };
        // SAFETY: a valid event we own; both descriptors are open.
        let r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Parks `sleeper` (the caller's task may end), or wakes it at once if its direction is
    /// draining or the kernel refuses to watch it.
    pub(crate) fn park(&self, sleeper: T) {
        if let Err(sleeper) = self.insert(sleeper) {
            sleeper.wake();
        }
    }

    fn insert(&self, sleeper: T) -> Result<(), T> {
        let dir = sleeper.dir();
        let mut state = self.lock();
        if state.draining[dir.index()] {
            return Err(sleeper);
        }
        let index = match state.free.pop() {
            Some(i) => i,
            None => {
                let Ok(i) = u32::try_from(state.slots.len()) else {
                    return Err(sleeper);
                };
                state.slots.push(Slot {
                    generation: 0,
                    sleeper: None,
                });
                i
            }
        };
        let at = index as usize;
        let key = key(index, state.slots[at].generation);
        if let Err(e) = self.ctl(libc::EPOLL_CTL_ADD, sleeper.fd(), key) {
            state.free.push(index);
            drop(state);
            debug!(error = %e, "cannot park an idle connection: kept in its task");
            return Err(sleeper);
        }
        let deadline = sleeper.deadline();
        // Woken connections leave their entries behind until their deadline: past twice as
        // many as are parked, they go (a connection that wakes every second would otherwise
        // leave a header timeout's worth of them).
        let parked = state.slots.len() - state.free.len();
        if state.deadlines.len() > 2 * parked + 64 {
            let State {
                slots, deadlines, ..
            } = &mut *state;
            deadlines.retain(|Reverse((_, key))| {
                let (index, generation) = split(*key);
                slots
                    .get(index)
                    .is_some_and(|s| s.generation == generation && s.sleeper.is_some())
            });
        }
        let earliest = state
            .deadlines
            .peek()
            .is_none_or(|Reverse((first, _))| deadline < *first);
        state.deadlines.push(Reverse((deadline, key)));
        state.slots[at].sleeper = Some(sleeper);
        drop(state);
        self.gauges[dir.index()].inc();
        if earliest {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// Takes the connection `key` names out of the set, if it is still there.
    fn take(&self, state: &mut State<T>, key: u64) -> Option<T> {
        let (index, generation) = split(key);
        let slot = state.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        let sleeper = slot.sleeper.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        // In range: it was made from a u32.
        state.free.push(index as u32);
        if let Err(e) = self.ctl(libc::EPOLL_CTL_DEL, sleeper.fd(), 0) {
            // Not in the set (cannot happen): closing or registering it elsewhere is still
            // right.
            debug!(error = %e, "removing a parked connection from the set");
        }
        self.gauges[sleeper.dir().index()].dec();
        Some(sleeper)
    }

    /// Watches the set (spawned with the proxy; returns once both directions have begun to
    /// drain, `stops` in `Dir::index` order): wakes the connections whose sockets became
    /// readable and, when a direction's drain begins, all of that direction's; expires those
    /// whose head deadline passed.
    pub(crate) async fn watch(&self, stops: [CancellationToken; 2]) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut drained = [false; 2];
        while drained != [true, true] {
            let next = self.lock().deadlines.peek().map(|Reverse((at, _))| *at);
            // A day stands for "no deadline": a connection parked before then notifies.
            let far = Instant::now() + Duration::from_secs(86_400);
            timer.as_mut().reset(next.unwrap_or(far));
            let changed = self.changed.notified();
            tokio::select! {
                ready = self.epoll.readable() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(e) => {
                            warn!(error = %e, "the parked connections' set failed: waking them all");
                            self.drain(&[Dir::Inbound, Dir::Outbound]);
                            return;
                        }
                    };
                    let woken = guard.try_io(|epoll| {
                        // SAFETY: `events` is ours and holds EVENTS entries; a zero timeout.
                        let n = unsafe {
                            libc::epoll_wait(
                                epoll.as_raw_fd(),
                                events.as_mut_ptr(),
                                EVENTS as libc::c_int,
                                0,
                            )
                        };
                        match n {
                            n if n < 0 => Err(io::Error::last_os_error()),
                            // Nothing ready after all: readiness is cleared, wait again.
                            0 => Err(io::ErrorKind::WouldBlock.into()),
                            // Positive, at most EVENTS.
                            n => Ok(n as usize),
                        }
                    });
                    match woken {
                        Ok(Ok(n)) => {
                            let sleepers: Vec<_> = {
                                let mut state = self.lock();
                                events[..n]
                                    .iter()
                                    .filter_map(|e| self.take(&mut state, e.u64))
                                    .collect()
                            };
                            for sleeper in sleepers {
                                sleeper.wake();
                            }
                        }
                        Ok(Err(e)) => {
                            if e.kind() != io::ErrorKind::Interrupted {
                                debug!(error = %e, "reading the parked connections' set");
                            }
                        }
                        Err(_) => {}
                    }
                }
                () = timer.as_mut() => self.expire(),
                () = changed => {}
                () = stops[0].cancelled(), if !drained[0] => {
                    drained[0] = true;
                    self.drain(&[Dir::Inbound]);
                }
                () = stops[1].cancelled(), if !drained[1] => {
                    drained[1] = true;
                    self.drain(&[Dir::Outbound]);
                }
            }
        }
    }

    /// Expires the parked connections whose head deadline has passed.
    fn expire(&self) {
        let now = Instant::now();
        let expired: Vec<_> = {
            let mut state = self.lock();
            let mut out = Vec::new();
            while let Some(Reverse((at, key))) = state.deadlines.peek().copied() {
                if at > now {
                    break;
                }
                state.deadlines.pop();
                // Stale entries (woken since, the slot free or reused) find nothing.
                out.extend(self.take(&mut state, key));
            }
            out
        };
        for sleeper in expired {
            sleeper.expire();
        }
    }

    /// Wakes every parked connection of `dirs` (their drain began: they close as idle
    /// connections do), and parks none of them any more.
    fn drain(&self, dirs: &[Dir]) {
        let sleepers: Vec<_> = {
            let mut state = self.lock();
            for dir in dirs {
                state.draining[dir.index()] = true;
            }
            let keys: Vec<u64> = state
                .slots
                .iter()
                .zip(0u32..)
                .filter(|(s, _)| s.sleeper.as_ref().is_some_and(|z| dirs.contains(&z.dir())))
                .map(|(s, i)| key(i, s.generation))
                .collect();
            keys.into_iter()
                .filter_map(|k| self.take(&mut state, k))
                .collect()
        };
        for sleeper in sleepers {
            sleeper.wake();
        }
    }
}

/// The bytes one parked connection of type `T` takes in the set's vector.
#[cfg(test)]
pub(crate) fn slot_size<T>() -> usize {
    size_of::<Slot<T>>()
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    /// A parked "connection": one end of a socket pair.
    struct Fake {
        end: UnixStream,
        deadline: Instant,
    }

    impl Sleeper for Fake {
        fn fd(&self) -> RawFd {
            self.end.as_raw_fd()
        }

        fn dir(&self) -> Dir {
            Dir::Outbound
        }

        fn deadline(&self) -> Instant {
            self.deadline
        }

        fn wake(self) {}

        fn expire(self) {}
    }

    fn gauges() -> [IntGauge; 2] {
        [0, 1].map(|i| IntGauge::new(format!("parked_{i}"), "test").unwrap())
    }

    /// A connection that is parked and woken again and again (a client that speaks every
    /// second or so) leaves no more than a bounded number of stale deadlines behind, and its
    /// slot is reused.
    #[tokio::test]
    async fn parking_again_and_again_keeps_the_set_bounded() {
        let parker = Parker::<Fake>::new(Duration::from_secs(1), gauges()).unwrap();
        let (end, _peer) = UnixStream::pair().unwrap();
        let mut fake = Fake {
            end,
            deadline: Instant::now() + Duration::from_secs(30),
        };
        for round in 0..1000u32 {
            parker.park(fake);
            let mut state = parker.lock();
            assert_eq!(state.slots.len(), 1, "one slot, reused");
            // Compacted once past twice the parked plus 64, before the new one is added.
            assert!(
                state.deadlines.len() <= 2 + 64 + 1,
                "round {round}: {} deadlines for one parked connection",
                state.deadlines.len()
            );
            let key = key(0, state.slots[0].generation);
            fake = parker.take(&mut state, key).expect("parked");
            assert!(parker.take(&mut state, key).is_none(), "taken once");
        }
        assert_eq!(parker.gauges[Dir::Outbound.index()].get(), 0);
    }
}
