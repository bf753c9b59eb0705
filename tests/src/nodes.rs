//! Several `viva serve` nodes on one PostgreSQL store, for the multi-node
//! test and benchmark: a node's configuration (api: no workers; gpu: fake
//! workers logging to `<dir>/fake.log`), starting it, sessions, uploads,
//! and the fake workers' logs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{Daemon, SHORT, STARTUP, clean_viva_env, output};
use crate::{fake_worker, viva_bin};

/// Fake workers' times (ms) on a gpu node.
#[derive(Debug, Clone, Copy)]
pub struct FakeTimes {
    pub stt_ms: u64,
    pub eval_ms: u64,
}

/// A node's configuration in `dir/viva.toml` (data in `dir/var`): `role`
/// `api`, `gpu` or `all` (the last two with fake workers).
pub fn write_config(dir: &Path, store: &str, id: &str, role: &str, times: FakeTimes) -> PathBuf {
    std::fs::create_dir_all(dir).expect("node dir");
    let mut config = format!(
        r#"data_dir = "{data}"
store = "{store}"

[node]
id = "{id}"
role = "{role}"
secrets_key_file = "{secrets}"

[sandbox]
enabled = {sandbox}

[intake]
min_free_bytes = 67108864

# One test student uploads everything.
[limits]
uploads_per_ip_per_minute = 0
uploads_per_user_per_minute = 0

[scheduler]
stt_batch_size = 6
batch_window = "2s"
swap_work_ratio = 0
retry_backoff = "100ms"
lease = "3s"

[workers]
stop_grace = "2s"
"#,
        data = dir.join("var").display(),
        sandbox = role != "gpu",
        secrets = crate::pg::secrets_key_file().display(),
    );
    if role != "api" {
        let env = format!(
            "env = {{ FAKE_LOG = \"{}\", FAKE_STT_FIXED_MS = \"{}\", FAKE_EVAL_FIXED_MS = \"{}\" }}",
            dir.join("fake.log").display(),
            times.stt_ms,
            times.eval_ms
        );
        let worker = fake_worker();
        for (section, kind, model) in [
            ("stt", "stt", "fake-stt"),
            ("evaluators.a", "evaluator", "fake-a"),
            ("evaluators.b", "evaluator", "fake-b"),
        ] {
            config.push_str(&format!(
                "\n[workers.{section}]\ncommand = \"{}\"\nargs = [\"--kind\", \"{kind}\"]\nmodel = \"{model}\"\nmodel_path = \"/dev/null\"\n{env}\n",
                worker.display()
            ));
        }
    }
    let path = dir.join("viva.toml");
    std::fs::write(&path, config).expect("config");
    path
}

pub fn viva(config: &Path) -> Command {
    let mut cmd = Command::new(viva_bin());
    clean_viva_env(&mut cmd).arg("--config").arg(config);
    cmd
}

pub fn start(config: &Path) -> Daemon {
    Daemon::start(viva(config).arg("serve"), STARTUP).unwrap_or_else(|e| panic!("{e}"))
}

pub fn session(config: &Path, role: &str, user: &str) -> String {
    let out = output(
        viva(config).args([
            "session",
            "--role",
            role,
            "--user",
            user,
            "--context",
            "sandbox",
        ]),
        SHORT,
    )
    .expect("viva session");
    assert!(out.status.success(), "{}", crate::process::text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn events(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// At each worker start on one node: was a process of the other kind alive?
pub fn kinds_overlapped(log: &Path) -> Option<String> {
    let mut alive: HashMap<u64, String> = HashMap::new();
    for e in events(log) {
        let pid = e["pid"].as_u64().unwrap_or(0);
        let kind = e["kind"].as_str().unwrap_or("").to_owned();
        match e["ev"].as_str() {
            Some("start") => {
                if let Some((other, k)) = alive.iter().find(|(_, k)| **k != kind) {
                    return Some(format!("{kind} {pid} started while {k} {other} was alive"));
                }
                alive.insert(pid, kind);
            }
            Some("exit") => {
                alive.remove(&pid);
            }
            _ => {}
        }
    }
    None
}

pub async fn upload(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    file: &Path,
) -> Option<String> {
    let bytes = std::fs::read(file).expect("media");
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let resp = client
        .post(format!(
            "{url}/api/v1/assignments/sandbox-oral-1/submissions"
        ))
        .query(&[("filename", name)])
        .bearer_auth(token)
        .body(bytes)
        .send()
        .await
        .ok()?;
    if resp.status().as_u16() != 201 {
        return None;
    }
    let v: serde_json::Value = resp.json().await.ok()?;
    v["id"].as_str().map(str::to_owned)
}

/// A GET's JSON body; `Value::Null` when the request fails (a node busy or
/// restarting: callers poll again).
pub async fn get_json(client: &reqwest::Client, url: &str, token: &str) -> serde_json::Value {
    match client.get(url).bearer_auth(token).send().await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}
