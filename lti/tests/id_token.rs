//! id_token validation against crafted tokens: one accepted launch, then one
//! rejection per item of the security checklist, each with its own code.
//! The "platform" signs with a real RSA 2048 key (a `ToolKeys` ring).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use viva_lti::jwks::JwksCache;
use viva_lti::launch::{Expectations, claims, validate_id_token};
use viva_lti::{HttpClient, Registration, ToolKeys, UrlPolicy};

const ISS: &str = "https://platform.example.edu";
const CLIENT: &str = "viva-client";
const JWKS_URL: &str = "https://platform.example.edu/jwks";
const OTHER_JWKS_URL: &str = "https://other.example.edu/jwks";
const TARGET: &str = "https://viva.example.edu/lti/launch";
const NONCE: &str = "n-0123456789";
const NOW: u64 = 1_800_000_000;

struct Fixture {
    _dir: tempfile::TempDir,
    platform: ToolKeys,
    attacker: ToolKeys,
    cache: JwksCache,
    registration: Registration,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tmp");
    let platform = ToolKeys::open(&dir.path().join("platform"), NOW).expect("platform keys");
    let attacker = ToolKeys::open(&dir.path().join("attacker"), NOW).expect("attacker keys");
    let http = HttpClient::new(UrlPolicy::strict(), "test").expect("http");
    let cache = JwksCache::new(http);
    cache
        .preload(JWKS_URL, &platform.jwks())
        .await
        .expect("preload");
    // Another registration's key set publishes the attacker's key.
    cache
        .preload(OTHER_JWKS_URL, &attacker.jwks())
        .await
        .expect("preload");
    let registration = Registration {
        issuer: ISS.into(),
        client_id: CLIENT.into(),
        name: "test".into(),
        auth_login_url: format!("{ISS}/auth"),
        auth_token_url: format!("{ISS}/token"),
        auth_token_audience: None,
        key_set_url: JWKS_URL.into(),
        deployments: vec!["dep-1".into()],
        algorithms: vec![],
        frame_origins: vec![],
    };
    Fixture {
        _dir: dir,
        platform,
        attacker,
        cache,
        registration,
    }
}

fn payload() -> Value {
    json!({
        "iss": ISS,
        "aud": CLIENT,
        "azp": CLIENT,
        "sub": "user-1",
        "iat": NOW - 5,
        "exp": NOW + 300,
        "nonce": NONCE,
        "name": "Ada Lovelace",
        claims::VERSION: "1.3.0",
        claims::MESSAGE_TYPE: "LtiResourceLinkRequest",
        claims::DEPLOYMENT_ID: "dep-1",
        claims::TARGET_LINK_URI: TARGET,
        claims::RESOURCE_LINK: {"id": "rl-1", "title": "Oral exam"},
        claims::ROLES: ["http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"],
        claims::CONTEXT: {"id": "course-1", "title": "Biology"},
        claims::CUSTOM: {"viva_assignment": "asg-1", "n": 3, "flag": true, "nothing": null},
        claims::AGS_ENDPOINT: {
            "scope": ["https://purl.imsglobal.org/spec/lti-ags/scope/score"],
            "lineitem": "https://platform.example.edu/lineitems/1/lineitem?type_id=7"
        }
    })
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A token with an arbitrary header and signature bytes.
fn raw(header: Value, body: &Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(&header),
        b64(body),
        URL_SAFE_NO_PAD.encode(sig)
    )
}

fn expect() -> Expectations<'static> {
    Expectations {
        nonce: NONCE,
        target_link_uri: Some(TARGET),
        now: NOW,
    }
}

async fn check(f: &Fixture, token: &str) -> Result<viva_lti::Launch, viva_lti::LtiError> {
    validate_id_token(token, &f.registration, &f.cache, expect()).await
}

async fn rejects(f: &Fixture, token: &str, code: &str, case: &str) {
    match check(f, token).await {
        Ok(_) => panic!("{case}: accepted"),
        Err(e) => assert_eq!(e.code(), code, "{case}: {e}"),
    }
}

async fn rejects_payload(f: &Fixture, mutate: impl FnOnce(&mut Value), code: &str, case: &str) {
    let mut p = payload();
    mutate(&mut p);
    let token = f.platform.sign(&p).expect("sign");
    rejects(f, &token, code, case).await;
}

#[tokio::test]
async fn a_valid_launch_is_accepted_and_tolerant_of_odd_values() {
    let f = fixture().await;
    let token = f.platform.sign(&payload()).expect("sign");
    let l = check(&f, &token).await.expect("valid");
    assert_eq!(l.sub, "user-1");
    assert_eq!(l.deployment_id, "dep-1");
    assert_eq!(
        l.resource_link.as_ref().map(|r| r.id.as_str()),
        Some("rl-1")
    );
    assert_eq!(l.custom["viva_assignment"], "asg-1");
    assert_eq!(l.custom["n"], "3", "non-string custom values are tolerated");
    assert_eq!(l.custom["flag"], "true");
    assert_eq!(
        l.ags.as_ref().and_then(|a| a.lineitem.as_deref()),
        Some("https://platform.example.edu/lineitems/1/lineitem?type_id=7")
    );

    // Empty, unknown and short roles are tolerated (mapped to least privilege elsewhere).
    let mut p = payload();
    p[claims::ROLES] = json!([]);
    let l = check(&f, &f.platform.sign(&p).expect("sign"))
        .await
        .expect("empty roles");
    assert!(l.roles.is_empty());
    p[claims::ROLES] = json!(["Instructor", 7, "urn:nonsense"]);
    let l = check(&f, &f.platform.sign(&p).expect("sign"))
        .await
        .expect("odd roles");
    assert_eq!(
        l.roles,
        vec!["Instructor".to_string(), "urn:nonsense".to_string()]
    );
    // aud as an array with azp.
    p["aud"] = json!([CLIENT, "someone-else"]);
    check(&f, &f.platform.sign(&p).expect("sign"))
        .await
        .expect("aud array with azp");
}

#[tokio::test]
async fn algorithm_and_key_attacks_are_rejected() {
    let f = fixture().await;
    let kid = f.platform.current_kid().expect("kid");
    let body = payload();

    // 1. alg "none", no signature.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": kid})),
        b64(&body)
    );
    rejects(
        &f,
        &none,
        "disallowed_algorithm",
        "alg none with empty signature",
    )
    .await;
    let none = raw(json!({"alg": "none", "kid": kid}), &body, b"x");
    rejects(&f, &none, "disallowed_algorithm", "alg none").await;

    // 2. HS256 keyed with the platform's public modulus (algorithm confusion).
    let n = f.platform.jwks()["keys"][0]["n"]
        .as_str()
        .expect("n")
        .to_owned();
    let key = jsonwebtoken::EncodingKey::from_secret(n.as_bytes());
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some(kid.clone());
    let hs = jsonwebtoken::encode(&h, &body, &key).expect("hs256");
    rejects(&f, &hs, "disallowed_algorithm", "HS256 confusion").await;

    // 3. An RSA algorithm the registration does not allow.
    let rs512 = raw(json!({"alg": "RS512", "kid": kid}), &body, &[1; 256]);
    rejects(&f, &rs512, "disallowed_algorithm", "RS512 not registered").await;
    let es = raw(json!({"alg": "ES256", "kid": kid}), &body, &[1; 64]);
    rejects(&f, &es, "disallowed_algorithm", "ES256").await;

    // 4. No kid.
    let good = f.platform.sign(&body).expect("sign");
    let parts: Vec<&str> = good.split('.').collect();
    let no_kid = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256"})),
        parts[1],
        parts[2]
    );
    rejects(&f, &no_kid, "missing_kid", "no kid").await;
    let empty_kid = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "kid": ""})),
        parts[1],
        parts[2]
    );
    rejects(&f, &empty_kid, "missing_kid", "empty kid").await;

    // 5. A kid the registration's key set does not have (no network refetch
    //    within the rate limit).
    let unknown = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "kid": "not-a-key"})),
        parts[1],
        parts[2]
    );
    rejects(&f, &unknown, "unknown_kid", "unknown kid").await;

    // 6. jku pointing at the attacker's key set: ignored, so the attacker's
    //    kid is unknown.
    let akid = f.attacker.current_kid().expect("akid");
    let forged = f.attacker.sign(&body).expect("sign");
    let fparts: Vec<&str> = forged.split('.').collect();
    let jku = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "kid": akid, "jku": OTHER_JWKS_URL, "x5u": OTHER_JWKS_URL})),
        fparts[1],
        fparts[2]
    );
    rejects(&f, &jku, "unknown_kid", "jku/x5u ignored").await;

    // 7. Embedded jwk with the attacker's key but the platform's kid: the
    //    embedded key is ignored and the platform key does not verify.
    let jwk = f.attacker.jwks()["keys"][0].clone();
    let embedded = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "kid": kid, "jwk": jwk})),
        fparts[1],
        fparts[2]
    );
    rejects(&f, &embedded, "bad_signature", "embedded jwk").await;

    // 8. A key from another registration's key set: looked up only in this
    //    registration's set.
    rejects(&f, &forged, "unknown_kid", "another registration's key").await;

    // 9. Tampered payload.
    let mut tampered_body = body.clone();
    tampered_body["sub"] = json!("admin");
    let tampered = format!("{}.{}.{}", parts[0], b64(&tampered_body), parts[2]);
    rejects(&f, &tampered, "bad_signature", "tampered payload").await;

    // 10. Tampered signature and malformed tokens.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("sig");
    sig[10] ^= 1;
    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    rejects(&f, &bad_sig, "bad_signature", "flipped signature bit").await;
    rejects(
        &f,
        &format!("{}.{}", parts[0], parts[1]),
        "malformed_token",
        "two parts",
    )
    .await;
    rejects(&f, "not-a-jwt", "malformed_token", "garbage").await;
    rejects(
        &f,
        &format!("{good}.extra"),
        "malformed_token",
        "four parts",
    )
    .await;
    let crit = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "kid": kid, "crit": ["exp"]})),
        parts[1],
        parts[2]
    );
    rejects(&f, &crit, "malformed_token", "crit header").await;

    // 11. A weak (1024-bit) key in the registration's own key set.
    let weak_n = URL_SAFE_NO_PAD.encode([0xc3u8; 128]);
    f.cache
        .preload(
            JWKS_URL,
            &json!({"keys": [{"kty": "RSA", "kid": "weak", "n": weak_n, "e": "AQAB"}]}),
        )
        .await
        .expect("preload");
    let weak = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "kid": "weak"})),
        parts[1],
        parts[2]
    );
    rejects(&f, &weak, "weak_key", "1024-bit key").await;
}

#[tokio::test]
async fn claim_checks_each_have_their_own_error() {
    let f = fixture().await;
    type Mutation = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "wrong iss",
            Box::new(|p| p["iss"] = json!("https://evil.example.com")),
            "issuer_mismatch",
        ),
        (
            "iss with a trailing slash",
            Box::new(|p| p["iss"] = json!(format!("{ISS}/"))),
            "issuer_mismatch",
        ),
        (
            "missing iss",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove("iss"));
            }),
            "missing_claim",
        ),
        (
            "aud without client",
            Box::new(|p| p["aud"] = json!("other")),
            "audience_mismatch",
        ),
        (
            "aud array without client",
            Box::new(|p| p["aud"] = json!(["a", "b"])),
            "audience_mismatch",
        ),
        (
            "missing aud",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove("aud"));
            }),
            "missing_claim",
        ),
        (
            "several aud, no azp",
            Box::new(|p| {
                p["aud"] = json!([CLIENT, "other"]);
                p.as_object_mut().map(|o| o.remove("azp"));
            }),
            "azp_mismatch",
        ),
        (
            "azp of another client",
            Box::new(|p| p["azp"] = json!("other")),
            "azp_mismatch",
        ),
        (
            "expired",
            Box::new(|p| {
                p["exp"] = json!(NOW - 120);
                p["iat"] = json!(NOW - 400);
            }),
            "token_expired",
        ),
        (
            "issued in the future",
            Box::new(|p| p["iat"] = json!(NOW + 600)),
            "token_not_yet_valid",
        ),
        (
            "not before in the future",
            Box::new(|p| p["nbf"] = json!(NOW + 600)),
            "token_not_yet_valid",
        ),
        (
            "issued too long ago",
            Box::new(|p| {
                p["iat"] = json!(NOW - 7200);
                p["exp"] = json!(NOW + 7200);
            }),
            "token_too_old",
        ),
        (
            "missing exp",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove("exp"));
            }),
            "missing_claim",
        ),
        (
            "missing iat",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove("iat"));
            }),
            "missing_claim",
        ),
        (
            "exp not a number",
            Box::new(|p| p["exp"] = json!("tomorrow")),
            "invalid_claim",
        ),
        (
            "nonce of another launch",
            Box::new(|p| p["nonce"] = json!("n-other")),
            "nonce_mismatch",
        ),
        (
            "missing nonce",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove("nonce"));
            }),
            "missing_claim",
        ),
        (
            "version 1.1",
            Box::new(|p| p[claims::VERSION] = json!("1.1")),
            "unsupported_version",
        ),
        (
            "missing version",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove(claims::VERSION));
            }),
            "missing_claim",
        ),
        (
            "unknown message type",
            Box::new(|p| p[claims::MESSAGE_TYPE] = json!("LtiStartProctoring")),
            "unsupported_message_type",
        ),
        (
            "missing message type",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove(claims::MESSAGE_TYPE));
            }),
            "missing_claim",
        ),
        (
            "unknown deployment",
            Box::new(|p| p[claims::DEPLOYMENT_ID] = json!("dep-2")),
            "unknown_deployment",
        ),
        (
            "missing deployment",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove(claims::DEPLOYMENT_ID));
            }),
            "missing_claim",
        ),
        (
            "missing resource link",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove(claims::RESOURCE_LINK));
            }),
            "missing_claim",
        ),
        (
            "resource link without id",
            Box::new(|p| p[claims::RESOURCE_LINK] = json!({"title": "x"})),
            "missing_claim",
        ),
        (
            "missing roles",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove(claims::ROLES));
            }),
            "missing_claim",
        ),
        (
            "roles not an array",
            Box::new(|p| p[claims::ROLES] = json!("Instructor")),
            "invalid_claim",
        ),
        (
            "missing sub",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove("sub"));
            }),
            "missing_claim",
        ),
        (
            "target link elsewhere",
            Box::new(|p| {
                p[claims::TARGET_LINK_URI] = json!("https://viva.example.edu/lti/launch?x=1")
            }),
            "target_link_mismatch",
        ),
        (
            "missing target link",
            Box::new(|p| {
                p.as_object_mut().map(|o| o.remove(claims::TARGET_LINK_URI));
            }),
            "missing_claim",
        ),
        (
            "deep linking without settings",
            Box::new(|p| p[claims::MESSAGE_TYPE] = json!("LtiDeepLinkingRequest")),
            "missing_claim",
        ),
        (
            "deep linking to a javascript: URL",
            Box::new(|p| {
                p[claims::MESSAGE_TYPE] = json!("LtiDeepLinkingRequest");
                p[claims::DL_SETTINGS] = json!({"deep_link_return_url": "javascript:alert(1)"});
            }),
            "invalid_claim",
        ),
    ];
    assert!(cases.len() >= 30);
    for (case, mutate, code) in cases {
        rejects_payload(&f, mutate, code, case).await;
    }
}

#[tokio::test]
async fn deep_linking_requests_parse_and_echo_data() {
    let f = fixture().await;
    let mut p = payload();
    p[claims::MESSAGE_TYPE] = json!("LtiDeepLinkingRequest");
    p.as_object_mut().map(|o| o.remove(claims::RESOURCE_LINK));
    p[claims::ROLES] = json!(["http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor"]);
    p[claims::DL_SETTINGS] = json!({
        "deep_link_return_url": "https://platform.example.edu/dl/return?course=1",
        "accept_types": ["ltiResourceLink"],
        "data": "opaque-123"
    });
    let l = check(&f, &f.platform.sign(&p).expect("sign"))
        .await
        .expect("dl");
    let dir = tempfile::tempdir().expect("tmp");
    let tool = ToolKeys::open(dir.path(), NOW).expect("tool keys");
    let item = viva_lti::deep_linking::ResourceLinkItem {
        title: "Oral exam".into(),
        text: None,
        url: TARGET.into(),
        custom: [("viva_assignment".to_string(), "asg-1".to_string())].into(),
        line_item: Some(viva_lti::deep_linking::LineItemSpec {
            score_maximum: 12.0,
            label: "Oral exam".into(),
            resource_id: Some("asg-1".into()),
            tag: Some("viva".into()),
        }),
    };
    let resp = viva_lti::deep_linking::respond(&l, &[item], &tool, NOW).expect("respond");
    assert_eq!(
        resp.return_url,
        "https://platform.example.edu/dl/return?course=1"
    );
    let body: Value = {
        let part = resp.jwt.split('.').nth(1).expect("payload");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("b64")).expect("json")
    };
    assert_eq!(body["iss"], CLIENT);
    assert_eq!(body["aud"][0], ISS);
    assert_eq!(body[claims::DL_DATA], "opaque-123");
    assert_eq!(body[claims::MESSAGE_TYPE], "LtiDeepLinkingResponse");
    let item = &body[claims::DL_CONTENT_ITEMS][0];
    assert_eq!(item["type"], "ltiResourceLink");
    assert_eq!(item["lineItem"]["scoreMaximum"], 12.0);
    assert_eq!(item["custom"]["viva_assignment"], "asg-1");

    // A resource-link launch cannot be answered with a deep-linking response.
    let rl = check(&f, &f.platform.sign(&payload()).expect("sign"))
        .await
        .expect("rl");
    let e = viva_lti::deep_linking::respond(&rl, &[], &tool, NOW).expect_err("not DL");
    assert_eq!(e.code(), "unsupported_message_type");
}
