//! The dashboard in a real browser: headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`; `.ci/run` installs them),
//! against `runledger serve` on loopback, with runs made by other
//! `runledger` processes. The tests check what a person sees.
//!
//! A missing browser or driver fails these tests: they never pass by
//! skipping.
//!
//! With `RUNLEDGER_SCREENSHOTS=1`, they also save screenshots of what they
//! see in `docs/screenshots/` (the README's pictures):
//! `RUNLEDGER_SCREENSHOTS=1 cargo test --features web,cli --test browser`.
#![cfg(all(feature = "web", feature = "cli"))]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 exchange with a server on loopback: the status and the
/// JSON body.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read by Content-Length: chromedriver keeps the connection open.
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {status_line:?}"));
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut rest = vec![0; length];
    reader.read_exact(&mut rest).unwrap();
    let rest = String::from_utf8_lossy(&rest);
    let value = serde_json::from_str(rest.trim()).unwrap_or(Value::Null);
    (status, value)
}

/// A chromedriver, which closes its browsers before it is killed (killed
/// alone, it would leave them running).
struct Driver {
    port: u16,
    _child: Killed,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Best effort, never a panic: this also runs while a test fails.
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                stream,
                "GET /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.read(&mut [0; 512]);
        }
    }
}

/// Headless Chromium, driven by its own chromedriver.
struct Browser {
    port: u16,
    session: String,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

fn installed(program: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
        let path = Path::new(dir).join(program);
        if path.exists() {
            return path;
        }
    }
    panic!(
        "{program} is not installed: the browser tests need Debian's chromium and \
         chromium-driver (apt-get install -y chromium chromium-driver; .ci/run does it)"
    );
}

impl Browser {
    fn start() -> Browser {
        let driver = installed("chromedriver");
        let chromium = installed("chromium");
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let driver = Driver {
            port,
            _child: Killed(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let (status, reply) = http(port, "POST", "/session", Some(&capabilities));
        assert_eq!(status, 200, "no browser session: {reply}");
        let session = reply["value"]["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Browser {
            port,
            session,
            _driver: driver,
            _profile: profile,
        }
    }

    fn command(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}/{what}", self.session);
        let (status, reply) = http(self.port, method, &path, body.as_ref());
        assert_eq!(status, 200, "{method} {what}: {reply}");
        reply["value"].clone()
    }

    fn open(&self, url: &str) {
        self.command("POST", "url", Some(json!({ "url": url })));
    }

    /// Runs `script` in the page and returns what it returns.
    fn eval(&self, script: &str) -> Value {
        self.command(
            "POST",
            "execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// The text a person sees in the page's content.
    fn text(&self) -> String {
        // Empty while a page loads (after a form is sent, for one).
        self.eval("var main = document.querySelector('main'); return main ? main.innerText : '';")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the page's text satisfies `ok`, without reloading it.
    fn wait_for_text(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        self.wait_for_text_within(Duration::from_secs(30), what, ok)
    }

    /// [`wait_for_text`](Browser::wait_for_text), for at most `limit`.
    fn wait_for_text_within(
        &self,
        limit: Duration,
        what: &str,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.text();
            if ok(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}; it shows:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Browser {
    /// Types `value` into the page's input named `name`.
    fn fill(&self, name: &str, value: &str) {
        let script = format!(
            "document.querySelector('input[name={name}]').value = {};return null;",
            Value::from(value)
        );
        self.eval(&script);
    }

    /// Saves a PNG of the window as `docs/screenshots/{name}.png` when
    /// `RUNLEDGER_SCREENSHOTS` is set; nothing otherwise.
    fn screenshot(&self, name: &str) {
        if std::env::var_os("RUNLEDGER_SCREENSHOTS").is_none() {
            return;
        }
        let png = self.command("GET", "screenshot", None);
        let png = base64_decode(png.as_str().expect("a base64 PNG"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

/// Standard base64, as WebDriver sends screenshots.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .map(value)
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | u32::from(*d) << (18 - 6 * i));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    out
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

/// A ledger, `runledger serve` on it, and a way to run `runledger` there.
struct Served {
    dir: tempfile::TempDir,
    url: String,
    _server: Killed,
}

fn runledger(db: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_runledger"));
    command
        .env("RUNLEDGER_DB", db)
        .env_remove("RUNLEDGER_TOKEN");
    command
}

impl Served {
    fn start() -> Served {
        Served::start_with(&[])
    }

    /// `runledger serve` with more arguments.
    fn start_with(args: &[&str]) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.db");
        runledger::Ledger::open(&db).unwrap();
        let mut child = runledger(&db)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim_end_matches('/')
            .to_owned();
        Served {
            dir,
            url,
            _server: Killed(child),
        }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("ledger.db")
    }

    /// `runledger exec` of `args` in the background.
    fn exec(&self, args: &[&str]) -> Killed {
        Killed(
            runledger(&self.db())
                .current_dir(self.dir.path())
                .arg("exec")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// The id of the newest run named `name`, waiting for it to appear.
    fn run_id(&self, name: &str) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = runledger(&self.db())
                .args(["runs", "--json", "--name", name, "--limit", "1"])
                .output()
                .unwrap();
            let runs: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if let Some(id) = runs[0]["id"].as_i64() {
                return id;
            }
            assert!(Instant::now() < deadline, "run {name} never appeared");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_run_another_process_starts_appears_on_an_open_page_without_a_reload() {
    let served = Served::start();
    let browser = Browser::start();
    browser.open(&format!("{}/", served.url));
    assert!(
        browser.text().contains("Active runs (0)"),
        "{}",
        browser.text()
    );
    // A mark in the page's own state: a reload would lose it.
    browser.eval("window.sameDocument = 'yes'; return null;");
    browser.wait_for_text("the live feed connected", |_| {
        browser.eval("return document.getElementById('live').textContent;") == "live"
    });

    let _run = served.exec(&["--name", "appears-live", "--", "sleep", "30"]);
    let text = browser.wait_for_text("the new run", |t| t.contains("appears-live"));
    assert!(text.contains("Active runs (1)"), "{text}");
    assert_eq!(
        browser.eval("return window.sameDocument || 'reloaded';"),
        "yes",
        "the page was reloaded"
    );
}

#[test]
fn a_queued_runs_page_names_its_holder() {
    let served = Served::start();
    let _holder = served.exec(&["--name", "holder", "--lock", "deploy", "--", "sleep", "30"]);
    let holder = served.run_id("holder");
    let _waiter = served.exec(&["--name", "waiter", "--lock", "deploy", "--", "true"]);
    let waiter = served.run_id("waiter");
    let browser = Browser::start();
    browser.open(&format!("{}/runs/{waiter}", served.url));
    let text = browser.wait_for_text("why it waits", |t| t.contains("Why it waits"));
    assert!(text.contains("Waits for deploy (exclusive)"), "{text}");
    let holder_line = text
        .lines()
        .find(|l| l.starts_with("Held by"))
        .unwrap_or_else(|| panic!("no holder named:\n{text}"));
    assert!(
        holder_line.starts_with(&format!("Held by run {holder} (holder), pid ")),
        "{holder_line}"
    );
    assert!(holder_line.ends_with("alive"), "{holder_line}");
}

#[test]
fn names_that_look_like_markup_are_shown_as_text() {
    let served = Served::start();
    let evil = [
        "<script>document.title='pwned'</script>",
        "<img src=x onerror=\"document.title='pwned'\">",
    ];
    for name in evil {
        let out = runledger(&served.db())
            .args(["exec", "--name", name, "--", "true"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let browser = Browser::start();
    for page in ["/", "/runs", "/runs/1", "/runs/2"] {
        browser.open(&format!("{}{page}", served.url));
        let text = browser.text();
        assert_eq!(
            browser
                .eval("return document.title;")
                .as_str()
                .map(|t| t.contains("pwned")),
            Some(false),
            "{page}"
        );
        assert_eq!(
            browser.eval("return document.querySelectorAll('main script, main img').length;"),
            0,
            "{page}: markup from a run's name became elements"
        );
        if page == "/runs" {
            for name in evil {
                assert!(
                    text.contains(name),
                    "{page} does not show {name:?} as text:\n{text}"
                );
            }
        }
    }
    browser.open(&format!("{}/runs/1", served.url));
    assert!(browser.text().contains(evil[0]), "{}", browser.text());
}

/// A person cancels a run from its page: the form goes through the token,
/// the same-origin checks and the CSRF token, the run's process stops, and
/// the run records who asked.
#[test]
fn a_person_cancels_a_run_from_its_page() {
    let served = Served::start_with(&["--token", "t0ken", "--allow-actions"]);
    let _run = served.exec(&["--name", "to-cancel", "--", "sleep", "60"]);
    let id = served.run_id("to-cancel");
    let browser = Browser::start();
    // Once with the token: the cookie the forms are bound to.
    browser.open(&format!("{}/?token=t0ken", served.url));
    browser.open(&format!("{}/runs/{id}", served.url));
    browser.wait_for_text("the cancel button", |t| t.contains("Cancel run"));
    browser.screenshot("run-cancel");
    browser.fill("name", "tester");
    browser.eval("document.querySelector('form.action button').click(); return null;");
    let text = browser.wait_for_text("the run cancelled, with who asked", |t| {
        t.contains("cancelled") && t.contains("by tester on the dashboard from 127.0.0.1")
    });
    assert!(!text.contains("Cancel run"), "{text}");
}

/// A name typed on a run's page stays typed when the page is redrawn for
/// an event meanwhile (another run starting): the redraw keeps what the
/// fields of its forms hold.
#[test]
fn what_a_person_typed_survives_a_redraw() {
    let served = Served::start_with(&["--token", "t0ken", "--allow-actions"]);
    let _run = served.exec(&["--name", "typed-on", "--", "sleep", "60"]);
    let id = served.run_id("typed-on");
    let browser = Browser::start();
    browser.open(&format!("{}/?token=t0ken", served.url));
    browser.open(&format!("{}/runs/{id}", served.url));
    browser.wait_for_text("the cancel button", |t| t.contains("Cancel run"));
    browser.fill("name", "tester");
    browser
        .eval("document.querySelector('main').setAttribute('data-drawn-before', ''); return null;");
    let _other = served.exec(&["--name", "meanwhile", "--", "sleep", "60"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while browser
        .eval("return document.querySelector('main[data-drawn-before]') !== null;")
        .as_bool()
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "the page was never redrawn");
        std::thread::sleep(Duration::from_millis(50));
    }
    let value = browser.eval("return document.querySelector('form.action [name=\"name\"]').value;");
    assert_eq!(value.as_str(), Some("tester"));
}

/// The pages with something on them, as the README shows them: a busy
/// overview, a run, and the locks with their queue and history.
#[test]
fn the_dashboard_shows_a_busy_ledger() {
    let served = Served::start();
    let db = served.db();
    let ok = |args: &[&str]| {
        let out = runledger(&db).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    ok(&[
        "exec",
        "--name",
        "build",
        "--lock",
        "build:symbol=AAPL",
        "--",
        "true",
    ]);
    ok(&["exec", "--name", "report", "--", "true"]);
    let out = runledger(&db)
        .args([
            "exec",
            "--name",
            "train",
            "--",
            "sh",
            "-c",
            "echo loss exploded >&2; exit 3",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let _deploy = served.exec(&[
        "--name",
        "deploy",
        "--lock",
        "deploy:prod",
        "--",
        "sleep",
        "60",
    ]);
    let deploy = served.run_id("deploy");
    let _gpu = served.exec(&["--name", "train", "--lock", "gpu", "--", "sleep", "60"]);
    let _waiter = served.exec(&["--name", "deploy", "--lock", "deploy:prod", "--", "true"]);
    let browser = Browser::start();
    browser.open(&format!("{}/", served.url));
    let text = browser.wait_for_text("the waiter queued", |t| t.contains("Active runs (3)"));
    assert!(text.contains("deploy:prod"), "{text}");
    browser.screenshot("overview");
    let waiter = served.run_id("deploy");
    assert_ne!(waiter, deploy);
    browser.open(&format!("{}/runs/{waiter}", served.url));
    let text = browser.wait_for_text("why it waits", |t| t.contains("Why it waits"));
    assert!(
        text.contains(&format!("Held by run {deploy} (deploy)")),
        "{text}"
    );
    browser.screenshot("run");
    browser.open(&format!("{}/locks", served.url));
    let text = browser.wait_for_text("the history", |t| t.contains("History"));
    assert!(text.contains("build:symbol=AAPL"), "{text}");
    assert!(text.contains("released"), "{text}");
    browser.screenshot("locks");
}

/// The log of a running run grows on its open page: what the run's
/// process writes to it, and what another process appends, shows up
/// without a reload, once each, also across a redraw of the page.
#[test]
fn a_running_runs_log_grows_on_its_open_page_without_a_reload() {
    let served = Served::start();
    // The run writes its second line once the test creates `go`.
    let _run = served.exec(&[
        "--name",
        "tailed",
        "--",
        "sh",
        "-c",
        "echo first line; while [ ! -e go ]; do sleep 0.05; done; \
         echo second line from the run; exec sleep 60",
    ]);
    let id = served.run_id("tailed");
    let out = runledger(&served.db())
        .args(["runs", "--json", "--name", "tailed", "--limit", "1"])
        .output()
        .unwrap();
    let runs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let log = PathBuf::from(runs[0]["log_path"].as_str().expect("a log path"));
    let browser = Browser::start();
    browser.open(&format!("{}/runs/{id}", served.url));
    // The command line (in the metadata) has the lines too: look at the log.
    let log_text = || {
        browser
            .eval("var pre = document.querySelector('pre.log'); return pre ? pre.textContent : '';")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // Well within the 30 s of the page's timed redraw: only the log's
    // poll (every second) can show the line in time.
    let wait_for_log = |what: &str, line: &str| {
        browser.wait_for_text_within(Duration::from_secs(10), what, |_| log_text().contains(line));
        log_text()
    };
    wait_for_log("the log's first line", "first line");
    browser.eval("window.sameDocument = 'yes'; return null;");

    std::fs::write(served.dir.path().join("go"), "").unwrap();
    wait_for_log("the line the run wrote", "second line from the run");
    let append = |line: &str| {
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(file, "{line}").unwrap();
    };
    append("appended by another process <b>not bold</b>");
    wait_for_log(
        "the appended line",
        "appended by another process <b>not bold</b>",
    );
    assert_eq!(
        browser.eval("return document.querySelectorAll('pre.log b').length;"),
        0,
        "a log line became markup"
    );

    // A redraw of the page's content (an event: another run ends) keeps
    // every line, once.
    browser.eval("document.querySelector('main').setAttribute('data-old', ''); return null;");
    let out = runledger(&served.db())
        .args(["exec", "--name", "other", "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    browser.wait_for_text("a redraw", |_| {
        browser.eval("return document.querySelector('main[data-old]') === null;") == true
    });
    append("after the redraw");
    let text = wait_for_log("the line after the redraw", "after the redraw");
    for line in [
        "first line",
        "second line from the run",
        "appended by another process",
        "after the redraw",
    ] {
        assert_eq!(
            text.matches(line).count(),
            1,
            "{line:?} is not shown once:\n{text}"
        );
    }
    assert_eq!(
        browser.eval("return window.sameDocument || 'reloaded';"),
        "yes",
        "the page was reloaded"
    );
}
