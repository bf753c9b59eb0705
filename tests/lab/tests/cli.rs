//! `viva-lab`'s command line: the options `viva lab` had, unchanged. (This
//! integration test also makes `cargo test --workspace` build the
//! `viva-lab` binary that tests/tests/lab.rs runs.)

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn viva_lab_has_the_options_of_viva_lab() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_viva-lab"))
        .arg("--help")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run viva-lab --help");
    let until = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            panic!("viva-lab --help did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--students <STUDENTS>",
        "--report <REPORT>",
        "--min-seconds <MIN_SECONDS>",
        "--max-seconds <MAX_SECONDS>",
        "--arrival <ARRIVAL>",
        "--seed <SEED>",
        "--policies <POLICIES>",
        "--no-baselines",
        "--chaos",
        "--chaos-kills <CHAOS_KILLS>",
        "--chaos-stall <CHAOS_STALL>",
        "--models-dir <MODELS_DIR>",
        "--bin-dir <BIN_DIR>",
        "--python <PYTHON>",
        "--platform-script <PLATFORM_SCRIPT>",
        "--platform-url <PLATFORM_URL>",
        "--threads <THREADS>",
        "--stt-batch-size <STT_BATCH_SIZE>",
        "--batch-window <BATCH_WINDOW>",
        "--eval-batch-size <EVAL_BATCH_SIZE>",
        "--timeout <TIMEOUT>",
        "--profile <PROFILE>",
        "--scale <SCALE>",
        "--max-phase-wait <MAX_PHASE_WAIT>",
        "--warm-up <WARM_UP>",
        "--postgres",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
    let options = help
        .lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .count();
    // The 26 above, -h/--help and -V/--version.
    assert_eq!(options, 28, "{help}");
}
