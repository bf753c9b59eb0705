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
    upload_to(client, url, token, "sandbox-oral-1", file, None).await
}

/// Uploads `file` to `assignment` (under `key` as its `Idempotency-Key`:
/// every try of one recording); the submission's id when accepted (201).
pub async fn upload_to(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    assignment: &str,
    file: &Path,
    key: Option<&str>,
) -> Option<String> {
    let bytes = std::fs::read(file).expect("media");
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut req = client
        .post(format!("{url}/api/v1/assignments/{assignment}/submissions"))
        .query(&[("filename", name)])
        .bearer_auth(token);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.body(bytes).send().await.ok()?;
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

/// Adds `toml` to a node's configuration file (a section of its own).
pub fn append_config(config: &Path, toml: &str) {
    let text = std::fs::read_to_string(config).expect("config");
    std::fs::write(config, format!("{text}\n{toml}\n")).expect("config");
}

/// Adds a top-level `key = value` line to a node's configuration.
pub fn set_top_level(config: &Path, line: &str) {
    let text = std::fs::read_to_string(config).expect("config");
    std::fs::write(config, format!("{line}\n{text}")).expect("config");
}

/// Sets a node's `public_url` (the address a load balancer in front of the
/// api nodes answers on: the URLs the LTI platform and browsers use).
pub fn set_public_url(config: &Path, url: &str) {
    set_top_level(config, &format!("public_url = \"{url}\""));
}

/// A TCP load balancer in front of the api nodes, as a site puts one: each
/// new connection goes to the next backend in turn (round robin, no
/// sticky sessions); a backend that refuses the connection (a node being
/// restarted) is skipped. Stops when dropped.
pub struct Balancer {
    pub addr: std::net::SocketAddr,
    backends: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    served: std::sync::Arc<std::sync::Mutex<HashMap<std::net::SocketAddr, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    pub async fn start() -> Balancer {
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("balancer listens");
        let addr = listener.local_addr().expect("balancer address");
        let backends: Arc<Mutex<Vec<std::net::SocketAddr>>> = Arc::default();
        let served: Arc<Mutex<HashMap<std::net::SocketAddr, u64>>> = Arc::default();
        let (b, s) = (backends.clone(), served.clone());
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let list = b.lock().map(|l| l.clone()).unwrap_or_default();
                let start = next;
                next = next.wrapping_add(1);
                let served = s.clone();
                tokio::spawn(async move {
                    for k in 0..list.len() {
                        let target = list[(start + k) % list.len()];
                        let connect = tokio::time::timeout(
                            std::time::Duration::from_secs(2),
                            tokio::net::TcpStream::connect(target),
                        )
                        .await;
                        if let Ok(Ok(mut outbound)) = connect {
                            if let Ok(mut m) = served.lock() {
                                *m.entry(target).or_default() += 1;
                            }
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer {
            addr,
            backends,
            served,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The api nodes behind it now.
    pub fn set_backends(&self, list: Vec<std::net::SocketAddr>) {
        if let Ok(mut b) = self.backends.lock() {
            *b = list;
        }
    }

    /// Connections each backend has taken.
    pub fn served(&self) -> HashMap<std::net::SocketAddr, u64> {
        self.served.lock().map(|m| m.clone()).unwrap_or_default()
    }
}
