//! Several nodes on one PostgreSQL queue against one node, on the same
//! fake-worker load: real `viva serve` processes, real uploads (ffmpeg),
//! a throwaway PostgreSQL cluster (`viva_tests::pg`). Prints a table:
//! wall time and throughput, and the queue's claim latency (the
//! `viva_claim_seconds` histogram of every node that claims, merged).
//!
//! `cargo bench -p viva-tests --bench nodes` (after `cargo build --bin viva
//! --bin fake-worker`); `VIVA_BENCH_UPLOADS` (default 60).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use viva_tests::nodes::{FakeTimes, session, start, upload, write_config};
use viva_tests::process::Daemon;
use viva_tests::tone;

const TIMES: FakeTimes = FakeTimes {
    stt_ms: 1000,
    eval_ms: 400,
};

struct Run {
    label: String,
    claimers: usize,
    wall: Duration,
    graded: usize,
    /// Merged claim histogram: upper bound (s) → cumulative count.
    claims: BTreeMap<u64, (f64, u64)>,
    claim_sum: f64,
    claim_count: u64,
}

/// `viva_claim_seconds` buckets of one node's /metrics.
async fn claim_histogram(url: &str) -> (Vec<(f64, u64)>, f64, u64) {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let mut buckets = Vec::new();
    let (mut sum, mut count) = (0.0, 0);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("viva_claim_seconds_bucket{le=\"") {
            let Some((le, n)) = rest.split_once("\"} ") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            buckets.push((le, n.trim().parse().unwrap_or(0)));
        } else if let Some(v) = line.strip_prefix("viva_claim_seconds_sum ") {
            sum = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("viva_claim_seconds_count ") {
            count = v.trim().parse().unwrap_or(0);
        }
    }
    (buckets, sum, count)
}

fn quantile(run: &Run, q: f64) -> String {
    let want = (q * run.claim_count as f64).ceil() as u64;
    for (le, n) in run.claims.values() {
        if *n >= want.max(1) {
            return if le.is_finite() {
                format!("≤ {:.1} ms", le * 1000.0)
            } else {
                "> 5 s".into()
            };
        }
    }
    "-".into()
}

async fn run(label: &str, gpu_nodes: usize, uploads: usize, media: &Path) -> Run {
    let root = tempfile::tempdir().expect("tmp");
    let url = viva_tests::pg::fresh_database().expect("a database");
    // One node does everything, or one api node and `gpu_nodes` gpu nodes.
    let (api_cfg, mut nodes): (_, Vec<Daemon>) = if gpu_nodes == 0 {
        let cfg = write_config(&root.path().join("all"), &url, "all-1", "all", TIMES);
        let d = start(&cfg);
        (cfg, vec![d])
    } else {
        let cfg = write_config(&root.path().join("api"), &url, "api-1", "api", TIMES);
        let mut v = vec![start(&cfg)];
        for i in 0..gpu_nodes {
            let c = write_config(
                &root.path().join(format!("gpu{i}")),
                &url,
                &format!("gpu-{i}"),
                "gpu",
                TIMES,
            );
            v.push(start(&c));
        }
        (cfg, v)
    };
    let student = session(&api_cfg, "learner", "bench-student");
    let admin = session(&api_cfg, "admin", "bench-admin");
    let api_url = nodes[0].url();
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for i in 0..uploads {
        let f = media.join(format!("u{:02}.wav", i % 20));
        if let Some(id) = upload(&client, &api_url, &student, &f).await {
            ids.push(id);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut graded = 0;
    while Instant::now() < deadline {
        graded = 0;
        for id in &ids {
            let v = viva_tests::nodes::get_json(
                &client,
                &format!("{api_url}/api/v1/submissions/{id}"),
                &admin,
            )
            .await;
            if matches!(v["state"].as_str(), Some("awaiting_review" | "released")) {
                graded += 1;
            }
        }
        if graded == ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let wall = t0.elapsed();
    let mut claims: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
    let (mut claim_sum, mut claim_count) = (0.0, 0);
    let claimers = if gpu_nodes == 0 { 1 } else { gpu_nodes };
    let skip = if gpu_nodes == 0 { 0 } else { 1 };
    for node in nodes.iter().skip(skip) {
        let (buckets, sum, count) = claim_histogram(&node.url()).await;
        for (le, n) in buckets {
            let e = claims.entry(le.to_bits()).or_insert((le, 0));
            e.1 += n;
        }
        claim_sum += sum;
        claim_count += count;
    }
    // Buckets sorted by bound (positive doubles sort as their bits).
    for n in &mut nodes {
        let _ = n.kill();
    }
    Run {
        label: label.to_owned(),
        claimers,
        wall,
        graded,
        claims,
        claim_sum,
        claim_count,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if viva_tests::pg::bin_dir().is_none() && std::env::var_os("VIVA_TEST_POSTGRES").is_none() {
        eprintln!("PostgreSQL's server is not installed (apt-get install postgresql)");
        std::process::exit(1);
    }
    let uploads: usize = std::env::var("VIVA_BENCH_UPLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let media = tempfile::tempdir().expect("tmp");
    for i in 0..20 {
        tone(
            media.path(),
            &format!("u{i:02}.wav"),
            1.0 + (i % 3) as f64 * 0.5,
        );
    }
    println!(
        "{uploads} uploads (1–2 s tones) through the api node; fake workers: STT {} ms per job, evaluation {} ms per call; two-phase per node",
        TIMES.stt_ms, TIMES.eval_ms
    );
    let runs = vec![
        run("one node (all)", 0, uploads, media.path()).await,
        run("1 api + 2 gpu", 2, uploads, media.path()).await,
        run("1 api + 8 gpu", 8, uploads, media.path()).await,
    ];
    let base = runs[0].wall.as_secs_f64();
    println!();
    println!(
        "| setup | nodes claiming | graded | wall | throughput | vs one node | claims | claim mean | claim p50 | claim p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        let wall = r.wall.as_secs_f64();
        println!(
            "| {} | {} | {} | {:.1} s | {:.2} /s | {:.2}× | {} | {:.1} ms | {} | {} |",
            r.label,
            r.claimers,
            r.graded,
            wall,
            r.graded as f64 / wall,
            base / wall,
            r.claim_count,
            if r.claim_count > 0 {
                1000.0 * r.claim_sum / r.claim_count as f64
            } else {
                0.0
            },
            quantile(r, 0.5),
            quantile(r, 0.99),
        );
    }
}
