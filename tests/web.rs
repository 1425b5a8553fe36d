//! The dashboard (feature `web`) at the HTTP level: requests sent to the
//! router in-process, on both stores; and `runledger serve` as a process.
#![cfg(feature = "web")]

mod common;

use std::collections::HashMap;
use std::io::Write as _;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use common::{Fixture, Store, wait_for_waiters};
use http_body_util::BodyExt as _;
use runledger::web::Dashboard;
use runledger::{LockRequest, RunFilter, RunSpec, RunStatus};
use serde_json::Value;
use tower::ServiceExt as _;

/// A response, read whole.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(&name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name} header"))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Sends one request to `app` and reads the whole response.
fn send(app: &axum::Router, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    runtime().block_on(async {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        read_reply(response).await
    })
}

/// A whole response, read.
async fn read_reply(response: axum::response::Response) -> Reply {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

fn get(app: &axum::Router, path: &str) -> Reply {
    send(app, Method::GET, path, &[])
}

fn ok(app: &axum::Router, path: &str) -> Reply {
    let reply = get(app, path);
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
    reply
}

fn json<T: serde::Serialize>(value: T) -> Value {
    serde_json::to_value(value).unwrap()
}

fn ids(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect()
}

fn the_runs_api_mirrors_the_cli_and_filters_and_pages(store: Store) {
    let f = Fixture::new(store);
    let all: Vec<i64> = common::seed_nine_runs(&f)
        .into_iter()
        .map(i64::from)
        .collect();
    let app = runledger::web::router(f.ledger.clone());

    // The very records, serialized as `runledger runs --json` prints them.
    let reply = ok(&app, "/api/runs");
    assert!(
        reply
            .header(header::CONTENT_TYPE)
            .starts_with("application/json")
    );
    assert_eq!(
        reply.json(),
        json(f.ledger.runs(RunFilter::default()).unwrap())
    );

    let list = |q: &str| ids(&ok(&app, &format!("/api/runs?{q}")).json());
    assert_eq!(list("status=running"), [all[8], all[5], all[2]]);
    assert_eq!(
        list("status=failed&status=succeeded&limit=3"),
        [all[7], all[6], all[4]]
    );
    assert_eq!(list("name=job-1"), [all[7], all[4], all[1]]);
    assert_eq!(
        list("source=worker&status="),
        [all[7], all[5], all[3], all[1]]
    );
    assert_eq!(list("since=3s"), [all[8], all[7], all[6]]);
    // Paging: the last id of one page asks for the next.
    assert_eq!(list("limit=4"), [all[8], all[7], all[6], all[5]]);
    assert_eq!(
        list(&format!("limit=4&before={}", all[5])),
        [all[4], all[3], all[2], all[1]]
    );

    for bad in ["status=sleeping", "since=soon", "limit=0", "before=x"] {
        let reply = get(&app, &format!("/api/runs?{bad}"));
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(reply.json()["error"].is_string(), "{bad}: {}", reply.body);
    }
}

fn one_run_locks_and_instances_as_json(store: Store) {
    let f = Fixture::new(store);
    let run = f
        .ledger
        .begin_run(RunSpec::new("build").metadata(serde_json::json!({"symbol": "AAPL"})))
        .unwrap();
    run.step("day-1").unwrap().succeed().unwrap();
    let _lock = run.lock("build:symbol=AAPL").unwrap();
    let app = runledger::web::router(f.ledger.clone());

    let shown = ok(&app, &format!("/api/runs/{}", run.id())).json();
    let id = run.id();
    let locks: Vec<_> = f
        .ledger
        .locks()
        .unwrap()
        .into_iter()
        .filter(|l| l.run == Some(id))
        .collect();
    assert_eq!(
        shown,
        serde_json::json!({
            "run": json(f.ledger.run(id).unwrap()),
            "steps": json(f.ledger.steps(id).unwrap()),
            "events": json(f.ledger.events(id).unwrap()),
            "locks": json(locks),
        })
    );
    assert_eq!(get(&app, "/api/runs/999999").status, StatusCode::NOT_FOUND);
    assert_eq!(get(&app, "/api/runs/abc").status, StatusCode::BAD_REQUEST);

    assert_eq!(
        ok(&app, "/api/locks").json(),
        json(f.ledger.locks().unwrap())
    );
    let instances = ok(&app, "/api/instances").json();
    let me = instances
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["is_self"] == true)
        .expect("the dashboard's own instance");
    assert_eq!(me["alive"], true);
    assert_eq!(me["pid"], std::process::id());
    run.succeed().unwrap();
}

/// Prometheus text, parsed: every sample under its `# TYPE`, by name and
/// labels.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["gauge", "counter"].contains(&kind),
                "unknown type in {line:?}"
            );
            assert!(typed.insert(name.to_owned()), "{name} typed twice");
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        assert!(typed.contains(name), "{name} has no # TYPE before it");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(
                labels.starts_with('{') && labels.ends_with('}') && labels.contains("=\""),
                "bad labels in {line:?}"
            );
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "{series} twice"
        );
    }
    samples
}

fn metrics_count_runs_locks_waiters_instances_and_reaped_runs(store: Store) {
    let f = Fixture::new(store);
    f.ledger
        .begin_run(RunSpec::new("ok"))
        .unwrap()
        .succeed()
        .unwrap();
    f.ledger
        .begin_run(RunSpec::new("bad"))
        .unwrap()
        .fail("no")
        .unwrap();
    let hung = f
        .ledger
        .begin_run(RunSpec::new("hung").heartbeat_timeout(Duration::from_secs(60)))
        .unwrap();
    let holder = f.ledger.begin_run(RunSpec::new("holder")).unwrap();
    let held = holder.lock("db").unwrap();
    // A process of another host (judged by its lease) that goes silent.
    let elsewhere = f
        .builder()
        .host("elsewhere")
        .background(false)
        .stale_after(Duration::from_secs(30))
        .open()
        .unwrap();
    std::mem::forget(elsewhere.begin_run(RunSpec::new("orphan")).unwrap());
    // A queued run waiting for "db", from another ledger (another process).
    let waiter_ledger = f.builder().open().unwrap();
    let waiter = std::thread::spawn(move || {
        let run = waiter_ledger
            .begin_run(RunSpec::new("waiter").queued())
            .unwrap();
        let guard = run
            .acquire(LockRequest::new(["db"]).wait(Duration::from_secs(60)))
            .unwrap();
        guard.release().unwrap();
        run.succeed().unwrap();
    });
    wait_for_waiters(&f.ledger, 1);
    f.clock.advance(Duration::from_secs(45));
    holder.heartbeat().unwrap();

    let app = runledger::web::router(f.ledger.clone());
    let reply = ok(&app, "/metrics");
    assert!(
        reply
            .header(header::CONTENT_TYPE)
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        reply.headers
    );
    let m = parse_prometheus(&reply.body);
    let at = |series: &str| {
        *m.get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{}", reply.body))
    };
    assert_eq!(at(r#"runledger_runs{status="succeeded"}"#), 1.0);
    assert_eq!(at(r#"runledger_runs{status="failed"}"#), 1.0);
    assert_eq!(at(r#"runledger_runs{status="running"}"#), 3.0);
    assert_eq!(at(r#"runledger_runs{status="queued"}"#), 1.0);
    assert_eq!(at(r#"runledger_runs{status="partial"}"#), 0.0);
    assert_eq!(at("runledger_runs_active"), 4.0);
    assert_eq!(at("runledger_runs_queued"), 1.0);
    assert_eq!(at("runledger_locks_held"), 1.0);
    assert_eq!(at("runledger_lock_waiters"), 1.0);
    let waited = at("runledger_lock_oldest_wait_seconds");
    assert!((45.0..50.0).contains(&waited), "{waited}");
    // Ours and the waiter's are alive; the silent one is stale.
    assert!(at(r#"runledger_instances{state="alive"}"#) >= 2.0);
    assert_eq!(at(r#"runledger_instances{state="stale"}"#), 1.0);
    assert_eq!(at("runledger_runs_reaped"), 0.0);

    // A reap fails the orphan (owner gone) and the hung run (hung).
    f.clock.advance(Duration::from_secs(30));
    holder.heartbeat().unwrap();
    f.ledger.reap().unwrap();
    assert_eq!(
        f.ledger.run(hung.id()).unwrap().status,
        RunStatus::Failed,
        "the hung run"
    );
    let m = parse_prometheus(&ok(&app, "/metrics").body);
    assert_eq!(m["runledger_runs_reaped"], 2.0, "{m:?}");
    assert_eq!(m[r#"runledger_instances{state="stale"}"#], 0.0);
    assert_eq!(m[r#"runledger_runs{status="failed"}"#], 3.0);

    held.release().unwrap();
    waiter.join().unwrap();
    holder.succeed().unwrap();
    let m = parse_prometheus(&ok(&app, "/metrics").body);
    assert_eq!(m["runledger_lock_waiters"], 0.0);
    assert_eq!(m["runledger_lock_oldest_wait_seconds"], 0.0);
    assert_eq!(m["runledger_runs_active"], 0.0);
}

/// Every page, with the headers that keep a browser safe.
const PAGES: [&str; 4] = ["/", "/runs", "/runs/1", "/locks"];

fn every_value_is_escaped_and_every_page_has_a_strict_policy(store: Store) {
    let f = Fixture::new(store);
    let evil = "<script>alert('name')</script>";
    let run = f
        .ledger
        .begin_run(
            RunSpec::new(evil)
                .source("<i>src</i>")
                .metadata(serde_json::json!({"note": "<img src=x onerror=alert(1)>"})),
        )
        .unwrap();
    let id = run.id();
    run.step("<b>step</b>").unwrap().fail("<u>why</u>").unwrap();
    let guard = run.lock("key:<svg onload=alert(1)>").unwrap();
    let app = runledger::web::router(f.ledger.clone());
    for path in [
        "/".to_owned(),
        "/runs".to_owned(),
        format!("/runs/{id}"),
        "/locks".to_owned(),
    ] {
        let reply = ok(&app, &path);
        let csp = reply.header(header::CONTENT_SECURITY_POLICY);
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(reply.header(header::X_CONTENT_TYPE_OPTIONS), "nosniff");
        let body = &reply.body;
        for raw in [
            "<script>alert",
            "<img src=x",
            "<svg onload",
            "<b>step",
            "<u>why",
            "<i>src",
        ] {
            assert!(!body.contains(raw), "{path} has {raw:?} unescaped:\n{body}");
        }
        // The only scripts are the dashboard's own file.
        assert_eq!(body.matches("<script").count(), 1, "{path}");
        assert!(body.contains("<script src=\"/assets/live.js\""), "{path}");
    }
    let page = ok(&app, &format!("/runs/{id}")).body;
    assert!(
        page.contains("&lt;script&gt;alert('name')&lt;/script&gt;"),
        "{page}"
    );
    assert!(
        page.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{page}"
    );
    assert!(page.contains("&lt;u&gt;why&lt;/u&gt;"), "{page}");
    assert!(
        ok(&app, "/locks")
            .body
            .contains("key:&lt;svg onload=alert(1)&gt;")
    );
    guard.release().unwrap();
    run.succeed().unwrap();
}

fn no_request_changes_the_ledger(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("long")).unwrap();
    let guard = run.lock("k").unwrap();
    let app = runledger::web::router(f.ledger.clone());
    let before = (
        f.ledger.runs(RunFilter::default()).unwrap(),
        f.ledger.locks().unwrap(),
        f.ledger.events_cursor().unwrap(),
    );
    let id = run.id();
    for path in PAGES
        .iter()
        .map(|p| p.replace("/1", &format!("/{id}")))
        .chain(
            [
                "/api/runs",
                "/api/locks",
                "/api/instances",
                "/metrics",
                "/api/events",
            ]
            .map(str::to_owned),
        )
        .chain([
            format!("/api/runs/{id}"),
            format!("/api/runs/{id}/cancel"),
            format!("/runs/{id}/cancel"),
            "/locks/unlock".to_owned(),
            "/api/locks/k".to_owned(),
            "/nowhere".to_owned(),
        ])
    {
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            let reply = send(
                &app,
                method.clone(),
                &path,
                &[("origin", "http://127.0.0.1")],
            );
            assert_eq!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert!(reply.body.contains("read-only"), "{method} {path}");
        }
    }
    let after = (
        f.ledger.runs(RunFilter::default()).unwrap(),
        f.ledger.locks().unwrap(),
        f.ledger.events_cursor().unwrap(),
    );
    assert_eq!(before, after);
    assert!(!run.is_cancel_requested().unwrap());
    guard.release().unwrap();
    run.succeed().unwrap();
}

fn a_token_is_asked_of_every_request_when_set(store: Store) {
    let f = Fixture::new(store);
    f.ledger
        .begin_run(RunSpec::new("r"))
        .unwrap()
        .succeed()
        .unwrap();
    let app = Dashboard::new(f.ledger.clone()).token("s3cret").router();
    for path in [
        "/",
        "/runs",
        "/api/runs",
        "/metrics",
        "/api/events",
        "/assets/live.js",
    ] {
        let reply = get(&app, path);
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(
            !reply.body.contains("\"name\""),
            "{path} leaked: {}",
            reply.body
        );
        let wrong = send(
            &app,
            Method::GET,
            path,
            &[("authorization", "Bearer s3cre")],
        );
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let bearer = [("authorization", "Bearer s3cret")];
    assert_eq!(
        send(&app, Method::GET, "/api/runs", &bearer).status,
        StatusCode::OK
    );
    assert_eq!(
        send(&app, Method::GET, "/metrics", &bearer).status,
        StatusCode::OK
    );
    // A token does not make writes possible.
    assert_eq!(
        send(&app, Method::POST, "/api/runs", &bearer).status,
        StatusCode::METHOD_NOT_ALLOWED
    );

    // A browser: ?token= once sets a cookie and leaves the address.
    let reply = get(&app, "/runs?status=succeeded&token=s3cret");
    assert!(reply.status.is_redirection(), "{}", reply.status);
    assert_eq!(reply.header(header::LOCATION), "/runs?status=succeeded");
    let cookie = reply.header(header::SET_COOKIE).to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("s3cret"),
        "the cookie holds the token in clear: {cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let page = send(
        &app,
        Method::GET,
        "/runs?status=succeeded",
        &[("cookie", pair)],
    );
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains(">r</a>"), "{}", page.body);
    let wrong = get(&app, "/runs?token=nope");
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.headers.get(header::SET_COOKIE).is_none());
}

fn links_follow_the_prefix_the_router_is_nested_under(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("nested")).unwrap();
    let app = axum::Router::new().nest("/ops/ledger", runledger::web::router(f.ledger.clone()));
    for path in ["/ops/ledger", &format!("/ops/ledger/runs/{}", run.id())] {
        let body = ok(&app, path).body;
        assert!(
            body.contains(r#"href="/ops/ledger/runs""#),
            "{path}: {body}"
        );
        assert!(
            body.contains(r#"href="/ops/ledger/assets/style.css""#),
            "{path}"
        );
        assert!(body.contains(r#"data-base="/ops/ledger""#), "{path}");
    }
    let overview = ok(&app, "/ops/ledger").body;
    let link = format!(r#"href="/ops/ledger/runs/{}""#, run.id());
    assert!(overview.contains(&link), "{overview}");
    assert!(
        ok(&app, "/ops/ledger/assets/live.js")
            .body
            .contains("EventSource")
    );
    assert_eq!(
        ids(&ok(&app, "/ops/ledger/api/runs").json()),
        [i64::from(run.id())]
    );
    run.succeed().unwrap();
}

fn a_queued_runs_page_names_its_holder(store: Store) {
    let f = Fixture::new(store);
    let holder = f.ledger.begin_run(RunSpec::new("holder-run")).unwrap();
    let guard = holder.lock("deploy").unwrap();
    let other = f.builder().open().unwrap();
    let waiter = other
        .begin_run(RunSpec::new("waiting-run").queued())
        .unwrap();
    let waiter_id = waiter.id();
    let thread = std::thread::spawn(move || {
        let g = waiter
            .acquire(LockRequest::new(["deploy"]).wait(Duration::from_secs(60)))
            .unwrap();
        g.release().unwrap();
        waiter.succeed().unwrap();
    });
    wait_for_waiters(&f.ledger, 1);
    f.clock.advance(Duration::from_secs(125));
    let app = runledger::web::router(f.ledger.clone());
    let page = ok(&app, &format!("/runs/{waiter_id}")).body;
    assert!(page.contains("Why it waits"), "{page}");
    let holder_line = page
        .split("<li class=\"holder\">")
        .nth(1)
        .expect("a holder line")
        .split("</li>")
        .next()
        .unwrap();
    assert!(
        holder_line.contains(&format!(
            r#"href="/runs/{}">run {}</a> (holder-run)"#,
            holder.id(),
            holder.id()
        )),
        "{holder_line}"
    );
    assert!(
        holder_line.contains(&format!("pid {}", std::process::id())),
        "{holder_line}"
    );
    assert!(holder_line.contains("for 2m5s"), "{holder_line}");
    assert!(holder_line.contains("alive"), "{holder_line}");
    // The runs list says it too.
    let list = ok(&app, "/runs").body;
    assert!(
        list.contains(&format!("waits for deploy, held by run {}", holder.id())),
        "{list}"
    );
    guard.release().unwrap();
    thread.join().unwrap();
    holder.succeed().unwrap();
}

fn the_runs_page_filters_and_pages(store: Store) {
    let f = Fixture::new(store);
    let all: Vec<i64> = common::seed_nine_runs(&f)
        .into_iter()
        .map(i64::from)
        .collect();
    let app = runledger::web::router(f.ledger.clone());
    let page = ok(&app, "/runs?status=failed&limit=2").body;
    let shown = |page: &str| -> Vec<i64> {
        page.split("<tr><td><a href=\"/runs/")
            .skip(1)
            .map(|s| s.split('"').next().unwrap().parse().unwrap())
            .collect()
    };
    assert_eq!(shown(&page), [all[7], all[4]]);
    let next = page
        .split("rel=\"next\" href=\"")
        .nth(1)
        .expect("an older page")
        .split('"')
        .next()
        .unwrap()
        .replace("&amp;", "&");
    assert_eq!(
        next,
        format!("/runs?status=failed&before={}&limit=2", all[4])
    );
    let older = ok(&app, &next).body;
    assert_eq!(shown(&older), [all[1]]);
    assert!(
        !older.contains("rel=\"next\""),
        "a last page links no further"
    );
    assert_eq!(
        get(&app, "/runs?since=later").status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(get(&app, "/runs/424242").status, StatusCode::NOT_FOUND);
}

/// Reads the event stream's frames until `until` holds of the text so far.
async fn read_stream(body: &mut axum::body::Body, until: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !until(&text) {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("the stream stalled; so far:\n{text}"))
            .expect("the stream ended")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    text
}

fn the_event_stream_follows_the_feed_and_resumes_from_last_event_id(store: Store) {
    let f = Fixture::new(store);
    let first = f.ledger.begin_run(RunSpec::new("first")).unwrap();
    first.succeed().unwrap();
    let app = runledger::web::router(f.ledger.clone());
    let ledger = f.ledger.clone();
    let builder = f.builder();
    let f_builder_again = f.builder();
    runtime().block_on(async move {
        let open = |last: Option<String>| {
            let mut request = Request::builder().uri("/api/events");
            if let Some(last) = last {
                request = request.header("last-event-id", last);
            }
            app.clone().oneshot(request.body(Body::empty()).unwrap())
        };
        // From the start: the history, each event with its id.
        let response = open(Some("0".to_owned())).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut body = response.into_body();
        let history = ledger
            .events_since(runledger::EventCursor::START, 100)
            .unwrap();
        let last = history.events.last().unwrap().id;
        let text = read_stream(&mut body, |t| t.contains(&format!("id: {last}\n"))).await;
        let first_event: Value =
            serde_json::from_str(text.split("data: ").nth(1).unwrap().lines().next().unwrap())
                .unwrap();
        assert_eq!(first_event, json(&history.events[0]));

        // A run another process begins arrives without asking again.
        let other = tokio::task::spawn_blocking(move || {
            let ledger = builder.open().unwrap();
            let run = ledger.begin_run(RunSpec::new("from-elsewhere")).unwrap();
            let id = run.id();
            std::mem::forget(run);
            std::mem::forget(ledger);
            id
        })
        .await
        .unwrap();
        let text = read_stream(&mut body, |t| t.contains(&format!("\"run\":{other}"))).await;
        assert!(text.contains("\"kind\":\"status\""), "{text}");
        // So does a lock another process takes: the locks views are live.
        let locker = f_builder_again;
        tokio::task::spawn_blocking(move || {
            let ledger = locker.open().unwrap();
            std::mem::forget(ledger.try_lock("live-key").unwrap());
            std::mem::forget(ledger);
        })
        .await
        .unwrap();
        let text = read_stream(&mut body, |t| t.contains("\"keys\":[\"live-key\"]")).await;
        assert!(text.contains("\"kind\":\"lock_granted\""), "{text}");
        drop(body);

        // A reconnect with Last-Event-ID gets what came after it, only.
        let response = open(Some(last.to_string())).await.unwrap();
        let mut body = response.into_body();
        let text = read_stream(&mut body, |t| t.contains("data: ")).await;
        let ids: Vec<i64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .map(|id| id.parse().unwrap())
            .collect();
        assert!(
            ids.iter().all(|id| *id > i64::from(last)),
            "{ids:?} after {last}"
        );
        assert!(text.contains(&format!("\"run\":{other}")), "{text}");

        let bad = open(Some("yesterday".to_owned())).await.unwrap();
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    });
}

/// Sends a form, as a browser's POST, from `remote`.
fn post_form(app: &axum::Router, path: &str, headers: &[(&str, &str)], form: &str) -> Reply {
    runtime().block_on(async {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(Body::from(form.to_owned())).unwrap();
        let remote: std::net::SocketAddr = "10.1.2.3:50000".parse().unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(remote));
        let response = app.clone().oneshot(request).await.unwrap();
        read_reply(response).await
    })
}

/// The session cookie a `?token=` visit sets, as a `Cookie` header's pair.
fn session_cookie(app: &axum::Router, token: &str) -> String {
    let reply = get(app, &format!("/?token={token}"));
    let cookie = reply.header(header::SET_COOKIE);
    cookie.split(';').next().unwrap().to_owned()
}

/// The CSRF token in a page's forms.
fn csrf_in(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no form on the page: {page}"));
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

/// A refused request: its headers and form, the status and what it says.
type Refused<'a> = (Vec<(&'a str, &'a str)>, String, StatusCode, &'static str);

/// What a same-origin browser request carries.
const SAME_ORIGIN: [(&str, &str); 3] = [
    ("host", "127.0.0.1:8080"),
    ("origin", "http://127.0.0.1:8080"),
    ("sec-fetch-site", "same-origin"),
];

fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    SAME_ORIGIN
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

/// Actions allowed but no token set: every action is refused, saying why,
/// and the pages say so instead of showing the buttons.
fn actions_without_a_token_are_refused_saying_why(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("long")).unwrap();
    let app = Dashboard::new(f.ledger.clone())
        .allow_actions(true)
        .router();
    let page = ok(&app, &format!("/runs/{}", run.id()));
    assert!(page.body.contains("has no token"), "{}", page.body);
    assert!(!page.body.contains("name=\"csrf\""));
    let reply = post_form(
        &app,
        &format!("/runs/{}/cancel", run.id()),
        &with(&[]),
        "csrf=x",
    );
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(
        reply.body.contains("no token") && reply.body.contains("--token"),
        "{}",
        reply.body
    );
    assert!(!run.is_cancel_requested().unwrap());
    run.succeed().unwrap();
}

/// Each rule refuses on its own: the token, the origin, the session
/// cookie, the CSRF token bound to it (a token of another dashboard does
/// not do); then the cancel is made and recorded with who asked.
fn a_cancel_needs_the_token_the_same_origin_and_the_sessions_csrf_token(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("long")).unwrap();
    let dashboard = Dashboard::new(f.ledger.clone())
        .token("s3cret")
        .allow_actions(true);
    let app = dashboard.clone().router();
    let other_app = dashboard.router();
    let cookie = session_cookie(&app, "s3cret");
    let page_path = format!("/runs/{}", run.id());
    let page = send(&app, Method::GET, &page_path, &[("cookie", &cookie)]);
    let csrf = csrf_in(&page.body);
    let other_csrf =
        csrf_in(&send(&other_app, Method::GET, &page_path, &[("cookie", &cookie)]).body);
    assert_ne!(csrf, other_csrf, "each dashboard has its own key");
    let path = format!("/runs/{}/cancel", run.id());
    let form = format!("csrf={csrf}&name=alice");
    let refusals: [Refused; 7] = [
        (
            with(&[]),
            form.clone(),
            StatusCode::UNAUTHORIZED,
            "needs its token",
        ),
        (
            with(&[("authorization", "Bearer s3cret")]),
            form.clone(),
            StatusCode::FORBIDDEN,
            "session cookie",
        ),
        (
            with(&[("cookie", &cookie)]),
            "csrf=0000&name=alice".to_owned(),
            StatusCode::FORBIDDEN,
            "CSRF",
        ),
        (
            with(&[("cookie", &cookie)]),
            format!("csrf={other_csrf}"),
            StatusCode::FORBIDDEN,
            "CSRF",
        ),
        (
            vec![
                ("cookie", &cookie),
                ("host", "127.0.0.1:8080"),
                ("sec-fetch-site", "cross-site"),
            ],
            form.clone(),
            StatusCode::FORBIDDEN,
            "cross-site",
        ),
        (
            vec![
                ("cookie", &cookie),
                ("host", "127.0.0.1:8080"),
                ("origin", "http://evil.example"),
            ],
            form.clone(),
            StatusCode::FORBIDDEN,
            "cross-site",
        ),
        (
            // What a sandboxed frame or a page under `no-referrer` sends.
            vec![
                ("cookie", &cookie),
                ("host", "127.0.0.1:8080"),
                ("origin", "null"),
            ],
            form.clone(),
            StatusCode::FORBIDDEN,
            "cross-site",
        ),
    ];
    for (headers, body, status, says) in &refusals {
        let reply = post_form(&app, &path, headers, body);
        assert_eq!(reply.status, *status, "{headers:?} {body}: {}", reply.body);
        assert!(reply.body.contains(says), "{headers:?}: {}", reply.body);
        assert!(!run.is_cancel_requested().unwrap(), "{headers:?}");
    }
    let reply = post_form(&app, &path, &with(&[("cookie", &cookie)]), &form);
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(reply.header(header::LOCATION), page_path);
    assert!(run.is_cancel_requested().unwrap());
    let asked = f.ledger.events(run.id()).unwrap().pop().unwrap();
    assert_eq!(asked.kind, runledger::EventKind::CancelRequested);
    assert_eq!(
        asked.message.as_deref(),
        Some("by alice on the dashboard from 10.1.2.3")
    );
    // The run's page shows who asked.
    let page = send(&app, Method::GET, &page_path, &[("cookie", &cookie)]);
    assert!(
        page.body
            .contains("by alice on the dashboard from 10.1.2.3"),
        "{}",
        page.body
    );
    run.cancelled().unwrap();
}

/// A forced release from the locks page needs a reason, and is recorded in
/// the lock's history with why and who.
fn a_forced_unlock_from_the_locks_page_is_recorded_with_why_and_who(store: Store) {
    let f = Fixture::new(store);
    let guard = f.ledger.try_lock("wedged:key").unwrap();
    let app = Dashboard::new(f.ledger.clone())
        .token("s3cret")
        .allow_actions(true)
        .router();
    let cookie = session_cookie(&app, "s3cret");
    let page = send(&app, Method::GET, "/locks", &[("cookie", &cookie)]);
    assert!(
        page.body.contains("name=\"key\" value=\"wedged:key\""),
        "{}",
        page.body
    );
    let csrf = csrf_in(&page.body);
    let headers = with(&[("cookie", &cookie)]);
    let reply = post_form(
        &app,
        "/locks/unlock",
        &headers,
        &format!("csrf={csrf}&key=wedged%3Akey"),
    );
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body.contains("must say why"), "{}", reply.body);
    assert!(guard.is_held().unwrap());
    let cursor = f.ledger.events_cursor().unwrap();
    let reply = post_form(
        &app,
        "/locks/unlock",
        &headers,
        &format!("csrf={csrf}&key=wedged%3Akey&reason=holder+hung"),
    );
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(reply.header(header::LOCATION), "/locks");
    assert!(!guard.is_held().unwrap());
    let events = f.ledger.events_since(cursor, 10).unwrap().events;
    let forced = events
        .iter()
        .find(|e| matches!(e.kind, runledger::EventKind::LockForceReleased(_)))
        .expect("a forced release event");
    let why = forced.message.as_deref().unwrap();
    assert!(
        why.contains("holder hung (by the dashboard from 10.1.2.3)"),
        "{why}"
    );
}

/// Without actions allowed, no page offers a form.
fn pages_offer_no_action_unless_allowed(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("long")).unwrap();
    let _guard = run.lock("k").unwrap();
    let app = Dashboard::new(f.ledger.clone()).token("s3cret").router();
    let cookie = session_cookie(&app, "s3cret");
    for path in [format!("/runs/{}", run.id()), "/locks".to_owned()] {
        let page = send(&app, Method::GET, &path, &[("cookie", &cookie)]);
        assert_eq!(page.status, StatusCode::OK);
        assert!(!page.body.contains("<form"), "{path}: {}", page.body);
    }
}

/// The locks page shows each key's history: grants, releases and forced
/// releases with their tokens and why, for keys held now and keys free.
fn the_locks_page_shows_each_keys_history_with_tokens(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("holder")).unwrap();
    let held = run.lock("held:key").unwrap();
    let free = f.ledger.try_lock("free:key").unwrap();
    let free_token = free.token();
    free.release().unwrap();
    let gone = f.ledger.try_lock("forced:key").unwrap();
    f.ledger
        .force_unlock("forced:key", "<b>wedged</b>")
        .unwrap();
    let app = runledger::web::router(f.ledger.clone());
    let page = ok(&app, "/locks").body;
    let history = &page[page.find("<h2>History</h2>").expect("a history section")..];
    for key in ["held:key", "free:key", "forced:key"] {
        assert!(
            history.contains(&format!("<code>{key}</code>")),
            "{key}: {history}"
        );
    }
    assert!(history.contains("released by force"), "{history}");
    assert!(
        history.contains("&lt;b&gt;wedged&lt;/b&gt;"),
        "escaped: {history}"
    );
    assert!(
        history.contains(&format!("<td>{free_token}</td>")),
        "{history}"
    );
    assert!(
        history.contains(&format!("/runs/{}", run.id())),
        "{history}"
    );
    // Held keys come first.
    assert!(history.find("held:key").unwrap() < history.find("free:key").unwrap());
    assert!(gone.release().unwrap_err().is_lock_lost());
    held.release().unwrap();
    run.succeed().unwrap();
}

fn a_run_page_tails_logs_only_from_the_log_folder(store: Store) {
    let f = Fixture::new(store);
    let logs = f.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let inside = logs.join("build.log");
    std::fs::write(&inside, "line one\nthe build went well\n").unwrap();
    let secret = f.dir.path().join("secret.txt");
    std::fs::write(&secret, "s3cret-outside-the-folder\n").unwrap();
    let link = logs.join("escape.log");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let dotdot = logs.join("..").join("secret.txt");
    let mut ids = Vec::new();
    for path in [
        &inside,
        std::path::Path::new("/etc/passwd"),
        &secret,
        &link,
        &dotdot,
    ] {
        let run = f
            .ledger
            .begin_run(RunSpec::new("logged").log_path(path))
            .unwrap();
        ids.push(run.id());
        run.succeed().unwrap();
    }
    let app = Dashboard::new(f.ledger.clone()).log_dir(&logs).router();
    let page = ok(&app, &format!("/runs/{}", ids[0])).body;
    assert!(page.contains("the build went well"), "{page}");
    for id in &ids[1..] {
        let page = ok(&app, &format!("/runs/{id}")).body;
        assert!(!page.contains("root:"), "{page}");
        assert!(!page.contains("s3cret-outside"), "{page}");
        assert!(
            page.contains("outside the ledger&#39;s log folder")
                || page.contains("outside the ledger's log folder"),
            "{page}"
        );
    }
    // With no log folder (the default on PostgreSQL) no log is tailed.
    let app = runledger::web::router(f.ledger.clone());
    let page = ok(&app, &format!("/runs/{}", ids[1])).body;
    assert!(!page.contains("root:"), "{page}");
    if store == Store::Postgres {
        let page = ok(&app, &format!("/runs/{}", ids[0])).body;
        assert!(!page.contains("the build went well"), "{page}");
    }
}

/// `/api/runs/{id}/log`, which the run page's script polls: what was
/// appended after an offset, the end again when the file was cut, and
/// never a file outside the log folder.
fn the_log_api_returns_what_was_appended_after_an_offset(store: Store) {
    let f = Fixture::new(store);
    let logs = f.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let path = logs.join("live.log");
    std::fs::write(&path, "one\n<b>two</b>\n").unwrap();
    let run = f
        .ledger
        .begin_run(RunSpec::new("tailed").log_path(&path))
        .unwrap();
    let id = run.id();
    let app = Dashboard::new(f.ledger.clone()).log_dir(&logs).router();
    let log = |query: &str| ok(&app, &format!("/api/runs/{id}/log{query}")).json();

    // The page carries where its text ends, for the script to read on.
    let page = ok(&app, &format!("/runs/{id}")).body;
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(
        page.contains(&format!("data-log-offset=\"{len}\"")),
        "{page}"
    );
    assert!(page.contains("data-log-active"), "{page}");
    assert!(
        page.contains(&format!("data-log-url=\"/api/runs/{id}/log\"")),
        "{page}"
    );
    assert!(page.contains("&lt;b&gt;two&lt;/b&gt;"), "{page}");
    assert!(!page.contains("<b>two"), "{page}");

    // Without `from`: the end the page shows.
    let tail = log("");
    assert_eq!(tail["text"], "one\n<b>two</b>\n");
    assert_eq!(
        (tail["from"].as_u64(), tail["offset"].as_u64()),
        (Some(0), Some(len))
    );
    assert_eq!(tail["active"], true);
    assert_eq!(log(&format!("?from={len}"))["text"], "");

    // What is appended, from the offset, exactly once.
    let appended = "three & <script>alert(1)</script>\n";
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(appended.as_bytes())
        .unwrap();
    let reply = get(&app, &format!("/api/runs/{id}/log?from={len}"));
    assert_eq!(reply.header(header::CONTENT_TYPE), "application/json");
    assert_eq!(reply.header(header::X_CONTENT_TYPE_OPTIONS), "nosniff");
    assert!(
        reply
            .header(header::CONTENT_SECURITY_POLICY)
            .contains("default-src 'none'")
    );
    let next = reply.json();
    assert_eq!(next["text"], appended);
    assert_eq!(next["from"].as_u64(), Some(len));
    let end = len + appended.len() as u64;
    assert_eq!(next["offset"].as_u64(), Some(end));
    assert_eq!(
        (&next["more"], &next["reset"]),
        (&Value::Bool(false), &Value::Bool(false))
    );
    assert_eq!(log(&format!("?from={}", len + 4))["text"], &appended[4..]);

    // A long log comes a bounded chunk at a time, in whole lines.
    let line = "z".repeat(1023) + "\n";
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(line.repeat(100).as_bytes())
        .unwrap();
    let big = log(&format!("?from={end}"));
    assert_eq!(big["more"], true);
    let text = big["text"].as_str().unwrap();
    assert!(
        text.len() <= 64 * 1024 && text.ends_with('\n'),
        "{}",
        text.len()
    );
    let rest = log(&format!("?from={}", big["offset"]));
    assert_eq!(rest["more"], false);
    assert_eq!(
        format!("{text}{}", rest["text"].as_str().unwrap()),
        line.repeat(100)
    );

    // Truncated (a log rotated in place): the offset is past the end, and
    // the reply starts again from the file's end.
    std::fs::write(&path, "after rotation\n").unwrap();
    let reset = log(&format!("?from={end}"));
    assert_eq!(reset["reset"], true);
    assert_eq!(reset["text"], "after rotation\n");
    assert_eq!(
        (reset["from"].as_u64(), reset["offset"].as_u64()),
        (Some(0), Some(15))
    );

    // Bad offsets, unknown runs, runs without a log.
    for bad in ["?from=-1", "?from=abc"] {
        let reply = get(&app, &format!("/api/runs/{id}/log{bad}"));
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            reply.body
        );
    }
    let reply = get(&app, "/api/runs/999999/log?from=0");
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    assert!(reply.json()["error"].is_string());
    let bare = f.ledger.begin_run(RunSpec::new("no-log")).unwrap();
    let reply = get(&app, &format!("/api/runs/{}/log", bare.id()));
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    assert!(reply.body.contains("has no log"), "{}", reply.body);
    bare.succeed().unwrap();

    // Never a file outside the folder: absolute, beside it, a symlink out
    // of it, a `..`.
    let secret = f.dir.path().join("secret.txt");
    std::fs::write(&secret, "s3cret-outside-the-folder\n").unwrap();
    let link = logs.join("escape.log");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    for outside in [
        std::path::Path::new("/etc/passwd").to_path_buf(),
        secret.clone(),
        link,
        logs.join("..").join("secret.txt"),
    ] {
        let other = f
            .ledger
            .begin_run(RunSpec::new("outside").log_path(&outside))
            .unwrap();
        for query in ["", "?from=0"] {
            let reply = get(&app, &format!("/api/runs/{}/log{query}", other.id()));
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "{outside:?}: {}",
                reply.body
            );
            assert!(!reply.body.contains("s3cret") && !reply.body.contains("root:"));
            assert!(
                reply.body.contains("outside the ledger's log folder"),
                "{}",
                reply.body
            );
        }
        let page = ok(&app, &format!("/runs/{}", other.id())).body;
        assert!(!page.contains("data-log-url"), "{page}");
        other.succeed().unwrap();
    }
    // Without a log folder, nothing is served.
    let bare_app = Dashboard::new(f.ledger.clone())
        .log_dir(f.dir.path().join("no-such-folder"))
        .router();
    let reply = get(&bare_app, &format!("/api/runs/{id}/log"));
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);

    // Read-only and behind the token, as every route.
    let reply = send(&app, Method::POST, &format!("/api/runs/{id}/log"), &[]);
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    let guarded = Dashboard::new(f.ledger.clone())
        .log_dir(&logs)
        .token("tok")
        .router();
    let path_ = format!("/api/runs/{id}/log?from=0");
    assert_eq!(get(&guarded, &path_).status, StatusCode::UNAUTHORIZED);
    let reply = send(
        &guarded,
        Method::GET,
        &path_,
        &[("authorization", "Bearer tok")],
    );
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);

    // Once the run has ended, the reply says so: the script stops.
    run.succeed().unwrap();
    assert_eq!(log("?from=0")["active"], false);
    let page = ok(&app, &format!("/runs/{id}")).body;
    assert!(!page.contains("data-log-active"), "{page}");
}

on_both_stores!(
    the_runs_api_mirrors_the_cli_and_filters_and_pages,
    one_run_locks_and_instances_as_json,
    metrics_count_runs_locks_waiters_instances_and_reaped_runs,
    every_value_is_escaped_and_every_page_has_a_strict_policy,
    no_request_changes_the_ledger,
    a_token_is_asked_of_every_request_when_set,
    links_follow_the_prefix_the_router_is_nested_under,
    a_queued_runs_page_names_its_holder,
    the_runs_page_filters_and_pages,
    the_event_stream_follows_the_feed_and_resumes_from_last_event_id,
    actions_without_a_token_are_refused_saying_why,
    a_cancel_needs_the_token_the_same_origin_and_the_sessions_csrf_token,
    a_forced_unlock_from_the_locks_page_is_recorded_with_why_and_who,
    pages_offer_no_action_unless_allowed,
    the_locks_page_shows_each_keys_history_with_tokens,
    a_run_page_tails_logs_only_from_the_log_folder,
    the_log_api_returns_what_was_appended_after_an_offset,
);

/// `runledger serve` as a user starts it.
#[cfg(feature = "cli")]
mod serve {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::process::{Command, Stdio};

    fn runledger() -> Command {
        Command::new(env!("CARGO_BIN_EXE_runledger"))
    }

    #[test]
    fn an_address_off_loopback_without_a_token_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.db");
        runledger::Ledger::open(&db).unwrap();
        for listen in ["0.0.0.0:0", "[::]:0"] {
            let out = runledger()
                .args(["serve", "--listen", listen])
                .env("RUNLEDGER_DB", &db)
                .env_remove("RUNLEDGER_TOKEN")
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{listen}: {out:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("without a token"), "{stderr}");
            assert!(stderr.contains("--token"), "{stderr}");
        }
    }

    #[test]
    fn actions_without_a_token_are_refused_at_start_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.db");
        runledger::Ledger::open(&db).unwrap();
        let out = runledger()
            .args(["serve", "--listen", "127.0.0.1:0", "--allow-actions"])
            .env("RUNLEDGER_DB", &db)
            .env_remove("RUNLEDGER_TOKEN")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--allow-actions without --token") && stderr.contains("cancel runs"),
            "{stderr}"
        );
    }

    /// Served without a token, on loopback: a request addressed to another
    /// name (a page of another site whose name was made to resolve to
    /// 127.0.0.1, DNS rebinding) is refused, saying why; one addressed to
    /// a loopback name is served. With a token, the token decides.
    #[test]
    fn without_a_token_serve_answers_only_loopback_names() {
        let dir = tempfile::tempdir().unwrap();
        let db = with_a_run(&dir);
        let (mut child, addr) = start(&db, &[]);
        let port = addr.rsplit_once(':').unwrap().1.to_owned();
        for host in [addr.clone(), format!("localhost:{port}")] {
            let reply = request(&addr, &host, "");
            assert!(reply.starts_with("HTTP/1.1 200"), "{host}: {reply}");
            assert!(reply.contains("\"name\":\"served\""), "{reply}");
        }
        for host in [format!("attacker.example:{port}"), "rebind.example".into()] {
            let reply = request(&addr, &host, "");
            assert!(reply.starts_with("HTTP/1.1 403"), "{host}: {reply}");
            assert!(!reply.contains("served"), "{reply}");
            assert!(reply.contains("loopback name"), "{reply}");
        }
        stop(&mut child);

        let (mut child, addr) = start(&db, &["--token", "tok"]);
        let reply = request(&addr, "dash.example.com", "Authorization: Bearer tok\r\n");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        stop(&mut child);
    }

    /// A `runledger serve` process, killed if a failed assertion leaves it
    /// running (it would hold the test's output open).
    struct Served(std::process::Child);

    impl Drop for Served {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }

    /// A ledger in `dir` with one run, named `served`, ended.
    fn with_a_run(dir: &tempfile::TempDir) -> std::path::PathBuf {
        let db = dir.path().join("ledger.db");
        runledger::Ledger::open(&db)
            .unwrap()
            .begin_run(runledger::RunSpec::new("served"))
            .unwrap()
            .succeed()
            .unwrap();
        db
    }

    /// `runledger serve` on a free loopback port, with `args`; its address.
    fn start(db: &std::path::Path, args: &[&str]) -> (Served, String) {
        let mut child = runledger()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUNLEDGER_DB", db)
            .env_remove("RUNLEDGER_TOKEN")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        (Served(child), addr)
    }

    /// `GET /api/runs` sent to `addr`, addressed to `host`, with `headers`.
    fn request(addr: &str, host: &str, headers: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET /api/runs HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    }

    /// Stops it with SIGTERM, which it answers by exiting 0.
    fn stop(served: &mut Served) {
        let _ = Command::new("kill")
            .args(["-TERM", &served.0.id().to_string()])
            .status();
        let status = served.0.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{status:?}");
    }

    #[test]
    fn serve_answers_on_loopback_and_asks_for_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let db = with_a_run(&dir);
        let (mut child, addr) = start(&db, &["--token", "tok"]);
        let denied = request(&addr, &addr, "");
        assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
        let reply = request(&addr, &addr, "Authorization: Bearer tok\r\n");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("\"name\":\"served\""), "{reply}");
        stop(&mut child);
    }
}
