//! `dapt-plot`: held-out perplexity against tokens trained, one panel per source and one line per
//! run, from the JSON logs of `dapt --log-format json launch` (its `held-out evaluation` lines).
//!
//! ```text
//! dapt-plot --tokens-per-step 1024 --out curves.svg \
//!     --guide postgres=0.8 --guide sotu=1.05 \
//!     "0% replay=run-00.log" "5% replay=run-05.log"
//! ```
//!
//! A `--guide SOURCE=F` draws a dashed line at F times the source's step-0 (base model)
//! perplexity, e.g. a goal. It also prints the points as Markdown tables on stdout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use plotters::prelude::*;

#[derive(Parser)]
#[command(about = "Held-out perplexity curves of dapt launch runs, from their JSON logs")]
struct Args {
    /// Tokens of one optimizer step (global_batch x seq_len): steps become tokens trained.
    #[arg(long)]
    tokens_per_step: u64,
    /// Where the SVG goes.
    #[arg(long)]
    out: PathBuf,
    /// SOURCE=FACTOR: a dashed line at FACTOR times the source's step-0 perplexity.
    #[arg(long = "guide")]
    guides: Vec<String>,
    /// LABEL=LOG: one run, a `--log-format json` stderr log of `dapt launch`.
    #[arg(required = true)]
    runs: Vec<String>,
}

/// One run's evaluations: source -> step -> perplexity.
struct Run {
    label: String,
    evals: BTreeMap<String, BTreeMap<u64, f64>>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runs = args
        .runs
        .iter()
        .map(|spec| {
            let (label, path) = spec
                .split_once('=')
                .with_context(|| format!("`{spec}`: want LABEL=LOG"))?;
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
            Ok(Run {
                label: label.to_owned(),
                evals: parse_log(&text),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut guides = BTreeMap::new();
    for g in &args.guides {
        let (source, factor) = g
            .split_once('=')
            .with_context(|| format!("`{g}`: want SOURCE=FACTOR"))?;
        let factor: f64 = factor
            .parse()
            .with_context(|| format!("`{g}`: the factor is not a number"))?;
        guides.insert(source.to_owned(), factor);
    }
    // Sources in order of first appearance.
    let mut sources: Vec<String> = Vec::new();
    for run in &runs {
        for source in run.evals.keys() {
            if !sources.contains(source) {
                sources.push(source.clone());
            }
        }
    }
    if sources.is_empty() {
        bail!("no `held-out evaluation` lines in the logs (was --log-format json given?)");
    }
    draw(&args, &runs, &sources, &guides)?;
    print_tables(&runs, &sources, args.tokens_per_step);
    Ok(())
}

/// The `held-out evaluation` lines of a log; a step evaluated twice (after a resume) keeps the
/// last value. Lines that are not JSON (a crash's panic message) are skipped.
fn parse_log(text: &str) -> BTreeMap<String, BTreeMap<u64, f64>> {
    let mut evals: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let f = &v["fields"];
        if f["message"] != "held-out evaluation" {
            continue;
        }
        if let (Some(source), Some(step), Some(ppl)) = (
            f["source"].as_str(),
            f["step"].as_u64(),
            f["perplexity"].as_f64(),
        ) {
            evals
                .entry(source.to_owned())
                .or_default()
                .insert(step, ppl);
        }
    }
    evals
}

fn draw(
    args: &Args,
    runs: &[Run],
    sources: &[String],
    guides: &BTreeMap<String, f64>,
) -> Result<()> {
    let panel = (560u32, 420u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (panel.0 * sources.len() as u32, panel.1))
            .into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((1, sources.len()));
        for (area, source) in areas.iter().zip(sources) {
            let series: Vec<(&str, Vec<(f64, f64)>)> = runs
                .iter()
                .map(|run| {
                    let points = run
                        .evals
                        .get(source)
                        .map(|by_step| {
                            by_step
                                .iter()
                                .map(|(&step, &ppl)| {
                                    ((step * args.tokens_per_step) as f64 / 1000.0, ppl)
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    (run.label.as_str(), points)
                })
                .collect();
            let base = series
                .iter()
                .find_map(|(_, pts)| pts.iter().find(|p| p.0 == 0.0).map(|p| p.1));
            let guide = guides.get(source).zip(base).map(|(f, b)| (*f, f * b));
            let all = series.iter().flat_map(|(_, p)| p.iter());
            let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
            let (mut y_min, mut y_max) = all
                .map(|p| p.1)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
                    (lo.min(y), hi.max(y))
                });
            if let Some((_, g)) = guide {
                (y_min, y_max) = (y_min.min(g), y_max.max(g));
            }
            let pad = ((y_max - y_min) * 0.08).max(0.5);
            let mut chart = ChartBuilder::on(area)
                .caption(format!("held-out perplexity: {source}"), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d(0.0..x_max * 1.02, (y_min - pad)..(y_max + pad))?;
            chart
                .configure_mesh()
                .x_desc("tokens trained (thousands)")
                .y_desc("perplexity")
                .light_line_style(WHITE.mix(0.0))
                .draw()?;
            for (i, (label, points)) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        color.stroke_width(2),
                    ))?
                    .label(*label)
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
            if let Some((factor, g)) = guide {
                let grey = BLACK.mix(0.6);
                chart
                    .draw_series(DashedLineSeries::new(
                        [(0.0, g), (x_max * 1.02, g)],
                        6,
                        4,
                        grey.stroke_width(1),
                    ))?
                    .label(format!("{factor} x base"))
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], grey));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        root.present().context("drawing the SVG")?;
    }
    write_output(&args.out, svg.as_bytes())
}

/// Writes `bytes` to `out` by renaming a new file into place, after checking that `out` is a
/// new file or an SVG (an earlier plot): never a symlink (its target, a user's file, was
/// rewritten) and never another file (`--out run.log` with `a=run.log` overwrote the run's only
/// log; an audit). Errors name the path.
fn write_output(out: &Path, bytes: &[u8]) -> Result<()> {
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("--out {}", out.display())),
        Ok(meta) if !meta.is_file() => {
            bail!("--out {}: not a regular file (a symlink, directory or device); dapt-plot writes only new files or its own SVGs", out.display())
        }
        Ok(_) => {
            let mut head = [0u8; 256];
            let n = std::fs::File::open(out)
                .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
                .with_context(|| format!("--out {}", out.display()))?;
            let text = String::from_utf8_lossy(&head[..n]);
            if !text.trim_start().starts_with("<svg") {
                bail!("--out {}: exists and is not an SVG: dapt-plot writes only new files or its own SVGs (is it one of the logs?)", out.display())
            }
        }
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    std::io::Write::write_all(&mut file, bytes)
        .with_context(|| format!("writing {}", out.display()))?;
    // (A temporary file is 0600: a plot is read by others as any file written with the usual
    // umask would be.)
    std::fs::set_permissions(
        file.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .with_context(|| format!("writing {}", out.display()))?;
    file.persist(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// One Markdown table per source: a row per run, a column per evaluated step.
fn print_tables(runs: &[Run], sources: &[String], tokens_per_step: u64) {
    for source in sources {
        let mut steps: Vec<u64> = runs
            .iter()
            .filter_map(|r| r.evals.get(source))
            .flat_map(|m| m.keys().copied())
            .collect();
        steps.sort_unstable();
        steps.dedup();
        println!("\n{source}: held-out perplexity by tokens trained\n");
        let header: Vec<String> = steps
            .iter()
            .map(|s| format!("{}", s * tokens_per_step))
            .collect();
        println!("| run | {} |", header.join(" | "));
        println!("|---|{}", "---:|".repeat(steps.len()));
        for run in runs {
            let cells: Vec<String> = steps
                .iter()
                .map(|s| {
                    run.evals
                        .get(source)
                        .and_then(|m| m.get(s))
                        .map_or_else(|| "".to_owned(), |p| format!("{p:.2}"))
                })
                .collect();
            println!("| {} | {} |", run.label, cells.join(" | "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_evaluations_and_keeps_the_last_of_a_step() {
        let log = r#"{"fields":{"message":"step","step":0,"loss":3.2}}
{"fields":{"message":"held-out evaluation","step":0,"source":"pg","perplexity":27.0,"tokens":8192}}
thread 'main' panicked
{"fields":{"message":"held-out evaluation","step":16,"source":"pg","perplexity":24.0,"tokens":8192}}
{"fields":{"message":"held-out evaluation","step":16,"source":"pg","perplexity":23.5,"tokens":8192}}
{"fields":{"message":"held-out evaluation","step":16,"source":"news","perplexity":50.0,"tokens":8192}}"#;
        let evals = parse_log(log);
        assert_eq!(evals["pg"].len(), 2);
        assert_eq!(evals["pg"][&16], 23.5);
        assert_eq!(evals["news"][&16], 50.0);
    }
}
