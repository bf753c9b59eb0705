//! Who may do what: the session extractor and the one copy of each check
//! that loads a resource for a caller. Handlers call these instead of
//! repeating the rules, so every route answers alike: someone else's
//! submission or another course's assignment is "not found" (ids do not
//! leak), an action the caller's role does not allow is "forbidden".

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use serde::Deserialize;

use super::AppState;
use crate::auth::Claims;
use crate::domain::{self, Assignment, Submission};
use crate::error::{Error, Result};

/// Axum extractor: the verified claims of the request's bearer token.
pub(crate) struct Session(pub Claims);

impl FromRequestParts<AppState> for Session {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Self::Rejection> {
        match bearer(&parts.headers)? {
            Some(token) => Ok(Session(st.sessions.verify(token)?)),
            None => Err(Error::Unauthorized(
                "send `Authorization: Bearer <session token>` (viva session mints one)".into(),
            )),
        }
    }
}

/// The bearer token of the `Authorization` header, if one is sent.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = v
        .to_str()
        .map_err(|_| Error::Unauthorized("malformed Authorization header".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| Error::Unauthorized("the Authorization header must be Bearer".into()))?;
    Ok(Some(token.trim()))
}

/// Bearer header, or else a single-use ticket for `scope` (EventSource and
/// `<video src>` cannot send headers).
pub(crate) fn claims_from(
    st: &AppState,
    headers: &HeaderMap,
    ticket: Option<&str>,
    scope: &str,
) -> Result<Claims> {
    if let Some(token) = bearer(headers)? {
        return st.sessions.verify(token);
    }
    match ticket {
        Some(t) => st.sessions.redeem(t, scope),
        None => Err(Error::Unauthorized(
            "send a bearer token, or a ticket from POST /api/v1/tickets as ?ticket=".into(),
        )),
    }
}

/// The context a request is about: admins may name any, everyone else gets
/// their session's.
pub(crate) fn context_for(c: &Claims, requested: Option<&str>) -> String {
    match requested {
        Some(ctx) if c.is_admin() => ctx.to_owned(),
        _ => c.ctx.clone(),
    }
}

pub(crate) fn require_manage(c: &Claims, ctx: &str) -> Result<()> {
    if c.can_manage(ctx) {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "only the course's instructors can do this; ask your instructor".into(),
        ))
    }
}

pub(crate) fn require_admin(c: &Claims) -> Result<()> {
    if c.is_admin() {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "only an administrator can do this; sign in from the platform as an administrator"
                .into(),
        ))
    }
}

/// An assignment of the caller's course (any course for an admin).
pub(crate) async fn load_assignment(st: &AppState, c: &Claims, id: String) -> Result<Assignment> {
    let a = st
        .store
        .read(move |conn| domain::get_assignment(conn, &id))
        .await?
        .ok_or(Error::NotFound("assignment"))?;
    if a.context_id != c.ctx && !c.is_admin() {
        return Err(Error::NotFound("assignment"));
    }
    Ok(a)
}

/// An assignment the caller may manage (the course's instructors, admins).
pub(crate) async fn load_managed_assignment(
    st: &AppState,
    c: &Claims,
    id: String,
) -> Result<Assignment> {
    let a = load_assignment(st, c, id).await?;
    require_manage(c, &a.context_id)?;
    Ok(a)
}

/// A submission the caller may read (its owner, the course's instructors, admins).
pub(crate) async fn load_readable(st: &AppState, c: &Claims, id: String) -> Result<Submission> {
    let s = st
        .store
        .read(move |conn| domain::get_submission(conn, &id))
        .await?
        .ok_or(Error::NotFound("submission"))?;
    if !c.can_read(&s) {
        return Err(Error::NotFound("submission"));
    }
    Ok(s)
}

/// A submission the caller may manage (the course's instructors, admins).
pub(crate) async fn load_managed(st: &AppState, c: &Claims, id: String) -> Result<Submission> {
    let s = load_readable(st, c, id).await?;
    require_manage(c, &s.context_id)?;
    Ok(s)
}

/// `?ticket=` of the routes a browser loads without headers.
#[derive(Deserialize)]
pub(crate) struct TicketQuery {
    pub ticket: Option<String>,
}

/// A submission whose media the caller may play: bearer header, or a
/// single-use `media:<id>` ticket (`<video src>` sends no headers).
pub(crate) async fn load_media(
    st: &AppState,
    headers: &HeaderMap,
    q: &TicketQuery,
    id: String,
) -> Result<Submission> {
    let c = claims_from(st, headers, q.ticket.as_deref(), &format!("media:{id}"))?;
    load_readable(st, &c, id).await
}
