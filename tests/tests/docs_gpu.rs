//! docs/gpu.md works as written: its example configuration goes through the
//! daemon's own parser (`Config::load`, unknown keys refused), every
//! worker's `args` and `options` through that worker's own parser (the
//! worker binary's `--check-options`, the check its `Load` makes), the
//! policy resolves to the two-phase queue, the settings that must agree do,
//! the option tables list exactly the options the workers accept (with their
//! defaults), and the guide links only to files that exist.
//!
//! The worker binaries must be built first (`cargo test --workspace` builds
//! them; alone: `cargo build --workspace --bin viva-whisper-worker --bin
//! viva-llama-worker`). No model file is needed: options are checked, not
//! loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use viva_daemon::Config;
use viva_daemon::config::{Policy, WorkerConfig};
use viva_tests::process;
use viva_tests::real::worker_bin;

/// The line that marks the example in docs/gpu.md; the next ```toml block
/// is the example.
const MARKER: &str = "<!-- gpu-example: checked by tests/tests/docs_gpu.rs -->";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn guide() -> String {
    let path = repo().join("docs/gpu.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The example configuration block of the guide.
fn example_toml(guide: &str) -> String {
    assert_eq!(
        guide.matches(MARKER).count(),
        1,
        "docs/gpu.md must mark exactly one example with {MARKER}"
    );
    let after = guide.split(MARKER).nth(1).unwrap_or_default();
    let start = after
        .find("```toml\n")
        .unwrap_or_else(|| panic!("no ```toml block after {MARKER}"))
        + "```toml\n".len();
    let len = after[start..]
        .find("\n```")
        .expect("the example's ```toml block is closed");
    after[start..start + len + 1].to_owned()
}

/// The example through `Config::load`, exactly as `viva --config` reads a file.
fn example_config() -> Config {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("viva.toml");
    std::fs::write(&file, example_toml(&guide())).expect("write the example");
    Config::load(Some(&file), std::iter::empty(), &[])
        .unwrap_or_else(|e| panic!("docs/gpu.md's example does not parse: {e}"))
}

/// The arguments the daemon starts `w` with (it adds `--role` to an
/// evaluator's arguments when they lack one).
fn daemon_args(w: &WorkerConfig, role: Option<&str>) -> Vec<String> {
    let mut args = w.args.clone();
    if let Some(role) = role
        && !args.iter().any(|a| a == "--role")
    {
        args.extend(["--role".to_owned(), role.to_owned()]);
    }
    args
}

/// Runs `binary args… --check-options <options as the daemon sends them>`:
/// Ok(the options with their defaults) or Err(what the worker said).
fn check(
    binary: &str,
    args: &[String],
    options: &toml::Table,
) -> Result<serde_json::Value, String> {
    // The daemon's own conversion (scheduler.rs: the spec's options).
    let json = serde_json::to_value(options).expect("options as JSON");
    let mut cmd = Command::new(worker_bin(binary));
    cmd.args(args).arg("--check-options").arg(json.to_string());
    let out = process::output(&mut cmd, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{binary} --check-options: {e}"));
    if !out.status.success() {
        return Err(format!(
            "{} ({}): {}",
            process::describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{binary} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn stt(c: &Config) -> &WorkerConfig {
    c.workers
        .stt
        .as_ref()
        .expect("the example configures [workers.stt]")
}

#[test]
fn the_example_parses_and_every_worker_accepts_its_args_and_options() {
    let c = example_config();
    let resolved = check(
        "viva-whisper-worker",
        &daemon_args(stt(&c), None),
        &stt(&c).options,
    )
    .unwrap_or_else(|e| panic!("the whisper worker refuses the example: {e}"));
    assert_eq!(
        resolved["parallel_states"].as_u64(),
        Some(c.scheduler.stt_concurrency as u64),
        "--parallel-states (what the worker advertises and holds states for) must equal \
         scheduler.stt_concurrency (what the daemon sends): {resolved}"
    );
    assert_eq!(
        resolved["use_gpu"], true,
        "the GPU example runs Whisper on the GPU"
    );

    assert_eq!(
        c.workers.evaluators.len(),
        2,
        "two evaluators, as in production"
    );
    for (role, w) in &c.workers.evaluators {
        let resolved = check("viva-llama-worker", &daemon_args(w, Some(role)), &w.options)
            .unwrap_or_else(|e| panic!("the llama worker refuses evaluator {role}: {e}"));
        assert!(
            resolved["gpu_layers"].as_u64().is_some_and(|n| n > 0),
            "evaluator {role} offloads its layers: {resolved}"
        );
        let parallel = resolved["parallel"].as_u64().unwrap_or(0);
        assert!(
            c.scheduler.eval_batch_size as u64 <= parallel,
            "evaluator {role}: a call of eval_batch_size {} items must decode together \
             (options.parallel {parallel})",
            c.scheduler.eval_batch_size
        );
        assert_eq!(
            resolved["flash_attn"], false,
            "evaluator {role}: the example keeps grades independent of batches"
        );
        assert!(w.memory_mb > 0, "evaluator {role} states its memory_mb");
    }
    assert!(stt(&c).memory_mb > 0);
}

#[test]
fn the_example_runs_the_two_phase_queue_within_its_budget() {
    let c = example_config();
    assert_eq!(c.scheduler.policy, Policy::TwoPhase);
    assert_eq!(c.effective_policy(), Policy::TwoPhase);
    // The guide says what `auto` would pick with the example's figures (all
    // three models fit the budget together): keep that sentence true.
    let total = stt(&c).memory_mb
        + c.workers
            .evaluators
            .values()
            .map(|w| w.memory_mb)
            .sum::<u64>();
    let budget = c.scheduler.gpu_memory_budget_mb;
    assert!(budget > 0, "the example states the card's budget");
    let mut auto = c.clone();
    auto.scheduler.policy = Policy::Auto;
    assert_eq!(auto.effective_policy(), Policy::Pipelined);
    let g = guide();
    let sentence = format!(
        "`auto` would pick pipelined here ({} MB ≤ {} MB)",
        group(total),
        group(budget)
    );
    assert!(
        g.contains(&sentence),
        "docs/gpu.md should say {sentence:?} (the example's memory_mb sum and budget)"
    );
    // Each phase alone fits the budget: the evaluation phase holds both
    // evaluators at once.
    let eval: u64 = c.workers.evaluators.values().map(|w| w.memory_mb).sum();
    assert!(eval <= budget && stt(&c).memory_mb <= budget);
}

/// 19000 → "19 000" (the guide's way of writing MB).
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(ch);
    }
    out
}

#[test]
fn an_unknown_option_or_argument_fails_the_check() {
    let c = example_config();
    // The old deploy guide's STT options: `gpu` is no option of the worker.
    let mut bad = stt(&c).options.clone();
    bad.insert("gpu".into(), toml::Value::Boolean(true));
    let e = check("viva-whisper-worker", &daemon_args(stt(&c), None), &bad)
        .expect_err("an unknown whisper option is refused");
    assert!(e.contains("unknown field `gpu`"), "{e}");
    let e = check(
        "viva-whisper-worker",
        &["--parallel-states".into(), "2".into(), "--gpu".into()],
        &toml::Table::new(),
    )
    .expect_err("an unknown argument is refused");
    assert!(e.contains("--gpu"), "{e}");

    let (role, w) = c.workers.evaluators.iter().next().expect("an evaluator");
    let mut bad = w.options.clone();
    bad.insert("flash_attention".into(), toml::Value::Boolean(true));
    let e = check("viva-llama-worker", &daemon_args(w, Some(role)), &bad)
        .expect_err("an unknown llama option is refused");
    assert!(e.contains("unknown field `flash_attention`"), "{e}");
    let mut bad = w.options.clone();
    bad.insert("type_v".into(), toml::Value::String("q8_0".into()));
    let e = check("viva-llama-worker", &daemon_args(w, Some(role)), &bad)
        .expect_err("a quantised V cache without flash attention is refused");
    assert!(e.contains("flash_attn = true"), "{e}");
}

/// The rows of the option table under `heading`: key → default cell.
fn table_rows(guide: &str, heading: &str) -> BTreeMap<String, String> {
    let section = guide
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("docs/gpu.md has no {heading:?}"));
    let mut rows = BTreeMap::new();
    for line in section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(key) = cells
            .get(1)
            .and_then(|k| k.strip_prefix('`'))
            .and_then(|k| k.strip_suffix('`'))
        else {
            continue;
        };
        rows.insert(
            key.to_owned(),
            cells.get(2).copied().unwrap_or("").to_owned(),
        );
    }
    rows
}

/// Every option the worker accepts has a row, every row is an option, and a
/// default written as a plain value is the worker's default.
fn assert_table_matches(guide: &str, heading: &str, defaults: &serde_json::Value) {
    let rows = table_rows(guide, heading);
    let keys: Vec<&String> = defaults
        .as_object()
        .expect("defaults object")
        .keys()
        .collect();
    let documented: Vec<&String> = rows.keys().collect();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(
        documented, want,
        "the table under {heading:?} must list exactly the worker's options"
    );
    for (key, cell) in &rows {
        let Some(literal) = cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
            continue; // a default described in words (depends on the machine)
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(literal) else {
            continue;
        };
        assert_eq!(
            value,
            defaults[key.as_str()],
            "{heading}: the default of `{key}` is {} (the table says {literal})",
            defaults[key.as_str()]
        );
    }
}

#[test]
fn the_option_tables_list_every_option_with_its_default() {
    let g = guide();
    let whisper = check(
        "viva-whisper-worker",
        &["--parallel-states".into(), "1".into()],
        &toml::Table::new(),
    )
    .expect("empty whisper options");
    assert_table_matches(&g, "### viva-whisper-worker options", &whisper);
    let llama = check("viva-llama-worker", &[], &toml::Table::new()).expect("empty llama options");
    assert_table_matches(&g, "### viva-llama-worker options", &llama);
}

#[test]
fn the_guide_links_only_to_files_that_exist() {
    let g = guide();
    let docs = repo().join("docs");
    let mut checked = 0;
    for part in g.split("](").skip(1) {
        let target = part.split(')').next().unwrap_or_default();
        let path = target.split('#').next().unwrap_or_default();
        if path.is_empty() || path.contains("://") {
            continue;
        }
        assert!(
            docs.join(path).exists(),
            "docs/gpu.md links to {target}, which does not exist"
        );
        checked += 1;
    }
    // Paths named in backquotes (outside code blocks) that look like
    // repository files.
    let mut in_block = false;
    let prose: String = g
        .lines()
        .filter(|l| {
            if l.starts_with("```") {
                in_block = !in_block;
                return false;
            }
            !in_block
        })
        .collect::<Vec<_>>()
        .join("\n");
    for part in prose.split('`').skip(1).step_by(2) {
        if (part.ends_with(".md") || part.ends_with(".rs") || part.ends_with(".toml"))
            && !part.contains(' ')
            && !part.starts_with('/')
            && part.contains('/')
        {
            assert!(
                repo().join(part).exists(),
                "docs/gpu.md names {part}, which does not exist"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "the guide links to its neighbours");
}
