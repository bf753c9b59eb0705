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
pub(crate) async fn claims_from(
    st: &AppState,
    headers: &HeaderMap,
    ticket: Option<&str>,
    scope: &str,
) -> Result<Claims> {
    if let Some(token) = bearer(headers)? {
        return st.sessions.verify(token);
    }
    match ticket {
        Some(t) => {
            let (t, scope) = (t.to_owned(), scope.to_owned());
            st.store
                .write(move |tx| crate::auth::redeem_ticket(tx, &t, &scope))
                .await
        }
        None => Err(Error::Unauthorized(
            "send a bearer token, or a ticket from POST /api/v1/tickets as ?ticket=".into(),
        )),
    }
}

/// The context a request is about: Viva-wide admins may name any, a
/// platform admin any of its registration's, everyone else gets their
/// session's.
pub(crate) async fn context_for(
    st: &AppState,
    c: &mut Claims,
    requested: Option<&str>,
) -> Result<String> {
    match requested {
        Some(ctx) if c.is_admin() => Ok(ctx.to_owned()),
        Some(ctx) => {
            act_in(st, c, ctx).await?;
            Ok(c.ctx.clone())
        }
        None => Ok(c.ctx.clone()),
    }
}

/// A platform admin administers every context of its own registration (a
/// context with a resource link of that (issuer, client_id)) as it does the
/// context it launched from: `c` is moved into `ctx` when that holds, and
/// left as it is otherwise (then the usual checks refuse).
pub(crate) async fn act_in(st: &AppState, c: &mut Claims, ctx: &str) -> Result<()> {
    if c.ctx == ctx || !c.is_platform_admin() {
        return Ok(());
    }
    let Some(scope) = c.lti.clone() else {
        return Ok(());
    };
    let target = ctx.to_owned();
    let ours = st
        .store
        .read(move |conn| {
            crate::lti::context_of_registration(conn, &target, &scope.platform, &scope.client_id)
        })
        .await?;
    if ours {
        c.ctx = ctx.to_owned();
        // A link of another course is not this session's.
        if let Some(l) = c.lti.as_mut() {
            l.link = None;
            l.resource_link = None;
            l.assignment = None;
            l.deep_link = None;
        }
    }
    Ok(())
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
pub(crate) async fn load_assignment(
    st: &AppState,
    c: &mut Claims,
    id: String,
) -> Result<Assignment> {
    let a = st
        .store
        .read(move |conn| domain::get_assignment(conn, &id))
        .await?
        .ok_or(Error::NotFound("assignment"))?;
    act_in(st, c, &a.context_id).await?;
    if a.context_id != c.ctx && !c.is_admin() {
        return Err(Error::NotFound("assignment"));
    }
    Ok(a)
}

/// An assignment the caller may manage (the course's instructors, admins).
pub(crate) async fn load_managed_assignment(
    st: &AppState,
    c: &mut Claims,
    id: String,
) -> Result<Assignment> {
    let a = load_assignment(st, c, id).await?;
    require_manage(c, &a.context_id)?;
    Ok(a)
}

/// A submission the caller may read (its owner, the course's instructors, admins).
pub(crate) async fn load_readable(st: &AppState, c: &mut Claims, id: String) -> Result<Submission> {
    let s = st
        .store
        .read(move |conn| domain::get_submission(conn, &id))
        .await?
        .ok_or(Error::NotFound("submission"))?;
    act_in(st, c, &s.context_id).await?;
    if !c.can_read(&s) {
        return Err(Error::NotFound("submission"));
    }
    Ok(s)
}

/// A submission the caller may manage (the course's instructors, admins).
pub(crate) async fn load_managed(st: &AppState, c: &mut Claims, id: String) -> Result<Submission> {
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
    let mut c = claims_from(st, headers, q.ticket.as_deref(), &format!("media:{id}")).await?;
    load_readable(st, &mut c, id).await
}
