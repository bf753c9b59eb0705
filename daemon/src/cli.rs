//! The `viva` command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{Config, LogFormat};
use crate::domain::Role;

mod doctor;
mod models;
mod platform;
mod plugin;

#[derive(Parser, Debug)]
#[command(
    name = "viva",
    version,
    about = "Viva: grades spoken and video assignments"
)]
struct Cli {
    /// Configuration file (default: ./viva.toml when it exists, else
    /// /etc/viva/viva.toml when it exists, as the package installs it).
    #[arg(long, global = true, env = "VIVA_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory: database, media, keys.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, global = true)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Address to listen on.
        #[arg(long)]
        listen: Option<String>,
        /// Enable the built-in sandbox course.
        #[arg(long)]
        sandbox: bool,
    },
    /// Create or upgrade the database, then exit.
    Migrate,
    /// Copy a SQLite store into a new, empty PostgreSQL store (moving a
    /// site to several nodes). Stop the daemon first; the source is only read.
    MigrateStore {
        /// The source: `sqlite:/var/lib/viva/viva.db` (or `sqlite` for this
        /// configuration's data directory).
        #[arg(long)]
        from: String,
        /// The target: `postgres://user:password@host/database` (created
        /// empty beforehand; its schema is made here).
        #[arg(long, env = "VIVA_MIGRATE_TO", hide_env_values = true)]
        to: String,
    },
    /// Check this installation: configuration, data directory, disk,
    /// ffmpeg, each model worker, public_url, clock, platforms, keys,
    /// plugins, database, sandbox. Exits 1 when a check fails.
    Doctor(doctor::DoctorArgs),
    /// Show a running daemon's queue and workers.
    Status {
        #[arg(long, env = "VIVA_URL")]
        url: Option<String>,
        #[arg(long, env = "VIVA_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Upload a recording and follow it to its result.
    Submit {
        file: PathBuf,
        #[arg(long, default_value = "sandbox-oral-1")]
        assignment: String,
        #[arg(long, env = "VIVA_URL")]
        url: Option<String>,
        /// Session token; without one, a learner session for --user in the
        /// sandbox course is minted from the local data directory.
        #[arg(long, env = "VIVA_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[arg(long, default_value = "cli-student")]
        user: String,
        /// Return after the upload instead of following processing.
        #[arg(long)]
        no_follow: bool,
    },
    /// Mint a session token from the local key (for scripts and tests).
    Session {
        #[arg(long, value_parser = ["learner", "instructor", "admin"])]
        role: Vec<String>,
        #[arg(long)]
        user: String,
        #[arg(long)]
        context: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete media past its retention period now.
    Purge,
    /// Export or delete one student's data.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Fetch, verify, list or convert model files.
    Models {
        #[command(subcommand)]
        action: models::ModelsAction,
    },
    /// Run a rubric plugin locally on a request file (the plugin author's test bench).
    Plugin {
        #[command(subcommand)]
        action: plugin::PluginAction,
    },
    /// Add, invite, list or remove LTI platform registrations.
    Platform {
        #[command(subcommand)]
        action: platform::PlatformAction,
    },
    /// Act on a running daemon's model workers.
    Workers {
        #[command(subcommand)]
        action: WorkersAction,
    },
}

#[derive(Subcommand, Debug)]
enum WorkersAction {
    /// Try a role whose model cannot start again now ("stt" or an
    /// evaluator's role), after fixing its model file or options.
    Retry {
        role: String,
        #[arg(long, env = "VIVA_URL")]
        url: Option<String>,
        #[arg(long, env = "VIVA_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum UserAction {
    /// Print everything Viva holds about a user as JSON.
    Export { user: String },
    /// Delete a user's submissions, media and profile.
    Delete { user: String },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where the package puts the configuration.
const SYSTEM_CONFIG: &str = "/etc/viva/viva.toml";

/// The configuration file in use: --config / VIVA_CONFIG, else ./viva.toml,
/// else the package's /etc/viva/viva.toml (when they exist).
fn config_file(cli: &Cli) -> Option<PathBuf> {
    match &cli.config {
        Some(p) => Some(p.clone()),
        None => [PathBuf::from("viva.toml"), PathBuf::from(SYSTEM_CONFIG)]
            .into_iter()
            .find(|p| p.exists()),
    }
}

fn load_config(cli: &Cli, extra: Vec<(String, toml::Value)>) -> anyhow::Result<Config> {
    let file = config_file(cli);
    let mut overrides = extra;
    if let Some(d) = &cli.data_dir {
        overrides.push((
            "data_dir".into(),
            toml::Value::String(d.display().to_string()),
        ));
    }
    if let Some(f) = &cli.log_format {
        overrides.push(("log_format".into(), toml::Value::String(f.clone())));
    }
    Ok(Config::load(file.as_deref(), std::env::vars(), &overrides)?)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIVA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Serve { listen, sandbox } => {
            let mut extra = Vec::new();
            if let Some(l) = listen {
                extra.push(("listen".into(), toml::Value::String(l.clone())));
            }
            if *sandbox {
                extra.push(("sandbox.enabled".into(), toml::Value::Boolean(true)));
            }
            let config = load_config(&cli, extra)?;
            init_tracing(config.log_format);
            runtime()?.block_on(crate::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let config = load_config(&cli, vec![])?;
            init_tracing(config.log_format);
            let store = crate::open_data_dir(&config)?;
            println!(
                "database {} is at schema version {}",
                store.location().display(),
                store.schema_version()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor(args) => {
            // No log: each check's line carries what went wrong (a
            // worker's start-up error quotes its stderr).
            doctor::run(args, config_file(&cli), load_config(&cli, vec![]))
        }
        Command::Session {
            role,
            user,
            context,
            name,
        } => {
            let config = load_config(&cli, vec![])?;
            let roles: Vec<Role> = role.iter().filter_map(|r| Role::parse(r)).collect();
            if roles.is_empty() {
                bail!("give at least one --role (learner, instructor or admin)");
            }
            let token = mint(&config, user, context, &roles, name.clone())?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { url, token, json } => {
            let config = load_config(&cli, vec![])?;
            let url = url.clone().unwrap_or_else(|| config.public_url());
            let token = match token {
                Some(t) => t.clone(),
                None => mint(&config, "cli-admin", "sandbox", &[Role::Admin], None)
                    .context("no --token given and no local session key to mint one")?,
            };
            runtime()?.block_on(status(&url, &token, *json))
        }
        Command::Workers {
            action: WorkersAction::Retry { role, url, token },
        } => {
            let config = load_config(&cli, vec![])?;
            let url = url.clone().unwrap_or_else(|| config.public_url());
            let token = match token {
                Some(t) => t.clone(),
                None => mint(&config, "cli-admin", "sandbox", &[Role::Admin], None)
                    .context("no --token given and no local session key to mint one")?,
            };
            runtime()?.block_on(retry_worker(&url, &token, role))
        }
        Command::Submit {
            file,
            assignment,
            url,
            token,
            user,
            no_follow,
        } => {
            let config = load_config(&cli, vec![])?;
            let url = url.clone().unwrap_or_else(|| config.public_url());
            let token = match token {
                Some(t) => t.clone(),
                None => mint(&config, user, "sandbox", &[Role::Learner], None).context(
                    "no --token given and no local session key to mint one (run it beside the daemon's data directory)",
                )?,
            };
            runtime()?.block_on(submit(&url, &token, file, assignment, !*no_follow))
        }
        Command::MigrateStore { from, to } => {
            let config = load_config(&cli, vec![])?;
            init_tracing(config.log_format);
            let location = |s: &str| {
                crate::config::Config {
                    store: Some(s.to_owned()),
                    ..config.clone()
                }
                .store_location()
            };
            let (source, target) = (location(from)?, location(to)?);
            if !matches!(source, crate::store::Location::Sqlite(_)) {
                return Err(anyhow::anyhow!(
                    "--from must be a SQLite store (sqlite:/path/viva.db); {} is not",
                    source.display()
                ));
            }
            if let crate::store::Location::Sqlite(p) = &source
                && !p.exists()
            {
                return Err(anyhow::anyhow!(
                    "there is no SQLite store at {}; give --from sqlite:/path/viva.db",
                    p.display()
                ));
            }
            let from_store = crate::store::Store::open_at(&source)?;
            let to_store = crate::store::Store::open_at(&target)?;
            println!("copying {} → {}", source.display(), target.display());
            let bar = if std::io::stderr().is_terminal() {
                ProgressBar::new_spinner()
            } else {
                ProgressBar::hidden()
            };
            let b = bar.clone();
            let report = runtime()?.block_on(crate::store::copy(
                &from_store,
                &to_store,
                move |table, rows| b.set_message(format!("{table}: {rows} rows")),
            ))?;
            bar.finish_and_clear();
            let total: u64 = report.tables.iter().map(|(_, n)| n).sum();
            for (table, n) in &report.tables {
                println!("  {table:<24} {n:>8}");
            }
            println!(
                "copied {total} rows in {} tables; now set `store = \"{}\"` on every node \
                 (and keep the media directory where the nodes can read it)",
                report.tables.len(),
                target.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Purge => {
            let config = load_config(&cli, vec![])?;
            init_tracing(config.log_format);
            let store = crate::open_data_dir(&config)?;
            let n = runtime()?.block_on(crate::retention::purge_expired(
                &store,
                config.retention.retention_days,
            ))?;
            println!(
                "deleted the media of {n} submission(s) settled more than {} days ago",
                config.retention.retention_days
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin { action } => {
            plugin::run(action, || Ok(load_config(&cli, vec![])?.plugins))
        }
        Command::Platform { action } => platform::run(action, &load_config(&cli, vec![])?),
        Command::Models { action } => {
            models::run(action, || Ok(load_config(&cli, vec![])?.data_dir))
        }
        Command::User { action } => {
            let config = load_config(&cli, vec![])?;
            let store = crate::open_data_dir(&config)?;
            match action {
                UserAction::Export { user } => {
                    let u = user.clone();
                    let v =
                        store.read_blocking(|c| crate::retention::export_user(c, &u, |_| true))?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                UserAction::Delete { user } => {
                    let n =
                        runtime()?.block_on(crate::retention::delete_user(&store, user, "cli"))?;
                    println!("deleted user {user} and {n} submission(s) with their media");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Mints a session from the local key, registering the user in the context.
fn mint(
    config: &Config,
    user: &str,
    context: &str,
    roles: &[Role],
    name: Option<String>,
) -> anyhow::Result<String> {
    crate::domain::validate_id(user, "user id")?;
    crate::domain::validate_id(context, "context id")?;
    let key_path = crate::auth::key_path(&config.data_dir);
    let sqlite = matches!(
        config.store_location()?,
        crate::config::StoreLocation::Sqlite(_)
    );
    if sqlite && !key_path.exists() && !config.data_dir.join("viva.db").exists() {
        bail!(
            "no Viva data directory at {} (start the daemon once, or pass --data-dir)",
            config.data_dir.display()
        );
    }
    let store = crate::open_data_dir(config)?;
    let key = runtime()?.block_on(crate::auth::session_key(config, &store))?;
    let sessions =
        crate::auth::Sessions::new(&key, config.sessions.ttl, config.sessions.ticket_ttl);
    let (token, _) = sessions.mint(user, context, roles, name.clone())?;
    let (u, c, r) = (user.to_owned(), context.to_owned(), roles.to_vec());
    runtime()?.block_on(store.write(move |tx| {
        crate::domain::ensure_context(tx, &c, &c)?;
        crate::domain::ensure_member(tx, &c, &u, name.as_deref(), &r)
    }))?;
    Ok(token)
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?)
}

async fn api_error(resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let msg = body["error"]["message"]
        .as_str()
        .unwrap_or("no details")
        .to_owned();
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    anyhow!("the daemon answered {status} {code}: {msg}")
}

/// Sends an API request with the session token: the JSON answer, or the
/// daemon's error in words.
async fn api_json(
    req: reqwest::RequestBuilder,
    url: &str,
    token: &str,
) -> anyhow::Result<serde_json::Value> {
    let resp =
        req.bearer_auth(token).send().await.with_context(|| {
            format!("cannot reach the daemon at {url}; is `viva serve` running?")
        })?;
    if !resp.status().is_success() {
        return Err(api_error(resp).await);
    }
    Ok(resp.json().await?)
}

async fn status(url: &str, token: &str, json: bool) -> anyhow::Result<ExitCode> {
    let v = api_json(client()?.get(format!("{url}/api/v1/status")), url, token).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("policy   {}", v["policy"].as_str().unwrap_or("?"));
    println!("phase    {}", v["phase"].as_str().unwrap_or("?"));
    if let Some(b) = v["batch"].as_object() {
        println!(
            "batch    #{}: {}/{} completed STT, {} evaluated, {} failed",
            b["id"], b["stt_done"], b["size"], b["eval_done"], b["failed"]
        );
    }
    println!(
        "queues   stt {}  evaluation {}  scoring {}",
        v["stt_queue"], v["eval_queue"], v["score_queue"]
    );
    if let Some(h) = v["hold"].as_object() {
        let left = (h["until_ms"].as_i64().unwrap_or(0) - crate::clock::now_ms()).max(0) / 1000;
        println!(
            "held     the switch to {} waits up to {left} s more, gathering work to pay for the model swap \
             (scheduler.swap_work_ratio, max_phase_wait)",
            h["phase"].as_str().unwrap_or("?")
        );
    }
    let workers = v["workers"].as_array().cloned().unwrap_or_default();
    if workers.is_empty() {
        println!("workers  none running");
    }
    for w in workers {
        let mib = w["peak_rss_bytes"].as_u64().unwrap_or(0) / (1024 * 1024);
        println!(
            "worker   {:<14} pid {:<8} {:<9} up {:>6.0}s  peak {mib} MiB  jobs {}",
            w["slot"].as_str().unwrap_or("?"),
            w["pid"],
            w["state"].as_str().unwrap_or("?"),
            w["uptime_seconds"].as_f64().unwrap_or(0.0),
            w["jobs_done"]
        );
    }
    if let Some(errs) = v["worker_errors"].as_object() {
        for (slot, e) in errs {
            println!("problem  {slot}: {}", e.as_str().unwrap_or("?"));
        }
    }
    for u in v["unavailable"].as_array().cloned().unwrap_or_default() {
        println!(
            "paused   role {} cannot start ({} tries): its submissions wait; `viva workers retry {}` after fixing it",
            u["role"].as_str().unwrap_or("?"),
            u["failures"],
            u["role"].as_str().unwrap_or("?"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn retry_worker(url: &str, token: &str, role: &str) -> anyhow::Result<ExitCode> {
    let retry = client()?.post(format!("{url}/api/v1/admin/workers/{role}/retry"));
    let v = api_json(retry, url, token).await?;
    if v["was_unavailable"].as_bool() == Some(true) {
        println!("worker {role}: trying to start it again now; see `viva status`");
    } else {
        println!("worker {role} was not marked unavailable; it will be started when needed");
    }
    Ok(ExitCode::SUCCESS)
}

async fn submit(
    url: &str,
    token: &str,
    file: &Path,
    assignment: &str,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let len = f.metadata().await?.len();
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upload".into());
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b2 = bar.clone();
    let stream = tokio_util::io::ReaderStream::new(f).inspect(move |chunk| {
        if let Ok(c) = chunk {
            b2.inc(c.len() as u64);
        }
    });
    let resp = client()?
        .post(format!("{url}/api/v1/assignments/{assignment}/submissions"))
        .query(&[("filename", &name)])
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_LENGTH, len)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("cannot reach the daemon at {url}; is `viva serve` running?"))?;
    bar.finish_and_clear();
    if !resp.status().is_success() {
        return Err(api_error(resp).await);
    }
    let sub: serde_json::Value = resp.json().await?;
    let id = sub["id"].as_str().unwrap_or_default().to_owned();
    eprintln!(
        "✔ uploaded {name} ({:.1} s of audio) as submission {id}",
        sub["duration_seconds"].as_f64().unwrap_or(0.0)
    );
    if !follow {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    follow_submission(url, token, &id, tty).await
}

async fn follow_submission(
    url: &str,
    token: &str,
    id: &str,
    tty: bool,
) -> anyhow::Result<ExitCode> {
    let spinner = if tty {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    spinner.enable_steady_tick(Duration::from_millis(120));
    let resp = client()?
        .get(format!("{url}/api/v1/events"))
        .query(&[("submission", id)])
        .bearer_auth(token)
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(api_error(resp).await);
    }
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut last_line = String::new();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let event = frame
                .lines()
                .find_map(|l| l.strip_prefix("event:"))
                .map(str::trim)
                .unwrap_or("message");
            let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(data.trim()).unwrap_or_default();
            let line = describe(&v);
            if line != last_line {
                if tty {
                    spinner.set_message(line.clone());
                } else {
                    eprintln!("{line}");
                }
                last_line = line;
            }
            if event == "done" {
                spinner.finish_and_clear();
                return print_result(url, token, id).await;
            }
        }
    }
    spinner.finish_and_clear();
    bail!("the daemon closed the status stream early; check `viva status`")
}

fn describe(v: &serde_json::Value) -> String {
    let phase = v["phase"].as_str().unwrap_or("?");
    let state = v["state"].as_str().unwrap_or("?");
    let mut s = match phase {
        "stt" => "STT phase".to_owned(),
        "evaluation" => "Evaluation phase".to_owned(),
        other => other.to_owned(),
    };
    s.push_str(&format!(" · {state}"));
    if let (Some(p), Some(n)) = (v["position"].as_u64(), v["queue_length"].as_u64()) {
        s.push_str(&format!(" · position {p} of {n}"));
    }
    if let Some(eta) = v["eta_seconds"].as_f64() {
        s.push_str(&format!(
            " · about {} left",
            humantime::format_duration(Duration::from_secs(eta.round() as u64))
        ));
    }
    if let Some(b) = v["batch"].as_object() {
        s.push_str(&format!(
            " · batch {}: {}/{} completed STT",
            b["id"], b["stt_done"], b["size"]
        ));
    }
    s
}

async fn print_result(url: &str, token: &str, id: &str) -> anyhow::Result<ExitCode> {
    let v = api_json(
        client()?.get(format!("{url}/api/v1/submissions/{id}")),
        url,
        token,
    )
    .await?;
    let state = v["state"].as_str().unwrap_or("?");
    println!("submission {id}: {state}");
    if let Some(t) = v["transcript"]["text"].as_str() {
        println!("transcript: {}", t.trim());
    }
    if let Some(score) = v["score"].as_object() {
        println!(
            "score: {} / {}",
            score.get("total").cloned().unwrap_or_default(),
            score.get("max").cloned().unwrap_or_default()
        );
    }
    match state {
        "failed" => {
            println!(
                "reason: {}",
                v["failure_reason"].as_str().unwrap_or("unknown")
            );
            Ok(ExitCode::FAILURE)
        }
        "awaiting_review" => {
            println!("the grade waits for your instructor's review");
            Ok(ExitCode::SUCCESS)
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}
