//! The dashboard (feature `web`): pages for people, a JSON API and
//! Prometheus metrics over one [`Ledger`], as an [`axum::Router`] a host
//! mounts in its own app, or served on its own ([`Dashboard::serve`],
//! `runledger serve`).
//!
//! | Path | What |
//! |---|---|
//! | `/` | Overview: active runs with progress, held locks and their queues, processes alive or stale, recent failures |
//! | `/runs` | Runs, newest first: filters `status` (repeatable), `name`, `source`, `since` (`90s`, `30m`, `2h`, `7d`), paging by `before` (a run id) and `limit` |
//! | `/runs/{id}` | One run: every field, metadata, steps, events, its locks, and for a queued run who holds what it waits for |
//! | `/locks` | Every key: holders (mode, token, age), the queue in order, and its history (grants, releases, reclaims from dead holders, forced releases, with tokens and why) |
//! | `/api/runs`, `/api/runs/{id}`, `/api/locks`, `/api/instances` | JSON: the shapes of `runledger runs --json`, `show --json`, `locks --json`; `/api/runs` takes the filters of `/runs` |
//! | `/api/runs/{id}/log` | JSON: what the run's log has after byte `?from=N` (at most 64 KiB), or its end; the run page's script polls it while the run is active (see [`Dashboard::log_dir`] for which files are read) |
//! | `/api/events` | The event feed as server-sent events (`text/event-stream`): one `message` per event, its JSON as data and its id as the SSE id, so a reconnect resumes after the last one seen (`Last-Event-ID`, or `?from=N`) |
//! | `/metrics` | Prometheus text: runs by status, active and queued runs, locks held, waiters, the oldest wait, instances alive and stale, runs reaped |
//!
//! Pages are plain HTML, readable without JavaScript; with it, a few lines
//! of embedded script follow `/api/events` and redraw the page's content
//! when something changes: a run's, or a lock's (grants, releases,
//! reclaims and forced releases are events of the feed), and every 30
//! seconds for what changes without an event (ages; processes that died
//! and are not reaped yet). On the page of an active run, it also polls
//! `/api/runs/{id}/log` every second from the byte offset the page was
//! drawn with (a `data-log-offset` attribute) and appends what the log got
//! as text, until the run ends. Every value from the ledger goes through
//! the template engine (maud), which escapes it: a run named `<script>` is
//! text. Nothing is loaded from elsewhere, and every response carries a
//! restrictive `Content-Security-Policy`.
//!
//! # Safe by default
//!
//! - **Read-only.** No request changes the ledger: anything but `GET` and
//!   `HEAD` is refused with `405 Method Not Allowed`, unless
//!   [actions](#actions) are allowed.
//! - **A token, when asked for.** With [`Dashboard::token`], every request
//!   must carry it: `Authorization: Bearer TOKEN` (programs, Prometheus'
//!   `authorization` setting), or once `?token=TOKEN` on a page, which
//!   sets a cookie (`HttpOnly`, `SameSite=Strict`) and redirects to the same
//!   page without it. Others get `401`.
//! - **Loopback unless told.** [`check_listen`] and [`Dashboard::serve`]
//!   refuse an address that is not loopback unless a token is set: the
//!   dashboard shows commands, hosts and metadata that are nobody else's
//!   business.
//! - **Loopback names only, without a token.** With no token,
//!   [`Dashboard::serve`] answers only requests addressed (their `Host`) to
//!   a loopback name: `localhost` (and names under it), `127.0.0.0/8` or
//!   `[::1]`, with any port. Others get `403`, saying why. Else a web page
//!   of any site could read the dashboard by DNS rebinding: its name, once
//!   loaded, made to resolve to `127.0.0.1`, its scripts' requests reach
//!   the dashboard as requests of the same origin. A router nested in an
//!   app of the host's own ([`Dashboard::router`]) is addressed by the
//!   names that app serves, and makes no such check: there, the app
//!   decides who reaches it.
//!
//! # Actions
//!
//! With [`Dashboard::allow_actions`] (`runledger serve --allow-actions`),
//! the page of an active run has a *cancel* button
//! ([`Ledger::cancel_by`](crate::Ledger::cancel_by)) and the locks page a
//! *force unlock* button per held key
//! ([`Ledger::force_unlock`](crate::Ledger::force_unlock), with a reason),
//! each a plain HTML form that POSTs to `/runs/{id}/cancel` or
//! `/locks/unlock`. Each request is refused, with a message saying why:
//!
//! - without a [token](Dashboard::token) set (`403`): anything that can
//!   reach the address could act otherwise;
//! - without the token (`401`, as every request);
//! - from another site (`403`): `Sec-Fetch-Site` must be `same-origin` and
//!   `Origin` this dashboard's host, when the browser sends them;
//! - without the session cookie a `?token=` visit sets, or with a CSRF
//!   token in the form that is not the session's (`403`).
//!
//! What is done is recorded with who did it, the request's remote address
//! and, if typed in the form, a name: on the run (the message of its
//! cancel request) or in the lock's history (the reason of its forced
//! release). The address is known when the dashboard is served by
//! [`Dashboard::serve`], or by a host that serves its app with
//! `into_make_service_with_connect_info::<SocketAddr>()`.
//!
//! # Mounting it
//!
//! Links are made from the prefix the router is mounted under, so the
//! dashboard works nested anywhere in a host's app:
//!
//! ```no_run
//! # async fn host() -> std::io::Result<()> {
//! use runledger::Ledger;
//! let ledger = Ledger::open("ledger.db").map_err(std::io::Error::other)?;
//! let app = axum::Router::new()
//!     .route("/", axum::routing::get(|| async { "my app" }))
//!     .nest("/runs-dashboard", runledger::web::router(ledger));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! [`Dashboard`] sets the options (a token) before making the router.
//!
//! # Blocking calls
//!
//! Every ledger call is a short blocking database call (see the crate
//! docs, "Threads, tasks and processes"). Handlers make theirs on tokio's
//! blocking pool, all of one request in one `spawn_blocking`: a page reads
//! runs, locks and instances, which on PostgreSQL is one server round trip
//! each, and a runtime thread that waited for them would stall every other
//! connection it serves (a host's current-thread runtime above all). One
//! hand-off per request costs microseconds, far less than the reads. The
//! event stream is the exception: it is a [`Watch`](crate::Watch) polled as
//! a `Stream`, which waits without blocking and reads the feed only when
//! woken.

mod actions;
mod api;
mod log;
mod pages;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{OriginalUri, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::error::Error;
use crate::ledger::Ledger;

/// The policy every response carries: scripts and styles from the
/// dashboard only, no frames, no forms elsewhere, no plugins.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// The cookie a `?token=` visit sets.
const TOKEN_COOKIE: &str = "runledger_token";

/// A dashboard over one ledger, with its options; [`router`](Dashboard::router)
/// makes the [`Router`] and [`serve`](Dashboard::serve) serves it.
///
/// # Examples
///
/// ```
/// use runledger::web::Dashboard;
/// # let dir = tempfile::tempdir()?;
/// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
/// let app: axum::Router = Dashboard::new(ledger).token("s3cret").router();
/// # Ok::<(), runledger::Error>(())
/// ```
#[derive(Clone, Debug)]
#[must_use = "a Dashboard does nothing until its router is served"]
pub struct Dashboard {
    ledger: Ledger,
    token: Option<String>,
    allow_actions: bool,
    log_dir: Option<std::path::PathBuf>,
}

/// What every handler shares.
pub(crate) struct Shared {
    pub ledger: Ledger,
    token: Option<String>,
    allow_actions: bool,
    /// The only folder whose files a run page tails.
    pub log_dir: Option<std::path::PathBuf>,
    /// The key of the CSRF tokens of the actions' forms.
    csrf_key: [u8; 32],
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ledger", &self.ledger)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("allow_actions", &self.allow_actions)
            .finish_non_exhaustive()
    }
}

pub(crate) type AppState = State<Arc<Shared>>;

impl Dashboard {
    /// A dashboard over `ledger`, read-only, with no token.
    pub fn new(ledger: Ledger) -> Dashboard {
        // Where `runledger exec` writes logs by default: beside the file.
        let log_dir = ledger
            .location()
            .as_path()
            .map(|file| file.with_file_name("logs"));
        Dashboard {
            ledger,
            token: None,
            allow_actions: false,
            log_dir,
        }
    }

    /// The folder of the runs' logs: a run page shows the tail of a run's
    /// `log_path`, and `/api/runs/{id}/log` what follows it, only if the
    /// file, symlinks resolved, is inside it; the page shows a plain note
    /// otherwise and the API answers `403`, so a recorded path such as
    /// `/etc/passwd` is never served. Defaults to the `logs` folder beside a SQLite ledger's
    /// file (where `runledger exec` writes them), and to none for
    /// PostgreSQL: then no log is shown.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::web::Dashboard;
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// let app: axum::Router = Dashboard::new(ledger).log_dir("/var/log/runs").router();
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn log_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Dashboard {
        self.log_dir = Some(dir.into());
        self
    }

    /// Enables the actions (see [Actions](self#actions)): a cancel button
    /// on the page of an active run, a force-unlock button per held key on
    /// the locks page. They are refused, saying why, unless a
    /// [token](Dashboard::token) is set too. Defaults to false: every
    /// request but `GET` and `HEAD` is refused with `405`.
    pub fn allow_actions(mut self, allow: bool) -> Dashboard {
        self.allow_actions = allow;
        self
    }

    /// Requires `token` on every request (see [Safe by
    /// default](self#safe-by-default)). Defaults to none: every request
    /// that reaches the router is served. An empty token counts as none.
    pub fn token(mut self, token: impl Into<String>) -> Dashboard {
        let token = token.into();
        self.token = (!token.is_empty()).then_some(token);
        self
    }

    /// The router with every page, the API and `/metrics`, to serve or to
    /// nest under a prefix of the host's app.
    pub fn router(self) -> Router {
        let shared = Arc::new(Shared {
            ledger: self.ledger,
            token: self.token,
            allow_actions: self.allow_actions,
            log_dir: self.log_dir,
            csrf_key: actions::csrf_key(),
        });
        Router::new()
            .route("/", get(pages::overview))
            .route("/runs", get(pages::runs))
            .route("/runs/{id}", get(pages::run))
            .route("/runs/{id}/cancel", post(actions::cancel))
            .route("/locks", get(pages::locks))
            .route("/locks/unlock", post(actions::unlock))
            .route("/assets/style.css", get(pages::style))
            .route("/assets/live.js", get(pages::script))
            .route("/api/runs", get(api::runs))
            .route("/api/runs/{id}", get(api::run))
            .route("/api/runs/{id}/log", get(api::run_log))
            .route("/api/locks", get(api::locks))
            .route("/api/instances", get(api::instances))
            .route("/api/events", get(api::events))
            .route("/metrics", get(api::metrics))
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(shared.clone(), guard))
            .layer(middleware::map_response(security_headers))
            .with_state(shared)
    }

    /// Serves the dashboard on `listener` until `shutdown` completes.
    ///
    /// Check the address with [`check_listen`] before binding it; this
    /// checks it again and refuses to serve on one it does not allow.
    ///
    /// # Errors
    ///
    /// [`std::io::ErrorKind::PermissionDenied`] for an address that is not
    /// loopback when no [token](Dashboard::token) is set (nothing is
    /// served); the errors of serving.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn serve(ledger: runledger::Ledger) -> std::io::Result<()> {
    /// use runledger::web::{Dashboard, check_listen};
    /// let addr = "127.0.0.1:8080".parse().expect("an address");
    /// check_listen(addr, false)?;
    /// let listener = tokio::net::TcpListener::bind(addr).await?;
    /// Dashboard::new(ledger).serve(listener, std::future::pending()).await
    /// # }
    /// ```
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        check_listen(listener.local_addr()?, self.token.is_some())?;
        let tokenless = self.token.is_none();
        let mut router = self.router();
        if tokenless {
            router = router.layer(middleware::from_fn(loopback_names_only));
        }
        let app = router.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// The dashboard over `ledger` with the default options: read-only, no
/// token (see [`Dashboard`] for the others).
///
/// # Examples
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
/// let app = axum::Router::new().nest("/ledger", runledger::web::router(ledger));
/// # Ok::<(), runledger::Error>(())
/// ```
pub fn router(ledger: Ledger) -> Router {
    Dashboard::new(ledger).router()
}

/// Whether the dashboard may listen on `listen`: a loopback address always,
/// any other only with a token.
///
/// # Errors
///
/// [`std::io::ErrorKind::PermissionDenied`], saying why, for an address
/// that is not loopback when `has_token` is false.
pub fn check_listen(listen: SocketAddr, has_token: bool) -> std::io::Result<()> {
    if listen.ip().is_loopback() || has_token {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!(
            "refusing to listen on {listen} without a token: that address is reachable from \
             other machines, and the dashboard shows every run, command, host and lock of the \
             ledger; pass a token (--token) or listen on loopback (127.0.0.1)"
        ),
    ))
}

/// Refuses a request addressed to a name that is not loopback (see [Safe
/// by default](self#safe-by-default)): what a dashboard served without a
/// token answers, against DNS rebinding. A request with no `Host` (HTTP/1.0)
/// comes from no browser, and is served.
async fn loopback_names_only(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{fffd}"));
    match host {
        Some(host) if !is_loopback_name(host) => (
            StatusCode::FORBIDDEN,
            format!(
                "this dashboard has no token, so it answers only requests addressed to a \
                 loopback name (localhost, 127.0.0.1, [::1]), not to {host:?}: open it by \
                 one of those, or serve it with a token\n"
            ),
        )
            .into_response(),
        _ => next.run(request).await,
    }
}

/// Whether `host` (a `Host` header: a name or an address, and maybe a
/// port) names this machine's loopback.
fn is_loopback_name(host: &str) -> bool {
    // `[::1]:8080`, `[::1]`, `127.0.0.1:8080`, `localhost:8080`, `localhost`.
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((address, port)) if port.is_empty() || port.starts_with(':') => address,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Sets the headers every response carries.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let mut set = |name: header::HeaderName, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY);
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // Never a referrer to another site; to its own pages, the browser then
    // sends the true `Origin` of a form (under `no-referrer` it sends
    // `Origin: null`, which the actions' same-origin check must refuse).
    set(header::REFERRER_POLICY, "same-origin");
    set(header::X_FRAME_OPTIONS, "DENY");
    response
}

/// Refuses what changes things (every method but GET and HEAD, and POST
/// too unless actions are allowed) and, with a token set, requests without
/// it.
async fn guard(State(shared): AppState, request: Request, next: Next) -> Response {
    let method = request.method();
    let reads = method == Method::GET || method == Method::HEAD;
    if !(reads || shared.allow_actions && method == Method::POST) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "the dashboard is read-only: no request changes the ledger\n",
        )
            .into_response();
    }
    let Some(token) = &shared.token else {
        return next.run(request).await;
    };
    if presented(request.headers(), token) {
        return next.run(request).await;
    }
    // `?token=…` on a page: remember it in a cookie, and take it out of the
    // address (and so of the history and of any Referer).
    if let Some(given) = query_token(request.uri())
        && same(given.as_bytes(), token.as_bytes())
    {
        let original = request
            .extensions()
            .get::<OriginalUri>()
            .map_or_else(|| request.uri().clone(), |o| o.0.clone());
        let base = base_of(&original, request.uri());
        let cookie = format!(
            "{TOKEN_COOKIE}={}; Path={}/; HttpOnly; SameSite=Strict",
            hex(token.as_bytes()),
            base
        );
        let mut response = Redirect::to(&without_token(&original)).into_response();
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return response;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "this dashboard needs its token: send `Authorization: Bearer TOKEN`, or open a page \
         once with ?token=TOKEN\n",
    )
        .into_response()
}

/// Whether the request carries the token, as a bearer token or the cookie.
fn presented(headers: &HeaderMap, token: &str) -> bool {
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.strip_prefix("Bearer "))
        .any(|given| same(given.trim().as_bytes(), token.as_bytes()));
    let cookie = hex(token.as_bytes());
    bearer
        || headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| name == TOKEN_COOKIE && same(value.as_bytes(), cookie.as_bytes()))
}

/// The `token` parameter of a query, decoded.
fn query_token(uri: &Uri) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Token {
        token: Option<String>,
    }
    let query = uri.query()?;
    axum::extract::Query::<Token>::try_from_uri(&Uri::try_from(format!("/?{query}")).ok()?)
        .ok()?
        .0
        .token
}

/// `uri`'s path and query without its `token` parameter.
fn without_token(uri: &Uri) -> String {
    let path = uri.path();
    let rest: Vec<&str> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("token=") && *p != "token")
        .collect();
    if rest.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", rest.join("&"))
    }
}

/// Equality in time that does not depend on where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The prefix the router is mounted under ("" at the root), from the
/// address asked for (`original`) and the one the router saw (`seen`).
pub(crate) fn base_of(original: &Uri, seen: &Uri) -> String {
    let original = original.path();
    let seen = seen.path();
    let base = match original.strip_suffix(seen) {
        Some(base) => base,
        None if seen == "/" => original,
        None => "",
    };
    base.trim_end_matches('/').to_owned()
}

/// How an error of the ledger reaches a client.
pub(crate) fn status_of(e: &Error) -> StatusCode {
    if e.is_not_found() {
        StatusCode::NOT_FOUND
    } else if e.is_invalid_input() {
        StatusCode::BAD_REQUEST
    } else if e.is_busy() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

/// Runs `read`, the ledger calls of one request, on the blocking pool (see
/// [Blocking calls](self#blocking-calls)).
pub(crate) async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    read: impl FnOnce(&Ledger) -> crate::Result<T> + Send + 'static,
) -> crate::Result<T> {
    let ledger = shared.ledger.clone();
    match tokio::task::spawn_blocking(move || read(&ledger)).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(e) => Err(Error::from(std::io::Error::other(e))),
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such page\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_are_told_from_others() {
        for host in [
            "localhost",
            "localhost:8080",
            "LocalHost.:8080",
            "dash.localhost:1",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.8.9.1:80",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_name(host), "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:8080",
            "localhost.attacker.example",
            "notlocalhost",
            "10.0.0.1:8080",
            "0.0.0.0:8080",
            "[::2]:8080",
            "[::1]x",
            "[::1",
            "",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_loopback_name(host), "{host}");
        }
    }

    #[test]
    fn the_base_is_the_prefix_the_router_is_nested_under() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(base_of(&uri("/runs/3"), &uri("/runs/3")), "");
        assert_eq!(base_of(&uri("/"), &uri("/")), "");
        assert_eq!(base_of(&uri("/dash/runs/3"), &uri("/runs/3")), "/dash");
        assert_eq!(base_of(&uri("/dash"), &uri("/")), "/dash");
        assert_eq!(base_of(&uri("/a/dash/"), &uri("/")), "/a/dash");
    }

    #[test]
    fn the_token_is_taken_out_of_the_address() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(without_token(&uri("/runs?token=x")), "/runs");
        assert_eq!(
            without_token(&uri("/runs?status=failed&token=x&name=a")),
            "/runs?status=failed&name=a"
        );
        assert_eq!(query_token(&uri("/?token=a%20b")).as_deref(), Some("a b"));
    }

    #[test]
    fn only_loopback_goes_without_a_token() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(check_listen(addr("127.0.0.1:8080"), false).is_ok());
        assert!(check_listen(addr("[::1]:8080"), false).is_ok());
        let err = check_listen(addr("0.0.0.0:8080"), false).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("without a token"), "{err}");
        assert!(check_listen(addr("0.0.0.0:8080"), true).is_ok());
    }
}
