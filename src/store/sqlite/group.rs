//! Group commit: writes that threads of this process make while one of them
//! is writing share the next transaction.
//!
//! SQLite has one writer at a time, and a commit costs about as much as the
//! small writes in it (with `synchronous=FULL`, far more: an fsync). So a
//! store keeps a *lead*: the thread that holds it is in (or about to start)
//! a write transaction. A writer that finds the lead free takes it and runs
//! its write alone, exactly as without grouping (no savepoint, no hand-off).
//! A writer that finds it taken waits in a first-come queue:
//!
//! - a *shared* write ([`Store::write_shared`]: a closure that owns its
//!   inputs, `Send + 'static`) leaves the closure in the queue, where the
//!   next leader runs it;
//! - any other write ([`Store::write`]) can only run on its own thread, and
//!   waits for its turn to lead.
//!
//! When the leader's transaction ends it passes the lead on (see
//! [`State::pass_on`]): to the first waiting thread if that one can only run
//! its own write, else to whichever thread takes it first, the first waiting
//! one (woken for it) or one that is running anyway. The new leader takes
//! every queued closure and runs them (after its own write, if it has one)
//! in one `BEGIN IMMEDIATE … COMMIT`, each on its own:
//! a write that fails or panics is undone and its error (or panic) goes to
//! its own caller, the others commit. Every write but the first runs in a
//! savepoint of its own; the first needs none (a failure rolls the
//! transaction back and begins it anew for the others), which spares a big
//! write (a prune batch leading a group) from copying its pages into a
//! savepoint journal. Only after the `COMMIT` does a caller get its answer: if the
//! commit fails, every write of the group gets an error. The leader passes
//! the lead on before it answers, so the next group starts while the answers
//! travel. Nothing slow runs inside a group: the closures are SQL and the
//! plain-Rust state machine, no file I/O and no user callbacks.
//!
//! A waiter gives up with [`Error::Busy`] at the busy timeout only while its
//! write is still queued; once a leader took it, it waits for the answer (the
//! leader's `BEGIN` waits no longer than the earliest deadline of its group).
//!
//! What a caller sees of this is on the crate's front page (*Group commit*);
//! which public calls leave a closure in the queue and which lead on their
//! own thread, and what a lock write waits for as a result, is on
//! [`Builder::group_commit`](crate::Builder::group_commit).

use std::collections::{HashMap, VecDeque};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rusqlite::Connection;

use super::{BusyDeadline, EVENTS_WRITTEN, Store, WAL_FRAMES, WriteTx, watchers_to_wake};
use crate::clock::{Clock, Timestamp};
use crate::error::{Error, Result, SharedError};
use crate::wake::wake;

/// What a write produced: its value or error, or the panic of its closure.
type Produced<T> = std::thread::Result<Result<T>>;

/// The lead and the queue of one database file in this process.
///
/// Every [`Store`] of the same file (every [`Ledger`](crate::Ledger) opened
/// on it, such as one per thread for locks that exclude each other) shares
/// one, if it commits with the same `synchronous` setting: a group's commit
/// is as durable as each of its writes asked.
#[derive(Default)]
pub(super) struct Group {
    state: Mutex<State>,
}

impl Group {
    /// The group of the database at `canonical` committed with
    /// `synchronous`, made on first use.
    pub(super) fn for_file(canonical: &Path, synchronous: &'static str) -> Arc<Group> {
        type Registry = HashMap<(PathBuf, &'static str), Weak<Group>>;
        static GROUPS: OnceLock<Mutex<Registry>> = OnceLock::new();
        let mut groups = GROUPS.get_or_init(Default::default).lock();
        groups.retain(|_, group| group.strong_count() > 0);
        let key = (canonical.to_owned(), synchronous);
        if let Some(group) = groups.get(&key).and_then(Weak::upgrade) {
            return group;
        }
        let group = Arc::new(Group::default());
        groups.insert(key, Arc::downgrade(&group));
        group
    }
}

#[derive(Default)]
struct State {
    /// A thread holds the lead.
    leading: bool,
    /// Shared writes waiting for a leader to run them, first come first.
    jobs: Vec<Queued>,
    /// Threads waiting for the lead (or for their queued job's answer),
    /// first come first.
    waiters: VecDeque<Waiter>,
    /// Numbers the waiters, to find one again.
    next: u64,
    /// Test hook: how many writes were queued since the store opened.
    #[cfg(test)]
    queued_total: u64,
}

/// A shared write in the queue.
struct Queued {
    seq: u64,
    deadline: Option<Instant>,
    job: Box<dyn Job>,
}

/// A thread in the queue.
struct Waiter {
    seq: u64,
    /// Its job is in `jobs` (until a leader takes it).
    has_job: bool,
    wake: Arc<dyn Lead>,
}

/// A waiting thread that can be told it holds the lead now.
trait Lead: Send + Sync {
    fn lead(&self);
}

/// A shared write, type-erased for the queue.
trait Job: Send {
    /// Runs the write; true if it succeeded (its changes stand).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Turns a success (or a write that never ran) into `error`: the
    /// transaction did not commit.
    fn fail(&mut self, error: Error);
    /// Hands the caller what the write produced.
    fn answer(self: Box<Self>);
}

/// How long a queued writer yields before it sleeps for its answer.
const SPIN: Duration = Duration::from_micros(100);

/// Where a waiting caller gets its answer, or the lead.
struct Slot<T> {
    answer: Mutex<Answer<T>>,
    ready: Condvar,
}

enum Answer<T> {
    Waiting,
    Lead,
    Done(Produced<T>),
    /// Taken by its caller.
    Taken,
}

/// What a wait on a slot ended with.
enum Woken<T> {
    Lead,
    Done(Produced<T>),
    TimedOut,
}

impl<T> Slot<T> {
    fn new() -> Arc<Slot<T>> {
        Arc::new(Slot {
            answer: Mutex::new(Answer::Waiting),
            ready: Condvar::new(),
        })
    }

    fn set(&self, answer: Answer<T>) {
        *self.answer.lock() = answer;
        self.ready.notify_one();
    }

    fn wait(&self, deadline: Option<Instant>) -> Woken<T> {
        // A group of run writes commits in tens of microseconds: yield the
        // core to its leader for about that long before going to sleep,
        // which costs a wake-up (and on a busy machine, a scheduler slice).
        let spin_until = Instant::now() + SPIN;
        while Instant::now() < spin_until {
            {
                let mut answer = self.answer.lock();
                match std::mem::replace(&mut *answer, Answer::Taken) {
                    Answer::Lead => return Woken::Lead,
                    Answer::Done(produced) => return Woken::Done(produced),
                    Answer::Waiting | Answer::Taken => *answer = Answer::Waiting,
                }
            }
            std::thread::yield_now();
        }
        let mut answer = self.answer.lock();
        loop {
            match std::mem::replace(&mut *answer, Answer::Taken) {
                Answer::Lead => return Woken::Lead,
                Answer::Done(produced) => return Woken::Done(produced),
                Answer::Waiting | Answer::Taken => *answer = Answer::Waiting,
            }
            match deadline {
                Some(deadline) => {
                    if self.ready.wait_until(&mut answer, deadline).timed_out()
                        && matches!(*answer, Answer::Waiting)
                    {
                        return Woken::TimedOut;
                    }
                }
                None => self.ready.wait(&mut answer),
            }
        }
    }
}

impl<T: Send> Lead for Slot<T> {
    fn lead(&self) {
        self.set(Answer::Lead);
    }
}

/// A shared write and where its answer goes.
struct Pending<F, T> {
    write: Option<F>,
    /// The clock of the write's own ledger.
    clock: Arc<dyn Clock>,
    produced: Option<Produced<T>>,
    slot: Arc<Slot<T>>,
    /// Set once its caller has its answer; a job dropped without one (its
    /// leader unwound) answers with an error instead, so that no caller
    /// waits for ever.
    answered: bool,
}

impl<F, T> Drop for Pending<F, T> {
    fn drop(&mut self) {
        if !self.answered {
            self.slot
                .set(Answer::Done(Ok(Err(Error::from(std::io::Error::other(
                    "the write was dropped unanswered: its group's leader panicked",
                ))))));
        }
    }
}

impl<F, T> Job for Pending<F, T>
where
    F: FnOnce(&Connection, Timestamp) -> Result<T> + Send,
    T: Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(write) = self.write.take() else {
            return false;
        };
        // Read with the write lock held, as for a write of its own; the
        // clock is the host's code, so it may panic like the write.
        let clock = &self.clock;
        let produced = panic::catch_unwind(AssertUnwindSafe(|| write(conn, clock.now())));
        let ok = matches!(produced, Ok(Ok(_)));
        self.produced = Some(produced);
        ok
    }

    fn fail(&mut self, error: Error) {
        if matches!(self.produced, None | Some(Ok(Ok(_)))) {
            self.produced = Some(Ok(Err(error)));
        }
    }

    fn answer(mut self: Box<Self>) {
        let produced = self.produced.take().unwrap_or_else(|| {
            // Every job is run or failed before it is answered.
            Ok(Err(Error::from(std::io::Error::other(
                "the write was dropped unanswered",
            ))))
        });
        self.slot.set(Answer::Done(produced));
        self.answered = true;
    }
}

/// The lead, held: dropping it passes the lead on (see [`State::pass_on`]),
/// also when the holder unwinds.
struct Held<'g>(&'g Group);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.state.lock().pass_on();
    }
}

impl State {
    /// Takes the lead if it is free, with every job queued meanwhile: the
    /// taker runs them after its own write.
    fn take_lead(&mut self) -> Option<Vec<Queued>> {
        if self.leading {
            return None;
        }
        self.leading = true;
        Some(self.take_jobs())
    }

    /// Takes every queued job; the holder of the lead runs them.
    fn take_jobs(&mut self) -> Vec<Queued> {
        if self.jobs.is_empty() {
            return Vec::new();
        }
        // Their threads now wait for an answer, not for the lead.
        self.waiters.retain(|w| !w.has_job);
        std::mem::take(&mut self.jobs)
    }

    /// Passes on a lead that is being let go (or is free):
    ///
    /// - to the first waiting thread, if that thread can only run its own
    ///   write (a lock write): it is handed the lead, so that no later
    ///   writer overtakes it once it is first in line;
    /// - else the lead is freed, and the first waiting thread, whose write
    ///   is queued, is woken to take it. A thread already running (such as
    ///   one that was just answered and writes again) may take it first,
    ///   and then runs the queued writes with its own: the write lock never
    ///   waits for a sleeping thread to be scheduled, which on a busy
    ///   machine takes milliseconds. Queued writes cannot starve: whoever
    ///   takes the lead takes them all.
    fn pass_on(&mut self) {
        match self.waiters.front().map(|w| w.has_job) {
            Some(false) => {
                let next = self.waiters.pop_front().expect("a waiter");
                self.leading = true;
                next.wake.lead();
            }
            Some(true) => {
                self.leading = false;
                self.waiters[0].wake.lead();
            }
            None => self.leading = false,
        }
    }

    /// Queues a waiting thread (and its job); returns its number.
    fn enqueue(
        &mut self,
        wake: Arc<dyn Lead>,
        job: Option<(Option<Instant>, Box<dyn Job>)>,
    ) -> u64 {
        let seq = self.next;
        self.next += 1;
        #[cfg(test)]
        {
            self.queued_total += u64::from(job.is_some());
        }
        let has_job = job.is_some();
        if let Some((deadline, job)) = job {
            self.jobs.push(Queued { seq, deadline, job });
        }
        self.waiters.push_back(Waiter { seq, has_job, wake });
        seq
    }
}

impl Group {
    /// Takes a waiter out of the queue (with its job) if it is still there:
    /// false if the lead was handed to it or a leader took its job.
    fn withdraw(&self, seq: u64) -> bool {
        let mut state = self.state.lock();
        let Some(i) = state.waiters.iter().position(|w| w.seq == seq) else {
            return false;
        };
        state.waiters.remove(i);
        state.jobs.retain(|q| q.seq != seq);
        if !state.leading {
            // It may have been the one woken to take the free lead.
            state.pass_on();
        }
        true
    }

    /// How many writes waited in the queue since the store opened.
    #[cfg(test)]
    pub(super) fn queued_total(&self) -> u64 {
        self.state.lock().queued_total
    }
}

/// The deadline of a write that starts now.
fn deadline_from_now(store: &Store) -> Option<Instant> {
    Instant::now().checked_add(store.busy_timeout)
}

/// The error of a write that waited for the lead past its busy timeout.
fn waited_too_long() -> Error {
    Error::from(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
        Some("other writes of this process held the database past the busy timeout".into()),
    ))
}

/// Hands the caller what its write produced, resuming its panic.
fn unwind<T>(produced: Produced<T>) -> Result<T> {
    match produced {
        Ok(result) => result,
        Err(panic) => panic::resume_unwind(panic),
    }
}

impl Store {
    /// Runs `f` in a write transaction of its own thread, as [`Store::write`]
    /// does with grouping on: at once if no other write of this process is
    /// under way, else at its turn; with the shared writes queued meanwhile,
    /// if any.
    pub(super) fn write_leading<T>(
        &self,
        group: &Group,
        f: impl FnOnce(&Connection, Timestamp) -> Result<T>,
    ) -> Result<T> {
        let deadline = deadline_from_now(self);
        let slot = {
            let mut state = group.state.lock();
            if let Some(jobs) = state.take_lead() {
                drop(state);
                return self.lead(f, deadline, jobs, Held(group));
            }
            let slot = Slot::<()>::new();
            let seq = state.enqueue(slot.clone(), None);
            (slot, seq)
        };
        let (slot, seq) = slot;
        let mut wait_until = deadline;
        loop {
            match slot.wait(wait_until) {
                // Handed the lead: no other thread takes it meanwhile.
                Woken::Lead => break,
                Woken::TimedOut if group.withdraw(seq) => {
                    return Err(waited_too_long().in_ledger(&self.path));
                }
                // Handed the lead as the deadline passed.
                Woken::TimedOut | Woken::Done(_) => wait_until = None,
            }
        }
        let jobs = group.state.lock().take_jobs();
        self.lead(f, deadline, jobs, Held(group))
    }

    /// Runs `f` in a write transaction: at once if no other write of this
    /// process is under way, else queued for the next group (see the
    /// module's docs). Returns once the transaction holding `f`'s changes
    /// committed (or failed); a panic in `f` resumes in this thread.
    ///
    /// `f` owns what it needs (`Send + 'static`), so that the thread that
    /// leads the next group can run it.
    pub(super) fn write_shared<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection, Timestamp) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let Some(group) = &self.group else {
            return self.transaction(f);
        };
        let deadline = deadline_from_now(self);
        let (slot, seq) = {
            let mut state = group.state.lock();
            if let Some(jobs) = state.take_lead() {
                drop(state);
                return self.lead(f, deadline, jobs, Held(group));
            }
            let slot = Slot::<T>::new();
            let job = Box::new(Pending {
                write: Some(f),
                clock: self.clock.clone(),
                produced: None,
                slot: slot.clone(),
                answered: false,
            });
            let seq = state.enqueue(slot.clone(), Some((deadline, job)));
            (slot, seq)
        };
        let mut wait_until = deadline;
        loop {
            match slot.wait(wait_until) {
                Woken::Done(produced) => {
                    return unwind(produced).map_err(|e| e.in_ledger(&self.path));
                }
                Woken::Lead => {
                    // Woken to take the lead, which a running thread may
                    // have taken first: then that one runs this write.
                    let jobs = group.state.lock().take_lead();
                    if let Some(jobs) = jobs {
                        let held = Held(group);
                        if !jobs.is_empty() {
                            self.run_group(None::<Own<NoWrite>>, jobs, held);
                        }
                    }
                }
                Woken::TimedOut if group.withdraw(seq) => {
                    return Err(waited_too_long().in_ledger(&self.path));
                }
                Woken::TimedOut => wait_until = None,
            }
        }
    }

    /// Runs the leader's own write: alone if nothing is queued (the plain
    /// path of a lone writer), else first in a group with `jobs`.
    fn lead<T>(
        &self,
        f: impl FnOnce(&Connection, Timestamp) -> Result<T>,
        deadline: Option<Instant>,
        jobs: Vec<Queued>,
        held: Held<'_>,
    ) -> Result<T> {
        if jobs.is_empty() {
            let result = self.transaction(f);
            drop(held);
            return result;
        }
        let own = Own { write: f, deadline };
        unwind(self.run_group(Some(own), jobs, held).expect("own write"))
    }

    /// Runs one group in one transaction: the leader's own write first (if
    /// it has one), then every job, each in a savepoint. Hands the lead on
    /// once the transaction ended, then answers the jobs; returns what the
    /// own write produced.
    ///
    /// The lead is passed on before the answers, so that the next group's
    /// transaction and this group's wake-ups overlap. (A holder that ran the
    /// group queued meanwhile itself before passing the lead on measured no
    /// better: its answers then delayed that transaction instead.)
    fn run_group<T, F>(
        &self,
        own: Option<Own<F>>,
        mut jobs: Vec<Queued>,
        held: Held<'_>,
    ) -> Option<Produced<T>>
    where
        F: FnOnce(&Connection, Timestamp) -> Result<T>,
    {
        let (own_produced, conn) = self.group_transaction(own, &mut jobs);
        drop(held);
        for queued in jobs {
            queued.job.answer();
        }
        if conn.is_some() {
            self.after_commit();
        }
        own_produced
    }

    /// One group's transaction; what the own write produced, and the
    /// connection (for the checkpoint after the answers).
    fn group_transaction<T, F>(
        &self,
        own: Option<Own<F>>,
        jobs: &mut [Queued],
    ) -> (Option<Produced<T>>, Option<PooledConnection>)
    where
        F: FnOnce(&Connection, Timestamp) -> Result<T>,
    {
        // The BEGIN waits as long as the most patient write of the group
        // may wait (no deadline at all if one has none): a write is never
        // failed as busy before its own busy timeout because a hastier
        // write (of another ledger of the file, say) shares its group. A
        // write whose own deadline passed meanwhile still runs: it is late,
        // not lost.
        let deadline = jobs
            .iter()
            .map(|q| q.deadline)
            .chain(own.as_ref().map(|o| o.deadline))
            .try_fold(None, |latest: Option<Instant>, d| {
                d.map(|d| Some(latest.map_or(d, |l| l.max(d))))
            })
            .flatten();
        let mut own_produced: Option<Produced<T>> = None;
        let mut conn = None;
        let mut watchers = Vec::new();
        let committed = (|| -> Result<()> {
            let c: &Connection = conn.insert(self.pool.get()?);
            // The busy handler and the WAL hook report to thread-locals:
            // this thread runs every statement of the group, so they are
            // set and read here, for the whole group (the earliest deadline
            // of its writes; the log's size after its commit).
            let _deadline = BusyDeadline::until(deadline);
            WAL_FRAMES.with(|f| f.set(0));
            c.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            let mut tx = WriteTx {
                conn: c,
                open: true,
            };
            EVENTS_WRITTEN.with(|w| w.set(false));
            let mut member = Member { first: true };
            if let Some(own) = own {
                member.run(c, || {
                    let produced =
                        panic::catch_unwind(AssertUnwindSafe(|| (own.write)(c, self.clock.now())));
                    let ok = matches!(produced, Ok(Ok(_)));
                    own_produced = Some(produced);
                    ok
                })?;
            }
            for queued in jobs.iter_mut() {
                member.run(c, || queued.job.run(c))?;
            }
            watchers = watchers_to_wake(c)?;
            tx.conn.prepare_cached("COMMIT")?.execute([])?;
            tx.open = false;
            // The feed's watchers first: they wait on no one's answer.
            wake(&watchers);
            Ok(())
        })()
        .map_err(|e| e.in_ledger(&self.path));
        if let Err(e) = committed {
            let shared = SharedError::from(e);
            if matches!(own_produced, None | Some(Ok(Ok(_)))) {
                own_produced = Some(Ok(Err(shared.error())));
            }
            for queued in jobs.iter_mut() {
                queued.job.fail(shared.error());
            }
        }
        (own_produced, conn)
    }
}

type PooledConnection = r2d2::PooledConnection<r2d2_sqlite::SqliteConnectionManager>;

/// The type of an own write that is not there.
type NoWrite = fn(&Connection, Timestamp) -> Result<()>;

/// The leader's own write in a group, and its deadline.
struct Own<F> {
    write: F,
    deadline: Option<Instant>,
}

/// Runs the writes of a group one after the other, each on its own.
struct Member {
    /// No write has changed anything in the transaction yet.
    first: bool,
}

impl Member {
    /// Runs one write of a group: its changes stand if `run` says it
    /// succeeded, else they are undone. The first write of a transaction
    /// needs no savepoint (a big one, such as a prune batch, would copy
    /// every page it changes into the savepoint's journal): if it fails,
    /// the transaction is rolled back and begun anew for the others. The
    /// others run in a savepoint each. `Err` if the transaction is gone and
    /// cannot be begun anew: then nothing of the group commits.
    fn run(&mut self, conn: &Connection, run: impl FnOnce() -> bool) -> Result<()> {
        if !self.first {
            return in_savepoint(conn, run);
        }
        if run() {
            self.first = false;
            return Ok(());
        }
        if !conn.is_autocommit() {
            conn.prepare_cached("ROLLBACK")?.execute([])?;
        }
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(())
    }
}

/// Runs one write of a group in a savepoint of its own: its changes stand if
/// `run` says it succeeded, else they are rolled back to the savepoint.
/// `Err` if the transaction itself is gone (SQLite rolls a transaction back
/// whole after some errors, such as a full disk): then nothing of the group
/// can commit.
fn in_savepoint(conn: &Connection, run: impl FnOnce() -> bool) -> Result<()> {
    conn.prepare_cached("SAVEPOINT runledger_write")?
        .execute([])?;
    let ok = run();
    if conn.is_autocommit() {
        return Err(Error::from(std::io::Error::other(
            "the transaction was rolled back by an error of a write grouped with this one",
        )));
    }
    if !ok {
        conn.prepare_cached("ROLLBACK TO runledger_write")?
            .execute([])?;
    }
    conn.prepare_cached("RELEASE runledger_write")?
        .execute([])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use super::*;
    use crate::clock::SystemClock;
    use crate::store::StoreConfig;

    fn open(dir: &tempfile::TempDir, busy_timeout: Duration) -> Arc<Store> {
        let config = StoreConfig {
            synchronous: "NORMAL",
            busy_timeout,
            pool_size: 4,
            group_commit: true,
            create: true,
        };
        let store = Store::open(
            &dir.path().join("ledger.db"),
            &config,
            Arc::new(SystemClock),
        )
        .expect("store opens");
        store
            .write(|tx, _| {
                tx.execute_batch(
                    "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY);
                     CREATE TABLE IF NOT EXISTS child (parent INTEGER REFERENCES t (k)
                                         DEFERRABLE INITIALLY DEFERRED);",
                )?;
                Ok(())
            })
            .unwrap();
        Arc::new(store)
    }

    fn group(store: &Store) -> &Group {
        store.group.as_deref().expect("grouping is on")
    }

    /// Holds the lead (inside a write transaction) until the returned
    /// sender is used or dropped.
    fn hold_lead(store: &Arc<Store>) -> (mpsc::Sender<()>, JoinHandle<Result<()>>) {
        let (go, wait) = mpsc::channel::<()>();
        let (held, is_held) = mpsc::channel();
        let s = store.clone();
        let leader = std::thread::spawn(move || {
            s.write_shared(move |_, _| {
                held.send(()).unwrap();
                let _ = wait.recv();
                Ok(())
            })
        });
        is_held.recv().unwrap();
        (go, leader)
    }

    fn wait_for_queue(store: &Store, n: u64) {
        let start = Instant::now();
        while group(store).queued_total() < n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "writes never queued"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn rows(store: &Store) -> Vec<i64> {
        store
            .read(|c| {
                Ok(c.prepare("SELECT k FROM t ORDER BY k")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<i64>>>()?)
            })
            .unwrap()
    }

    /// Visible to a connection of its own, outside the pool: committed.
    fn committed(dir: &tempfile::TempDir, k: i64) -> bool {
        let conn = Connection::open(dir.path().join("ledger.db")).unwrap();
        conn.query_row("SELECT count(*) FROM t WHERE k = ?1", [k], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap()
            == 1
    }

    /// A group whose writes appended events wakes the feed's watchers after
    /// its commit, like a lone write's transaction.
    #[test]
    fn a_group_that_appended_events_wakes_the_watchers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, Duration::from_secs(30));
        let Some(socket) = crate::wake::WakeSocket::bind() else {
            return; // no wake-up sockets on this platform
        };
        store.add_watcher(1, socket.address()).unwrap();
        let (go, leader) = hold_lead(&store);
        let s = store.clone();
        let queued = std::thread::spawn(move || {
            s.write_shared(|_, _| {
                // What appending an event does.
                EVENTS_WRITTEN.with(|w| w.set(true));
                Ok(())
            })
        });
        wait_for_queue(&store, 1);
        assert!(!socket.wait(Duration::from_millis(20)), "woken too soon");
        go.send(()).unwrap();
        leader.join().unwrap().unwrap();
        queued.join().unwrap().unwrap();
        assert!(socket.wait(Duration::from_secs(10)), "never woken");
    }

    #[test]
    fn a_lone_write_runs_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, Duration::from_secs(10));
        for k in 0..3 {
            store
                .write_shared(move |tx, _| {
                    tx.execute("INSERT INTO t (k) VALUES (?1)", [k])?;
                    // No savepoint around a lone write.
                    let e = tx.execute_batch("RELEASE runledger_write").unwrap_err();
                    assert!(e.to_string().contains("no such savepoint"), "{e}");
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(rows(&store), [0, 1, 2]);
        assert_eq!(group(&store).queued_total(), 0);
    }

    /// Writes that wait share a transaction; one that fails or panics after
    /// writing is rolled back alone, its error or panic goes to its own
    /// caller, and every caller is answered only once the group committed.
    #[test]
    fn each_write_of_a_group_stands_or_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, Duration::from_secs(10));
        let (go, leader) = hold_lead(&store);
        let writers: Vec<_> = (1..=12i64)
            .map(|k| {
                let s = store.clone();
                std::thread::spawn(move || {
                    let result = s.write_shared(move |tx, _| {
                        tx.execute("INSERT INTO t (k) VALUES (?1)", [k])?;
                        match k % 4 {
                            1 => Err(Error::invalid("k", &k.to_string(), "refused")),
                            3 => panic!("write {k} panics"),
                            _ => Ok(k * 10),
                        }
                    });
                    (result, Instant::now())
                })
            })
            .collect();
        wait_for_queue(&store, 12);
        // The last write of the group takes its time (a caller answered
        // before the commit would find its row missing meanwhile) and notes
        // when the commit starts.
        let commit_at = Arc::new(Mutex::new(None));
        let (s, at) = (store.clone(), commit_at.clone());
        let slow = std::thread::spawn(move || {
            s.write_shared(move |tx, _| {
                tx.execute("INSERT INTO t (k) VALUES (100)", [])?;
                std::thread::sleep(Duration::from_millis(300));
                tx.commit_hook(Some(move || {
                    at.lock().get_or_insert_with(Instant::now);
                    false
                }))?;
                Ok(())
            })
        });
        wait_for_queue(&store, 13);
        go.send(()).unwrap();
        leader.join().unwrap().unwrap();
        for (i, writer) in writers.into_iter().enumerate() {
            let k = i as i64 + 1;
            match (k % 4, writer.join()) {
                (1, Ok((Err(Error::InvalidInput { value, .. }), _))) => {
                    assert_eq!(value, format!("{:?}", k.to_string()));
                    assert!(!committed(&dir, k), "failed write {k} was committed");
                }
                (3, Err(panic)) => {
                    let msg = panic.downcast_ref::<String>().unwrap();
                    assert_eq!(msg, &format!("write {k} panics"));
                    assert!(!committed(&dir, k), "panicked write {k} was committed");
                }
                (0 | 2, Ok((Ok(v), answered))) => {
                    assert_eq!(v, k * 10);
                    let commit_at = commit_at.lock().expect("the group committed");
                    assert!(answered > commit_at, "write {k} answered before its commit");
                    assert!(committed(&dir, k), "write {k} answered before its commit");
                }
                (_, other) => panic!("write {k}: {other:?}"),
            }
        }
        slow.join().unwrap().unwrap();
        assert_eq!(rows(&store), [2, 4, 6, 8, 10, 12, 100]);
    }

    /// A commit that fails (a deferred constraint, checked at COMMIT) fails
    /// every write of the group, and none of them is visible.
    #[test]
    fn a_failed_commit_fails_every_write_of_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, Duration::from_secs(10));
        let (go, leader) = hold_lead(&store);
        let mut writers: Vec<_> = (1..=4i64)
            .map(|k| {
                let s = store.clone();
                std::thread::spawn(move || {
                    s.write_shared(move |tx, _| {
                        tx.execute("INSERT INTO t (k) VALUES (?1)", [k])?;
                        Ok(())
                    })
                })
            })
            .collect();
        wait_for_queue(&store, 4);
        let s = store.clone();
        writers.push(std::thread::spawn(move || {
            s.write_shared(|tx, _| {
                // A parent that does not exist: only COMMIT finds out.
                tx.execute("INSERT INTO child (parent) VALUES (999)", [])?;
                Ok(())
            })
        }));
        wait_for_queue(&store, 5);
        go.send(()).unwrap();
        leader.join().unwrap().unwrap();
        for writer in writers {
            let e = writer.join().unwrap().unwrap_err();
            assert!(matches!(e, Error::Storage { .. }), "{e:?}");
            assert!(e.to_string().contains("ledger.db"), "{e}");
        }
        assert_eq!(rows(&store), Vec::<i64>::new());
        // The lead was handed on: the store still writes.
        store
            .write_shared(|tx, _| Ok(tx.execute("INSERT INTO t (k) VALUES (7)", [])?))
            .unwrap();
        assert_eq!(rows(&store), [7]);
    }

    /// A write that only its own thread can run waits for its turn to lead
    /// and takes the queued shared writes into its transaction; if it fails,
    /// it fails alone.
    #[test]
    fn a_write_of_its_own_thread_leads_the_next_group() {
        for own_fails in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let store = open(&dir, Duration::from_secs(10));
            let (go, leader) = hold_lead(&store);
            let s = store.clone();
            let own = std::thread::spawn(move || {
                let borrowed = String::from("50");
                s.write(|tx, _| {
                    tx.execute("INSERT INTO t (k) VALUES (?1)", [&borrowed])?;
                    if own_fails {
                        return Err(Error::invalid("k", &borrowed, "refused"));
                    }
                    Ok(tx.is_autocommit())
                })
            });
            while group(&store).state.lock().waiters.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
            let shared: Vec<_> = (1..=3i64)
                .map(|k| {
                    let s = store.clone();
                    std::thread::spawn(move || {
                        s.write_shared(move |tx, _| {
                            Ok(tx.execute("INSERT INTO t (k) VALUES (?1)", [k])?)
                        })
                    })
                })
                .collect();
            wait_for_queue(&store, 3);
            go.send(()).unwrap();
            leader.join().unwrap().unwrap();
            match own.join().unwrap() {
                Err(e) if own_fails => assert!(e.is_invalid_input(), "{e:?}"),
                Ok(autocommit) if !own_fails => assert!(!autocommit, "ran outside a transaction"),
                other => panic!("own write: {other:?}"),
            }
            for writer in shared {
                assert_eq!(writer.join().unwrap().unwrap(), 1);
            }
            let expected: &[i64] = if own_fails {
                &[1, 2, 3]
            } else {
                &[1, 2, 3, 50]
            };
            assert_eq!(rows(&store), expected);
        }
    }

    /// A queued write whose busy timeout passes gives up with a busy error,
    /// and is never run.
    #[test]
    fn a_queued_write_gives_up_at_its_busy_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, Duration::from_millis(100));
        let (go, leader) = hold_lead(&store);
        let started = Instant::now();
        let e = store
            .write_shared(|tx, _| Ok(tx.execute("INSERT INTO t (k) VALUES (1)", [])?))
            .unwrap_err();
        assert!(e.is_busy(), "{e:?}");
        assert!(started.elapsed() >= Duration::from_millis(100));
        go.send(()).unwrap();
        leader.join().unwrap().unwrap();
        store
            .write_shared(|tx, _| Ok(tx.execute("INSERT INTO t (k) VALUES (2)", [])?))
            .unwrap();
        assert_eq!(rows(&store), [2]);
    }

    /// Writers that give up at a short busy timeout while queued (some of
    /// them the one woken to take a free lead) never strand the others:
    /// writes of a store with a long timeout, sharing the queue, all
    /// commit, and nothing waits for that timeout.
    #[test]
    fn writers_that_give_up_never_strand_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let patient = open(&dir, Duration::from_secs(20));
        let hasty = open(&dir, Duration::from_millis(1));
        let started = Instant::now();
        let threads: Vec<_> = (0..8i64)
            .map(|t| {
                let store = if t % 2 == 0 {
                    patient.clone()
                } else {
                    hasty.clone()
                };
                std::thread::spawn(move || {
                    let mut outcomes = Vec::new();
                    for i in 0..150i64 {
                        let k = t * 1000 + i;
                        let slow = i % 10 == 0;
                        let write = move |tx: &Connection, _| {
                            tx.execute("INSERT INTO t (k) VALUES (?1)", [k])?;
                            if slow {
                                std::thread::sleep(Duration::from_millis(2));
                            }
                            Ok(())
                        };
                        let result = if t == 6 {
                            // A write of its own thread, among shared ones.
                            store.write(write)
                        } else {
                            store.write_shared(write)
                        };
                        outcomes.push((k, result));
                    }
                    outcomes
                })
            })
            .collect();
        let mut committed = Vec::new();
        let mut gave_up = 0;
        for (t, thread) in threads.into_iter().enumerate() {
            for (k, result) in thread.join().unwrap() {
                match result {
                    Ok(()) => committed.push(k),
                    Err(e) if t % 2 == 1 && e.is_busy() => gave_up += 1,
                    Err(e) => panic!("write {k} of thread {t}: {e:?}"),
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a writer waited for its timeout: {:?}",
            started.elapsed()
        );
        committed.sort_unstable();
        assert_eq!(rows(&patient), committed);
        assert!(committed.len() >= 4 * 150, "{gave_up} gave up");
    }

    /// Review: a write waits for SQLite's write lock up to its own busy
    /// timeout, whatever the other writes grouped with it. Here another
    /// connection (another process) holds the write lock for 1.5 s; a lock
    /// write of a store with a 10 s busy timeout leads the next group, which
    /// also carries a queued write of a store of the same file with a 600 ms
    /// timeout. The lock write must wait and commit; it gets `Busy` at
    /// 600 ms instead, because the group's `BEGIN` waits only until the
    /// earliest deadline of its writes.
    #[test]
    fn a_patient_write_is_not_cut_short_by_a_hasty_one_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let quick = open(&dir, Duration::from_millis(300));
        let hasty = open(&dir, Duration::from_millis(600));
        let patient = open(&dir, Duration::from_secs(10));
        // Another process's writer.
        let other = Connection::open(dir.path().join("ledger.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started = Instant::now();
        // Takes the lead and waits in its BEGIN until its own 300 ms pass.
        let s = quick.clone();
        let first = std::thread::spawn(move || {
            s.write_shared(|tx, _| Ok(tx.execute("INSERT INTO t (k) VALUES (1)", [])?))
        });
        while !group(&patient).state.lock().leading {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A write of its own thread (a lock write), first in line.
        let s = patient.clone();
        let own = std::thread::spawn(move || {
            let result = s.write(|tx, _| Ok(tx.execute("INSERT INTO t (k) VALUES (2)", [])?));
            (result, started.elapsed())
        });
        while group(&patient).state.lock().waiters.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A run write of a store with a shorter busy timeout, behind it.
        let s = hasty.clone();
        let shared = std::thread::spawn(move || {
            s.write_shared(|tx, _| Ok(tx.execute("INSERT INTO t (k) VALUES (3)", [])?))
        });
        wait_for_queue(&patient, 1);
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "setup too slow"
        );
        std::thread::sleep(Duration::from_millis(1500).saturating_sub(started.elapsed()));
        other.execute_batch("COMMIT").unwrap();
        let e = first.join().unwrap().unwrap_err();
        assert!(e.is_busy(), "{e:?}");
        let _ = shared.join().unwrap(); // its own 600 ms: Busy is fair
        let (result, after) = own.join().unwrap();
        assert!(
            result.is_ok(),
            "the 10 s write failed after {after:?}, while the database was \
             free again after 1.5 s: {result:?}"
        );
        assert!(rows(&patient).contains(&2));
    }

    /// A clock that panics once told to (the `Clock` trait is public: a
    /// host may bring its own).
    #[derive(Debug)]
    struct BrokenClock(Arc<std::sync::atomic::AtomicBool>);

    impl Clock for BrokenClock {
        fn now(&self) -> Timestamp {
            if self.0.load(std::sync::atomic::Ordering::SeqCst) {
                panic!("the host's clock broke");
            }
            SystemClock.now()
        }
    }

    /// Review: a panic in the group leader outside a write's `catch_unwind`
    /// (here the clock of one ledger, read in `Pending::run` before the
    /// write's closure) drops the other writes of the group unanswered:
    /// their callers, on another ledger with a sound clock, must get an
    /// answer (an error at worst), but wait forever.
    #[test]
    fn a_panic_outside_a_write_never_strands_the_rest_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let good = open(&dir, Duration::from_secs(2));
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let config = StoreConfig {
            synchronous: "NORMAL",
            busy_timeout: Duration::from_secs(2),
            pool_size: 4,
            group_commit: true,
            create: true,
        };
        let bad = Arc::new(
            Store::open(
                &dir.path().join("ledger.db"),
                &config,
                Arc::new(BrokenClock(broken.clone())),
            )
            .unwrap(),
        );
        let (go, leader) = hold_lead(&good);
        let b = bad.clone();
        let bad_caller = std::thread::spawn(move || {
            b.write_shared(|tx, _| Ok(tx.execute("INSERT INTO t (k) VALUES (1)", [])?))
        });
        wait_for_queue(&good, 1);
        let (answers, answered) = mpsc::channel();
        for k in 2..=3i64 {
            let (s, answers) = (good.clone(), answers.clone());
            std::thread::spawn(move || {
                let result = s.write_shared(move |tx, _| {
                    Ok(tx.execute("INSERT INTO t (k) VALUES (?1)", [k])?)
                });
                let _ = answers.send((k, result.is_ok()));
            });
        }
        wait_for_queue(&good, 3);
        broken.store(true, std::sync::atomic::Ordering::SeqCst);
        go.send(()).unwrap();
        leader.join().unwrap().unwrap();
        assert!(bad_caller.join().is_err(), "its own clock's panic");
        for _ in 2..=3 {
            match answered.recv_timeout(Duration::from_secs(10)) {
                Ok(_) => {}
                Err(_) => panic!(
                    "a write of the sound ledger, grouped with the broken one, \
                     got no answer in 10 s (busy timeout 2 s)"
                ),
            }
        }
    }

    /// Every store of a file in this process shares one group, unless it
    /// commits with another `synchronous` setting.
    #[test]
    fn stores_of_one_file_share_a_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let a = Group::for_file(&path, "NORMAL");
        assert!(Arc::ptr_eq(&a, &Group::for_file(&path, "NORMAL")));
        assert!(!Arc::ptr_eq(&a, &Group::for_file(&path, "FULL")));
        assert!(!Arc::ptr_eq(
            &a,
            &Group::for_file(&dir.path().join("other.db"), "NORMAL")
        ));
    }
}
