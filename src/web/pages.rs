//! The pages for people: HTML drawn on the server by maud templates, which
//! escape every value they are given, and the two embedded assets.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::{FromRequestParts, OriginalUri, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::actions::{Actions, NEEDS_SESSION, NEEDS_TOKEN};
use super::api::{MAX_LIMIT, RunsQuery};
use super::{AppState, base_of, blocking, status_of};
use crate::clock::Timestamp;
use crate::error::Error;
use crate::lock::{LockRecord, LockState, Seconds};
use crate::record::{EventKind, EventRecord, InstanceInfo, RunFilter, RunRecord, StepRecord};
use crate::run::{RunId, RunStatus};

const STYLE: &str = include_str!("assets/style.css");
const SCRIPT: &str = include_str!("assets/live.js");

/// How many of the newest runs the overview looks at for recent failures
/// and the timeline: a bounded read whatever the history's size.
const RECENT: usize = 500;

/// The span of the overview's timeline.
const TIMELINE: Duration = Duration::from_secs(6 * 3600);

/// The prefix the router is mounted under, for links ("" at the root).
pub(crate) struct Base(String);

impl<S: Send + Sync> FromRequestParts<S> for Base {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Base, Infallible> {
        let base = match parts.extensions.get::<OriginalUri>() {
            Some(original) => base_of(&original.0, &parts.uri),
            None => String::new(),
        };
        Ok(Base(base))
    }
}

impl Base {
    /// The address of a page of the dashboard: `path` is "" for the
    /// overview, else starts with '/'.
    pub(crate) fn at(&self, path: &str) -> String {
        if self.0.is_empty() && path.is_empty() {
            "/".to_owned()
        } else {
            format!("{}{path}", self.0)
        }
    }

    pub(crate) fn run(&self, id: RunId) -> String {
        self.at(&format!("/runs/{id}"))
    }
}

/// A page's response: the HTML, never cached (it is live data).
fn page(markup: Markup) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        markup.into_string(),
    )
        .into_response()
}

fn error_page(base: &Base, status: StatusCode, message: &str) -> Response {
    let mut response = page(layout(
        base,
        "Error",
        html! {
            h1 { (status.canonical_reason().unwrap_or("Error")) }
            p.error { (message) }
        },
    ));
    *response.status_mut() = status;
    response
}

fn ledger_error_page(base: &Base, e: &Error) -> Response {
    error_page(base, status_of(e), &e.to_string())
}

fn layout(base: &Base, title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · runledger" }
                link rel="stylesheet" href=(base.at("/assets/style.css"));
                script src=(base.at("/assets/live.js")) defer {}
            }
            body data-base=(base.0) {
                header {
                    strong { "runledger" }
                    nav {
                        a href=(base.at("")) { "Overview" }
                        a href=(base.at("/runs")) { "Runs" }
                        a href=(base.at("/locks")) { "Locks" }
                    }
                    span #live title="Live updates" {}
                }
                main { (content) }
            }
        }
    }
}

/// `/assets/style.css`.
pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `/assets/live.js`: follows `/api/events` and redraws the page's content.
pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// "3m10s ago", "just now", "in 5s" (a clock behind the writer's).
fn ago(now: Timestamp, then: Timestamp) -> String {
    if then > now {
        return format!("in {}", Seconds(then.saturating_duration_since(now)));
    }
    let d = now.saturating_duration_since(then);
    if d < Duration::from_secs(1) {
        "just now".to_owned()
    } else {
        format!("{} ago", Seconds(d))
    }
}

/// How long a run has taken (so far).
fn took(now: Timestamp, run: &RunRecord) -> String {
    let start = run.started_at.unwrap_or(run.created_at);
    Seconds(
        run.finished_at
            .unwrap_or(now)
            .saturating_duration_since(start),
    )
    .to_string()
}

fn status_badge(status: RunStatus) -> Markup {
    html! { span class={ "status status-" (status) } { (status) } }
}

fn progress(run: &RunRecord) -> Markup {
    let p = &run.progress;
    html! {
        @if p.total > 0 {
            progress value=(p.done()) max=(p.total) {}
            " " (p.done()) "/" (p.total)
            @if p.failed > 0 { " (" (p.failed) " failed)" }
            @if let Some(step) = &p.current { " · " span.step { (step) } }
        }
    }
}

/// Where a lock's owner is: "run 3 (build), pid 4121 on ci-3".
fn owner(base: &Base, lock: &LockRecord) -> Markup {
    html! {
        @if let Some(id) = lock.run {
            a href=(base.run(id)) { "run " (id) }
            @if let Some(name) = &lock.run_name { " (" (name) ")" }
            ", "
        }
        "pid " (lock.pid) " on " (lock.host)
    }
}

/// Whether a lock's owner is alive, from the open instances.
fn liveness(lock: &LockRecord, instances: &[InstanceInfo]) -> Markup {
    match instances.iter().find(|i| i.id == lock.instance) {
        Some(i) if i.alive => html! { span.alive { "alive" } },
        Some(i) => html! {
            span.stale title=(i.dead_reason.as_deref().unwrap_or_default()) {
                "stale: " (i.dead_reason.as_deref().unwrap_or("dead"))
            }
        },
        None => html! { span.stale { "gone (its instance is closed)" } },
    }
}

/// The locks of each key, in the ledger's order (by key, then queue).
fn by_key(locks: &[LockRecord]) -> BTreeMap<&str, Vec<&LockRecord>> {
    let mut keys: BTreeMap<&str, Vec<&LockRecord>> = BTreeMap::new();
    for lock in locks {
        keys.entry(lock.key.as_str()).or_default().push(lock);
    }
    for list in keys.values_mut() {
        list.sort_by_key(|l| (l.state == LockState::Waiting, l.ticket));
    }
    keys
}

/// A key's locks with each waiter's place in its queue (1 is next).
fn in_line<'a>(list: &[&'a LockRecord]) -> Vec<(&'a LockRecord, Option<usize>)> {
    let mut place = 0;
    list.iter()
        .map(|lock| {
            let waiting = lock.state == LockState::Waiting;
            place += usize::from(waiting);
            (*lock, waiting.then_some(place))
        })
        .collect()
}

fn mode(lock: &LockRecord) -> String {
    lock.mode.to_string()
}

/// Every key's holders and queue.
fn locks_table(
    base: &Base,
    now: Timestamp,
    locks: &[LockRecord],
    instances: &[InstanceInfo],
) -> Markup {
    let keys = by_key(locks);
    html! {
        @if keys.is_empty() {
            p.empty { "No lock is held or awaited." }
        } @else {
            table.locks {
                thead { tr { th { "Key" } th { "State" } th { "Mode" } th { "Token" } th { "Owner" } th { "Since" } th { "Owner alive?" } } }
                tbody {
                    @for (key, list) in &keys {
                        @for (i, (lock, place)) in in_line(list).into_iter().enumerate() {
                            tr class=(if place.is_some() { "waiting" } else { "held" }) {
                                td { @if i == 0 { code { (key) } } }
                                td {
                                    @if let Some(place) = place { "waiting, " (place) " in line" }
                                    @else { "held" }
                                }
                                td { (mode(lock)) }
                                td { @if let Some(t) = lock.token { (t) } @else { "–" } }
                                td { (owner(base, lock)) }
                                td { (ago(now, lock.granted_at.unwrap_or(lock.requested_at))) }
                                td { (liveness(lock, instances)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What a queued run waits for, for the runs tables.
fn waits_for(run: &RunRecord, locks: &[LockRecord]) -> String {
    if run.adopt_by.is_some() {
        return "waits to be adopted by a worker".to_owned();
    }
    let mut parts = Vec::new();
    for wait in locks
        .iter()
        .filter(|l| l.state == LockState::Waiting && l.run == Some(run.id))
    {
        let holders: Vec<String> = locks
            .iter()
            .filter(|l| l.state == LockState::Held && l.key == wait.key)
            .map(|l| match l.run {
                Some(id) => format!("run {id}"),
                None => format!("pid {} on {}", l.pid, l.host),
            })
            .collect();
        parts.push(if holders.is_empty() {
            format!("waits for {} behind earlier requests", wait.key)
        } else {
            format!("waits for {}, held by {}", wait.key, holders.join(", "))
        });
    }
    if parts.is_empty() {
        "not started yet".to_owned()
    } else {
        parts.join("; ")
    }
}

/// A short word on a run: why it ended, or what it is doing.
fn info(run: &RunRecord, locks: &[LockRecord]) -> String {
    if let Some(error) = &run.error {
        return error.clone();
    }
    if run.cancel_requested_at.is_some() && run.status.is_active() {
        return "cancel requested".to_owned();
    }
    if run.status == RunStatus::Queued {
        return waits_for(run, locks);
    }
    String::new()
}

fn runs_table(base: &Base, now: Timestamp, runs: &[RunRecord], locks: &[LockRecord]) -> Markup {
    html! {
        @if runs.is_empty() {
            p.empty { "No runs." }
        } @else {
            table.runs {
                thead { tr { th { "Id" } th { "Status" } th { "Name" } th { "Source" } th { "Owner" } th { "Started" } th { "Took" } th { "Progress" } th { "Info" } } }
                tbody {
                    @for run in runs {
                        tr {
                            td { a href=(base.run(run.id)) { (run.id) } }
                            td { (status_badge(run.status)) }
                            td { a href=(base.run(run.id)) { (run.name) } }
                            td { (run.source) }
                            td { "pid " (run.pid) " on " (run.host) }
                            td { (ago(now, run.started_at.unwrap_or(run.created_at))) }
                            td { (took(now, run)) }
                            td { (progress(run)) }
                            td.info { (info(run, locks)) }
                        }
                    }
                }
            }
        }
    }
}

struct Overview {
    now: Timestamp,
    active: Vec<RunRecord>,
    recent: Vec<RunRecord>,
    locks: Vec<LockRecord>,
    instances: Vec<InstanceInfo>,
}

/// `/`: what is going on now.
pub(crate) async fn overview(State(shared): AppState, base: Base) -> Response {
    let read = blocking(&shared, |l| {
        Ok(Overview {
            now: l.now(),
            active: l.runs(RunFilter::default().active().limit(MAX_LIMIT))?,
            recent: l.runs(RunFilter::default().limit(RECENT))?,
            locks: l.locks()?,
            instances: l.instances()?,
        })
    });
    let o = match read.await {
        Ok(o) => o,
        Err(e) => return ledger_error_page(&base, &e),
    };
    let failures: Vec<RunRecord> = o
        .recent
        .iter()
        .filter(|r| r.status == RunStatus::Failed || r.status == RunStatus::Partial)
        .take(10)
        .cloned()
        .collect();
    let held = o
        .locks
        .iter()
        .filter(|l| l.state == LockState::Held)
        .count();
    let waiting = o.locks.len() - held;
    let content = html! {
        h1 { "Overview" }
        section {
            h2 { "Active runs (" (o.active.len()) ")" }
            (runs_table(&base, o.now, &o.active, &o.locks))
        }
        section {
            h2 { "Locks (" (held) " held, " (waiting) " waiting)" }
            (locks_table(&base, o.now, &o.locks, &o.instances))
        }
        section {
            h2 { "Processes" }
            (instances_table(o.now, &o.instances))
        }
        section {
            h2 { "Recent failures" }
            p.note { "Among the newest " (RECENT) " runs." }
            (runs_table(&base, o.now, &failures, &o.locks))
        }
        section {
            h2 { "The last " (TIMELINE.as_secs() / 3600) " hours" }
            (timeline(&base, o.now, &o.recent))
        }
    };
    page(layout(&base, "Overview", content))
}

fn instances_table(now: Timestamp, instances: &[InstanceInfo]) -> Markup {
    html! {
        table.instances {
            thead { tr { th { "Instance" } th { "Process" } th { "Heartbeat" } th { "State" } } }
            tbody {
                @for i in instances {
                    tr {
                        td { (i.id) @if i.is_self { " (this dashboard)" } }
                        td { "pid " (i.pid) " on " (i.host) }
                        td { (ago(now, i.heartbeat_at)) }
                        td {
                            @if i.alive { span.alive { "alive" } }
                            @else { span.stale { "stale: " (i.dead_reason.as_deref().unwrap_or("dead")) } }
                        }
                    }
                }
            }
        }
    }
}

/// The runs of the last hours, one row per name, drawn as SVG.
fn timeline(base: &Base, now: Timestamp, recent: &[RunRecord]) -> Markup {
    const WIDTH: f64 = 960.0;
    const LABEL: f64 = 160.0;
    const ROW: f64 = 18.0;
    const MAX_ROWS: usize = 24;
    let start = now.saturating_sub(TIMELINE);
    let span = TIMELINE.as_millis() as f64;
    let mut rows: Vec<&str> = Vec::new();
    let mut bars = Vec::new();
    for run in recent {
        let begin = run.started_at.unwrap_or(run.created_at);
        let end = run.finished_at.unwrap_or(now);
        if end < start {
            continue;
        }
        let row = match rows.iter().position(|n| *n == run.name) {
            Some(row) => row,
            None if rows.len() < MAX_ROWS => {
                rows.push(&run.name);
                rows.len() - 1
            }
            None => continue,
        };
        let x = |t: Timestamp| {
            LABEL + (WIDTH - LABEL) * (t.as_millis() - start.as_millis()).max(0) as f64 / span
        };
        let (x0, x1) = (x(begin.max(start)), x(end));
        bars.push((row, x0, (x1 - x0).max(2.0), run));
    }
    if rows.is_empty() {
        return html! { p.empty { "No runs in that time." } };
    }
    let height = ROW * rows.len() as f64 + 20.0;
    html! {
        svg.timeline width=(WIDTH) height=(height) viewBox={ "0 0 " (WIDTH) " " (height) }
            role="img" aria-label="Runs of the last hours by name" {
            @for (i, name) in rows.iter().enumerate() {
                text x="0" y=(ROW * i as f64 + 13.0) { (name) }
            }
            @for h in 0..=6u32 {
                @let x = LABEL + (WIDTH - LABEL) * f64::from(h) / 6.0;
                line x1=(x) x2=(x) y1="0" y2=(height - 16.0) class="tick" {}
                text x=(x) y=(height - 4.0) class="tick-label"
                    text-anchor=(if h == 6 { "end" } else { "middle" }) {
                    @if h == 6 { "now" } @else { "-" (6 - h) "h" }
                }
            }
            @for (row, x, w, run) in &bars {
                a href=(base.run(run.id)) {
                    rect x=(x) y=(ROW * *row as f64 + 3.0) width=(w) height="12"
                        class={ "bar status-" (run.status) } {
                        title { "run " (run.id) " " (run.name) ": " (run.status) ", " (took(now, run)) }
                    }
                }
            }
        }
    }
}

/// `/runs`: newest first, filtered, a page at a time.
pub(crate) async fn runs(
    State(shared): AppState,
    base: Base,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    let query = match RunsQuery::parse(&pairs) {
        Ok(query) => query,
        Err(e) => return error_page(&base, StatusCode::BAD_REQUEST, &e),
    };
    let q = query.clone();
    let read = blocking(&shared, move |l| {
        let now = l.now();
        let runs = l.runs(q.filter(now))?;
        // What queued runs wait for: one look at the locks, only if needed.
        let locks = if runs.iter().any(|r| r.status == RunStatus::Queued) {
            l.locks()?
        } else {
            Vec::new()
        };
        Ok((now, runs, locks))
    });
    let (now, runs, locks) = match read.await {
        Ok(read) => read,
        Err(e) => return ledger_error_page(&base, &e),
    };
    let older = (runs.len() == query.limit)
        .then(|| runs.last().map(|r| r.id))
        .flatten()
        .map(|last| page_link(&base, &query, Some(last)));
    let content = html! {
        h1 { "Runs" }
        form.filters method="get" action=(base.at("/runs")) {
            label { "Status " select name="status" {
                option value="" { "any" }
                @for s in RunStatus::ALL {
                    option value=(s) selected[query.statuses.first() == Some(&s)] { (s) }
                }
            } }
            label { "Name " input type="text" name="name" value=(query.name.as_deref().unwrap_or_default()); }
            label { "Source " input type="text" name="source" value=(query.source.as_deref().unwrap_or_default()); }
            label { "Since " input type="text" name="since" placeholder="2h, 7d" value=(query.since.as_ref().map(|s| s.0.as_str()).unwrap_or_default()); }
            button type="submit" { "Filter" }
            " " a href=(base.at("/runs")) { "Clear" }
        }
        (runs_table(&base, now, &runs, &locks))
        nav.paging {
            @if query.before.is_some() { a href=(page_link(&base, &query, None)) { "← Newest" } " " }
            @if let Some(older) = older { a rel="next" href=(older) { "Older →" } }
        }
    };
    page(layout(&base, "Runs", content))
}

/// The address of `/runs` with `query`'s filters, before run `before`.
fn page_link(base: &Base, query: &RunsQuery, before: Option<RunId>) -> String {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    for s in &query.statuses {
        pairs.push(("status", s.to_string()));
    }
    if let Some(name) = &query.name {
        pairs.push(("name", name.clone()));
    }
    if let Some(source) = &query.source {
        pairs.push(("source", source.clone()));
    }
    if let Some((since, _)) = &query.since {
        pairs.push(("since", since.clone()));
    }
    if let Some(before) = before {
        pairs.push(("before", before.to_string()));
    }
    if query.limit != super::api::DEFAULT_LIMIT {
        pairs.push(("limit", query.limit.to_string()));
    }
    let query: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    let mut link = base.at("/runs");
    if !query.is_empty() {
        link.push('?');
        link.push_str(&query.join("&"));
    }
    link
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

struct RunPage {
    now: Timestamp,
    run: RunRecord,
    steps: Vec<StepRecord>,
    events: Vec<EventRecord>,
    locks: Vec<LockRecord>,
    instances: Vec<InstanceInfo>,
    log: Option<Result<super::log::Chunk, String>>,
}

/// The end of the log at `path`, if this host can read it and it lies
/// inside `dir`, the ledger's log folder.
fn log_tail(
    dir: Option<&std::path::Path>,
    path: &std::path::Path,
) -> Result<super::log::Chunk, String> {
    let mut file = super::log::open(dir, path).map_err(|e| e.to_string())?;
    super::log::tail(&mut file).map_err(|e| e.to_string())
}

/// `/runs/{id}`: everything about one run.
pub(crate) async fn run(
    State(shared): AppState,
    base: Base,
    actions: Actions,
    Path(id): Path<String>,
) -> Response {
    let id: RunId = match id.parse() {
        Ok(id) => id,
        Err(e) => {
            return error_page(&base, StatusCode::BAD_REQUEST, &Error::to_string(&e));
        }
    };
    let log_dir = shared.log_dir.clone();
    let read = blocking(&shared, move |l| {
        let run = l.run(id)?;
        let log = run
            .log_path
            .as_deref()
            .map(|path| log_tail(log_dir.as_deref(), path));
        Ok(RunPage {
            now: l.now(),
            steps: l.steps(id)?,
            events: l.events(id)?,
            locks: l.locks()?,
            instances: l.instances()?,
            run,
            log,
        })
    });
    let p = match read.await {
        Ok(p) => p,
        Err(e) => return ledger_error_page(&base, &e),
    };
    let run = &p.run;
    let now = p.now;
    let held: Vec<&LockRecord> = p
        .locks
        .iter()
        .filter(|l| l.run == Some(run.id) && l.state == LockState::Held)
        .collect();
    let waits: Vec<&LockRecord> = p
        .locks
        .iter()
        .filter(|l| l.run == Some(run.id) && l.state == LockState::Waiting)
        .collect();
    let owner_alive = p.instances.iter().find(|i| i.id == run.instance);
    let content = html! {
        h1 { "Run " (run.id) ": " span.name { (run.name) } " " (status_badge(run.status)) }
        @if run.status.is_active() {
            (action_form(&actions, &base.at(&format!("/runs/{}/cancel", run.id)), html! {}, "Cancel run"))
        }
        @if !waits.is_empty() {
            section.why {
                h2 { "Why it waits" }
                @for wait in &waits {
                    @let holders: Vec<&LockRecord> = p.locks.iter()
                        .filter(|l| l.key == wait.key && l.state == LockState::Held).collect();
                    @let ahead = p.locks.iter().filter(|l| l.key == wait.key
                        && l.state == LockState::Waiting && l.ticket < wait.ticket).count();
                    p {
                        "Waits for " code { (wait.key) } " (" (mode(wait)) ") since "
                        (ago(now, wait.requested_at)) ", " (ahead) " request(s) ahead of it."
                    }
                    @if holders.is_empty() {
                        p { "Nobody holds it now: it is next once the requests ahead are served." }
                    }
                    ul {
                        @for h in &holders {
                            li.holder {
                                "Held by " (owner(&base, h))
                                " for " (Seconds(now.saturating_duration_since(h.granted_at.unwrap_or(h.requested_at))))
                                @if let Some(t) = h.token { ", token " (t) }
                                " — " (liveness(h, &p.instances))
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Fields" }
            dl.fields {
                dt { "Status" } dd { (status_badge(run.status)) }
                dt { "Source" } dd { (run.source) }
                dt { "Owner" } dd {
                    @if let Some(by) = run.adopt_by {
                        "nobody yet: created by pid " (run.pid) " on " (run.host) ", to be adopted by " (by) " (" (ago(now, by)) ")"
                    } @else {
                        "pid " (run.pid) " on " (run.host) " (instance " (run.instance) "), "
                        @match owner_alive {
                            Some(i) if i.alive => span.alive { "alive" },
                            Some(i) => span.stale { "stale: " (i.dead_reason.as_deref().unwrap_or("dead")) },
                            None if run.status.is_active() => span.stale { "gone" },
                            None => "closed",
                        }
                    }
                }
                dt { "Created" } dd { (run.created_at) " (" (ago(now, run.created_at)) ")" }
                @if let Some(t) = run.started_at { dt { "Started" } dd { (t) " (" (ago(now, t)) ")" } }
                @if let Some(t) = run.finished_at { dt { "Finished" } dd { (t) " (took " (took(now, run)) ")" } }
                @else if run.status == RunStatus::Queued { dt { "Queued for" } dd { (took(now, run)) } }
                @else { dt { "Running for" } dd { (took(now, run)) } }
                @if let Some(t) = run.heartbeat_at { dt { "Heartbeat" } dd { (ago(now, t)) } }
                @if let Some(code) = run.exit_code { dt { "Exit code" } dd { (code) } }
                @if let Some(error) = &run.error { dt { "Error" } dd.error { (error) } }
                @if let Some(t) = run.cancel_requested_at { dt { "Cancel" } dd { "requested " (ago(now, t)) } }
                @if let Some(parent) = run.parent { dt { "Parent" } dd { a href=(base.run(parent)) { "run " (parent) } } }
                @if let Some(key) = &run.idempotency_key { dt { "Idempotency key" } dd { code { (key) } } }
                @if let Some(path) = &run.log_path { dt { "Log" } dd { code { (path.display()) } } }
                @if run.progress.total > 0 { dt { "Progress" } dd { (progress(run)) } }
            }
        }
        @if !run.metadata.is_null() {
            section {
                h2 { "Metadata" }
                pre.metadata { (serde_json::to_string_pretty(&run.metadata).unwrap_or_default()) }
            }
        }
        @if !p.steps.is_empty() {
            section {
                h2 { "Steps" }
                table.steps {
                    thead { tr { th { "Step" } th { "Status" } th { "Started" } th { "Took" } th { "Error" } } }
                    tbody {
                        @for step in &p.steps {
                            tr {
                                td { (step.name) }
                                td { span class={ "status step-" (step.status) } { (step.status) } }
                                td { (ago(now, step.started_at)) }
                                td { (Seconds(step.finished_at.unwrap_or(now).saturating_duration_since(step.started_at))) }
                                td.error { (step.error.as_deref().unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Locks" }
            @if held.is_empty() && waits.is_empty() {
                p.empty { "It holds no lock and waits for none." }
            } @else {
                table.locks {
                    thead { tr { th { "Key" } th { "State" } th { "Mode" } th { "Token" } th { "Since" } } }
                    tbody {
                        @for l in held.iter().chain(&waits) {
                            tr {
                                td { a href=(base.at("/locks")) { code { (l.key) } } }
                                td { @if l.state == LockState::Held { "held" } @else { "waiting" } }
                                td { (mode(l)) }
                                td { @if let Some(t) = l.token { (t) } @else { "–" } }
                                td { (ago(now, l.granted_at.unwrap_or(l.requested_at))) }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Events" }
            ol.events {
                @for event in &p.events {
                    li {
                        time datetime=(event.at) { (event.at) }
                        " " span.event { (event_text(event)) }
                        @if let Some(message) = &event.message { ": " span.message { (message) } }
                    }
                }
            }
        }
        @if let Some(log) = &p.log {
            section {
                h2 { "Log" }
                @match log {
                    // The script appends what is written after `offset`
                    // while the run is active.
                    Ok(tail) => pre.log data-log-url=(base.at(&format!("/api/runs/{}/log", run.id)))
                        data-log-offset=(tail.offset) data-log-active[run.status.is_active()] { (tail.text) },
                    Err(e) => p.note { "The log is not readable here: " (e) },
                }
            }
        }
    };
    page(layout(&base, &format!("Run {}", run.id), content))
}

/// One event in words, as `runledger show` words it.
fn event_text(event: &EventRecord) -> String {
    event.kind.to_string()
}

/// The form of an action, or why there is none: nothing when actions are
/// off.
fn action_form(actions: &Actions, to: &str, fields: Markup, button: &str) -> Markup {
    html! {
        @match actions {
            Actions::Off => {},
            Actions::NoToken => p.note.actions { (NEEDS_TOKEN) },
            Actions::NoSession => p.note.actions { (NEEDS_SESSION) },
            Actions::On(csrf) => form.action method="post" action=(to) {
                input type="hidden" name="csrf" value=(csrf);
                (fields)
                label { "Your name " input type="text" name="name" maxlength="100" placeholder="optional"; }
                " "
                button type="submit" { (button) }
            },
        }
    }
}

/// `/locks`: every key, its holders and its queue.
pub(crate) async fn locks(State(shared): AppState, base: Base, actions: Actions) -> Response {
    let read = blocking(&shared, |l| {
        let locks = l.locks()?;
        let history = key_histories(l, &locks)?;
        Ok((l.now(), locks, l.instances()?, history))
    });
    let (now, locks, instances, history) = match read.await {
        Ok(read) => read,
        Err(e) => return ledger_error_page(&base, &e),
    };
    let content = html! {
        h1 { "Locks" }
        (locks_table(&base, now, &locks, &instances))
        @let held: std::collections::BTreeSet<&str> = locks.iter()
            .filter(|l| l.state == LockState::Held).map(|l| l.key.as_str()).collect();
        @if !held.is_empty() && !matches!(actions, Actions::Off) {
            section.unlock {
                h2 { "Force unlock" }
                @match actions {
                    Actions::On(_) => {
                        @for key in &held {
                            (action_form(&actions, &base.at("/locks/unlock"), html! {
                                input type="hidden" name="key" value=(key);
                                code { (key) } " "
                                label { "Reason " input type="text" name="reason" required maxlength="500"; }
                                " "
                            }, "Force unlock"))
                        }
                    }
                    _ => (action_form(&actions, "", html! {}, "")),
                }
            }
        }
        section.history {
            h2 { "History" }
            @if history.is_empty() {
                p.empty { "No lock was granted yet, or its history was pruned." }
            }
            @for (key, events) in &history {
                h3 { code { (key) } }
                table.history {
                    thead { tr { th { "When" } th { "What" } th { "Token" } th { "Holder" } th { "Why, and by whom" } } }
                    tbody {
                        @for event in events {
                            @if let Some(lock) = event.kind.lock() {
                                tr class=(lock_event_class(&event.kind)) {
                                    td { time datetime=(event.at) title=(event.at) { (ago(now, event.at)) } }
                                    td { (lock_event_word(&event.kind)) @if lock.keys.len() > 1 { " (with " (lock.keys.len() - 1) " other key(s))" } }
                                    td { (lock.token) }
                                    td {
                                        @if let Some(id) = event.run { a href=(base.run(id)) { "run " (id) } ", " }
                                        "pid " (lock.pid) " on " (lock.host)
                                    }
                                    td { @if let Some(m) = &event.message { (m) } }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page(layout(&base, "Locks", content))
}

/// How many of the newest lock events the history reads, and how many it
/// shows per key.
const HISTORY_EVENTS: usize = 300;
const HISTORY_PER_KEY: usize = 10;
/// How many keys held or awaited now, quiet in the newest lock events, get
/// a read of their own history.
const HISTORY_KEYS: usize = 50;

/// Each key's recent lock events, newest first: the keys held or awaited
/// now first (each read on its own if it is not among the newest events),
/// then the others of the newest events, by their last event.
fn key_histories(
    ledger: &crate::Ledger,
    locks: &[LockRecord],
) -> crate::Result<Vec<(String, Vec<EventRecord>)>> {
    let mut order: Vec<String> = Vec::new();
    let mut events: BTreeMap<String, Vec<EventRecord>> = BTreeMap::new();
    for lock in locks {
        if !order.contains(&lock.key) {
            order.push(lock.key.clone());
        }
    }
    let current = order.len();
    for event in ledger.lock_history(None, HISTORY_EVENTS)? {
        let Some(lock) = event.kind.lock() else {
            continue;
        };
        for key in &lock.keys {
            if !order.contains(key) {
                order.push(key.clone());
            }
            let list = events.entry(key.clone()).or_default();
            if list.len() < HISTORY_PER_KEY {
                list.push(event.clone());
            }
        }
    }
    for key in order.iter().take(current.min(HISTORY_KEYS)) {
        if !events.contains_key(key) {
            events.insert(
                key.clone(),
                ledger.lock_history(Some(key), HISTORY_PER_KEY)?,
            );
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|key| {
            let list = events.remove(&key)?;
            (!list.is_empty()).then_some((key, list))
        })
        .collect())
}

fn lock_event_word(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::LockGranted(_) => "granted",
        EventKind::LockReleased(_) => "released",
        EventKind::LockReclaimed(_) => "reclaimed from a dead holder",
        EventKind::LockForceReleased(_) => "released by force",
        _ => "",
    }
}

fn lock_event_class(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::LockReclaimed(_) | EventKind::LockForceReleased(_) => "taken",
        _ => "",
    }
}
