//! `/api/v1/plugins`: list, upload, enable/disable and try rubric plugins.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::AppState;
use super::access::Session;
use crate::auth::Claims;
use crate::error::{Error, Result};
use crate::plugins::{BUILTIN_PREFIX, PluginRecord, blocking};

#[derive(Deserialize)]
pub(super) struct ContextQuery {
    context: Option<String>,
}

fn visible(c: &Claims, r: &PluginRecord) -> bool {
    c.is_admin() || r.context_id.is_none() || r.context_id.as_deref() == Some(c.ctx.as_str())
}

pub(super) async fn list_plugins(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<ContextQuery>,
) -> Result<Json<Vec<PluginRecord>>> {
    let ctx = match q.context {
        Some(ctx) if c.is_admin() => Some(ctx),
        None if c.is_admin() => None,
        _ => Some(c.ctx.clone()),
    };
    Ok(Json(
        blocking(&st.plugins, move |r| r.list(ctx.as_deref())).await?,
    ))
}

pub(super) async fn get_plugin(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<PluginRecord>> {
    let record = blocking(&st.plugins, move |r| r.get(&id))
        .await?
        .filter(|r| visible(&c, r))
        .ok_or(Error::NotFound("plugin"))?;
    Ok(Json(record))
}

pub(super) async fn upload_plugin(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<ContextQuery>,
    body: Body,
) -> Result<(StatusCode, Json<PluginRecord>)> {
    let scope = if c.is_admin() {
        q.context
    } else if c.can_manage(&c.ctx) && st.config.plugins.instructor_upload {
        Some(c.ctx.clone())
    } else if c.can_manage(&c.ctx) {
        return Err(Error::Forbidden(
            "instructors may upload plugins only when the administrator enables plugins.instructor_upload".into(),
        ));
    } else {
        return Err(Error::Forbidden(
            "only administrators (and, where enabled, instructors) upload plugins".into(),
        ));
    };
    let limit = st.config.plugins.max_upload_bytes;
    let bytes = axum::body::to_bytes(
        body,
        usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_add(1),
    )
    .await
    .map_err(|_| {
        Error::Plugin(viva_plugins::Error::TooLarge {
            size: limit.saturating_add(1),
            limit,
        })
    })?;
    if bytes.is_empty() {
        return Err(Error::bad_request(
            "not_a_component",
            "the upload is empty: send the plugin's .wasm file as the request body",
        ));
    }
    let actor = c.actor();
    let (record, created) = blocking(&st.plugins, move |r| r.upload(&bytes, scope, &actor)).await?;
    tracing::info!(plugin = %record.name, version = %record.version, id = %record.id, "plugin uploaded");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(record)))
}

async fn set_enabled(
    st: AppState,
    c: Claims,
    id: String,
    enabled: bool,
) -> Result<Json<PluginRecord>> {
    if id.starts_with(BUILTIN_PREFIX) {
        return Err(Error::bad_request(
            "builtin_plugin",
            "built-in plugins cannot be disabled; choose another plugin for the assignment instead",
        ));
    }
    let lookup = id.clone();
    let record = blocking(&st.plugins, move |r| r.get(&lookup))
        .await?
        .filter(|r| visible(&c, r))
        .ok_or(Error::NotFound("plugin"))?;
    let allowed = c.is_admin()
        || record
            .context_id
            .as_deref()
            .is_some_and(|ctx| c.can_manage(ctx));
    if !allowed {
        return Err(Error::Forbidden(
            "only administrators, or the course's instructors for course plugins, change plugins"
                .into(),
        ));
    }
    let actor = c.actor();
    st.store
        .write(move |tx| crate::plugins::set_enabled(tx, &id, enabled, &actor))
        .await?;
    let id = record.id.clone();
    let record = blocking(&st.plugins, move |r| r.get(&id))
        .await?
        .ok_or(Error::NotFound("plugin"))?;
    Ok(Json(record))
}

pub(super) async fn disable_plugin(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<PluginRecord>> {
    set_enabled(st, c, id, false).await
}

pub(super) async fn enable_plugin(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<PluginRecord>> {
    set_enabled(st, c, id, true).await
}

/// Checks a configuration without saving anything (for configuration forms).
pub(super) async fn validate_plugin_config(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
    Json(config): Json<serde_json::Value>,
) -> Result<Json<serde_json::Value>> {
    let lookup = id.clone();
    blocking(&st.plugins, move |r| r.get(&lookup))
        .await?
        .filter(|r| visible(&c, r))
        .ok_or(Error::NotFound("plugin"))?;
    blocking(&st.plugins, move |r| {
        r.plugin_by_id(&id)?
            .validate_config(&config)
            .map_err(Error::Plugin)
    })
    .await?;
    Ok(Json(serde_json::json!({ "valid": true })))
}
