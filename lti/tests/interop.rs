//! Real launch tokens from other implementations (pylti1p3's test suite, MIT;
//! see `fixtures/pylti1p3-tokens.json` for attribution), validated with an
//! injected clock: the 1EdTech reference implementation's RSA 2048 token
//! parses; Canvas's token signed with a 512-bit key is refused for its size.

use serde_json::Value;
use viva_lti::Registration;
use viva_lti::jwks::KeySet;
use viva_lti::launch::{Expectations, MessageType, validate_with_key_set};

fn fixtures() -> Value {
    let text = include_str!("fixtures/pylti1p3-tokens.json");
    serde_json::from_str(text).expect("fixture JSON")
}

fn registration(f: &Value) -> Registration {
    Registration {
        issuer: f["issuer"].as_str().expect("issuer").into(),
        client_id: f["client_id"].as_str().expect("client").into(),
        name: String::new(),
        auth_login_url: "https://platform.invalid/auth".into(),
        auth_token_url: "https://platform.invalid/token".into(),
        auth_token_audience: None,
        key_set_url: "https://platform.invalid/jwks".into(),
        deployments: vec![f["deployment_id"].as_str().expect("deployment").into()],
        algorithms: vec![],
        frame_origins: vec![],
    }
}

fn expect(f: &Value, now: u64) -> Expectations<'_> {
    Expectations {
        nonce: f["nonce"].as_str().expect("nonce"),
        target_link_uri: f["target_link_uri"].as_str(),
        now,
    }
}

#[test]
fn reference_implementation_deep_link_token_parses_with_its_clock() {
    let all = fixtures();
    let f = &all["reference_implementation_deep_link"];
    let keys = KeySet::parse(&f["jwks"]).expect("jwks");
    let iat = f["iat"].as_u64().expect("iat");
    let token = f["id_token"].as_str().expect("token");
    let launch = validate_with_key_set(token, &registration(f), &keys, expect(f, iat + 10))
        .expect("the reference token validates at its own time");
    assert_eq!(launch.message_type, MessageType::LtiDeepLinkingRequest);
    assert_eq!(launch.sub, "e2903da3930d6c09e3c3");
    assert_eq!(launch.deployment_id, "py1234");
    assert_eq!(launch.context.as_ref().map(|c| c.id.as_str()), Some("422"));
    let dl = launch.deep_linking.as_ref().expect("settings");
    assert_eq!(
        dl.deep_link_return_url,
        "https://lti-ri.imsglobal.org/platforms/370/contexts/422/deep_links"
    );
    assert_eq!(
        dl.data.as_ref().and_then(|d| d.as_str()),
        Some("Some random opaque data that MUST be sent back")
    );
    assert!(dl.accept_types.iter().any(|t| t == "ltiResourceLink"));
    assert_eq!(launch.custom["myCustomValue"], "123");
    assert_eq!(launch.name.as_deref(), Some("Laquita Juliann Johnston"));
    // Only an institution role: least privilege in the course.
    assert_eq!(
        viva_lti::roles::map_roles(&launch.roles),
        vec![viva_lti::Access::Learner]
    );

    // Today it is long expired.
    let e = validate_with_key_set(
        token,
        &registration(f),
        &keys,
        expect(f, viva_lti::now_secs()),
    )
    .expect_err("expired");
    assert_eq!(e.code(), "token_expired");
    // And its nonce belongs to its own launch only.
    let e = validate_with_key_set(
        token,
        &registration(f),
        &keys,
        Expectations {
            nonce: "another",
            target_link_uri: None,
            now: iat + 10,
        },
    )
    .expect_err("nonce");
    assert_eq!(e.code(), "nonce_mismatch");
}

#[test]
fn canvas_token_signed_with_a_512_bit_key_is_refused_for_its_key_size() {
    let all = fixtures();
    let f = &all["canvas_resource_link_rsa512"];
    let keys = KeySet::parse(&f["jwks"]).expect("jwks");
    let iat = f["iat"].as_u64().expect("iat");
    let token = f["id_token"].as_str().expect("token");
    let e = validate_with_key_set(token, &registration(f), &keys, expect(f, iat + 10))
        .expect_err("512-bit RSA");
    assert_eq!(e.code(), "weak_key", "{e}");
    assert!(e.to_string().contains("512-bit"), "{e}");
}
