//! Calibration and bulk routes (course instructors and admins only; a
//! learner gets 403, another course's ids are "not found"): the agreement
//! report (JSON and CSV), the release gate, blind grades, exemplars, the
//! grades CSV and releasing a selection. The logic is in
//! [`crate::calibration`].

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::access::{Session, load_managed, load_managed_assignment};
use crate::calibration::{
    self, BlindGrade, Gate, InstructorGradeView, ReleaseSelected, Report, Skipped,
};
use crate::error::Result;

fn csv(name: String, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn report(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<Report>> {
    let a = load_managed_assignment(&st, &mut c, id).await?;
    Ok(Json(
        st.store
            .read(move |conn| calibration::report(conn, &a))
            .await?,
    ))
}

pub(super) async fn report_csv(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Response> {
    let a = load_managed_assignment(&st, &mut c, id).await?;
    let name = format!("calibration-{}.csv", a.id);
    let body = st
        .store
        .read(move |conn| Ok(calibration::report_csv(&calibration::report(conn, &a)?)))
        .await?;
    Ok(csv(name, body))
}

pub(super) async fn grades_csv(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Response> {
    let a = load_managed_assignment(&st, &mut c, id).await?;
    let name = format!("grades-{}.csv", a.id);
    let body = st
        .store
        .read(move |conn| calibration::grades_csv(conn, &a))
        .await?;
    Ok(csv(name, body))
}

#[derive(Serialize)]
pub(super) struct GateView {
    assignment_id: String,
    gate: Option<Gate>,
}

pub(super) async fn put_gate(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
    Json(g): Json<Gate>,
) -> Result<Json<GateView>> {
    set_gate(st, c, id, Some(g)).await
}

pub(super) async fn delete_gate(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<GateView>> {
    set_gate(st, c, id, None).await
}

async fn set_gate(
    st: AppState,
    mut c: crate::auth::Claims,
    id: String,
    gate: Option<Gate>,
) -> Result<Json<GateView>> {
    let a = load_managed_assignment(&st, &mut c, id).await?;
    let actor = c.actor();
    let aid = a.id.clone();
    st.store
        .write(move |tx| calibration::set_gate(tx, &aid, &actor, gate))
        .await?;
    Ok(Json(GateView {
        assignment_id: a.id,
        gate,
    }))
}

#[derive(Serialize)]
pub(super) struct ReleasedSelection {
    released: Vec<String>,
    skipped: Vec<Skipped>,
}

pub(super) async fn release_selected(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
    Json(req): Json<ReleaseSelected>,
) -> Result<Json<ReleasedSelection>> {
    let a = load_managed_assignment(&st, &mut c, id).await?;
    let actor = c.actor();
    let (released, skipped) = st
        .store
        .write(move |tx| calibration::release_selected(tx, &a.id, &actor, &req))
        .await?;
    if !released.is_empty() {
        st.lti.passback_wake.notify_one();
        st.scheduler.poke();
    }
    Ok(Json(ReleasedSelection { released, skipped }))
}

pub(super) async fn blind_grade(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
    Json(req): Json<BlindGrade>,
) -> Result<Json<InstructorGradeView>> {
    load_managed(&st, &mut c, id.clone()).await?;
    let actor = c.actor();
    let view = st
        .store
        .write(move |tx| {
            calibration::record_blind(tx, &id, &actor, &req)?;
            calibration::instructor_grade_view(tx, &id)
        })
        .await?;
    Ok(Json(view))
}

pub(super) async fn instructor_grade(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<InstructorGradeView>> {
    load_managed(&st, &mut c, id.clone()).await?;
    Ok(Json(
        st.store
            .read(move |conn| calibration::instructor_grade_view(conn, &id))
            .await?,
    ))
}

async fn exemplar(
    st: AppState,
    mut c: crate::auth::Claims,
    id: String,
    on: bool,
) -> Result<Json<InstructorGradeView>> {
    load_managed(&st, &mut c, id.clone()).await?;
    let actor = c.actor();
    let view = st
        .store
        .write(move |tx| {
            calibration::set_exemplar(tx, &id, &actor, on)?;
            calibration::instructor_grade_view(tx, &id)
        })
        .await?;
    Ok(Json(view))
}

pub(super) async fn mark_exemplar(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<InstructorGradeView>> {
    exemplar(st, c, id, true).await
}

pub(super) async fn unmark_exemplar(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<InstructorGradeView>> {
    exemplar(st, c, id, false).await
}
