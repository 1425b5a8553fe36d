//! The JSON API, the event stream and `/metrics`: what programs read.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::{AppState, Shared, blocking, status_of};
use crate::clock::Timestamp;
use crate::error::Error;
use crate::lock::{LockRecord, LockState};
use crate::record::RunFilter;
use crate::run::{RunId, RunStatus};
use crate::watch::EventCursor;

/// The most runs one page lists.
pub(crate) const MAX_LIMIT: usize = 500;

/// A page of runs when none is asked for.
pub(crate) const DEFAULT_LIMIT: usize = 50;

/// The filters of `/runs` and `/api/runs`, read from the query.
#[derive(Clone, Debug, Default)]
pub(crate) struct RunsQuery {
    pub statuses: Vec<RunStatus>,
    pub name: Option<String>,
    pub source: Option<String>,
    /// As given (`2h`), and as a duration.
    pub since: Option<(String, Duration)>,
    pub before: Option<RunId>,
    pub limit: usize,
}

impl RunsQuery {
    /// Reads the query's pairs; empty values (a form's blank fields) are
    /// left out.
    pub fn parse(pairs: &[(String, String)]) -> Result<RunsQuery, String> {
        let mut query = RunsQuery {
            limit: DEFAULT_LIMIT,
            ..RunsQuery::default()
        };
        for (name, value) in pairs {
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            match name.as_str() {
                "status" => query
                    .statuses
                    .push(value.parse().map_err(|e: Error| e.to_string())?),
                "name" => query.name = Some(value.to_owned()),
                "source" => query.source = Some(value.to_owned()),
                "since" => query.since = Some((value.to_owned(), parse_since(value)?)),
                "before" => {
                    query.before = Some(value.parse().map_err(|e: Error| e.to_string())?);
                }
                "limit" => {
                    query.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| format!("limit {value:?}: must be 1 to {MAX_LIMIT}"))?;
                }
                // Other parameters (the token) are not filters.
                _ => {}
            }
        }
        Ok(query)
    }

    /// The library's filter for this query at ledger time `now`.
    pub fn filter(&self, now: Timestamp) -> RunFilter {
        let mut filter = RunFilter::default()
            .statuses(self.statuses.iter().copied())
            .limit(self.limit);
        if let Some(name) = &self.name {
            filter = filter.name(name.clone());
        }
        if let Some(source) = &self.source {
            filter = filter.source(source.clone());
        }
        if let Some((_, since)) = self.since {
            filter = filter.since(now.saturating_sub(since));
        }
        if let Some(before) = self.before {
            filter = filter.before(before);
        }
        filter
    }
}

/// `90s`, `30m`, `2h`, `7d`, `1w`.
fn parse_since(text: &str) -> Result<Duration, String> {
    let bad = || format!("since {text:?}: try a duration such as 90s, 30m, 2h or 7d");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(number.saturating_mul(unit)))
}

/// An error as JSON: `{"error": "…"}`.
fn json_error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

fn ledger_error(e: &Error) -> Response {
    json_error(status_of(e), e)
}

/// `/api/runs`: the array of `runledger runs --json`.
pub(crate) async fn runs(
    State(shared): AppState,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    let query = match RunsQuery::parse(&pairs) {
        Ok(query) => query,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    match blocking(&shared, move |l| l.runs(query.filter(l.now()))).await {
        Ok(runs) => Json(runs).into_response(),
        Err(e) => ledger_error(&e),
    }
}

/// `/api/runs/{id}`: the object of `runledger show --json`.
pub(crate) async fn run(State(shared): AppState, Path(id): Path<String>) -> Response {
    let id: RunId = match id.parse() {
        Ok(id) => id,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let read = blocking(&shared, move |l| {
        let run = l.run(id)?;
        let steps = l.steps(id)?;
        let events = l.events(id)?;
        let locks: Vec<LockRecord> = l
            .locks()?
            .into_iter()
            .filter(|k| k.run == Some(id))
            .collect();
        Ok(serde_json::json!({
            "run": run, "steps": steps, "events": events, "locks": locks,
        }))
    });
    match read.await {
        Ok(value) => Json(value).into_response(),
        Err(e) => ledger_error(&e),
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct LogQuery {
    from: Option<String>,
}

/// `/api/runs/{id}/log`: what the run's log has after byte `?from=N` (at
/// most 64 KiB, whole lines when there is more), or its end without
/// `from`, as `{"run", "from", "offset", "text", "more", "reset",
/// "active"}`: read again from `offset`; `more` says there is more to read
/// at once, `reset` that `from` was past the end (the file was truncated or
/// replaced) so the text is the file's end instead, and `active` whether
/// the run is (its status read before the file, so once it is false the
/// text reaches the log's end as the run left it). Only a file inside the
/// log folder is read: `403` for one outside it, `404` for an unknown run,
/// a run without a log or a file that is not there.
pub(crate) async fn run_log(
    State(shared): AppState,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Response {
    let id: RunId = match id.parse() {
        Ok(id) => id,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let from = match query.from.as_deref().map(str::parse::<u64>).transpose() {
        Ok(from) => from,
        Err(_) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "from: must be a byte offset (0 or more)",
            );
        }
    };
    let log_dir = shared.log_dir.clone();
    let read = blocking(&shared, move |l| {
        let run = l.run(id)?;
        let Some(path) = run.log_path else {
            return Ok(Err((StatusCode::NOT_FOUND, format!("run {id} has no log"))));
        };
        let active = run.status.is_active();
        let chunk = super::log::open(log_dir.as_deref(), &path)
            .map_err(|refused| match refused {
                super::log::Refused::Outside => (
                    StatusCode::FORBIDDEN,
                    format!("the log of run {id} is not served: {refused}"),
                ),
                super::log::Refused::Unreadable(e) => (
                    StatusCode::NOT_FOUND,
                    format!("the log of run {id} is not readable here: {e}"),
                ),
            })
            .and_then(|mut file| {
                match from {
                    Some(from) => super::log::after(&mut file, from),
                    None => super::log::tail(&mut file),
                }
                .map_err(|e| {
                    (
                        StatusCode::NOT_FOUND,
                        format!("the log of run {id} is not readable here: {e}"),
                    )
                })
            });
        Ok(chunk.map(|chunk| (chunk, active)))
    });
    match read.await {
        Ok(Ok((chunk, active))) => Json(serde_json::json!({
            "run": id,
            "from": chunk.from,
            "offset": chunk.offset,
            "text": chunk.text,
            "more": chunk.more,
            "reset": chunk.reset,
            "active": active,
        }))
        .into_response(),
        Ok(Err((status, message))) => json_error(status, message),
        Err(e) => ledger_error(&e),
    }
}

/// `/api/locks`: the array of `runledger locks --json`.
pub(crate) async fn locks(State(shared): AppState) -> Response {
    match blocking(&shared, |l| l.locks()).await {
        Ok(locks) => Json(locks).into_response(),
        Err(e) => ledger_error(&e),
    }
}

/// `/api/instances`: every process that has the ledger open.
pub(crate) async fn instances(State(shared): AppState) -> Response {
    match blocking(&shared, |l| l.instances()).await {
        Ok(instances) => Json(instances).into_response(),
        Err(e) => ledger_error(&e),
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct EventsQuery {
    from: Option<String>,
}

/// `/api/events`: the feed as server-sent events, from after
/// `Last-Event-ID` (a reconnect), else `?from=N`, else from now.
pub(crate) async fn events(
    State(shared): AppState,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Response {
    let given = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.from);
    let from: Option<EventCursor> = match given.map(|g| g.parse()).transpose() {
        Ok(from) => from,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let watch = blocking(&shared, move |l| {
        let cursor = match from {
            Some(cursor) => cursor,
            None => l.events_cursor()?,
        };
        l.watch(cursor)
    })
    .await;
    let watch = match watch {
        Ok(watch) => watch,
        Err(e) => return ledger_error(&e),
    };
    let stream = futures_util::StreamExt::map(watch, |item| {
        Ok::<Event, Infallible>(match item {
            Ok(event) => Event::default()
                .id(event.id.to_string())
                .json_data(&event)
                .unwrap_or_else(|e| Event::default().comment(format!("unreadable event: {e}"))),
            // The watch goes on after an error; a comment keeps the stream
            // readable and tells a person watching it with curl.
            Err(e) => Event::default().comment(format!("error reading the feed: {e}")),
        })
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// What `/metrics` reports, read in one go.
struct Figures {
    counts: crate::record::RunCounts,
    locks: Vec<LockRecord>,
    instances: Vec<crate::record::InstanceInfo>,
    now: Timestamp,
}

/// `/metrics`: Prometheus text format 0.0.4.
pub(crate) async fn metrics(State(shared): AppState) -> Response {
    match figures(&shared).await {
        Ok(figures) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            prometheus_text(&figures),
        )
            .into_response(),
        Err(e) => (status_of(&e), format!("{e}\n")).into_response(),
    }
}

async fn figures(shared: &Arc<Shared>) -> crate::Result<Figures> {
    blocking(shared, |l| {
        Ok(Figures {
            counts: l.run_counts()?,
            locks: l.locks()?,
            instances: l.instances()?,
            now: l.now(),
        })
    })
    .await
}

fn prometheus_text(f: &Figures) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let by_status: Vec<(String, f64)> = f
        .counts
        .by_status
        .iter()
        .map(|(s, n)| (format!("{{status=\"{s}\"}}"), *n as f64))
        .collect();
    let by_status: Vec<(&str, f64)> = by_status.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(
        "runledger_runs",
        "Runs in the ledger, by status.",
        &by_status,
    );
    let queued = f.counts.of(RunStatus::Queued);
    let active = queued + f.counts.of(RunStatus::Running);
    metric(
        "runledger_runs_active",
        "Runs not finished: queued or running.",
        &[("", active as f64)],
    );
    metric(
        "runledger_runs_queued",
        "Runs registered and not started (waiting for locks, a slot or a worker).",
        &[("", queued as f64)],
    );
    metric(
        "runledger_runs_reaped",
        "Runs a reaper failed (owner died, hung, not adopted in time) still in the ledger.",
        &[("", f.counts.reaped as f64)],
    );
    let held = f
        .locks
        .iter()
        .filter(|l| l.state == LockState::Held)
        .count();
    metric(
        "runledger_locks_held",
        "Keys held, one per holder (a shared key held twice counts two).",
        &[("", held as f64)],
    );
    let mut waiting: Vec<(crate::InstanceId, crate::Ticket)> = f
        .locks
        .iter()
        .filter(|l| l.state == LockState::Waiting)
        .map(|l| (l.instance, l.ticket))
        .collect();
    waiting.sort_unstable();
    waiting.dedup();
    metric(
        "runledger_lock_waiters",
        "Lock requests waiting in a queue.",
        &[("", waiting.len() as f64)],
    );
    let oldest = f
        .locks
        .iter()
        .filter(|l| l.state == LockState::Waiting)
        .map(|l| f.now.saturating_duration_since(l.requested_at))
        .max()
        .unwrap_or_default();
    metric(
        "runledger_lock_oldest_wait_seconds",
        "How long the longest-waiting lock request has waited (0 when none waits).",
        &[("", oldest.as_secs_f64())],
    );
    let alive = f.instances.iter().filter(|i| i.alive).count();
    let stale = f.instances.len() - alive;
    metric(
        "runledger_instances",
        "Processes that have the ledger open: alive, or stale (dead, not reaped yet).",
        &[
            ("{state=\"alive\"}", alive as f64),
            ("{state=\"stale\"}", stale as f64),
        ],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn a_query_reads_every_filter_and_skips_blank_fields() {
        let q = RunsQuery::parse(&pairs(&[
            ("status", "failed"),
            ("status", "queued"),
            ("name", "build"),
            ("source", ""),
            ("since", "2h"),
            ("before", "42"),
            ("limit", "10"),
            ("token", "x"),
        ]))
        .unwrap();
        assert_eq!(q.statuses, [RunStatus::Failed, RunStatus::Queued]);
        assert_eq!(q.name.as_deref(), Some("build"));
        assert_eq!(q.source, None);
        assert_eq!(q.since.unwrap().1, Duration::from_secs(7200));
        assert_eq!(q.before, Some(RunId::from(42)));
        assert_eq!(q.limit, 10);
    }

    #[test]
    fn a_bad_query_says_what_is_wrong() {
        for (name, value) in [
            ("status", "sleeping"),
            ("since", "yesterday"),
            ("limit", "0"),
            ("limit", "100000"),
            ("before", "x"),
        ] {
            let err = RunsQuery::parse(&pairs(&[(name, value)])).unwrap_err();
            assert!(
                err.contains(value) || err.contains(name),
                "{name}={value}: {err}"
            );
        }
    }
}
