//! Languages (issue 16): an assignment's language and vocabulary reach the
//! real Whisper worker (read back from the worker's own request log) and
//! the evaluators' prompts, and transcripts carry the language Whisper
//! decoded with.
//!
//! The Whisper model is the multilingual whisper-base when it is in
//! `$VIVA_MODELS_DIR` (`viva models fetch whisper-base`; scripts/demo
//! fetches it), else the tests' tiny.en, which is English-only: the worker
//! then logs the requested language and decodes in English, and says so.

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use viva_daemon::Role;
use viva_tests::real::{models_dir, whisper_worker};
use viva_tests::{TestDaemon, speech};

const FRENCH: &str = "La photosynthèse transforme la lumière du soleil, l'eau et le dioxyde \
                      de carbone en glucose et en oxygène, dans les chloroplastes.";
const VOCABULARY: &str = "photosynthèse, chlorophylle, chloroplaste, glucose";

fn french_assignment(language: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "oral-fr",
        "title": "Oral : la photosynthèse",
        "prompt": "Expliquez la photosynthèse en une minute.",
        "language": language,
        "vocabulary": VOCABULARY,
        "rubric": {"criteria": [{
            "id": "contenu", "title": "Contenu", "description": "Idées justes.",
            "levels": [{"label": "absent", "points": 0}, {"label": "complet", "points": 4}]
        }]}
    })
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("request log line is JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_french_assignment_sends_its_language_and_vocabulary_to_whisper() {
    let base = models_dir().join("whisper-base-f16.bin");
    let multilingual = base.is_file();
    let request_log = tempfile::NamedTempFile::new().expect("log file");
    let log_path = request_log.path().to_path_buf();
    let d = TestDaemon::start(&[], |c| {
        let mut stt = whisper_worker();
        if multilingual {
            stt.model = "whisper-base".into();
            stt.model_path = base.clone();
        }
        stt.options.insert(
            "request_log".into(),
            toml::Value::String(log_path.display().to_string()),
        );
        c.workers.stt = Some(stt);
        c.scheduler.batch_window = Duration::from_millis(200);
        c.workers.load_timeout = Duration::from_secs(120);
    })
    .await;
    eprintln!(
        "Whisper model: {}",
        if multilingual {
            "whisper-base (multilingual)"
        } else {
            "whisper-tiny.en (English-only; `viva models fetch whisper-base` for the multilingual one)"
        }
    );
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");

    // A language Whisper does not know is refused with what to use instead.
    let (status, body) = d
        .send(
            Method::POST,
            &teacher,
            "/api/v1/assignments",
            Some(french_assignment("klingon")),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"auto\"")),
        "{body}"
    );

    // A BCP 47 tag is stored as Whisper's code.
    let (status, body) = d
        .send(
            Method::POST,
            &teacher,
            "/api/v1/assignments",
            Some(french_assignment("fr-FR")),
        )
        .await;
    assert!(status == 201 || status == 200, "{status} {body}");
    assert_eq!(body["language"], "fr", "{body}");
    assert_eq!(body["vocabulary"], VOCABULARY, "{body}");
    let (_, stored) = d.get(&teacher, "/api/v1/assignments/oral-fr").await;
    assert_eq!(stored["language"], "fr", "{stored}");

    let learner = d.token(Role::Learner, "eleve", "sandbox");
    let media = speech(d.dir.path(), "reponse.wav", FRENCH, "fr-fr");
    let (status, body) = d.upload(&learner, "oral-fr", &media).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let done = d
        .wait_settled(std::slice::from_ref(&id), Duration::from_secs(300))
        .await;
    let s = &done[0];
    assert_ne!(s["state"], "failed", "{s}");

    // The real worker's request log: what the daemon asked for.
    let requests = read_jsonl(&log_path);
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r["language"], "fr", "{r}");
    assert_eq!(r["initial_prompt"], VOCABULARY, "{r}");
    // What it decoded with, and the language the transcript is tagged with.
    let used = if multilingual { "fr" } else { "en" };
    assert_eq!(r["language_used"], used, "{r}");
    assert_eq!(s["transcript"]["language"], used, "{s}");
    let heard = s["transcript"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    eprintln!("heard: {heard}");
    if multilingual {
        // Base on espeak-ng's French is rough ("la photosentente … dans le
        // chloroplast"), but it is French: its function words come back.
        let words: Vec<&str> = heard
            .split(|c: char| !c.is_alphabetic())
            .filter(|w| !w.is_empty())
            .collect();
        let french = ["la", "le", "de", "du", "dans", "l", "d", "et", "en"]
            .iter()
            .filter(|w| words.contains(w))
            .count();
        assert!(french >= 3, "whisper-base did not write French: {heard:?}");
    }
    // Whisper's words with their probabilities, for the reviewer.
    let words = s["transcript"]["segments"][0]["words"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!words.is_empty(), "{s}");
    assert!(
        words
            .iter()
            .all(|w| w["p"].as_f64().is_some_and(|p| (0.0..=1.0).contains(&p))),
        "{words:?}"
    );

    // The evaluators were told the answer's language: the assignment's.
    let eval_requests: Vec<serde_json::Value> = d
        .fake_events()
        .into_iter()
        .filter(|e| e["ev"] == "request" && e["kind"] == "evaluator")
        .collect();
    assert_eq!(
        eval_requests.len(),
        2,
        "one per evaluator: {eval_requests:?}"
    );
    for e in &eval_requests {
        assert_eq!(e["request"]["items"][0]["language"], "fr", "{e}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_without_a_language_detects_it_and_passes_no_prompt() {
    let d = TestDaemon::start(&[], |c| {
        c.scheduler.batch_window = Duration::from_millis(200);
    })
    .await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let mut a = french_assignment("auto");
    a["vocabulary"] = serde_json::json!("  ");
    let (status, body) = d
        .send(Method::POST, &teacher, "/api/v1/assignments", Some(a))
        .await;
    assert!(status == 201 || status == 200, "{status} {body}");
    assert!(body["language"].is_null(), "{body}");
    assert!(body["vocabulary"].is_null(), "{body}");
    let learner = d.token(Role::Learner, "eleve", "sandbox");
    let media = speech(d.dir.path(), "answer.wav", "Plants make glucose.", "en-us");
    let (status, body) = d.upload(&learner, "oral-fr", &media).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    d.wait_settled(&[id], Duration::from_secs(60)).await;
    let stt: Vec<serde_json::Value> = d
        .fake_events()
        .into_iter()
        .filter(|e| e["ev"] == "request" && e["kind"] == "stt")
        .collect();
    assert_eq!(stt.len(), 1, "{stt:?}");
    assert!(stt[0]["request"]["language"].is_null(), "{:?}", stt[0]);
    assert!(
        stt[0]["request"]["initial_prompt"].is_null(),
        "{:?}",
        stt[0]
    );
    // The evaluators get the language the (fake) worker reported.
    let evals: Vec<serde_json::Value> = d
        .fake_events()
        .into_iter()
        .filter(|e| e["ev"] == "request" && e["kind"] == "evaluator")
        .collect();
    assert!(!evals.is_empty());
    for e in &evals {
        assert_eq!(e["request"]["items"][0]["language"], "en", "{e}");
    }
    d.stop().await;
}
