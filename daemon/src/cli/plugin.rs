//! `viva plugin run | info`: the plugin author's test bench (no daemon, no
//! database), and the hidden `compile-child` the daemon runs to compile an
//! upload under its own limits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use viva_plugins::{HostOptions, Limits, Plugin, PluginHost, ScoreRequest, builtin};

use crate::config::PluginsConfig;

#[derive(Subcommand, Debug)]
pub enum PluginAction {
    /// Run a plugin on a request file; print the report, the plugin's log,
    /// fuel used, peak memory and time.
    Run {
        /// A .wasm component, or a built-in plugin's name (weighted-criteria, holistic-band).
        plugin: String,
        /// A request file: rubric, submission, evaluations, config (see plugins/examples/).
        request: PathBuf,
        /// Instruction budget per call (default: the configured plugins.fuel); 0 turns metering off.
        #[arg(long)]
        fuel: Option<u64>,
        /// Wall-clock limit per call, e.g. "500ms" (default: plugins.deadline).
        #[arg(long)]
        deadline: Option<humantime::Duration>,
        /// Run the call this many times and report the median time (warm calls).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a plugin's name, version, description, configuration schema and default.
    Info {
        /// A .wasm component, or a built-in plugin's name.
        plugin: String,
    },
    /// Compile a component from stdin to stdout (used by the daemon for uploads).
    #[command(hide = true)]
    CompileChild,
}

pub fn run(
    action: &PluginAction,
    config: impl FnOnce() -> anyhow::Result<PluginsConfig>,
) -> anyhow::Result<ExitCode> {
    match action {
        PluginAction::CompileChild => {
            match viva_plugins::run_compile_child(std::io::stdin().lock(), std::io::stdout().lock())
            {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PluginAction::Info { plugin } => {
            let cfg = config()?;
            let (plugin, _) = load(plugin, cfg.limits(), &cfg)?;
            println!("{}", serde_json::to_string_pretty(plugin.info())?);
            Ok(ExitCode::SUCCESS)
        }
        PluginAction::Run {
            plugin,
            request,
            fuel,
            deadline,
            repeat,
            json,
        } => {
            let cfg = config()?;
            let mut limits = cfg.limits();
            if let Some(f) = fuel {
                limits.fuel = (*f > 0).then_some(*f);
            }
            if let Some(d) = deadline {
                limits.deadline = Duration::from(*d);
            }
            let text = std::fs::read_to_string(request)
                .with_context(|| format!("reading the request file {}", request.display()))?;
            let req: ScoreRequest = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a scoring request (see plugins/examples/ for the format)",
                    request.display()
                )
            })?;
            req.rubric
                .validate()
                .with_context(|| format!("the rubric in {}", request.display()))?;
            let (plugin, source) = load(plugin, limits.clone(), &cfg)?;
            bench(&plugin, &source, &req, &limits, (*repeat).max(1), *json)
        }
    }
}

/// Loads a file or a built-in plugin with `limits`; returns it and a label.
fn load(spec: &str, limits: Limits, cfg: &PluginsConfig) -> anyhow::Result<(Plugin, String)> {
    let path = Path::new(spec);
    let (bytes, source) = if path.exists() {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        (bytes, path.display().to_string())
    } else if let Some((name, bytes)) = builtin::all().into_iter().find(|(n, _)| *n == spec) {
        (bytes.to_vec(), format!("built-in {name}"))
    } else {
        bail!(
            "{spec}: no such file, and not a built-in plugin ({})",
            builtin::all().map(|(n, _)| n).join(", ")
        );
    };
    let host = PluginHost::new(HostOptions {
        limits,
        max_component_bytes: cfg.max_upload_bytes,
        ..HostOptions::default()
    })?;
    let plugin = host.load(&bytes)?;
    Ok((plugin, source))
}

fn bench(
    plugin: &Plugin,
    source: &str,
    req: &ScoreRequest,
    limits: &Limits,
    repeat: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let info = plugin.info();
    let load = plugin.load_stats();
    let config_check = plugin.validate_config(&req.config);
    let mut times = Vec::new();
    let mut outcome = None;
    if config_check.is_ok() {
        for _ in 0..repeat {
            let r = plugin.score_with_limits(req, limits);
            if let Ok(s) = &r {
                times.push(s.usage.elapsed_us);
            }
            let failed = r.is_err();
            outcome = Some(r);
            if failed {
                break;
            }
        }
    }
    times.sort_unstable();
    let median_us = times.get(times.len() / 2).copied();
    if json {
        let mut v = serde_json::json!({
            "plugin": info,
            "sha256": plugin.sha256(),
            "source": source,
            "load": load,
        });
        match (&config_check, &outcome) {
            (Err(e), _) => v["error"] = serde_json::json!(e.to_string()),
            (Ok(()), Some(Ok(s))) => {
                v["report"] = serde_json::to_value(&s.report)?;
                v["usage"] = serde_json::to_value(s.usage)?;
                v["log"] = serde_json::to_value(&s.log)?;
                v["median_call_us"] = serde_json::json!(median_us);
                v["calls"] = serde_json::json!(times.len());
            }
            (Ok(()), Some(Err(e))) => {
                v["error"] = serde_json::json!(e.to_string());
                v["failure"] = serde_json::to_value(e.failure())?;
                v["log"] = serde_json::to_value(e.call_log())?;
            }
            (Ok(()), None) => {}
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "plugin    {} {} ({source}, {} KiB, sha256 {}…)",
            info.name,
            info.version,
            plugin.size_bytes() / 1024,
            &plugin.sha256()[..12]
        );
        println!(
            "loaded    compiled in {:.1} ms, prepared in {:.1} ms",
            load.compile_us as f64 / 1000.0,
            load.prepare_us as f64 / 1000.0
        );
        match &config_check {
            Ok(()) => println!("config    {} (valid)", req.config),
            Err(e) => {
                println!("config    {}", req.config);
                println!("error     {e}");
            }
        }
        match &outcome {
            Some(Ok(s)) => {
                let r = &s.report;
                let pct = if r.max > 0.0 {
                    r.total / r.max * 100.0
                } else {
                    0.0
                };
                println!("total     {:.2} of {:.2} ({pct:.0}%)", r.total, r.max);
                if r.needs_review {
                    println!("review    needed:");
                    for reason in &r.review_reasons {
                        println!("            - {reason}");
                    }
                } else {
                    println!("review    not needed");
                }
                println!("criteria");
                for c in &r.criteria {
                    println!(
                        "  {:<16} {:>6.2}  {:<14} {}",
                        c.criterion_id,
                        c.points,
                        c.level.as_deref().unwrap_or("-"),
                        c.feedback
                    );
                }
                println!("feedback");
                for line in r.feedback.lines() {
                    println!("  {line}");
                }
                print_log(&s.log);
                print_usage(&s.usage, limits);
                if times.len() > 1
                    && let Some(m) = median_us
                {
                    println!(
                        "warm      median {:.3} ms over {} calls (instantiate + call)",
                        m as f64 / 1000.0,
                        times.len()
                    );
                }
            }
            Some(Err(e)) => {
                println!("error     {e}");
                if let Some(log) = e.call_log() {
                    print_log(log);
                }
                if let viva_plugins::Error::Call { usage, .. } = e {
                    print_usage(usage, limits);
                }
            }
            None => {}
        }
    }
    let ok = config_check.is_ok() && matches!(outcome, Some(Ok(_)));
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_log(log: &viva_plugins::CallLog) {
    if log.is_empty() {
        println!("log       (empty)");
    } else {
        println!("log");
        for line in log.text().lines() {
            println!("  {line}");
        }
    }
}

fn print_usage(u: &viva_plugins::Usage, limits: &Limits) {
    let fuel = match (u.fuel_consumed, limits.fuel) {
        (Some(f), Some(l)) => format!("{f} of {l} instructions"),
        _ => "unmetered".to_owned(),
    };
    println!(
        "usage     fuel {fuel} · peak memory {:.2} MiB of {} MiB · time {:.3} ms (instantiate + call)",
        u.peak_memory_bytes as f64 / (1 << 20) as f64,
        limits.memory_bytes >> 20,
        u.elapsed_us as f64 / 1000.0
    );
}
