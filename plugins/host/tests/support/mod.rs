//! Helpers shared by the plugin host's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use viva_plugins::{HostOptions, Limits, Plugin, PluginHost, ScoreRequest, builtin};

/// An example request from `plugins/examples/`.
pub fn example(name: &str) -> ScoreRequest {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).expect("example file");
    serde_json::from_str(&text).expect("example parses as a ScoreRequest")
}

pub fn host_with(limits: Limits) -> PluginHost {
    PluginHost::new(HostOptions {
        limits,
        ..HostOptions::default()
    })
    .expect("host")
}

pub fn host() -> PluginHost {
    host_with(Limits::default())
}

pub fn weighted(host: &PluginHost) -> Plugin {
    host.load(builtin::WEIGHTED_CRITERIA)
        .expect("weighted-criteria loads")
}

pub fn hostile_bytes() -> Vec<u8> {
    std::fs::read(builtin::built_guest("hostile")).expect("the hostile test plugin was built")
}

pub fn hostile(host: &PluginHost) -> Plugin {
    host.load(&hostile_bytes()).expect("hostile plugin loads")
}

/// The agreeing example with another configuration.
pub fn with_config(mut req: ScoreRequest, config: serde_json::Value) -> ScoreRequest {
    req.config = config;
    req
}

pub fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}
