//! Write Viva rubric plugins in Rust.
//!
//! A plugin is a WebAssembly component for the `viva:rubric@0.1.0` world
//! (`plugins/wit/since_v0.1.0/rubric.wit`), built for `wasm32-wasip2`. This
//! crate holds the generated bindings, a [`Plugin`] trait to implement, the
//! [`export_plugin!`] macro that wires it up, log macros ([`info!`],
//! [`warn!`], …) that reach the instructor's plugin log, and a panic hook
//! that puts a panic's message in that log.
//!
//! ```ignore
//! use viva_plugin_sdk::{Plugin, PluginInfo, ScoreError, ScoreReport, ScoreRequest};
//!
//! struct Mine;
//!
//! impl Plugin for Mine {
//!     fn info() -> PluginInfo { /* name, version, schema … */ }
//!     fn score(request: ScoreRequest) -> Result<ScoreReport, ScoreError> { /* … */ }
//! }
//!
//! viva_plugin_sdk::export_plugin!(Mine);
//! ```
//!
//! See `plugins/README.md` for the authoring guide.

extern crate self as viva_plugin_sdk;

use std::sync::Once;

/// The bindings `wit-bindgen` generates for the `rubric-plugin` world.
pub mod bindings {
    wit_bindgen::generate!({
        world: "rubric-plugin",
        path: "../wit/since_v0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_rubric_plugin",
        default_bindings_module: "viva_plugin_sdk::bindings",
        runtime_path: "viva_plugin_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::viva::rubric::host::LogLevel;
pub use bindings::viva::rubric::types::{
    Criterion, CriterionScore, Evaluation, Level, PluginInfo, Rating, Rubric, ScoreError,
    ScoreReport, ScoreRequest, Segment, Submission,
};
pub use serde;
pub use serde_json;

/// What a plugin implements. [`export_plugin!`] turns it into the
/// component's exports.
pub trait Plugin {
    /// Name, version, description, configuration schema and default.
    fn info() -> PluginInfo;

    /// Checks a configuration beyond its JSON Schema; the error is shown to
    /// the instructor. The default accepts anything the schema accepts.
    fn validate_config(config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Scores one submission.
    fn score(request: ScoreRequest) -> Result<ScoreReport, ScoreError>;
}

/// Exports a [`Plugin`] implementation as the component's `scorer`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __VivaPluginExport;

        impl $crate::bindings::exports::viva::rubric::scorer::Guest for __VivaPluginExport {
            fn info() -> $crate::PluginInfo {
                $crate::install_panic_hook();
                <$plugin as $crate::Plugin>::info()
            }

            fn validate_config(
                config: ::std::string::String,
            ) -> ::std::result::Result<(), ::std::string::String> {
                $crate::install_panic_hook();
                <$plugin as $crate::Plugin>::validate_config(&config)
            }

            fn score(
                request: $crate::ScoreRequest,
            ) -> ::std::result::Result<$crate::ScoreReport, $crate::ScoreError> {
                $crate::install_panic_hook();
                <$plugin as $crate::Plugin>::score(request)
            }
        }

        $crate::bindings::__export_rubric_plugin!(__VivaPluginExport with_types_in $crate::bindings);
    };
}

/// Writes a message to the call's plugin log (the host bounds its size).
pub fn log(level: LogLevel, message: &str) {
    bindings::viva::rubric::host::log(level, message);
}

/// `debug!("x = {}", x)`: a debug line in the plugin log.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Debug, &::std::format!($($arg)*)) };
}

/// `info!(...)`: an informational line in the plugin log.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Info, &::std::format!($($arg)*)) };
}

/// `warn!(...)`: a warning in the plugin log.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Warn, &::std::format!($($arg)*)) };
}

/// `error!(...)`: an error line in the plugin log.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Error, &::std::format!($($arg)*)) };
}

/// Sends panic messages to the plugin log (and stderr, which the host also
/// captures), so an instructor sees why a call failed. Called by
/// [`export_plugin!`] on every entry; only the first call does anything.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = format!("plugin panicked: {info}");
            log(LogLevel::Error, &message);
            eprintln!("{message}");
        }));
    });
}

/// Parses the instructor's configuration (a JSON object) into `T`; serde
/// defaults fill what the instructor left out.
pub fn parse_config<T: serde::de::DeserializeOwned>(config: &str) -> Result<T, String> {
    let text = if config.trim().is_empty() {
        "{}"
    } else {
        config
    };
    serde_json::from_str(text).map_err(|e| format!("configuration: {e}"))
}

impl Criterion {
    /// Points of the best level (before the weight).
    pub fn max_points(&self) -> f64 {
        self.levels.iter().map(|l| l.points).fold(0.0, f64::max)
    }

    /// The level with this label.
    pub fn level(&self, label: &str) -> Option<&Level> {
        self.levels.iter().find(|l| l.label == label)
    }

    /// Position of a level on the criterion's scale: 0 for the fewest points,
    /// then upwards (ties keep the instructor's order). Level gaps between
    /// evaluators are differences of ranks.
    pub fn rank(&self, label: &str) -> Option<usize> {
        let mut order: Vec<(usize, &Level)> = self.levels.iter().enumerate().collect();
        order.sort_by(|a, b| a.1.points.total_cmp(&b.1.points).then(a.0.cmp(&b.0)));
        order.iter().position(|(_, l)| l.label == label)
    }

    /// The label of the level worth exactly `points`, if one is.
    pub fn label_for(&self, points: f64) -> Option<String> {
        self.levels
            .iter()
            .find(|l| (l.points - points).abs() < 1e-9)
            .map(|l| l.label.clone())
    }
}

impl Rubric {
    /// The largest possible total: the weighted sum of each best level.
    pub fn max_total(&self) -> f64 {
        self.criteria
            .iter()
            .map(|c| c.weight * c.max_points())
            .sum()
    }

    pub fn criterion(&self, id: &str) -> Option<&Criterion> {
        self.criteria.iter().find(|c| c.id == id)
    }
}

impl Evaluation {
    /// This evaluation's rating of a criterion.
    pub fn rating(&self, criterion_id: &str) -> Option<&Rating> {
        self.ratings.iter().find(|r| r.criterion_id == criterion_id)
    }
}
