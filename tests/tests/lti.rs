//! LTI 1.3 end to end: the real daemon against an independently written
//! platform (`tests/lti-platform/lti_platform.py`, built on PyPI lti1p3platform
//! and PyJWT) over loopback HTTP. Dynamic registration, OIDC login, launches
//! as learner and instructor, deep linking, AGS score publish (with the
//! client assertion checked on the platform side), NRPS paging, grade release
//! and retries, platform key rotation; then every security rejection, each
//! with its code and no side effects. A headless-Chromium test runs the
//! launch in a cross-site iframe with cookies blocked.
//!
//! The platform needs a Python with lti1p3platform (scripts/test makes a venv
//! under $VIVA_CACHE). Without one these tests say so and pass, unless
//! VIVA_REQUIRE_LTI_PLATFORM=1 (scripts/test sets it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::header::{COOKIE, HOST, LOCATION, SET_COOKIE};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use viva_daemon::Config;
use viva_tests::platform::{Platform, launch_params, page_data, parse_form, python};

const ROLE: &str = "http://purl.imsglobal.org/vocab/lis/v2/membership#";
const REGISTRATION_TOKEN: &str = "reg-token-3f9c2a";

/// The daemon, the platform and an HTTP client that follows no redirects.
struct Env {
    tool: String,
    state: viva_daemon::AppState,
    platform: Platform,
    http: reqwest::Client,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One run through login → platform auth → launch.
#[derive(Debug)]
struct Launched {
    login_status: u16,
    login_location: Option<String>,
    cookie: Option<(String, String)>,
    cookie_header: Option<String>,
    form: HashMap<String, String>,
    launch_url: String,
    status: u16,
    error: Option<String>,
    body: String,
    data: Option<Value>,
    /// The `Origin` header the launch POST carries (a browser's page).
    origin: Option<String>,
}

impl Launched {
    fn token(&self) -> String {
        self.data
            .as_ref()
            .and_then(|d| d["token"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no session token: {} {}", self.status, self.body))
    }
}

impl Env {
    async fn start() -> Option<Env> {
        Env::start_with(|_| {}, viva_daemon::Scoring::Off).await
    }

    /// A daemon that grades: the fake workers (STT and evaluators "a" and
    /// "b", logging every call to `<tmp>/fake.log`) and the real rubric
    /// plugins.
    async fn start_grading() -> Option<Env> {
        Env::start_with(
            |config| {
                let log = config.data_dir.with_file_name("fake.log");
                let db = config.data_dir.join("viva.db");
                config.workers.stt = Some(viva_tests::fake_worker_config("stt", &[], &log, &db));
                for role in ["a", "b"] {
                    config.workers.evaluators.insert(
                        role.into(),
                        viva_tests::fake_worker_config("evaluator", &[], &log, &db),
                    );
                }
                config.scheduler.swap_work_ratio = 0.0;
                config.scheduler.batch_window = Duration::from_millis(200);
                config.workers.stop_grace = Duration::from_secs(2);
            },
            viva_daemon::Scoring::Plugins(viva_plugins::Compiler::InProcess),
        )
        .await
    }

    async fn start_with(
        customize: impl FnOnce(&mut Config),
        scoring: viva_daemon::Scoring,
    ) -> Option<Env> {
        let platform = Platform::start_or_skip()?;
        let dir = tempfile::tempdir().expect("tmp");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = Config {
            data_dir: dir.path().join("var"),
            listen: addr,
            public_url: Some(format!("http://{addr}")),
            ..Default::default()
        };
        config.intake.min_free_bytes = 1024 * 1024;
        config.lti.allow_insecure_platforms = true;
        config.lti.jwks_refetch_interval = Duration::from_secs(4);
        config.lti.passback_retry_backoff = Duration::from_millis(50);
        config.lti.passback_max_attempts = 3;
        customize(&mut config);
        let daemon = viva_daemon::Daemon::build_with(config, scoring)
            .await
            .expect("daemon builds");
        let state = daemon.state.clone();
        let shutdown = CancellationToken::new();
        tokio::spawn(daemon.serve(listener, shutdown.clone()));
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        Some(Env {
            tool: format!("http://{addr}"),
            state,
            platform,
            http,
            shutdown,
            _dir: dir,
        })
    }

    async fn platform_post(&self, path: &str, body: Value) -> Value {
        self.platform_post_at(&self.platform.base, path, body).await
    }

    async fn platform_post_at(&self, base: &str, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{base}{path}"))
            .json(&body)
            .send()
            .await
            .expect("platform control");
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.expect("json")
    }

    async fn platform_log(&self) -> Value {
        self.http
            .get(format!("{}/control/log", self.platform.base))
            .send()
            .await
            .expect("log")
            .json()
            .await
            .expect("json")
    }

    /// A Viva-wide administrator's session (as `viva session --role admin` mints).
    fn admin_token(&self) -> String {
        self.state
            .sessions
            .mint("ops", "ops", &[viva_daemon::Role::Admin], None)
            .expect("mint")
            .0
    }

    /// A one-time registration URL from a Viva administrator.
    async fn invite(&self, issuer: Option<&str>) -> String {
        let (status, invite) = self
            .api(
                reqwest::Method::POST,
                &self.admin_token(),
                "/api/v1/admin/platforms/invites",
                Some(json!({ "issuer": issuer })),
            )
            .await;
        assert_eq!(status, 201, "{invite}");
        invite["url"].as_str().expect("url").to_owned()
    }

    /// Dynamic registration with an administrator's invitation, as Moodle's
    /// "add tool by URL" does it.
    async fn register(&self) -> reqwest::Response {
        let url = self.invite(None).await;
        let config = format!("{}/.well-known/openid-configuration", self.platform.base);
        self.register_at(&url, &config).await
    }

    /// The platform's side of dynamic registration: opens the tool's
    /// registration URL `url` with its configuration URL and token appended.
    async fn register_at(&self, url: &str, openid_configuration: &str) -> reqwest::Response {
        self.http
            .get(url)
            .query(&[
                ("openid_configuration", openid_configuration.to_owned()),
                ("registration_token", REGISTRATION_TOKEN.to_owned()),
            ])
            .send()
            .await
            .expect("register")
    }

    /// The client id the platform (at `base`) gave Viva when it registered.
    async fn client_id_at(&self, base: &str) -> String {
        let log: Value = self
            .http
            .get(format!("{base}/control/log"))
            .send()
            .await
            .expect("log")
            .json()
            .await
            .expect("json");
        log["registrations"]
            .as_array()
            .and_then(|r| r.last())
            .and_then(|r| r["client_id"].as_str())
            .expect("the platform registered Viva")
            .to_owned()
    }

    /// The Viva user id of `sub` at the main platform.
    async fn uid(&self, sub: &str) -> String {
        let client = self.client_id_at(&self.platform.base).await;
        viva_daemon::lti_user_id(&self.platform.base, &client, sub)
    }

    async fn prepare(&self, spec: Value) -> Value {
        self.platform_post("/control/launch", spec).await
    }

    /// Login initiation with `params` (GET); returns status, Location, Set-Cookie.
    async fn login(&self, params: &[(String, String)]) -> reqwest::Response {
        self.http
            .get(format!("{}/lti/login", self.tool))
            .query(params)
            .send()
            .await
            .expect("login")
    }

    /// The whole launch for a prepared spec.
    async fn launch(&self, spec: Value) -> Launched {
        self.launch_with(spec, |_| {}).await
    }

    async fn launch_with(&self, spec: Value, tweak: impl FnOnce(&mut Launched)) -> Launched {
        self.launch_on(&self.platform.base, spec, tweak).await
    }

    /// The whole launch from the platform at `base` (another platform than
    /// the main one: a second tenant, an attacker's).
    async fn launch_on(
        &self,
        base: &str,
        spec: Value,
        tweak: impl FnOnce(&mut Launched),
    ) -> Launched {
        let prepared = self.platform_post_at(base, "/control/launch", spec).await;
        let params = launch_params(&prepared).expect("params");
        // Platforms POST the login initiation too.
        let resp = self
            .http
            .post(format!("{}/lti/login", self.tool))
            .form(&params)
            .send()
            .await
            .expect("login");
        let login_status = resp.status().as_u16();
        let login_location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let cookie_header = resp
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with("viva_lti_"))
            .map(str::to_owned);
        let cookie = cookie_header.as_ref().and_then(|c| {
            let kv = c.split(';').next()?;
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        });
        let login_body = resp.text().await.unwrap_or_default();
        let auth_url = match &login_location {
            Some(l) => l.clone(),
            None => page_data(&login_body)
                .and_then(|d| d["next"].as_str().map(str::to_owned))
                .unwrap_or_else(|| panic!("login {login_status} went nowhere: {login_body}")),
        };
        let auth = self.http.get(&auth_url).send().await.expect("auth");
        let auth_status = auth.status();
        let auth_body = auth.text().await.expect("auth body");
        assert!(
            auth_status.is_success(),
            "platform auth refused: {auth_body}"
        );
        let (launch_url, form) = parse_form(&auth_body);
        let mut l = Launched {
            login_status,
            login_location,
            cookie,
            cookie_header,
            form: form.into_iter().collect(),
            launch_url,
            status: 0,
            error: None,
            body: String::new(),
            data: None,
            origin: None,
        };
        tweak(&mut l);
        self.post_launch(&mut l).await;
        l
    }

    async fn post_launch(&self, l: &mut Launched) {
        let mut req = self.http.post(&l.launch_url).form(&l.form);
        if let Some((k, v)) = &l.cookie {
            req = req.header(COOKIE, format!("{k}={v}"));
        }
        if let Some(o) = &l.origin {
            req = req.header(reqwest::header::ORIGIN, o);
        }
        let resp = req.send().await.expect("launch");
        l.status = resp.status().as_u16();
        l.error = resp
            .headers()
            .get("x-viva-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        l.body = resp.text().await.unwrap_or_default();
        l.data = page_data(&l.body);
    }

    async fn api(
        &self,
        method: reqwest::Method,
        token: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.tool))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("api");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    async fn me(&self, token: &str) -> Value {
        let (status, me) = self
            .api(reqwest::Method::GET, token, "/api/v1/me", None)
            .await;
        assert_eq!(status, 200, "{me}");
        me
    }

    async fn user_exists(&self, id: &str) -> bool {
        let id = id.to_owned();
        self.state
            .store
            .read(move |c| {
                Ok(
                    c.query_row("SELECT COUNT(*) FROM users WHERE id = ?1", [id], |r| {
                        r.get::<_, i64>(0)
                    })? > 0,
                )
            })
            .await
            .expect("read")
    }

    async fn count(&self, table: &'static str) -> i64 {
        self.state
            .store
            .read(move |c| {
                Ok(c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?)
            })
            .await
            .expect("count")
    }

    /// A scored submission of `user` for `assignment`, as the scorer leaves
    /// it, with its outbox row; wakes the passback worker.
    async fn scored_submission(
        &self,
        user: &str,
        assignment: &str,
        attempt: i64,
        kind: &str,
    ) -> String {
        let id = format!(
            "sub_test_{}_{attempt}_{kind}",
            user.replace(['-', ':'], "_")
        );
        let (sid, user, assignment, kind) = (
            id.clone(),
            user.to_owned(),
            assignment.to_owned(),
            kind.to_owned(),
        );
        let score = json!({"total": 9.0, "max": 16.0, "needs_review": false, "reasons": [],
                           "report": {"feedback": "Clear explanation of inputs and outputs."}});
        self.state
            .store
            .write(move |tx| {
                let now = viva_daemon::now_ms();
                let state = if kind == "released" { "released" } else { "awaiting_review" };
                tx.execute(
                    "INSERT INTO submissions (id, assignment_id, user_id, attempt, state, sha256, size_bytes,
                         duration_seconds, media_info, score, created_at, updated_at, finished_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'h', 1, 1.0, '{}', ?6, ?7, ?7, ?7)",
                    viva_daemon::params![sid, assignment, user, attempt, state, score.to_string(), now],
                )?;
                tx.execute(
                    "INSERT INTO grade_outbox (submission_id, kind, payload, next_attempt_at, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?4)",
                    viva_daemon::params![sid, kind, score.to_string(), now],
                )?;
                Ok(())
            })
            .await
            .expect("insert submission");
        self.state.lti.passback_wake.notify_one();
        id
    }

    async fn outbox(&self, submission: &str) -> Vec<Value> {
        let s = submission.to_owned();
        let rows = self
            .state
            .store
            .read(move |c| viva_daemon::outbox_rows(c, &s))
            .await
            .expect("outbox");
        rows.into_iter()
            .map(|r| serde_json::to_value(r).expect("json"))
            .collect()
    }
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn learner(user: &str) -> Value {
    json!({"user": user, "roles": [format!("{ROLE}Learner")], "name": format!("Student {user}")})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registration_launches_deep_linking_grades_and_roster_against_a_real_platform() {
    let Some(env) = Env::start().await else {
        return;
    };
    let issuer = env.platform.base.clone();

    // ---- Dynamic registration --------------------------------------------------
    let resp = env.register().await;
    assert_eq!(resp.status(), 200);
    let csp = resp
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        csp.contains(&format!("frame-ancestors 'self' {issuer}")),
        "{csp}"
    );
    let body = resp.text().await.expect("body");
    assert!(body.contains("Viva is registered"), "{body}");
    assert!(body.contains("org.imsglobal.lti.close"));
    let log = env.platform_log().await;
    let cfg = &log["registrations"][0]["config"];
    let client_id = log["registrations"][0]["client_id"]
        .as_str()
        .expect("client")
        .to_owned();
    assert_eq!(cfg["redirect_uris"][0], format!("{}/lti/launch", env.tool));
    assert_eq!(cfg["initiate_login_uri"], format!("{}/lti/login", env.tool));
    assert_eq!(cfg["jwks_uri"], format!("{}/lti/jwks.json", env.tool));
    assert!(
        cfg["scope"]
            .as_str()
            .expect("scope")
            .contains("lti-ags/scope/score")
    );
    // The registration, with the platform's deployment, is in Viva.
    let admin = env
        .state
        .sessions
        .mint("ops", "ops", &[viva_daemon::Role::Admin], None)
        .expect("mint")
        .0;
    let (status, regs) = env
        .api(
            reqwest::Method::GET,
            &admin,
            "/api/v1/admin/platforms",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(regs[0]["issuer"], issuer);
    assert_eq!(regs[0]["client_id"], client_id);
    assert_eq!(regs[0]["deployments"], json!(["deploy-1"]));
    assert_eq!(regs[0]["source"], "dynamic");
    // A configuration URL whose issuer lives elsewhere is refused.
    let url = env.invite(None).await;
    let mismatch = env
        .register_at(
            &url,
            &format!("{}/mismatch/openid-configuration", env.platform.base),
        )
        .await;
    assert_eq!(
        mismatch
            .headers()
            .get("x-viva-error")
            .and_then(|v| v.to_str().ok()),
        Some("registration_failed")
    );
    // The manual page and the Canvas configuration.
    let manual = env
        .http
        .get(format!("{}/lti/register", env.tool))
        .send()
        .await
        .expect("manual")
        .text()
        .await
        .expect("text");
    assert!(manual.contains(&format!("{}/lti/jwks.json", env.tool)));
    let canvas: Value = env
        .http
        .get(format!("{}/lti/canvas.json", env.tool))
        .send()
        .await
        .expect("canvas")
        .json()
        .await
        .expect("json");
    assert_eq!(
        canvas["oidc_initiation_url"],
        format!("{}/lti/login", env.tool)
    );

    // ---- Instructor deep linking ------------------------------------------------
    let teacher = json!({"user": "teacher-1", "roles": [format!("{ROLE}Instructor")],
                         "name": "Tia Teacher", "kind": "deeplink"});
    let dl = env.launch(teacher).await;
    assert_eq!(dl.status, 200, "{}", dl.body);
    // The state cookie is cross-site-safe and partitioned.
    let sc = dl.cookie_header.clone().expect("state cookie");
    for attr in ["SameSite=None", "Secure", "HttpOnly", "Partitioned"] {
        assert!(sc.contains(attr), "{sc}");
    }
    assert_eq!(dl.login_status, 302);
    let location = dl.login_location.clone().expect("redirect");
    assert!(
        location.starts_with(&format!("{issuer}/auth?")),
        "{location}"
    );
    assert!(
        !location.contains(&dl.cookie.clone().expect("cookie").1),
        "binding stays out of URLs"
    );
    let token = dl.token();
    assert!(!dl.launch_url.contains(&token));
    let me = env.me(&token).await;
    assert!(
        me["roles"]
            .as_array()
            .expect("roles")
            .contains(&json!("instructor")),
        "{me}"
    );
    assert_eq!(me["context_title"], "Biology 101");
    let rubric = viva_daemon::sandbox_assignment().rubric;
    let max = rubric.max_points();
    let (status, placed) = env
        .api(
            reqwest::Method::POST,
            &token,
            "/lti/deep-link",
            Some(json!({"assignment": {"title": "Explain photosynthesis", "prompt": "Explain how plants make food.", "rubric": rubric}})),
        )
        .await;
    assert_eq!(status, 200, "{placed}");
    assert_eq!(placed["return_url"], format!("{issuer}/dl/return"));
    let posted = env
        .http
        .post(placed["return_url"].as_str().expect("url"))
        .form(&[("JWT", placed["jwt"].as_str().expect("jwt"))])
        .send()
        .await
        .expect("dl return");
    let posted_status = posted.status();
    let answer: Value = posted.json().await.expect("json");
    assert!(
        posted_status.is_success(),
        "platform refused the deep link: {answer}"
    );
    let item = &answer["items"][0];
    assert_eq!(item["type"], "ltiResourceLink");
    assert_eq!(item["url"], format!("{}/lti/launch", env.tool));
    assert_eq!(item["lineItem"]["scoreMaximum"].as_f64(), Some(max));
    let assignment = item["custom"]["viva_assignment"]
        .as_str()
        .expect("assignment")
        .to_owned();

    // ---- Learner launch of the placed link, with AGS and NRPS ------------------------
    let mut spec = learner("learner-1");
    spec["custom"] = json!({"viva_assignment": assignment, "n": 3});
    spec["resource_link"] = json!("rl-1");
    spec["ags"] = json!({"lineitem": 1, "lineitems": true});
    spec["nrps"] = json!(true);
    let l1 = env.launch(spec.clone()).await;
    assert_eq!(l1.status, 200, "{}", l1.body);
    assert!(
        l1.body.contains("Explain photosynthesis"),
        "the link shows its assignment"
    );
    let learner_token = l1.token();
    let me = env.me(&learner_token).await;
    assert_eq!(me["roles"], json!(["learner"]));
    assert_eq!(me["name"], "Student learner-1");
    assert_eq!(
        l1.data.as_ref().expect("data")["assignment"],
        json!(assignment)
    );
    let learner_user = me["user_id"].as_str().expect("user").to_owned();
    assert_eq!(learner_user, env.uid("learner-1").await);
    // The learner sees the assignment of their course, and nothing to manage.
    let (status, _) = env
        .api(
            reqwest::Method::GET,
            &learner_token,
            &format!("/api/v1/assignments/{assignment}"),
            None,
        )
        .await;
    assert_eq!(status, 200);

    // Instructor launch of the same link: instructor there, roster via NRPS.
    let t = json!({"user": "teacher-1",
                   "roles": ["http://purl.imsglobal.org/vocab/lis/v2/membership/Instructor#TeachingAssistant"],
                   "name": "Tia Teacher", "resource_link": "rl-1", "nrps": true,
                   "custom": {"viva_assignment": assignment}, "ags": {"lineitem": 1}});
    let ti = env.launch(t).await;
    assert_eq!(ti.status, 200, "{}", ti.body);
    let teacher_token = ti.token();
    assert!(
        env.me(&teacher_token).await["roles"]
            .as_array()
            .expect("roles")
            .contains(&json!("instructor"))
    );

    // ---- AGS: PendingManual, then FullyGraded on release ------------------------------
    let sub1 = env
        .scored_submission(&learner_user, &assignment, 1, "pending")
        .await;
    let score = wait_for("a PendingManual score", Duration::from_secs(15), || async {
        let log = env.platform_log().await;
        log["scores"].as_array().and_then(|s| s.first().cloned())
    })
    .await;
    assert_eq!(score["lineitem"], 1);
    assert_eq!(
        score["query"]["type_id"], "7",
        "the query string survived the /scores join"
    );
    assert_eq!(score["body"]["userId"], "learner-1");
    assert_eq!(score["body"]["gradingProgress"], "PendingManual");
    assert_eq!(score["body"]["activityProgress"], "Submitted");
    assert!(
        score["body"].get("scoreGiven").is_none(),
        "no grade before release"
    );
    assert!(
        score["user_agent"]
            .as_str()
            .expect("ua")
            .starts_with("Viva-LTI/")
    );
    // The client assertion, as the platform saw it.
    let log = env.platform_log().await;
    let tok = &log["tokens"][0];
    assert_eq!(tok["claims"]["aud"], format!("{issuer}/token"));
    assert_eq!(tok["claims"]["iss"], client_id);
    assert_eq!(tok["claims"]["sub"], client_id);
    let (iat, exp) = (
        tok["claims"]["iat"].as_i64().expect("iat"),
        tok["claims"]["exp"].as_i64().expect("exp"),
    );
    assert!(exp > iat && exp - iat <= 300);
    assert!(tok["claims"]["jti"].as_str().is_some_and(|j| j.len() >= 16));
    assert_eq!(
        tok["header"]["kid"].as_str(),
        env.state.lti.keys.current_kid().as_deref(),
        "signed with the current tool key"
    );
    assert!(
        log["token_rejections"]
            .as_array()
            .expect("rejections")
            .is_empty(),
        "{log}"
    );

    // Learners cannot release; instructors can, once.
    let (status, _) = env
        .api(
            reqwest::Method::POST,
            &learner_token,
            &format!("/api/v1/submissions/{sub1}/release"),
            None,
        )
        .await;
    assert_eq!(status, 403);
    let (status, released) = env
        .api(
            reqwest::Method::POST,
            &teacher_token,
            &format!("/api/v1/submissions/{sub1}/release"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{released}");
    let (status, again) = env
        .api(
            reqwest::Method::POST,
            &teacher_token,
            &format!("/api/v1/submissions/{sub1}/release"),
            None,
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(again["error"]["code"], "not_awaiting_review");
    let full = wait_for("a FullyGraded score", Duration::from_secs(15), || async {
        let log = env.platform_log().await;
        log["scores"].as_array().and_then(|s| s.get(1).cloned())
    })
    .await;
    assert_eq!(full["body"]["gradingProgress"], "FullyGraded");
    assert_eq!(full["body"]["activityProgress"], "Completed");
    assert_eq!(full["body"]["scoreGiven"], 9.0);
    assert_eq!(full["body"]["scoreMaximum"], 16.0);
    assert_eq!(
        full["body"]["comment"],
        "Clear explanation of inputs and outputs."
    );
    let (t1, t2) = (
        score["body"]["timestamp"].as_str().expect("ts").to_owned(),
        full["body"]["timestamp"].as_str().expect("ts").to_owned(),
    );
    assert!(t2 > t1, "the release timestamp is later: {t1} then {t2}");
    // One access token served both calls (cached by token URL, client, scopes).
    assert_eq!(
        env.platform_log().await["tokens"]
            .as_array()
            .expect("tokens")
            .len(),
        1
    );
    // The learner now sees the grade.
    let (_, sub) = env
        .api(
            reqwest::Method::GET,
            &learner_token,
            &format!("/api/v1/submissions/{sub1}"),
            None,
        )
        .await;
    assert_eq!(sub["state"], "released");
    assert_eq!(sub["score"]["total"], 9.0);

    // ---- A newer attempt awaiting review never blanks the released grade -------------
    let learner_scores = |log: &Value| -> Vec<Value> {
        log["scores"]
            .as_array()
            .expect("scores")
            .iter()
            .filter(|s| s["body"]["userId"] == "learner-1" && s["refused"].is_null())
            .cloned()
            .collect()
    };
    let before = learner_scores(&env.platform_log().await).len();
    let retake = env
        .scored_submission(&learner_user, &assignment, 7, "pending")
        .await;
    let rows = wait_for(
        "the retake's pending row",
        Duration::from_secs(15),
        || async {
            let rows = env.outbox(&retake).await;
            (rows[0]["state"] == "delivered").then(|| json!(rows))
        },
    )
    .await;
    assert!(
        rows[0]["last_error"]
            .as_str()
            .is_some_and(|n| n.contains("keeps the released grade")),
        "{rows}"
    );
    // The platform's record: nothing after the FullyGraded 9/16 until release.
    let seen = learner_scores(&env.platform_log().await);
    assert_eq!(
        seen.len(),
        before,
        "no PendingManual for the retake: {seen:?}"
    );
    let last = seen.last().expect("a score");
    assert_eq!(last["body"]["gradingProgress"], "FullyGraded");
    assert_eq!(last["body"]["scoreGiven"], 9.0);
    let (status, _) = env
        .api(
            reqwest::Method::POST,
            &teacher_token,
            &format!("/api/v1/submissions/{retake}/release"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let replaced = wait_for("the retake's grade", Duration::from_secs(15), || async {
        let seen = learner_scores(&env.platform_log().await);
        (seen.len() > before).then(|| seen[before].clone())
    })
    .await;
    assert_eq!(replaced["body"]["gradingProgress"], "FullyGraded");
    assert_eq!(replaced["body"]["scoreGiven"], 9.0);
    assert!(
        replaced["body"]["timestamp"].as_str() > last["body"]["timestamp"].as_str(),
        "{replaced} after {last}"
    );

    // ---- Retries: a 503 is retried; a non-gradable user is recorded --------------------
    env.platform_post("/control/fail-scores", json!({"statuses": [503]}))
        .await;
    let sub2 = env
        .scored_submission(&learner_user, &assignment, 2, "released")
        .await;
    let rows = wait_for(
        "delivery after a retry",
        Duration::from_secs(20),
        || async {
            let rows = env.outbox(&sub2).await;
            (rows[0]["state"] == "delivered").then(|| json!(rows))
        },
    )
    .await;
    assert_eq!(rows[0]["attempts"], 1, "{rows}");
    let log = env.platform_log().await;
    let refused: Vec<&Value> = log["scores"]
        .as_array()
        .expect("scores")
        .iter()
        .filter(|s| s["refused"] == 503)
        .collect();
    assert_eq!(refused.len(), 1);

    let l2 = env
        .launch({
            let mut s = learner("learner-2");
            s["custom"] = json!({"viva_assignment": assignment});
            s["ags"] = json!({"lineitem": 1});
            s
        })
        .await;
    assert_eq!(l2.status, 200, "{}", l2.body);
    env.platform_post("/control/fail-scores", json!({"ungradable": ["learner-2"]}))
        .await;
    let learner2 = env.uid("learner-2").await;
    let sub3 = env
        .scored_submission(&learner2, &assignment, 1, "released")
        .await;
    let rows = wait_for(
        "a recorded platform refusal",
        Duration::from_secs(15),
        || async {
            let rows = env.outbox(&sub3).await;
            (rows[0]["state"] == "dead").then(|| json!(rows))
        },
    )
    .await;
    assert!(
        rows[0]["last_error"]
            .as_str()
            .expect("error")
            .contains("not gradable"),
        "{rows}"
    );
    // Instructors see it.
    let (status, view) = env
        .api(
            reqwest::Method::GET,
            &teacher_token,
            &format!("/api/v1/submissions/{sub3}/passback"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(view[0]["state"], "dead");
    let (status, _) = env
        .api(
            reqwest::Method::GET,
            &learner_token,
            &format!("/api/v1/submissions/{sub3}/passback"),
            None,
        )
        .await;
    assert_eq!(status, 404, "learners do not see others' passback");
    env.platform_post("/control/fail-scores", json!({})).await;

    // ---- A link with only the line item service: the line item is created ---------------
    let l3 = env
        .launch({
            let mut s = learner("learner-3");
            s["custom"] = json!({"viva_assignment": assignment});
            s["resource_link"] = json!("rl-2");
            s["ags"] = json!({"lineitems": true});
            s
        })
        .await;
    assert_eq!(l3.status, 200, "{}", l3.body);
    let learner3 = env.uid("learner-3").await;
    let sub4 = env
        .scored_submission(&learner3, &assignment, 1, "released")
        .await;
    wait_for(
        "delivery through a created line item",
        Duration::from_secs(15),
        || async {
            let rows = env.outbox(&sub4).await;
            (rows[0]["state"] == "delivered").then(|| json!(rows))
        },
    )
    .await;
    let log = env.platform_log().await;
    let created = &log["line_items"][0];
    assert_eq!(created["resourceLinkId"], "rl-2");
    assert_eq!(created["tag"], "viva");
    assert_eq!(created["scoreMaximum"].as_f64(), Some(max));
    assert_eq!(created["label"], "Explain photosynthesis");
    let last = log["scores"]
        .as_array()
        .expect("scores")
        .last()
        .cloned()
        .expect("score");
    assert_eq!(last["body"]["userId"], "learner-3");
    assert_ne!(last["lineitem"], 1);

    // ---- NRPS with paging ------------------------------------------------------------
    let (status, members) = env
        .api(
            reqwest::Method::GET,
            &teacher_token,
            "/api/v1/lti/members",
            None,
        )
        .await;
    assert_eq!(status, 200, "{members}");
    let members = members.as_array().expect("members");
    assert_eq!(members.len(), 5, "three pages followed");
    let m1 = members
        .iter()
        .find(|m| m["lti_user_id"] == "learner-1")
        .expect("learner-1");
    assert_eq!(m1["submitted"], true);
    let m4 = members
        .iter()
        .find(|m| m["lti_user_id"] == "learner-4")
        .expect("learner-4");
    assert_eq!(m4["submitted"], false, "listed as not submitted");
    let teacher_row = members
        .iter()
        .find(|m| m["lti_user_id"] == "teacher-1")
        .expect("teacher");
    assert_eq!(teacher_row["learner"], false);
    let pages: Vec<i64> = env.platform_log().await["nrps"]
        .as_array()
        .expect("nrps")
        .iter()
        .filter_map(|p| p["page"].as_i64())
        .collect();
    assert_eq!(pages, vec![1, 2, 3]);
    let (status, _) = env
        .api(
            reqwest::Method::GET,
            &learner_token,
            "/api/v1/lti/members",
            None,
        )
        .await;
    assert_eq!(status, 404, "learners cannot list the roster");

    // ---- Platform key rotation: one refetch on the unknown kid ---------------------------
    let before = env.platform_log().await["jwks_fetches"]
        .as_i64()
        .expect("fetches");
    env.platform_post("/control/rotate-key", json!({})).await;
    // Past the refetch interval since the last fetch (the first launch, at the
    // latest); the forged kid below comes well within it.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let after_rotation = env.launch(learner("learner-1")).await;
    assert_eq!(after_rotation.status, 200, "{}", after_rotation.body);
    let fetched = env.platform_log().await["jwks_fetches"]
        .as_i64()
        .expect("fetches");
    assert_eq!(fetched, before + 1, "exactly one refetch");
    // A forged kid right after is not worth another fetch (rate limit).
    let mut forged = learner("learner-1");
    forged["mutate"] = json!({"sign": "unknown-kid"});
    let bad = env.launch(forged).await;
    assert_eq!(bad.error.as_deref(), Some("unknown_kid"));
    assert_eq!(
        env.platform_log().await["jwks_fetches"].as_i64(),
        Some(fetched)
    );
    // The platform's new key also invalidates Viva's cached access token: one renewal.
    let tokens_before = env.platform_log().await["tokens"]
        .as_array()
        .expect("tokens")
        .len();
    let sub5 = env
        .scored_submission(&learner_user, &assignment, 3, "released")
        .await;
    wait_for(
        "delivery with a renewed token",
        Duration::from_secs(15),
        || async {
            let rows = env.outbox(&sub5).await;
            (rows[0]["state"] == "delivered").then(|| json!(rows))
        },
    )
    .await;
    assert_eq!(
        env.platform_log().await["tokens"]
            .as_array()
            .expect("tokens")
            .len(),
        tokens_before + 1
    );
}

/// Each rejected launch: the specific code, a 4xx, no session token, no
/// user created, no redirect.
async fn assert_rejected(env: &Env, l: &Launched, code: &str, user: &str, case: &str) {
    assert_eq!(
        l.error.as_deref(),
        Some(code),
        "{case}: {} {}",
        l.status,
        l.body
    );
    assert!(
        (400..500).contains(&l.status),
        "{case}: status {}",
        l.status
    );
    assert!(
        l.data.is_none() && !l.body.contains("\"token\""),
        "{case}: a session leaked"
    );
    let uid = env.uid(user).await;
    assert!(!env.user_exists(&uid).await, "{case}: a user was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_malformed_and_replayed_launches_are_rejected_without_side_effects() {
    let Some(env) = Env::start().await else {
        return;
    };
    assert_eq!(env.register().await.status(), 200);
    let tool_launch = format!("{}/lti/launch", env.tool);
    let links_before = env.count("lti_links").await;

    let cases: Vec<(&str, Value, &str)> = vec![
        ("alg none", json!({"sign": "none"}), "disallowed_algorithm"),
        (
            "HS256 keyed with the public key",
            json!({"sign": "hs256-public-key"}),
            "disallowed_algorithm",
        ),
        (
            "RS512 not registered",
            json!({"sign": "rs512"}),
            "disallowed_algorithm",
        ),
        ("no kid", json!({"sign": "no-kid"}), "missing_kid"),
        ("unknown kid", json!({"sign": "unknown-kid"}), "unknown_kid"),
        (
            "jku/x5u to the attacker's keys",
            json!({"sign": "attacker-jku"}),
            "unknown_kid",
        ),
        (
            "embedded jwk",
            json!({"sign": "attacker-embedded-jwk"}),
            "bad_signature",
        ),
        (
            "attacker key, platform kid",
            json!({"sign": "attacker-as-platform"}),
            "bad_signature",
        ),
        ("1024-bit platform key", json!({"sign": "weak"}), "weak_key"),
        (
            "tampered payload",
            json!({"sign": "tampered"}),
            "bad_signature",
        ),
        (
            "another issuer",
            json!({"set": {"iss": "http://evil.example.com"}}),
            "issuer_mismatch",
        ),
        (
            "audience without the client",
            json!({"set": {"aud": "someone-else"}}),
            "audience_mismatch",
        ),
        (
            "several audiences, no azp",
            json!({"set": {"aud": ["x", "y"]}}),
            "audience_mismatch",
        ),
        (
            "azp of another client",
            json!({"set": {"azp": "someone-else"}}),
            "azp_mismatch",
        ),
        (
            "expired",
            json!({"set_rel": {"exp": -3600, "iat": -4000}}),
            "token_expired",
        ),
        (
            "issued in the future",
            json!({"set_rel": {"iat": 3600}}),
            "token_not_yet_valid",
        ),
        (
            "issued too long ago",
            json!({"set_rel": {"iat": -7300, "exp": 600}}),
            "token_too_old",
        ),
        (
            "exp not a number",
            json!({"set": {"exp": "soon"}}),
            "invalid_claim",
        ),
        (
            "forged nonce",
            json!({"set": {"nonce": "forged"}}),
            "nonce_mismatch",
        ),
        ("no nonce", json!({"del": ["nonce"]}), "missing_claim"),
        (
            "LTI 1.1",
            json!({"set": {"https://purl.imsglobal.org/spec/lti/claim/version": "1.1.0"}}),
            "unsupported_version",
        ),
        (
            "unsupported message",
            json!({"set": {"https://purl.imsglobal.org/spec/lti/claim/message_type": "LtiSubmissionReviewRequest"}}),
            "unsupported_message_type",
        ),
        (
            "unknown deployment",
            json!({"set": {"https://purl.imsglobal.org/spec/lti/claim/deployment_id": "deploy-x"}}),
            "unknown_deployment",
        ),
        (
            "no deployment",
            json!({"del": ["https://purl.imsglobal.org/spec/lti/claim/deployment_id"]}),
            "missing_claim",
        ),
        (
            "no resource link",
            json!({"del": ["https://purl.imsglobal.org/spec/lti/claim/resource_link"]}),
            "missing_claim",
        ),
        (
            "no roles",
            json!({"del": ["https://purl.imsglobal.org/spec/lti/claim/roles"]}),
            "missing_claim",
        ),
        ("no sub", json!({"del": ["sub"]}), "missing_claim"),
        (
            "another target link",
            json!({"set": {"https://purl.imsglobal.org/spec/lti/claim/target_link_uri": format!("{tool_launch}?next=http://evil.example.com")}}),
            "target_link_mismatch",
        ),
    ];
    let mut n = 0;
    for (i, (case, mutate, code)) in cases.iter().enumerate() {
        let user = format!("neg-{i}");
        let mut spec = learner(&user);
        spec["mutate"] = mutate.clone();
        let l = env.launch(spec).await;
        assert_rejected(&env, &l, code, &user, case).await;
        n += 1;
    }
    // A deep-linking request without its settings.
    let mut spec =
        json!({"user": "neg-dl", "roles": [format!("{ROLE}Instructor")], "kind": "deeplink"});
    spec["mutate"] =
        json!({"del": ["https://purl.imsglobal.org/spec/lti-dl/claim/deep_linking_settings"]});
    let l = env.launch(spec).await;
    assert_rejected(
        &env,
        &l,
        "missing_claim",
        "neg-dl",
        "deep linking without settings",
    )
    .await;
    n += 1;

    // ---- Login initiation ----------------------------------------------------------
    let prepared = env.prepare(learner("neg-login")).await;
    let base = launch_params(&prepared).expect("params");
    let without = |name: &str| -> Vec<(String, String)> {
        base.iter().filter(|(k, _)| k != name).cloned().collect()
    };
    let with = |name: &str, value: &str| -> Vec<(String, String)> {
        let mut p = without(name);
        p.push((name.to_owned(), value.to_owned()));
        p
    };
    type Params = Vec<(String, String)>;
    let login_cases: Vec<(&str, Params, &str, u16)> = vec![
        ("no iss", without("iss"), "missing_param", 400),
        ("no login_hint", without("login_hint"), "missing_param", 400),
        (
            "no target_link_uri",
            without("target_link_uri"),
            "missing_param",
            400,
        ),
        (
            "unknown issuer",
            with("iss", "http://evil.example.com"),
            "unknown_registration",
            404,
        ),
        (
            "unknown client id",
            with("client_id", "nobody"),
            "unknown_registration",
            404,
        ),
        (
            "open redirect through target_link_uri",
            with("target_link_uri", "http://evil.example.com/phish"),
            "foreign_target_link",
            400,
        ),
        (
            "unknown deployment",
            with("lti_deployment_id", "deploy-x"),
            "unknown_deployment",
            400,
        ),
    ];
    for (case, params, code, status) in login_cases {
        let resp = env.login(&params).await;
        assert_eq!(resp.status().as_u16(), status, "{case}");
        assert_eq!(
            resp.headers()
                .get("x-viva-error")
                .and_then(|v| v.to_str().ok()),
            Some(code),
            "{case}"
        );
        assert!(resp.headers().get(LOCATION).is_none(), "{case}: redirected");
        assert!(
            resp.headers().get(SET_COOKIE).is_none(),
            "{case}: state created"
        );
        n += 1;
    }
    // redirect_uri comes from configuration, not from the Host header.
    let resp = env
        .http
        .get(format!("{}/lti/login", env.tool))
        .query(&base)
        .header(HOST, "evil.example.com")
        .send()
        .await
        .expect("login");
    let location = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .expect("redirect")
        .to_owned();
    let url = reqwest::Url::parse(&location).expect("url");
    let redirect: HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(redirect["redirect_uri"], tool_launch);
    n += 1;

    // ---- State ------------------------------------------------------------------------
    // Missing and unknown state.
    let ok = env.launch(learner("replayed")).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let mut l = ok;
    l.form.remove("state");
    env.post_launch(&mut l).await;
    assert_eq!(l.error.as_deref(), Some("missing_param"));
    n += 1;
    l.form.insert("state".into(), "0".repeat(64));
    env.post_launch(&mut l).await;
    assert_eq!(l.error.as_deref(), Some("unknown_state"));
    n += 1;
    // Replaying a used launch (same form, same cookie).
    let mut replay = env.launch(learner("replayed-2")).await;
    assert_eq!(replay.status, 200);
    env.post_launch(&mut replay).await;
    assert_eq!(replay.error.as_deref(), Some("unknown_state"), "single use");
    assert!(replay.data.is_none());
    n += 1;
    // Another browser's binding.
    let l = env
        .launch_with(learner("neg-binding"), |l| {
            if let Some((_, v)) = l.cookie.as_mut() {
                *v = "0".repeat(48);
            }
        })
        .await;
    assert_rejected(&env, &l, "state_not_bound", "neg-binding", "wrong binding").await;
    n += 1;
    // No cookie and no platform storage: "open in a new window", never a skipped check.
    let mut l = env
        .launch_with(learner("neg-nocookie"), |l| {
            l.cookie = None;
        })
        .await;
    assert_eq!(l.status, 200);
    assert_eq!(l.error.as_deref(), Some("state_not_bound"));
    assert!(l.body.contains("id=\"new-window\""), "{}", l.body);
    assert!(!l.body.contains("\"token\""));
    let uid = env.uid("neg-nocookie").await;
    assert!(!env.user_exists(&uid).await);
    n += 1;
    // With storage offered, the page asks the platform frame (and holds no session).
    let mut spec = learner("neg-storage");
    spec["storage"] = json!(true);
    let st = env.launch_with(spec, |l| l.cookie = None).await;
    assert_eq!(st.status, 200);
    assert!(st.body.contains("lti.get_data"), "{}", st.body);
    assert!(st.data.as_ref().is_some_and(|d| d.get("token").is_none()));
    let binding_of = |l: &Launched| {
        l.cookie_header
            .as_deref()
            .and_then(|c| c.split(';').next())
            .and_then(|kv| kv.split_once('='))
            .map(|(_, v)| v.to_owned())
            .expect("binding")
    };
    // A posted binding counts only in the platform-storage flow its login
    // offered: the no-storage login's own binding, posted, is refused.
    l.form.insert("lti_state_binding".into(), binding_of(&l));
    l.origin = Some(env.tool.clone());
    env.post_launch(&mut l).await;
    assert_eq!(l.error.as_deref(), Some("state_not_bound"), "{}", l.body);
    assert!(!env.user_exists(&uid).await);
    // The storage launch's state was not consumed: a wrong binding is still
    // refused, and the browser that holds the binding (from platform
    // storage) gets in.
    let mut l = st;
    let uid = env.uid("neg-storage").await;
    let binding = binding_of(&l);
    // Login CSRF: the right binding posted by a page of another origin (a
    // classmate's page), or with no origin at all, is refused.
    l.form.insert("lti_state_binding".into(), binding.clone());
    l.origin = Some(env.platform.base.clone());
    env.post_launch(&mut l).await;
    assert_eq!(l.error.as_deref(), Some("state_not_bound"), "{}", l.body);
    l.origin = None;
    env.post_launch(&mut l).await;
    assert_eq!(l.error.as_deref(), Some("state_not_bound"), "{}", l.body);
    assert!(!env.user_exists(&uid).await);
    // From the tool's own page: a wrong binding is refused, the right one accepted.
    l.origin = Some(env.tool.clone());
    l.form
        .insert("lti_state_binding".into(), "not-the-binding".into());
    env.post_launch(&mut l).await;
    assert_eq!(l.error.as_deref(), Some("state_not_bound"));
    assert!(!env.user_exists(&uid).await);
    l.form.insert("lti_state_binding".into(), binding);
    env.post_launch(&mut l).await;
    assert_eq!(l.status, 200, "{}", l.body);
    assert!(env.me(&l.token()).await["user_id"] == json!(uid));
    n += 1;

    // A nonce belongs to its state: launch A's token with launch B's state.
    let a = env.launch_with(learner("nonce-a"), |l| l.status = 0).await;
    let token_a = a.form.get("id_token").cloned().expect("token a");
    let b = env
        .launch_with(learner("nonce-b"), |l| {
            l.form.insert("id_token".into(), token_a.clone());
        })
        .await;
    assert_rejected(
        &env,
        &b,
        "nonce_mismatch",
        "nonce-b",
        "nonce of another state",
    )
    .await;
    n += 1;

    // Deep linking only from a deep-linking launch, and only for instructors.
    let rl = env.launch(learner("dl-learner")).await;
    let (status, body) = env
        .api(
            reqwest::Method::POST,
            &rl.token(),
            "/lti/deep-link",
            Some(json!({"assignment_id": "x"})),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    n += 1;
    let learner_dl = env
        .launch(
            json!({"user": "dl-student", "roles": [format!("{ROLE}Learner")], "kind": "deeplink"}),
        )
        .await;
    assert_eq!(learner_dl.status, 403);
    assert_eq!(learner_dl.error.as_deref(), Some("forbidden"));
    assert!(learner_dl.data.is_none());
    n += 1;
    // The platform's own error answer.
    let resp = env
        .http
        .post(&tool_launch)
        .form(&[("error", "login_required"), ("state", "x")])
        .send()
        .await
        .expect("launch");
    assert_eq!(
        resp.headers()
            .get("x-viva-error")
            .and_then(|v| v.to_str().ok()),
        Some("platform_refused_login")
    );
    n += 1;

    assert_eq!(
        env.count("lti_links").await,
        links_before + 1,
        "every good launch used the same resource link; no rejected one made another"
    );
    assert!(n >= 30, "{n} cases");
    eprintln!("{n} rejection cases passed");
}

/// The browser acceptance test: a course page on `localhost` frames the tool
/// on `127.0.0.1` (cross-site) in headless Chromium with cookies blocked;
/// the launch goes through the postMessage storage flow and the launched
/// page calls `/api/v1/me`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn launch_in_a_cross_site_iframe_with_cookies_blocked() {
    let Some(env) = Env::start().await else {
        return;
    };
    let driver = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lti-platform/browser.py");
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let (Some(chromium), true) = (
        chromium,
        std::path::Path::new("/usr/bin/chromedriver").exists(),
    ) else {
        if std::env::var("VIVA_REQUIRE_BROWSER").is_ok() {
            panic!(
                "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
            );
        }
        eprintln!("SKIPPED: no chromium/chromedriver");
        return;
    };
    assert_eq!(env.register().await.status(), 200);
    for mode in ["third-party-blocked", "all-blocked"] {
        let mut spec = learner("browser-1");
        spec["storage"] = json!(true);
        let prepared = env.prepare(spec).await;
        let hint = prepared["hint"].as_str().expect("hint").to_owned();
        let py = python().expect("python");
        let mut cmd = std::process::Command::new(&py);
        cmd.arg(&driver)
            .args(["--chromium", chromium, "--mode", mode])
            .arg(format!("{}/course?hint={hint}", env.platform.base));
        // Off the runtime's threads (the daemon under test serves
        // meanwhile); after 5 minutes the driver and its browser are killed.
        let out = tokio::task::spawn_blocking(move || {
            viva_tests::process::output(&mut cmd, Duration::from_secs(300))
        })
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{mode}: browser driver: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value =
            serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("result JSON");
        eprintln!("{mode}: {result}");
        assert_eq!(result["ready"], "1", "{mode}: {result}");
        assert!(
            result["me"]
                .as_str()
                .unwrap_or_default()
                .contains("(learner) in Biology 101"),
            "{mode}: {result}"
        );
        assert!(
            !result["frame_url"]
                .as_str()
                .unwrap_or_default()
                .contains("token"),
            "no token in URLs"
        );
        if mode == "all-blocked" {
            let log = result["storage"].as_array().cloned().unwrap_or_default();
            assert!(
                log.iter().any(|e| e["subject"] == "lti.put_data"),
                "{result}"
            );
            assert!(
                log.iter()
                    .any(|e| e["subject"] == "lti.get_data" && e["had"] == true),
                "the binding came back from platform storage: {result}"
            );
        }
    }
}

/// Only a Viva administrator adds platforms, and a platform's administrator
/// is an administrator of that platform only. A second, attacker-controlled
/// platform (another process of the same harness, its own issuer and keys)
/// cannot register itself or launch; once an administrator lets it in, its
/// institution Administrator gets 404/403 on the first platform's course,
/// on every Viva-wide admin route and on site-wide plugins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_uninvited_platform_is_refused_and_an_admitted_one_stays_in_its_tenant() {
    let Some(env) = Env::start().await else {
        return;
    };
    assert_eq!(env.register().await.status(), 200);
    let main_client = env.client_id_at(&env.platform.base).await;

    // ---- The first platform's course: an assignment and a learner's submission ----
    let teacher = json!({"user": "teacher-1", "roles": [format!("{ROLE}Instructor")],
                         "name": "Tia Teacher", "resource_link": "rl-victim", "nrps": true});
    let t = env.launch(teacher).await;
    assert_eq!(t.status, 200, "{}", t.body);
    let teacher_token = t.token();
    let victim_link = t.data.as_ref().expect("data")["link"]
        .as_str()
        .expect("link")
        .to_owned();
    let victim_ctx = env.me(&teacher_token).await["context_id"]
        .as_str()
        .expect("ctx")
        .to_owned();
    let rubric = viva_daemon::sandbox_assignment().rubric;
    let (status, a) = env
        .api(
            reqwest::Method::POST,
            &teacher_token,
            "/api/v1/assignments",
            Some(json!({"title": "Victim oral", "prompt": "Say something.", "rubric": rubric})),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    let assignment = a["id"].as_str().expect("id").to_owned();
    let l = env.launch(learner("victim-1")).await;
    assert_eq!(l.status, 200, "{}", l.body);
    let victim = env.uid("victim-1").await;
    let sid = env
        .scored_submission(&victim, &assignment, 1, "pending")
        .await;

    // ---- The attacker's platform registers itself: refused, nothing fetched ----
    let attacker = Platform::start(&python().expect("python"));
    let evil_cfg = format!("{}/.well-known/openid-configuration", attacker.base);
    let open = env
        .register_at(&format!("{}/lti/register", env.tool), &evil_cfg)
        .await;
    assert_eq!(open.status(), 403);
    assert_eq!(
        open.headers()
            .get("x-viva-error")
            .and_then(|v| v.to_str().ok()),
        Some("invite_required")
    );
    let guessed = env
        .register_at(
            &format!("{}/lti/register?invite=guessed-invitation", env.tool),
            &evil_cfg,
        )
        .await;
    assert_eq!(guessed.status(), 403);
    assert_eq!(
        guessed
            .headers()
            .get("x-viva-error")
            .and_then(|v| v.to_str().ok()),
        Some("invite_invalid")
    );
    let evil_log: Value = env
        .http
        .get(format!("{}/control/log", attacker.base))
        .send()
        .await
        .expect("log")
        .json()
        .await
        .expect("json");
    assert_eq!(
        evil_log["registrations"],
        json!([]),
        "the attacker's platform was never contacted"
    );
    assert_eq!(env.count("lti_registrations").await, 1);

    // ---- Its launch is refused: Viva does not know it ----
    let evil_admin = json!({"user": "mallory", "name": "Mallory",
        "roles": ["http://purl.imsglobal.org/vocab/lis/v2/institution/person#Administrator"]});
    let prepared = env
        .platform_post_at(&attacker.base, "/control/launch", evil_admin.clone())
        .await;
    let mut params = launch_params(&prepared).expect("params");
    // It has never seen Viva: it names the tool's launch URL and a client id it guessed.
    for (k, v) in &mut params {
        match k.as_str() {
            "client_id" => *v = main_client.clone(),
            "target_link_uri" => *v = format!("{}/lti/launch", env.tool),
            _ => {}
        }
    }
    let refused = env.login(&params).await;
    assert_eq!(refused.status(), 404);
    assert_eq!(
        refused
            .headers()
            .get("x-viva-error")
            .and_then(|v| v.to_str().ok()),
        Some("unknown_registration")
    );
    assert!(refused.headers().get(LOCATION).is_none(), "no redirect");

    // ---- An administrator lets it in (a one-time URL); it registers once ----
    let url = env.invite(None).await;
    assert_eq!(env.register_at(&url, &evil_cfg).await.status(), 200);
    let again = env.register_at(&url, &evil_cfg).await;
    assert_eq!(again.status(), 403, "an invitation works once");
    assert_eq!(env.count("lti_registrations").await, 2);
    let evil_client = env.client_id_at(&attacker.base).await;
    let ml = env.launch_on(&attacker.base, evil_admin, |_| {}).await;
    assert_eq!(ml.status, 200, "{}", ml.body);
    let evil = ml.token();
    let me = env.me(&evil).await;
    assert_eq!(me["viva_admin"], json!(false), "{me}");
    assert_ne!(me["context_id"], json!(victim_ctx));
    assert_eq!(
        me["user_id"],
        json!(viva_daemon::lti_user_id(
            &attacker.base,
            &evil_client,
            "mallory"
        ))
    );

    // Its administrator administers every course of its own registration.
    let other = json!({"user": "t-2", "roles": [format!("{ROLE}Instructor")], "name": "T Two",
                       "context": "course-2", "context_title": "Course two", "resource_link": "rl-2"});
    let t2 = env.launch_on(&attacker.base, other, |_| {}).await;
    assert_eq!(t2.status, 200, "{}", t2.body);
    let t2_token = t2.token();
    let ctx2 = env.me(&t2_token).await["context_id"]
        .as_str()
        .expect("ctx")
        .to_owned();
    assert_ne!(Some(ctx2.as_str()), me["context_id"].as_str());
    let (status, a2) = env
        .api(
            reqwest::Method::POST,
            &t2_token,
            "/api/v1/assignments",
            Some(json!({"title": "Own course two", "prompt": "Speak.", "rubric": viva_daemon::sandbox_assignment().rubric})),
        )
        .await;
    assert_eq!(status, 201, "{a2}");
    let a2 = a2["id"].as_str().expect("id").to_owned();
    let (status, got) = env
        .api(
            reqwest::Method::GET,
            &evil,
            &format!("/api/v1/assignments/{a2}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "its own registration's other course: {got}");
    let (status, listed) = env
        .api(
            reqwest::Method::GET,
            &evil,
            &format!("/api/v1/assignments?context={ctx2}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(listed.to_string().contains(&a2), "{listed}");
    let (status, listed) = env
        .api(
            reqwest::Method::GET,
            &evil,
            &format!("/api/v1/assignments?context={victim_ctx}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(!listed.to_string().contains(&assignment), "{listed}");

    // ---- Every route class: the first platform's data is not there ----
    use reqwest::Method as M;
    let deny = |status: u16| status == 403 || status == 404;
    for (method, path) in [
        (M::GET, format!("/api/v1/assignments/{assignment}")),
        (M::DELETE, format!("/api/v1/assignments/{assignment}")),
        (
            M::GET,
            format!("/api/v1/assignments/{assignment}/submissions"),
        ),
        (
            M::GET,
            format!("/api/v1/assignments/{assignment}/dashboard"),
        ),
        (M::GET, format!("/api/v1/assignments/{assignment}/roster")),
        (
            M::POST,
            format!("/api/v1/assignments/{assignment}/release-all"),
        ),
        (M::GET, format!("/api/v1/submissions/{sid}")),
        (M::GET, format!("/api/v1/submissions/{sid}/media")),
        (M::GET, format!("/api/v1/submissions/{sid}/audit")),
        (M::GET, format!("/api/v1/submissions/{sid}/passback")),
        (M::POST, format!("/api/v1/submissions/{sid}/release")),
        (M::POST, format!("/api/v1/submissions/{sid}/retry")),
        (M::GET, format!("/api/v1/lti/members?link={victim_link}")),
        (M::GET, format!("/api/v1/users/{victim}/export")),
        (M::DELETE, format!("/api/v1/users/{victim}")),
        // Viva-wide administration
        (M::GET, "/api/v1/admin/system".to_owned()),
        (M::GET, "/api/v1/admin/doctor".to_owned()),
        (M::GET, "/api/v1/admin/audit".to_owned()),
        (M::GET, "/api/v1/admin/timeline".to_owned()),
        (M::GET, "/api/v1/admin/plugin-failures".to_owned()),
        (M::POST, "/api/v1/admin/purge".to_owned()),
        (M::POST, "/api/v1/admin/platforms/invites".to_owned()),
        (
            M::DELETE,
            format!(
                "/api/v1/admin/platforms?issuer={}&client_id={main_client}",
                env.platform.base
            ),
        ),
        // Plugins: a site-wide upload, disabling the built-in
        (M::POST, "/api/v1/plugins".to_owned()),
        (
            M::POST,
            "/api/v1/plugins/weighted-criteria/disable".to_owned(),
        ),
    ] {
        let body = (method == M::POST).then(|| json!({}));
        let (status, answer) = env.api(method.clone(), &evil, &path, body).await;
        assert!(deny(status), "{method} {path}: {status} {answer}");
    }
    let override_req = json!({"criteria": [], "feedback": "pwned"});
    let (status, _) = env
        .api(
            M::POST,
            &evil,
            &format!("/api/v1/submissions/{sid}/override"),
            Some(override_req),
        )
        .await;
    assert!(deny(status), "override: {status}");
    let (status, _) = env
        .api(
            M::POST,
            &evil,
            "/api/v1/admin/platforms",
            Some(json!({"issuer": "https://evil.example", "client_id": "x",
                "auth_login_url": "https://evil.example/auth", "auth_token_url": "https://evil.example/token",
                "key_set_url": "https://evil.example/jwks", "deployments": ["d"]})),
        )
        .await;
    assert_eq!(status, 403, "adding a platform is Viva-wide administration");
    // Listings hold only its own tenant.
    let (status, list) = env
        .api(
            M::GET,
            &evil,
            &format!("/api/v1/submissions?context={victim_ctx}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{list}");
    assert!(!list.to_string().contains(&sid), "{list}");
    let (status, regs) = env
        .api(M::GET, &evil, "/api/v1/admin/platforms", None)
        .await;
    assert_eq!(status, 200, "{regs}");
    assert_eq!(regs.as_array().map(Vec::len), Some(1), "{regs}");
    assert_eq!(regs[0]["issuer"], json!(attacker.base));
    // Nothing of the first platform changed.
    assert_eq!(env.count("lti_registrations").await, 2);
    let (status, still) = env
        .api(
            M::GET,
            &teacher_token,
            &format!("/api/v1/submissions/{sid}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{still}");
    assert_eq!(still["state"], "awaiting_review");
    assert!(env.user_exists(&victim).await);
    // The same sub at the attacker's platform is another user than at the first.
    assert_ne!(
        viva_daemon::lti_user_id(&attacker.base, &evil_client, "victim-1"),
        victim
    );
}

/// One slow platform does not stall another: while one registration's key
/// set endpoint sleeps 25 s inside a launch, a first launch on another
/// registration (which fetches its own key set) completes in under 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_platform_with_a_sleeping_key_set_does_not_stall_another() {
    let Some(env) = Env::start().await else {
        return;
    };
    assert_eq!(env.register().await.status(), 200);
    let slow = Platform::start(&python().expect("python"));
    let url = env.invite(None).await;
    let slow_cfg = format!("{}/.well-known/openid-configuration", slow.base);
    assert_eq!(env.register_at(&url, &slow_cfg).await.status(), 200);
    env.platform_post_at(&slow.base, "/control/jwks-delay", json!({"seconds": 25}))
        .await;
    let stalled = env.launch_on(&slow.base, learner("slow-1"), |_| {});
    tokio::pin!(stalled);
    let timed = async {
        // Start once the slow launch is inside its key set fetch.
        wait_for(
            "the slow key set fetch",
            Duration::from_secs(20),
            || async {
                let log: Value = env
                    .http
                    .get(format!("{}/control/log", slow.base))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (log["jwks_fetches"].as_u64() >= Some(1)).then_some(log)
            },
        )
        .await;
        let t0 = Instant::now();
        let l = env.launch(learner("fast-1")).await;
        (l, t0.elapsed())
    };
    let (fast, took) = tokio::select! {
        r = timed => r,
        s = &mut stalled => panic!("the slow launch ended first: {} {}", s.status, s.body),
    };
    assert_eq!(fast.status, 200, "{}", fast.body);
    assert!(
        took < Duration::from_secs(2),
        "a launch on another platform took {took:?}"
    );
    assert_eq!(env.platform_log().await["jwks_fetches"], 1);
}

/// Hosted Canvas: the configuration comes from the school's host, the issuer
/// is `https://canvas.instructure.com`. Refused without an administrator
/// naming that issuer, registered with it; the launch page then loads in
/// headless Chromium framed by the platform's page (third-party cookies
/// blocked), and the browser refuses it framed by a page of another origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hosted_canvas_registers_with_an_invitation_naming_its_issuer_and_launches_framed() {
    const CANVAS: &str = "https://canvas.instructure.com";
    let Some(env) = Env::start().await else {
        return;
    };
    env.platform_post("/control/issuer", json!({ "issuer": CANVAS }))
        .await;
    let cfg = format!("{}/.well-known/openid-configuration", env.platform.base);
    // An invitation that names no issuer keeps the issuer-host rule.
    let plain = env.invite(None).await;
    let refused = env.register_at(&plain, &cfg).await;
    assert_eq!(
        refused
            .headers()
            .get("x-viva-error")
            .and_then(|v| v.to_str().ok()),
        Some("registration_failed")
    );
    // Naming another issuer does not help either.
    let other = env.invite(Some("https://other.example.edu")).await;
    let refused = env.register_at(&other, &cfg).await;
    assert_eq!(
        refused
            .headers()
            .get("x-viva-error")
            .and_then(|v| v.to_str().ok()),
        Some("registration_failed")
    );
    assert_eq!(env.count("lti_registrations").await, 0);
    // The operator's way: `viva platform invite --issuer …` on the server.
    let mut cli = std::process::Command::new(viva_tests::viva_bin());
    viva_tests::process::clean_viva_env(&mut cli)
        .args(["platform", "invite", "--issuer", CANVAS])
        .env("VIVA_DATA_DIR", env._dir.path().join("var"))
        .env("VIVA_PUBLIC_URL", &env.tool);
    let out = tokio::task::spawn_blocking(move || {
        viva_tests::process::output(&mut cli, viva_tests::process::SHORT)
    })
    .await
    .expect("join")
    .expect("viva platform invite");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let canvas = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        canvas.starts_with(&format!("{}/lti/register?invite=", env.tool)),
        "{canvas}"
    );
    let resp = env.register_at(&canvas, &cfg).await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("body");
    assert!(body.contains(CANVAS), "the issuer is shown: {body}");
    let (status, regs) = env
        .api(
            reqwest::Method::GET,
            &env.admin_token(),
            "/api/v1/admin/platforms",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(regs[0]["issuer"], CANVAS);
    assert_eq!(regs[0]["frame_origins"], json!([env.platform.base]));
    let client = env.client_id_at(&env.platform.base).await;
    // A launch over HTTP: the identity is the Canvas tenant's.
    let l = env.launch(learner("canvas-1")).await;
    assert_eq!(l.status, 200, "{}", l.body);
    assert_eq!(
        env.me(&l.token()).await["user_id"],
        json!(viva_daemon::lti_user_id(CANVAS, &client, "canvas-1"))
    );

    // ---- In a browser, framed by the platform's page ----------------------------------
    let driver = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lti-platform/browser.py");
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let (Some(chromium), true) = (
        chromium,
        std::path::Path::new("/usr/bin/chromedriver").exists(),
    ) else {
        if std::env::var("VIVA_REQUIRE_BROWSER").is_ok() {
            panic!(
                "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
            );
        }
        eprintln!("SKIPPED: no chromium/chromedriver");
        return;
    };
    let port = env
        .platform
        .base
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    // The platform's own origin (localhost), then the same server reached
    // on another origin (127.0.0.1), which no registration lists.
    for (parent, allowed) in [
        (env.platform.base.clone(), true),
        (format!("http://127.0.0.1:{port}"), false),
    ] {
        let mut spec = learner("canvas-browser");
        spec["storage"] = json!(true);
        let prepared = env.prepare(spec).await;
        let hint = prepared["hint"].as_str().expect("hint").to_owned();
        let py = python().expect("python");
        let mut cmd = std::process::Command::new(&py);
        cmd.arg(&driver)
            .args(["--chromium", chromium, "--mode", "third-party-blocked"])
            .args(["--timeout", if allowed { "40" } else { "8" }])
            .arg(format!("{parent}/course?hint={hint}"));
        // Off the runtime's threads; after 2 minutes the driver and its
        // browser are killed.
        let out = tokio::task::spawn_blocking(move || {
            viva_tests::process::output(&mut cmd, Duration::from_secs(120))
        })
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{parent}: browser driver: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{parent}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value =
            serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("result JSON");
        eprintln!("{parent}: {result}");
        if allowed {
            assert_eq!(result["ready"], "1", "{result}");
            assert!(
                result["me"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("(learner)"),
                "{result}"
            );
        } else {
            assert_ne!(result["ready"], "1", "framed by another origin: {result}");
            assert!(result["me"].is_null(), "{result}");
            assert!(
                result["frame_url"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("chrome-error:")),
                "the browser refused to frame it: {result}"
            );
        }
    }
}

/// Issue 16, "Rubric and plugin versions": a graded, released submission;
/// a points-only edit is rescored by the plugin alone (the fake evaluators'
/// call log does not grow), a level edit is evaluated again through the
/// queue (it grows by one call per evaluator); the platform's gradebook
/// shows each new grade only after the instructor releases it; the audit
/// log names who changed what.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rubric_edit_is_rescored_and_reaches_the_gradebook_only_on_release() {
    let Some(env) = Env::start_grading().await else {
        return;
    };
    let resp = env.register().await;
    assert_eq!(resp.status(), 200);

    // The instructor places an assignment by deep linking.
    let dl = env
        .launch(
            json!({"user": "teacher-v", "roles": [format!("{ROLE}Instructor")],
                       "name": "Tia Teacher", "kind": "deeplink"}),
        )
        .await;
    assert_eq!(dl.status, 200, "{}", dl.body);
    let rubric = viva_daemon::sandbox_assignment().rubric;
    let (status, placed) = env
        .api(
            reqwest::Method::POST,
            &dl.token(),
            "/lti/deep-link",
            Some(json!({"assignment": {"title": "Explain photosynthesis",
                "prompt": "Explain how plants make food.", "rubric": rubric}})),
        )
        .await;
    assert_eq!(status, 200, "{placed}");
    let answer: Value = env
        .http
        .post(placed["return_url"].as_str().expect("url"))
        .form(&[("JWT", placed["jwt"].as_str().expect("jwt"))])
        .send()
        .await
        .expect("dl return")
        .json()
        .await
        .expect("json");
    let assignment = answer["items"][0]["custom"]["viva_assignment"]
        .as_str()
        .expect("assignment")
        .to_owned();
    let link = |user: &str, roles: Value| {
        json!({"user": user, "roles": roles, "name": user, "resource_link": "rl-v",
               "custom": {"viva_assignment": assignment}, "ags": {"lineitem": 1, "lineitems": true}})
    };
    let student = env
        .launch(link("learner-v", json!([format!("{ROLE}Learner")])))
        .await;
    assert_eq!(student.status, 200, "{}", student.body);
    let teacher = env
        .launch(link("teacher-v", json!([format!("{ROLE}Instructor")])))
        .await;
    assert_eq!(teacher.status, 200, "{}", teacher.body);
    let (student, teacher) = (student.token(), teacher.token());
    let teacher_id = env.me(&teacher).await["user_id"]
        .as_str()
        .expect("user")
        .to_owned();
    let (status, a) = env
        .api(
            reqwest::Method::GET,
            &teacher,
            &format!("/api/v1/assignments/{assignment}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["version"], 1);
    assert_eq!(
        a["plugin_sha256"].as_str().map(str::len),
        Some(64),
        "the plugin is pinned by sha256: {a}"
    );

    // The student answers; the grade is released to the gradebook.
    let media = tempfile::tempdir().expect("tmp");
    let wav = viva_tests::tone(media.path(), "answer.wav", 2.0);
    let resp = env
        .http
        .post(format!(
            "{}/api/v1/assignments/{assignment}/submissions?filename=answer.wav",
            env.tool
        ))
        .bearer_auth(&student)
        .body(std::fs::read(&wav).expect("wav"))
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 201);
    let sub = resp.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let state_of = |want: &'static str| {
        let (env, teacher, sub) = (&env, teacher.clone(), sub.clone());
        async move {
            wait_for(want, Duration::from_secs(60), || {
                let teacher = teacher.clone();
                let sub = sub.clone();
                async move {
                    let (_, s) = env
                        .api(
                            reqwest::Method::GET,
                            &teacher,
                            &format!("/api/v1/submissions/{sub}"),
                            None,
                        )
                        .await;
                    assert_ne!(s["state"], "failed", "{s}");
                    (s["state"] == want).then_some(s)
                }
            })
            .await
        }
    };
    let scored = state_of("awaiting_review").await;
    let g1 = scored["score"]["total"].as_f64().expect("total");
    let release = || async {
        let (status, r) = env
            .api(
                reqwest::Method::POST,
                &teacher,
                &format!("/api/v1/submissions/{sub}/release"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{r}");
    };
    // The platform's gradebook: the student's latest accepted graded score.
    let gradebook = || async {
        let log = env.platform_log().await;
        let scores: Vec<Value> = log["scores"]
            .as_array()
            .expect("scores")
            .iter()
            .filter(|s| s["body"]["userId"] == "learner-v" && s["refused"].is_null())
            .cloned()
            .collect();
        let graded = scores
            .iter()
            .rev()
            .find(|s| s["body"]["gradingProgress"] == "FullyGraded")
            .and_then(|s| s["body"]["scoreGiven"].as_f64());
        (scores.len(), graded)
    };
    let gradebook = &gradebook;
    let wait_grade = |want: f64| async move {
        wait_for("the gradebook's grade", Duration::from_secs(15), || async {
            let (_, g) = gradebook().await;
            (g == Some(want)).then_some(Value::Null)
        })
        .await;
    };
    release().await;
    wait_grade(g1).await;
    let fake_log = env._dir.path().join("fake.log");
    let evaluator_calls = || {
        std::fs::read_to_string(&fake_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["ev"] == "job_start" && e["kind"] == "evaluator")
            .count()
    };
    let calls_before = evaluator_calls();
    assert_eq!(calls_before, 2, "one call per evaluator");

    // ---- A points-only edit: rescored by the plugin, no model call ----------
    let mut input = json!({"title": a["title"], "prompt": a["prompt"], "rubric": a["rubric"],
                           "plugin": a["plugin"], "plugin_config": a["plugin_config"]});
    // The fake evaluators choose each criterion's middle level ("partial").
    input["rubric"]["criteria"][0]["levels"][1]["points"] = json!(3);
    input["rubric"]["criteria"][0]["weight"] = json!(3);
    let (env_ref, teacher_ref, assignment_ref) = (&env, &teacher, &assignment);
    let put = |body: Value| async move {
        let (env, teacher, assignment) = (env_ref, teacher_ref, assignment_ref);
        let (status, a) = env
            .api(
                reqwest::Method::PUT,
                teacher,
                &format!("/api/v1/assignments/{assignment}"),
                Some(body),
            )
            .await;
        assert_eq!(status, 200, "{a}");
        a
    };
    assert_eq!(put(input.clone()).await["version"], 2);
    let (_, versions) = env
        .api(
            reqwest::Method::GET,
            &teacher,
            &format!("/api/v1/assignments/{assignment}/versions"),
            None,
        )
        .await;
    assert_eq!(versions["current"], 2, "{versions}");
    assert_eq!(versions["needs_rescore"], 1, "{versions}");
    assert_eq!(versions["versions"][0]["change"], "scoring");
    assert_eq!(versions["versions"][0]["summary"], "points or weights");
    assert_eq!(versions["versions"][1]["submissions"], 1);
    let rescore = || async {
        let (status, r) = env
            .api(
                reqwest::Method::POST,
                &teacher,
                &format!("/api/v1/assignments/{assignment}/rescore"),
                None,
            )
            .await;
        assert_eq!(status, 202, "{r}");
        let id = r["id"].as_str().expect("id").to_owned();
        let done = wait_for("the rescore", Duration::from_secs(60), || async {
            let (_, all) = env
                .api(
                    reqwest::Method::GET,
                    &teacher,
                    &format!("/api/v1/assignments/{assignment}/rescores"),
                    None,
                )
                .await;
            let mine = all
                .as_array()
                .and_then(|a| a.iter().find(|x| x["id"] == id.as_str()).cloned())?;
            (mine["done"] == mine["total"]).then_some(mine)
        })
        .await;
        (r, done)
    };
    let (started, done) = rescore().await;
    assert_eq!(
        (&started["scoring_only"], &started["reevaluate"]),
        (&json!(1), &json!(0)),
        "{started}"
    );
    assert_eq!(done["failed"], 0, "{done}");
    let rescored = state_of("awaiting_review").await;
    let g2 = rescored["score"]["total"].as_f64().expect("total");
    assert_ne!(g2, g1, "the new points changed the grade");
    assert_eq!(rescored["assignment_version"], 2);
    assert_eq!(
        evaluator_calls(),
        calls_before,
        "a points-only rescore makes no model call"
    );
    // Until the instructor releases it, the student and the gradebook keep
    // the released grade.
    let (_, mine) = env
        .api(
            reqwest::Method::GET,
            &student,
            &format!("/api/v1/submissions/{sub}"),
            None,
        )
        .await;
    assert!(mine["score"].is_null(), "no unreleased grade: {mine}");
    let (posted, graded) = gradebook().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gradebook().await, (posted, graded));
    assert_eq!(
        graded,
        Some(g1),
        "the platform still has the released grade"
    );
    release().await;
    wait_grade(g2).await;

    // ---- A level edit: evaluated again through the queue --------------------
    input["rubric"]["criteria"][0]["levels"] = json!([
        {"label": "missing", "points": 0, "descriptor": "Does not address the question."},
        {"label": "developing", "points": 1, "descriptor": "Names one input or output."},
        {"label": "secure", "points": 4, "descriptor": "Names the inputs and outputs."},
        {"label": "complete", "points": 5, "descriptor": "Inputs, outputs and where it happens."}
    ]);
    assert_eq!(put(input.clone()).await["version"], 3);
    let (started, done) = rescore().await;
    assert_eq!(
        (&started["scoring_only"], &started["reevaluate"]),
        (&json!(0), &json!(1)),
        "{started}"
    );
    assert_eq!(done["failed"], 0, "{done}");
    let reevaluated = state_of("awaiting_review").await;
    assert_eq!(
        evaluator_calls(),
        calls_before + 2,
        "one new call per evaluator"
    );
    let levels: Vec<&str> = reevaluated["evaluations"]
        .as_array()
        .expect("evaluations")
        .iter()
        .map(|e| e["ratings"][0]["level"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(levels, ["secure", "secure"], "judged on the new levels");
    let g3 = reevaluated["score"]["total"].as_f64().expect("total");
    assert_ne!(g3, g2);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(gradebook().await.1, Some(g2), "not before release");
    release().await;
    wait_grade(g3).await;

    // ---- Who changed what ------------------------------------------------------
    let (status, audit) = env
        .api(
            reqwest::Method::GET,
            &teacher,
            &format!("/api/v1/assignments/{assignment}/audit"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{audit}");
    let entries = audit.as_array().expect("entries");
    let by_teacher = |action: &str| -> Vec<&Value> {
        entries
            .iter()
            .filter(|e| {
                e["action"] == action
                    && e["actor"]
                        .as_str()
                        .is_some_and(|a| a.starts_with(&teacher_id))
            })
            .collect()
    };
    let updates = by_teacher("assignment.update");
    assert_eq!(updates.len(), 2, "{audit}");
    assert_eq!(updates[0]["details"]["change"], "evaluation");
    assert_eq!(updates[0]["details"]["summary"], "criteria or levels");
    assert_eq!(updates[1]["details"]["change"], "scoring");
    assert_eq!(updates[1]["details"]["summary"], "points or weights");
    let rescores = by_teacher("assignment.rescore");
    assert_eq!(rescores.len(), 2, "{audit}");
    assert_eq!(rescores[0]["details"]["reevaluate"], 1);
    assert_eq!(rescores[1]["details"]["scoring_only"], 1);
    let releases: Vec<f64> = by_teacher("submission.release")
        .iter()
        .filter_map(|e| e["details"]["total"].as_f64())
        .collect();
    assert_eq!(releases, [g3, g2, g1], "each release with its grade");
    // A student reads none of this.
    let (status, _) = env
        .api(
            reqwest::Method::GET,
            &student,
            &format!("/api/v1/assignments/{assignment}/versions"),
            None,
        )
        .await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_launch_locale_claim_sets_the_widget_language() {
    let Some(env) = Env::start().await else {
        return;
    };
    assert_eq!(env.register().await.status(), 200);
    let mut spec = learner("eleve-1");
    spec["locale"] = json!("fr-CA");
    let l = env.launch(spec).await;
    assert_eq!(l.status, 200, "{}", l.body);
    assert!(l.body.contains("<html lang=\"fr\">"), "{}", l.body);
    assert_eq!(
        l.data.as_ref().map(|d| d["locale"].clone()),
        Some(json!("fr"))
    );
    // A locale the widget lacks, and no Accept-Language: the page leaves
    // the choice to the browser's languages.
    let mut spec = learner("student-2");
    spec["locale"] = json!("de-DE");
    let l = env.launch(spec).await;
    assert_eq!(l.status, 200, "{}", l.body);
    assert!(l.body.contains("<html lang=\"en\">"), "{}", l.body);
    assert!(
        l.data.as_ref().is_some_and(|d| d.get("locale").is_none()),
        "{:?}",
        l.data
    );
}
