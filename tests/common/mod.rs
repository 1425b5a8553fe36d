//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use runledger::{Ledger, LockState, ManualClock, Timestamp};

/// A fresh ledger in a temporary folder, with a manual clock.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
    pub ledger: Ledger,
}

pub const T0: Timestamp = Timestamp::from_millis(1_763_799_302_000);

pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let ledger = Ledger::builder(dir.path().join("ledger.db"))
        .clock(clock.clone())
        .open()
        .unwrap();
    Fixture { dir, clock, ledger }
}

/// The `worker` example: a real process that does one ledger operation.
///
/// `cargo test` builds the examples before it runs the tests; when a test is
/// run alone (`cargo test --test NAME`) they may be missing or stale, so the
/// first call builds it once.
pub fn worker() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--example", "worker"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the worker example failed");
        // tests run from target/<profile>/deps/; examples live beside deps/.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap();
        let path = profile_dir
            .join("examples")
            .join(format!("worker{}", std::env::consts::EXE_SUFFIX));
        assert!(path.exists(), "{} missing", path.display());
        path
    })
}

/// Starts the worker with `args`, stdout piped.
pub fn spawn_worker(db: &Path, args: &[&str]) -> Child {
    Command::new(worker())
        .arg(db)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker starts")
}

/// A child process killed (SIGKILL) and reaped when dropped, so that a test
/// that fails midway never leaves a worker running.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for a worker and returns its stdout lines, asserting it exited 0.
pub fn finish(child: Child) -> Vec<String> {
    let out: Output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "worker failed: {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

/// A Unix time in milliseconds `ms` from now: an instant for several
/// processes to act at together.
pub fn instant_in(ms: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (now + Duration::from_millis(ms)).as_millis().to_string()
}

/// The bytes of a file, to prove it was not modified.
pub fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Reads the next line a worker prints.
pub fn next_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_owned()
}

/// Waits until the ledger shows `n` waiting requests.
pub fn wait_for_waiters(ledger: &runledger::Ledger, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ledger
        .locks()
        .unwrap()
        .iter()
        .filter(|l| l.state == LockState::Waiting)
        .count()
        < n
    {
        assert!(
            Instant::now() < deadline,
            "waiters never queued: {:?}",
            ledger.locks().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Makes `path` immutable with `chattr +i`, which binds root too (plain
/// permissions do not); undone on drop. `None` when the file system or the
/// sandbox does not allow it.
pub fn immutable(path: &Path) -> Option<impl Drop> {
    struct Undo(PathBuf);
    impl Drop for Undo {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let ok = Command::new("chattr")
        .arg("+i")
        .arg(path)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Undo(path.to_owned()))
}

/// Sends `signal` (such as `-STOP`, `-CONT`) to a process, asserting that
/// `kill` accepted it.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid} failed");
}
