//! A shortened lab day (`viva lab`, 6 students, short clips, everyone at
//! once) on the real daemon, the real workers and the independent LTI
//! platform (`tests/lti-platform/lti_platform.py`), which this test starts
//! itself and then inspects: the platform's own record of line items and
//! scores, and the daemon's database, are the truth here, not the lab's
//! report.
//!
//! Needs the real models (`$VIVA_MODELS_DIR`), the worker binaries next to
//! `viva`, and a Python with lti1p3platform (scripts/test makes one).
//! Without the platform it says so and passes, unless
//! VIVA_REQUIRE_LTI_PLATFORM=1.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use viva_tests::platform::Platform;
use viva_tests::real::models_dir;
use viva_tests::viva_bin;

#[test]
fn a_short_lab_ends_with_one_line_item_and_one_released_score_per_student() {
    let Some(platform) = Platform::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let report_dir = dir.path().join("lab");
    let (report, stdout, stderr) = lab(&platform, &report_dir, &[]);
    // The long command prints its progress, the table and the summary.
    assert!(stderr.contains("phase stt#1"), "{stderr}");
    assert!(stdout.contains("== Summary =="), "{stdout}");
    let png = std::fs::read(report_dir.join("chart.png")).expect("chart.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "chart is a PNG");
    check_final_state(&platform, &report, &report_dir.join("work/viva-two-phase"));
}

/// The same lab under `--chaos`: the daemon killed with SIGKILL four times
/// and restarted on its data directory, workers killed during jobs, score
/// posts answered 500/503 and three stalled longer than Viva's AGS timeout.
/// The platform must end in the same state as without chaos.
#[test]
fn a_lab_under_chaos_loses_and_duplicates_no_grade() {
    let Some(platform) = Platform::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let report_dir = dir.path().join("lab");
    let (report, stdout, _) = lab(
        &platform,
        &report_dir,
        &["--chaos", "--chaos-kills", "4", "--chaos-stall", "35s"],
    );
    let chaos = &report["viva"][0]["chaos"];
    assert_eq!(chaos["daemon_kills"], 4, "{chaos}");
    assert_eq!(chaos["score_failures_injected"], 8, "{chaos}");
    assert_eq!(chaos["score_stalls_injected"], 3, "{chaos}");
    assert!(stdout.contains("daemon kill -9s"), "{stdout}");
    let f = &report["viva"][0]["final_state"];
    for k in ["lost", "duplicated", "wrong", "regressed"] {
        assert_eq!(f[k].as_array().map(Vec::len), Some(0), "{k}: {f}");
    }
    check_final_state(
        &platform,
        &report,
        &report_dir.join("work/viva-two-phase-chaos"),
    );
}

/// Runs a 6-student two-phase lab (2–4 s clips, everyone at once) against
/// `platform`; returns the report, stdout and stderr.
fn lab(platform: &Platform, report_dir: &Path, extra: &[&str]) -> (Value, String, String) {
    let out = Command::new(viva_bin())
        .args([
            "lab",
            "--students",
            "6",
            "--min-seconds",
            "2",
            "--max-seconds",
            "4",
            "--arrival",
            "all",
            "--no-baselines",
            "--policies",
            "two-phase",
            "--batch-window",
            "2s",
            "--timeout",
            "15m",
            "--platform-url",
            &platform.base,
            "--report",
        ])
        .arg(report_dir)
        .args(extra)
        .env("VIVA_MODELS_DIR", models_dir())
        .output()
        .expect("run viva lab");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "viva lab failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(report_dir.join("report.json")).expect("report.json"),
    )
    .expect("report JSON");
    assert_eq!(report["ok"], true);
    (report, stdout, stderr)
}

/// The platform's own record of line items and scores and the daemon's
/// database (in `run_dir`) against the definition of done: one line item,
/// one current FullyGraded score per good student equal to the released
/// grade, earlier scores only PendingManual, the bad file refused with a
/// reason.
fn check_final_state(platform: &Platform, report: &Value, run_dir: &Path) {
    // Which students sent good files, which bad ones (the lab's plan).
    let students = report["students"].as_array().expect("students");
    assert_eq!(students.len(), 6);
    let bad: HashSet<&str> = students
        .iter()
        .filter(|s| matches!(s["kind"].as_str(), Some("corrupt" | "truncated" | "silent")))
        .filter_map(|s| s["user"].as_str())
        .collect();
    let good: Vec<&str> = students
        .iter()
        .filter_map(|s| s["user"].as_str())
        .filter(|u| !bad.contains(u))
        .collect();
    assert_eq!(bad.len(), 1, "one corrupt file among six");
    assert_eq!(good.len(), 5);

    // The platform's own record.
    let log: Value = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            reqwest::get(format!("{}/control/log", platform.base))
                .await
                .expect("platform log")
                .json()
                .await
                .expect("log JSON")
        });
    let items: Vec<&Value> = log["line_items"]
        .as_array()
        .expect("line items")
        .iter()
        .filter(|i| i["resourceLinkId"] == "rl-lab-two-phase")
        .collect();
    assert_eq!(items.len(), 1, "exactly one line item: {items:?}");
    let item_no: u64 = items[0]["id"]
        .as_str()
        .and_then(|u| {
            u.split("/lineitems/")
                .nth(1)?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .expect("line item number");

    // The daemon's database: what was released, with which grade.
    let db = run_dir.join("var/viva.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("daemon database");
    let mut stmt = conn
        .prepare(
            "SELECT u.id, s.state, s.score FROM submissions s JOIN users u ON u.id = s.user_id",
        )
        .expect("query");
    let rows: Vec<(String, String, Option<String>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    // One submission per good student, all released; none for the bad file.
    assert_eq!(rows.len(), good.len(), "{rows:?}");
    assert!(rows.iter().all(|r| r.1 == "released"), "{rows:?}");
    let released: Vec<f64> = rows
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_str(r.2.as_deref().expect("score")).expect("json");
            v["total"].as_f64().expect("total")
        })
        .collect();

    // Scores by student: all on the one line item, the current one (latest
    // timestamp) FullyGraded, equal to the released grade of that student.
    let mut by_user: HashMap<String, Vec<&Value>> = HashMap::new();
    for s in log["scores"].as_array().expect("scores") {
        if s.get("refused").is_some() {
            continue;
        }
        assert_eq!(
            s["lineitem"].as_u64(),
            Some(item_no),
            "score on another line item: {s}"
        );
        let user = s["body"]["userId"].as_str().expect("userId").to_owned();
        by_user.entry(user).or_default().push(s);
    }
    let mut users: Vec<&String> = by_user.keys().collect();
    users.sort();
    let mut want: Vec<String> = good.iter().map(|u| (*u).to_owned()).collect();
    want.sort();
    assert_eq!(
        users,
        want.iter().collect::<Vec<_>>(),
        "one set of scores per good student, none for the bad file"
    );
    let report_viva = &report["viva"][0]["students"];
    for (user, scores) in &by_user {
        let current = scores
            .iter()
            .max_by(|a, b| {
                a["body"]["timestamp"]
                    .as_str()
                    .cmp(&b["body"]["timestamp"].as_str())
            })
            .expect("a score");
        assert_eq!(
            current["body"]["gradingProgress"], "FullyGraded",
            "{user}: {current}"
        );
        let given = current["body"]["scoreGiven"].as_f64().expect("scoreGiven");
        // Equal to the released grade stored for this student.
        let mine = report_viva
            .as_array()
            .expect("students")
            .iter()
            .find(|s| s["user"] == user.as_str())
            .expect("student in report");
        assert_eq!(mine["state"], "released");
        assert_eq!(mine["score"].as_f64(), Some(given), "{user}");
        assert!(
            released.iter().any(|r| (r - given).abs() < 1e-9),
            "{user}: {given} not among {released:?}"
        );
        // Any PendingManual came before the FullyGraded (no regression).
        for s in scores {
            if s["body"]["gradingProgress"] != "FullyGraded" {
                assert_eq!(s["body"]["gradingProgress"], "PendingManual");
                assert!(s["body"]["timestamp"].as_str() < current["body"]["timestamp"].as_str());
            }
        }
    }

    // The bad file failed with a clear reason, at upload.
    let bad_user = bad.iter().next().expect("bad");
    let bad_run = report_viva
        .as_array()
        .expect("students")
        .iter()
        .find(|s| s["user"] == *bad_user)
        .expect("bad student in report");
    assert!(bad_run["submission"].is_null(), "{bad_run}");
    assert!(
        bad_run["rejected"]["status"]
            .as_u64()
            .is_some_and(|s| (400..500).contains(&s)),
        "{bad_run}"
    );
    assert!(
        !bad_run["rejected"]["code"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{bad_run}"
    );
    assert!(
        bad_run["rejected"]["message"].as_str().unwrap_or("").len() > 20,
        "{bad_run}"
    );
}
