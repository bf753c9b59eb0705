//! `hostile`: a test-only plugin that misbehaves on request, so the host's
//! sandbox and limits can be tested against a real component. Never shipped
//! or embedded; `viva-plugins`' tests load it from the build directory.
//!
//! The configuration picks the misbehaviour: `{"mode": "loop"}` and so on
//! (see [`Mode`]).

use serde::Deserialize;
use viva_plugin_sdk::{
    CriterionScore, Plugin, PluginInfo, ScoreError, ScoreReport, ScoreRequest, parse_config,
};

#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    /// A valid report.
    #[default]
    Ok,
    /// `loop {}`: stopped by fuel, or by the deadline when fuel is off.
    Loop,
    /// Grows memory without bound: stopped by the memory cap.
    Alloc,
    /// Unbounded recursion: stopped by the stack limit.
    Recurse,
    /// Panics with a message the host must capture.
    Panic,
    /// Returns a feedback string of `size` bytes.
    HugeOutput,
    /// Points above the criterion's best level.
    OutOfRange,
    /// A criterion id the rubric does not have.
    UnknownCriterion,
    /// A NaN total.
    Nan,
    /// Writes `size` bytes to stdout and a line to stderr, then succeeds.
    Flood,
    /// Probes the sandbox (environment, files, clock, randomness) and
    /// reports what it saw in the feedback.
    Probe,
    /// Returns a typed score error.
    Refuse,
    /// Logs `size` bytes through the host's log import, then succeeds.
    LogFlood,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
struct Config {
    mode: Mode,
    size: Option<usize>,
}

struct Hostile;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "hostile".into(),
            version: "0.0.1".into(),
            description: "Misbehaves on request (tests only).".into(),
            config_schema: r#"{"type":"object","properties":{"mode":{"type":"string"},"size":{"type":"integer","minimum":0}}}"#.into(),
            default_config: "{}".into(),
        }
    }

    fn validate_config(config: &str) -> Result<(), String> {
        parse_config::<Config>(config).map(|_| ())
    }

    fn score(request: ScoreRequest) -> Result<ScoreReport, ScoreError> {
        let config: Config = parse_config(&request.config).map_err(ScoreError::InvalidConfig)?;
        let size = config.size.unwrap_or(8 << 20);
        let mut report = ok_report(&request);
        match config.mode {
            Mode::Ok => {}
            Mode::Loop => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            Mode::Alloc => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Mode::Recurse => {
                report.total = depth(std::hint::black_box(u64::MAX)) as f64;
            }
            Mode::Panic => panic!("hostile plugin panicked on purpose (code 42)"),
            Mode::HugeOutput => report.feedback = "x".repeat(size),
            Mode::OutOfRange => {
                if let Some(c) = report.criteria.first_mut() {
                    c.points += 100.0;
                }
            }
            Mode::UnknownCriterion => {
                if let Some(c) = report.criteria.first_mut() {
                    c.criterion_id = "no-such-criterion".into();
                }
            }
            Mode::Nan => report.total = f64::NAN,
            Mode::Flood => {
                let line = "y".repeat(1023);
                for _ in 0..size / 1024 {
                    println!("{line}");
                }
                eprintln!("stderr is captured too");
            }
            Mode::Probe => report.feedback = probe(),
            Mode::Refuse => {
                return Err(ScoreError::InvalidInput(
                    "refusing on purpose: rating for 'content' names level 'great'".into(),
                ));
            }
            Mode::LogFlood => {
                let line = "z".repeat(1000);
                for _ in 0..size / 1000 {
                    viva_plugin_sdk::info!("{line}");
                }
            }
        }
        Ok(report)
    }
}

viva_plugin_sdk::export_plugin!(Hostile);

fn ok_report(request: &ScoreRequest) -> ScoreReport {
    let criteria: Vec<CriterionScore> = request
        .rubric
        .criteria
        .iter()
        .map(|c| CriterionScore {
            criterion_id: c.id.clone(),
            points: c.max_points(),
            level: None,
            feedback: String::new(),
        })
        .collect();
    ScoreReport {
        criteria,
        total: request.rubric.max_total(),
        max: request.rubric.max_total(),
        feedback: "ok".into(),
        needs_review: false,
        review_reasons: Vec::new(),
    }
}

#[inline(never)]
fn depth(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        1 + std::hint::black_box(depth(std::hint::black_box(n - 1)))
    }
}

fn probe() -> String {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let args: Vec<String> = std::env::args().collect();
    let file = std::fs::read_to_string("/etc/passwd").is_ok();
    let cwd = std::fs::read_dir(".").is_ok();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(u64::MAX);
    let t0 = std::time::Instant::now();
    let elapsed = t0.elapsed().as_nanos();
    let random = std::collections::hash_map::RandomState::new();
    let mut h = std::hash::BuildHasher::build_hasher(&random);
    std::hash::Hasher::write_u8(&mut h, 1);
    let hash = std::hash::Hasher::finish(&h);
    let net = std::net::TcpStream::connect("127.0.0.1:9").is_ok();
    serde_json::json!({
        "env": env.len(),
        "args": args.len(),
        "file": file,
        "cwd": cwd,
        "unix_seconds": now,
        "elapsed_ns": elapsed,
        "hash": hash.to_string(),
        "net": net,
    })
    .to_string()
}
