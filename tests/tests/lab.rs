//! A shortened lab day (`viva-lab`, 6 students, short clips, everyone at
//! once) on the real daemon, the real workers and the independent LTI
//! platform (`tests/lti-platform/lti_platform.py`), which this test starts
//! itself and then inspects: the platform's own record of line items and
//! scores, and the daemon's database, are the truth here, not the lab's
//! report.
//!
//! Needs the real models (`$VIVA_MODELS_DIR`), `viva-lab`, `viva` and the
//! worker binaries in target/<profile> (`cargo test --workspace` or
//! scripts/test builds them), and a Python with lti1p3platform (scripts/test
//! makes one). Without the platform it says so and passes, unless
//! VIVA_REQUIRE_LTI_PLATFORM=1.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use viva_tests::lab_bin;
use viva_tests::platform::Platform;
use viva_tests::real::models_dir;

/// How long one `viva-lab` may run: its own `--timeout` (15 minutes for the
/// Viva run) plus recordings, start-up and the report.
const LAB_DEADLINE: Duration = Duration::from_secs(25 * 60);

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

/// `viva-lab --profile h100`: the lab at GPU scale on the fake workers
/// (one H100 serving Whisper large-v3 and two 8 B evaluators, ten times
/// faster), after a warm-up and a restart, under two-phase and under `auto`
/// (which the workers' measured GPU memory, well inside the H100's, turns
/// into pipelined). The platform gets every grade once; the report carries
/// the profile's lower bound and the ETA error at upload of the first
/// arrivals. The timing targets are the benchmark's (README), not this
/// test's.
#[test]
fn a_gpu_scale_lab_grades_everyone_and_reports_against_the_profile() {
    let Some(platform) = Platform::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let report_dir = dir.path().join("lab");
    let mut cmd = Command::new(lab_bin());
    cmd.args([
        "--profile",
        "h100",
        "--students",
        "12",
        "--min-seconds",
        "10",
        "--max-seconds",
        "40",
        "--arrival",
        "spread:60",
        "--warm-up",
        "2",
        "--policies",
        "two-phase,auto",
        "--timeout",
        "10m",
        "--platform-url",
        &platform.base,
        "--report",
    ])
    .arg(&report_dir);
    on_postgres_if_asked(&mut cmd);
    let (status, stdout, stderr) =
        run_with_deadline(cmd, &report_dir.with_extension("out"), LAB_DEADLINE);
    assert!(
        status.success(),
        "viva-lab failed ({status}):\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(report_dir.join("report.json")).expect("report.json"),
    )
    .expect("report JSON");
    assert_eq!(report["ok"], true, "{stdout}");
    assert_eq!(
        report["lower_bound"]["profile"], "h100",
        "{}",
        report["lower_bound"]
    );
    assert!(
        report["lower_bound"]["full_scale_seconds"]
            .as_f64()
            .is_some_and(|s| s > 60.0),
        "{}",
        report["lower_bound"]
    );
    assert!(stderr.contains("warm-up: 2 uploads"), "{stderr}");
    assert!(
        stderr.contains("phase pipelined"),
        "auto ran pipelined: {stderr}"
    );
    let two = report["lower_bound"]["two_phase_full_scale_seconds"].as_f64();
    let co = report["lower_bound"]["full_scale_seconds"].as_f64();
    assert!(
        matches!((two, co), (Some(t), Some(c)) if t >= c),
        "two-phase's own bound is never below the co-resident one: {}",
        report["lower_bound"]
    );
    for e in report["eta"].as_array().expect("eta") {
        assert!(
            e["first_batch_at_upload_n"].as_u64().is_some_and(|n| n > 0),
            "{e}"
        );
        assert!(
            e["first_arrivals_at_upload_n"]
                .as_u64()
                .is_some_and(|n| n > 0),
            "{e}"
        );
    }
    assert!(
        stdout.contains("GPU profile h100 at full scale (auto)"),
        "{stdout}"
    );
}

/// Runs a 6-student two-phase lab (2–4 s clips, everyone at once) against
/// `platform`; returns the report, stdout and stderr.
fn lab(platform: &Platform, report_dir: &Path, extra: &[&str]) -> (Value, String, String) {
    let mut cmd = Command::new(lab_bin());
    cmd.args([
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
    .env("VIVA_MODELS_DIR", models_dir());
    on_postgres_if_asked(&mut cmd);
    let logs = report_dir.with_extension("out");
    let (status, stdout, stderr) = run_with_deadline(cmd, &logs, LAB_DEADLINE);
    assert!(
        status.success(),
        "viva-lab failed ({status}):\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(report_dir.join("report.json")).expect("report.json"),
    )
    .expect("report JSON");
    assert_eq!(report["ok"], true);
    (report, stdout, stderr)
}

/// With `VIVA_TEST_STORE=postgres`, the lab's daemons keep their stores in
/// fresh databases of this test process's PostgreSQL (which outlives the
/// lab, so the checks can read them).
fn on_postgres_if_asked(cmd: &mut Command) {
    if viva_tests::pg::enabled() {
        let admin = viva_tests::pg::admin_url().expect("the test PostgreSQL");
        cmd.arg("--postgres").env("VIVA_TEST_POSTGRES", admin);
    }
}

/// Runs `cmd` in its own process group with stdout and stderr in files under
/// `dir` (no pipe to fill), waiting at most `deadline`: past it the whole
/// group (viva-lab, its daemon, hence the daemon's workers) is killed and
/// the test fails with what the command printed.
fn run_with_deadline(
    mut cmd: Command,
    dir: &Path,
    deadline: Duration,
) -> (std::process::ExitStatus, String, String) {
    std::fs::create_dir_all(dir).expect("log dir");
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .process_group(0)
        .spawn()
        .expect("start viva-lab");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().expect("wait for viva-lab") {
            return (status, read(&out_path), read(&err_path));
        }
        if Instant::now() > until {
            // SAFETY: SIGKILL to the process group of a child we spawned
            // with process_group(0) and have not reaped (its pid is the
            // group's id).
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            panic!(
                "viva-lab ran past {deadline:?} and was killed:\n{}\n{}",
                read(&out_path),
                read(&err_path)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
            reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client")
                .get(format!("{}/control/log", platform.base))
                .send()
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
    let rows = released_rows(run_dir);
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

/// (user, state, score) of every submission, from the run's store (the
/// SQLite file, or the PostgreSQL database its viva.toml names).
fn released_rows(run_dir: &Path) -> Vec<(String, String, Option<String>)> {
    use viva_daemon::store::{Location, Store};
    let cfg: toml::Table = std::fs::read_to_string(run_dir.join("viva.toml"))
        .expect("the run's viva.toml")
        .parse()
        .expect("toml");
    let location = match cfg.get("store").and_then(|v| v.as_str()) {
        Some(url) => Location::Postgres(url.to_owned()),
        None => Location::Sqlite(run_dir.join("var/viva.db")),
    };
    let store = Store::open_at(&location).expect("the daemon's store");
    store
        .read_blocking(|c| {
            Ok(c.prepare(
                "SELECT u.id, s.state, s.score FROM submissions s JOIN users u ON u.id = s.user_id",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<viva_daemon::db::Result<_>>()?)
        })
        .expect("rows")
}
