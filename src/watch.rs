//! The event feed: every event of every run and lock, in commit order, read from a
//! cursor ([`Ledger::events_since`]) or followed live ([`Ledger::watch`]).

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::record::{EventId, EventRecord};
use crate::wake::WakeSocket;

/// A position in the ledger's event feed: the feed continues with the events
/// committed after it.
///
/// Event ids grow in commit order and are never handed out twice, so a
/// cursor stays valid across restarts; keep it (it converts to and from
/// `i64`, and reads and prints as its number) to resume a feed where it
/// stopped. Events that retention pruned meanwhile are simply not in the
/// feed any more.
///
/// # Examples
///
/// ```
/// use runledger::EventCursor;
/// let saved = EventCursor::START.to_string();
/// let cursor: EventCursor = saved.parse()?;
/// assert_eq!(cursor, EventCursor::START);
/// # Ok::<(), runledger::Error>(())
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct EventCursor(i64);

impl EventCursor {
    /// The beginning of the feed: every event still in the ledger follows it.
    pub const START: EventCursor = EventCursor(0);

    /// The cursor just after the event with id `event_id` (an
    /// [`EventId`], or its number; a negative number is the start).
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{EventCursor, EventId};
    /// assert_eq!(EventCursor::after(EventId::from(42)), EventCursor::after(42));
    /// assert_eq!(EventCursor::after(-1), EventCursor::START);
    /// ```
    pub fn after(event_id: impl Into<EventId>) -> EventCursor {
        EventCursor(i64::from(event_id.into()).max(0))
    }

    /// The id of the last event before the cursor (`0` at the start).
    pub fn last_event_id(self) -> EventId {
        EventId::from(self.0)
    }
}

impl From<EventId> for EventCursor {
    /// The cursor just after the event `event_id`, as [`EventCursor::after`].
    fn from(event_id: EventId) -> EventCursor {
        EventCursor::after(event_id)
    }
}

impl From<i64> for EventCursor {
    fn from(event_id: i64) -> EventCursor {
        EventCursor::after(event_id)
    }
}

impl From<EventCursor> for i64 {
    fn from(cursor: EventCursor) -> i64 {
        cursor.0
    }
}

impl fmt::Display for EventCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for EventCursor {
    type Err = Error;

    fn from_str(s: &str) -> Result<EventCursor> {
        match s.trim().parse::<i64>() {
            Ok(id) if id >= 0 => Ok(EventCursor(id)),
            _ => Err(Error::invalid(
                "event cursor",
                s,
                "must be a whole number, 0 or more",
            )),
        }
    }
}

/// What [`Ledger::events_since`] returns: the next events of the feed, and
/// the cursor to ask from next time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EventPage {
    /// Events after the cursor asked from, oldest first.
    pub events: Vec<EventRecord>,
    /// The cursor after the last of `events` (the cursor asked from when
    /// there were none).
    pub next: EventCursor,
}

/// How long a watch waits for a wake-up before it reads the feed anyway:
/// the fallback for writers that cannot reach it (another host, a wake-up
/// lost) and the longest a watch goes without looking.
pub(crate) const WATCH_FALLBACK: Duration = Duration::from_secs(1);

/// How many events a watch reads at a time.
const WATCH_BATCH: usize = 256;

/// A live view of the event feed, from [`Ledger::watch`]: yields every event
/// of every run and lock committed after its cursor, in commit order, waiting for new
/// ones as they commit in any process.
///
/// As an [`Iterator`], `next` blocks until an event arrives (it yields an
/// error when the ledger cannot be read, and goes on after it). Use
/// [`next_timeout`](Watch::next_timeout) to wait at most a given time. With
/// the `tokio` feature, [`next_async`](Watch::next_async) waits without
/// blocking the runtime, and a watch is a `futures_core::Stream` of the
/// same items.
///
/// A process that commits events wakes every watch on the same host at once
/// (a datagram to the watch's socket, sent after the commit); a watch also
/// reads the feed once a second, which is all a watch on another host, or on
/// a platform without wake-up sockets, relies on. Dropping the watch
/// unregisters it.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use runledger::{EventKind, Ledger, RunSpec};
/// # let dir = tempfile::tempdir()?;
/// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
/// let mut watch = ledger.watch(ledger.events_cursor()?)?;
/// let run = ledger.begin_run(RunSpec::new("sync"))?;
/// let event = watch.next_timeout(Duration::from_secs(5))?.expect("an event");
/// assert_eq!(event.run, Some(run.id()));
/// assert!(matches!(event.kind, EventKind::Status { .. }));
/// # run.succeed()?;
/// # Ok::<(), runledger::Error>(())
/// ```
#[derive(Debug)]
pub struct Watch {
    ledger: Ledger,
    /// Where the next read of the feed starts.
    read_from: EventCursor,
    /// After the last event yielded.
    yielded: EventCursor,
    buffer: VecDeque<EventRecord>,
    socket: Option<WakeSocket>,
    /// The watcher row that makes writers wake the socket.
    watcher: Option<i64>,
    /// What an async wait for the next event waits on, made on its first
    /// use inside a runtime.
    #[cfg(feature = "tokio")]
    waiting: Option<AsyncWait>,
}

/// An async watch's wake-up socket, registered with the runtime, and its
/// fallback timer.
#[cfg(feature = "tokio")]
#[derive(Debug)]
struct AsyncWait {
    /// The runtime both are registered with: a watch polled in another one
    /// makes them anew.
    runtime: tokio::runtime::Id,
    socket: Option<tokio::net::UnixDatagram>,
    fallback: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Watch {
    pub(crate) fn new(ledger: Ledger, cursor: EventCursor) -> Result<Watch> {
        let socket = WakeSocket::bind();
        // Registered before the first read: an event committed after that
        // read wakes the socket, and one committed before it is read.
        let watcher = match &socket {
            Some(socket) => Some(ledger.add_watcher(socket.address())?),
            None => None,
        };
        Ok(Watch {
            ledger,
            read_from: cursor,
            yielded: cursor,
            buffer: VecDeque::new(),
            socket,
            watcher,
            #[cfg(feature = "tokio")]
            waiting: None,
        })
    }

    /// The next event already read, or else the next page of the feed
    /// read now: `None` if nothing new has committed.
    fn read(&mut self) -> Result<Option<EventRecord>> {
        if self.buffer.is_empty() {
            let page = self.ledger.events_since(self.read_from, WATCH_BATCH)?;
            self.read_from = page.next;
            self.buffer.extend(page.events);
        }
        let event = self.buffer.pop_front();
        if let Some(event) = &event {
            self.yielded = EventCursor::after(event.id);
        }
        Ok(event)
    }

    /// The cursor after the last event this watch yielded: where a new
    /// watch (or [`Ledger::events_since`]) would continue.
    pub fn cursor(&self) -> EventCursor {
        self.yielded
    }

    /// The next event, waiting at most `timeout` for one to commit; `None`
    /// if none did.
    ///
    /// # Errors
    ///
    /// As [`Ledger::events_since`]; the watch can be used again after an
    /// error.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<EventRecord>> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if let Some(event) = self.read()? {
                return Ok(Some(event));
            }
            let left = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                return Ok(None);
            }
            let nap = left.min(WATCH_FALLBACK);
            match &self.socket {
                Some(socket) => {
                    socket.wait(nap);
                }
                None => std::thread::sleep(nap),
            }
        }
    }
}

#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
impl Watch {
    /// The next event, waiting for one to commit without blocking the async
    /// runtime: the watch's wake-up socket is watched by the runtime's
    /// reactor, and the feed is read again at least once a second. Never
    /// `None` (the feed does not end); `Some(Err(_))` when the ledger
    /// cannot be read, after which the watch goes on.
    ///
    /// Reading the feed is a short read of the database on the calling
    /// thread.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: an event is taken from the watch only in the poll that
    /// returns it, so a dropped future loses none, and the next call yields
    /// it.
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with IO and time enabled.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> runledger::Result<()> {
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let mut watch = ledger.watch(ledger.events_cursor()?)?;
    /// let run = ledger.begin_run(RunSpec::new("sync"))?;
    /// let event = watch.next_async().await.expect("the feed goes on")?;
    /// assert_eq!(event.run, Some(run.id()));
    /// # run.succeed()?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn next_async(&mut self) -> Option<Result<EventRecord>> {
        std::future::poll_fn(|cx| {
            futures_core::Stream::poll_next(std::pin::Pin::new(&mut *self), cx)
        })
        .await
    }
}

/// The same items as [`Watch::next_async`], which says how it waits.
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
impl futures_core::Stream for Watch {
    type Item = Result<EventRecord>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<EventRecord>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            match this.read() {
                Ok(Some(event)) => return Poll::Ready(Some(Ok(event))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            let runtime = tokio::runtime::Handle::current().id();
            let wait = match &mut this.waiting {
                Some(wait) if wait.runtime == runtime => {
                    if let Some(socket) = &this.socket {
                        // A blocking wait of this watch may have made the
                        // socket blocking again (the flag is the socket's,
                        // shared with the registered copy).
                        socket.keep_nonblocking();
                    }
                    wait
                }
                slot => slot.insert(AsyncWait {
                    runtime,
                    socket: this.socket.as_ref().and_then(|s| {
                        s.for_runtime()
                            .map_err(|e| log::debug!("runledger: watch polls: {e}"))
                            .ok()
                    }),
                    fallback: Box::pin(tokio::time::sleep(WATCH_FALLBACK)),
                }),
            };
            let mut woken = false;
            if let Some(socket) = &wait.socket {
                match socket.poll_recv_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        // Drain: one read of the feed covers them all.
                        let mut buf = [0u8; 16];
                        while socket.try_recv(&mut buf).is_ok() {}
                        woken = true;
                    }
                    Poll::Ready(Err(e)) => {
                        log::debug!("runledger: watch polls from now on: {e}");
                        wait.socket = None;
                    }
                    Poll::Pending => {}
                }
            }
            if !woken && wait.fallback.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let next = tokio::time::Instant::now() + WATCH_FALLBACK;
            wait.fallback.as_mut().reset(next);
        }
    }
}

impl Iterator for Watch {
    type Item = Result<EventRecord>;

    /// Blocks until the next event commits; never returns `None`.
    fn next(&mut self) -> Option<Result<EventRecord>> {
        loop {
            match self.next_timeout(Duration::from_secs(3600)) {
                Ok(Some(event)) => return Some(Ok(event)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(id) = self.watcher.take()
            && let Err(e) = self.ledger.remove_watcher(id)
        {
            // The row only costs writers a wasted datagram; the reaper
            // removes it with this instance.
            log::debug!("runledger: could not unregister watcher {id}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::RunSpec;

    /// A watch can move to the thread that serves a dashboard's stream.
    #[test]
    fn a_watch_is_send() {
        fn send<T: Send>() {}
        send::<Watch>();
        send::<EventPage>();
    }

    /// The wake-up itself, without the fallback read: a commit that appends
    /// events (a run's, a lock's) sends the watch a datagram, and one that
    /// appends none (another watch registering) sends nothing.
    #[test]
    fn a_commit_with_events_wakes_the_watch_and_one_without_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::builder(dir.path().join("ledger.db"))
            .background(false)
            .open()
            .unwrap();
        let watch = ledger.watch(EventCursor::START).unwrap();
        let Some(socket) = &watch.socket else {
            return; // no wake-up sockets on this platform: the watch polls
        };
        let other = ledger.watch(EventCursor::START).unwrap();
        assert!(!socket.wait(Duration::from_millis(50)), "woken by a watch");
        drop(other);
        let guard = ledger.try_lock("an-event").unwrap();
        assert!(socket.wait(Duration::from_secs(30)), "not woken by a grant");
        guard.release().unwrap();
        assert!(
            socket.wait(Duration::from_secs(30)),
            "not woken by a release"
        );
        let run = ledger.begin_run(RunSpec::new("woke")).unwrap();
        assert!(socket.wait(Duration::from_secs(30)), "not woken by a run");
        run.succeed().unwrap();
        assert!(socket.wait(Duration::from_secs(30)), "not woken by its end");
    }
}
