//! `dapt-plot --out` over the real binary: it writes a new file or one of its own SVGs, never
//! one of its input logs or a symlink's target (an audit: `--out run.log` with `a=run.log`
//! replaced the run's only log with the SVG, and a symlink's target was rewritten).

use std::path::Path;
use std::process::{Command, Output};

/// One `held-out evaluation` line of a `--log-format json` log.
const LOG: &str = r#"{"fields":{"message":"held-out evaluation","source":"postgres","step":0,"perplexity":500.0}}
{"fields":{"message":"held-out evaluation","source":"postgres","step":10,"perplexity":300.0}}
"#;

fn plot(dir: &Path, out: &str, log: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dapt-plot"))
        .current_dir(dir)
        .args([
            "--tokens-per-step",
            "1024",
            "--out",
            out,
            &format!("a={log}"),
        ])
        .output()
        .expect("dapt-plot runs")
}

#[test]
fn the_plot_never_overwrites_its_log_or_a_symlinks_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("run.log"), LOG).expect("write");
    std::fs::write(d.join("notes.txt"), "mine").expect("write");
    std::os::unix::fs::symlink(d.join("notes.txt"), d.join("link.svg")).expect("symlink");

    let out = plot(d, "run.log", "run.log");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not an SVG"), "{err}");
    assert_eq!(
        std::fs::read_to_string(d.join("run.log")).expect("log"),
        LOG
    );

    let out = plot(d, "link.svg", "run.log");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a regular file"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("notes.txt")).expect("notes"),
        "mine"
    );

    // A new file, then the same plot again over it.
    for _ in 0..2 {
        let out = plot(d, "curves.svg", "run.log");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let svg = std::fs::read_to_string(d.join("curves.svg")).expect("svg");
        assert!(svg.starts_with("<svg") && svg.contains("postgres"), "{svg}");
    }
}
