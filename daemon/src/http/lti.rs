//! LTI 1.3 routes: OIDC login (`/lti/login`, GET and POST), the launch
//! (`/lti/launch`), the tool key set (`/lti/jwks.json`), dynamic and manual
//! registration (`/lti/register`), the Canvas developer-key configuration
//! (`/lti/canvas.json`), the deep-linking return (`/lti/deep-link`), Names
//! and Roles for instructors and the platform admin API.
//!
//! Browser flow. Login stores a state and answers with a redirect to the
//! platform, setting the state's browser binding in a
//! `SameSite=None; Secure; HttpOnly; Partitioned` cookie; when the platform
//! offers `lti_storage_target`, a small page also stores the binding in the
//! platform's frame with `lti.put_data` (LTI client-side postMessage
//! storage) before redirecting. At the launch the binding comes from the
//! cookie, else from platform storage (`lti.get_data`, then one more POST
//! with the binding), else the browser is offered "open in a new window";
//! the state check is never skipped. A valid launch answers with the web
//! widget's page (`crate::http::widget::shell`), which carries the session token in
//! its body (never in a URL) and calls `/api/v1/me` with it.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use viva_lti::deep_linking::{LineItemSpec, ResourceLinkItem};
use viva_lti::launch::{Expectations, Launch, MessageType};
use viva_lti::login::{self, LoginRequest, StateLimits};
use viva_lti::{LtiError, Registration};

use super::AppState;
use super::access::{Session, act_in, require_admin};
use super::html::{Page, esc};
use crate::auth::{Claims, LtiScope};
use crate::domain::{self, AssignmentInput, Role, new_id};
use crate::error::{Error, Result};
use crate::lti::{self, DeepLinkContext, Link};

// ---- pages --------------------------------------------------------------------

const ERROR_HEADER: &str = "x-viva-error";

/// A plain error page with the code in the body and the `x-viva-error` header.
fn error_page(status: StatusCode, code: &str, message: &str) -> Response {
    let mut p = Page::new(
        "Viva could not open",
        format!(
            "<div class=\"error\"><h1>Viva could not open</h1><p>{}</p>\
             <p>Error code: <code id=\"error-code\">{}</code></p>\
             <p>Open the assignment again from your course. If this keeps happening, \
             tell your instructor or administrator the error code.</p></div>",
            esc(message),
            esc(code)
        ),
    );
    p.status = status;
    p.headers
        .push((HeaderName::from_static(ERROR_HEADER), code.to_owned()));
    p.render()
}

fn lti_error_page(e: &LtiError) -> Response {
    let (status, code) = (super::error::lti_status(e), e.code());
    if e.is_client_error() {
        tracing::info!(code, error = %e, "LTI request refused");
    } else {
        tracing::warn!(code, error = %e, "LTI request failed");
    }
    error_page(status, code, &e.to_string())
}

fn daemon_error_page(e: &Error) -> Response {
    let (status, code) = super::error::status_and_code(e);
    if status.is_server_error() {
        tracing::error!(error = %e, "LTI page failed");
        error_page(
            status,
            code,
            "something went wrong on the server; try again in a minute",
        )
    } else {
        error_page(status, code, &e.to_string())
    }
}

fn state_cookie(state: &str, binding: &str, max_age: u64) -> String {
    format!(
        "{}={binding}; Path=/; Max-Age={max_age}; SameSite=None; Secure; HttpOnly; Partitioned",
        login::state_cookie_name(state)
    )
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Whether a request was sent by a page of the tool's own origin
/// (`Sec-Fetch-Site: same-origin`, else an `Origin` equal to the tool's).
fn from_tool_origin(headers: &HeaderMap, tool_origin: &str) -> bool {
    let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    match get("sec-fetch-site") {
        Some(site) => site == "same-origin",
        None => get(header::ORIGIN.as_str()) == Some(tool_origin),
    }
}

// ---- login --------------------------------------------------------------------

pub(super) async fn login_get(
    State(st): State<AppState>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    login_response(&st, params).await
}

pub(super) async fn login_post(
    State(st): State<AppState>,
    Form(params): Form<Vec<(String, String)>>,
) -> Response {
    login_response(&st, params).await
}

const STORAGE_PUT_JS: &str = r#"(function(){
var c=JSON.parse(document.getElementById('viva-data').textContent);
var target=c.target==='_parent'?window.parent:(window.parent.frames[c.target]||window.parent);
var id='viva-'+Math.random().toString(36).slice(2);var done=false;
function go(){if(done)return;done=true;window.removeEventListener('message',on);window.location.replace(c.next);}
function on(ev){if(ev.origin!==c.origin)return;var d=ev.data||{};
if(d.subject==='lti.put_data.response'&&d.message_id===id){go();}}
window.addEventListener('message',on);
try{target.postMessage({subject:'lti.put_data',message_id:id,key:c.key,value:c.value},c.origin);}catch(e){go();}
setTimeout(go,3000);})();"#;

async fn login_response(st: &AppState, params: Vec<(String, String)>) -> Response {
    let req = match LoginRequest::from_params(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    {
        Ok(r) => r,
        Err(e) => return lti_error_page(&e),
    };
    let issuer = req.iss.clone();
    let regs = match st
        .store
        .read(move |c| lti::registrations_for(c, &issuer))
        .await
    {
        Ok(r) => r,
        Err(e) => return daemon_error_page(&e),
    };
    let reg = match viva_lti::registration::select(&regs, &req.iss, req.client_id.as_deref()) {
        Ok(r) => r.clone(),
        Err(e) => return lti_error_page(&e),
    };
    let (start, kept) = match login::prepare_login(&req, &reg, &st.lti.tool, viva_lti::now_secs()) {
        Ok(s) => s,
        Err(e) => return lti_error_page(&e),
    };
    // In the store: the launch may come to another api node.
    let state = start.state.clone();
    if let Err(e) = st
        .store
        .write(move |tx| lti::put_login_state(tx, &state, &kept, StateLimits::default()))
        .await
    {
        return daemon_error_page(&e);
    }
    tracing::info!(issuer = %reg.issuer, client_id = %reg.client_id, storage = req.lti_storage_target.is_some(), "LTI login");
    let cookie = state_cookie(&start.state, &start.binding, login::STATE_TTL_SECS);
    match (&req.lti_storage_target, reg.platform_origin()) {
        (Some(target), Some(origin)) => {
            let mut p = Page::new("Opening Viva…", "<p>Opening Viva…</p>".to_owned());
            p.data = Some(serde_json::json!({
                "target": target,
                "origin": origin,
                "key": login::storage_key(&start.state),
                "value": start.binding,
                "next": start.redirect_url,
            }));
            p.script = Some(STORAGE_PUT_JS);
            p.frame_ancestors = Some(reg.frame_ancestors());
            p.headers.push((header::SET_COOKIE, cookie));
            p.render()
        }
        _ => {
            let mut resp = StatusCode::FOUND.into_response();
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&start.redirect_url) {
                h.insert(header::LOCATION, v);
            }
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                h.insert(header::SET_COOKIE, v);
            }
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            resp
        }
    }
}

// ---- launch -------------------------------------------------------------------

#[derive(Deserialize)]
pub(super) struct LaunchForm {
    id_token: Option<String>,
    state: Option<String>,
    lti_storage_target: Option<String>,
    /// The binding read from platform storage by the retrieval page.
    lti_state_binding: Option<String>,
    /// An OIDC error answer from the platform.
    error: Option<String>,
    error_description: Option<String>,
}

const STORAGE_GET_JS: &str = r#"(function(){
var c=JSON.parse(document.getElementById('viva-data').textContent);
var target=c.target==='_parent'?window.parent:(window.parent.frames[c.target]||window.parent);
var id='viva-'+Math.random().toString(36).slice(2);var done=false;
function fallback(){if(done)return;done=true;document.getElementById('wait').hidden=true;document.getElementById('fallback').hidden=false;}
function on(ev){if(done||ev.origin!==c.origin)return;var d=ev.data||{};
if(d.subject!=='lti.get_data.response'||d.message_id!==id)return;
if(!d.value){fallback();return;}done=true;
document.getElementById('binding').value=d.value;document.getElementById('launch').submit();}
window.addEventListener('message',on);
try{target.postMessage({subject:'lti.get_data',message_id:id,key:c.key},c.origin);}catch(e){fallback();}
setTimeout(fallback,4000);})();"#;

fn new_window_html(st: &AppState, req: &LoginRequest) -> String {
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(req.to_params())
        .finish();
    format!(
        "<h1>Open Viva in a new window</h1>\
         <p>Your browser blocks the storage Viva needs inside this page.</p>\
         <p><a class=\"button\" id=\"new-window\" target=\"_blank\" rel=\"noopener\" href=\"{}?{}\">Open in a new window</a></p>",
        esc(&st.lti.tool.login()),
        esc(&query)
    )
}

pub(super) async fn launch(
    State(st): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<LaunchForm>,
) -> Response {
    if let Some(err) = &f.error {
        let msg = format!(
            "the platform did not complete the launch: {} {}",
            err,
            f.error_description.as_deref().unwrap_or("")
        );
        return error_page(
            StatusCode::BAD_REQUEST,
            "platform_refused_login",
            msg.trim(),
        );
    }
    let Some(state) = f.state.clone().filter(|s| !s.is_empty() && s.len() <= 256) else {
        return lti_error_page(&LtiError::MissingParam("state"));
    };
    let Some(id_token) = f.id_token.clone().filter(|t| !t.is_empty()) else {
        return lti_error_page(&LtiError::MissingParam("id_token"));
    };
    let now = viva_lti::now_secs();
    let pending = {
        let state = state.clone();
        match st
            .store
            .read(move |c| lti::peek_login_state(c, &state))
            .await
        {
            Ok(Some(p)) => p,
            Ok(None) => return lti_error_page(&LtiError::UnknownState),
            Err(e) => return daemon_error_page(&e),
        }
    };
    let cookie_name = login::state_cookie_name(&state);
    // A binding in the body comes only from the platform-storage page this
    // login offered, posted by the tool's own page: anything else could be a
    // classmate's page signing this browser in as them (login CSRF).
    let posted = match f.lti_state_binding.clone() {
        Some(b)
            if pending.request.lti_storage_target.is_some()
                && from_tool_origin(&headers, &st.lti.tool.origin()) =>
        {
            Some(b)
        }
        Some(_) => {
            tracing::info!(
                "a posted state binding from outside the platform-storage flow; refused"
            );
            return lti_error_page(&LtiError::StateNotBound);
        }
        None => None,
    };
    let presented = cookie_value(&headers, &cookie_name).or(posted);
    let regs = {
        let issuer = pending.issuer.clone();
        match st
            .store
            .read(move |c| lti::registrations_for(c, &issuer))
            .await
        {
            Ok(r) => r,
            Err(e) => return daemon_error_page(&e),
        }
    };
    let Some(reg) = regs.into_iter().find(|r| r.client_id == pending.client_id) else {
        return lti_error_page(&LtiError::UnknownRegistration {
            issuer: pending.issuer.clone(),
            client_id: Some(pending.client_id.clone()),
        });
    };
    if presented.is_none() {
        // No cookie: ask platform storage, or offer a new window. Never skip the check.
        let target = f
            .lti_storage_target
            .clone()
            .or(pending.request.lti_storage_target.clone());
        let mut p = match (target, reg.platform_origin()) {
            (Some(target), Some(origin)) => {
                let mut p = Page::new(
                    "Opening Viva…",
                    format!(
                        "<p id=\"wait\">Opening Viva…</p><div id=\"fallback\" hidden>{}</div>\
                         <form id=\"launch\" method=\"post\" action=\"{}\" hidden>\
                         <input type=\"hidden\" name=\"id_token\" value=\"{}\">\
                         <input type=\"hidden\" name=\"state\" value=\"{}\">\
                         <input type=\"hidden\" name=\"lti_state_binding\" id=\"binding\" value=\"\"></form>",
                        new_window_html(&st, &pending.request),
                        esc(&st.lti.tool.launch()),
                        esc(&id_token),
                        esc(&state)
                    ),
                );
                p.data = Some(serde_json::json!({
                    "target": target,
                    "origin": origin,
                    "key": login::storage_key(&state),
                }));
                p.script = Some(STORAGE_GET_JS);
                p
            }
            _ => {
                let mut p = Page::new("Open Viva", new_window_html(&st, &pending.request));
                p.headers.push((
                    HeaderName::from_static(ERROR_HEADER),
                    "state_not_bound".into(),
                ));
                p
            }
        };
        p.frame_ancestors = Some(reg.frame_ancestors());
        return p.render();
    }
    let checked = login::check_state(&pending, presented.as_deref(), now);
    if checked.is_ok() || matches!(checked, Err(LtiError::StateExpired)) {
        // Single use: of two launches with this state, on any nodes, one
        // goes on.
        let s = state.clone();
        match st
            .store
            .write(move |tx| lti::take_login_state(tx, &s))
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => return lti_error_page(&LtiError::UnknownState),
            Err(e) => return daemon_error_page(&e),
        }
    }
    if let Err(e) = checked {
        return lti_error_page(&e);
    }
    let expect = Expectations {
        nonce: &pending.nonce,
        target_link_uri: Some(&pending.request.target_link_uri),
        now,
    };
    let launch =
        match viva_lti::launch::validate_id_token(&id_token, &reg, &st.lti.jwks, expect).await {
            Ok(l) => l,
            Err(e) => return lti_error_page(&e),
        };
    let clear_cookie = state_cookie(&state, "", 0);
    // The widget's language: the platform's locale claim, else the browser's.
    let locale = super::widget::pick_locale(launch.locale.as_deref(), &headers);
    let mut resp = match complete_launch(&st, &reg, launch, locale).await {
        Ok(r) => r,
        Err(e) => daemon_error_page(&e),
    };
    if let Ok(v) = HeaderValue::from_str(&clear_cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// What a launch created or found in the daemon's model.
struct Provisioned {
    user: String,
    context: String,
    roles: Vec<Role>,
    link: Option<Link>,
    assignment: Option<domain::Assignment>,
    assignments: Vec<domain::Assignment>,
}

async fn provision(st: &AppState, launch: &Launch) -> Result<Provisioned> {
    let access = viva_lti::roles::map_roles(&launch.roles);
    let roles = lti::daemon_roles(&access);
    let context_key = launch
        .context
        .as_ref()
        .map(|c| c.id.clone())
        .or_else(|| {
            launch
                .resource_link
                .as_ref()
                .map(|r| format!("link:{}", r.id))
        })
        .unwrap_or_else(|| "deployment".into());
    let context = lti::context_id(
        &launch.issuer,
        &launch.client_id,
        &launch.deployment_id,
        &context_key,
    );
    let title = launch
        .context
        .as_ref()
        .and_then(|c| c.title.clone().or(c.label.clone()))
        .unwrap_or_else(|| "Course".into());
    let launch = launch.clone();
    let (ctx, r) = (context.clone(), roles.clone());
    let (user, link, assignment, assignments) = st
        .store
        .write(move |tx| {
            let u = lti::resolve_user(tx, &launch.issuer, &launch.client_id, &launch.sub)?;
            domain::ensure_context(tx, &ctx, &title)?;
            domain::ensure_member(tx, &ctx, &u, launch.name.as_deref(), &r)?;
            lti::record_user(tx, &u, &launch.issuer, &launch.client_id, &launch.sub)?;
            let mut link = None;
            if let Some(rl) = &launch.resource_link {
                let ags = launch.ags.clone().unwrap_or_default();
                let mut l = lti::upsert_link(
                    tx,
                    &Link {
                        id: new_id("lnk"),
                        issuer: launch.issuer.clone(),
                        client_id: launch.client_id.clone(),
                        deployment_id: launch.deployment_id.clone(),
                        resource_link_id: rl.id.clone(),
                        context_id: ctx.clone(),
                        assignment_id: None,
                        title: rl.title.clone(),
                        lineitem_url: ags.lineitem.clone(),
                        lineitems_url: ags.lineitems.clone(),
                        ags_scopes: ags.scope.clone(),
                        nrps_url: launch
                            .nrps
                            .as_ref()
                            .map(|n| n.context_memberships_url.clone()),
                    },
                )?;
                if let Some(a) = resolve_assignment(tx, &l, &launch, &ctx)? {
                    if l.assignment_id.as_deref() != Some(a.as_str()) {
                        lti::set_link_assignment(tx, &l.id, &a)?;
                    }
                    l.assignment_id = Some(a);
                }
                lti::record_launch(tx, &l.id, &u, &launch.sub)?;
                link = Some(l);
            }
            domain::audit(
                tx,
                &format!("{u}@{ctx}"),
                "lti.launch",
                link.as_ref().map(|l| l.id.as_str()).unwrap_or(&ctx),
                serde_json::json!({
                    "message_type": launch.message_type,
                    "issuer": launch.issuer,
                    "deployment_id": launch.deployment_id,
                    "roles": r,
                }),
            )?;
            let assignment = match link.as_ref().and_then(|l| l.assignment_id.clone()) {
                Some(a) => domain::get_assignment(tx, &a)?,
                None => None,
            };
            let assignments = domain::list_assignments(tx, &ctx)?;
            Ok((u, link, assignment, assignments))
        })
        .await?;
    Ok(Provisioned {
        user,
        context,
        roles,
        link,
        assignment,
        assignments,
    })
}

/// The assignment a resource link shows: the one it is bound to, else the
/// `viva_assignment` custom parameter placed by deep linking, when that
/// assignment is in this course, or in another course of the same
/// registration (a copied course: the assignment is copied too).
fn resolve_assignment(
    tx: &crate::db::Transaction<'_>,
    link: &Link,
    launch: &Launch,
    context: &str,
) -> Result<Option<String>> {
    if let Some(a) = &link.assignment_id
        && domain::get_assignment(tx, a)?.is_some_and(|a| a.context_id == context)
    {
        return Ok(Some(a.clone()));
    }
    let Some(wanted) = launch.custom.get("viva_assignment") else {
        return Ok(None);
    };
    let Some(a) = domain::get_assignment(tx, wanted)? else {
        return Ok(None);
    };
    if a.context_id == context {
        return Ok(Some(a.id));
    }
    if !lti::context_of_registration(tx, &a.context_id, &launch.issuer, &launch.client_id)? {
        tracing::warn!(assignment = %a.id, "a launch named an assignment of another platform; ignored");
        return Ok(None);
    }
    let id = new_id("asg");
    let input = AssignmentInput {
        id: Some(id.clone()),
        title: a.title.clone(),
        prompt: a.prompt.clone(),
        rubric: a.rubric.clone(),
        plugin: Some(a.plugin.clone()),
        plugin_config: Some(a.plugin_config.clone()),
        release_policy: Some(a.release_policy),
        max_attempts: a.max_attempts,
        language: a.language.clone(),
        vocabulary: a.vocabulary.clone(),
    };
    // The copy grades as the original does: the same plugin file.
    let pin = Some(a.plugin_sha256.as_str()).filter(|s| !s.is_empty());
    domain::save_assignment(tx, context, &id, &input, pin, "lti")?;
    domain::audit(
        tx,
        "lti",
        "assignment.copy",
        &id,
        serde_json::json!({ "from": a.id }),
    )?;
    Ok(Some(id))
}

const DEEP_LINK_JS: &str = r#"(function(){
var s=JSON.parse(document.getElementById('viva-data').textContent);window.vivaSession=s;
var status=document.getElementById('status');
function place(body){status.textContent='Adding to your course…';
fetch(s.base+'/lti/deep-link',{method:'POST',headers:{'Authorization':'Bearer '+s.token,'Content-Type':'application/json'},body:JSON.stringify(body)})
.then(function(r){return r.json().then(function(j){if(!r.ok)throw new Error((j.error&&j.error.message)||('HTTP '+r.status));return j;});})
.then(function(j){var f=document.createElement('form');f.method='POST';f.action=j.return_url;
var i=document.createElement('input');i.type='hidden';i.name='JWT';i.value=j.jwt;f.appendChild(i);document.body.appendChild(f);f.submit();})
.catch(function(e){status.textContent='Could not add it: '+e.message;});}
document.querySelectorAll('button[data-assignment]').forEach(function(b){b.addEventListener('click',function(){place({assignment_id:b.getAttribute('data-assignment')});});});
var form=document.getElementById('create');if(form){form.addEventListener('submit',function(ev){ev.preventDefault();
place({assignment:{title:form.title.value,prompt:form.prompt.value,rubric:s.default_rubric}});});}
})();"#;

async fn complete_launch(
    st: &AppState,
    reg: &Registration,
    launch: Launch,
    locale: Option<&'static str>,
) -> Result<Response> {
    let access = viva_lti::roles::map_roles(&launch.roles);
    let is_instructor = access
        .iter()
        .any(|a| matches!(a, viva_lti::Access::Instructor | viva_lti::Access::Admin));
    if launch.message_type == MessageType::LtiDeepLinkingRequest && !is_instructor {
        // Refused before anything is created for the user.
        return Ok(error_page(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only a course's instructors can add Viva assignments to it",
        ));
    }
    let p = provision(st, &launch).await?;
    let mut frame = reg.frame_ancestors();
    for u in [
        launch.return_url.as_deref(),
        launch
            .deep_linking
            .as_ref()
            .map(|d| d.deep_link_return_url.as_str()),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(o) = viva_lti::registration::origin_of(u) {
            frame.push(o);
        }
    }
    frame.sort();
    frame.dedup();
    let mut scope = LtiScope {
        platform: launch.issuer.clone(),
        client_id: launch.client_id.clone(),
        deployment: launch.deployment_id.clone(),
        resource_link: launch.resource_link.as_ref().map(|r| r.id.clone()),
        link: p.link.as_ref().map(|l| l.id.clone()),
        assignment: p.assignment.as_ref().map(|a| a.id.clone()),
        deep_link: None,
    };
    match launch.message_type {
        MessageType::LtiDeepLinkingRequest => {
            let settings = launch
                .deep_linking
                .clone()
                .ok_or(Error::Lti(LtiError::MissingClaim("deep_linking_settings")))?;
            let return_origin = viva_lti::registration::origin_of(&settings.deep_link_return_url);
            let ctx = DeepLinkContext {
                issuer: launch.issuer.clone(),
                client_id: launch.client_id.clone(),
                deployment_id: launch.deployment_id.clone(),
                context_id: p.context.clone(),
                settings,
                expires_at: viva_lti::now_secs() + 3600,
            };
            scope.deep_link = Some(
                st.store
                    .write(move |tx| lti::save_deep_link(tx, &ctx))
                    .await?,
            );
            let (token, claims) = st.sessions.mint_scoped(
                &p.user,
                &p.context,
                &p.roles,
                launch.name.clone(),
                Some(scope),
            )?;
            let mut items = String::new();
            for a in &p.assignments {
                items.push_str(&format!(
                    "<li><button type=\"button\" data-assignment=\"{}\">Add</button> {}</li>",
                    esc(&a.id),
                    esc(&a.title)
                ));
            }
            if items.is_empty() {
                items = "<li>This course has no Viva assignments yet.</li>".into();
            }
            let body = format!(
                "<h1>Add a Viva assignment</h1><p id=\"status\" aria-live=\"polite\"></p>\
                 <h2>Existing assignments</h2><ul id=\"assignments\">{items}</ul>\
                 <h2>New assignment</h2><form id=\"create\"><label for=\"title\">Title</label>\
                 <input id=\"title\" name=\"title\" required><label for=\"prompt\">Question students answer</label>\
                 <textarea id=\"prompt\" name=\"prompt\" rows=\"3\" required></textarea>\
                 <p>It starts with the standard three-criterion rubric; edit it in Viva afterwards.</p>\
                 <button type=\"submit\">Create and add</button></form>"
            );
            let mut page = Page::new("Add Viva", body);
            page.data = Some(serde_json::json!({
                "token": token,
                "expires_at": claims.exp,
                "base": st.lti.tool.base(),
                "default_rubric": domain::sandbox_assignment().rubric,
            }));
            page.script = Some(DEEP_LINK_JS);
            page.frame_ancestors = Some(frame);
            page.form_action = return_origin.into_iter().collect();
            Ok(page.render())
        }
        MessageType::LtiResourceLinkRequest => {
            let (token, claims) = st.sessions.mint_scoped(
                &p.user,
                &p.context,
                &p.roles,
                launch.name.clone(),
                Some(scope),
            )?;
            // The web widget (crate::http::widget) with the token in the page body.
            let title = p
                .assignment
                .as_ref()
                .map(|a| a.title.clone())
                .unwrap_or_else(|| "Viva".into());
            Ok(super::html::shell(
                &title,
                serde_json::json!({
                    "token": token,
                    "expires_at": claims.exp,
                    "base": st.lti.tool.base(),
                    "assignment": p.assignment.as_ref().map(|a| a.id.clone()),
                    "link": p.link.as_ref().map(|l| l.id.clone()),
                    "roles": p.roles,
                    "instructor": is_instructor,
                    "limits": super::widget::limits(st),
                }),
                Some(&frame),
                locale,
            ))
        }
    }
}

// ---- keys, registration, configuration ---------------------------------------------

pub(super) async fn jwks(State(st): State<AppState>) -> Response {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(st.lti.keys.jwks()),
    )
        .into_response()
}

pub(super) async fn canvas_json(State(st): State<AppState>) -> Response {
    Json(viva_lti::dynreg::canvas_configuration(
        &st.lti.tool,
        &viva_lti::dynreg::ToolDescription::default(),
    ))
    .into_response()
}

#[derive(Deserialize)]
pub(super) struct RegisterQuery {
    openid_configuration: Option<String>,
    registration_token: Option<String>,
    /// The one-time invitation a Viva administrator made
    /// (`viva platform invite`, or the admin view).
    invite: Option<String>,
}

fn manual_registration_page(st: &AppState) -> Response {
    let t = &st.lti.tool;
    let row = |label: &str, id: &str, value: &str| {
        format!(
            "<tr><th scope=\"row\">{}</th><td><code id=\"{id}\">{}</code></td></tr>",
            esc(label),
            esc(value)
        )
    };
    let scopes = viva_lti::services::scopes::ALL.join(" ");
    let body = format!(
        "<h1>Register Viva with your platform</h1>\
         <p>Moodle 4.x: <em>Site administration → Plugins → External tool → Manage tools</em>, \
         paste the registration URL below into <em>Tool URL</em> and choose <em>Add LTI Advantage</em>. \
         Canvas: add an LTI key with the JSON URL below, or use dynamic registration with the registration URL.</p>\
         <table>{}{}{}{}{}{}{}{}</table>\
         <p>Manual registrations are added on the Viva server with \
         <code>viva platform add --issuer … --client-id … --auth-url … --token-url … --jwks-url … --deployment …</code>.</p>",
        row("Registration URL (dynamic)", "register-url", &t.register()),
        row(
            "Canvas JSON configuration URL",
            "canvas-url",
            &t.canvas_config()
        ),
        row("Login (OIDC initiation) URL", "login-url", &t.login()),
        row("Redirect / launch URL", "launch-url", &t.launch()),
        row("Deep linking URL", "deep-link-url", &t.launch()),
        row("Public keyset (JWKS) URL", "jwks-url", &t.jwks()),
        row("Domain", "domain", &t.host()),
        row("Scopes", "scopes", &scopes),
    );
    Page::new("Register Viva", body).render()
}

const CLOSE_JS: &str = r#"(function(){
var c=JSON.parse(document.getElementById('viva-data').textContent);
(window.opener||window.parent).postMessage({subject:'org.imsglobal.lti.close'},c.origin);})();"#;

pub(super) async fn register(
    State(st): State<AppState>,
    Query(q): Query<RegisterQuery>,
) -> Response {
    let Some(config_url) = q.openid_configuration.filter(|u| !u.is_empty()) else {
        return manual_registration_page(&st);
    };
    if !st.lti.config.dynamic_registration {
        return error_page(
            StatusCode::FORBIDDEN,
            "dynamic_registration_off",
            "dynamic registration is turned off on this Viva server ([lti] dynamic_registration)",
        );
    }
    // Only a Viva administrator adds platforms: without a usable invitation
    // nothing is fetched and nothing is stored.
    let Some(invite) = q.invite.filter(|t| !t.is_empty() && t.len() <= 128) else {
        return error_page(
            StatusCode::FORBIDDEN,
            "invite_required",
            "registering a platform needs a one-time registration URL from a Viva administrator \
             (viva platform invite, or Platforms in Viva's admin view)",
        );
    };
    let token = invite.clone();
    let allowed_issuer = match st.store.read(move |c| lti::peek_invite(c, &token)).await {
        Ok(Some(issuer)) => issuer,
        Ok(None) => {
            return error_page(
                StatusCode::FORBIDDEN,
                "invite_invalid",
                "this registration URL was used already or has expired; ask a Viva administrator \
                 for a new one",
            );
        }
        Err(e) => return daemon_error_page(&e),
    };
    let reg = match viva_lti::dynreg::register(
        &st.lti.http,
        &config_url,
        q.registration_token.as_deref(),
        &st.lti.tool,
        &viva_lti::dynreg::ToolDescription::default(),
        allowed_issuer.as_deref(),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return lti_error_page(&e),
    };
    let saved = reg.clone();
    if let Err(e) = st
        .store
        .write(move |tx| {
            if !lti::use_invite(tx, &invite, &saved.issuer, &saved.client_id)? {
                return Err(Error::Forbidden(
                    "this registration URL was used already or has expired; ask a Viva \
                     administrator for a new one"
                        .into(),
                ));
            }
            lti::save_registration(tx, &saved, "dynamic", false)?;
            domain::audit(
                tx,
                "lti-dynamic-registration",
                "platform.register",
                &saved.issuer,
                serde_json::json!({ "client_id": saved.client_id, "deployments": saved.deployments }),
            )
        })
        .await
    {
        return daemon_error_page(&e);
    }
    tracing::info!(issuer = %reg.issuer, client_id = %reg.client_id, "registered a platform (dynamic registration)");
    let origin = viva_lti::registration::origin_of(&config_url).unwrap_or_default();
    let mut page = Page::new(
        "Viva is registered",
        format!(
            "<h1>Viva is registered</h1><p id=\"registered\">Issuer <code>{}</code>, client id <code>{}</code>.</p>\
             <p>You can close this window.</p>",
            esc(&reg.issuer),
            esc(&reg.client_id)
        ),
    );
    page.data = Some(serde_json::json!({ "origin": origin }));
    page.script = Some(CLOSE_JS);
    page.frame_ancestors = Some(vec![origin]);
    page.render()
}

// ---- deep linking return ----------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeepLinkRequest {
    assignment_id: Option<String>,
    assignment: Option<AssignmentInput>,
}

fn deep_link_handle(c: &Claims) -> Result<String> {
    c.lti
        .as_ref()
        .and_then(|l| l.deep_link.clone())
        .ok_or_else(|| {
            Error::Forbidden("this session did not come from a deep-linking launch".into())
        })
}

pub(super) async fn deep_link(
    State(st): State<AppState>,
    Session(c): Session,
    Json(req): Json<DeepLinkRequest>,
) -> Result<Json<viva_lti::deep_linking::DeepLinkResponse>> {
    let handle = deep_link_handle(&c)?;
    let dl = st
        .store
        .read(move |c| lti::deep_link(c, &handle))
        .await?
        .ok_or_else(|| {
            Error::Unauthorized(
                "the deep-linking request has expired; start again from your course".into(),
            )
        })?;
    if dl.context_id != c.ctx || !c.can_manage(&dl.context_id) {
        return Err(Error::Forbidden(
            "only the course's instructors can add assignments to it".into(),
        ));
    }
    let assignment = match (req.assignment_id, req.assignment) {
        (Some(id), None) => {
            let ctx = dl.context_id.clone();
            st.store
                .read(move |conn| domain::get_assignment(conn, &id))
                .await?
                .filter(|a| a.context_id == ctx)
                .ok_or(Error::NotFound("assignment"))?
        }
        (None, Some(input)) => {
            input.validate()?;
            let sha = crate::plugins::check_assignment(&st.plugins, &dl.context_id, &input).await?;
            let ctx = dl.context_id.clone();
            let actor = c.actor();
            st.store
                .write(move |tx| {
                    let id = input.id.clone().unwrap_or_else(|| new_id("asg"));
                    if domain::get_assignment(tx, &id)?.is_some() {
                        return Err(Error::Conflict {
                            code: "assignment_exists",
                            message: format!("assignment {id} already exists"),
                        });
                    }
                    let (a, _) =
                        domain::save_assignment(tx, &ctx, &id, &input, Some(&sha), &actor)?;
                    domain::audit(
                        tx,
                        &actor,
                        "assignment.create",
                        &id,
                        serde_json::json!({"via": "deep_link"}),
                    )?;
                    Ok(a)
                })
                .await?
        }
        _ => {
            return Err(Error::bad_request(
                "invalid_deep_link",
                "send either assignment_id or assignment",
            ));
        }
    };
    let item = ResourceLinkItem {
        title: assignment.title.clone(),
        text: Some(assignment.prompt.chars().take(500).collect()),
        url: st.lti.tool.launch(),
        custom: BTreeMap::from([("viva_assignment".to_owned(), assignment.id.clone())]),
        line_item: Some(LineItemSpec {
            score_maximum: assignment.rubric.max_points(),
            label: assignment.title.clone(),
            resource_id: Some(assignment.id.clone()),
            tag: Some("viva".into()),
        }),
    };
    let resp = viva_lti::deep_linking::respond_to(
        &dl.issuer,
        &dl.client_id,
        &dl.deployment_id,
        &dl.settings,
        &[item],
        &st.lti.keys,
        viva_lti::now_secs(),
    )?;
    let actor = c.actor();
    let id = assignment.id.clone();
    st.store
        .write(move |tx| {
            domain::audit(
                tx,
                &actor,
                "lti.deep_link",
                &id,
                serde_json::json!({ "issuer": dl.issuer }),
            )
        })
        .await?;
    Ok(Json(resp))
}

// ---- names and roles -------------------------------------------------------------

#[derive(serde::Serialize)]
pub(super) struct MemberView {
    lti_user_id: String,
    user_id: String,
    name: Option<String>,
    email: Option<String>,
    status: Option<String>,
    roles: Vec<String>,
    learner: bool,
    submitted: bool,
}

#[derive(Deserialize)]
pub(super) struct MembersQuery {
    /// A link id; defaults to the session's link.
    link: Option<String>,
}

/// The course roster from the platform (NRPS), marking who has submitted
/// to the link's assignment.
pub(super) async fn members(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<MembersQuery>,
) -> Result<Json<Vec<MemberView>>> {
    let link_id = q
        .link
        .or_else(|| c.lti.as_ref().and_then(|l| l.link.clone()))
        .ok_or_else(|| Error::bad_request("no_link", "give ?link= or launch from a course link"))?;
    let link = st
        .store
        .read(move |conn| lti::get_link(conn, &link_id))
        .await?
        .ok_or(Error::NotFound("link"))?;
    let mut c = c;
    act_in(&st, &mut c, &link.context_id).await?;
    if !c.can_manage(&link.context_id) {
        return Err(Error::NotFound("link"));
    }
    let url = link.nrps_url.clone().ok_or_else(|| {
        Error::bad_request(
            "no_roster_service",
            "the platform did not offer Names and Roles for this course",
        )
    })?;
    let (issuer, client_id) = (link.issuer.clone(), link.client_id.clone());
    let reg = st
        .store
        .read(move |conn| lti::get_registration(conn, &issuer, &client_id))
        .await?
        .ok_or(Error::NotFound("platform registration"))?;
    let members = st
        .lti
        .services
        .members(&reg, &url, viva_lti::now_secs())
        .await?;
    let assignment = link.assignment_id.clone();
    let (issuer, client_id) = (link.issuer.clone(), link.client_id.clone());
    let subs: Vec<String> = members.iter().map(|m| m.user_id.clone()).collect();
    let (submitted, ids): (std::collections::HashSet<String>, Vec<String>) = st
        .store
        .read(move |conn| {
            let ids = subs
                .iter()
                .map(|sub| lti::resolve_user(conn, &issuer, &client_id, sub))
                .collect::<Result<Vec<_>>>()?;
            let Some(a) = assignment else {
                return Ok((Default::default(), ids));
            };
            let mut stmt = conn.prepare(
                "SELECT DISTINCT u.sub FROM submissions s JOIN lti_users u ON u.user_id = s.user_id
                 WHERE s.assignment_id = ?1 AND u.issuer = ?2 AND u.client_id = ?3",
            )?;
            let rows = stmt
                .query_map(crate::params![a, issuer, client_id], |r| {
                    r.get::<_, String>(0)
                })?
                .collect::<crate::db::Result<_>>()?;
            Ok((rows, ids))
        })
        .await?;
    Ok(Json(
        members
            .into_iter()
            .zip(ids)
            .map(|(m, user_id)| {
                let access = viva_lti::roles::map_roles(&m.roles);
                MemberView {
                    user_id,
                    submitted: submitted.contains(&m.user_id),
                    learner: !access.contains(&viva_lti::Access::Instructor),
                    lti_user_id: m.user_id,
                    name: m.name,
                    email: m.email,
                    status: m.status,
                    roles: m.roles,
                }
            })
            .collect(),
    ))
}

// ---- platform admin API ---------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct InviteRequest {
    /// The only issuer the registration may have; it may live on another host
    /// than the platform's configuration URL (hosted Canvas:
    /// `https://canvas.instructure.com`).
    #[serde(default)]
    issuer: Option<String>,
}

/// A one-time dynamic registration URL (Viva administrators only).
pub(super) async fn create_invite(
    State(st): State<AppState>,
    Session(c): Session,
    body: Option<Json<InviteRequest>>,
) -> Result<(StatusCode, Json<lti::Invite>)> {
    require_admin(&c)?;
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let actor = c.actor();
    let tool = st.lti.tool.clone();
    let invite = st
        .store
        .write(move |tx| lti::create_invite(tx, &tool, &actor, req.issuer.as_deref()))
        .await?;
    Ok((StatusCode::CREATED, Json(invite)))
}

pub(super) async fn list_platforms(
    State(st): State<AppState>,
    Session(c): Session,
) -> Result<Json<Vec<lti::StoredRegistration>>> {
    // A platform's administrator sees its own registration only.
    if !c.is_platform_admin() {
        require_admin(&c)?;
    }
    let mut regs = st.store.read(lti::list_registrations).await?;
    regs.retain(|r| c.administers_registration(&r.registration.issuer, &r.registration.client_id));
    Ok(Json(regs))
}

#[derive(Deserialize)]
pub(super) struct AddPlatform {
    #[serde(flatten)]
    registration: Registration,
    #[serde(default)]
    replace: bool,
}

pub(super) async fn add_platform(
    State(st): State<AppState>,
    Session(c): Session,
    Json(req): Json<AddPlatform>,
) -> Result<(StatusCode, Json<Registration>)> {
    require_admin(&c)?;
    req.registration.validate(st.lti.config.policy())?;
    let reg = req.registration.clone();
    let actor = c.actor();
    st.store
        .write(move |tx| {
            lti::save_registration(tx, &reg, "manual", req.replace)?;
            domain::audit(
                tx,
                &actor,
                "platform.add",
                &reg.issuer,
                serde_json::json!({ "client_id": reg.client_id }),
            )
        })
        .await?;
    Ok((StatusCode::CREATED, Json(req.registration)))
}

#[derive(Deserialize)]
pub(super) struct PlatformKey {
    issuer: String,
    client_id: String,
}

pub(super) async fn remove_platform(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<PlatformKey>,
) -> Result<StatusCode> {
    if !c.is_platform_admin() {
        require_admin(&c)?;
    }
    if !c.administers_registration(&q.issuer, &q.client_id) {
        // Another tenant's registration: as if it did not exist.
        return Err(Error::NotFound("platform registration"));
    }
    let actor = c.actor();
    let removed = st
        .store
        .write(move |tx| {
            let removed = lti::remove_registration(tx, &q.issuer, &q.client_id)?;
            if removed {
                domain::audit(
                    tx,
                    &actor,
                    "platform.remove",
                    &q.issuer,
                    serde_json::json!({ "client_id": q.client_id }),
                )?;
            }
            Ok(removed)
        })
        .await?;
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::NotFound("platform registration"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_tools_own_pages_may_post_a_binding() {
        let tool = "http://127.0.0.1:8080";
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(from_tool_origin(
            &h(&[("sec-fetch-site", "same-origin")]),
            tool
        ));
        assert!(from_tool_origin(
            &h(&[("origin", "http://127.0.0.1:8080")]),
            tool
        ));
        assert!(!from_tool_origin(&h(&[]), tool), "no evidence");
        assert!(!from_tool_origin(
            &h(&[("origin", "http://evil.example")]),
            tool
        ));
        assert!(!from_tool_origin(
            &h(&[
                ("sec-fetch-site", "cross-site"),
                ("origin", "http://127.0.0.1:8080")
            ]),
            tool
        ));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; viva_lti_abc=xyz; b=2"),
        );
        assert_eq!(cookie_value(&h, "viva_lti_abc").as_deref(), Some("xyz"));
        assert_eq!(cookie_value(&h, "viva_lti_ab"), None);
        let c = state_cookie("abc", "xyz", 600);
        for attr in [
            "SameSite=None",
            "Secure",
            "HttpOnly",
            "Partitioned",
            "Max-Age=600",
        ] {
            assert!(c.contains(attr), "{attr}");
        }
    }
}
