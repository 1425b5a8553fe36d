//! The actions [`Dashboard::allow_actions`](super::Dashboard::allow_actions)
//! enables: cancel a run, force-unlock a key, as POST forms of the run and
//! locks pages.
//!
//! Each is checked in this order, and refused with a message saying why:
//! the dashboard must have a token (the guard has already checked that the
//! request carries it); the request must come from the dashboard's own
//! pages (`Sec-Fetch-Site`, and `Origin` against `Host`, when the browser
//! sends them); it must carry the session cookie of a `?token=` visit and
//! the form's CSRF token, an HMAC of that cookie under a key drawn when the
//! router was made. What was done is recorded with who did it: the
//! request's remote address, and the name typed in the form, if any.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::pages::Base;
use super::{AppState, Shared, TOKEN_COOKIE, blocking, hex, same, status_of};
use crate::run::RunId;

/// The longest name a form may give for who acts.
const MAX_NAME: usize = 100;

/// The key of a router's CSRF tokens: drawn from the OS once per router.
pub(crate) fn csrf_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut key) {
        // Without randomness no token can be trusted: a key nobody can
        // reproduce is still drawn from the clock and the address space,
        // and actions stay protected by the dashboard's token.
        log::error!("runledger: no randomness for the dashboard's CSRF key: {e}");
        let seed = format!("{:?}{:p}", std::time::SystemTime::now(), &key);
        key.copy_from_slice(&mac(seed.as_bytes(), b"runledger fallback key"));
    }
    key
}

fn mac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The session of a request: the value of its token cookie, if it has one.
fn session(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The CSRF token of a session: what its forms carry.
fn csrf_of(shared: &Shared, session: &str) -> String {
    hex(&mac(&shared.csrf_key, session.as_bytes()))
}

/// What a page may offer: the forms of the actions, or why not.
pub(crate) enum Actions {
    /// Actions are not enabled: the page shows none.
    Off,
    /// Enabled, but refused: the dashboard has no token.
    NoToken,
    /// Enabled, but this request has no session cookie (a bearer token).
    NoSession,
    /// Enabled: the forms carry this CSRF token.
    On(String),
}

impl FromRequestParts<std::sync::Arc<Shared>> for Actions {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &std::sync::Arc<Shared>,
    ) -> Result<Actions, Self::Rejection> {
        Ok(if !shared.allow_actions {
            Actions::Off
        } else if shared.token.is_none() {
            Actions::NoToken
        } else {
            match session(&parts.headers) {
                Some(session) => Actions::On(csrf_of(shared, &session)),
                None => Actions::NoSession,
            }
        })
    }
}

/// Why actions are refused on a dashboard without a token.
pub(crate) const NEEDS_TOKEN: &str = "actions are refused: this dashboard has no token, so \
    anything that can reach its address (any local process, any web page open in a browser on \
    this machine) could cancel runs and unlock keys; start it with --token";

/// Why a request without the session cookie cannot act.
pub(crate) const NEEDS_SESSION: &str = "actions are made from the dashboard's pages: open one \
    once with ?token=TOKEN, which sets the session cookie the forms are bound to";

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

/// Why an action is refused: the status and the message.
type Refusal = (StatusCode, String);

/// The checks every action passes, in order; `Ok` with who acts.
fn check(
    shared: &Shared,
    parts: &HeaderMap,
    remote: Option<SocketAddr>,
    csrf: &str,
    name: Option<&str>,
) -> Result<String, Refusal> {
    if shared.token.is_none() {
        return Err((StatusCode::FORBIDDEN, NEEDS_TOKEN.to_owned()));
    }
    let text = |name: header::HeaderName| parts.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site"))
        && site != "same-origin"
    {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "cross-site request refused (Sec-Fetch-Site: {site}): actions are made from the \
                 dashboard's own pages"
            ),
        ));
    }
    if let Some(origin) = text(header::ORIGIN) {
        let host = text(header::HOST).unwrap_or_default();
        let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
        if host.is_empty() || origin_host != host {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "cross-site request refused (Origin {origin} is not this dashboard's, {host}): \
                     actions are made from the dashboard's own pages"
                ),
            ));
        }
    }
    let Some(session) = session(parts) else {
        return Err((StatusCode::FORBIDDEN, NEEDS_SESSION.to_owned()));
    };
    if !same(csrf.as_bytes(), csrf_of(shared, &session).as_bytes()) {
        return Err((
            StatusCode::FORBIDDEN,
            "the form's CSRF token does not belong to this session: reload the page and try again"
                .to_owned(),
        ));
    }
    let from = match remote {
        Some(addr) => format!("from {}", addr.ip()),
        None => "from an unknown address".to_owned(),
    };
    let name: String = name
        .map(str::trim)
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_NAME)
        .collect();
    Ok(if name.is_empty() {
        format!("the dashboard {from}")
    } else {
        format!("{name} on the dashboard {from}")
    })
}

/// What the request's connection says of the remote address, if the server
/// recorded it ([`Dashboard::serve`](super::Dashboard::serve) does).
pub(crate) struct Remote(Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Remote {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Remote, Self::Rejection> {
        Ok(Remote(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// The form of the cancel button.
#[derive(serde::Deserialize)]
pub(crate) struct CancelForm {
    #[serde(default)]
    csrf: String,
    name: Option<String>,
}

/// `POST /runs/{id}/cancel`: asks the run to stop, recording who asked.
pub(crate) async fn cancel(
    State(shared): AppState,
    base: Base,
    Remote(remote): Remote,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::Form(form): axum::Form<CancelForm>,
) -> Response {
    let who = match check(&shared, &headers, remote, &form.csrf, form.name.as_deref()) {
        Ok(who) => who,
        Err((status, why)) => return refuse(status, &why),
    };
    let Ok(id) = id.parse::<RunId>() else {
        return refuse(StatusCode::BAD_REQUEST, "no such run");
    };
    match blocking(&shared, move |l| l.cancel_by(id, &who)).await {
        Ok(_) => Redirect::to(&base.run(id)).into_response(),
        Err(e) => refuse(status_of(&e), &e.to_string()),
    }
}

/// The form of a key's force-unlock button.
#[derive(serde::Deserialize)]
pub(crate) struct UnlockForm {
    #[serde(default)]
    csrf: String,
    key: String,
    #[serde(default)]
    reason: String,
    name: Option<String>,
}

/// `POST /locks/unlock`: releases every holder of a key by force, with the
/// reason given and who gave it.
pub(crate) async fn unlock(
    State(shared): AppState,
    base: Base,
    Remote(remote): Remote,
    headers: HeaderMap,
    axum::Form(form): axum::Form<UnlockForm>,
) -> Response {
    let who = match check(&shared, &headers, remote, &form.csrf, form.name.as_deref()) {
        Ok(who) => who,
        Err((status, why)) => return refuse(status, &why),
    };
    if form.reason.trim().is_empty() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a forced release must say why: fill in the reason",
        );
    }
    let reason = format!("{} (by {who})", form.reason.trim());
    let key = form.key;
    match blocking(&shared, move |l| l.force_unlock(&key, &reason)).await {
        Ok(_) => Redirect::to(&base.at("/locks")).into_response(),
        Err(e) => refuse(status_of(&e), &e.to_string()),
    }
}
